"""Comparing a returned value with the expected one, and saying where they differ.

Values come back from the sandbox in full while they fit the report (three quarters of
`max_output_bytes`); larger ones come back as the SHA-256 of their canonical JSON (keys sorted, no
spaces, ASCII), compared with the same digest of the expected value: exact, so a float in such a value
must match to the last digit (smaller values compare floats with a relative tolerance of 1e-6).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

CONTEXT = 30  # characters of context either side of a differing character


def _same(value: Any, expected: Any) -> bool:
    if isinstance(expected, float) or isinstance(value, float):
        return (
            isinstance(value, int | float)
            and isinstance(expected, int | float)
            and math.isclose(value, expected, rel_tol=1e-6, abs_tol=1e-9)
        )
    if isinstance(expected, list) and isinstance(value, list):
        return len(value) == len(expected) and all(_same(v, e) for v, e in zip(value, expected))
    if isinstance(expected, dict) and isinstance(value, dict):
        return value.keys() == expected.keys() and all(_same(value[k], expected[k]) for k in expected)
    return type(value) is type(expected) and value == expected


def canonical_digest(value: Any) -> str:
    """SHA-256 of the canonical JSON of a JSON-compatible value (the sandbox's runner computes the same)."""
    text = json.dumps(json.loads(json.dumps(value)), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _short(value: Any, chars: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= chars else text[:chars] + "..."


def _kind(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def difference(value: Any, expected: Any, path: str = "") -> str:
    """Where `value` first differs from `expected`, in one line (an empty string if they are the same)."""
    where = f"at {path}" if path else "at the top level"
    if _same(value, expected):
        return ""
    if isinstance(value, list) and isinstance(expected, list):
        for i, (v, e) in enumerate(zip(value, expected)):
            if not _same(v, e):
                return difference(v, e, f"{path}[{i}]")
        return f"{where}: the output has {len(value)} items, the expected value {len(expected)}"
    if isinstance(value, dict) and isinstance(expected, dict):
        missing, extra = sorted(set(expected) - set(value)), sorted(set(value) - set(expected))
        if missing or extra:
            return f"{where}: missing keys {_short(missing)}, unexpected keys {_short(extra)}"
        key = next(k for k in expected if not _same(value[k], expected[k]))
        return difference(value[key], expected[key], f"{path}[{json.dumps(key)}]")
    if isinstance(value, str) and isinstance(expected, str):
        i = next((i for i, (a, b) in enumerate(zip(value, expected)) if a != b), min(len(value), len(expected)))
        start = max(0, i - CONTEXT)
        return (
            f"{where}, character {i} (lengths {len(value)} and {len(expected)}): output "
            f"{value[start : i + CONTEXT]!r}, expected {expected[start : i + CONTEXT]!r}"
        )
    if _kind(value) != _kind(expected):
        return f"{where}: the output is of type {_kind(value)} ({_short(value)}), the expected value of type {_kind(expected)}"
    return f"{where}: output {_short(value)}, expected {_short(expected)}"
