"""SDPO against GRPO on one task, with the same seeds and the same generation budget.

    python experiments/toy/sdpo_vs_grpo.py                      # built-in tiny model, CPU, a few minutes
    python experiments/toy/sdpo_vs_grpo.py --smoke              # seconds: checks the plumbing only
    python experiments/toy/sdpo_vs_grpo.py --model Qwen/Qwen2.5-0.5B-Instruct --max-steps 100 --seeds 1

Every run goes through `SDPOTrainer`; GRPO is `SDPOConfig(enabled=False)`, so all arms share the data
order, the sampler and every `GRPOConfig` setting, seed by seed. The script writes
`reward_vs_generations.png`, a table (`results.md`, `results.json`) and prints how many generations each
method needs before its smoothed training reward reaches the target.

The built-in task, "secret codes", is multiple choice with a secret answer: `What is the code of yara?
Choose from: kiwi, red, owl, ...` lists twelve words (three colours, numbers, fruits and animals) and the
code is one of them, fixed at random per key. Nothing in the prompt gives it away: a policy learns it
from reward (1 for the code, 0 otherwise). A wrong answer also gets the environment's feedback
`"owl is wrong. The code is a fruit."`, which narrows the choice without revealing the answer, like a
failing unit test. GRPO only sees the score; SDPO's teacher reads the feedback, or a correct sibling.

SDPO only helps a model that learns in context. A pretrained LLM does; the tiny random model does not, so
it is first warmed up with a supervised phase on the *format* (random keys and word lists, never the
secret codes): after a demonstration in SDPO's reprompt template, copy it; after feedback, pick a listed
word of the named category; with neither, pick any word. The script measures and prints that it then
copies demonstrations, follows hints, and still solves the real task only at chance level.

A third arm, SDPO without the feedback (demonstrations only), shows how much of the gain comes from the
feedback on this task.
"""

from __future__ import annotations

import copy
import json
import math
import random
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

# The examples' plumbing (arguments, the tiny model, its warm-up, summaries) is shared with this experiment;
# the experiment depends on the examples, never the other way round.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from _common import (
    Timer,
    finish_args,
    grpo_args,
    load_hub_model,
    make_parser,
    print_summary,
    sample_completions,
    set_seed,
    supervised_warmup,
    teacher_content,
    tiny_model,
    train_with_progress,
    user_turn,
)

CATEGORIES = {
    "colour": ["red", "green", "blue", "black", "white", "pink", "gray", "brown"],
    "number": ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"],
    "fruit": ["apple", "pear", "plum", "lime", "kiwi", "fig"],
    "animal": ["cat", "dog", "cow", "pig", "hen", "fox", "owl", "bee", "ant", "bat", "rat", "elk", "yak", "emu"],
}
CATEGORY_OF = {word: category for category, words in CATEGORIES.items() for word in words}
NAMES = [
    "alice",
    "bob",
    "carol",
    "dave",
    "erin",
    "frank",
    "grace",
    "heidi",
    "ivan",
    "judy",
    "kate",
    "leo",
    "mia",
    "nick",
    "olga",
    "paul",
    "quinn",
    "rosa",
    "sam",
    "tara",
    "uma",
    "victor",
    "wendy",
    "xavier",
    "yara",
    "zack",
    "anna",
    "ben",
    "cleo",
    "dan",
    "eva",
    "fred",
]


