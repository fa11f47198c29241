"""The GPU check, dry-run on the CPU under the lent GPU machine's limits, so that its first real run cannot fail.

The limits (the device tool's README): one command of at most 2,000 characters and 10 minutes; at most 64 MiB
carried (working tree plus wheels); at most 8 files back from $OUT, no more than two folders deep, named with
letters, digits, '.', '_' and '-'. The dry run executes the documented launch command with a wheel folder whose
`trl` is broken on purpose (a competitor that does not import) and a tiny sweep; the other scenarios are a wheel
that does not install, a step that runs out of time, and a kill of the whole check in the middle of a step.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
from conftest import bench_scripts_imported

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
LIMIT_FILES, LIMIT_DEPTH, LIMIT_BYTES, LIMIT_COMMAND = 8, 2, 64 * 2**20, 2000
LEGAL = re.compile(r"^[A-Za-z0-9._-]+$")
pytestmark = pytest.mark.slow


@pytest.fixture
def bench_scripts():
    """bench/'s scripts, imported from their folder and forgotten afterwards."""
    with bench_scripts_imported(*("build_gpu_wheels", "run", "sweep", "report", "worker")) as modules:
        yield modules


def launches() -> list[dict]:
    """The `run` tool calls documented in bench/README.md, in order."""
    text = (BENCH / "README.md").read_text()
    section = text.split("### Launching on a GPU machine", 1)[1].split("\n## ", 1)[0]
    return [json.loads(block) for block in re.findall(r"```json\n(.*?)\n```", section, re.S)]


def make_wheel(folder: Path, name: str, version: str, files: dict[str, str]) -> Path:
    """A minimal pure-Python wheel (what pip needs: the files, METADATA, WHEEL and RECORD)."""
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    meta = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(path, "w") as z:
        for arc, body in {**files, **meta}.items():
            z.writestr(arc, body)
        z.writestr(f"{info}/RECORD", "".join(f"{arc},,\n" for arc in {**files, **meta}) + f"{info}/RECORD,,\n")
    return path


def returned(out: Path) -> list[Path]:
    """What the GPU machine would send back from $OUT, after checking each limit on it."""
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= LIMIT_FILES, files
    for p in files:
        rel = p.relative_to(out)
        assert len(rel.parts) - 1 <= LIMIT_DEPTH, rel
        assert all(LEGAL.match(part) for part in rel.parts), rel
    return files


def archive(out: Path) -> dict[str, bytes]:
    with tarfile.open(out / "gpu-check.tar.gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def steps(out: Path) -> dict[str, str]:
    lines = (out / "steps.tsv").read_text().splitlines()[1:]
    return {line.split("\t")[0]: line.split("\t")[1] for line in lines}


def check_env(tmp: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env.update(PYTHON=sys.executable, GPU_CHECK_WORK=str(tmp / "work"), GPU_CHECK_PACK_EVERY_S="1", **extra)
    return env


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The documented main launch, verbatim but for the wheel folder, on the CPU with a tiny sweep."""
    tmp = tmp_path_factory.mktemp("gpu-check")
    wheels = tmp / "wheels"
    wheels.mkdir()
    # A carried competitor that does not import: it shadows the installed TRL in the check's processes only.
    make_wheel(wheels, "trl", "99.0", {"trl/__init__.py": "raise ImportError('this trl is broken on purpose')\n"})
    make_wheel(wheels, "dryrun_extra", "1.0", {"dryrun_extra/__init__.py": "VALUE = 42\n"})
    main = launches()[0]
    command = main["command"].replace(main["carry"][0], str(wheels))
    env = check_env(tmp, OUT=str(tmp / "out"), SWEEP_SHAPES="64x2048", SWEEP_TOKENS="32", SWEEP_RUNS="1")
    env.update(SWEEP_WARMUP="0", SWEEP_IMPLS="naive,sdpo_fast-torch,trl-chunked")
    t0 = time.monotonic()
    proc = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return tmp / "out", proc, time.monotonic() - t0, tmp


def test_launch_commands_fit_the_machine(dry_run):
    calls = launches()
    assert [c["carry"] for c in calls] == [[".gpu-wheels"], [".gpu-wheels-unsloth"]]
    ignored = (REPO / ".gitignore").read_text().splitlines()
    for call in calls:
        assert len(call["command"]) <= LIMIT_COMMAND and len(call["carry"]) <= 8
        assert call["timeout_s"] <= 600 and "$OUT" in call["command"]
        assert all(f"/{c}/" in ignored for c in call["carry"]), "carried wheels must be git-ignored"
    assert "GPU_CHECK_STEPS=bench/gpu_check.extra.d" in calls[1]["command"]


def test_carried_size_fits_64_mib(bench_scripts):
    """Tracked files plus each bundle's wheels (sizes as the build script measured them) within one launch's limit."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout: the tracked files are unknown")
    tree = sum((REPO / n).stat().st_size for n in tracked.stdout.decode().split("\0") if n and (REPO / n).is_file())
    bench_build = bench_scripts["build_gpu_wheels"]
    for bundle, pins in bench_build.BUNDLES.items():
        assert all(re.fullmatch(r"[a-z0-9-]+==[0-9][0-9a-z.]*", p) for p in pins), pins  # exact pins only
        assert all(size > 0 for size in pins.values()), f"{bundle}: a wheel's size was never measured"
        assert tree + sum(pins.values()) <= bench_build.CARRY_LIMIT == LIMIT_BYTES, bundle
    assert "trl==1.15.0" in bench_build.BUNDLES["unsloth"]  # the newest TRL Unsloth 2026.10 allows


def test_the_check_passes_and_returns_four_legal_files(dry_run):
    out, proc, seconds, _ = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in returned(out)) == ["gpu-check.tar.gz", "head.jsonl", "short-table.md", "steps.tsv"]
    assert steps(out) == {"00-install": "ok", "10-gpu-tests": "skipped: no CUDA device", "20-head-sweep": "ok",
                          "30-tile-budget": "skipped: no CUDA device"}  # fmt: skip
    names = archive(out)
    for name in ("00-install.log", "20-head-sweep.log", "environment.json", "head.json", "steps.tsv"):
        assert f"results/{name}" in names, sorted(names)
    assert any(re.fullmatch(r"results/cpu-.*-head-partial\.md", n) for n in names)
    assert seconds < 480


