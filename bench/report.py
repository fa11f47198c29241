"""Turning benchmark records into a console line, a Markdown report and a PNG of memory/time vs tokens.

Only the standard library at import time (the parent process must stay small); matplotlib is
imported inside `plot`.
"""

from __future__ import annotations

import re

from sweep import LSE_IMPLS

OURS = ("sdpo_fast-triton", "sdpo_fast-torch")  # our two backends; the Triton one is measured first
NOISE_MIB = 16  # peak-RSS differences below this are run-to-run noise on the CPU


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _mib(x) -> str:
    return "—" if x is None else f"{x:,.0f}"


def _ms(x) -> str:
    if x is None:
        return "—"
    return f"{x / 1e3:.2f} s" if x >= 1e4 else f"{x:.1f} ms"


def _ratio(x) -> str:
    return "—" if x is None else f"{x:.2f}×"


def _k(topk, bench: str = "head", impl: str | None = None) -> str:
    if topk is not None:
        return str(topk)
    return "full V" if bench == "head" and impl not in LSE_IMPLS else "—"


def one_line(r: dict) -> str:
    """A console line for one finished record."""
    where = f"{r.get('shape', 'qwen2-h' + str(r['hidden']))} N={r['tokens']}"
    head = f"[{r['bench']}] {r['impl']:<17} {where:<24} K={_k(r['topk'], r['bench'], r['impl']):<6}"
    if r["error"]:
        return f"{head} ERROR {r['error']}"
    flag = "ok" if r["ok"] else "NOT OK"
    return f"{head} extra peak {_mib(r['peak_mem_mib']):>7} MiB  median {_ms(r['median_ms']):>10}  {flag}"


# ------------------------------------------------------------------------------------ ratios


def _naive_for(records: list[dict], r: dict) -> dict | None:
    """The naive record at r's shape and size; full-vocabulary competitors get naive at the largest K."""
    same = [
        x
        for x in records
        if x["bench"] == "head"
        and x["impl"] == "naive"
        and x["error"] is None
        and x.get("shape") == r.get("shape")
        and x["tokens"] == r["tokens"]
    ]
    exact = [x for x in same if x["topk"] == r["topk"]]
    if exact:
        return exact[0]
    return max(same, key=lambda x: x["topk"] or 0) if same else None


def _div(a, b):
    return a / b if a is not None and b not in (None, 0) and b > 0 else None


def head_ratios(records: list[dict]) -> None:
    """Add mem_vs_naive (impl extra / naive extra) and time_vs_naive to every head record."""
    for r in records:
        if r["bench"] != "head" or r["error"]:
            continue
        ref = _naive_for(records, r)
        if ref is not None:
            r["mem_vs_naive"] = _div(r["peak_mem_mib"], ref["peak_mem_mib"])
            r["time_vs_naive"] = _div(r["median_ms"], ref["median_ms"])


def step_ratios(records: list[dict]) -> None:
    """Add extra_vs_grpo_mib (peak minus GRPO's peak) and time_vs_grpo to every step record."""
    grpo = {r["tokens"]: r for r in records if r["bench"] == "step" and r["impl"] == "grpo" and r["error"] is None}
    for r in records:
        ref = grpo.get(r["tokens"]) if r["bench"] == "step" and not r["error"] else None
        if ref is not None and r["peak_mem_mib"] is not None and ref["peak_mem_mib"] is not None:
            r["extra_vs_grpo_mib"] = r["peak_mem_mib"] - ref["peak_mem_mib"]
            r["time_vs_grpo"] = _div(r["median_ms"], ref["median_ms"])


# ------------------------------------------------------------------------------------ markdown


