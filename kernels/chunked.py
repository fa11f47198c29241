"""The chunked PyTorch backend: tile operations in plain PyTorch, bounded by a scratch budget.

Each tile is `rows × cols` of fp32 logits computed as h[rows] @ W[cols]ᵀ; statistics stream across
vocabulary tiles (online logsumexp, a running top-K merged tile by tile), so neither the logits
nor any other (N, V) tensor ever exists. `torch.topk` only ever sees one tile or 2·K candidates.
"""

from __future__ import annotations

import math

import torch

from .function import GradSpec, HeadOptions, Stats, TileOps, accumulation_dtype, plan_tiles

# Scratch per tile element: the fp32 logits tile itself (reused in place) and `torch.topk`'s working
# memory; every other temporary is per row or bounded separately. Checked by tests/test_head_memory.py.
TILE_BYTES_PER_ELEMENT = 8
FULL_TILE_BYTES_PER_ELEMENT = 24  # full-vocabulary tiles also hold teacher logits and the mixture


def _logits_into(out: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, inv_temp: float) -> torch.Tensor:
    """out ← (h @ weightᵀ)·inv_temp, accumulated in fp32 (fp64 for fp64 inputs) whatever the input dtype."""
    if h.is_cuda and h.dtype in (torch.bfloat16, torch.float16):
        out.copy_(torch.mm(h, weight.t(), out_dtype=torch.float32))
    else:
        torch.mm(h.to(out.dtype), weight.to(out.dtype).t(), out=out)
    return out.mul_(inv_temp) if inv_temp != 1.0 else out


def _max_count_above(z: torch.Tensor, threshold: torch.Tensor, rows: int = 256) -> int:
    """max over rows of #{z > threshold}, a few rows at a time (a bool→int64 sum would copy the tile 8×)."""
    return max(int((z[r : r + rows] > threshold[r : r + rows]).sum(dim=1).max()) for r in range(0, z.shape[0], rows))


def _merge_topk(z, v0, topk, best_vals, best_idx):
    """Fold one tile into the running top-K (values sorted descending, ids).

    Only as many tile entries as beat some row's current K-th value can enter, and that number
    shrinks quickly as the top-K settles: asking `torch.topk` for just that many is much cheaper
    than a full top-K of every tile.
    """
    width = z.shape[1]
    if best_vals is None:
        vals, idx = torch.topk(z, min(topk, width), dim=1)
        return vals, idx + v0
    if best_vals.shape[1] < topk:  # still filling up (tiles narrower than K)
        take = min(topk, width)
    else:
        take = _max_count_above(z, best_vals[:, -1:])
        if take == 0:
            return best_vals, best_idx
    vals, idx = torch.topk(z, min(take, width), dim=1)
    k = min(topk, best_vals.shape[1] + vals.shape[1])
    vals, pos = torch.topk(torch.cat([best_vals, vals], 1), k, dim=1)
    return vals, torch.cat([best_idx, idx + v0], 1).gather(1, pos)


def _tiles(n: int, vocab: int, hidden: int, budget: int, bytes_per_element: int):
    rows, cols = plan_tiles(n, vocab, hidden, budget, bytes_per_element)
    for r0 in range(0, n, rows):
        yield slice(r0, min(n, r0 + rows)), [(v0, min(vocab, v0 + cols)) for v0 in range(0, vocab, cols)]


def _scratch(n: int, vocab: int, hidden: int, budget: int, bytes_per_element: int, dtype, device) -> torch.Tensor:
    rows, cols = plan_tiles(n, vocab, hidden, budget, bytes_per_element)
    return torch.empty(rows * cols, dtype=dtype, device=device)


