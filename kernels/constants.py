"""Names and limits shared by the head, the trainer's config and the kernels.

Imports nothing heavy (no torch, no triton), so `sdpo_fast.config` can read the backend names cheaply.
"""

from __future__ import annotations

import os

# `sdpo_head(backend=...)` and `SDPOConfig.distillation_backend` accept exactly these.
BACKENDS = ("auto", "triton", "torch", "naive")

# The Triton head keeps each row's top-K candidates in a buffer of a few K per row (kernels/triton_head.py):
# `auto` falls back to the torch backend above this K, and `backend="triton"` refuses it.
TRITON_MAX_TOPK = 1024

# What `backend="auto"` picks on a CUDA device: rows of (minimum compute capability, largest token count N or
# None for any, backend), first match wins; no match means "torch". PREDICTED from the cost model
# (bench/cost_model.py), not yet measured: both backends run their GEMMs in cuBLAS, and the Triton head's row
# kernels (no `tl.dot`, so no tensor-core code generation is needed and sm_75 is fine) replace the torch backend's
# several elementwise passes and torch.topk calls per tile with one pass, at every N. Off CUDA, or without
# Triton, `auto` is the torch backend.
AUTO_TABLE: tuple[tuple[tuple[int, int], int | None, str], ...] = (((7, 5), None, "triton"),)


def auto_backend(capability: tuple[int, int], n_tokens: int | None = None) -> str:
    """The backend `AUTO_TABLE` names for a CUDA GPU of this capability at N tokens (None: any N)."""
    for min_capability, max_tokens, backend in AUTO_TABLE:
        if capability >= min_capability and (max_tokens is None or n_tokens is None or n_tokens <= max_tokens):
            return backend
    return "torch"


def interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1, set before Triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
