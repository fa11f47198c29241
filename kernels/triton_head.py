"""The Triton backend: cuBLAS logit tiles, fused Triton row kernels (`triton_rows.py`), and the TileOps glue.

Per bounded tile (rows × vocabulary columns) cuBLAS computes h @ Wᵀ into an fp32 buffer (bf16/fp16 operands with
`out_dtype=float32` on CUDA: fp32 accumulation), and one row kernel reads the tile once:

- student: online max, the tail sum of the entries below the row's threshold τ, the candidates at or above it
  (atomically compacted into a per-row buffer of packed (logit, id) keys), the target logit, and the maxima of
  16-column blocks. τ is the K-th largest block maximum of the tiles swept *before* this one, a guaranteed lower
  bound on the row's K-th largest logit (a max pre-pass over the first tile starts it). After the sweep,
  `torch.topk` on the candidate buffer alone gives the exact top-K; the losing candidates join the tail sum.
  A row whose candidates overflow the buffer (adversarial logits) is redone by the torch backend: exact, and
  checked once per call (one host synchronisation), never per tile.
- teacher: the logits at the student's K ids are gathered from the tile and replaced by −inf; the logsumexp
  sweep of what is left is the teacher's tail, summed directly.
- backward: cuBLAS recomputes the student tile; one kernel turns it into dz (dense −c·p, then the top-K entries
  and the target's entry written over it), rounded once to the GEMM dtype, and cuBLAS computes dh and dW.

Launch configurations are fixed per kernel (`CONFIGS`, compiled ahead of time for sm_75…sm_90 by
kernels/compile_report.py); under TRITON_INTERPRET=1 small blocks run on the CPU.

Choices left out, and why: the K winners' logits are read from the fp32 tile, exactly the values the normaliser
summed, so they need no recompute as K dots (a bf16 tile would halve the tile traffic but need that recompute and
lose the exact tail). No tile of dz is skipped as negligible (Cut Cross-Entropy's filter): every entry counts
towards the 1e−5 oracle tolerance. The gradient is not formed in the forward (Liger/QuACK style): dz needs the
row's final top-K and normaliser, known only after the last tile, so it would need all the row's logits kept.
"""

from __future__ import annotations

import math

import torch
import triton

from .chunked import TorchTiles, decode_keys
from .constants import TRITON_MAX_TOPK, interpreting
from .function import GradSpec, HeadOptions, Stats, TileOps, finish_normaliser, logits_into
from .triton_rows import MODE_LSE, MODE_MAXIMA, MODE_TOPK, full_div_kernel, grad_kernel, mask_kernel, sweep_kernel

KERNELS = {"sweep": sweep_kernel, "mask": mask_kernel, "grad": grad_kernel, "full": full_div_kernel}
# Block sizes and warps per kernel on CUDA. Memory-bound row sweeps: 2048 fp32 per iteration (8 KiB), 8 warps.
CONFIGS = {
    "sweep": {"BLOCK": 2048, "SUB": 16, "num_warps": 8},
    "mask": {"num_warps": 4},
    "grad": {"BLOCK": 2048, "num_warps": 8},
    "full": {"BLOCK": 2048, "num_warps": 8},
}
# The interpreter's cost is per operation, not per element: tiny blocks, so small test shapes span many of them.
INTERPRETER_CONFIGS = {"sweep": {"BLOCK": 32, "SUB": 4}, "mask": {}, "grad": {"BLOCK": 32}, "full": {"BLOCK": 32}}
TILE_COLS = 16384  # columns per forward tile on CUDA (bench/topk_sim.py: the threshold's sweet spot)
INTERPRETER_TILE_COLS = 64
INT64_MIN = -(2**63)


def config(kernel: str) -> dict:
    return dict((INTERPRETER_CONFIGS if interpreting() else CONFIGS)[kernel])


def launch(kernel: str, grid: tuple[int, ...], *args, **constexprs) -> None:
    """Run one row kernel with its fixed configuration (the interpreter takes no `num_warps`)."""
    meta = {**config(kernel), **constexprs}
    if interpreting():
        meta.pop("num_warps", None)
    KERNELS[kernel][grid](*args, **meta)