def _tile(scratch: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A contiguous (rows, cols) view at the start of a flat scratch buffer."""
    return scratch[: rows * cols].view(rows, cols)


class TorchTiles(TileOps):
    """Tile operations for `SDPOHeadFunction` in plain PyTorch (any device)."""

    name = "torch"
    tile_bytes_per_element = TILE_BYTES_PER_ELEMENT

    def _stream(self, h, weight, targets, opts: HeadOptions, topk: int | None) -> Stats:
        n, vocab, hidden = h.shape[0], weight.shape[0], h.shape[1]
        acc = accumulation_dtype(h)
        lse = torch.empty(n, dtype=acc, device=h.device)
        target_logit = torch.zeros(n, dtype=acc, device=h.device)
        top_vals = torch.empty(n, topk or 0, dtype=acc, device=h.device)
        top_idx = torch.empty(n, topk or 0, dtype=torch.int64, device=h.device)
        scratch = _scratch(n, vocab, hidden, opts.budget_bytes, TILE_BYTES_PER_ELEMENT, acc, h.device)
        for rows, col_ranges in _tiles(n, vocab, hidden, opts.budget_bytes, TILE_BYTES_PER_ELEMENT):
            h_rows, y = h[rows], targets[rows]
            m = h_rows.shape[0]
            run_max = torch.full((m,), -math.inf, dtype=acc, device=h.device)
            run_sum = torch.zeros(m, dtype=acc, device=h.device)
            best_vals = best_idx = None
            for v0, v1 in col_ranges:
                z = _logits_into(_tile(scratch, m, v1 - v0), h_rows, weight[v0:v1], opts.inv_temp)
                inside = (y >= v0) & (y < v1)
                if bool(inside.any()):
                    r = inside.nonzero().squeeze(1)
                    target_logit[rows.start + r] = z[r, y[r] - v0]
                if topk:
                    best_vals, best_idx = _merge_topk(z, v0, topk, best_vals, best_idx)
                # online logsumexp, consuming the tile in place (torch.logsumexp would allocate a second tile)
                new_max = torch.maximum(run_max, z.amax(dim=1))
                run_sum.mul_(torch.exp(run_max - new_max)).add_(z.sub_(new_max.unsqueeze(1)).exp_().sum(dim=1))
                run_max = new_max
            lse[rows] = run_max + torch.log(run_sum)
            if topk:
                top_vals[rows], top_idx[rows] = best_vals, best_idx
        return Stats(lse, target_logit, top_vals if topk else None, top_idx if topk else None)

    def gather(self, h, weight, idx, opts: HeadOptions) -> torch.Tensor:
        """Logits at given vocabulary ids: (N, K) dot products, in row chunks of bounded size."""
        n, k = idx.shape
        acc = accumulation_dtype(h)
        out = torch.empty(n, k, dtype=acc, device=h.device)
        # the gathered (rows, K, H) weight rows, in fp32, take at most a quarter of the budget
        rows_per_chunk = max(1, opts.budget_bytes // (16 * max(k, 1) * max(h.shape[1], 1)))
        for r0 in range(0, n, rows_per_chunk):
            r1 = min(n, r0 + rows_per_chunk)
            w_rows = weight[idx[r0:r1]].to(acc)  # (rows, K, H), contiguous: bmm needs no further copy
            logits = torch.bmm(w_rows, h[r0:r1].to(acc).unsqueeze(2)).squeeze(2)
            out[r0:r1] = logits.mul_(opts.inv_temp)
        return out

    def full_divergence(self, h_s, w_s, h_t, w_t, lse_s, lse_t, opts: HeadOptions):
        """Exact full-vocabulary divergence, streamed; also (1 − α)·KL(S‖M) for the JSD gradient."""
        n, vocab = h_s.shape[0], w_s.shape[0]
        acc = accumulation_dtype(h_s)
        div = torch.zeros(n, dtype=acc, device=h_s.device)
        partial = torch.zeros_like(div)
        hidden = max(h_s.shape[1], h_t.shape[1])
        for rows, col_ranges in _tiles(n, vocab, hidden, opts.budget_bytes, FULL_TILE_BYTES_PER_ELEMENT):
            for v0, v1 in col_ranges:
                ls, lt = self._log_probs(h_s, w_s, lse_s, h_t, w_t, lse_t, rows, v0, v1, opts.inv_temp)
                d, p = _full_terms(ls, lt, opts.alpha)
                div[rows] += d
                partial[rows] += p
        return div, partial

    @staticmethod
    def _log_probs(h_s, w_s, lse_s, h_t, w_t, lse_t, rows, v0, v1, inv_temp):
        acc = accumulation_dtype(h_s)
        m = h_s[rows].shape[0]
        ls = _logits_into(torch.empty(m, v1 - v0, dtype=acc, device=h_s.device), h_s[rows], w_s[v0:v1], inv_temp)
        lt = _logits_into(torch.empty_like(ls), h_t[rows], w_t[v0:v1], inv_temp)
        return ls.sub_(lse_s[rows].unsqueeze(1)), lt.sub_(lse_t[rows].unsqueeze(1))

    def dense_grad(self, spec: GradSpec, rows: slice, v0: int, v1: int, out: torch.Tensor) -> None:
        """out = −c·p_S (top-K mode), or g_D·G − c·p_S (full vocabulary), for one tile."""
        coef = spec.coef[rows].unsqueeze(1)
        if spec.teacher_h is None:
            acc = accumulation_dtype(spec.h)
            target = out if out.dtype == acc else torch.empty(out.shape, dtype=acc, device=out.device)
            p_s = _logits_into(target, spec.h[rows], spec.weight[v0:v1], spec.inv_temp)
            p_s.sub_(spec.lse[rows].unsqueeze(1)).exp_().mul_(-coef)
            if target is not out:
                out.copy_(target)
            return
        ls, lt = self._log_probs(
            spec.h,
            spec.weight,
            spec.lse,
            spec.teacher_h,
            spec.teacher_weight,
            spec.teacher_lse,
            rows,
            v0,
            v1,
            spec.inv_temp,
        )
        p_s = ls.exp()
        if spec.alpha == 0.0:
            g = lt.exp_().neg_()  # G = −p_T
        elif spec.alpha == 1.0:
            g = (ls - lt).mul_(p_s)  # G = p_S·(ℓ_S − ℓ_T)
        else:
            lm = torch.logaddexp(ls + math.log1p(-spec.alpha), lt + math.log(spec.alpha))
            g = (ls - lm).mul_(p_s).mul_(1 - spec.alpha)  # G = (1 − α)·p_S·(ℓ_S − ℓ_M)
        out.copy_(g.mul_(spec.div_grad[rows].unsqueeze(1)).sub_(p_s.mul_(coef)))


def _full_terms(ls: torch.Tensor, lt: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sums of one tile: (D contribution, (1 − α)·KL(S‖M) contribution)."""
    if alpha == 0.0:
        return (lt.exp() * (lt - ls)).sum(1), torch.zeros(ls.shape[0], dtype=ls.dtype, device=ls.device)
    if alpha == 1.0:
        return (ls.exp() * (ls - lt)).sum(1), torch.zeros(ls.shape[0], dtype=ls.dtype, device=ls.device)
    lm = torch.logaddexp(ls + math.log1p(-alpha), lt + math.log(alpha))
    kl_s = (ls.exp() * (ls - lm)).sum(1)
    kl_t = (lt.exp() * (lt - lm)).sum(1)
    return (1 - alpha) * kl_s + alpha * kl_t, (1 - alpha) * kl_s
