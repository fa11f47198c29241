"""`SDPOObjective` and its variants without a trainer: each loss against a float64 computation from the formulas.

`policy_loss` takes the head's per-token outputs, so the maths is checked on synthetic values (any regime, NaN
included) in milliseconds; `loss` with a real tiny model and a teacher is checked at the end.
"""

from __future__ import annotations

import math

import pytest
import torch

from sdpo_fast import SDPOConfig
from sdpo_fast.objective import build_objective, objective_names, register_objective
from sdpo_fast.objective.base import HeadSettings, SDPOObjective
from sdpo_fast.objective.grpo import GRPOSettings
from sdpo_fast.objective.rlsd import rlsd_advantages

B, T = 6, 5


def _batch(seed=0, old_shift=0.0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[1, 3:] = 0  # ragged completions
    mask[4, 1:] = 0
    logp_s = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    out = {
        "divergence": torch.rand(B, T, generator=g, dtype=torch.float64),
        "student_logprob": logp_s.clone().requires_grad_(True),
        "teacher_logprob": -torch.rand(B, T, generator=g, dtype=torch.float64) * 3,
        "teacher_topk_mass": torch.rand(B, T, generator=g, dtype=torch.float64),
        "teacher_entropy": torch.rand(B, T, generator=g, dtype=torch.float64) * math.log(5),
    }
    out["teacher_tail_share"] = 1 - out["teacher_topk_mass"]
    inputs = {
        "completion_mask": mask,
        "self_distillation_mask": torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.float64),
        "sdpo_success": torch.tensor([0, 1, 0, 1, 0, 0], dtype=torch.float64),
        "sdpo_group_pass_rate": torch.tensor([0.5, 0.5, 0.0, 0.25, 0.0, 1.0], dtype=torch.float64),
        "sdpo_group_has_success": torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.float64),
        "advantages": torch.tensor([-0.5, 0.5, 0.0, 1.5, -1.0, 0.7], dtype=torch.float64),
        "old_per_token_logps": logp_s + old_shift,
        "num_items_in_batch": mask.sum(),
    }
    return out, inputs


def _objective(**config):
    cfg = SDPOConfig(**{"distillation_topk": 4, **config})
    obj = build_objective(cfg, teacher=None, head=HeadSettings(topk=4), grpo=GRPOSettings(max_completion_length=T))
    return obj


def _loss(obj, out, inputs):
    inputs = {**inputs, **obj.counts(inputs)}
    return obj.policy_loss(out, inputs, obj.masks(inputs), training=True)


def _ratio(out, inputs, clip=2.0):
    return torch.exp(out["student_logprob"].detach() - inputs["old_per_token_logps"]).clamp(max=clip)


def _grpo_tokens(out, inputs, adv, eps=0.2):
    rho = torch.exp(out["student_logprob"].detach() - inputs["old_per_token_logps"])
    adv = adv if adv.dim() == 2 else adv[:, None].expand(B, T)
    return -torch.minimum(rho * adv, rho.clamp(1 - eps, 1 + eps) * adv)


@pytest.mark.parametrize("shift", [0.0, 0.3])
def test_sdpo_is_the_token_mean_of_ratio_times_divergence(shift):
    out, inputs = _batch(old_shift=-shift)
    loss, stats = _loss(_objective(), out, inputs)
    m = inputs["completion_mask"] * inputs["self_distillation_mask"][:, None]
    expected = (_ratio(out, inputs) * out["divergence"] * m).sum() / m.sum()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-12, atol=0)
    assert stats["sdpo/is_clip_fraction"] == pytest.approx(float(((_ratio(out, inputs) >= 2.0) * m).sum() / m.sum()))


def test_reference_normaliser_counts_samples_without_a_teacher():
    out, inputs = _batch()
    loss, _ = _loss(_objective(objective="sdpo_reference_norm"), out, inputs)
    c, m = out["divergence"], inputs["completion_mask"]
    sd = inputs["self_distillation_mask"]
    per_seq = (c * m).sum(1) / (m.sum(1) + 1e-8)
    expected = (sd * per_seq).sum() / B  # all six samples in the denominator, four have a teacher
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-9, atol=0)
    default, _ = _loss(_objective(loss_agg_mode="seq-mean-token-mean"), out, inputs)
    torch.testing.assert_close(default.detach(), (sd * per_seq).sum() / sd.sum(), rtol=1e-9, atol=0)


