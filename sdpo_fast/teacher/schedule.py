"""When the teacher follows the student: one callback for the update schedule and the finite-student check.

    teacher_refresh="ema"       θ_T ← (1 − τ)·θ_T + τ·θ_S once per generation batch (the reference: once per
                                training step), i.e. every num_iterations × steps_per_generation / GA optimizer steps
    teacher_refresh="periodic"  θ_T ← θ_S every `teacher_refresh_steps` optimizer steps (a hard copy)
    teacher_refresh="frozen"    θ_T = the initial policy for the whole run (no callback)

Stable teachers forget less than fast-moving EMA teachers (arXiv 2607.01763); the SDPO paper's Table 4 has frozen
48.8 vs EMA 49.3. Every mode keeps its state in the teacher's weights, which checkpoints save, and the schedule in
`state.global_step`, which HF restores, so a resumed run refreshes exactly when an uninterrupted one would.
A student with non-finite weights is never blended or copied in: the teacher keeps its last finite state.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import torch
from transformers import TrainerCallback

from ..step_guard import finite_flags

logger = logging.getLogger(__name__)


def ema_period(num_iterations: int, steps_per_generation: int, gradient_accumulation_steps: int) -> int:
    """Optimizer steps per generation batch (× iterations): how often the reference's EMA fires."""
    return max(1, (num_iterations * steps_per_generation) // gradient_accumulation_steps)


class TeacherUpdateCallback(TrainerCallback):
    """Updates the teacher every `period` optimizer steps (`ema_period` for the EMA: once per generation batch).

    It fires on optimizer steps `period, 2·period, …` and skips the update when every optimizer step of that window
    had non-finite gradients (the reference skips such steps and, if none was finite, the EMA too).

    Args:
        update: performs one EMA update (closes over teacher, student and rate).
        period: optimizer steps between updates.
        gradients: returns the student's gradient tensors, to check finiteness before each step.
        all_reduce_flag: combines the per-process finiteness flag (sharded gradients differ by rank).
        step_finite: instead of `gradients`, returns whether the coming step's gradients are finite
            (given the trainer state); the trainer passes its `NonFiniteStepGuard`'s verdict.
    """

    def __init__(
        self,
        update: Callable[[], None],
        period: int,
        gradients: Callable[[], list[torch.Tensor]] | None = None,
        all_reduce_flag: Callable[[bool], bool] | None = None,
        step_finite: Callable[[object], bool] | None = None,
    ):
        if period < 1:
            raise ValueError(f"period must be ≥ 1 optimizer step, got {period}.")
        self.update = update
        self.period = period
        self.gradients = gradients
        self.all_reduce_flag = all_reduce_flag or (lambda flag: flag)
        self.step_finite = step_finite
        self.fired_at: list[int] = []
        self.skipped_at: list[int] = []
        self._finite_step_in_window = False

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.step_finite is not None:
            self._finite_step_in_window |= self.step_finite(state)
            return
        finite = True
        if self.gradients is not None:
            grads = [g for g in self.gradients() if g is not None]
            if grads:
                norms = torch._foreach_norm(grads)
                finite = bool(torch.isfinite(torch.stack([n.float().to(norms[0].device) for n in norms])).all())
        self._finite_step_in_window |= self.all_reduce_flag(finite)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.period != 0:
            return
        if (self.gradients is None and self.step_finite is None) or self._finite_step_in_window:
            self.update()
            self.fired_at.append(state.global_step)
        else:
            self.skipped_at.append(state.global_step)
        self._finite_step_in_window = False


EMATeacherCallback = TeacherUpdateCallback  # the name before teacher_refresh existed


def all_finite(params) -> bool:
    """Whether every floating-point parameter's local part (DTensor shard, ZeRO-3 partition) is finite."""
    local = [getattr(p, "ds_tensor", getattr(p, "_local_tensor", p)).detach() for p in params]
    return all(finite_flags([t for t in local if torch.is_floating_point(t) and t.numel()]))


def teacher_schedule(
    teacher,
    config,
    student: Callable[[], torch.nn.Module],
    *,
    batch_layout: tuple[int, int, int],
    generator: Callable[[], torch.Generator],
    all_ranks_true: Callable[[bool], bool],
    step_finite: Callable[[object], bool],
) -> TeacherUpdateCallback | None:
    """The callback for `config.teacher_refresh`, or None when the teacher never changes.

    `batch_layout` is (num_iterations, steps_per_generation, gradient_accumulation_steps): the EMA fires once per
    generation batch of them.
    """
    iterations, steps_per_generation, ga = batch_layout
    ema_every = ema_period(iterations, steps_per_generation, ga)
    if config.teacher_refresh == "ema" and teacher.ema_rate > 0 and (iterations * steps_per_generation) % ga:
        logger.warning(
            "num_iterations × steps_per_generation is not a multiple of gradient_accumulation_steps=%d, so the EMA "
            "teacher cannot update exactly once per generation batch; it updates every %d optimizer step(s).",
            ga,
            ema_every,
        )
    if config.teacher_refresh == "frozen" or (config.teacher_refresh == "ema" and teacher.ema_rate <= 0):
        return None
    warned = []
    what = "a periodic teacher refresh" if config.teacher_refresh == "periodic" else "an EMA teacher update"

    @torch.no_grad()
    def update() -> None:
        model = student()
        # Stochastic rounding of a low-precision teacher draws from a generator seeded alike on every rank, so
        # replicated teachers stay identical (the global RNG has been consumed differently by each rank).
        if not all_ranks_true(all_finite(model.parameters())):  # never blend a broken student in
            if not warned:
                warned.append(True)
                warnings.warn(
                    f"SDPO skipped {what}: the student's weights are not finite. The teacher keeps its last "
                    "finite state; look for the step that produced the non-finite weights.",
                    stacklevel=2,
                )
            return
        if config.teacher_refresh == "periodic":
            teacher.copy_student(model, generator())
        else:
            teacher.ema_step(model, generator())

    period = config.teacher_refresh_steps if config.teacher_refresh == "periodic" else ema_every
    return TeacherUpdateCallback(update, period, step_finite=step_finite)
