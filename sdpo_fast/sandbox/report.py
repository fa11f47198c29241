"""Reading the sandbox's report: JSON lines that nothing here trusts."""

from __future__ import annotations

import json
from typing import Any

MAX_VALUE_DEPTH = 100  # deeper JSON from the sandbox is shown as "too deeply nested", never compared recursively


def _parse(data: bytes, complete: bool) -> tuple[list[dict[str, Any]], int]:
    """The well-formed events in the sandbox's report, and how many lines were malformed.

    A line that is not JSON, a recursion bomb (`'[' * 200000`), a wrong shape or a value nested deeper than
    MAX_VALUE_DEPTH is skipped or replaced, never raised.
    """
    lines = data.split(b"\n")
    if not complete or lines[-1] == b"":
        lines.pop()  # a cut-off last line, or the empty string after the final newline
    events, malformed = [], 0
    for line in lines:
        try:
            event = json.loads(line)
        except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            malformed += 1
            continue
        if not (isinstance(event, dict) and isinstance(event.get("event"), str)):
            malformed += 1
            continue
        index = event.get("index")
        if index is not None and (isinstance(index, bool) or not isinstance(index, int)):
            malformed += 1
            continue
        if "value" in event and _too_deep(event["value"]):
            event = {**event, "repr": "<a value nested too deeply to show>"}
            del event["value"]
        events.append(event)
    return events, malformed


def _too_deep(value: Any, limit: int = MAX_VALUE_DEPTH) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(item, list):
            stack.extend((x, depth + 1) for x in item)
        elif isinstance(item, dict):
            stack.extend((x, depth + 1) for x in item.values())
    return False