def test_sc_sdpo_weights_each_group_by_its_pass_rate():
    out, inputs = _batch()
    loss, _ = _loss(_objective(objective="sc_sdpo"), out, inputs)
    p = inputs["sdpo_group_pass_rate"]
    w = torch.sqrt(p * (1 - p))
    m = inputs["completion_mask"] * inputs["self_distillation_mask"][:, None]
    expected = (w[:, None] * out["divergence"] * m).sum() / m.sum()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-12, atol=0)
    assert w[5] == 0 and w[0] == 0.5  # an always-solved group carries nothing, a half-solved one the most


@pytest.mark.parametrize("shift", [0.0, -0.4])
def test_srpo_routes_successes_to_grpo_and_failures_to_sdpo(shift):
    out, inputs = _batch(old_shift=shift)
    loss, stats = _loss(_objective(objective="srpo"), out, inputs)
    m, sd, ok = inputs["completion_mask"], inputs["self_distillation_mask"], inputs["sdpo_success"]
    distil = m * (sd * (1 - ok))[:, None]
    routed = m * ok[:, None]
    numerator = (_ratio(out, inputs) * out["divergence"] * distil).sum() + (
        _grpo_tokens(out, inputs, inputs["advantages"]) * routed
    ).sum()
    torch.testing.assert_close(loss.detach(), numerator / (distil + routed).sum(), rtol=1e-12, atol=0)
    assert stats["sdpo/grpo_routed_fraction"] == pytest.approx(2 / 6)
    loss.backward()  # the GRPO term's gradient reaches the successful samples' log-probs, unless PPO's clip cuts it
    grad = out["student_logprob"].grad
    assert (grad[1, :3].abs().sum() > 0) == (shift == 0.0) and grad[2].abs().sum() == 0


def test_srpo_entropy_weighting_scales_distilled_tokens_by_the_teachers_certainty():
    out, inputs = _batch()
    loss, _ = _loss(_objective(objective="srpo", srpo_entropy_weighting=True), out, inputs)
    m, sd, ok = inputs["completion_mask"], inputs["self_distillation_mask"], inputs["sdpo_success"]
    distil, routed = m * (sd * (1 - ok))[:, None], m * ok[:, None]
    w = 1 - out["teacher_entropy"] / math.log(4 + 1)  # K = 4 top-K buckets + the tail
    numerator = (w * out["divergence"] * distil).sum() + (
        _grpo_tokens(out, inputs, inputs["advantages"]) * routed
    ).sum()
    torch.testing.assert_close(loss.detach(), numerator / (distil + routed).sum(), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="objective='srpo'"):
        SDPOConfig(srpo_entropy_weighting=True)


def test_teacher_diagnostics_are_logged_over_the_distilled_tokens():
    out, inputs = _batch()
    _, stats = _loss(_objective(), out, inputs)
    m = inputs["completion_mask"] * inputs["self_distillation_mask"][:, None]
    for name in ("teacher_topk_mass", "teacher_tail_share", "teacher_entropy"):
        assert stats[f"sdpo/{name}"] == pytest.approx(float((out[name] * m).sum() / m.sum()), rel=1e-6)  # fp32 reduce


def test_forward_kl_clip_asks_the_head_for_the_clip():
    obj = _objective(objective="forward_kl_clip", distillation_alpha=0.0, kl_clip=0.5)
    assert obj.head_kwargs() == {"kl_clip": 0.5} and _objective().head_kwargs() == {}
    with pytest.raises(ValueError, match=r"distillation_alpha=0\.0"):
        SDPOConfig(objective="forward_kl_clip")


