"""`sdpo_head`: the SDPO loss head from hidden states and lm_head weights, with a `backend=` switch.

    out = sdpo_head(h_student, W_student, h_teacher, W_teacher, sampled_ids, topk=100)
    out.divergence       # (N,) D_t on K+1 buckets (or K renormalised, or the full vocabulary)
    out.student_logprob  # (N,) log π_S(y_t), differentiable
    out.teacher_logprob  # (N,) log π_T(y_t)

Logits are hidden @ weightᵀ / temperature. The top-K comes from the student only; the teacher is
gathered at those ids with its own full-vocabulary normaliser. Backends:

- `naive`:  full (N, V) logits in PyTorch; the readable baseline and a second oracle.
- `torch`:  chunked PyTorch (`sdpo_fast.kernels.chunked`), scratch bounded by `memory_budget_mb`. The CPU path.
- `triton`: cuBLAS logit tiles plus fused Triton row kernels (`sdpo_fast.kernels.triton_head`); CUDA, or the
            Triton interpreter. No `tl.dot`: it runs on every GPU Triton supports, T4 included.
- `auto`:   by `AUTO_TABLE` (sdpo_fast.kernels.constants) on CUDA (`triton` from sm_75, predicted), `torch`
            elsewhere, and `torch` above K = TRITON_MAX_TOPK.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import NamedTuple

import torch

from .kernels.constants import BACKENDS, TRITON_MAX_TOPK, auto_backend, interpreting
from .kernels.function import HeadOptions, SDPOHeadFunction, epilogue_dtype
from .kernels.naive import naive_head

__all__ = ["BACKENDS", "TRITON_MAX_TOPK", "SDPOHeadOutput", "resolve_backend", "sdpo_head"]
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class SDPOHeadOutput(NamedTuple):
    divergence: torch.Tensor
    student_logprob: torch.Tensor
    teacher_logprob: torch.Tensor


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device, topk: int | None = None, n_tokens: int | None = None) -> str:
    """The concrete backend `auto` stands for on `device` at this K (and N), or a clear error for an impossible
    choice. `auto` on CUDA follows `AUTO_TABLE` (predicted until measured on each GPU)."""
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend={backend!r}. Choose one of {', '.join(map(repr, BACKENDS))}.")
    if backend == "auto":
        if device.type != "cuda" or not triton_available():
            return "torch"
        if topk is not None and topk > TRITON_MAX_TOPK:
            return "torch"  # the Triton head keeps a candidate buffer of a few K per row
        return auto_backend(torch.cuda.get_device_capability(device), n_tokens)
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the `triton` package (Linux). Use backend='torch' elsewhere.")
        if device.type != "cuda" and not interpreting():
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors, got device {device}. Use backend='torch' (or 'auto') on "
                "the CPU; set TRITON_INTERPRET=1 before importing sdpo_fast to run the kernels in the interpreter."
            )
        if topk is not None and topk > TRITON_MAX_TOPK:
            raise ValueError(
                f"backend='triton' supports topk ≤ {TRITON_MAX_TOPK}, got {topk}. Use backend='torch' (or 'auto', "
                "which picks it) for larger K."
            )
    return backend


def _validate(h_s, w_s, h_t, w_t, targets, topk, alpha, temperature) -> None:
    for name, t in (("student_hidden", h_s), ("student_weight", w_s), ("teacher_hidden", h_t), ("teacher_weight", w_t)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor, got {getattr(t, 'shape', type(t))}.")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported are float32, bfloat16, float16 (and float64).")
    n, vocab = h_s.shape[0], w_s.shape[0]
    if w_s.shape[1] != h_s.shape[1]:
        raise ValueError(
            f"student_hidden is (N, {h_s.shape[1]}) but student_weight is {tuple(w_s.shape)}: hidden sizes differ."
        )
    if w_t.shape[1] != h_t.shape[1]:
        raise ValueError(
            f"teacher_hidden is (N, {h_t.shape[1]}) but teacher_weight is {tuple(w_t.shape)}: hidden sizes differ."
        )
    if h_t.shape[0] != n:
        raise ValueError(f"student_hidden has {n} rows but teacher_hidden has {h_t.shape[0]}; pass the same positions.")
    if w_t.shape[0] != vocab:
        raise ValueError(f"student and teacher vocabularies differ ({vocab} vs {w_t.shape[0]}); they must be equal.")
    if (
        not isinstance(targets, torch.Tensor)
        or targets.shape != (n,)
        or targets.dtype not in (torch.int64, torch.int32)
    ):
        raise ValueError(
            f"target_ids must be an int64 tensor of shape ({n},), got {getattr(targets, 'shape', targets)}."
        )
    devices = {t.device for t in (h_s, w_s, h_t, w_t, targets)}
    if len(devices) > 1:
        raise ValueError(f"All inputs must be on one device, got {sorted(map(str, devices))}.")
    if topk is not None:
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ValueError(f"topk must be a positive int or None (full vocabulary), got {topk!r}.")
        if topk > vocab:
            raise ValueError(
                f"topk={topk} exceeds the vocabulary size V={vocab}. Use topk ≤ V, or topk=None for the exact "
                "full-vocabulary divergence."
            )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} is outside [0, 1].")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if n and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        raise ValueError(
            f"target_ids must lie in [0, {vocab}), got values in [{int(targets.min())}, {int(targets.max())}]."
        )


def _tile_ops(backend: str):
    if backend == "torch":
        from .kernels.chunked import TorchTiles

        return TorchTiles()
    from .kernels.triton_head import TritonTiles

    return TritonTiles()


def sdpo_head(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    topk: int | None = 100,
    add_tail: bool = True,
    alpha: float = 0.5,
    temperature: float = 1.0,
    backend: str = "auto",
    memory_budget_mb: float = 256,
    weight_gather: Callable[[], contextlib.AbstractContextManager] | None = None,
    kl_clip: float | None = None,
    teacher_stats: bool = False,
) -> SDPOHeadOutput | tuple[SDPOHeadOutput, torch.Tensor]:
    """Per-token SDPO divergence and sampled-token log-probs, without full-vocabulary logits.

    Args:
        student_hidden: (N, H) final hidden states of the student at the scored positions.
        student_weight: (V, H) the student's lm_head weight.
        teacher_hidden: (N, H_T) the teacher's hidden states at the same positions (no grad).
        teacher_weight: (V, H_T) the teacher's lm_head weight (no grad).
        target_ids: (N,) the sampled token ids.
        topk: K student top-K tokens; None for the full vocabulary.
        add_tail: K+1 buckets with a tail (True) or K renormalised buckets (False).
        alpha: 0 forward KL, 1 reverse KL, otherwise generalised JSD.
        temperature: logits are divided by it on both sides.
        backend: `auto`, `triton`, `torch` or `naive`.
        memory_budget_mb: scratch budget of the chunked paths.
        weight_gather: ZeRO-3 and similar: a zero-argument callable returning a context manager inside which
            `student_weight` is materialised (e.g. `lambda: deepspeed.zero.GatheredParameters([w])`). The head
            enters it around every read of the weight, in the forward and again in the backward (where it stays
            open until the weight's gradient has been accumulated). Outside it the weight may be a placeholder.
        kl_clip: forward KL (alpha=0) with a top-K: clip each bucket's term p_T·(log p_T − log p_S) above at it.
        teacher_stats: also return the teacher's (N, 3) bucket statistics: its mass inside the student's top-K, its
            tail share, and its entropy over the K+1 buckets. They come from the (N, K) epilogue the divergence
            already computes (no extra pass over the vocabulary, no (N, V) tensor); NaN with `topk=None`.

    Returns:
        `SDPOHeadOutput(divergence, student_logprob, teacher_logprob)`, each (N,) in fp32 (fp64 for
        fp64 inputs), and with `teacher_stats=True` also the (N, 3) statistics. Gradients flow to
        `student_hidden` and `student_weight` only.
    """
    if kl_clip is not None and not (alpha == 0.0 and topk is not None and kl_clip > 0):
        raise ValueError(
            f"kl_clip={kl_clip!r} clips the forward KL's per-bucket terms: it needs alpha=0.0, an integer topk and a "
            "positive clip."
        )
    gather = weight_gather if weight_gather is not None else contextlib.nullcontext
    with gather():
        _validate(student_hidden, student_weight, teacher_hidden, teacher_weight, target_ids, topk, alpha, temperature)
        backend = resolve_backend(backend, student_hidden.device, topk, student_hidden.shape[0])
        targets = target_ids.long()
        teacher_hidden, teacher_weight = teacher_hidden.detach(), teacher_weight.detach()
        inv_temp = 1.0 / float(temperature)
        # fp32 accumulation is the contract: an enclosing autocast (the trainer runs the head inside the model's
        # forward, under `accelerator.autocast()`) must not round the tile matmuls or the teacher gather to bf16.
        with torch.autocast(device_type=student_hidden.device.type, enabled=False):
            if backend == "naive":
                weight = student_weight if weight_gather is None else _Materialised.apply(student_weight, weight_gather)
                out = naive_head(
                    student_hidden, weight, teacher_hidden, teacher_weight, targets, topk=topk, add_tail=add_tail,
                    alpha=float(alpha), inv_temp=inv_temp, kl_clip=kl_clip,
                )  # fmt: skip
                return (SDPOHeadOutput(*out[:3]), out[3]) if teacher_stats else SDPOHeadOutput(*out[:3])
            opts = HeadOptions(topk, bool(add_tail), float(alpha), inv_temp, int(memory_budget_mb * 2**20), kl_clip)
            out = SDPOHeadFunction.apply(
                student_hidden, student_weight, teacher_hidden, teacher_weight, targets, _tile_ops(backend), opts,
                weight_gather,
            )  # fmt: skip
    return (SDPOHeadOutput(*out[:3]), out[3]) if teacher_stats else SDPOHeadOutput(*out[:3])


class _Materialised(torch.autograd.Function):
    """For the naive backend under `weight_gather`: a copy of the gathered weight that autograd can keep.

    Its backward enters the gather again until the gradient is accumulated into the (partitioned) weight.
    """

    @staticmethod
    def forward(ctx, weight, weight_gather):
        ctx.weight_gather = weight_gather
        ctx.save_for_backward(weight)
        return weight.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        from .kernels.function import hold_gathered

        with hold_gathered(ctx.saved_tensors[0], ctx.weight_gather):
            return grad, None


@torch.no_grad()
def sampled_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    topk: int | None = 100,
    temperature: float = 1.0,
    backend: str = "auto",
    memory_budget_mb: float = 256,
    weight_gather: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> torch.Tensor:
    """log π(y) exactly as `sdpo_head` returns `student_logprob` for the same student inputs, without a teacher.

    The same streaming pass with the same options computes it, so on the same rows the two agree bit for bit:
    the trainer scores `old_per_token_logps` with it, which makes the importance ratio exactly 1 before the
    policy has moved (TRL's own scorer rounds its logit tiles to the compute dtype; Unsloth has its own).
    """
    gather = weight_gather if weight_gather is not None else contextlib.nullcontext
    with gather(), torch.autocast(device_type=hidden.device.type, enabled=False):
        backend = resolve_backend(backend, hidden.device, topk, hidden.shape[0])
        targets = target_ids.long()
        if backend == "naive":
            return naive_head(
                hidden, weight, hidden, weight, targets, topk=topk, add_tail=True, alpha=0.5, inv_temp=1.0 / temperature
            )[1]
        opts = HeadOptions(topk, True, 0.5, 1.0 / float(temperature), int(memory_budget_mb * 2**20))
        stats = _tile_ops(backend).student_stats(hidden, weight, targets, opts)
        return stats.log_probs(stats.target_logit, epilogue_dtype(hidden.device)).to(stats.max.dtype)
