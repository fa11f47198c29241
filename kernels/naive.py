"""The naive head: full (N, V) logits in PyTorch, then `torch.topk`, a gather and the bucket maths.

This is what TRL's experimental SDPOTrainer and the other SDPO implementations do. It is the
readable baseline for benchmarks and a second oracle in tests; it needs O(N·V) memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sdpo_fast.loss import divergence, topk_divergence


def _full_logits(h: torch.Tensor, weight: torch.Tensor, inv_temp: float) -> torch.Tensor:
    if h.dtype == torch.float64:
        return (h @ weight.t()) * inv_temp
    return (h.float() @ weight.float().t()) * inv_temp


def naive_head(h_s, w_s, h_t, w_t, targets, *, topk, add_tail, alpha, inv_temp):
    """Returns (divergence, student_logprob, teacher_logprob), each (N,), differentiable in h_s and w_s."""
    student = F.log_softmax(_full_logits(h_s, w_s, inv_temp), dim=-1)
    with torch.no_grad():
        teacher = F.log_softmax(_full_logits(h_t, w_t, inv_temp), dim=-1)
    if topk is None:
        div = divergence(student, teacher, alpha)
    else:
        idx = torch.topk(student.detach(), topk, dim=-1).indices
        div = topk_divergence(student.gather(-1, idx), teacher.gather(-1, idx), alpha=alpha, add_tail=add_tail)
    y = targets.unsqueeze(-1)
    return div, student.gather(-1, y).squeeze(-1), teacher.gather(-1, y).squeeze(-1)
