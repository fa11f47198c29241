"""SDPOTrainer end to end on a tiny random Qwen2 model (CPU)."""

from __future__ import annotations

import gc
import math
import re
import warnings

import pytest
import torch
from oracle import oracle_head
from tiny_setup import (
    chat_dataset,
    first_batch,
    grpo_args,
    half_success,
    half_success_with_feedback,
    make_trainer,
    model,
    peaked_model,
    tokenizer,
)
from transformers import Qwen2ForCausalLM

import sdpo_fast.objective.base as trainer_module  # where the trainer's objective calls the head
from sdpo_fast import SDPOConfig, SDPOTrainer
from sdpo_fast.objective.passes import teacher_states


def grads_of(trainer, inputs):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_sdpo_mode_replaces_grpo_loss_entirely(tmp_path):
    trainer = make_trainer(tmp_path)
    inputs = first_batch(trainer)
    assert inputs["self_distillation_mask"].sum() > 0
    loss_a, grads_a = grads_of(trainer, inputs)
    scrambled = dict(inputs, advantages=torch.randn_like(inputs["advantages"]) * 100)
    loss_b, grads_b = grads_of(trainer, scrambled)
    assert loss_a == loss_b and grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name
    assert trainer.args.beta == 0.0


def test_beta_is_forced_to_zero_and_logged(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        trainer = make_trainer(tmp_path, beta=0.04)
    assert trainer.beta == 0.0 and "beta=0.04 → 0.0" in caplog.text


def test_teacher_prompt_constructed_correctly(tmp_path):
    trainer = make_trainer(
        tmp_path, reward=half_success_with_feedback, sdpo=SDPOConfig(distillation_topk=10, success_reward_threshold=2.0)
    )
    tok = trainer.processing_class
    inputs = first_batch(trainer)
    texts = tok.batch_decode(inputs["teacher_input_ids"], skip_special_tokens=False)
    # threshold 2.0: no demonstrations, so feedback is used for the failing (even) samples only
    with_feedback = [t for t in texts if "feedback from your unsuccessful earlier attempt" in t]
    assert with_feedback, texts
    for text in with_feedback:
        prompt = text.replace("<|endoftext|>", "").strip()
        assert prompt.startswith("<|im_start|> system you are helpful <|im_end|> <|im_start|> user what is")
        assert prompt.count("<|im_start|> user") == 1 and prompt.count("what is") == 1  # no double chat template
        assert re.search(r"following is feedback from your unsuccessful earlier attempt : expected \d+ but got", prompt)
        assert "correctly solve the original question. <|im_end|> <|im_start|> assistant" in prompt
    trainer2 = make_trainer(tmp_path, reward=half_success_with_feedback)
    texts = tok.batch_decode(first_batch(trainer2)["teacher_input_ids"], skip_special_tokens=False)
    demos = [t for t in texts if "correct solution :" in t]
    assert demos and not any("feedback from" in t for t in demos)  # feedback only without a solution


def test_teacher_rows_end_with_the_exact_completion(tmp_path):
    trainer = make_trainer(tmp_path)
    inputs = first_batch(trainer)
    t = inputs["completion_ids"].shape[1]
    assert torch.equal(inputs["teacher_input_ids"][:, -t:], inputs["completion_ids"])
    assert torch.equal(inputs["teacher_attention_mask"][:, -t:], inputs["completion_mask"].long())
    assert inputs["teacher_input_ids"].shape[0] == inputs["completion_ids"].shape[0]


def test_student_topk_passed_to_teacher(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, sdpo=SDPOConfig(distillation_topk=5, distillation_alpha=0.0))
    captured = {}
    real = trainer_module.sdpo_head

    def spy(*args, **kwargs):
        captured["args"], captured["kwargs"] = [a.detach().clone() for a in args], kwargs
        out = real(*args, **kwargs)
        captured["out"] = out
        return out

    monkeypatch.setattr(trainer_module, "sdpo_head", spy)
    trainer.compute_loss(trainer.model, first_batch(trainer))
    h_s, w_s, h_t, w_t, y = captured["args"]
    assert not torch.equal(h_s, h_t)  # the teacher really is a different context
    div, _, _ = oracle_head(h_s, w_s, h_t, w_t, y, topk=5, add_tail=True, alpha=0.0, temperature=trainer.temperature)
    torch.testing.assert_close(captured["out"][0].divergence.double(), div, rtol=1e-4, atol=1e-6)
    # the same divergence on the *teacher's* own top-K is a different number: the support comes from the student
    swapped, _, _ = oracle_head(h_t, w_t, h_s, w_s, y, topk=5, add_tail=True, alpha=1.0)
    assert not torch.allclose(swapped, div, rtol=1e-3)


def test_ema_updates_ref_model_in_place(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=1, sdpo=SDPOConfig(distillation_topk=10, teacher_update_rate=0.25))
    teacher = trainer.ref_model
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    trainer.train()
    assert trainer.ref_model is teacher and trainer.ema_callback.fired_at == [1]
    student = dict(trainer.model.named_parameters())
    changed = 0
    for name, p in teacher.named_parameters():
        torch.testing.assert_close(p, 0.75 * before[name] + 0.25 * student[name].detach(), rtol=1e-6, atol=1e-7)
        changed += not torch.equal(p, before[name])
    assert changed > 0 and all(not p.requires_grad for p in teacher.parameters())


def test_no_third_model_created(tmp_path):
    gc.collect()
    before = sum(isinstance(o, Qwen2ForCausalLM) for o in gc.get_objects())
    trainer = make_trainer(tmp_path)
    gc.collect()
    created = sum(isinstance(o, Qwen2ForCausalLM) for o in gc.get_objects()) - before
    assert created == 2  # the student handed in, and exactly one teacher copy: the ref_model
    assert isinstance(trainer.ref_model, Qwen2ForCausalLM) and trainer.ref_model is not trainer.model
    assert not hasattr(trainer, "teacher_model")


def test_zero_teacher_coverage_zero_loss(tmp_path):
    trainer = make_trainer(tmp_path, sdpo=SDPOConfig(distillation_topk=10, success_reward_threshold=10.0))
    with pytest.warns(UserWarning, match="no sample in this generation batch has a demonstration"):
        inputs = first_batch(trainer)
    assert inputs["self_distillation_mask"].sum() == 0
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in trainer.model.parameters())
    with warnings.catch_warnings(record=True) as caught:  # warned once only
        warnings.simplefilter("always")
        first_batch(trainer)
    assert not any("no sample in this generation batch" in str(w.message) for w in caught)