def test_group_fallback_gives_grpo_to_samples_of_groups_without_success():
    out, inputs = _batch()
    loss, _ = _loss(_objective(objective="group_fallback"), out, inputs)
    m, sd, has = inputs["completion_mask"], inputs["self_distillation_mask"], inputs["sdpo_group_has_success"]
    distil = m * sd[:, None]
    routed = m * ((1 - sd) * (1 - has))[:, None]  # samples 2 and 4
    assert routed.sum(1).gt(0).tolist() == [False, False, True, False, True, False]
    numerator = (out["divergence"] * distil).sum() + (_grpo_tokens(out, inputs, inputs["advantages"]) * routed).sum()
    torch.testing.assert_close(loss.detach(), numerator / (distil + routed).sum(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("lam,eps", [(0.5, 0.2), (1.0, 0.1), (0.0, 0.2)])
def test_rlsd_per_token_advantages_match_the_formula(lam, eps):
    out, inputs = _batch(old_shift=0.1)
    obj = _objective(objective="rlsd", rlsd_lambda=lam, rlsd_epsilon=eps)
    loss, stats = _loss(obj, out, inputs)
    a = inputs["advantages"][:, None].expand(B, T)
    delta = out["teacher_logprob"] - out["student_logprob"].detach()
    shaped = a * ((1 - lam) + lam * torch.exp(torch.sign(a) * delta).clamp(1 - eps, 1 + eps))
    shaped = torch.where(inputs["self_distillation_mask"][:, None] > 0, shaped, a)
    m = inputs["completion_mask"]
    expected = (_grpo_tokens(out, inputs, shaped) * m).sum() / m.sum()  # loss_type dapo: the step's tokens
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-12, atol=0)
    assert stats["rlsd/lambda"] == lam
    if lam == 0.0:
        assert torch.equal(shaped, a)  # λ = 0 is GRPO exactly


def test_rlsd_advantage_keeps_the_rewards_sign_and_stays_within_the_band():
    adv = torch.tensor([2.0, -2.0, 0.0], dtype=torch.float64)
    delta = torch.tensor([[50.0, -50.0], [50.0, -50.0], [3.0, -3.0]], dtype=torch.float64)  # extreme teacher gaps
    a_t = rlsd_advantages(adv, delta, torch.ones(3), lam=1.0, eps=0.2)
    assert torch.equal(torch.sign(a_t), torch.sign(adv)[:, None].expand(3, 2))
    torch.testing.assert_close(a_t[0], torch.tensor([2.4, 1.6], dtype=torch.float64))
    torch.testing.assert_close(a_t[1], torch.tensor([-1.6, -2.4], dtype=torch.float64))
    nan = rlsd_advantages(adv, torch.full((3, 2), math.nan, dtype=torch.float64), torch.ones(3), 0.5, 0.2)
    assert torch.isnan(nan[:2]).all()  # a non-finite teacher value propagates instead of being clipped finite


def test_rlsd_lambda_decays_linearly_over_the_configured_steps():
    obj = _objective(objective="rlsd", rlsd_lambda=0.5, rlsd_lambda_decay_steps=10)
    for step, lam in ((0, 0.5), (5, 0.25), (10, 0.0), (20, 0.0)):
        obj.runtime.global_step = lambda s=step: s
        assert obj.current_lambda() == pytest.approx(lam)


def test_nan_in_a_distilled_token_propagates_to_the_loss_in_every_variant():
    for name in objective_names():
        out, inputs = _batch()
        out["divergence"][0, 0] = math.nan
        out["teacher_logprob"][0, 0] = math.nan
        extra = {"distillation_alpha": 0.0} if name == "forward_kl_clip" else {}
        loss, _ = _loss(_objective(objective=name, **extra), out, inputs)
        assert torch.isnan(loss), name  # sample 0 has a teacher and (sc_sdpo) a group weight of ½


def test_variants_refuse_settings_they_cannot_honour():
    with pytest.raises(ValueError, match="token-mean"):
        _objective(objective="srpo", loss_agg_mode="seq-mean-token-mean")
    with pytest.raises(ValueError, match="grpo_weight=0"):
        _objective(objective="group_fallback", grpo_weight=0.5)
    with pytest.raises(ValueError, match="Unknown objective"):
        SDPOConfig(objective="nope")
    with pytest.raises(ValueError, match="logit-level"):
        SDPOConfig(objective="srpo", full_logit_distillation=False, distillation_alpha=1.0)


def test_a_registered_variant_is_selected_by_name_without_touching_the_trainer():
    @register_objective("half_weight_for_tests")
    class HalfWeight(SDPOObjective):
        def sample_weights(self, inputs):
            return torch.full_like(inputs["self_distillation_mask"], 0.5)

    out, inputs = _batch()
    assert "half_weight_for_tests" in objective_names()
    half, _ = _loss(_objective(objective="half_weight_for_tests"), out, inputs)
    full, _ = _loss(_objective(), out, inputs)
    torch.testing.assert_close(half, 0.5 * full)
    with pytest.raises(ValueError, match="already registered"):
        register_objective("srpo")(HalfWeight)


# ------------------------------------------------------------------ end to end: every variant and refresh trains


def _flat(module):
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,extra",
    [("srpo", {"srpo_entropy_weighting": True}), ("rlsd", {}), ("sc_sdpo", {}), ("group_fallback", {}),
     ("sdpo_reference_norm", {}), ("forward_kl_clip", {"distillation_alpha": 0.0, "kl_clip": 0.5})],
)  # fmt: skip
def test_every_variant_trains_end_to_end(tmp_path, name, extra):
    from tiny_setup import make_trainer

    trainer = make_trainer(tmp_path, max_steps=2, sdpo=SDPOConfig(distillation_topk=10, objective=name, **extra))
    before = _flat(trainer.model)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(math.isfinite(v) for v in losses)
    assert not torch.equal(_flat(trainer.model), before)  # the student moved
    assert type(trainer.objective).name == name


