"""Why is SDPO with demonstrations only slower than GRPO on the built-in toy? A sweep that tells.

    python experiments/toy/toy_demos_only_study.py                 # about 15 minutes on 2 CPU cores
    python experiments/toy/toy_demos_only_study.py --grid followup # lower rates; lone successes that teach themselves
    python experiments/toy/toy_demos_only_study.py --smoke         # seconds: checks the plumbing only

The same warmed-up tiny model, task ("secret codes"), seeds and budget as `sdpo_vs_grpo.py`. GRPO and SDPO
(demos only) run over a wider range of learning rates, and SDPO also with the divergence's other ends
(α = 0: forward KL(teacher‖student); α = 1: reverse KL) and a faster EMA teacher. Every run records its
reward curve, the mean gradient norm of its first 10 steps, and the fraction of samples that had a
teacher. Results: `toy_demos_only.json` and `toy_demos_only.md` in `--output-dir`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

# The examples' plumbing is shared with the experiments (see sdpo_vs_grpo.py); the sibling script is on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from _common import Timer, set_seed
from sdpo_vs_grpo import SecretCodes, generations_to_target, median, run_method, smoothed, warm_up_tiny_model

# (method, learning rate, α, EMA rate τ[, SDPOConfig.dont_reprompt_on_self_success])
GRID = [
    *[("GRPO", lr, 0.5, 0.01) for lr in (5e-4, 1e-3, 2e-3, 4e-3)],
    *[("SDPO (demos only)", lr, 0.5, 0.01) for lr in (5e-4, 1e-3, 2e-3, 4e-3)],
    *[("SDPO (demos only)", lr, 0.0, 0.01) for lr in (5e-4, 1e-3, 2e-3)],
    ("SDPO (demos only)", 1e-3, 1.0, 0.01),
    ("SDPO (demos only)", 2e-3, 0.5, 0.05),
    ("SDPO", 1e-3, 0.5, 0.01),
]
# `--grid followup`: lower rates, and a lone success that may teach itself (like GRPO's advantage rewards it).
FOLLOWUP = [
    ("GRPO", 2.5e-4, 0.5, 0.01),
    ("SDPO (demos only)", 2.5e-4, 0.0, 0.01),
    ("SDPO (demos only)", 5e-4, 0.5, 0.01, False),
    ("SDPO (demos only)", 5e-4, 0.0, 0.01, False),
]


def label(method: str, lr: float, alpha: float, tau: float, no_self: bool = True) -> str:
    if method == "GRPO":
        return method
    return f"{method}, α={alpha:g}, τ={tau:g}" + ("" if no_self else ", self-demonstration allowed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/toy_demos_only_study"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=80)
    parser.add_argument("--grid", choices=["main", "followup"], default="main")
    parser.add_argument("--smoke", action="store_true")
    cli = parser.parse_args()
    cli.output_dir.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(1)  # the tiny model's matrices are too small for intra-op threads
    # The settings of sdpo_vs_grpo.py's committed run.
    args = argparse.Namespace(
        seed=0, smoke=cli.smoke, warmup_steps=None, batch_size=32, num_generations=8, topk=20,
        max_steps=2 if cli.smoke else cli.max_steps,
    )  # fmt: skip
    set_seed(0)
    task = SecretCodes(num_keys=8, seed=0)
    model, tokenizer, warm = warm_up_tiny_model(task, args)
    seeds = list(range(1 if cli.smoke else cli.seeds))
    grid = GRID if cli.grid == "main" else FOLLOWUP
    grid = grid[:2] + grid[-1:] if cli.smoke else grid
    name = "toy_demos_only" if cli.grid == "main" else "toy_demos_only_followup"
    rows, out = [], {"warmup": warm, "seeds": seeds, "settings": vars(args), "runs": []}
    for method, lr, alpha, tau, *rest in grid:
        no_self = rest[0] if rest else True
        curves, grad_norms, coverage = [], [], []
        with Timer() as t:
            for seed in seeds:
                run_args = argparse.Namespace(
                    **vars(args), alpha=alpha, teacher_update_rate=tau, dont_reprompt_on_self_success=no_self
                )
                logs: list = []
                curves.append(run_method(method, model, tokenizer, task, run_args, lr=lr, seed=seed, logs=logs))
                early = logs[:10]
                grad_norms.append(sum(h["grad_norm"] for h in early) / len(early))
                coverage.append(
                    sum(h.get("self_distillation/reprompt_sample_fraction", 0.0) for h in early) / len(early)
                )
        to_target = [generations_to_target(c, 0.9, 5) for c in curves]
        final = sum(smoothed(c, 5)[-1][1] for c in curves) / len(curves)
        run = dict(
            method=method, lr=lr, alpha=alpha, tau=tau, dont_reprompt_on_self_success=no_self,
            generations_to_target=to_target, median=median(to_target),
            final_reward=final, early_grad_norm=sum(grad_norms) / len(grad_norms),
            early_teacher_coverage=sum(coverage) / len(coverage), seconds=round(t.seconds, 1), curves=curves,
        )  # fmt: skip
        out["runs"].append(run)
        (cli.output_dir / f"{name}.json").write_text(json.dumps(out, indent=1) + "\n")
        budget = curves[0][-1][0]
        shown = ", ".join(f"> {budget}" if v is None else str(v) for v in to_target)
        med = run["median"]
        rows.append(
            f"| {label(method, lr, alpha, tau, no_self)} | {lr:g} | {shown} | {f'> {budget}' if med is None else f'{med:g}'} | "
            f"{final:.3f} | {run['early_grad_norm']:.3f} | {run['early_teacher_coverage']:.2f} |"
        )
        print(rows[-1], flush=True)
    table = [
        f"Secret codes, the warmed-up tiny model of sdpo_vs_grpo.py; {args.batch_size} generations per step, "
        f"{args.max_steps} steps; seeds {', '.join(map(str, seeds))}; K = {args.topk}.",
        "",
        "| arm | lr | generations to reward ≥ 0.9 (5-step mean), per seed | median | final reward | "
        "grad norm, steps 1–10 | samples with a teacher, steps 1–10 |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]
    (cli.output_dir / f"{name}.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    assert all(math.isfinite(r["final_reward"]) for r in out["runs"])


if __name__ == "__main__":
    main()
