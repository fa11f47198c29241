"""The pre-flight self-teacher check: does SDPO's self-teacher answer better than the student, before training?

SDPO can only teach the student what its self-teacher knows better, and the final gain grows roughly linearly
with the step-0 gap between the two (arXiv 2605.30070). This samples the student alone, builds the teacher
prompts exactly as `SDPOTrainer` builds them from those rollouts, samples the teacher's *own* answers to them
and scores everything with the user's reward functions.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import SDPOConfig
from ..reprompting import PromptCodec, build_teacher_contexts, group_key, tokenize_reprompt
from . import sampling
from .report import ContextStats, PreflightReport, context_stats, recommend

CONTEXTS = ("demonstration", "feedback", "both")


def teacher_prompt_ids(
    prompts: list[Any],
    keys: list[str],
    scores: list[float],
    texts: list[str],
    feedback: list[str | None],
    config: SDPOConfig,
    codec: PromptCodec,
    seed: int,
) -> tuple[list[list[int] | None], dict[str, float]]:
    """Each sample's teacher prompt ids as training tokenises them (None: no teacher), and the coverage metrics.

    The only place that touches the reprompting module, so that a rename there is a one-function change.
    """
    contexts = build_teacher_contexts(prompts, keys, scores, texts, feedback, config, seed=seed)
    ids: list[list[int] | None] = []
    for reprompt in contexts.reprompts:
        if not reprompt.active:
            ids.append(None)
            continue
        tokenized = tokenize_reprompt(
            reprompt, codec, max_len=config.max_reprompt_len, truncation=config.reprompt_truncation
        )
        ids.append(None if tokenized.overflow else tokenized.ids)  # an overflowing prompt is masked in training
    return ids, contexts.metrics


def context_inputs(name: str, config: SDPOConfig, scores: list[float]) -> tuple[SDPOConfig, list[float]]:
    """The config and scores that make `build_teacher_contexts` produce one context kind.

    `demonstration`: feedback off. `feedback`: feedback on and no success visible, so no demonstration is
    chosen. `both`: feedback on, combined with demonstrations the way the config combines them.
    """
    if name == "demonstration":
        return dataclasses.replace(config, include_environment_feedback=False), scores
    if name == "feedback":
        return dataclasses.replace(config, include_environment_feedback=True), [math.nan] * len(scores)
    if name == "both":
        return dataclasses.replace(config, include_environment_feedback=True), scores
    raise ValueError(f"Unknown teacher context {name!r}; choose one of {CONTEXTS}.")


def _rows(dataset: Any, num_prompts: int, seed: int) -> list[dict[str, Any]]:
    try:
        size = len(dataset)
    except TypeError:
        raise TypeError(
            f"preflight needs a dataset with a length (a datasets.Dataset or a list of dicts), got {type(dataset).__name__}."
        ) from None
    if size == 0:
        raise ValueError("The dataset is empty: preflight needs prompts to sample.")
    picked = random.Random(seed).sample(range(size), min(num_prompts, size))
    rows = [dict(dataset[i]) for i in picked]
    if "prompt" not in rows[0]:
        raise ValueError(
            f"The dataset has no 'prompt' column (columns: {sorted(rows[0])}). SDPOTrainer and preflight read the "
            "prompt from it; rename your question column to 'prompt'."
        )
    return rows


def preflight(
    model: torch.nn.Module,
    tokenizer_or_processing_class: Any,
    dataset: Any,
    reward_funcs: Callable | Sequence[Callable],
    *,
    sdpo_config: SDPOConfig | None = None,
    num_prompts: int = 64,
    num_generations: int = 8,
    temperature: float = 1.0,
    max_completion_length: int = 256,
    seed: int = 0,
    reward_weights: Sequence[float] | None = None,
    progress: bool = True,
    batch_size: int = 32,
    chat_template_kwargs: dict[str, Any] | None = None,
    trainer_state: Any = None,
) -> PreflightReport:
    """Measure the self-teacher against the student on `num_prompts` prompts of `dataset`.

    The student answers each prompt `num_generations` times (one GRPO group). From those rollouts the teacher
    prompts are built three ways, exactly as training would: (a) a successful sibling as the demonstration,
    (b) the reward functions' feedback, (c) both, as `sdpo_config` combines them. The teacher (the same model)
    answers every teacher prompt once, and the same reward functions score it. The report gives, per context,
    the mean reward and success rate with 95% intervals over prompts, the paired gap to the student on the
    same prompts, how often the context exists, and a recommendation.

    A sample whose teacher prompt is the same in two contexts reuses that answer. Sampling runs in eval mode
    without gradients, seeded by `seed` inside a fork of PyTorch's random state:
    the global random state is the same after the call as before it.
    """
    config = sdpo_config if sdpo_config is not None else SDPOConfig()
    if not isinstance(config, SDPOConfig):
        raise TypeError(f"sdpo_config must be an SDPOConfig, got {type(config).__name__}.")
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be ≥ 1, got {num_prompts}.")
    if num_generations < 2:
        raise ValueError(
            f"num_generations must be ≥ 2, got {num_generations}: a demonstration is a successful *sibling*, so "
            "each prompt needs at least two rollouts, as in training."
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (rollouts are sampled), got {temperature}.")
    if max_completion_length < 1 or batch_size < 1:
        raise ValueError("max_completion_length and batch_size must be ≥ 1.")
    funcs, weights = sampling.check_reward_funcs(reward_funcs, reward_weights)
    tokenizer = getattr(tokenizer_or_processing_class, "tokenizer", tokenizer_or_processing_class)
    codec = PromptCodec(tokenizer, dict(chat_template_kwargs or {}))
    rows = _rows(dataset, num_prompts, seed)

    # One group of `num_generations` rollouts per prompt, in order, as TRL lays out a generation batch.
    owner = [p for p in range(len(rows)) for _ in range(num_generations)]
    prompts = [rows[p]["prompt"] for p in owner]
    columns = {k: [rows[p][k] for p in owner] for k in rows[0] if k not in ("prompt", "completion", "completion_ids")}
    keys = [group_key(rows[p]["prompt"], rows[p].get("uid"), row=p) for p in owner]  # training's groups: the row
    student_ids = [codec.encode_prompt(rows[p]["prompt"]) for p in owner]

    def run(ids: list[list[int]], bar: tqdm) -> tuple[list[list[int]], list[str]]:
        out = sampling.generate(
            model, tokenizer, ids, max_new_tokens=max_completion_length, temperature=temperature,
            batch_size=batch_size, on_batch=bar.update,
        )  # fmt: skip
        return out, tokenizer.batch_decode(out, skip_special_tokens=True)

    def scored(index: list[int], ids: list[list[int]], texts: list[str]) -> tuple[list[float], list[str | None]]:
        return sampling.score(
            funcs, weights, [prompts[i] for i in index], texts, ids,
            {k: [v[i] for i in index] for k, v in columns.items()}, trainer_state=trainer_state,
        )  # fmt: skip

    was_training = model.training
    bar = tqdm(total=len(owner), desc="pre-flight: student", disable=not progress, dynamic_ncols=True)
    teacher: dict[str, tuple[list[int], list[float]]] = {}
    coverage: dict[str, dict[str, float]] = {}
    # A sample whose teacher prompt is identical in two contexts (in `both`, its demonstration-only or
    # feedback-only prompt) reuses the first answer: each context's estimate is still unbiased, at about a
    # third less sampling.
    answers: dict[tuple[int, tuple[int, ...]], tuple[list[int], str]] = {}
    try:
        model.eval()
        with sampling.private_rng(seed, sampling.model_device(model)):
            ids, texts = run(student_ids, bar)
            scores, feedback = scored(list(range(len(owner))), ids, texts)
            for name in CONTEXTS:
                cfg, visible = context_inputs(name, config, scores)
                prompt_ids, coverage[name] = teacher_prompt_ids(
                    prompts, keys, visible, texts, feedback, cfg, codec, seed
                )
                active = [i for i, p in enumerate(prompt_ids) if p is not None]
                todo = [i for i in active if (i, tuple(prompt_ids[i])) not in answers]
                bar.set_description(f"pre-flight: teacher ({name})")
                bar.total += len(todo)
                bar.refresh()
                new_ids, new_texts = run([prompt_ids[i] for i in todo], bar) if todo else ([], [])
                answers.update({(i, tuple(prompt_ids[i])): a for i, a in zip(todo, zip(new_ids, new_texts))})
                t_ids, t_texts = [[answers[i, tuple(prompt_ids[i])][k] for i in active] for k in (0, 1)]
                teacher[name] = (active, scored(active, t_ids, t_texts)[0] if active else [])
    finally:
        model.train(was_training)
        bar.close()

    threshold = config.success_reward_threshold
    student = context_stats("student", owner, list(range(len(owner))), scores, None, threshold, seed)
    contexts: dict[str, ContextStats] = {}
    for name, (active, t_scores) in teacher.items():
        contexts[name] = context_stats(name, owner, active, t_scores, scores, threshold, seed)
    both = coverage["both"]
    report = PreflightReport(
        settings={
            "num_prompts": len(rows),
            "num_generations": num_generations,
            "temperature": temperature,
            "max_completion_length": max_completion_length,
            "seed": seed,
            "success_reward_threshold": threshold,
            "reward_funcs": [sampling.reward_name(f) for f in funcs],
            "reward_weights": weights,
        },
        student=student,
        contexts=contexts,
        coverage={
            "success_group_fraction": both["self_distillation/success_group_fraction"],
            "demonstration_sample_fraction": both["self_distillation/success_sample_fraction"],
            "feedback_available_fraction": both["self_distillation/feedback_available_fraction"],
            "teacher_sample_fraction": both["self_distillation/reprompt_sample_fraction"],
        },
        thinking_model="think" in str(getattr(tokenizer, "chat_template", "") or ""),
    )
    report.recommendations = recommend(report)
    return report
