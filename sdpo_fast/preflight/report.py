"""The pre-flight report: per-context statistics, the recommendations, a terminal table and JSON."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .stats import Estimate, bootstrap_mean

# A context "helps" when its gap's interval lies above 0, "hurts" when it lies below 0. Between those, a point
# gap under MIN_GAIN is "no better than the student": distilling it cannot teach what the student lacks.
MIN_GAIN = 0.05
LOW_COVERAGE = 0.25  # below this success-group fraction, most groups never see a demonstration
CEILING = 0.9  # the student's success rate above which there is little left to learn
MIN_PROMPTS = 8  # fewer prompts with a context than this: too few to judge its gap
LABELS = {"student": "student alone", "demonstration": "+ demonstration", "feedback": "+ feedback", "both": "+ both"}


@dataclass
class ContextStats:
    """One context's numbers. Rates and rewards are means over prompts of per-prompt means (the question is the
    unit); the gaps are paired: the teacher's per-prompt value minus the student's on the same prompt."""

    name: str
    available_fraction: float
    prompts: int
    samples: int
    mean_reward: Estimate
    success_rate: Estimate
    student_mean_reward: Estimate | None = None
    student_success_rate: Estimate | None = None
    reward_gap: Estimate | None = None
    success_gap: Estimate | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in self.__dict__.items():
            out[key] = value.to_dict() if isinstance(value, Estimate) else value
        return out


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def context_stats(
    name: str,
    owner: Sequence[int],
    index: Sequence[int],
    scores: Sequence[float],
    student_scores: Sequence[float] | None,
    threshold: float,
    seed: int,
) -> ContextStats:
    """Statistics of the completions at positions `index` (their prompt is `owner[i]`) with `scores`.

    Unscorable completions (NaN: every reward function returned None) are left out of the mean reward and
    count as failures in the success rate, as training never takes them as a demonstration.
    """
    by_prompt: dict[int, list[float]] = {}
    for i, s in zip(index, scores):
        by_prompt.setdefault(owner[i], []).append(s)
    student_by_prompt: dict[int, list[float]] = {}
    if student_scores is not None:
        for p, s in zip(owner, student_scores):
            student_by_prompt.setdefault(p, []).append(s)

    def success(values: list[float]) -> float:
        return sum((not math.isnan(v)) and v >= threshold for v in values) / len(values)

    prompts = sorted(by_prompt)
    reward = {p: _nanmean(by_prompt[p]) for p in prompts}
    rate = {p: success(by_prompt[p]) for p in prompts}
    rewarded = [p for p in prompts if not math.isnan(reward[p])]
    stats = ContextStats(
        name=name,
        available_fraction=len(index) / max(len(owner), 1),
        prompts=len(prompts),
        samples=len(index),
        mean_reward=bootstrap_mean([reward[p] for p in rewarded], seed=seed),
        success_rate=bootstrap_mean([rate[p] for p in prompts], seed=seed),
    )
    if student_scores is None:
        return stats
    s_reward = {p: _nanmean(student_by_prompt[p]) for p in prompts}
    s_rate = {p: success(student_by_prompt[p]) for p in prompts}
    paired = [p for p in rewarded if not math.isnan(s_reward[p])]
    stats.student_mean_reward = bootstrap_mean([s_reward[p] for p in paired], seed=seed)
    stats.student_success_rate = bootstrap_mean([s_rate[p] for p in prompts], seed=seed)
    stats.reward_gap = bootstrap_mean([reward[p] - s_reward[p] for p in paired], seed=seed)
    stats.success_gap = bootstrap_mean([rate[p] - s_rate[p] for p in prompts], seed=seed)
    return stats


@dataclass
class Recommendation:
    code: str
    message: str


@dataclass
class PreflightReport:
    settings: dict[str, Any]
    student: ContextStats
    contexts: dict[str, ContextStats]
    coverage: dict[str, float]
    thinking_model: bool = False
    recommendations: list[Recommendation] = field(default_factory=list)

    # ------------------------------------------------------------------ output

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "student": self.student.to_dict(),
            "contexts": {k: v.to_dict() for k, v in self.contexts.items()},
            "coverage": self.coverage,
            "thinking_model": self.thinking_model,
            "recommendations": [r.__dict__ for r in self.recommendations],
        }

    def to_json(self, path: str | None = None, **kwargs: Any) -> str:
        """The report as JSON (NaN written as null); also written to `path` if given."""
        text = json.dumps(self.to_dict(), indent=kwargs.pop("indent", 1), **kwargs)
        if path is not None:
            with open(path, "w") as fh:
                fh.write(text + "\n")
        return text

    def metrics(self, prefix: str = "self_teacher/") -> dict[str, float]:
        """Flat numbers for a trainer's log: success rates, paired gaps and coverage."""
        out = {f"{prefix}student_success": self.student.success_rate.value}
        for name, c in self.contexts.items():
            out[f"{prefix}{name}_success"] = c.success_rate.value
            out[f"{prefix}{name}_success_gap"] = c.success_gap.value if c.success_gap else math.nan
            out[f"{prefix}{name}_reward_gap"] = c.reward_gap.value if c.reward_gap else math.nan
        out.update({f"{prefix}{k}": v for k, v in self.coverage.items()})
        return out

    def table(self) -> str:
        """A plain-text table: one row per context, then the coverage and the recommendations."""
        s = self.settings
        head = (
            f"SDPO pre-flight: {s['num_prompts']} prompts x {s['num_generations']} generations, temperature "
            f"{s['temperature']:g}, success = reward >= {s['success_reward_threshold']:g}. 95% intervals over prompts."
        )
        cols = [
            "context",
            "prompts",
            "success % [CI]",
            "gap vs student, pts [CI]",
            "mean reward [CI]",
            "reward gap [CI]",
        ]
        rows = [cols]
        for c in [self.student, *self.contexts.values()]:
            rows.append(
                [
                    LABELS.get(c.name, c.name),
                    str(c.prompts),
                    c.success_rate.shown(percent=True),
                    c.success_gap.shown(percent=True, signed=True) if c.success_gap else "",
                    c.mean_reward.shown(),
                    c.reward_gap.shown(signed=True) if c.reward_gap else "",
                ]
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
        lines = [head, ""]
        for j, r in enumerate(rows):
            lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
        cov = self.coverage
        lines += [
            "",
            f"Groups with a success (a demonstration exists): {100 * cov['success_group_fraction']:.1f}%; samples with "
            f"a demonstration: {100 * cov['demonstration_sample_fraction']:.1f}%; with feedback: "
            f"{100 * cov['feedback_available_fraction']:.1f}%; with any teacher context: "
            f"{100 * cov['teacher_sample_fraction']:.1f}%.",
            "",
            "Recommendations:",
            *[f"- {r.message}" for r in self.recommendations],
        ]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# ---------------------------------------------------------------------------------------------- recommendations


def verdict(gap: Estimate | None) -> str:
    """`helps`, `hurts`, `no_better` (point gap below MIN_GAIN, interval spans 0), `unclear`, `too_few` or `absent`."""
    if gap is None or gap.n == 0:
        return "absent"
    if gap.n < MIN_PROMPTS:
        return "too_few"
    if gap.low > 0:
        return "helps"
    if gap.high < 0:
        return "hurts"
    return "no_better" if gap.value < MIN_GAIN else "unclear"


def _pts(e: Estimate) -> str:
    return f"{100 * e.value:+.1f} points [{100 * e.low:+.1f}, {100 * e.high:+.1f}]"


def _too_few(context: str, gap: Estimate) -> Recommendation:
    return Recommendation(
        f"{context}_too_few",
        f"Only {gap.n} prompts have a {context} context ({_pts(gap)}): too few to judge. Raise num_prompts or "
        "num_generations.",
    )


def recommend(report: PreflightReport) -> list[Recommendation]:
    """Plain advice from the success-rate gaps and the coverage (see the verdict thresholds above)."""
    out: list[Recommendation] = []
    cov, student = report.coverage, report.student
    demo, fb = report.contexts.get("demonstration"), report.contexts.get("feedback")
    if cov["success_group_fraction"] == 0 and cov["feedback_available_fraction"] == 0:
        out.append(
            Recommendation(
                "no_signal",
                "No group has a success and no reward function returns feedback: SDPO has no signal. Use "
                "SDPOConfig(grpo_weight=0.5) or plain GRPO, or lower success_reward_threshold.",
            )
        )
    elif cov["success_group_fraction"] == 0:
        out.append(
            Recommendation(
                "no_demonstrations",
                "No group has a success, so SDPO never shows a demonstration; only the feedback can teach.",
            )
        )
    if fb is not None:
        v = verdict(fb.success_gap)
        if v == "hurts":
            out.append(
                Recommendation(
                    "feedback_hurts",
                    f"Feedback makes the teacher worse than the student ({_pts(fb.success_gap)}): set "
                    "include_environment_feedback=False, or rewrite the feedback so it does not name a wrong answer.",
                )
            )
        elif v == "no_better":
            out.append(
                Recommendation(
                    "feedback_no_better",
                    f"Feedback does not make the teacher better than the student ({_pts(fb.success_gap)}): distilling "
                    "it cannot help and may harm. Set include_environment_feedback=False, or make the feedback more "
                    "informative.",
                )
            )
        elif v == "helps":
            out.append(
                Recommendation("feedback_helps", f"Feedback raises the teacher's success by {_pts(fb.success_gap)}.")
            )
        elif v == "too_few":
            out.append(_too_few("feedback", fb.success_gap))
        elif v == "unclear":
            out.append(
                Recommendation(
                    "feedback_unclear",
                    f"Feedback's effect on the teacher is uncertain ({_pts(fb.success_gap)}): measure more prompts "
                    "before relying on it.",
                )
            )
    if demo is not None and cov["success_group_fraction"] > 0:
        v = verdict(demo.success_gap)
        if v == "helps":
            out.append(
                Recommendation(
                    "demonstration_helps",
                    f"The demonstration raises success by {_pts(demo.success_gap)}: SDPO should help where a group "
                    "has a success.",
                )
            )
        elif v in ("hurts", "no_better"):
            out.append(
                Recommendation(
                    "demonstration_no_better",
                    f"A successful sibling does not make the teacher better ({_pts(demo.success_gap)}): the model "
                    "does not learn from it in context, so SDPO is unlikely to beat GRPO. Use grpo_weight or GRPO.",
                )
            )
        elif v == "too_few":
            out.append(_too_few("demonstration", demo.success_gap))
        if cov["success_group_fraction"] < LOW_COVERAGE:
            out.append(
                Recommendation(
                    "low_coverage",
                    f"Only {100 * cov['success_group_fraction']:.0f}% of groups have a success, so most groups get no "
                    "demonstration and no SDPO gradient: add grpo_weight (e.g. 0.5), or raise num_generations.",
                )
            )
    if student.success_rate.n and student.success_rate.value >= CEILING:
        out.append(
            Recommendation(
                "ceiling",
                f"The student already succeeds {100 * student.success_rate.value:.0f}% of the time: little is left "
                "to learn on these prompts.",
            )
        )
    if report.thinking_model:
        out.append(
            Recommendation(
                "thinking_model",
                "The chat template has a thinking mode: self-distillation can suppress expressed uncertainty and "
                "lower accuracy on thinking models (Kim et al., arXiv 2603.24472). Watch held-out accuracy.",
            )
        )
    if not out:
        out.append(Recommendation("unclear", "The gaps are too uncertain to advise: run with more prompts."))
    return out
