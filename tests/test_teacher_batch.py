"""The teacher batch, the demonstration policy, the construction checks and the teacher's schedule, without a
trainer: plain lists in, tensors and decisions out."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_setup import tokenizer

from sdpo_fast import SDPOConfig
from sdpo_fast.reprompting import PromptCodec, select_demonstrations
from sdpo_fast.teacher.schedule import teacher_schedule
from sdpo_fast.teacher_batch import ScoredRollouts, batch_report, build_teacher_batch, group_facts, success_scores

KEYS = ["a", "a", "a", "b", "b", "c"]
SCORES = [1.0, 0.0, 1.0, 0.0, math.nan, 1.0]
TEXTS = ["long answer here", "x", "short", "y", "z", "only"]


def _pick(policy, **kw):
    return select_demonstrations(KEYS, SCORES, TEXTS, success_reward_threshold=0.5, policy=policy, **kw)


def test_demonstration_policies():
    assert _pick("first") == ["short", "long answer here", "long answer here", None, None, None]
    assert _pick("shortest")[1] == "short" and _pick("longest")[1] == "long answer here"
    assert _pick(lambda texts: len(texts) - 1)[1] == "short"  # a callable gets the candidates' texts
    randoms = {tuple(_pick("random", seed=s)) for s in range(20)}
    assert len(randoms) > 1 and all(r[1] in ("short", "long answer here") for r in randoms)
    assert _pick("random", seed=3) == _pick("random", seed=3)  # seeded: every process picks alike
    assert _pick("first", accept=lambda t: t != "short")[1] == "long answer here"  # the filter rejects a success
    with pytest.raises(ValueError, match="must return the index"):
        _pick(lambda texts: 7)


def test_group_facts_and_success_scores():
    rate, has = group_facts(KEYS, SCORES, 0.5)
    assert rate == [2 / 3, 2 / 3, 2 / 3, 0.0, 0.0, 1.0] and has == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    rewards = torch.tensor([[1.0, math.nan], [math.nan, math.nan], [0.2, 0.4]])
    scores = success_scores(rewards, torch.tensor([1.0, 0.5]))
    assert scores[0] == 1.0 and math.isnan(scores[1]) and scores[2] == pytest.approx(0.4)


def test_build_teacher_batch_slices_tokenises_and_pads_left():
    prompts = [[{"role": "user", "content": f"q{k}"}] for k in KEYS]
    rollouts = ScoredRollouts(prompts, TEXTS, [None, "wrong", None, "bad", None, None], SCORES)
    config = SDPOConfig(success_reward_threshold=0.5)
    tok = tokenizer()
    codec = PromptCodec(tok)
    whole = build_teacher_batch(rollouts, codec, config, start=0, count=6, pad_id=tok.pad_token_id)
    # sample 1 has a demonstration; 3 has feedback only; 4 nothing; 5 is a lone success (never its own demonstration)
    assert whole.self_distillation_mask.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert whole.success.tolist() == [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    assert whole.group_has_success.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    width = whole.prompt_ids.shape[1]
    lengths = whole.prompt_mask.sum(1)
    for i in range(6):  # left padding: the real tokens end every row
        assert (
            whole.prompt_mask[i, width - int(lengths[i]) :].all()
            and not whole.prompt_mask[i, : width - int(lengths[i])].any()
        )
    part = build_teacher_batch(rollouts, codec, config, start=3, count=3, pad_id=tok.pad_token_id)
    assert part.self_distillation_mask.tolist() == whole.self_distillation_mask[3:].tolist()  # chosen globally
    assert part.group_pass_rate.tolist() == whole.group_pass_rate[3:].tolist()
    metrics, warnings = batch_report(whole, whole.summary(), True, config, n_global=6)
    assert metrics["self_distillation/reprompt_sample_fraction"] == 4 / 6 and not warnings
    _, warnings = batch_report(whole, [0.0, 2.0, 10.0, 0.0], False, config, n_global=6)
    assert set(warnings) == {"no_signal", "overflow"}


class _FakeTeacher:
    ema_rate = 0.1

    def __init__(self):
        self.calls = []

    def ema_step(self, student, generator):
        self.calls.append("ema")

    def copy_student(self, student, generator):
        self.calls.append("copy")


class _State:
    def __init__(self, step):
        self.global_step = step


def _run(refresh, steps, finite=True, student=None):
    teacher = _FakeTeacher()
    config = SDPOConfig(teacher_refresh=refresh, teacher_refresh_steps=3)
    student = student or torch.nn.Linear(2, 2)
    callback = teacher_schedule(
        teacher, config, lambda: student, batch_layout=(1, 2, 1), generator=lambda: None,
        all_ranks_true=lambda flag: flag, step_finite=lambda state: finite,
    )  # fmt: skip
    for step in range(1, steps + 1):
        if callback is not None:
            callback.on_pre_optimizer_step(None, _State(step - 1), None)
            callback.on_step_end(None, _State(step), None)
    return teacher.calls, callback


def test_teacher_schedule_per_refresh_mode():
    assert _run("ema", 6)[0] == ["ema"] * 3  # every generation batch: num_iterations × steps_per_generation / GA = 2
    assert _run("periodic", 7)[0] == ["copy", "copy"]  # every teacher_refresh_steps = 3
    calls, callback = _run("frozen", 6)
    assert calls == [] and callback is None
    assert _run("ema", 6, finite=False)[0] == []  # windows without a finite step never update the teacher


def test_a_nonfinite_student_is_never_copied_into_a_periodic_teacher():
    student = torch.nn.Linear(2, 2)
    with torch.no_grad():
        student.weight[0, 0] = math.inf
    with pytest.warns(UserWarning, match="skipped a periodic teacher refresh"):
        calls, _ = _run("periodic", 3, student=student)
    assert calls == []


def test_demonstration_callables_by_import_path_for_command_lines_and_yaml():
    config = SDPOConfig(demonstration_policy="operator:length_hint", demonstration_filter="builtins:bool")
    import operator

    assert config.demonstration_policy is operator.length_hint and config.demonstration_filter is bool
    assert SDPOConfig(demonstration_policy=min).demonstration_policy is min  # from Python, the callable itself
    with pytest.raises(ValueError, match="cannot be imported"):
        SDPOConfig(demonstration_filter="no_such_module:f")
    with pytest.raises(ValueError, match="Unknown demonstration_policy"):
        SDPOConfig(demonstration_policy="best")
    from transformers import HfArgumentParser

    (parsed,) = HfArgumentParser(SDPOConfig).parse_args_into_dataclasses(["--demonstration_policy", "random"])
    assert parsed.demonstration_policy == "random" and parsed.demonstration_filter is None
