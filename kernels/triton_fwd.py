"""Forward Triton kernels of the SDPO head. Logits only ever exist as one (BLOCK_M, BLOCK_V) tile.

`stream_stats_kernel`  grid (row blocks, vocabulary splits). Each program streams its vocabulary slice
                       in BLOCK_V tiles of h @ Wᵀ (tl.dot, fp32 accumulation) and keeps, per row, an
                       online max / sum-exp (for the logsumexp), the target token's logit and, for the
                       student, a running top-KP of packed (logit, id) keys merged tile by tile.
`gather_logits_kernel` grid (rows, K blocks): the teacher's logits at the student's top-K ids.
`full_divergence_kernel` grid (row blocks, splits): the exact full-vocabulary KL/JSD, second pass.

The running top-K packs each fp32 logit into an order-preserving int64 key: the float's bits mapped
to a signed int that sorts like the float, in the high 32 bits, and (2³¹ − 1 − id) in the low 32
bits, so a tie prefers the lower vocabulary id and every key is unique. A tile only does top-K work
for keys that beat a row's current K-th key (none, once the top-K has settled): see
`_insert_candidates`.
"""

from __future__ import annotations

import triton
import triton.language as tl

INT64_MIN = tl.constexpr(-9223372036854775807 - 1)
INT64_MAX = tl.constexpr(9223372036854775807)


@triton.jit
def _pack_keys(z, cols):
    """Order-preserving int64 keys of fp32 logits `z` (BLOCK_M, BLOCK_V) at vocabulary ids `cols`."""
    bits = z.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip the magnitude bits
    low = (0x7FFFFFFF - cols).to(tl.int64)
    return (ordered.to(tl.int64) << 32) | low[None, :]


@triton.jit
def _insert_candidates(best, keys, col_ok, KP: tl.constexpr):
    """Merge one tile's keys into each row's running top-KP set, without sorting anything.

    Only keys above the row's current KP-th best (the set's minimum) are candidates; they are
    inserted largest first, each replacing the minimum, until no candidate beats the new minimum.
    Once the top-K has settled (a few tiles into the vocabulary for real language models) almost
    no tile has a candidate, so this costs O(insertions · (BLOCK_V + KP)) per row: negligible next
    to the tile's matmul, and it compiles to a few hundred instructions instead of a sort network.
    """
    slots = tl.arange(0, KP)
    threshold = tl.min(best, axis=1)  # the K-th largest key so far (padding slots hold +∞)
    cand = tl.where(col_ok[None, :] & (keys > threshold[:, None]), keys, INT64_MIN)
    top = tl.max(cand, axis=1)
    while tl.max((top > threshold).to(tl.int32), axis=0) > 0:
        take = top > threshold
        # the first slot holding the minimum (the initial sentinels repeat; real keys are unique)
        slot = tl.min(tl.where(best == threshold[:, None], slots[None, :], KP), axis=1)
        best = tl.where(take[:, None] & (slots[None, :] == slot[:, None]), top[:, None], best)
        threshold = tl.min(best, axis=1)
        cand = tl.where((cand == top[:, None]) | (cand <= threshold[:, None]), INT64_MIN, cand)
        top = tl.max(cand, axis=1)
    return best


