"""Side-by-side memory and speed of the SDPO head and of whole training steps, against the alternatives.

    python bench/run.py                  # default sweep for this device (a few minutes on a GPU)
    python bench/run.py --quick          # < 2 minutes on 2 CPU cores
    python bench/run.py --bench head --model-shape qwen2.5-0.5b --tokens 256,512 --impl naive,sdpo_fast-torch

This process only plans, launches and reports. Every configuration runs in a fresh worker
process (`worker.py`): on the CPU its peak RSS minus that of a process that only imports the same
modules and allocates the same inputs is the configuration's extra peak memory. The parent never
imports torch, because a child's `ru_maxrss` starts at its parent's high-water mark.

Output: bench/results/<device>-<date>.json (the records, a JSON list), .md (tables) and .png
(memory and time against tokens). See bench/README.md for what is measured and how.
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import report
import sweep as sw
from tqdm import tqdm
from worker import CASE_PREFIX, RESULT_PREFIX

HERE = Path(__file__).resolve().parent
JOB_TIMEOUT_S = 3600  # per worker, unless --worker-timeout or the time budget says less
# Correctness tolerances against the naive oracle, by input dtype: relative error of the loss and
# of the gradients (Frobenius norm of the difference over the norm of the oracle's).
TOLERANCE = {"float32": {"loss": 1e-3, "grad": 1e-3}, "bfloat16": {"loss": 1e-2, "grad": 5e-2}}
# Per-configuration agreement of a top-K implementation's loss with naive's at the same K.
SWEEP_LOSS_RTOL = {"float32": 1e-3, "bfloat16": 1e-2}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bench", choices=["head", "step", "all"], default="all")
    p.add_argument("--quick", action="store_true", help="a small sweep (< 2 min on 2 CPU cores)")
    p.add_argument("--impl", help=f"comma-separated subset of: {', '.join(sw.HEAD_IMPLS + sw.STEP_IMPLS)}")
    p.add_argument("--tokens", help="comma-separated token counts (head: N; step: loss tokens per step)")
    p.add_argument("--model-shape", help=f"comma-separated head shapes: {', '.join(sw.MODEL_SHAPES)} or HxV")
    p.add_argument("--topk", help="comma-separated K values for the head (default 100,20; CPU runs 20 at one size)")
    p.add_argument("--step-vocab", type=int, help="vocabulary of the step model (default 151936)")
    p.add_argument("--steps", type=int, help="optimizer steps per step-benchmark run (first one is warm-up)")
    p.add_argument("--runs", type=int, help="timed head runs per configuration (after warm-up)")
    p.add_argument("--warmup", type=int, help="untimed head runs per configuration before the timed ones")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="head dtype (default: float32 CPU, bfloat16 GPU)")
    p.add_argument("--json", type=Path, help="also write the records to this path as a JSON list")
    p.add_argument("--jsonl", type=Path, help="append each record to this file as soon as it is measured")
    p.add_argument("--out-dir", type=Path, default=HERE / "results", help="where the .json/.md/.png go")
    p.add_argument("--no-plot", action="store_true", help="skip the .png")
    p.add_argument("--report", type=Path, metavar="JSON", help="re-render the .md/.png of an earlier run's .json")
    p.add_argument("--worker-timeout", type=float, default=JOB_TIMEOUT_S, help="seconds one worker may run")
    p.add_argument(
        "--time-budget",
        type=float,
        help="seconds for all workers: none starts once it is spent, the last gets what is left, and the "
        "cases not reached are recorded as skipped; the report is always written",
    )
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------ launching workers


def worker_env() -> dict:
    env = dict(os.environ)
    # Tests set TRITON_INTERPRET=1; the benchmark must never run Triton kernels in the interpreter.
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    return env


def launch(job: dict, timeout: float = JOB_TIMEOUT_S) -> dict:
    """Run one job in a fresh `worker.py` process and return its result dict (never raises).

    A worker that runs past `timeout` is killed; the cases it finished (CASE_PREFIX lines) are kept in "cases"."""
    cmd = [sys.executable, str(HERE / "worker.py"), json.dumps(job)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=worker_env(), cwd=HERE)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        return {"error": f"worker timed out after {timeout:.0f} s", "cases": _cases(out)}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
    if proc.returncode < 0:  # killed by a signal: on Linux SIGKILL is usually the OOM killer
        return {
            "error": f"worker killed by signal {-proc.returncode} (out of memory?) {tail}",
            "cases": _cases(proc.stdout),
        }
    return {"error": f"worker exited with {proc.returncode}: {tail}", "cases": _cases(proc.stdout)}


def _cases(stdout: str) -> list[dict]:
    return [json.loads(line[len(CASE_PREFIX) :]) for line in stdout.splitlines() if line.startswith(CASE_PREFIX)]


def environment() -> dict:
    """Device and versions, without importing torch here. Only a machine with an NVIDIA device node
    pays for a probe process (to confirm that CUDA works and to name the GPU)."""
    info = {"device": "cpu", "device_name": cpu_name(), "python": platform.python_version()}
    for dist in ("torch", "trl", "transformers", "triton", "liger-kernel", "sdpo-fast"):
        try:
            info[dist.replace("-", "_")] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[dist.replace("-", "_")] = None
    info["git"] = git_state()
    if glob.glob("/dev/nvidia[0-9]*") and os.environ.get("CUDA_VISIBLE_DEVICES") != "":
        probe = launch({"kind": "probe"})
        if probe.get("device") == "cuda":
            info.update(device="cuda", device_name=probe["device_name"])
    return info


def git_state() -> str | None:
    """The commit measured, with '+dirty' when the package or kernels differ from it."""
    try:
        run = dict(cwd=HERE.parent, capture_output=True, text=True, timeout=10)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **run).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "sdpo_fast", "kernels"], **run).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+dirty" if dirty else "")) or None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        name = None
    return f"{name or platform.processor() or 'CPU'} ({os.cpu_count()} cores)"


# ------------------------------------------------------------------------------------ records


def new_record(bench: str, impl: str, info: dict, **fields) -> dict:
    rec = dict(
        bench=bench,
        impl=impl,
        device=info["device_name"],
        device_kind=info["device"],
        tokens=None,
        hidden=None,
        vocab=None,
        topk=None,
        dtype=None,
        peak_mem_mib=None,
        median_ms=None,
        ok=False,
        error=None,
    )
    rec.update(fields)
    return rec


def gpu_peak_tflops(device_name: str) -> float | None:
    for key, peak in sw.GPU_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def add_throughput(rec: dict, info: dict) -> None:
    """TFLOP/s with the 8·N·H·V count (student and teacher forward GEMMs,
    dX and dW), the same useful work for every implementation whatever it recomputes."""
    if rec["median_ms"] is None:
        return
    flops = 8 * rec["tokens"] * rec["hidden"] * rec["vocab"]
    rec["tflops"] = flops / (rec["median_ms"] * 1e-3) / 1e12
    peak = gpu_peak_tflops(info["device_name"]) if info["device"] == "cuda" else None
    rec["peak_fraction"] = rec["tflops"] / peak if peak else None


# ------------------------------------------------------------------------------------ head benchmark


class Runner:
    """Launches jobs one after another with a progress bar, and keeps notes for the console."""

    # A worker is not started with less than this left of the time budget: it would only import and be killed.
    MIN_WORKER_S = 10.0

    def __init__(self, total: int, worker_timeout: float = JOB_TIMEOUT_S, budget: float | None = None):
        self.bar = tqdm(total=total, unit="job", dynamic_ncols=True, disable=None)
        self.threads = None  # torch's thread count, as the first worker reports it
        self.worker_timeout = worker_timeout
        self.deadline = None if budget is None else time.monotonic() + budget

    def left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    def run(self, label: str, job: dict) -> dict:
        self.bar.set_description(label)
        timeout = min(self.worker_timeout, self.left())
        if timeout < self.MIN_WORKER_S:
            self.bar.update(1)
            return {"error": "skipped: the sweep's time budget was spent before this worker", "no_time": True}
        result = launch(job, timeout)
        self.bar.update(1)
        self.threads = self.threads or result.get("torch_threads")
        return result

    def say(self, msg: str) -> None:
        tqdm.write(msg)


def check_head(runner: Runner, cases: list[sw.HeadCase], topks: list[int], info: dict, dtype: str) -> dict:
    """Correctness first: every variant against the naive oracle at the first shape, few tokens."""
    first = cases[0]
    impls = {impl for impl, _ in (v for c in cases for v in c.variants)} - {"naive"}
    variants = [(i, None) if i in sw.K_FREE_IMPLS else (i, k) for i in sw.HEAD_IMPLS if i in impls for k in topks]
    variants = list(dict.fromkeys((i, k) for i, k in variants if k is None or k <= first.vocab))
    job = dict(
        kind="check",
        device=info["device"],
        hidden=first.hidden,
        vocab=first.vocab,
        tokens=min(first.tokens, 256),
        dtype=dtype,
        alpha=sw.ALPHA,
        tolerance=TOLERANCE[dtype],
        variants=variants,
        imports=sorted({m for i, _ in variants for m in sw.HEAD_IMPORTS[i]}),
    )
    result = runner.run(f"check {first.shape} N={job['tokens']}", job)
    checks = {}
    for v in result.get("variants", []):
        checks[(v["impl"], v["topk"])] = v
        what = "full-vocabulary JSD vs naive topk=None" if v["topk"] is None else f"K={v['topk']} vs naive"
        if v["impl"] in sw.LSE_IMPLS:
            what = "cross-entropy vs full-logit cross-entropy"
        ties = f", {v['tie_rows']} top-K tie rows left out" if v.get("tie_rows") else ""
        if v["ok"]:
            runner.say(
                f"[check] {v['impl']:<17} {what}: ok (loss rel err {v['loss_rel_err']:.1e}, "
                f"grad rel err h {v['grad_h_rel_err']:.1e} W {v['grad_w_rel_err']:.1e}{ties})"
            )
        else:
            detail = v["error"] or ", ".join(
                f"{k} {v[k]:.2e}" for k in ("loss_rel_err", "grad_h_rel_err", "grad_w_rel_err")
            )
            runner.say(f"!!! MISMATCH {v['impl']} ({what}) at {first.shape} N={job['tokens']}: {detail}")
    if "error" in result and not result.get("variants"):
        runner.say(f"!!! correctness check failed to run: {result['error']}")
    return {"shape": first.shape, "tokens": job["tokens"], "results": checks}


def run_head_case(runner: Runner, case: sw.HeadCase, info: dict, dtype: str, warmup: int, runs: int) -> list[dict]:
    base_job = dict(
        device=info["device"],
        hidden=case.hidden,
        vocab=case.vocab,
        tokens=case.tokens,
        dtype=dtype,
        alpha=sw.ALPHA,
        warmup=warmup,
        runs=runs,
        imports=case.imports,
    )
    label = f"head {case.shape} N={case.tokens}"
    baseline = runner.run(f"{label} inputs-only", dict(base_job, kind="head-inputs"))
    records = []
    for impl, topk in case.variants:
        res = runner.run(f"{label} {impl} K={topk}", dict(base_job, kind="head", variants=[(impl, topk)]))
        v = (res.get("variants") or [dict(impl=impl, topk=topk, error=res.get("error"))])[0]
        if v.get("error") is None and baseline.get("error") is None:
            v["peak_mem_mib"] = res["peak_rss_mib"] - baseline["peak_rss_mib"]
            v.update(peak_rss_mib=res["peak_rss_mib"], baseline_rss_mib=baseline["peak_rss_mib"])
            v.update(vm_hwm_mib=res.get("vm_hwm_mib"), baseline_vm_hwm_mib=baseline.get("vm_hwm_mib"))
        elif baseline.get("error"):
            v["error"] = v.get("error") or f"inputs-only baseline failed: {baseline['error']}"
        records.append(_head_record(case, v, info, dtype))
    return records


def run_shape_cuda(runner: Runner, cases: list[sw.HeadCase], info: dict, dtype: str, warmup: int, runs: int):
    """One worker for every N of one shape (allocator peaks, reset between variants): yields each case's records.

    The worker prints each case as it finishes it, so a worker killed at its timeout keeps the cases it finished;
    the others get the worker's error."""
    first = cases[0]
    job = dict(device=info["device"], hidden=first.hidden, vocab=first.vocab, dtype=dtype, alpha=sw.ALPHA,
               warmup=warmup, runs=runs, kind="head", imports=sorted({m for c in cases for m in c.imports}),
               cases=[dict(tokens=c.tokens, variants=c.variants) for c in cases])  # fmt: skip
    result = runner.run(f"head {first.shape} N={','.join(str(c.tokens) for c in cases)}", job)
    done = {c["tokens"]: c["variants"] for c in result.get("cases", [])}
    for case in cases:
        variants = done.get(case.tokens) or [dict(impl=i, topk=k, error=result.get("error")) for i, k in case.variants]
        yield [_head_record(case, v, info, dtype) for v in variants]


