"""Faults lose nothing that was saved: non-finite steps, checkpoint writes, damaged or mismatched checkpoints."""

from __future__ import annotations

import json
import os

import pytest
import torch
from tiny_setup import make_trainer
from transformers import TrainerCallback

from sdpo_fast import SDPOConfig
from sdpo_fast.teacher.checkpoint import MANIFEST_FILE, TEACHER_FILE, TeacherCheckpointError, load_teacher, save_teacher

# ------------------------------------------------------------------ non-finite steps


class Snapshots(TrainerCallback):
    """Student and teacher after every optimizer step."""

    def __init__(self, trainer):
        self.trainer, self.student, self.teacher = trainer, {}, {}

    def on_step_end(self, args, state, control, **kw):
        self.student[state.global_step] = _flat(self.trainer.model)
        self.teacher[state.global_step] = _flat(self.trainer.ref_model)


def _flat(module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


def _nan_at(trainer, bad_steps: set[int]):
    real = trainer.compute_loss

    def compute_loss(model, inputs, *a, **k):
        loss = real(model, inputs, *a, **k)
        return loss * float("nan") if trainer.state.global_step in bad_steps else loss

    trainer.compute_loss = compute_loss


def _window_trainer(tmp_path, bad_steps):
    # steps_per_generation=3, GA=1: one generation batch = one EMA window of 3 optimizer steps
    trainer = make_trainer(
        tmp_path,
        max_steps=3,
        steps_per_generation=3,
        sdpo=SDPOConfig(distillation_topk=10, teacher_update_rate=0.5),
    )
    _nan_at(trainer, bad_steps)
    snaps = Snapshots(trainer)
    trainer.add_callback(snaps)
    return trainer, snaps


@pytest.mark.parametrize("bad", [{0}, {1}, {2}, {0, 1, 2}], ids=["first", "middle", "last", "all"])
def test_nan_anywhere_in_an_ema_window_never_reaches_student_or_teacher(tmp_path, bad):
    trainer, snaps = _window_trainer(tmp_path, bad)
    assert trainer.ema_callback.period == 3
    teacher_before, student_before = _flat(trainer.ref_model), _flat(trainer.model)
    with pytest.warns(UserWarning, match=r"skipped optimizer step \d+: non-finite gradients in .*Likely cause"):
        trainer.train()
    assert trainer.step_guard.skipped_at == sorted(s + 1 for s in bad)
    for step in range(1, 4):
        assert torch.isfinite(snaps.student[step]).all() and torch.isfinite(snaps.teacher[step]).all()
        previous = student_before if step == 1 else snaps.student[step - 1]
        moved = not torch.equal(snaps.student[step], previous)
        assert moved == (step - 1 not in bad), step  # a skipped step leaves the weights exactly as they were
    final_teacher = _flat(trainer.ref_model)
    if bad == {0, 1, 2}:  # no finite step in the window: the reference skips the EMA too
        assert trainer.ema_callback.fired_at == [] and torch.equal(final_teacher, teacher_before)
    else:
        assert trainer.ema_callback.fired_at == [3]
        torch.testing.assert_close(final_teacher, torch.lerp(teacher_before, snaps.student[3], 0.5), rtol=0, atol=0)
    logged = [
        h["sdpo/nonfinite_steps_skipped"] for h in trainer.state.log_history if "sdpo/nonfinite_steps_skipped" in h
    ]
    assert logged and logged[-1] == len(bad)


def test_a_nonfinite_student_is_never_blended_into_the_teacher(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=1, sdpo=SDPOConfig(distillation_topk=10, teacher_update_rate=0.5))
    before = _flat(trainer.ref_model)
    with torch.no_grad():
        next(trainer.model.parameters()).view(-1)[0] = float("inf")
    with pytest.warns(UserWarning, match="skipped an EMA teacher update"):
        trainer.teacher_callback.update()
    assert torch.equal(_flat(trainer.ref_model), before)


# ------------------------------------------------------------------ checkpoint writes


def _ckpt_trainer(tmp_path, **kw):
    sdpo = kw.pop("sdpo", SDPOConfig(distillation_topk=10, teacher_update_rate=0.5))
    return make_trainer(tmp_path, save_strategy="steps", sdpo=sdpo, **{"save_steps": 1, **kw})


def test_teacher_is_written_before_trainer_state_and_rotation(tmp_path, monkeypatch):
    trainer = _ckpt_trainer(tmp_path, max_steps=2, save_total_limit=1)
    seen = []
    real = type(trainer.state).save_to_json

    def save_to_json(state, path):
        folder = os.path.dirname(path)
        seen.append((os.path.basename(folder), sorted(f for f in os.listdir(folder) if f.startswith("sdpo_teacher"))))
        return real(state, path)

    monkeypatch.setattr(type(trainer.state), "save_to_json", save_to_json)
    trainer.train()
    assert seen == [("checkpoint-1", [MANIFEST_FILE, TEACHER_FILE]), ("checkpoint-2", [MANIFEST_FILE, TEACHER_FILE])]
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("checkpoint-")) == ["checkpoint-2"]
    assert not [f for f in os.listdir(tmp_path / "checkpoint-2") if ".tmp-" in f]
    manifest = json.loads((tmp_path / "checkpoint-2" / MANIFEST_FILE).read_text())
    assert (
        manifest["kind"] == "full-copy"
        and manifest["bytes"] == (tmp_path / "checkpoint-2" / TEACHER_FILE).stat().st_size
    )