def test_reward_func_dict_format_extracts_feedback(tmp_path):
    trainer = make_trainer(
        tmp_path, reward=half_success_with_feedback, sdpo=SDPOConfig(distillation_topk=10, success_reward_threshold=2.0)
    )
    inputs = first_batch(trainer)
    assert re.fullmatch(r"expected \d+ but got something else", trainer._rollouts.feedback[0])
    assert trainer._rollouts.feedback[1] is None
    assert inputs["self_distillation_mask"].sum() == 2  # the two failing samples have feedback, no demos
    assert trainer._metrics["train"]["self_distillation/feedback_used_fraction"][-1] == 0.5


def test_reward_func_float_format_no_feedback(tmp_path):
    trainer = make_trainer(
        tmp_path, reward=half_success, sdpo=SDPOConfig(distillation_topk=10, success_reward_threshold=2.0)
    )
    with pytest.warns(UserWarning):
        inputs = first_batch(trainer)
    assert trainer._rollouts.feedback == [None] * 4
    assert inputs["self_distillation_mask"].sum() == 0


@pytest.mark.slow
def test_training_loop_completes_10_steps(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=10)
    trainer.train()
    assert trainer.state.global_step == 10
    logs = [h for h in trainer.state.log_history if "sdpo/loss" in h]
    assert len(logs) == 10 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert logs[0]["sdpo/backend"] == "torch"
    for key in (
        "self_distillation/success_group_fraction",
        "self_distillation/success_sample_fraction",
        "self_distillation/feedback_available_fraction",
        "self_distillation/feedback_used_fraction",
        "self_distillation/reprompt_sample_fraction",
        "self_distillation/empty_target_batch",
        "self_distillation/reprompt_truncated_count",
        "self_distillation/teacher_prompt_length_mean",
        "sdpo/kl_student_teacher",
        "reward",
    ):
        assert key in logs[-1], key
    for h in logs:  # the logged loss is the SDPO loss, not a multiple of it
        assert h["loss"] == pytest.approx(h["sdpo/loss"], rel=1e-4, abs=1e-9)


