"""The trust-region teacher: z_T = (1 − c)·z_frozen + c·z_student, around any frozen teacher kind.

The frozen teacher (a full copy, or a LoRA snapshot of the initial adapter) is never EMA-updated;
the live student is run on the same teacher prompt without dropout, and the two are blended in
logit space. The blend is realised as one matmul for the fused head (see `trust_region_head_inputs`).
"""

from __future__ import annotations

import math

import torch

from ..distributed import full_weight, is_zero3_param, zero3_gathered
from ..forward import SDPORequest, eval_mode
from .base import Teacher


def trust_region_head_inputs(
    ref_hidden: torch.Tensor,
    live_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    live_weight: torch.Tensor,
    mix: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs for the fused head that realise z_T = (1 − c)·z_ref + c·z_live as one matmul.

    (1 − c)·h_ref·W_refᵀ + c·h_live·W_liveᵀ = [(1 − c)·h_ref, c·h_live]·[W_ref, W_live]ᵀ, so the
    hidden states and weights are concatenated along the hidden dimension. When both models share
    one lm_head tensor (PEFT without an lm_head adapter) the hidden states are blended instead,
    which needs no concatenated weight.
    """
    shared = shares_storage(ref_weight, live_weight)
    return blend_hidden(ref_hidden, live_hidden, mix, shared), blend_weight(ref_weight, live_weight, shared)


def blend_hidden(ref: torch.Tensor, live: torch.Tensor, mix: float, shared: bool) -> torch.Tensor:
    if not 0.0 <= mix <= 1.0 or math.isnan(mix):
        raise ValueError(f"The trust-region mix must lie in [0, 1], got {mix}.")
    if shared:
        return torch.lerp(ref.float(), live.float(), mix).to(ref.dtype)
    return torch.cat([(1.0 - mix) * ref, mix * live.to(ref.dtype)], dim=-1)


def blend_weight(ref: torch.Tensor, live: torch.Tensor, shared: bool) -> torch.Tensor:
    return ref if shared else torch.cat([ref, live.to(ref.dtype)], dim=-1)


def shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape)


class TrustRegionTeacher(Teacher):
    """Wraps a frozen teacher; its hidden states and weight are the blended head inputs."""

    def __init__(self, frozen: Teacher, mix: float, accelerator):
        self.frozen = frozen
        self.mix = mix
        self.accelerator = accelerator
        self.kind = f"trust-region/{frozen.kind}"
        self.module = frozen.module
        self.lockstep = frozen.lockstep
        self._shared_head: bool | None = None

    def _live_weight(self, model) -> torch.Tensor:
        """The student's whole lm_head weight, read outside its module's forward (ZeRO-3: gathered and copied)."""
        weight = self.accelerator.unwrap_model(model).get_output_embeddings().weight
        if is_zero3_param(weight):
            with zero3_gathered([weight]):
                return weight.detach().clone()
        return full_weight(weight).detach()

    def _shares_head(self, model) -> bool:
        """Whether frozen teacher and student read one lm_head tensor; a fixed property of the setup."""
        if self._shared_head is None:
            self._shared_head = shares_storage(self.frozen.lm_head_weight(model), self._live_weight(model))
        return self._shared_head

    def hidden_states(self, model, inputs, completion_length):
        ref = self.frozen.hidden_states(model, inputs, completion_length)
        with eval_mode(model):
            live = model(**inputs, sdpo=SDPORequest(completion_length))
        return blend_hidden(ref, live, self.mix, self._shares_head(model))

    def lm_head_weight(self, model):
        return blend_weight(self.frozen.lm_head_weight(model), self._live_weight(model), self._shares_head(model))

    def end_pass(self):
        self.frozen.end_pass()

    def ema_step(self, student, generator=None):
        raise RuntimeError("The trust-region teacher is frozen; it has no EMA step.")

    def state_dict(self):
        return self.frozen.state_dict()

    def load_state_dict(self, state):
        self.frozen.load_state_dict(state)
