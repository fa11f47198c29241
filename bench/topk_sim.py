"""Count the insertion-loop iterations of the student kernel's running top-K, without a GPU.

`_insert_candidates` (kernels/triton_fwd.py) inserts one key per row per iteration and loops while
any row of the (BLOCK_M, BLOCK_V) tile still has a key above that row's set minimum, so one tile
costs max over its rows of the keys it inserts. This replays that rule in numpy on the benchmark's
logit statistics (i.i.d. Gaussian across the vocabulary) for a set of KP slots (the next power of
two, the old behaviour) and of exactly K slots (padding pinned at +∞), per row block and split.

    python bench/topk_sim.py
"""

from __future__ import annotations

import numpy as np

V, BLOCK_M, BLOCK_V = 151936, 64, 128


def loop_iterations(set_size: int, cols: int, seed: int = 0) -> int:
    z = np.random.default_rng(seed).standard_normal((BLOCK_M, cols)).astype(np.float32)
    best = np.empty((BLOCK_M, 0), dtype=np.float32)
    total = 0
    for v0 in range(0, cols, BLOCK_V):
        tile = z[:, v0 : v0 + BLOCK_V]
        merged = np.concatenate([best, tile], axis=1)
        best = -np.sort(-merged, axis=1)[:, :set_size]  # the set after the tile: top-`set_size` so far
        inserted = (tile >= best[:, -1:]).sum(axis=1)  # the tile's keys that made it in (no ties in i.i.d. floats)
        total += int(inserted.max())
    return total


def main() -> None:
    print("K    KP   splits  tiles/split  iterations (KP set)  iterations (K set)  fewer")
    for k, kp in ((100, 128), (20, 32)):
        for splits in (3, 33):  # the launcher's split count at 16k and at 1k tokens on a 132-SM H100
            cols = V // splits
            a, b = loop_iterations(kp, cols), loop_iterations(k, cols)
            print(f"{k:<4} {kp:<4} {splits:<7} {cols // BLOCK_V:<12} {a:<20} {b:<19} {100 * (1 - b / a):.0f}%")


if __name__ == "__main__":
    main()
