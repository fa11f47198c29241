"""The examples, the toy experiment and the quick-start notebook, run the way users run them (`--smoke`, CPU, offline).

The code sandbox that `examples/sdpo_rich_feedback.py` uses is `sdpo_fast.sandbox`, tested in test_sandbox.py."""

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
TOY = ROOT / "experiments" / "toy"  # the SDPO-vs-GRPO toy experiment, which reuses the examples' plumbing
NOTEBOOK = EXAMPLES / "notebooks" / "sdpo_quickstart.ipynb"
sys.path.insert(0, str(EXAMPLES))

import sdpo_rich_feedback as rich  # noqa: E402


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["MPLBACKEND"] = "Agg"
    return env


def run_example(
    name: str, tmp_path: Path, *extra: str, timeout: int = 180, where: Path = EXAMPLES
) -> tuple[str, dict[str, str]]:
    """Run `<where>/<name> --smoke --output-dir tmp_path`; return stdout and its parsed summary block."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(where / name), "--smoke", "--output-dir", str(tmp_path), *extra],
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
    out, summary = run_example("sdpo_vs_grpo.py", tmp_path, where=TOY)
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


def test_rich_feedback_example_uses_the_library_sandbox():
    """The sandbox lives in `sdpo_fast.sandbox` (tested in tests/test_sandbox.py); the example keeps its names."""
    from sdpo_fast import sandbox

    for name in ("SandboxLimits", "run_tests", "format_test_feedback", "CodeReward", "TestRecord", "extract_code"):
        assert getattr(rich, name) is getattr(sandbox, name), name
    assert "_RUNNER" not in vars(rich) and "audit" not in vars(rich)  # no in-process sandbox of its own
    rows = rich.tiny_rows()
    tests = sandbox.parse_tests(rows[0]["tests"])  # stored as JSON text: one type per dataset column
    assert len(rows) == 30 and rows[0]["entry_point"] == "f" and tests[1] == {"input": [1], "output": 1}
