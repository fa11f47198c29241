"""`SDPOConfig`: every SDPO knob, passed to the trainer *beside* a `GRPOConfig`.

It is a plain dataclass rather than a `GRPOConfig` subclass so that it composes with Unsloth's
patched `UnslothGRPOConfig` and with any other `GRPOConfig` a user already has. The defaults are
the reference implementation's *effective* Hydra values (lasgroup/SDPO, `actor.yaml` +
`sdpo.yaml`), not its Python dataclass defaults, which disagree and never run.
"""

from __future__ import annotations

import importlib
import math
import numbers
import string
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

from .kernels.constants import BACKENDS
from .objective.registry import objective_names

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
TEACHER_REGULARIZATIONS = ("ema", "trust-region")
REPROMPT_TRUNCATIONS = ("middle", "left", "right", "error")
TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16")
RESUME_TEACHER_FROM = ("checkpoint", "student", "initial")
TEACHER_REFRESH = ("ema", "frozen", "periodic")
DEMONSTRATION_POLICIES = ("first", "random", "shortest", "longest")


# The reference's effective templates: YAML `|-` block scalars, so no trailing newlines.
DEFAULT_REPROMPT_TEMPLATE = "{prompt}{solution}{feedback}\n\nCorrectly solve the original question."
DEFAULT_SOLUTION_TEMPLATE = "\nCorrect solution:\n\n{successful_previous_attempt}"
DEFAULT_FEEDBACK_TEMPLATE = "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback_raw}"

# Which placeholders each template must (and may only) contain.
# Typed `str` so that argument parsers can fill them (an import path "package.module:function" there); from Python
# they also take the callable itself.
_CALLABLE_FIELDS = ("demonstration_policy", "demonstration_filter")

_TEMPLATE_FIELDS = {
    "reprompt_template": {"prompt", "solution", "feedback"},
    "solution_template": {"successful_previous_attempt"},
    "feedback_template": {"feedback_raw"},
}


