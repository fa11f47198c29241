"""The head's teacher diagnostics and the clipped forward KL, in every backend, against float64 written from the
formulas (full softmax here: the oracle may build (N, V); the heads never do)."""

from __future__ import annotations

import math
import os

import pytest
import torch

from sdpo_fast import sdpo_head

BACKENDS = ["naive", "torch"] + (
    ["triton"] if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1" else []
)


def _inputs(n=6, h=16, v=150, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, h, generator=g, dtype=torch.float64)
    ws = torch.randn(v, h, generator=g, dtype=torch.float64) * scale
    ht = torch.randn(n, h, generator=g, dtype=torch.float64)
    wt = torch.randn(v, h, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, v, (n,), generator=g)
    return hs, ws, ht, wt, y


def _oracle_stats(hs, ws, ht, wt, k):
    student = torch.softmax(hs @ ws.T, -1)
    teacher = torch.softmax(ht @ wt.T, -1)
    stats = []
    for i in range(hs.shape[0]):
        top = [int(j) for j in torch.argsort(-student[i], stable=True)[:k]]
        inside = [float(teacher[i, j]) for j in top]
        tail = sum(float(teacher[i, j]) for j in range(ws.shape[0]) if j not in top)
        entropy = -sum(p * math.log(p) for p in [*inside, tail] if p > 0)
        stats.append([sum(inside), tail, entropy])
    return torch.tensor(stats, dtype=torch.float64)


def _oracle_clipped_forward_kl(hs, ws, ht, wt, k, clip):
    s_log = torch.log_softmax(hs @ ws.T, -1)
    t_log = torch.log_softmax(ht @ wt.T, -1)
    out = []
    for i in range(hs.shape[0]):
        top = torch.argsort(-s_log[i], stable=True)[:k]
        rest = torch.ones_like(s_log[i], dtype=torch.bool)
        rest[top] = False
        s_b = torch.cat([s_log[i, top], torch.logsumexp(s_log[i, rest], 0, keepdim=True)])
        t_b = torch.cat([t_log[i, top], torch.logsumexp(t_log[i, rest], 0, keepdim=True)])
        terms = torch.exp(t_b) * (t_b - s_b)
        out.append(torch.clamp(terms, max=clip).sum())
    return torch.stack(out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1.0, 8.0])  # 8: confident rows, the top-K holds almost all the mass
def test_teacher_stats_match_the_oracle(backend, scale):
    hs, ws, ht, wt, y = _inputs(scale=scale)
    dtype = torch.float32 if backend == "triton" else torch.float64
    args = [t.to(dtype) for t in (hs, ws, ht, wt)]
    out, stats = sdpo_head(*args, y, topk=5, backend=backend, teacher_stats=True)
    expected = _oracle_stats(hs, ws, ht, wt, 5)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(stats.double(), expected, rtol=tol, atol=tol)
    assert torch.all(stats[:, 2] <= math.log(6) + 1e-6)  # at most log(K+1)
    plain = sdpo_head(*args, y, topk=5, backend=backend)
    assert torch.equal(plain.divergence, out.divergence)  # asking for the stats changes nothing else


@pytest.mark.parametrize("backend", BACKENDS)
def test_clipped_forward_kl_matches_the_oracle_and_its_gradient(backend):
    hs, ws, ht, wt, y = _inputs(scale=3.0, seed=1)
    dtype = torch.float32 if backend == "triton" else torch.float64
    h = hs.to(dtype).clone().requires_grad_(True)
    out = sdpo_head(h, ws.to(dtype), ht.to(dtype), wt.to(dtype), y, topk=4, alpha=0.0, kl_clip=0.05, backend=backend)
    expected = _oracle_clipped_forward_kl(hs, ws, ht, wt, 4, 0.05)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(out.divergence.double(), expected, rtol=tol, atol=tol)
    unclipped = sdpo_head(hs.to(dtype), ws.to(dtype), ht.to(dtype), wt.to(dtype), y, topk=4, alpha=0.0, backend=backend)
    assert (out.divergence < unclipped.divergence - 1e-6).any()  # the clip binds somewhere in this regime
    # the gradient against autograd through the float64 oracle
    h64 = hs.clone().requires_grad_(True)
    _oracle_clipped_forward_kl(h64, ws, ht, wt, 4, 0.05).sum().backward()
    out.divergence.sum().backward()
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=10 * tol, atol=10 * tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_teacher_values_reach_the_stats(backend):
    hs, ws, ht, wt, y = _inputs()
    ht = ht.clone()
    ht[2, 0] = math.nan
    dtype = torch.float32 if backend == "triton" else torch.float64
    _, stats = sdpo_head(*(t.to(dtype) for t in (hs, ws, ht, wt)), y, topk=5, backend=backend, teacher_stats=True)
    assert torch.isnan(stats[2]).all() and torch.isfinite(stats[[0, 1, 3, 4, 5]]).all()


def test_kl_clip_is_refused_where_it_has_no_meaning():
    hs, ws, ht, wt, y = _inputs()
    with pytest.raises(ValueError, match=r"alpha=0\.0"):
        sdpo_head(hs, ws, ht, wt, y, topk=5, alpha=0.5, kl_clip=1.0)
    with pytest.raises(ValueError, match="integer topk"):
        sdpo_head(hs, ws, ht, wt, y, topk=None, alpha=0.0, kl_clip=1.0)


def test_full_vocabulary_has_no_bucket_stats():
    hs, ws, ht, wt, y = _inputs()
    _, stats = sdpo_head(hs, ws, ht, wt, y, topk=None, backend="torch", teacher_stats=True)
    assert stats.shape == (6, 3) and torch.isnan(stats).all()
