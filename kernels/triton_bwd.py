"""Backward Triton kernel of the SDPO head: one dense gradient tile of ∂loss/∂z, recomputed.

For the top-K head the dense part of ∂loss/∂z_j is −c·p_j with p = softmax(z) and c = g_D·ΣG + g_logp;
the K scattered entries (and the target's g_logp) are added by the caller, which then runs the two
GEMMs dh += dz·W and dW += dzᵀ·h with cuBLAS on the (rows × chunk) tile. The full-vocabulary head
adds g_D·G_j, where G needs the teacher's logits too, so the tile recomputes both.
Grid: (row blocks of the chunk, vocabulary blocks of the chunk).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_fwd import _logit_tile


@triton.jit
def dense_grad_kernel(
    hs_ptr, ws_ptr, lse_s_ptr, coef_ptr, out_ptr, ht_ptr, wt_ptr, lse_t_ptr, gdiv_ptr, n_rows, v0, chunk_cols, vocab,
    hidden_s, hidden_t, stride_hsn, stride_hsk, stride_wsv, stride_wsk, stride_htn, stride_htk, stride_wtv,
    stride_wtk, stride_on, inv_temp, alpha, log_one_minus_alpha, log_alpha, n_bucket, FULL: tl.constexpr,
    ALPHA_MODE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr
):
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = v0 + local
    col_ok = (local < chunk_cols) & (cols < vocab)
    zs = _logit_tile(
        hs_ptr, ws_ptr, rows, cols, row_ok, col_ok, hidden_s, stride_hsn, stride_hsk, stride_wsv, stride_wsk,
        BLOCK_M, BLOCK_V, BLOCK_H, PRECISION
    )
    ls = zs * inv_temp - tl.load(lse_s_ptr + rows, mask=row_ok, other=0.0)[:, None]
    p_s = tl.exp(ls)
    grad = -tl.load(coef_ptr + rows, mask=row_ok, other=0.0)[:, None] * p_s
    if FULL:
        zt = _logit_tile(
            ht_ptr, wt_ptr, rows, cols, row_ok, col_ok, hidden_t, stride_htn, stride_htk, stride_wtv, stride_wtk,
            BLOCK_M, BLOCK_V, BLOCK_H, PRECISION
        )
        lt = zt * inv_temp - tl.load(lse_t_ptr + rows, mask=row_ok, other=0.0)[:, None]
        if ALPHA_MODE == 0:  # G = −p_T
            g = -tl.exp(lt)
        elif ALPHA_MODE == 1:  # G = p_S·(ℓ_S − ℓ_T)
            g = p_s * (ls - lt)
        else:  # G = (1 − α)·p_S·(ℓ_S − ℓ_M)
            a = ls + log_one_minus_alpha
            b = lt + log_alpha
            m = tl.maximum(a, b)
            g = (1.0 - alpha) * p_s * (ls - (m + tl.log(tl.exp(a - m) + tl.exp(b - m))))
        grad += tl.load(gdiv_ptr + rows, mask=row_ok, other=0.0)[:, None] * g
    ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_on + local[None, :]
    tl.store(ptrs, grad.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


__all__ = ["dense_grad_kernel"]
