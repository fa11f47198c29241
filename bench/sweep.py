"""What to run: model shapes, implementations, the default/quick sweeps, and the job list.

This module is imported by the *parent* process (`run.py`), which must stay small: on Linux a
child's `ru_maxrss` starts at its parent's high-water mark (the kernel carries it across exec),
so a parent that imported torch would put a floor under every child's peak RSS. Nothing here
imports torch.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from dataclasses import dataclass, field

# (hidden, vocab) of the lm_head of real models (the GPU target shapes: Qwen2.5-0.5B, Llama-3.2-1B and the 7B/8B
# shapes), plus the CPU performance-goal shape (docs/performance.md).
MODEL_SHAPES = {
    "qwen2.5-0.5b": (896, 151936),
    "qwen2.5-1.5b": (1536, 151936),
    "llama-3.2-1b": (2048, 128256),
    "gemma-3-1b": (1152, 262144),
    "qwen2.5-7b": (3584, 152064),
    "llama-3.1-8b": (4096, 128256),
    "cpu-h256": (256, 151936),
}

HEAD_IMPLS = ("naive", "trl-chunked", "liger-jsd", "sdpo_fast-torch", "sdpo_fast-triton", "lse-triton")
STEP_IMPLS = ("sdpo_fast", "grpo", "trl-sdpo-topk", "trl-sdpo-sampled")
# These compute the exact full-vocabulary JSD, a different quantity from top-K + tail: their
# records carry topk=None and they are checked against `sdpo_head(..., topk=None)`.
FULL_VOCAB_IMPLS = ("trl-chunked", "liger-jsd")
# A reference floor, not a competitor: a plain fused logsumexp head (the sampled token's cross-entropy
# plus the teacher's logsumexp pass) on our own Triton kernels, with no top-K, gather or divergence.
# It is independent of K (measured once, topk=None) and checked against a full-logit cross-entropy.
LSE_IMPLS = ("lse-triton",)
K_FREE_IMPLS = FULL_VOCAB_IMPLS + LSE_IMPLS
ALPHA = 0.5  # the reference's JSD; every head implementation gets the same alpha

# Dense bf16 tensor-core peaks in TFLOP/s (the vendors' published dense bf16 figures), matched against the device name.
# Order matters: the first substring that matches wins.
GPU_PEAK_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
    ("B200", 2250.0),
    ("4090", 165.0),
    ("T4", 65.0),
]

# Modules each head implementation needs. Every process of one head case (the inputs-only
# baseline included) imports the union, so import overhead cancels in "peak minus baseline".
HEAD_IMPORTS = {
    "naive": ["torch", "sdpo_fast"],
    "sdpo_fast-torch": ["torch", "sdpo_fast"],
    "sdpo_fast-triton": ["torch", "sdpo_fast", "triton"],
    "trl-chunked": ["torch", "sdpo_fast", "trl.kernels.chunked_divergence"],
    "liger-jsd": ["torch", "sdpo_fast", "liger_kernel.transformers.fused_linear_jsd"],
    "lse-triton": ["torch", "sdpo_fast", "triton"],
}

# The peers' benchmark setup (docs/performance.md): Qwen2 hidden 128, 2 layers, real vocabulary,
# 8 completions per step. `tokens` = loss tokens per step = 8 × max_completion_length.
STEP_MODEL = dict(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=151936)
STEP_GENERATIONS = 8


@dataclass
class Sweep:
    """One benchmark plan: head cases (shape, tokens, K) and the training-step configuration."""

    head_shapes: list[str]
    head_tokens: dict[str, list[int]]  # per shape
    topks: list[int]
    # Token counts at which K values after the first run, per shape; a shape not listed: all.
    extra_k_tokens: dict[str, list[int]] = field(default_factory=dict)
    step_tokens: int = 1024
    step_steps: int = 4  # step 1 is the warm-up; the median is over the rest
    warmup: int = 1
    runs: int = 3


def default_sweep(device: str, quick: bool) -> Sweep:
    """The sweeps `python bench/run.py` runs with no filters. CPU sizes keep it to minutes."""
    if device == "cuda":
        if quick:
            return Sweep(["qwen2.5-0.5b"], {"qwen2.5-0.5b": [1024]}, [100], step_tokens=512, step_steps=3, runs=5)
        shapes = ["qwen2.5-0.5b", "qwen2.5-1.5b", "llama-3.2-1b", "gemma-3-1b"]
        tokens = [1024, 4096, 16384]
        return Sweep(shapes, dict.fromkeys(shapes, tokens), [100, 20], warmup=2, runs=10)
    if quick:
        # A smoke run: one head case, and one timed step after the warm-up step.
        return Sweep(["cpu-h256"], {"cpu-h256": [64]}, [100], step_tokens=32, step_steps=2)
    # CPU: the issue-4 goal shape (N=2048, H=256, V=151936, K=100) with a smaller N for scaling,
    # K=20 at the goal size, and one real model shape at a CPU-sized N.
    return Sweep(
        ["cpu-h256", "qwen2.5-0.5b"],
        {"cpu-h256": [512, 2048], "qwen2.5-0.5b": [256]},
        [100, 20],
        {"cpu-h256": [2048], "qwen2.5-0.5b": []},
    )


def parse_shape(name: str) -> tuple[str, int, int]:
    """A named model shape, or a custom one written HxV (e.g. 64x4096)."""
    if name in MODEL_SHAPES:
        return (name, *MODEL_SHAPES[name])
    m = re.fullmatch(r"(\d+)x(\d+)", name)
    if not m:
        raise ValueError(f"Unknown model shape {name!r}: use one of {', '.join(MODEL_SHAPES)} or HxV, e.g. 64x4096.")
    return name, int(m.group(1)), int(m.group(2))


def skip_reason(impl: str, device: str) -> str | None:
    """Why an optional competitor or backend cannot run here (None when it can)."""
    if impl in ("sdpo_fast-triton", "lse-triton"):
        if device != "cuda":
            return "skipped: backend='triton' needs a CUDA GPU (never run under the Triton interpreter here)"
        if importlib.util.find_spec("triton") is None:
            return "skipped: the triton package is not installed"
    if impl == "liger-jsd":
        if device != "cuda":
            return "skipped: Liger-Kernel's fused linear JSD is Triton-only and needs a CUDA GPU"
        if importlib.util.find_spec("liger_kernel") is None:
            return "skipped: liger-kernel is not installed (pip install liger-kernel)"
    if impl in ("trl-chunked", "trl-sdpo-topk", "trl-sdpo-sampled") and importlib.util.find_spec("trl") is None:
        return "skipped: trl is not installed"
    if impl in TRL_SCORED_STEPS and device != "cuda" and trl_scores_with_triton_only():
        return (
            "skipped: TRL 1.15 scores log-probs with Triton kernels that need a CUDA GPU (TRL 1.16 runs them on CPUs)"
        )
    return None


# Training steps whose loss TRL computes (its log-prob scorer), as opposed to sdpo-fast's own head.
TRL_SCORED_STEPS = ("grpo", "trl-sdpo-topk", "trl-sdpo-sampled")


def trl_scores_with_triton_only() -> bool:
    """TRL 1.15's `ChunkedLogProbFunction` launches Triton kernels on any device; 1.16 falls back on the CPU."""
    try:
        release = importlib.metadata.version("trl").split(".")[:2]
        return (int(release[0]), int(release[1])) < (1, 16) and importlib.util.find_spec("triton") is not None
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False


