"""The self-teacher: one class per kind behind one small interface (`Teacher`, in `base.py`).

    kind                       the teacher's weights                                   used for
    FullCopyTeacher            a frozen copy of the policy (`trainer.ref_model`)        one process, DDP, ZeRO-1/2
    Fsdp2Teacher               the same copy, FSDP2-sharded like the student           FSDP2
    Zero3Teacher               the same copy, a partitioned ZeRO-3 inference engine    DeepSpeed ZeRO-3
    LoraSnapshotTeacher        a snapshot of the adapter, swapped into the one adapter  PEFT / LoRA
    TrustRegionTeacher         (1 − c)·z_frozen + c·z_student around any of the above  teacher_regularization="trust-region"

`build_teacher` picks the kind. The teacher's lifecycle lives beside it: the EMA maths (lerp, stochastic
rounding) in `ema.py`, when it runs (EMA, periodic copy, frozen) in `schedule.py`, its checkpoint file in
`checkpoint.py`. A new kind is one class here and one line in `build_teacher`. The teacher is never
a third model: the full copy is the trainer's `ref_model` (GRPO's KL penalty is off under SDPO),
and the LoRA teacher has no model at all.
"""

from __future__ import annotations

import torch
from accelerate.utils import is_peft_model

from ..distributed import parallelism
from .base import Teacher
from .full_copy import Fsdp2Teacher, FullCopyTeacher, frozen_copy
from .lora import LoraSnapshotTeacher
from .trust_region import TrustRegionTeacher, trust_region_head_inputs
from .zero3 import Zero3Teacher

__all__ = [
    "Fsdp2Teacher",
    "FullCopyTeacher",
    "LoraSnapshotTeacher",
    "Teacher",
    "TrustRegionTeacher",
    "Zero3Teacher",
    "build_teacher",
    "frozen_copy",
    "teacher_dtype",
    "trust_region_head_inputs",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def teacher_dtype(setting: str, student_dtype: torch.dtype) -> torch.dtype:
    """`SDPOConfig.teacher_dtype`: `auto` keeps the student's dtype (an fp32 student gets an fp32 teacher)."""
    return student_dtype if setting == "auto" else _DTYPES[setting]


def build_teacher(student, sdpo_config, accelerator) -> Teacher:
    """The teacher kind for this student and parallel layout, EMA-updated at `teacher_update_rate` or frozen."""
    layout = parallelism(accelerator)
    if is_peft_model(student):
        teacher = LoraSnapshotTeacher(student, accelerator, lockstep=layout == "fsdp2")
    else:
        dtype = teacher_dtype(sdpo_config.teacher_dtype, student.dtype)
        kind = {"zero3": Zero3Teacher, "fsdp2": Fsdp2Teacher}.get(layout, FullCopyTeacher)
        teacher = kind.from_student(student, accelerator, dtype)
    if sdpo_config.teacher_regularization == "trust-region":
        return TrustRegionTeacher(teacher, sdpo_config.teacher_update_rate, accelerator)
    # only the EMA blends at teacher_update_rate; a periodic teacher is copied whole, a frozen one never changes
    teacher.ema_rate = sdpo_config.teacher_update_rate if sdpo_config.teacher_refresh == "ema" else 0.0
    return teacher