@triton.jit
def _logit_tile(
    h_ptr, w_ptr, rows, cols, row_ok, col_ok, hidden, stride_hn, stride_hk, stride_wv, stride_wk,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr
):
    """(BLOCK_M, BLOCK_V) = h[rows] @ W[cols]ᵀ with fp32 accumulation over the hidden dimension."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    # 64-bit offsets: V·H reaches 2³¹ for large models (and twice that for a trust-region teacher's [W_ref, W_live])
    rows = rows.to(tl.int64)
    cols = cols.to(tl.int64)
    for h0 in range(0, hidden, BLOCK_H):
        hk = h0 + tl.arange(0, BLOCK_H)
        hk_ok = hk < hidden
        a = tl.load(
            h_ptr + rows[:, None] * stride_hn + hk[None, :] * stride_hk, mask=row_ok[:, None] & hk_ok[None, :],
            other=0.0
        )
        b = tl.load(
            w_ptr + cols[:, None] * stride_wv + hk[None, :] * stride_wk, mask=col_ok[:, None] & hk_ok[None, :],
            other=0.0
        )
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return acc


@triton.jit
def stream_stats_kernel(
    h_ptr, w_ptr, y_ptr, max_ptr, sum_ptr, target_ptr, keys_ptr, n_rows, vocab, hidden, cols_per_split, n_splits,
    stride_hn, stride_hk, stride_wv, stride_wk,
    inv_temp, n_bucket,  # n_bucket: the power-of-two row count, only an autotuning key
    k_real,  # K ≤ KP: the KP − K padding slots hold +∞ keys, so the set's minimum is the K-th largest key so far
    KP: tl.constexpr, DO_TOPK: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
    v_start = pid_s * cols_per_split
    v_end = tl.minimum(v_start + cols_per_split, vocab)

    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    target = tl.zeros((BLOCK_M,), dtype=tl.float32)
    # An unordered set of the K largest keys so far. Pinning the padding slots at +∞ (never the minimum, never
    # replaced) makes the insertion threshold the K-th largest key rather than the KP-th: fewer insertions.
    slots = tl.arange(0, KP)
    best = tl.where(slots[None, :] < k_real, INT64_MIN, INT64_MAX) + tl.zeros((BLOCK_M, KP), dtype=tl.int64)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        z = _logit_tile(
            h_ptr, w_ptr, rows, cols, row_ok, col_ok, hidden, stride_hn, stride_hk, stride_wv, stride_wk, BLOCK_M,
            BLOCK_V, BLOCK_H, PRECISION
        )
        z = tl.where(col_ok[None, :], z * inv_temp, float("-inf"))
        target += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_max = new_max
        if DO_TOPK:
            best = _insert_candidates(best, _pack_keys(z, cols), col_ok, KP)

    out = rows * n_splits + pid_s
    tl.store(max_ptr + out, run_max, mask=row_ok)
    tl.store(sum_ptr + out, run_sum, mask=row_ok)
    tl.store(target_ptr + rows, target, mask=row_ok & (y >= v_start) & (y < v_end))
    if DO_TOPK:
        padded = tl.where(slots[None, :] < k_real, best, INT64_MIN)  # padding never reaches the merge
        tl.store(keys_ptr + out.to(tl.int64)[:, None] * KP + slots[None, :], padded, mask=row_ok[:, None])


@triton.jit
def gather_logits_kernel(
    h_ptr, w_ptr, idx_ptr, out_ptr, hidden, k, stride_hn, stride_hk, stride_wv, stride_wk, inv_temp,
    BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr
):
    row = tl.program_id(0)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < k
    ids = tl.load(idx_ptr + row * k + ks, mask=k_ok, other=0)
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for h0 in range(0, hidden, BLOCK_H):
        hk = h0 + tl.arange(0, BLOCK_H)
        hk_ok = hk < hidden
        h = tl.load(h_ptr + row.to(tl.int64) * stride_hn + hk * stride_hk, mask=hk_ok, other=0.0).to(tl.float32)
        w = tl.load(
            w_ptr + ids[:, None] * stride_wv + hk[None, :] * stride_wk, mask=k_ok[:, None] & hk_ok[None, :],
            other=0.0
        )
        acc += tl.sum(w.to(tl.float32) * h[None, :], axis=1)
    tl.store(out_ptr + row * k + ks, acc * inv_temp, mask=k_ok)


@triton.jit
def _full_terms(ls, lt, col_ok, alpha, log_one_minus_alpha, log_alpha, ALPHA_MODE: tl.constexpr):
    """Per-row sums over one tile: D and (1 − α)·KL(S‖M) (the JSD gradient's Σ G), zero on padding."""
    if ALPHA_MODE == 0:  # forward KL(T ‖ S)
        d = tl.exp(lt) * (lt - ls)
        g = tl.zeros_like(d)
    elif ALPHA_MODE == 1:  # reverse KL(S ‖ T)
        d = tl.exp(ls) * (ls - lt)
        g = tl.zeros_like(d)
    else:  # generalised JSD with mixture (1 − α)·S + α·T
        a = ls + log_one_minus_alpha
        b = lt + log_alpha
        m = tl.maximum(a, b)
        lm = m + tl.log(tl.exp(a - m) + tl.exp(b - m))
        kl_s = tl.exp(ls) * (ls - lm)
        kl_t = tl.exp(lt) * (lt - lm)
        d = (1.0 - alpha) * kl_s + alpha * kl_t
        g = (1.0 - alpha) * kl_s
    d = tl.where(col_ok[None, :], d, 0.0)
    g = tl.where(col_ok[None, :], g, 0.0)
    return tl.sum(d, axis=1), tl.sum(g, axis=1)


@triton.jit
def full_divergence_kernel(
    hs_ptr, ws_ptr, ht_ptr, wt_ptr, lse_s_ptr, lse_t_ptr, div_ptr, part_ptr, n_rows, vocab, hidden_s, hidden_t,
    cols_per_split, n_splits, stride_hsn, stride_hsk, stride_wsv, stride_wsk, stride_htn, stride_htk, stride_wtv,
    stride_wtk, inv_temp, alpha, log_one_minus_alpha, log_alpha, n_bucket, ALPHA_MODE: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    lse_s = tl.load(lse_s_ptr + rows, mask=row_ok, other=0.0)
    lse_t = tl.load(lse_t_ptr + rows, mask=row_ok, other=0.0)
    v_start = pid_s * cols_per_split
    v_end = tl.minimum(v_start + cols_per_split, vocab)
    div = tl.zeros((BLOCK_M,), dtype=tl.float32)
    part = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        zs = _logit_tile(
            hs_ptr, ws_ptr, rows, cols, row_ok, col_ok, hidden_s, stride_hsn, stride_hsk, stride_wsv, stride_wsk,
            BLOCK_M, BLOCK_V, BLOCK_H, PRECISION
        )
        zt = _logit_tile(
            ht_ptr, wt_ptr, rows, cols, row_ok, col_ok, hidden_t, stride_htn, stride_htk, stride_wtv, stride_wtk,
            BLOCK_M, BLOCK_V, BLOCK_H, PRECISION
        )
        ls = tl.where(col_ok[None, :], zs * inv_temp - lse_s[:, None], 0.0)
        lt = tl.where(col_ok[None, :], zt * inv_temp - lse_t[:, None], 0.0)
        d, g = _full_terms(ls, lt, col_ok, alpha, log_one_minus_alpha, log_alpha, ALPHA_MODE)
        div += d
        part += g
    out = rows * n_splits + pid_s
    tl.store(div_ptr + out, div, mask=row_ok)
    tl.store(part_ptr + out, part, mask=row_ok)
