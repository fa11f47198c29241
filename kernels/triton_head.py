"""Launchers for the Triton SDPO head: `TritonTiles` implements the tile operations of
`SDPOHeadFunction` (kernels/function.py) with the kernels in `triton_fwd.py` / `triton_bwd.py`.

Per call, the forward launches one streaming kernel per model (student with its running top-K,
teacher without), a gather kernel for the teacher at the student's ids, and merges the per-split
partial results with a few tiny torch ops on (N, splits) and (N, splits·KP) tensors. The backward
launches the dense-gradient kernel once per (rows × vocabulary) chunk; the caller adds the sparse
entries and runs the two GEMMs with cuBLAS.

Block sizes are autotuned on CUDA, per device capability (a T4's 64 KiB of shared memory gets its
own space). Under `TRITON_INTERPRET=1` one small fixed configuration runs on the CPU.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton

from .function import GradSpec, HeadOptions, Stats, TileOps
from .triton_bwd import dense_grad_kernel
from .triton_fwd import full_divergence_kernel, gather_logits_kernel, stream_stats_kernel

# Vocabulary slices are whole multiples of every BLOCK_V in the search space.
SPLIT_QUANTUM = 256
MAX_KP = 256  # the running top-K set lives in registers: (BLOCK_M, KP) int64 per program (= TRITON_MAX_TOPK)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _cfg(block_m, block_v, block_h, warps, stages, **extra):
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_V": block_v, "BLOCK_H": block_h, **extra}, num_warps=warps, num_stages=stages
    )


def autotune_space(kernel: str, capability: tuple[int, int]) -> list[triton.Config]:
    """The autotune configurations of `kernel` on a GPU of compute capability `capability`.

    Each fits that architecture's shared memory in bf16/fp16 (checked ahead of time for sm_75…sm_90
    by tests/test_triton_compile.py). Turing (sm_75, T4: 64 KiB) gets fewer pipeline stages.
    """
    # Keep the fp32 accumulator tile at ≤ 64 registers per thread (BLOCK_M·BLOCK_V ≤ 2048·warps):
    # larger tiles spill on every architecture. Turing (sm_75: 64 KiB shared memory) gets 2 stages.
    stages = 2 if capability < (8, 0) else 3
    if kernel == "stats":
        return [_cfg(32, 128, 64, 4, 2), _cfg(64, 128, 32, 8, stages), _cfg(32, 256, 32, 8, 2)]
    if kernel == "full":
        return [_cfg(32, 128, 32, 4, 2), _cfg(64, 128, 32, 8, stages)]
    if kernel == "grad":
        return [_cfg(64, 128, 32, 4, stages), _cfg(128, 128, 32, 8, stages), _cfg(64, 256, 32, 8, 2)]
    if kernel == "gather":
        return [
            triton.Config({"BLOCK_K": 32, "BLOCK_H": 128}, num_warps=4, num_stages=2),
            triton.Config({"BLOCK_K": 64, "BLOCK_H": 64}, num_warps=4, num_stages=2),
        ]
    raise KeyError(kernel)


# One fixed configuration for the CPU interpreter (tl.dot needs blocks of at least 16).
# Wide vocabulary blocks: the interpreter's cost is per operation, not per element.
_INTERPRETER = {
    "stats": {"BLOCK_M": 16, "BLOCK_V": 128, "BLOCK_H": 64},
    "full": {"BLOCK_M": 16, "BLOCK_V": 128, "BLOCK_H": 64},
    "grad": {"BLOCK_M": 16, "BLOCK_V": 128, "BLOCK_H": 64},
    "gather": {"BLOCK_K": 16, "BLOCK_H": 64},
}
_KERNELS = {
    "stats": stream_stats_kernel,
    "full": full_divergence_kernel,
    "grad": dense_grad_kernel,
    "gather": gather_logits_kernel,
}
_KEYS = {
    "stats": ["n_bucket", "vocab", "hidden", "KP", "DO_TOPK"],
    "full": ["n_bucket", "vocab", "hidden_s", "hidden_t", "ALPHA_MODE"],
    "grad": ["n_bucket", "chunk_cols", "hidden_s", "hidden_t", "FULL"],
    "gather": ["k", "hidden"],
}


@functools.cache
def _autotuned(kernel: str, capability: tuple[int, int]):
    return triton.autotune(configs=autotune_space(kernel, capability), key=_KEYS[kernel])(_KERNELS[kernel])


def launch(kernel: str, grid, *args, **kwargs) -> None:
    """Run `kernel` autotuned on CUDA, or with the fixed interpreter configuration on the CPU."""
    if interpreting():
        meta = dict(_INTERPRETER[kernel])
        _KERNELS[kernel][grid(meta)](*args, **kwargs, **meta)
        return
    capability = torch.cuda.get_device_capability(args[0].device)
    _autotuned(kernel, capability)[grid](*args, **kwargs)


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs: IEEE products unless PyTorch itself allows TF32 matmuls. Half inputs: tensor cores."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _bucket(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _splits(n_rows: int, vocab: int, device: torch.device) -> tuple[int, int]:
    """Vocabulary splits: enough programs to fill the GPU when there are few rows."""
    if interpreting():
        target_programs = 4
    else:
        target_programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = max(math.ceil(n_rows / 64), 1)
    max_splits = math.ceil(vocab / SPLIT_QUANTUM)
    splits = max(1, min(max_splits, math.ceil(target_programs / row_blocks)))
    cols = math.ceil(math.ceil(vocab / splits) / SPLIT_QUANTUM) * SPLIT_QUANTUM
    return math.ceil(vocab / cols), cols


def decode_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `_pack_keys`: int64 keys → (fp32 logits, int64 vocabulary ids)."""
    high = keys >> 32
    bits = (high ^ ((high >> 31) & 0x7FFFFFFF)).to(torch.int32)
    return bits.view(torch.float32), 0x7FFFFFFF - (keys & 0xFFFFFFFF)


