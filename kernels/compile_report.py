"""Ahead-of-time compilation of every SDPO row kernel and specialisation for real GPU architectures.

No GPU is needed: `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` runs the whole
pipeline down to a cubin with the `ptxas` shipped in the triton wheel, and `cuobjdump` (also in the
wheel) reports registers, spill stack and shared memory. Must run with TRITON_INTERPRET unset.

    python -m sdpo_fast.kernels.compile_report [--arch 75 80 86 89 90] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

# Opt-in shared memory per block (bytes), from the CUDA programming guide.
MAX_SHARED = {75: 65536, 80: 166912, 86: 101376, 89: 101376, 90: 232448}
ARCHS = tuple(MAX_SHARED)


@dataclass
class CompileResult:
    kernel: str
    arch: int
    dtype: str
    config: str
    variant: str
    shared: int
    max_shared: int
    registers: int | None
    spill_bytes: int | None
    tensor_core_ops: int = 0  # mma / wgmma instructions in the PTX: 0 means tl.dot became CUDA-core FMAs
    error: str | None = None

    @property
    def fits(self) -> bool:
        return self.error is None and self.shared <= self.max_shared


# Argument types by name, as the launchers in triton_head.py pass them: the logit tiles and every per-row
# statistic in fp32, ids and packed top-K keys in int64, the candidate counter in int32, and the gradient tile
# `out_ptr` in the GEMM dtype (the model's half dtype on CUDA, or fp32 for fp32 models: see VARIANTS).
_INT64_PTRS = {"y_ptr", "ids_ptr", "keys_ptr"}
_INT32_PTRS = {"count_ptr"}
_FLOAT_SCALARS = {"inv_temp", "alpha", "log_one_minus_alpha", "log_alpha"}


def _arg_type(name: str, out_dtype: str) -> str:
    if name == "out_ptr":
        return f"*{out_dtype}"
    if name in _INT64_PTRS:
        return "*i64"
    if name in _INT32_PTRS:
        return "*i32"
    if name.endswith("_ptr"):
        return "*fp32"
    return "fp32" if name in _FLOAT_SCALARS else "i32"


def _signature(kernel: str, dtype: str, variant: dict) -> tuple[dict, dict]:
    """Triton signature and constexprs for one specialisation, read off the kernel's own parameters."""
    from .triton_head import KERNELS

    variant = dict(variant)
    out_dtype = variant.pop("out", dtype)
    params = KERNELS[kernel].params
    sig = {p.name: "constexpr" if p.is_constexpr else _arg_type(p.name, out_dtype) for p in params}
    return sig, variant


# The constexpr specialisations the launchers use: every sweep mode, the teacher mask at K=100 (KB=128) and at
# the largest K (TRITON_MAX_TOPK=1024), the gradient tile in top-K mode (written in the half dtype, or in fp32 in
# place) and in full-vocabulary mode for each α branch, and the full-vocabulary divergence for each α branch.
VARIANTS = {
    "sweep": [dict(MODE=0, TARGET=True), dict(MODE=0, TARGET=False), dict(MODE=1), dict(MODE=2)],
    "mask": [dict(KB=128), dict(KB=1024)],
    "grad": [
        dict(FULL=False, ALPHA_MODE=2, WRITES=True, KB=128),
        dict(FULL=False, ALPHA_MODE=2, WRITES=True, KB=1024),
        dict(FULL=False, ALPHA_MODE=2, WRITES=True, KB=128, out="fp32"),
        *(dict(FULL=True, ALPHA_MODE=a, WRITES=False, KB=1) for a in (0, 1, 2)),
    ],
    "full": [dict(ALPHA_MODE=a) for a in (0, 1, 2)],
}


def _resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers per thread, spill stack bytes) from `cuobjdump --dump-resource-usage`."""
    from triton.backends.nvidia.compiler import knobs

    tool = os.path.join(os.path.dirname(knobs.nvidia.ptxas.path), "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    reg = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    return (int(reg.group(1)) if reg else None), (int(stack.group(1)) if stack else None)


def compile_one(kernel: str, arch: int, variant: dict, dtype: str) -> CompileResult:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .triton_head import CONFIGS, KERNELS

    cfg = dict(CONFIGS[kernel])
    warps = cfg.pop("num_warps")
    sig, const = _signature(kernel, dtype, variant)  # every constexpr, block sizes included, is marked there
    const = {**const, **cfg}
    label = " ".join(f"{k}={v}" for k, v in cfg.items()) + f" warps={warps}"
    vlabel = ",".join(f"{k}={v}" for k, v in variant.items()) or "-"
    try:
        compiled = triton.compile(
            ASTSource(fn=KERNELS[kernel], signature=sig, constexprs=const),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": warps},
        )
    except Exception as err:  # report, do not hide: the test asserts there are none
        error = f"{type(err).__name__}: {err}"[:500]
        return CompileResult(kernel, arch, dtype, label, vlabel, 0, MAX_SHARED[arch], None, None, error=error)
    regs, spill = _resource_usage(compiled.asm["cubin"])
    mma = len(re.findall(r"\bmma\.sync|\bwgmma\.mma_async", compiled.asm["ptx"]))
    return CompileResult(
        kernel, arch, dtype, label, vlabel, compiled.metadata.shared, MAX_SHARED[arch], regs, spill, mma
    )


def _jobs(archs, kernels) -> list[tuple]:
    jobs = []
    for arch in archs:
        dtype = "fp16" if arch < 80 else "bf16"  # Turing (T4) has no bf16
        for kernel in kernels:
            for variant in VARIANTS[kernel]:
                jobs.append((kernel, arch, variant, dtype))
    return jobs


def _run_job(job: tuple) -> CompileResult:
    return compile_one(*job)


def compile_all(archs=ARCHS, kernels=tuple(VARIANTS), jobs: int = 1) -> list[CompileResult]:
    """Every kernel (in its launch configuration) × specialisation × architecture."""
    work = _jobs(archs, kernels)
    if jobs <= 1:
        return [_run_job(j) for j in work]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_run_job, work))


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("Unset TRITON_INTERPRET: ahead-of-time compilation needs the real Triton compiler.")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--kernel", nargs="+", default=list(VARIANTS))
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiler processes")
    args = parser.parse_args(argv)
    results = compile_all(args.arch, args.kernel, args.jobs)
    print(
        f"{'kernel':7} {'sm':>3} {'dtype':5} {'variant':52} {'config':26} {'shared':>9} {'regs':>5} {'spill':>5} "
        f"{'mma':>4}  status"
    )
    for r in results:
        status = "ok" if r.fits else f"FAIL {r.error or 'shared memory'}"
        print(
            f"{r.kernel:7} {r.arch:>3} {r.dtype:5} {r.variant:52} {r.config:26} {r.shared:>9} {r.registers!s:>5} "
            f"{r.spill_bytes!s:>5} {r.tensor_core_ops:>4}  {status}"
        )
    if any(r.tensor_core_ops for r in results):
        print("\nNote: a row kernel emitted tensor-core instructions; they are meant to contain no tl.dot.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    return int(any(not r.fits for r in results))


if __name__ == "__main__":
    sys.exit(main())
