"""Construction-time checks: settings and data that would only break (or silently mislead) mid-training are
refused or warned about before anything is built, each with the fix."""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any

from datasets import IterableDataset
from trl import GRPOConfig

from .config import SDPOConfig
from .objective.grpo import GRPO_LOSS_TYPES
from .reprompting import question_text

logger = logging.getLogger(__name__)

# GRPO loss options SDPO does not use: pure SDPO (grpo_weight=0) ignores all of them, the blend only the first four.
_BLEND_IGNORED = ("top_entropy_quantile", "off_policy_mask_threshold", "entropy_coef", "use_adaptive_entropy")
_PURE_SDPO_IGNORED = (*_BLEND_IGNORED, "loss_type", "epsilon", "epsilon_high", "delta", "importance_sampling_level")
# Variants that compute GRPO's clipped surrogate themselves read the GRPO loss options.
_USES_GRPO_TERM = ("srpo", "rlsd", "group_fallback")


def changed_grpo_options(args: GRPOConfig, names: tuple[str, ...]) -> list[str]:
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


def legacy_positional_config(args: tuple, sdpo_config: SDPOConfig | None) -> tuple[tuple, SDPOConfig | None]:
    """v0.1.0 took `sdpo_config` as the 4th positional argument; GRPOTrainer's 4th is `train_dataset`."""
    if len(args) < 4 or not isinstance(args[3], SDPOConfig):
        return args, sdpo_config
    if sdpo_config is not None:
        raise TypeError("sdpo_config was given twice: positionally (4th) and as a keyword. Pass it as a keyword.")
    warnings.warn(
        "Passing SDPOConfig as the 4th positional argument is deprecated: SDPOTrainer takes GRPOTrainer's "
        "positional order, so pass it as `sdpo_config=`.",
        FutureWarning,
        stacklevel=5,
    )
    return args[:3] + args[4:], args[3]


def default_args(model) -> GRPOConfig:
    """GRPOTrainer's default `GRPOConfig`, with the output folder named after the model and SDPO."""
    name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
    return GRPOConfig(f"{str(name).split('/')[-1] or 'model'}-SDPO")


def check_grpo_args(args: GRPOConfig, sdpo: SDPOConfig) -> None:
    """GRPO settings that conflict with SDPO, or that SDPO ignores. Sets `args.beta = 0` (the teacher is the ref)."""
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
    uses_grpo = sdpo.grpo_weight > 0 or sdpo.objective in _USES_GRPO_TERM
    if uses_grpo and args.loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(
            f"grpo_weight > 0 and objective={sdpo.objective!r} compute a GRPO loss of loss_type in {GRPO_LOSS_TYPES}; "
            f"got loss_type={args.loss_type!r}. Choose one of those."
        )
    message = truncated_sampling_warning(args)
    if message:
        warnings.warn(message, stacklevel=5)
    if uses_grpo:
        ignored = changed_grpo_options(args, _BLEND_IGNORED)
        if ignored:
            logger.warning("The SDPO/GRPO blend ignores these GRPO options: %s.", ", ".join(ignored))
    else:
        ignored = changed_grpo_options(args, _PURE_SDPO_IGNORED)
        if ignored:
            logger.warning(
                "Pure SDPO (grpo_weight=0) has no GRPO policy loss, so it ignores these GRPO options: %s. Set "
                "SDPOConfig.grpo_weight > 0 to blend in the GRPO loss they configure.",
                ", ".join(ignored),
            )


def check_layout(parallelism: str, *, vision_language: bool) -> None:
    """The parallel layout and model kind the teacher and the fused head support."""
    if parallelism == "fsdp1":
        raise NotImplementedError(
            "SDPO supports FSDP version 2 only: its parameters are DTensors, which the fused head gathers and the "
            "EMA teacher updates shard by shard. Set fsdp_config={'fsdp_version': 2}."
        )
    if vision_language:
        raise NotImplementedError(
            "SDPOTrainer supports text-only models: the teacher prompt and the fused head do not carry images. "
            "Pass a tokenizer (not a multimodal processor) and a text-only dataset."
        )


