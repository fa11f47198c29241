"""The self-distillation loss, exactly as the reference (lasgroup/SDPO, verl `core_algos.py`) computes it.

Data flow, per response token t of sample i:

    student/teacher log-probs ──► buckets (top-K + tail │ renormalised top-K │ full vocabulary)
                              ──► divergence D_t (α = 0 forward KL │ α = 1 reverse KL │ generalised JSD)
                              ──► × detached IS ratio min(π_S/π_old, is_clip) × rollout weights
                              ──► masked aggregation (four modes)

The bucket and divergence helpers live in `sdpo_fast.kernels.buckets` (re-exported here), shared with the
fused head, which feeds them (N, K) tensors it computed without ever building (N, V) logits.

One deliberate deviation from the reference: a micro-batch whose loss mask is all zero returns an
exact 0 that stays connected to the autograd graph, in every aggregation mode (the reference
returns NaN for the two `seq-mean-*-mean`/`-sum` modes). Masked positions are also zeroed before
they are multiplied by the mask, so a non-finite value in a padded position cannot leak in.
"""

from __future__ import annotations

import math

import torch

# The bucket maths lives with the kernels (one copy, used by the heads too); re-exported here for the loss API.
from .kernels.buckets import (  # noqa: F401 (re-exports)
    TAIL_LOG_FLOOR,
    TAIL_LOG_MASS_CLAMP,
    add_tail_bucket,
    divergence,
    renormalize_topk,
    topk_divergence,
)

# Clamp on log(π_S/π_old) before exponentiating, as in the reference.
LOG_RATIO_CLAMP = 20.0


def token_level_surrogate(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor) -> torch.Tensor:
    """Token-level SDPO: sg(log π_S − log π_T)·log π_S. Its gradient is −A_t ∇log π_S with
    A_t = log π_T − log π_S, the single-sample estimator of the reverse-KL gradient."""
    return (student_log_probs - teacher_log_probs).detach() * student_log_probs


