"""The Triton head and the trainer on a real GPU, at model scale.

The CPU suite checks the kernels' maths at small shapes through the Triton interpreter and compiles
every configuration ahead of time; what only hardware shows is checked here: real vocabularies
(V=151936: many cuBLAS tiles, 16-column blocks, thousands of programs, real atomics and barriers),
half-precision tensor-core GEMMs, the exact tails at model scale, the candidate-overflow fallback,
the memory bound at 16k tokens, and a training step through `backend="auto"`. Skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch
from oracle import oracle_head

from sdpo_fast import SDPOConfig, sdpo_head
from sdpo_fast.head import resolve_backend

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _inputs(n, hidden, vocab, dtype, seed=0):
    """The benchmark's inputs: h_S ~ N(0, 1), W ~ 0.05·N(0, 1), a teacher close to the student."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    h_s = torch.randn(n, hidden, device="cuda", generator=g)
    w_s = torch.randn(vocab, hidden, device="cuda", generator=g) * 0.05
    h_t = h_s + 0.3 * torch.randn(n, hidden, device="cuda", generator=g)
    w_t = w_s + 0.01 * torch.randn(vocab, hidden, device="cuda", generator=g)
    y = torch.randint(0, vocab, (n,), device="cuda", generator=g)
    return h_s.to(dtype), w_s.to(dtype), h_t.to(dtype), w_t.to(dtype), y


def _tie_rows(h_s, w_s, topk, rel_gap=1e-5):
    """Rows whose K-th and (K+1)-th logits (nearly) tie: summation order may pick either token."""
    if topk is None:
        return torch.zeros(h_s.shape[0], dtype=torch.bool, device=h_s.device)
    vals = torch.topk(h_s.double() @ w_s.double().t(), topk + 1, dim=1).values
    return (vals[:, topk - 1] - vals[:, topk]) <= rel_gap * vals[:, topk - 1].abs().clamp(min=1.0)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


@pytest.mark.parametrize(
    ("hidden", "vocab", "n", "topk", "dtype"),
    [
        (896, 151936, 256, 100, torch.bfloat16),  # Qwen2.5-0.5B's lm_head
        (896, 151936, 256, None, torch.bfloat16),  # the exact full-vocabulary JSD
        (1000, 50257, 300, 77, torch.float16),  # H, V and K off every block size; T4's dtype
        (2048, 128256, 1, 20, torch.bfloat16),  # Llama-3.2-1B, one row
        (256, 32000, 129, 256, torch.float32),  # the largest K, fp32 (IEEE products)
    ],
)
def test_triton_matches_float64_oracle_at_model_scale(hidden, vocab, n, topk, dtype):
    h_s, w_s, h_t, w_t, y = _inputs(n, hidden, vocab, dtype)
    ties = _tie_rows(h_s, w_s, topk)
    g = torch.Generator(device="cuda").manual_seed(1)
    g_div = torch.randn(n, device="cuda", generator=g).masked_fill(ties, 0.0)  # tied rows: no gradient either way
    g_lp = torch.randn(n, device="cuda", generator=g)

    hs, ws = h_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
    out = sdpo_head(hs, ws, h_t, w_t, y, topk=topk, alpha=0.5, backend="triton")
    ((out.divergence * g_div).sum() + (out.student_logprob * g_lp).sum()).backward()

    hs64, ws64 = h_s.double().requires_grad_(True), w_s.double().requires_grad_(True)
    div, lp_s, lp_t = oracle_head(hs64, ws64, h_t.double(), w_t.double(), y, topk=topk, add_tail=True, alpha=0.5)
    ((div * g_div.double()).sum() + (lp_s * g_lp.double()).sum()).backward()

    ok = ~ties
    assert all(t.dtype == torch.float32 for t in out)
    assert int(ok.sum()) >= 0.8 * n
    # the oracle sees the same rounded inputs: what is left is fp32 accumulation (the tail adds no amplification)
    torch.testing.assert_close(out.divergence[ok].double(), div[ok], rtol=2e-4, atol=2e-6)
    torch.testing.assert_close(out.student_logprob.double(), lp_s, rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(out.teacher_logprob.double(), lp_t, rtol=1e-4, atol=2e-4)
    # gradients come back in the input dtype: one rounding of 2⁻⁸ (bf16) on top of fp32 accumulation
    grad_tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}[dtype]
    assert hs.grad.dtype == dtype and ws.grad.dtype == dtype
    assert _rel(hs.grad, hs64.grad) < grad_tol
    assert _rel(ws.grad, ws64.grad) < grad_tol