@pytest.mark.slow
@pytest.mark.parametrize("refresh", ["frozen", "periodic"])
def test_teacher_refresh_modes_and_their_checkpoint_round_trip(tmp_path, refresh):
    from tiny_setup import make_trainer

    sdpo = SDPOConfig(distillation_topk=10, teacher_refresh=refresh, teacher_refresh_steps=2)
    trainer = make_trainer(tmp_path / "run", max_steps=3, save_strategy="steps", save_steps=1, sdpo=sdpo)
    initial = _flat(trainer.ref_model)
    trainer.train()
    if refresh == "frozen":
        assert not hasattr(trainer, "ema_callback") and torch.equal(_flat(trainer.ref_model), initial)
    else:
        assert trainer.teacher_callback.fired_at == [2]
        assert not torch.equal(_flat(trainer.ref_model), initial)
    final_teacher = _flat(trainer.ref_model)
    # resume from step 1: the restored teacher is the saved one, and the schedule continues where it was
    resumed = make_trainer(tmp_path / "run", max_steps=3, save_strategy="steps", save_steps=1, sdpo=sdpo)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))
    torch.testing.assert_close(_flat(resumed.ref_model), final_teacher, rtol=0, atol=1e-6)
    if refresh == "periodic":
        assert resumed.teacher_callback.fired_at == [2]


@pytest.mark.slow
def test_periodic_refresh_copies_the_students_adapter_into_a_lora_teacher(tmp_path):
    peft = pytest.importorskip("peft")
    from tiny_setup import make_trainer

    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    sdpo = SDPOConfig(distillation_topk=10, teacher_refresh="periodic", teacher_refresh_steps=2)
    trainer = make_trainer(tmp_path, max_steps=2, peft_config=lora, sdpo=sdpo)
    trainer.train()
    assert trainer.teacher.kind.endswith("lora-snapshot") and trainer.teacher_callback.fired_at == [2]
    student = {n: p.detach() for n, p in trainer.model.named_parameters() if p.requires_grad}
    teacher = trainer.teacher.state_dict()
    assert teacher.keys() == student.keys()
    for name, value in teacher.items():  # after the refresh at the last step: an exact copy
        torch.testing.assert_close(value, student[name].cpu(), rtol=0, atol=0)
