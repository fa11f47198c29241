"""The reference's bucket maths (lasgroup/SDPO, verl `core_algos.py`): top-K + tail buckets and the divergence.

The one home of these formulas: `sdpo_fast.loss` re-exports them for the loss API, and the heads
(`kernels/function.py`, `kernels/naive.py`) use them on (N, K) tensors.

The tail bucket is log(1 − Σ_k p_k). The reference computes it from the top-K log-probs, which cancels when the
top-K holds almost all the mass (and amplifies every rounding of the log-normaliser). The heads therefore pass the
tail log-probability they summed directly over the entries outside the top-K (`tail_log_prob`), with the
reference's clamp: tail = log(−expm1(min(log_mass, −1e−7))) ⟺ max(log p_tail, log(−expm1(−1e−7))), gradient cut
where clamped.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Clamp on the log of the top-K mass before computing the tail, so the tail never reaches log 0.
TAIL_LOG_MASS_CLAMP = -1e-7
# The smallest tail log-probability that clamp allows: log(−expm1(−1e−7)) ≈ −16.118.
TAIL_LOG_FLOOR = math.log(-math.expm1(TAIL_LOG_MASS_CLAMP))


def add_tail_bucket(topk_log_probs: torch.Tensor, tail_log_prob: torch.Tensor | None = None) -> torch.Tensor:
    """Append the tail bucket log(1 − Σ_k p_k) to full-vocabulary-normalised top-K log-probs.

    (…, K) → (…, K+1). Without `tail_log_prob` this is the reference formula: the log of the top-K mass is
    clamped at −1e−7 and the tail is log(−expm1(·)), so it is never −inf; when the top-K covers all the mass the
    tail is log(1e−7) ≈ −16.12 and its gradient is cut off by the clamp. With `tail_log_prob` (…,), the log of
    the mass outside the top-K computed directly, the same clamp is applied to it instead: exact where the
    reference formula cancels.
    """
    if tail_log_prob is None:
        log_mass = torch.logsumexp(topk_log_probs, dim=-1, keepdim=True)
        log_mass = torch.clamp(log_mass, max=TAIL_LOG_MASS_CLAMP)
        tail = torch.log(-torch.expm1(log_mass))
    else:
        tail = torch.clamp(tail_log_prob, min=TAIL_LOG_FLOOR).unsqueeze(-1)
    return torch.cat([topk_log_probs, tail.to(topk_log_probs.dtype)], dim=-1)


def renormalize_topk(topk_log_probs: torch.Tensor) -> torch.Tensor:
    """Renormalise log-probs over the K selected tokens: ℓ_k − logsumexp_j ℓ_j."""
    return topk_log_probs - torch.logsumexp(topk_log_probs, dim=-1, keepdim=True)


def divergence(
    student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, alpha: float, kl_clip: float | None = None
) -> torch.Tensor:
    """Per-position divergence between two log-distributions over the last dimension.

    α = 0 → KL(teacher ‖ student) (forward KL); α = 1 → KL(student ‖ teacher) (reverse KL);
    otherwise (1−α)·KL(S ‖ M) + α·KL(T ‖ M) with log M = logsumexp(log S + log(1−α), log T + log α).
    The ends are the *unscaled* KLs, so the function is discontinuous at α ∈ {0, 1}, as in the
    reference. Returns the sum over the last dimension.

    `kl_clip` (forward KL only): each entry p_T·(log p_T − log p_S) is clipped above at it, so one teacher token the
    student barely covers cannot dominate a position (its gradient is cut where clipped). NaN stays NaN.
    """
    if alpha == 0.0:
        elementwise = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
        if kl_clip is not None:
            elementwise = torch.where(elementwise > kl_clip, torch.full_like(elementwise, kl_clip), elementwise)
    elif alpha == 1.0:
        elementwise = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        a = torch.tensor(alpha, dtype=student_log_probs.dtype, device=student_log_probs.device)
        mixture = torch.logsumexp(
            torch.stack([student_log_probs + torch.log(1 - a), teacher_log_probs + torch.log(a)]), dim=0
        )
        kl_teacher = F.kl_div(mixture, teacher_log_probs, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture, student_log_probs, reduction="none", log_target=True)
        elementwise = torch.lerp(kl_student, kl_teacher, a)
    return elementwise.sum(dim=-1)


def topk_divergence(
    student_topk_log_probs: torch.Tensor,
    teacher_topk_log_probs: torch.Tensor,
    *,
    alpha: float,
    add_tail: bool,
    student_tail_log_prob: torch.Tensor | None = None,
    teacher_tail_log_prob: torch.Tensor | None = None,
    kl_clip: float | None = None,
) -> torch.Tensor:
    """D_t on K+1 buckets (tail) or on K renormalised buckets. Inputs are full-vocabulary-normalised.

    The optional tail log-probs (…,) replace the reference's log(1 − Σ p_k) (see `add_tail_bucket`); they are
    ignored without a tail.
    """
    if add_tail:
        student = add_tail_bucket(student_topk_log_probs, student_tail_log_prob)
        teacher = add_tail_bucket(teacher_topk_log_probs, teacher_tail_log_prob)
    else:
        student, teacher = renormalize_topk(student_topk_log_probs), renormalize_topk(teacher_topk_log_probs)
    return divergence(student, teacher, alpha, kl_clip)


def teacher_bucket_stats(teacher_topk_log_probs: torch.Tensor, teacher_tail_log_prob: torch.Tensor) -> torch.Tensor:
    """(…, 3): the teacher's mass inside the student's top-K, its tail share, and its entropy over the K+1 buckets.

    From the (…, K) top-K log-probs and the directly summed tail log-prob (…,) that the head already has: no pass
    over the vocabulary. The entropy is −Σ_b p_b log p_b over the K+1 buckets (0·log 0 = 0), a lower bound on the
    teacher's full-vocabulary entropy; log(K+1) is its maximum. Non-finite inputs propagate.
    """
    top = torch.exp(teacher_topk_log_probs)
    tail = torch.exp(teacher_tail_log_prob)

    def plogp(p, logp):
        return torch.where(p > 0, p * logp, torch.where(torch.isnan(logp), logp, torch.zeros_like(p)))

    entropy = -(plogp(top, teacher_topk_log_probs).sum(-1) + plogp(tail, teacher_tail_log_prob))
    return torch.stack([top.sum(-1), tail, entropy], dim=-1)
