"""The training-step benchmark, worker side: one whole RL step of each trainer on a tiny Qwen2.

The setup is the peers' published benchmark setup (docs/performance.md), so the numbers are comparable: a random Qwen2
(hidden 128, 2 layers, tied embeddings, real vocabulary) saved to disk and loaded with
`from_pretrained` (TRL's experimental SDPOTrainer rebuilds its EMA teacher from the model path),
a word-level ChatML tokenizer padded to the vocabulary size, 36 prompts, 8 completions per prompt,
per_device_train_batch_size=8, gradient_accumulation_steps=1, fp32, and a reward that marks every
even completion a success (random weights never emit EOS, so a length-based reward would be flat).

Each process builds the model from a seed, saves it and loads it back (see `load_model`).
A step is timed from `on_step_begin` to `on_step_end` (generation included); the rollout part is
the time spent in `trainer._prepare_inputs`.
"""

from __future__ import annotations

import gc
import math
import statistics
import tempfile
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, TrainerCallback

from sdpo_fast.testing import tiny_qwen2, tiny_tokenizer

STEP_IMPORTS = ("trl", "trl.experimental.sdpo", "sdpo_fast.trainer")


def import_all() -> None:
    """Every step process (the model-only baseline too) imports all three trainers' modules."""
    import importlib

    for name in STEP_IMPORTS:
        importlib.import_module(name)


def load_model(job: dict, model_dir: str):
    """Build the seeded random model, save it, and load it back with `from_pretrained`.

    Every step process, the model-only baseline included, does exactly this, so the build cost
    cancels; loading from disk gives the model the `_name_or_path` from which TRL's
    SDPOTrainer rebuilds its EMA teacher.
    """
    m = job["model"]
    built = tiny_qwen2(
        tiny_tokenizer(vocab_size=m["vocab"]),
        hidden_size=m["hidden"],
        intermediate_size=m["intermediate"],
        num_hidden_layers=m["layers"],
        num_attention_heads=m["heads"],
        num_key_value_heads=m["kv_heads"],
        max_position_embeddings=2048,
        seed=0,
    )
    built.save_pretrained(model_dir)
    del built
    gc.collect()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    return model.to(job["device"]) if job["device"] == "cuda" else model


def prompts(n: int = 36) -> Dataset:
    rows = [[{"role": "user", "content": f"what is {i % 10} plus {(3 * i) % 10} ?"}] for i in range(n)]
    return Dataset.from_dict({"prompt": rows})


def reward_half(completions, **kwargs) -> list[float]:
    """Even completions succeed: each group of 8 has 4 successes, so SDPO always has demonstrations."""
    return [1.0 if i % 2 == 0 else 0.0 for i in range(len(completions))]


def model_only(job: dict) -> dict:
    """The step baseline: the same imports, the model loaded, the tokenizer and data built; no trainer."""
    import_all()
    with tempfile.TemporaryDirectory() as model_dir:
        model = load_model(job, model_dir)
        tiny_tokenizer(vocab_size=job["model"]["vocab"])
        prompts()
    out = {}
    if job["device"] == "cuda":
        torch.cuda.synchronize()
        out["model_alloc_mib"] = torch.cuda.memory_allocated() / 2**20
    del model
    return out


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (added last, so it includes the teacher/EMA callbacks)."""

    def __init__(self, device: str):
        self.device, self.times, self._t0 = device, [], 0.0

    def _now(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = self._now()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(self._now() - self._t0)


def _timed(fn, sink: list, device: str):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        sink.append(time.perf_counter() - t0)
        return out

    return wrapper


def grpo_args(job: dict, out_dir: str) -> dict:
    """The trainer arguments every implementation shares (the peers' benchmark setup, docs/performance.md)."""
    return dict(
        output_dir=out_dir,
        per_device_train_batch_size=job["generations"],
        num_generations=job["generations"],
        max_completion_length=job["completion_length"],
        gradient_accumulation_steps=1,
        use_cpu=job["device"] != "cuda",
        bf16=False,
        report_to=[],
        learning_rate=1e-5,
        seed=42,
        save_strategy="no",
        logging_steps=1,
        max_steps=job["steps"],
        disable_tqdm=True,
    )


def build_trainer(job: dict, model, tokenizer, out_dir: str):
    from trl import GRPOConfig, GRPOTrainer

    impl, args, data = job["impl"], grpo_args(job, out_dir), prompts()
    if impl == "grpo":
        return GRPOTrainer(
            model, reward_half, args=GRPOConfig(beta=0.0, **args), train_dataset=data, processing_class=tokenizer
        )
    if impl == "sdpo_fast":
        from sdpo_fast import SDPOConfig, SDPOTrainer

        sdpo = SDPOConfig(distillation_topk=job["topk"], distillation_alpha=0.5, distillation_add_tail=True)
        return SDPOTrainer(
            model,
            reward_half,
            args=GRPOConfig(beta=0.0, **args),
            sdpo_config=sdpo,
            train_dataset=data,
            processing_class=tokenizer,
        )
    from trl.experimental.sdpo import SDPOConfig as TRLSDPOConfig
    from trl.experimental.sdpo import SDPOTrainer as TRLSDPOTrainer

    if impl == "trl-sdpo-topk":
        mode = dict(
            distillation_mode="topk_logits",
            distillation_topk=job["topk"],
            distillation_add_tail=True,
            distillation_alpha=0.5,
        )
    else:  # trl-sdpo-sampled: the REINFORCE estimator, which requires alpha = 1
        mode = dict(distillation_mode="sampled_token", distillation_alpha=1.0)
    config = TRLSDPOConfig(teacher_model_kind="ema", **mode, **args)
    return TRLSDPOTrainer(model, reward_half, args=config, train_dataset=data, processing_class=tokenizer)


def run_step(job: dict) -> dict:
    """Train `steps` optimizer steps; report the median step time over steps 2.. and the losses."""
    import_all()
    with tempfile.TemporaryDirectory() as model_dir, tempfile.TemporaryDirectory() as out_dir:
        model = load_model(job, model_dir)
        base = 0
        if job["device"] == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        tokenizer = tiny_tokenizer(vocab_size=job["model"]["vocab"])
        torch.manual_seed(0)
        trainer = build_trainer(job, model, tokenizer, out_dir)
        timer, rollout = StepTimer(job["device"]), []
        trainer.add_callback(timer)
        trainer._prepare_inputs = _timed(trainer._prepare_inputs, rollout, job["device"])
        trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    steady = timer.times[1:] or timer.times  # step 1 pays one-off costs (allocator, lazy init)
    res = {
        "times_ms": [t * 1e3 for t in timer.times],
        "median_ms": statistics.median(steady) * 1e3,
        "rollout_ms": statistics.median(rollout[1:] or rollout) * 1e3 if rollout else None,
        "losses": losses,
        "error": None,
    }
    if len(timer.times) != job["steps"] or not losses or not all(math.isfinite(v) for v in losses):
        res["error"] = f"{len(timer.times)} of {job['steps']} steps ran; losses {losses}"
    if job["device"] == "cuda":
        res["peak_mem_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return res
