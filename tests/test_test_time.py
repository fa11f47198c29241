"""Test-time self-distillation (`sdpo_fast.test_time`): stopping, budget, reprompt threading, both modes, errors."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from pathlib import Path

import pytest
import torch
from tiny_setup import model as tiny_model
from tiny_setup import tokenizer as tiny_tok

from sdpo_fast import SDPOConfig, test_time_self_distill
from sdpo_fast.test_time import RewardFunctionError

QUESTION = "what is two plus two ?"
CHAT = [{"role": "system", "content": "you are helpful"}, {"role": "user", "content": QUESTION}]
FEEDBACK_HEADER = "\nThe following is feedback from your unsuccessful earlier attempt:\n\n"
INSTRUCTION = "\n\nCorrectly solve the original question."


class ScriptedGenerate:
    """Stands in for `model.generate`: records each input and returns scripted completions."""

    def __init__(self, tok, script):
        self.tok, self.script, self.inputs = tok, script, []

    def __call__(self, input_ids, attention_mask=None, generation_config=None, **kwargs):
        self.inputs.append(input_ids.clone())
        texts = self.script(len(self.inputs), input_ids.shape[0])
        rows = [self.tok(t, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id] for t in texts]
        width = max(len(r) for r in rows)
        out = torch.full((len(rows), width), self.tok.pad_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r)
        return torch.cat([input_ids, out], dim=1)

    def decoded(self, call: int) -> str:
        """The exact text the model received in 1-based call `call` (first row; all rows are equal)."""
        rows = self.inputs[call - 1]
        assert all(torch.equal(rows[0], r) for r in rows)
        return self.tok.decode(rows[0])


def numbered(call, n):
    """Completion texts that say which round and candidate they are: "one two" = round 1, candidate 2."""
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    return [f"{words[call - 1]} {words[i]}" for i in range(n)]


@pytest.fixture
def scripted(monkeypatch):
    def make(script=numbered):
        tok, model = tiny_tok(), tiny_model()
        gen = ScriptedGenerate(tok, script)
        monkeypatch.setattr(model, "generate", gen)
        return model, tok, gen

    return make


def feedback_reward(completions, **kwargs):
    """Never solved; the feedback names the attempt it is about."""
    return [{"score": 0.0, "feedback": f"expected four but got {_text(c)}"} for c in completions]


def _text(completion):
    return completion if isinstance(completion, str) else completion[-1]["content"]


def chat_input(tok, content: str, system: bool = True) -> str:
    """What the tiny model must receive for a user turn with `content`, spelled out independently."""
    messages = [{"role": "user", "content": content}]
    if system:
        messages = [{"role": "system", "content": "you are helpful"}, *messages]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    return tok.decode(ids)


# ---------------------------------------------------------------------------------------------- threading


def test_round_two_prompt_holds_round_one_feedback_exactly(scripted):
    model, tok, gen = scripted()
    result = test_time_self_distill(model, tok, CHAT, feedback_reward, budget=8, num_candidates=4)
    assert gen.decoded(1) == chat_input(tok, QUESTION)
    # every round-1 attempt scored 0 with feedback: the best-scoring one with feedback is the first
    expected = chat_input(tok, QUESTION + FEEDBACK_HEADER + "expected four but got one one" + INSTRUCTION)
    assert gen.decoded(2) == expected
    assert result.round_inputs == [gen.decoded(1), gen.decoded(2)]
    assert [a.context for a in result.attempts] == ["question"] * 4 + ["feedback"] * 4
    assert [a.reprompted for a in result.attempts] == [False] * 4 + [True] * 4


def test_best_demonstration_replaces_feedback(scripted):
    model, tok, gen = scripted()
    scores = {"one one": 0.55, "one two": 0.8, "one three": 0.7}  # demonstration-worthy (≥ 0.5), not solved (< 1)

    def reward(completions, **kwargs):
        return [{"score": scores.get(_text(c), 0.0), "feedback": "wrong"} for c in completions]

    result = test_time_self_distill(model, tok, CHAT, reward, budget=8, num_candidates=4, success_threshold=1.0)
    # the best (0.8) attempt is the demonstration; with a demonstration, feedback is left out (reference default)
    assert gen.decoded(2) == chat_input(tok, QUESTION + "\nCorrect solution:\n\none two" + INSTRUCTION)
    assert result.first_success is None and result.best.text == "one two"
    assert {a.context for a in result.attempts if a.round == 2} == {"demonstration"}


def test_demonstration_and_feedback_together_when_configured(scripted):
    model, tok, gen = scripted()

    def reward(completions, **kwargs):
        return [{"score": 0.6 if i == 0 else 0.0, "feedback": f"bad {i}"} for i in range(len(completions))]

    config = SDPOConfig(environment_feedback_only_without_solution=False)
    result = test_time_self_distill(model, tok, CHAT, reward, budget=8, num_candidates=4, sdpo_config=config)
    # feedback: the best-scoring attempt that has some (attempt 1, score 0.6)
    content = QUESTION + "\nCorrect solution:\n\none one" + FEEDBACK_HEADER + "bad 0" + INSTRUCTION
    assert gen.decoded(2) == chat_input(tok, content)
    assert result.attempts[-1].context == "demonstration+feedback"


def test_feedback_history_none_joins_every_round(scripted):
    model, tok, gen = scripted()
    result = test_time_self_distill(
        model, tok, QUESTION, feedback_reward, budget=12, num_candidates=4, feedback_history=None
    )
    fb = "expected four but got one one\n\nexpected four but got two one"
    assert gen.decoded(3) == tok.decode(tok(QUESTION + FEEDBACK_HEADER + fb + INSTRUCTION)["input_ids"])
    assert result.rounds == 3


def test_latest_feedback_only_by_default(scripted):
    model, tok, gen = scripted()
    test_time_self_distill(model, tok, QUESTION, feedback_reward, budget=12, num_candidates=4)
    assert "got two one" in gen.decoded(3) and "got one one" not in gen.decoded(3)


def test_reprompt_truncation_is_trainings(scripted, caplog):
    model, tok, gen = scripted()
    long_feedback = " ".join(["expected four"] * 40)

    def reward(completions, **kwargs):
        return [{"score": 0.0, "feedback": long_feedback} for _ in completions]

    config = SDPOConfig(max_reprompt_len=60, reprompt_truncation="middle")
    test_time_self_distill(model, tok, CHAT, reward, budget=8, num_candidates=4, sdpo_config=config)
    second = gen.inputs[1][0].tolist()
    assert len(second) <= 60 < len(tok(long_feedback)["input_ids"])
    text = tok.decode(second)
    # middle truncation trims only the feedback: system turn, question, instruction and generation prompt survive
    assert text.startswith("<|im_start|> system you are helpful <|im_end|> <|im_start|> user what is two plus two?")
    assert text.endswith("correctly solve the original question. <|im_end|> <|im_start|> assistant")
    assert "feedback from your unsuccessful earlier attempt : expected four" in text
    # no room even for a trimmed payload: that round samples from the plain question, with a warning
    model, tok, gen = scripted()
    config = SDPOConfig(max_reprompt_len=40, reprompt_truncation="middle")
    result = test_time_self_distill(model, tok, CHAT, reward, budget=8, num_candidates=4, sdpo_config=config)
    assert gen.decoded(2) == gen.decoded(1) and result.attempts[-1].context == "question"
    assert "does not fit max_reprompt_len=40" in caplog.text


def test_reward_sees_the_original_prompt_and_trl_shapes(scripted):
    model, tok, _ = scripted()
    seen = []

    def reward(prompts, completions, completion_ids, answer, **kwargs):
        seen.append((prompts, completions, completion_ids, answer))
        return [0.0] * len(completions)

    test_time_self_distill(model, tok, CHAT, reward, budget=6, num_candidates=3, reward_kwargs={"answer": "4"})
    prompts, completions, ids, answer = seen[1]
    assert prompts == [CHAT] * 3 and answer == ["4"] * 3  # the reprompt is the model's input, not the reward's
    assert completions[0] == [{"role": "assistant", "content": "two one"}]
    assert ids[0][-1] == tok.eos_token_id and tok.decode(ids[0], skip_special_tokens=True) == "two one"
    model, tok, _ = scripted()
    test_time_self_distill(model, tok, QUESTION, reward, budget=2, num_candidates=2, reward_kwargs={"answer": "4"})
    assert seen[-1][:2] == ([QUESTION] * 2, ["one one", "one two"])  # plain-text prompts: string completions


# ---------------------------------------------------------------------------------------------- stopping and budget


def solved_at(k: int):
    """A reward function whose k-th call-order attempt is the first success."""
    count = {"n": 0}

    def reward(completions, **kwargs):
        scores = []
        for _ in completions:
            count["n"] += 1
            scores.append(1.0 if count["n"] >= k else 0.0)
        return scores

    return reward


def test_stops_at_first_success_and_counts_the_whole_round(scripted):
    model, tok, gen = scripted()
    rounds = []
    result = test_time_self_distill(
        model, tok, CHAT, solved_at(6), budget=40, num_candidates=4, on_round=lambda r, new: rounds.append(len(new))
    )
    assert result.discovery_at_k == 6 and result.first_success.index == 6 and result.first_success.round == 2
    assert result.attempts_used == 8 and result.rounds == 2 and len(gen.inputs) == 2 and rounds == [4, 4]
    assert result.stop_reason == "success" and not result.interrupted
    assert [a.index for a in result.attempts] == list(range(1, 9))


def test_budget_is_never_exceeded_last_round_partial(scripted):
    model, tok, gen = scripted()
    sizes = []

    def reward(completions, **kwargs):
        sizes.append(len(completions))
        return [0.0] * len(completions)

    result = test_time_self_distill(model, tok, CHAT, reward, budget=10, num_candidates=4)
    assert sizes == [4, 4, 2] and [x.shape[0] for x in gen.inputs] == [4, 4, 2]
    assert result.attempts_used == 10 and result.discovery_at_k is None and result.first_success is None
    assert result.stop_reason == "budget"


def test_success_threshold_and_none_scores(scripted):
    model, tok, _ = scripted()

    def reward(completions, **kwargs):
        return [None, 0.7, 0.9][: len(completions)]

    result = test_time_self_distill(model, tok, CHAT, reward, budget=3, num_candidates=3, success_threshold=0.8)
    assert [a.success for a in result.attempts] == [False, False, True] and result.discovery_at_k == 3
    assert result.attempts[0].score is None


def test_best_of_k_never_reprompts(scripted):
    model, tok, gen = scripted()
    result = test_time_self_distill(model, tok, CHAT, feedback_reward, mode="best_of_k", budget=9, num_candidates=4)
    assert len(gen.inputs) == 3 and len(set(result.round_inputs)) == 1
    assert result.round_inputs[0] == chat_input(tok, QUESTION)
    assert not any(a.reprompted for a in result.attempts) and result.attempts_used == 9


def test_async_reward_function(scripted):
    model, tok, _ = scripted()

    async def reward(completions, **kwargs):
        await asyncio.sleep(0)
        return [1.0 if _text(c) == "one two" else 0.0 for c in completions]

    assert test_time_self_distill(model, tok, QUESTION, reward, budget=4, num_candidates=4).discovery_at_k == 2


# ---------------------------------------------------------------------------------------------- Ctrl-C


def raising_on(call: int, error: BaseException, score=feedback_reward, name: str = "reward"):
    """A reward function that raises `error` on its `call`-th call and scores with `score` before."""
    calls = {"n": 0}

    def reward(completions, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise error
        return score(completions)

    reward.__name__ = name
    return reward


def test_ctrl_c_in_the_reward_function_keeps_the_history(scripted):
    model, tok, _ = scripted()
    result = test_time_self_distill(model, tok, CHAT, raising_on(3, KeyboardInterrupt()), budget=40, num_candidates=4)
    assert result.interrupted and result.stop_reason == "interrupted"
    assert result.attempts_used == 8 and result.rounds == 2


def test_ctrl_c_in_generate_keeps_the_history(scripted):
    def script(call, n):
        if call == 2:
            raise KeyboardInterrupt
        return numbered(call, n)

    model, tok, _ = scripted(script)
    was_training = model.training
    result = test_time_self_distill(model, tok, CHAT, feedback_reward, budget=40, num_candidates=4)
    assert result.interrupted and result.attempts_used == 4 and result.attempts[0].feedback
    assert model.training == was_training  # the eval-mode switch is undone


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"budget": 0}, ValueError, "budget must be a positive"),
        ({"budget": -3}, ValueError, "budget must be a positive"),
        ({"budget": 2.5}, ValueError, "budget must be a positive"),
        ({"budget": True}, ValueError, "budget must be a positive"),
        ({"num_candidates": 0}, ValueError, "num_candidates"),
        ({"mode": "train", "num_candidates": 1}, ValueError, "at least 2 generations"),
        ({"mode": "beam"}, ValueError, "Unknown mode"),
        ({"success_threshold": float("nan")}, ValueError, "success_threshold"),
        ({"feedback_history": 0}, ValueError, "feedback_history"),
        ({"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, ValueError, "user"),
        ({"prompt": []}, ValueError, "at least one message"),
        ({"prompt": 42}, TypeError, "prompt must be"),
        ({"prompt": "  "}, ValueError, "empty"),
        ({"reward_fn": "not callable"}, TypeError, "callable"),
        ({"sdpo_config": {"enabled": True}}, TypeError, "SDPOConfig"),
    ],
)
def test_bad_input_fails_before_generating(scripted, kwargs, error, match):
    model, tok, gen = scripted()
    call = {"prompt": CHAT, "reward_fn": feedback_reward, "budget": 4, **kwargs}
    with pytest.raises(error, match=match):
        test_time_self_distill(model, tok, call.pop("prompt"), call.pop("reward_fn"), **call)
    assert gen.inputs == []


def test_reward_function_that_raises_is_named_with_the_attempts(scripted):
    model, tok, _ = scripted()
    my_checker = raising_on(2, ZeroDivisionError("sandbox crashed"), name="my_checker")
    with pytest.raises(
        RewardFunctionError, match=r"'my_checker' raised ZeroDivisionError: sandbox crashed.*5–8 \(round 2\)"
    ) as info:
        test_time_self_distill(model, tok, CHAT, my_checker, budget=12, num_candidates=4)
    assert isinstance(info.value.__cause__, ZeroDivisionError)


@pytest.mark.parametrize(
    ("output", "error", "match"),
    [
        ("1.0", TypeError, "returned str"),
        ([1.0], ValueError, "returned 1 values for 2 completions"),
        ([{"feedback": "x"}, 0.0], TypeError, "without a 'score' key"),
        ([{"score": 0.0, "feedback": 3}, 0.0], TypeError, "non-string feedback"),
        ([float("inf"), 0.0], ValueError, "finite"),
        (["high", 0.0], TypeError, "'bad_types'"),
    ],
)
def test_wrong_reward_output_types(scripted, output, error, match):
    model, tok, _ = scripted()

    def bad_types(completions, **kwargs):
        return output

    with pytest.raises(error, match=match):
        test_time_self_distill(model, tok, CHAT, bad_types, budget=2, num_candidates=2)


def test_instance_without_tokenizer_is_an_error():
    with pytest.raises(ValueError, match="processing_class is required"):
        test_time_self_distill(tiny_model(), None, QUESTION, feedback_reward, budget=2)


# ---------------------------------------------------------------------------------------------- real models


def _example():
    path = Path(__file__).parents[1] / "examples" / "test_time_distillation.py"
    spec = importlib.util.spec_from_file_location("test_time_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reprompt_beats_best_of_k_on_the_example_task():
    """The smoke model really generates: feedback in the reprompt makes it copy the secret."""
    ex = _example()
    tok = ex.tiny_tokenizer(extra_words=["secret"])
    model = ex.wired_copier(tok)
    found = {"reprompt": [], "best_of_k": []}
    for seed in range(3):
        prompt, secret = ex.make_question(seed, list_candidates=False)
        for mode in found:
            result = test_time_self_distill(
                model, tok, prompt, ex.secret_word_reward, mode=mode, budget=8, num_candidates=4,
                max_new_tokens=3, reward_kwargs={"secret": secret}, seed=seed,
            )  # fmt: skip
            found[mode].append(result.discovery_at_k)
            assert result.attempts[0].text in ex.ANSWERS
    # round 1 holds the question only (1/40 per attempt); round 2 holds "expected <secret>"
    assert all(k is not None and k <= 8 for k in found["reprompt"])
    assert sum(k is not None for k in found["best_of_k"]) < 3


def test_model_by_name(tmp_path):
    tok, model = tiny_tok(), tiny_model()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    result = test_time_self_distill(str(tmp_path), None, CHAT, feedback_reward, budget=2, max_new_tokens=3)
    assert result.attempts_used == 2 and result.model.config.hidden_size == model.config.hidden_size


def _train(model, tok, reward, budget, **kwargs):
    return test_time_self_distill(
        model,
        tok,
        CHAT,
        reward,
        mode="train",
        budget=budget,
        num_candidates=4,
        max_new_tokens=4,
        sdpo_config=SDPOConfig(distillation_topk=10),
        trainer_args={"learning_rate": 1e-2, "disable_tqdm": True, "logging_strategy": "no"},
        **kwargs,
    )


def test_train_mode_spends_exactly_the_budget(caplog):
    tok, model = tiny_tok(), tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sizes = []

    def reward(completions, **kwargs):
        sizes.append(len(completions))
        return feedback_reward(completions)

    with caplog.at_level(logging.WARNING):
        result = _train(model, tok, reward, budget=6)
    assert sizes == [4, 2] and result.attempts_used == 6 and result.rounds == 2
    assert result.stop_reason == "budget" and result.discovery_at_k is None
    assert not any(a.reprompted for a in result.attempts)  # the student samples from the plain question
    assert "All reward functions returned None" not in caplog.text  # the 2 over-budget completions are unscored
    moved = [n for n, p in result.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert moved, "the feedback-driven SDPO loss must update the student"


def test_train_mode_stops_at_the_first_success_with_lora():
    peft = pytest.importorskip("peft")
    tok, model = tiny_tok(), tiny_model()
    calls = []
    reward = solved_at(3)
    result = _train(
        model,
        tok,
        lambda completions, **kw: calls.append(1) or reward(completions),
        budget=40,
        peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    assert len(calls) == 1 and result.discovery_at_k == 3 and result.attempts_used == 4
    assert result.stop_reason == "success"
    # the teacher left no adapter behind: only the trained one
    assert isinstance(result.model, peft.PeftModel) and list(result.model.peft_config) == ["default"]


def test_train_mode_ctrl_c_keeps_the_history():
    tok, model = tiny_tok(), tiny_model()
    result = _train(model, tok, raising_on(2, KeyboardInterrupt()), budget=40)
    assert result.interrupted and result.attempts_used == 4 and result.stop_reason == "interrupted"
    assert not result.model.training


def test_train_mode_reward_error_propagates():
    tok, model = tiny_tok(), tiny_model()
    broken = raising_on(1, KeyError("tests"), name="broken")
    with pytest.raises(RewardFunctionError, match=r"'broken' raised KeyError.*attempts 1–4 \(round 1\)"):
        _train(model, tok, broken, budget=8)
