"""A short head table from benchmark records: one line per (shape, N), ours against the others.

    python bench/gpu_summary.py RESULTS/head.jsonl [more.json ...]

Reads run.py's records (a .json list or a .jsonl written as they were measured, so a run cut short still
counts); the last record of each (impl, shape, N, K) wins. Prints Markdown, which gpu_check.sh shows last.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = [
    ("sdpo_fast-triton", 100, "ours K=100"),
    ("sdpo_fast-triton", 20, "ours K=20"),
    ("lse-triton", None, "lse floor"),
    ("trl-chunked", None, "TRL chunked"),
    ("liger-jsd", None, "Liger JSD"),
    ("naive", 100, "naive K=100"),
]


def load(paths: list[Path]) -> list[dict]:
    records = []
    for path in paths:
        text = path.read_text().strip()
        if not text:
            continue
        if path.suffix == ".jsonl":  # a run killed mid-write may leave half a last line: it is not a record
            for line in text.splitlines():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        else:
            records += json.loads(text)
    return [r for r in records if r.get("bench") == "head"]


def table(records: list[dict]) -> str:
    cells: dict[tuple, dict] = {}
    for r in records:
        cells[(r["impl"], r.get("shape"), r["tokens"], r["topk"])] = r
    points = sorted(
        {(r.get("shape"), r["hidden"], r["vocab"], r["tokens"]) for r in records}, key=lambda p: (p[1], p[3])
    )
    head = "| shape | N | " + " | ".join(c[2] for c in COLUMNS) + " | ours vs TRL | ours % peak | ours MiB |"
    lines = [head, "|---|---:|" + "---:|" * (len(COLUMNS) + 3)]
    for shape, hidden, vocab, n in points:
        row = []
        for impl, k, _ in COLUMNS:
            r = cells.get((impl, shape, n, k))
            if r is None:
                row.append("—")
            elif r.get("error"):
                row.append("skipped" if str(r["error"]).startswith("skipped") else "error")
            else:
                row.append(f"{r['median_ms']:.1f} ms" + ("" if r.get("ok", True) else " (FAILED CHECK)"))
        ours, trl = cells.get(("sdpo_fast-triton", shape, n, 100)), cells.get(("trl-chunked", shape, n, None))
        good = ours is not None and not ours.get("error")
        speed = f"{trl['median_ms'] / ours['median_ms']:.2f}×" if good and trl and not trl.get("error") else "—"
        frac = f"{100 * ours['peak_fraction']:.0f}%" if good and ours.get("peak_fraction") else "—"
        mem = f"{ours['peak_mem_mib']:,.0f}" if good and ours.get("peak_mem_mib") is not None else "—"
        lines.append(
            f"| {shape} (H={hidden}, V={vocab}) | {n:,} | " + " | ".join(row) + f" | {speed} | {frac} | {mem} |"
        )
    return "\n".join(lines + failures(records))


def failures(records: list[dict]) -> list[str]:
    """One line per implementation that failed its correctness check or did not run, with the first reason."""
    notes: dict[str, str] = {}
    for r in records:
        if r.get("error"):
            notes.setdefault(r["impl"], f"did not run: {r['error']}")
        elif not r.get("ok", True):
            why = r.get("mismatch") or (r.get("check") or {}).get("error") or "differs from the float64-checked oracle"
            notes[r["impl"]] = f"**FAILED the correctness check**: {why}"
    return ["", *(f"- {impl}: {why}" for impl, why in sorted(notes.items()))] if notes else []


def main(argv: list[str]) -> int:
    paths = [Path(p) for p in argv if Path(p).exists()]
    records = load(paths)
    if not records:
        print("no head records found in " + ", ".join(argv))
        return 1
    print(table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
