"""Liger-Kernel's layer kernels (RMSNorm, RoPE, SwiGLU) compose with SDPOTrainer (GPU only)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None,
        reason="Liger-Kernel's Triton kernels need CUDA and the liger-kernel package",
    ),
]


@pytest.fixture
def unpatch_qwen2_afterwards():
    """Liger patches the module `transformers.models.qwen2.modeling_qwen2` in place: undo it for later tests."""
    import transformers.models.qwen2.modeling_qwen2 as module

    saved = dict(vars(module))
    yield
    for name in set(vars(module)) - set(saved):
        delattr(module, name)
    for name, value in saved.items():
        setattr(module, name, value)


def test_liger_patched_model_trains_with_sdpo(tmp_path, unpatch_qwen2_afterwards):
    from liger_kernel.transformers import apply_liger_kernel_to_qwen2
    from tiny_setup import make_trainer, tokenizer
    from transformers import Qwen2ForCausalLM

    from sdpo_fast.head import resolve_backend
    from sdpo_fast.testing import tiny_qwen2

    # Patch the module classes (not the cross-entropy: SDPO's head replaces the LM-head loss path).
    apply_liger_kernel_to_qwen2(
        rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
    )
    tok = tokenizer()
    model = tiny_qwen2(tok, hidden_size=64, intermediate_size=128).cuda()
    assert isinstance(model, Qwen2ForCausalLM)
    assert "Liger" in type(model.model.norm).__name__
    trainer = make_trainer(tmp_path, model_=model, use_cpu=False, max_steps=2)  # top-10, the chat dataset
    assert trainer.sdpo_backend == resolve_backend("auto", torch.device("cuda"), 10)  # what auto picks here
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "sdpo/loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
