"""The examples and the quick-start notebook, run the way users run them (`--smoke`, on the CPU, offline),
plus the code sandbox of `examples/sdpo_rich_feedback.py` against hostile completions."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
NOTEBOOK = EXAMPLES / "notebooks" / "sdpo_quickstart.ipynb"
sys.path.insert(0, str(EXAMPLES))

import sdpo_rich_feedback as rich  # noqa: E402  (stdlib-only at import time)

# Where the interpreter is not readable by `nobody` (e.g. a venv under /root), the sandbox says so once.
pytestmark = pytest.mark.filterwarnings("ignore:The code sandbox cannot run")


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["MPLBACKEND"] = "Agg"
    return env


def run_example(name: str, tmp_path: Path, *extra: str, timeout: int = 180) -> tuple[str, dict[str, str]]:
    """Run `examples/<name> --smoke --output-dir tmp_path`; return stdout and its parsed summary block."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--smoke", "--output-dir", str(tmp_path), *extra],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_env(),
        timeout=timeout,
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert elapsed < 120, f"{name} --smoke took {elapsed:.0f} s"
    return proc.stdout, parse_summary(proc.stdout)


def parse_summary(stdout: str) -> dict[str, str]:
    """The `key : value` lines after the last `=== … summary ===` header."""
    header = list(re.finditer(r"^=== (.+ summary) ===$", stdout, re.MULTILINE))
    assert header, f"no summary block in:\n{stdout[-2000:]}"
    items = {}
    for line in stdout[header[-1].end() :].strip().splitlines():
        key, sep, value = line.partition(" : ")
        if sep:
            items[key.strip()] = value.strip()
    return items


def check_summary_json(tmp_path: Path, summary: dict[str, str]) -> dict:
    data = json.loads((tmp_path / "summary.json").read_text())
    assert set(data) == set(summary)
    return data


# ---------------------------------------------------------------------------------------------- the examples


@pytest.mark.slow
def test_basic_sdpo_smoke(tmp_path):
    _out, summary = run_example("basic_sdpo.py", tmp_path)
    data = check_summary_json(tmp_path, summary)
    assert summary["dataset"] == "arithmetic" and summary["model"] == "tiny-qwen2 (built in code)"
    assert data["steps"] == 2 and data["generations"] == 64  # 2 steps × 4 questions × 8 rollouts
    assert 0.0 <= data["reward_first_quarter"] <= 1.0
    # The random tiny model fails almost always, so the feedback reaches the teacher.
    assert data["feedback_used_fraction"] > 0.5 and data["reprompted_fraction"] > 0.5


@pytest.mark.slow
def test_sdpo_rich_feedback_smoke(tmp_path):
    out, summary = run_example("sdpo_rich_feedback.py", tmp_path)
    data = check_summary_json(tmp_path, summary)
    assert data["steps"] == 2 and data["completions_checked"] == 64 and data["sandbox_runs"] >= 1
    assert "Example feedback for a broken completion:\nRuntime Error\nZeroDivisionError" in out
    assert data["mean_feedback_used_fraction"] > 0.0


@pytest.mark.slow
def test_sdpo_vs_grpo_smoke(tmp_path):
    out, summary = run_example("sdpo_vs_grpo.py", tmp_path)
    data = check_summary_json(tmp_path, summary)
    png = tmp_path / "reward_vs_generations.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    table = (tmp_path / "results.md").read_text()
    assert re.search(r"^\| SDPO, lr 0.001 \|", table, re.M) and re.search(r"^\| GRPO, lr 0.001 \|", table, re.M)
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["curves"]) == {"SDPO, lr 0.001", "GRPO, lr 0.001"} and results["seeds"] == [0]
    for curves in results["curves"].values():
        assert [g for g, _ in curves[0]] == [32, 64]  # same generation budget for both arms
    assert {"copy_accuracy", "hint_accuracy", "solo_accuracy"} <= set(data) and data["chance"] == pytest.approx(1 / 12)
    assert "In-context check" in out and summary["verdict"] and data["generation_budget"] == 64


@pytest.mark.slow
def test_sdpo_with_unsloth_smoke_falls_back_to_peft(tmp_path):
    out, summary = run_example("sdpo_with_unsloth.py", tmp_path)
    data = check_summary_json(tmp_path, summary)
    assert "--smoke: running on the CPU without Unsloth, with PEFT LoRA" in out
    assert data["teacher"] == "lora-snapshot"  # the SDPO teacher is a snapshot of the one LoRA adapter
    assert data["backend"] == "PEFT LoRA (Unsloth not used)" and data["trainer_on_unsloth_patched_grpo"] is False
    assert data["steps"] == 2


def test_gsm8k_falls_back_with_a_clear_message_when_offline(capsys, monkeypatch):
    import basic_sdpo

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert basic_sdpo.gsm8k_rows(limit=4) is None
    message = capsys.readouterr().out
    assert "Could not load GSM8K" in message and "Falling back to the built-in arithmetic dataset" in message


