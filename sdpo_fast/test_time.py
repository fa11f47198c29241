"""Test-time self-distillation: spend a fixed attempt budget on one hard question (the SDPO paper, arXiv 2601.20802, on test-time self-distillation).

    from sdpo_fast import test_time_self_distill

    result = test_time_self_distill(model, tokenizer, prompt, reward_fn, mode="reprompt", budget=64)
    result.first_success, result.discovery_at_k, result.attempts

The modes share one interface and one result:

- `reprompt` (no training, any model): rounds of `num_candidates` samples. After each round the best
  demonstration-worthy attempt so far (score ≥ `SDPOConfig.success_reward_threshold`), or else the
  latest feedback, goes into the next round's prompt with the training templates, rules and
  truncation (`sdpo_fast.reprompting`). The model thus answers from the self-teacher's context.
- `train` (test-time SDPO, as in the paper): `SDPOTrainer` on a dataset holding only this question.
  The EMA teacher sees demonstrations/feedback exactly as in training; the student, which keeps
  sampling from the plain question, is distilled towards it. Optional LoRA (`peft_config`).
- `best_of_k` (the baseline): independent samples from the plain question.

Every scored completion is one attempt. A run stops at the first attempt scoring ≥
`success_threshold` or when `budget` attempts are spent, and never scores more than `budget`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import inspect
import logging
import math
import numbers
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import GenerationConfig, TrainerCallback

from .config import SDPOConfig
from .reprompting import Prompt, PromptCodec, Reprompt, build_teacher_contexts, question_text, tokenize_reprompt
from .rewards import normalise_reward_output

logger = logging.getLogger(__name__)

MODES = ("reprompt", "train", "best_of_k")
PLAIN = "question"  # the context label of an attempt sampled from the unchanged question
_UNSCORED_WARNING = "All reward functions returned None"


class RewardFunctionError(RuntimeError):
    """The reward function raised; the message names it and the attempts it was scoring."""


@dataclass
class Attempt:
    """One scored completion."""

    index: int
    """1-based position in the attempt sequence (the k of discovery@k)."""
    round: int
    """1-based generation round (one batch of candidates, or one trainer generation batch)."""
    text: str
    score: float | None
    """None when the reward function returned None ("not applicable"): never a success."""
    feedback: str | None
    success: bool
    context: str = PLAIN
    """What the prompt held besides the question: `question` (nothing), `demonstration`, `feedback`
    or `demonstration+feedback`. Train-mode attempts are always sampled from the plain question."""

    @property
    def reprompted(self) -> bool:
        """Whether this attempt was generated from a demonstration/feedback reprompt."""
        return self.context != PLAIN


@dataclass
class SelfDistillationResult:
    """The history of a test-time run and what it found."""

    mode: str
    budget: int
    success_threshold: float
    attempts: list[Attempt] = field(default_factory=list)
    round_inputs: list[str] = field(default_factory=list)
    """Sampling modes: the exact model input of each round, decoded with its special tokens."""
    interrupted: bool = False
    """True when Ctrl-C (KeyboardInterrupt) ended the run; the history up to then is kept."""
    stop_reason: str = ""
    """`success`, `budget`, `interrupted` or `max_steps` (train mode with a user-set `max_steps`)."""
    model: Any = field(default=None, repr=False)
    """The policy that was sampled (train mode: the trained model, a PEFT model with `peft_config`)."""

    @property
    def first_success(self) -> Attempt | None:
        """The first attempt scoring ≥ `success_threshold`, or None."""
        return next((a for a in self.attempts if a.success), None)

    @property
    def discovery_at_k(self) -> int | None:
        """Attempts until the first success (its 1-based index), or None if none succeeded."""
        first = self.first_success
        return None if first is None else first.index

    @property
    def attempts_used(self) -> int:
        """Attempts scored, including the rest of the round in which the first success came."""
        return len(self.attempts)

    @property
    def rounds(self) -> int:
        """Generation rounds that produced scored attempts."""
        return self.attempts[-1].round if self.attempts else 0

    @property
    def best(self) -> Attempt | None:
        """The highest-scoring attempt (the earliest on ties), or None."""
        scored = [a for a in self.attempts if a.score is not None]
        return max(scored, key=lambda a: a.score) if scored else None

    def summary(self) -> str:
        """A one-line description of the outcome."""
        found = f"solved at attempt {self.discovery_at_k}" if self.first_success else "not solved"
        return f"{self.mode}: {found}; {self.attempts_used}/{self.budget} attempts in {self.rounds} rounds ({self.stop_reason})"


# ---------------------------------------------------------------------------------------------- the entry point


def test_time_self_distill(
    model: Any,
    processing_class: Any,
    prompt: Prompt,
    reward_fn: Callable[..., Any],
    *,
    mode: str = "reprompt",
    budget: int = 64,
    num_candidates: int = 8,
    success_threshold: float = 1.0,
    max_new_tokens: int = 512,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    generation_kwargs: dict[str, Any] | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
    sdpo_config: SDPOConfig | None = None,
    feedback_history: int | None = 1,
    reward_kwargs: dict[str, Any] | None = None,
    peft_config: Any = None,
    trainer_args: dict[str, Any] | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    on_round: Callable[[SelfDistillationResult, list[Attempt]], None] | None = None,
    seed: int = 0,
) -> SelfDistillationResult:
    """Spend at most `budget` attempts on one question; stop at the first success.

    Args:
        model: a causal LM instance or a model name/path (loaded with transformers). Train mode
            updates an instance in place (LoRA: injects adapters into it); pass a copy to keep it.
        processing_class: its tokenizer; None loads it from the model name.
        prompt: the question, as text or as a chat ending in a user turn (TRL's two prompt forms).
        reward_fn: a TRL reward function `f(prompts, completions, completion_ids, **columns)` returning
            one float, None or `{"score", "feedback"}` per completion. It always sees the original prompt.
        mode: `reprompt`, `train` or `best_of_k` (see the module docstring).
        budget: the most attempts (scored completions) to spend.
        num_candidates: completions per round (train mode: `num_generations`, at least 2). The last
            sampling round is cut to what is left of the budget.
        success_threshold: an attempt scoring ≥ this solves the question and stops the run. Scores
            ≥ `sdpo_config.success_reward_threshold` but below it are demonstration-worthy.
        max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty, generation_kwargs:
            sampling settings, the same in every mode (as TRL's `GRPOConfig` fields).
        chat_template_kwargs: e.g. `{"enable_thinking": False}`.
        sdpo_config: templates, demonstration/feedback rules, truncation and (train mode) the loss.
        feedback_history: reprompt mode: how many rounds' feedback to show, newest last; None shows
            all of it (the paper's multi-turn baseline). One feedback per round: the best-scoring one.
        reward_kwargs: extra columns for the reward function, one value for the question (e.g. the tests).
        peft_config: train mode: a PEFT config (e.g. `peft.LoraConfig`); the teacher is a snapshot of the adapter.
        trainer_args: train mode: `GRPOConfig` fields overriding the defaults chosen here.
        callbacks: train mode: extra `TrainerCallback`s.
        on_round: called after each scored round with the result so far and the round's attempts.
        seed: seeds sampling (and training).

    Returns:
        A `SelfDistillationResult`. Ctrl-C ends the run cleanly: the result has `interrupted=True`.
    """
    config = sdpo_config if sdpo_config is not None else SDPOConfig()
    _check_inputs(mode, prompt, reward_fn, budget, num_candidates, success_threshold, config, feedback_history)
    _check_reward_kwargs(reward_kwargs)
    result = SelfDistillationResult(mode, budget, float(success_threshold))
    scorer = _Scorer(reward_fn, result, on_round)
    run = _Run(
        prompt=prompt,
        num_candidates=num_candidates,
        generation=_Sampling(
            max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty, dict(generation_kwargs or {})
        ),
        template_kwargs=dict(chat_template_kwargs or {}),
        config=config,
        columns=dict(reward_kwargs or {}),
        feedback_history=feedback_history,
        seed=seed,
        peft_config=peft_config,
        trainer_args=dict(trainer_args or {}),
        callbacks=list(callbacks),
    )
    try:
        if mode == "train":
            _run_training(model, processing_class, scorer, run)
        else:
            model, tokenizer = _load(model, processing_class)
            result.model = model
            _SamplingLoop(model, tokenizer, scorer, run).run()
    except KeyboardInterrupt:
        result.interrupted = True
        logger.warning("Interrupted after %d attempt(s); returning the history so far.", result.attempts_used)
    result.stop_reason = _stop_reason(result)
    logger.info("%s", result.summary())
    return result


# The name starts with "test": keep pytest from collecting it from test modules that import it.
test_time_self_distill.__test__ = False  # type: ignore[attr-defined]


def _stop_reason(result: SelfDistillationResult) -> str:
    if result.first_success is not None:
        return "success"
    if result.interrupted:
        return "interrupted"
    return "budget" if result.attempts_used >= result.budget else "max_steps"


def _check_inputs(mode, prompt, reward_fn, budget, num_candidates, threshold, config, feedback_history) -> None:
    """Fail before any generation, with the fix."""
    if mode not in MODES:
        raise ValueError(f"Unknown mode={mode!r}. Choose one of: {', '.join(repr(m) for m in MODES)}.")
    if not _is_positive_int(budget):
        raise ValueError(f"budget must be a positive number of attempts, got {budget!r}.")
    if not _is_positive_int(num_candidates) or (mode == "train" and num_candidates < 2):
        least = 2 if mode == "train" else 1
        raise ValueError(
            f"num_candidates must be an int ≥ {least} in mode={mode!r}, got {num_candidates!r}"
            + (" (GRPO needs at least 2 generations per prompt)." if mode == "train" else ".")
        )
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not math.isfinite(threshold):
        raise ValueError(f"success_threshold must be a finite number, got {threshold!r}.")
    if not callable(reward_fn):
        raise TypeError(f"reward_fn must be callable, got {type(reward_fn).__name__}.")
    if not isinstance(config, SDPOConfig):
        raise TypeError(f"sdpo_config must be an SDPOConfig, got {type(config).__name__}.")
    if feedback_history is not None and not _is_positive_int(feedback_history):
        raise ValueError(f"feedback_history must be a positive int or None (all feedback), got {feedback_history!r}.")
    _check_prompt(prompt)


# The names a TRL reward function already receives (TRL 1.x's `_calculate_rewards`), plus the dataset's `prompt` and
# `completion` columns: a reward_kwargs entry of the same name would clash with them or replace the question.
RESERVED_REWARD_KWARGS = (
    "prompt",
    "prompts",
    "completion",
    "completions",
    "completion_ids",
    "trainer_state",
    "log_extra",
    "log_metric",
    "environments",
)


def _check_reward_kwargs(reward_kwargs: Any) -> None:
    if reward_kwargs is None:
        return
    if not isinstance(reward_kwargs, Mapping):
        raise TypeError(f"reward_kwargs must be a dict of column name → value, got {type(reward_kwargs).__name__}.")
    not_names = [key for key in reward_kwargs if not isinstance(key, str) or not key.isidentifier()]
    if not_names:
        raise TypeError(f"reward_kwargs keys must be keyword-argument names, got {not_names!r}.")
    reserved = [key for key in reward_kwargs if key in RESERVED_REWARD_KWARGS]
    if reserved:
        raise ValueError(
            f"reward_kwargs uses the reserved name(s) {reserved!r}: the reward function already receives "
            f"{', '.join(RESERVED_REWARD_KWARGS)} (the question is the `prompt` argument). Rename the key(s)."
        )


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_prompt(prompt: Any) -> None:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("prompt is empty.")
        return
    if not isinstance(prompt, list) or not all(isinstance(m, dict) for m in prompt):
        raise TypeError(
            f"prompt must be a string or a list of chat messages (dicts with 'role' and 'content'), got "
            f"{type(prompt).__name__}."
        )
    question_text(prompt)  # raises if the chat does not end in a user turn


def _load(model: Any, processing_class: Any) -> tuple[Any, Any]:
    """A model instance and its tokenizer (the tokenizer inside a processor)."""
    if isinstance(model, str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        name = model
        model = AutoModelForCausalLM.from_pretrained(name, dtype="auto")
        if torch.cuda.is_available():
            model = model.to("cuda")
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(name)
    if processing_class is None:
        raise ValueError("processing_class is required when model is an instance: pass its tokenizer.")
    return model, getattr(processing_class, "tokenizer", processing_class)


# ---------------------------------------------------------------------------------------------- scoring


def _function_name(func: Callable) -> str:
    while isinstance(func, functools.partial):
        func = func.func
    return getattr(func, "__name__", type(func).__name__)


def _await(awaitable: Any) -> Any:
    """Run an async reward function's result to completion, also from inside a running loop (notebooks)."""

    async def wrapper():
        return await awaitable

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(wrapper())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, wrapper()).result()


class _Scorer:
    """Calls the reward function on one round, validates its output and records the attempts."""

    def __init__(self, reward_fn: Callable, result: SelfDistillationResult, on_round: Callable | None):
        self.reward_fn = reward_fn
        self.name = _function_name(reward_fn)
        self.result = result
        self.on_round = on_round

    @property
    def remaining(self) -> int:
        return self.result.budget - self.result.attempts_used

    @property
    def done(self) -> bool:
        return self.remaining <= 0 or self.result.first_success is not None

    def score(self, texts: list[str], context: str, **reward_inputs: Any) -> tuple[list[float | None], list]:
        """Score one round. `reward_inputs` holds prompts, completions, completion_ids and the columns."""
        n, start, round_ = len(texts), self.result.attempts_used + 1, self.result.rounds + 1
        try:
            output = self.reward_fn(**reward_inputs)
            if inspect.isawaitable(output):
                output = _await(output)
        except Exception as err:
            raise RewardFunctionError(
                f"Reward function {self.name!r} raised {type(err).__name__}: {err} while scoring attempts "
                f"{start}–{start + n - 1} (round {round_})."
            ) from err
        scores, feedback = normalise_reward_output(output, self.name, n)
        feedback = feedback if feedback is not None else [None] * n
        threshold = self.result.success_threshold
        new = [
            Attempt(start + i, round_, text, s, fb, s is not None and s >= threshold, context)
            for i, (text, s, fb) in enumerate(zip(texts, scores, feedback))
        ]
        self.result.attempts.extend(new)
        self._report(new)
        return scores, feedback

    def _report(self, new: list[Attempt]) -> None:
        best = max((a.score for a in new if a.score is not None), default=None)
        logger.info(
            "round %d (%s): %d attempt(s), %d/%d used, best score %s%s",
            new[0].round,
            new[0].context,
            len(new),
            self.result.attempts_used,
            self.result.budget,
            "n/a" if best is None else f"{best:.4g}",
            f", solved at attempt {self.result.discovery_at_k}" if self.result.first_success else "",
        )
        if self.on_round is not None:
            self.on_round(self.result, new)


# ---------------------------------------------------------------------------------------------- sampling modes


@dataclass
class _Sampling:
    """Generation settings shared by every mode (named as in `GRPOConfig`)."""

    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float | None
    repetition_penalty: float
    extra: dict[str, Any]

    def grpo_fields(self) -> dict[str, Any]:
        return {
            "max_completion_length": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "generation_kwargs": self.extra or None,
        }


@dataclass
class _Run:
    """Everything a run needs besides the model and the scorer."""

    prompt: Prompt
    num_candidates: int
    generation: _Sampling
    template_kwargs: dict[str, Any]
    config: SDPOConfig
    columns: dict[str, Any]
    feedback_history: int | None
    seed: int
    peft_config: Any
    trainer_args: dict[str, Any]
    callbacks: list[TrainerCallback]


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every eos id the model declares (e.g. an end-of-turn token) plus the tokenizer's, as in training."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.insert(0, tokenizer.eos_token_id)
    return ids


@contextlib.contextmanager
def _generation_mode(model: Any, config: GenerationConfig) -> Iterator[None]:
    """Eval mode and our generation config as the model's own, so its defaults cannot override ours."""
    was_training, previous = model.training, model.generation_config
    model.eval()
    model.generation_config = config
    try:
        yield
    finally:
        model.generation_config = previous
        model.train(was_training)


def _generation_config(generation: _Sampling, tokenizer: Any, eos_ids: list[int]) -> GenerationConfig:
    """Sampling exactly as TRL's transformers path samples during training."""
    return GenerationConfig(
        max_new_tokens=generation.max_new_tokens,
        do_sample=True,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_ids,
        temperature=generation.temperature,
        top_p=generation.top_p,
        top_k=generation.top_k,
        min_p=generation.min_p,
        repetition_penalty=generation.repetition_penalty,
        **generation.extra,
    )


def _cut_at_eos(row: list[int], eos_ids: list[int]) -> list[int]:
    """The completion up to and including its first eos token (TRL's completion_ids)."""
    for i, token in enumerate(row):
        if token in eos_ids:
            return row[: i + 1]
    return row


def _demonstration(attempts: list[Attempt], threshold: float) -> Attempt | None:
    """The best demonstration-worthy attempt so far (the earliest on ties)."""
    worthy = [a for a in attempts if a.score is not None and a.score >= threshold]
    return max(worthy, key=lambda a: a.score) if worthy else None


def _feedback_trail(attempts: list[Attempt], history: int | None) -> str | None:
    """Per round, the feedback of its best-scoring attempt that has some; the last `history` rounds, joined."""
    by_round: dict[int, Attempt] = {}
    for a in attempts:
        if a.feedback is None or not a.feedback.strip():
            continue
        held = by_round.get(a.round)
        if held is None or _rank(a) > _rank(held):
            by_round[a.round] = a
    texts = [by_round[r].feedback for r in sorted(by_round)]
    texts = texts if history is None else texts[-history:]
    return "\n\n".join(texts) if texts else None


def _rank(attempt: Attempt) -> float:
    return -math.inf if attempt.score is None else attempt.score


def _next_reprompt(prompt: Prompt, demonstration: Attempt | None, feedback: str | None, config: SDPOConfig) -> Reprompt:
    """The next round's prompt, built by the training code path.

    A two-sample batch of one group: the demonstration (if any) first, then a failed attempt that
    carries `feedback`. The second sample's teacher context is the next prompt, so the
    demonstration, thinking removal and feedback-only-without-solution rules are training's.
    """
    demo_score = math.nan if demonstration is None else demonstration.score
    demo_text = "" if demonstration is None else demonstration.text
    contexts = build_teacher_contexts(
        [prompt, prompt], ["question", "question"], [demo_score, math.nan], [demo_text, ""], [None, feedback], config
    )
    return contexts.reprompts[1]


def _context_label(reprompt: Reprompt) -> str:
    parts = [
        name for name, value in (("demonstration", reprompt.demonstration), ("feedback", reprompt.feedback)) if value
    ]
    return "+".join(parts) or PLAIN


class _SamplingLoop:
    """`reprompt` and `best_of_k`: rounds of sampling and scoring until success or the budget."""

    def __init__(self, model: Any, tokenizer: Any, scorer: _Scorer, run: _Run):
        self.model, self.tokenizer, self.scorer, self.run_spec = model, tokenizer, scorer, run
        self.prompt, self.config = run.prompt, run.config
        self.codec = PromptCodec(tokenizer, run.template_kwargs)
        self.plain_ids = self.codec.encode_prompt(run.prompt)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.generation_config = _generation_config(run.generation, tokenizer, self.eos_ids)

    def run(self) -> None:
        from transformers import set_seed

        spec, result = self.run_spec, self.scorer.result
        set_seed(spec.seed)
        while not self.scorer.done:
            ids, context = self._round_prompt(spec.feedback_history)
            result.round_inputs.append(self.tokenizer.decode(ids))
            n = min(spec.num_candidates, self.scorer.remaining)
            completion_ids = self._sample(ids, n)
            texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
            chat = not isinstance(self.prompt, str)
            self.scorer.score(
                texts,
                context,
                prompts=[self.prompt] * n,
                completions=[[{"role": "assistant", "content": t}] for t in texts] if chat else texts,
                completion_ids=completion_ids,
                **{key: [value] * n for key, value in spec.columns.items()},
            )

    def _round_prompt(self, feedback_history: int | None) -> tuple[list[int], str]:
        """Token ids for the next round and what they hold besides the question."""
        result = self.scorer.result
        if result.mode == "best_of_k" or not result.attempts:
            return self.plain_ids, PLAIN
        demo = _demonstration(result.attempts, self.config.success_reward_threshold)
        reprompt = _next_reprompt(self.prompt, demo, _feedback_trail(result.attempts, feedback_history), self.config)
        if not reprompt.active:
            return self.plain_ids, PLAIN
        tokens = tokenize_reprompt(
            reprompt, self.codec, max_len=self.config.max_reprompt_len, truncation=self.config.reprompt_truncation
        )
        if tokens.overflow:
            logger.warning(
                "The reprompt does not fit max_reprompt_len=%d even with the demonstration/feedback trimmed; "
                "sampling from the plain question this round. Raise SDPOConfig.max_reprompt_len.",
                self.config.max_reprompt_len,
            )
            return self.plain_ids, PLAIN
        return tokens.ids, _context_label(reprompt)

    @torch.no_grad()
    def _sample(self, prompt_ids: list[int], n: int) -> list[list[int]]:
        ids = torch.tensor([prompt_ids] * n, dtype=torch.long, device=self.model.device)
        with _generation_mode(self.model, self.generation_config):
            out = self.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=self.generation_config
            )
        return [_cut_at_eos(row, self.eos_ids) for row in out[:, len(prompt_ids) :].tolist()]


# ---------------------------------------------------------------------------------------------- train mode


def _completion_text(completion: Any) -> str:
    """A TRL completion as text: the string itself, or the content of its assistant messages."""
    if isinstance(completion, str):
        return completion
    return "".join(str(m.get("content") or "") for m in completion if m.get("role", "assistant") == "assistant")


def _recording_reward(scorer: _Scorer, user_columns: dict[str, Any]) -> Callable[..., list]:
    """The reward function the trainer calls: scores at most the rest of the budget and records every attempt.

    Completions beyond the budget (a last generation batch larger than what is left) are not shown to
    the reward function; they get None ("not applicable"), and training stops after that step anyway.
    `user_columns` (the caller's `reward_kwargs`) are passed as the very objects given, one per completion,
    never through the dataset: Arrow would unify their types (ints to floats, missing dict keys to None).
    """

    def reward(prompts, completions, completion_ids, **kwargs):
        n = len(completions)
        k = min(n, scorer.remaining)
        if k <= 0:
            return [None] * n
        columns = {
            key: value[:k] if isinstance(value, list) and len(value) == n else value for key, value in kwargs.items()
        }
        columns.update({key: [value] * k for key, value in user_columns.items()})
        scores, feedback = scorer.score(
            [_completion_text(c) for c in completions[:k]],
            PLAIN,
            prompts=prompts[:k],
            completions=completions[:k],
            completion_ids=completion_ids[:k],
            **columns,
        )
        return [{"score": s, "feedback": fb} for s, fb in zip(scores, feedback)] + [None] * (n - k)

    reward.__name__ = scorer.name
    return reward


class _StopCallback(TrainerCallback):
    """Ends training after the optimizer step in which the question was solved or the budget ran out."""

    def __init__(self, scorer: _Scorer):
        self.scorer = scorer

    def on_step_end(self, args, state, control, **kwargs):
        if self.scorer.done:
            control.should_training_stop = True
        return control


class _DropUnscoredWarning(logging.Filter):
    """TRL warns when every reward is None; for our deliberately unscored over-budget completions that is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _UNSCORED_WARNING not in record.getMessage()


def _grpo_args(run: _Run):
    from trl import GRPOConfig

    cuda = torch.cuda.is_available()
    fields: dict[str, Any] = {
        "per_device_train_batch_size": run.num_candidates,
        "num_generations": run.num_candidates,
        "gradient_accumulation_steps": 1,
        "beta": 0.0,  # SDPO's teacher replaces the KL reference
        "logging_steps": 1,
        "report_to": [],
        "save_strategy": "no",
        "use_cpu": not cuda,
        "bf16": cuda and torch.cuda.is_bf16_supported(),
        "seed": run.seed,
        "chat_template_kwargs": run.template_kwargs or None,
        **run.generation.grpo_fields(),
    }
    fields.update(run.trainer_args)
    return GRPOConfig(**fields)


def _run_training(model: Any, processing_class: Any, scorer: _Scorer, run: _Run) -> None:
    """Test-time SDPO: `SDPOTrainer` on the one question, stopped at success or the budget."""
    from datasets import Dataset

    from .trainer import SDPOTrainer

    overrides = run.trainer_args
    scratch = None if "output_dir" in overrides else tempfile.mkdtemp(prefix="sdpo-test-time-")
    if scratch is not None:
        overrides["output_dir"] = scratch
    try:
        args = _grpo_args(run)
        rounds = math.ceil(scorer.result.budget / args.generation_batch_size)
        if "max_steps" not in overrides:  # an upper bound: the stop callback ends the run at the budget
            args.max_steps = rounds * args.steps_per_generation * args.num_iterations
        rows = rounds * max(args.generation_batch_size // args.num_generations, 1)
        trainer = SDPOTrainer(
            model,
            _recording_reward(scorer, run.columns),
            args=args,
            sdpo_config=run.config,
            train_dataset=Dataset.from_dict({"prompt": [run.prompt] * rows}),
            processing_class=processing_class,
            peft_config=run.peft_config,
            callbacks=[_StopCallback(scorer), *run.callbacks],
        )
        scorer.result.model = trainer.model
        _train_quietly(trainer)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _train_quietly(trainer: Any) -> None:
    trl_logger = logging.getLogger("trl.trainer.grpo_trainer")
    quiet = _DropUnscoredWarning()
    trl_logger.addFilter(quiet)
    try:
        trainer.train()
    finally:
        trl_logger.removeFilter(quiet)
        trainer.model.eval()