@dataclass
class HeadCase:
    """One (shape, tokens) point: the implementations and K values measured on identical inputs."""

    shape: str
    hidden: int
    vocab: int
    tokens: int
    variants: list[tuple[str, int | None]]  # (impl, topk); topk None = full vocabulary

    @property
    def imports(self) -> list[str]:
        mods: list[str] = []
        for impl, _ in self.variants:
            mods += [m for m in HEAD_IMPORTS[impl] if m not in mods]
        return mods


def head_cases(sweep: Sweep, impls: list[str], device: str) -> tuple[list[HeadCase], list[tuple[str, str]]]:
    """Expand the sweep into cases; also return (impl, reason) for implementations skipped here."""
    runnable = [i for i in HEAD_IMPLS if i in impls and skip_reason(i, device) is None]
    skipped = [(i, skip_reason(i, device)) for i in HEAD_IMPLS if i in impls and skip_reason(i, device)]
    cases = []
    for name in sweep.head_shapes:
        shape, hidden, vocab = parse_shape(name)
        for n in sweep.head_tokens[name]:
            variants: list[tuple[str, int | None]] = []
            for k_pos, k in enumerate(sweep.topks):
                allowed = sweep.extra_k_tokens.get(name)
                if k_pos > 0 and allowed is not None and n not in allowed:
                    continue  # extra K values only where the sweep asks for them
                for impl in runnable:
                    if impl in K_FREE_IMPLS:
                        if k_pos == 0:
                            variants.append((impl, None))  # independent of K: measured once
                    elif k <= vocab:
                        variants.append((impl, k))
            if variants:
                cases.append(HeadCase(shape, hidden, vocab, n, variants))
    return cases, skipped


def step_impls(impls: list[str], device: str) -> tuple[list[str], list[tuple[str, str]]]:
    runnable = [i for i in STEP_IMPLS if i in impls and skip_reason(i, device) is None]
    skipped = [(i, skip_reason(i, device)) for i in STEP_IMPLS if i in impls and skip_reason(i, device)]
    return runnable, skipped