@pytest.mark.slow
def test_loss_decreases_over_steps(tmp_path):
    # A trivial task: every sibling succeeds, the teacher is frozen (τ = 0), and the student is pulled
    # towards the demonstration-conditioned teacher on a single repeated prompt.
    ds = chat_dataset(n=1, system=False).select([0] * 128)

    def always(completions, **kw):
        return [1.0] * len(completions)

    trainer = make_trainer(
        tmp_path,
        reward=always,
        dataset=ds,
        max_steps=16,
        learning_rate=3e-2,
        model_=peaked_model(),
        sdpo=SDPOConfig(distillation_topk=10, teacher_update_rate=0.0, distillation_alpha=1.0),
    )
    trainer.train()
    losses = [h["sdpo/loss"] for h in trainer.state.log_history if "sdpo/loss" in h]
    assert losses[0] > 0.1  # a real gap between the student and the demonstration-conditioned teacher
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum-norm"])
def test_gradient_accumulation_invariance(tmp_path, agg):
    # GA=4 × 2 per device and GA=1 × 8 see the same 8 completions (one generate call each) and must
    # take the same optimizer step: `compute_self_distillation_loss` over the step's 8 samples.
    def step(ga, bs):
        trainer = make_trainer(
            tmp_path / f"ga{ga}",
            per_device_train_batch_size=bs,
            gradient_accumulation_steps=ga,
            max_steps=1,
            num_generations=8,
            optim="sgd",
            learning_rate=1.0,
            max_grad_norm=0.0,
            sdpo=SDPOConfig(distillation_topk=10, teacher_update_rate=0.0, loss_agg_mode=agg),
        )
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()
        return {n: p.detach() - before[n] for n, p in trainer.model.named_parameters()}, trainer.state.log_history[0]

    delta_a, log_a = step(4, 2)
    delta_b, log_b = step(1, 8)
    total = sum(float(d.abs().sum()) for d in delta_b.values())
    assert total > 0
    for name in delta_a:
        torch.testing.assert_close(delta_a[name], delta_b[name], rtol=1e-4, atol=1e-7)
    assert log_a["loss"] == pytest.approx(log_b["loss"], rel=1e-4)


@pytest.mark.slow
def test_teacher_rows_stay_aligned_across_shuffle_and_iterations(tmp_path, monkeypatch):
    trainer = make_trainer(
        tmp_path,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        steps_per_generation=4,
        num_iterations=2,
        max_steps=8,
        generation_batch_size=None,
    )
    seen = []
    real = SDPOTrainer.compute_loss

    def checked(self, model, inputs, *a, **k):
        t = inputs["completion_ids"].shape[1]
        assert torch.equal(inputs["teacher_input_ids"][:, -t:], inputs["completion_ids"])
        seen.append(inputs["completion_ids"].clone())
        return real(self, model, inputs, *a, **k)

    monkeypatch.setattr(SDPOTrainer, "compute_loss", checked)
    trainer.train()
    assert len(seen) == 8
    assert trainer.ema_callback.period == 8 and trainer.ema_callback.fired_at == [8]


@pytest.mark.slow
def test_ema_cadence_once_per_generation_batch(tmp_path):
    trainer = make_trainer(tmp_path, num_iterations=2, max_steps=6)
    trainer.train()
    assert trainer.ema_callback.period == 2 and trainer.ema_callback.fired_at == [2, 4, 6]


def test_enabled_false_equals_plain_grpo_exactly(tmp_path):
    from trl import GRPOTrainer

    sdpo = make_trainer(tmp_path / "a", sdpo=SDPOConfig(enabled=False), max_steps=2)
    assert sdpo.ref_model is None and not hasattr(sdpo, "ema_callback")
    sdpo.train()
    torch.manual_seed(0)
    grpo = GRPOTrainer(
        model(),
        half_success,
        args=grpo_args(tmp_path / "b", max_steps=2),
        train_dataset=chat_dataset(),
        processing_class=tokenizer(),
    )
    grpo.train()
    for (na, pa), (nb, pb) in zip(sdpo.model.named_parameters(), grpo.model.named_parameters()):
        assert na == nb and torch.equal(pa, pb), na
    assert sdpo.state.log_history[-1]["train_loss"] == grpo.state.log_history[-1]["train_loss"]


