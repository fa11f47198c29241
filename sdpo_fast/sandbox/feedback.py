"""LeetCode-style feedback on the failing tests, in the reference implementation's shape for code."""

from __future__ import annotations

import json
from typing import Any

from .compare import difference
from .run import TestRecord

CUT = 250  # characters of an input, output or expected value shown


def _cut(value: Any, chars: int = CUT, lines: int | None = None) -> str:
    text = value if isinstance(value, str) else json.dumps(value) if _jsonable(value) else repr(value)
    if lines is not None and text.count("\n") >= lines:
        text = "\n".join(text.split("\n")[:lines]) + "\n..."
    return text if len(text) <= chars else text[:chars] + "..."


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        return False
    return True


def _debug_lines(stdout: str, max_lines: int = 10, max_chars: int = 300) -> str:
    shown = [line if len(line) <= max_chars else line[:max_chars] + "..." for line in stdout.splitlines()[:max_lines]]
    return "\n".join(shown)


def _wrong_answer(r: TestRecord) -> str:
    """Output and Expected, and where they differ when the cut texts do not show it."""
    if r.too_large:
        expected_chars = len(json.dumps(r.expected))
        return (
            f"Output:\n{_cut(r.actual)}\nExpected:\n{_cut(r.expected)}\n"
            f"Difference: the output ({r.too_large} characters as JSON) was too large to show or to compare "
            f"item by item; compared exactly with the expected value ({expected_chars} characters), it differs."
        )
    output, expected = _cut(r.actual), _cut(r.expected)
    text = f"Output:\n{output}\nExpected:\n{expected}"
    cut = output.endswith("...") or expected.endswith("...")
    if output == expected or cut or type(r.actual) is not type(r.expected):
        where = difference(r.actual, r.expected)
        if where:
            text += f"\nDifference: {_cut(where, 2 * CUT)}"
    return text


def format_test_feedback(records: list[TestRecord], *, max_tests: int = 2, max_length: int = 2000) -> str:
    """LeetCode-style feedback on the failing tests; "" when every test passes.

    A format error, runtime error or timeout is reported alone (with the last executed input); wrong
    answers are listed shortest input first, at most `max_tests` of them, with the place where output and
    expected value first differ whenever the values shown do not make it visible.
    """
    failing = [r for r in records if not r.passed and r.status != "not_run"]
    if not failing:
        return ""
    alone = next((r for r in failing if r.status in ("format_error", "runtime_error", "timeout")), None)
    if alone is not None:
        error = alone.error.removesuffix(": ")
        if alone.status == "format_error":
            lines = ["Format Error", error]
        elif alone.status == "timeout":
            lines = ["Time Limit Exceeded"]
        elif error.startswith(("SyntaxError", "IndentationError", "TabError")):
            lines = ["Compile Error", error]
        else:
            lines = ["Runtime Error", error]
        if alone.while_loading:
            lines.append("(while loading the code, before any test ran)" if alone.status != "format_error" else "")
        else:
            lines += ["Last executed input:", _cut(alone.input, CUT, 8)]
            if alone.stdout.strip():
                lines += ["Stdout:", _debug_lines(alone.stdout)]
        return "\n".join(_cut(line, 500) for line in lines if line)[:max_length]
    shown = sorted(failing, key=lambda r: len(r.input))[:max_tests]
    parts = [f"Wrong Answer: {len(failing)} of {len(records)} tests failed."]
    for i, r in enumerate(shown, 1):
        part = f"Test {i}:\nInput:\n{_cut(r.input, CUT, 8)}"
        if r.stdout.strip():
            part += f"\nStdout:\n{_debug_lines(r.stdout)}"
        parts.append(f"{part}\n{_wrong_answer(r)}")
    text = "\n\n".join(parts)
    return text if len(text) <= max_length else text[: max_length - 3] + "..."