def markdown(records: list[dict], meta: dict) -> str:
    head_ratios(records)
    step_ratios(records)
    out = [f"# sdpo-fast benchmark: {meta['device_name']}", ""]
    versions = ", ".join(
        f"{k} {meta[k]}" for k in ("git", "torch", "trl", "transformers", "triton", "liger_kernel") if meta.get(k)
    )
    out += [
        f"{meta['date']} · `{meta['command']}` · {versions} · {meta['threads']} torch threads · "
        f"{meta['runtime_s']:.0f} s in all",
        "",
    ]
    if meta.get("loadavg_start"):
        out += [
            f"Load average (1, 5, 15 min) at the start {meta['loadavg_start']}, at the end {meta['loadavg_end']}; "
            f"on {meta.get('cpus', '?')} CPUs. Anything well above 1 means other work shared the machine.",
            "",
        ]
    out += _check_section(records, meta)
    out += _head_section(records, meta)
    out += _step_section(records)
    out += _goal_section(records, meta)
    out += _ratio_section(records)
    skipped = [r for r in records if r.get("skipped")]
    if skipped:
        out += ["## Skipped", ""] + [f"- `{r['impl']}`: {r['error']}" for r in skipped] + [""]
    return "\n".join(out)


def _check_section(records: list[dict], meta: dict) -> list[str]:
    seen, rows = set(), []
    for r in records:
        c = r.get("check")
        if not c or (r["impl"], r["topk"]) in seen:
            continue
        seen.add((r["impl"], r["topk"]))
        against = "naive, topk=None (exact full-vocabulary JSD)" if r["topk"] is None else f"naive, K={r['topk']}"
        if r["impl"] == "lse-triton":
            against = "full-logit cross-entropy (fp32)"
        errs = [
            f"{c[k]:.1e}" if c.get(k) is not None else "—" for k in ("loss_rel_err", "grad_h_rel_err", "grad_w_rel_err")
        ]
        rows.append(f"| {r['impl']} | {against} | {' | '.join(errs)} | {'ok' if c['ok'] else '**MISMATCH**'} |")
    if not rows:
        return []
    chk = meta.get("check") or {}
    return [
        f"## Correctness (shape {chk.get('shape')}, N={chk.get('tokens')}, same inputs, forward + backward)",
        "",
        "Relative errors against the naive PyTorch head: |Δloss|/|loss| and ‖Δgrad‖/‖grad‖ for h_S and W.",
        "",
        "| impl | compared with | loss | grad h | grad W | verdict |",
        "|---|---|---:|---:|---:|---|",
        *rows,
        "",
    ]


