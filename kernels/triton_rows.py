"""Triton row kernels of the SDPO head. They read fp32 logit tiles that cuBLAS wrote; none contains a `tl.dot`.

Every kernel runs one program per (tile row, column split): the tile's columns are cut into `n_splits`
contiguous slices of `cols_per_split` (a multiple of BLOCK), so that few rows still fill the GPU. Per-row state
that lives across tiles is kept per (row, split) in global memory ([N, n_splits] arrays) and merged once per
call by the launcher (kernels/triton_head.py).

`sweep_kernel`     MODE_LSE:    online max and Σ exp(z − max) over every entry above −inf, and the target logit.
                   MODE_TOPK:   the student pass. Entries below the row's threshold τ (a lower bound on its
                                final K-th largest logit) are surely outside the top-K: their exp goes straight
                                into the tail sum. Entries at or above τ (and NaN) are candidates: compacted with an
                                atomic counter into the row's candidate buffer as packed (logit, id) keys.
                                Also writes the maxima of SUB-column blocks, from which the launcher raises τ.
                   MODE_MAXIMA: only the block maxima (a pre-pass over the first tile, so that τ is finite).
`mask_kernel`      the teacher: gathers its logits at the student's K ids (and its target logit) and writes −inf
                   there, so that a MODE_LSE sweep of the tile afterwards sums exactly the teacher's tail.
`grad_kernel`      the backward: dz = −c·p (+ g_D·G_j for the full vocabulary), rounded once to the output dtype,
                   then (after a barrier) the top-K entries and the target's entry *written* over it.
`full_div_kernel`  the exact full-vocabulary divergence from a student and a teacher tile.

Packed keys: the fp32 logit's bits mapped to a signed int that sorts like the float, in the high 32 bits, and
(2³¹ − 1 − id) in the low 32, so a tie prefers the lower vocabulary id and every key is unique.
"""

from __future__ import annotations

import triton
import triton.language as tl

MODE_LSE = tl.constexpr(0)
MODE_TOPK = tl.constexpr(1)
MODE_MAXIMA = tl.constexpr(2)


@triton.jit
def _pack_keys(z, cols):
    """Order-preserving int64 keys of fp32 logits `z` at vocabulary ids `cols` (same shape)."""
    # + 0.0: −0.0 and +0.0 are one logit. Every NaN becomes the positive quiet NaN, whose key sorts above +inf (a
    # NaN made by an invalid operation often has its sign bit set, which would sort it below −inf).
    z = tl.where(z == z, z + 0.0, float("nan"))
    bits = z.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip the magnitude bits
    return (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - cols).to(tl.int64)


@triton.jit
def _program_span(n_cols, cols_per_split):
    """This program's tile row r, its split s, and the split's columns [c0, c1) (grid: rows × column splits)."""
    r = tl.program_id(0)
    s = tl.program_id(1)
    c0 = s * cols_per_split
    return r, s, c0, tl.minimum(c0 + cols_per_split, n_cols)


