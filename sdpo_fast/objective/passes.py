"""The two forward passes of one SDPO micro-batch: the no-grad teacher pass and the student pass with the head.

Neither builds full-vocabulary logits: the teacher pass returns hidden states at the scored completion positions,
and the student pass runs the fused head *inside* the model's forward (`sdpo_fast.forward`), so the (B, T, V)
logits tensor never exists.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..distributed import full_weight, zero3_gathered
from ..forward import SDPORequest


@dataclass
class Runtime:
    """What the objective needs from the training loop. The trainer fills it: it is the one module that reads
    TRL's and the HF Trainer's attributes, so the objective can be built and tested without them."""

    autocast: Callable = contextlib.nullcontext
    reduce: Callable[[torch.Tensor, str], torch.Tensor] = lambda tensor, reduction: tensor
    num_processes: int = 1
    accumulation_steps: Callable[[], int] = lambda: 1
    steps_per_generation: int = 1
    global_step: Callable[[], int] = lambda: 0
    zero3: bool = False
    # the MoE router's load-balancing coefficient while it is enabled, else None (read per call: it can change)
    router_aux_coef: Callable[[], float | None] = lambda: None


def _teacher_kwargs(ids: torch.Tensor, att: torch.Tensor) -> dict[str, torch.Tensor]:
    """Teacher inputs without the columns that are left padding in every row; positions follow the mask."""
    first = int(att.any(dim=0).nonzero()[0]) if att.any() else 0
    ids, att = ids[:, first:], att[:, first:]
    return dict(input_ids=ids, attention_mask=att, position_ids=(att.cumsum(dim=1) - 1).clamp(min=0))


def teacher_states(teacher, model, inputs, score_mask: torch.Tensor, rows: torch.Tensor, chunk_rows, runtime: Runtime):
    """Teacher hidden states at the scored positions (N, H_T) and the teacher's lm_head weight, or None.

    Only `rows` (a bool (B,) mask: samples with a teacher signal) are run, in chunks of `chunk_rows`. When every
    teacher forward is a collective (FSDP2, ZeRO-3), all ranks run the same number of chunks (a rank with fewer
    rows repeats a real row and discards it) and fetch the weight.
    """
    t_ids, t_mask = inputs["teacher_input_ids"], inputs["teacher_attention_mask"]
    n_rows, length = score_mask.shape
    row_idx = (rows & score_mask.any(dim=1)).nonzero().squeeze(1)
    chunk = chunk_rows or max(row_idx.numel(), 1)
    n_chunks = math.ceil(row_idx.numel() / chunk)
    if teacher.lockstep:
        n_chunks = int(runtime.reduce(torch.tensor(n_chunks, device=t_ids.device), "max"))
    if n_chunks == 0:
        return None
    parts = []
    with torch.no_grad():
        for c in range(n_chunks):
            idx = row_idx[c * chunk : (c + 1) * chunk]
            kwargs = _teacher_kwargs(
                t_ids[idx] if idx.numel() else t_ids[:1], t_mask[idx] if idx.numel() else t_mask[:1]
            )
            with runtime.autocast():
                hidden = teacher.hidden_states(model, kwargs, length)
            if idx.numel():  # else a padding chunk that only kept the ranks' collectives in step
                parts.append(hidden)
        weight = teacher.lm_head_weight(model)
        teacher.end_pass()
    if not parts:
        return None
    hidden_rows = torch.cat(parts)
    full = hidden_rows.new_zeros(n_rows, length, hidden_rows.shape[-1])
    full[row_idx] = hidden_rows
    return full[score_mask], weight


def student_forward(model, batch: tuple, score_mask: torch.Tensor, head_fn, runtime: Runtime, router_aux=False):
    """One student forward with `head_fn(hidden, h, weight, targets, gather)` run inside it on the scored rows.

    `batch` is (prompt_ids, prompt_mask, completion_ids, completion_mask). `h` is `hidden[score_mask]` in the
    weight's dtype; `gather` holds the `weight_gather` keyword under ZeRO-3.
    """
    prompt_ids, prompt_mask, completion_ids, completion_mask = batch
    targets = completion_ids[score_mask]

    def head(hidden: torch.Tensor, weight: torch.Tensor):
        # FSDP2: gather the DTensor (differentiably); ZeRO-3: the head gathers it in its forward and backward.
        weight = full_weight(weight)
        gather = {"weight_gather": lambda: zero3_gathered([weight])} if runtime.zero3 else {}
        h = hidden[score_mask]
        return head_fn(hidden, h if h.dtype == weight.dtype else h.to(weight.dtype), weight, targets, gather)

    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    request = SDPORequest(completion_ids.shape[1], head, router_aux=router_aux)
    with runtime.autocast():
        return model(input_ids=input_ids, attention_mask=attention_mask, sdpo=request)


def scatter_rows(values: torch.Tensor, score_mask: torch.Tensor) -> torch.Tensor:
    """(N,) values at the scored positions → (B, T), zero elsewhere."""
    return values.new_zeros(score_mask.shape).masked_scatter(score_mask, values)
