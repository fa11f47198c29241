"""Merge the per-run result files of a task into a summary, a table and plots (`run.py merge --task T`).

Per arm and learning rate: the held-out accuracy curve per seed, its mean and spread; the best learning rate
per arm (the highest mean final accuracy over the seeds that ran); each arm's final accuracy and its paired
difference to GRPO with a 95% interval from a two-level bootstrap (seeds, then questions within a seed: both
are sampled, so both are resampled); and the generations each arm needs to reach GRPO's final accuracy.
The predictive-law check pairs the pre-flight gap of a context with the final gain of the arm that uses it.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
RUNS = "per_run"  # one file per (arm, lr, seed, steps, temperature); not `runs/`, which .gitignore drops
CONTEXT_ARM = {"demonstration": "sdpo_demos", "both": "sdpo"}  # which arm distils which pre-flight context


def load_runs(task: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((RESULTS / task / RUNS).glob("*.json"))]


def by_arm(runs: list[dict]) -> dict[tuple[str, float, int, float], list[dict]]:
    """Runs grouped by (arm, lr, steps, sampling temperature), in seed order."""
    groups: dict[tuple[str, float, int, float], list[dict]] = defaultdict(list)
    for r in runs:
        groups[(r["arm"], r["lr"], r["steps"], r.get("temperature", 1.0))].append(r)
    for v in groups.values():
        v.sort(key=lambda r: r["seed"])
    return groups


def mean_curve(runs: list[dict]) -> list[tuple[int, float, float, float]]:
    """(generations, mean, min, max) of held-out accuracy over the seeds, at the points every seed has."""
    points = sorted(set.intersection(*[{p["generations"] for p in r["eval"]} for r in runs]))
    out = []
    for g in points:
        accs = [next(p["accuracy"] for p in r["eval"] if p["generations"] == g) for r in runs]
        out.append((g, float(np.mean(accs)), min(accs), max(accs)))
    return out


def paired_difference(arm: list[dict], base: list[dict], resamples: int = 4000, seed: int = 0) -> dict:
    """Final accuracy of `arm` minus `base`, paired by seed and question; two-level bootstrap 95% interval."""
    base_by_seed = {r["seed"]: r for r in base}
    diffs = [
        np.array(r["eval"][-1]["correct"], dtype=np.float64) - np.array(base_by_seed[r["seed"]]["eval"][-1]["correct"])
        for r in arm
        if r["seed"] in base_by_seed
    ]
    if not diffs:
        return {"value": None, "low": None, "high": None, "seeds": 0}
    value = float(np.mean([d.mean() for d in diffs]))
    rng = np.random.default_rng(seed)
    stats = np.empty(resamples)
    for b in range(resamples):
        seeds = rng.integers(0, len(diffs), len(diffs))
        stats[b] = np.mean([diffs[s][rng.integers(0, diffs[s].size, diffs[s].size)].mean() for s in seeds])
    low, high = np.quantile(stats, [0.025, 0.975])
    return {"value": value, "low": float(low), "high": float(high), "seeds": len(diffs)}


def generations_to(curve: list[tuple[int, float, float, float]], target: float) -> int | None:
    return next((g for g, m, _, _ in curve if m >= target - 1e-12), None)


def summarise(task: str) -> dict:
    groups = by_arm(load_runs(task))
    rows = {}
    for (arm, lr, steps, temp), runs in groups.items():
        finals = [r["eval"][-1]["accuracy"] for r in runs]
        rows[f"{arm}|{lr:g}|{steps}|{temp:g}"] = {
            "arm": arm, "lr": lr, "steps": steps, "temperature": temp, "seeds": [r["seed"] for r in runs],
            "final_accuracy": finals, "final_mean": float(np.mean(finals)),
            "final_sd": float(np.std(finals, ddof=1)) if len(finals) > 1 else None,
            "start_accuracy": runs[0]["eval"][0]["accuracy"], "curve": mean_curve(runs),
            "final_mean_score": float(np.mean([r["eval"][-1]["mean_score"] for r in runs])),
            "start_mean_score": runs[0]["eval"][0]["mean_score"],
            "seconds": [r["seconds"] for r in runs],
        }  # fmt: skip
    best: dict[tuple[str, int, float], str] = {}
    for key, row in rows.items():
        slot = (row["arm"], row["steps"], row["temperature"])
        if slot not in best or row["final_mean"] > rows[best[slot]]["final_mean"]:
            best[slot] = key
    for (arm, steps, temp), key in best.items():
        rows[key]["best_lr"] = True
        rows[key]["lrs_tried"] = sum(
            (r["arm"], r["steps"], r["temperature"]) == (arm, steps, temp) for r in rows.values()
        )
        grpo = best.get(("grpo", steps, temp))
        if grpo is None or arm == "grpo":
            continue
        arm_runs = groups[(arm, rows[key]["lr"], steps, temp)]
        grpo_runs = groups[("grpo", rows[grpo]["lr"], steps, temp)]
        rows[key]["vs_grpo"] = paired_difference(arm_runs, grpo_runs)
        target = rows[grpo]["curve"][-1][1]
        rows[key]["generations_to_grpo_final"] = generations_to(rows[key]["curve"], target)
    for (arm, _steps, _temp), key in best.items():
        if arm == "grpo":
            rows[key]["generations_to_grpo_final"] = generations_to(rows[key]["curve"], rows[key]["curve"][-1][1])
    return {"task": task, "rows": rows}


def _shown(x, fmt="{:.3f}") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def best_mark(row: dict) -> str:
    tried = row.get("lrs_tried", 1)
    return f" (best of {tried} lrs)" if row.get("best_lr") and tried > 1 else ""


def table(summary: dict) -> list[str]:
    lines = [
        f"### {summary['task']}",
        "",
        "| arm | lr | steps | temperature | seeds | held-out accuracy start → final (mean ± sd over seeds) | per seed "
        "| mean score start → final | generations to GRPO's final | final − GRPO, paired [95% CI] |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(summary["rows"].values(), key=lambda r: (r["temperature"], r["steps"], r["arm"], r["lr"])):
        vs = row.get("vs_grpo")
        ci = "" if not vs or vs["value"] is None else f"{vs['value']:+.3f} [{vs['low']:+.3f}, {vs['high']:+.3f}]"
        lines.append(
            f"| {row['arm']}{best_mark(row)} | {row['lr']:g} | {row['steps']} | "
            f"{row['temperature']:g} | "
            f"{len(row['seeds'])} | {row['start_accuracy']:.3f} → {row['final_mean']:.3f} ± {_shown(row['final_sd'])} | "
            f"{', '.join(f'{a:.3f}' for a in row['final_accuracy'])} | "
            f"{row['start_mean_score']:.3f} → {row['final_mean_score']:.3f} | "
            f"{_shown(row.get('generations_to_grpo_final'), '{}') if row.get('best_lr') else ''} | {ci} |"
        )
    return lines


def plot_curves(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in summary["rows"].values():
        if not row.get("best_lr"):
            continue
        g, m, lo, hi = zip(*row["curve"])
        seeds = len(row["seeds"])
        label = f"{row['arm']} (lr {row['lr']:g}, T {row['temperature']:g}, {seeds} seed{'s' * (seeds > 1)})"
        (line,) = ax.plot(g, m, marker="o", label=label)
        ax.fill_between(g, lo, hi, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("generations")
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.set_title(f"SmolLM2-135M, task {summary['task']}: mean and min–max over seeds (best lr per arm)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gap_vs_gain(tasks: list[str]) -> list[dict]:
    """Per task and context: the pre-flight success gap at step 0 and the matching arm's final gain over GRPO."""
    points = []
    for task in tasks:
        summary_path = RESULTS / task / "summary.json"
        if not summary_path.exists():
            continue
        summary = json.loads(summary_path.read_text())
        for context, arm in CONTEXT_ARM.items():
            rows = [r for r in summary["rows"].values() if r["arm"] == arm and r.get("best_lr") and r.get("vs_grpo")]
            for r in rows:
                pre = RESULTS / "preflight" / f"{task}_t{r['temperature']:g}.json"  # measured where it trained
                if not pre.exists():
                    continue
                gap = json.loads(pre.read_text())["contexts"][context]["success_gap"]["value"]
                points.append({"task": task, "context": context, "arm": arm, "steps": r["steps"],
                               "temperature": r["temperature"], "gap": gap,
                               "gain": r["vs_grpo"]["value"], "gain_low": r["vs_grpo"]["low"],
                               "gain_high": r["vs_grpo"]["high"], "seeds": r["vs_grpo"]["seeds"]})  # fmt: skip
    return points


