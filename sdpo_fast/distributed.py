"""What sharded training changes for SDPO: whole lm_head weights, FSDP2 resharding, ZeRO-3 gathers.

The fused head reads `lm_head.weight` directly instead of calling the module, so the framework's
usual "gather the parameters of the module being called" never fires for it:

- FSDP2 keeps parameters as DTensor shards: `full_weight` gathers one differentiably.
- DeepSpeed ZeRO-3 leaves an empty placeholder outside the owning module's forward: `zero3_gathered`
  materialises parameters for the duration of a direct read (the head enters it in its forward *and*
  its backward, as TRL's `maybe_gather_lm_head_ctx` does).

`parallelism(accelerator)` names the layout once, so that the trainer and `build_teacher` agree.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch


def parallelism(accelerator) -> str:
    """`"zero3"`, `"fsdp2"`, `"fsdp1"`, or `"replicated"` (one process, DDP, DeepSpeed ZeRO-0/1/2)."""
    from accelerate.utils import DistributedType

    state = accelerator.state
    if state.distributed_type == DistributedType.DEEPSPEED:
        return "zero3" if state.deepspeed_plugin.zero_stage == 3 else "replicated"
    if state.distributed_type == DistributedType.FSDP:
        return "fsdp2" if state.fsdp_plugin.fsdp_version == 2 else "fsdp1"
    return "replicated"


def full_weight(weight: torch.Tensor) -> torch.Tensor:
    """FSDP2 shards parameters as DTensors; the head needs the whole lm_head matrix (differentiably)."""
    return weight.full_tensor() if hasattr(weight, "full_tensor") else weight


def is_zero3_param(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "ds_id")


def param_shape(tensor: torch.Tensor) -> torch.Size:
    """The logical shape of a parameter, also when ZeRO-3 has partitioned it to an empty placeholder."""
    return tensor.ds_shape if is_zero3_param(tensor) else tensor.shape


def zero3_gathered(params: Iterable[torch.Tensor], modifier_rank: int | None = None):
    """Materialise ZeRO-3 parameters for a direct read (a no-op for anything else, or already gathered ones).

    Parameters are deduplicated by identity (tied embeddings pass the same one twice, which ZeRO-3
    mishandles). `modifier_rank=0` writes rank 0's edits back into every partition on exit.
    """
    unique = {id(p): p for p in params if p is not None and is_zero3_param(p)}
    if not unique:
        return contextlib.nullcontext()
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    pending = [p for p in unique.values() if p.ds_status != ZeroParamStatus.AVAILABLE]
    if not pending and modifier_rank is None:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(pending or list(unique.values()), modifier_rank=modifier_rank)


def reshard_fsdp2(module) -> None:
    """Put FSDP2's shards back after a no-grad forward.

    With `reshard_after_forward=False` (SHARD_GRAD_OP, and torch's default for a root module) a
    forward leaves the all-gathered full weights registered until a backward reshards them. The
    teacher never runs a backward, so it would keep a full copy in memory on every rank, and the
    shard-wise EMA could not pair its full tensors with the student's shards.
    """
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def shard_fsdp2_per_layer(module, accelerator):
    """FSDP2-shard a no-grad copy per decoder layer, then at the root, as accelerate shards the student.

    TRL's `prepare_fsdp` shards only the root, so every teacher forward would gather the whole model at
    once. The copy has no backward, so it always reshards after its forward. Each parameter is split
    along dim 0 over the same mesh as the student's, which is what the shard-wise EMA needs.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    plugin = accelerator.state.fsdp_plugin
    mesh = getattr(accelerator, "torch_device_mesh", None)
    if mesh is not None:
        mesh = mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)]
    kwargs = dict(
        reshard_after_forward=True,
        offload_policy=plugin.cpu_offload,
        mp_policy=plugin.mixed_precision_policy or MixedPrecisionPolicy(),
        mesh=mesh,
    )
    layers = set(getattr(module, "_no_split_modules", None) or ())
    for sub in module.modules():
        if type(sub).__name__ in layers:
            fully_shard(sub, **kwargs)
    fully_shard(module, **kwargs)
    return module.eval()