def test_triton_and_torch_backends_agree_on_many_rows():
    h_s, w_s, h_t, w_t, y = _inputs(4096, 896, 151936, torch.bfloat16, seed=3)
    ties = _tie_rows(h_s, w_s, 100)
    outs, grads = {}, {}
    for backend in ("triton", "torch"):
        hs, ws = h_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
        outs[backend] = sdpo_head(hs, ws, h_t, w_t, y, topk=100, backend=backend)
        outs[backend].divergence.masked_fill(ties, 0.0).mean().backward()
        grads[backend] = (hs.grad.float(), ws.grad.float())
    ok = ~ties
    torch.testing.assert_close(outs["triton"].divergence[ok], outs["torch"].divergence[ok], rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(outs["triton"].student_logprob, outs["torch"].student_logprob, rtol=1e-5, atol=1e-4)
    for a, b in zip(grads["triton"], grads["torch"]):
        assert _rel(a, b) < 1e-2


def _confident_inputs(n, hidden, vocab, k, gap, shift, seed=0, device="cuda"):
    """Small-integer inputs (exact logits in fp32, and in bf16): the student's K lifted ids sit `gap` nats above
    the rest (four features of ±1 noise), the teacher's mode is two other ids, and every logit is shifted by
    `shift` (e.g. 1e4)."""
    g = torch.Generator(device=device).manual_seed(seed)
    h = torch.zeros(n, hidden, device=device)
    h[:, :3] = torch.tensor([1.0, 1.0, shift / 100], device=device)  # bias features: student lift, teacher, shift
    h[:, 3:7] = torch.randint(-1, 2, (n, 4), device=device, generator=g).float()
    w_s = torch.zeros(vocab, hidden, device=device)
    w_s[:, 3:7] = torch.randint(-1, 2, (vocab, 4), device=device, generator=g).float()
    w_t = w_s.clone()
    ids = torch.randperm(vocab, device=device, generator=g)
    w_s[ids[:k], 0] = gap
    w_t[ids[k : k + 2], 1] = gap
    w_s[:, 2] = w_t[:, 2] = 100.0
    y = torch.randint(0, vocab, (n,), device=device, generator=g)
    y[: n // 2] = ids[0]
    return h, w_s, h.clone(), w_t, y


# p_tail ≈ 4e−4, 2e−5 and 4e−8 (clamped) at V=151936, K=20
@pytest.mark.parametrize(("gap", "shift"), [(17, 0.0), (20, 1e4), (26, -1e4)])
def test_exact_tails_at_model_scale(gap, shift):
    """The exact tails (docs/kernels.md, "Exact in fp32"): forward KL with a confident student and the teacher's mode
    outside its top-K, in fp32 (fp32 GEMMs, so the gradients too must match the float64 oracle to 1e−5) at a real
    vocabulary."""
    h_s, w_s, h_t, w_t, y = _confident_inputs(64, 64, 151936, 20, gap, shift)
    g_lp = torch.randn(64, device="cuda")
    for alpha in (0.0, 0.5, 1.0):
        hs, ws = h_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
        out = sdpo_head(hs, ws, h_t, w_t, y, topk=20, alpha=alpha, backend="triton")
        (out.divergence.sum() + (out.student_logprob * g_lp).sum()).backward()
        hs64, ws64 = h_s.double().requires_grad_(True), w_s.double().requires_grad_(True)
        div, lp_s, _ = oracle_head(hs64, ws64, h_t.double(), w_t.double(), y, topk=20, add_tail=True, alpha=alpha)
        (div.sum() + (lp_s * g_lp.double()).sum()).backward()
        torch.testing.assert_close(out.divergence.double(), div, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(out.student_logprob.double(), lp_s, rtol=1e-5, atol=1e-7)
        # dh sums V = 151936 terms of mixed sign per feature in fp32: its accumulation alone reaches ~1.6e−5 here
        # (measured with the torch backend on the CPU); dW sums only N = 64 rows
        assert _rel(hs.grad, hs64.grad) < 5e-5 and _rel(ws.grad, ws64.grad) < 1e-5


def test_ascending_logits_overflow_the_candidates_and_stay_exact():
    """Logits rising along the vocabulary beat every threshold: the rows are redone by the torch backend."""
    n, hidden, vocab = 8, 16, 151936
    h = torch.zeros(n, hidden, device="cuda")
    h[:, 0] = 1.0
    w = torch.zeros(vocab, hidden, device="cuda")
    w[:, 0] = torch.arange(vocab, device="cuda") * 1e-4
    w[:, 1:] = 0.01 * torch.randn(vocab, hidden - 1, device="cuda")
    h[:, 1:] = torch.randn(n, hidden - 1, device="cuda")
    y = torch.randint(0, vocab, (n,), device="cuda")
    ref = sdpo_head(h, w, h, w * 0.9, y, topk=100, backend="torch")
    got = sdpo_head(h, w, h, w * 0.9, y, topk=100, backend="triton")
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_triton_peak_memory_is_far_below_one_full_logit_copy():
    """16k tokens of Qwen2.5-0.5B: naive holds several (N, V) fp32 buffers of 9.3 GiB each."""
    n, hidden, vocab = 16384, 896, 151936
    h_s, w_s, h_t, w_t, y = _inputs(n, hidden, vocab, torch.bfloat16)
    h_s.requires_grad_(True)
    w_s.requires_grad_(True)
    sdpo_head(h_s, w_s, h_t, w_t, y, topk=100, backend="triton").divergence.mean().backward()  # compile, autotune
    h_s.grad = w_s.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    sdpo_head(h_s, w_s, h_t, w_t, y, topk=100, backend="triton").divergence.mean().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # The goal: ≥ 10× below naive, which holds at least the student's and the teacher's (N, V) fp32 logits.
    # Ours: the 256 MiB tile budget, dW (bf16, plus an fp32 chunk), dh, and the (N, splits·KP) top-K keys.
    naive_floor = 2 * n * vocab * 4
    assert extra < naive_floor / 10, f"{extra / 2**20:.0f} MiB extra"
    assert torch.isfinite(w_s.grad.float()).all()


def test_trainer_step_on_cuda_uses_the_fused_head(tmp_path):
    from tiny_setup import make_trainer

    trainer = make_trainer(
        tmp_path, use_cpu=False, bf16=True, max_steps=2, sdpo=SDPOConfig(distillation_topk=10, teacher_dtype="float32")
    )
    # auto: the Triton head (cuBLAS tiles + row kernels) on every GPU from sm_75, by AUTO_TABLE
    assert trainer.sdpo_backend == resolve_backend("auto", torch.device("cuda"), 10) == "triton"
    assert next(trainer.model.parameters()).is_cuda
    before = [p.detach().clone() for p in trainer.ref_model.parameters()]
    trainer.train()
    logs = [h for h in trainer.state.log_history if "sdpo/loss" in h]
    assert logs and all(torch.isfinite(torch.tensor(h["sdpo/loss"])) for h in logs)
    moved = sum(float((p.detach() - b).abs().sum()) for p, b in zip(trainer.ref_model.parameters(), before))
    assert moved > 0  # the EMA teacher moved


def test_one_scorer_gives_an_exact_first_pass_ratio_in_bf16_on_cuda(tmp_path, monkeypatch):
    """bf16 autocast on the GPU, TRL's scorer replaced by a bf16-rounding stand-in: the first pass is still exact.

    Also times the re-scoring pass against the whole step (the one scorer's cost; printed with -s).
    """
    import time

    from test_dropin import _first_pass_log_ratios
    from tiny_setup import make_trainer

    trainer = make_trainer(tmp_path, use_cpu=False, bf16=True, max_steps=2, num_iterations=2)
    real = trainer.objective.rescore
    spent = []

    def timed(model, inputs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        real(model, inputs)
        torch.cuda.synchronize()
        spent.append(time.perf_counter() - t0)

    monkeypatch.setattr(trainer.objective, "rescore", timed)
    t0 = time.perf_counter()
    seen = _first_pass_log_ratios(trainer, monkeypatch)
    total = time.perf_counter() - t0
    assert torch.equal(seen[0], torch.zeros_like(seen[0])) and seen[1].abs().max() > 0
    print(
        f"one scorer: {sum(spent) * 1e3:.1f} ms re-scoring in {total * 1e3:.0f} ms of training ({len(spent)} batches)"
    )
