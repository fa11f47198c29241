"""Confidence intervals with the question as the unit: a percentile bootstrap over prompts.

Completions of one prompt are correlated (they answer the same question), so resampling completions would
understate the uncertainty. Every statistic here is a mean over prompts of a per-prompt value, and the
bootstrap resamples prompts (a cluster bootstrap). Its random draws come from a private NumPy generator,
never from Python's, NumPy's or PyTorch's global state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

LEVEL = 0.95
RESAMPLES = 2000


@dataclass(frozen=True)
class Estimate:
    """A mean over `n` prompts and its 95% bootstrap interval [`low`, `high`] (NaN when `n` is 0)."""

    value: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict[str, float | int | None]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}

    def shown(self, *, percent: bool = False, signed: bool = False) -> str:
        """`12.5 [7.0, 18.8]` (percent) or `0.125 [0.070, 0.188]`; `signed` prints a + on gains."""
        if self.n == 0:
            return "n/a"
        scale = 100.0 if percent else 1.0
        fmt = ("{:+.1f}" if signed else "{:.1f}") if percent else ("{:+.3f}" if signed else "{:.3f}")
        v, lo, hi = (fmt.format(scale * x) for x in (self.value, self.low, self.high))
        return f"{v} [{lo}, {hi}]"


def bootstrap_mean(values: Sequence[float], *, seed: int = 0, resamples: int = RESAMPLES) -> Estimate:
    """The mean of per-prompt `values` with a percentile-bootstrap 95% interval over prompts."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"bootstrap_mean takes one value per prompt (a 1-D sequence), got shape {x.shape}.")
    if x.size == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    if not np.isfinite(x).all():
        raise ValueError("bootstrap_mean got a non-finite per-prompt value; drop prompts without a score first.")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    tail = (1.0 - LEVEL) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return Estimate(float(x.mean()), float(low), float(high), int(x.size))
