"""Replay the Triton head's threshold top-K on the CPU: how many candidates each row buffers, and what it reads.

The student's row kernel (kernels/triton_rows.py) sweeps each cuBLAS logit tile once. An entry below the row's
threshold τ is surely outside the top-K and goes to the tail sum; an entry at or above τ is a candidate, copied
into the row's candidate buffer; `torch.topk` on that buffer picks the K winners at the end. τ must be a lower
bound on the row's final K-th largest logit: the K-th largest of the maxima of blocks of SUB columns is one (K
distinct blocks hold an entry at least that large). The schemes replayed here differ in *which* block maxima τ
sees when a tile is swept:

- `issue`:   the K-th largest block max of all tiles so far *including this one*: each tile is read twice
             (a max pass, then the compaction pass). The scheme as first designed (a max pass, then compaction).
- `stale`:   ours. The tiles before this one only, so each tile is read once; only the first tile of a row
             chunk gets a max pre-pass (it is read twice).
- `tile`:    max(τ, K-th largest block max of this tile alone): no running set of maxima, but two reads.

Logits: i.i.d. Gaussian per row (the benchmark's inputs), the same with a frequency-like trend (low ids likelier,
as in BPE vocabularies), and ascending logits (the adversarial case: every tile beats the last one).

    python bench/topk_sim.py
"""

from __future__ import annotations

import itertools

import numpy as np

V = 151936
ROWS = 64


def logits(kind: str, rows: int, vocab: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((rows, vocab)).astype(np.float32) * 1.5  # std 0.05·√896 ≈ 1.5 in the benchmark
    if kind == "zipf":
        z += -1.2 * np.log1p(np.arange(vocab, dtype=np.float32) / 50.0)
    elif kind == "ascending":
        z = np.sort(z, axis=1)
    return z


def kth_largest(values: np.ndarray, k: int) -> np.ndarray:
    """The K-th largest per row (−inf where a row has fewer than K values)."""
    if values.shape[1] < k:
        return np.full(values.shape[0], -np.inf, dtype=np.float32)
    return -np.partition(-values, k - 1, axis=1)[:, k - 1]


def replay(z: np.ndarray, k: int, tile_cols: int, sub: int, scheme: str) -> dict:
    """Candidates per row and tile reads (in units of the row's V columns) for one scheme."""
    rows, vocab = z.shape
    bounds = [*range(0, vocab, tile_cols), vocab]
    maxima = np.empty((rows, 0), dtype=np.float32)  # the K largest block maxima so far
    tau = np.full(rows, -np.inf, dtype=np.float32)
    count = np.zeros(rows, dtype=np.int64)
    reads = 0
    for i, (v0, v1) in enumerate(itertools.pairwise(bounds)):
        tile = z[:, v0:v1]
        pad = (-tile.shape[1]) % sub
        blocks = np.pad(tile, ((0, 0), (0, pad)), constant_values=-np.inf).reshape(rows, -1, sub).max(axis=2)
        merged = np.concatenate([maxima, blocks], axis=1)
        if scheme == "issue":
            tau = kth_largest(merged, k)
            reads += 2 * tile.shape[1]
        elif scheme == "tile":
            tau = np.maximum(tau, kth_largest(blocks, k))
            reads += 2 * tile.shape[1]
        elif i == 0:  # stale: only the first tile is read twice
            tau = kth_largest(blocks, k)
            reads += 2 * tile.shape[1]
        else:
            reads += tile.shape[1]
        count += (tile >= tau[:, None]).sum(axis=1)
        maxima = -np.sort(-merged, axis=1)[:, :k]
        if scheme == "stale":
            tau = kth_largest(maxima, k)
    return {"mean": float(count.mean()), "max": int(count.max()), "reads": reads / vocab}


def main() -> None:
    print("logits     K    tile cols  SUB  scheme  candidates/row mean  max   tile reads (× V)")
    for kind in ("iid", "zipf", "ascending"):
        z = logits(kind, ROWS, V)
        for k in (100, 20):
            for tile_cols, sub in ((16384, 16), (16384, 32), (32768, 16), (65536, 64)):
                for scheme in ("issue", "stale", "tile"):
                    r = replay(z, k, tile_cols, sub, scheme)
                    print(
                        f"{kind:10} {k:<4} {tile_cols:<10} {sub:<4} {scheme:7} {r['mean']:>19.0f} {r['max']:>5} "
                        f"{r['reads']:>10.3f}"
                    )


if __name__ == "__main__":
    main()
