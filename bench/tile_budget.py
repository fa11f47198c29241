"""Our Triton head at one shape for several scratch budgets (`memory_budget_mb`): which tile size is fastest.

    python bench/tile_budget.py [--shape 896x151936] [--tokens 16384] [--topk 100] [--out tile-budget.json]

A budget sets the tile sizes (forward: rows × 16384 fp32 columns; backward: square-ish tiles of 10 bytes per
element). Small tiles may stay in the GPU's L2 cache between the cuBLAS GEMM that writes them and the row kernel
that reads them, which the cost model (bench/cost_model.py) does not count; more, smaller tiles cost more
launches. CUDA only.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from head_bench import make_inputs, time_runs

from sdpo_fast import sdpo_head

BUDGETS_MB = (32, 64, 128, 256, 512)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="896x151936", help="HxV")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--topk", type=int, default=100)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", help="write the results here as JSON")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/tile_budget.py needs a CUDA GPU.")
    hidden, vocab = (int(x) for x in args.shape.split("x"))
    x = make_inputs(args.tokens, hidden, vocab, "bfloat16", "cuda")
    results = []
    for budget in BUDGETS_MB:

        def head(x, topk, alpha, budget=budget):
            out = sdpo_head(x.h_s, x.w_s, x.h_t, x.w_t, x.targets, topk=topk, alpha=alpha, backend="triton",
                            memory_budget_mb=budget)  # fmt: skip
            return out.divergence

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        times, loss = time_runs(head, x, args.topk, 0.5, "cuda", warmup=1, runs=args.runs)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        results.append(dict(budget_mb=budget, median_ms=statistics.median(times), times_ms=times, loss=loss,
                            peak_mem_mib=peak))  # fmt: skip
        print(f"budget {budget:>4} MiB: median {statistics.median(times):7.2f} ms, extra peak {peak:7.0f} MiB")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(shape=args.shape, tokens=args.tokens, topk=args.topk, results=results), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
