"""`SDPOTrainer` as a drop-in `GRPOTrainer`: TRL's conventions and behaviours that SDPO must not change.

Each test reproduces an incompatibility found by running SDPOTrainer through GRPO usage it had never
seen (MoE aux losses, reward-function identity and call shapes, generation signature checks, the
positional order, NaN rewards, exception types, ignored options).
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from tiny_setup import chat_dataset, first_batch, grpo_args, half_success, make_trainer, model, tokenizer
from transformers import Qwen2ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM, TrainerCallback
from trl import GRPOTrainer

from sdpo_fast import SDPOConfig, SDPOTrainer
from sdpo_fast.forward import SDPORequest, add_sdpo_forward
from sdpo_fast.rewards import FeedbackStore, wrap_reward_function

# ------------------------------------------------------------------ 1. MoE router losses


def tiny_moe():
    tok = tokenizer()
    config = Qwen3MoeConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        # False: the training forward asks for router logits itself (GRPO does the same), and transformers 5.17's
        # Qwen3-MoE fails to generate with a KV cache when the config turns them on everywhere
        output_router_logits=False,
        router_aux_loss_coef=0.05,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(config)


def test_patched_forward_returns_the_models_own_moe_aux_loss():
    m = tiny_moe().eval()
    ids = torch.randint(5, 60, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        expected = m(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss
        add_sdpo_forward(m)
        hidden, aux = m(input_ids=ids, attention_mask=mask, sdpo=SDPORequest(4, router_aux=True))
    assert hidden.shape == (2, 4, 32)
    torch.testing.assert_close(aux, expected, rtol=0, atol=0)


@pytest.mark.parametrize("grpo_weight", [0.0, 0.5])
def test_moe_aux_loss_is_added_and_logged_like_grpo(tmp_path, grpo_weight, monkeypatch):
    trainer = make_trainer(tmp_path, model_=tiny_moe(), sdpo=SDPOConfig(distillation_topk=10, grpo_weight=grpo_weight))
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == 0.05
    inputs = first_batch(trainer)
    loss_with = trainer.compute_loss(trainer.model, inputs)
    aux = trainer._metrics["train"]["aux_loss"]
    assert len(aux) == 1 and aux[0] > 0
    monkeypatch.setattr(trainer, "aux_loss_enabled", False)
    loss_without = trainer.compute_loss(trainer.model, inputs)
    assert loss_with.item() == pytest.approx(loss_without.item() + 0.05 * aux[0], rel=1e-5, abs=1e-8)


# ------------------------------------------------------------------ 2. reward functions: identity and call shapes


def test_reward_functions_stay_the_users_objects(tmp_path):
    for sdpo in (SDPOConfig(enabled=False), SDPOConfig(distillation_topk=10)):
        trainer = make_trainer(tmp_path, sdpo=sdpo)
        assert trainer.reward_funcs[0] is half_success
        first_batch(trainer)  # a reward call happened …
        assert trainer.reward_funcs[0] is half_success  # … and left it as it was


def test_reward_wrapper_takes_any_call_shape():
    store = FeedbackStore()

    def env_reward(*args, environments=None, **kwargs):  # TRL's environment-owned rewards, called positionally too
        n = len(args[0]) if args else len(environments)
        return [{"score": 1.0, "feedback": "ok"}] * n

    wrapped = wrap_reward_function(env_reward, 0, "env_reward", store)
    assert wrapped(environments=[object(), object()]) == [1.0, 1.0]
    assert wrapped(["p1", "p2", "p3"], [["c"]] * 3) == [1.0, 1.0, 1.0]
    assert store.combined(3) == ["ok", "ok", "ok"]


# ------------------------------------------------------------------ 3. generation signature checks


class _KwargsOnlyGenerationModel(Qwen2ForCausalLM):
    """Like NemotronH: `prepare_inputs_for_generation` does not name `attention_mask`, so `generate()`
    validates the model kwargs against `inspect.signature(model.forward)`."""

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, **kwargs):
        return super().prepare_inputs_for_generation(input_ids, past_key_values=past_key_values, **kwargs)


def test_patched_forward_keeps_the_signature_generate_checks():
    base = model()
    m = _KwargsOnlyGenerationModel(base.config)
    m.load_state_dict(base.state_dict())
    original = inspect.signature(m.forward)
    add_sdpo_forward(m)
    patched = inspect.signature(m.forward)
    assert "attention_mask" in patched.parameters and "sdpo" in patched.parameters
    assert [p for p in patched.parameters if p != "sdpo"] == list(original.parameters)
    ids = torch.tensor([[5, 6, 7, 8]])
    out = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


# ------------------------------------------------------------------ 4. positional order


def test_all_positional_arguments_map_as_in_grpo_trainer(tmp_path):
    class Marker(TrainerCallback):
        pass

    names = list(inspect.signature(GRPOTrainer.__init__).parameters)[1:11]
    train, evaluation, tok, marker = chat_dataset(8), chat_dataset(4), tokenizer(), Marker()
    values = {
        "model": model(),
        "reward_funcs": half_success,
        "args": grpo_args(tmp_path),
        "train_dataset": train,
        "eval_dataset": evaluation,
        "processing_class": tok,
        "reward_processing_classes": None,
        "callbacks": [marker],
        "optimizers": (None, None),
        "quantization_config": None,
        "peft_config": None,
    }
    trainer = SDPOTrainer(*[values[n] for n in names], sdpo_config=SDPOConfig(distillation_topk=10))
    assert trainer.train_dataset is train and trainer.eval_dataset is evaluation
    assert trainer.processing_class is tok and marker in trainer.callback_handler.callbacks
    assert trainer.reward_funcs == [half_success]


def test_legacy_positional_sdpo_config_still_works_with_a_warning(tmp_path):
    cfg = SDPOConfig(distillation_topk=7)
    with pytest.warns(FutureWarning, match="sdpo_config="):
        trainer = SDPOTrainer(
            model(), half_success, grpo_args(tmp_path), cfg, chat_dataset(), processing_class=tokenizer()
        )
    assert trainer.sdpo_config is cfg and len(trainer.train_dataset) == 8


# ------------------------------------------------------------------ 5–6. NaN rewards and exception types


def test_nan_rewards_mean_not_applicable_and_inf_is_rejected(tmp_path):
    def nan_first(completions, **kw):
        return [float("nan") if i == 0 else float(i % 2) for i in range(len(completions))]

    trainer = make_trainer(tmp_path, reward=nan_first)
    first_batch(trainer)
    assert math.isnan(trainer._rollouts.scores[0])  # TRL's "not applicable", as None

    def inf_reward(completions, **kw):
        return [float("inf")] * len(completions)

    with pytest.raises(ValueError, match=r"inf.*finite"):
        first_batch(make_trainer(tmp_path, reward=inf_reward))


def test_a_wrong_number_of_rewards_raises_trls_exception(tmp_path):
    def short(completions, **kw):
        return [0.0] * (len(completions) - 1)

    def short_dicts(completions, **kw):
        return [{"score": 0.0, "feedback": "x"}] * (len(completions) - 1)

    torch.manual_seed(0)
    grpo = GRPOTrainer(
        model(), short, args=grpo_args(tmp_path), train_dataset=chat_dataset(), processing_class=tokenizer()
    )
    with pytest.raises(Exception) as grpo_error:
        first_batch(grpo)
    for func in (short, short_dicts):
        with pytest.raises(type(grpo_error.value), match="returned 3 rewards, but 4 were expected"):
            first_batch(make_trainer(tmp_path, reward=func))
    assert type(grpo_error.value) is ValueError


# ------------------------------------------------------------------ 7. GRPO options pure SDPO ignores


def test_grpo_options_that_pure_sdpo_ignores_are_named(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        make_trainer(tmp_path, loss_type="grpo", entropy_coef=0.01, top_entropy_quantile=0.5)
    assert "Pure SDPO (grpo_weight=0)" in caplog.text
    for name in ("loss_type='grpo'", "entropy_coef=0.01", "top_entropy_quantile=0.5"):
        assert name in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        make_trainer(tmp_path)
    assert "ignores these GRPO options" not in caplog.text  # defaults say nothing


# ------------------------------------------------------------------ vLLM with truncated sampling


def test_truncated_vllm_sampling_is_named_with_the_fix():
    from types import SimpleNamespace

    from sdpo_fast.checks import truncated_sampling_warning

    def cfg(**kw):
        base = dict(use_vllm=True, vllm_importance_sampling_correction=True, top_k=0, top_p=1.0, min_p=None)
        return SimpleNamespace(**{**base, **kw})

    assert truncated_sampling_warning(cfg()) is None
    assert truncated_sampling_warning(cfg(top_k=50, use_vllm=False)) is None
    assert truncated_sampling_warning(cfg(top_p=0.9, vllm_importance_sampling_correction=False)) is None
    for kw, named in ((dict(top_k=50), "top_k=50"), (dict(top_p=0.9), "top_p=0.9"), (dict(min_p=0.05), "min_p=0.05")):
        message = truncated_sampling_warning(cfg(**kw))
        assert named in message and "vllm_importance_sampling_correction=False" in message and "top_k=0" in message


# ------------------------------------------------------------------ one scorer: the IS ratio starts at exactly 1


def _bf16_scorer(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
    """A stand-in for TRL's scorer (which rounds its logit tiles to bf16): log-softmax of bf16-rounded logits."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -logits_to_keep - 1 : -1]
        logps = torch.log_softmax(logits.to(torch.bfloat16).float(), -1)
        return logps.gather(-1, input_ids[:, -logits_to_keep:, None]).squeeze(-1), None, None


