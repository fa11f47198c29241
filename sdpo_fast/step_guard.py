"""A step whose gradients are not all finite never reaches the weights.

HF's Trainer would apply it, turning the student into NaN (the next generation then dies with "probability tensor
contains inf/nan", which does not name the cause) and, at the end of an EMA window, blending the NaN student into
the teacher. `NonFiniteStepGuard` drops the step's gradients (an optimizer skips parameters without a gradient,
momentum and step counts included), counts it, and warns once with the parameters concerned.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from transformers import TrainerCallback


def finite_flags(tensors: list[torch.Tensor]) -> list[bool]:
    """Per tensor, whether all its entries are finite: one fused norm pass (any NaN or inf makes the norm so)."""
    if not tensors:
        return []
    norms = torch._foreach_norm(tensors)
    return torch.isfinite(torch.stack([n.float().to(norms[0].device) for n in norms])).tolist()


class NonFiniteStepGuard(TrainerCallback):
    """Drops the update of any optimizer step whose gradients are not all finite.

    Args:
        named_gradients: returns `(name, grad)` for the student's trainable parameters that have one.
        drop_gradients: sets those gradients to None, so that `optimizer.step()` leaves the weights alone.
        all_reduce_flag: combines the per-process verdict (sharded gradients differ by rank).
        loss_scaling: fp16 loss scaling is on; its overflow steps are expected and the scaler skips them too.
    """

    def __init__(
        self,
        named_gradients: Callable[[], list[tuple[str, torch.Tensor]]],
        drop_gradients: Callable[[], None],
        all_reduce_flag: Callable[[bool], bool] | None = None,
        loss_scaling: bool = False,
        optimizer_skipped: Callable[[], bool] | None = None,
    ):
        self.named_gradients = named_gradients
        self.drop_gradients = drop_gradients
        self.all_reduce_flag = all_reduce_flag or (lambda flag: flag)
        self.loss_scaling = loss_scaling
        # DeepSpeed keeps gradients in its own buffers (p.grad is None) and steps inside `backward`, before this
        # callback: there its own overflow check is the verdict, which this reads.
        self.optimizer_skipped = optimizer_skipped
        self.skipped_at: list[int] = []
        self._verdict: tuple[int, bool, list[str]] | None = None
        self._warned = False

    def _check(self, step: int) -> tuple[bool, list[str]]:
        if self._verdict is None or self._verdict[0] != step:
            # local shards (FSDP2 DTensors): no collective per tensor; the verdict is combined across ranks below
            named = [(n, getattr(g, "_local_tensor", g)) for n, g in self.named_gradients() if g is not None]
            finite = finite_flags([g for _, g in named])
            bad = [name for (name, _), ok in zip(named, finite) if not ok]
            if not named and self.optimizer_skipped is not None and self.optimizer_skipped():
                bad = ["(the optimizer's own overflow check: it skipped the step)"]
            self._verdict = (step, self.all_reduce_flag(not bad), bad)
        return self._verdict[1], self._verdict[2]

    def step_is_finite(self, state) -> bool:
        """Whether the coming optimizer step's gradients are all finite (computed once per step)."""
        return self._check(state.global_step)[0]

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        finite, bad = self._check(state.global_step)
        if finite:
            return
        self.drop_gradients()
        self.skipped_at.append(state.global_step + 1)
        if not self._warned:
            self._warned = True
            where = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "") or "another process"
            cause = (
                "fp16 loss scaling overflowed (the scaler lowers its scale and skips the step too)"
                if self.loss_scaling
                else "a too-high learning rate, a non-finite reward or advantage, or an fp16/bf16 overflow"
            )
            warnings.warn(
                f"SDPO skipped optimizer step {state.global_step + 1}: non-finite gradients in {where}. Likely cause: "
                f"{cause}. The step's update is dropped, the weights and the teacher stay as they were, and "
                "training continues; `sdpo/nonfinite_steps_skipped` counts such steps (warned once).",
                stacklevel=2,
            )
