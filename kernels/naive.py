"""The naive head: full (N, V) logits in PyTorch, then the top-K, a gather and the bucket maths.

This is what TRL's experimental SDPOTrainer and the other SDPO implementations do. It is the
readable baseline for benchmarks and a second oracle in tests; it needs O(N·V) memory. Two details
keep it exact where a plain port is not (docs/kernels.md, exactness): log-probs are (z − max) − log Σ exp(z − max), never
z − (max + log Σ …) (that sum rounds at |z| ~ 1e4), the tail bucket is the logsumexp over the
log-probs *outside* the top-K, never log(1 − top-K mass), and top-K ties go to the lower id.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .buckets import divergence, teacher_bucket_stats, topk_divergence


def _full_logits(h: torch.Tensor, weight: torch.Tensor, inv_temp: float) -> torch.Tensor:
    if h.dtype == torch.float64:
        return (h @ weight.t()) * inv_temp
    return (h.float() @ weight.float().t()) * inv_temp


def log_softmax(z: torch.Tensor) -> torch.Tensor:
    """(z − max) − log Σ exp(z − max): PyTorch's log_softmax subtracts in that order on the CPU and on CUDA, so
    z − max is exact near the max (tests/test_head.py checks the ±1e4 regime)."""
    return F.log_softmax(z, dim=-1)


def topk_ids(log_probs: torch.Tensor, k: int) -> torch.Tensor:
    """The K largest per row; ties prefer the lower vocabulary id (torch.topk leaves tie order unspecified).

    Rows whose K-th and (K+1)-th values tie are redone: everything above the K-th value is in, and the remaining
    slots go to the lowest ids equal to it.
    """
    vals, idx = torch.topk(log_probs, min(k + 1, log_probs.shape[-1]), dim=-1)
    if vals.shape[-1] == k:
        return idx
    idx = idx[:, :k].clone()
    tied_rows = (vals[:, k - 1] == vals[:, k]).nonzero().squeeze(1)
    if tied_rows.numel():
        rows = log_probs[tied_rows]
        kth = vals[tied_rows, k - 1 : k]
        tied = rows == kth
        chosen = (rows > kth) | (tied & (torch.cumsum(tied, dim=-1) <= k - (rows > kth).sum(-1, keepdim=True)))
        idx[tied_rows] = chosen.nonzero()[:, 1].view(-1, k)  # ascending ids; bucket order does not matter
    return idx


def naive_head(h_s, w_s, h_t, w_t, targets, *, topk, add_tail, alpha, inv_temp, kl_clip=None):
    """Returns (divergence, student_logprob, teacher_logprob), each (N,), differentiable in h_s and w_s, and the
    teacher's bucket statistics (N, 3) (`buckets.teacher_bucket_stats`; NaN for the full vocabulary)."""
    student = log_softmax(_full_logits(h_s, w_s, inv_temp))
    with torch.no_grad():
        teacher = log_softmax(_full_logits(h_t, w_t, inv_temp))
    if topk is None:
        div = divergence(student, teacher, alpha, kl_clip)
        stats = torch.full((h_s.shape[0], 3), torch.nan, dtype=div.dtype, device=div.device)
    else:
        idx = topk_ids(student.detach(), topk)
        teacher_tail = torch.logsumexp(teacher.scatter(-1, idx, -torch.inf), dim=-1)  # summed directly
        tails = {}
        if add_tail:  # log of the mass outside the top-K, summed directly
            tails = {
                "student_tail_log_prob": torch.logsumexp(student.scatter(-1, idx, -torch.inf), dim=-1),
                "teacher_tail_log_prob": teacher_tail,
            }
        div = topk_divergence(
            student.gather(-1, idx), teacher.gather(-1, idx), alpha=alpha, add_tail=add_tail, kl_clip=kl_clip, **tails
        )
        stats = teacher_bucket_stats(teacher.gather(-1, idx), teacher_tail).to(div.dtype)
    y = targets.unsqueeze(-1)
    return div, student.gather(-1, y).squeeze(-1), teacher.gather(-1, y).squeeze(-1), stats
