"""`SDPOTrainer`: a drop-in `GRPOTrainer` that trains with Self-Distillation Policy Optimization.

Data flow of one generation batch:

    dataset rows ─► GRPOTrainer generation ─► rewards (+ feedback) ─┐
                                                                   ▼
    `_generate_and_score_completions`: gather rewards/texts/feedback across processes, choose
        demonstrations, build teacher prompts (`sdpo_fast.reprompting`), append the *exact*
        completion ids ─► teacher_input_ids / teacher_attention_mask / self_distillation_mask
                                                                   ▼
    `compute_loss` (per micro-batch): no-grad teacher forward ─► hidden states at the completion
        positions; student forward ─► hidden states ─► `sdpo_head` (fused top-K + tail JSD) ─►
        IS ratio, masks, aggregation (`sdpo_fast.loss`) [+ λ·GRPO from the same forward]
                                                                   ▼
    `EMATeacherCallback`: teacher ← (1 − τ)·teacher + τ·student, once per generation batch.

The teacher is a `sdpo_fast.teacher.Teacher` (`self.teacher`): a frozen copy of the policy kept in
`self.ref_model`, or with PEFT a snapshot of the adapter. The forward patch (`sdpo_fast.forward`) lets
one model call return hidden states or the fused head's output; the trainer never computes
full-vocabulary logits itself.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import os
import warnings
from typing import Any, ClassVar

import torch
from accelerate.utils import gather_object, is_peft_model
from datasets import IterableDataset
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from trl import GRPOConfig, GRPOTrainer

from .config import SDPOConfig
from .distributed import full_weight, parallelism, zero3_gathered
from .ema import EMATeacherCallback, ema_period
from .faults import (
    NonFiniteStepGuard,
    check_checkpoint_matches,
    finite_flags,
    load_teacher,
    save_teacher,
    upgrade_legacy,
)
from .forward import SDPORequest, add_sdpo_forward, check_head_compatible, logit_scale
from .head import resolve_backend, sampled_logprobs, sdpo_head
from .loss import self_distillation_objective, token_level_surrogate
from .reprompting import PromptCodec, build_teacher_contexts, group_key, question_text, tokenize_reprompt
from .rewards import FeedbackStore, wrap_reward_function
from .teacher import build_teacher
from .unsloth import current_grpo_trainer, rebased_trainer_class

logger = logging.getLogger(__name__)

_GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def _teacher_kwargs(ids: torch.Tensor, att: torch.Tensor) -> dict[str, torch.Tensor]:
    """Teacher inputs without the columns that are left padding in every row; positions follow the mask."""
    first = int(att.any(dim=0).nonzero()[0]) if att.any() else 0
    ids, att = ids[:, first:], att[:, first:]
    return dict(input_ids=ids, attention_mask=att, position_ids=(att.cumsum(dim=1) - 1).clamp(min=0))


# ---------------------------------------------------------------------------------------------- the trainer


_LEGACY_TEACHER_ADAPTER = "sdpo_teacher"  # v0.1.0's LoRA teacher adapter
# Keywords of TRL's `_get_per_token_logps_and_entropies` that are options rather than extra (e.g. image) inputs.
_SCORER_OPTIONS = ("batch_size", "compute_entropy", "compute_aux_loss")

# GRPO loss options SDPO does not use: pure SDPO (grpo_weight=0) ignores all of them, the blend only the first four.
_BLEND_IGNORED = ("top_entropy_quantile", "off_policy_mask_threshold", "entropy_coef", "use_adaptive_entropy")
_PURE_SDPO_IGNORED = (*_BLEND_IGNORED, "loss_type", "epsilon", "epsilon_high", "delta", "importance_sampling_level")


def _changed_grpo_options(args: GRPOConfig, names: tuple[str, ...]) -> list[str]:
    """The options among `names` that `args` sets away from GRPOConfig's defaults (absent ones are skipped)."""
    defaults = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
    return [
        f"{name}={getattr(args, name)!r}"
        for name in names
        if name in defaults and hasattr(args, name) and getattr(args, name) != defaults[name]
    ]


def truncated_sampling_warning(args) -> str | None:
    """Why vLLM importance weights would be biased under truncated sampling, or None.

    vLLM reports log-probs renormalised over the kept set (top-k/top-p/min-p), while the trainer scores the
    full vocabulary, so every weight exp(log π_old − log π_vLLM) is off by the log of the kept mass. TRL ≤ 1.16
    does not report the kept set to the trainer, so it cannot be scored; SDPO says so instead of silently biasing.
    """
    if not (getattr(args, "use_vllm", False) and getattr(args, "vllm_importance_sampling_correction", False)):
        return None
    truncated = [
        f"{name}={value!r}"
        for name, value, off in (
            ("top_k", getattr(args, "top_k", 0), (None, 0, -1)),
            ("top_p", getattr(args, "top_p", 1.0), (None, 1.0)),
            ("min_p", getattr(args, "min_p", None), (None, 0.0)),
        )
        if value not in off
    ]
    if not truncated:
        return None
    return (
        f"vLLM samples from a truncated distribution ({', '.join(truncated)}) and reports log-probs over the kept set, "
        "but the trainer scores the full vocabulary: every vLLM importance-sampling weight is biased by the log of the "
        "kept mass. Sample without truncation (top_k=0, top_p=1.0, min_p=None), or set "
        "vllm_importance_sampling_correction=False."
    )


