"""The real-model experiment's parts that need no model: tasks, rewards, splits, arms and the paired statistics."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "real_model"
sys.path.insert(0, str(EXPERIMENT))

import analysis  # noqa: E402
import arms  # noqa: E402
import tasks  # noqa: E402


def _call(task, rows, texts):
    columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
    return task.reward([[{"role": "assistant", "content": t}] for t in texts], **columns)


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_splits_are_fixed_disjoint_and_the_right_answer_scores_one(name):
    task = tasks.TASKS[name]
    train, held = task.split(32, 128, seed=0)
    assert (train, held) == task.split(32, 128, seed=0)
    assert len(held) == 128 and not {r["question"] for r in train} & {r["question"] for r in held}
    right = [r["answer"].replace(",", ", ") for r in train[:8]]
    assert [o["score"] for o in _call(task, train[:8], right)] == [1.0] * 8
    wrong = _call(task, train[:8], ["I do not know"] * 8)
    for row, out in zip(train[:8], wrong):
        assert out["score"] == 0.0 and out["feedback"]
        if name != "fruit":  # the new tasks' feedback never states the whole answer
            assert row["answer"].replace(",", ", ") not in out["feedback"] and row["answer"] not in out["feedback"]


def test_partial_credit_and_feedback_of_the_list_tasks():
    row = {"question": "q", "answer": "15,24,58,99"}
    out = _call(tasks.TASKS["sort"], [row], ["15, 58, 24, 99"])[0]
    assert out["score"] == 0.5 and out["feedback"].startswith("2 of 4 numbers are in the right place")
    assert _call(tasks.TASKS["sort"], [row], ["15, 24, 58, 99, 100"])[0]["score"] == 0.0  # extra numbers: no credit
    rev = {"question": "q", "answer": "bat,pink,red,kiwi"}
    out = _call(tasks.TASKS["reverse"], [rev], ["bat, red, pink, kiwi"])[0]
    assert out["score"] == 0.5 and "starts with the last word of the original list, bat" in out["feedback"]
    add = {"question": "q", "answer": "121", "terms": "49,72"}
    out = _call(tasks.TASKS["add"], [add], ["111"])[0]
    assert out["score"] == 0.0 and out["feedback"].startswith("Your answer is too low") and "121" not in out["feedback"]
    assert tasks.TASKS["add"].reward_plain(completions=["121"], answer=["121"], terms=["49,72"]) == [1.0]


def test_arms_build_or_say_what_is_missing():
    assert arms.sdpo_config(arms.ARMS["grpo"]).enabled is False
    assert arms.sdpo_config(arms.ARMS["hybrid"]).grpo_weight == 0.5
    assert arms.sdpo_config(arms.ARMS["sdpo"]).success_reward_threshold == 1.0
    from sdpo_fast import SDPOConfig

    if "objective" not in SDPOConfig.__dataclass_fields__:
        with pytest.raises(SystemExit, match=r"SDPOConfig\.objective"):
            arms.sdpo_config(arms.ARMS["srpo"])
    else:
        assert arms.sdpo_config(arms.ARMS["srpo"]).objective == "srpo"


def _run(arm, seed, correct, lr=1e-4):
    acc = float(np.mean(correct))
    return {"arm": arm, "lr": lr, "seed": seed, "steps": 4, "seconds": 1.0,
            "eval": [{"generations": 0, "accuracy": 0.1, "mean_score": 0.1, "correct": [0] * len(correct)},
                     {"generations": 64, "accuracy": acc, "mean_score": acc, "correct": list(correct)}]}  # fmt: skip


def test_paired_difference_is_the_mean_over_seeds_of_per_question_differences():
    rng = np.random.default_rng(0)
    base = [_run("grpo", s, rng.integers(0, 2, 200)) for s in range(3)]
    arm = [_run("sdpo", s, np.maximum(b["eval"][-1]["correct"], rng.integers(0, 2, 200))) for s, b in enumerate(base)]
    out = analysis.paired_difference(arm, base, resamples=1000)
    oracle = np.mean([np.mean(np.subtract(a["eval"][-1]["correct"], b["eval"][-1]["correct"])) for a, b in
                      zip(arm, base)])  # fmt: skip
    assert out["value"] == pytest.approx(oracle, abs=1e-12) and out["seeds"] == 3
    assert out["low"] < out["value"] < out["high"] and out["low"] > 0  # the arm only ever adds right answers
    same = analysis.paired_difference(base, base, resamples=200)
    assert same["value"] == same["low"] == same["high"] == 0.0


def test_summary_picks_the_best_lr_and_times_grpos_final(tmp_path, monkeypatch):
    monkeypatch.setattr(analysis, "RESULTS", tmp_path)
    runs = [_run("grpo", 0, [1, 0, 0, 0]), _run("grpo", 0, [1, 1, 0, 0], lr=3e-4), _run("sdpo", 0, [1, 1, 1, 0])]
    (tmp_path / "t" / analysis.RUNS).mkdir(parents=True)
    for i, r in enumerate(runs):
        (tmp_path / "t" / analysis.RUNS / f"{i}.json").write_text(__import__("json").dumps(r))
    rows = analysis.summarise("t")["rows"]
    best = {r["arm"]: r for r in rows.values() if r.get("best_lr")}
    assert best["grpo"]["lr"] == 3e-4 and best["sdpo"]["generations_to_grpo_final"] == 64
    assert best["sdpo"]["vs_grpo"]["value"] == pytest.approx(0.25)
