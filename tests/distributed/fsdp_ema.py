"""`sdpo_fast.teacher.ema.ema_update` on FSDP2-sharded models, two CPU processes (gloo).

Launched by `tests/test_distributed.py` as

    python -m torch.distributed.run --nproc_per_node 2 ... tests/distributed/fsdp_ema.py OUT_DIR

The student is sharded per decoder layer and then at the root (as accelerate's `fsdp2_prepare_model`
does) and the teacher at the root only (as TRL's `prepare_fsdp` does for the ref model): FSDP2 shards
every parameter along dim 0 whatever the grouping, so their local shards line up. The vocabulary (161
rows) does not split evenly, so the shards are padded and unequal. Every check compares the gathered
result with `ema_update` on unsharded copies. Each rank writes `rank{R}.json`.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, Shard

from sdpo_fast.teacher.ema import ema_update
from sdpo_fast.testing import tiny_qwen2, tiny_tokenizer

RATE = 0.25


def full_params(model) -> dict[str, torch.Tensor]:
    """name → whole parameter (all-gathers DTensors; every rank calls this in the same order)."""
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a.keys() ^ b.keys()))[:5]
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def layout(model) -> dict:
    params = list(model.parameters())
    return {
        "all_dtensor": all(isinstance(p, DTensor) for p in params),
        "all_shard0": all(isinstance(p, DTensor) and tuple(p.placements) == (Shard(0),) for p in params),
        "local_numel": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params),
        "full_numel": sum(p.numel() for p in params),
    }


def shard_student(model, mesh, **kwargs):
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    return model


def train_step(student, ids: torch.Tensor) -> None:
    """One SGD step through FSDP2's all-gather / reduce-scatter, so the student moves by a real sharded update."""
    loss = student(input_ids=ids, labels=ids).loss
    loss.backward()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(p.grad, alpha=-1.0)
            p.grad = None


def fp32_rounds(tok, mesh, ids) -> dict:
    """Two rounds of (teacher no-grad forward, student step, EMA) with the fp32 fused `_foreach_lerp_` path."""
    torch.manual_seed(0)
    teacher = tiny_qwen2(tok, hidden_size=32, intermediate_size=64, seed=0).eval().requires_grad_(False)
    student = tiny_qwen2(tok, hidden_size=32, intermediate_size=64, seed=1)
    reference = copy.deepcopy(teacher)  # unsharded, same start
    shard_student(student, mesh)
    fully_shard(teacher, mesh=mesh, reshard_after_forward=True)
    out = {"student_layout": layout(student), "teacher_layout": layout(teacher), "rounds": []}
    for _ in range(2):
        with torch.no_grad():
            teacher(input_ids=ids)  # the trainer's teacher forward precedes every EMA update
        train_step(student, ids)
        before = full_params(teacher)
        student_full = full_params(student)
        ema_update(teacher, student, RATE)
        ema_update(reference, student_full, RATE)  # the single-process EMA on whole tensors
        after = full_params(teacher)
        with torch.no_grad():  # the forward all-gathers the updated shards: it must see the EMA
            sharded_logits = teacher(input_ids=ids).logits
            reference_logits = reference(input_ids=ids).logits
        out["rounds"].append(
            {
                "max_diff_vs_single_process": max_diff(after, full_params(reference)),
                "teacher_moved": max_diff(after, before),
                "logits_max_diff": float((sharded_logits - reference_logits).abs().max()),
                "layout_after": layout(teacher),
            }
        )
    return out


def bf16_teacher(tok, mesh) -> dict:
    """A bf16 teacher takes the stochastic-rounding path on its local shard."""
    teacher = tiny_qwen2(tok, hidden_size=32, intermediate_size=64, seed=0, dtype=torch.bfloat16)
    teacher.eval().requires_grad_(False)
    student = tiny_qwen2(tok, hidden_size=32, intermediate_size=64, seed=1)
    start = full_params(teacher)
    student_full = full_params(student)
    shard_student(student, mesh)
    fully_shard(teacher, mesh=mesh)
    ema_update(teacher, student, RATE, generator=torch.Generator().manual_seed(dist.get_rank()))
    after = full_params(teacher)
    worst, rounded_up_or_down, not_nearest = 0.0, True, 0
    for name, value in after.items():
        exact = start[name].float().lerp(student_full[name], RATE)
        nearest = exact.to(torch.bfloat16)
        # stochastic rounding lands on one of the two bf16 neighbours of the exact fp32 value
        spacing = exact.abs().clamp(min=1e-30) * 2.0**-7
        err = (value.float() - exact).abs()
        worst = max(worst, float((err / spacing).max()))
        rounded_up_or_down &= bool((err <= spacing).all())
        not_nearest += int((value != nearest).sum())
    return {
        "dtype": str(next(teacher.parameters()).dtype),
        "layout": layout(teacher),
        "worst_error_in_spacings": worst,
        "within_one_spacing": rounded_up_or_down,
        "elements_not_round_to_nearest": not_nearest,
        "elements": sum(v.numel() for v in after.values()),
        "teacher_moved": max_diff(after, start),
    }


def unresharded_teacher(tok, mesh, ids) -> dict:
    """reshard_after_forward=False (FSDP2's SHARD_GRAD_OP): after a no-grad forward the teacher keeps its
    *unsharded* parameters registered, so they no longer pair with the student's shards. `ema_update`
    must refuse instead of updating throw-away all-gathered copies; after `reshard()` it must work."""
    teacher = tiny_qwen2(tok, hidden_size=32, intermediate_size=64, seed=0).eval().requires_grad_(False)
    student = tiny_qwen2(tok, hidden_size=32, intermediate_size=64, seed=1)
    reference = copy.deepcopy(teacher)
    shard_student(student, mesh)
    fully_shard(teacher, mesh=mesh, reshard_after_forward=False)
    with torch.no_grad():
        teacher(input_ids=ids)
    out = {"after_forward_layout": layout(teacher), "error": None}
    try:
        ema_update(teacher, student, RATE)
    except ValueError as exc:
        out["error"] = str(exc)
    for module in teacher.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    out["after_reshard_layout"] = layout(teacher)
    ema_update(teacher, student, RATE)
    ema_update(reference, full_params(student), RATE)
    out["after_reshard_max_diff"] = max_diff(full_params(teacher), full_params(reference))
    return out


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    tok = tiny_tokenizer()
    ids = torch.tensor([tok("what is 2 plus 3 ? the answer is 5")["input_ids"]])
    result = {
        "rank": rank,
        "world_size": dist.get_world_size(),
        "backend": dist.get_backend(),
        "fp32": fp32_rounds(tok, mesh, ids),
        "bf16": bf16_teacher(tok, mesh),
        "unresharded": unresharded_teacher(tok, mesh, ids),
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(Path(sys.argv[1]))
    # Results are written and the group is gone: skip interpreter teardown, where gloo's threads can
    # be destroyed while joinable ("terminate called without an active exception", SIGABRT) under load.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
