"""SDPO's modes against GRPO on SmolLM2-135M-Instruct (offline, LoRA, CPU): one (task, arm, lr, seed) per result file.

    python experiments/real_model/run.py preflight --task sort            # the self-teacher check of a task
    python experiments/real_model/run.py train --task sort --arms grpo,sdpo --lrs 1e-4,3e-4 --seeds 0 --steps 20
    python experiments/real_model/run.py merge --task sort                # tables and plots from every result file

Arms are in `arms.py`, tasks in `tasks.py`. Every arm of a seed shares the training questions and their order,
the LoRA initialisation and the generation budget. Held-out accuracy is greedy, on questions disjoint from
training, and runs in a forked random state, so evaluating never shifts training's random stream. Each
finished run writes `results/<task>/per_run/<arm>_lr<lr>_s<seed>_n<steps>.json`; a run whose file exists is
skipped, so an interrupted sweep resumes where it stopped. The step-0 evaluation is the base model's (a LoRA
starts as a no-op) and is computed once per task (`results/<task>/base_eval.json`).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from analysis import RUNS  # noqa: E402
from arms import ARMS, Arm, sdpo_config  # noqa: E402
from tasks import TASKS, Task  # noqa: E402

RESULTS = HERE / "results"
PROMPTS_PER_STEP, GENERATIONS = 2, 8  # 16 completions per optimizer step, 8 per question (one GRPO group)


def load_model(name: str = "smollm2"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sdpo_fast.pretrained import resolve_model

    path = resolve_model(name)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), tokenizer


def lora(model, seed: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # the same LoRA initialisation in every arm of a seed
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets)
    return get_peft_model(copy.deepcopy(model), config)


# ---------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model, tokenizer, task: Task, rows: list[dict]) -> dict:
    """Greedy answers to `rows`: accuracy (score 1), mean score, and each question's success (for paired CIs)."""
    from sdpo_fast.preflight.sampling import generate, model_device, private_rng
    from sdpo_fast.reprompting import PromptCodec

    codec = PromptCodec(tokenizer)
    training = model.training
    model.eval()
    try:
        with private_rng(0, model_device(model)):  # greedy needs no randomness; the fork guarantees it
            ids = generate(model, tokenizer, [codec.encode_prompt(r["prompt"]) for r in rows], temperature=0.0,
                           max_new_tokens=task.max_completion_length, batch_size=32)  # fmt: skip
    finally:
        model.train(training)
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
    scores = task.reward_plain(completions=[[{"role": "assistant", "content": t}] for t in texts], **columns)
    correct = [int(s == 1.0) for s in scores]
    return {"accuracy": sum(correct) / len(rows), "mean_score": sum(scores) / len(rows), "correct": correct}


class HeldOut(TrainerCallback):
    """Held-out accuracy every `every` optimizer steps and at the last step (step 0 given: the base model's)."""

    def __init__(self, tokenizer, task: Task, rows: list[dict], every: int, per_step: int, initial: dict):
        self.tokenizer, self.task, self.rows, self.every, self.per_step = tokenizer, task, rows, every, per_step
        self.curve = [{"generations": 0, **initial}]

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            point = evaluate(model, self.tokenizer, self.task, self.rows)
            self.curve.append({"generations": state.global_step * self.per_step, **point})
            print(f"  step {state.global_step}: held-out accuracy {point['accuracy']:.3f}", flush=True)


class SyncRefAdapter(TrainerCallback):
    """TRL's `sync_ref_model` rule, ref ← (1 − α)·ref + α·policy every k steps, on PEFT's `ref` adapter."""

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


# ---------------------------------------------------------------------------------------------- one run


def base_eval(model, tokenizer, task: Task, held_out: list[dict]) -> dict:
    path = RESULTS / task.name / "base_eval.json"
    questions = [r["question"] for r in held_out]
    if path.exists():
        cached = json.loads(path.read_text())
        if cached["questions"] == questions:
            return cached["eval"]
    point = evaluate(model, tokenizer, task, held_out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"questions": questions, "eval": point}) + "\n")
    return point


