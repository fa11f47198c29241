"""The experiment's tasks: questions, reward functions (score + feedback) and held-out sets.

Every task makes chat prompts (`[{"role": "user", ...}]`) and rows with the columns its reward reads. Each has
two reward functions of the same score: `reward` returns `{"score", "feedback"}` (feedback on failures),
`reward_plain` returns the score alone (for arms without feedback). Scores lie in [0, 1]; a score of 1 is a
success (the experiment runs SDPO with `success_reward_threshold=1.0`).

- `fruit`: the first real-model experiment's task (which of 6 words is a fruit/animal/...), one-token answer.
- `sort`: sort 4 two-digit numbers ascending; partial credit per position.
- `reverse`: reverse a list of 4 short words; partial credit per position.
- `add`: the sum of two two-digit numbers; the feedback says too high/low and where the carry goes.
- `sort3`, `reverse3`: the same with 3 items (4 items proved too hard for the 135M model at temperature 1).

Questions come from `random.Random` seeded by the task seed; held-out questions are drawn with another seed
and never overlap the training questions.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CATEGORIES = {
    "colour": ["red", "green", "blue", "black", "white", "pink", "gray", "brown"],
    "number": ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"],
    "fruit": ["apple", "pear", "plum", "lime", "kiwi", "fig"],
    "animal": ["cat", "dog", "cow", "pig", "hen", "fox", "owl", "bee", "ant", "bat", "rat", "elk", "yak", "emu"],
}
WORDS = sorted({w for words in CATEGORIES.values() for w in words})


def user_turn(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _text(completion) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else completion


def _rng_for(*parts) -> random.Random:
    """A generator fixed by the question (and attempt): feedback is a function of them, the same every time."""
    return random.Random(hashlib.sha256("|".join(map(str, parts)).encode()).digest())


# ---------------------------------------------------------------------------------------------- fruit (history)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def fruit_row(rng: random.Random, options: int = 6) -> dict:
    category = rng.choice(list(CATEGORIES))
    answer = rng.choice(CATEGORIES[category])
    others = [w for c, words in CATEGORIES.items() if c != category for w in words]
    choices = [*rng.sample(others, options - 1), answer]
    rng.shuffle(choices)
    question = f"Which of these words is {article(category)} {category}: {', '.join(choices)}? Answer with one word."
    return {"question": question, "answer": answer, "choices": ",".join(choices)}


def first_listed_word(text: str, choices: list[str]) -> str | None:
    for word in re.findall(r"[a-z]+", text.lower()):
        if word in choices:
            return word
    return None


def fruit_feedback(given: str | None, answer: str, choices: list[str]) -> str:
    """The first experiment's feedback: it names the rejected word first, then a shortlist with the answer."""
    rng = _rng_for(answer, ",".join(choices))
    rest = [w for w in choices if w not in (answer, given)]
    shortlist = sorted([answer, *rng.sample(rest, max(1, len(choices) // 2 - 1))])
    start = f"{given} is wrong." if given else "Your answer names none of the listed words."
    return f"{start} The answer is one of: {', '.join(shortlist)}."


def fruit_reward(completions, answer, choices, **kwargs) -> list[dict]:
    out = []
    for c, a, ch in zip(completions, answer, choices):
        listed = ch.split(",")
        given = first_listed_word(_text(c), listed)
        ok = given == a
        out.append({"score": float(ok), "feedback": None if ok else fruit_feedback(given, a, listed)})
    return out


# ---------------------------------------------------------------------------------------------- sort


def sort_row(rng: random.Random, k: int = 4) -> dict:
    numbers = rng.sample(range(10, 100), k)
    question = (
        f"Sort these numbers from smallest to largest: {', '.join(map(str, numbers))}. "
        "Answer with the sorted numbers only, separated by commas."
    )
    return {"question": question, "answer": ",".join(map(str, sorted(numbers)))}


def positions_right(given: list[str], target: list[str]) -> int:
    return sum(g == t for g, t in zip(given, target))


def sort_feedback(given: list[str], target: list[str]) -> str:
    """How many positions are right, and which number belongs first: a fact the student can check, not the list."""
    right = positions_right(given, target)
    if len(given) != len(target):
        lead = f"Your answer lists {len(given)} numbers; it must list all {len(target)}, each once."
    else:
        lead = f"{right} of {len(target)} numbers are in the right place."
    return f"{lead} The smallest number, {target[0]}, comes first, and every number must be smaller than the next."


def sort_reward(completions, answer, **kwargs) -> list[dict]:
    out = []
    for c, a in zip(completions, answer):
        target = a.split(",")
        given = re.findall(r"\d+", _text(c))[: len(target) + 1]
        score = positions_right(given, target) / len(target) if len(given) <= len(target) else 0.0
        ok = score == 1.0
        out.append({"score": score, "feedback": None if ok else sort_feedback(given, target)})
    return out


# ---------------------------------------------------------------------------------------------- reverse


def reverse_row(rng: random.Random, k: int = 4) -> dict:
    words = rng.sample(WORDS, k)
    question = (
        f"Reverse the order of this list: {', '.join(words)}. Answer with the reversed list only, separated by commas."
    )
    return {"question": question, "answer": ",".join(reversed(words))}


def listed_words(text: str, allowed: set[str], limit: int) -> list[str]:
    return [w for w in re.findall(r"[a-z]+", text.lower()) if w in allowed][:limit]


def reverse_feedback(given: list[str], target: list[str]) -> str:
    right = positions_right(given, target)
    return (
        f"{right} of {len(target)} words are in the right place. The reversed list starts with the last word of the "
        f"original list, {target[0]}, and ends with its first word, {target[-1]}."
    )


def reverse_reward(completions, answer, **kwargs) -> list[dict]:
    out = []
    for c, a in zip(completions, answer):
        target = a.split(",")
        given = listed_words(_text(c), set(target), len(target) + 1)
        score = positions_right(given, target) / len(target) if len(given) <= len(target) else 0.0
        ok = score == 1.0
        out.append({"score": score, "feedback": None if ok else reverse_feedback(given, target)})
    return out


# ---------------------------------------------------------------------------------------------- add


def add_row(rng: random.Random) -> dict:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return {"question": f"What is {a} + {b}? Answer with the number only.", "answer": str(a + b), "terms": f"{a},{b}"}


def add_feedback(given: int | None, a: int, b: int) -> str:
    """Direction and the carry, never the sum."""
    total = a + b
    carry = (a % 10 + b % 10) >= 10
    how = (
        f"Add the ones digits {a % 10} + {b % 10}: that is 10 or more, so carry 1 into the tens."
        if carry
        else f"Add the ones digits {a % 10} + {b % 10} and the tens digits {a // 10} + {b // 10} separately."
    )
    if given is None:
        return f"Your answer has no number. {how}"
    return f"Your answer is too {'high' if given > total else 'low'}. {how}"


def add_reward(completions, answer, terms, **kwargs) -> list[dict]:
    out = []
    for c, ans, t in zip(completions, answer, terms):
        a, b = map(int, t.split(","))
        found = re.findall(r"-?\d+", _text(c))
        given = int(found[0]) if found else None
        ok = given == int(ans)
        out.append({"score": float(ok), "feedback": None if ok else add_feedback(given, a, b)})
    return out


# ---------------------------------------------------------------------------------------------- the registry


def plain(reward: Callable) -> Callable:
    """The same score without the feedback: for arms that must not see it."""

    def scores(completions, **kwargs) -> list[float]:
        return [r["score"] for r in reward(completions, **kwargs)]

    scores.__name__ = reward.__name__ + "_plain"
    return scores


@dataclass(frozen=True)
class Task:
    name: str
    row: Callable[[random.Random], dict]
    reward: Callable
    max_completion_length: int
    description: str

    @property
    def reward_plain(self) -> Callable:
        return plain(self.reward)

    def questions(self, n: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
        """`n` distinct questions (not in `exclude`), each a dataset row with a chat `prompt`."""
        rng = random.Random(f"{self.name}:{seed}")
        rows: dict[str, dict] = {}
        for _ in range(200 * n):
            r = self.row(rng)
            if r["question"] not in exclude:
                rows.setdefault(r["question"], r)
            if len(rows) == n:
                return [{"prompt": user_turn(q), **r} for q, r in rows.items()]
        raise ValueError(f"Task {self.name!r} has fewer than {n} distinct questions for seed {seed}.")

    def split(self, train: int, held_out: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
        """Training questions and held-out questions, disjoint."""
        rows = self.questions(train, seed)
        return rows, self.questions(held_out, seed + 1, exclude={r["question"] for r in rows})


TASKS = {
    t.name: t
    for t in (
        Task("fruit", fruit_row, fruit_reward, 8, "which of 6 words is of the asked category (one-word answer)"),
        Task("sort", sort_row, sort_reward, 24, "sort 4 two-digit numbers ascending (partial credit per position)"),
        Task("reverse", reverse_row, reverse_reward, 24, "reverse a list of 4 short words (partial credit)"),
        Task("add", add_row, add_reward, 12, "the sum of two two-digit numbers (exact)"),
        Task("sort3", functools.partial(sort_row, k=3), sort_reward, 20, "sort 3 two-digit numbers (partial credit)"),
        Task(
            "reverse3",
            functools.partial(reverse_row, k=3),
            reverse_reward,
            20,
            "reverse 3 short words (partial credit)",
        ),
    )
}
# Importable by name for `python -m sdpo_fast.preflight --reward-funcs experiments/real_model/tasks.py:NAME`.
fruit_reward_plain, sort_reward_plain = plain(fruit_reward), plain(sort_reward)
reverse_reward_plain, add_reward_plain = plain(reverse_reward), plain(add_reward)


def write_dataset(task: str, path: str | Path, n: int = 256, seed: int = 0) -> Path:
    """A task's training questions as JSON lines (the pre-flight CLI reads them with `datasets`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for row in TASKS[task].questions(n, seed):
            fh.write(json.dumps(row) + "\n")
    return path


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write a task's training questions as JSON lines.")
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("path")
    parser.add_argument("-n", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_dataset(args.task, args.path, args.n, args.seed))
