"""Test-time training passes `reward_kwargs` to the reward function unchanged, and refuses reserved names early."""

from __future__ import annotations

import copy

import pytest
from tiny_setup import model as tiny_model
from tiny_setup import tokenizer as tiny_tok

from sdpo_fast import SDPOConfig, test_time_self_distill
from sdpo_fast.test_time import RESERVED_REWARD_KWARGS

QUESTION = "what is two plus two ?"
CHAT = [{"role": "user", "content": QUESTION}]
# The shapes that a dataset round trip changed: mixed int/float lists, dicts with different keys, nested None,
# an int that a reward compares exactly, tuples, and an object Arrow cannot hold at all.
KWARGS = {
    "tests": [{"input": 1, "output": 2}, {"input": 2.5}, {"input": [1, None], "output": "x"}],
    "expected": 4,
    "limit": 10**18 + 1,  # not a float: float(10**18 + 1) == 10**18
    "pair": (1, "a"),
    "checker": len,
}


def _run(mode, reward, kwargs=KWARGS, **extra):
    return test_time_self_distill(
        tiny_model(),
        tiny_tok(),
        CHAT,
        reward,
        mode=mode,
        budget=4,
        num_candidates=2,
        max_new_tokens=3,
        sdpo_config=SDPOConfig(distillation_topk=10),
        reward_kwargs=kwargs,
        trainer_args={"disable_tqdm": True, "logging_strategy": "no"},
        **extra,
    )


@pytest.mark.parametrize("mode", ["train", "reprompt", "best_of_k"])
def test_every_mode_passes_reward_kwargs_through_unchanged(mode):
    given = copy.deepcopy(KWARGS)
    seen = []

    def reward(prompts, completions, completion_ids, **kwargs):
        seen.append((prompts, kwargs))
        # exact comparison: a float 4.0 would equal 4, so compare types too
        solved = type(kwargs["expected"][0]) is int and kwargs["limit"][0] == 10**18 + 1
        return [{"score": 1.0 if solved else 0.0, "feedback": None} for _ in completions]

    result = _run(mode, reward, given)
    assert seen, "the reward function was never called"
    for prompts, kwargs in seen:
        n = len(prompts)
        assert all(p == CHAT for p in prompts)  # the question itself, never a column
        for key, value in KWARGS.items():
            assert kwargs[key] == [value] * n, key
            assert all(type(v) is type(value) for v in kwargs[key]), key
        assert "output" not in kwargs["tests"][0][1] and type(kwargs["tests"][0][0]["input"]) is int
    assert result.first_success is not None and result.discovery_at_k == 1  # the int comparison held
    assert given == KWARGS  # the caller's dict is untouched


@pytest.mark.parametrize("name", RESERVED_REWARD_KWARGS)
def test_reserved_names_are_refused_before_anything_runs(name):
    calls = []
    with pytest.raises(ValueError, match=rf"reward_kwargs uses the reserved name\(s\) \['{name}'\].*Rename"):
        _run("train", lambda **kw: calls.append(kw), {name: "x", "ok": 1})
    assert calls == []


def test_a_prompt_key_never_replaces_the_question():
    """The earlier failure: `prompt` in reward_kwargs silently became the training question."""
    with pytest.raises(ValueError, match="the question is the `prompt` argument"):
        _run("train", lambda completions, **kw: [0.0] * len(completions), {"prompt": "another question"})


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ([("a", 1)], TypeError, "must be a dict"),
        ({1: "x"}, TypeError, "keyword-argument names"),
        ({"has space": 1}, TypeError, "keyword-argument names"),
    ],
)
def test_malformed_reward_kwargs(kwargs, error, match):
    with pytest.raises(error, match=match):
        _run("train", lambda completions, **kw: [0.0] * len(completions), kwargs)
