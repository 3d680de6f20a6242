"""PNG plots of one benchmark run: median time per shape and provider, and % of the measured roofline."""
from __future__ import annotations

from pathlib import Path


def plot_results(rows: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if not r.get("skipped")]
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for op in sorted({r["op"] for r in measured}):
        op_rows = [r for r in measured if r["op"] == op]
        directions = sorted({r["direction"] for r in op_rows})
        figure, axes = plt.subplots(2, len(directions), figsize=(6 * len(directions), 8), squeeze=False)
        for column, direction in enumerate(directions):
            group = [r for r in op_rows if r["direction"] == direction]
            shapes = sorted({r["shape"] for r in group})
            providers = sorted({r["provider"] for r in group})
            width = 0.8 / len(providers)
            for p_index, provider in enumerate(providers):
                by_shape = {r["shape"]: r for r in group if r["provider"] == provider}
                xs = [s_index + p_index * width for s_index, s in enumerate(shapes) if s in by_shape]
                present = [s for s in shapes if s in by_shape]
                axes[0][column].bar(xs, [by_shape[s]["median_ms"] for s in present], width, label=provider)
                axes[1][column].bar(xs, [100 * (by_shape[s].get("roofline_fraction") or 0) for s in present],
                                    width, label=provider)
            for row_index, ylabel in enumerate(("median ms (lower is better)", "% of measured roofline")):
                axis = axes[row_index][column]
                axis.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))], shapes, rotation=15)
                axis.set_ylabel(ylabel)
                axis.set_title(f"{op} {direction} ({group[0]['dtype']}, {group[0].get('device', '')})")
            axes[0][column].set_yscale("log")
            axes[0][column].legend(fontsize=8)
        figure.tight_layout()
        path = out_dir / f"{op}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written
