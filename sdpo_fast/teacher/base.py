"""The interface every teacher kind implements. The trainer talks to a teacher only through it."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn


class Teacher:
    """A self-teacher: scores teacher prompts without gradients and follows the student by EMA.

    A kind implements:

    - `hidden_states(model, inputs, completion_length)`: the teacher's final hidden states (B, T, H_T)
      at the positions that predict the completion, for `inputs` (input_ids, attention_mask,
      position_ids). `model` is the (wrapped) training model, which some kinds run the teacher through.
    - `lm_head_weight(model)`: the teacher's whole lm_head weight (V, H_T), detached.
    - `end_pass()`: called after each batch of teacher forwards, to free what they gathered.
    - `ema_step(student, generator)`: θ_T ← (1 − τ)·θ_T + τ·θ_S with τ = `ema_rate`.
    - `state_dict()` / `load_state_dict(state)`: the teacher's tensors for checkpoints (CPU copies).

    Attributes:
        kind: names the kind in checkpoints; a checkpoint only loads into a teacher of the same kind.
        ema_rate: τ; 0 for a frozen teacher (no EMA callback is registered).
        lockstep: every process must run the same number of teacher forwards, because each one is a
            collective (FSDP2 all-gathers, ZeRO-3 parameter fetches).
        module: the separate teacher model, which the trainer exposes as `ref_model` (None if none).
    """

    kind: ClassVar[str] = ""
    ema_rate: float = 0.0
    lockstep: bool = False
    module: nn.Module | None = None

    def hidden_states(self, model, inputs: dict[str, torch.Tensor], completion_length: int) -> torch.Tensor:
        raise NotImplementedError

    def lm_head_weight(self, model) -> torch.Tensor:
        raise NotImplementedError

    def end_pass(self) -> None:
        return None

    def ema_step(self, student: nn.Module, generator: torch.Generator | None = None) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def copy_student(self, student: nn.Module, generator: torch.Generator | None = None) -> None:
        """Restart the teacher as an exact copy of the student: one EMA step at rate 1 (lerp ends exactly at θ_S)."""
        rate, self.ema_rate = self.ema_rate, 1.0
        try:
            self.ema_step(student, generator)
        finally:
            self.ema_rate = rate

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError
