"""`CodeReward`: the unit-test reward with feedback, for `SDPOTrainer` (dataset columns `tests`, `entry_point`)."""

from __future__ import annotations

import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .feedback import format_test_feedback
from .isolation import check_sandbox
from .limits import SandboxLimits
from .run import parse_tests, run_tests

_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(completion: str) -> str:
    """The longest fenced code block of a completion, or the whole completion when it has none."""
    blocks = _FENCE.findall(completion)
    return max(blocks, key=len) if blocks else completion


@dataclass
class CodeReward:
    """`reward(prompts, completions, tests, entry_point, **kw)` → `[{"score", "feedback"}, …]` for SDPOTrainer.

    Score 1.0 when every test passes, else 0.0. `tests` per row is a list of `{"input": [...], "output": ...}`
    or that list as JSON text (a dataset column holds one type per column, and unit tests often mix them).
    Completions are checked in parallel sandboxes. Creating it checks the sandbox (`SandboxUnavailableError`
    now rather than at the first reward).
    """

    limits: SandboxLimits = field(default_factory=SandboxLimits)
    workers: int = max(1, min(4, os.cpu_count() or 1))
    sandbox_runs: int = 0  # how many candidates actually ran (format errors are caught before)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    __name__ = "unit_tests"  # TRL names reward functions by `__name__`

    def __post_init__(self) -> None:
        check_sandbox(self.limits)

    def check(self, completion: Any, tests: list[dict[str, Any]] | str, entry_point: str) -> dict[str, Any]:
        tests = parse_tests(tests, "CodeReward: the row's `tests`")
        text = completion[-1]["content"] if isinstance(completion, list) else str(completion)
        code = extract_code(text)
        if not re.search(rf"\bdef\s+{re.escape(entry_point)}\s*\(", code):
            feedback = f"Format Error\nThe answer must define a Python function named {entry_point!r}."
            return {"score": 0.0, "feedback": feedback}
        with self._lock:
            self.sandbox_runs += 1
        records = run_tests(code, entry_point, tests, self.limits)
        passed = all(r.passed for r in records)
        return {"score": float(passed), "feedback": None if passed else format_test_feedback(records)}

    def __call__(self, prompts=None, completions=None, tests=None, entry_point=None, **kwargs) -> list[dict[str, Any]]:
        jobs = list(zip(completions, tests, entry_point))
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(lambda job: self.check(*job), jobs))