def plot_gap_vs_gain(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for p in points:
        if p["gap"] is None or p["gain"] is None:
            continue
        ax.errorbar(p["gap"], p["gain"], yerr=[[p["gain"] - p["gain_low"]], [p["gain_high"] - p["gain"]]], fmt="o")
        ax.annotate(f"{p['task']}/{p['context']}", (p["gap"], p["gain"]), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")  # fmt: skip
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xlabel("pre-flight gap: teacher − student success at step 0")
    ax.set_ylabel("final held-out accuracy − GRPO's (paired)")
    ax.set_title("Does the pre-flight gap predict SDPO's gain?")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(task: str) -> None:
    """`results/<task>/summary.json`, `table.md`, `accuracy_vs_generations.png`; then the cross-task gap plot."""
    summary = summarise(task)
    out = RESULTS / task
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "table.md").write_text("\n".join(table(summary)) + "\n")
    plot_curves(summary, out / "accuracy_vs_generations.png")
    print("\n".join(table(summary)))
    tasks = sorted(p.name for p in RESULTS.iterdir() if (p / RUNS).is_dir())
    points = gap_vs_gain(tasks)
    (RESULTS / "gap_vs_gain.json").write_text(json.dumps(points, indent=1) + "\n")
    if points:
        plot_gap_vs_gain(points, RESULTS / "gap_vs_gain.png")
