"""SDPO on arithmetic: exact-match reward plus feedback that says what the expected answer was.

    python examples/basic_sdpo.py                                  # built-in tiny model, offline, CPU
    python examples/basic_sdpo.py --smoke                          # a few seconds: checks the plumbing
    python examples/basic_sdpo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset gsm8k --max-steps 200

`SDPOTrainer` is used exactly like TRL's `GRPOTrainer`. The one new thing is the reward function: besides
a score it may return textual feedback, `{"score": 0.0, "feedback": "... The expected answer is 7."}`.
For every rollout, SDPO shows the same model the question again together with a successful sibling
rollout (if the group has one) or this feedback; that self-teacher's next-token distribution over the
rollout's own tokens is distilled into the policy.

The built-in tiny model starts from random weights, so it can neither write an answer nor read
feedback. A short supervised warm-up teaches it both (answer with a number; after feedback, repeat the
expected answer) but not the arithmetic itself: before RL it answers at chance level. A pretrained model
from `--model` needs no warm-up.
"""

from __future__ import annotations

import random
import re
from typing import Any

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
    teacher_content,
    tiny_model,
    train_with_progress,
    user_turn,
)

OPERATIONS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
FEEDBACK_WORDS = ["contains", "has"]


# ---------------------------------------------------------------------------------------------- data


def arithmetic_rows(max_operand: int = 2, max_result: int = 9) -> list[dict[str, str]]:
    """Every `a <op> b` with operands in 0..max_operand and a result in 0..max_result (24 questions by default)."""
    rows = []
    for name, op in OPERATIONS.items():
        for a in range(max_operand + 1):
            for b in range(max_operand + 1):
                if 0 <= op(a, b) <= max_result:
                    rows.append({"question": f"What is {a} {name} {b}?", "answer": str(op(a, b))})
    return rows


def gsm8k_rows(limit: int | None = None) -> list[dict[str, str]] | None:
    """GSM8K's training split from the Hugging Face Hub, or None (with the reason printed) when unreachable."""
    print("Loading GSM8K (openai/gsm8k) from the Hugging Face Hub …")
    try:
        from datasets import load_dataset

        data = load_dataset("openai/gsm8k", "main", split="train")
    except Exception as err:  # offline, blocked, or a changed dataset: fall back, and say why
        print(
            f"Could not load GSM8K from the Hugging Face Hub ({type(err).__name__}: {str(err)[:200]}).\n"
            "Falling back to the built-in arithmetic dataset. Check your network connection (and HF_HUB_OFFLINE) "
            "to use GSM8K."
        )
        return None
    rows = []
    for row in data.select(range(min(limit or len(data), len(data)))):
        gold = row["answer"].split("####")[-1].strip().replace(",", "")
        question = row["question"] + "\nGive the final answer as a plain number at the end of your answer."
        rows.append({"question": question, "answer": gold})
    return rows


# ---------------------------------------------------------------------------------------------- the reward


def final_number(text: str) -> str | None:
    """The last number in a completion (`1,234` → `1234`; a word-level tokenizer's `1 2` → `12`)."""
    text = re.sub(r"(?<=\d)[ ,](?=\d)", "", text)
    numbers = re.findall(r"-?\d+(?:\.\d+)?", text)
    if not numbers:
        return None
    value = numbers[-1].rstrip("0").rstrip(".") if "." in numbers[-1] else numbers[-1]
    return value.lstrip("+")


def exact_match_with_feedback(completions, answer, **kwargs) -> list[dict[str, Any]]:
    """Score 1.0 for the right final number, else 0.0 with feedback that names the expected answer.

    TRL passes every dataset column as a keyword argument, so `answer` is the dataset's `answer` column.
    """
    results = []
    for completion, gold in zip(completions, answer):
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        got = final_number(text)
        if got == gold:
            results.append({"score": 1.0, "feedback": None})
        elif got is None:
            results.append(
                {"score": 0.0, "feedback": f"Your answer contains no number. The expected answer is {gold}."}
            )
        else:
            results.append(
                {"score": 0.0, "feedback": f"Your final answer {got} is wrong. The expected answer is {gold}."}
            )
    return results


# ---------------------------------------------------------------------------------------------- the tiny model's warm-up


