"""One benchmark job in a fresh process: `python bench/worker.py '<job json>'`.

`run.py` starts one of these per configuration so that each peak RSS belongs to exactly one
configuration. The result is the last stdout line, prefixed with RESULT_PREFIX, as JSON; it
always carries this process's peak RSS (`ru_maxrss`, the number the benchmark reports) and,
for a cross-check, VmHWM from /proc.
"""

from __future__ import annotations

import importlib
import json
import resource
import sys
import traceback

RESULT_PREFIX = "BENCH_RESULT "
CASE_PREFIX = "BENCH_CASE "  # one line per finished case of a multi-case job: kept if the worker is killed later


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def vm_hwm_mib() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def probe(job: dict) -> dict:
    """On a machine with an NVIDIA device node: does CUDA work, and what is the GPU called?"""
    import torch

    ok = torch.cuda.is_available()
    return {"device": "cuda" if ok else "cpu", "device_name": torch.cuda.get_device_name() if ok else None}


def import_all(names: list[str]) -> dict[str, str]:
    """Import each module the job's implementations need; return {module: error} for those that fail.

    One competitor that does not import must not cost the others their measurements: its variants are skipped
    with the error as the reason (head_bench.run_case), everything else runs."""
    failed = {}
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as err:
            failed[name] = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    return failed


def run(job: dict) -> dict:
    job["import_errors"] = import_all(job.get("imports", []))
    kind = job["kind"]
    if kind == "probe":
        return probe(job)
    if kind in ("head", "head-inputs", "check"):
        import head_bench as bench

        handlers = {"head": bench.run_case, "head-inputs": bench.inputs_only, "check": bench.check}
    else:
        import step_bench as bench

        handlers = {"step-model": bench.model_only, "step": bench.run_step}
    return handlers[kind](job)


def main() -> None:
    job = json.loads(sys.argv[1])
    try:
        result = run(job)
    except Exception as err:
        traceback.print_exc()
        result = {"error": f"{type(err).__name__}: {err}"}
    result.update(peak_rss_mib=peak_rss_mib(), vm_hwm_mib=vm_hwm_mib())
    if "torch" in sys.modules:
        result["torch_threads"] = sys.modules["torch"].get_num_threads()
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
