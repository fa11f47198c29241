"""GRPO's clipped surrogate from given student log-probs: the term the blend and the routed variants add.

It is TRL's `GRPOTrainer` loss (loss types grpo / bnpo / dr_grpo / dapo) recomputed from the log-probs that
SDPO's one student forward already produced, so a variant that mixes GRPO in costs no second forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


@dataclass(frozen=True)
class GRPOSettings:
    """The `GRPOConfig` options the surrogate reads (taken from the trainer once)."""

    loss_type: str = "dapo"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    delta: float | None = None
    importance_sampling_level: str = "token"
    max_completion_length: int = 256


def grpo_per_token(
    logp: torch.Tensor,
    old: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    settings: GRPOSettings,
    importance_sampling_ratio: torch.Tensor | None = None,
) -> torch.Tensor:
    """−min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A) per token, (B, T); `advantages` is (B,) or (B, T)."""
    advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    old = logp.detach() if old is None else old
    log_ratio = logp - old
    if settings.importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_ratio)
    coef_2 = torch.clamp(coef_1, 1 - settings.epsilon_low, 1 + settings.epsilon_high)
    if settings.delta is not None:
        coef_1 = torch.clamp(coef_1, max=settings.delta)
    per_token = -torch.min(coef_1 * advantages, coef_2 * advantages)
    if importance_sampling_ratio is not None:
        per_token = per_token * importance_sampling_ratio
    return per_token


def grpo_aggregate(
    per_token: torch.Tensor, mask: torch.Tensor, settings: GRPOSettings, accumulation: float, dapo_normaliser
) -> torch.Tensor:
    """TRL's aggregation for its loss type; `dapo_normaliser` is the step-wide token count rescaled to one step."""
    if settings.loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
    if settings.loss_type == "bnpo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0) / accumulation
    if settings.loss_type == "dr_grpo":
        return (per_token * mask).sum() / (per_token.size(0) * settings.max_completion_length) / accumulation
    return (per_token * mask).sum() / dapo_normaliser
