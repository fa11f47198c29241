"""SDPOConfig: the reference's effective defaults, documentation, and validation messages."""

from __future__ import annotations

import dataclasses
import re

import pytest

from sdpo_fast import SDPOConfig
from sdpo_fast.config import DEFAULT_FEEDBACK_TEMPLATE, DEFAULT_REPROMPT_TEMPLATE, DEFAULT_SOLUTION_TEMPLATE


def test_defaults_are_the_reference_effective_yaml_values():
    c = SDPOConfig()
    assert (c.distillation_topk, c.distillation_add_tail, c.distillation_alpha) == (100, True, 0.5)
    assert (c.full_logit_distillation, c.is_clip, c.loss_agg_mode) == (True, 2.0, "token-mean")
    assert c.success_reward_threshold == 0.5
    assert c.dont_reprompt_on_self_success and c.remove_thinking_from_demonstration
    assert c.include_environment_feedback and c.environment_feedback_only_without_solution
    assert (c.teacher_regularization, c.teacher_update_rate, c.max_reprompt_len) == ("ema", 0.05, 10240)
    assert (c.enabled, c.grpo_weight, c.distillation_backend, c.reprompt_truncation) == (True, 0.0, "auto", "middle")


def test_templates_are_the_effective_yaml_strings_without_trailing_newlines():
    assert DEFAULT_REPROMPT_TEMPLATE == "{prompt}{solution}{feedback}\n\nCorrectly solve the original question."
    assert DEFAULT_SOLUTION_TEMPLATE == "\nCorrect solution:\n\n{successful_previous_attempt}"
    assert (
        DEFAULT_FEEDBACK_TEMPLATE
        == "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback_raw}"
    )
    for t in (DEFAULT_REPROMPT_TEMPLATE, DEFAULT_SOLUTION_TEMPLATE, DEFAULT_FEEDBACK_TEMPLATE):
        assert not t.endswith("\n")


