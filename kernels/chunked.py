"""The chunked PyTorch backend: tile operations in plain PyTorch, bounded by a scratch budget. The CPU path.

Each tile is `rows × cols` of fp32 logits computed as h[rows] @ W[cols]ᵀ; statistics stream across
vocabulary tiles, so neither the logits nor any other (N, V) tensor ever exists. Per tile the student pass
runs one `torch.topk(K + 1)`, which gives the tile's max, its K candidates and a tie check at once; the
candidates merge into the running top-K as packed (logit, id) keys, and every entry that is not (or no longer)
in the running top-K goes straight into the tail sum. Nothing waits for the host inside the loops: at most one
check per call (`_ties`), after them.
"""

from __future__ import annotations

import math

import torch

from .function import (
    GradSpec,
    HeadOptions,
    Stats,
    TileOps,
    accumulation_dtype,
    finish_normaliser,
    full_divergence_grad_at,
    logits_into,
    plan_tiles,
)

# Scratch per tile element: the fp32 logits tile itself (reused in place) and `torch.topk`'s working
# memory; every other temporary is per row or bounded separately. Checked by tests/test_head_memory.py.
TILE_BYTES_PER_ELEMENT = 8
FULL_TILE_BYTES_PER_ELEMENT = 24  # full-vocabulary tiles also hold teacher logits and the mixture
EXACT_TILE_BYTES_PER_ELEMENT = 40  # the exact top-K redo also holds int64 keys of the tile and their temporaries
_INT32_MAX = 0x7FFFFFFF


