"""Tiny trainers for the end-to-end tests: a random Qwen2 model, a word-level tokenizer, toy data."""

from __future__ import annotations

import copy
import functools

import torch
from datasets import Dataset
from trl import GRPOConfig

from sdpo_fast import SDPOConfig
from sdpo_fast.testing import tiny_qwen2, tiny_tokenizer


@functools.cache
def _base():
    tok = tiny_tokenizer()
    return tok, tiny_qwen2(tok, hidden_size=32, intermediate_size=64, seed=0)


def tokenizer():
    return copy.deepcopy(_base()[0])


def model():
    return copy.deepcopy(_base()[1])


def peaked_model(std: float = 0.3):
    """A random model with large weights, so its next-token distributions are far from uniform."""
    m = model()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, std, generator=torch.Generator().manual_seed(p.numel()))
    return m


def chat_dataset(n=8, system=True):
    rows = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"what is {i} plus {i}?"}]
        if system:
            msgs = [{"role": "system", "content": "you are helpful"}, *msgs]
        rows.append(msgs)
    return Dataset.from_dict({"prompt": rows, "answer": [str(2 * i) for i in range(n)]})


def half_success(completions, **kwargs):
    """Every odd completion of a batch succeeds: each group has successes and failures."""
    return [float(i % 2) for i in range(len(completions))]


def half_success_with_feedback(completions, **kwargs):
    return [
        {"score": float(i % 2), "feedback": None if i % 2 else f"expected {kwargs['answer'][i]} but got something else"}
        for i in range(len(completions))
    ]


def grpo_args(tmp_path, **overrides) -> GRPOConfig:
    defaults = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        max_steps=2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        bf16=False,
        learning_rate=1e-3,
        save_strategy="no",
        seed=0,
        gradient_checkpointing=False,
        disable_tqdm=True,
    )
    defaults.update(overrides)
    return GRPOConfig(**defaults)


def make_trainer(
    tmp_path, reward=half_success, sdpo=None, dataset=None, peft_config=None, model_=None, trainer_cls=None, **args
):
    from sdpo_fast import SDPOTrainer

    torch.manual_seed(0)
    return (trainer_cls or SDPOTrainer)(
        model_ if model_ is not None else model(),
        reward,
        args=grpo_args(tmp_path, **args),
        sdpo_config=sdpo if sdpo is not None else SDPOConfig(distillation_topk=10),
        train_dataset=dataset if dataset is not None else chat_dataset(),
        processing_class=tokenizer(),
        peft_config=peft_config,
    )


def first_batch(trainer):
    """The first micro-batch exactly as `compute_loss` would receive it."""
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer._prepare_inputs(batch)