def _first_pass_log_ratios(trainer, monkeypatch):
    import sdpo_fast.objective.base as trainer_module

    seen = []
    real = trainer_module.self_distillation_objective

    def spy(per_token, logp, mask, *, old_log_probs, **kw):
        seen.append(((logp.detach() - old_log_probs) * mask)[mask > 0])
        return real(per_token, logp, mask, old_log_probs=old_log_probs, **kw)

    monkeypatch.setattr(trainer_module, "self_distillation_objective", spy)
    monkeypatch.setattr(GRPOTrainer, "_get_per_token_logps_and_entropies", _bf16_scorer)
    trainer.train()
    return seen


@pytest.mark.parametrize("layout", ["iterations", "off-policy"])
def test_importance_ratio_is_exactly_one_on_the_first_pass(tmp_path, monkeypatch, layout):
    extra = dict(num_iterations=2) if layout == "iterations" else dict(steps_per_generation=2)
    trainer = make_trainer(tmp_path, max_steps=2, learning_rate=1e-2, **extra)
    seen = _first_pass_log_ratios(trainer, monkeypatch)
    assert len(seen) == 2 and seen[0].numel() > 0
    assert torch.equal(seen[0], torch.zeros_like(seen[0]))  # log π − log π_old = 0 bit for bit: ratio 1
    assert seen[1].abs().max() > 0  # after an optimizer step the policy has moved: a real ratio


