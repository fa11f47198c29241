"""`sdpo_head` (naive and chunked-torch backends) against the independent float64 oracle."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracle import oracle_head

from sdpo_fast import sdpo_head
from sdpo_fast.head import resolve_backend


def make_inputs(n, h, v, seed=0, dtype=torch.float64, scale=1.0, teacher_h=None):
    g = torch.Generator().manual_seed(seed)
    th = teacher_h or h
    h_s = (torch.randn(n, h, generator=g, dtype=torch.float64) * scale).to(dtype)
    w_s = (torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5 * 3).to(dtype)
    h_t = (torch.randn(n, th, generator=g, dtype=torch.float64) * scale).to(dtype)
    w_t = (torch.randn(v, th, generator=g, dtype=torch.float64) / th**0.5 * 3).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    return h_s, w_s, h_t, w_t, y


def oracle_with_grads(h_s, w_s, h_t, w_t, y, g_div, g_lp, **kw):
    hs = h_s.detach().double().requires_grad_(True)
    ws = w_s.detach().double().requires_grad_(True)
    div, lp_s, lp_t = oracle_head(hs, ws, h_t, w_t, y, **kw)
    ((div * g_div.double()).sum() + (lp_s * g_lp.double()).sum()).backward()
    return div.detach(), lp_s.detach(), lp_t.detach(), hs.grad, ws.grad


def run_head(backend, h_s, w_s, h_t, w_t, y, g_div, g_lp, budget_mb=256, **kw):
    # the Triton backend runs on the GPU where there is one (else in the CPU interpreter); results come back to the CPU
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    hs = h_s.detach().clone().to(dev).requires_grad_(True)
    ws = w_s.detach().clone().to(dev).requires_grad_(True)
    h_t, w_t, y, g_div, g_lp = (t.to(dev) for t in (h_t, w_t, y, g_div, g_lp))
    out = sdpo_head(hs, ws, h_t, w_t, y, backend=backend, memory_budget_mb=budget_mb, **kw)
    (
        (out.divergence * g_div.to(out.divergence.dtype)).sum()
        + (out.student_logprob * g_lp.to(out.divergence.dtype)).sum()
    ).backward()
    got = (out.divergence, out.student_logprob, out.teacher_logprob, hs.grad, ws.grad)
    return tuple(t.detach().cpu() for t in got)


def _tail_conditioning(h_s, w_s, topk, add_tail, temperature) -> float:
    """How much fp32 rounding is amplified by the tail bucket: log(1 − m) has slope 1/(1 − m).

    When the student's top-K holds almost all the mass m, any low-precision backend (and the
    reference itself, which works on bf16 logits) loses that many digits; float64 inputs do not.
    """
    if topk is None or not add_tail:
        return 1.0
    logp = torch.log_softmax((h_s.double() @ w_s.double().t()) / temperature, dim=-1)
    mass = torch.logsumexp(torch.topk(logp, topk, dim=-1).values, dim=-1).exp().max().item()
    return min(max(1.0, 1e-2 / max(1.0 - mass, 1e-12)), 1e3)


def assert_matches_oracle(
    backend,
    n,
    h,
    v,
    *,
    topk,
    add_tail,
    alpha,
    temperature=1.0,
    dtype=torch.float64,
    seed=0,
    budget_mb=256,
    tol=1e-9,
    teacher_h=None,
):
    h_s, w_s, h_t, w_t, y = make_inputs(n, h, v, seed, dtype, teacher_h=teacher_h)
    g = torch.Generator().manual_seed(seed + 1)
    g_div, g_lp = torch.randn(n, generator=g), torch.randn(n, generator=g)
    kw = dict(topk=topk, add_tail=add_tail, alpha=alpha, temperature=temperature)
    expected = oracle_with_grads(h_s, w_s, h_t, w_t, y, g_div, g_lp, **kw)
    got = run_head(backend, h_s, w_s, h_t, w_t, y, g_div, g_lp, budget_mb=budget_mb, **kw)
    # gradients come back in the input dtype: allow one final rounding (half an ulp) on top of `tol`
    rounding = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}.get(dtype, 0.0)
    # on a GPU the Triton backend also rounds the fp32 gradient tile once to the half dtype for the
    # tensor-core GEMMs dh = dz·W, dW = dzᵀ·h (fp32 accumulation): an error relative to the largest gradient
    gemm_rounding = rounding if backend == "triton" and torch.cuda.is_available() else 0.0
    tol = tol * _tail_conditioning(h_s, w_s, topk, add_tail, temperature) if dtype != torch.float64 else tol
    for name, a, b in zip(["divergence", "student_logprob", "teacher_logprob", "grad_h", "grad_w"], got, expected):
        is_grad = name.startswith("grad")
        assert a.dtype == (dtype if is_grad else (torch.float64 if dtype == torch.float64 else torch.float32))
        scale = max(float(b.abs().max()), 1.0)
        allowed = tol * scale + (rounding * b.abs() + gemm_rounding * scale if is_grad else 0.0)
        excess = float(((a.double() - b).abs() - allowed).max())
        assert excess <= 0, (
            f"{backend} {name}: error exceeds the tolerance by {excess:.3e} (tol {tol}, scale {scale:.3g})"
        )


@pytest.mark.parametrize("backend", ["naive", "torch"])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize(("topk", "add_tail"), [(5, True), (5, False), (None, True)])
def test_backends_match_oracle_float64(backend, alpha, topk, add_tail):
    assert_matches_oracle(backend, 13, 16, 97, topk=topk, add_tail=add_tail, alpha=alpha, temperature=0.7)


def test_torch_backend_tiny_budget_many_tiles_and_odd_shapes():
    # a 1 MiB budget forces many row and vocabulary tiles; V not a multiple of 128; K not a power of two
    for topk in (7, 130, None):
        assert_matches_oracle("torch", 301, 24, 1000, topk=topk, add_tail=True, alpha=0.5, budget_mb=0.05, seed=3)


def test_single_row_and_k_equals_v():
    assert_matches_oracle("torch", 1, 8, 33, topk=33, add_tail=False, alpha=1.0)
    assert_matches_oracle("torch", 1, 8, 33, topk=1, add_tail=True, alpha=0.0)


def test_teacher_with_a_different_hidden_size():
    # the trust-region teacher concatenates two hidden states: H_T = 2·H
    assert_matches_oracle("torch", 9, 8, 50, topk=6, add_tail=True, alpha=0.5, teacher_h=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_keep_fp32_accumulation(dtype):
    # The oracle sees the *same rounded* inputs in float64, so the only error left is fp32 accumulation.
    tol = 2e-4
    for backend in ("naive", "torch"):
        assert_matches_oracle(backend, 17, 32, 257, topk=10, add_tail=True, alpha=0.5, dtype=dtype, tol=tol)
        assert_matches_oracle(backend, 17, 32, 257, topk=None, add_tail=True, alpha=1.0, dtype=dtype, tol=tol)


def test_outputs_are_fp32_and_teacher_gets_no_gradient():
    h_s, w_s, h_t, w_t, y = make_inputs(5, 8, 40, dtype=torch.bfloat16)
    h_t.requires_grad_(True)
    w_t.requires_grad_(True)
    hs = h_s.clone().requires_grad_(True)
    out = sdpo_head(hs, w_s, h_t, w_t, y, topk=4, backend="torch")
    assert all(t.dtype == torch.float32 for t in out)
    (out.divergence.sum() + out.student_logprob.sum()).backward()
    assert h_t.grad is None and w_t.grad is None and hs.grad is not None and hs.grad.dtype == torch.bfloat16
    assert not out.teacher_logprob.requires_grad


@pytest.mark.parametrize("backend", ["naive", "torch", "triton"])
@pytest.mark.parametrize("topk", [4, None])
def test_zero_rows(backend, topk):
    # the trainer calls the head with N = 0 for every micro-batch without a scored token
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    h_s, w_s, h_t, w_t, y = (t.to(dev) for t in make_inputs(0, 8, 40, dtype=torch.float32))
    hs = h_s.requires_grad_(True)
    ws = w_s.clone().requires_grad_(True)
    out = sdpo_head(hs, ws, h_t, w_t, y, topk=topk, backend=backend)
    assert out.divergence.shape == out.student_logprob.shape == (0,)
    (out.divergence.sum() + 0.0 * ws.sum()).backward()
    assert ws.grad is not None and torch.count_nonzero(ws.grad) == 0


def test_head_ignores_an_enclosing_autocast():
    # The trainer runs the head inside the model's forward under `accelerator.autocast()` (bf16 by default).
    h_s, w_s, h_t, w_t, y = make_inputs(17, 32, 257, dtype=torch.float32)
    for backend in ("naive", "torch"):
        plain = sdpo_head(h_s, w_s, h_t, w_t, y, topk=10, backend=backend)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = sdpo_head(h_s, w_s, h_t, w_t, y, topk=10, backend=backend)
        for a, b in zip(plain, autocast):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_unused_outputs():
    h_s, w_s, h_t, w_t, y = make_inputs(6, 8, 40, dtype=torch.float64)
    hs = h_s.requires_grad_(True)
    out = sdpo_head(hs, w_s, h_t, w_t, y, topk=4, backend="torch")
    out.divergence.sum().backward()  # student_logprob unused: its gradient is None
    assert torch.isfinite(hs.grad).all()


def test_identical_student_and_teacher_give_zero_divergence():
    h_s, w_s, _, _, y = make_inputs(7, 8, 60)
    for backend in ("naive", "torch"):
        for topk in (5, None):
            out = sdpo_head(h_s, w_s, h_s, w_s, y, topk=topk, backend=backend)
            assert out.divergence.abs().max() < 1e-12
            torch.testing.assert_close(out.student_logprob, out.teacher_logprob)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"topk": 41}, "exceeds the vocabulary size V=40"),
        ({"topk": 0}, "positive int"),
        ({"alpha": 1.2}, "outside"),
        ({"temperature": 0.0}, "temperature"),
        ({"backend": "cuda"}, "Unknown backend"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, message):
    h_s, w_s, h_t, w_t, y = make_inputs(3, 8, 40, dtype=torch.float32)
    with pytest.raises((ValueError, RuntimeError), match=message):
        sdpo_head(h_s, w_s, h_t, w_t, y, **{"topk": 4, **kwargs})


def test_bad_shapes_are_clear_errors():
    h_s, w_s, h_t, w_t, y = make_inputs(3, 8, 40, dtype=torch.float32)
    with pytest.raises(ValueError, match="hidden sizes differ"):
        sdpo_head(h_s, w_s[:, :4], h_t, w_t, y, topk=4)
    with pytest.raises(ValueError, match="vocabularies differ"):
        sdpo_head(h_s, w_s, h_t, w_t[:30], y, topk=4)
    with pytest.raises(ValueError, match="target_ids must lie"):
        sdpo_head(h_s, w_s, h_t, w_t, y + 40, topk=4)
    with pytest.raises(ValueError, match="same positions"):
        sdpo_head(h_s, w_s, h_t[:2], w_t, y, topk=4)
    with pytest.raises(ValueError, match="int64"):
        sdpo_head(h_s, w_s, h_t, w_t, y.float(), topk=4)


def test_auto_picks_torch_where_triton_has_no_tensor_cores(monkeypatch):
    import sdpo_fast.head as head

    assert head.triton_has_tensor_cores((9, 0), "3.9.0") and head.triton_has_tensor_cores((8, 0), "3.3.0")
    assert head.triton_has_tensor_cores((7, 5), "3.2.0")  # Triton ≤ 3.2 still used Turing's mma
    assert not head.triton_has_tensor_cores((7, 5), "3.3.1") and not head.triton_has_tensor_cores((7, 5), "3.10.0")
    assert not head.triton_has_tensor_cores((7, 5), "3.5+git1a2b") and head.triton_has_tensor_cores((7, 5), "3.2.0+rc1")
    monkeypatch.setattr(head, "triton_available", lambda: True)
    monkeypatch.setattr(head, "triton_has_tensor_cores", lambda capability: capability >= (8, 0))
    for capability, expected in (((7, 5), "torch"), ((8, 6), "triton"), ((9, 0), "triton")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert resolve_backend("auto", torch.device("cuda")) == expected
    assert resolve_backend("triton", torch.device("cuda")) == "triton"  # asked for explicitly: still runs
    # the Triton kernels hold the running top-K in registers (K ≤ 256): auto falls back to torch above that
    assert resolve_backend("auto", torch.device("cuda"), topk=256) == "triton"
    assert resolve_backend("auto", torch.device("cuda"), topk=257) == "torch"
    assert resolve_backend("auto", torch.device("cuda"), topk=None) == "triton"


def test_auto_backend_and_triton_on_cpu_error(monkeypatch):
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        resolve_backend("triton", torch.device("cpu"))


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 20),
    h=st.integers(1, 12),
    v=st.integers(2, 300),
    k_frac=st.floats(0.0, 1.0),
    full=st.booleans(),
    alpha=st.sampled_from([0.0, 0.3, 0.5, 1.0]),
    add_tail=st.booleans(),
    temperature=st.sampled_from([0.5, 1.0, 1.7]),
    budget=st.sampled_from([0.01, 1.0]),
    seed=st.integers(0, 10_000),
)
def test_fuzz_torch_backend_against_oracle(n, h, v, k_frac, full, alpha, add_tail, temperature, budget, seed):
    topk = None if full else max(1, round(k_frac * v))
    assert_matches_oracle(
        "torch",
        n,
        h,
        v,
        topk=topk,
        add_tail=add_tail,
        alpha=alpha,
        temperature=temperature,
        budget_mb=budget,
        seed=seed,
        tol=1e-8,
    )
