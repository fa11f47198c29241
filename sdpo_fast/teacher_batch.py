"""From scored rollouts to the teacher's inputs: pure functions on plain lists, no trainer, no TRL.

    ScoredRollouts (global batch order, gathered by the trainer)
        ─► success scores, group keys, demonstration choice, feedback rules, templates   (`reprompting`)
        ─► this process's slice tokenised exactly as TRL tokenises the student, left-padded
        ─► TeacherBatch: teacher prompt ids/mask, per-sample masks and group facts, counts, metrics

Demonstrations are chosen on the gathered batch, so the choice does not depend on how a group was split
across processes; each process then tokenises only its own slice.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import SDPOConfig
from .reprompting import (
    Prompt,
    PromptCodec,
    build_teacher_contexts,
    group_key,
    question_text,
    tokenize_reprompt,
)


@dataclass
class ScoredRollouts:
    """One generation batch after the rewards, in global batch order (all processes)."""

    prompts: list[Prompt]
    completions: list[str]  # decoded completion texts
    feedback: list[str | None]  # the reward functions' combined feedback per sample
    scores: list[float]  # the weighted reward sum; NaN where every reward function returned None
    uids: list[Any] = field(default_factory=list)  # the dataset's `uid` column, if any
    # GRPO's group size: TRL's sampler puts the `num_generations` completions of one dataset row in one contiguous
    # block of the gathered batch, so sample i comes from row i // group_size. None: rows unknown, group by prompt.
    group_size: int | None = None
    columns: list[dict[str, str]] = field(default_factory=list)  # `row_columns` of each sample's dataset row

    def __post_init__(self):
        n = len(self.prompts)
        if not self.uids:
            self.uids = [None] * n
        if not self.columns:
            self.columns = [{} for _ in range(n)]
        lengths = (len(self.completions), len(self.feedback), len(self.scores), len(self.uids), len(self.columns))
        if any(length != n for length in lengths):
            raise ValueError(
                "ScoredRollouts: prompts, completions, feedback, scores, uids and columns must have equal lengths."
            )
        if self.group_size is not None and (self.group_size < 1 or n % self.group_size):
            raise ValueError(f"ScoredRollouts: {n} samples do not form groups of group_size={self.group_size}.")

    def group_keys(self) -> list[str]:
        """Each sample's group: its `uid` where the dataset has one, else its dataset row (see `group_key`)."""
        rows = (
            [None] * len(self.prompts)
            if self.group_size is None
            else [i // self.group_size for i in range(len(self.prompts))]
        )
        return [group_key(p, u, r) for p, u, r in zip(self.prompts, self.uids, rows)]


# Columns TRL adds or the trainer reads itself; every other column is the row's own data (e.g. a hidden `answer`).
_NOT_ROW_DATA = ("prompt", "completion", "completion_ids", "uid")


def row_columns(row: dict[str, Any]) -> dict[str, str]:
    """A short digest of each data column of a dataset row, to tell whether two rows under one `uid` differ."""
    return {
        name: hashlib.sha256(json.dumps(value, sort_keys=True, default=repr).encode("utf-8", "replace")).hexdigest()[
            :16
        ]
        for name, value in row.items()
        if name not in _NOT_ROW_DATA
    }


def group_warnings(rollouts: ScoredRollouts, keys: Sequence[str]) -> dict[str, str]:
    """Warnings for a `uid` column that joins rows which are not one question: different prompts, or the same prompt
    with different data (hidden targets such as `answer`). One sample's success would become another question's
    "Correct solution". The first offending uid is named; the trainer gives each warning once."""
    first: dict[str, int] = {}
    out: dict[str, str] = {}
    for i, key in enumerate(keys):
        if rollouts.uids[i] is None:
            continue
        j = first.setdefault(key, i)
        if j == i:
            continue
        uid = rollouts.uids[i]
        if "uid_prompts" not in out and group_key(rollouts.prompts[i]) != group_key(rollouts.prompts[j]):
            out["uid_prompts"] = (
                f"SDPO: the dataset's uid {uid!r} is shared by different prompts ({_excerpt(rollouts.prompts[j])} and "
                f"{_excerpt(rollouts.prompts[i])}), so one prompt's successful completion becomes the other's "
                "demonstration. Give each question its own uid, or drop the uid column to group by dataset row "
                "(GRPO's groups)."
            )
        differing = sorted(
            name
            for name in rollouts.columns[i].keys() | rollouts.columns[j].keys()
            if rollouts.columns[i].get(name) != rollouts.columns[j].get(name)
        )
        if "uid_columns" not in out and differing:
            out["uid_columns"] = (
                f"SDPO: the dataset's uid {uid!r} joins rows whose {', '.join(differing)} differ, so they share "
                "demonstrations although their targets differ. Give rows with different data different uids, or drop "
                "the uid column to group by dataset row (GRPO's groups)."
            )
    return out


def _excerpt(prompt: Prompt, limit: int = 60) -> str:
    text = question_text(prompt) if isinstance(prompt, list) and prompt else str(prompt)
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


@dataclass
class TeacherBatch:
    """This process's teacher inputs. Tensors are on the CPU; the trainer moves them to the device."""

    prompt_ids: torch.Tensor  # (n, W) left-padded teacher prompt ids
    prompt_mask: torch.Tensor  # (n, W)
    self_distillation_mask: torch.Tensor  # (n,) 1 where the sample has a teacher context that fits
    success: torch.Tensor  # (n,) 1 where the sample's own score reached the threshold
    group_pass_rate: torch.Tensor  # (n,) the fraction of its group that succeeded (global)
    group_has_success: torch.Tensor  # (n,)
    truncated: int  # teacher prompts shortened to fit max_reprompt_len (this process)
    overflow: int  # teacher prompts that could not fit and were masked out (this process)
    prompt_tokens: int  # total teacher prompt length (this process)
    metrics: dict[str, float]  # the reference's `self_distillation/*` metrics, over the global batch
    # teacher prompts the model's context (less the completion) shortened, and masked out, on this process
    context_truncated: int = 0
    context_overflow: int = 0
    context_len: int | None = None
    warnings: dict[str, str] = field(default_factory=dict)  # about the gathered batch (the groups), by warn-once key

    def summary(self) -> list[float]:
        """[truncated, overflow, teacher prompt tokens, samples with a teacher, truncated by the context, masked out
        by the context]: what the processes sum."""
        return [
            float(self.truncated),
            float(self.overflow),
            float(self.prompt_tokens),
            float(self.self_distillation_mask.sum()),
            float(self.context_truncated),
            float(self.context_overflow),
        ]

    def tensors(self, device) -> dict[str, torch.Tensor]:
        """The per-sample tensors under the names the objective reads."""
        return {
            "self_distillation_mask": self.self_distillation_mask.to(device),
            "sdpo_success": self.success.to(device),
            "sdpo_group_pass_rate": self.group_pass_rate.to(device),
            "sdpo_group_has_success": self.group_has_success.to(device),
        }


def success_scores(rewards_per_func: torch.Tensor, reward_weights: torch.Tensor) -> list[float]:
    """The weighted reward sum per sample; NaN where every function returned None (such a row never succeeds)."""
    scores = (rewards_per_func * reward_weights.to(rewards_per_func.device).unsqueeze(0)).nansum(dim=1)
    scores[torch.isnan(rewards_per_func).all(dim=1)] = math.nan
    return scores.tolist()


def group_facts(keys: Sequence[str], scores: Sequence[float], threshold: float) -> tuple[list[float], list[float]]:
    """Per sample: its group's pass rate and whether the group has any success."""
    passed: dict[str, list[bool]] = {}
    for key, score in zip(keys, scores):
        passed.setdefault(key, []).append(not math.isnan(score) and score >= threshold)
    rate = {key: sum(flags) / len(flags) for key, flags in passed.items()}
    return [rate[k] for k in keys], [float(rate[k] > 0) for k in keys]


def batch_report(
    batch: TeacherBatch, stats: list[float], has_signal: bool, config: SDPOConfig, n_global: int
) -> tuple[dict[str, float], dict[str, str]]:
    """The batch's `self_distillation/*` metrics and warnings (by key, for warn-once), from the process-summed
    `stats` = `TeacherBatch.summary()`: [truncated, overflow, teacher prompt tokens, samples with a teacher, and
    optionally truncated / masked out by the model's context]."""
    n = max(n_global, 1)
    metrics = dict(batch.metrics)
    metrics["self_distillation/reprompt_sample_fraction"] = stats[3] / n  # after overflow masking
    metrics["self_distillation/reprompt_truncated_count"] = stats[0]
    metrics["self_distillation/reprompt_overflow_count"] = stats[1]
    metrics["self_distillation/teacher_prompt_length_mean"] = stats[2] / n
    warnings = dict(batch.warnings)
    if not has_signal:
        warnings["no_signal"] = (
            "SDPO: no sample in this generation batch has a demonstration (no group reached "
            f"success_reward_threshold={config.success_reward_threshold}) or usable feedback, so the SDPO loss is 0 "
            "for it. Lower the threshold, return feedback from a reward function, or raise grpo_weight."
        )
    by_context, masked_by_context = (stats[4], stats[5]) if len(stats) > 5 else (0.0, 0.0)
    if stats[1] > masked_by_context:
        warnings["overflow"] = (
            f"SDPO: {int(stats[1] - masked_by_context)} teacher prompt(s) did not fit max_reprompt_len="
            f"{config.max_reprompt_len} even with the demonstration/feedback trimmed; they are masked out of the loss. "
            "Raise max_reprompt_len."
        )
    if by_context > 0:
        warnings["context"] = (
            f"SDPO: {int(by_context)} teacher prompt(s) plus their completions exceeded the model's context of "
            f"{batch.context_len} positions: {int(by_context - masked_by_context)} shortened by reprompt_truncation="
            f"{config.reprompt_truncation!r}, {int(masked_by_context)} masked out of the loss (counted in "
            "self_distillation/reprompt_overflow_count). Set SDPOConfig.max_reprompt_len to at most the context less "
            "max_completion_length, shorten the demonstrations/feedback, or use a model with a longer context."
        )
    return metrics, warnings


def prompt_limits(
    max_reprompt_len: int, context_len: int | None, completion_lengths: Sequence[int] | None, count: int
) -> list[tuple[int, str | None]]:
    """Per sample: the most teacher-prompt tokens it may have, and what sets that bound when it is the model's
    context rather than `max_reprompt_len` (None then)."""
    if context_len is None:
        return [(max_reprompt_len, None)] * count
    if completion_lengths is None or len(completion_lengths) != count:
        raise ValueError(
            f"context_len needs one completion length per local sample ({count}), got "
            f"{None if completion_lengths is None else len(completion_lengths)}."
        )
    limits: list[tuple[int, str | None]] = []
    for length in completion_lengths:
        room = context_len - int(length)
        if room < max_reprompt_len:
            limits.append(
                (room, f"the model's context of {context_len} positions less a {int(length)}-token completion")
            )
        else:
            limits.append((max_reprompt_len, None))
    return limits


def build_teacher_batch(
    rollouts: ScoredRollouts,
    codec: PromptCodec,
    config: SDPOConfig,
    *,
    start: int,
    count: int,
    pad_id: int,
    seed=0,
    context_len: int | None = None,
    completion_lengths: Sequence[int] | None = None,
) -> TeacherBatch:
    """The teacher batch of the process that owns samples `start : start + count` of the global batch.

    With `context_len` (the model's positions) and `completion_lengths` (this process's completions, in tokens),
    each teacher prompt is also held to `context_len − its completion length`: the teacher's positions follow its
    attention mask, so prompt + completion is exactly what must fit. A longer prompt is shortened by
    `reprompt_truncation` or masked out and counted, never passed on to overrun the model.
    """
    keys = rollouts.group_keys()
    contexts = build_teacher_contexts(
        rollouts.prompts, keys, rollouts.scores, rollouts.completions, rollouts.feedback, config, seed=seed
    )
    local = contexts.reprompts[start : start + count]
    limits = prompt_limits(config.max_reprompt_len, context_len, completion_lengths, count)
    tokenized = [
        tokenize_reprompt(r, codec, max_len=limit, truncation=config.reprompt_truncation, bound=bound)
        for r, (limit, bound) in zip(local, limits)
    ]
    width = max((len(t.ids) for t in tokenized), default=0)
    prompt_ids = torch.full((count, width), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((count, width), dtype=torch.long)
    for i, t in enumerate(tokenized):  # left padding, as for the student prompt
        if t.ids:
            prompt_ids[i, width - len(t.ids) :] = torch.tensor(t.ids, dtype=torch.long)
            prompt_mask[i, width - len(t.ids) :] = 1
    threshold = config.success_reward_threshold
    pass_rate, has_success = group_facts(keys, rollouts.scores, threshold)
    own = slice(start, start + count)
    success = [float(not math.isnan(s) and s >= threshold) for s in rollouts.scores[own]]
    return TeacherBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        self_distillation_mask=torch.tensor([float(r.active and not t.overflow) for r, t in zip(local, tokenized)]),
        success=torch.tensor(success),
        group_pass_rate=torch.tensor(pass_rate[own]),
        group_has_success=torch.tensor(has_success[own]),
        truncated=sum(t.truncated for t in tokenized),
        overflow=sum(t.overflow for t in tokenized),
        prompt_tokens=sum(len(t.ids) for t in tokenized),
        metrics=dict(contexts.metrics),
        context_truncated=sum(t.truncated for t, (_, bound) in zip(tokenized, limits) if bound is not None),
        context_overflow=sum(t.overflow for t, (_, bound) in zip(tokenized, limits) if bound is not None),
        context_len=context_len,
        warnings=group_warnings(rollouts, keys),
    )
