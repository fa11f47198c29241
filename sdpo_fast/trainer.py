"""`SDPOTrainer`: a drop-in `GRPOTrainer` that trains with Self-Distillation Policy Optimization.

The TRL adapter only, and the one module that reads TRL's and the HF Trainer's attributes; each hook delegates:
rewards → `teacher_batch.ScoredRollouts` → `build_teacher_batch` (teacher prompts + the exact completion ids) →
`objective.counts`; `compute_loss` → `objective.loss` (teacher pass, student pass with the fused head, aggregation);
`teacher.schedule` moves the teacher after optimizer steps; `teacher.checkpoint` saves and restores it.
"""

from __future__ import annotations

import inspect
import logging
import os
import warnings
from typing import ClassVar

import torch
from accelerate.utils import gather_object, is_peft_model
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from trl import GRPOTrainer

from . import checks
from .config import SDPOConfig
from .distributed import parallelism
from .forward import add_sdpo_forward, check_head_compatible, logit_scale
from .head import resolve_backend
from .objective import build_objective
from .objective.base import GRPOSettings, HeadSettings, Runtime
from .preflight import SelfTeacherEvalCallback, preflight_from_trainer
from .reprompting import PromptCodec
from .rewards import FeedbackStore, wrap_reward_function
from .step_guard import NonFiniteStepGuard
from .teacher import build_teacher
from .teacher.checkpoint import check_checkpoint_matches, restore_teacher, save_teacher
from .teacher.schedule import teacher_schedule
from .teacher_batch import ScoredRollouts, batch_report, build_teacher_batch, row_columns, success_scores
from .unsloth import RebuiltOnCurrentGRPOTrainer

logger = logging.getLogger(__name__)

# Keywords of TRL's scorer that are options rather than extra (e.g. image) inputs.
_SCORER_OPTIONS = ("batch_size", "compute_entropy", "compute_aux_loss")


