"""SDPOConfig: the reference's effective defaults, documentation, and validation messages."""

from __future__ import annotations

import dataclasses

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
        ({"distillation_topk": 2.5}, "positive int or None"),
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