@triton.jit
def sweep_kernel(
    tile_ptr, stride_t, n_cols, v0, rows0, inv_temp, y_ptr, target_ptr, max_ptr, sum_ptr, n_splits, cols_per_split,
    tau_ptr, bmax_ptr, stride_bm, count_ptr, keys_ptr, cap,
    MODE: tl.constexpr, BLOCK: tl.constexpr, SUB: tl.constexpr, TARGET: tl.constexpr = True,
):
    r, s, c0, c1 = _program_span(n_cols, cols_per_split)
    row = rows0 + r
    base = tile_ptr + r.to(tl.int64) * stride_t
    NB: tl.constexpr = BLOCK // SUB
    grid_offs = tl.arange(0, NB)[:, None] * SUB + tl.arange(0, SUB)[None, :]  # (NB, SUB) in column order
    if MODE != MODE_MAXIMA:
        state = row.to(tl.int64) * n_splits + s
        run_max = tl.load(max_ptr + state)
        run_sum = tl.load(sum_ptr + state)
        if TARGET:
            y_local = tl.load(y_ptr + row) - v0
            if (y_local >= c0) & (y_local < c1):
                tl.store(target_ptr + row, tl.load(base + y_local) * inv_temp)
    if MODE == MODE_TOPK:
        tau = tl.load(tau_ptr + row)
    for b0 in range(c0, c1, BLOCK):
        offs = b0 + grid_offs
        ok = offs < c1
        z = tl.load(base + offs, mask=ok, other=float("-inf")) * inv_temp
        if MODE != MODE_LSE:
            block_max = tl.max(z, axis=1)
            nb = b0 // SUB + tl.arange(0, NB)
            tl.store(bmax_ptr + r.to(tl.int64) * stride_bm + nb, block_max, mask=nb * SUB < c1)
        if MODE != MODE_MAXIMA:
            new_max = tl.maximum(run_max, tl.max(tl.max(z, axis=1), axis=0))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # nothing finite yet: the sum stays 0
            # NaN compares false both ways, so each test is written to keep a NaN logit: the LSE sweep sums it and the
            # top-K sweep makes it a candidate (below). The row's normaliser becomes NaN, as in the naive and torch
            # backends, instead of the NaN being dropped from both the sum and the candidates.
            if MODE == MODE_TOPK:
                summed = ok & (z < tau)
            else:
                summed = ok & (z != float("-inf"))
            terms = tl.where(summed, tl.exp(z - shift), 0.0)
            run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.sum(terms, axis=1), axis=0)
            run_max = new_max
        if MODE == MODE_TOPK:
            cand = ok & ~(z < tau)  # NaN included: its key sorts above +inf, like torch.topk's NaN
            flags = cand.to(tl.int32)
            n_cand = tl.sum(tl.sum(flags, axis=1), axis=0)
            if n_cand > 0:
                start = tl.atomic_add(count_ptr + row, n_cand)  # this block's slots: start … start + n_cand − 1
                per_sub = tl.sum(flags, axis=1)
                before = tl.cumsum(per_sub, axis=0) - per_sub  # candidates in earlier sub-blocks
                pos = start + before[:, None] + tl.cumsum(flags, axis=1) - 1
                keys = _pack_keys(z, v0 + offs)
                tl.store(keys_ptr + row.to(tl.int64) * cap + pos, keys, mask=cand & (pos < cap))
    if MODE != MODE_MAXIMA:
        tl.store(max_ptr + state, run_max)
        tl.store(sum_ptr + state, run_sum)


@triton.jit
def mask_kernel(
    tile_ptr, stride_t, n_cols, v0, rows0, inv_temp, ids_ptr, top_ptr, k, y_ptr, target_ptr, KB: tl.constexpr
):
    r = tl.program_id(0)
    row = (rows0 + r).to(tl.int64)
    ks = tl.arange(0, KB)
    ids = tl.load(ids_ptr + row * k + ks, mask=ks < k, other=-1)
    local = ids - v0
    inside = (ks < k) & (local >= 0) & (local < n_cols)
    base = tile_ptr + r.to(tl.int64) * stride_t
    y_local = tl.load(y_ptr + row) - v0  # the target logit, before it may be masked (the sweep then skips it)
    if (y_local >= 0) & (y_local < n_cols):
        tl.store(target_ptr + row, tl.load(base + y_local) * inv_temp)
    vals = tl.load(base + local, mask=inside, other=0.0)
    tl.store(top_ptr + row * k + ks, vals * inv_temp, mask=inside)
    tl.store(base + local, tl.full((KB,), float("-inf"), tl.float32), mask=inside)


@triton.jit
def _full_grad(ls, lt, alpha, log_one_minus_alpha, log_alpha, ALPHA_MODE: tl.constexpr):
    """G_j of the full-vocabulary divergence: −p_T (α=0), p_S·(ℓ_S − ℓ_T) (α=1), (1 − α)·p_S·(ℓ_S − ℓ_M)."""
    if ALPHA_MODE == 0:
        g = -tl.exp(lt)
    elif ALPHA_MODE == 1:
        g = tl.exp(ls) * (ls - lt)
    else:
        a = ls + log_one_minus_alpha
        b = lt + log_alpha
        m = tl.maximum(a, b)
        g = (1.0 - alpha) * tl.exp(ls) * (ls - (m + tl.log(tl.exp(a - m) + tl.exp(b - m))))
    return g


