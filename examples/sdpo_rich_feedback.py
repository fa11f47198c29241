"""SDPO with rich feedback: write a Python function, get the failing unit tests back as feedback.

    python examples/sdpo_rich_feedback.py                     # built-in tiny model, CPU
    python examples/sdpo_rich_feedback.py --smoke             # seconds: checks the plumbing only
    python examples/sdpo_rich_feedback.py --model Qwen/Qwen2.5-0.5B-Instruct --max-steps 50

The reward, `sdpo_fast.sandbox.CodeReward`, runs each completion against the task's unit tests in an OS-level
sandbox (bubblewrap: its own user, PID, network and mount namespaces, a read-only root, a seccomp filter,
rlimits and a timeout) and returns `{"score": 0.0 or 1.0, "feedback": str}`. The feedback follows the
reference implementation's shape for code (LiveCodeBench-style): only failing tests, at most two, shortest
input first, values cut to 250 characters, the whole text capped at 2000; a runtime error, a timeout or a
format error is shown alone. Each row's unit tests are stored as JSON text (a dataset column holds one type,
and unit tests mix ints, strings, lists and None); `CodeReward` decodes them. SDPO's teacher reads that feedback (or a passing sibling's code) and the policy
is distilled towards it. Without bubblewrap (`pip install "sdpo-fast[sandbox]"`) the reward refuses to run.
"""

from __future__ import annotations

import json
import random
from typing import Any

# The sandbox and the reward live in the library; the names stay importable from here.
from sdpo_fast.sandbox import (  # noqa: F401
    CodeReward,
    SandboxLimits,
    SandboxUnavailableError,
    TestRecord,
    extract_code,
    format_test_feedback,
    run_tests,
    sandbox_status,
)

# ---------------------------------------------------------------------------------------------- tasks


# For a real model (--model): small problems in the style of MBPP.
def _collatz_steps(n: int) -> int:
    steps = 0
    while n != 1:
        n = n // 2 if n % 2 == 0 else 3 * n + 1
        steps += 1
    return steps


PROBLEMS = [  # (signature, what it returns, test inputs, reference solution)
    ("add_digits(n)", "the sum of the decimal digits of the non-negative integer n", [[0], [7], [123], [9999]],
     lambda n: sum(map(int, str(n)))),
    ("count_vowels(s)", "how many vowels (a, e, i, o, u, either case) the string s contains",
     [["hello"], [""], ["AEIOU xyz"], ["rhythm"]], lambda s: sum(c in "aeiouAEIOU" for c in s)),
    ("second_largest(xs)", "the second largest distinct value of the list xs, or None if there is none",
     [[[1, 2, 3]], [[5, 5, 5]], [[4, 1, 4, 2]], [[-1, -7]], [[10]]],
     lambda xs: sorted(set(xs))[-2] if len(set(xs)) > 1 else None),
    ("is_palindrome(s)", "True if the string s reads the same backwards, ignoring case and non-letters",
     [["Racecar"], ["A man, a plan, a canal: Panama"], ["hello"], [""]],
     lambda s: [c.lower() for c in s if c.isalpha()] == [c.lower() for c in s if c.isalpha()][::-1]),
    ("running_max(xs)", "the list of running maxima of the list xs (element i is max(xs[:i+1]))",
     [[[1, 3, 2, 5]], [[]], [[-2, -3]], [[4, 4, 1]]], lambda xs: [max(xs[: i + 1]) for i in range(len(xs))]),
    ("collatz_steps(n)", "the number of Collatz steps (n -> n/2 if even else 3n+1) from n >= 1 down to 1",
     [[1], [2], [6], [27]], _collatz_steps),
]  # fmt: skip


def problem_rows() -> list[dict[str, Any]]:
    from _common import user_turn  # lazily, like the rest of _common (it imports torch)

    rows = []
    for signature, returns, inputs, solve in PROBLEMS:
        prompt = (
            f"Write a Python function `{signature}` that returns {returns}. "
            "Answer with the complete function in a single ```python code block and nothing else."
        )
        tests = json.dumps([{"input": i, "output": solve(*i)} for i in inputs])  # text: one type per column
        rows.append({"prompt": user_turn(prompt), "tests": tests, "entry_point": signature.partition("(")[0]})
    return rows


# For the tiny model: one-line functions `def f ( x ) : return x + 3`, whose tokens the word-level
# tokenizer joins with spaces into valid Python.
OPS = {"plus": "+", "minus": "-", "times": "*"}
TINY_WORDS = ["f", "that", "returns", "format", "wrong", "runtime", "limit", "exceeded", "stdout", "expected"]


