"""The SDPO head as one `torch.autograd.Function`, shared by the chunked PyTorch and the Triton backends.

A backend supplies *tile operations* (see `TileOps`): streaming statistics over the vocabulary in
the forward pass and one gradient tile in the backward pass. Everything else lives here:

forward   student stats (max, log-sum, target logit, top-K, tail sum)  ─┐
          teacher stats (max, log-sum, target logit, logits at the      ├─► epilogue on (N, K), float64:
                         student's top-K, tail sum without those K)    ─┘    buckets, D, ∂D/∂ℓ, backward terms
backward  for each vocabulary chunk × row chunk:
              dz = dense −c·p_j (+ the full-vocabulary term), the K top-K entries *written*, the target term
              dh += dz·W_chunk        dW_chunk += dzᵀ·h       (fp32 accumulation)

Exactness (docs/kernels.md). The normaliser is carried as a pair (m, log s), m the row max and s = Σ exp(z − m), so
ℓ_j = (z_j − m) − log s is exact in fp32 near the max (z − m is exact there, by Sterbenz); m + log s as one fp32
number is off by ~5e−4 at |z| ~ 1e4. The tail mass p_tail is *summed* over the entries outside the top-K, never
formed as 1 − Σ_k p_k, which cancels when the top-K holds almost everything. The gradient is then

    ∂D/∂z_j = G_k − (ΣG_b)·p_j                   for j = I_k in the top-K
    ∂D/∂z_j = (G_tail/p_tail − ΣG_b)·p_j         for j outside it

with G_k = ∂D/∂ℓ_k, G_tail = ∂D/∂(log p_tail) (0 where the reference's clamp cuts it) and ΣG_b = Σ_k G_k + G_tail.
The K entries are *written* from float64 values rather than added to the dense −c·p_j: the dense coefficient
G_tail/p_tail is huge when p_tail is tiny, and dense + correction would cancel catastrophically.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .buckets import teacher_bucket_stats, topk_divergence

WeightGather = Callable[[], contextlib.AbstractContextManager] | None


@dataclass(frozen=True)
class HeadOptions:
    topk: int | None
    add_tail: bool
    alpha: float
    inv_temp: float
    budget_bytes: int
    kl_clip: float | None = None  # forward KL only: the per-bucket clip (see `buckets.divergence`)


class Stats(NamedTuple):
    """Per-row results of one streaming pass over the vocabulary (fp32 unless noted).

    `log_tail` is log Σ_{j ∉ top-K} exp(z_j − max) (−inf for an empty tail); log π(j) = (z_j − max) − log_sum.
    """

    max: torch.Tensor  # (N,) row max of the scaled logits
    log_sum: torch.Tensor  # (N,) log Σ_j exp(z_j − max)
    target_logit: torch.Tensor  # (N,) scaled logit of the sampled token
    top_logits: torch.Tensor | None = None  # (N, K) student top-K logits, or the teacher's logits at those ids
    top_idx: torch.Tensor | None = None  # (N, K) int64 vocabulary ids (student pass only)
    log_tail: torch.Tensor | None = None  # (N,) see above; top-K passes only

    def log_probs(self, logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(z − max) − log_sum in `dtype`, for (N,) or (N, K) logits of this pass."""
        shift = self.max if logits.dim() == 1 else self.max.unsqueeze(1)
        log_sum = self.log_sum if logits.dim() == 1 else self.log_sum.unsqueeze(1)
        return (logits.to(dtype) - shift.to(dtype)) - log_sum.to(dtype)