def pack_keys(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Order-preserving int64 keys: the fp32 logit's bits (sortable) high, 2³¹ − 1 − id low.

    Larger logit first, and on a tie the lower vocabulary id; every key is unique. (+0.0 is added first so that
    −0.0 and +0.0, equal logits, tie on the id like any other pair.)
    """
    bits = (values.float() + 0.0).view(torch.int32).long()
    ordered = bits ^ ((bits >> 31) & _INT32_MAX)
    return (ordered << 32) | (_INT32_MAX - ids)


def decode_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `pack_keys`: int64 keys → (fp32 logits, int64 vocabulary ids)."""
    high = keys >> 32
    bits = (high ^ ((high >> 31) & _INT32_MAX)).to(torch.int32)
    return bits.view(torch.float32), _INT32_MAX - (keys & 0xFFFFFFFF)


def _tiles(n: int, vocab: int, hidden: int, budget: int, bytes_per_element: int):
    rows, cols = plan_tiles(n, vocab, hidden, budget, bytes_per_element)
    for r0 in range(0, n, rows):
        yield slice(r0, min(n, r0 + rows)), [(v0, min(vocab, v0 + cols)) for v0 in range(0, vocab, cols)]


def _scratch(n: int, vocab: int, hidden: int, budget: int, bytes_per_element: int, dtype, device) -> torch.Tensor:
    """A flat tile buffer plus one spare element at the end: the target of masked-out scatter writes."""
    rows, cols = plan_tiles(n, vocab, hidden, budget, bytes_per_element)
    return torch.empty(rows * cols + 1, dtype=dtype, device=device)


def _flat(scratch: torch.Tensor, idx: torch.Tensor, v0: int, v1: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat positions in a (rows, cols) tile of the ids idx (rows, k) inside [v0, v1), else the spare element.

    Lets a gather or scatter at data-dependent ids run without a host synchronisation (no boolean indexing).
    """
    inside = (idx >= v0) & (idx < v1)
    rows = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1) * cols
    return torch.where(inside, rows + (idx - v0), scratch.numel() - 1), inside


class TorchTiles(TileOps):
    """Tile operations for `SDPOHeadFunction` in plain PyTorch (any device)."""

    name = "torch"
    tile_bytes_per_element = TILE_BYTES_PER_ELEMENT

    # ------------------------------------------------------------------ forward

    def student_stats(self, h, weight, targets, opts: HeadOptions) -> Stats:
        if not opts.topk:
            return self._sweep(h, weight, targets, opts, None)
        stats, ties = self._topk_sweep(h, weight, targets, opts, exact=False)
        # One host check per call. A tie at a tile's K-th value may have been broken against the lower id by
        # torch.topk, which leaves tie order unspecified: redo just those rows on exact keys.
        if bool(ties.any()):
            rows = ties.nonzero().squeeze(1)
            redo, _ = self._topk_sweep(h[rows], weight, targets[rows], opts, exact=True)
            for full, part in zip(stats, redo):
                full[rows] = part
        return stats

    def teacher_stats(self, h, weight, targets, opts: HeadOptions, top_idx) -> Stats:
        return self._sweep(h, weight, targets, opts, top_idx)

    def _sweep(self, h, weight, targets, opts: HeadOptions, top_idx) -> Stats:
        """Online logsumexp (and target logit). With `top_idx`: the logits there, and the sum without them."""
        n, vocab, hidden = h.shape[0], weight.shape[0], h.shape[1]
        acc = accumulation_dtype(h)
        run_max = torch.full((n,), -math.inf, dtype=acc, device=h.device)
        run_sum = torch.zeros(n, dtype=acc, device=h.device)
        target = torch.zeros(n, dtype=acc, device=h.device)
        top = None if top_idx is None else torch.zeros(top_idx.shape, dtype=acc, device=h.device)
        scratch = _scratch(n, vocab, hidden, opts.budget_bytes, TILE_BYTES_PER_ELEMENT, acc, h.device)
        for rows, col_ranges in _tiles(n, vocab, hidden, opts.budget_bytes, TILE_BYTES_PER_ELEMENT):
            m = rows.stop - rows.start
            for v0, v1 in col_ranges:
                z = logits_into(scratch[: m * (v1 - v0)].view(m, v1 - v0), h[rows], weight[v0:v1], opts.inv_temp)
                self._gather_target(scratch, targets[rows], v0, v1, target[rows])
                if top is not None:  # take out the student's ids: the rest of the tile is the teacher's tail
                    flat, inside = _flat(scratch, top_idx[rows], v0, v1, v1 - v0)
                    top[rows] = torch.where(inside, scratch[flat], top[rows])
                    scratch[flat] = -math.inf
                # (the max of what is left; `finish_normaliser` raises it to cover the taken-out logits)
                new_max = torch.maximum(run_max[rows], z.amax(dim=1))
                shift = torch.where(new_max == -math.inf, 0.0, new_max)  # every entry so far taken out: sum 0
                tile_sum = z.sub_(shift.unsqueeze(1)).exp_().sum(dim=1)  # in place: no second tile
                run_sum[rows] = run_sum[rows] * torch.exp(run_max[rows] - shift) + tile_sum
                run_max[rows] = new_max
        if top is None:
            return Stats(run_max, torch.log(run_sum), target)
        run_max, log_sum, log_tail = finish_normaliser(run_max, run_sum, top)
        return Stats(run_max, log_sum, target, top, top_idx, log_tail)

    @staticmethod
    def _gather_target(scratch, y, v0, v1, out):
        flat, inside = _flat(scratch, y.unsqueeze(1), v0, v1, v1 - v0)
        out.copy_(torch.where(inside.squeeze(1), scratch[flat.squeeze(1)], out))

    def _topk_sweep(self, h, weight, targets, opts: HeadOptions, exact: bool) -> tuple[Stats, torch.Tensor]:
        """The student pass with its running top-K and directly summed tail; returns (stats, tie rows).

        exact=False: each tile's candidates come from `torch.topk(z, K + 1)` on the logits; a tile whose K-th and
        (K+1)-th logits tie is flagged (torch.topk may have kept the higher id) when that value can still reach
        the top-K. exact=True: from packed keys of the whole tile (an int64 copy of it), which order ties.
        """
        n, vocab, hidden, k = h.shape[0], weight.shape[0], h.shape[1], opts.topk
        acc = accumulation_dtype(h)
        dev = h.device
        run_max = torch.full((n,), -math.inf, dtype=acc, device=dev)
        tail = torch.zeros(n, dtype=acc, device=dev)
        target = torch.zeros(n, dtype=acc, device=dev)
        best_keys = torch.empty(n, k, dtype=torch.int64, device=dev)
        best_vals = torch.empty(n, k, dtype=acc, device=dev)
        ties = torch.zeros(n, dtype=torch.bool, device=dev)
        per_element = EXACT_TILE_BYTES_PER_ELEMENT if exact else TILE_BYTES_PER_ELEMENT
        scratch = _scratch(n, vocab, hidden, opts.budget_bytes, per_element, acc, dev)
        for rows, col_ranges in _tiles(n, vocab, hidden, opts.budget_bytes, per_element):
            m = rows.stop - rows.start
            keys = vals = None  # the running top-K of these rows, as keys (sorted descending) and values
            r_max = torch.full((m,), -math.inf, dtype=acc, device=dev)
            r_tail = torch.zeros(m, dtype=acc, device=dev)
            r_ties = torch.zeros(m, dtype=torch.bool, device=dev)
            for v0, v1 in col_ranges:
                width = v1 - v0
                z = logits_into(scratch[: m * width].view(m, width), h[rows], weight[v0:v1], opts.inv_temp)
                self._gather_target(scratch, targets[rows], v0, v1, target[rows])
                take = min(k, width)
                if exact:
                    ids = torch.arange(v0, v1, device=dev)
                    cand_keys = torch.topk(pack_keys(z, ids), take, dim=1).values
                    cand_vals, cand_ids = decode_keys(cand_keys)
                    cand_vals = cand_vals.to(acc)
                    local = cand_ids - v0
                else:
                    tv, ti = torch.topk(z, min(k + 1, width), dim=1)
                    cand_vals, local = tv[:, :take], ti[:, :take]
                    cand_ids = local + v0
                    cand_keys = pack_keys(cand_vals, cand_ids)
                    tile_tie = tv[:, take - 1] == tv[:, take] if width > k else None
                new_max = torch.maximum(r_max, cand_vals[:, 0])
                scale = torch.exp(r_max - new_max)
                # the tile's entries outside its K candidates are tail: sum them in place, candidates zeroed
                z.sub_(new_max.unsqueeze(1)).exp_().scatter_(1, local, 0.0)
                r_tail = r_tail * scale + z.sum(dim=1)
                if keys is None:
                    pool_keys, pool_vals = cand_keys, cand_vals
                else:
                    pool_keys, pool_vals = torch.cat([keys, cand_keys], 1), torch.cat([vals, cand_vals], 1)
                keep = min(k, pool_keys.shape[1])
                keys, pos = torch.topk(pool_keys, keep, dim=1)
                if keep < pool_keys.shape[1]:  # the candidates (old or new) that lost go to the tail
                    lost = torch.ones_like(pool_keys, dtype=torch.bool).scatter_(1, pos, False)
                    r_tail = r_tail + torch.where(lost, torch.exp(pool_vals - new_max.unsqueeze(1)), 0.0).sum(dim=1)
                vals = pool_vals.gather(1, pos)
                if not exact and tile_tie is not None and keep == k:
                    r_ties |= tile_tie & (cand_vals[:, -1] >= vals[:, -1])
                r_max = new_max
            run_max[rows], tail[rows], ties[rows] = r_max, r_tail, r_ties
            best_keys[rows], best_vals[rows] = keys, vals
        top_idx = decode_keys(best_keys)[1]
        run_max, log_sum, log_tail = finish_normaliser(run_max, tail, best_vals)
        return Stats(run_max, log_sum, target, best_vals, top_idx, log_tail), ties

    def full_divergence(self, h_s, w_s, h_t, w_t, student: Stats, teacher: Stats, opts: HeadOptions):
        """Exact full-vocabulary divergence, streamed; also (1 − α)·KL(S‖M) for the JSD gradient."""
        n, vocab = h_s.shape[0], w_s.shape[0]
        acc = accumulation_dtype(h_s)
        div = torch.zeros(n, dtype=acc, device=h_s.device)
        partial = torch.zeros_like(div)
        hidden = max(h_s.shape[1], h_t.shape[1])
        for rows, col_ranges in _tiles(n, vocab, hidden, opts.budget_bytes, FULL_TILE_BYTES_PER_ELEMENT):
            for v0, v1 in col_ranges:
                ls = self._log_probs(h_s, w_s, student, rows, v0, v1, opts.inv_temp)
                lt = self._log_probs(h_t, w_t, teacher, rows, v0, v1, opts.inv_temp)
                d, p = _full_terms(ls, lt, opts.alpha)
                div[rows] += d
                partial[rows] += p
        return div, partial

    @staticmethod
    def _log_probs(h, w, stats: Stats, rows, v0, v1, inv_temp, out=None):
        """(z − max) − log_sum for one tile: two subtractions, never one of (max + log_sum)."""
        acc = accumulation_dtype(h)
        m = rows.stop - rows.start
        out = torch.empty(m, v1 - v0, dtype=acc, device=h.device) if out is None else out
        z = logits_into(out, h[rows], w[v0:v1], inv_temp)
        return z.sub_(stats.max[rows].unsqueeze(1)).sub_(stats.log_sum[rows].unsqueeze(1))

    # ------------------------------------------------------------------ backward

    def grad_tile(self, spec: GradSpec, rows: slice, v0: int, v1: int, scratch: torch.Tensor) -> torch.Tensor:
        """dz of one tile: −c·p_S (+ g_D·G in full-vocabulary mode), then the written entries; in the GEMM dtype."""
        acc = accumulation_dtype(spec.h)
        m, width = rows.stop - rows.start, v1 - v0
        flat = scratch[: (m * width + 1) * torch.finfo(acc).bits // 8].view(acc)
        tile = flat[: m * width].view(m, width)
        coef = spec.coef[rows].unsqueeze(1)
        if spec.teacher_h is None:
            # p = exp(z − max)/s: the 1/s folds into the coefficient, so z − max is the only subtraction
            logits_into(tile, spec.h[rows], spec.weight[v0:v1], spec.inv_temp)
            scale = -coef * torch.exp(-spec.log_sum[rows].unsqueeze(1))
            tile.sub_(spec.max[rows].unsqueeze(1)).exp_().mul_(scale)
        else:
            student = Stats(spec.max, spec.log_sum, spec.targets)
            teacher = Stats(spec.teacher_max, spec.teacher_log_sum, spec.targets)
            ls = self._log_probs(spec.h, spec.weight, student, rows, v0, v1, spec.inv_temp, out=tile)
            lt = self._log_probs(spec.teacher_h, spec.teacher_weight, teacher, rows, v0, v1, spec.inv_temp)
            g = full_divergence_grad_at(ls, lt, spec.alpha)
            tile.copy_(g.mul_(spec.div_grad[rows].unsqueeze(1)).sub_(ls.exp_().mul_(coef)))
        if spec.write_idx is not None:
            where, _ = _flat(flat, spec.write_idx[rows], v0, v1, width)
            flat[where] = spec.write_val[rows].to(acc)
        where, inside = _flat(flat, spec.targets[rows].unsqueeze(1), v0, v1, width)
        write = inside.squeeze(1) & spec.target_write[rows]
        flat[torch.where(write, where.squeeze(1), flat.numel() - 1)] = spec.target_val[rows].to(acc)
        if spec.h.is_cuda and spec.weight.dtype in (torch.bfloat16, torch.float16):
            return tile.to(spec.weight.dtype)  # rounded once, for the tensor-core GEMMs
        return tile


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
