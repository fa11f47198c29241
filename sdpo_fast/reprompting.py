"""Reprompting: turn a group of rollouts into self-teacher contexts (the SDPO paper, arXiv 2601.20802, §3).

For each rollout i the teacher sees the *same* conversation with its last user turn replaced by

    {question}{solution section}{feedback section}\\n\\nCorrectly solve the original question.

where the solution section holds a successful sibling of the same prompt group (the first, as in the
reference, or as `demonstration_policy` chooses) and the
feedback section holds the environment's feedback on i's own attempt. A rollout with neither gets
the unchanged question and `self_distillation_mask = 0`: it contributes no loss.

Everything here works on plain Python lists in *global batch order* (all processes gathered), so
demonstration choice does not depend on how a group was split across ranks.
"""

from __future__ import annotations

import functools
import json
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import SDPOConfig
from .text import clean_text

THINK_PATTERN = re.compile(r"<think>.*?</think>\s*", re.DOTALL)
TRUNCATION_MARKER = " … "
# Below this many tokens of room for the demonstration/feedback, middle truncation gives up and masks the sample.
MIN_PAYLOAD_TOKENS = 8

Prompt = str | list[dict[str, Any]]


def remove_thinking(text: str) -> str:
    """Delete every `<think>…</think>` block and the whitespace after it (non-greedy, DOTALL).

    An unclosed `<think>` is left as it is, as in the reference.
    """
    return THINK_PATTERN.sub("", text)


def group_key(prompt: Prompt, uid: Any = None, row: int | None = None) -> str:
    """The rollout-group key: the dataset's `uid` if given, else the dataset row the sample was generated from
    (GRPO's group, and the reference's `uid`), else, when the caller knows no rows, the prompt itself."""
    if uid is not None:
        return f"uid:{uid!r}"
    if row is not None:
        return f"row:{row}"
    if isinstance(prompt, str):
        return "text:" + prompt
    return "chat:" + json.dumps(prompt, sort_keys=True, default=str)


DEMONSTRATION_POLICIES = ("first", "random", "shortest", "longest")


def select_demonstrations(
    group_keys: Sequence[str],
    scores: Sequence[float],
    completions: Sequence[str],
    *,
    success_reward_threshold: float,
    dont_reprompt_on_self_success: bool = True,
    remove_thinking_from_demonstration: bool = True,
    policy: str | Callable[[list[str]], int] = "first",
    accept: Callable[[str], bool] | None = None,
    seed: int = 0,
) -> list[str | None]:
    """For each sample, one successful sibling's completion text, or None.

    A success is a score ≥ the threshold (NaN never succeeds); `accept`, if given, must also approve its text
    (e.g. reject a completion with several answer blocks). With `dont_reprompt_on_self_success` a sample never
    gets itself, so a lone success in its group gets no demonstration. Among the candidates (in batch order)
    `policy` picks: `first` (the reference), `random` (seeded by `seed` and the sample index, so every process
    picks alike), `shortest` / `longest` (by characters, ties to the first), or a callable that takes the
    candidates' texts and returns an index into them.
    """
    if not len(group_keys) == len(scores) == len(completions):
        raise ValueError(
            f"group_keys, scores and completions must have equal lengths, got {len(group_keys)}, {len(scores)} "
            f"and {len(completions)}."
        )
    successes: dict[str, list[int]] = {}
    for i, (key, score) in enumerate(zip(group_keys, scores)):
        if not math.isnan(score) and score >= success_reward_threshold and (accept is None or accept(completions[i])):
            successes.setdefault(key, []).append(i)
    demos: list[str | None] = []
    for i, key in enumerate(group_keys):
        candidates = [j for j in successes.get(key, []) if not (dont_reprompt_on_self_success and j == i)]
        if not candidates:
            demos.append(None)
            continue
        text = completions[candidates[_pick(policy, [completions[j] for j in candidates], seed, i)]]
        demos.append(remove_thinking(text) if remove_thinking_from_demonstration else text)
    return demos


def _pick(policy: str | Callable[[list[str]], int], texts: list[str], seed: int, sample: int) -> int:
    if callable(policy):
        index = policy(texts)
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(texts):
            raise ValueError(
                f"demonstration_policy {getattr(policy, '__name__', policy)!r} returned {index!r}; it must return "
                f"the index (an int in [0, {len(texts)})) of the chosen candidate."
            )
        return index
    if policy == "first":
        return 0
    if policy == "random":
        return random.Random(seed * 1_000_003 + sample).randrange(len(texts))
    lengths = [len(t) for t in texts]
    return lengths.index(min(lengths) if policy == "shortest" else max(lengths))