@dataclass
class SecretCodes:
    """Multiple choice with a secret answer: each key's code is one of the words listed in its prompt.

    The list holds `per_category` words of each of the four categories. A wrong answer gets the feedback
    `"<answer> is wrong. The code is a fruit."`: it narrows the choice, but does not give the answer away.
    """

    num_keys: int = 8
    per_category: int = 3
    seed: int = 0
    choices: dict[str, list[str]] = field(init=False)
    codes: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        rng = random.Random(1000 + self.seed)
        keys = rng.sample(NAMES, self.num_keys)
        self.choices = {key: self.random_choices(rng) for key in keys}
        # The secret's position in the list is balanced over the keys, so "always pick the first" is no shortcut.
        positions = [i % self.options for i in range(self.num_keys)]
        rng.shuffle(positions)
        self.codes = {key: self.choices[key][pos] for key, pos in zip(keys, positions)}

    @property
    def options(self) -> int:
        return self.per_category * len(CATEGORIES)

    @property
    def chance(self) -> float:
        """Probability that a uniformly random choice is right."""
        return 1.0 / self.options

    @staticmethod
    def words() -> list[str]:
        return [w for words in CATEGORIES.values() for w in words] + [*NAMES, *CATEGORIES, "code", "choose"]

    def random_choices(self, rng: random.Random) -> list[str]:
        words = [w for category in CATEGORIES.values() for w in rng.sample(category, self.per_category)]
        rng.shuffle(words)
        return words

    @staticmethod
    def question(key: str, choices: list[str]) -> str:
        return f"What is the code of {key}? Choose from: {', '.join(choices)}."

    @staticmethod
    def feedback(answer: str, code: str) -> str:
        category = CATEGORY_OF[code]
        article = "an" if category[0] in "aeiou" else "a"
        return f"{answer or 'No answer'} is wrong. The code is {article} {category}."

    def prompt(self, key: str) -> str:
        return self.question(key, self.choices[key])

    def warmup_example(self, rng: random.Random):
        """A third each: copy a demonstration, follow a feedback hint, and pick any listed word.

        The first two are SDPO's teacher format (the library's own templates); the third is the task's
        answer format, with no information about the answer.
        """
        key, choices = rng.choice(NAMES), self.random_choices(rng)
        code = rng.choice(choices)
        shown = code if rng.random() < 0.5 else rng.choice(choices)  # also right after a wrong word of one's own
        kind = rng.randrange(3)
        if kind == 0:
            return user_turn(teacher_content(self.question(key, choices), demonstration=code)), code, shown
        if kind == 1:
            wrong = rng.choice([w for w in choices if w != code])
            hint = teacher_content(self.question(key, choices), feedback=self.feedback(wrong, code))
            answer = rng.choice([w for w in choices if CATEGORY_OF[w] == CATEGORY_OF[code]])
            return user_turn(hint), answer, shown
        return user_turn(self.question(key, choices)), code

    def dataset(self, rows: int):
        from datasets import Dataset

        keys = list(self.codes)
        picked = [keys[i % len(keys)] for i in range(rows)]
        return Dataset.from_dict(
            {"prompt": [user_turn(self.prompt(k)) for k in picked], "answer": [self.codes[k] for k in picked]}
        )


def normalise(completion) -> str:
    text = completion[-1]["content"] if isinstance(completion, list) else completion
    return " ".join(text.lower().split())


def code_reward(completions, answer, **kwargs) -> list[float]:
    """1.0 when the completion is exactly the code (case and spacing aside), else 0.0."""
    return [float(normalise(c) == code) for c, code in zip(completions, answer)]


def code_reward_with_feedback(completions, answer, **kwargs) -> list[dict]:
    """The same score, plus the environment's hint for a wrong answer (which GRPO cannot use)."""
    out = []
    for completion, code in zip(completions, answer):
        text = normalise(completion)
        out.append(
            {"score": float(text == code), "feedback": None if text == code else SecretCodes.feedback(text, code)}
        )
    return out


# ---------------------------------------------------------------------------------------------- warm-up checks


def measure_in_context_learning(model, tokenizer, task: SecretCodes, n: int = 256, seed: int = 0) -> dict[str, float]:
    """What the model does (sampling at temperature 1, like the rollouts) with and without help in its prompt.

    - `copy_accuracy`: it writes the demonstration's answer (fresh keys and word lists);
    - `hint_accuracy`: after feedback "the code is a fruit", it picks a listed word of that category (chance 1/4);
    - `solo_accuracy`: the real task without help; chance is 1/options.
    """
    rng = random.Random(seed)
    demo_prompts, hint_prompts, demo_answers, hint_categories = [], [], [], []
    for _ in range(n):
        key, choices = rng.choice(NAMES), task.random_choices(rng)
        code, wrong = rng.sample(choices, 2)
        question = task.question(key, choices)
        demo_prompts.append(user_turn(teacher_content(question, demonstration=code)))
        hint_prompts.append(user_turn(teacher_content(question, feedback=task.feedback(wrong, code))))
        demo_answers.append(code)
        hint_categories.append(CATEGORY_OF[code])
    keys = list(task.codes)
    solo_keys = [keys[i % len(keys)] for i in range(n)]
    copied = sample_completions(model, tokenizer, demo_prompts, max_new_tokens=3, seed=seed)
    hinted = sample_completions(model, tokenizer, hint_prompts, max_new_tokens=3, seed=seed)
    solo = sample_completions(model, tokenizer, [user_turn(task.prompt(k)) for k in solo_keys], max_new_tokens=3)
    return {
        "copy_accuracy": sum(normalise(o) == a for o, a in zip(copied, demo_answers)) / n,
        "hint_accuracy": sum(CATEGORY_OF.get(normalise(o)) == c for o, c in zip(hinted, hint_categories)) / n,
        "solo_accuracy": sum(normalise(o) == task.codes[k] for o, k in zip(solo, solo_keys)) / n,
        "chance": task.chance,
    }