def warmup_sampler(rows: list[dict[str, str]]):
    """Answer format, and reading SDPO's teacher prompts: copy the expected answer from feedback or a demo.

    Plain questions are paired with a *random* row's answer, so the warm-up teaches no arithmetic.
    """

    def sample(rng: random.Random):
        row, other = rng.choice(rows), rng.choice(rows)
        kind = rng.randrange(3)
        if kind == 0:
            return user_turn(row["question"]), other["answer"]
        # The model re-reads its own wrong answer (`shown`) in the teacher prompt but must predict the right one.
        shown = other["answer"] if len(other["answer"]) == len(row["answer"]) else row["answer"]
        if kind == 1:
            wrong = exact_match_with_feedback([other["answer"]], [row["answer"]])[0]["feedback"]
            if wrong is None:  # the random answer happened to be right
                return user_turn(teacher_content(row["question"], demonstration=row["answer"])), row["answer"], shown
            return user_turn(teacher_content(row["question"], feedback=wrong)), row["answer"], shown
        return user_turn(teacher_content(row["question"], demonstration=row["answer"])), row["answer"], shown

    return sample


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = make_parser(__doc__, steps=100, smoke_steps=2)
    parser.add_argument("--dataset", choices=["arithmetic", "gsm8k"], default="arithmetic")
    parser.add_argument("--learning-rate", type=float, default=None, help="Default 1e-3 (tiny model), 1e-6 (--model).")
    parser.add_argument("--num-generations", type=int, default=8, help="Rollouts per question (the group size).")
    parser.add_argument("--teacher-update-rate", type=float, default=None, help="EMA rate of the teacher.")
    args = finish_args(parser.parse_args(), "basic_sdpo")

    from datasets import Dataset

    from sdpo_fast import SDPOConfig, SDPOTrainer

    rows = gsm8k_rows(limit=64 if args.smoke else None) if args.dataset == "gsm8k" else None
    dataset_name = "gsm8k" if rows else "arithmetic"
    rows = rows or arithmetic_rows()

    facts: dict[str, Any] = {"dataset": dataset_name}
    if args.model:
        model, tokenizer = load_hub_model(args.model)
        lr, prompts_per_step = args.learning_rate or 1e-6, 1
        max_completion_length = 256 if dataset_name == "gsm8k" else 32
        facts["model"] = args.model
    else:
        words = FEEDBACK_WORDS
        if dataset_name == "gsm8k":  # give the word-level tokenizer GSM8K's vocabulary
            words = sorted({w for r in rows for w in re.findall(r"[a-z]+", r["question"].lower())})[:20000]
        model, tokenizer = tiny_model(words, seed=args.seed, hidden_size=128)
        lr, prompts_per_step, max_completion_length = args.learning_rate or 1e-3, 4, 4
        steps = 4 if args.smoke else 500
        with Timer() as t:
            supervised_warmup(model, tokenizer, warmup_sampler(rows), steps=steps, seed=args.seed)
        facts.update(model="tiny-qwen2 (built in code)", warmup_steps=steps, warmup_seconds=round(t.seconds, 1))

    # The tiny model's in-context skill is fragile, so its EMA teacher follows the student slowly (0.01, the
    # reference's rich-feedback setting); a pretrained model keeps the reference's default 0.05.
    tau = args.teacher_update_rate if args.teacher_update_rate is not None else (0.05 if args.model else 0.01)
    rng = random.Random(args.seed)
    picked = [rng.choice(rows) for _ in range(args.max_steps * prompts_per_step)]
    train_dataset = Dataset.from_dict(
        {"prompt": [user_turn(r["question"]) for r in picked], "answer": [r["answer"] for r in picked]}
    )

    # ---- the SDPO part: a GRPOConfig as usual, an SDPOConfig beside it, a reward function with feedback.
    trainer = SDPOTrainer(
        model,
        reward_funcs=exact_match_with_feedback,
        args=grpo_args(
            args.output_dir,
            seed=args.seed,
            max_steps=args.max_steps,
            learning_rate=lr,
            per_device_train_batch_size=prompts_per_step * args.num_generations,
            num_generations=args.num_generations,
            max_completion_length=max_completion_length,
        ),
        sdpo_config=SDPOConfig(teacher_update_rate=tau),  # otherwise the reference's defaults
        train_dataset=train_dataset,
        processing_class=tokenizer,
    )
    curve, logs, seconds = train_with_progress(trainer)
    first, last = quarter_means(curve)
    print_summary(
        "basic_sdpo summary",
        {
            **facts,
            "steps": trainer.state.global_step,
            "generations": curve[-1][0] if curve else 0,
            "train_seconds": round(seconds, 1),
            "reward_first_quarter": first,
            "reward_last_quarter": last,
            "reprompted_fraction": mean_logged(logs, "self_distillation/reprompt_sample_fraction"),
            "feedback_used_fraction": mean_logged(logs, "self_distillation/feedback_used_fraction"),
            "output_dir": str(args.output_dir),
        },
        args.output_dir,
    )


if __name__ == "__main__":
    main()