def test_grpo_weight_blending(tmp_path):
    from trl import GRPOTrainer

    trainers = {
        w: make_trainer(tmp_path / str(w), sdpo=SDPOConfig(distillation_topk=10, grpo_weight=w))
        for w in (0.0, 0.5, 1.0)
    }
    inputs = first_batch(trainers[0.0])
    losses = {w: t.compute_loss(t.model, inputs).item() for w, t in trainers.items()}
    assert losses[0.5] == pytest.approx(0.5 * losses[0.0] + 0.5 * losses[1.0], rel=1e-5)
    assert losses[1.0] != losses[0.0]
    # λ = 1 is exactly TRL's own GRPO loss on the same batch and the same student forward
    trainers[1.0].current_gradient_accumulation_steps = 1
    trl_loss = GRPOTrainer._compute_loss(trainers[1.0], trainers[1.0].model, inputs).item()
    assert losses[1.0] == pytest.approx(trl_loss, rel=1e-5, abs=1e-8)


def test_lora_teacher_is_a_snapshot_in_the_one_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer = make_trainer(
        tmp_path,
        peft_config=lora,
        max_steps=2,
        learning_rate=5e-2,
        sdpo=SDPOConfig(distillation_topk=10, teacher_update_rate=0.5),
    )
    assert trainer.ref_model is None and trainer.teacher.kind == "lora-snapshot"
    assert list(trainer.model.peft_config) == ["default"]
    assert not any("teacher" in k for k in trainer.model.state_dict())  # nothing for vLLM sync to pick up
    before = {n: t.clone() for n, t in trainer.teacher.snapshot.items()}
    trainer.train()
    moved = sum(not torch.equal(t, before[n]) for n, t in trainer.teacher.snapshot.items())
    assert moved > 0 and trainer.ema_callback.fired_at == [1, 2]
    assert not any(t.requires_grad for t in trainer.teacher.snapshot.values())
    assert trainer.model.active_adapter == "default"
    # the teacher trails the student: τ = 0.5 twice from the same start, while the student moved on
    assert any(not torch.equal(t, trainer.teacher.params[n]) for n, t in trainer.teacher.snapshot.items())
    logs = [h for h in trainer.state.log_history if "sdpo/loss" in h]
    assert all(h["self_distillation/reprompt_sample_fraction"] > 0 for h in logs)


def test_teacher_checkpoint_save_and_resume(tmp_path):
    from transformers import TrainerCallback

    kwargs = dict(
        max_steps=2, save_strategy="steps", save_steps=2, sdpo=SDPOConfig(distillation_topk=10, teacher_update_rate=0.5)
    )
    trainer = make_trainer(tmp_path, **kwargs)
    trainer.train()
    saved_teacher = {n: p.detach().clone() for n, p in trainer.ref_model.named_parameters()}
    student = dict(trainer.model.named_parameters())
    assert any(not torch.equal(saved_teacher[n], student[n]) for n in saved_teacher)
    ckpt = tmp_path / "checkpoint-2"
    assert (ckpt / "sdpo_teacher.pt").exists()

    class Snapshot(TrainerCallback):
        """The teacher right after the checkpoint is restored, before any further step."""

        def on_train_begin(self, args, state, control, **kw):
            self.teacher = {n: p.detach().clone() for n, p in resumed.ref_model.named_parameters()}

    resumed = make_trainer(tmp_path, **{**kwargs, "max_steps": 3})  # its fresh teacher = the untrained model
    assert any(not torch.equal(p, saved_teacher[n]) for n, p in resumed.ref_model.named_parameters())
    snapshot = Snapshot()
    resumed.add_callback(snapshot)
    resumed.train(resume_from_checkpoint=str(ckpt))
    for n, p in snapshot.teacher.items():
        assert torch.equal(p, saved_teacher[n]), n
    assert resumed.state.global_step == 3  # and training continued from there


