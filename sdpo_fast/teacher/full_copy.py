"""The full-copy teacher: one frozen copy of the policy, exposed as the trainer's `ref_model`.

`FullCopyTeacher` covers one process, DDP and DeepSpeed ZeRO-0/1/2 (the copy is replicated);
`Fsdp2Teacher` shards the copy exactly like the student, so the EMA runs shard by shard. ZeRO-3
lives in `zero3.py`.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..distributed import full_weight, reshard_fsdp2, shard_fsdp2_per_layer
from ..forward import SDPORequest, add_sdpo_forward, strip_sdpo_forward
from .base import Teacher
from .ema import ema_update


def frozen_copy(student: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A deep copy of the student in `dtype`, in eval mode, without gradients, with its own forward patch."""
    teacher = copy.deepcopy(student)
    strip_sdpo_forward(teacher)  # the copied patch closes over the student
    teacher.to(dtype).eval().requires_grad_(False)
    add_sdpo_forward(teacher)
    return teacher


class FullCopyTeacher(Teacher):
    """A replicated frozen copy (one process, DDP, ZeRO-0/1/2), prepared like TRL's reference model."""

    kind = "full-copy"

    def __init__(self, module: nn.Module, accelerator):
        self.module = module
        self.accelerator = accelerator

    @classmethod
    def from_student(cls, student: nn.Module, accelerator, dtype: torch.dtype) -> FullCopyTeacher:
        return cls(cls.prepare(frozen_copy(student, dtype), accelerator), accelerator)

    @staticmethod
    def prepare(module: nn.Module, accelerator) -> nn.Module:
        if accelerator.state.deepspeed_plugin is not None:  # ZeRO-1/2: a stage-0 inference engine
            from trl.models import prepare_deepspeed

            return prepare_deepspeed(module, accelerator)
        return accelerator.prepare_model(module, evaluation_mode=True)

    @property
    def unwrapped(self) -> nn.Module:
        return getattr(self.module, "module", self.module)  # a DeepSpeed engine wraps it

    def hidden_states(self, model, inputs, completion_length):
        return self.module(**inputs, sdpo=SDPORequest(completion_length))

    def lm_head_weight(self, model):
        return self.unwrapped.get_output_embeddings().weight.detach()

    def ema_step(self, student, generator=None):
        ema_update(self.unwrapped, self.accelerator.unwrap_model(student), self.ema_rate, generator=generator)

    def state_dict(self):
        return {k: v.detach().cpu().clone() for k, v in self.unwrapped.state_dict().items()}

    def load_state_dict(self, state):
        self.unwrapped.load_state_dict(state)


class Fsdp2Teacher(FullCopyTeacher):
    """The copy FSDP2-sharded per layer over the student's mesh; every forward and gather is a collective."""

    lockstep = True

    @staticmethod
    def prepare(module, accelerator):
        return shard_fsdp2_per_layer(module, accelerator)

    @property
    def unwrapped(self):
        return self.module  # FSDP2 shards in place

    def lm_head_weight(self, model):
        weight = self.module.get_output_embeddings().weight
        full = full_weight(weight).detach()
        # Not a DTensor right now means FSDP2 left it gathered: copy it before `end_pass` frees it.
        return full if hasattr(weight, "full_tensor") else full.clone()

    def end_pass(self):
        reshard_fsdp2(self.module)

    def ema_step(self, student, generator=None):
        reshard_fsdp2(self.module)
        reshard_fsdp2(student)
        # The FSDP-wrapped student keeps its DTensors: the EMA pairs local shards.
        ema_update(self.module, student, self.ema_rate, generator=generator)

    def state_dict(self):
        return self.accelerator.get_state_dict(self.module)

    def load_state_dict(self, state):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.module, state, options=StateDictOptions(full_state_dict=True))