def train_one(model, tokenizer, task: Task, arm: Arm, *, lr: float, seed: int, args) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig

    from sdpo_fast import SDPOTrainer

    train_rows, held_out = task.split(args.questions, args.eval_questions, seed=args.task_seed)
    order = random.Random(seed).sample(range(len(train_rows)), len(train_rows))
    picked = [train_rows[order[i % len(order)]] for i in range(args.steps * PROMPTS_PER_STEP)]
    dataset = Dataset.from_list(picked)
    random.seed(seed)
    torch.manual_seed(seed)
    policy = lora(model, seed)
    per_step = PROMPTS_PER_STEP * GENERATIONS
    with tempfile.TemporaryDirectory(prefix="real_model_") as scratch:
        grpo = dict(
            output_dir=scratch, max_steps=args.steps, seed=seed, data_seed=seed, use_cpu=True, bf16=False,
            learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, per_device_train_batch_size=per_step,
            num_generations=GENERATIONS, max_completion_length=task.max_completion_length,
            temperature=args.temperature,
            top_k=0, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
            gradient_checkpointing=False, ref_model_mixup_alpha=0.05, ref_model_sync_steps=1,
        )  # fmt: skip
        grpo.update(arm.grpo)
        trainer = SDPOTrainer(
            policy,
            task.reward if arm.feedback else task.reward_plain,
            args=GRPOConfig(**grpo),
            sdpo_config=sdpo_config(arm),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        if arm.anchor:
            trainer.add_callback(SyncRefAdapter(trainer.model, grpo["ref_model_mixup_alpha"], 1))
        initial = base_eval(model, tokenizer, task, held_out)
        held = HeldOut(tokenizer, task, held_out, args.eval_every, per_step, initial)
        trainer.add_callback(held)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    rewards = [[round(h["step"] * per_step), h["reward"]] for h in trainer.state.log_history if "reward" in h]
    return {
        "task": task.name, "arm": arm.name, "lr": lr, "seed": seed, "steps": args.steps,
        "generations_per_step": per_step, "questions": args.questions, "held_out_questions": len(held_out),
        "task_seed": args.task_seed, "temperature": args.temperature, "eval": held.curve, "train_reward": rewards, "seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(), "arm_config": arm.__dict__,
    }  # fmt: skip


def run_path(task: str, arm: str, lr: float, seed: int, steps: int, temperature: float) -> Path:
    suffix = "" if temperature == 1.0 else f"_t{temperature:g}"
    return RESULTS / task / RUNS / f"{arm}_lr{lr:g}_s{seed}_n{steps}{suffix}.json"


def cmd_train(args) -> None:
    task = TASKS[args.task]
    arms = [ARMS[a] for a in args.arms.split(",")]
    for arm in arms:  # fail before any compute if an arm cannot be built on this checkout
        sdpo_config(arm)
    model, tokenizer = load_model(args.model)
    for seed in [int(s) for s in args.seeds.split(",")]:
        for lr in [float(x) for x in args.lrs.split(",")]:
            for arm in arms:
                path = run_path(task.name, arm.name, lr, seed, args.steps, args.temperature)
                if path.exists():
                    print(f"{path.name}: done already, skipped", flush=True)
                    continue
                print(f"{task.name} / {arm.name}, lr {lr:g}, seed {seed}, {args.steps} steps", flush=True)
                result = train_one(model, tokenizer, task, arm, lr=lr, seed=seed, args=args)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(result) + "\n")
                print(f"  wrote {path} ({result['seconds']:.0f} s)", flush=True)


def cmd_preflight(args) -> None:
    from sdpo_fast import SDPOConfig, preflight

    task = TASKS[args.task]
    rows, _ = task.split(args.questions, args.eval_questions, seed=args.task_seed)
    model, tokenizer = load_model(args.model)
    report = preflight(
        model, tokenizer, rows, task.reward, sdpo_config=SDPOConfig(success_reward_threshold=1.0),
        num_prompts=args.num_prompts, num_generations=args.num_generations, temperature=args.temperature,
        max_completion_length=task.max_completion_length, seed=args.seed,
    )  # fmt: skip
    print(report.table())
    out = RESULTS / "preflight" / f"{task.name}_t{args.temperature:g}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report.to_json(str(out))
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["train", "preflight", "merge"])
    parser.add_argument("--task", default="sort", choices=sorted(TASKS))
    parser.add_argument("--arms", default="grpo,sdpo", help=f"Comma-separated, from: {', '.join(ARMS)}.")
    parser.add_argument("--lrs", default="1e-4,3e-4", help="Comma-separated LoRA learning rates.")
    parser.add_argument("--seeds", default="0", help="Comma-separated training seeds.")
    parser.add_argument("--steps", type=int, default=30, help="Optimizer steps (16 generations each).")
    parser.add_argument("--eval-every", type=int, default=10, help="Steps between held-out evaluations.")
    parser.add_argument("--questions", type=int, default=64, help="Distinct training questions.")
    parser.add_argument("--eval-questions", type=int, default=128, help="Held-out questions (disjoint).")
    parser.add_argument("--task-seed", type=int, default=0, help="Seed of the questions (the same for every arm).")
    parser.add_argument("--num-prompts", type=int, default=32, help="preflight: prompts.")
    parser.add_argument("--num-generations", type=int, default=8, help="preflight: rollouts per prompt.")
    parser.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature (rollouts, preflight).")
    parser.add_argument("--seed", type=int, default=0, help="preflight: seed.")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 per process on a shared CPU).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.command == "merge":
        from analysis import write_report

        write_report(args.task)
    elif args.command == "preflight":
        cmd_preflight(args)
    else:
        cmd_train(args)


if __name__ == "__main__":
    main()
