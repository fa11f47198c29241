"""A cost model of the SDPO head on a GPU: FLOPs at cuBLAS's rate plus bytes at HBM bandwidth, kernel by kernel.

Every number it prints is a PREDICTION. Each implementation is written down as the kernels it launches: a GEMM
costs its FLOPs at an achievable cuBLAS rate (a fraction of the dense bf16 peak); a memory-bound kernel costs its
HBM bytes at an achievable bandwidth; every launch adds a small gap. Nothing overlaps and L2 hits are ignored, so
the model is pessimistic where a tile stays in L2 between the GEMM that writes it and the kernel that reads it.

Calibration: the model predicts TRL's `ChunkedDivergenceFunction` (whose kernels are written down below from its
source, trl 1.16) against the committed H100 measurement (bench/results/cuda-nvidia-h100-80gb-hbm3-2026-11-25-
head.md: 7.5, 24.1, 94.2 ms at 1k, 4k, 16k tokens of the Qwen2.5-0.5B shape); `calibration()` reports the ratio.

    python bench/cost_model.py                 # Markdown tables for H100 SXM, H200, T4
    python bench/cost_model.py --device h100 --breakdown qwen2.5-0.5b 16384
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

# (hidden, vocab) of the issue-11 target shapes
SHAPES = {
    "qwen2.5-0.5b": (896, 151936),
    "llama-3.2-1b": (2048, 128256),
    "qwen2.5-7b": (3584, 152064),
    "llama-3.1-8b": (4096, 128256),
}
TOKENS = (1024, 4096, 16384)
MEASURED_TRL_H100 = {1024: 7.5, 4096: 24.1, 16384: 94.2}  # ms, Qwen2.5-0.5B shape, bf16, fwd+bwd


@dataclass(frozen=True)
class Device:
    name: str
    peak_tflops: float  # dense bf16 (fp16 on a T4) tensor-core peak
    gemm_efficiency: float  # cuBLAS's achievable fraction of it on these shapes
    hbm_tbps: float  # peak HBM bandwidth
    hbm_efficiency: float  # achievable fraction for a streaming kernel
    launch_gap_us: float  # per kernel launch, device side

    @property
    def gemm_rate(self) -> float:
        return self.peak_tflops * 1e12 * self.gemm_efficiency

    @property
    def bandwidth(self) -> float:
        return self.hbm_tbps * 1e12 * self.hbm_efficiency


DEVICES = {
    "h100": Device("H100 SXM", 989.0, 0.70, 3.35, 0.90, 3.0),
    "h200": Device("H200", 989.0, 0.70, 4.8, 0.90, 3.0),
    "t4": Device("T4 (fp16)", 65.0, 0.60, 0.32, 0.85, 4.0),
}


@dataclass
class Kernel:
    name: str
    flops: float = 0.0
    bytes: float = 0.0
    launches: float = 1.0

    def seconds(self, dev: Device, overlap: bool = False) -> float:
        """FLOPs at cuBLAS's rate plus bytes at HBM bandwidth (or, `overlap`, the larger of the two: a GEMM whose
        epilogue writes stream out while it computes), plus the launch gaps."""
        compute, memory = self.flops / dev.gemm_rate, self.bytes / dev.bandwidth
        return (max(compute, memory) if overlap else compute + memory) + self.launches * dev.launch_gap_us * 1e-6


def ours(n: int, hidden: int, vocab: int, topk: int | None = 100, budget_mb: float = 256) -> list[Kernel]:
    """The Triton head (kernels/triton_head.py) at its default plan: forward tiles of ≤ 4096 × 16384 fp32, the
    backward's square-ish tiles of 10 bytes per element. topk=None: the lse floor (`lse-triton`)."""
    nv, nhv = n * vocab, n * hidden * vocab
    cols = min(vocab, 16384)
    rows = max(1, min(n, int(budget_mb * 2**20 // 4 // cols)))
    if n * vocab * 4 <= budget_mb * 2**20:
        rows, cols = n, vocab
    tiles = math.ceil(n / rows) * math.ceil(vocab / cols)
    ks = [
        Kernel("student tile GEMMs", flops=2 * nhv, bytes=4 * nv, launches=tiles),
        Kernel("student row sweep", bytes=4 * nv + 4 * nv / 16, launches=tiles),
        Kernel("teacher tile GEMMs", flops=2 * nhv, bytes=4 * nv, launches=tiles),
        Kernel("teacher row sweep", bytes=4 * nv, launches=tiles),
    ]
    if topk:
        cap = 128 * math.ceil((4 * topk + 512) / 128)
        first_tiles = math.ceil(n / rows)
        ks += [
            Kernel("first-tile max pre-pass", bytes=4 * n * cols, launches=first_tiles),
            Kernel("threshold updates (torch.topk of block maxima)", bytes=tiles * rows * (topk + cols / 16) * 8,
                   launches=3 * tiles),
            Kernel("teacher gather/mask", bytes=n * topk * 16, launches=tiles),
            Kernel("candidate top-K and losers", bytes=n * cap * 8 * 3 + n * topk * 16, launches=8),
            Kernel("bucket epilogue (N, K)", bytes=n * topk * 8 * 12, launches=40),
        ]  # fmt: skip
    # backward: rows × cols tiles of 10 bytes per element, as square as the budget allows
    elements = budget_mb * 2**20 / 10
    side = math.sqrt(elements)
    b_rows, b_cols = min(n, side), min(vocab, elements / min(n, side))
    b_tiles = math.ceil(n / b_rows) * math.ceil(vocab / b_cols)
    ks += [
        Kernel("backward tile GEMMs (recompute)", flops=2 * nhv, bytes=4 * nv, launches=b_tiles),
        Kernel("dz row kernel (fp32 in, bf16 out, K writes)", bytes=6 * nv, launches=b_tiles),
        Kernel("dh GEMMs", flops=2 * nhv, bytes=2 * nv + 8 * n * hidden * math.ceil(vocab / b_cols),
               launches=b_tiles),
        Kernel("dW GEMMs", flops=2 * nhv, bytes=2 * nv + 8 * vocab * hidden * math.ceil(n / b_rows),
               launches=b_tiles),
        Kernel("dW/dh to the model dtype", bytes=6 * vocab * hidden + 6 * n * hidden, launches=2),
    ]  # fmt: skip
    return ks


def trl_chunked(n: int, hidden: int, vocab: int) -> list[Kernel]:
    """TRL's ChunkedDivergenceFunction (trl/kernels/chunked_divergence.py, 1.16), the exact JSD: 4096 × 32768
    fp32 tiles of both models, a stats pass, a JSD pass and a backward, each recomputing both tiles."""
    nv, nhv = n * vocab, n * hidden * vocab
    rows, cols = min(n, 4096), min(vocab, 32768)
    tiles = math.ceil(n / rows) * math.ceil(vocab / cols)
    return [
        Kernel("stats pass: 2 tile GEMMs", flops=4 * nhv, bytes=8 * nv, launches=2 * tiles),
        Kernel("stats kernel (reads both tiles)", bytes=8 * nv, launches=tiles),
        Kernel("JSD pass: 2 tile GEMMs", flops=4 * nhv, bytes=8 * nv, launches=2 * tiles),
        Kernel("JSD kernel", bytes=8 * nv, launches=tiles),
        Kernel("backward: 2 tile GEMMs", flops=4 * nhv, bytes=8 * nv, launches=2 * tiles),
        Kernel("backward kernel (reads 2, writes 1)", bytes=12 * nv, launches=tiles),
        Kernel("grad tile to bf16", bytes=6 * nv, launches=tiles),
        Kernel("dh addmm", flops=2 * nhv, bytes=2 * nv + 8 * n * hidden * math.ceil(vocab / cols), launches=tiles),
        Kernel("dW addmm (fp32 V×H accumulator)", flops=2 * nhv,
               bytes=2 * nv + 8 * vocab * hidden * math.ceil(n / rows), launches=tiles),
        Kernel("zero and cast dW/dh", bytes=10 * vocab * hidden + 10 * n * hidden, launches=4),
    ]  # fmt: skip


def predict_ms(kernels: list[Kernel], dev: Device, overlap: bool = False) -> float:
    return 1e3 * sum(k.seconds(dev, overlap) for k in kernels)


def peak_fraction(n: int, hidden: int, vocab: int, ms: float, dev: Device) -> float:
    """Useful work 8·N·H·V (two forward GEMMs, dh, dW) over the time, as a fraction of the dense peak."""
    return 8 * n * hidden * vocab / (ms * 1e-3) / (dev.peak_tflops * 1e12)


def calibration(dev: Device = DEVICES["h100"], overlap: bool = False) -> dict[int, float]:
    """Predicted / measured time of TRL chunked on the H100 at the Qwen2.5-0.5B shape."""
    hidden, vocab = SHAPES["qwen2.5-0.5b"]
    return {n: predict_ms(trl_chunked(n, hidden, vocab), dev, overlap) / ms for n, ms in MEASURED_TRL_H100.items()}


def table(dev: Device) -> str:
    lines = [
        f"**{dev.name}: PREDICTED** (cuBLAS at {dev.gemm_rate / 1e12:.0f} TFLOP/s, HBM at "
        f"{dev.bandwidth / 1e12:.2f} TB/s, {dev.launch_gap_us:g} µs per launch; no L2 reuse). Each time is "
        "FLOPs + bytes per kernel (the calibrated model); in brackets the per-kernel max of the two (a GEMM's tile "
        "writes fully hidden under its compute: an optimistic bound).",
        "",
        "| shape | N | ours K=100 | ours K=20 | lse floor | TRL chunked | ours vs TRL | ours % of peak (8·N·H·V) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for shape, (hidden, vocab) in SHAPES.items():
        for n in TOKENS:
            k100, k100_o = (predict_ms(ours(n, hidden, vocab, 100), dev, o) for o in (False, True))
            k20 = predict_ms(ours(n, hidden, vocab, 20), dev)
            floor = predict_ms(ours(n, hidden, vocab, None), dev)
            trl, trl_o = (predict_ms(trl_chunked(n, hidden, vocab), dev, o) for o in (False, True))
            frac, frac_o = (peak_fraction(n, hidden, vocab, t, dev) for t in (k100, k100_o))
            lines.append(
                f"| {shape} (H={hidden}, V={vocab}) | {n:,} | {k100:.1f} ms [{k100_o:.1f}] | {k20:.1f} ms | "
                f"{floor:.1f} ms | {trl:.1f} ms [{trl_o:.1f}] | {trl / k100:.2f}× [{trl_o / k100_o:.2f}×] | "
                f"{100 * frac:.0f}% [{100 * frac_o:.0f}%] |"
            )
    return "\n".join(lines)


def breakdown(kernels: list[Kernel], dev: Device) -> str:
    total = sum(k.seconds(dev) for k in kernels)
    rows = [f"{'kernel':52} {'GFLOP':>9} {'GB':>8} {'launches':>9} {'ms':>8} {'share':>6}"]
    for k in kernels:
        s = k.seconds(dev)
        rows.append(
            f"{k.name:52} {k.flops / 1e9:9.0f} {k.bytes / 1e9:8.2f} {k.launches:9.0f} {1e3 * s:8.2f} "
            f"{100 * s / total:5.1f}%"
        )
    rows.append(f"{'total (PREDICTED)':52} {'':9} {'':8} {'':9} {1e3 * total:8.2f}")
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=list(DEVICES), action="append")
    p.add_argument("--breakdown", nargs=2, metavar=("SHAPE", "N"), help="per-kernel costs of ours and TRL's")
    args = p.parse_args(argv)
    devices = [DEVICES[d] for d in (args.device or list(DEVICES))]
    if args.breakdown:
        hidden, vocab = SHAPES[args.breakdown[0]]
        n = int(args.breakdown[1])
        for dev in devices:
            print(
                f"## {dev.name}, {args.breakdown[0]}, N={n}: ours (K=100)\n{breakdown(ours(n, hidden, vocab), dev)}\n"
            )
            print(f"## TRL chunked\n{breakdown(trl_chunked(n, hidden, vocab), dev)}\n")
        return
    for dev in devices:
        print(table(dev) + "\n")
    for overlap in (False, True):
        cal = calibration(overlap=overlap)
        print(
            f"Calibration (H100, {'per-kernel max' if overlap else 'FLOPs + bytes'}): TRL chunked predicted / "
            "measured at the Qwen2.5-0.5B shape: " + ", ".join(f"N={n}: {r:.2f}" for n, r in cal.items())
        )


if __name__ == "__main__":
    main()
