"""`SDPOObjective`: SDPO's per-micro-batch maths, built once from the config, the teacher and the head settings.

    loss(model, inputs, training)  masks ─► teacher pass ─► student pass with the fused head inside
                                   ─► per-token terms ─► IS ratio ─► step-wide aggregation [+ λ·GRPO]
    score(model, batch, mask)      the one scorer: log π(y_t) with the loss head's own numerics
    counts(batch)                  at generation time: the step-wide counts its normaliser divides by

A variant is a subclass that overrides one of the small hooks below (`distil_rows`, `grpo_rows`,
`sample_weights`, `aggregation`, `policy_loss`) and registers a name (`registry.register_objective`); the trainer
never changes. `inputs` is the micro-batch dict TRL hands to `compute_loss`, plus the teacher batch's tensors
(`sdpo_fast.teacher_batch`): teacher_input_ids / teacher_attention_mask, and per sample self_distillation_mask,
sdpo_success, sdpo_group_pass_rate, sdpo_group_has_success; and the 0-dim counts of `counts`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..head import sampled_logprobs, sdpo_head
from ..loss import self_distillation_objective, token_level_surrogate
from .grpo import GRPOSettings, grpo_aggregate, grpo_per_token
from .passes import Runtime, scatter_rows, student_forward, teacher_states

__all__ = ["GRPOSettings", "HeadSettings", "Masks", "Runtime", "SDPOObjective"]

# The head's teacher diagnostics (`sdpo_head(..., teacher_stats=True)`), in its column order.
TEACHER_STATS = ("teacher_topk_mass", "teacher_tail_share", "teacher_entropy")

# Which step-wide count each aggregation mode divides by; `seq-mean-token-sum-norm` divides by R only.
_COUNT_OF_MODE = {
    "token-mean": "sdpo_num_tokens",
    "seq-mean-token-sum": "sdpo_num_active_seqs",
    "seq-mean-token-mean": "sdpo_num_active_seqs",
}


@dataclass(frozen=True)
class HeadSettings:
    """What every head call shares: the loss head and the old-log-prob scorer alike."""

    topk: int | None = 100
    temperature: float = 1.0
    backend: str = "auto"
    memory_budget_mb: float = 256
    add_tail: bool = True
    alpha: float = 0.5

    @classmethod
    def from_config(cls, config, backend: str, temperature: float) -> HeadSettings:
        """`temperature` is the sampling temperature over the model's own logit scale (e.g. Gemma's)."""
        topk = config.distillation_topk if config.full_logit_distillation else 1  # token level: log π(y) only
        return cls(topk, temperature, backend, config.distillation_memory_budget_mb, config.distillation_add_tail,
                   config.distillation_alpha)  # fmt: skip

    def scorer_kwargs(self) -> dict:
        return dict(
            topk=self.topk, temperature=self.temperature, backend=self.backend, memory_budget_mb=self.memory_budget_mb
        )


@dataclass
class Masks:
    completion: torch.Tensor  # (B, T) valid completion tokens (tool outputs excluded)
    distil: torch.Tensor  # (B, T) tokens the SDPO term is computed on
    routed: torch.Tensor | None  # (B, T) tokens that get GRPO's term instead (routed variants), or None
    score: torch.Tensor  # (B, T) bool: positions the student head scores


class SDPOObjective:
    """The reference's SDPO objective (arXiv 2601.20802, eq. 3): the top-K + tail divergence to the self-teacher on
    every sample with a teacher context, times the detached IS ratio, averaged over the optimizer step."""

    name: ClassVar[str] = "sdpo"
    # Routed variants compute GRPO's term on some samples; they need every completion token scored.
    routes: ClassVar[bool] = False

    def __init__(self, config, teacher, *, head: HeadSettings, grpo: GRPOSettings | None = None, runtime=None):
        self.config = config
        self.teacher = teacher
        self.head = head
        self.grpo = grpo or GRPOSettings()
        self.runtime = runtime or Runtime()
        self.check()

    def check(self) -> None:
        """Refuse settings the variant cannot honour (the config checks what it can without the trainer)."""
        if self.routes and self.config.loss_agg_mode != "token-mean":
            raise ValueError(
                f"objective={self.name!r} averages the SDPO and GRPO tokens together, as a token mean; got "
                f"loss_agg_mode={self.config.loss_agg_mode!r}. Set loss_agg_mode='token-mean'."
            )
        if self.routes and self.config.grpo_weight > 0:
            raise ValueError(
                f"objective={self.name!r} already routes samples to GRPO's term; grpo_weight={self.config.grpo_weight} "
                "would add it a second time. Set grpo_weight=0."
            )

    # ------------------------------------------------------------------------------------ hooks for variants

    def distil_rows(self, inputs) -> torch.Tensor:
        """(B,) 1 for the samples whose tokens carry the SDPO term: by default, those with a teacher context."""
        return inputs["self_distillation_mask"].float()

    def grpo_rows(self, inputs) -> torch.Tensor | None:
        """(B,) 1 for the samples routed to GRPO's term instead (disjoint from `distil_rows`), or None."""
        return None

    def sample_weights(self, inputs) -> torch.Tensor | None:
        """(B,) per-sample weights of the SDPO term, or None."""
        return None

    def token_weights(self, out: dict[str, torch.Tensor], inputs) -> torch.Tensor | None:
        """(B, T) per-token weights of the SDPO term (detached), or None."""
        return None

    def head_kwargs(self) -> dict:
        """Extra `sdpo_head` options of the variant (e.g. the forward KL's per-bucket clip)."""
        return {}

    def aggregation(self) -> tuple[str, str | None]:
        """(loss_agg_mode, the count it divides by)."""
        mode = self.config.loss_agg_mode
        return mode, _COUNT_OF_MODE.get(mode)

    # ------------------------------------------------------------------------------------ generation time

    def counts(self, batch) -> dict[str, torch.Tensor]:
        """Step-wide counts over the whole generation batch, all processes (gradient-accumulation invariant).

        0-dim tensors: TRL's shuffle/split copies them whole into every micro-batch.
        """
        mask = self._completion_mask(batch)
        distil = self.distil_rows(batch)
        loss_mask = mask * distil.unsqueeze(1)
        values = [loss_mask.sum(), (loss_mask.sum(1) > 0).float().sum(), torch.tensor(float(mask.shape[0])).to(mask)]
        routed = self.grpo_rows(batch)
        union = loss_mask if routed is None else mask * (distil + routed).clamp(max=1.0).unsqueeze(1)
        values.append(union.sum())
        total = self.runtime.reduce(torch.stack([v.float() for v in values]), "sum")
        keys = ("sdpo_num_tokens", "sdpo_num_active_seqs", "sdpo_num_seqs", "sdpo_num_loss_tokens")
        return dict(zip(keys, total.unbind()))

    # ------------------------------------------------------------------------------------ per micro-batch

    def masks(self, inputs) -> Masks:
        mask = self._completion_mask(inputs)
        distil = mask * self.distil_rows(inputs).unsqueeze(1)
        routed = self.grpo_rows(inputs)
        routed = None if routed is None else mask * routed.unsqueeze(1)
        everything = self.config.grpo_weight > 0 or routed is not None or self.scores_all_tokens()
        return Masks(mask, distil, routed, (mask if everything else distil) > 0)

    def scores_all_tokens(self) -> bool:
        return False

    def loss(self, model, inputs, training: bool) -> tuple[torch.Tensor, dict[str, float]]:
        masks = self.masks(inputs)
        rows = self.distil_rows(inputs) > 0
        teacher = teacher_states(
            self.teacher, model, inputs, masks.score, rows, self.config.teacher_micro_batch_size, self.runtime
        )
        aux_coef = self.runtime.router_aux_coef()
        out, aux_loss = self._student_pass(model, inputs, masks.score, teacher, aux_coef is not None)
        loss, stats = self.policy_loss(out, inputs, masks, training)
        if aux_loss is not None:  # MoE load balancing, scaled for gradient accumulation as GRPOTrainer does
            loss = loss + aux_coef * aux_loss / (self.runtime.accumulation_steps() if training else 1.0)
            stats["aux_loss"] = float(self.runtime.reduce(aux_loss.detach().float(), "mean"))
        return loss, stats

    def policy_loss(self, out, inputs, masks: Masks, training: bool) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss from the head's per-token outputs: SDPO's term [+ GRPO's, routed or blended]."""
        cfg = self.config
        div, logp_s, logp_t = out["divergence"], out["student_logprob"], out["teacher_logprob"]
        per_token = div if cfg.full_logit_distillation else token_level_surrogate(logp_s, logp_t)
        weights = self.sample_weights(inputs)
        if weights is not None:
            per_token = per_token * weights.to(per_token).unsqueeze(1)
        token_weights = self.token_weights(out, inputs)
        if token_weights is not None:
            per_token = per_token * token_weights.detach()
        old = inputs.get("old_per_token_logps")
        old = logp_s.detach() if old is None else old
        stats: dict[str, float] = {}
        if masks.routed is None:
            mode, count_key = self.aggregation()
        else:  # one token mean over the distilled and the routed tokens of the step (summed below)
            mode, count_key = "token-mean", "sdpo_num_loss_tokens"
        loss, weighted, ratio = self_distillation_objective(
            per_token,
            logp_s,
            masks.distil,
            old_log_probs=old,
            is_clip=cfg.is_clip,
            loss_agg_mode=mode,
            # the vLLM sampler correction: the reference's rollout IS weights
            rollout_is_weights=inputs.get("importance_sampling_ratio"),
            denominator=self._step_normaliser(inputs, count_key, training),
            response_width=self.grpo.max_completion_length,
        )
        if masks.routed is not None:
            grpo = self._grpo_tokens(logp_s, old, inputs, masks.completion)
            loss = loss + _masked_sum(grpo, masks.routed) / self._per_step(inputs[count_key], training)
            routed_rows = masks.routed.sum(1).gt(0).float()
            stats["sdpo/grpo_routed_fraction"] = self.global_mean(routed_rows, torch.ones_like(routed_rows))
        if cfg.grpo_weight > 0:
            grpo_loss = self.grpo_loss(logp_s, inputs, masks.completion, training)
            loss = (1.0 - cfg.grpo_weight) * loss + cfg.grpo_weight * grpo_loss
            stats["sdpo/grpo_loss"] = float(self.runtime.reduce(grpo_loss.detach().float(), "mean"))
        stats.update(self.loss_stats(weighted, div, logp_s, logp_t, masks.distil, ratio, out))
        return loss, stats

    def grpo_loss(self, logp, inputs, mask, training: bool, advantages=None) -> torch.Tensor:
        """GRPO's clipped surrogate from the same student log-probs, aggregated as TRL's loss type does."""
        old = inputs.get("old_per_token_logps")
        per_token = self._grpo_tokens(logp, old, inputs, mask, advantages)
        accumulation = self.runtime.accumulation_steps() if training else 1.0
        dapo = self._per_step(inputs["num_items_in_batch"], training) if self.grpo.loss_type == "dapo" else None
        return grpo_aggregate(per_token, mask, self.grpo, accumulation, dapo)

    # ------------------------------------------------------------------------------------ the one scorer

    @torch.no_grad()
    def score(self, model, batch: tuple, score_mask: torch.Tensor) -> torch.Tensor:
        """log π(y) on the scored rows with the loss head's own numerics, (B, T), zero elsewhere."""

        def head_fn(hidden, h, weight, targets, gather):
            values = sampled_logprobs(h, weight, targets, **self.head.scorer_kwargs(), **gather)
            return scatter_rows(values, score_mask)

        return student_forward(model, batch, score_mask, head_fn, self.runtime)

    def score_sequences(self, model, input_ids, attention_mask, completion_length: int, chunk: int | None):
        """`score` on whole prompt+completion rows (TRL's scorer interface), `chunk` rows at a time."""
        t, step, parts = completion_length, chunk or input_ids.shape[0], []
        for start in range(0, input_ids.shape[0], step):
            ids, att = input_ids[start : start + step], attention_mask[start : start + step]
            parts.append(self.score(model, (ids[:, :-t], att[:, :-t], ids[:, -t:], att[:, -t:]), att[:, -t:] > 0))
        return torch.cat(parts)

    def rescore(self, model, inputs) -> None:
        """Replace `old_per_token_logps` by the head's own scores of exactly the rows `loss` will score."""
        if inputs.get("old_per_token_logps") is None:
            return
        batch = (inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"], inputs["completion_mask"])
        inputs["old_per_token_logps"] = self.score(model, batch, self.masks(inputs).score)

    # ------------------------------------------------------------------------------------ helpers

    def _student_pass(self, model, inputs, score_mask, teacher, router_aux: bool):
        """One student forward; the fused head runs inside it on the scored positions. Also the MoE aux loss."""
        settings = self.head

        def head_fn(hidden, h, weight, targets, gather) -> dict[str, torch.Tensor]:
            if teacher is None:  # no teacher row in this micro-batch: the student's own states stand in (masked out)
                t_h, t_w = h.detach(), weight.detach()
            else:
                t_h, t_w = teacher
                t_h = t_h.to(t_w.dtype)
            result, teacher_stats = sdpo_head(
                h, weight, t_h, t_w, targets, add_tail=settings.add_tail, alpha=settings.alpha, teacher_stats=True,
                **settings.scorer_kwargs(), **self.head_kwargs(), **gather,
            )  # fmt: skip
            outputs = {name: scatter_rows(values, score_mask) for name, values in result._asdict().items()}
            for i, name in enumerate(TEACHER_STATS):  # from the head's (N, K) epilogue: no extra vocabulary pass
                outputs[name] = scatter_rows(teacher_stats[:, i], score_mask)
            if targets.numel() == 0:  # keep every parameter in the graph: DDP expects all gradients
                outputs["divergence"] = outputs["divergence"] + 0.0 * (hidden.sum() + weight.sum())
            return outputs

        batch = (inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"], inputs["completion_mask"])
        result = student_forward(model, batch, score_mask, head_fn, self.runtime, router_aux=router_aux)
        return result if router_aux else (result, None)

    def _grpo_tokens(self, logp, old, inputs, mask, advantages=None) -> torch.Tensor:
        advantages = inputs["advantages"] if advantages is None else advantages
        return grpo_per_token(logp, old, advantages, mask, self.grpo, inputs.get("importance_sampling_ratio"))

    @staticmethod
    def _completion_mask(inputs) -> torch.Tensor:
        mask = inputs["completion_mask"].float()
        return mask * inputs["tool_mask"] if "tool_mask" in inputs else mask

    def _step_normaliser(self, inputs, count_key: str | None, training: bool):
        """The optimizer-step-wide count behind the aggregation, as TRL's `dapo` normaliser does for GRPO.

        Summing this micro-batch's loss over the accumulation window and averaging over processes (DDP) then gives
        `compute_self_distillation_loss` over the whole optimizer step, whatever the micro-batch size.
        """
        if count_key is None:
            return 1.0 / self.runtime.num_processes
        return self._per_step(inputs[count_key], training)

    def _per_step(self, count: torch.Tensor, training: bool) -> torch.Tensor:
        """A count over the whole generation batch (all processes) rescaled to one optimizer step of one process."""
        normaliser = count.clamp(min=1.0) / self.runtime.num_processes
        if training:
            normaliser = normaliser * self.runtime.accumulation_steps() / self.runtime.steps_per_generation
        return normaliser

    def global_mean(self, values: torch.Tensor, mask: torch.Tensor) -> float:
        mask = mask.to(values.dtype)
        totals = torch.stack([(torch.where(mask > 0, values, torch.zeros_like(values)) * mask).sum(), mask.sum()])
        totals = self.runtime.reduce(totals.detach().float(), "sum")
        return float(totals[0] / totals[1]) if totals[1] > 0 else math.nan

    def loss_stats(self, per_token, div, logp_s, logp_t, loss_mask, ratio, out) -> dict[str, float]:
        stats = {
            "sdpo/loss": self.global_mean(per_token.detach(), loss_mask),
            "sdpo/divergence": self.global_mean(div.detach(), loss_mask),
            "sdpo/kl_student_teacher": self.global_mean((logp_s - logp_t).detach(), loss_mask),
        }
        empty = self.runtime.reduce(loss_mask.sum().detach().float().view(1), "sum")
        stats["self_distillation/empty_target_batch"] = float(empty.item() == 0)
        if self.head.topk is not None and self.config.full_logit_distillation:
            for name in (n for n in TEACHER_STATS if n in out):  # the teacher at the distilled positions, K+1 buckets
                stats[f"sdpo/{name}"] = self.global_mean(out[name].detach(), loss_mask)
        if ratio is not None:
            stats["sdpo/is_ratio_mean"] = self.global_mean(ratio, loss_mask)
            stats["sdpo/is_clip_fraction"] = self.global_mean((ratio >= self.config.is_clip).float(), loss_mask)
        return stats


def _masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # zero masked entries first: a non-finite padded value times 0 would be NaN
    return (torch.where(mask != 0, values, torch.zeros_like(values)) * mask).sum()