def usable_feedback(feedback: Sequence[str | None], include_environment_feedback: bool) -> list[str | None]:
    """Keep feedback only if enabled and a non-empty, non-whitespace string."""
    if not include_environment_feedback:
        return [None] * len(feedback)
    return [f if isinstance(f, str) and f.strip() else None for f in feedback]


def question_text(prompt: Prompt) -> str:
    """The text that fills `{prompt}`: a plain prompt itself, or the content of the last (user) turn."""
    if isinstance(prompt, str):
        return prompt
    if not prompt:
        raise ValueError("A conversational prompt must contain at least one message.")
    last = prompt[-1]
    if last.get("role") != "user":
        raise ValueError(
            f"The last message of a conversational prompt must be a user turn, got role={last.get('role')!r}. "
            "SDPO rewrites the last user turn for the teacher; end each prompt with the user's question "
            "(TRL adds the assistant generation prompt itself)."
        )
    content = last.get("content", "")
    if isinstance(content, list):  # multimodal content blocks: keep the text parts
        return " ".join(part.get("text", "") for part in content if part.get("type") == "text")
    return content


def teacher_prompt(prompt: Prompt, content: str) -> Prompt:
    """The teacher's prompt: the same conversation with only the last user turn's content replaced."""
    if isinstance(prompt, str):
        return content
    question_text(prompt)  # validates the last turn
    return [*prompt[:-1], {**prompt[-1], "content": content}]


@dataclass
class Reprompt:
    """One sample's teacher context, kept in parts so that middle truncation can trim the payload."""

    prompt: Prompt
    question: str
    demonstration: str | None
    feedback: str | None
    config: SDPOConfig = field(repr=False)

    def __post_init__(self) -> None:
        # The untrusted parts as valid text, however the Reprompt was built (the trainer, test-time training, a user).
        self.demonstration = None if self.demonstration is None else clean_text(self.demonstration)
        self.feedback = None if self.feedback is None else clean_text(self.feedback)

    @property
    def active(self) -> bool:
        """Whether the sample has a teacher signal (`self_distillation_mask`)."""
        return self.demonstration is not None or self.feedback is not None

    def content(self, demonstration: str | None = None, feedback: str | None = None) -> str:
        """The teacher user turn, optionally with shortened demonstration/feedback text."""
        if not self.active:
            return self.question
        demo = self.demonstration if demonstration is None else demonstration
        fb = self.feedback if feedback is None else feedback
        solution = (
            "" if self.demonstration is None else self.config.solution_template.format(successful_previous_attempt=demo)
        )
        feedback_section = "" if self.feedback is None else self.config.feedback_template.format(feedback_raw=fb)
        return self.config.reprompt_template.format(prompt=self.question, solution=solution, feedback=feedback_section)

    def render(self, demonstration: str | None = None, feedback: str | None = None) -> Prompt:
        return teacher_prompt(self.prompt, self.content(demonstration, feedback))

    def payload(self, demonstration: str | None = None, feedback: str | None = None) -> dict[str, str]:
        """The untrusted texts that `render` puts into the prompt: the demonstration and the feedback in use."""
        texts = {}
        if self.demonstration is not None:
            texts["demonstration"] = self.demonstration if demonstration is None else demonstration
        if self.feedback is not None:
            texts["feedback"] = self.feedback if feedback is None else feedback
        return texts


@dataclass
class TeacherContexts:
    """Reprompts for a batch plus the reference's `self_distillation/*` metrics."""

    reprompts: list[Reprompt]
    metrics: dict[str, float]

    @property
    def mask(self) -> list[float]:
        return [1.0 if r.active else 0.0 for r in self.reprompts]


def build_teacher_contexts(
    prompts: Sequence[Prompt],
    group_keys: Sequence[str],
    scores: Sequence[float],
    completions: Sequence[str],
    feedback: Sequence[str | None],
    config: SDPOConfig,
    *,
    seed: int = 0,
) -> TeacherContexts:
    """Apply demonstration selection, the feedback rules and the templates to a (global) batch."""
    n = len(prompts)
    if not n == len(group_keys) == len(scores) == len(completions) == len(feedback):
        raise ValueError("prompts, group_keys, scores, completions and feedback must all have the same length.")
    demos = select_demonstrations(
        group_keys,
        scores,
        completions,
        success_reward_threshold=config.success_reward_threshold,
        dont_reprompt_on_self_success=config.dont_reprompt_on_self_success,
        remove_thinking_from_demonstration=config.remove_thinking_from_demonstration,
        policy=config.demonstration_policy,
        accept=config.demonstration_filter,
        seed=seed,
    )
    available = usable_feedback(feedback, config.include_environment_feedback)
    reprompts = []
    used_count = 0
    for prompt, demo, fb in zip(prompts, demos, available):
        use_fb = fb is not None and (not config.environment_feedback_only_without_solution or demo is None)
        used_count += use_fb
        reprompts.append(Reprompt(prompt, question_text(prompt), demo, fb if use_fb else None, config))
    succeeded = {k for k, s in zip(group_keys, scores) if not math.isnan(s) and s >= config.success_reward_threshold}
    metrics = {
        "self_distillation/success_group_fraction": len(succeeded) / max(len(set(group_keys)), 1),
        "self_distillation/success_sample_fraction": sum(d is not None for d in demos) / max(n, 1),
        "self_distillation/feedback_available_fraction": sum(f is not None for f in available) / max(n, 1),
        "self_distillation/feedback_used_fraction": used_count / max(n, 1),
        "self_distillation/reprompt_sample_fraction": sum(r.active for r in reprompts) / max(n, 1),
    }
    return TeacherContexts(reprompts, metrics)


