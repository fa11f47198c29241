"""The SDPO head benchmark, worker side: inputs, the implementations, timing and peak memory.

Every implementation gets the same inputs (the peers' benchmark inputs, docs/performance.md): h_S ~ N(0, 1), W ~ 0.05·N(0, 1),
h_T = h_S + 0.3·N(0, 1), W_T = W + 0.01·N(0, 1), built in place so that the inputs-only
process's peak equals its steady size. One "run" is forward + `loss.backward()` with
loss = mean over tokens of the per-token divergence; W.grad and h_S.grad are reset to None first.
"""

from __future__ import annotations

import gc
import json
import math
import statistics
import time
from types import SimpleNamespace

import torch

from sdpo_fast import sdpo_head
from sdpo_fast.kernels.function import GradSpec, HeadOptions, linear_backward

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_inputs(n: int, hidden: int, vocab: int, dtype: str, device: str, seed: int = 0) -> SimpleNamespace:
    """Student/teacher hidden states and lm_head weights, and sampled ids. No temporaries."""
    dt, dev = DTYPES[dtype], torch.device(device)
    g = torch.Generator(device=dev).manual_seed(seed)
    h_s = torch.empty(n, hidden, dtype=dt, device=dev).normal_(0, 1, generator=g)
    w_s = torch.empty(vocab, hidden, dtype=dt, device=dev).normal_(0, 0.05, generator=g)
    h_t = torch.empty_like(h_s).normal_(0, 0.3, generator=g).add_(h_s)
    w_t = torch.empty_like(w_s).normal_(0, 0.01, generator=g).add_(w_s)
    targets = torch.randint(0, vocab, (n,), generator=g, device=dev)
    return SimpleNamespace(h_s=h_s.requires_grad_(), w_s=w_s.requires_grad_(), h_t=h_t, w_t=w_t, targets=targets)


# ------------------------------------------------------------------------------------ implementations
# Each returns the per-token divergence (N,) or, for Liger, the scalar mean: the loss is its mean.


def _ours(backend: str):
    def run(x, topk: int | None, alpha: float) -> torch.Tensor:
        out = sdpo_head(x.h_s, x.w_s, x.h_t, x.w_t, x.targets, topk=topk, alpha=alpha, backend=backend)
        return out.divergence

    return run


def _trl_chunked(x, topk: int | None, alpha: float) -> torch.Tensor:
    # TRL's beta has our alpha's meaning: mixture (1 − beta)·student + beta·teacher.
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    divergence, _entropy = ChunkedDivergenceFunction.apply(x.h_s, x.w_s, None, x.h_t, x.w_t, None, alpha)
    return divergence


def _liger_jsd(x, topk: int | None, alpha: float) -> torch.Tensor:
    # Liger's jsd_beta weights the teacher in the mixture exactly like our alpha; it returns the mean over tokens.
    from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

    loss = LigerFusedLinearJSD(jsd_beta=alpha)
    try:
        return loss(x.h_s, x.w_s, x.h_t, x.w_t, None)
    except TypeError:  # older Liger releases take no labels argument
        return loss(x.h_s, x.w_s, x.h_t, x.w_t)


class _FusedLSEHead(torch.autograd.Function):
    """A plain fused logsumexp head on our tiles and kernels: per token −log π_S(y), plus the teacher's LSE pass.

    The floor for "top-K, the teacher gather and the KL add ≤ 15%" (docs/performance.md): the same cuBLAS tiles, streaming
    row kernels, recomputing backward and GEMMs, without top-K, gather or divergence.
    """

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, targets, ops, opts):
        student = ops.student_stats(h_s, w_s, targets, opts)  # opts.topk is None: logsumexp and target only
        ops.teacher_stats(h_t, w_t, targets, opts, None)  # every SDPO head needs the teacher's normaliser
        ctx.save_for_backward(h_s, w_s, targets, student.max, student.log_sum, student.target_logit)
        ctx.ops, ctx.opts = ops, opts
        return student.log_sum - (student.target_logit - student.max)

    @staticmethod
    def backward(ctx, grad):
        h_s, w_s, targets, m, log_sum, z_y = ctx.saved_tensors
        # ∂(−log p_y)/∂z_j = p_j − δ_jy: the dense tile −c·p with c = −g, and the target's entry written
        g = grad.float() * ctx.opts.inv_temp
        p_y = torch.exp((z_y - m) - log_sum)
        spec = GradSpec(
            h_s, w_s, m, log_sum, -g, ctx.opts.inv_temp, targets, g * (p_y - 1), torch.ones_like(targets) > 0
        )
        grad_h, grad_w = linear_backward(spec, ctx.ops, True, True, ctx.opts.budget_bytes)
        return grad_h, grad_w, None, None, None, None, None


