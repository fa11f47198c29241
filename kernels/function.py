"""The SDPO head as one `torch.autograd.Function`, shared by the chunked PyTorch and Triton backends.

A backend supplies *tile operations* (see `TileOps`): streaming statistics over the vocabulary in
the forward pass and one dense gradient tile in the backward pass. Everything else lives here:

forward   student stats (LSE, target logit, top-K)  ─┐
          teacher stats (LSE, target logit, logits   ├─► epilogue on (N, K): buckets + divergence
                         gathered at student top-K) ─┘    and ∂D/∂ℓ_k (tiny, float64, autograd)
backward  for each vocabulary chunk × row chunk:
              dz = dense tile (−c·p, plus the full-vocabulary term)  + sparse entries (K + target)
              dh += dz·W_chunk        dW_chunk += dzᵀ·h       (fp32 accumulation)

∂D/∂z_j = Σ_k G_k·(δ_{j,I_k} − p_j) = G_{k(j)}·[j ∈ I] − (Σ_k G_k)·p_j: a cross-entropy-shaped
gradient with K scattered entries, so no (N, V) buffer is ever needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from sdpo_fast.loss import topk_divergence


@dataclass(frozen=True)
class HeadOptions:
    topk: int | None
    add_tail: bool
    alpha: float
    inv_temp: float
    budget_bytes: int


class Stats(NamedTuple):
    """Per-row results of one streaming pass over the vocabulary (all fp32 unless noted)."""

    lse: torch.Tensor  # (N,) logsumexp of the scaled logits
    target_logit: torch.Tensor  # (N,) scaled logit of the sampled token
    top_logits: torch.Tensor | None = None  # (N, K) student top-K logits, or teacher logits at those ids
    top_idx: torch.Tensor | None = None  # (N, K) int64 vocabulary ids (student pass only)


@dataclass
class GradSpec:
    """What a dense gradient tile needs. `coef` is c = g_D·ΣG + g_logp (already × 1/T)."""

    h: torch.Tensor
    weight: torch.Tensor
    lse: torch.Tensor
    coef: torch.Tensor
    inv_temp: float
    # full-vocabulary mode only
    teacher_h: torch.Tensor | None = None
    teacher_weight: torch.Tensor | None = None
    teacher_lse: torch.Tensor | None = None
    div_grad: torch.Tensor | None = None  # g_D (already × 1/T)
    alpha: float = 0.5


class TileOps:
    """What a backend implements: streaming passes over the vocabulary and one dense gradient tile.

    `student_stats` / `teacher_stats` are shared; a backend provides `_stream` (LSE, target logit and,
    when `topk` is set, the running top-K), `gather`, `full_divergence` and `dense_grad`.
    """

    name: str
    tile_bytes_per_element: int

    def student_stats(self, h, weight, targets, opts: HeadOptions) -> Stats:
        return self._stream(h, weight, targets, opts, opts.topk)

    def teacher_stats(self, h, weight, targets, opts: HeadOptions, top_idx) -> Stats:
        """The teacher's LSE and target logit, plus its logits at the *student's* top-K ids."""
        stats = self._stream(h, weight, targets, opts, None)
        if top_idx is None:
            return stats
        return stats._replace(top_logits=self.gather(h, weight, top_idx, opts))

    def _stream(self, h, weight, targets, opts: HeadOptions, topk: int | None) -> Stats:
        raise NotImplementedError

    def gather(self, h, weight, idx, opts: HeadOptions) -> torch.Tensor:
        raise NotImplementedError

    def full_divergence(self, h_s, w_s, h_t, w_t, lse_s, lse_t, opts: HeadOptions) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def dense_grad(self, spec: GradSpec, rows: slice, v0: int, v1: int, out: torch.Tensor) -> None:
        raise NotImplementedError


def bucket_divergence_and_grad(
    student_topk: torch.Tensor, teacher_topk: torch.Tensor, opts: HeadOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """D over K(+1) buckets and G = ∂D/∂ℓ^S_k (through the tail too), from (N, K) log-probs.

    Runs the reference-faithful bucket maths of `sdpo_fast.loss` in float64 under autograd: the
    tensors are tiny, and float64 removes the cancellation in log(1 − top-K mass).
    """
    out_dtype = student_topk.dtype
    work = epilogue_dtype(student_topk.device)
    s = student_topk.detach().to(work).requires_grad_(True)
    t = teacher_topk.detach().to(work)
    with torch.enable_grad():
        div = topk_divergence(s, t, alpha=opts.alpha, add_tail=opts.add_tail)
        (grad,) = torch.autograd.grad(div.sum(), s)
    return div.detach().to(out_dtype), grad.to(out_dtype)


def full_divergence_grad_sum(div: torch.Tensor, partial: torch.Tensor, alpha: float) -> torch.Tensor:
    """Σ_v G_v for the full-vocabulary gradient dz = g_D·(G − (Σ G)·p_s); see `dense_grad` of a backend."""
    if alpha == 0.0:
        return torch.full_like(div, -1.0)  # G = −p_T
    if alpha == 1.0:
        return div  # G = p_S·(ℓ_S − ℓ_T), Σ G = D
    return partial  # G = (1 − α)·p_S·(ℓ_S − ℓ_M), Σ G = (1 − α)·KL(S ‖ M), from the forward pass


def plan_tiles(n_rows: int, vocab: int, hidden: int, budget_bytes: int, bytes_per_element: int) -> tuple[int, int]:
    """Rows × vocabulary columns per tile so that the tile scratch stays within the budget."""
    elements = max(budget_bytes // bytes_per_element, 128 * 16)
    # The fp32 copy of a weight chunk (CPU, low-precision inputs) must fit too: at most a quarter.
    max_cols_for_weight = max(128, budget_bytes // (4 * 4 * max(hidden, 1)))
    cols = min(vocab, max_cols_for_weight, max(128, elements // max(min(n_rows, 2048), 1)))
    if cols < vocab:
        cols = max(128, cols // 128 * 128)
    rows = max(1, min(n_rows, elements // cols))
    return rows, cols


def epilogue_dtype(device: torch.device) -> torch.dtype:
    """float64 for the tiny (N, K) bucket maths, except where the device has none (Apple MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs (exactness tests), float32 for everything else."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _gemm_operand(x: torch.Tensor) -> torch.Tensor:
    """The native half dtype on CUDA, where `out_dtype=float32` keeps accumulation in fp32; else fp32/fp64."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        return x
    return x.to(accumulation_dtype(x))


def _accumulate_mm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """out (+)= a @ b with fp32 accumulation, in place: the first product overwrites, later ones add."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        product = torch.mm(a, b, out_dtype=torch.float32)
        out.copy_(product) if first else out.add_(product)
    elif first:
        torch.mm(a, b, out=out)
    else:
        out.addmm_(a, b)


def _add_sparse(tile: torch.Tensor, values: torch.Tensor, idx: torch.Tensor, v0: int, v1: int) -> None:
    """tile[r, idx[r, s] − v0] += values[r, s] for the entries inside [v0, v1); duplicates accumulate."""
    inside = (idx >= v0) & (idx < v1)
    rows = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1).expand_as(idx)
    flat = (rows * tile.shape[1] + (idx - v0))[inside]
    tile.view(-1).index_add_(0, flat, values[inside].to(tile.dtype))