def _head_record(case: sw.HeadCase, v: dict, info: dict, dtype: str) -> dict:
    rec = new_record("head", v["impl"], info, tokens=case.tokens, hidden=case.hidden, vocab=case.vocab, topk=v["topk"])
    rec.update(dtype=dtype, shape=case.shape, alpha=sw.ALPHA, ok=v.get("error") is None)
    for key in ("peak_mem_mib", "median_ms", "times_ms", "loss", "error", "peak_rss_mib", "baseline_rss_mib"):
        if key in v:
            rec[key] = v[key]
    for key in ("vm_hwm_mib", "baseline_vm_hwm_mib"):
        if v.get(key) is not None:
            rec[key] = v[key]
    rec["quantity"] = "full-vocabulary JSD" if v["topk"] is None else f"top-{v['topk']} + tail JSD"
    if v["impl"] in sw.LSE_IMPLS:
        rec["quantity"] = "cross-entropy + teacher logsumexp (a floor, not an SDPO head)"
    add_throughput(rec, info)
    return rec


def judge_head(records: list[dict], check: dict, dtype: str, say) -> None:
    """ok = ran, passed the correctness check, and (top-K) its loss equals naive's at the same configuration."""
    naive = {(r["shape"], r["tokens"], r["topk"]): r for r in records if r["impl"] == "naive" and r["error"] is None}
    for r in records:
        if r["bench"] != "head" or r["error"] is not None:
            continue
        c = check["results"].get((r["impl"], r["topk"]))
        if r["impl"] != "naive" and c is None:  # never checked (the check job failed or ran out of time)
            r["check"] = {"ok": False, "error": "not checked against the oracle"}
            r["ok"] = False
        if r["impl"] != "naive" and c is not None:
            keys = ("ok", "loss_rel_err", "grad_h_rel_err", "grad_w_rel_err", "tie_rows", "error")
            r["check"] = {k: c.get(k) for k in keys}
            r["ok"] = r["ok"] and bool(c["ok"])
        ref = naive.get((r["shape"], r["tokens"], r["topk"]))
        if r["impl"] != "naive" and r["topk"] is not None and ref is not None:
            rel = abs(r["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-30)
            r["loss_rel_err_vs_naive"] = rel
            if rel > SWEEP_LOSS_RTOL[dtype]:
                r["ok"] = False
                r["mismatch"] = f"loss {r['loss']:.6g} vs naive {ref['loss']:.6g} (rel err {rel:.1e})"
                say(f"!!! MISMATCH {r['impl']} at {r['shape']} N={r['tokens']} K={r['topk']}: {r['mismatch']}")


# ------------------------------------------------------------------------------------ step benchmark


def run_steps(runner: Runner, impls: list[str], info: dict, sweep: sw.Sweep, vocab: int) -> list[dict]:
    model = dict(sw.STEP_MODEL, vocab=vocab)
    completion = max(1, sweep.step_tokens // sw.STEP_GENERATIONS)
    tokens = completion * sw.STEP_GENERATIONS
    base_job = dict(device=info["device"], model=model)
    baseline = runner.run("step model-only", dict(base_job, kind="step-model"))
    records = []
    for impl in impls:
        topk = 100 if impl in ("sdpo_fast", "trl-sdpo-topk") else None
        job = dict(
            base_job,
            kind="step",
            impl=impl,
            topk=topk,
            steps=sweep.step_steps,
            generations=sw.STEP_GENERATIONS,
            completion_length=completion,
        )
        res = runner.run(f"step {impl} ({tokens} tokens)", job)
        rec = new_record("step", impl, info, tokens=tokens, hidden=model["hidden"], vocab=vocab, topk=topk)
        rec.update(dtype="float32", steps=sweep.step_steps, completion_length=completion)
        rec.update(generations=sw.STEP_GENERATIONS)
        for key in ("median_ms", "times_ms", "rollout_ms", "losses", "error", "peak_mem_mib"):
            if key in res:
                rec[key] = res[key]
        if baseline.get("error"):
            rec["error"] = rec["error"] or f"model-only baseline failed: {baseline['error']}"
        elif info["device"] != "cuda" and rec["error"] is None:
            rec["peak_mem_mib"] = res["peak_rss_mib"] - baseline["peak_rss_mib"]
            rec.update(peak_rss_mib=res["peak_rss_mib"], baseline_rss_mib=baseline["peak_rss_mib"])
        rec["ok"] = rec["error"] is None
        records.append(rec)
    return records


# ------------------------------------------------------------------------------------ main


def build_sweep(args, device: str) -> sw.Sweep:
    """The default sweep for the device, narrowed or overridden by the command-line filters."""
    sweep = sw.default_sweep(device, args.quick)
    if args.model_shape:
        names = [s.strip() for s in args.model_shape.split(",") if s.strip()]
        for name in names:
            sw.parse_shape(name)  # fail early on a typo
        tokens = sweep.head_tokens.get(sweep.head_shapes[0])
        sweep.head_shapes = names
        sweep.head_tokens = {n: sweep.head_tokens.get(n, tokens) for n in names}
    if args.tokens:
        tokens = [int(t) for t in args.tokens.split(",")]
        sweep.head_tokens = dict.fromkeys(sweep.head_shapes, tokens)
        sweep.step_tokens = tokens[0]
    if args.topk:
        sweep.topks = [int(k) for k in args.topk.split(",")]
    if args.tokens or args.topk or args.model_shape:
        sweep.extra_k_tokens = {}  # an explicit selection runs every K at every size
    if args.steps:
        sweep.step_steps = args.steps
    if args.runs:
        sweep.runs = args.runs
    if args.warmup is not None:
        sweep.warmup = args.warmup
    return sweep


def selected_impls(args) -> list[str]:
    known = sw.HEAD_IMPLS + sw.STEP_IMPLS
    if not args.impl:
        return list(known)
    impls = [i.strip() for i in args.impl.split(",") if i.strip()]
    unknown = [i for i in impls if i not in known]
    if unknown:
        raise SystemExit(f"Unknown --impl {', '.join(unknown)}. Choose from: {', '.join(known)}.")
    return impls


def output_stem(args, info: dict) -> str:
    device = "cpu" if info["device"] == "cpu" else "cuda-" + report.slug(info["device_name"])
    stem = f"{device}-{time.strftime('%Y-%m-%d')}"
    if args.quick:
        stem += "-quick"
    if args.bench != "all":
        stem += f"-{args.bench}"
    if args.impl or args.tokens or args.model_shape or args.topk:
        stem += "-partial"
    return stem


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:  # re-render an earlier run's .md/.png next to its .json, without measuring
        records = json.loads(args.report.read_text())
        render(records, args.report.with_suffix(""), plot=not args.no_plot)
        return 0
    impls = selected_impls(args)
    started, load_start = time.time(), os.getloadavg()
    info = environment()
    dtype = args.dtype or ("bfloat16" if info["device"] == "cuda" else "float32")
    sweep = build_sweep(args, info["device"])
    cases, head_skips = sw.head_cases(sweep, impls, info["device"]) if args.bench in ("head", "all") else ([], [])
    steps, step_skips = sw.step_impls(impls, info["device"]) if args.bench in ("step", "all") else ([], [])
    cpu = info["device"] == "cpu"
    total = (1 if cases else 0) + (sum(1 + len(c.variants) for c in cases) if cpu else len({c.shape for c in cases}))
    total += (1 + len(steps)) if steps else 0
    print(
        f"sdpo-fast bench on {info['device_name']} (torch {info['torch']}): "
        f"{len(cases)} head cases, {len(steps)} step runs, {total} worker processes",
        flush=True,
    )
    runner = Runner(total, args.worker_timeout, args.time_budget)
    records = []
    for impl, reason in head_skips + step_skips:
        runner.say(f"[skip] {impl}: {reason}")
        bench = "head" if impl in sw.HEAD_IMPLS else "step"
        records.append(new_record(bench, impl, info, error=reason, skipped=True))
    check = {"results": {}}
    if cases:
        check = check_head(runner, cases, sweep.topks, info, dtype)
        if cpu:  # peak RSS is per process: one worker per variant
            batches = (run_head_case(runner, c, info, dtype, sweep.warmup, sweep.runs) for c in cases)
        else:  # one worker per shape, shapes in the order asked for (the goal shapes first)
            by_shape = {c.shape: [d for d in cases if d.shape == c.shape] for c in cases}
            batches = (
                batch
                for group in by_shape.values()
                for batch in run_shape_cuda(runner, group, info, dtype, sweep.warmup, sweep.runs)
            )
        for batch in batches:
            # judged before it is written: head.jsonl never holds a clean timing of a head that failed its check
            judge_head(batch, check, dtype, runner.say)
            for rec in batch:
                records.append(rec)
                runner.say(report.one_line(rec))
                append_jsonl(args.jsonl, rec)
    if steps:
        vocab = args.step_vocab or sw.STEP_MODEL["vocab"]
        for rec in run_steps(runner, steps, info, sweep, vocab):
            records.append(rec)
            runner.say(report.one_line(rec))
            append_jsonl(args.jsonl, rec)
    runner.bar.close()
    meta = dict(
        info,
        threads=runner.threads,
        command=" ".join(["python bench/run.py", *(sys.argv[1:] if argv is None else argv)]),
        date=time.strftime("%Y-%m-%d %H:%M"),
        runtime_s=time.time() - started,
        # Timings on a shared machine are only as good as its idleness: keep the load next to them.
        loadavg_start=[round(x, 2) for x in load_start],
        loadavg_end=[round(x, 2) for x in os.getloadavg()],
        cpus=os.cpu_count(),
        warmup=sweep.warmup,
        runs=sweep.runs,
        step_steps=sweep.step_steps,
        check=dict(shape=check.get("shape"), tokens=check.get("tokens")),
    )
    write_outputs(args, info, records, meta)
    return 0


def append_jsonl(path: Path | None, rec: dict) -> None:
    """Keep what is measured even if the run is cut short (a time cap on a lent GPU)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(rec) + "\n")


def write_outputs(args, info: dict, records: list[dict], meta: dict) -> None:
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / output_stem(args, info)
    report.head_ratios(records)
    report.step_ratios(records)
    for rec in records:
        rec["run"] = meta  # how the record was made, so `--report` can re-render it later
    stem.with_suffix(".json").write_text(json.dumps(records, indent=1) + "\n")
    written = [stem.with_suffix(".json"), *render(records, stem, plot=not args.no_plot)]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=1) + "\n")
        written.append(args.json)
    print(f"finished in {meta['runtime_s']:.0f} s; wrote " + ", ".join(str(p) for p in written))


def render(records: list[dict], stem: Path, plot: bool = True) -> list[Path]:
    """Write <stem>.md (and <stem>.png) from records; print the Markdown."""
    text = report.markdown(records, records[0]["run"])
    stem.with_suffix(".md").write_text(text)
    print(text)
    if plot and report.plot(records, stem.with_suffix(".png")):
        return [stem.with_suffix(".md"), stem.with_suffix(".png")]
    return [stem.with_suffix(".md")]


if __name__ == "__main__":
    sys.exit(main())