def test_a_failed_teacher_write_keeps_the_previous_checkpoint_resumable(tmp_path, monkeypatch):
    trainer = _ckpt_trainer(tmp_path, max_steps=2, save_total_limit=1)
    import sdpo_fast.teacher.checkpoint as faults

    real_save, calls = torch.save, []

    def dying_save(obj, path, *a, **k):  # the second checkpoint's teacher write dies halfway
        if TEACHER_FILE in str(path):
            calls.append(path)
        if len(calls) == 2 and TEACHER_FILE in str(path):
            with open(path, "wb") as f:
                f.write(b"PK\x03\x04 half a zip")
            raise KeyboardInterrupt("killed while writing the teacher")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(faults.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    monkeypatch.setattr(faults.torch, "save", real_save)
    assert (tmp_path / "checkpoint-1").exists()  # HF never got to rotate it away
    assert not (tmp_path / "checkpoint-2" / TEACHER_FILE).exists()  # no half file under the real name
    assert not [f for f in os.listdir(tmp_path / "checkpoint-2") if ".tmp-" in f]
    saved = load_teacher(str(tmp_path / "checkpoint-1"))  # verified against its manifest
    resumed = _ckpt_trainer(tmp_path, max_steps=2, save_total_limit=1)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    assert resumed.state.global_step == 2 and saved["kind"] == "full-copy"


# ------------------------------------------------------------------ damaged or missing teacher files


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    trainer = _ckpt_trainer(out, max_steps=1)
    trainer.train()
    return out / "checkpoint-1", _flat(trainer.ref_model), _flat(trainer.model)


def _damaged_copy(src, dst, how):
    import shutil

    shutil.copytree(src, dst)
    path = dst / TEACHER_FILE
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "flipped":
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0x40]) + data[middle + 1 :])
    elif how == "deleted":
        path.unlink()
    return dst


@pytest.mark.parametrize("how", ["truncated", "empty", "flipped", "deleted"])
def test_a_damaged_or_missing_teacher_file_is_an_error_naming_it_and_the_choices(tmp_path, saved_run, how):
    ckpt = _damaged_copy(saved_run[0], tmp_path / "checkpoint-1", how)
    resumed = _ckpt_trainer(tmp_path / "new", max_steps=2)
    with pytest.raises(TeacherCheckpointError) as info:
        resumed.train(resume_from_checkpoint=str(ckpt))
    message = str(info.value)
    assert str(ckpt) in message and TEACHER_FILE in message
    assert "earlier checkpoint" in message and "resume_teacher_from='student'" in message


