"""Unsloth compatibility.

CPU: a simulated Unsloth patch — TRL's `grpo_trainer` source re-executed with the class renamed, so
the copy is *not* a subclass of TRL's original, then rebound into `trl` (what Unsloth does).
GPU (skipped without CUDA/unsloth): the real import-order behaviour.
"""

from __future__ import annotations

import importlib.util
import inspect
import subprocess
import sys
import textwrap
import types

import pytest
import torch
import trl
import trl.trainer
import trl.trainer.grpo_trainer as grpo_module
from tiny_setup import first_batch, make_trainer

from sdpo_fast import SDPOTrainer


def _patched_copy() -> type:
    """An Unsloth-style rewrite: same source, renamed class, plus a marker, in a fresh module."""
    source = inspect.getsource(grpo_module).replace(
        "class GRPOTrainer(_BaseTrainer):", "class _UnslothGRPOTrainer(_BaseTrainer):"
    )
    source += textwrap.dedent(
        """
        class UnslothGRPOTrainer(_UnslothGRPOTrainer):
            unsloth_generate_calls = 0

            def _generate(self, prompts):
                UnslothGRPOTrainer.unsloth_generate_calls += 1
                return super()._generate(prompts)
        """
    )
    module = types.ModuleType("trl.trainer.unsloth_compiled_grpo")
    module.__package__ = "trl.trainer"
    exec(compile(source, "<unsloth-simulated>", "exec"), module.__dict__)
    return module.UnslothGRPOTrainer


@pytest.fixture
def unsloth_patched(monkeypatch):
    patched = _patched_copy()
    assert not issubclass(patched, grpo_module.GRPOTrainer)
    for target in (trl, trl.trainer, grpo_module):
        monkeypatch.setattr(target, "GRPOTrainer", patched, raising=False)
    return patched


def test_trainer_is_rebuilt_on_the_patched_class_whatever_the_import_order(tmp_path, unsloth_patched):
    with pytest.warns(UserWarning, match="rebuilt on the patched class"):
        trainer = make_trainer(tmp_path)
    mro = type(trainer).__mro__
    assert unsloth_patched in mro and grpo_module.__dict__["GRPOTrainer"] is unsloth_patched
    assert isinstance(trainer, SDPOTrainer)  # still an SDPOTrainer for user code
    inputs = first_batch(trainer)
    assert unsloth_patched.unsloth_generate_calls >= 1  # generation went through the patched trainer
    assert "teacher_input_ids" in inputs
    trainer.compute_loss(trainer.model, inputs).backward()


def test_user_subclass_gets_a_warning_with_the_fix(tmp_path, unsloth_patched):
    class MyTrainer(SDPOTrainer):
        pass

    with pytest.warns(UserWarning, match="Import Unsloth before TRL"):
        trainer = make_trainer(tmp_path, trainer_cls=MyTrainer)
    assert isinstance(trainer, MyTrainer)


def test_no_patch_no_rebuild(tmp_path, recwarn):
    trainer = make_trainer(tmp_path)
    assert type(trainer) is SDPOTrainer
    assert not [w for w in recwarn if "rebuilt" in str(w.message)]


def test_hidden_states_come_from_the_backbone_not_logits(tmp_path):
    """Unsloth's loss path may put hidden states in `.logits`; the SDPO forward never reads `.logits`."""
    trainer = make_trainer(tmp_path)
    inputs = first_batch(trainer)
    base_forward = type(trainer.model).forward

    def poisoned(self, *a, **k):  # a model whose logits are garbage of width H
        out = base_forward(self, *a, **k)
        out.logits = torch.full_like(out.logits[..., : self.config.hidden_size], float("nan"))
        return out

    type(trainer.model).forward = poisoned
    try:
        loss = trainer.compute_loss(trainer.model, inputs)
    finally:
        type(trainer.model).forward = base_forward
    assert torch.isfinite(loss)


# ------------------------------------------------------------------ real Unsloth (GPU only)

needs_unsloth = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("unsloth") is None,
    reason="Unsloth exposes its RL patching only on a CUDA machine with unsloth installed",
)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=900)


@pytest.mark.gpu
@needs_unsloth
def test_import_order_correct():
    out = _run(
        """
        import unsloth, warnings
        warnings.simplefilter("error", UserWarning)
        from sdpo_fast import SDPOTrainer
        import trl
        assert issubclass(SDPOTrainer, trl.GRPOTrainer), SDPOTrainer.__mro__
        """
    )
    assert out.returncode == 0, out.stderr


@pytest.mark.gpu
@needs_unsloth
def test_import_order_wrong_raises_warning():
    out = _run(
        """
        import warnings
        from sdpo_fast.trainer import SDPOTrainer, _SDPOTrainerMixin
        import unsloth
        from sdpo_fast.unsloth import current_grpo_trainer, rebased_trainer_class
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cls = rebased_trainer_class(SDPOTrainer, _SDPOTrainerMixin, current_grpo_trainer())
        assert any("Import Unsloth before TRL" in str(w.message) for w in caught)
        """
    )
    assert out.returncode == 0, out.stderr


@pytest.mark.gpu
@needs_unsloth
def test_generation_uses_unsloth_optimization():
    out = _run(
        """
        import unsloth
        from sdpo_fast import SDPOTrainer
        from sdpo_fast.unsloth import is_unsloth_patched
        assert is_unsloth_patched(SDPOTrainer), [k.__name__ for k in SDPOTrainer.__mro__]
        """
    )
    assert out.returncode == 0, out.stderr
