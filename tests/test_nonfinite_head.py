"""A non-finite input propagates identically through every head backend: naive, torch and Triton.

The non-finite step guard (sdpo_fast/faults.py) can only skip a step whose loss or gradients are non-finite, so no
backend may turn a NaN or ±inf in an input into finite numbers. Each case puts one non-finite value into one input
(one element of a hidden state, one element or one whole vocabulary row of a weight) and compares, backend against
backend, which entries of the divergence, the two log-probs and both gradients are finite; the finite entries
agree to fp32 tolerance. Triton runs in the interpreter here (small blocks, several tiles and column splits).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from sdpo_fast import sdpo_head

N, H, V = 5, 8, 96
INPUTS = {"student_hidden": 0, "student_weight": 1, "teacher_hidden": 2, "teacher_weight": 3}
VALUES = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf}
# (topk, add_tail, alpha): top-K with a tail, K renormalised, the full vocabulary; every divergence end.
MODES = [(5, True, 0.5), (5, False, 0.0), (None, True, 1.0), (None, True, 0.5), (5, True, 1.0)]
OUTPUTS = ("divergence", "student_logprob", "teacher_logprob", "student_hidden.grad", "student_weight.grad")


def _places(name: str) -> list[tuple[str, tuple]]:
    if name.endswith("hidden"):
        return [("element", (2, 3))]
    return [("element", (7, 3)), ("row", (7, slice(None)))]  # one vocabulary row of the weight


CASES = [(name, where, pos, value) for name in INPUTS for (where, pos) in _places(name) for value in VALUES]


def _inputs():
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(N, H, generator=g),
        torch.randn(V, H, generator=g),
        torch.randn(N, H, generator=g),
        torch.randn(V, H, generator=g),
        torch.randint(0, V, (N,), generator=g),
    ]


def _run(backend, inputs, topk, add_tail, alpha):
    hs, ws, ht, wt, y = (x.clone() for x in inputs)
    hs.requires_grad_(True)
    ws.requires_grad_(True)
    # a tiny budget: several row chunks and vocabulary tiles in the chunked paths
    out = sdpo_head(
        hs, ws, ht, wt, y, topk=topk, add_tail=add_tail, alpha=alpha, backend=backend, memory_budget_mb=0.002
    )
    (out.divergence.sum() + out.student_logprob.sum()).backward()
    return [out.divergence.detach(), out.student_logprob.detach(), out.teacher_logprob.detach(), hs.grad, ws.grad]


def _backends():
    backends = ["naive", "torch"]
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        backends.append("triton")
    return backends


@pytest.mark.parametrize(("name", "where", "pos", "value"), CASES, ids=[f"{c[0]}-{c[1]}-{c[3]}" for c in CASES])
def test_a_nonfinite_input_propagates_identically(name, where, pos, value):
    backends = _backends()
    assert "triton" in backends or not torch.cuda.is_available()
    # each case runs two of the modes, so that every mode meets every input and value across the cases
    case = CASES.index((name, where, pos, value))
    for topk, add_tail, alpha in (MODES[case % len(MODES)], MODES[(case + 2) % len(MODES)]):
        inputs = _inputs()
        inputs[INPUTS[name]][pos] = VALUES[value]
        results = {b: _run(b, inputs, topk, add_tail, alpha) for b in backends}
        reference = results["naive"]
        if value == "nan":  # a NaN always reaches the loss: the guard must see it
            assert not torch.isfinite(reference[0]).all()
        for backend, out in results.items():
            for label, got, want in zip(OUTPUTS, out, reference):
                mode = f"{backend} {label} (topk={topk}, add_tail={add_tail}, alpha={alpha})"
                assert torch.equal(torch.isfinite(got), torch.isfinite(want)), mode
                finite = torch.isfinite(want)
                torch.testing.assert_close(got[finite], want[finite], rtol=1e-4, atol=1e-5, msg=mode)
