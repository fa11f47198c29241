"""bench/run.py: a tiny end-to-end sweep in a subprocess, and the planning/judging/report logic in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import bench_scripts_imported

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
REQUIRED = ("bench", "impl", "device", "tokens", "hidden", "vocab", "topk", "dtype")
REQUIRED += ("peak_mem_mib", "median_ms", "ok", "error")
# Head at H=64, V=2048, N=32 and K=20; a 2-step training run at vocab 2048 with 8 × 4 loss tokens.
# TRL's competitors are left out here only to keep CI fast (each of their processes imports TRL).
TINY = [
    "--quick",
    "--model-shape",
    "64x2048",
    "--tokens",
    "32",
    "--topk",
    "20",
    "--step-vocab",
    "2048",
    "--steps",
    "2",
    "--impl",
    "naive,sdpo_fast-torch,sdpo_fast-triton,liger-jsd,grpo,sdpo_fast",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-out")
    before = set((BENCH / "results").glob("*"))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(BENCH / "run.py"), *TINY, "--out-dir", str(out), "--json", str(out / "records.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert set((BENCH / "results").glob("*")) == before, "a CI run must not write into bench/results"
    return out, json.loads((out / "records.json").read_text()), proc.stdout


@pytest.mark.slow
def test_records_carry_every_field(tiny_run):
    _, records, _ = tiny_run
    assert records
    for rec in records:
        missing = [k for k in REQUIRED if k not in rec]
        assert not missing, f"{rec['impl']} lacks {missing}"
        assert rec["bench"] in ("head", "step")


def test_implemented_backends_run_and_match_the_oracle(tiny_run, bench_modules):
    trl_scores_with_triton_only = bench_modules["sweep"].trl_scores_with_triton_only
    _, records, _ = tiny_run
    ran = {(r["bench"], r["impl"]) for r in records if not r.get("skipped")}
    expected = {("head", "naive"), ("head", "sdpo_fast-torch"), ("step", "grpo"), ("step", "sdpo_fast")}
    if trl_scores_with_triton_only():  # TRL 1.15's own GRPO step cannot run on a CPU: it is skipped, and says why
        expected.discard(("step", "grpo"))
        grpo = next(r for r in records if r["impl"] == "grpo")
        assert grpo["skipped"] and "TRL 1.15 scores log-probs with Triton kernels" in grpo["error"]
    assert ran == expected
    for rec in records:
        if rec.get("skipped"):
            continue
        assert rec["ok"] is True and rec["error"] is None, rec
        assert rec["median_ms"] > 0 and isinstance(rec["peak_mem_mib"], float)
        assert (rec["tokens"], rec["vocab"]) == (32, 2048)
    torch_rec = next(r for r in records if r["impl"] == "sdpo_fast-torch")
    assert torch_rec["topk"] == 20 and torch_rec["hidden"] == 64 and torch_rec["dtype"] == "float32"
    assert torch_rec["check"]["ok"] and torch_rec["check"]["grad_w_rel_err"] < 1e-3
    assert torch_rec["loss_rel_err_vs_naive"] < 1e-3


def test_gpu_only_competitors_are_skipped_with_a_reason(tiny_run, bench_modules):
    _, records, stdout = tiny_run
    assert "[skip] liger-jsd: skipped: " in stdout  # one clear console line
    skipped = {r["impl"]: r for r in records if r.get("skipped")}
    trl_cpu = {"grpo"} if bench_modules["sweep"].trl_scores_with_triton_only() else set()
    assert set(skipped) == {"sdpo_fast-triton", "liger-jsd"} | trl_cpu
    for rec in skipped.values():
        assert rec["ok"] is False and rec["median_ms"] is None
        assert isinstance(rec["error"], str) and "CUDA" in rec["error"]


def test_result_files_are_written_to_the_out_dir(tiny_run):
    out, records, _ = tiny_run
    stems = {p.suffix: p for p in out.iterdir() if p.name != "records.json"}
    assert set(stems) == {".json", ".md", ".png"}
    assert stems[".json"].name.startswith("cpu-") and "-quick-partial" in stems[".json"].name
    assert json.loads(stems[".json"].read_text()) == records
    md = stems[".md"].read_text()
    for heading in ("## Correctness", "## Head: forward + backward", "## Training step", "## Skipped"):
        assert heading in md
    assert stems[".png"].read_bytes()[:4] == b"\x89PNG"


def test_report_re_renders_an_earlier_run(tiny_run, tmp_path):
    out, _, _ = tiny_run
    original = next(p for p in out.iterdir() if p.suffix == ".json" and p.name != "records.json")
    copy = tmp_path / original.name
    copy.write_text(original.read_text())
    proc = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--report", str(copy), "--no-plot"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert copy.with_suffix(".md").read_text() == original.with_suffix(".md").read_text()


# ------------------------------------------------------------------------------------ in-process logic


@pytest.fixture
def bench_modules():
    """bench/'s scripts, imported from their folder and forgotten afterwards."""
    with bench_scripts_imported(
        *("run", "sweep", "report", "worker", "head_bench", "topk_sim", "cost_model", "gpu_summary")
    ) as modules:
        yield modules