def test_install_step_uses_the_shim_and_the_carried_wheels(dry_run, tmp_path):
    out, _, _, tmp = dry_run
    env = json.loads(archive(out)["results/environment.json"])
    assert "dryrun-extra 1.0" in env["installed"] and "trl 99.0" in env["installed"]
    assert env["modules"]["sdpo_fast"]["file"].startswith(str(tmp / "work" / "shim"))
    assert env["modules"]["sdpo_fast.kernels.function"]["ok"]
    assert str(REPO / "kernels") not in str(env["top_level_kernels"])
    assert (tmp / "work" / "site" / "dryrun_extra" / "__init__.py").is_file()
    # The shim alone makes the project importable, from any folder, with sdpo_fast.kernels and the trainer.
    code = "import sdpo_fast.kernels.function as f, sdpo_fast; from sdpo_fast import SDPOTrainer; print(f.__file__)"
    env_shim = {**os.environ, "PYTHONPATH": str(tmp / "work" / "shim")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env_shim, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(tmp / "work" / "shim" / "sdpo_fast" / "kernels" / "function.py")


def test_a_competitor_that_does_not_import_is_isolated(dry_run):
    out, _, _, _ = dry_run
    log = archive(out)["results/00-install.log"].decode()
    assert "!!! WARNING: competitor trl-chunked (TRL) does not import" in log and "broken on purpose" in log
    records = {r["impl"]: r for r in map(json.loads, (out / "head.jsonl").read_text().splitlines())}
    assert records["trl-chunked"]["error"].startswith("skipped: import failed (trl.kernels.chunked_divergence")
    for impl in ("naive", "sdpo_fast-torch"):  # the others' results stand, judged before they were written
        assert records[impl]["ok"] is True and records[impl]["median_ms"] > 0, records[impl]
    assert records["sdpo_fast-torch"]["check"]["ok"] is True
    table = (out / "short-table.md").read_text()
    assert "- trl-chunked: did not run: skipped: import failed" in table


def test_a_failed_install_stops_the_check_early_and_names_the_package(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "liger_kernel-0.8.5-py3-none-any.whl").write_bytes(b"not a zip file")
    out = tmp_path / "out"
    t0 = time.monotonic()
    proc = subprocess.run(
        ["bash", str(BENCH / "gpu_check.sh"), str(out), str(wheels)],
        env=check_env(tmp_path), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1 and time.monotonic() - t0 < 60
    assert "INSTALL FAILED: package liger-kernel" in proc.stdout
    status = steps(out)
    assert status.pop("00-install") == "FAILED (exit 1): check stopped"
    assert set(status.values()) == {"skipped: the check stopped after 00-install failed"}
    assert "INSTALL FAILED: package liger-kernel" in archive(out)["results/00-install.log"].decode()
    returned(out)


def _stand_in_steps(folder: Path, slow_cap: int) -> None:
    folder.mkdir()
    (folder / "00-install.sh").write_text("# cap-seconds: 20\necho no wheels to install\n")
    rec = json.dumps(dict(bench="head", impl="naive", shape="s", tokens=1, hidden=1, vocab=2, topk=1, median_ms=1.0))
    (folder / "10-first.sh").write_text(f"# cap-seconds: 20\necho '{rec}' >> \"$RESULTS_DIR/head.jsonl\"\n")
    (folder / "20-slow.sh").write_text(
        f'# cap-seconds: {slow_cap}\necho measured-before-the-cut > "$RESULTS_DIR/slow.txt"\necho started\nsleep 60\n'
    )
    (folder / "30-after.sh").write_text("# cap-seconds: 20\nexit 3\n")


def test_a_step_that_times_out_keeps_its_results_and_the_next_step_runs(tmp_path):
    _stand_in_steps(tmp_path / "steps", slow_cap=2)
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(BENCH / "gpu_check.sh"), str(out)],
        env=check_env(tmp_path, GPU_CHECK_STEPS=str(tmp_path / "steps")), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert steps(out) == {"00-install": "ok", "10-first": "ok", "20-slow": "TIMED OUT after 2 s",
                          "30-after": "FAILED (exit 3)"}  # fmt: skip
    names = archive(out)
    assert names["results/slow.txt"] == b"measured-before-the-cut\n" and b"started" in names["results/20-slow.log"]
    assert json.loads((out / "head.jsonl").read_text())["impl"] == "naive"
    returned(out)


def test_a_kill_in_the_middle_of_a_step_still_leaves_everything_measured(tmp_path):
    """The run tool kills the command at its limit: what was packed by then (every second here) is what returns."""
    _stand_in_steps(tmp_path / "steps", slow_cap=60)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        ["bash", str(BENCH / "gpu_check.sh"), str(out)], env=check_env(tmp_path, GPU_CHECK_STEPS=str(tmp_path / "steps")),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if (out / "gpu-check.tar.gz").exists() and "results/slow.txt" in archive(out):
                break
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    names = archive(out)
    assert names["results/slow.txt"] == b"measured-before-the-cut\n"
    assert steps(out) == {"00-install": "ok", "10-first": "ok"}  # the step in flight has no line yet
    assert json.loads((out / "head.jsonl").read_text())["impl"] == "naive"
    returned(out)


def test_the_time_plan_fits_one_command():
    def cap(step: Path) -> int:
        return int(re.search(r"^# cap-seconds: (\d+)", step.read_text(), re.M)[1])

    main = sorted((BENCH / "gpu_check.d").glob("[0-9]*.sh"))
    assert [p.stem for p in main] == ["00-install", "10-gpu-tests", "20-head-sweep", "30-tile-budget"]
    assert sum(map(cap, main)) <= 480 <= 600 - 60  # the check's total, and a minute of margin under the tool's limit
    extra = sorted((BENCH / "gpu_check.extra.d").glob("[0-9]*.sh"))
    assert sum(map(cap, extra)) <= 480
    sweep = (BENCH / "gpu_check.d" / "20-head-sweep.sh").read_text()
    order = re.search(r"SWEEP_SHAPES:-([a-z0-9.,-]+)", sweep)[1].split(",")
    assert order[:2] == ["llama-3.1-8b", "qwen2.5-0.5b"]  # the goal shapes first
    assert "--time-budget" in sweep and "--worker-timeout" in sweep


def test_a_worker_past_its_timeout_is_killed_and_a_spent_budget_starts_none(bench_scripts):
    run = bench_scripts["run"]
    killed = run.launch({"kind": "probe"}, timeout=0.05)  # importing torch alone takes longer
    assert killed == {"error": "worker timed out after 0 s", "cases": []}
    runner = run.Runner(1, worker_timeout=100, budget=0)
    result = runner.run("never started", {"kind": "probe"})
    assert result["no_time"] and "time budget was spent" in result["error"]
