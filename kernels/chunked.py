"""The chunked PyTorch backend: tile operations in plain PyTorch, bounded by a scratch budget.

Each tile is `rows × cols` of fp32 logits computed as h[rows] @ W[cols]ᵀ; statistics stream across
vocabulary tiles (online logsumexp, a running top-K merged tile by tile), so neither the logits
nor any other (N, V) tensor ever exists. `torch.topk` only ever sees one tile or 2·K candidates.
"""

from __future__ import annotations

import math

import torch

from .function import GradSpec, HeadOptions, Stats, accumulation_dtype, plan_tiles

# fp32 logits tile plus the temporaries a tile op creates (exp, products, top-K scratch).
TILE_BYTES_PER_ELEMENT = 16
FULL_TILE_BYTES_PER_ELEMENT = 40  # full-vocabulary tiles also hold teacher logits and mixtures


def _logits(h: torch.Tensor, weight: torch.Tensor, inv_temp: float) -> torch.Tensor:
    """Scaled logits of one tile, accumulated in fp32 (fp64 for fp64 inputs) whatever the input dtype."""
    if h.is_cuda and h.dtype in (torch.bfloat16, torch.float16):
        z = torch.mm(h, weight.t(), out_dtype=torch.float32)
    else:
        acc = accumulation_dtype(h)
        z = h.to(acc) @ weight.to(acc).t()
    return z.mul_(inv_temp) if inv_temp != 1.0 else z


def _tiles(n: int, vocab: int, hidden: int, budget: int, bytes_per_element: int):
    rows, cols = plan_tiles(n, vocab, hidden, budget, bytes_per_element)
    for r0 in range(0, n, rows):
        yield slice(r0, min(n, r0 + rows)), [(v0, min(vocab, v0 + cols)) for v0 in range(0, vocab, cols)]