@triton.jit
def grad_kernel(
    tile_ptr, stride_t, out_ptr, stride_o, teacher_ptr, stride_tt, n_cols, v0, rows0, inv_temp,
    max_ptr, log_sum_ptr, coef_ptr, t_max_ptr, t_log_sum_ptr, gdiv_ptr, alpha, log_one_minus_alpha, log_alpha,
    ids_ptr, vals_ptr, k, y_ptr, y_val_ptr, n_splits, cols_per_split,
    FULL: tl.constexpr, ALPHA_MODE: tl.constexpr, WRITES: tl.constexpr, KB: tl.constexpr, BLOCK: tl.constexpr,
):
    r, _, c0, c1 = _program_span(n_cols, cols_per_split)
    row = (rows0 + r).to(tl.int64)
    base = tile_ptr + r.to(tl.int64) * stride_t
    out = out_ptr + r.to(tl.int64) * stride_o
    m = tl.load(max_ptr + row)
    log_s = tl.load(log_sum_ptr + row)
    coef = tl.load(coef_ptr + row)
    if FULL:
        m_t = tl.load(t_max_ptr + row)
        log_t = tl.load(t_log_sum_ptr + row)
        g_div = tl.load(gdiv_ptr + row)
        t_base = teacher_ptr + r.to(tl.int64) * stride_tt
    for b0 in range(c0, c1, BLOCK):
        offs = b0 + tl.arange(0, BLOCK)
        ok = offs < c1
        ls = (tl.load(base + offs, mask=ok, other=0.0) * inv_temp - m) - log_s  # z − max first: exact near the max
        ls = tl.where(ok, ls, 0.0)  # padding lanes stay finite (they are never stored)
        dz = -coef * tl.exp(ls)
        if FULL:
            lt = (tl.load(t_base + offs, mask=ok, other=0.0) * inv_temp - m_t) - log_t
            lt = tl.where(ok, lt, 0.0)
            dz += g_div * _full_grad(ls, lt, alpha, log_one_minus_alpha, log_alpha, ALPHA_MODE)
        tl.store(out + offs, dz.to(out_ptr.dtype.element_ty), mask=ok)
    tl.debug_barrier()  # the written entries below must land after every dense store of this program
    if WRITES:  # the top-K entries
        ks = tl.arange(0, KB)
        ids = tl.load(ids_ptr + row * k + ks, mask=ks < k, other=-1)
        local = ids - v0
        inside = (ks < k) & (local >= c0) & (local < c1)
        vals = tl.load(vals_ptr + row * k + ks, mask=inside, other=0.0)
        tl.store(out + local, vals.to(out_ptr.dtype.element_ty), mask=inside)
    y_local = tl.load(y_ptr + row) - v0  # a negative id (the launcher's "no write") is never inside
    if (y_local >= c0) & (y_local < c1):
        tl.store(out + y_local, tl.load(y_val_ptr + row).to(out_ptr.dtype.element_ty))


@triton.jit
def full_div_kernel(
    s_ptr, stride_s, t_ptr, stride_tt, n_cols, rows0, inv_temp, s_max_ptr, s_log_sum_ptr, t_max_ptr, t_log_sum_ptr,
    div_ptr, part_ptr, n_splits, cols_per_split, alpha, log_one_minus_alpha, log_alpha,
    ALPHA_MODE: tl.constexpr, BLOCK: tl.constexpr,
):
    r, s, c0, c1 = _program_span(n_cols, cols_per_split)
    row = (rows0 + r).to(tl.int64)
    s_base = s_ptr + r.to(tl.int64) * stride_s
    t_base = t_ptr + r.to(tl.int64) * stride_tt
    m_s = tl.load(s_max_ptr + row)
    log_s = tl.load(s_log_sum_ptr + row)
    m_t = tl.load(t_max_ptr + row)
    log_t = tl.load(t_log_sum_ptr + row)
    div = tl.zeros((BLOCK,), dtype=tl.float32)
    part = tl.zeros((BLOCK,), dtype=tl.float32)
    for b0 in range(c0, c1, BLOCK):
        offs = b0 + tl.arange(0, BLOCK)
        ok = offs < c1
        ls = tl.where(ok, (tl.load(s_base + offs, mask=ok, other=0.0) * inv_temp - m_s) - log_s, 0.0)
        lt = tl.where(ok, (tl.load(t_base + offs, mask=ok, other=0.0) * inv_temp - m_t) - log_t, 0.0)
        if ALPHA_MODE == 0:  # forward KL(T ‖ S)
            d = tl.exp(lt) * (lt - ls)
            g = tl.zeros_like(d)
        elif ALPHA_MODE == 1:  # reverse KL(S ‖ T)
            d = tl.exp(ls) * (ls - lt)
            g = tl.zeros_like(d)
        else:  # generalised JSD with mixture (1 − α)·S + α·T
            a = ls + log_one_minus_alpha
            b = lt + log_alpha
            mm = tl.maximum(a, b)
            lm = mm + tl.log(tl.exp(a - mm) + tl.exp(b - mm))
            kl_s = tl.exp(ls) * (ls - lm)
            d = (1.0 - alpha) * kl_s + alpha * tl.exp(lt) * (lt - lm)
            g = (1.0 - alpha) * kl_s
        div += tl.where(ok, d, 0.0)
        part += tl.where(ok, g, 0.0)
    state = row * n_splits + s
    tl.store(div_ptr + state, tl.load(div_ptr + state) + tl.sum(div, axis=0))
    tl.store(part_ptr + state, tl.load(part_ptr + state) + tl.sum(part, axis=0))