def check_zero3_peft(args: GRPOConfig, peft: bool) -> None:
    """Refused before anything is built (a second Accelerator cannot be made under DeepSpeed)."""
    plugin = getattr(args, "deepspeed_plugin", None)
    if peft and plugin is not None and plugin.zero_stage == 3:
        raise NotImplementedError(
            "SDPO does not support PEFT/LoRA under DeepSpeed ZeRO-3. A LoRA adapter is small, so ZeRO-2 "
            "(zero_optimization.stage=2) or plain DDP keep the same memory for the trainable state; or train the "
            "full model under ZeRO-3."
        )


def check_dataset(train_dataset, processing_class) -> None:
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


def check_train_dataset(dataset: Any) -> None:
    """Refuse a training dataset without a `prompt` column: GRPO generates from it, SDPO reprompts it.

    Without this, the first training step fails with a bare `KeyError: 'prompt'` deep inside TRL.
    A `datasets.DatasetDict` (a whole `load_dataset(...)` result) is refused with the split to pick.
    A dataset whose columns cannot be known without reading it (a streaming dataset without features)
    passes: TRL sees its rows first.
    """
    if dataset is None:
        return
    if _is_dataset_dict(dataset):
        splits = list(dataset.keys())
        raise ValueError(
            f"train_dataset is a DatasetDict with splits {splits}, not one dataset. Pass one split, e.g. "
            f"train_dataset=dataset[{(splits or ['train'])[0]!r}]."
        )
    columns = _columns(dataset)
    if columns is None or "prompt" in columns:
        return
    raise ValueError(
        f"The training dataset has no 'prompt' column (its columns: {', '.join(map(repr, columns)) or 'none'}). "
        "SDPOTrainer, like GRPOTrainer, generates completions from the 'prompt' column: a string, or a list of "
        "chat messages ending with a user turn. Rename your question column, e.g. "
        "dataset.rename_column('question', 'prompt')."
    )


def _is_dataset_dict(dataset: Any) -> bool:
    return type(dataset).__name__ in ("DatasetDict", "IterableDatasetDict")


def _columns(dataset: Any) -> list[str] | None:
    """The column names, or None when they cannot be known without iterating."""
    names = getattr(dataset, "column_names", None)
    if names is not None:
        return list(names)
    if isinstance(dataset, list | tuple):  # a list of row dicts (torch datasets index like this too)
        return list(dataset[0]) if dataset and isinstance(dataset[0], dict) else None
    return None


# Where configs state how many positions the model has: absolute position tables (GPT-2: n_positions, n_ctx) or
# the length a RoPE model was trained for (max_position_embeddings; max_sequence_length in a few remote configs).
_CONTEXT_ATTRIBUTES = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length")


def model_context_length(config) -> int | None:
    """The number of positions the model supports, or None when its config does not say.

    A RoPE scaling that extends the context (YaRN, linear, dynamic NTK: `factor` × the original length) counts,
    so a model configured for a longer context is not cut to its pre-training length.
    """
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    length = next(
        (
            value
            for value in (getattr(text, name, None) for name in _CONTEXT_ATTRIBUTES)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0
        ),
        None,
    )
    if length is None:
        return None
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None)
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) not in (None, "default"):
        factor = rope.get("factor")
        if isinstance(factor, int | float) and factor > 1:
            length = max(length, int(factor * rope.get("original_max_position_embeddings", length)))
    return length


def check_context_length(args: GRPOConfig, sdpo: SDPOConfig, context: int | None) -> None:
    """Say at construction when a teacher prompt of max_reprompt_len tokens plus a completion cannot fit the model.

    Not an error: each step shortens such prompts to what fits (or masks them out) and warns; this says so up front,
    with the setting that makes the cap explicit.
    """
    completion = getattr(args, "max_completion_length", None) or 0
    if context is None or sdpo.max_reprompt_len + completion <= context:
        return
    room = context - completion
    fix = (
        f"Set SDPOConfig.max_reprompt_len <= {room} to make that cap explicit"
        if room > 0
        else "Lower max_completion_length below the context"
    )
    logger.warning(
        "SDPOConfig.max_reprompt_len=%d plus max_completion_length=%d exceeds the model's context of %d positions: "
        "a teacher prompt longer than %d tokens is shortened by reprompt_truncation=%r, or masked out of the loss and "
        "counted in self_distillation/reprompt_overflow_count. %s, or use a model with a longer context.",
        sdpo.max_reprompt_len,
        completion,
        context,
        max(room, 0),
        sdpo.reprompt_truncation,
        fix,
    )
