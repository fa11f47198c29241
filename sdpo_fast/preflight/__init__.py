"""The pre-flight self-teacher check: `sdpo_fast.preflight(model, tokenizer, dataset, reward_funcs, ...)`.

    report = sdpo_fast.preflight(model, tokenizer, dataset, reward_funcs, num_prompts=64)
    print(report.table()); report.to_json("preflight.json")

or `python -m sdpo_fast.preflight MODEL --dataset DATA --reward-funcs module:func`. This module is itself
callable (`sdpo_fast.preflight(...)` is `sdpo_fast.preflight.preflight(...)`): Python binds a subpackage to
its parent's attribute of the same name once it is imported, so the module and the function must be one.
"""

from __future__ import annotations

import inspect
import sys
import types

from .check import CONTEXTS, preflight
from .during_training import SelfTeacherEvalCallback, preflight_from_trainer
from .report import ContextStats, PreflightReport, Recommendation, recommend
from .stats import Estimate, bootstrap_mean

__all__ = [
    "CONTEXTS",
    "ContextStats",
    "Estimate",
    "PreflightReport",
    "Recommendation",
    "SelfTeacherEvalCallback",
    "bootstrap_mean",
    "preflight",
    "preflight_from_trainer",
    "recommend",
]


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return preflight(*args, **kwargs)


__signature__ = inspect.signature(preflight)
sys.modules[__name__].__class__ = _CallableModule