def _head(impl, loss, topk=100, mem=100.0, ms=10.0, tokens=2048):
    return dict(
        bench="head", impl=impl, shape="cpu-h256", tokens=tokens, hidden=256, vocab=151936, topk=topk,
        dtype="float32", loss=loss, peak_mem_mib=mem, median_ms=ms, ok=True, error=None,
    )  # fmt: skip


def test_a_loss_that_differs_from_naive_is_flagged(bench_modules):
    run = bench_modules["run"]
    records = [_head("naive", 1.0), _head("sdpo_fast-torch", 1.0 + 1e-6), _head("trl-chunked", 5.0, topk=None)]
    wrong = _head("sdpo_fast-torch", 1.1, tokens=512)
    records += [_head("naive", 1.0, tokens=512), wrong]
    check = {"results": {("sdpo_fast-torch", 100): {"ok": True}, ("trl-chunked", None): {"ok": False}}}
    said = []
    run.judge_head(records, check, "float32", said.append)
    ok = {(r["impl"], r["tokens"]): r["ok"] for r in records}
    assert ok[("sdpo_fast-torch", 2048)] is True
    assert ok[("sdpo_fast-torch", 512)] is False and "vs naive" in wrong["mismatch"]
    assert ok[("trl-chunked", 2048)] is False  # failed the correctness check; not compared with top-K naive
    assert ok[("naive", 2048)] is True
    assert any("MISMATCH" in line for line in said)


def test_goal_verdicts_follow_the_numbers(bench_modules):
    report = bench_modules["report"]
    meta = dict(device="cpu", device_name="cpu", date="d", command="c", runtime_s=1, threads=2, warmup=1, runs=3)
    step = dict(bench="step", tokens=1024, hidden=128, vocab=151936, ok=True, error=None, generations=8)
    step.update(completion_length=128, steps=4, dtype="float32")
    records = [
        _head("naive", 1.0, mem=4000.0, ms=10.0),
        _head("sdpo_fast-torch", 1.0, mem=400.0, ms=15.0),
        dict(step, impl="grpo", topk=None, peak_mem_mib=1500.0, median_ms=10_000.0),
        dict(step, impl="trl-sdpo-topk", topk=100, peak_mem_mib=3300.0, median_ms=9_000.0),
        dict(step, impl="sdpo_fast", topk=100, peak_mem_mib=1800.0, median_ms=12_000.0),
    ]
    md = report.markdown(records, meta)
    head_goal = next(line for line in md.splitlines() if line.startswith("- CPU head"))
    assert "10.0× less" in head_goal and "goal ≥ 8×: **met**" in head_goal
    assert "1.50× naive" in head_goal and "goal ≤ 1.3×: **NOT met**" in head_goal
    step_goal = next(line for line in md.splitlines() if line.startswith("- Training step"))
    assert "6.0× less" in step_goal and "goal ≥ 4×: **met**" in step_goal
    assert "1.20× GRPO" in step_goal and "goal ≤ 1.3×: **met**" in step_goal
    assert "**1.50× SLOWER**" in md  # losses are stated plainly
    records[-1]["peak_mem_mib"] = 600.0  # below GRPO: no ratio to take, but the goal holds
    step_goal = next(line for line in report.markdown(records, meta).splitlines() if line.startswith("- Training"))
    assert "peaks **900 MiB below** plain GRPO" in step_goal and "goal ≥ 4×: **met**" in step_goal