def forward_plan(n: int, vocab: int, budget_bytes: int) -> tuple[int, int]:
    """Rows × columns of a forward fp32 tile: the whole (N, V) when it fits the budget, else TILE_COLS wide."""
    elements = max(budget_bytes // 4, 1024)
    if n * vocab <= elements:
        return max(n, 1), vocab
    cols = min(vocab, INTERPRETER_TILE_COLS if interpreting() else TILE_COLS)
    return max(1, min(n, elements // cols)), cols


def split_plan(rows: int, cols: int, block: int, device: torch.device) -> tuple[int, int]:
    """(column splits per tile row, columns per split): enough programs to fill the GPU when rows are few."""
    target = 2 if interpreting() else 4 * torch.cuda.get_device_properties(device).multi_processor_count
    splits = max(1, min(triton.cdiv(cols, block), triton.cdiv(target, rows)))
    per_split = triton.cdiv(triton.cdiv(cols, splits), block) * block
    return triton.cdiv(cols, per_split), per_split


def candidate_capacity(k: int, vocab: int) -> int:
    """Candidate slots per row: bench/topk_sim.py counts at most ~4.5·K on i.i.d. logits (K=100: 455 of 1024).

    At most an eighth of a small vocabulary (but never fewer than K): the int64 buffer stays (N, O(K)), a
    quarter of an (N, V) fp32 tensor at most.
    """
    return min(128 * triton.cdiv(4 * k + 512, 128), max(k, vocab // 8))


def _operands(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if h.dtype == torch.float64 or weight.dtype == torch.float64:
        raise TypeError("The Triton SDPO head computes in fp32/bf16/fp16; use backend='torch' for float64 inputs.")
    return h if h.dtype == weight.dtype else h.to(weight.dtype)


def _alpha_args(alpha: float) -> tuple[float, float, float, int]:
    """α, log(1 − α), log α (0 at the ends, where they are unused) and the kernels' ALPHA_MODE."""
    if alpha in (0.0, 1.0):
        return alpha, 0.0, 0.0, int(alpha)
    return alpha, math.log1p(-alpha), math.log(alpha), 2


def top_and_losers(keys: torch.Tensor, count: torch.Tensor, k: int, row_max: torch.Tensor):
    """The K best candidate keys of each row, and Σ exp(z − row_max) over the other valid candidates.

    Sorted, not just top-K'd: the atomic compaction leaves candidates in a run-dependent order, and the losers must
    be summed in a fixed one, so that a row's log-probs are bit-identical from run to run (the trainer's old-log-prob
    scorer relies on it for an importance ratio of exactly 1). Keys are unique; empty slots (INT64_MIN) sort last.
    """
    ordered = torch.sort(keys, dim=1, descending=True).values
    lost = torch.arange(k, keys.shape[1], device=keys.device) < count.unsqueeze(1)
    values = decode_keys(ordered[:, k:])[0]
    return ordered[:, :k], torch.where(lost, torch.exp(values - row_max.unsqueeze(1)), 0.0).sum(dim=1)


def _merge_splits(run_max: torch.Tensor, run_sum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One (max, Σ exp(z − max)) per row from the per-split partials (a split may have seen nothing: −inf)."""
    row_max = run_max.amax(dim=1)
    shift = torch.where(row_max == -math.inf, 0.0, row_max)
    return row_max, (run_sum * torch.exp(run_max - shift.unsqueeze(1))).sum(dim=1)


class TritonTiles(TileOps):
    """Tile operations for `SDPOHeadFunction`: cuBLAS tiles and Triton row kernels."""

    name = "triton"
    tile_bytes_per_element = 10  # backward: the fp32 student tile, a teacher tile (full vocabulary), the half dz
    capacity = staticmethod(candidate_capacity)  # tests shrink it to force the overflow fallback

    # ------------------------------------------------------------------ forward

    def student_stats(self, h, weight, targets, opts: HeadOptions) -> Stats:
        if not opts.topk:
            return self._lse_sweep(h, weight, targets, opts, None)
        k = opts.topk
        if k > TRITON_MAX_TOPK:
            raise ValueError(f"The Triton head supports topk ≤ {TRITON_MAX_TOPK}, got {k}. Use backend='torch'.")
        h = _operands(h, weight)
        n, vocab, dev = h.shape[0], weight.shape[0], h.device
        if n == 0:
            empty = torch.empty(0, device=dev)
            return Stats(empty, empty, empty, empty.view(0, k), torch.empty(0, k, dtype=torch.int64, device=dev), empty)
        rows, cols = forward_plan(n, vocab, opts.budget_bytes)
        cfg = config("sweep")
        splits, per_split = split_plan(rows, cols, cfg["BLOCK"], dev)
        cap = self.capacity(k, vocab)
        run_max = torch.full((n, splits), -math.inf, device=dev)
        run_sum = torch.zeros(n, splits, device=dev)
        target = torch.zeros(n, device=dev)
        tau = torch.full((n,), -math.inf, device=dev)
        count = torch.zeros(n, dtype=torch.int32, device=dev)
        keys = torch.full((n, cap), INT64_MIN, dtype=torch.int64, device=dev)
        buffer = torch.empty(rows * cols, device=dev)
        block_max = torch.empty(rows, triton.cdiv(cols, cfg["SUB"]), device=dev)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            best_maxima = torch.full((r1 - r0, k), -math.inf, device=dev)  # the K largest block maxima so far
            starts = list(range(0, vocab, cols))
            for t, v0 in enumerate(starts):
                width = min(vocab, v0 + cols) - v0
                tile = logits_into(buffer[: (r1 - r0) * width].view(r1 - r0, width), h[r0:r1], weight[v0 : v0 + width])
                args = (
                    tile, width, width, v0, r0, opts.inv_temp, targets, target, run_max, run_sum, splits, per_split,
                    tau, block_max, block_max.stride(0), count, keys, cap,
                )  # fmt: skip
                nb = triton.cdiv(width, cfg["SUB"])
                if t == 0:  # the first tile is swept twice: its block maxima first, so that τ is finite
                    launch("sweep", (r1 - r0, splits), *args, MODE=MODE_MAXIMA)
                    best_maxima = self._raise_threshold(best_maxima, block_max[: r1 - r0, :nb], tau[r0:r1])
                launch("sweep", (r1 - r0, splits), *args, MODE=MODE_TOPK)
                if 0 < t < len(starts) - 1:
                    best_maxima = self._raise_threshold(best_maxima, block_max[: r1 - r0, :nb], tau[r0:r1])
        stats = self._finish_topk(run_max, run_sum, target, count, keys, k)
        overflow = count > cap
        if bool(overflow.any()):  # the one host synchronisation of a call
            redo_rows = overflow.nonzero().squeeze(1)
            redo = TorchTiles().student_stats(h[redo_rows], weight, targets[redo_rows], opts)
            for full, part in zip(stats, redo):
                full[redo_rows] = part.to(full.dtype)
        return stats

    @staticmethod
    def _raise_threshold(best: torch.Tensor, new: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """Merge a tile's block maxima into the K largest so far; τ ← the K-th of them (−inf while fewer)."""
        best = torch.topk(torch.cat([best, new], dim=1), best.shape[1], dim=1).values
        tau.copy_(best[:, -1])
        return best

    @staticmethod
    def _finish_topk(run_max, run_sum, target, count, keys, k, chunk: int = 4096) -> Stats:
        """The top-K from the candidate buffer, and the losing candidates added to the tail sum."""
        row_max, tail = _merge_splits(run_max, run_sum)
        n = keys.shape[0]
        top_vals = torch.empty(n, k, device=keys.device)
        top_idx = torch.empty(n, k, dtype=torch.int64, device=keys.device)
        for r0 in range(0, n, chunk):
            rows = slice(r0, min(n, r0 + chunk))
            best, lost_sum = top_and_losers(keys[rows], count[rows], k, row_max[rows])
            top_vals[rows], top_idx[rows] = decode_keys(best)
            tail[rows] += lost_sum
        row_max, log_sum, log_tail = finish_normaliser(row_max, tail, top_vals)
        return Stats(row_max, log_sum, target, top_vals, top_idx, log_tail)

    def teacher_stats(self, h, weight, targets, opts: HeadOptions, top_idx) -> Stats:
        return self._lse_sweep(h, weight, targets, opts, top_idx)

    def _lse_sweep(self, h, weight, targets, opts: HeadOptions, top_idx) -> Stats:
        """Online logsumexp and target logit; with `top_idx`, the logits there and the sum of all the others."""
        h = _operands(h, weight)
        n, vocab, dev = h.shape[0], weight.shape[0], h.device
        k = 0 if top_idx is None else top_idx.shape[1]
        if n == 0:
            empty = torch.empty(0, device=dev)
            if top_idx is None:
                return Stats(empty, empty, empty)
            return Stats(empty, empty, empty, empty.view(0, k), top_idx, empty)
        rows, cols = forward_plan(n, vocab, opts.budget_bytes)
        splits, per_split = split_plan(rows, cols, config("sweep")["BLOCK"], dev)
        run_max = torch.full((n, splits), -math.inf, device=dev)
        run_sum = torch.zeros(n, splits, device=dev)
        target = torch.zeros(n, device=dev)
        top = None if top_idx is None else torch.zeros(n, k, device=dev)
        ids = None if top_idx is None else top_idx.contiguous()
        buffer = torch.empty(rows * cols, device=dev)
        # the MODE_LSE sweep ignores the top-K arguments; typed like the real ones, it compiles as in the report
        unused = (torch.empty(1, device=dev), torch.empty(1, device=dev), 0, torch.empty(1, dtype=torch.int32, device=dev),
                  torch.empty(1, dtype=torch.int64, device=dev), 0)  # fmt: skip
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            for v0 in range(0, vocab, cols):
                width = min(vocab, v0 + cols) - v0
                tile = logits_into(buffer[: (r1 - r0) * width].view(r1 - r0, width), h[r0:r1], weight[v0 : v0 + width])
                if top is not None:  # gathers the teacher's logits at the student's ids and the target logit
                    launch(
                        "mask", (r1 - r0,), tile, width, width, v0, r0, opts.inv_temp, ids, top, k, targets, target,
                        KB=_pow2(k),
                    )  # fmt: skip
                launch(
                    "sweep", (r1 - r0, splits), tile, width, width, v0, r0, opts.inv_temp, targets, target, run_max,
                    run_sum, splits, per_split, *unused, MODE=MODE_LSE, TARGET=top is None,
                )  # fmt: skip
        row_max, total = _merge_splits(run_max, run_sum)
        if top is None:
            return Stats(row_max, torch.log(total), target)
        row_max, log_sum, log_tail = finish_normaliser(row_max, total, top)
        return Stats(row_max, log_sum, target, top, top_idx, log_tail)

    def full_divergence(self, h_s, w_s, h_t, w_t, student: Stats, teacher: Stats, opts: HeadOptions):
        h_s, h_t = _operands(h_s, w_s), _operands(h_t, w_t)
        n, vocab, dev = h_s.shape[0], w_s.shape[0], h_s.device
        if n == 0:
            empty = torch.zeros(0, device=dev)
            return empty, empty
        rows, cols = forward_plan(n, vocab, opts.budget_bytes // 2)  # a student and a teacher tile
        splits, per_split = split_plan(rows, cols, config("full")["BLOCK"], dev)
        div = torch.zeros(n, splits, device=dev)
        part = torch.zeros(n, splits, device=dev)
        s_buf, t_buf = torch.empty(rows * cols, device=dev), torch.empty(rows * cols, device=dev)
        alpha, log_1ma, log_a, mode = _alpha_args(opts.alpha)
        normalisers = (student.max, student.log_sum, teacher.max, teacher.log_sum)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            for v0 in range(0, vocab, cols):
                width = min(vocab, v0 + cols) - v0
                zs = logits_into(s_buf[: (r1 - r0) * width].view(r1 - r0, width), h_s[r0:r1], w_s[v0 : v0 + width])
                zt = logits_into(t_buf[: (r1 - r0) * width].view(r1 - r0, width), h_t[r0:r1], w_t[v0 : v0 + width])
                launch(
                    "full", (r1 - r0, splits), zs, width, zt, width, width, r0, opts.inv_temp, *normalisers, div, part,
                    splits, per_split, alpha, log_1ma, log_a, ALPHA_MODE=mode,
                )  # fmt: skip
        return div.sum(dim=1), part.sum(dim=1)

    # ------------------------------------------------------------------ backward

    def backward_plan(self, n: int, vocab: int, hidden: int, budget_bytes: int) -> tuple[int, int]:
        """As square as the budget allows: dh (N × H, fp32) is read and written once per vocabulary chunk and dW
        (V × H, fp32) once per row chunk, so that traffic is 8·H·N·V·(1/cols + 1/rows) bytes: least when equal."""
        elements = max(budget_bytes // self.tile_bytes_per_element, 1024)
        quantum = 32 if interpreting() else 256
        side = max(quantum, math.isqrt(elements) // quantum * quantum)
        rows = min(n, side)
        cols = min(vocab, max(quantum, elements // max(rows, 1) // quantum * quantum))
        return max(rows, 1), cols

    def grad_tile(self, spec: GradSpec, rows: slice, v0: int, v1: int, scratch: torch.Tensor) -> torch.Tensor:
        h = _operands(spec.h, spec.weight)
        m, width = rows.stop - rows.start, v1 - v0
        full = spec.teacher_h is not None
        floats = scratch[: (2 * m * width + 2) * 4].view(torch.float32)
        tile = logits_into(floats[: m * width].view(m, width), h[rows], spec.weight[v0:v1])
        zt = tile  # unused unless full
        if full:
            h_t = _operands(spec.teacher_h, spec.teacher_weight)
            zt = logits_into(floats[m * width : 2 * m * width].view(m, width), h_t[rows], spec.teacher_weight[v0:v1])
        if spec.h.is_cuda and spec.weight.dtype in (torch.bfloat16, torch.float16):
            offset = 8 * m * width  # after both fp32 tiles: bytes, even
            out = scratch[offset : offset + 2 * m * width].view(spec.weight.dtype).view(m, width)
        else:
            out = tile  # fp32 GEMMs: dz overwrites the logits it came from
        prep = self._prepare(spec)
        alpha, log_1ma, log_a, mode = _alpha_args(spec.alpha)
        splits, per_split = split_plan(m, width, config("grad")["BLOCK"], spec.h.device)
        launch(
            "grad", (m, splits), tile, width, out, width, zt, width, width, v0, rows.start, spec.inv_temp,
            spec.max, spec.log_sum, prep["coef"], prep["t_max"], prep["t_log_sum"], prep["g_div"], alpha, log_1ma,
            log_a, prep["ids"], prep["vals"], prep["k"], prep["y"], prep["y_val"], splits, per_split, FULL=full,
            ALPHA_MODE=mode, WRITES=prep["k"] > 0, KB=_pow2(prep["k"]),
        )  # fmt: skip
        return out

    @staticmethod
    def _prepare(spec: GradSpec) -> dict:
        """The kernel's per-row arguments, made once per backward (cached on the spec)."""
        prep = getattr(spec, "_triton", None)
        if prep is None:
            dummy = spec.coef
            k = 0 if spec.write_idx is None else spec.write_idx.shape[1]
            prep = {
                "coef": spec.coef.float().contiguous(),
                "t_max": dummy if spec.teacher_max is None else spec.teacher_max.contiguous(),
                "t_log_sum": dummy if spec.teacher_log_sum is None else spec.teacher_log_sum.contiguous(),
                "g_div": dummy if spec.div_grad is None else spec.div_grad.float().contiguous(),
                "ids": spec.targets if k == 0 else spec.write_idx.contiguous(),
                "vals": dummy if k == 0 else spec.write_val.float().contiguous(),
                "k": k,
                "y": torch.where(spec.target_write, spec.targets, -1),  # −1: the target is among the written K
                "y_val": spec.target_val.float().contiguous(),
            }
            spec._triton = prep
        return prep


def _pow2(k: int) -> int:
    return 1 << max(k - 1, 0).bit_length()