def _same_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if h.dtype == torch.float64 or weight.dtype == torch.float64:
        raise TypeError("The Triton SDPO head computes in fp32/bf16/fp16; use backend='torch' for float64 inputs.")
    return h if h.dtype == weight.dtype else h.to(weight.dtype)


def _interpretable(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The CPU interpreter runs on numpy, which has no bfloat16: it sees bf16 tensors as fp32 copies.

    (Real GPUs run the bf16 kernels; they are compiled ahead of time for sm_80–sm_90 in the tests.)
    """
    if not interpreting():
        return tensors
    return tuple(t.float() if t.dtype == torch.bfloat16 else t for t in tensors)


class TritonTiles(TileOps):
    """Tile operations for `SDPOHeadFunction` as fused Triton kernels."""

    name = "triton"
    tile_bytes_per_element = 6  # only the dense-gradient chunk is materialised: fp32, plus its half copy on CUDA

    def _stream(self, h, weight, targets, opts: HeadOptions, topk: int | None) -> Stats:
        h, weight = _interpretable(_same_dtype(h, weight), weight)
        n, hidden = h.shape
        vocab = weight.shape[0]
        kp = 1 << (topk - 1).bit_length() if topk else 1
        if kp > MAX_KP:
            raise ValueError(f"The Triton head supports topk ≤ {MAX_KP}, got {topk}. Use backend='torch' for larger K.")
        dev = h.device
        if n == 0:
            empty = torch.empty(0, device=dev)
            idx = torch.empty(0, topk or 0, dtype=torch.int64, device=dev)
            return Stats(empty, empty, empty.view(0, topk or 0) if topk else None, idx if topk else None)
        splits, cols_per_split = _splits(n, vocab, dev)
        run_max = torch.empty(n, splits, dtype=torch.float32, device=dev)
        run_sum = torch.empty_like(run_max)
        target = torch.zeros(n, dtype=torch.float32, device=dev)
        keys = (
            torch.empty(n, splits, kp, dtype=torch.int64, device=dev)
            if topk
            else torch.empty(1, dtype=torch.int64, device=dev)
        )
        launch(
            "stats",
            lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), splits),
            h,
            weight,
            targets,
            run_max,
            run_sum,
            target,
            keys,
            n,
            vocab,
            hidden,
            cols_per_split,
            splits,
            h.stride(0),
            h.stride(1),
            weight.stride(0),
            weight.stride(1),
            opts.inv_temp,
            _bucket(n),
            topk or 1,
            KP=kp,
            DO_TOPK=bool(topk),
            PRECISION=_precision(h.dtype),
        )
        # Merge the per-split partials: a logsumexp over splits, and the top-K of splits·KP candidates.
        top = run_max.max(dim=1).values
        lse = top + torch.log((run_sum * torch.exp(run_max - top.unsqueeze(1))).sum(dim=1))
        if not topk:
            return Stats(lse, target)
        best = torch.topk(keys.view(n, splits * kp), topk, dim=1).values
        values, ids = decode_keys(best)
        return Stats(lse, target, values, ids)

    def gather(self, h, weight, idx, opts: HeadOptions) -> torch.Tensor:
        h, weight = _interpretable(_same_dtype(h, weight), weight)
        n, k = idx.shape
        out = torch.empty(n, k, dtype=torch.float32, device=h.device)
        if n == 0:
            return out
        idx = idx.contiguous()
        launch(
            "gather",
            lambda meta: (n, triton.cdiv(k, meta["BLOCK_K"])),
            h,
            weight,
            idx,
            out,
            h.shape[1],
            k,
            h.stride(0),
            h.stride(1),
            weight.stride(0),
            weight.stride(1),
            opts.inv_temp,
        )
        return out

    def full_divergence(self, h_s, w_s, h_t, w_t, lse_s, lse_t, opts: HeadOptions):
        h_s, w_s, h_t, w_t = _interpretable(_same_dtype(h_s, w_s), w_s, _same_dtype(h_t, w_t), w_t)
        n, vocab = h_s.shape[0], w_s.shape[0]
        if n == 0:
            empty = torch.zeros(0, dtype=torch.float32, device=h_s.device)
            return empty, empty
        splits, cols_per_split = _splits(n, vocab, h_s.device)
        div = torch.empty(n, splits, dtype=torch.float32, device=h_s.device)
        part = torch.empty_like(div)
        if n:
            launch(
                "full",
                lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), splits),
                h_s,
                w_s,
                h_t,
                w_t,
                lse_s.contiguous(),
                lse_t.contiguous(),
                div,
                part,
                n,
                vocab,
                h_s.shape[1],
                h_t.shape[1],
                cols_per_split,
                splits,
                h_s.stride(0),
                h_s.stride(1),
                w_s.stride(0),
                w_s.stride(1),
                h_t.stride(0),
                h_t.stride(1),
                w_t.stride(0),
                w_t.stride(1),
                opts.inv_temp,
                *_alpha_args(opts.alpha),
                _bucket(n),
                ALPHA_MODE=_alpha_mode(opts.alpha),
                PRECISION=_precision(h_s.dtype),
            )
        return div.sum(dim=1), part.sum(dim=1)

    def dense_grad(self, spec: GradSpec, rows: slice, v0: int, v1: int, out: torch.Tensor) -> None:
        n_rows, chunk = out.shape
        full = spec.teacher_h is not None
        h, weight = _interpretable(_same_dtype(spec.h, spec.weight)[rows], spec.weight)
        h_t, w_t = (
            _interpretable(_same_dtype(spec.teacher_h, spec.teacher_weight)[rows], spec.teacher_weight)
            if full
            else (h, weight)
        )
        lse_t = spec.teacher_lse[rows] if full else spec.lse[rows]
        g_div = spec.div_grad[rows] if full else spec.coef[rows]
        launch(
            "grad",
            lambda meta: (triton.cdiv(n_rows, meta["BLOCK_M"]), triton.cdiv(chunk, meta["BLOCK_V"])),
            h,
            weight,
            spec.lse[rows].contiguous(),
            spec.coef[rows].contiguous(),
            out,
            h_t,
            w_t,
            lse_t.contiguous(),
            g_div.contiguous(),
            n_rows,
            v0,
            chunk,
            weight.shape[0],
            h.shape[1],
            h_t.shape[1],
            h.stride(0),
            h.stride(1),
            weight.stride(0),
            weight.stride(1),
            h_t.stride(0),
            h_t.stride(1),
            w_t.stride(0),
            w_t.stride(1),
            out.stride(0),
            spec.inv_temp,
            *_alpha_args(spec.alpha),
            _bucket(n_rows),
            FULL=full,
            ALPHA_MODE=_alpha_mode(spec.alpha),
            PRECISION=_precision(h.dtype),
        )


def _alpha_mode(alpha: float) -> int:
    return 0 if alpha == 0.0 else 1 if alpha == 1.0 else 2


def _alpha_args(alpha: float) -> tuple[float, float, float]:
    """α, log(1 − α), log α; the logs are unused (and set to 0) at the ends."""
    if alpha in (0.0, 1.0):
        return alpha, 0.0, 0.0
    return alpha, math.log1p(-alpha), math.log(alpha)