@pytest.mark.parametrize("source", ["student", "initial"])
def test_an_explicit_teacher_restart_says_what_it_restarts_from(tmp_path, saved_run, source, caplog):
    ckpt, saved_teacher, saved_student = saved_run
    ckpt = _damaged_copy(ckpt, tmp_path / "checkpoint-1", "deleted")
    resumed = _ckpt_trainer(
        tmp_path / "new",
        max_steps=2,
        sdpo=SDPOConfig(distillation_topk=10, teacher_update_rate=0.5, resume_teacher_from=source),
    )
    initial = _flat(resumed.ref_model)

    class AtStart(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.teacher = _flat(resumed.ref_model)

    at_start = AtStart()
    resumed.add_callback(at_start)
    with caplog.at_level("WARNING"):
        resumed.train(resume_from_checkpoint=str(ckpt))
    if source == "student":
        assert "copy of the student restored from" in caplog.text
        assert torch.equal(at_start.teacher, saved_student)
    else:
        assert "model as passed to SDPOTrainer (before any training)" in caplog.text
        assert torch.equal(at_start.teacher, initial) and not torch.equal(initial, saved_teacher)


def test_a_v010_teacher_checkpoint_without_a_manifest_still_loads(tmp_path, saved_run, caplog):
    ckpt = _damaged_copy(saved_run[0], tmp_path / "checkpoint-1", "none")
    (ckpt / MANIFEST_FILE).unlink()
    saved = torch.load(ckpt / TEACHER_FILE, weights_only=True)
    torch.save({"kind": "ema-copy", "state": saved["state"]}, ckpt / TEACHER_FILE)  # v0.1.0's kind name
    resumed = _ckpt_trainer(tmp_path / "new", max_steps=2)
    with caplog.at_level("WARNING"):
        resumed.train(resume_from_checkpoint=str(ckpt))
    assert "unverified" in caplog.text and resumed.state.global_step == 2


def test_save_and_load_round_trip_is_exact(tmp_path):
    state = {"w": torch.randn(3, 4), "b": torch.arange(5)}
    save_teacher(str(tmp_path), "full-copy", state, peft=False)
    loaded = load_teacher(str(tmp_path))
    assert loaded["kind"] == "full-copy" and all(torch.equal(loaded["state"][k], v) for k, v in state.items())


# ------------------------------------------------------------------ PEFT / full mismatch on resume


def _lora():
    peft = pytest.importorskip("peft")
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


def test_resuming_a_lora_checkpoint_without_peft_config_names_the_difference(tmp_path):
    _ckpt_trainer(tmp_path, max_steps=1, peft_config=_lora()).train()
    full = _ckpt_trainer(tmp_path / "full", max_steps=2)
    with pytest.raises(
        ValueError, match=r"holds a LoRA/PEFT adapter but this run trains the full model.*same peft_config"
    ):
        full.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))


def test_resuming_a_full_checkpoint_with_peft_config_names_the_difference(tmp_path, saved_run):
    lora = _ckpt_trainer(tmp_path, max_steps=2, peft_config=_lora())
    with pytest.raises(
        ValueError, match=r"holds the full model but this run trains a LoRA/PEFT adapter.*Drop peft_config"
    ):
        lora.train(resume_from_checkpoint=str(saved_run[0]))


