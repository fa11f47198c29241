"""Sampling and scoring for the pre-flight check: `model.generate` on token ids, and the trainer's reward call.

Sampling forks PyTorch's random state (`torch.random.fork_rng`) and seeds inside the fork, so a pre-flight
run during training neither depends on nor changes the training's random stream. Scoring calls the user's
reward functions the way TRL's `GRPOTrainer._calculate_rewards` does (keyword arguments `prompts`,
`completions`, `completion_ids` and every other dataset column), through sdpo-fast's own wrapper, so that
`{"score", "feedback"}` dicts, None and NaN mean what they mean in training.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ..rewards import FeedbackStore, wrap_reward_function
from ..teacher_batch import success_scores


@contextlib.contextmanager
def private_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seed PyTorch for the block only: the global CPU (and this CUDA device's) random state is restored after."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """Completion ids per prompt (up to and including the first EOS), sampled in batches with left padding.

    `temperature` > 0 samples from the full softmax at that temperature (no top-k, no top-p: the reference's
    rollouts); 0 decodes greedily. The caller owns the seeding (see `private_rng`) and the model's mode.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    device = model_device(model)
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        if temperature > 0
        else {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}
    )
    out: list[list[int]] = []
    for start in range(0, len(prompt_ids), batch_size):
        chunk = [list(ids) for ids in prompt_ids[start : start + batch_size]]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, ids in enumerate(chunk):  # left padding: every prompt ends where generation starts
            input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention[i, width - len(ids) :] = 1
        generated = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            eos_token_id=eos,
            use_cache=True,
            **sampling,
        )[:, width:].tolist()
        for row in generated:
            end = row.index(eos) + 1 if eos in row else len(row)
            out.append(row[:end])
        if on_batch is not None:
            on_batch(len(chunk))
    return out


def completions_for(prompts: Sequence[Any], texts: Sequence[str]) -> list[Any]:
    """Completions in TRL's format: an assistant message for a conversational prompt, else the text."""
    return [[{"role": "assistant", "content": t}] if isinstance(p, list) else t for p, t in zip(prompts, texts)]


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


def score(
    reward_funcs: Sequence[Callable],
    reward_weights: Sequence[float],
    prompts: Sequence[Any],
    texts: Sequence[str],
    completion_ids: Sequence[list[int]],
    columns: dict[str, list[Any]],
    *,
    trainer_state: Any = None,
) -> tuple[list[float], list[str | None]]:
    """The weighted reward sum per completion (NaN where every function returned None) and the combined feedback.

    `columns` holds the dataset's other columns, one entry per completion, passed as keyword arguments as TRL
    passes them; `trainer_state`, `log_extra` and `log_metric` are there too so that reward functions written
    for TRL run unchanged (the two loggers do nothing here).
    """
    n = len(texts)
    store = FeedbackStore()
    kwargs = {**columns, "trainer_state": trainer_state, "log_extra": _noop, "log_metric": _noop}
    completions = completions_for(prompts, texts)
    per_func: list[list[float]] = []
    for index, func in enumerate(reward_funcs):
        name = reward_name(func)
        wrapped = wrap_reward_function(func, index, name, store)
        output = wrapped(prompts=list(prompts), completions=completions, completion_ids=list(completion_ids), **kwargs)
        if inspect.isawaitable(output):
            output = asyncio.run(_awaited(output))
        if len(output) != n:
            raise ValueError(
                f"The reward function {name!r} returned {len(output)} rewards for {n} completions. Return exactly one "
                "reward per completion."
            )
        per_func.append([math.nan if v is None else float(v) for v in output])
    # the trainer's own success score: TRL's weighted nansum, with all-None rows unscorable
    rewards = torch.tensor(per_func, dtype=torch.float64).reshape(len(per_func), n).T
    scores = success_scores(rewards, torch.tensor(list(reward_weights), dtype=torch.float64))
    return scores, store.combined(n)


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def reward_name(func: Callable) -> str:
    return getattr(func, "__name__", None) or type(func).__name__


def check_reward_funcs(reward_funcs: Any, reward_weights: Sequence[float] | None) -> tuple[list[Callable], list[float]]:
    """The reward functions as a list and their weights (1 each by default), or an error that names the problem."""
    funcs = list(reward_funcs) if isinstance(reward_funcs, list | tuple) else [reward_funcs]
    if not funcs:
        raise ValueError("preflight needs at least one reward function.")
    for func in funcs:
        if isinstance(func, torch.nn.Module | str):
            raise TypeError(
                f"preflight scores with reward *functions*; got {type(func).__name__} {reward_name(func)!r}. Wrap a "
                "reward model in a function that takes (prompts, completions, **kwargs) and returns floats."
            )
        if not callable(func):
            raise TypeError(f"Reward function {func!r} is not callable.")
    weights = [1.0] * len(funcs) if reward_weights is None else [float(w) for w in reward_weights]
    if len(weights) != len(funcs):
        raise ValueError(
            f"reward_weights has {len(weights)} entries for {len(funcs)} reward functions; give one weight per function."
        )
    return funcs, weights