def linear_backward(
    spec: GradSpec,
    ops: TileOps,
    sparse_values: torch.Tensor,
    sparse_idx: torch.Tensor,
    need_dh: bool,
    need_dw: bool,
    budget_bytes: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """dh = dz·W and dW = dzᵀ·h over vocabulary chunks, never holding more than one dz tile."""
    h, weight = spec.h, spec.weight
    n, hidden = h.shape
    vocab = weight.shape[0]
    rows_per_tile, cols_per_tile = plan_tiles(n, vocab, hidden, budget_bytes, ops.tile_bytes_per_element)
    h_op = _gemm_operand(h)
    acc = accumulation_dtype(h)
    grad_h = torch.empty(n, hidden, dtype=acc, device=h.device) if need_dh else None
    grad_w = torch.empty_like(weight) if need_dw else None
    # dz is formed in fp32 (sparse entries included) and rounded once, to the GEMM dtype, if that is half
    buffer = torch.empty(rows_per_tile * cols_per_tile, dtype=acc, device=h.device)
    for v0 in range(0, vocab, cols_per_tile):
        v1 = min(vocab, v0 + cols_per_tile)
        w_chunk = _gemm_operand(weight[v0:v1])
        if need_dw:  # accumulate straight into dW when it already has the accumulation dtype
            direct = grad_w.dtype == acc
            grad_w_chunk = grad_w[v0:v1] if direct else torch.empty(v1 - v0, hidden, dtype=acc, device=h.device)
        for r0 in range(0, n, rows_per_tile):
            r1 = min(n, r0 + rows_per_tile)
            tile = buffer[: (r1 - r0) * (v1 - v0)].view(r1 - r0, v1 - v0)  # contiguous
            ops.dense_grad(spec, slice(r0, r1), v0, v1, tile)
            _add_sparse(tile, sparse_values[r0:r1], sparse_idx[r0:r1], v0, v1)
            dz = tile if tile.dtype == w_chunk.dtype else tile.to(w_chunk.dtype)
            if need_dh:
                _accumulate_mm(grad_h[r0:r1], dz, w_chunk, first=v0 == 0)
            if need_dw:
                _accumulate_mm(grad_w_chunk, dz.t(), h_op[r0:r1], first=r0 == 0)
        if need_dw and not direct:
            grad_w[v0:v1] = grad_w_chunk.to(weight.dtype)
    return (grad_h.to(h.dtype) if need_dh else None), grad_w


class SDPOHeadFunction(torch.autograd.Function):
    """(h_S, W_S, h_T, W_T, y) → (D, log π_S(y), log π_T(y)); gradients reach h_S and W_S only."""

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, targets, ops: TileOps, opts: HeadOptions):
        student = ops.student_stats(h_s, w_s, targets, opts)
        teacher = ops.teacher_stats(h_t, w_t, targets, opts, student.top_idx)
        logp_s = student.target_logit - student.lse
        logp_t = teacher.target_logit - teacher.lse
        if opts.topk is None:
            div, partial = ops.full_divergence(h_s, w_s, h_t, w_t, student.lse, teacher.lse, opts)
            grad_sum = full_divergence_grad_sum(div, partial, opts.alpha)
            ctx.save_for_backward(h_s, w_s, h_t, w_t, targets, student.lse, teacher.lse, grad_sum)
        else:
            # float64 from here on: 1 − (top-K mass) cancels badly when the top-K holds almost everything
            work = epilogue_dtype(h_s.device)
            s_top = student.top_logits.to(work) - student.lse.to(work).unsqueeze(1)
            t_top = teacher.top_logits.to(work) - teacher.lse.to(work).unsqueeze(1)
            div, bucket_grad = bucket_divergence_and_grad(s_top, t_top, opts)
            div, bucket_grad = div.to(student.lse.dtype), bucket_grad.to(student.lse.dtype)
            ctx.save_for_backward(h_s, w_s, targets, student.lse, student.top_idx, bucket_grad)
        ctx.ops, ctx.opts = ops, opts
        ctx.mark_non_differentiable(logp_t)
        return div, logp_s, logp_t

    @staticmethod
    def backward(ctx, grad_div, grad_logp, _grad_logp_t):
        ops, opts = ctx.ops, ctx.opts
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        saved = ctx.saved_tensors
        h_s, w_s, targets = saved[0], saved[1], saved[4] if opts.topk is None else saved[2]
        n = h_s.shape[0]
        if not (need_dh or need_dw) or n == 0:
            return (torch.zeros_like(h_s) if need_dh else None, torch.zeros_like(w_s) if need_dw else None, *[None] * 5)
        acc = accumulation_dtype(h_s)
        zeros = torch.zeros(n, dtype=acc, device=h_s.device)
        g_div = zeros if grad_div is None else grad_div.to(acc) * opts.inv_temp
        g_logp = zeros if grad_logp is None else grad_logp.to(acc) * opts.inv_temp
        if opts.topk is None:
            _, _, h_t, w_t, _, lse_s, lse_t, grad_sum = saved
            spec = GradSpec(
                h_s, w_s, lse_s, g_div * grad_sum + g_logp, opts.inv_temp, h_t, w_t, lse_t, g_div, opts.alpha
            )
            sparse_values, sparse_idx = g_logp.unsqueeze(1), targets.unsqueeze(1)
        else:
            _, _, _, lse_s, top_idx, bucket_grad = saved
            spec = GradSpec(h_s, w_s, lse_s, g_div * bucket_grad.sum(1) + g_logp, opts.inv_temp)
            sparse_values = torch.cat([g_div.unsqueeze(1) * bucket_grad, g_logp.unsqueeze(1)], dim=1)
            sparse_idx = torch.cat([top_idx, targets.unsqueeze(1)], dim=1)
        with torch.autocast(device_type=h_s.device.type, enabled=False):
            grad_h, grad_w = linear_backward(spec, ops, sparse_values, sparse_idx, need_dh, need_dw, opts.budget_bytes)
        return grad_h, grad_w, None, None, None, None, None
