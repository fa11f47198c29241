"""The EMA maths of the self-teacher: θ_T ← (1 − τ)·θ_T + τ·θ_S, with stochastic rounding for low-precision
teachers (the SDPO paper, arXiv 2601.20802, §3; when it runs is `schedule.py`'s job).

Teacher *kinds* (a full copy, a LoRA snapshot, ZeRO-3…) live in `sdpo_fast.teacher`; each hands
this module matching tensors (whole parameters, or the local shards of identically sharded ones).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

# Wrapper prefixes that distributed/compile wrappers insert into parameter names.
_WRAPPER_TOKENS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
_LOW_PRECISION = (torch.bfloat16, torch.float16)
_SR_CHUNK = 1 << 22  # elements per stochastic-rounding chunk: bounds the fp32 scratch to ~80 MiB


def _normalise_name(name: str) -> str:
    for token in _WRAPPER_TOKENS:
        name = name.replace(token, "")
    return name.removeprefix("module.")


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), or the tensor itself. The EMA is elementwise, so shards suffice."""
    return getattr(t, "_local_tensor", t)


def named_tensors(source: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating-point parameters by normalised name (quantised/integer storage is skipped)."""
    items = source.items() if isinstance(source, Mapping) else source.named_parameters()
    return {_normalise_name(k): local_shard(v) for k, v in items if torch.is_floating_point(v)}


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round fp32 `x` to bf16/fp16 stochastically: unbiased, so tiny EMA steps move the teacher on average.

    Round-to-nearest would turn an update of 0.05·(θ_S − θ_T) below half an ulp into exactly no
    update, freezing a low-precision teacher forever.
    """
    nearest = x.to(dtype)
    diff = x - nearest.float()
    bits = nearest.view(torch.int16)
    # Neighbour of `nearest` in the direction of `diff`: one step in the raw bit pattern moves the
    # magnitude by one ulp (sign-magnitude format); from ±0 it is the smallest subnormal.
    away_from_zero = (diff > 0) == (nearest > 0)
    neighbour_bits = torch.where(away_from_zero, bits + 1, bits - 1)
    zero_bits = torch.where(diff > 0, torch.ones_like(bits), torch.full_like(bits, -32767))  # 0x0001 / 0x8001
    neighbour_bits = torch.where(nearest == 0, zero_bits, neighbour_bits)
    neighbour = neighbour_bits.view(dtype)
    gap = (neighbour.float() - nearest.float()).abs()
    prob = diff.abs() / gap
    draw = torch.rand(x.shape, generator=generator, device=x.device)
    return torch.where(draw < prob, neighbour, nearest)


@torch.no_grad()
def ema_update(
    teacher: nn.Module | Mapping[str, torch.Tensor],
    student: nn.Module | Mapping[str, torch.Tensor],
    rate: float,
    *,
    generator: torch.Generator | None = None,
) -> None:
    """θ_T ← (1 − rate)·θ_T + rate·θ_S, in place, matching parameters by name.

    Works on sharded parameters (FSDP1 flat shards, FSDP2 DTensors) as long as the student and
    the teacher are sharded identically, because the update is elementwise. fp32 pairs use a fused
    `torch._foreach_lerp_`; bf16/fp16 teachers are updated in fp32 and stochastically rounded back.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"EMA rate must lie in [0, 1], got {rate}.")
    t_params, s_params = named_tensors(teacher), named_tensors(student)
    if t_params.keys() != s_params.keys():
        missing = sorted(s_params.keys() - t_params.keys())[:5]
        extra = sorted(t_params.keys() - s_params.keys())[:5]
        raise ValueError(
            "Teacher and student parameters do not match by name, so the EMA cannot pair them. "
            f"Only in the student: {missing}; only in the teacher: {extra}. The teacher must be a copy of the "
            "student with the same structure (and, when sharded, the same sharding)."
        )
    if rate == 0.0:
        return
    fused_t, fused_s = [], []
    for name, t in t_params.items():
        s = s_params[name]
        if t.shape != s.shape:
            raise ValueError(
                f"Parameter {name!r} has shape {tuple(t.shape)} in the teacher but {tuple(s.shape)} in the student."
            )
        if t.dtype in _LOW_PRECISION:
            _lerp_stochastic(t, s, rate, generator)
        elif s.dtype == t.dtype and s.device == t.device:
            fused_t.append(t)
            fused_s.append(s)
        else:
            t.lerp_(s.to(device=t.device, dtype=t.dtype), rate)
    if fused_t:
        torch._foreach_lerp_(fused_t, fused_s, rate)


def _lerp_stochastic(t: torch.Tensor, s: torch.Tensor, rate: float, generator: torch.Generator | None) -> None:
    if generator is not None and generator.device.type != t.device.type:  # e.g. a CPU-offloaded teacher shard
        generator = _generator_on(t.device, generator)
    flat_t, flat_s = t.view(-1), s.reshape(-1)
    for start in range(0, flat_t.numel(), _SR_CHUNK):
        chunk = slice(start, start + _SR_CHUNK)
        updated = flat_t[chunk].float().lerp_(flat_s[chunk].to(device=t.device, dtype=torch.float32), rate)
        flat_t[chunk] = stochastic_round(updated, t.dtype, generator)


def _generator_on(device: torch.device, like: torch.Generator) -> torch.Generator:
    """A generator on `device` seeded like `like` (seeded alike on every rank, so replicas stay identical)."""
    return torch.Generator(device=device).manual_seed(like.initial_seed())
