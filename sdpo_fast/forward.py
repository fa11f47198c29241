"""The model-forward patch: `model(..., sdpo=SDPORequest(T, head))` returns hidden states or the head's output.

The trainer never asks a model for `.logits`. A patched forward runs the backbone, keeps the hidden
states at the positions that predict the completion tokens and, when the request carries a head,
runs it *inside* the forward on `lm_head.weight`: DDP's and FSDP's hooks, and ZeRO-3's gradient
reduction, only see parameter uses that happen within the module's forward.

Also here: what the fused head needs from a model (a bias-free lm_head, no soft-capping) and the
logit scale some architectures apply, so the head's log-probs are the model's.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys

import torch

from .distributed import param_shape


class SDPORequest:
    """Asks a patched model forward for the backbone's hidden states at the completion positions.

    With `head=None` the forward returns them, (B, T, H). Otherwise it returns `head(hidden,
    lm_head_weight)`, computed *inside* the forward so that DDP/FSDP hooks see every parameter use.
    With `router_aux=True` (Mixture-of-Experts) it returns `(result, load-balancing loss)`, the loss
    the model's own forward would return as `aux_loss` with `output_router_logits=True`.
    """

    __slots__ = ("completion_length", "head", "router_aux")

    def __init__(self, completion_length: int, head=None, router_aux: bool = False):
        self.completion_length = completion_length
        self.head = head
        self.router_aux = router_aux


def router_aux_loss(model, router_logits, attention_mask) -> torch.Tensor:
    """The architecture's own load-balancing loss, from its modeling module (Mixtral, Qwen3-MoE, GPT-OSS, …).

    Looked up along the class's MRO: FSDP2 turns the model's class into a generated subclass in torch's module.
    """
    modules = (sys.modules.get(cls.__module__) for cls in type(model).__mro__)
    func = next((m.load_balancing_loss_func for m in modules if hasattr(m, "load_balancing_loss_func")), None)
    if func is None or router_logits is None:
        raise NotImplementedError(
            f"{type(model).__name__} has `output_router_logits` but SDPO cannot find its load-balancing loss "
            "(`load_balancing_loss_func` in its modeling module). Set GRPOConfig(router_aux_loss_coef=0.0) to train "
            "without it."
        )
    return func(router_logits, model.num_experts, model.num_experts_per_tok, attention_mask)


def _signature_with_sdpo(signature: inspect.Signature) -> inspect.Signature:
    """The original signature plus a keyword-only `sdpo=None` (before any `**kwargs`)."""
    params = list(signature.parameters.values())
    if "sdpo" in signature.parameters:
        return signature
    extra = inspect.Parameter("sdpo", inspect.Parameter.KEYWORD_ONLY, default=None)
    position = next((i for i, p in enumerate(params) if p.kind == inspect.Parameter.VAR_KEYWORD), len(params))
    return signature.replace(parameters=[*params[:position], extra, *params[position:]])


def add_sdpo_forward(model) -> None:
    """Patch `model.forward` to accept `sdpo=SDPORequest(...)`; without it the forward is unchanged.

    Patched on the instance (like TRL's fused LM head), on top of whatever forward is there, so it
    composes with TRL's and Unsloth's patches. The patched forward keeps the original signature (plus
    `sdpo`): `generate()` validates its keyword arguments against `inspect.signature(model.forward)`.
    Idempotent.
    """
    if getattr(model, "_sdpo_forward_patched", False):
        return
    previous = model.forward

    def forward(*args, sdpo: SDPORequest | None = None, **kwargs):
        if sdpo is None:
            return previous(*args, **kwargs)
        kwargs["use_cache"] = False
        kwargs.pop("logits_to_keep", None)
        if sdpo.router_aux:
            kwargs["output_router_logits"] = True
        backbone = model.base_model if model.base_model is not model else model.model
        outputs = backbone(*args, **kwargs)
        hidden = outputs.last_hidden_state[
            :, -sdpo.completion_length - 1 : -1
        ]  # the positions predicting the completion
        result = hidden if sdpo.head is None else sdpo.head(hidden, model.get_output_embeddings().weight)
        if sdpo.router_aux:
            return result, router_aux_loss(model, outputs.router_logits, kwargs.get("attention_mask"))
        return result

    functools.update_wrapper(forward, previous)
    forward.__signature__ = _signature_with_sdpo(inspect.signature(previous))
    model.forward = forward
    model._sdpo_forward_patched = True


def strip_sdpo_forward(model) -> None:
    """Undo `add_sdpo_forward` on a copy: the copied patch closes over the original model."""
    model.__dict__.pop("forward", None)
    model.__dict__.pop("_sdpo_forward_patched", None)


@contextlib.contextmanager
def eval_mode(module):
    """No dropout for a no-grad pass through the training model (the LoRA teacher, the trust-region live pass)."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def check_head_compatible(model, topk: int | None) -> None:
    """Fail at construction on models the fused head cannot score exactly."""
    config = model.config.get_text_config()
    if getattr(config, "final_logit_softcapping", None):
        raise NotImplementedError(
            f"{type(model).__name__} applies final-logit soft-capping, which the fused SDPO head does not implement. "
            "Use a model without soft-capping (e.g. Qwen, Llama, Gemma-3)."
        )
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise NotImplementedError("The SDPO head needs a bias-free lm_head (`model.get_output_embeddings()`).")
    if hasattr(head, "lora_A") or hasattr(head, "base_layer"):  # a PEFT tuner layer: its delta is not in .weight
        raise NotImplementedError(
            "The fused SDPO head reads lm_head.weight directly, so a LoRA adapter on lm_head would be ignored. Leave "
            "lm_head out of LoraConfig.target_modules, or train it whole with modules_to_save=['lm_head']."
        )
    vocab = param_shape(head.weight)[0]
    if topk is not None and topk > vocab:
        raise ValueError(
            f"SDPOConfig.distillation_topk={topk} exceeds the model's vocabulary size {vocab}. Lower it, or set "
            "distillation_topk=None to distil the full vocabulary."
        )


def logit_scale(model) -> float:
    """The factor some architectures apply to their logits, so the head matches the model (and TRL's log-probs).

    `logit_scale` (Cohere), `output_multiplier`, `lm_head_multiplier` (Falcon-H1) multiply; `logits_scaling`
    divides (Granite, MiniCPM3), except for HyperCLOVA X, which multiplies by it.
    """
    config = model.config.get_text_config()
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        if getattr(config, name, None) is not None:
            return float(getattr(config, name))
    scaling = getattr(config, "logits_scaling", None)
    if scaling is not None:
        return float(scaling) if config.model_type == "hyperclovax" else 1.0 / float(scaling)
    return 1.0
