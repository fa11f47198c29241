"""The 2026 stability variants that reshape *which* tokens SDPO's term covers and how much each weighs.

Each is one small subclass of `SDPOObjective` overriding one hook; `registry.py` names them for
`SDPOConfig(objective=...)`. RLSD, which changes the policy loss itself, is in `rlsd.py`.
"""

from __future__ import annotations

import math

import torch

from .base import SDPOObjective


class ReferenceNormaliserObjective(SDPOObjective):
    """The reference's normaliser *as shipped* (lasgroup/SDPO with `ppo_micro_batch_size_per_gpu: 1`).

    Each micro-batch is one sequence, so the effective objective is (1/N)·Σ_i sd_i · mean_t c_{i,t}: a sequence
    mean of token means in which samples *without* a teacher still count in N. A step with few active samples
    therefore weighs less than under the default (a token mean over the samples that have a teacher). Use it to
    reproduce the reference's numbers exactly; the default stays gradient-accumulation invariant either way.
    """

    name = "sdpo_reference_norm"

    def aggregation(self) -> tuple[str, str | None]:
        return "seq-mean-token-mean", "sdpo_num_seqs"


class SCSDPOObjective(SDPOObjective):
    """SC-SDPO (arXiv 2605.27765): each group's SDPO loss × √(p̂(1 − p̂)), p̂ the group's pass rate.

    GRPO's group normalisation gives it an implicit curriculum (groups that always or never succeed carry no
    advantage); SDPO has none. The weight restores it: 0 for p̂ ∈ {0, 1}, largest (½) at p̂ = ½. p̂ is the fraction
    of the group's samples whose reward reached `success_reward_threshold` (the teacher batch computes it on the
    gathered batch, so a group split across processes gets one p̂).
    """

    name = "sc_sdpo"

    def sample_weights(self, inputs) -> torch.Tensor:
        p = inputs["sdpo_group_pass_rate"].clamp(0.0, 1.0)  # kept in its dtype: a float64 oracle checks it
        return torch.sqrt(p * (1.0 - p))


class SRPOObjective(SDPOObjective):
    """SRPO routing (arXiv 2604.02288): successful samples get GRPO's term, failed samples SDPO's.

    Distilling a sample that already succeeded is ambiguous (the teacher's demonstration is often that very kind
    of answer), and it is where SDPO's collapse starts; GRPO's advantage is exact there. Both terms share one token
    mean over the step: L = [Σ_{failed, with teacher} ρ·D_t + Σ_{succeeded} ℓ^GRPO_t] / (their token count).
    With `srpo_entropy_weighting`, a distilled token is also weighted by 1 − H_T/log(K+1), H_T the teacher's
    entropy over the K+1 buckets (from the head's (N, K) epilogue): uncertain teacher targets pull less.
    """

    name = "srpo"
    routes = True

    def distil_rows(self, inputs) -> torch.Tensor:
        return inputs["self_distillation_mask"].float() * (1.0 - inputs["sdpo_success"].float())

    def grpo_rows(self, inputs) -> torch.Tensor:
        return inputs["sdpo_success"].float()

    def token_weights(self, out, inputs):
        if not self.config.srpo_entropy_weighting:
            return None
        buckets = self.head.topk + (1 if self.head.add_tail else 0)
        return (1.0 - out["teacher_entropy"] / math.log(buckets)).clamp(min=0.0)


class GroupFallbackObjective(SDPOObjective):
    """A group with no success contributes GRPO's term instead of nothing.

    Without a successful sibling a sample has no demonstration; unless feedback gives it a teacher, plain SDPO
    skips it. With partial-credit rewards such a group still has a non-zero GRPO advantage, which this keeps. The
    fallback samples join SDPO's token mean (see `SRPOObjective`).
    """

    name = "group_fallback"
    routes = True

    def grpo_rows(self, inputs) -> torch.Tensor:
        no_teacher = 1.0 - inputs["self_distillation_mask"].float()
        return no_teacher * (1.0 - inputs["sdpo_group_has_success"].float())


class ForwardKLClipObjective(SDPOObjective):
    """Forward KL over the top-K + tail buckets with each bucket's term p_T·(log p_T − log p_S) clipped above at
    `kl_clip`, as on-policy self-distillation practice does: a teacher token the student barely covers cannot
    dominate a position's gradient. Needs `distillation_alpha=0` and an integer `distillation_topk`."""

    name = "forward_kl_clip"

    def head_kwargs(self) -> dict:
        return {"kl_clip": self.config.kl_clip}
