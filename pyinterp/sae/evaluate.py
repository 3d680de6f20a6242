"""`pyinterp eval-sae`: what SAE papers report, per hookpoint, on held-out context windows: FVU, L0, the
dead fraction, and for causal LMs the downstream loss with the SAE's reconstruction spliced into the
forward pass (docs/SAE_TRAINING.md, "Evaluation").

    delta CE   = CE(spliced) - CE(clean)                 next-token cross-entropy, nats per token
    KL         = mean over tokens of KL(p_clean || p_spliced)
    recovered  = (CE(zero) - CE(spliced)) / (CE(zero) - CE(clean))   zero = the hookpoint's output zeroed

Each hookpoint is spliced alone (the others run clean), as sparsify and SAELens report it. Positions
excluded from training (exclude_first) keep their clean activations in the splice too."""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from pyinterp.sae import corpus as corpus_module
from pyinterp.sae import hookpoints as hookpoints_module

HELP = "evaluate SAEs on a model's held-out text: FVU, L0, dead fraction, spliced-in delta loss"


def _replace(value, new):
    if isinstance(value, tuple):
        return (new,) + tuple(value[1:])
    return new


def _spliced_logits(model, point, ids, transform):
    """Logits of `model` with the hookpoint's activations replaced by transform(activations)."""
    def output_hook(_module, _args, output):
        return _replace(output, transform(output[0] if isinstance(output, tuple) else output))

    def input_hook(_module, args):
        return _replace(tuple(args), transform(args[0]))

    handle = (point.module.register_forward_pre_hook(input_hook) if point.reads_input
              else point.module.register_forward_hook(output_hook))
    try:
        return model(input_ids=ids).logits.float()
    finally:
        handle.remove()


def _token_ce(logits, ids):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                           reduction="none")


