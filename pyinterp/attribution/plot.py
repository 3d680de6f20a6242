"""Heatmap of a pair's token-token attributions, with both token sequences on the axes."""
from __future__ import annotations

from pyinterp.attribution.encoders import PairExplanation


def summary(pair: PairExplanation, top: int = 5) -> str:
    """The completeness figures of a pair, and its strongest token pairs."""
    terms = ", ".join(f"{name} {value:+.4f}" for name, value in pair.reference_terms.items())
    flat = pair.A_tok.flatten()
    order = flat.abs().argsort(descending=True)[:top].tolist()
    width = pair.A_tok.shape[1]
    pairs = ", ".join(f"{pair.tokens_a[i // width]} ~ {pair.tokens_b[i % width]} {float(flat[i]):+.4f}"
                      for i in order)
    return "\n".join([
        f"{'score (' + pair.similarity + ')':<22}{pair.score:+.4f}",
        f"sum of attributions   {pair.attribution_sum:+.4f}   (token pairs at the input of layer {pair.layer})",
        f"reference terms       {sum(pair.reference_terms.values()):+.4f}   ({terms})",
        f"error                 {pair.error:+.4f}   (score - sum of attributions - reference terms)",
        f"strongest pairs: {pairs}",
    ])


def save_heatmap(pair: PairExplanation, path: str) -> None:
    """A_tok as a PNG: text a's tokens down the rows, text b's along the columns, zero in white."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = pair.A_tok.detach().double().cpu().numpy()
    limit = float(abs(values).max()) or 1.0
    rows, cols = values.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.55 * cols + 2.5), max(3.0, 0.45 * rows + 2.0)))
    image = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit)
    ax.set_xticks(range(cols), pair.tokens_b, rotation=60, ha="right")
    ax.set_yticks(range(rows), pair.tokens_a)
    ax.set_title(f"{pair.similarity} {pair.score:.3f} = attributions {pair.attribution_sum:.3f} "
                 f"+ reference {sum(pair.reference_terms.values()):.3f} + error {pair.error:.4f}", fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8, label="attribution")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
