"""The full-copy teacher under DeepSpeed ZeRO-3: a partitioned inference engine beside the student's.

- Built without ever gathering the whole model: a student that ZeRO-3 has already partitioned
  (loaded under `zero.Init`, the usual case) is copied partition by partition into a teacher built
  under `zero.Init` from the same config; an unpartitioned student is deep-copied and partitioned by
  `deepspeed.initialize`, exactly as the student will be.
- Its engine keeps no parameter persistent (`stage3_param_persistence_threshold=0`), so every
  parameter lives in its partition (`ds_tensor`) and nowhere else between forwards.
- The EMA pairs partitions: student and teacher parameters have the same shapes and the same world
  size, so ZeRO-3 splits them identically and the elementwise update is exact shard by shard. The
  student's partitions are what its optimizer writes, persistent parameters included.
- Checkpoints gather one parameter at a time, so saving never holds more than one full tensor.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..distributed import is_zero3_param, zero3_gathered
from ..forward import add_sdpo_forward
from .ema import _normalise_name, ema_update
from .full_copy import FullCopyTeacher, frozen_copy


def _inference_config(accelerator, hidden_size: int | None, dtype: torch.dtype) -> dict:
    """The student's DeepSpeed config for a no-grad engine in the teacher's dtype.

    No optimizer, scheduler, offloaded optimizer or batching. The dtype is set through the config's
    precision sections, which `zero.Init` and the engine both follow (`zero.Init(dtype=…)` is not
    reliable: DeepSpeed 0.19 ignores it on accelerators without fp16).
    """
    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    config["bf16"] = {"enabled": dtype == torch.bfloat16}
    config["fp16"] = {"enabled": dtype == torch.float16}
    for key in ("optimizer", "scheduler", "train_batch_size", "gradient_clipping"):
        config.pop(key, None)
    config["train_micro_batch_size_per_gpu"] = 1
    config["gradient_accumulation_steps"] = 1
    zero = config.setdefault("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    zero["stage"] = 3
    zero["stage3_param_persistence_threshold"] = 0
    if hidden_size:  # what HF fills in for "auto" at training time, as TRL sizes its reference model's buckets
        zero["reduce_bucket_size"] = hidden_size * hidden_size
        zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden_size * hidden_size)
    for section in (config, zero):  # anything else left "auto": DeepSpeed's own default
        for key in [k for k, v in section.items() if v == "auto"]:
            del section[key]
    return config


def _partitioned_copy(student: nn.Module, dtype: torch.dtype, config: dict) -> nn.Module:
    """A teacher built under `zero.Init` whose partitions are copies of the student's (no gather)."""
    import deepspeed

    with deepspeed.zero.Init(config_dict_or_path=config):
        teacher = type(student)._from_config(copy.deepcopy(student.config), dtype=dtype)
    student_params = {_normalise_name(n): p for n, p in student.named_parameters()}
    with torch.no_grad():
        for name, p in teacher.named_parameters():
            p.ds_tensor.copy_(student_params[_normalise_name(name)].ds_tensor)
    teacher.eval().requires_grad_(False)
    add_sdpo_forward(teacher)
    return teacher


class Zero3Teacher(FullCopyTeacher):
    lockstep = True

    @classmethod
    def from_student(cls, student, accelerator, dtype):
        import deepspeed

        config = _inference_config(accelerator, getattr(student.config.get_text_config(), "hidden_size", None), dtype)
        if any(is_zero3_param(p) for p in student.parameters()):
            teacher = _partitioned_copy(student, dtype, config)
        else:
            teacher = frozen_copy(student, dtype)
        engine = deepspeed.initialize(model=teacher, config=config)[0]
        engine.eval()
        return cls(engine, accelerator)

    def lm_head_weight(self, model):
        weight = self.unwrapped.get_output_embeddings().weight
        with zero3_gathered([weight]):
            return weight.detach().clone()

    def _partitions(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return {name: p.ds_tensor for name, p in module.named_parameters()}

    def ema_step(self, student, generator=None):
        student = self.accelerator.unwrap_model(student)
        ema_update(self._partitions(self.unwrapped), self._partitions(student), self.ema_rate, generator=generator)

    def state_dict(self):
        state = {}
        main = self.accelerator.is_main_process
        for name, p in self.unwrapped.named_parameters():  # one full tensor at a time
            with zero3_gathered([p]):
                if main:
                    state[name] = p.detach().cpu().clone()
        return state

    def load_state_dict(self, state):
        params = dict(self.unwrapped.named_parameters())
        missing = sorted(params.keys() - state.keys())
        if missing:
            raise ValueError(f"The checkpoint's teacher lacks {missing[:3]}; resume with the same model.")
        for name, p in params.items():
            with zero3_gathered([p], modifier_rank=0), torch.no_grad():
                if self.accelerator.is_main_process:
                    p.copy_(state[name].to(p.dtype))