def tiny_rows() -> list[dict[str, Any]]:
    from _common import user_turn

    rows = []
    for word, op in OPS.items():
        for d in range(10):
            prompt = f"Write a python function f that returns x {word} {d}."
            tests = json.dumps([{"input": [x], "output": eval(f"{x} {op} {d}")} for x in (0, 1, 2, 5, 7)])
            rows.append({"prompt": user_turn(prompt), "tests": tests, "entry_point": "f"})
    return rows


def tiny_warmup_example(rng: random.Random):
    """Format-only warm-up: any syntactically valid one-liner (a random operator and digit), half with a demo."""
    from _common import teacher_content, user_turn

    word, d = rng.choice(list(OPS)), rng.randrange(10)
    answer = f"def f ( x ) : return x {rng.choice(list(OPS.values()))} {rng.randrange(10)}"
    question = f"Write a python function f that returns x {word} {d}."
    if rng.random() < 0.5:
        return user_turn(teacher_content(question, demonstration=answer)), answer
    return user_turn(question), answer


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    from _common import (
        Timer,
        finish_args,
        grpo_args,
        load_hub_model,
        make_parser,
        mean_logged,
        print_summary,
        quarter_means,
        supervised_warmup,
        tiny_model,
        train_with_progress,
    )

    parser = make_parser(__doc__, steps=30, smoke_steps=2)
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--num-generations", type=int, default=8)
    args = finish_args(parser.parse_args(), "sdpo_rich_feedback")

    from datasets import Dataset

    from sdpo_fast import SDPOConfig, SDPOTrainer

    facts: dict[str, Any] = {}
    if args.model:
        model, tokenizer = load_hub_model(args.model)
        rows, max_len, lr = problem_rows(), 512, args.learning_rate or 1e-6
        facts["model"] = args.model
    else:
        model, tokenizer = tiny_model(TINY_WORDS, seed=args.seed)
        steps = 3 if args.smoke else 300
        with Timer() as t:
            supervised_warmup(model, tokenizer, tiny_warmup_example, steps=steps, seed=args.seed)
        rows, max_len, lr = tiny_rows(), 14, args.learning_rate or 1e-3
        facts.update(model="tiny-qwen2 (built in code)", warmup_steps=steps, warmup_seconds=round(t.seconds, 1))

    prompts_per_step = 4
    rng = random.Random(args.seed)
    picked = [rng.choice(rows) for _ in range(args.max_steps * prompts_per_step)]
    dataset = Dataset.from_list(picked)
    reward = CodeReward()  # checks the sandbox now, not at the first reward
    print(f"Code sandbox: {sandbox_status(reward.limits)}")
    trainer = SDPOTrainer(
        model,
        reward,
        args=grpo_args(
            args.output_dir,
            seed=args.seed,
            max_steps=args.max_steps,
            learning_rate=lr,
            per_device_train_batch_size=prompts_per_step * args.num_generations,
            num_generations=args.num_generations,
            max_completion_length=max_len,
        ),
        # The reference's rich-feedback run: reverse KL (alpha=1), K=20, EMA rate 0.01.
        sdpo_config=SDPOConfig(distillation_alpha=1.0, distillation_topk=20, teacher_update_rate=0.01),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    curve, logs, seconds = train_with_progress(trainer)

    # What the teacher is shown for a broken attempt (run through the same sandbox).
    probe = rows[0]
    broken = f"def {probe['entry_point']}(*args):\n    return 1 // 0"
    example = reward(completions=[broken], tests=[probe["tests"]], entry_point=[probe["entry_point"]])
    print("\nExample feedback for a broken completion:\n" + example[0]["feedback"])

    print_summary(
        "sdpo_rich_feedback summary",
        {
            **facts,
            "steps": trainer.state.global_step,
            "generations": curve[-1][0] if curve else 0,
            "train_seconds": round(seconds, 1),
            "reward_first_quarter": quarter_means(curve)[0],
            "reward_last_quarter": quarter_means(curve)[1],
            "mean_feedback_used_fraction": mean_logged(logs, "self_distillation/feedback_used_fraction"),
            "completions_checked": len(curve) * prompts_per_step * args.num_generations,
            "sandbox_runs": reward.sandbox_runs,
        },
        args.output_dir,
    )


if __name__ == "__main__":
    main()