def importance_ratio(student_log_probs: torch.Tensor, old_log_probs: torch.Tensor, is_clip: float) -> torch.Tensor:
    """ρ_t = min(exp(clamp(log π_S − log π_old, ±20)), is_clip), detached. One-sided, as in the reference."""
    log_ratio = torch.clamp(student_log_probs - old_log_probs, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(log_ratio).clamp(max=is_clip).detach()


def agg_loss(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    loss_agg_mode: str,
    *,
    denominator: torch.Tensor | float | None = None,
    response_width: int | None = None,
) -> torch.Tensor:
    """Aggregate a (B, R) per-token loss under a (B, R) mask.

    With `denominator=None` this is the reference's micro-batch aggregation:

    - `token-mean`: Σ c·m / max(Σ m, 1)
    - `seq-mean-token-sum`: mean over sequences with Σ_t m > 0 of Σ_t c·m
    - `seq-mean-token-mean`: mean over such sequences of Σ_t c·m / (Σ_t m + 1e−8)
    - `seq-mean-token-sum-norm`: Σ c·m / R, R = `response_width` or the padded width

    A `denominator` replaces the count in the first three modes (tokens, or active sequences) and
    divides the fourth; the trainer passes a count over the whole optimizer step so that gradient
    accumulation and the micro-batch size leave the gradient unchanged. An all-zero mask gives an
    exact, graph-connected 0 in every mode.
    """
    mask = mask.to(per_token.dtype)
    # Zero masked entries first: a non-finite padded value times 0 would otherwise be NaN.
    masked = torch.where(mask != 0, per_token, torch.zeros_like(per_token)) * mask
    if loss_agg_mode == "token-mean":
        numerator = masked.sum()
        count = mask.sum()
    elif loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-mean"):
        seq_tokens = mask.sum(dim=-1)
        seq_values = masked.sum(dim=-1)
        if loss_agg_mode == "seq-mean-token-mean":
            seq_values = seq_values / (seq_tokens + 1e-8)
        active = (seq_tokens > 0).to(per_token.dtype)
        numerator = (seq_values * active).sum()
        count = active.sum()
    elif loss_agg_mode == "seq-mean-token-sum-norm":
        width = per_token.shape[-1] if response_width is None else response_width
        numerator = masked.sum() / width
        count = None
    else:
        raise ValueError(
            f"Unknown loss_agg_mode={loss_agg_mode!r}. Choose 'token-mean', 'seq-mean-token-sum', "
            "'seq-mean-token-mean' or 'seq-mean-token-sum-norm'."
        )
    if denominator is not None:
        # A caller's normaliser may legitimately be below 1 (e.g. one active sequence shared by two processes):
        # only guard against zero.
        denom = torch.as_tensor(denominator, dtype=per_token.dtype, device=per_token.device)
        return numerator / denom.clamp(min=1e-12)
    if count is None:
        return numerator
    # count == 0 → numerator is an exact, connected 0 and the clamp keeps it finite.
    return numerator / count.clamp(min=1.0)


def weighted_token_loss(
    per_token: torch.Tensor,
    student_log_probs: torch.Tensor,
    old_log_probs: torch.Tensor | None,
    *,
    is_clip: float | None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token loss × the detached IS ratio min(π_S/π_old, is_clip) × the rollout (sampler) IS weights.

    Returns `(weighted, ratio)`; `ratio` is None when `is_clip` is None.
    """
    ratio = None
    if is_clip is not None:
        if old_log_probs is None:
            raise ValueError(
                "is_clip is set but old_log_probs is None. Pass the behaviour policy's log-probs, or pass "
                "old_log_probs=student_log_probs.detach() when training on-policy (the ratio is then exactly 1), "
                "or set is_clip=None to disable the importance-sampling correction."
            )
        ratio = importance_ratio(student_log_probs, old_log_probs, is_clip)
        per_token = per_token * ratio
    if rollout_is_weights is not None:
        per_token = per_token * rollout_is_weights
    return per_token, ratio


def self_distillation_objective(
    per_token: torch.Tensor,
    student_log_probs: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_log_probs: torch.Tensor | None,
    is_clip: float | None,
    loss_agg_mode: str,
    rollout_is_weights: torch.Tensor | None = None,
    denominator: torch.Tensor | float | None = None,
    response_width: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The one composition of the SDPO loss from per-token terms: IS ratio, rollout weights, masked aggregation.

    `compute_self_distillation_loss` (one micro-batch, the reference) and `SDPOTrainer` (the whole
    optimizer step: `denominator` is the step's count, see `agg_loss`) both call it.
    Returns `(loss, weighted_per_token, ratio)`.
    """
    weighted, ratio = weighted_token_loss(
        per_token, student_log_probs, old_log_probs, is_clip=is_clip, rollout_is_weights=rollout_is_weights
    )
    loss = agg_loss(weighted, mask, loss_agg_mode, denominator=denominator, response_width=response_width)
    return loss, weighted, ratio


def compute_self_distillation_loss(
    student_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    old_log_probs: torch.Tensor | None = None,
    student_topk_log_probs: torch.Tensor | None = None,
    teacher_topk_log_probs: torch.Tensor | None = None,
    student_all_log_probs: torch.Tensor | None = None,
    teacher_all_log_probs: torch.Tensor | None = None,
    self_distillation_mask: torch.Tensor | None = None,
    rollout_is_weights: torch.Tensor | None = None,
    alpha: float = 0.5,
    add_tail: bool = True,
    full_logit_distillation: bool = True,
    is_clip: float | None = 2.0,
    loss_agg_mode: str = "token-mean",
    response_width: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The SDPO loss of one micro-batch, from log-probabilities (reference-faithful).

    `SDPOTrainer`'s loss for an optimizer step equals this function applied to all of that step's
    samples at once (in every aggregation mode), whatever the micro-batch size and the number of processes.

    Args:
        student_log_probs: (B, R) log π_S(y_t) of the sampled tokens, with grad.
        teacher_log_probs: (B, R) log π_T(y_t) of the sampled tokens (no grad needed).
        response_mask: (B, R) 1 on valid response tokens.
        old_log_probs: (B, R) log π_old(y_t), for the importance ratio. Required when `is_clip` is set.
        student_topk_log_probs / teacher_topk_log_probs: (B, R, K) full-vocabulary-normalised
            log-probs at the *student's* top-K token ids (the teacher gathered at the same ids).
        student_all_log_probs / teacher_all_log_probs: (B, R, V) full log-softmax, used when no
            top-K tensors are given (full-vocabulary distillation).
        self_distillation_mask: (B,) 1 where the sample has a teacher reprompt, else 0.
        rollout_is_weights: (B, R) optional truncated-IS weights between the sampler and π_old.
        alpha: 0 forward KL, 1 reverse KL, otherwise generalised JSD.
        add_tail: top-K + tail bucket (True) or renormalised top-K (False).
        full_logit_distillation: False selects the token-level surrogate (needs alpha == 1).
        is_clip: upper clip of the detached importance ratio; None disables it.
        loss_agg_mode: one of the four reference aggregation modes (see `agg_loss`).
        response_width: R of `seq-mean-token-sum-norm`, the padded response width (the trainer's
            `max_completion_length`); defaults to the width of the tensors.

    Returns:
        `(loss, metrics)`: the scalar loss and a dict of plain floats.
    """
    if full_logit_distillation:
        if student_topk_log_probs is not None or teacher_topk_log_probs is not None:
            if student_topk_log_probs is None or teacher_topk_log_probs is None:
                raise ValueError("Pass both student_topk_log_probs and teacher_topk_log_probs, or neither.")
            if student_topk_log_probs.shape != teacher_topk_log_probs.shape:
                raise ValueError(
                    f"Top-K shapes differ: student {tuple(student_topk_log_probs.shape)} vs teacher "
                    f"{tuple(teacher_topk_log_probs.shape)}. Gather the teacher at the student's top-K ids."
                )
            per_token = topk_divergence(student_topk_log_probs, teacher_topk_log_probs, alpha=alpha, add_tail=add_tail)
        elif student_all_log_probs is not None and teacher_all_log_probs is not None:
            per_token = divergence(student_all_log_probs, teacher_all_log_probs, alpha)
        else:
            raise ValueError(
                "full_logit_distillation=True needs either (student_topk_log_probs, teacher_topk_log_probs) or "
                "(student_all_log_probs, teacher_all_log_probs). Pass full_logit_distillation=False for the "
                "token-level surrogate, which only needs the sampled-token log-probs."
            )
    else:
        if alpha != 1.0:
            raise ValueError(
                f"Token-level distillation (full_logit_distillation=False) requires alpha=1.0, got alpha={alpha}."
            )
        per_token = token_level_surrogate(student_log_probs, teacher_log_probs)
    divergence_values = per_token.detach()

    mask = response_mask.to(per_token.dtype)
    if self_distillation_mask is not None:
        mask = mask * self_distillation_mask.to(per_token.dtype).unsqueeze(-1)
    loss, _, ratio = self_distillation_objective(
        per_token,
        student_log_probs,
        mask,
        old_log_probs=old_log_probs,
        is_clip=is_clip,
        loss_agg_mode=loss_agg_mode,
        rollout_is_weights=rollout_is_weights,
        response_width=response_width,
    )

    n_tokens = float(mask.sum())
    metrics = {
        "self_distillation/empty_target_batch": float(n_tokens == 0),
        "sdpo/divergence_mean": _masked_mean(divergence_values, mask),
    }
    if ratio is not None:
        metrics["sdpo/is_ratio_mean"] = _masked_mean(ratio, mask)
        metrics["sdpo/is_clip_fraction"] = _masked_mean((ratio >= is_clip).to(mask.dtype), mask)
    return loss, metrics


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    total = float(mask.sum())
    if total == 0:
        return math.nan
    return float((torch.where(mask != 0, values, torch.zeros_like(values)) * mask).sum() / total)
