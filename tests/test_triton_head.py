"""The Triton backend against the float64 oracle, run on the CPU through the Triton interpreter.

Shapes stay small: the interpreter emulates every program in numpy and is slow on sort networks.
bf16 runs as fp32 copies in the interpreter (numpy has no bfloat16); fp16 runs natively.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_head import assert_matches_oracle, make_inputs

from sdpo_fast import sdpo_head

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA or TRITON_INTERPRET=1 (set by tests/conftest.py on CPU machines)",
)
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter runs on CPU tensors
FP32_TOL = 1e-4  # fp32 conditioning of the tail bucket: the naive fp32 path is off by as much


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
    assert_matches_oracle("triton", 17, 32, 257, topk=10, add_tail=True, alpha=0.5, dtype=dtype, tol=2e-4)
    assert_matches_oracle("triton", 17, 32, 257, topk=None, add_tail=True, alpha=0.3, dtype=dtype, tol=2e-4)


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