def test_trust_region_teacher_blends_initial_and_live_logits(tmp_path, monkeypatch):
    trainer = make_trainer(
        tmp_path, sdpo=SDPOConfig(distillation_topk=10, teacher_regularization="trust-region", teacher_update_rate=0.3)
    )
    assert not hasattr(trainer, "ema_callback")
    with torch.no_grad():  # make the live student differ from the frozen initial copy
        for p in trainer.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    inputs = first_batch(trainer)
    captured = {}
    real = trainer_module.sdpo_head
    monkeypatch.setattr(trainer_module, "sdpo_head", lambda *a, **k: captured.setdefault("a", a) and real(*a, **k))
    trainer.compute_loss(trainer.model, inputs)
    _, _, t_h, t_w, _ = captured["a"]
    logits = t_h.double() @ t_w.double().t()
    # reference: run both models on the teacher prompts and blend their logits
    mask = (inputs["self_distillation_mask"] > 0).unsqueeze(1) & inputs["completion_mask"].bool()
    pos = (inputs["teacher_attention_mask"].cumsum(1) - 1).clamp(min=0)
    t = inputs["completion_ids"].shape[1]

    def full_logits(m):
        return (
            m(input_ids=inputs["teacher_input_ids"], attention_mask=inputs["teacher_attention_mask"], position_ids=pos)
            .logits[:, -t - 1 : -1][mask]
            .double()
        )

    with torch.no_grad():
        expected = 0.7 * full_logits(trainer.ref_model) + 0.3 * full_logits(trainer.model)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ bad input


def test_bad_reward_outputs_are_clear_errors(tmp_path):
    cases = [
        (
            lambda completions, **k: [0.0] * (len(completions) - 1),
            ValueError,
            r"returned 3 rewards, but 4 were expected",
        ),
        (lambda completions, **k: [{"feedback": "x"}] * len(completions), TypeError, r"without a 'score' key"),
        (
            lambda completions, **k: [{"score": 1.0, "feedback": 3}] * len(completions),
            TypeError,
            r"non-string feedback",
        ),
        (lambda completions, **k: ["good"] * len(completions), TypeError, r"returned 'good'"),
        (lambda completions, **k: [float("-inf")] * len(completions), ValueError, r"returned -inf .* finite"),
        (lambda completions, **k: "1.0", TypeError, r"returned str"),
    ]
    for func, exc, pattern in cases:
        func.__name__ = "my_reward"
        trainer = make_trainer(tmp_path, reward=func)
        with pytest.raises(exc, match=pattern) as info:
            first_batch(trainer)
        assert "my_reward" in str(info.value)


def test_none_scores_keep_trl_meaning(tmp_path):
    def sometimes(completions, **k):
        return [None if i == 0 else float(i % 2) for i in range(len(completions))]

    trainer = make_trainer(tmp_path, reward=sometimes)
    inputs = first_batch(trainer)
    assert math.isnan(trainer._rollouts.scores[0])
    assert inputs["self_distillation_mask"].shape == (4,)


def test_dataset_and_config_errors_at_construction(tmp_path):
    from datasets import Dataset

    bad_turn = Dataset.from_dict(
        {"prompt": [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]] * 4}
    )
    with pytest.raises(ValueError, match="must be a user turn"):
        make_trainer(tmp_path, dataset=bad_turn)
    tok = tokenizer()
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        SDPOTrainer(
            model(),
            half_success,
            args=grpo_args(tmp_path),
            train_dataset=chat_dataset(),
            processing_class=tok,
        )
    with pytest.raises(ValueError, match="exceeds the model's vocabulary size"):
        make_trainer(tmp_path, sdpo=SDPOConfig(distillation_topk=10**6))
    with pytest.raises(ValueError, match="sync_ref_model"):
        make_trainer(tmp_path, sync_ref_model=True, beta=0.1)


def test_positional_train_dataset_like_grpo_trainer(tmp_path):

    trainer = SDPOTrainer(model(), half_success, grpo_args(tmp_path), chat_dataset(), processing_class=tokenizer())
    assert trainer.sdpo_config == SDPOConfig() and len(trainer.train_dataset) == 8


def test_plain_text_prompts(tmp_path):
    from datasets import Dataset

    ds = Dataset.from_dict({"prompt": [f"what is {i} plus {i}?" for i in range(8)]})
    trainer = make_trainer(tmp_path, dataset=ds)
    inputs = first_batch(trainer)
    text = trainer.processing_class.decode(inputs["teacher_input_ids"][0], skip_special_tokens=True)
    assert "<|im_start|>" not in trainer.processing_class.decode(inputs["teacher_input_ids"][0])  # no chat template
    assert "correctly solve the original question." in text
    trainer.compute_loss(trainer.model, inputs).backward()