@dataclass
class SDPOConfig:
    """Configuration of Self-Distillation Policy Optimization.

    Pass it to `SDPOTrainer(..., args=GRPOConfig(...), sdpo_config=SDPOConfig(...))`. Every
    default equals the reference implementation's effective value unless the field is marked
    *(sdpo-fast)*, in which case the reference has no such option.
    """

    # ------------------------------------------------------------------ switch and blend
    enabled: bool = True
    """*(sdpo-fast)* `False` trains plain GRPO: the trainer defers to `GRPOTrainer.compute_loss`."""

    grpo_weight: float = 0.0
    """*(sdpo-fast)* The paper's blend λ: loss = (1 − λ)·SDPO + λ·GRPO, both from one student
    forward. 0 is pure SDPO (the reference), 1 is pure GRPO with SDPO's bookkeeping."""

    objective: str = "sdpo"
    """*(sdpo-fast)* The objective variant, one class each in `sdpo_fast.objective` (docs/when_sdpo_helps.md
    says which failure each addresses): `sdpo` (the reference), `sdpo_reference_norm` (the reference's
    normaliser as shipped: a per-sequence average over *all* samples, those without a teacher included),
    `srpo` (successful samples get the GRPO term, failed ones the SDPO term; arXiv 2604.02288), `rlsd` (the
    reward's advantage sets the sign, the teacher the per-token magnitude; arXiv 2604.03128), `sc_sdpo` (each
    group's SDPO loss × √(p̂(1−p̂)); arXiv 2605.27765), `group_fallback` (a group with no success contributes
    GRPO's term instead of nothing), and `forward_kl_clip` (forward KL whose per-bucket terms are clipped at
    `kl_clip`)."""

    srpo_entropy_weighting: bool = False
    """*(sdpo-fast)* `objective="srpo"`: weight each distilled token by 1 − H_T/log(K+1), H_T the teacher's
    entropy over the K+1 buckets, so that uncertain teacher targets pull less (arXiv 2604.02288)."""

    kl_clip: float = 10.0
    """*(sdpo-fast)* `objective="forward_kl_clip"`: the upper clip of each bucket's forward-KL term
    p_T·(log p_T − log p_S)."""

    rlsd_lambda: float = 0.5
    """*(sdpo-fast)* `objective="rlsd"`: λ, the share of the per-token advantage that the teacher shapes."""

    rlsd_epsilon: float = 0.2
    """*(sdpo-fast)* `objective="rlsd"`: ε, the clip of the teacher's per-token factor exp(sign(A)·Δ_t)."""

    rlsd_lambda_decay_steps: int | None = None
    """*(sdpo-fast)* `objective="rlsd"`: decay λ linearly to 0 over this many optimizer steps (None: constant)."""

    # ------------------------------------------------------------------ the distillation loss
    distillation_topk: int | None = 100
    """K, the number of student top-K tokens the divergence is computed on. `None` distils the
    full vocabulary. Must not exceed the vocabulary size."""

    distillation_add_tail: bool = True
    """Append a tail bucket log(1 − Σ top-K mass) so the K+1 buckets form a distribution.
    `False` renormalises both sides over the K tokens instead."""

    distillation_alpha: float = 0.5
    """Divergence weight α ∈ [0, 1]. 0 = forward KL(teacher‖student), 1 = reverse
    KL(student‖teacher), anything between = generalised Jensen–Shannon with mixture
    (1−α)·student + α·teacher. The ends are the *unscaled* KLs, as in the reference."""

    full_logit_distillation: bool = True
    """`True`: logit-level SDPO (top-K or full-vocabulary divergence). `False`: token-level SDPO,
    the REINFORCE surrogate sg(log π_S − log π_T)·log π_S on the sampled token; needs α = 1."""

    is_clip: float | None = 2.0
    """Upper clip of the detached importance ratio π_S/π_old that multiplies each token's loss.
    `None` disables the correction. On-policy the ratio is exactly 1."""

    loss_agg_mode: str = "token-mean"
    """How per-token losses are aggregated: `token-mean`, `seq-mean-token-sum`,
    `seq-mean-token-mean` or `seq-mean-token-sum-norm` (the reference's four modes). The trainer
    normalises over the whole optimizer step, so gradient accumulation does not change it."""

    # ------------------------------------------------------------------ reprompting
    success_reward_threshold: float = 0.5
    """A rollout whose (weighted, summed) reward is ≥ this is a success, usable as a demonstration for its
    siblings: the other completions of the same dataset row (GRPO's group), or of the rows that share its value
    in a dataset `uid` column, if there is one (a uid joining different prompts or targets is warned about)."""

    dont_reprompt_on_self_success: bool = True
    """Never use a sample as its own demonstration."""

    remove_thinking_from_demonstration: bool = True
    """Strip `<think>…</think>` blocks (and the whitespace after them) from demonstrations."""

    include_environment_feedback: bool = True
    """Use the textual feedback that reward functions return with `{"score", "feedback"}`."""

    environment_feedback_only_without_solution: bool = True
    """Use feedback only for samples that have no demonstration."""

    demonstration_policy: str = "first"
    """*(sdpo-fast)* Which successful sibling becomes the demonstration: `first` in batch order (the
    reference), `random` (what practitioners recommend), `shortest`, `longest`, or a callable that takes the
    candidates' texts and returns the index of the chosen one (from a command line or YAML file: its import path,
    `"package.module:function"`)."""

    demonstration_filter: str | None = None
    """*(sdpo-fast)* A callable `text -> bool` (or its import path `"package.module:function"`); a successful
    completion it rejects is never a demonstration (e.g. one with several answer blocks)."""

    reprompt_template: str = DEFAULT_REPROMPT_TEMPLATE
    """Teacher user turn. Placeholders: `{prompt}` (the original question), `{solution}`, `{feedback}`."""

    solution_template: str = DEFAULT_SOLUTION_TEMPLATE
    """Demonstration section. Placeholder: `{successful_previous_attempt}`."""

    feedback_template: str = DEFAULT_FEEDBACK_TEMPLATE
    """Feedback section. Placeholder: `{feedback_raw}`."""

    max_reprompt_len: int = 10240
    """Maximum length of the teacher prompt in tokens (the completion is appended after it). A prompt is also
    held to the model's context less its completion's length, so the teacher never runs past the context."""

    reprompt_truncation: str = "middle"
    """*(sdpo-fast default)* How an over-long teacher prompt is shortened. `middle` trims the middle
    of the demonstration/feedback text, so the question, the system turns, the closing instruction
    and the generation prompt always survive; a prompt that cannot fit even without them is masked
    out of the loss and counted. `left` keeps the last tokens, `right` the first tokens (the
    reference, which can cut the generation prompt), `error` raises."""

    # ------------------------------------------------------------------ the teacher
    teacher_regularization: str = "ema"
    """`ema`: the teacher is an exponential moving average of the student, updated once per
    generation batch. `trust-region`: teacher logits (1 − c)·z_initial + c·z_student."""

    teacher_refresh: str = "ema"
    """*(sdpo-fast)* How the teacher follows the student: `ema` (the reference, at `teacher_update_rate`),
    `frozen` (the initial policy for the whole run), or `periodic` (a hard copy of the student every
    `teacher_refresh_steps` optimizer steps). Stable teachers forget less (arXiv 2607.01763)."""

    teacher_refresh_steps: int = 50
    """*(sdpo-fast)* `teacher_refresh="periodic"`: optimizer steps between hard copies."""

    self_teacher_eval_steps: int | None = None
    """*(sdpo-fast)* Run a small pre-flight self-teacher check every this many optimizer steps during
    training and log it as `self_teacher/*` (None: never). See `sdpo_fast.preflight`."""

    teacher_update_rate: float = 0.05
    """EMA rate τ (teacher ← (1 − τ)·teacher + τ·student), or the trust-region mix c."""

    teacher_dtype: str = "auto"
    """*(sdpo-fast)* Storage dtype of a full-copy teacher. `auto` = the student's dtype, except
    that an fp32 student gets an fp32 teacher. Low-precision teachers are EMA-updated with
    stochastic rounding, so small updates still move them."""

    teacher_micro_batch_size: int | None = None
    """*(sdpo-fast)* Rows per no-grad teacher forward; `None` = the whole micro-batch at once."""

    resume_teacher_from: str = "checkpoint"
    """*(sdpo-fast)* Where the teacher comes from when training resumes from a checkpoint. `checkpoint`:
    the teacher saved in it (`sdpo_teacher.pt`, verified against its checksum); a missing or damaged file
    is an error that names it. `student`: restart the teacher as a copy of the restored student (the EMA
    history is lost). `initial`: restart it from the model as passed to the trainer, before any training."""

    # ------------------------------------------------------------------ the fused head
    distillation_backend: str = "auto"
    """*(sdpo-fast)* `auto` (the Triton head, cuBLAS tiles plus row kernels, on every CUDA GPU from sm_75, a
    T4 included; chunked PyTorch elsewhere and for K > 1024), `triton`, `torch`, or `naive` (full logits; for
    debugging and benchmarks only)."""

    distillation_memory_budget_mb: int = 256
    """*(sdpo-fast)* Scratch memory budget of the chunked head paths, in MiB. It bounds the tile
    sizes, whatever the number of tokens and the vocabulary size."""

    def __post_init__(self) -> None:
        declared = _declared_annotations(type(self))
        for f in fields(self):  # every field against its annotation first, so the range checks see clean values
            if f.name in _CALLABLE_FIELDS and callable(getattr(self, f.name)):
                continue  # typed `str` for argument parsers (an import path there), a callable from Python
            _check_type(f.name, getattr(self, f.name), declared.get(f.name, f.type))
        _check_unit("grpo_weight", self.grpo_weight)
        _check_unit("distillation_alpha", self.distillation_alpha)
        _check_unit("teacher_update_rate", self.teacher_update_rate)
        if self.distillation_topk is not None and self.distillation_topk < 1:
            raise ValueError(
                f"distillation_topk={self.distillation_topk} must be ≥ 1. Use distillation_topk=None to distil "
                "the full vocabulary."
            )
        if not self.full_logit_distillation and self.distillation_alpha != 1.0:
            raise ValueError(
                "Token-level SDPO (full_logit_distillation=False) is the REINFORCE estimator of the reverse KL and "
                f"needs distillation_alpha=1.0, got {self.distillation_alpha}. Set distillation_alpha=1.0, or keep "
                "full_logit_distillation=True for the JSD/forward-KL variants."
            )
        if self.is_clip is not None and not self.is_clip > 0:
            raise ValueError(f"is_clip must be > 0 or None (no importance-sampling correction), got {self.is_clip!r}.")
        _check_choice("loss_agg_mode", self.loss_agg_mode, LOSS_AGG_MODES)
        _check_choice("objective", self.objective, objective_names())
        _check_choice("teacher_refresh", self.teacher_refresh, TEACHER_REFRESH)
        if isinstance(self.demonstration_policy, str) and ":" not in self.demonstration_policy:
            _check_choice("demonstration_policy", self.demonstration_policy, DEMONSTRATION_POLICIES)
        for name in ("demonstration_policy", "demonstration_filter"):
            value = getattr(self, name)
            if isinstance(value, str) and ":" in value:
                setattr(self, name, _import_callable(name, value))
        _check_unit("rlsd_lambda", self.rlsd_lambda)
        for name in ("rlsd_epsilon", "kl_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}.")
        if self.objective == "forward_kl_clip" and (self.distillation_alpha != 0.0 or self.distillation_topk is None):
            raise ValueError(
                "objective='forward_kl_clip' is the forward KL over the top-K + tail buckets: set "
                "distillation_alpha=0.0 and an integer distillation_topk."
            )
        if self.srpo_entropy_weighting and (self.objective != "srpo" or self.distillation_topk is None):
            raise ValueError(
                "srpo_entropy_weighting weights SRPO's distilled tokens by the teacher's K+1-bucket entropy: set "
                "objective='srpo' and an integer distillation_topk."
            )
        for name in ("rlsd_lambda_decay_steps", "teacher_refresh_steps", "self_teacher_eval_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive number of optimizer steps, got {value!r}.")
        if self.objective != "sdpo" and not self.full_logit_distillation:
            raise ValueError(
                f"objective={self.objective!r} is built on logit-level SDPO; token-level SDPO "
                "(full_logit_distillation=False) is available with objective='sdpo' only."
            )
        if self.teacher_refresh != "ema" and self.teacher_regularization == "trust-region":
            raise ValueError(
                f"teacher_refresh={self.teacher_refresh!r} refreshes an EMA-style teacher; the trust-region teacher "
                "mixes logits with the initial model instead. Use teacher_regularization='ema' with it."
            )
        _check_choice("teacher_regularization", self.teacher_regularization, TEACHER_REGULARIZATIONS)
        _check_choice("reprompt_truncation", self.reprompt_truncation, REPROMPT_TRUNCATIONS)
        _check_choice("distillation_backend", self.distillation_backend, BACKENDS)
        _check_choice("teacher_dtype", self.teacher_dtype, TEACHER_DTYPES)
        _check_choice("resume_teacher_from", self.resume_teacher_from, RESUME_TEACHER_FROM)
        if self.resume_teacher_from == "student" and self.teacher_regularization == "trust-region":
            raise ValueError(
                "resume_teacher_from='student' cannot restart a trust-region teacher: it is the initial model by "
                "definition. Use resume_teacher_from='initial' or 'checkpoint'."
            )
        if self.max_reprompt_len < 1:
            raise ValueError(f"max_reprompt_len must be a positive number of tokens, got {self.max_reprompt_len!r}.")
        if self.teacher_micro_batch_size is not None and self.teacher_micro_batch_size < 1:
            raise ValueError(
                f"teacher_micro_batch_size must be a positive int or None, got {self.teacher_micro_batch_size!r}."
            )
        if not self.distillation_memory_budget_mb > 0:
            raise ValueError(
                f"distillation_memory_budget_mb must be > 0 MiB, got {self.distillation_memory_budget_mb!r}."
            )
        for name, allowed in _TEMPLATE_FIELDS.items():
            _check_template(name, getattr(self, name), allowed)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy, for logging and checkpoints."""
        return asdict(self)


def _declared_annotations(cls: type) -> dict[str, Any]:
    """Each field's annotation as written in the class body, base classes first.

    Not `dataclasses.Field.type`: `transformers.HfArgumentParser` (and so `trl.TrlParser`) overwrites that in
    place with the resolved type, stripped of `None` (`int | None` becomes `int`), so a check reading it would
    reject the `None` defaults in every later `SDPOConfig()` of the process. The class's `__annotations__` are
    never rewritten.
    """
    out: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        out.update(vars(klass).get("__annotations__", {}))
    return out


def _check_type(name: str, value: Any, annotation: Any) -> None:
    """`value` against a field annotation such as `bool`, `int | None`, `float` or `str`.

    Strict on purpose: a string is truthy (`distillation_add_tail="no"` would keep the tail on) and a bool
    is an int to Python (`max_reprompt_len=True` would mean 1). Floats must be finite: NaN compares false
    with everything, so `success_reward_threshold=nan` would silently make every rollout a failure.
    """
    if not isinstance(annotation, str):  # only without `from __future__ import annotations`
        annotation = getattr(annotation, "__name__", None) or str(annotation)
    kinds = [part.strip() for part in annotation.split("|")]
    if value is None and "None" in kinds:
        return
    kind, optional = kinds[0], " or None" if "None" in kinds else ""
    if kind == "bool":
        if not isinstance(value, bool):
            hint = " (a non-empty string is truthy, 'false' included)" if isinstance(value, str) else ""
            raise TypeError(f"{name} must be True or False{optional}, got {value!r}{hint}. Pass a Python bool.")
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            hint = " (a bool, which Python would read as 1 or 0)" if isinstance(value, bool) else ""
            raise TypeError(f"{name} must be an int{optional}, got {value!r}{hint}.")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a number{optional}, got {value!r}.")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number{optional}, got {value!r}.")
    elif kind == "Callable" and not callable(value):
        raise TypeError(f"{name} must be callable{optional}, got {value!r}.")
    elif kind == "str" and not isinstance(value, str) and not ("Callable" in kinds and callable(value)):
        raise TypeError(f"{name} must be a string, got {type(value).__name__} {value!r}.")


def _import_callable(name: str, path: str) -> Callable:
    """`"package.module:function"` → the function, with an error that names the field and the path."""
    module_name, _, attr = path.partition(":")
    try:
        value = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{name}={path!r} cannot be imported ({err}). Give 'package.module:function'.") from None
    if not callable(value):
        raise TypeError(f"{name}={path!r} is not callable.")
    return value


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name}={value} is outside [0, 1]. Choose a value between 0 and 1.")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Unknown {name}={value!r}. Choose one of: {', '.join(repr(c) for c in choices)}.")


def _check_template(name: str, template: str, allowed: set[str]) -> None:
    if not isinstance(template, str):
        raise TypeError(f"{name} must be a string, got {type(template).__name__}.")
    try:
        used = {fname for _, fname, _, _ in string.Formatter().parse(template) if fname is not None}
    except ValueError as err:  # unbalanced braces
        raise ValueError(
            f"{name} is not a valid format string ({err}). Double literal braces as '{{{{' and '}}}}'."
        ) from None
    missing = allowed - used
    unknown = used - allowed
    if missing:
        raise ValueError(
            f"{name} is missing the placeholder(s) {', '.join('{' + m + '}' for m in sorted(missing))}. "
            f"Got {template!r}."
        )
    if unknown:
        raise ValueError(
            f"{name} uses unknown placeholder(s) {', '.join('{' + u + '}' for u in sorted(unknown))}; it may only "
            f"use {', '.join('{' + a + '}' for a in sorted(allowed))}. Double literal braces as '{{{{' and '}}}}'."
        )
