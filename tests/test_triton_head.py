"""The Triton backend against the float64 oracle, run on the CPU through the Triton interpreter.

Its GEMMs are torch matmuls (cuBLAS on a GPU, CPU BLAS here) and its row kernels only ever see fp32 tiles, so
bf16 and fp16 inputs take the same kernel paths as fp32 ones. Shapes stay small: the interpreter emulates every
program in numpy; its fixed configuration uses 32-column blocks and 64-column tiles, so these shapes still span
many blocks, tiles and (for few rows) two column splits per row.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_head import (
    EXACT_GAPS,
    EXACT_SHIFTS,
    assert_exact,
    assert_matches_oracle,
    assert_weight_gather_is_transparent,
    exact_inputs,
    host_syncs,
    make_inputs,
)

from sdpo_fast import sdpo_head

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA or TRITON_INTERPRET=1 (set by tests/conftest.py on CPU machines)",
)
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter runs on CPU tensors
FP32_TOL = 1e-5  # fp32 accumulation of random logits; the tail adds no amplification (it is summed directly)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize(("topk", "add_tail"), [(5, True), (5, False), (None, True)])
def test_triton_matches_oracle(alpha, topk, add_tail):
    assert_matches_oracle(
        "triton",
        13,
        16,
        97,
        topk=topk,
        add_tail=add_tail,
        alpha=alpha,
        temperature=0.7,
        dtype=torch.float32,
        tol=FP32_TOL,
    )


@pytest.mark.slow
def test_multiple_vocabulary_splits_and_chunks_odd_k():
    # V=1000 gives 4 vocabulary splits to merge; a tiny budget gives several backward chunks; K=7
    assert_matches_oracle(
        "triton", 9, 24, 1000, topk=7, add_tail=True, alpha=0.5, dtype=torch.float32, tol=FP32_TOL, budget_mb=0.02
    )


def test_single_row_and_largest_k():
    assert_matches_oracle("triton", 1, 8, 33, topk=3, add_tail=True, alpha=0.5, dtype=torch.float32, tol=FP32_TOL)
    assert_matches_oracle("triton", 2, 16, 300, topk=256, add_tail=True, alpha=1.0, dtype=torch.float32, tol=FP32_TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    assert_matches_oracle("triton", 17, 32, 257, topk=10, add_tail=True, alpha=0.5, dtype=dtype, tol=1e-5)
    assert_matches_oracle("triton", 17, 32, 257, topk=None, add_tail=True, alpha=0.3, dtype=dtype, tol=1e-5)


def test_backends_agree_with_each_other():
    inputs = [t.to(DEV) for t in make_inputs(11, 16, 200, seed=5, dtype=torch.float32)]
    outs = {b: sdpo_head(*inputs, topk=12, backend=b) for b in ("naive", "torch", "triton")}
    for b in ("torch", "triton"):
        for a, ref in zip(outs[b], outs["naive"]):
            torch.testing.assert_close(a, ref, rtol=1e-4, atol=1e-5)


def test_ties_prefer_the_lower_vocabulary_id():
    from sdpo_fast.kernels.function import HeadOptions
    from sdpo_fast.kernels.triton_head import TritonTiles

    h = torch.ones(2, 16, device=DEV)
    w = torch.zeros(80, 16, device=DEV)
    w[[3, 40, 70, 11]] = 1.0  # four tied maxima
    y = torch.zeros(2, dtype=torch.long, device=DEV)
    stats = TritonTiles().student_stats(h, w, y, HeadOptions(3, True, 0.5, 1.0, 2**20))
    assert stats.top_idx.tolist() == [[3, 11, 40], [3, 11, 40]]


@pytest.mark.parametrize("regime", list(EXACT_GAPS))
@pytest.mark.parametrize("shift", list(EXACT_SHIFTS))
def test_exact_tails_in_the_confident_regime(regime, shift):
    # the teacher's mode outside the student's top-K, a (K+1)-th logit tied with the K-th, ±1e4 logits
    inputs = exact_inputs(6, 70, 5, EXACT_GAPS[regime], EXACT_SHIFTS[shift], ties=True, seed=len(regime))
    for alpha, add_tail in ((0.0, True), (0.5, True), (1.0, True), (0.0, False)):
        assert_exact("triton", inputs, topk=5, add_tail=add_tail, alpha=alpha)


def test_exact_tails_full_vocabulary_and_many_tiles():
    inputs = exact_inputs(5, 150, 3, 17, -1e4, seed=2)
    assert_exact("triton", inputs, topk=None, add_tail=True, alpha=0.5)
    assert_exact("triton", inputs, topk=3, add_tail=True, alpha=0.0, temperature=2.0, budget_mb=0.002)


@pytest.mark.slow
def test_many_row_chunks_and_vocabulary_tiles():
    # 40 rows in chunks of 16 (the last one partial) × 4 vocabulary tiles, each chunk with its own max pre-pass
    inputs = exact_inputs(40, 200, 9, 14, 1e4, ties=True, seed=6)
    assert_exact("triton", inputs, topk=9, add_tail=True, alpha=0.5, budget_mb=0.002)


def test_teacher_with_a_different_hidden_size():
    # the trust-region teacher concatenates two hidden states: H_T = 2·H
    assert_matches_oracle(
        "triton", 9, 8, 150, topk=6, add_tail=True, alpha=0.5, teacher_h=16, dtype=torch.float32, tol=FP32_TOL
    )


def test_candidate_overflow_falls_back_exactly(monkeypatch):
    """Ascending logits beat every threshold: rows whose candidates overflow the buffer are redone exactly."""
    from sdpo_fast.kernels.chunked import TorchTiles
    from sdpo_fast.kernels.triton_head import TritonTiles

    monkeypatch.setattr(TritonTiles, "capacity", staticmethod(lambda k, vocab: k + 2))
    redone = []
    original = TorchTiles.student_stats

    def spy(self, h, *args):
        redone.append(h.shape[0])
        return original(self, h, *args)

    monkeypatch.setattr(TorchTiles, "student_stats", spy)
    h_s, w_s, h_t, w_t, y = exact_inputs(4, 130, 4, 14, seed=5)
    h_s[:2, :130] = torch.arange(130.0)  # rows 0 and 1: logits rising along the vocabulary
    assert_exact("triton", (h_s, w_s, h_t, w_t, y), topk=4, add_tail=True, alpha=0.0, budget_mb=0.002)
    assert redone == [2]  # just the two ascending rows, once


def test_weight_gather_zero3():
    assert_weight_gather_is_transparent("triton", 5)
    assert_weight_gather_is_transparent("triton", None)


def test_one_host_synchronisation_per_call_whatever_the_tiles():
    one_tile = host_syncs("triton", 256, n=6, v=120)
    many_tiles = host_syncs("triton", 0.002, n=6, v=120)
    assert many_tiles == one_tile <= 3  # validation's min/max of the ids, and the candidate-overflow check


def test_float64_is_refused_with_the_fix():
    inputs = [t.to(DEV) for t in make_inputs(3, 8, 40, dtype=torch.float64)]
    with pytest.raises(TypeError, match="backend='torch'"):
        sdpo_head(*inputs, topk=4, backend="triton")


# On a GPU every new (K, alignment) combination compiles the kernels for each autotune configuration
# (tens of seconds each): fewer examples there. The CPU interpreter compiles nothing.
@settings(max_examples=60 if DEV == "cpu" else 12, deadline=None)
@given(
    n=st.integers(1, 12),
    h=st.integers(1, 20),
    v=st.integers(16, 160),
    k=st.integers(1, 16),
    full=st.booleans(),
    alpha=st.sampled_from([0.0, 0.3, 0.5, 1.0]),
    add_tail=st.booleans(),
    temperature=st.sampled_from([0.6, 1.0, 1.5]),
    seed=st.integers(0, 10_000),
)
@pytest.mark.slow
def test_fuzz_triton_against_oracle(n, h, v, k, full, alpha, add_tail, temperature, seed):
    assert_matches_oracle(
        "triton",
        n,
        h,
        v,
        topk=None if full else min(k, v),
        add_tail=add_tail,
        alpha=alpha,
        temperature=temperature,
        dtype=torch.float32,
        tol=FP32_TOL,
        seed=seed,
    )


def test_candidate_order_does_not_change_a_single_bit():
    """The compaction's atomics leave candidates in a run-dependent order; the top-K and the losers' sum must not
    depend on it (the raw sum, before the log would hide a few ulps)."""
    from sdpo_fast.kernels.chunked import pack_keys
    from sdpo_fast.kernels.triton_head import INT64_MIN, top_and_losers

    g = torch.Generator().manual_seed(0)
    n, cap, k = 6, 700, 5
    values = torch.randn(n, cap, generator=g) * 3
    ids = torch.stack([torch.randperm(5000, generator=g)[:cap] for _ in range(n)])
    count = torch.tensor([700, 400, 5, 170, 333, 699])
    keys = pack_keys(values, ids)
    keys[torch.arange(cap).unsqueeze(0) >= count.unsqueeze(1)] = INT64_MIN
    row_max = values.amax(dim=1)
    first = top_and_losers(keys, count, k, row_max)
    for _ in range(3):  # other orders of the same candidates, as other runs' atomics might leave them
        shuffled = keys.clone()
        for r in range(n):
            perm = torch.randperm(int(count[r]), generator=g)
            shuffled[r, : int(count[r])] = keys[r, perm]
        again = top_and_losers(shuffled, count, k, row_max)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    exact = torch.stack(
        [torch.exp(values[r, : int(count[r])].double() - row_max[r]).sort().values[:-k].sum() for r in range(n)]
    )
    torch.testing.assert_close(first[1].double(), exact, rtol=1e-6, atol=0)