# ------------------------------------------------------------------ loss variants through the trainer


def _loss_and_grad(trainer, inputs):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
    return loss.detach(), grad


@pytest.mark.parametrize(
    "variant",
    [
        dict(distillation_topk=None),  # full vocabulary
        dict(full_logit_distillation=False, distillation_alpha=1.0),  # token-level
        dict(loss_agg_mode="seq-mean-token-mean"),
        dict(loss_agg_mode="seq-mean-token-sum"),
        dict(loss_agg_mode="seq-mean-token-sum-norm"),
        dict(distillation_add_tail=False, distillation_alpha=0.0),
    ],
    ids=[
        "full-vocab",
        "token-level",
        "seq-mean-token-mean",
        "seq-mean-token-sum",
        "seq-mean-token-sum-norm",
        "renorm-fkl",
    ],
)
def test_loss_variants_match_the_reference_function(tmp_path, variant, monkeypatch):
    """The trainer's loss equals `compute_self_distillation_loss` fed with the head's own log-probs."""
    from sdpo_fast import compute_self_distillation_loss

    cfg = SDPOConfig(**{"distillation_topk": 10, **variant})
    trainer = make_trainer(tmp_path, sdpo=cfg)
    inputs = first_batch(trainer)
    captured = {}
    real = trainer_module.sdpo_head
    monkeypatch.setattr(trainer_module, "sdpo_head", lambda *a, **k: captured.update(a=a, k=k) or real(*a, **k))
    loss = trainer.compute_loss(trainer.model, inputs)
    h_s, w_s, h_t, w_t, y = (t.detach().double() if t.is_floating_point() else t for t in captured["a"])
    # reference inputs from the same hidden states: full log-softmax in float64
    ls = torch.log_softmax(h_s @ w_s.t() / trainer.temperature, -1)
    lt = torch.log_softmax(h_t @ w_t.t() / trainer.temperature, -1)
    mask = inputs["completion_mask"].bool() & (inputs["self_distillation_mask"] > 0).unsqueeze(1)

    def to_bt(x):  # scatter per-token rows back to (B, T, …)
        out = x.new_zeros(*mask.shape, *x.shape[1:])
        out[mask] = x
        return out

    kw = {}
    if cfg.distillation_topk is not None and cfg.full_logit_distillation:
        idx = torch.topk(ls, cfg.distillation_topk, -1).indices
        kw.update(student_topk_log_probs=to_bt(ls.gather(1, idx)), teacher_topk_log_probs=to_bt(lt.gather(1, idx)))
    elif cfg.full_logit_distillation:
        kw.update(student_all_log_probs=to_bt(ls), teacher_all_log_probs=to_bt(lt))
    s_lp, t_lp = to_bt(ls.gather(1, y[:, None])[:, 0]), to_bt(lt.gather(1, y[:, None])[:, 0])
    expected, _ = compute_self_distillation_loss(
        s_lp,
        t_lp,
        inputs["completion_mask"].double(),
        old_log_probs=s_lp,
        self_distillation_mask=inputs["self_distillation_mask"],
        alpha=cfg.distillation_alpha,
        add_tail=cfg.distillation_add_tail,
        full_logit_distillation=cfg.full_logit_distillation,
        is_clip=cfg.is_clip,
        loss_agg_mode=cfg.loss_agg_mode,
        response_width=trainer.max_completion_length,  # R: the padded response width, as the reference pads
        **kw,
    )
    assert loss.item() == pytest.approx(expected.item(), rel=2e-4, abs=1e-7)


def test_teacher_micro_batches_do_not_change_the_loss(tmp_path):
    whole = make_trainer(tmp_path / "a", sdpo=SDPOConfig(distillation_topk=10))
    chunked = make_trainer(tmp_path / "b", sdpo=SDPOConfig(distillation_topk=10, teacher_micro_batch_size=1))
    inputs = first_batch(whole)
    loss_a, grad_a = _loss_and_grad(whole, inputs)
    loss_b, grad_b = _loss_and_grad(chunked, inputs)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_a, grad_b, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["naive", "triton"])