def test_default_cpu_sweep_contains_the_goal_configuration(bench_modules):
    sw = bench_modules["sweep"]
    cases, skipped = sw.head_cases(sw.default_sweep("cpu", quick=False), list(sw.HEAD_IMPLS), "cpu")
    goal = next(c for c in cases if (c.hidden, c.vocab, c.tokens) == (256, 151936, 2048))
    assert {("naive", 100), ("sdpo_fast-torch", 100), ("trl-chunked", None)} <= set(goal.variants)
    assert sum(1 for impl, _ in goal.variants if impl == "trl-chunked") == 1  # independent of K
    gpu_only = {"liger-jsd", "sdpo_fast-triton", "lse-triton"}
    assert {impl for impl, _ in skipped} == gpu_only
    assert all(impl not in gpu_only for c in cases for impl, _ in c.variants)
    assert "trl.kernels.chunked_divergence" in goal.imports  # the baseline imports what the impls import


def test_lse_floor_matches_a_full_logit_cross_entropy(bench_modules):
    """`lse-triton` (the floor the GPU head is measured against) is checked here under the interpreter."""
    pytest.importorskip("triton")
    hb = bench_modules["head_bench"]
    x = hb.make_inputs(9, 16, 300, "float32", "cpu")
    got = hb._loss_and_grads(hb._lse_triton, x, None, 0.5, None)
    ref = hb._loss_and_grads(hb.cross_entropy_oracle, x, None, 0.5, None)
    assert abs(got[0] - ref[0]) <= 1e-5 * abs(ref[0])
    for a, b in zip(got[1:], ref[1:]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_topk_replay_backs_the_threshold_scheme(bench_modules):
    """bench/topk_sim.py backs the design note: our stale threshold reads each tile about once and buffers a few K
    candidates per row; the first-proposed scheme (`"issue"` in topk_sim: τ including the tile being swept) buffers
    fewer but reads every tile twice; ascending logits defeat any threshold (the candidate buffer overflows and the
    exact fallback runs)."""
    sim = bench_modules["topk_sim"]
    z = sim.logits("iid", 8, 81920)
    ours = sim.replay(z, 20, 8192, 16, "stale")
    issue = sim.replay(z, 20, 8192, 16, "issue")
    assert issue["reads"] == 2.0 and ours["reads"] == 1.1  # the first of ten tiles is read twice
    assert 20 <= issue["mean"] < ours["mean"] < 20 * 10  # every row holds at least its K winners
    assert ours["max"] <= sim_capacity(20)
    worst = sim.replay(sim.logits("ascending", 4, 40960), 20, 8192, 16, "stale")
    assert worst["max"] > sim_capacity(20)


def sim_capacity(k: int) -> int:
    from sdpo_fast.kernels.triton_head import candidate_capacity

    return candidate_capacity(k, 151936)


# ------------------------------------------------------------------------------------ the GPU check, on the CPU


# The GPU check itself (bench/gpu_check.sh) is dry-run in tests/test_gpu_check_dryrun.py.


def test_cost_model_is_calibrated_on_trl_and_labels_its_numbers(bench_modules):
    cost = bench_modules["cost_model"]
    for overlap, (low, high) in ((False, (0.9, 1.25)), (True, (0.7, 1.0))):
        assert all(low <= r <= high for r in cost.calibration(overlap=overlap).values())
    text = cost.table(cost.DEVICES["h100"])
    assert "PREDICTED" in text and text.count("| qwen2.5-0.5b") == 3
    dev = cost.DEVICES["h100"]
    ours, trl = (
        cost.predict_ms(cost.ours(16384, 896, 151936), dev),
        cost.predict_ms(cost.trl_chunked(16384, 896, 151936), dev),
    )
    assert ours < trl  # five GEMMs against TRL's eight, and fewer bytes