def test_without_the_one_scorer_the_ratio_starts_off_one(tmp_path, monkeypatch):
    """The control: TRL's (stand-in) scorer alone leaves the first-pass ratio off 1, which the IS clip acts on."""
    trainer = make_trainer(tmp_path, max_steps=1, num_iterations=2)
    monkeypatch.setattr(trainer.objective, "rescore", lambda model, inputs: None)
    monkeypatch.setattr(
        type(trainer), "_get_per_token_logps_and_entropies", lambda self, *a, **k: _bf16_scorer(self, *a, **k)
    )
    seen = _first_pass_log_ratios(trainer, monkeypatch)
    assert seen[0].abs().max() > 1e-4


def test_vllm_importance_weights_use_the_heads_numerics(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, num_iterations=2)
    batch = first_batch(trainer)
    exact = batch["old_per_token_logps"]
    monkeypatch.setattr(trainer, "use_vllm", True)
    monkeypatch.setattr(trainer, "vllm_importance_sampling_correction", True, raising=False)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    att = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    t = batch["completion_ids"].shape[1]
    scored, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, att, t, batch_size=2)
    score_mask = trainer.objective.masks(batch).score
    torch.testing.assert_close(scored[score_mask], exact[score_mask], rtol=0, atol=1e-6)
    assert not torch.isnan(exact).any()


def test_moe_aux_loss_found_through_a_wrapper_class():
    """FSDP2 turns the model's class into a generated subclass that lives in torch's module."""
    m = tiny_moe().eval()
    ids = torch.randint(5, 60, (2, 9))
    with torch.no_grad():
        expected = m(input_ids=ids, output_router_logits=True).aux_loss
    m.__class__ = type("FSDPQwen3MoeForCausalLM", (type(m),), {"__module__": "torch.distributed.fsdp._fully_shard"})
    add_sdpo_forward(m)
    with torch.no_grad():
        _, aux = m(input_ids=ids, sdpo=SDPORequest(4, router_aux=True))
    torch.testing.assert_close(aux, expected, rtol=0, atol=0)


def test_a_lora_adapter_on_lm_head_is_refused_with_the_fix(tmp_path):
    """TRL 1.15-1.16 refuse it themselves; SDPO's own check covers trainers that don't (Unsloth's patched copy)."""
    peft = pytest.importorskip("peft")
    from sdpo_fast.forward import check_head_compatible

    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], lora_dropout=0.0)
    with pytest.raises(ValueError, match="lm_head"):
        make_trainer(tmp_path, model_=peft.get_peft_model(model(), lora))
    wrapped = peft.get_peft_model(model(), lora)
    with pytest.raises(NotImplementedError, match=r"LoRA adapter on lm_head would be ignored.*modules_to_save"):
        check_head_compatible(wrapped.get_base_model(), 10)
    saved = peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    check_head_compatible(peft.get_peft_model(model(), saved).get_base_model(), 10)  # a whole trained copy is fine
