"""RLSD (arXiv 2604.03128): the reward's advantage sets the direction, the self-teacher the per-token magnitude.

    A_t = A · ((1 − λ) + λ · clip(exp(sign(A) · Δ_t), 1 − ε, 1 + ε)),   Δ_t = log π_T(y_t) − log π_S(y_t)

Δ_t is detached: the teacher only redistributes credit along the sequence, within ±ε of GRPO's, so it cannot
leak the privileged context into the gradient's direction (the failure RLSD was built against). A sample without
a teacher context gets A_t = A. The loss is GRPO's clipped surrogate with A_t, aggregated as the `GRPOConfig`'s
`loss_type` says. λ may decay linearly to 0 over `rlsd_lambda_decay_steps` optimizer steps.
"""

from __future__ import annotations

import torch

from .base import SDPOObjective


def rlsd_advantages(
    advantages: torch.Tensor, delta: torch.Tensor, has_teacher: torch.Tensor, lam: float, eps: float
) -> torch.Tensor:
    """(B, T) per-token advantages from (B,) sequence advantages, (B, T) Δ_t and a (B,) teacher mask."""
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    factor = torch.exp(torch.sign(adv) * delta.detach()).clamp(1.0 - eps, 1.0 + eps)
    shaped = adv * ((1.0 - lam) + lam * factor)
    return torch.where(has_teacher.bool().unsqueeze(1), shaped, adv.expand_as(shaped))


class RLSDObjective(SDPOObjective):
    name = "rlsd"

    def check(self) -> None:
        super().check()
        if self.config.grpo_weight > 0:
            raise ValueError("objective='rlsd' is itself a GRPO loss; set grpo_weight=0.")

    def scores_all_tokens(self) -> bool:
        return True  # every sample gets the policy-gradient term

    def current_lambda(self) -> float:
        lam, steps = self.config.rlsd_lambda, self.config.rlsd_lambda_decay_steps
        if steps is None:
            return lam
        return lam * max(0.0, 1.0 - self.runtime.global_step() / steps)

    def policy_loss(self, out, inputs, masks, training: bool):
        logp_s, logp_t = out["student_logprob"], out["teacher_logprob"]
        lam = self.current_lambda()
        has_teacher = inputs["self_distillation_mask"] > 0
        advantages = rlsd_advantages(inputs["advantages"], logp_t - logp_s, has_teacher, lam, self.config.rlsd_epsilon)
        loss = self.grpo_loss(logp_s, inputs, masks.completion, training, advantages=advantages)
        stats = {
            "rlsd/lambda": lam,
            "rlsd/advantage_scale": self.global_mean(
                (advantages.abs() / inputs["advantages"].abs().unsqueeze(1).clamp(min=1e-12)).detach(), masks.distil
            ),
            "sdpo/kl_student_teacher": self.global_mean((logp_s - logp_t).detach(), masks.distil),
        }
        return loss, stats