def test_arithmetic_reward_and_feedback():
    import basic_sdpo

    rows = basic_sdpo.arithmetic_rows()
    assert rows and all(0 <= int(r["answer"]) <= 9 for r in rows)
    assert len(rows) == 24 and {"question": "What is 2 times 2?", "answer": "4"} in rows
    assert {"question": "What is 3 times 3?", "answer": "9"} in basic_sdpo.arithmetic_rows(max_operand=4)
    assert basic_sdpo.final_number("so the answer is 1,234.") == "1234"
    assert basic_sdpo.final_number("1 2") == "12"  # the tiny tokenizer decodes 12 as "1 2"
    assert basic_sdpo.final_number("2.50") == "2.5" and basic_sdpo.final_number("none") is None
    out = basic_sdpo.exact_match_with_feedback(
        [[{"role": "assistant", "content": "7"}], "It is 5", "no idea"], ["7", "7", "7"]
    )
    assert out[0] == {"score": 1.0, "feedback": None}
    assert out[1] == {"score": 0.0, "feedback": "Your final answer 5 is wrong. The expected answer is 7."}
    assert out[2]["score"] == 0.0 and out[2]["feedback"].endswith("The expected answer is 7.")


# ---------------------------------------------------------------------------------------------- the notebook


def _code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def test_notebook_marks_gpu_cells_and_imports_unsloth_first():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    cells = _code_cells(nb)
    gpu = [c for c in cells if "gpu-only" in c.metadata.get("tags", [])]
    assert any("%pip install" in c.source for c in gpu)
    assert any("FastLanguageModel.from_pretrained" in c.source for c in gpu)
    cpu_cells = [c for c in cells if c not in gpu]
    assert not any(re.search(r"%pip|import unsloth|FastLanguageModel", c.source) for c in cpu_cells)
    first_unsloth = next(i for i, c in enumerate(cells) if re.search(r"^import unsloth", c.source, re.MULTILINE))
    first_trl = next(
        i for i, c in enumerate(cells) if re.search(r"^\s*from (trl|sdpo_fast|transformers)", c.source, re.M)
    )
    assert first_unsloth < first_trl, "Unsloth must be imported before TRL / sdpo_fast"
    assert all(not c.outputs for c in cells), "commit the notebook without outputs"


