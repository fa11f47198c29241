"""Test setup: CPU runs use the Triton interpreter; helpers in this folder are importable."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch
from hypothesis import settings

# The Triton kernels run on the CPU through the interpreter, which must be chosen before
# `triton.jit` decorates them (i.e. before sdpo_fast's Triton module is first imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    with contextlib.suppress(ImportError):  # Triton reads its knobs on first import: do it while interpreting
        import triton  # noqa: F401

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).parent))

# Property tests draw the same examples on every run: CI must not depend on luck.
settings.register_profile("sdpo", derandomize=True, print_blob=True)
settings.load_profile("sdpo")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@contextlib.contextmanager
def bench_scripts_imported(*names: str):
    """bench/'s scripts (plain scripts, not a package) imported from their folder, and forgotten afterwards."""
    import importlib

    bench = str(Path(__file__).resolve().parents[1] / "bench")
    saved = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    sys.path.insert(0, bench)
    try:
        yield {n: importlib.import_module(n) for n in names}
    finally:
        sys.path.remove(bench)
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(saved)
