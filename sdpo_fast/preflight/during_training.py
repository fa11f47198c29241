"""The pre-flight check from a trainer's own settings, and a callback that repeats it during training.

`preflight_from_trainer(trainer)` reads the model, tokenizer, dataset, reward functions and weights, the
SDPO config and the generation settings from an `SDPOTrainer`; bound as a method it is `trainer.preflight()`.
`SelfTeacherEvalCallback` runs a small check every N optimizer steps and logs `self_teacher/*`.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from .check import preflight
from .report import PreflightReport


def _unwrapped(trainer: Any) -> Any:
    accelerator = getattr(trainer, "accelerator", None)
    return accelerator.unwrap_model(trainer.model) if accelerator is not None else trainer.model


def preflight_from_trainer(trainer: Any, num_prompts: int = 32, **overrides: Any) -> PreflightReport:
    """`sdpo_fast.preflight` with the trainer's model, data, rewards, SDPO config and sampling settings.

    `overrides` replaces any keyword argument of `preflight` (e.g. `num_generations=4`, `progress=False`).
    """
    if trainer.train_dataset is None:
        raise ValueError("The trainer has no train_dataset to draw pre-flight prompts from.")
    weights = getattr(trainer, "reward_weights", None)
    args = trainer.args
    settings: dict[str, Any] = {
        "sdpo_config": getattr(trainer, "sdpo_config", None),
        "num_prompts": num_prompts,
        "num_generations": getattr(trainer, "num_generations", None) or args.num_generations,
        "temperature": getattr(trainer, "temperature", None) or args.temperature,
        "max_completion_length": getattr(trainer, "max_completion_length", None) or args.max_completion_length,
        "seed": args.seed,
        "reward_weights": None if weights is None else [float(w) for w in weights],
        "chat_template_kwargs": getattr(trainer, "chat_template_kwargs", None),
        "trainer_state": getattr(trainer, "state", None),
    }
    settings.update(overrides)
    return preflight(
        _unwrapped(trainer), trainer.processing_class, trainer.train_dataset, trainer.reward_funcs, **settings
    )


class SelfTeacherEvalCallback(TrainerCallback):
    """Every `every_steps` optimizer steps, a small pre-flight check on the current policy, logged as `self_teacher/*`.

        trainer.add_callback(SelfTeacherEvalCallback(50, trainer=trainer, num_prompts=16))

    The numbers join the step's own log record: they are added to the GRPO trainer's metric store, which its
    `log` averages and clears, and the step is marked for logging. Sampling forks the random state, so
    training draws the same random numbers with or without this callback. Single process only.
    """

    def __init__(self, every_steps: int, trainer: Any = None, *, num_prompts: int = 16, **preflight_kwargs: Any):
        if not isinstance(every_steps, int) or isinstance(every_steps, bool) or every_steps < 1:
            raise ValueError(f"every_steps must be a positive int, got {every_steps!r}.")
        self.every_steps, self.trainer = every_steps, trainer
        self.kwargs = {"num_prompts": num_prompts, "progress": False, **preflight_kwargs}
        self.reports: list[tuple[int, PreflightReport]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer is None:
            raise ValueError(
                "SelfTeacherEvalCallback needs the trainer: SelfTeacherEvalCallback(N, trainer=trainer). A callback "
                "is not given the reward functions or the SDPO config otherwise."
            )
        if args.world_size > 1:
            raise NotImplementedError(
                "SelfTeacherEvalCallback runs on a single process only (generation on a sharded model must run on "
                "every rank in step). Run sdpo_fast.preflight on a checkpoint instead."
            )

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every_steps:
            return control
        settings = {"seed": args.seed + state.global_step, **self.kwargs}  # other prompts at every check
        report = preflight_from_trainer(self.trainer, **settings)
        self.reports.append((state.global_step, report))
        metrics = report.metrics()
        store = getattr(self.trainer, "_metrics", None)
        if isinstance(store, dict) and "train" in store:
            for key, value in metrics.items():  # TRL's GRPOTrainer.log averages these into the step's record
                store["train"][key].append(value)
            control.should_log = True
        else:
            self.trainer.log(metrics)
        return control