# ---------------------------------------------------------------------------------------------- the comparison


METHODS = ("SDPO", "GRPO", "SDPO (demos only)")


def run_method(
    method: str, model, tokenizer, task: SecretCodes, args, *, lr: float, seed: int, logs: list | None = None
) -> list[tuple[int, float]]:
    """Train one arm from `model` (a fresh copy) and return its (generations, reward) curve.

    `logs`, if given, receives the trainer's logged steps (grad norms, SDPO's coverage metrics).
    """
    from sdpo_fast import SDPOConfig, SDPOTrainer

    set_seed(seed)
    prompts_per_step = args.batch_size // args.num_generations
    scratch = tempfile.TemporaryDirectory(prefix="sdpo_vs_grpo_")  # the Trainer wants an output_dir; nothing is kept
    trainer = SDPOTrainer(
        copy.deepcopy(model),
        code_reward if method == "SDPO (demos only)" else code_reward_with_feedback,
        args=grpo_args(
            scratch.name,
            seed=seed,
            max_steps=args.max_steps,
            learning_rate=lr,
            lr_scheduler_type="constant",
            per_device_train_batch_size=args.batch_size,
            num_generations=args.num_generations,
            max_completion_length=3,
            temperature=1.0,
        ),
        sdpo_config=SDPOConfig(
            enabled=method != "GRPO",
            success_reward_threshold=1.0,
            distillation_topk=args.topk,
            distillation_alpha=args.alpha,
            teacher_update_rate=args.teacher_update_rate,
            dont_reprompt_on_self_success=getattr(args, "dont_reprompt_on_self_success", True),
        ),
        train_dataset=task.dataset(rows=args.max_steps * prompts_per_step),
        processing_class=tokenizer,
    )
    with scratch:
        curve, logged, _ = train_with_progress(trainer, desc=f"{method} lr={lr:g} seed {seed}")
    if logs is not None:
        logs.extend(logged)
    return curve


def smoothed(curve: list[tuple[int, float]], window: int) -> list[tuple[int, float]]:
    """Trailing moving average of the reward over `window` optimizer steps."""
    out = []
    for i, (generations, _) in enumerate(curve):
        chunk = [r for _, r in curve[max(0, i - window + 1) : i + 1]]
        out.append((generations, sum(chunk) / len(chunk)))
    return out


def generations_to_target(curve: list[tuple[int, float]], target: float, window: int) -> int | None:
    """Generations after which the smoothed training reward first reaches `target` (None: never)."""
    for generations, reward in smoothed(curve, window):
        if reward >= target:
            return generations
    return None


def mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    return [(points[0][0], sum(r for _, r in points) / len(points)) for points in zip(*curves)]


def median(values: list[int | None]) -> float | None:
    """Median with "never reached" counted as +inf; None if the median itself never reached the target."""
    ordered = sorted(math.inf if v is None else v for v in values)
    mid = len(ordered) // 2
    value = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    return None if math.isinf(value) else value


COLOURS = {
    "SDPO,": "tab:blue",
    "GRPO,": "tab:orange",
    "SDPO (demos only),": "tab:green",
    "GRPO (EMA-anchored),": "tab:red",
}


