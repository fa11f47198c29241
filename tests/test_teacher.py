"""The teacher: EMA maths, bf16 movement, name matching, callback cadence, the LoRA snapshot, trust region."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sdpo_fast.forward import SDPORequest, add_sdpo_forward
from sdpo_fast.teacher import LoraSnapshotTeacher, trust_region_head_inputs
from sdpo_fast.teacher.ema import ema_update, stochastic_round
from sdpo_fast.teacher.schedule import EMATeacherCallback, ema_period


def _mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).to(dtype)


def test_ema_formula_rate_0_1_and_one_update():
    teacher, student = _mlp(0), _mlp(1)
    before = copy.deepcopy(teacher)
    ema_update(teacher, student, 0.1)
    for t, b, s in zip(teacher.parameters(), before.parameters(), student.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s)
    ema_update(teacher, student, 0.0)
    ema_update(teacher, student, 1.0)
    for t, s in zip(teacher.parameters(), student.parameters()):
        torch.testing.assert_close(t, s)


def test_ema_creates_no_autograd_graph_and_converges():
    teacher, student = _mlp(0), _mlp(1)
    for _ in range(300):
        ema_update(teacher, student, 0.05)
    for t, s in zip(teacher.parameters(), student.parameters()):
        assert t.grad is None and not t.grad_fn
        torch.testing.assert_close(t, s, atol=1e-5, rtol=0)


def test_ema_matches_by_name_not_order_and_reports_mismatch():
    teacher, student = _mlp(0), _mlp(1)
    shuffled = dict(reversed(list(student.named_parameters())))
    expected = {n: 0.5 * p + 0.5 * shuffled[n] for n, p in teacher.named_parameters()}
    ema_update(teacher, shuffled, 0.5)
    for n, p in teacher.named_parameters():
        torch.testing.assert_close(p, expected[n])
    with pytest.raises(ValueError, match="do not match by name"):
        ema_update(teacher, nn.Sequential(nn.Linear(6, 5)), 0.1)
    with pytest.raises(ValueError, match="rate"):
        ema_update(teacher, student, 1.5)


def test_ema_ignores_wrapper_prefixes_and_works_per_shard():
    teacher, student = _mlp(0), _mlp(1)
    wrapped = {f"module._fsdp_wrapped_module.{n}": p for n, p in student.named_parameters()}
    ref = copy.deepcopy(teacher)
    ema_update(teacher, wrapped, 0.25)
    ema_update(ref, student, 0.25)
    for a, b in zip(teacher.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b)
    # elementwise: updating two halves ("shards") separately equals updating the whole
    t_full, s_full = torch.randn(10), torch.randn(10)
    t_sharded = t_full.clone()
    ema_update({"w": t_full}, {"w": s_full}, 0.3)
    for half in (slice(0, 5), slice(5, 10)):
        ema_update({"w": t_sharded[half]}, {"w": s_full[half]}, 0.3)
    torch.testing.assert_close(t_sharded, t_full)


def test_bf16_teacher_really_moves_with_stochastic_rounding():
    teacher = _mlp(0, torch.bfloat16)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.02 * p.abs().float().clamp(min=1e-2).to(p.dtype))  # a small relative change
    exact = [t.detach().float().clone() for t in teacher.parameters()]  # the fp32 EMA we should track
    nearest = [t.detach().clone() for t in teacher.parameters()]  # what round-to-nearest bf16 gives
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        ema_update(teacher, student, 0.05, generator=gen)
        for e, n, s in zip(exact, nearest, student.parameters()):
            e.lerp_(s.detach().float(), 0.05)
            n.copy_(n.float().lerp(s.detach().float(), 0.05).to(torch.bfloat16))
    err_sr = sum(float((t.detach().float() - e).abs().sum()) for t, e in zip(teacher.parameters(), exact))
    err_nearest = sum(float((n.float() - e).abs().sum()) for n, e in zip(nearest, exact))
    stuck = sum(
        int((n.float() == s.detach().float()).logical_not().sum()) for n, s in zip(nearest, student.parameters())
    )
    assert stuck > 0 and err_nearest > 0  # round-to-nearest really stalls short of the target
    assert err_sr < 0.5 * err_nearest


def test_stochastic_round_is_unbiased_and_picks_a_neighbour():
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.tensor([1.0 + 1e-3, -3.3e-4, 0.0, 1e-9, -2.5], dtype=torch.float32)
        r = stochastic_round(x.repeat(20000, 1), dtype, gen).float()
        torch.testing.assert_close(r.mean(0), x, rtol=2e-3, atol=1e-9)
        for j in range(x.numel()):
            values = r[:, j].unique()
            assert len(values) <= 2 and values.min() <= x[j] <= values.max()
            assert torch.equal(values.to(dtype).float(), values)  # representable in the target dtype


def test_ema_period_golden_and_callback_fires_at_2_4_6():
    assert ema_period(num_iterations=2, steps_per_generation=4, gradient_accumulation_steps=4) == 2
    assert ema_period(1, 4, 4) == 1
    assert ema_period(1, 8, 2) == 4
    assert ema_period(1, 2, 4) == 1
    calls = []
    cb = EMATeacherCallback(lambda: calls.append(1), period=2)
    for step in range(1, 7):
        cb.on_pre_optimizer_step(None, SimpleNamespace(global_step=step - 1), None)
        cb.on_step_end(None, SimpleNamespace(global_step=step), None)
    assert cb.fired_at == [2, 4, 6] and len(calls) == 3


def test_callback_skips_a_window_whose_gradients_were_all_non_finite():
    grads = [torch.ones(3)]
    cb = EMATeacherCallback(lambda: None, period=2, gradients=lambda: grads)
    state = SimpleNamespace(global_step=0)
    for step in range(1, 7):
        grads[0] = torch.tensor([float("nan"), 1.0, 1.0]) if step in (3, 4) else torch.ones(3)
        cb.on_pre_optimizer_step(None, state, None)
        state.global_step = step
        cb.on_step_end(None, state, None)
    assert cb.fired_at == [2, 6] and cb.skipped_at == [4]
    # one finite step in the window is enough
    grads[0] = torch.tensor([float("inf")])
    cb.on_pre_optimizer_step(None, state, None)
    state.global_step = 7
    cb.on_step_end(None, state, None)
    grads[0] = torch.ones(1)
    cb.on_pre_optimizer_step(None, state, None)
    state.global_step = 8
    cb.on_step_end(None, state, None)
    assert cb.fired_at[-1] == 8


def test_trust_region_inputs_realise_the_logit_blend():
    g = torch.Generator().manual_seed(0)
    h_ref, h_live = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    w_ref, w_live = torch.randn(11, 5, generator=g), torch.randn(11, 5, generator=g)
    for c in (0.0, 0.3, 1.0):
        h, w = trust_region_head_inputs(h_ref, h_live, w_ref, w_live, c)
        torch.testing.assert_close(h @ w.t(), torch.lerp(h_ref @ w_ref.t(), h_live @ w_live.t(), c))
        h, w = trust_region_head_inputs(h_ref, h_live, w_ref, w_ref, c)  # shared head: blend hidden states
        assert w is w_ref and h.shape == h_ref.shape
        torch.testing.assert_close(
            h @ w.t(), torch.lerp(h_ref @ w_ref.t(), h_live @ w_ref.t(), c), rtol=1e-5, atol=1e-5
        )
    with pytest.raises(ValueError, match="mix"):
        trust_region_head_inputs(h_ref, h_live, w_ref, w_live, 1.5)


# ------------------------------------------------------------------ LoRA teacher: a snapshot in the one adapter


class _Unwrap:
    """The one accelerator method the LoRA teacher uses, for tests without a trainer."""

    @staticmethod
    def unwrap_model(model):
        return model


def _lora_model(**lora_kwargs):
    peft = pytest.importorskip("peft")
    from sdpo_fast.testing import tiny_qwen2

    model = tiny_qwen2(hidden_size=32, intermediate_size=64)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, **lora_kwargs)
    model = peft.get_peft_model(model, cfg)
    with torch.no_grad():  # make the student adapter non-trivial (B starts at zero)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    add_sdpo_forward(model.get_base_model())
    return model


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _hidden(teacher, model, ids):
    with torch.no_grad():
        return teacher.hidden_states(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, 3)


def test_lora_teacher_is_an_exact_snapshot_and_adds_no_adapter():
    model = _lora_model()
    keys = set(model.state_dict())
    teacher = LoraSnapshotTeacher(model, _Unwrap())
    assert set(model.state_dict()) == keys and list(model.peft_config) == ["default"]
    assert not any("teacher" in k for k in model.state_dict())
    assert len(teacher.snapshot) == 2 * 2 * 2  # 2 layers × (q, v) × (A, B)
    for name, p in teacher.params.items():
        assert torch.equal(teacher.snapshot[name], p) and p.requires_grad
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        student = model(input_ids=ids, sdpo=SDPORequest(3))
    torch.testing.assert_close(_hidden(teacher, model, ids), student, rtol=0, atol=0)


def test_lora_teacher_forward_uses_the_snapshot_and_leaves_the_student_bit_identical():
    model = _lora_model()
    teacher = LoraSnapshotTeacher(model, _Unwrap())
    ids = torch.randint(0, 100, (2, 7))
    student_hidden = _hidden(teacher, model, ids)  # snapshot == student so far
    with torch.no_grad():
        for t in teacher.snapshot.values():
            t.add_(0.5)
    before = _state(model)
    teacher_hidden = _hidden(teacher, model, ids)
    assert not torch.allclose(teacher_hidden, student_hidden)  # the teacher really ran with its own weights
    after = _state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.training  # eval mode only for the teacher pass


def test_lora_teacher_restores_the_student_when_the_forward_raises():
    model = _lora_model()
    teacher = LoraSnapshotTeacher(model, _Unwrap())
    with torch.no_grad():
        for t in teacher.snapshot.values():
            t.mul_(-3.0)
    before = _state(model)
    with pytest.raises(RuntimeError, match="boom"), teacher.swapped_in():
        assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # swapped in
        raise RuntimeError("boom")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_lora_teacher_has_its_own_copy_of_a_modules_to_save_head():
    model = _lora_model(modules_to_save=["lm_head"])
    teacher = LoraSnapshotTeacher(model, _Unwrap())
    head = model.get_output_embeddings().weight
    assert any(p is head for p in teacher.params.values())
    torch.testing.assert_close(teacher.lm_head_weight(model), head.detach())
    with torch.no_grad():
        for name, p in teacher.params.items():
            if p is head:
                teacher.snapshot[name].mul_(3.0)
    torch.testing.assert_close(teacher.lm_head_weight(model), 3 * head.detach())
    assert not torch.equal(teacher.lm_head_weight(model), head)


def test_lora_teacher_ema_updates_only_the_snapshot():
    model = _lora_model()
    teacher = LoraSnapshotTeacher(model, _Unwrap())
    teacher.ema_rate = 0.5
    with torch.no_grad():
        for p in teacher.params.values():
            p.add_(1.0)
    before_snapshot = {n: t.clone() for n, t in teacher.snapshot.items()}
    before_model = _state(model)
    teacher.ema_step(model)
    for name, p in teacher.params.items():
        torch.testing.assert_close(teacher.snapshot[name], 0.5 * before_snapshot[name] + 0.5 * p.detach())
    assert all(torch.equal(before_model[k], v) for k, v in model.state_dict().items())
    state = teacher.state_dict()
    fresh = LoraSnapshotTeacher(model, _Unwrap())
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.snapshot[n], teacher.snapshot[n]) for n in state)
    with pytest.raises(ValueError, match="same peft_config"):
        fresh.load_state_dict({"nope": torch.zeros(1)})
