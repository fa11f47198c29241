"""An independent float64 oracle for SDPO, written from the formulas of the paper
(arXiv 2601.20802) and of `compute_self_distillation_loss` in the reference, lasgroup/SDPO at commit 0e6d510
(`verl/trainer/ppo/core_algos.py`: top-K inputs, tail bucket, divergence, token-level variant, IS ratio, masking).

It deliberately shares no code with `sdpo_fast`: probabilities are handled as probabilities,
loops run per sequence, and nothing calls `F.kl_div`, so a bug in the package cannot hide here.
"""

from __future__ import annotations

import math

import torch

TAIL_CLAMP = -1e-7


def _log_normalise(z: torch.Tensor) -> torch.Tensor:
    m = z.max(dim=-1, keepdim=True).values
    return z - (m + torch.log(torch.exp(z - m).sum(dim=-1, keepdim=True)))


def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """Σ p (log p − log q) over the last dimension, with 0·log 0 = 0."""
    p = torch.exp(p_log)
    terms = torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p))
    return terms.sum(dim=-1)


def bucket_divergence(p_log: torch.Tensor, q_log: torch.Tensor, alpha: float) -> torch.Tensor:
    """D(student P, teacher Q) over the last dimension, the reference's α convention."""
    if alpha == 0.0:
        return kl(q_log, p_log)
    if alpha == 1.0:
        return kl(p_log, q_log)
    m_log = torch.log((1 - alpha) * torch.exp(p_log) + alpha * torch.exp(q_log))
    return (1 - alpha) * kl(p_log, m_log) + alpha * kl(q_log, m_log)


def with_tail(topk_log: torch.Tensor) -> torch.Tensor:
    mass_log = torch.logsumexp(topk_log, dim=-1, keepdim=True).clamp(max=TAIL_CLAMP)
    tail = torch.log(1 - torch.exp(mass_log))
    return torch.cat([topk_log, tail], dim=-1)


def renormalised(topk_log: torch.Tensor) -> torch.Tensor:
    return topk_log - torch.logsumexp(topk_log, dim=-1, keepdim=True)


def oracle_topk_divergence(s_topk: torch.Tensor, t_topk: torch.Tensor, alpha: float, add_tail: bool) -> torch.Tensor:
    prep = with_tail if add_tail else renormalised
    return bucket_divergence(prep(s_topk.double()), prep(t_topk.double()), alpha)


def oracle_head(h_s, w_s, h_t, w_t, targets, *, topk, add_tail, alpha, temperature=1.0):
    """(divergence, student log-prob, teacher log-prob) per row, all float64."""
    z_s = (h_s.double() @ w_s.double().t()) / temperature
    z_t = (h_t.double() @ w_t.double().t()) / temperature
    ls, lt = _log_normalise(z_s), _log_normalise(z_t)
    if topk is None:
        div = bucket_divergence(ls, lt, alpha)
    else:
        idx = torch.argsort(z_s, dim=-1, descending=True, stable=True)[:, :topk]
        div = oracle_topk_divergence(ls.gather(1, idx), lt.gather(1, idx), alpha, add_tail)
    y = targets.long().unsqueeze(1)
    return div, ls.gather(1, y).squeeze(1), lt.gather(1, y).squeeze(1)


def oracle_loss(
    per_token: torch.Tensor,
    student_lp: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    old_lp=None,
    sd_mask=None,
    rollout_w=None,
    is_clip=None,
    mode="token-mean",
) -> torch.Tensor:
    """Aggregate a per-token loss like the reference, one sequence at a time (all-masked → 0)."""
    b, r = per_token.shape
    c = per_token.double().clone()
    if is_clip is not None:
        log_ratio = (student_lp.double() - old_lp.double()).clamp(-20, 20)
        c = c * torch.minimum(torch.exp(log_ratio), torch.tensor(float(is_clip), dtype=torch.float64))
    if rollout_w is not None:
        c = c * rollout_w.double()
    m = response_mask.double().clone()
    if sd_mask is not None:
        m = m * sd_mask.double().unsqueeze(1)
    if mode == "token-mean":
        total = m.sum()
        return (c * m).sum() / max(float(total), 1.0)
    if mode == "seq-mean-token-sum-norm":
        return (c * m).sum() / r
    seq_values = []
    for i in range(b):
        n_tok = float(m[i].sum())
        if n_tok == 0:
            continue
        s = float((c[i] * m[i]).sum())
        seq_values.append(s if mode == "seq-mean-token-sum" else s / (n_tok + 1e-8))
    return torch.tensor(sum(seq_values) / len(seq_values) if seq_values else 0.0, dtype=torch.float64)


def close(a: float, b: float, tol: float) -> bool:
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)
