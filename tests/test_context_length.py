"""Teacher prompt + completion must fit the model's context: absolute positions (GPT-2) would crash with an
IndexError, RoPE positions (Qwen2) would silently run past the trained length. Pure functions first, then the
trainer end to end on both kinds of model."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from tiny_setup import chat_dataset, first_batch, make_trainer, tokenizer
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, Qwen2Config

from sdpo_fast import SDPOConfig
from sdpo_fast.checks import check_context_length, model_context_length
from sdpo_fast.reprompting import PromptCodec, build_teacher_contexts, tokenize_reprompt
from sdpo_fast.teacher_batch import ScoredRollouts, batch_report, build_teacher_batch
from sdpo_fast.testing import tiny_qwen2, tiny_tokenizer

# ------------------------------------------------------------------ reading the context from a config


def test_model_context_length_reads_each_convention():
    assert model_context_length(GPT2Config(n_positions=96)) == 96
    assert model_context_length(Qwen2Config(max_position_embeddings=2048)) == 2048
    assert model_context_length(type("Remote", (), {"max_sequence_length": 512})()) == 512
    assert model_context_length(type("Remote", (), {"n_ctx": 300})()) == 300
    assert model_context_length(type("Unknown", (), {"hidden_size": 8})()) is None
    assert model_context_length(None) is None


def test_model_context_length_counts_a_context_extending_rope_scaling():
    yarn = Qwen2Config(max_position_embeddings=4096)
    yarn.rope_parameters = {
        "rope_type": "yarn",
        "rope_theta": 1e6,
        "factor": 4.0,
        "original_max_position_embeddings": 4096,
    }
    assert model_context_length(yarn) == 16384
    # Llama 3's scaling already states the extended length in max_position_embeddings: kept as it is.
    llama3 = LlamaConfig(max_position_embeddings=131072)
    llama3.rope_parameters = {
        "rope_type": "llama3",
        "rope_theta": 5e5,
        "factor": 8.0,
        "original_max_position_embeddings": 8192,
    }
    assert model_context_length(llama3) == 131072


def test_construction_warning_names_the_setting_and_the_cap(caplog):
    args = type("Args", (), {"max_completion_length": 256})()
    with caplog.at_level(logging.WARNING, logger="sdpo_fast.checks"):
        check_context_length(args, SDPOConfig(max_reprompt_len=1024), 1024)
    assert "max_reprompt_len=1024 plus max_completion_length=256 exceeds the model's context of 1024" in caplog.text
    assert "max_reprompt_len <= 768" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sdpo_fast.checks"):
        check_context_length(args, SDPOConfig(max_reprompt_len=768), 1024)  # fits exactly
        check_context_length(args, SDPOConfig(max_reprompt_len=10**6), None)  # unknown context: nothing to say
    assert caplog.text == ""


# ------------------------------------------------------------------ the pure teacher batch

PROMPT = [{"role": "system", "content": "you are helpful"}, {"role": "user", "content": "what is the answer ?"}]


def _rollouts(words: int) -> ScoredRollouts:
    """One group of four, two successes: every sample gets a sibling's long completion as its demonstration."""
    long = " ".join(["one"] * (words // 2) + ["two"] * (words - words // 2))
    return ScoredRollouts(
        prompts=[PROMPT] * 4, completions=[long] * 4, feedback=[None] * 4, scores=[0.0, 1.0, 0.0, 1.0]
    )


def _warnings(batch, config) -> dict[str, str]:
    """What the trainer would warn about for this batch (one process: its own summary is the sum)."""
    return batch_report(batch, batch.summary(), True, config, n_global=4)[1]


def _full_prompts(rollouts, codec, config):
    """Each sample's untruncated teacher prompt ids (no context, no max_reprompt_len bound)."""
    batch = build_teacher_batch(
        rollouts, codec, dataclasses.replace(config, max_reprompt_len=10**6), start=0, count=4, pad_id=0
    )
    return [row[mask.bool()].tolist() for row, mask in zip(batch.prompt_ids, batch.prompt_mask)]


@pytest.mark.parametrize("truncation", ["middle", "left", "right"])
def test_every_teacher_row_fits_the_context(truncation):
    tok = tiny_tokenizer()
    codec = PromptCodec(tok)
    config = SDPOConfig(reprompt_truncation=truncation)
    rollouts = _rollouts(80)
    full = _full_prompts(rollouts, codec, config)
    context, completions = 96, [4, 8, 30, 90]
    assert all(len(f) + 4 > context for f in full)  # every sample would overrun the model
    batch = build_teacher_batch(
        rollouts, codec, config, start=0, count=4, pad_id=0, context_len=context, completion_lengths=completions
    )
    lengths = batch.prompt_mask.sum(dim=1).tolist()
    for length, completion in zip(lengths, completions):
        assert length + completion <= context
    # 90 completion tokens leave 6 prompt positions: below what any teacher prompt needs, so masked and counted.
    assert batch.self_distillation_mask.tolist()[3] == (0.0 if truncation == "middle" else 1.0)
    if truncation == "middle":
        assert batch.overflow == 1 and batch.truncated == 4
        assert batch.self_distillation_mask.tolist()[:3] == [1.0, 1.0, 1.0]
        text = tok.decode(batch.prompt_ids[0][batch.prompt_mask[0].bool()].tolist())
        assert "what is the answer" in text and text.rstrip().endswith("<|im_start|> assistant")
    else:
        for i, completion in enumerate(completions):
            room = context - completion
            expected = full[i][-room:] if truncation == "left" else full[i][:room]
            assert batch.prompt_ids[i][batch.prompt_mask[i].bool()].tolist() == expected
    warned = _warnings(batch, config)
    assert set(warned) == {"context"}  # the context's own warning, not max_reprompt_len's
    message = warned["context"]
    assert (
        "exceeded the model's context of 96 positions" in message and f"reprompt_truncation={truncation!r}" in message
    )
    assert "max_reprompt_len" in message and "max_completion_length" in message


def test_no_room_at_all_masks_the_sample_instead_of_passing_the_whole_prompt():
    codec = PromptCodec(tiny_tokenizer())
    batch = build_teacher_batch(
        _rollouts(10), codec, SDPOConfig(reprompt_truncation="left"), start=0, count=4, pad_id=0,
        context_len=16, completion_lengths=[16, 16, 20, 0],
    )  # fmt: skip
    assert batch.prompt_mask.sum(dim=1).tolist()[:3] == [0, 0, 0]
    assert batch.self_distillation_mask.tolist() == [0.0, 0.0, 0.0, 1.0]
    assert batch.overflow == 3


def test_the_tighter_bound_wins_and_fitting_prompts_are_untouched():
    codec = PromptCodec(tiny_tokenizer())
    rollouts = _rollouts(6)
    full = _full_prompts(rollouts, codec, SDPOConfig())
    roomy = build_teacher_batch(
        rollouts, codec, SDPOConfig(), start=0, count=4, pad_id=0, context_len=4096, completion_lengths=[8] * 4
    )
    assert [r[m.bool()].tolist() for r, m in zip(roomy.prompt_ids, roomy.prompt_mask)] == full
    assert roomy.truncated == 0 and _warnings(roomy, SDPOConfig()) == {}
    # max_reprompt_len tighter than the context: its own (old) warning, not the context's.
    long_rollouts = _rollouts(200)
    capped = build_teacher_batch(
        long_rollouts, codec, SDPOConfig(max_reprompt_len=20), start=0, count=4, pad_id=0,
        context_len=4096, completion_lengths=[8] * 4,
    )  # fmt: skip
    warned = _warnings(capped, SDPOConfig(max_reprompt_len=20))
    assert set(warned) == {"overflow"} and "max_reprompt_len=20" in warned["overflow"]


def test_error_policy_names_the_context_as_the_bound():
    codec = PromptCodec(tiny_tokenizer())
    with pytest.raises(ValueError, match=r"the model's context of 64 positions less a 30-token completion"):
        build_teacher_batch(
            _rollouts(80), codec, SDPOConfig(reprompt_truncation="error"), start=0, count=4, pad_id=0,
            context_len=64, completion_lengths=[30] * 4,
        )  # fmt: skip


def test_context_without_completion_lengths_is_refused():
    with pytest.raises(ValueError, match="one completion length per local sample"):
        build_teacher_batch(
            _rollouts(4), PromptCodec(tiny_tokenizer()), SDPOConfig(), start=0, count=4, pad_id=0, context_len=64
        )


def test_left_truncation_to_zero_tokens_is_an_overflow_not_the_whole_prompt():
    codec = PromptCodec(tiny_tokenizer())
    ctx = build_teacher_contexts([PROMPT, PROMPT], ["a", "a"], [1.0, 1.0], ["x y", "x y"], [None, None], SDPOConfig())
    out = tokenize_reprompt(ctx.reprompts[0], codec, max_len=0, truncation="left")
    assert out.ids == [] and out.overflow


# ------------------------------------------------------------------ end to end


def long_feedback(completions, **kwargs):
    """Half the samples fail with a long verdict: their teacher prompts outgrow a short context."""
    return [
        {"score": float(i % 2), "feedback": None if i % 2 else "expected 4 but got " + "wrong " * 60}
        for i in range(len(completions))
    ]


def _gpt2(n_positions: int) -> GPT2LMHeadModel:
    tok = tokenizer()
    config = GPT2Config(
        vocab_size=len(tok), n_positions=n_positions, n_embd=32, n_layer=2, n_head=2,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = None
    return model


def _teacher_positions(inputs) -> list[int]:
    """The highest position each teacher row uses (positions follow the attention mask)."""
    return (inputs["teacher_attention_mask"].sum(dim=1) - 1).tolist()


@pytest.mark.parametrize("kind", ["gpt2-absolute", "qwen2-rope"])
def test_training_on_a_short_context_model_neither_crashes_nor_overruns(tmp_path, kind):
    context = 64
    model = _gpt2(context) if kind == "gpt2-absolute" else tiny_qwen2(tokenizer(), max_position_embeddings=context)
    trainer = make_trainer(
        tmp_path, model_=model, reward=long_feedback, dataset=chat_dataset(),
        sdpo=SDPOConfig(distillation_topk=10, success_reward_threshold=2.0), max_steps=1,
    )  # fmt: skip
    with pytest.warns(UserWarning, match=f"exceeded the model's context of {context} positions") as caught:
        inputs = first_batch(trainer)
    assert sum("exceeded the model's context" in str(w.message) for w in caught) == 1
    assert max(_teacher_positions(inputs)) < context
    assert inputs["self_distillation_mask"].sum() == 2  # the failing samples, trimmed to fit, not masked out
    assert trainer._metrics["train"]["self_distillation/reprompt_truncated_count"][-1] == 2
    loss = trainer.compute_loss(trainer.model, inputs)
    assert torch.isfinite(loss) and loss.item() > 0
    trainer.train()  # a whole step, the teacher forward included (GPT-2 raised IndexError here)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