def _lse_triton(x, topk: int | None, alpha: float) -> torch.Tensor:
    from sdpo_fast.kernels.triton_head import TritonTiles

    opts = HeadOptions(None, True, alpha, 1.0, 256 * 2**20)
    return _FusedLSEHead.apply(x.h_s, x.w_s, x.h_t, x.w_t, x.targets, TritonTiles(), opts)


def cross_entropy_oracle(x, topk: int | None, alpha: float) -> torch.Tensor:
    """−log softmax(h_S Wᵀ)[y] from full fp32 logits: what `lse-triton` computes."""
    z = x.h_s.float() @ x.w_s.float().t()
    return torch.logsumexp(z, dim=1) - z.gather(1, x.targets.unsqueeze(1)).squeeze(1)


IMPLS = {
    "naive": _ours("naive"),
    "sdpo_fast-torch": _ours("torch"),
    "sdpo_fast-triton": _ours("triton"),
    "trl-chunked": _trl_chunked,
    "liger-jsd": _liger_jsd,
    "lse-triton": _lse_triton,
}
REFERENCES = {"lse-triton": cross_entropy_oracle}  # what the others are checked against: `oracle`


def oracle(x, topk: int | None, alpha: float) -> torch.Tensor:
    """The naive head: full logits in PyTorch (fp32 accumulation). topk=None: the exact full-vocabulary JSD."""
    return sdpo_head(x.h_s, x.w_s, x.h_t, x.w_t, x.targets, topk=topk, alpha=alpha, backend="naive").divergence


# ------------------------------------------------------------------------------------ measuring


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def fwd_bwd(fn, x, topk, alpha, rows: torch.Tensor | None = None) -> float:
    """One forward + backward of the mean divergence (over `rows` only, if given); returns the loss."""
    x.h_s.grad = None
    x.w_s.grad = None
    div = fn(x, topk, alpha).float()
    loss = div.mean() if rows is None else div[rows].mean()
    loss.backward()
    return loss.item()


def time_runs(fn, x, topk, alpha, device: str, warmup: int, runs: int) -> tuple[list[float], float]:
    """Milliseconds of each timed run (after `warmup` untimed ones) and the loss value."""
    for _ in range(warmup):
        loss = fwd_bwd(fn, x, topk, alpha)
    times = []
    for _ in range(runs):
        if device == "cuda":  # CUDA events: device time, not launch time
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = fwd_bwd(fn, x, topk, alpha)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            loss = fwd_bwd(fn, x, topk, alpha)
            times.append((time.perf_counter() - t0) * 1e3)
    return times, loss


def import_error(impl: str, job: dict) -> str | None:
    """Why `impl` cannot run in this worker: a module it needs failed to import (worker.import_all)."""
    from sweep import HEAD_IMPORTS

    failed = [f"{m}: {job['import_errors'][m]}" for m in HEAD_IMPORTS[impl] if m in job.get("import_errors", {})]
    return f"skipped: import failed ({'; '.join(failed)})" if failed else None


def run_case(job: dict) -> dict:
    """Measure the job's variants on one set of inputs, or, with job["cases"], on each case's inputs in turn.

    On the CPU a job holds one variant (peak RSS is per process, so each variant gets a fresh
    process; the parent subtracts the inputs-only process). On CUDA one process runs every N of a
    shape and all its variants, the allocator's peak reset between them; each finished case is
    printed at once (worker.CASE_PREFIX) so that a worker killed at its timeout keeps them.
    """
    if "cases" not in job:
        return _run_variants(job, job["tokens"], job["variants"])
    from worker import CASE_PREFIX

    done = []
    for case in job["cases"]:
        result = dict(tokens=case["tokens"], **_run_variants(job, case["tokens"], case["variants"]))
        print(CASE_PREFIX + json.dumps(result), flush=True)
        done.append(result)
    return {"cases": done}


