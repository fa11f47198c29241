"""The naive head: full (N, V) logits in PyTorch, then the top-K, a gather and the bucket maths.

This is what TRL's experimental SDPOTrainer and the other SDPO implementations do. It is the
readable baseline for benchmarks and a second oracle in tests; it needs O(N·V) memory. Two details
keep it exact where a plain port is not (issue 14): log-probs are (z − max) − log Σ exp(z − max), never
z − (max + log Σ …) (that sum rounds at |z| ~ 1e4), and the tail bucket is the logsumexp over the
log-probs *outside* the top-K, never log(1 − top-K mass).
"""

from __future__ import annotations

import torch

from .buckets import divergence, topk_divergence


def _full_logits(h: torch.Tensor, weight: torch.Tensor, inv_temp: float) -> torch.Tensor:
    if h.dtype == torch.float64:
        return (h @ weight.t()) * inv_temp
    return (h.float() @ weight.float().t()) * inv_temp


def log_softmax(z: torch.Tensor) -> torch.Tensor:
    """(z − m) − log Σ exp(z − m) with m the detached row max: z − m is exact near the max."""
    shifted = z - z.detach().amax(dim=-1, keepdim=True)
    return shifted - torch.logsumexp(shifted, dim=-1, keepdim=True)


def topk_ids(log_probs: torch.Tensor, k: int) -> torch.Tensor:
    """The K largest per row; ties prefer the lower vocabulary id (torch.topk leaves tie order unspecified).

    Everything above the K-th value is in; the remaining slots go to the lowest ids equal to it.
    """
    kth = torch.topk(log_probs, k, dim=-1).values[..., -1:]
    above = log_probs > kth
    tied = log_probs == kth
    free = k - above.sum(dim=-1, keepdim=True)
    chosen = above | (tied & (torch.cumsum(tied, dim=-1) <= free))
    return chosen.nonzero()[:, 1].view(log_probs.shape[0], k)  # ascending ids; bucket order does not matter


def naive_head(h_s, w_s, h_t, w_t, targets, *, topk, add_tail, alpha, inv_temp):
    """Returns (divergence, student_logprob, teacher_logprob), each (N,), differentiable in h_s and w_s."""
    student = log_softmax(_full_logits(h_s, w_s, inv_temp))
    with torch.no_grad():
        teacher = log_softmax(_full_logits(h_t, w_t, inv_temp))
    if topk is None:
        div = divergence(student, teacher, alpha)
    else:
        idx = topk_ids(student.detach(), topk)
        tails = {}
        if add_tail:  # log of the mass outside the top-K, summed directly
            tails = {
                "student_tail_log_prob": torch.logsumexp(student.scatter(-1, idx, -torch.inf), dim=-1),
                "teacher_tail_log_prob": torch.logsumexp(teacher.scatter(-1, idx, -torch.inf), dim=-1),
            }
        div = topk_divergence(student.gather(-1, idx), teacher.gather(-1, idx), alpha=alpha, add_tail=add_tail, **tails)
    y = targets.unsqueeze(-1)
    return div, student.gather(-1, y).squeeze(-1), teacher.gather(-1, y).squeeze(-1)
