"""Every Triton row kernel × specialisation compiles for sm_75, sm_80, sm_86, sm_89 and sm_90 and fits.

No GPU is needed: `kernels/compile_report.py` drives `triton.compile(ASTSource, GPUTarget("cuda", cc, 32))`
down to a cubin with the ptxas shipped in the triton wheel, then reads registers and spill stack
with `cuobjdump`. It runs in a subprocess without TRITON_INTERPRET (which this test session sets),
with a fresh Triton cache so nothing is skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ARCHS = (75, 80, 86, 89, 90)


@pytest.mark.slow
def test_every_kernel_and_config_compiles_and_fits_every_architecture(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    report = tmp_path / "report.json"
    out = subprocess.run(
        [sys.executable, "-m", "sdpo_fast.kernels.compile_report", "--json", str(report), "--jobs", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    print(out.stdout)  # the per-architecture table (registers, spills, shared memory) in the test log
    results = json.loads(report.read_text())
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    from sdpo_fast.kernels.compile_report import VARIANTS
    from sdpo_fast.kernels.triton_head import KERNELS

    kernels = {r["kernel"] for r in results}
    assert kernels == set(KERNELS) == {"sweep", "mask", "grad", "full"}
    for arch in ARCHS:
        mine = [r for r in results if r["arch"] == arch]
        assert len(mine) == sum(len(v) for v in VARIANTS.values()), f"sm_{arch} is missing specialisations"
        assert {r["dtype"] for r in mine} == {"fp16" if arch == 75 else "bf16"}  # T4 has no bf16
        for r in mine:
            assert r["error"] is None, r
            assert 0 <= r["shared"] <= r["max_shared"], r
            assert r["registers"] is not None and r["registers"] <= 255, r
            assert r["spill_bytes"] == 0, r  # memory-bound row sweeps: a spill would cost a second pass
            # The row kernels contain no tl.dot: nothing depends on Triton's tensor-core code generation, which
            # Triton >= 3.3 dropped before sm_80 (a T4 runs the same kernels; its GEMMs are cuBLAS calls).
            assert r["tensor_core_ops"] == 0, r
    # the largest K the launcher accepts (TRITON_MAX_TOPK=1024: KB=1024) is covered on every architecture
    assert all(
        any(r["variant"] == "KB=1024" and r["kernel"] == "mask" for r in results if r["arch"] == a) for a in ARCHS
    )