def _run_variants(job: dict, tokens: int, variants: list) -> dict:
    device = job["device"]
    x = make_inputs(tokens, job["hidden"], job["vocab"], job["dtype"], device)
    results = []
    for impl, topk in variants:
        res = {"impl": impl, "topk": topk, "error": import_error(impl, job)}
        if res["error"]:
            results.append(res)
            continue
        try:
            base = _reset_peak(device)
            times, loss = time_runs(IMPLS[impl], x, topk, job["alpha"], device, job["warmup"], job["runs"])
            if device == "cuda":
                res["peak_mem_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            res.update(times_ms=times, median_ms=statistics.median(times), loss=loss)
            if not math.isfinite(loss):
                res["error"] = f"non-finite loss {loss}"
        except Exception as err:  # an OOM or a broken competitor is a result, not a crash
            res["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        x.h_s.grad = x.w_s.grad = None
        results.append(res)
    del x
    _reset_peak(device)  # the next case's inputs start from an empty cache
    return {"variants": results}


def _reset_peak(device: str) -> int:
    gc.collect()
    if device != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def inputs_only(job: dict) -> dict:
    """The CPU baseline: the same imports and inputs, no head."""
    make_inputs(job["tokens"], job["hidden"], job["vocab"], job["dtype"], job["device"])
    return {}


# ------------------------------------------------------------------------------------ correctness


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 (0 when both are zero)."""
    a, b = a.double(), b.double()
    den = b.norm().item()
    return (a - b).norm().item() / den if den > 0 else (a - b).norm().item()


def tie_free_rows(x, topk: int, rel_gap: float = 1e-5) -> torch.Tensor:
    """Rows whose K-th and (K+1)-th student logits differ by more than `rel_gap` (relative).

    Where they (nearly) tie, summation order decides which token is in the top-K, and the two
    choices give different, equally valid, losses and gradients for that row. Random inputs
    produce such rows now and then (1 in 512 at V=32000), so they are left out of the comparison.
    """
    with torch.no_grad():
        z = x.h_s.float() @ x.w_s.float().t()
        vals = torch.topk(z, min(topk + 1, z.shape[1]), dim=1).values
    if vals.shape[1] <= topk:
        return torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
    gap = vals[:, topk - 1] - vals[:, topk]
    return gap > rel_gap * vals[:, topk - 1].abs().clamp(min=1.0)


def check(job: dict) -> dict:
    """Each variant's loss and gradients against the naive oracle on one small set of inputs.

    Top-K variants are compared with the naive top-K head at the same K (on rows without a
    top-K tie); full-vocabulary competitors (TRL's chunked JSD, Liger's fused JSD) with the naive
    head at topk=None.
    """
    device, alpha = job["device"], job["alpha"]
    x = make_inputs(job["tokens"], job["hidden"], job["vocab"], job["dtype"], device)
    tol = job["tolerance"]
    refs: dict = {}
    out = []
    for impl, topk in job["variants"]:
        res = {"impl": impl, "topk": topk, "error": import_error(impl, job), "ok": False}
        if res["error"]:
            out.append(res)
            continue
        try:
            reference = REFERENCES.get(impl, oracle)
            if (reference, topk) not in refs:
                rows = None if topk is None else tie_free_rows(x, topk)
                refs[reference, topk] = (rows, *_loss_and_grads(reference, x, topk, alpha, rows))
            rows, *ref = refs[reference, topk]
            got = _loss_and_grads(IMPLS[impl], x, topk, alpha, rows)
            errs = {
                "loss_rel_err": abs(got[0] - ref[0]) / max(abs(ref[0]), 1e-30),
                "grad_h_rel_err": _rel(got[1], ref[1]),
                "grad_w_rel_err": _rel(got[2], ref[2]),
            }
            res.update(errs, loss=got[0], oracle_loss=ref[0])
            res["tie_rows"] = 0 if rows is None else int((~rows).sum())
            res["ok"] = (
                errs["loss_rel_err"] <= tol["loss"]
                and max(errs["grad_h_rel_err"], errs["grad_w_rel_err"]) <= tol["grad"]
            )
        except Exception as err:
            res["error"] = f"{type(err).__name__}: {err}".strip()
        out.append(res)
    return {"variants": out}


def _loss_and_grads(fn, x, topk, alpha, rows) -> tuple[float, torch.Tensor, torch.Tensor]:
    loss = fwd_bwd(fn, x, topk, alpha, rows)
    return loss, x.h_s.grad.detach().clone(), x.w_s.grad.detach().clone()