def _head_section(records: list[dict], meta: dict) -> list[str]:
    rows = [r for r in records if r["bench"] == "head" and not r.get("skipped")]
    if not rows:
        return []
    cpu = meta["device"] == "cpu"
    mem_how = (
        "peak RSS of a fresh process minus that of an inputs-only process with the same imports"
        if cpu
        else "`torch.cuda.max_memory_allocated()` after a reset, minus the inputs"
    )
    out = [
        "## Head: forward + backward",
        "",
        f"Extra peak memory = {mem_how}; it includes the gradients of W and h_S that every implementation "
        f"must produce. Time = median of {meta['runs']} runs after {meta['warmup']} warm-up "
        f"({'wall clock' if cpu else 'CUDA events'}). TFLOP/s counts 8·N·H·V (student and "
        "teacher forward, dX, dW) for every implementation. K = full V marks the exact full-vocabulary JSD "
        "(a different quantity from top-K + tail). × naive compares with naive at the same shape, N and K "
        "(full-vocabulary rows: naive top-K at the largest K). `lse-triton` is no SDPO head but a floor: the "
        "sampled token's cross-entropy plus the teacher's logsumexp pass on our kernels, without top-K, "
        "gather or divergence.",
        "",
        "| shape | H | V | N | K | impl | extra peak MiB | × naive | median | × naive | TFLOP/s | % peak | ok |",
        "|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        pct = f"{100 * r['peak_fraction']:.0f}%" if r.get("peak_fraction") else "—"
        tf = f"{r['tflops']:.3f}" if r.get("tflops") else "—"
        ok = "ok" if r["ok"] else ("ERROR: " + r["error"] if r["error"] else "**MISMATCH** " + r.get("mismatch", ""))
        out.append(
            f"| {r['shape']} | {r['hidden']} | {r['vocab']} | {r['tokens']} | {_k(r['topk'], impl=r['impl'])} | {r['impl']} | "
            f"{_mib(r['peak_mem_mib'])} | {_ratio(r.get('mem_vs_naive'))} | {_ms(r['median_ms'])} | "
            f"{_ratio(r.get('time_vs_naive'))} | {tf} | {pct} | {ok} |"
        )
    return [*out, ""]


def _step_section(records: list[dict]) -> list[str]:
    rows = [r for r in records if r["bench"] == "step" and not r.get("skipped")]
    if not rows:
        return []
    r0 = rows[0]
    out = [
        "## Training step",
        "",
        f"Random Qwen2 (hidden {r0['hidden']}, 2 layers, vocab {r0['vocab']}, tied embeddings, fp32), "
        f"{r0['generations']} completions × {r0['completion_length']} tokens = {r0['tokens']} loss tokens per step, "
        f"per_device_train_batch_size={r0['generations']}, GA=1, {r0['steps']} steps; the median is over steps 2–"
        f"{r0['steps']}. Extra peak = peak minus a process that loaded the model (same imports, no trainer).",
        "",
        "| impl | K | extra peak MiB | extra over GRPO MiB | median step | × GRPO | rollout (generation) | ok |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ok = "ok" if r["ok"] else f"ERROR: {r['error']}"
        out.append(
            f"| {r['impl']} | {_k(r['topk'], 'step')} | {_mib(r['peak_mem_mib'])} | "
            f"{_mib(r.get('extra_vs_grpo_mib'))} | {_ms(r['median_ms'])} | {_ratio(r.get('time_vs_grpo'))} | "
            f"{_ms(r.get('rollout_ms'))} | {ok} |"
        )
    return [*out, ""]


def _find(records, bench, impl, **match):
    for r in records:
        if (
            r["bench"] == bench
            and r["impl"] == impl
            and not r["error"]
            and all(r.get(k) == v for k, v in match.items())
        ):
            return r
    return None


def _verdict(value, goal, higher_is_better: bool) -> str:
    if value is None:
        return "not measurable"
    ok = value >= goal if higher_is_better else value <= goal
    return "**met**" if ok else "**NOT met**"


# The Triton head's targets (docs/performance.md) (bf16, forward + backward, on an H100/H200).
TIME_GOALS_MS = {16384: 50.0, 4096: 13.0, 1024: 5.0}  # Qwen2.5-0.5B shape, K=100
MEMORY_GOAL_MIB = 930.0  # extra peak at N=16384, Qwen2.5-0.5B shape


def _gpu_goals(records: list[dict]) -> list[str]:
    out = []
    heads = [r for r in records if r["bench"] == "head" and r["impl"] == "sdpo_fast-triton" and not r["error"]]
    for r in heads:
        where = f"GPU head {r['shape']} N={r['tokens']} K={r['topk']}"
        qwen_half = (r["hidden"], r["vocab"]) == (896, 151936)
        if qwen_half and r["topk"] == 100 and r["tokens"] in TIME_GOALS_MS:
            goal = TIME_GOALS_MS[r["tokens"]]
            out.append(
                f"- {where}: {_ms(r['median_ms'])} (goal ≤ {goal:g} ms: {_verdict(r['median_ms'], goal, False)})."
            )
        trl = _find(records, "head", "trl-chunked", shape=r["shape"], tokens=r["tokens"])
        if trl and trl["median_ms"] and not trl["error"]:
            speedup = trl["median_ms"] / r["median_ms"]
            goal = 1.9 if qwen_half and r["tokens"] == 16384 and r["topk"] == 100 else 1.0
            out.append(
                f"- {where}: {speedup:.2f}× TRL chunked's speed (goal ≥ {goal:g}×: {_verdict(speedup, goal, True)})."
            )
        frac = r.get("peak_fraction")
        if frac is not None:
            goal = 0.35 if r["hidden"] < 2048 else 0.5
            out.append(
                f"- {where}: {100 * frac:.0f}% of dense bf16 peak counting 8·N·H·V (goal ≥ {100 * goal:.0f}%: "
                f"{_verdict(frac, goal, True)})."
            )
        if qwen_half and r["tokens"] == 16384:
            mem = r["peak_mem_mib"]
            out.append(
                f"- {where}: {_mib(mem)} MiB extra peak (goal ≤ {MEMORY_GOAL_MIB:.0f} MiB: "
                f"{_verdict(mem, MEMORY_GOAL_MIB, False)})."
            )
        lse = _find(records, "head", "lse-triton", shape=r["shape"], tokens=r["tokens"])
        if lse and lse["median_ms"] and not lse["error"]:
            over = r["median_ms"] / lse["median_ms"] - 1
            out.append(
                f"- {where}: top-K + gather + divergence add {100 * over:+.0f}% over the same design's logsumexp-only "
                f"pass lse-triton (goal ≤ +15%: {_verdict(over, 0.15, False)})."
            )
    return out


def _goal_section(records: list[dict], meta: dict) -> list[str]:
    out = ["## Performance goals", ""]
    if meta["device"] == "cpu":
        goal = dict(hidden=256, vocab=151936, tokens=2048, topk=100)
        naive, ours = _find(records, "head", "naive", **goal), _find(records, "head", "sdpo_fast-torch", **goal)
        if naive and ours:
            mem = _div(naive["peak_mem_mib"], ours["peak_mem_mib"])
            t = _div(ours["median_ms"], naive["median_ms"])
            out.append(
                f"- CPU head, N=2048 H=256 V=151936 K=100: naive adds {_mib(naive['peak_mem_mib'])} MiB, "
                f"sdpo_fast-torch {_mib(ours['peak_mem_mib'])} MiB → **{mem:.1f}× less** (goal ≥ 8×: "
                f"{_verdict(mem, 8, True)}); time {_ms(ours['median_ms'])} vs {_ms(naive['median_ms'])} → "
                f"**{t:.2f}× naive** (goal ≤ 1.3×: {_verdict(t, 1.3, False)})."
            )
    else:
        out += _gpu_goals(records)
    topk, ours, grpo = (_find(records, "step", i) for i in ("trl-sdpo-topk", "sdpo_fast", "grpo"))
    if topk and ours and grpo and "extra_vs_grpo_mib" in ours and "extra_vs_grpo_mib" in topk:
        theirs, mine = topk["extra_vs_grpo_mib"], ours["extra_vs_grpo_mib"]
        # Extras within a few MiB of GRPO are noise; a ratio of two noisy numbers means nothing.
        if mine > NOISE_MIB:
            mem = theirs / mine
            how = f"**{mem:.1f}× less**"
        else:  # no positive extra to divide by: the goal holds if TRL's extra is real
            mem = float("inf") if theirs > NOISE_MIB else None
            how = (
                f"sdpo_fast peaks **{-mine:,.0f} MiB below** plain GRPO"
                if mine < -NOISE_MIB
                else f"sdpo_fast's extra is within {NOISE_MIB} MiB of GRPO's (noise)"
            )
        out.append(
            f"- Training step: over plain GRPO, TRL's SDPOTrainer (topk_logits, K=100, tail) adds "
            f"{_mib(theirs)} MiB and sdpo_fast adds {_mib(mine)} MiB → {how} (goal ≥ 4×: {_verdict(mem, 4, True)}); "
            f"step time {_ratio(ours.get('time_vs_grpo'))} GRPO (goal ≤ 1.3×: "
            f"{_verdict(ours.get('time_vs_grpo'), 1.3, False)})."
        )
    return [*out, ""] if len(out) > 2 else []


def _ratio_section(records: list[dict]) -> list[str]:
    """Plain statements of sdpo_fast against each alternative, where it loses too."""
    out = []
    heads = [r for r in records if r["bench"] == "head" and r["impl"] in OURS and not r["error"]]
    for r in heads:
        others = [
            x
            for x in records
            if x["bench"] == "head"
            and not x["error"]
            and x["impl"] not in OURS
            and x.get("shape") == r["shape"]
            and x["tokens"] == r["tokens"]
            and x["topk"] in (r["topk"], None)
        ]
        for x in others:
            what = " (fused logsumexp floor)" if x["impl"] == "lse-triton" else " (full-vocabulary JSD)"
            out.append(
                f"- head {r['shape']} N={r['tokens']} K={r['topk']}: {r['impl']} vs {x['impl']}"
                f"{what if x['topk'] is None else ''}: {_compare(r, x)}"
            )
    ours = _find(records, "step", "sdpo_fast")
    for x in (r for r in records if r["bench"] == "step" and not r["error"] and r["impl"] != "sdpo_fast"):
        if ours:
            out.append(f"- training step vs {x['impl']}: {_compare(ours, x)}")
    return ["## sdpo_fast against each alternative", "", *out, ""] if out else []


def _compare(a: dict, b: dict) -> str:
    """'a uses X× less extra memory and is Y× faster than b', worded the right way round."""
    parts = []
    if a["peak_mem_mib"] and b["peak_mem_mib"] and a["peak_mem_mib"] > 0 and b["peak_mem_mib"] > 0:
        m = b["peak_mem_mib"] / a["peak_mem_mib"]
        parts.append(
            _better_or_worse(m, "less extra peak memory", "MORE extra peak memory", "the same extra peak memory")
        )
    if a["median_ms"] and b["median_ms"]:
        parts.append(_better_or_worse(b["median_ms"] / a["median_ms"], "faster", "SLOWER", "the same speed"))
    return ", ".join(parts) or "not comparable"


def _better_or_worse(ratio: float, better: str, worse: str, same: str) -> str:
    """ratio = theirs / ours; within ±0.5% it is a tie (shown with its ratio)."""
    if abs(ratio - 1) < 0.005:
        return f"{same} ({ratio:.3f}×)"
    return f"{ratio:.2f}× {better}" if ratio > 1 else f"**{1 / ratio:.2f}× {worse}**"


# ------------------------------------------------------------------------------------ plot


def plot(records: list[dict], path) -> bool:
    """Memory and time against tokens, one row per head shape, plus a row of step bars. False if nothing to plot."""
    heads = [r for r in records if r["bench"] == "head" and not r["error"] and r.get("median_ms") is not None]
    steps = [r for r in records if r["bench"] == "step" and not r["error"]]
    shapes = list(dict.fromkeys(r["shape"] for r in heads))
    if not shapes and not steps:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nrows = len(shapes) + (1 if steps else 0)
    fig, axes = plt.subplots(nrows, 2, figsize=(11, 3.6 * nrows), squeeze=False)
    for row, shape in enumerate(shapes):
        _plot_shape(axes[row], [r for r in heads if r["shape"] == shape], shape)
    if steps:
        _plot_steps(axes[-1], steps)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_shape(axes, rows: list[dict], shape: str) -> None:
    r0 = rows[0]
    series = list(dict.fromkeys((r["impl"], r["topk"]) for r in rows))
    for impl, topk in series:
        pts = sorted(
            (r["tokens"], r["peak_mem_mib"], r["median_ms"]) for r in rows if (r["impl"], r["topk"]) == (impl, topk)
        )
        label = f"{impl} (K={_k(topk, impl=impl)})"
        style = "--" if topk not in (None, max(r["topk"] or 0 for r in rows)) else "-"
        n = [p[0] for p in pts]
        axes[0].plot(n, [p[1] for p in pts], style, marker="o", label=label)
        axes[1].plot(n, [p[2] / 1e3 for p in pts], style, marker="o", label=label)
    title = f"head {shape} (H={r0['hidden']}, V={r0['vocab']}, {r0['dtype']})"
    for ax, ylabel in zip(axes, ("extra peak memory (MiB)", "fwd+bwd median (s)")):
        ax.set_xlabel("tokens N")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
        if len({r["tokens"] for r in rows}) > 1:
            ax.set_xscale("log", base=2)
    axes[0].legend(fontsize=7)


def _plot_steps(axes, steps: list[dict]) -> None:
    names = [r["impl"] for r in steps]
    axes[0].bar(names, [r["peak_mem_mib"] or 0 for r in steps], color="tab:blue")
    axes[0].set_ylabel("extra peak memory over model (MiB)")
    axes[1].bar(names, [(r["median_ms"] or 0) / 1e3 for r in steps], color="tab:orange")
    axes[1].set_ylabel("median step time (s)")
    title = f"training step, {steps[0]['tokens']} loss tokens, vocab {steps[0]['vocab']}"
    for ax in axes:
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=8, rotation=15)
        ax.grid(alpha=0.3, axis="y")