@torch.no_grad()
def evaluate(model, saes: dict, points, windows, *, batch_windows: int = 8, exclude_first: bool = False,
             downstream: bool | None = None) -> dict[str, dict]:
    """saes: {hookpoint name: TopKSAE}; points: hookpoints.resolve(...) for those names; windows: an
    iterable of (context_length,) token windows. Returns {name: metrics}."""
    by_name = {p.name: p for p in points}
    missing = [name for name in saes if name not in by_name]
    if missing:
        raise ValueError(f"eval-sae: no hookpoint for {', '.join(missing)}")
    points = [by_name[name] for name in saes]
    if downstream is None:
        downstream = hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None
    device = next(model.parameters()).device
    sums = {name: dict(sq_error=0.0, sum=None, sq_sum=0.0, rows=0, active=0,
                       fired=torch.zeros(sae.n_latents, dtype=torch.bool, device=device),
                       ce_spliced=0.0, ce_zero=0.0, kl=0.0) for name, sae in saes.items()}
    ce_clean, predictions = 0.0, 0
    iterator = iter(windows)
    while True:
        batch = list(itertools.islice(iterator, batch_windows))
        if not batch:
            break
        ids = torch.stack(batch).to(device)
        acts = hookpoints_module.capture(model, points, input_ids=ids)
        if downstream:
            clean_logits = model(input_ids=ids).logits.float()
            clean_ce = _token_ce(clean_logits, ids)
            ce_clean += float(clean_ce.sum())
            predictions += clean_ce.numel()
            clean_logp = clean_logits[:, :-1].log_softmax(-1)
        for name, sae in saes.items():
            x = acts[name]
            first = 1 if exclude_first else 0
            rows = x[:, first:].reshape(-1, x.shape[-1]).float()
            values, indices = sae.encode(rows)
            x_hat = sae.decode(values, indices).float()
            stats = sums[name]
            stats["sq_error"] += float((rows - x_hat).pow(2).sum())
            stats["sum"] = rows.sum(0) if stats["sum"] is None else stats["sum"] + rows.sum(0)
            stats["sq_sum"] += float(rows.pow(2).sum())
            stats["rows"] += rows.shape[0]
            stats["active"] += int((values > 0).sum())
            stats["fired"][indices[values > 0].long()] = True
            if not downstream:
                continue

            def splice(hidden, sae=sae, first=first):
                flat = hidden[:, first:].reshape(-1, hidden.shape[-1])
                recon = sae.decode(*sae.encode(flat.float())).to(hidden.dtype)
                out = hidden.clone()
                out[:, first:] = recon.reshape(hidden.shape[0], -1, hidden.shape[-1])
                return out

            def zero(hidden, first=first):
                out = hidden.clone()
                out[:, first:] = 0
                return out

            point = by_name[name]
            spliced = _spliced_logits(model, point, ids, splice)
            stats["ce_spliced"] += float(_token_ce(spliced, ids).sum())
            stats["ce_zero"] += float(_token_ce(_spliced_logits(model, point, ids, zero), ids).sum())
            spliced_logp = spliced[:, :-1].log_softmax(-1)
            stats["kl"] += float(F.kl_div(spliced_logp, clean_logp, log_target=True, reduction="sum"))
    results = {}
    for name, stats in sums.items():
        if stats["rows"] == 0:
            raise ValueError("eval-sae: the corpus gave no evaluation windows")
        mean = stats["sum"] / stats["rows"]
        variance = stats["sq_sum"] - stats["rows"] * float(mean.pow(2).sum())
        metrics = {"tokens": stats["rows"],
                   "fvu": stats["sq_error"] / variance if variance > 0 else float("nan"),
                   "l0": stats["active"] / stats["rows"],
                   "dead_fraction": 1.0 - float(stats["fired"].float().mean())}
        if downstream:
            clean, spliced, zeroed = (ce_clean / predictions, stats["ce_spliced"] / predictions,
                                      stats["ce_zero"] / predictions)
            metrics.update(ce_clean=clean, ce_spliced=spliced, ce_zero=zeroed, delta_ce=spliced - clean,
                           kl=stats["kl"] / predictions,
                           loss_recovered=(zeroed - spliced) / (zeroed - clean) if zeroed != clean else float("nan"))
        results[name] = metrics
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default", help="Hugging Face model id or local folder")
    parser.add_argument("--corpus", required=True, help="held-out text (formats as cache-activations)")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--sae", action="append", required=True, metavar="HOOKPOINT=DIR",
                        help="an SAE folder (sparsify layout) and the hookpoint it reads; repeat for more")
    parser.add_argument("--windows", type=int, default=64, help="evaluation windows (default 64)")
    parser.add_argument("--context-length", type=int, default=128)
    parser.add_argument("--exclude-first-token", action="store_true")
    parser.add_argument("--batch-windows", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="write the metrics as JSON to this file")


def run(args) -> int:
    from pyinterp.nn import TopKSAE
    from pyinterp.sae.cache import load_model

    try:
        pairs = []
        for item in args.sae:
            if "=" not in item:
                raise ValueError(f"--sae {item!r}: give HOOKPOINT=DIR")
            name, folder = item.split("=", 1)
            if not Path(folder).is_dir():
                raise ValueError(f"--sae {item!r}: {folder} is not a folder")
            pairs.append((name, folder))
        if not Path(args.corpus).exists():
            raise ValueError(f"--corpus {args.corpus} does not exist")
        if args.out is not None and not Path(args.out).parent.is_dir():
            raise ValueError(f"--out {args.out}: the folder {Path(args.out).parent} does not exist")
        model, tokenizer, _ = load_model(args.model, "fp32", args.device)
        corpus_module.WindowSpec(args.context_length, args.exclude_first_token).check(
            corpus_module.model_max_positions(model))
        points = hookpoints_module.resolve(model, [name for name, _ in pairs])
        saes = {point.name: TopKSAE.load(folder).to(args.device) for point, (_, folder) in zip(points, pairs)}
        windows = itertools.islice(corpus_module.context_windows(
            corpus_module.documents(args.corpus, args.text_column), tokenizer, args.context_length), args.windows)
        results = evaluate(model, saes, points, windows, batch_windows=args.batch_windows,
                           exclude_first=args.exclude_first_token)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"pyinterp eval-sae: error: {exc}", file=sys.stderr)
        return 2
    for name, metrics in results.items():
        print(name + ": " + ", ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                                      for key, value in metrics.items()))
    if args.out is not None:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0
