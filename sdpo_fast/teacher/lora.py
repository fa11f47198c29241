"""The LoRA teacher: a detached snapshot of the student's adapter, swapped into the one adapter for teacher forwards.

There is never a second adapter: `model.state_dict()` holds the student's alone, so nothing else
(vLLM weight sync, Unsloth's LoRA request builder, `save_pretrained`) can pick the teacher up, and
nothing depends on fused LoRA kernels honouring PEFT's adapter switching. A teacher forward copies
the snapshot into the adapter's tensors, runs the model, and copies the student's values back,
exactly, even when the forward raises.

The snapshot covers every trainable tensor of the PEFT model: the LoRA factors and any
`modules_to_save` copies (an adapter-trained lm_head gets its own teacher copy). It starts as an
exact copy of the student's adapter (the reference's teacher starts at the initial policy; TRL's
experimental SDPO zero-initialises its teacher adapter, i.e. starts at the base model).
"""

from __future__ import annotations

import contextlib

import torch

from ..distributed import full_weight
from ..ema import _normalise_name, ema_update, local_shard
from ..forward import SDPORequest, eval_mode
from .base import Teacher


class LoraSnapshotTeacher(Teacher):
    kind = "lora-snapshot"

    def __init__(self, peft_model, accelerator):
        self.accelerator = accelerator
        self.params = {_normalise_name(name): p for name, p in peft_model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError(
                "The PEFT model has no trainable parameters to snapshot for the SDPO teacher. Train a LoRA adapter "
                "(peft_config=LoraConfig(...)), or fine-tune the full model."
            )
        with torch.no_grad():
            self.snapshot = {n: local_shard(p).detach().clone() for n, p in self.params.items()}
        self._backup = {n: torch.empty_like(s) for n, s in self.snapshot.items()}

    @contextlib.contextmanager
    def swapped_in(self):
        """The teacher's values in the adapter's own tensors; the student's are restored bit for bit on exit."""
        with torch.no_grad():
            for name, p in self.params.items():
                self._backup[name].copy_(local_shard(p))
            try:
                for name, p in self.params.items():
                    local_shard(p).copy_(self.snapshot[name])
                yield
            finally:
                for name, p in self.params.items():
                    local_shard(p).copy_(self._backup[name])

    def hidden_states(self, model, inputs, completion_length):
        with self.swapped_in(), eval_mode(model):
            return model(**inputs, sdpo=SDPORequest(completion_length))

    def lm_head_weight(self, model):
        weight = self.accelerator.unwrap_model(model).get_output_embeddings().weight
        name = next((n for n, p in self.params.items() if p is weight), None)
        if name is None:  # the head is not trained by the adapter: teacher and student share it
            return full_weight(weight).detach()
        if not hasattr(weight, "full_tensor"):
            return self.snapshot[name]
        with self.swapped_in():  # sharded: gather the teacher's values
            return weight.full_tensor().detach()

    def ema_step(self, student, generator=None):
        ema_update(
            self.snapshot, {n: local_shard(p) for n, p in self.params.items()}, self.ema_rate, generator=generator
        )

    def state_dict(self):
        return {n: t.detach().cpu().clone() for n, t in self.snapshot.items()}

    def load_state_dict(self, state):
        missing, extra = sorted(self.snapshot.keys() - state.keys()), sorted(state.keys() - self.snapshot.keys())
        if missing or extra:
            raise ValueError(
                "The checkpoint's LoRA teacher does not match this run's adapter: "
                f"missing {missing[:3]}, unexpected {extra[:3]}. Resume with the same peft_config."
            )
        with torch.no_grad():
            for name, value in state.items():
                self.snapshot[name].copy_(value)
