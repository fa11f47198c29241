"""SDPO against GRPO on a real pretrained chat model (SmolLM2-135M-Instruct, offline), LoRA, on the CPU.

    python examples/sdpo_vs_grpo_real.py --seed 0 --seeds 1 --output-dir /tmp/real_0   # one seed of the committed
    python examples/sdpo_vs_grpo_real.py --seed 1 --seeds 1 --output-dir /tmp/real_1   # sweep (side by side: ~1 h)
    python examples/sdpo_vs_grpo_real.py --merge /tmp/real_0 /tmp/real_1 --output-dir examples/results
    python examples/sdpo_vs_grpo_real.py --smoke                  # a minute: checks the plumbing only
    python examples/sdpo_vs_grpo_real.py --model Qwen/Qwen2.5-0.5B-Instruct --max-steps 100

The model comes from `sdpo_fast.pretrained` (a PyPI wheel, converted once); `--model NAME` takes any Hub
name instead. Four arms share the task, the seeds, the data order, the sampler, the LoRA initialisation and
the generation budget, and each runs at every learning rate of `--learning-rates`:

- **SDPO**: the self-teacher sees a successful sibling, or else the environment's feedback;
- **SDPO (demos only)**: the same reward without feedback, so only successful siblings teach;
- **GRPO**: `SDPOConfig(enabled=False)`, TRL's own loss (beta = 0, as in the paper's baseline);
- **GRPO (EMA-anchored)**: GRPO with a KL penalty (beta > 0) to a reference that follows the policy
  slowly, ref ← (1 − α)·ref + α·policy every `ref_model_sync_steps` steps, with α = SDPO's EMA rate. That
  is TRL's `sync_ref_model` rule; TRL refuses `sync_ref_model=True` with PEFT, so a callback applies the
  same rule to TRL's own frozen `ref` adapter (TRL creates it when a PEFT model is trained with beta > 0).
  It tests how much of SDPO's gain could come from a slowly moving anchor alone.

The task, "which word is a ...", uses what a small pretrained model knows: `Which of these words is a
fruit: owl, kiwi, two, red, cat, blue? Answer with one word.` (one right word among `--options`, the
others from three other categories). The reward is 1 when the first listed word in the completion is the
right one. A wrong answer gets the feedback `owl is wrong. The answer is one of: blue, kiwi, two.`: it
halves the choice without giving the answer away. Before training, the script measures (and records) how
often the model solves it alone, with a correct demonstration in SDPO's teacher prompt, and with the
feedback there. The learning curve is greedy accuracy on fixed held-out questions every `--eval-every` steps
(the same questions for every arm); the per-step training reward is recorded too, but at 2 questions a step it
mostly says which questions came up.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import re
import tempfile
from pathlib import Path

import torch
from _common import (
    Timer,
    finish_args,
    grpo_args,
    load_hub_model,
    make_parser,
    sample_completions,
    set_seed,
    teacher_content,
    train_with_progress,
    user_turn,
)
from sdpo_vs_grpo import CATEGORIES, generations_to_target, mean_curve, median, plot, smoothed
from transformers import TrainerCallback

METHODS = ("SDPO", "SDPO (demos only)", "GRPO", "GRPO (EMA-anchored)")


# ---------------------------------------------------------------------------------------------- the task


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def make_questions(n: int, options: int, seed: int) -> list[dict]:
    """`n` questions: one word of the asked category among `options` words of the three other categories."""
    rng = random.Random(10_000 + seed)
    rows = []
    for _ in range(n):
        category = rng.choice(list(CATEGORIES))
        answer = rng.choice(CATEGORIES[category])
        others = [w for c, words in CATEGORIES.items() if c != category for w in words]
        choices = [*rng.sample(others, options - 1), answer]
        rng.shuffle(choices)
        question = (
            f"Which of these words is {article(category)} {category}: {', '.join(choices)}? Answer with one word."
        )
        rows.append({"question": question, "answer": answer, "choices": ",".join(choices)})
    return rows


def first_listed_word(text: str, choices: list[str]) -> str | None:
    for word in re.findall(r"[a-z]+", text.lower()):
        if word in choices:
            return word
    return None


def feedback(given: str | None, answer: str, choices: list[str]) -> str:
    """Half of the listed words, the answer among them: informative, but not the answer (deterministic)."""
    rng = random.Random(hashlib.sha256(f"{answer}|{','.join(choices)}".encode()).digest())
    rest = [w for w in choices if w not in (answer, given)]
    shortlist = sorted([answer, *rng.sample(rest, max(1, len(choices) // 2 - 1))])
    start = f"{given} is wrong." if given else "Your answer names none of the listed words."
    return f"{start} The answer is one of: {', '.join(shortlist)}."


def _text(completion) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else completion


def word_reward(completions, answer, choices, **kwargs) -> list[float]:
    """1.0 when the first listed word in the completion is the right one."""
    return [float(first_listed_word(_text(c), ch.split(",")) == a) for c, a, ch in zip(completions, answer, choices)]


def word_reward_with_feedback(completions, answer, choices, **kwargs) -> list[dict]:
    out = []
    for c, a, ch in zip(completions, answer, choices):
        listed = ch.split(",")
        given = first_listed_word(_text(c), listed)
        out.append({"score": float(given == a), "feedback": None if given == a else feedback(given, a, listed)})
    return out


def complete_all(model, tokenizer, prompts: list, *, seed: int | None = None, **sampling) -> list[str]:
    """`sample_completions` over any number of prompts, 32 per `generate` call; chunk i is seeded `seed + 32·i`."""
    outs = []
    for start in range(0, len(prompts), 32):
        seeded = {} if seed is None else {"seed": seed + start}
        outs += sample_completions(model, tokenizer, prompts[start : start + 32], **seeded, **sampling)
    return outs


def measure_task(model, tokenizer, rows: list[dict], *, n: int, temperature: float, max_tokens: int) -> dict:
    """Accuracy (sampling like the rollouts) alone, after a correct demonstration, and after the feedback."""
    picked = [rows[i % len(rows)] for i in range(n)]
    rng = random.Random(0)
    prompts: dict[str, list] = {"solo": [], "demonstration": [], "feedback": []}
    for r in picked:
        listed = r["choices"].split(",")
        wrong = rng.choice([w for w in listed if w != r["answer"]])
        prompts["solo"].append(user_turn(r["question"]))
        prompts["demonstration"].append(user_turn(teacher_content(r["question"], demonstration=r["answer"])))
        prompts["feedback"].append(
            user_turn(teacher_content(r["question"], feedback=feedback(wrong, r["answer"], listed)))
        )
    result = {}
    for kind, batch in prompts.items():
        outs = complete_all(model, tokenizer, batch, max_new_tokens=max_tokens, seed=0, temperature=temperature)
        got = [first_listed_word(o, r["choices"].split(",")) for o, r in zip(outs, picked)]
        result[f"{kind}_accuracy"] = sum(g == r["answer"] for g, r in zip(got, picked)) / n
        result[f"{kind}_answers_a_listed_word"] = sum(g is not None for g in got) / n
    return result


# ---------------------------------------------------------------------------------------------- the arms


class SyncRefAdapter(TrainerCallback):
    """TRL's `SyncRefModelCallback` rule, ref ← (1 − α)·ref + α·policy every k steps, on PEFT's `ref` adapter."""

    def __init__(self, model, alpha: float, every: int):
        if "ref" not in getattr(model, "peft_config", {}):
            raise ValueError("The model has no 'ref' adapter to synchronise: train a PEFT model with beta > 0.")
        params = dict(model.named_parameters())
        self.pairs = [(params[n.replace(".default.", ".ref.")], p) for n, p in params.items() if ".default." in n]
        self.alpha, self.every = alpha, every

    @torch.no_grad()
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            for ref, policy in self.pairs:
                ref.mul_(1.0 - self.alpha).add_(policy, alpha=self.alpha)


class HeldOutAccuracy(TrainerCallback):
    """Greedy accuracy on fixed held-out questions, before training and every `every` steps.

    A step's training reward depends on which two questions it drew (some are much harder than others), so
    that curve is mostly noise at this batch size. The held-out curve asks every arm the same questions at the
    same points: a paired, deterministic measure of what the policy has learnt.
    """

    def __init__(self, tokenizer, rows: list[dict], *, every: int, max_tokens: int, generations_per_step: int):
        self.tokenizer, self.rows, self.every, self.max_tokens = tokenizer, rows, every, max_tokens
        self.generations_per_step = generations_per_step
        self.curve: list[tuple[int, float]] = []

    @torch.no_grad()
    def evaluate(self, model, step: int) -> None:
        training = model.training
        model.eval()
        batch = [user_turn(r["question"]) for r in self.rows]
        outs = complete_all(model, self.tokenizer, batch, max_new_tokens=self.max_tokens, greedy=True)
        model.train(training)
        right = [first_listed_word(o, r["choices"].split(",")) == r["answer"] for o, r in zip(outs, self.rows)]
        self.curve.append((step * self.generations_per_step, sum(right) / len(right)))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.evaluate(model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.evaluate(model, state.global_step)


def held_out_questions(rows: list[dict], n: int, options: int, seed: int) -> list[dict]:
    """`n` questions that are not among the training `rows` (same categories and words, other draws)."""
    seen = {r["question"] for r in rows}
    fresh = [r for r in make_questions(8 * n, options, seed + 1) if r["question"] not in seen]
    unique = list({r["question"]: r for r in fresh}.values())
    if len(unique) < n:
        raise SystemExit(f"Only {len(unique)} held-out questions could be drawn; lower --eval-questions.")
    return unique[:n]


def lora_model(model, seed: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # the same LoRA initialisation in every arm of a seed
    config = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    return get_peft_model(copy.deepcopy(model), config)


def run_arm(
    method: str, model, tokenizer, rows: list[dict], held_out: list[dict], args, *, lr: float, seed: int
) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """One arm: (training reward per step, held-out accuracy every `--eval-every` steps), by generations."""
    from datasets import Dataset

    from sdpo_fast import SDPOConfig, SDPOTrainer

    set_seed(seed)
    prompts_per_step = args.batch_size // args.num_generations
    order = random.Random(seed).sample(range(len(rows)), len(rows))
    picked = [rows[order[i % len(rows)]] for i in range(args.max_steps * prompts_per_step)]
    dataset = Dataset.from_dict(
        {
            "prompt": [user_turn(r["question"]) for r in picked],
            "answer": [r["answer"] for r in picked],
            "choices": [r["choices"] for r in picked],
        }
    )
    anchored = method == "GRPO (EMA-anchored)"
    scratch = tempfile.TemporaryDirectory(prefix="sdpo_vs_grpo_real_")
    policy = lora_model(model, seed)
    trainer = SDPOTrainer(
        policy,
        word_reward if method == "SDPO (demos only)" else word_reward_with_feedback,
        args=grpo_args(
            scratch.name,
            seed=seed,
            max_steps=args.max_steps,
            learning_rate=lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            per_device_train_batch_size=args.batch_size,
            num_generations=args.num_generations,
            max_completion_length=args.max_completion_length,
            temperature=args.temperature,
            beta=args.beta if anchored else 0.0,
            ref_model_mixup_alpha=args.teacher_update_rate,
            ref_model_sync_steps=1,
        ),
        sdpo_config=SDPOConfig(
            enabled=method.startswith("SDPO"),
            success_reward_threshold=1.0,
            teacher_update_rate=args.teacher_update_rate,
            distillation_topk=args.topk,
            distillation_alpha=args.alpha,
        ),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    if anchored:
        trainer.add_callback(SyncRefAdapter(trainer.model, trainer.args.ref_model_mixup_alpha, 1))
    accuracy = HeldOutAccuracy(
        tokenizer, held_out, every=args.eval_every, max_tokens=args.max_completion_length,
        generations_per_step=args.batch_size,
    )  # fmt: skip
    trainer.add_callback(accuracy)
    with scratch:
        curve, _, _ = train_with_progress(trainer, desc=f"{method} lr={lr:g} seed {seed}")
    return curve, accuracy.curve


# ---------------------------------------------------------------------------------------------- main


def summarise(results: dict, args, budget: int) -> tuple[list[str], dict]:
    """Tables and the paper-style comparison: held-out accuracy first, then the (noisier) training reward."""
    runs, evals = results["curves"], results.get("eval_curves", {})
    labels = list(runs)
    methods = sorted({label.rsplit(", lr ", 1)[0] for label in labels}, key=METHODS.index)
    several_lrs = len({label.rsplit(", lr ", 1)[1] for label in labels}) > 1

    def shown(value) -> str:
        return f"> {budget}" if value is None else f"{value:g}"

    def per_seed(values, fmt="{:.3f}") -> str:
        return ", ".join(fmt.format(v) for v in values)

    reward_to = {lab: [generations_to_target(c, args.target, args.window) for c in runs[lab]] for lab in labels}
    reward_mean = {lab: [sum(r for _, r in c) / len(c) for c in runs[lab]] for lab in labels}
    acc_to = {lab: [generations_to_target(c, args.eval_target, 1) for c in evals.get(lab, [])] for lab in labels}
    acc_mean = {lab: [sum(a for _, a in c) / len(c) for c in evals.get(lab, [])] for lab in labels}
    acc_final = {lab: [c[-1][1] for c in evals.get(lab, [])] for lab in labels}

    def best(method: str) -> str:  # fewest generations to the target, then the most accuracy (or reward) on the way
        mine = [lab for lab in labels if lab.rsplit(", lr ", 1)[0] == method]
        if evals:
            return min(mine, key=lambda lab: (median(acc_to[lab]) or math.inf, -sum(acc_mean[lab])))
        return min(mine, key=lambda lab: (median(reward_to[lab]) or math.inf, -sum(reward_mean[lab])))

    best_arms = {m: best(m) for m in methods}
    mark = {lab: " (best)" if several_lrs and lab in best_arms.values() else "" for lab in labels}
    lines = []
    if evals:
        n_eval = len(results["held_out"])
        lines += [
            f"Held-out accuracy (greedy, {n_eval} questions not in training, every {args.eval_every} steps):",
            "",
            f"| arm | before → final, per seed | generations to accuracy ≥ {args.eval_target:g}, per seed | median | "
            "mean accuracy over the evaluations, per seed |",
            "|---|---|---|---|---|",
        ]
        for lab in labels:
            moves = ", ".join(f"{c[0][1]:.3f} → {c[-1][1]:.3f}" for c in evals[lab])
            lines.append(
                f"| {lab}{mark[lab]} | {moves} | {', '.join(map(shown, acc_to[lab]))} | {shown(median(acc_to[lab]))} "
                f"| {per_seed(acc_mean[lab])} |"
            )
        lines.append("")
    lines += [
        "Training reward (each step's 16 rollouts on 2 questions: noisy, since questions differ in difficulty):",
        "",
        f"| arm | generations to reward ≥ {args.target:g} ({args.window}-step mean), per seed | median | "
        "final reward (3-step mean, mean over seeds) | mean reward over the run, per seed |",
        "|---|---|---|---|---|",
    ]
    for lab in labels:
        final = sum(smoothed(c, args.window)[-1][1] for c in runs[lab]) / len(runs[lab])
        lines.append(
            f"| {lab}{mark[lab]} | {', '.join(map(shown, reward_to[lab]))} | {shown(median(reward_to[lab]))} "
            f"| {final:.3f} | {per_seed(reward_mean[lab])} |"
        )
    paper: dict = {}
    if "GRPO" in best_arms and evals:
        # The paper's measure on the held-out curve: GRPO's final accuracy, and when each arm first reaches it.
        grpo = mean_curve(evals[best_arms["GRPO"]])
        goal = grpo[-1][1]
        grpo_reach = generations_to_target(grpo, goal, 1)
        paper.update(grpo_final_accuracy=goal, grpo_generations_to_its_final=grpo_reach)
        lines += [
            "",
            f"Paper-style (held-out, mean curve over seeds): the best GRPO arm ends at accuracy {goal:.3f}, first "
            f"reached after {shown(grpo_reach)} generations (it starts at {grpo[0][1]:.3f}).",
        ]
        if goal <= grpo[0][1]:
            lines.append("- GRPO ends no better than it started: there is no GRPO gain to reach faster.")
        for m, lab in best_arms.items():
            if m != "GRPO":
                reach = generations_to_target(mean_curve(evals[lab]), goal, 1)
                paper[f"{m} generations to GRPO's final accuracy"] = reach
                lines.append(f"- {lab} reaches it after {shown(reach)} generations.")
    summary = {
        "best_arms": best_arms,
        "generations_to_accuracy_target": acc_to,
        "final_accuracy": acc_final,
        "mean_accuracy_over_evaluations": acc_mean,
        "generations_to_reward_target": reward_to,
        "mean_reward_over_run": reward_mean,
        **paper,
    }
    return lines, summary


def merge(paths: list[str]) -> dict:
    """One sweep from several runs of this script (e.g. one per seed, run side by side)."""
    parts = [json.loads(Path(p, "real_results.json").read_text()) for p in paths]
    merged = {**parts[0], "seeds": [], "curves": {}, "eval_curves": {}, "seconds": {}}
    for part in parts:
        merged["seeds"] += part["seeds"][: max(len(c) for c in part["curves"].values())]
        for key in ("curves", "eval_curves", "seconds"):
            for label, values in part.get(key, {}).items():
                merged[key].setdefault(label, []).extend(values)
    merged["settings"]["merged_from"] = ", ".join(map(str, paths))
    return merged


def main() -> None:
    parser = make_parser(__doc__, steps=30, smoke_steps=1)
    parser.set_defaults(model="smollm2")
    parser.add_argument("--seeds", type=int, default=None, help="Seeds per arm (default 2; 1 with --smoke).")
    parser.add_argument("--learning-rates", default=None, help="Comma-separated LoRA rates (default 3e-4,1e-3).")
    parser.add_argument("--methods", default=",".join(METHODS), help="Comma-separated subset of the arms.")
    parser.add_argument("--batch-size", type=int, default=16, help="Completions per optimizer step.")
    parser.add_argument("--num-generations", type=int, default=8, help="Completions per prompt (the group size).")
    parser.add_argument("--max-completion-length", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=0.3, help="Sampling temperature of the rollouts.")
    parser.add_argument("--options", type=int, default=6, help="Listed words per question.")
    parser.add_argument("--questions", type=int, default=64, help="Distinct training questions.")
    parser.add_argument("--task-seed", type=int, default=0, help="Seed of the questions (the same for every --seed).")
    parser.add_argument("--eval-questions", type=int, default=32, help="Held-out questions (0: no evaluation).")
    parser.add_argument("--eval-every", type=int, default=5, help="Steps between held-out evaluations.")
    parser.add_argument("--eval-target", type=float, default=0.5, help="Target held-out accuracy.")
    parser.add_argument("--target", type=float, default=0.6, help="Target training reward (smoothed).")
    parser.add_argument("--window", type=int, default=3, help="Steps in the moving average used for the target.")
    parser.add_argument("--topk", type=int, default=100)
    parser.add_argument(
        "--alpha", type=float, default=0.5, help="SDPO's divergence: 0 forward KL, 0.5 JSD, 1 reverse KL."
    )
    parser.add_argument("--teacher-update-rate", type=float, default=0.05, help="SDPO's EMA rate, and α of the anchor.")
    parser.add_argument("--beta", type=float, default=0.04, help="KL weight of the EMA-anchored GRPO control.")
    parser.add_argument("--threads", type=int, default=min(2, torch.get_num_threads()), help="Torch CPU threads.")
    parser.add_argument("--check-samples", type=int, default=96, help="Prompts per condition of the task check.")
    parser.add_argument("--measure-only", action="store_true", help="Measure the task, train nothing.")
    parser.add_argument(
        "--report-only", action="store_true", help="Rewrite the table and plot from --output-dir's real_results.json."
    )
    parser.add_argument(
        "--merge", nargs="+", default=None, metavar="DIR",
        help="Merge the real_results.json of these directories (runs of other seeds) into --output-dir's report.",
    )  # fmt: skip
    args = finish_args(parser.parse_args(), "sdpo_vs_grpo_real")
    # On a shared CPU, one thread per run avoids OpenMP threads waiting on each other while descheduled.
    torch.set_num_threads(args.threads)
    seeds = [args.seed + i for i in range(args.seeds or (1 if args.smoke else 2))]
    lrs = [float(x) for x in (args.learning_rates or ("1e-3" if args.smoke else "3e-4,1e-3")).split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"Unknown --methods {unknown}; choose from {', '.join(METHODS)}.")

    out = args.output_dir
    if args.merge:
        write_report(merge(args.merge), args, out)
        return
    if args.report_only:
        write_report(json.loads((out / "real_results.json").read_text()), args, out)
        return
    model, tokenizer = load_hub_model(args.model, dtype=torch.float32)
    rows = make_questions(args.questions, args.options, args.task_seed)
    held_out = (
        held_out_questions(rows, args.eval_questions, args.options, args.task_seed) if args.eval_questions else []
    )
    results: dict = {
        "settings": {k: str(v) for k, v in vars(args).items() if not k.startswith("_")},
        "seeds": seeds,
        "held_out": [r["question"] for r in held_out],
    }
    with Timer() as t:
        results["task_check"] = measure_task(
            model, tokenizer, rows, n=32 if args.smoke else args.check_samples, temperature=args.temperature,
            max_tokens=args.max_completion_length,
        )  # fmt: skip
    results["task_check"]["chance"] = 1 / args.options
    results["task_check"]["seconds"] = round(t.seconds, 1)
    print("Task check:", json.dumps(results["task_check"]))
    (out / "real_results.json").write_text(json.dumps(results, indent=1) + "\n")
    if args.measure_only:
        return

    runs: dict[str, list] = {}
    evals: dict[str, list] = {}
    seconds: dict[str, list[float]] = {}
    for seed in seeds:  # seed-major: after the first seed every arm has a curve, whatever happens later
        for lr in lrs:
            for method in methods:
                label = f"{method}, lr {lr:g}"
                with Timer() as t:
                    curve, accuracy = run_arm(method, model, tokenizer, rows, held_out, args, lr=lr, seed=seed)
                runs.setdefault(label, []).append(curve)
                if held_out:
                    evals.setdefault(label, []).append(accuracy)
                seconds.setdefault(label, []).append(round(t.seconds, 1))
                results.update(curves=runs, eval_curves=evals, seconds=seconds)
                (out / "real_results.json").write_text(json.dumps(results, indent=1) + "\n")

    write_report(results, args, out)


def write_report(results: dict, args, out) -> None:
    """Tables, summary and plots from `results` (complete or not: the sweep writes after every arm)."""
    runs = results["curves"]
    settings = results["settings"]
    seeds = results["seeds"][: max(len(c) for c in runs.values())]
    lrs = sorted({float(label.rsplit(", lr ", 1)[1]) for label in runs})
    budget = next(iter(runs.values()))[0][-1][0]
    lines, summary = summarise(results, args, budget)
    check = results["task_check"]
    incomplete = [label for label, curves in runs.items() if len(curves) < len(results["seeds"])]
    header = [
        f"Model {settings['model']} (LoRA r=16, all linear layers); task: which of {settings['options']} listed words "
        f"is of the asked category ({settings['questions']} questions); {settings['batch_size']} generations per step "
        f"({settings['num_generations']} per prompt), ≤ {settings['max_completion_length']} tokens at temperature "
        f"{settings['temperature']}; budget {budget} generations per run; seeds {', '.join(map(str, seeds))}; "
        f"learning rates {', '.join(f'{lr:g}' for lr in lrs)}.",
        "",
        f"Before training (sampling like the rollouts, {settings['check_samples']} prompts each): solves it alone "
        f"{check['solo_accuracy']:.1%} (chance {check['chance']:.1%}; it answers with a listed word "
        f"{check['solo_answers_a_listed_word']:.0%} of the time), after a correct demonstration in SDPO's teacher prompt "
        f"{check['demonstration_accuracy']:.1%}, after the feedback there {check['feedback_accuracy']:.1%}.",
        "",
    ]
    if incomplete:
        done = min(len(c) for c in runs.values())
        header += [
            f"Incomplete sweep: {done} of {len(results['seeds'])} planned seeds finished for {len(incomplete)} arms.",
            "",
        ]
    extra = (
        "" if settings.get("methods", ",".join(METHODS)) == ",".join(METHODS) else f" --methods '{settings['methods']}'"
    )
    extra += "" if float(settings.get("alpha", 0.5)) == 0.5 else f" --alpha {settings['alpha']}"
    command = (
        f"python examples/sdpo_vs_grpo_real.py --max-steps {settings['max_steps']} --learning-rates "
        f"{','.join(f'{lr:g}' for lr in lrs)}{extra} --seed S --seeds 1 --check-samples {settings['check_samples']} "
        f"--threads 1 --output-dir DIR_S for S in {', '.join(map(str, seeds))}, then `--merge DIR_0 DIR_1 ... "
        f"--output-dir {out}`"
    )
    lines += ["", f"Reproduce: {command} (`--report-only` rewrites the tables and plots from the JSON)."]
    (out / "real_results.md").write_text("\n".join(header + lines) + "\n")
    results.update(summary)
    (out / "real_results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    best = summary["best_arms"].values()
    title = f"{settings['model']}: SDPO vs GRPO, LoRA, same seeds and budget"
    plot({label: runs[label] for label in best}, args.target, args.window, out / "real_reward_vs_generations.png",
         title=title)  # fmt: skip
    if results.get("eval_curves"):
        plot({label: results["eval_curves"][label] for label in best}, args.eval_target, 1,
             out / "real_accuracy_vs_generations.png", title=title, ylabel="held-out accuracy (greedy)",
             legend_loc="upper left")  # fmt: skip
    print("\n".join(header + lines))


if __name__ == "__main__":
    main()