def test_every_field_has_a_docstring():
    import ast
    import inspect
    import itertools

    from sdpo_fast import config as module

    tree = ast.parse(inspect.getsource(module))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SDPOConfig")
    documented = set()
    body = cls.body
    for node, nxt in itertools.pairwise(body):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            documented.add(node.target.id)
    fields = {f.name for f in dataclasses.fields(SDPOConfig)}
    assert fields == documented, f"fields without a docstring: {sorted(fields - documented)}"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"distillation_alpha": 1.5}, "outside \\[0, 1\\]"),
        ({"distillation_alpha": -0.1}, "outside \\[0, 1\\]"),
        ({"full_logit_distillation": False, "distillation_alpha": 0.5}, "needs distillation_alpha=1.0"),
        ({"distillation_topk": 0}, "must be ≥ 1"),
        ({"distillation_topk": 2.5}, "distillation_topk must be an int or None, got 2.5"),
        ({"teacher_update_rate": 1.2}, "outside \\[0, 1\\]"),
        ({"grpo_weight": 2}, "outside \\[0, 1\\]"),
        ({"loss_agg_mode": "mean"}, "Unknown loss_agg_mode"),
        ({"teacher_regularization": "frozen"}, "Unknown teacher_regularization"),
        ({"reprompt_truncation": "both"}, "Unknown reprompt_truncation"),
        ({"distillation_backend": "cuda"}, "Unknown distillation_backend"),
        ({"teacher_dtype": "int8"}, "Unknown teacher_dtype"),
        ({"is_clip": 0.0}, "is_clip must be > 0"),
        ({"max_reprompt_len": 0}, "max_reprompt_len"),
        ({"teacher_micro_batch_size": 0}, "teacher_micro_batch_size"),
        ({"distillation_memory_budget_mb": 0}, "distillation_memory_budget_mb"),
        ({"reprompt_template": "{prompt}{solution}"}, "missing the placeholder\\(s\\) \\{feedback\\}"),
        ({"solution_template": "Solution: {demo}"}, "missing the placeholder"),
        ({"feedback_template": "{feedback_raw} {extra}"}, "unknown placeholder"),
        ({"reprompt_template": "{prompt}{solution}{feedback} {"}, "not a valid format string"),
    ],
)
def test_validation_names_the_problem_and_the_fix(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        SDPOConfig(**kwargs)


def test_valid_edge_values_are_accepted():
    SDPOConfig(distillation_alpha=0.0)
    SDPOConfig(distillation_alpha=1.0, full_logit_distillation=False)
    SDPOConfig(distillation_topk=None, is_clip=None, teacher_update_rate=0.0, grpo_weight=1.0)
    SDPOConfig(reprompt_template="Q: {prompt}{solution}{feedback} {{literal}}")
    assert SDPOConfig().to_dict()["distillation_topk"] == 100


# ------------------------------------------------------------------ wrong types and non-finite numbers

# The annotations as written (`Field.type` is rewritten in place by any HfArgumentParser built on the class).
ANNOTATIONS = SDPOConfig.__annotations__
BOOL_FIELDS = [f.name for f in dataclasses.fields(SDPOConfig) if ANNOTATIONS[f.name] == "bool"]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"success_reward_threshold": float("nan")}, ValueError, "success_reward_threshold must be a finite number"),
        ({"success_reward_threshold": float("inf")}, ValueError, "success_reward_threshold must be a finite number"),
        ({"success_reward_threshold": -float("inf")}, ValueError, "success_reward_threshold must be a finite number"),
        ({"distillation_add_tail": "no"}, TypeError, "distillation_add_tail must be True or False, got 'no'"),
        ({"include_environment_feedback": "false"}, TypeError, "'false' included"),
        ({"max_reprompt_len": True}, TypeError, "max_reprompt_len must be an int, got True \\(a bool"),
        ({"teacher_micro_batch_size": True}, TypeError, "teacher_micro_batch_size must be an int or None, got True"),
        ({"distillation_memory_budget_mb": True}, TypeError, "distillation_memory_budget_mb must be an int, got True"),
        ({"distillation_topk": True}, TypeError, "distillation_topk must be an int or None, got True"),
        ({"is_clip": float("nan")}, ValueError, "is_clip must be a finite number or None, got nan"),
        ({"is_clip": float("inf")}, ValueError, "is_clip must be a finite number or None, got inf"),
        ({"teacher_update_rate": float("nan")}, ValueError, "teacher_update_rate must be a finite number"),
        ({"grpo_weight": float("nan")}, ValueError, "grpo_weight must be a finite number"),
        ({"distillation_alpha": float("nan")}, ValueError, "distillation_alpha must be a finite number"),
        ({"distillation_alpha": float("inf")}, ValueError, "distillation_alpha must be a finite number"),
        ({"success_reward_threshold": "0.5"}, TypeError, "success_reward_threshold must be a number, got '0.5'"),
        ({"grpo_weight": True}, TypeError, "grpo_weight must be a number, got True"),
        ({"max_reprompt_len": 512.0}, TypeError, "max_reprompt_len must be an int, got 512.0"),
        ({"loss_agg_mode": 3}, TypeError, "loss_agg_mode must be a string, got int 3"),
    ],
)
def test_wrong_types_and_non_finite_numbers_are_rejected(kwargs, error, message):
    with pytest.raises(error, match=message):
        SDPOConfig(**kwargs)


@pytest.mark.parametrize("name", BOOL_FIELDS)
@pytest.mark.parametrize("value", ["false", "no", "", 0, 1, None])
def test_every_bool_field_takes_only_a_bool(name, value):
    with pytest.raises(TypeError, match=f"{name} must be True or False, got {re.escape(repr(value))}"):
        SDPOConfig(**{name: value})
    flipped = not getattr(SDPOConfig(), name)
    extra = {  # token-level SDPO needs α = 1; SRPO's entropy weighting needs SRPO
        "full_logit_distillation": {"distillation_alpha": 1.0},
        "srpo_entropy_weighting": {"objective": "srpo"},
    }.get(name, {})
    assert getattr(SDPOConfig(**{name: flipped}, **extra), name) is flipped


def test_every_annotated_field_is_type_checked():
    """The rule is one loop over the fields: each field of each kind rejects a value of the wrong kind."""
    wrong = {"bool": "yes", "int": True, "float": float("nan"), "str": 1.0, "Callable": 1.0}
    for f in dataclasses.fields(SDPOConfig):
        kind = ANNOTATIONS[f.name].split("|")[0].strip()
        with pytest.raises((TypeError, ValueError), match=f"^{f.name} must be"):
            SDPOConfig(**{f.name: wrong[kind]})


def test_numbers_of_other_numeric_types_are_accepted():
    numpy = pytest.importorskip("numpy")
    c = SDPOConfig(success_reward_threshold=1, grpo_weight=numpy.float64(0.25), max_reprompt_len=numpy.int64(64))
    assert c.success_reward_threshold == 1 and c.grpo_weight == 0.25 and c.max_reprompt_len == 64
    assert len(BOOL_FIELDS) == 8  # the loop sees them all: enabled, distillation_add_tail, …