class _SDPOTrainerMixin:
    """All SDPO behaviour; combined with whatever `GRPOTrainer` class is current (TRL's or Unsloth's)."""

    _tag_names: ClassVar[list[str]] = ["trl", "grpo", "sdpo", "sdpo-fast"]
    _name = "SDPO"
    preflight = preflight_from_trainer  # `trainer.preflight()`: the self-teacher check with this run's settings

    def __init__(self, *args, sdpo_config: SDPOConfig | None = None, **kwargs):
        # Every argument means what it means to the GRPOTrainer underneath (TRL's or Unsloth's): bind, don't restate.
        args, sdpo_config = checks.legacy_positional_config(args, sdpo_config)
        bound = inspect.signature(super().__init__).bind(*args, **kwargs)
        given = bound.arguments
        if sdpo_config is not None and not isinstance(sdpo_config, SDPOConfig):
            raise TypeError(f"sdpo_config must be an SDPOConfig, got {type(sdpo_config).__name__}.")
        self.sdpo_config = sdpo = sdpo_config or SDPOConfig()
        checks.check_train_dataset(given.get("train_dataset"))
        if given.get("args") is None:
            given["args"] = checks.default_args(given.get("model"))
        if sdpo.enabled:
            checks.check_grpo_args(given["args"], sdpo)
            model = given.get("model")
            peft = given.get("peft_config") is not None or (isinstance(model, torch.nn.Module) and is_peft_model(model))
            checks.check_zero3_peft(given["args"], peft)
            checks.check_dataset(given.get("train_dataset"), given.get("processing_class"))
        super().__init__(*bound.args, **bound.kwargs)
        self._rollouts: ScoredRollouts | None = None  # the generation batch's, for the teacher batch
        self._feedback, self._warned, self._backend_logged = FeedbackStore(), set(), False
        if sdpo.enabled:
            self._setup_sdpo()

    def _setup_sdpo(self) -> None:
        sdpo = self.sdpo_config
        self._parallelism = parallelism(self.accelerator)
        checks.check_layout(self._parallelism, vision_language=self._is_vlm)
        unwrapped = self.model.get_base_model() if is_peft_model(self.model) else self.model
        check_head_compatible(unwrapped, sdpo.distillation_topk)
        self._context_length = checks.model_context_length(unwrapped.config)  # teacher prompt + completion must fit
        checks.check_context_length(self.args, sdpo, self._context_length)
        # resolved once, so that the log and `sdpo/backend` say what runs (auto: torch for K > 256 too)
        self.sdpo_backend = resolve_backend(sdpo.distillation_backend, self.accelerator.device, sdpo.distillation_topk)
        add_sdpo_forward(unwrapped)
        self.teacher = build_teacher(self.model, sdpo, self.accelerator)
        self.ref_model = self.teacher.module
        self.objective = build_objective(sdpo, self.teacher, **self._objective_settings(unwrapped))
        self.step_guard = NonFiniteStepGuard(
            lambda: [(n, p.grad) for n, p in self.model.named_parameters() if p.requires_grad and p.grad is not None],
            self._drop_student_gradients, all_reduce_flag=self._all_ranks_true, loss_scaling=bool(self.args.fp16),
            optimizer_skipped=(lambda: self.accelerator.optimizer_step_was_skipped) if self.is_deepspeed_enabled else None,
        )  # fmt: skip
        self.add_callback(self.step_guard)
        self._add_teacher_schedule()
        logger.info("SDPO: teacher=%s, objective=%s, head=%s", self.teacher.kind, sdpo.objective, self.sdpo_backend)

    def _objective_settings(self, unwrapped) -> dict:
        head = HeadSettings.from_config(self.sdpo_config, self.sdpo_backend, self.temperature / logit_scale(unwrapped))
        grpo = GRPOSettings(
            self.loss_type, self.epsilon_low, self.epsilon_high, self.args.delta, self.importance_sampling_level,
            self.max_completion_length,
        )  # fmt: skip
        args, accelerator = self.args, self.accelerator
        runtime = Runtime(
            accelerator.autocast, lambda tensor, op: accelerator.reduce(tensor, reduction=op), accelerator.num_processes,
            # set by the training loop (the last window of an epoch can be shorter); outside it, the configured value
            lambda: getattr(self, "current_gradient_accumulation_steps", args.gradient_accumulation_steps),
            args.steps_per_generation, lambda: self.state.global_step, self._parallelism == "zero3",
            lambda: self.router_aux_loss_coef if getattr(self, "aux_loss_enabled", False) else None,
        )  # fmt: skip
        return dict(head=head, grpo=grpo, runtime=runtime)

    def _add_teacher_schedule(self) -> None:
        self.teacher_callback = teacher_schedule(
            self.teacher, self.sdpo_config, lambda: self.model,
            batch_layout=(self.num_iterations, self.args.steps_per_generation, self.args.gradient_accumulation_steps),
            generator=self._teacher_generator, all_ranks_true=self._all_ranks_true, step_finite=self.step_guard.step_is_finite,
        )  # fmt: skip
        if self.teacher_callback is not None:
            self.ema_callback = self.teacher_callback  # the name before teacher_refresh existed
            self.add_callback(self.teacher_callback)
        if self.sdpo_config.self_teacher_eval_steps:
            self.add_callback(SelfTeacherEvalCallback(self.sdpo_config.self_teacher_eval_steps, trainer=self))

    def _drop_student_gradients(self) -> None:
        for p in self.model.parameters():
            p.grad = None  # optimizers skip parameters without a gradient: no update, no momentum, no weight decay

    def _all_ranks_true(self, flag: bool) -> bool:
        if self.accelerator.num_processes == 1:
            return flag
        bad = torch.tensor([0.0 if flag else 1.0], device=self.accelerator.device)
        return float(self.accelerator.reduce(bad, reduction="sum")) == 0.0

    def _teacher_generator(self) -> torch.Generator:
        return torch.Generator(device=self.accelerator.device).manual_seed(self.args.seed + self.state.global_step)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # Reward functions may return {"score", "feedback"} dicts: wrapped for this call only, so `reward_funcs` keeps
        # the user's objects and TRL's checks still run; also when disabled (plain GRPO), so one set serves both.
        self._feedback.clear()
        user_funcs = self.reward_funcs
        self.reward_funcs = [
            func if isinstance(func, torch.nn.Module) else wrap_reward_function(func, i, name, self._feedback)
            for i, (func, name) in enumerate(zip(user_funcs, self.reward_func_names))
        ]
        try:
            rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        finally:
            self.reward_funcs = user_funcs
        if self.sdpo_config.enabled:  # gathered here: one group can span processes
            # a tokenizer, never a multimodal processor: __init__ refuses vision-language models under SDPO
            texts = self.processing_class.batch_decode(completion_ids_list, skip_special_tokens=True)
            self._rollouts = ScoredRollouts(
                gather_object(list(prompts)), gather_object(texts), gather_object(self._feedback.combined(len(prompts))),
                success_scores(rewards_per_func, self.reward_weights),  # rewards_per_func is already global
                gather_object([row.get("uid") for row in inputs]),
                # GRPO's groups: each dataset row's completions, one contiguous block (TRL's RepeatSampler)
                group_size=self.num_generations if self.model.training else self.num_generations_eval,
                columns=gather_object([row_columns(row) for row in inputs]),
            )  # fmt: skip
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.sdpo_config.enabled:
            output.update(self._teacher_inputs(output))
        return output

    def _teacher_inputs(self, output: dict) -> dict[str, torch.Tensor]:
        """Reprompt every local sample and append its exact completion ids; the step-wide counts."""
        device, n_local = self.accelerator.device, output["completion_ids"].shape[0]
        codec = PromptCodec(self._tokenizer, self.chat_template_kwargs, getattr(self, "chat_template", None),
                            getattr(self, "tools", None))  # fmt: skip
        batch = build_teacher_batch(
            self._rollouts, codec, self.sdpo_config, start=self.accelerator.process_index * n_local, count=n_local,
            pad_id=self._tokenizer.pad_token_id, seed=self.args.seed + self.state.global_step,
            context_len=self._context_length, completion_lengths=output["completion_mask"].sum(dim=1).tolist(),
        )  # fmt: skip
        tensors = {
            "teacher_input_ids": torch.cat([batch.prompt_ids.to(device), output["completion_ids"]], dim=1),
            "teacher_attention_mask": torch.cat([batch.prompt_mask.to(device), output["completion_mask"].long()], 1),
            **batch.tensors(device),
        }
        counts = self.objective.counts({**output, **tensors})
        stats = self.accelerator.reduce(torch.tensor(batch.summary(), device=device), reduction="sum")
        self._log_teacher_batch(batch, counts, stats, n_global=len(self._rollouts.prompts))
        return {**tensors, **counts}

    def _log_teacher_batch(self, batch, counts, stats, n_global: int) -> None:
        has_signal = counts["sdpo_num_tokens"] > 0
        metrics, messages = batch_report(batch, stats.tolist(), has_signal, self.sdpo_config, n_global)
        for key, value in metrics.items():
            self._metrics["train" if self.model.training else "eval"][key].append(value)
        for key in messages.keys() - self._warned:  # each kind of warning once per run
            self._warned.add(key)
            warnings.warn(messages[key], stacklevel=2)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.sdpo_config.enabled:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        if return_outputs:
            raise ValueError("SDPOTrainer does not support returning outputs.")
        mode = "train" if self.model.training else "eval"
        loss, stats = self.objective.loss(model, inputs, training=mode == "train")
        for key, value in stats.items():
            self._metrics[mode][key].append(value)
        return loss

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        """TRL's scorer of `old_per_token_logps`; under SDPO the loss head's numerics replace it (`objective.score`).

        TRL's scorer rounds its logit tiles to the compute dtype, so the ratio to the fp32-accumulated head would
        start away from 1. With vLLM's importance-sampling correction the values are used right away and are scored
        here; otherwise they are NaN placeholders (any use would be loud), replaced per micro-batch in `_prepare_inputs`.
        """
        wants_more = kwargs.get("compute_entropy") or kwargs.get("compute_aux_loss")
        extra_inputs = any(v is not None for k, v in kwargs.items() if k not in _SCORER_OPTIONS)
        if not self.sdpo_config.enabled or wants_more or extra_inputs or args:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        if not (self.use_vllm and getattr(self, "vllm_importance_sampling_correction", False)):
            return torch.full(input_ids[:, -logits_to_keep:].shape, float("nan"), device=input_ids.device), None, None
        scored = self.objective.score_sequences(
            model, input_ids, attention_mask, logits_to_keep, kwargs.get("batch_size")
        )
        return scored, None, None

    def _prepare_inputs(self, generation_batch):
        inputs = super()._prepare_inputs(generation_batch)
        if not self.sdpo_config.enabled:
            return inputs
        if not self.model.training:  # eval: every batch is freshly generated
            self.objective.rescore(self.model, inputs)
        elif self._buffered_inputs is not getattr(self, "_rescored", None):
            # A new generation batch, before any optimizer step has moved the policy: score every micro-batch
            # exactly as compute_loss will (same rows, same head), so the first pass has a ratio of exactly 1.
            for batch in self._buffered_inputs:
                self.objective.rescore(self.model, batch)
            self._rescored = self._buffered_inputs
        return inputs

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.sdpo_config.enabled and self.model.training:
            logs["sdpo/nonfinite_steps_skipped"] = float(len(self.step_guard.skipped_at))  # cumulative
            if not self._backend_logged:
                logs["sdpo/backend"] = self.sdpo_backend  # a string: logged once, so loggers warn at most once
                self._backend_logged = True
        super().log(logs, start_time)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call=_internal_call)
        # HF saves the model first when it checkpoints, before `trainer_state.json` and before it rotates older
        # checkpoints away: writing the teacher here means a checkpoint never counts as complete without it.
        checkpoint = bool(output_dir) and os.path.basename(os.path.normpath(output_dir)).startswith(
            PREFIX_CHECKPOINT_DIR
        )
        # a replicated teacher: only the saving process needs a copy (the others would each hold one)
        if not (
            self.sdpo_config.enabled
            and _internal_call
            and checkpoint
            and (self.args.should_save or self.teacher.lockstep)
        ):
            return
        state = self.teacher.state_dict()  # a collective under FSDP2 / ZeRO-3: every rank takes part
        if self.args.should_save:
            save_teacher(output_dir, self.teacher.kind, state, peft=is_peft_model(self.model))

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if self.sdpo_config.enabled and resume_from_checkpoint not in (None, False):
            path = resume_from_checkpoint
            if isinstance(path, bool):
                path = get_last_checkpoint(self.args.output_dir)
            if path is not None and os.path.isdir(path):  # before HF loads anything from it
                check_checkpoint_matches(path, peft=is_peft_model(self.model), kind=self.teacher.kind)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self.sdpo_config.enabled:
            restore_teacher(
                self.teacher, checkpoint, self.sdpo_config.resume_teacher_from,
                copy_student=lambda: self.teacher.copy_student(self.model, self._teacher_generator()),
                unwrapped_model=self.accelerator.unwrap_model(self.model),
            )  # fmt: skip


class SDPOTrainer(_SDPOTrainerMixin, GRPOTrainer, metaclass=RebuiltOnCurrentGRPOTrainer):
    """A drop-in `GRPOTrainer` that trains with SDPO.

    `SDPOTrainer(model, reward_funcs, args=GRPOConfig(...), sdpo_config=SDPOConfig(...), train_dataset=...)`.
    Everything a `GRPOTrainer` accepts keeps working; reward functions may also return
    `[{"score": float, "feedback": str}, …]`. If Unsloth patched TRL after this module was imported,
    the instance is built on Unsloth's patched trainer anyway (see `sdpo_fast.unsloth`).
    """
