"""No backend but `naive` ever allocates an (N, V) buffer.

1. Peak RSS of fresh subprocesses at N=2048, V=151936 (one fp32 (N, V) tensor = 1.16 GiB):
   naive pays several of them; the chunked torch backend stays near its 256 MiB budget.
2. An allocation audit (TorchDispatchMode) of every tensor the torch and Triton backends create
   in forward + backward: none has N·V elements or more, whatever the budget.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from sdpo_fast import sdpo_head

N, H, V, K = 2048, 32, 151936, 100
NV_BYTES = N * V * 4

_PROBE = textwrap.dedent(
    """
    import sys, torch
    from sdpo_fast import sdpo_head

    def peak_kib():  # VmHWM: the resident high-water mark, which clear_refs can reset
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))

    torch.manual_seed(0)
    n, h, v, k, backend = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    # inputs built in place, so that the high-water mark below is the inputs' own size (no temporaries)
    hs = torch.empty(n, h).normal_().requires_grad_(True)
    w = torch.empty(v, h).normal_().mul_(0.1).requires_grad_(True)
    ht, wt = torch.empty(n, h).normal_(), torch.empty(v, h).normal_().mul_(0.1)
    y = torch.randint(0, v, (n,))
    # Imports can leave a transient peak above the steady size: restart the high-water mark here.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = peak_kib()
    out = sdpo_head(hs, w, ht, wt, y, topk=k, backend=backend)
    (out.divergence.sum() + out.student_logprob.sum()).backward()
    print((peak_kib() - base) * 1024)
    """
)


def _extra_peak_bytes(backend: str) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(N), str(H), str(V), str(K), backend],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc to reset the peak RSS")
def test_peak_rss_naive_versus_chunked():
    naive = _extra_peak_bytes("naive")
    chunked = _extra_peak_bytes("torch")
    grads = (V * H + N * H) * 4  # W.grad and h.grad: any implementation must produce them
    assert naive > 2 * NV_BYTES, f"naive extra {naive / 2**20:.0f} MiB: expected several (N, V) fp32 buffers"
    assert chunked < NV_BYTES / 2, f"torch backend extra {chunked / 2**20:.0f} MiB: an (N, V) buffer was allocated"
    assert grads < chunked < 256 * 2**20 + grads + 128 * 2**20  # the gradients, the scratch budget, allocator slack
    assert naive / chunked >= 8


class _AllocationAudit(TorchDispatchMode):
    """Records the size in bytes of every tensor produced by an aten op.

    uint8 tensors are left out: they are the Triton interpreter's byte-wise copies of whole argument
    storages (e.g. all of W), not allocations of ours, and the head never creates uint8 tensors.
    """

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dtype != torch.uint8:
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("topk", [16, None])
def test_no_tensor_with_n_times_v_elements(backend, topk, monkeypatch):
    if backend == "triton":
        pytest.importorskip("triton")
        # A Triton kernel cannot allocate memory, so every buffer of the Triton backend is created by its
        # Python driver. Audit the driver with the launches stubbed out (the interpreter is far too slow
        # under a dispatch mode, and its byte-wise argument copies would only add noise).
        import sdpo_fast.kernels.triton_head as triton_head

        monkeypatch.setattr(triton_head, "launch", lambda *args, **kwargs: None)
    n, h, v = 48, 8, 1500  # an (N, V) fp32 buffer is 288 kB; W (and W.grad) only 48 kB
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(n, h, generator=g).requires_grad_(True)
    w = (torch.randn(v, h, generator=g) * 0.3).requires_grad_(True)
    ht, wt = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * 0.3
    y = torch.randint(0, v, (n,), generator=g)
    audit = _AllocationAudit()
    with audit:
        out = sdpo_head(hs, w, ht, wt, y, topk=topk, backend=backend, memory_budget_mb=0.1)
        (out.divergence.sum() + out.student_logprob.sum()).backward()
    assert hs.grad is not None and w.grad is not None  # the whole forward and backward ran
    assert audit.largest < n * v * 4 / 2, (
        f"{backend}: a tensor of {audit.largest} bytes (an (N, V) fp32 buffer: {n * v * 4})"
    )

    naive_audit = _AllocationAudit()  # the audit itself can fail: the naive head is caught
    with naive_audit:
        sdpo_head(hs, w, ht, wt, y, topk=topk, backend="naive").divergence.sum().backward()
    assert naive_audit.largest >= n * v * 4
