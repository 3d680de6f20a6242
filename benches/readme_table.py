"""The README's benchmark table rows, printed from one run of a results file (default: the latest run
in benches/results/<device>.jsonl), each speed-up with the spread of its per-round ratios.

    .venv/bin/python benches/readme_table.py [RESULTS.jsonl] [--run GIT_SHA@DATE] [--shape cpu-small]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from harness import RESULTS_DIR, add_baseline_ratios

OPS = ("topk_encode", "sparse_decode", "sae_train_step")
OP_TITLES = {"sae_train_step": "SAE training step"}
DIRECTION_TITLES = {"train step": "fwd + AuxK + bwd + Adam"}
HEADER = ("| op | direction | pyinterp | best baseline | speed-up: median of per-round ratios (IQR, range, "
          "pairs) | peak memory (pyinterp / baseline) |\n|---|---|---|---|---|---|")


def run_key(row: dict) -> str:
    return f"{row['git_sha']}@{row['date']}"


def load_run(path: Path, run: str | None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"readme_table: {path} holds no rows")
    run = run or run_key(rows[-1])
    chosen = [r for r in rows if run_key(r) == run]
    if not chosen:
        raise SystemExit(f"readme_table: no run {run} in {path}; runs: {sorted({run_key(r) for r in rows})}")
    add_baseline_ratios(chosen)  # rows written before best_baseline was recorded lack it
    return chosen


def ms(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def time_text(row: dict) -> str:
    text = f"{ms(row['median_ms'])} ms"
    if "min_ms" in row:
        text += f" (min {ms(row['min_ms'])}, p80 {ms(row['p80_ms'])})"
    if row.get("unit") == "tok/s":
        text += f", {row['throughput']:,.0f} tok/s"
    return text


def speedup_text(row: dict) -> str:
    spread = row.get("speedup_spread")
    if not spread:
        return f"{row['speedup_vs_best_baseline']:.2f}x (ratio of medians; no per-round data)"
    return (f"{spread['median']:.2f}x ({spread['p25']:.2f}-{spread['p75']:.2f}, {spread['min']:.2f}-"
            f"{spread['max']:.2f}, {spread['pairs']})")


def table_rows(rows: list[dict], shape: str, provider: str) -> list[str]:
    lines = []
    for op in OPS:
        for direction in dict.fromkeys(r["direction"] for r in rows if r["op"] == op):
            case = [r for r in rows if r["op"] == op and r["shape"] == shape and r["direction"] == direction
                    and not r.get("skipped")]
            ours = next((r for r in case if r["provider"] == provider), None)
            if ours is None or not ours.get("best_baseline"):
                continue
            best = next(r for r in case if r["provider"] == ours["best_baseline"])
            others = ", ".join(f"{r['provider']} {ms(r['median_ms'])}" for r in case
                               if r is not best and not r["provider"].startswith("pyinterp"))
            baseline = f"{best['provider']} {time_text(best)}" + (f" (others: {others})" if others else "")
            lines.append(f"| {OP_TITLES.get(op, op)} | {DIRECTION_TITLES.get(direction, direction)} | "
                         f"{time_text(ours)} | {baseline} | {speedup_text(ours)} | "
                         f"{ours['peak_mib']:.3g} MiB / {best['peak_mib']:.3g} MiB |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", type=Path, default=RESULTS_DIR / "cpu-x86_64.jsonl")
    parser.add_argument("--run", help="GIT_SHA@DATE of the run (default: the file's last run)")
    parser.add_argument("--shape", default="cpu-small")
    parser.add_argument("--provider", default="pyinterp-cpu")
    args = parser.parse_args(argv)
    rows = load_run(args.results, args.run)
    first = rows[0]
    print(f"run {run_key(first)} on {first['device']} (torch {first['torch']}), shape {args.shape}")
    print(HEADER)
    print("\n".join(table_rows(rows, args.shape, args.provider)))


if __name__ == "__main__":
    main()