def test_lora_teacher_checkpoint_resumes_exactly(tmp_path):
    trainer = _ckpt_trainer(tmp_path, max_steps=2, save_steps=2, peft_config=_lora())
    trainer.train()
    saved = {n: t.clone() for n, t in trainer.teacher.snapshot.items()}
    resumed = _ckpt_trainer(tmp_path / "again", max_steps=3, save_steps=2, peft_config=_lora())

    class AtStart(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.snapshot = {n: t.clone() for n, t in resumed.teacher.snapshot.items()}

    at_start = AtStart()
    resumed.add_callback(at_start)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert all(torch.equal(at_start.snapshot[n], saved[n]) for n in saved)


def test_a_v010_lora_checkpoint_resumes_without_bringing_back_the_second_adapter(tmp_path):
    """v0.1.0 saved its LoRA teacher as an adapter `sdpo_teacher/` in the checkpoint, which HF loads back."""
    import shutil

    trainer = _ckpt_trainer(tmp_path, max_steps=1, peft_config=_lora())
    trainer.train()
    ckpt = tmp_path / "checkpoint-1"
    saved = torch.load(ckpt / TEACHER_FILE, weights_only=True)
    legacy = {n.replace(".default.", ".sdpo_teacher."): t * 2.0 for n, t in saved["state"].items()}
    torch.save({"kind": "adapter", "state": legacy}, ckpt / TEACHER_FILE)
    (ckpt / MANIFEST_FILE).unlink()
    (ckpt / "sdpo_teacher").mkdir()
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy(ckpt / f, ckpt / "sdpo_teacher" / f)
    resumed = _ckpt_trainer(tmp_path / "again", max_steps=2, peft_config=_lora())

    class AtStart(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.adapters = list(resumed.model.peft_config)
            self.snapshot = {n: t.clone() for n, t in resumed.teacher.snapshot.items()}

    at_start = AtStart()
    resumed.add_callback(at_start)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert at_start.adapters == ["default"] and not any("teacher" in k for k in resumed.model.state_dict())
    assert all(torch.equal(at_start.snapshot[n], 2.0 * saved["state"][n]) for n in saved["state"])
    assert not (tmp_path / "again" / "checkpoint-2" / "sdpo_teacher").exists()


def test_a_differently_named_adapter_is_recognised_as_peft(tmp_path):
    """PEFT saves an adapter not named "default" one directory down; the manifest says PEFT either way."""
    import peft

    from sdpo_fast.teacher.checkpoint import check_checkpoint_matches

    model = peft.get_peft_model(__import__("tiny_setup").model(), _lora(), adapter_name="policy")
    trainer = _ckpt_trainer(tmp_path, max_steps=1, model_=model)
    trainer.train()
    ckpt = tmp_path / "checkpoint-1"
    assert (ckpt / "policy" / "adapter_config.json").exists()
    check_checkpoint_matches(str(ckpt), peft=True, kind="lora-snapshot")
    (ckpt / MANIFEST_FILE).unlink()
    check_checkpoint_matches(str(ckpt), peft=True, kind="lora-snapshot")  # without a manifest: one level down


@pytest.mark.parametrize(
    "failure",
    [
        OSError(28, "No space left on device"),
        RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0"),
    ],
)
def test_a_full_disk_is_named_as_such_and_loses_nothing(tmp_path, monkeypatch, failure):
    import errno

    import sdpo_fast.teacher.checkpoint as checkpoint

    earlier = tmp_path / "checkpoint-1"
    save_teacher(str(earlier), "full-copy", {"w": torch.ones(3)}, peft=False)
    before = (earlier / TEACHER_FILE).read_bytes()

    def full_disk(obj, path, *a, **k):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 partial")
        raise failure

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    target = tmp_path / "checkpoint-2"
    with pytest.raises(checkpoint.TeacherSaveError, match="disk is full") as caught:
        save_teacher(str(target), "full-copy", {"w": torch.zeros(3)}, peft=False)
    message = str(caught.value)
    assert str(target / TEACHER_FILE) in message and "earlier checkpoint is intact" in message
    assert caught.value.errno == errno.ENOSPC
    assert not any(p.name.startswith(TEACHER_FILE + ".tmp") for p in target.iterdir())  # no half file left behind
    assert not (target / TEACHER_FILE).exists() and (earlier / TEACHER_FILE).read_bytes() == before
    monkeypatch.undo()
    assert torch.equal(load_teacher(str(earlier))["state"]["w"], torch.ones(3))  # the earlier one still loads


def test_other_write_errors_are_not_called_a_full_disk(tmp_path, monkeypatch):
    import sdpo_fast.teacher.checkpoint as checkpoint

    def denied(obj, path, *a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(checkpoint.torch, "save", denied)
    with pytest.raises(PermissionError):
        save_teacher(str(tmp_path / "c"), "full-copy", {"w": torch.ones(1)}, peft=False)
