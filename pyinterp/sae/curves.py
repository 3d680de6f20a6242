"""training_curves.png: FVU, L0 and the dead fraction against tokens, read from each run's
metrics.jsonl, one line per hookpoint (one figure for a whole streaming run)."""
from __future__ import annotations

import json
from pathlib import Path

PANELS = (("fvu", "FVU"), ("l0", "L0 (active latents per token)"), ("dead_fraction", "dead fraction"))


def read_metrics(path: Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def plot_training_curves(runs: dict[str, Path], png: Path) -> Path:
    """runs: {label: folder holding metrics.jsonl}; writes and returns `png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.8))
    for label, folder in runs.items():
        rows = read_metrics(Path(folder) / "metrics.jsonl")
        tokens = [row["tokens"] for row in rows]
        for axis, (key, _) in zip(axes, PANELS):
            axis.plot(tokens, [row.get(key) if row.get(key) is not None else float("nan") for row in rows],
                      label=label)
    for axis, (key, title) in zip(axes, PANELS):
        axis.set_title(title)
        axis.set_xlabel("training tokens")
        if key == "fvu":
            axis.set_yscale("log")
    axes[0].legend(fontsize="small")
    figure.tight_layout()
    png = Path(png)
    figure.savefig(png, dpi=110)
    plt.close(figure)
    return png