def _legacy_positional_config(args: tuple, sdpo_config: SDPOConfig | None) -> tuple[tuple, SDPOConfig | None]:
    """v0.1.0 took `sdpo_config` as the 4th positional argument; GRPOTrainer's 4th is `train_dataset`."""
    if len(args) < 4 or not isinstance(args[3], SDPOConfig):
        return args, sdpo_config
    if sdpo_config is not None:
        raise TypeError("sdpo_config was given twice: positionally (4th) and as a keyword. Pass it as a keyword.")
    warnings.warn(
        "Passing SDPOConfig as the 4th positional argument is deprecated: SDPOTrainer takes GRPOTrainer's "
        "positional order, so pass it as `sdpo_config=`.",
        FutureWarning,
        stacklevel=4,
    )
    return args[:3] + args[4:], args[3]


class _SDPOTrainerMixin:
    """All SDPO behaviour; combined with whatever `GRPOTrainer` class is current (TRL's or Unsloth's)."""

    _tag_names: ClassVar[list[str]] = ["trl", "grpo", "sdpo", "sdpo-fast"]
    _name = "SDPO"

    def __init__(self, *args, sdpo_config: SDPOConfig | None = None, **kwargs):
        # Every positional and keyword argument means what it means to the GRPOTrainer underneath (TRL's or
        # Unsloth's): bind them to its own signature instead of restating it.
        args, sdpo_config = _legacy_positional_config(args, sdpo_config)
        bound = inspect.signature(super().__init__).bind(*args, **kwargs)
        given = bound.arguments
        if sdpo_config is not None and not isinstance(sdpo_config, SDPOConfig):
            raise TypeError(f"sdpo_config must be an SDPOConfig, got {type(sdpo_config).__name__}.")
        self.sdpo_config = sdpo = sdpo_config or SDPOConfig()
        if given.get("args") is None:
            model = given.get("model")
            name = (
                model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "model")
            )
            given["args"] = GRPOConfig(f"{str(name).split('/')[-1] or 'model'}-SDPO")
        if sdpo.enabled:
            self._check_grpo_args(given["args"])
            model = given.get("model")
            peft = given.get("peft_config") is not None or (isinstance(model, torch.nn.Module) and is_peft_model(model))
            _check_zero3_peft(given["args"], peft)
            _check_dataset(given.get("train_dataset"), given.get("processing_class"))
        super().__init__(*bound.args, **bound.kwargs)
        self._feedback = FeedbackStore()
        self._sdpo_batch: dict[str, Any] = {}
        self._warned: set[str] = set()
        self._backend_logged = False
        if not sdpo.enabled:
            return
        self._parallelism = parallelism(self.accelerator)
        if self._parallelism == "fsdp1":
            raise NotImplementedError(
                "SDPO supports FSDP version 2 only: its parameters are DTensors, which the fused head gathers and the "
                "EMA teacher updates shard by shard. Set fsdp_config={'fsdp_version': 2}."
            )
        if self._is_vlm:
            raise NotImplementedError(
                "SDPOTrainer supports text-only models: the teacher prompt and the fused head do not carry images. "
                "Pass a tokenizer (not a multimodal processor) and a text-only dataset."
            )
        unwrapped = self.model.get_base_model() if is_peft_model(self.model) else self.model
        check_head_compatible(unwrapped, sdpo.distillation_topk)
        self._logit_scale = logit_scale(unwrapped)
        # resolved once, so that the log and `sdpo/backend` say what runs (auto: torch for K > 256 too)
        self.sdpo_backend = resolve_backend(sdpo.distillation_backend, self.accelerator.device, sdpo.distillation_topk)
        add_sdpo_forward(unwrapped)
        self.teacher = build_teacher(self.model, sdpo, self.accelerator)
        self.ref_model = self.teacher.module
        self.step_guard = NonFiniteStepGuard(
            self._named_student_gradients,
            self._drop_student_gradients,
            all_reduce_flag=self._all_ranks_true,
            loss_scaling=bool(self.args.fp16),
            optimizer_skipped=(lambda: self.accelerator.optimizer_step_was_skipped)
            if self.is_deepspeed_enabled
            else None,
        )
        self.add_callback(self.step_guard)
        self._add_ema_callback()
        logger.info("SDPO: teacher=%s, head backend=%s", self.teacher.kind, self.sdpo_backend)

    # ------------------------------------------------------------------------------------ setup

    def _check_grpo_args(self, args: GRPOConfig) -> None:
        sdpo = self.sdpo_config
        if args.beta != 0.0:
            logger.warning(
                "SDPO replaces GRPO's KL penalty: the teacher is the reference model. Setting beta=%s → 0.0.", args.beta
            )
            args.beta = 0.0
        if args.sync_ref_model:
            raise ValueError(
                "sync_ref_model=True conflicts with SDPO, whose teacher is the reference model updated by "
                "SDPOConfig.teacher_update_rate. Set sync_ref_model=False."
            )
        if sdpo.grpo_weight > 0 and args.loss_type not in _GRPO_LOSS_TYPES:
            raise ValueError(
                f"grpo_weight > 0 blends a GRPO loss of loss_type in {_GRPO_LOSS_TYPES}; got loss_type="
                f"{args.loss_type!r}. Choose one of those, or grpo_weight=0."
            )
        message = truncated_sampling_warning(args)
        if message:
            warnings.warn(message, stacklevel=4)
        if sdpo.grpo_weight > 0:
            ignored = _changed_grpo_options(args, _BLEND_IGNORED)
            if ignored:
                logger.warning("The SDPO/GRPO blend ignores these GRPO options: %s.", ", ".join(ignored))
        else:
            ignored = _changed_grpo_options(args, _PURE_SDPO_IGNORED)
            if ignored:
                logger.warning(
                    "Pure SDPO (grpo_weight=0) has no GRPO policy loss, so it ignores these GRPO options: %s. Set "
                    "SDPOConfig.grpo_weight > 0 to blend in the GRPO loss they configure.",
                    ", ".join(ignored),
                )

    def _add_ema_callback(self) -> None:
        """EMA once per generation batch: the reference's once per training step."""
        if self.teacher.ema_rate <= 0:
            return
        ga = self.args.gradient_accumulation_steps
        period = ema_period(self.num_iterations, self.args.steps_per_generation, ga)
        if (self.num_iterations * self.args.steps_per_generation) % ga:
            logger.warning(
                "num_iterations × steps_per_generation is not a multiple of gradient_accumulation_steps=%d, so "
                "the EMA teacher cannot update exactly once per generation batch; it updates every %d optimizer "
                "step(s).",
                ga,
                period,
            )
        self.ema_callback = EMATeacherCallback(self._ema_update, period, step_finite=self.step_guard.step_is_finite)
        self.add_callback(self.ema_callback)

    def _named_student_gradients(self) -> list[tuple[str, torch.Tensor]]:
        return [(n, p.grad) for n, p in self.model.named_parameters() if p.requires_grad and p.grad is not None]

    def _drop_student_gradients(self) -> None:
        for p in self.model.parameters():
            p.grad = None  # optimizers skip parameters without a gradient: no update, no momentum, no weight decay

    def _all_ranks_true(self, flag: bool) -> bool:
        if self.accelerator.num_processes == 1:
            return flag
        bad = torch.tensor([0.0 if flag else 1.0], device=self.accelerator.device)
        return float(self.accelerator.reduce(bad, reduction="sum")) == 0.0

    def _ema_generator(self) -> torch.Generator:
        return torch.Generator(device=self.accelerator.device).manual_seed(self.args.seed + self.state.global_step)

    @torch.no_grad()
    def _ema_update(self) -> None:
        # Stochastic rounding of a low-precision teacher draws from a generator seeded alike on every rank, so
        # replicated teachers stay identical (the global RNG has been consumed differently by each rank's sampling).
        generator = self._ema_generator()
        if not self._all_ranks_true(_all_finite(self.model.parameters())):  # never blend a broken student in
            self._warn_once(
                "nonfinite_student",
                "SDPO skipped an EMA teacher update: the student's weights are not finite. The teacher keeps its "
                "last finite state; look for the step that produced the non-finite weights.",
            )
            return
        self.teacher.ema_step(self.model, generator)

    # ------------------------------------------------------------------------------------ rewards and teacher inputs

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # Reward functions may return {"score", "feedback"} dicts. They are wrapped for this call only, so that
        # `trainer.reward_funcs` keeps the user's objects and TRL's own checks (lengths, None → NaN) still run.
        # Also with enabled=False (plain GRPO): float rewards pass through unchanged, and the same reward
        # functions serve an SDPO run and its GRPO control.
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
        self._sdpo_batch = {
            "inputs": inputs,
            "prompts": prompts,
            "completion_ids": completion_ids_list,
            "feedback": self._feedback.combined(len(prompts)),
            "rewards_per_func": rewards_per_func,
        }
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if not self.sdpo_config.enabled:
            return output
        output.update(self._teacher_inputs(output))
        return output

    def _teacher_inputs(self, output: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Reprompt every local sample and append its exact completion ids (spec §2 and §4)."""
        sdpo, cap = self.sdpo_config, self._sdpo_batch
        mode = "train" if self.model.training else "eval"
        device = self.accelerator.device
        local_n = len(cap["prompts"])
        # Success is judged on the global, weighted reward sum; rows where every function returned None never succeed.
        rewards = cap["rewards_per_func"]
        scores = (rewards * self.reward_weights.to(rewards.device).unsqueeze(0)).nansum(dim=1)
        scores[torch.isnan(rewards).all(dim=1)] = math.nan
        # a tokenizer, never a multimodal processor: __init__ refuses vision-language models when SDPO is on
        texts = self.processing_class.batch_decode(cap["completion_ids"], skip_special_tokens=True)
        uids = [row.get("uid") for row in cap["inputs"]]
        keys = [group_key(p, u) for p, u in zip(cap["prompts"], uids)]
        # One group can span processes: choose demonstrations on the gathered batch, keep the local slice.
        all_prompts, all_keys = gather_object(cap["prompts"]), gather_object(keys)
        all_texts, all_feedback = gather_object(texts), gather_object(cap["feedback"])
        contexts = build_teacher_contexts(all_prompts, all_keys, scores.tolist(), all_texts, all_feedback, sdpo)
        start = self.accelerator.process_index * local_n
        local = contexts.reprompts[start : start + local_n]

        codec = PromptCodec(
            self._tokenizer,
            self.chat_template_kwargs,
            getattr(self, "chat_template", None),
            getattr(self, "tools", None),
        )
        tokenized = [
            tokenize_reprompt(r, codec, max_len=sdpo.max_reprompt_len, truncation=sdpo.reprompt_truncation)
            for r in local
        ]
        mask = [float(r.active and not t.overflow) for r, t in zip(local, tokenized)]
        width = max(len(t.ids) for t in tokenized)
        pad = self._tokenizer.pad_token_id
        prompt_ids = torch.full((local_n, width), pad, dtype=torch.long)
        prompt_mask = torch.zeros((local_n, width), dtype=torch.long)
        for i, t in enumerate(tokenized):  # left padding, as for the student prompt
            prompt_ids[i, width - len(t.ids) :] = torch.tensor(t.ids, dtype=torch.long)
            prompt_mask[i, width - len(t.ids) :] = 1
        completion_ids, completion_mask = output["completion_ids"], output["completion_mask"]
        sd_mask = torch.tensor(mask, dtype=torch.float32, device=device)

        # Global counts for loss normalisation over the whole generation batch (gradient-accumulation invariant).
        loss_mask = completion_mask * sd_mask.unsqueeze(1)
        if "tool_mask" in output:
            loss_mask = loss_mask * output["tool_mask"]
        counts = torch.stack(
            [
                loss_mask.sum(),
                (loss_mask.sum(1) > 0).float().sum(),
                torch.tensor(float(local_n), device=device),
                sd_mask.sum(),
            ]
        ).float()
        counts = self.accelerator.reduce(counts, reduction="sum")

        stats = torch.tensor(
            [
                sum(t.truncated for t in tokenized),
                sum(t.overflow for t in tokenized),
                float(sum(len(t.ids) for t in tokenized)),
            ],
            device=device,
        )
        stats = self.accelerator.reduce(stats, reduction="sum")
        n_global = len(all_prompts)
        metrics = dict(contexts.metrics)
        metrics["self_distillation/reprompt_sample_fraction"] = float(counts[3]) / max(
            n_global, 1
        )  # after overflow masking
        metrics["self_distillation/reprompt_truncated_count"] = float(stats[0])
        metrics["self_distillation/reprompt_overflow_count"] = float(stats[1])
        metrics["self_distillation/teacher_prompt_length_mean"] = float(stats[2]) / max(n_global, 1)
        for key, value in metrics.items():
            self._metrics[mode][key].append(value)
        if counts[0] == 0:
            self._warn_once(
                "no_signal",
                "SDPO: no sample in this generation batch has a demonstration (no group reached "
                f"success_reward_threshold={sdpo.success_reward_threshold}) or usable feedback, so the SDPO loss is 0 "
                "for it. Lower the threshold, return feedback from a reward function, or raise grpo_weight.",
            )
        if stats[1] > 0:
            self._warn_once(
                "overflow",
                f"SDPO: {int(stats[1])} teacher prompt(s) did not fit max_reprompt_len={sdpo.max_reprompt_len} even "
                "with the demonstration/feedback trimmed; they are masked out of the loss. Raise max_reprompt_len.",
            )
        return {
            "teacher_input_ids": torch.cat([prompt_ids.to(device), completion_ids], dim=1),
            "teacher_attention_mask": torch.cat([prompt_mask.to(device), completion_mask.long()], dim=1),
            "self_distillation_mask": sd_mask,
            # 0-dim tensors: TRL's shuffle/split copies them whole into every micro-batch.
            "sdpo_num_tokens": counts[0],
            "sdpo_num_active_seqs": counts[1],
            "sdpo_num_seqs": counts[2],
        }

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    # ------------------------------------------------------------------------------------ loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.sdpo_config.enabled:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        if return_outputs:
            raise ValueError("SDPOTrainer does not support returning outputs.")
        sdpo = self.sdpo_config
        mode = "train" if self.model.training else "eval"
        mask, loss_mask, score_mask = self._loss_masks(inputs)

        teacher = self._teacher_states(model, inputs, score_mask)
        out, aux_loss = self._student_head(model, inputs, score_mask, teacher)
        div, logp_s, logp_t = out["divergence"], out["student_logprob"], out["teacher_logprob"]

        per_token = div if sdpo.full_logit_distillation else token_level_surrogate(logp_s, logp_t)
        old = inputs.get("old_per_token_logps")
        sdpo_loss, per_token, ratio = self_distillation_objective(
            per_token,
            logp_s,
            loss_mask,
            old_log_probs=logp_s.detach() if old is None else old,
            is_clip=sdpo.is_clip,
            loss_agg_mode=sdpo.loss_agg_mode,
            # the vLLM sampler correction: the reference's rollout IS weights
            rollout_is_weights=inputs.get("importance_sampling_ratio"),
            denominator=self._denominator(inputs, mode),
            response_width=self.max_completion_length,
        )
        loss = sdpo_loss
        if sdpo.grpo_weight > 0:
            grpo_loss = self._grpo_loss(logp_s, inputs, mask, mode)
            loss = (1.0 - sdpo.grpo_weight) * sdpo_loss + sdpo.grpo_weight * grpo_loss
            self._metrics[mode]["sdpo/grpo_loss"].append(
                self.accelerator.reduce(grpo_loss.detach(), reduction="mean").item()
            )
        if aux_loss is not None:  # MoE load balancing, scaled for gradient accumulation as GRPOTrainer does
            loss = loss + self.router_aux_loss_coef * aux_loss / (
                self._accumulation_steps() if mode == "train" else 1.0
            )
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss.detach()).mean().item())
        self._log_loss_metrics(mode, per_token, div, logp_s, logp_t, loss_mask, ratio)
        return loss

    def _denominator(self, inputs, mode: str) -> torch.Tensor | float:
        """The optimizer-step-wide count behind the aggregation, as TRL's `dapo` normaliser does for GRPO.

        Summing this micro-batch's loss over the accumulation window and averaging over processes (DDP)
        then gives `compute_self_distillation_loss` over the whole optimizer step, whatever the
        micro-batch size. The counts span the generation batch, so they are rescaled to one step.
        `seq-mean-token-sum-norm` divides by R only, so it has no count: just the process average.
        """
        key = {
            "token-mean": "sdpo_num_tokens",
            "seq-mean-token-sum": "sdpo_num_active_seqs",
            "seq-mean-token-mean": "sdpo_num_active_seqs",
        }.get(self.sdpo_config.loss_agg_mode)
        if key is None:
            return 1.0 / self.accelerator.num_processes
        return self._per_step_and_process(inputs[key], mode)

    def _per_step_and_process(self, count: torch.Tensor, mode: str) -> torch.Tensor:
        """A count over the whole generation batch (all processes) rescaled to one optimizer step of one process."""
        normaliser = count.clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            normaliser = normaliser * self._accumulation_steps() / self.args.steps_per_generation
        return normaliser

    def _accumulation_steps(self) -> int:
        # Set by the training loop (the last window of an epoch can be shorter); outside it, the configured value.
        return getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)

    def _teacher_states(self, model, inputs, score_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Teacher hidden states at the scored completion positions (N, H_T) and the teacher lm_head weight.

        Only rows with a teacher signal are run, in chunks of `teacher_micro_batch_size`. When every
        teacher forward is a collective (FSDP2, ZeRO-3), all ranks run the same number of chunks (a rank
        with fewer rows repeats a real row and discards it) and fetch the weight.
        """
        sdpo = self.sdpo_config
        t_ids, t_mask = inputs["teacher_input_ids"], inputs["teacher_attention_mask"]
        n_rows, length = score_mask.shape
        row_idx = ((inputs["self_distillation_mask"] > 0) & score_mask.any(dim=1)).nonzero().squeeze(1)
        chunk = sdpo.teacher_micro_batch_size or max(row_idx.numel(), 1)
        n_chunks = math.ceil(row_idx.numel() / chunk)
        if self.teacher.lockstep:
            n_chunks = int(self.accelerator.reduce(torch.tensor(n_chunks, device=t_ids.device), reduction="max"))
        if n_chunks == 0:
            return None
        parts = []
        with torch.no_grad():
            for c in range(n_chunks):
                idx = row_idx[c * chunk : (c + 1) * chunk]
                kwargs = _teacher_kwargs(
                    t_ids[idx] if idx.numel() else t_ids[:1], t_mask[idx] if idx.numel() else t_mask[:1]
                )
                with self.accelerator.autocast():
                    hidden = self.teacher.hidden_states(model, kwargs, length)
                if idx.numel():  # else a padding chunk that only kept the ranks' collectives in step
                    parts.append(hidden)
            weight = self.teacher.lm_head_weight(model)
            self.teacher.end_pass()
        if not parts:
            return None
        hidden_rows = torch.cat(parts)
        full = hidden_rows.new_zeros(n_rows, length, hidden_rows.shape[-1])
        full[row_idx] = hidden_rows
        return full[score_mask], weight

    def _head_settings(self) -> dict[str, Any]:
        """What every head call of this trainer shares: the loss head and the old-log-prob scorer alike."""
        sdpo = self.sdpo_config
        return dict(
            topk=sdpo.distillation_topk if sdpo.full_logit_distillation else 1,
            temperature=self.temperature / self._logit_scale,
            backend=self.sdpo_backend,  # resolved at init (auto: see sdpo_fast.head.resolve_backend)
            memory_budget_mb=sdpo.distillation_memory_budget_mb,
        )

    def _student_forward(self, model, prompt_completion: tuple, score_mask, head_fn, router_aux: bool = False):
        """One student forward with `head_fn(hidden, h, weight, targets, gather)` run inside it on the scored rows.

        `prompt_completion` is (prompt_ids, prompt_mask, completion_ids, completion_mask). `h` is `hidden[score_mask]`
        in the weight's dtype; `gather` holds the `weight_gather` keyword under ZeRO-3.
        """
        prompt_ids, prompt_mask, completion_ids, completion_mask = prompt_completion
        targets = completion_ids[score_mask]
        zero3 = self._parallelism == "zero3"

        def head(hidden: torch.Tensor, weight: torch.Tensor):
            # FSDP2: gather the DTensor (differentiably); ZeRO-3: the head gathers it in its forward and backward.
            weight = full_weight(weight)
            gather = {"weight_gather": lambda: zero3_gathered([weight])} if zero3 else {}
            h = hidden[score_mask]
            return head_fn(hidden, h if h.dtype == weight.dtype else h.to(weight.dtype), weight, targets, gather)

        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        request = SDPORequest(completion_ids.shape[1], head, router_aux=router_aux)
        with self.accelerator.autocast():
            return model(input_ids=input_ids, attention_mask=attention_mask, sdpo=request)

    def _student_head(self, model, inputs, score_mask, teacher) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """One student forward; the fused head runs inside it on the scored positions. Also the MoE aux loss."""
        sdpo = self.sdpo_config

        def head_fn(hidden, h, weight, targets, gather) -> dict[str, torch.Tensor]:
            if teacher is None:  # no teacher row in this micro-batch: the student's own states stand in (masked out)
                t_h, t_w = h.detach(), weight.detach()
            else:
                t_h, t_w = teacher
                t_h = t_h.to(t_w.dtype)
            result = sdpo_head(
                h,
                weight,
                t_h,
                t_w,
                targets,
                add_tail=sdpo.distillation_add_tail,
                alpha=sdpo.distillation_alpha,
                **self._head_settings(),
                **gather,
            )
            outputs = {}
            for name, values in zip(("divergence", "student_logprob", "teacher_logprob"), result):
                outputs[name] = values.new_zeros(score_mask.shape).masked_scatter(score_mask, values)
            if targets.numel() == 0:  # keep every parameter in the graph: DDP expects all gradients
                outputs["divergence"] = outputs["divergence"] + 0.0 * (hidden.sum() + weight.sum())
            return outputs

        router_aux = bool(getattr(self, "aux_loss_enabled", False))
        batch = (inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"], inputs["completion_mask"])
        result = self._student_forward(model, batch, score_mask, head_fn, router_aux=router_aux)
        return result if router_aux else (result, None)

    # ------------------------------------------------------------------------------------ one scorer

    @torch.no_grad()
    def _sampled_logprobs(self, model, batch: tuple, score_mask: torch.Tensor) -> torch.Tensor:
        """log π(y) on the scored rows with the loss head's own numerics, (B, T), zero elsewhere."""

        def head_fn(hidden, h, weight, targets, gather):
            values = sampled_logprobs(h, weight, targets, **self._head_settings(), **gather)
            return values.new_zeros(score_mask.shape).masked_scatter(score_mask, values)

        return self._student_forward(model, batch, score_mask, head_fn)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        """TRL's scorer of `old_per_token_logps`; under SDPO the loss head's numerics replace it.

        TRL's scorer rounds its logit tiles to the compute dtype (and Unsloth has its own), while the policy's
        log-probs come from the fp32-accumulated head, so their ratio would start away from 1. Under SDPO the only
        caller is the old-log-prob pass of `_generate_and_score_completions`. With vLLM's importance-sampling
        correction its values are used right away, so they are scored here with the head; otherwise they are
        placeholders (NaN, so any use would be loud), replaced exactly per micro-batch in `_prepare_inputs`.
        """
        wants_more = kwargs.get("compute_entropy") or kwargs.get("compute_aux_loss")
        extra_inputs = any(v is not None for k, v in kwargs.items() if k not in _SCORER_OPTIONS)
        if not self.sdpo_config.enabled or wants_more or extra_inputs or args:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        if not (self.use_vllm and getattr(self, "vllm_importance_sampling_correction", False)):
            return torch.full(input_ids[:, -logits_to_keep:].shape, math.nan, device=input_ids.device), None, None
        chunk = kwargs.get("batch_size") or input_ids.shape[0]
        parts = []
        for start in range(0, input_ids.shape[0], chunk):
            ids, att = input_ids[start : start + chunk], attention_mask[start : start + chunk]
            prompt, completion = ids[:, :-logits_to_keep], ids[:, -logits_to_keep:]
            batch = (prompt, att[:, :-logits_to_keep], completion, att[:, -logits_to_keep:])
            parts.append(self._sampled_logprobs(model, batch, att[:, -logits_to_keep:] > 0))
        return torch.cat(parts), None, None

    def _prepare_inputs(self, generation_batch):
        inputs = super()._prepare_inputs(generation_batch)
        if not self.sdpo_config.enabled:
            return inputs
        if not self.model.training:  # eval: every batch is freshly generated
            self._rescore_old_logps(inputs)
        elif self._buffered_inputs is not getattr(self, "_rescored", None):
            # A new generation batch, before any optimizer step has moved the policy: score every micro-batch
            # exactly as compute_loss will (same rows, same head), so the first pass has a ratio of exactly 1.
            for batch in self._buffered_inputs:
                self._rescore_old_logps(batch)
            self._rescored = self._buffered_inputs
        return inputs

    def _rescore_old_logps(self, inputs) -> None:
        if inputs.get("old_per_token_logps") is None:
            return
        _, _, score_mask = self._loss_masks(inputs)
        batch = (inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"], inputs["completion_mask"])
        inputs["old_per_token_logps"] = self._sampled_logprobs(self.model, batch, score_mask)

    def _loss_masks(self, inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(completion mask, SDPO loss mask, scored positions): the blend scores every completion token."""
        mask = inputs["completion_mask"].float()
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        loss_mask = mask * inputs["self_distillation_mask"].float().unsqueeze(1)
        score_mask = (mask if self.sdpo_config.grpo_weight > 0 else loss_mask) > 0
        return mask, loss_mask, score_mask

    def _grpo_loss(self, logp: torch.Tensor, inputs, mask: torch.Tensor, mode: str) -> torch.Tensor:
        """GRPO's clipped surrogate from the same student log-probs (loss types grpo/bnpo/dr_grpo/dapo)."""
        advantages = inputs["advantages"]
        advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        old = inputs.get("old_per_token_logps")
        old = logp.detach() if old is None else old
        log_ratio = logp - old
        if self.importance_sampling_level == "sequence":
            log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        coef_1 = torch.exp(log_ratio)
        coef_2 = torch.clamp(coef_1, 1 - self.epsilon_low, 1 + self.epsilon_high)
        if self.args.delta is not None:
            coef_1 = torch.clamp(coef_1, max=self.args.delta)
        per_token = -torch.min(coef_1 * advantages, coef_2 * advantages)
        if "importance_sampling_ratio" in inputs:
            per_token = per_token * inputs["importance_sampling_ratio"]
        accumulation = self._accumulation_steps() if mode == "train" else 1.0
        if self.loss_type == "grpo":
            return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
        if self.loss_type == "bnpo":
            return (per_token * mask).sum() / mask.sum().clamp(min=1.0) / accumulation
        if self.loss_type == "dr_grpo":
            return (per_token * mask).sum() / (per_token.size(0) * self.max_completion_length) / accumulation
        return (per_token * mask).sum() / self._per_step_and_process(inputs["num_items_in_batch"], mode)

    # ------------------------------------------------------------------------------------ logging

    def _global_mean(self, values: torch.Tensor, mask: torch.Tensor) -> float:
        mask = mask.to(values.dtype)
        totals = torch.stack([(torch.where(mask > 0, values, torch.zeros_like(values)) * mask).sum(), mask.sum()])
        totals = self.accelerator.reduce(totals.detach().float(), reduction="sum")
        return float(totals[0] / totals[1]) if totals[1] > 0 else math.nan

    def _log_loss_metrics(self, mode, per_token, div, logp_s, logp_t, loss_mask, ratio) -> None:
        m = self._metrics[mode]
        m["sdpo/loss"].append(self._global_mean(per_token.detach(), loss_mask))
        m["sdpo/divergence"].append(self._global_mean(div.detach(), loss_mask))
        m["sdpo/kl_student_teacher"].append(self._global_mean((logp_s - logp_t).detach(), loss_mask))
        empty = self.accelerator.reduce(loss_mask.sum().detach().view(1), reduction="sum")
        m["self_distillation/empty_target_batch"].append(float(empty.item() == 0))
        if ratio is not None:
            m["sdpo/is_ratio_mean"].append(self._global_mean(ratio, loss_mask))
            m["sdpo/is_clip_fraction"].append(self._global_mean((ratio >= self.sdpo_config.is_clip).float(), loss_mask))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.sdpo_config.enabled and self.model.training:
            logs["sdpo/nonfinite_steps_skipped"] = float(len(self.step_guard.skipped_at))  # cumulative
            if not self._backend_logged:
                logs["sdpo/backend"] = self.sdpo_backend  # a string: logged once, so loggers warn at most once
                self._backend_logged = True
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------ checkpoints

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call=_internal_call)
        # HF saves the model first when it checkpoints, before `trainer_state.json` and before it rotates older
        # checkpoints away: writing the teacher here means a checkpoint never counts as complete without it.
        if not (self.sdpo_config.enabled and _internal_call and output_dir):
            return
        if not os.path.basename(os.path.normpath(output_dir)).startswith(PREFIX_CHECKPOINT_DIR):
            return
        if not (self.args.should_save or self.teacher.lockstep):
            return  # a replicated teacher: only the saving process needs a copy (the others would each hold one)
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
        if checkpoint is None or not self.sdpo_config.enabled:
            return
        source = self.sdpo_config.resume_teacher_from
        if source == "student":
            logger.warning(
                "SDPO: resume_teacher_from='student': the teacher restarts as a copy of the student restored from %s; "
                "its EMA history is not used.",
                checkpoint,
            )
            self.teacher.copy_student(self.model, self._ema_generator())
            return
        if source == "initial":
            logger.warning(
                "SDPO: resume_teacher_from='initial': the teacher restarts from the model as passed to SDPOTrainer "
                "(before any training), not from %s.",
                checkpoint,
            )
            return
        saved = upgrade_legacy(load_teacher(checkpoint), self.teacher.kind)
        if saved["kind"] != self.teacher.kind:
            raise ValueError(
                f"The checkpoint's teacher is of kind {saved['kind']!r} but this run's is {self.teacher.kind!r}; "
                "resume with the same PEFT/teacher_regularization settings."
            )
        with torch.no_grad():
            self.teacher.load_state_dict(saved["state"])
        unwrapped = self.accelerator.unwrap_model(self.model)
        if is_peft_model(unwrapped) and _LEGACY_TEACHER_ADAPTER in unwrapped.peft_config:
            # v0.1.0 saved its teacher as a second adapter, which HF has just loaded back from the checkpoint: the
            # snapshot now holds it, and a second adapter is exactly what must not be in the model.
            unwrapped.delete_adapter(_LEGACY_TEACHER_ADAPTER)


def _all_finite(params) -> bool:
    """Whether every floating-point parameter's local part (DTensor shard, ZeRO-3 partition) is finite."""
    local = [getattr(p, "ds_tensor", getattr(p, "_local_tensor", p)).detach() for p in params]
    return all(finite_flags([t for t in local if torch.is_floating_point(t) and t.numel()]))


def _check_zero3_peft(args: GRPOConfig, peft: bool) -> None:
    """Refused before anything is built (a second Accelerator cannot be made under DeepSpeed)."""
    plugin = getattr(args, "deepspeed_plugin", None)
    if peft and plugin is not None and plugin.zero_stage == 3:
        raise NotImplementedError(
            "SDPO does not support PEFT/LoRA under DeepSpeed ZeRO-3. A LoRA adapter is small, so ZeRO-2 "
            "(zero_optimization.stage=2) or plain DDP keep the same memory for the trainable state; or train the "
            "full model under ZeRO-3."
        )


def _check_dataset(train_dataset, processing_class) -> None:
    """Fail early, with the fix, on data that would only break mid-training."""
    if train_dataset is None or isinstance(train_dataset, IterableDataset) or len(train_dataset) == 0:
        return
    row = train_dataset[0]
    if "image" in row or "images" in row:
        raise NotImplementedError(
            "SDPOTrainer supports text-only datasets: the teacher prompt cannot carry the 'image'/'images' column."
        )
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        question_text(prompt)  # the last turn must be a user turn
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if tokenizer is not None and getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                "The dataset has conversational prompts but the tokenizer has no chat template. Set "
                "`tokenizer.chat_template`, or use plain-text prompts."
            )


class _SDPOTrainerMeta(type):
    """Builds each `SDPOTrainer` on the `GRPOTrainer` that is current at construction time (Unsloth-safe)."""

    def __call__(cls, *args, **kwargs):
        base = current_grpo_trainer()
        if not issubclass(cls, base):
            cls = rebased_trainer_class(cls, _SDPOTrainerMixin, base)
        return type.__call__(cls, *args, **kwargs)

    def __instancecheck__(cls, obj) -> bool:
        return type.__instancecheck__(cls, obj) or getattr(type(obj), "_sdpo_rebased_from", None) is cls

    def __subclasscheck__(cls, sub) -> bool:
        return type.__subclasscheck__(cls, sub) or getattr(sub, "_sdpo_rebased_from", None) is cls


class SDPOTrainer(_SDPOTrainerMixin, GRPOTrainer, metaclass=_SDPOTrainerMeta):
    """A drop-in `GRPOTrainer` that trains with SDPO.

    `SDPOTrainer(model, reward_funcs, args=GRPOConfig(...), sdpo_config=SDPOConfig(...), train_dataset=...)`.
    Everything a `GRPOTrainer` accepts keeps working; reward functions may also return
    `[{"score": float, "feedback": str}, …]`. If Unsloth patched TRL after this module was imported,
    the instance is built on Unsloth's patched trainer anyway (see `sdpo_fast.unsloth`).
    """
