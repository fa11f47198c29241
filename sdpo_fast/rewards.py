"""Reward functions that return feedback: `[{"score": float, "feedback": str}, …]` next to TRL's `[float, …]`.

`wrap_reward_function` turns either form into what TRL's reward machinery expects (floats, or
None for "not applicable") and keeps the feedback strings for the reprompting step. TRL's own
conventions hold: NaN means "not applicable" like None, and TRL itself checks that there is one
reward per completion (a `ValueError`). Anything else is a `TypeError`/`ValueError` that names the
function, the offending value and the accepted shapes.

Feedback may be any `str` or `bytes` a program can produce: it is cleaned (`text.clean_text`: valid Unicode, control
characters escaped) here, where it enters, so that no reward function's output can break the teacher prompt's
tokenisation.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable
from typing import Any

from .text import clean_text

ACCEPTED = (
    "a list with one entry per completion, each a float, None (not applicable), or a dict "
    '{"score": float | None, "feedback": str | bytes | None}'
)


def _is_async(func: Callable) -> bool:
    while isinstance(func, functools.partial):
        func = func.func
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(type(func).__call__)


def _score(value: Any, name: str, index: int) -> float | None:
    if value is None:
        return None
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:  # 0-d tensors and numpy scalars
        value = value.item()
    if isinstance(value, numbers.Real):
        score = float(value)
        if math.isnan(score):  # TRL's meaning: not applicable, like None
            return None
        if math.isinf(score):
            raise ValueError(
                f"Reward function {name!r} returned {score} for completion {index}. Rewards must be finite; "
                "return None (or NaN) for a completion the function does not apply to."
            )
        return score
    raise TypeError(
        f"Reward function {name!r} returned {value!r} (type {type(value).__name__}) for completion {index}; expected {ACCEPTED}."
    )


def normalise_reward_output(
    output: Any, name: str, expected: int | None = None
) -> tuple[list[float | None], list[str | None] | None]:
    """Split one reward function's output into scores and (optional) feedback strings.

    Under a trainer the number of entries is TRL's to check (it raises a `ValueError` naming the function);
    other callers pass `expected` and get the same exception type.
    """
    if isinstance(output, str | bytes | dict) or not (hasattr(output, "__len__") and hasattr(output, "__iter__")):
        raise TypeError(
            f"Reward function {name!r} returned {type(output).__name__} {output!r:.80}; expected {ACCEPTED}."
        )
    values = list(output)
    if expected is not None and len(values) != expected:
        raise ValueError(
            f"Reward function {name!r} returned {len(values)} values for {expected} completions; expected {ACCEPTED}."
        )
    scores: list[float | None] = []
    feedback: list[str | None] = []
    has_feedback = False
    for i, value in enumerate(values):
        if isinstance(value, dict):
            if "score" not in value:
                raise TypeError(
                    f"Reward function {name!r} returned a dict without a 'score' key for completion {i}: {value!r:.120}; "
                    f"expected {ACCEPTED}."
                )
            fb = value.get("feedback")
            if fb is not None and not isinstance(fb, str | bytes | bytearray):
                raise TypeError(
                    f"Reward function {name!r} returned non-string feedback {fb!r:.80} (type {type(fb).__name__}) for "
                    f"completion {i}; feedback must be a str, bytes (read as UTF-8) or None."
                )
            scores.append(_score(value["score"], name, i))
            feedback.append(None if fb is None else clean_text(fb))
            has_feedback = True
        else:
            scores.append(_score(value, name, i))
            feedback.append(None)
    return scores, (feedback if has_feedback else None)


class FeedbackStore:
    """Feedback strings of the latest reward call, per reward function index."""

    def __init__(self) -> None:
        self.by_function: dict[int, list[str | None]] = {}

    def clear(self) -> None:
        self.by_function.clear()

    def combined(self, n: int) -> list[str | None]:
        """Per completion, the non-empty feedback of every function joined by blank lines (function order).

        Cleaned again: `by_function` is a public dict, and text that did not come through `normalise_reward_output`
        must not reach the teacher prompt raw either (`clean_text` is idempotent).
        """
        out: list[str | None] = []
        for i in range(n):
            texts = [clean_text(fb[i]) for _, fb in sorted(self.by_function.items()) if fb[i] is not None]
            parts = [text for text in texts if text.strip()]
            out.append("\n\n".join(parts) if parts else None)
        return out


def wrap_reward_function(func: Callable, index: int, name: str, store: FeedbackStore) -> Callable:
    """A drop-in replacement for `func` that returns floats/None and records feedback in `store`."""

    def handle(output: Any) -> list[float | None]:
        scores, feedback = normalise_reward_output(output, name)
        if feedback is not None:
            store.by_function[index] = feedback
        return scores

    if _is_async(func):

        async def wrapped_async(*args, **kwargs):
            return handle(await func(*args, **kwargs))

        wrapped = wrapped_async
    else:

        def wrapped_sync(*args, **kwargs):
            return handle(func(*args, **kwargs))

        wrapped = wrapped_sync
    wrapped.__name__ = name
    wrapped.__qualname__ = name
    wrapped.__wrapped__ = func  # type: ignore[attr-defined]
    return wrapped