def finish_normaliser(
    run_max: torch.Tensor, tail_sum: torch.Tensor, top_logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(max, log_sum, log_tail) from a tail sum Σ_{j ∉ top-K} exp(z_j − run_max) and the top-K logits.

    s = tail + Σ_k exp(z_k − max): a sum of positive terms, so no cancellation anywhere. `run_max` need not
    cover the top-K logits (the teacher's sweep never sees them): the max is raised to include them.
    """
    work = epilogue_dtype(run_max.device)
    top = top_logits.to(work)
    new_max = torch.maximum(run_max.to(work), top.amax(dim=1)) if top.shape[1] else run_max.to(work)
    tail = tail_sum.to(work) * torch.exp(run_max.to(work) - new_max)
    total = tail + torch.exp(top - new_max.unsqueeze(1)).sum(dim=1)
    return new_max.to(run_max.dtype), torch.log(total).to(run_max.dtype), torch.log(tail).to(run_max.dtype)


@dataclass
class GradSpec:
    """What a gradient tile needs: dz_j = −coef·p_j, then `write_val` at `write_idx` and `target_val` at the target.

    `coef` is c = g_D·(ΣG_b − G_tail/p_tail) + g_logp (× 1/T); top-K mode writes the K top-K entries and, where
    the target is not among them, the target's entry −c·p_y + g_logp; full-vocabulary mode adds g_D·G_j densely
    and writes the target's entry (`write_idx` is then None).
    """

    h: torch.Tensor
    weight: torch.Tensor
    max: torch.Tensor
    log_sum: torch.Tensor
    coef: torch.Tensor
    inv_temp: float
    targets: torch.Tensor
    target_val: torch.Tensor  # (N,) the target's final dz; written only where `target_write` is True
    target_write: torch.Tensor  # (N,) bool
    write_idx: torch.Tensor | None = None  # (N, K) top-K ids
    write_val: torch.Tensor | None = None  # (N, K) their final dz
    # full-vocabulary mode only
    teacher_h: torch.Tensor | None = None
    teacher_weight: torch.Tensor | None = None
    teacher_max: torch.Tensor | None = None
    teacher_log_sum: torch.Tensor | None = None
    div_grad: torch.Tensor | None = None  # g_D (already × 1/T)
    alpha: float = 0.5


class TileOps:
    """What a backend implements: streaming passes over the vocabulary and one gradient tile.

    - `student_stats`: max, log-sum, target logit and, when `opts.topk` is set, the top-K (ties prefer the lower
      vocabulary id) with its directly summed tail.
    - `teacher_stats`: max, log-sum, target logit and, given the student's ids, the logits there and the tail
      summed over every other entry.
    - `full_divergence`: the exact full-vocabulary D and (1 − α)·KL(S‖M), from both passes' normalisers.
    - `grad_tile`: the final dz of one (rows × vocabulary chunk) tile, in the GEMM operand dtype.
    """

    name: str
    tile_bytes_per_element: int  # backward scratch per tile element, for `plan_tiles`

    def student_stats(self, h, weight, targets, opts: HeadOptions) -> Stats:
        raise NotImplementedError

    def teacher_stats(self, h, weight, targets, opts: HeadOptions, top_idx: torch.Tensor | None) -> Stats:
        raise NotImplementedError

    def full_divergence(self, h_s, w_s, h_t, w_t, student: Stats, teacher: Stats, opts: HeadOptions):
        raise NotImplementedError

    def grad_tile(self, spec: GradSpec, rows: slice, v0: int, v1: int, scratch: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def backward_plan(self, n: int, vocab: int, hidden: int, budget_bytes: int) -> tuple[int, int]:
        """Rows × columns of a backward tile (`tile_bytes_per_element` bytes each, within the budget)."""
        return plan_tiles(n, vocab, hidden, budget_bytes, self.tile_bytes_per_element)


class BucketTerms(NamedTuple):
    div: torch.Tensor  # (N,) D
    teacher_stats: torch.Tensor  # (N, 3) the teacher's top-K mass, tail share, K+1-bucket entropy (no gradient)
    written: torch.Tensor  # (N, K) A_k = G_k − ΣG_b·p_k: the written entries are g_D·A_k − g_logp·p_k
    p_top: torch.Tensor  # (N, K) p_k
    dense: torch.Tensor  # (N,) B = ΣG_b − G_tail/p_tail: the dense coefficient is c = g_D·B + g_logp


def bucket_terms(student: Stats, teacher: Stats, opts: HeadOptions) -> BucketTerms:
    """D over K(+1) buckets and the backward's per-row terms, in float64 (the tensors are (N, K): tiny).

    The reference-faithful bucket maths of `kernels.buckets` runs under autograd with the student's top-K
    log-probs and its tail log-prob as separate leaves, which gives G_k and G_tail directly.
    """
    out_dtype = student.max.dtype
    work = epilogue_dtype(student.max.device)
    s_top = student.log_probs(student.top_logits, work).requires_grad_(True)
    t_top = teacher.log_probs(teacher.top_logits, work)
    s_tail = (student.log_tail.to(work) - student.log_sum.to(work)).requires_grad_(True)
    t_tail = teacher.log_tail.to(work) - teacher.log_sum.to(work)
    with torch.enable_grad():
        div = topk_divergence(
            s_top, t_top, alpha=opts.alpha, add_tail=opts.add_tail, student_tail_log_prob=s_tail,
            teacher_tail_log_prob=t_tail, kl_clip=opts.kl_clip,
        )  # fmt: skip
        g_top, g_tail = torch.autograd.grad(div.sum(), (s_top, s_tail), allow_unused=True)
    g_tail = torch.zeros_like(s_tail) if g_tail is None else g_tail  # no tail bucket: renormalised top-K
    p_top = torch.exp(s_top.detach())
    total = g_top.sum(dim=1) + g_tail
    # G_tail/p_tail; G_tail is exactly 0 where the clamp cut it, and p_tail may then be 0 too
    tail_coef = torch.where(g_tail != 0, g_tail / torch.exp(s_tail.detach()), torch.zeros_like(g_tail))
    return BucketTerms(
        div.detach().to(out_dtype),
        teacher_bucket_stats(t_top, t_tail).to(out_dtype),
        (g_top - total.unsqueeze(1) * p_top).to(out_dtype),
        p_top.to(out_dtype),
        (total - tail_coef).to(out_dtype),
    )


def full_divergence_grad_sum(div: torch.Tensor, partial: torch.Tensor, alpha: float) -> torch.Tensor:
    """Σ_v G_v for the full-vocabulary gradient dz = g_D·(G − (Σ G)·p_s); see `grad_tile` of a backend."""
    if alpha == 0.0:
        return torch.full_like(div, -1.0)  # G = −p_T
    if alpha == 1.0:
        return div  # G = p_S·(ℓ_S − ℓ_T), Σ G = D
    return partial  # G = (1 − α)·p_S·(ℓ_S − ℓ_M), Σ G = (1 − α)·KL(S ‖ M), from the forward pass


def full_divergence_grad_at(ls: torch.Tensor, lt: torch.Tensor, alpha: float) -> torch.Tensor:
    """G_j of the full-vocabulary divergence at given student/teacher log-probs (see `full_divergence_grad_sum`)."""
    p_s = torch.exp(ls)
    if alpha == 0.0:
        return -torch.exp(lt)
    if alpha == 1.0:
        return p_s * (ls - lt)
    lm = torch.logaddexp(ls + math.log1p(-alpha), lt + math.log(alpha))
    return (1 - alpha) * p_s * (ls - lm)


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


def gemm_operand(x: torch.Tensor) -> torch.Tensor:
    """The native half dtype on CUDA, where `out_dtype=float32` keeps accumulation in fp32; else fp32/fp64."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        return x
    return x.to(accumulation_dtype(x))


def logits_into(out: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, inv_temp: float = 1.0) -> torch.Tensor:
    """out ← (h @ weightᵀ)·inv_temp, accumulated in fp32 (fp64 for fp64 inputs) whatever the input dtype."""
    if h.is_cuda and h.dtype in (torch.bfloat16, torch.float16):
        torch.mm(h, weight.t(), out_dtype=torch.float32, out=out)
    else:
        torch.mm(h.to(out.dtype), weight.to(out.dtype).t(), out=out)
    return out.mul_(inv_temp) if inv_temp != 1.0 else out


def accumulate_mm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """out (+)= a @ b with fp32 accumulation, in place: the first product overwrites, later ones add."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        if first:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
        else:
            torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
    elif first:
        torch.mm(a, b, out=out)
    else:
        out.addmm_(a, b)


def linear_backward(
    spec: GradSpec, ops: TileOps, need_dh: bool, need_dw: bool, budget_bytes: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """dh = dz·W and dW = dzᵀ·h over vocabulary chunks, never holding more than one dz tile."""
    h, weight = spec.h, spec.weight
    n, hidden = h.shape
    vocab = weight.shape[0]
    rows_per_tile, cols_per_tile = ops.backward_plan(n, vocab, hidden, budget_bytes)
    h_op = gemm_operand(h)
    acc = accumulation_dtype(h)
    grad_h = torch.empty(n, hidden, dtype=acc, device=h.device) if need_dh else None
    grad_w = torch.empty_like(weight) if need_dw else None
    # one flat byte buffer that a backend views as its tile(s), plus a spare element for masked-out writes
    scratch_bytes = rows_per_tile * cols_per_tile * ops.tile_bytes_per_element + 64
    scratch = torch.empty(scratch_bytes, dtype=torch.uint8, device=h.device)
    for v0 in range(0, vocab, cols_per_tile):
        v1 = min(vocab, v0 + cols_per_tile)
        w_chunk = gemm_operand(weight[v0:v1])
        if need_dw:  # accumulate straight into dW when it already has the accumulation dtype
            direct = grad_w.dtype == acc
            grad_w_chunk = grad_w[v0:v1] if direct else torch.empty(v1 - v0, hidden, dtype=acc, device=h.device)
        for r0 in range(0, n, rows_per_tile):
            r1 = min(n, r0 + rows_per_tile)
            dz = ops.grad_tile(spec, slice(r0, r1), v0, v1, scratch)  # (r1 − r0, v1 − v0) in w_chunk's dtype
            if need_dh:
                accumulate_mm(grad_h[r0:r1], dz, w_chunk, first=v0 == 0)
            if need_dw:
                accumulate_mm(grad_w_chunk, dz.t(), h_op[r0:r1], first=r0 == 0)
        if need_dw and not direct:
            grad_w[v0:v1] = grad_w_chunk.to(weight.dtype)
    return (grad_h.to(h.dtype) if need_dh else None), grad_w


@contextlib.contextmanager
def _nothing():
    yield


def hold_gathered(weight: torch.Tensor, weight_gather: WeightGather) -> contextlib.AbstractContextManager:
    """Enter `weight_gather()` in a backward pass and keep it open until `weight`'s gradient is accumulated.

    Autograd accumulates a leaf's gradient after the node that produced it has returned, and the accumulation
    follows the parameter's *current* shape: a ZeRO-3 parameter released at the end of our backward would
    refuse a full-size gradient. So the gather is released right after the accumulation (a post-accumulate
    hook), or at the end of the backward pass (an engine callback: `torch.autograd.grad` accumulates nothing).
    """
    if weight_gather is None:
        return _nothing()
    gathered = weight_gather()
    gathered.__enter__()
    state = {"open": True, "hook": None}

    def release(*_):
        if state["open"]:
            state["open"] = False
            if state["hook"] is not None:
                state["hook"].remove()
            gathered.__exit__(None, None, None)

    if weight.is_leaf and weight.requires_grad:
        state["hook"] = weight.register_post_accumulate_grad_hook(release)
    torch.autograd.Variable._execution_engine.queue_callback(release)

    @contextlib.contextmanager
    def on_error():
        try:
            yield
        except BaseException:
            release()
            raise

    return on_error()


class SDPOHeadFunction(torch.autograd.Function):
    """(h_S, W_S, h_T, W_T, y) → (D, log π_S(y), log π_T(y), teacher bucket stats (N, 3)); gradients reach h_S and
    W_S only.

    `weight_gather` (ZeRO-3): a zero-argument callable returning a context manager inside which W_S is
    materialised. The caller applies this function inside it (so autograd records W_S's full shape); the
    backward enters it again around every read of W_S (see `hold_gathered`).
    """

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, targets, ops: TileOps, opts: HeadOptions, weight_gather: WeightGather):
        student = ops.student_stats(h_s, w_s, targets, opts)
        teacher = ops.teacher_stats(h_t, w_t, targets, opts, student.top_idx)
        work = epilogue_dtype(h_s.device)
        out_dtype = student.max.dtype
        logp_s = student.log_probs(student.target_logit, work).to(out_dtype)
        logp_t = teacher.log_probs(teacher.target_logit, work).to(out_dtype)
        if opts.topk is None:
            div, partial = ops.full_divergence(h_s, w_s, h_t, w_t, student, teacher, opts)
            grad_sum = full_divergence_grad_sum(div, partial, opts.alpha)
            saved = (teacher.max, teacher.log_sum, teacher.target_logit, grad_sum)
            # full vocabulary: there are no buckets, so no bucket statistics
            stats = torch.full((h_s.shape[0], 3), torch.nan, dtype=out_dtype, device=h_s.device)
            ctx.save_for_backward(
                h_s, w_s, h_t, w_t, targets, student.max, student.log_sum, student.target_logit, *saved
            )
        else:
            terms = bucket_terms(student, teacher, opts)
            div, stats = terms.div, terms.teacher_stats
            ctx.save_for_backward(
                h_s, w_s, targets, student.max, student.log_sum, student.target_logit, student.top_idx,
                terms.written, terms.p_top, terms.dense,
            )  # fmt: skip
        ctx.ops, ctx.opts, ctx.weight_gather = ops, opts, weight_gather
        ctx.mark_non_differentiable(logp_t, stats)
        return div, logp_s, logp_t, stats

    @staticmethod
    def backward(ctx, grad_div, grad_logp, _grad_logp_t, _grad_stats):
        ops, opts = ctx.ops, ctx.opts
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with hold_gathered(ctx.saved_tensors[1], ctx.weight_gather if need_dw or need_dh else None):
            saved = ctx.saved_tensors
            h_s, w_s = saved[0], saved[1]
            n = h_s.shape[0]
            if not (need_dh or need_dw) or n == 0:
                zeros = (torch.zeros_like(h_s) if need_dh else None, torch.zeros_like(w_s) if need_dw else None)
                return (*zeros, *[None] * 6)
            acc = accumulation_dtype(h_s)
            zeros = torch.zeros(n, dtype=acc, device=h_s.device)
            g_div = zeros if grad_div is None else grad_div.to(acc) * opts.inv_temp
            g_logp = zeros if grad_logp is None else grad_logp.to(acc) * opts.inv_temp
            spec = _grad_spec(saved, opts, g_div, g_logp)
            with torch.autocast(device_type=h_s.device.type, enabled=False):
                grad_h, grad_w = linear_backward(spec, ops, need_dh, need_dw, opts.budget_bytes)
        return grad_h, grad_w, None, None, None, None, None, None


def _grad_spec(saved, opts: HeadOptions, g_div: torch.Tensor, g_logp: torch.Tensor) -> GradSpec:
    """The backward's per-row terms for the incoming gradients (g_D, g_logp), in float64 on (N, K) tensors."""
    work = epilogue_dtype(g_div.device)
    if opts.topk is None:
        h_s, w_s, h_t, w_t, targets, m_s, log_s, z_y, m_t, log_t, z_ty, grad_sum = saved
        ls_y = (z_y.to(work) - m_s.to(work)) - log_s.to(work)
        lt_y = (z_ty.to(work) - m_t.to(work)) - log_t.to(work)
        coef = g_div.to(work) * grad_sum.to(work) + g_logp.to(work)
        g_y = full_divergence_grad_at(ls_y, lt_y, opts.alpha)
        target_val = g_div.to(work) * g_y - coef * torch.exp(ls_y) + g_logp.to(work)
        return GradSpec(
            h_s, w_s, m_s, log_s, coef.to(g_div.dtype), opts.inv_temp, targets, target_val.to(g_div.dtype),
            torch.ones_like(targets, dtype=torch.bool), teacher_h=h_t, teacher_weight=w_t, teacher_max=m_t,
            teacher_log_sum=log_t, div_grad=g_div, alpha=opts.alpha,
        )  # fmt: skip
    h_s, w_s, targets, m_s, log_s, z_y, top_idx, written, p_top, dense = saved
    gd, gl = g_div.to(work).unsqueeze(1), g_logp.to(work).unsqueeze(1)
    is_target = top_idx == targets.unsqueeze(1)
    write_val = gd * written.to(work) - gl * p_top.to(work) + gl * is_target
    coef = g_div.to(work) * dense.to(work) + g_logp.to(work)
    p_y = torch.exp((z_y.to(work) - m_s.to(work)) - log_s.to(work))
    target_val = -coef * p_y + g_logp.to(work)
    return GradSpec(
        h_s, w_s, m_s, log_s, coef.to(g_div.dtype), opts.inv_temp, targets, target_val.to(g_div.dtype),
        ~is_target.any(dim=1), top_idx, write_val.to(g_div.dtype),
    )  # fmt: skip