class TorchTiles:
    """Tile operations for `SDPOHeadFunction` in plain PyTorch (any device)."""

    name = "torch"
    tile_bytes_per_element = TILE_BYTES_PER_ELEMENT

    def _stream(self, h, weight, targets, opts: HeadOptions, topk: int | None) -> Stats:
        n, vocab = h.shape[0], weight.shape[0]
        acc = accumulation_dtype(h)
        lse = torch.empty(n, dtype=acc, device=h.device)
        target_logit = torch.zeros(n, dtype=acc, device=h.device)
        top_vals = torch.empty(n, topk or 0, dtype=acc, device=h.device)
        top_idx = torch.empty(n, topk or 0, dtype=torch.int64, device=h.device)
        for rows, col_ranges in _tiles(n, vocab, h.shape[1], opts.budget_bytes, TILE_BYTES_PER_ELEMENT):
            h_rows, y = h[rows], targets[rows]
            run_max = torch.full((h_rows.shape[0],), -math.inf, dtype=acc, device=h.device)
            run_sum = torch.zeros(h_rows.shape[0], dtype=acc, device=h.device)
            best_vals = best_idx = None
            for v0, v1 in col_ranges:
                z = _logits(h_rows, weight[v0:v1], opts.inv_temp)
                new_max = torch.maximum(run_max, z.max(dim=1).values)
                run_sum = run_sum * torch.exp(run_max - new_max) + torch.exp(z - new_max.unsqueeze(1)).sum(dim=1)
                run_max = new_max
                inside = (y >= v0) & (y < v1)
                if bool(inside.any()):
                    r = inside.nonzero().squeeze(1)
                    target_logit[rows.start + r] = z[r, y[r] - v0]
                if topk:
                    vals, idx = torch.topk(z, min(topk, v1 - v0), dim=1)
                    idx += v0
                    if best_vals is not None:  # merge with the running top-K: at most 2·K candidates
                        vals, pos = torch.topk(
                            torch.cat([best_vals, vals], 1), min(topk, best_vals.shape[1] + vals.shape[1]), dim=1
                        )
                        idx = torch.cat([best_idx, idx], 1).gather(1, pos)
                    best_vals, best_idx = vals, idx
            lse[rows] = run_max + torch.log(run_sum)
            if topk:
                top_vals[rows], top_idx[rows] = best_vals, best_idx
        return Stats(lse, target_logit, top_vals if topk else None, top_idx if topk else None)

    def student_stats(self, h, weight, targets, opts: HeadOptions) -> Stats:
        return self._stream(h, weight, targets, opts, opts.topk)

    def teacher_stats(self, h, weight, targets, opts: HeadOptions, top_idx) -> Stats:
        stats = self._stream(h, weight, targets, opts, None)
        if top_idx is None:
            return stats
        return stats._replace(top_logits=self.gather(h, weight, top_idx, opts))

    def gather(self, h, weight, idx, opts: HeadOptions) -> torch.Tensor:
        """Logits at given vocabulary ids: (N, K) dot products, in row chunks of bounded size."""
        n, k = idx.shape
        acc = accumulation_dtype(h)
        out = torch.empty(n, k, dtype=acc, device=h.device)
        rows_per_chunk = max(1, opts.budget_bytes // (8 * max(k, 1) * max(h.shape[1], 1)))
        for r0 in range(0, n, rows_per_chunk):
            r1 = min(n, r0 + rows_per_chunk)
            w_rows = weight[idx[r0:r1]].to(acc)  # (rows, K, H)
            out[r0:r1] = torch.einsum("rkh,rh->rk", w_rows, h[r0:r1].to(acc)) * opts.inv_temp
        return out

    def full_divergence(self, h_s, w_s, h_t, w_t, lse_s, lse_t, opts: HeadOptions):
        """Exact full-vocabulary divergence, streamed; also (1 − α)·KL(S‖M) for the JSD gradient."""
        n, vocab = h_s.shape[0], w_s.shape[0]
        div = torch.zeros(n, dtype=accumulation_dtype(h_s), device=h_s.device)
        partial = torch.zeros_like(div)
        alpha = opts.alpha
        for rows, col_ranges in _tiles(
            n, vocab, max(h_s.shape[1], h_t.shape[1]), opts.budget_bytes, FULL_TILE_BYTES_PER_ELEMENT
        ):
            for v0, v1 in col_ranges:
                ls = _logits(h_s[rows], w_s[v0:v1], opts.inv_temp) - lse_s[rows].unsqueeze(1)
                lt = _logits(h_t[rows], w_t[v0:v1], opts.inv_temp) - lse_t[rows].unsqueeze(1)
                if alpha == 0.0:
                    div[rows] += (lt.exp() * (lt - ls)).sum(1)
                elif alpha == 1.0:
                    div[rows] += (ls.exp() * (ls - lt)).sum(1)
                else:
                    lm = torch.logaddexp(ls + math.log1p(-alpha), lt + math.log(alpha))
                    kl_s = (ls.exp() * (ls - lm)).sum(1)
                    kl_t = (lt.exp() * (lt - lm)).sum(1)
                    div[rows] += (1 - alpha) * kl_s + alpha * kl_t
                    partial[rows] += (1 - alpha) * kl_s
        return div, partial

    def dense_grad(self, spec: GradSpec, rows: slice, v0: int, v1: int, out: torch.Tensor) -> None:
        """out = −c·p_S (top-K mode), or g_D·G − c·p_S (full vocabulary), for one tile."""
        ls = _logits(spec.h[rows], spec.weight[v0:v1], spec.inv_temp) - spec.lse[rows].unsqueeze(1)
        p_s = ls.exp()
        grad = -spec.coef[rows].unsqueeze(1) * p_s
        if spec.teacher_h is not None:
            lt = _logits(spec.teacher_h[rows], spec.teacher_weight[v0:v1], spec.inv_temp) - spec.teacher_lse[
                rows
            ].unsqueeze(1)
            alpha = spec.alpha
            if alpha == 0.0:
                g = -lt.exp()
            elif alpha == 1.0:
                g = p_s * (ls - lt)
            else:
                lm = torch.logaddexp(ls + math.log1p(-alpha), lt + math.log(alpha))
                g = (1 - alpha) * p_s * (ls - lm)
            grad += spec.div_grad[rows].unsqueeze(1) * g
        out.copy_(grad)
