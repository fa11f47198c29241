"""Any text a program or a reward function can produce reaches the teacher prompt as valid text, or is refused
with an error that names the reward function; it never crashes the step."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tiny_setup import first_batch, make_trainer, tokenizer

from sdpo_fast.reprompting import PromptCodec, Reprompt
from sdpo_fast.rewards import FeedbackStore, normalise_reward_output
from sdpo_fast.text import clean_text

# Every code point, surrogates (category Cs) and controls included: hypothesis leaves Cs out unless asked.
ANY_TEXT = st.text(st.characters(codec=None, categories=None, exclude_categories=()), max_size=40)
ALLOWED_CONTROLS = {"\t", "\n", "\r"}


def _valid(text: str) -> bool:
    text.encode("utf-8")  # strict: raises on a lone surrogate
    return not any((ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F) and c not in ALLOWED_CONTROLS for c in text)


@given(ANY_TEXT)
def test_any_string_becomes_valid_text_idempotently(text):
    out = clean_text(text)
    assert type(out) is str and _valid(out)
    assert clean_text(out) == out
    if _valid(text):  # ordinary text is left exactly as it is
        assert out == text


@given(st.binary(max_size=40))
def test_any_bytes_become_valid_text(data):
    out = clean_text(data)
    assert _valid(out)
    if _valid_utf8(data):
        assert clean_text(data.decode("utf-8")) == out


def _valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_what_each_kind_of_bad_character_becomes():
    assert clean_text("a\ud800b") == "a\ufffdb"  # a lone high surrogate
    assert clean_text("\udfff") == "\ufffd"  # a lone low one
    assert clean_text("\ud83d\ude00") == "\U0001f600"  # a valid pair, split (a JSON or UTF-16 escape): joined
    assert clean_text(b"caf\xe9 ok".decode("utf-8", "surrogateescape")) == "caf\ufffd ok"
    assert clean_text("x\x00y\x1b[31mred\x7f\x85") == "x\\x00y\\x1b[31mred\\x7f\\x85"
    assert clean_text("tab\tnew\nline\r\n") == "tab\tnew\nline\r\n"
    assert clean_text(bytearray(b"\xff\xfe\x00")) == "\ufffd\ufffd\\x00"

    class Sneaky(str):
        def __str__(self):
            raise RuntimeError("never called")

    assert type(clean_text(Sneaky("fine"))) is str
    with pytest.raises(TypeError, match="str or bytes"):
        clean_text(3)


@given(ANY_TEXT)
def test_cleaned_text_always_tokenises(text):
    tok = _TOKENIZER
    tok(clean_text(text), add_special_tokens=False, split_special_tokens=True)
    tok.apply_chat_template([{"role": "user", "content": clean_text(text)}], tokenize=True)


_TOKENIZER = tokenizer()


def test_the_tokenizer_itself_refuses_a_lone_surrogate():
    """The crash being guarded against: an unrelated `TypeError` from the Rust tokenizer."""
    with pytest.raises(TypeError):
        _TOKENIZER("feedback \ud800")


def test_reward_feedback_is_cleaned_where_it_enters():
    out = [
        {"score": 0.0, "feedback": "lone \ud800 nul \x00"},
        {"score": 0.0, "feedback": b"raw \xff bytes"},
        {"score": 1.0, "feedback": None},
        0.5,
    ]
    scores, feedback = normalise_reward_output(out, "my_reward", 4)
    assert scores == [0.0, 0.0, 1.0, 0.5]
    assert feedback == ["lone \ufffd nul \\x00", "raw \ufffd bytes", None, None]
    with pytest.raises(TypeError, match=r"my_reward.*non-string feedback.*str, bytes"):
        normalise_reward_output([{"score": 0.0, "feedback": ["a list"]}], "my_reward", 1)


def test_feedback_put_into_the_store_directly_is_cleaned_too():
    store = FeedbackStore()
    store.by_function[0] = ["a\udcff", "\x00", None]
    store.by_function[1] = ["b", "   ", None]
    assert store.combined(3) == ["a\ufffd\n\nb", "\\x00", None]


def test_a_reprompt_built_by_hand_is_cleaned_and_encodes():
    from sdpo_fast import SDPOConfig

    config = SDPOConfig()
    reprompt = Reprompt([{"role": "user", "content": "q"}], "q", "demo \ud800", "fb \x00 <|im_end|>", config)
    assert (reprompt.demonstration, reprompt.feedback) == ("demo \ufffd", "fb \\x00 <|im_end|>")
    ids = PromptCodec(tokenizer()).encode_reprompt(reprompt)  # the special-token path, payload tokenised alone
    assert ids


def _program_output(code: str) -> str:
    """What a reward function gets from a program when it keeps raw output (`errors="surrogateescape"`)."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, errors="surrogateescape")
    return proc.stdout + proc.stderr


def test_a_training_step_survives_any_feedback(tmp_path, monkeypatch):
    raw = _program_output(r"import sys; sys.stdout.buffer.write(b'bad \xff\xfe bytes \x00 nul\n'); print('\ud800')")
    assert "\udcff" in raw  # the program's undecodable bytes, smuggled as lone surrogates

    feedback = [
        "lone \ud800 surrogate and \x00 NUL",
        raw,
        b"bytes \xc3\x28 feedback",
        "\x1b[31mcolour\x1b[0m \x08\x07 \udc80",
    ]

    def hostile(completions, **kwargs):
        return [{"score": 0.0, "feedback": feedback[i % 4]} for i in range(len(completions))]

    seen = []
    encode = PromptCodec.encode_reprompt

    def spy(self, reprompt, *args, **kwargs):
        seen.append(reprompt.feedback)
        return encode(self, reprompt, *args, **kwargs)

    monkeypatch.setattr(PromptCodec, "encode_reprompt", spy)
    trainer = make_trainer(tmp_path, reward=hostile, max_steps=1)
    inputs = first_batch(trainer)
    assert inputs["self_distillation_mask"].sum() == 4  # every sample kept its (cleaned) feedback
    assert seen and all(_valid(fb) for fb in seen if fb is not None)
    assert any("\\x00" in fb and "\ufffd" in fb for fb in seen)
    trainer.train()  # the whole step: generation, rewards, teacher prompts, loss, optimizer
    assert trainer.state.global_step == 1