# ---------------------------------------------------------------------------------------------- tokenisation


@dataclass
class PromptCodec:
    """Tokenises teacher prompts exactly as TRL tokenises the student's.

    Conversational prompts go through the chat template with `add_generation_prompt=True` and the
    trainer's `chat_template_kwargs` (e.g. `enable_thinking`); plain-text prompts through the
    tokenizer itself, with its default special tokens.
    """

    tokenizer: Any
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None
    tools: list[Any] | None = None

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt)["input_ids"])
        self._check_template()
        out = self.tokenizer.apply_chat_template(
            prompt,
            tools=self.tools or None,
            chat_template=self.chat_template,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            **self.chat_template_kwargs,
        )
        return list(out["input_ids"])

    def render_text(self, prompt: Prompt) -> str:
        """The prompt as the text that `encode_prompt` tokenises (the chat template applied, not tokenised)."""
        if isinstance(prompt, str):
            return prompt
        self._check_template()
        return self.tokenizer.apply_chat_template(
            prompt,
            tools=self.tools or None,
            chat_template=self.chat_template,
            add_generation_prompt=True,
            tokenize=False,
            **self.chat_template_kwargs,
        )

    def encode_reprompt(
        self, reprompt: Reprompt, demonstration: str | None = None, feedback: str | None = None
    ) -> list[int]:
        """Token ids of the teacher prompt, with the demonstration and the feedback tokenised as plain text.

        Both are untrusted (a sibling's output; an environment's verdict, which in the code example carries
        the program's own output). A `<|im_end|><|im_start|>assistant` inside them must stay text, not become
        control tokens that forge a turn; the template's own special tokens stay real. Without any
        special-token string in them this is exactly `encode_prompt(reprompt.render(...))`, TRL's tokenisation.
        """
        payload = reprompt.payload(demonstration, feedback)
        if not any(token in text for text in payload.values() for token in self.special_tokens):
            return self.encode_prompt(reprompt.render(demonstration, feedback))
        # Render with markers in place of the payload, tokenise the template's text around them as usual and
        # the payload itself with special-token matching off.
        marks = {name: f"\ue000sdpo-{name}-payload\ue001" for name in payload}
        text = self.render_text(reprompt.render(marks.get("demonstration"), marks.get("feedback")))
        pieces = re.split("(" + "|".join(map(re.escape, marks.values())) + ")", text)
        if sorted(pieces[1::2]) != sorted(marks.values()):
            raise ValueError(
                "The chat template changed the teacher prompt's content, so its demonstration/feedback cannot be "
                "tokenised as plain text. Use a chat template that inserts message content unchanged."
            )
        by_mark = {mark: payload[name] for name, mark in marks.items()}
        ids = []
        for i, piece in enumerate(pieces):
            if i % 2:
                ids += self.encode_text(by_mark[piece])
            elif piece:
                ids += self.tokenizer(piece, add_special_tokens=False)["input_ids"]
        if isinstance(reprompt.prompt, str):  # plain text: the tokenizer's own BOS/EOS, as `encode_prompt` adds them
            prefix, suffix = self._special_wrap
            ids = [*prefix, *ids, *suffix]
        return list(ids)

    @functools.cached_property
    def special_tokens(self) -> tuple[str, ...]:
        """Every special token's text (the chat-control tokens included), longest first."""
        tok = self.tokenizer
        names = set(tok.all_special_tokens)
        names |= {t.content for t in getattr(tok, "added_tokens_decoder", {}).values() if getattr(t, "special", False)}
        return tuple(sorted((n for n in names if n), key=len, reverse=True))

    @functools.cached_property
    def _special_wrap(self) -> tuple[list[int], list[int]]:
        """The ids the tokenizer puts before and after a plain text by default (e.g. BOS)."""
        inner = list(self.tokenizer("a", add_special_tokens=False)["input_ids"])
        outer = list(self.tokenizer("a")["input_ids"])
        for start in range(len(outer) - len(inner) + 1):
            if outer[start : start + len(inner)] == inner:
                return outer[:start], outer[start + len(inner) :]
        return [], []

    def encode_text(self, text: str | None) -> list[int]:
        """Untrusted text as plain-text tokens (special-token strings split), as `encode_reprompt` inserts it."""
        if not text:
            return []
        return list(self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def _check_template(self) -> None:
        if self.chat_template is None and getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError(
                "The dataset has conversational prompts but the tokenizer has no chat template, so the teacher "
                "prompt cannot be built. Set `tokenizer.chat_template`, or use plain-text prompts."
            )


@dataclass
class TokenizedReprompt:
    ids: list[int]
    truncated: bool = False
    overflow: bool = False  # could not fit at all: masked out of the loss


def tokenize_reprompt(
    reprompt: Reprompt, codec: PromptCodec, *, max_len: int, truncation: str, bound: str | None = None
) -> TokenizedReprompt:
    """Tokenise one teacher prompt and apply the truncation policy (`middle`, `left`, `right`, `error`).

    `bound` says what sets `max_len` when it is not `max_reprompt_len` (the model's context less the completion),
    so that the `error` policy names the right setting. No room at all (`max_len < 1`) masks the sample out.
    """
    ids = codec.encode_reprompt(reprompt)
    if len(ids) <= max_len:
        return TokenizedReprompt(ids)
    if truncation == "error":
        limit = f"max_reprompt_len={max_len}" if bound is None else f"the {max_len} tokens left by {bound}"
        raise ValueError(
            f"A teacher prompt has {len(ids)} tokens, more than {limit}. Raise SDPOConfig.max_reprompt_len (or, "
            "when the model's context is the bound, lower max_completion_length or use a longer-context model), "
            "shorten the demonstrations/feedback, or choose reprompt_truncation='middle' (trims only the "
            "demonstration/feedback text)."
        )
    if max_len < 1:  # not even one prompt token fits beside the completion
        return TokenizedReprompt([], truncated=True, overflow=True)
    if truncation == "left":
        return TokenizedReprompt(ids[len(ids) - max_len :], truncated=True)
    if truncation == "right":
        return TokenizedReprompt(ids[:max_len], truncated=True)
    return _truncate_middle(reprompt, codec, ids, max_len)


def _truncate_middle(reprompt: Reprompt, codec: PromptCodec, ids: list[int], max_len: int) -> TokenizedReprompt:
    """Shorten the demonstration and feedback texts, keeping their head and tail, until the prompt fits.

    The question, system turns, template text, closing instruction and generation prompt are never
    cut. If even an empty payload does not fit, the sample is marked `overflow` (masked out).
    """
    overflow = TokenizedReprompt(ids[len(ids) - max_len :], truncated=True, overflow=True)
    if not reprompt.active:  # the plain question alone is too long: there is nothing we may cut
        return overflow
    base = len(codec.encode_reprompt(reprompt, demonstration="", feedback=""))
    payload = {
        "demonstration": codec.encode_text(reprompt.demonstration),
        "feedback": codec.encode_text(reprompt.feedback),
    }
    marker_len = max(len(codec.encode_text(TRUNCATION_MARKER)), 1)
    total = sum(len(t) for t in payload.values())
    budget = max_len - base
    for _ in range(6):  # re-tokenising joined text can shift a few tokens; shrink until it fits
        if budget < MIN_PAYLOAD_TOKENS + marker_len:
            return overflow
        shortened = {
            name: _keep_head_and_tail(toks, int(budget * len(toks) / total), marker_len, codec.decode)
            for name, toks in payload.items()
        }
        new_ids = codec.encode_reprompt(reprompt, **shortened)
        if len(new_ids) <= max_len:
            return TokenizedReprompt(new_ids, truncated=True)
        budget -= len(new_ids) - max_len
    return overflow


def _keep_head_and_tail(
    tokens: list[int], budget: int, marker_len: int, decode: Callable[[list[int]], str]
) -> str | None:
    """The text of `tokens` if it fits `budget`, else its head and tail around a marker."""
    if not tokens:
        return None
    if len(tokens) <= budget:
        return decode(tokens)
    keep = max(budget - marker_len, 2)
    head, tail = tokens[: (keep + 1) // 2], tokens[len(tokens) - keep // 2 :]
    return decode(head) + TRUNCATION_MARKER + decode(tail)
