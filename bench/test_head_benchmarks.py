"""pytest-benchmark microbenchmarks of the SDPO head backends at small CPU shapes, for regression tracking.

    pytest bench/ --benchmark-only                      # not part of the default `pytest` (testpaths = tests/)
    pytest bench/ --benchmark-only --benchmark-autosave # then --benchmark-compare to track regressions

Each benchmark also checks its result against the naive head once, so a fast but wrong backend fails.
The Triton backend runs only on CUDA; it is never run under the Triton interpreter here.
"""

from __future__ import annotations

import functools

import pytest
import torch

from sdpo_fast import sdpo_head

SHAPES = {"N256-H64-V8192": (256, 64, 8192), "N512-H128-V16384": (512, 128, 16384)}
BACKENDS = ("naive", "torch", "triton")


def _device(backend: str) -> str:
    if backend == "triton":
        if not torch.cuda.is_available():
            pytest.skip("backend='triton' needs a CUDA GPU (the benchmark never uses the Triton interpreter)")
        return "cuda"
    return "cpu"


@functools.cache
def _inputs(shape: str, device: str):
    n, hidden, vocab = SHAPES[shape]
    g = torch.Generator(device=device).manual_seed(0)
    h_s = torch.randn(n, hidden, generator=g, device=device).requires_grad_()
    w_s = (0.05 * torch.randn(vocab, hidden, generator=g, device=device)).requires_grad_()
    h_t = h_s.detach() + 0.3 * torch.randn(n, hidden, generator=g, device=device)
    w_t = w_s.detach() + 0.01 * torch.randn(vocab, hidden, generator=g, device=device)
    targets = torch.randint(0, vocab, (n,), generator=g, device=device)
    return h_s, w_s, h_t, w_t, targets


def _fwd_bwd(inputs, backend: str, topk: int | None, rows: torch.Tensor | None = None):
    h_s, w_s, h_t, w_t, targets = inputs
    h_s.grad = w_s.grad = None
    div = sdpo_head(h_s, w_s, h_t, w_t, targets, topk=topk, backend=backend).divergence
    loss = div.mean() if rows is None else div[rows].mean()
    loss.backward()
    if h_s.is_cuda:
        torch.cuda.synchronize()
    return loss.item(), w_s.grad


def _tie_free_rows(inputs, topk: int | None) -> torch.Tensor | None:
    """Rows whose K-th and (K+1)-th logits are distinct: at a near-tie summation order picks the top-K."""
    if topk is None:
        return None
    h_s, w_s = inputs[0].detach(), inputs[1].detach()
    vals = torch.topk(h_s @ w_s.t(), topk + 1, dim=1).values
    return (vals[:, topk - 1] - vals[:, topk]) > 1e-5 * vals[:, topk - 1].abs().clamp(min=1.0)


def _assert_matches_naive(inputs, backend: str, topk: int | None) -> None:
    rows = _tie_free_rows(inputs, topk)
    loss, grad_w = _fwd_bwd(inputs, backend, topk, rows)
    grad_w = grad_w.clone()
    ref_loss, ref_grad_w = _fwd_bwd(inputs, "naive", topk, rows)
    assert loss == pytest.approx(ref_loss, rel=1e-4)
    assert ((grad_w - ref_grad_w).norm() / ref_grad_w.norm()).item() < 1e-3


@pytest.mark.parametrize("topk", [100, 20, None], ids=["K100", "K20", "fullV"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_head_forward_backward(benchmark, shape, backend, topk):
    inputs = _inputs(shape, _device(backend))
    if backend != "naive":
        _assert_matches_naive(inputs, backend, topk)
    n, hidden, vocab = SHAPES[shape]
    benchmark.extra_info.update(tokens=n, hidden=hidden, vocab=vocab, topk=topk, flops=8 * n * hidden * vocab)
    loss, _ = benchmark.pedantic(_fwd_bwd, args=(inputs, backend, topk), rounds=3, warmup_rounds=1)
    assert torch.isfinite(torch.tensor(loss))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_head_forward(benchmark, shape, backend):
    h_s, w_s, h_t, w_t, targets = _inputs(shape, _device(backend))

    def forward():
        with torch.no_grad():
            out = sdpo_head(h_s, w_s, h_t, w_t, targets, topk=100, backend=backend)
        if h_s.is_cuda:
            torch.cuda.synchronize()
        return out

    out = benchmark.pedantic(forward, rounds=3, warmup_rounds=1)
    assert torch.isfinite(out.divergence).all() and (out.divergence >= -1e-6).all()