def plot(
    runs: dict[str, list[list[tuple[int, float]]]],
    target: float,
    window: int,
    path: Path,
    title: str = "SDPO vs GRPO: same task, seeds and generation budget",
    ylabel: str | None = None,
    legend_loc: str = "lower right",
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, curves in runs.items():
        colour = next((c for prefix, c in COLOURS.items() if name.startswith(prefix)), "tab:gray")
        for curve in curves:
            xs, ys = zip(*smoothed(curve, window))
            ax.plot(xs, ys, color=colour, alpha=0.25, linewidth=1)
        xs, ys = zip(*smoothed(mean_curve(curves), window))
        ax.plot(xs, ys, color=colour, linewidth=2.2, label=f"{name} (mean of {len(curves)} seeds)")
    ax.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"target {target:g}")
    ax.set_xlabel("generations (completions sampled)")
    ax.set_ylabel(ylabel or f"training reward ({window}-step mean)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.legend(loc=legend_loc, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def warm_up_tiny_model(task: SecretCodes, args):
    model, tokenizer = tiny_model(task.words(), seed=args.seed, hidden_size=128, layers=2)
    steps = args.warmup_steps if args.warmup_steps is not None else (5 if args.smoke else 1500)
    with Timer() as t:
        supervised_warmup(model, tokenizer, task.warmup_example, steps=steps, lr=1e-3, seed=args.seed)
    return model, tokenizer, {"warmup_steps": steps, "warmup_seconds": round(t.seconds, 1)}


def main() -> None:
    parser = make_parser(__doc__, steps=80, smoke_steps=2)
    parser.add_argument("--seeds", type=int, default=None, help="RL seeds per arm (default 3; 1 with --smoke).")
    parser.add_argument(
        "--learning-rates",
        default=None,
        help="Comma-separated; every method runs at each, and the best of each method is compared "
        "(default 5e-4,1e-3 for the tiny model, 1e-3 with --smoke, 1e-6 with --model).",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="Completions per optimizer step.")
    parser.add_argument("--num-generations", type=int, default=8, help="Completions per prompt (the group size).")
    parser.add_argument("--target", type=float, default=0.9, help="Target training reward (smoothed).")
    parser.add_argument("--window", type=int, default=5, help="Steps in the moving average used for the target.")
    parser.add_argument("--warmup-steps", type=int, default=None, help="Supervised warm-up steps of the tiny model.")
    parser.add_argument("--keys", type=int, default=8, help="Number of secret codes to learn.")
    parser.add_argument("--topk", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--teacher-update-rate", type=float, default=0.01, help="EMA rate (the reference's "
                        "rich-feedback run used 0.01).")  # fmt: skip
    parser.add_argument("--no-ablation", action="store_true", help="Skip the SDPO-without-feedback arm.")
    args = finish_args(parser.parse_args(), "sdpo_vs_grpo")
    seeds = [args.seed + i for i in range(args.seeds or (1 if args.smoke else 3))]
    task = SecretCodes(num_keys=args.keys, seed=args.seed)

    facts: dict[str, object] = {}
    if args.model:
        model, tokenizer = load_hub_model(args.model)
        default_lrs = "1e-6"
        facts["model"] = args.model
    else:
        model, tokenizer, warm = warm_up_tiny_model(task, args)
        default_lrs = "1e-3" if args.smoke else "5e-4,1e-3"
        facts.update(model="tiny-qwen2 (built in code)", **warm)
    lrs = [float(x) for x in (args.learning_rates or default_lrs).split(",")]
    icl = measure_in_context_learning(model, tokenizer, task, n=32 if args.smoke else 256, seed=args.seed)
    print(
        f"In-context check (sampling at temperature 1): copies a demonstration {icl['copy_accuracy']:.1%} of the "
        f"time; after a hint picks the hinted category {icl['hint_accuracy']:.1%} (chance 25%); solves the task "
        f"without help {icl['solo_accuracy']:.1%} (chance {icl['chance']:.1%})."
    )
    if not args.model and not args.smoke:
        holds = (
            icl["copy_accuracy"] >= 0.9 and icl["hint_accuracy"] >= 0.5 and icl["solo_accuracy"] <= 2 * icl["chance"]
        )
        facts["in_context_properties_hold"] = holds
        if not holds:
            print("WARNING: the warm-up did not produce an in-context learner that cannot solve the task alone; "
                  "the comparison below does not test SDPO's premise. Try more --warmup-steps.")  # fmt: skip

    methods = METHODS[:2] if args.no_ablation or args.smoke else METHODS
    runs: dict[str, list[list[tuple[int, float]]]] = {}
    arm_of: dict[str, tuple[str, float]] = {}
    with Timer() as t:
        for lr in lrs:
            for method in methods:
                label = f"{method}, lr {lr:g}"
                arm_of[label] = (method, lr)
                runs[label] = [run_method(method, model, tokenizer, task, args, lr=lr, seed=s) for s in seeds]
    facts["rl_seconds"] = round(t.seconds, 1)

    budget = next(iter(runs.values()))[0][-1][0]
    to_target = {
        label: [generations_to_target(c, args.target, args.window) for c in curves] for label, curves in runs.items()
    }
    final = {
        label: sum(smoothed(c, args.window)[-1][1] for c in curves) / len(curves) for label, curves in runs.items()
    }

    def best(method: str) -> str:
        """The method's arm with the fewest (median) generations to the target; ties: higher final reward."""
        labels = [label for label, (m, _) in arm_of.items() if m == method]
        return min(labels, key=lambda lab: (median(to_target[lab]) or math.inf, -final[lab]))

    best_arms = {method: best(method) for method in methods}
    png = args.output_dir / "reward_vs_generations.png"
    plot({label: runs[label] for label in best_arms.values()}, args.target, args.window, png)

    def shown(value) -> str:
        return f"> {budget}" if value is None else f"{value:g}"

    # The paper's comparison: generations SDPO needs to reach GRPO's final reward (mean curves over seeds).
    sdpo_label, grpo_label = best_arms["SDPO"], best_arms["GRPO"]
    grpo_final = smoothed(mean_curve(runs[grpo_label]), args.window)[-1][1]
    sdpo_to_grpo_final = generations_to_target(mean_curve(runs[sdpo_label]), grpo_final, args.window)

    lines = [
        f"Secret codes: {task.num_keys} keys, {task.options} listed words each (chance {task.chance:.1%}); "
        f"{args.batch_size} generations per step ({args.num_generations} per prompt); budget {budget} generations "
        f"per run; seeds {', '.join(map(str, seeds))}; learning rates {', '.join(f'{lr:g}' for lr in lrs)}.",
        "",
        f"| arm | generations to reward ≥ {args.target:g} ({args.window}-step mean), per seed | median | "
        "final reward (mean over seeds) |",
        "|---|---|---|---|",
    ]
    for label in runs:
        mark = " (best)" if label in best_arms.values() and len(lrs) > 1 else ""
        per_seed = ", ".join(shown(v) for v in to_target[label])
        lines.append(f"| {label}{mark} | {per_seed} | {shown(median(to_target[label]))} | {final[label]:.3f} |")
    lines += [
        "",
        f"Paper-style: the best GRPO arm ends at reward {grpo_final:.3f} after {budget} generations; the best SDPO "
        f"arm reaches it after {shown(sdpo_to_grpo_final)}.",
    ]
    table = "\n".join(lines) + "\n"
    (args.output_dir / "results.md").write_text(table)
    (args.output_dir / "results.json").write_text(
        json.dumps(
            {
                "settings": {k: str(v) for k, v in vars(args).items() if not k.startswith("_")},
                "seeds": seeds,
                "in_context_check": icl,
                "best_arms": best_arms,
                "generations_to_target": to_target,
                "curves": runs,
            },
            indent=1,
        )
        + "\n"
    )
    print("\n" + table)

    sdpo, grpo = median(to_target[sdpo_label]), median(to_target[grpo_label])
    if sdpo is not None and grpo is not None:
        verdict = f"SDPO needs {grpo / sdpo:.2f}x fewer generations than GRPO to reach {args.target:g} (median)"
    elif sdpo is not None:
        verdict = f"only SDPO reached {args.target:g} within {budget} generations"
    elif grpo is not None:
        verdict = f"only GRPO reached {args.target:g}"
    else:
        verdict = "neither method reached the target; train longer (--max-steps)"
    print_summary(
        "sdpo_vs_grpo summary",
        {
            **facts,
            "copy_accuracy": icl["copy_accuracy"],
            "hint_accuracy": icl["hint_accuracy"],
            "solo_accuracy": icl["solo_accuracy"],
            "chance": icl["chance"],
            "seeds": len(seeds),
            "target_reward": args.target,
            "best_sdpo_arm": sdpo_label,
            "best_grpo_arm": grpo_label,
            "sdpo_generations_to_target": sdpo,
            "grpo_generations_to_target": grpo,
            "verdict": verdict,
            "grpo_final_reward": grpo_final,
            "sdpo_generations_to_grpo_final": sdpo_to_grpo_final,
            "generation_budget": budget,
            "plot": str(png),
            "table": str(args.output_dir / "results.md"),
        },
        args.output_dir,
    )


if __name__ == "__main__":
    main()