@pytest.mark.slow
def test_notebook_runs_on_cpu_up_to_the_gpu_cells(tmp_path):
    """Every cell not tagged `gpu-only`, in order, as one script (IPython magics removed)."""
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    lines = []
    for cell in _code_cells(nb):
        if "gpu-only" in cell.metadata.get("tags", []):
            continue
        lines += [line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!"))]
        lines.append("")
    script = tmp_path / "notebook_smoke.py"
    script.write_text("\n".join(lines))
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=180
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "CPU smoke run: tiny model + PEFT LoRA instead of Unsloth" in proc.stdout
    assert re.search(r"steps: 2, last reward: \d\.\d{3}", proc.stdout)
    assert (tmp_path / "sdpo_quickstart_reward.png").stat().st_size > 5_000


# ---------------------------------------------------------------------------------------------- the code sandbox

LIMITS = rich.SandboxLimits(timeout_s=3.0, cpu_s=1, memory_mb=256)
ADD3 = [{"input": [x], "output": x + 3} for x in (0, 1, 2, 50)]


def run(code: str, tests=ADD3, limits=LIMITS):
    start = time.perf_counter()
    records = rich.run_tests(code, "f", tests, limits)
    return records, rich.format_test_feedback(records), time.perf_counter() - start


def test_sandbox_passes_a_correct_solution_and_runs_in_a_child():
    records, feedback, _ = run("import os\ndef f(x):\n    return x + 3 + 0 * os.getpid()")
    assert all(r.passed for r in records) and feedback == ""
    # the code ran in another process: its pid differs from ours
    records, _, _ = run("import os\ndef f(x):\n    return os.getpid()", tests=[{"input": [0], "output": os.getpid()}])
    assert records[0].status == "wrong_answer" and records[0].actual != os.getpid()


def test_privileges_are_dropped_when_possible():
    records, _, _ = run("import os\ndef f(x):\n    return os.getuid()", tests=[{"input": [0], "output": -1}])
    if os.geteuid() == 0 and rich._PRIVILEGE_DROP_WORKS:
        assert records[0].actual == 65534  # nobody
    else:  # not root, or the interpreter is unreachable for `nobody`: it runs as us, and said so
        assert records[0].actual == os.getuid()
        assert os.geteuid() != 0 or rich._PRIVILEGE_DROP_WORKS is False


def test_wrong_answers_feedback_shape():
    tests = [{"input": ["x" * n], "output": n} for n in (300, 5, 40, 1)]
    code = "def f(s):\n    print('debug', len(s))\n    return len(s) + 1"
    records, feedback, _ = run(code, tests=tests)
    assert [r.status for r in records] == ["wrong_answer"] * 4
    assert feedback.startswith("Wrong Answer: 4 of 4 tests failed.")
    assert feedback.count("Input:") == 2  # at most two failing tests …
    first, second = feedback.split("Test 2:")
    assert "f('x')" in first and "f('xxxxx')" in second  # … shortest input first
    assert "Output:\n2\nExpected:\n1" in first and "Stdout:\ndebug 1" in first


def test_feedback_is_capped():
    long = "y" * 5000
    tests = [{"input": [long + str(i)], "output": long} for i in range(3)]
    records, feedback, _ = run("def f(s):\n    return s[::-1]", tests=tests)
    assert not any(r.passed for r in records)
    assert len(feedback) <= 2000
    inputs = re.findall(r"Input:\n(.*)\n", feedback)
    assert inputs and all(len(i) <= 253 for i in inputs)  # 250 characters + "..."


def test_infinite_loop_times_out():
    records, feedback, elapsed = run("def f(x):\n    while True:\n        pass")
    assert elapsed < LIMITS.timeout_s + 2
    assert records[0].status == "timeout" and feedback.startswith("Time Limit Exceeded\nLast executed input:\nf(0)")
    _, feedback, elapsed = run("import time\ndef f(x):\n    time.sleep(60)")  # no CPU use: the wall clock
    assert elapsed < LIMITS.timeout_s + 2 and feedback.startswith("Time Limit Exceeded")
    _, feedback, elapsed = run("while True:\n    pass\ndef f(x):\n    return x")  # loops while loading
    assert elapsed < LIMITS.timeout_s + 2 and "while loading the code" in feedback


def test_os_exit_is_a_runtime_error_not_a_pass():
    records, feedback, _ = run("import os\ndef f(x):\n    os._exit(0)")
    assert not any(r.passed for r in records)
    assert feedback.startswith("Runtime Error\nthe process exited abruptly (exit status 0)")
    records, _, _ = run("import sys\ndef f(x):\n    sys.exit(0)")
    assert records[0].status == "runtime_error" and "SystemExit" in records[0].error


def test_huge_allocation_is_a_memory_error():
    for code in (
        "def f(x):\n    return len(bytearray(10**11))",
        "def f(x):\n    a = []\n    while True: a.append(' ' * 10**7)",
    ):
        records, _feedback, elapsed = run(code)
        assert records[0].status in ("runtime_error", "timeout") and elapsed < LIMITS.timeout_s + 2
    assert "MemoryError" in run("def f(x):\n    return len(bytearray(10**11))")[1]


def test_reading_stdin_does_not_hang():
    records, feedback, elapsed = run("def f(x):\n    return int(input())")
    assert elapsed < 2.5 and records[0].status == "runtime_error" and "EOFError" in feedback
    records, _, elapsed = run("import sys\ndef f(x):\n    return sys.stdin.read()")
    assert elapsed < 2.5 and records[0].status == "wrong_answer"


def test_forks_processes_files_and_signals_are_refused(tmp_path):
    target = tmp_path / "pwned"
    for code in (
        "import os\ndef f(x):\n    while True: os.fork()",
        "import subprocess\ndef f(x):\n    return x + 3",
        f"def f(x):\n    open({str(target)!r}, 'w').write('x')\n    return x + 3",
        "import os, signal\ndef f(x):\n    os.kill(os.getppid(), signal.SIGKILL)",
        "import ctypes\ndef f(x):\n    return x + 3",
    ):
        records, feedback, elapsed = run(code)
        assert not any(r.passed for r in records), code
        assert "PermissionError" in feedback and "not allowed in the sandbox" in feedback, feedback
        assert elapsed < 2.5
    assert not target.exists()


def test_printing_fake_results_gains_nothing():
    fake = json.dumps({"event": "result", "index": 0, "value": 3})
    code = f"import os, sys\ndef f(x):\n    os.write(1, b'{fake}\\n')\n    print({fake!r})\n    return -1"
    records, _, _ = run(code)
    assert all(r.status == "wrong_answer" and r.actual == -1 for r in records)


def test_format_and_compile_errors_are_shown_alone():
    _, feedback, _ = run("def g(x):\n    return x")
    assert feedback == "Format Error\nno function named 'f' is defined"
    _, feedback, _ = run("def f(x) return x")
    assert feedback.startswith("Compile Error\nSyntaxError") and "Input" not in feedback


def test_code_reward_survives_hostile_batches():
    reward = rich.CodeReward(limits=LIMITS, workers=2)
    completions = [
        "```python\ndef f(x):\n    return x + 3\n```",
        "def f(x):\n    while True: pass",
        "import os\ndef f(x):\n    os._exit(1)",
        "def f(x):\n    return len(bytearray(10**11))",
        "def f(x):\n    return input()",
        "no code at all",
    ]
    start = time.perf_counter()
    out = reward(prompts=[None] * 6, completions=completions, tests=[ADD3] * 6, entry_point=["f"] * 6)
    assert time.perf_counter() - start < 3 * (LIMITS.timeout_s + 2)
    assert [o["score"] for o in out] == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert out[0]["feedback"] is None and all(o["feedback"] for o in out[1:])
    assert out[5]["feedback"].startswith("Format Error") and reward.__name__ == "unit_tests"
    # conversational completions work too
    chat = [[{"role": "assistant", "content": "def f(x): return x + 3"}]]
    assert reward(completions=chat, tests=[ADD3], entry_point=["f"])[0]["score"] == 1.0