def test_head_backends_agree_inside_the_trainer(tmp_path, backend):
    ref = make_trainer(tmp_path / "torch", sdpo=SDPOConfig(distillation_topk=10, distillation_backend="torch"))
    other = make_trainer(tmp_path / backend, sdpo=SDPOConfig(distillation_topk=10, distillation_backend=backend))
    assert other.sdpo_backend == backend
    inputs = first_batch(ref)
    loss_a, grad_a = _loss_and_grad(ref, inputs)
    loss_b, grad_b = _loss_and_grad(other, inputs)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(grad_a, grad_b, rtol=1e-3, atol=1e-6)


# ------------------------------------------------------------------ review regressions


def test_bf16_autocast_default_keeps_the_head_in_fp32(tmp_path, monkeypatch):
    """TRL's GRPOConfig defaults to bf16: the head must still accumulate in fp32 inside the autocast forward."""
    trainer = make_trainer(tmp_path, bf16=True, sdpo=SDPOConfig(distillation_topk=10))
    inputs = first_batch(trainer)
    captured = {}
    real = trainer_module.sdpo_head

    def spy(*a, **k):
        captured["a"], captured["out"] = [t.detach().clone() for t in a], real(*a, **k)
        return captured["out"]

    monkeypatch.setattr(trainer_module, "sdpo_head", spy)
    trainer.compute_loss(trainer.model, inputs)
    h_s, w_s, h_t, w_t, y = captured["a"]
    div, _, _ = oracle_head(h_s, w_s, h_t, w_t, y, topk=10, add_tail=True, alpha=0.5, temperature=trainer.temperature)
    torch.testing.assert_close(captured["out"][0].divergence.double(), div, rtol=1e-4, atol=1e-6)


def _lora_trainer(tmp_path, **lora_kwargs):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **lora_kwargs)
    return make_trainer(tmp_path, peft_config=lora, sdpo=SDPOConfig(distillation_topk=10))


def test_lora_teacher_runs_without_dropout(tmp_path):
    trainer = _lora_trainer(tmp_path, lora_dropout=0.5)
    inputs = first_batch(trainer)
    trainer.model.train()
    mask = inputs["completion_mask"].bool() & (inputs["self_distillation_mask"] > 0).unsqueeze(1)
    rows = inputs["self_distillation_mask"] > 0
    states = lambda: teacher_states(trainer.teacher, trainer.model, inputs, mask, rows, None, trainer.objective.runtime)  # noqa: E731
    first, second = states()[0], states()[0]
    assert torch.equal(first, second) and trainer.model.training  # deterministic, and the mode is restored


def test_lora_teacher_uses_its_own_lm_head_copy(tmp_path):
    trainer = _lora_trainer(tmp_path, lora_dropout=0.0, modules_to_save=["lm_head"])
    student = trainer.model.get_output_embeddings().weight
    teacher = trainer.teacher.lm_head_weight(trainer.model)
    torch.testing.assert_close(teacher, student.detach())  # a copy of the student's at the start …
    with torch.no_grad():
        for name in trainer.teacher.params:
            if "modules_to_save" in name:
                trainer.teacher.snapshot[name].mul_(3.0)
    torch.testing.assert_close(trainer.teacher.lm_head_weight(trainer.model), 3 * student.detach())  # … but its own


def test_logit_scaling_of_every_kind_is_applied():
    from types import SimpleNamespace

    from sdpo_fast.forward import logit_scale as _logit_scale

    def fake(**fields):
        config = SimpleNamespace(model_type=fields.pop("model_type", "x"), **fields)
        config.get_text_config = lambda: config
        return SimpleNamespace(config=config)

    assert _logit_scale(fake()) == 1.0
    assert _logit_scale(fake(logit_scale=0.0625)) == 0.0625
    assert _logit_scale(fake(lm_head_multiplier=2.5)) == 2.5
    assert _logit_scale(fake(logits_scaling=8.0)) == 0.125  # Granite, MiniCPM3 divide
    assert _logit_scale(fake(logits_scaling=8.0, model_type="hyperclovax")) == 8.0


def test_image_datasets_are_refused(tmp_path):
    from datasets import Dataset

    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": "q"}]] * 4, "image": [None] * 4})
    with pytest.raises(NotImplementedError, match="text-only"):
        make_trainer(tmp_path, dataset=ds)
