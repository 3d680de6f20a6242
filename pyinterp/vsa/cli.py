"""`pyinterp factorize`: solve a batch of random factorisation problems, or measure the capacity."""
from __future__ import annotations

import argparse
import time

from pyinterp.cli import (CommandError, check_device, check_output_file, finite_float, nonnegative_int,
                          positive_int, report)

HELP = "factor random bound vectors with a resonator network, or measure its operational capacity"


def _cap(text: str):
    if text in ("kent", "ibm"):
        return text
    return positive_int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dim", type=positive_int, default=1500, help="vector dimension D (default 1500)")
    parser.add_argument("--factors", type=positive_int, default=3, help="factors F (default 3)")
    parser.add_argument("--codebook", type=positive_int, default=60, help="codevectors M per factor (default 60)")
    parser.add_argument("--problems", type=positive_int, default=1024, help="problems B (default 1024)")
    parser.add_argument("--max-iters", type=positive_int, default=None,
                        help="sweeps at most (default: the cap, 0.001 * M^F)")
    parser.add_argument("--update", choices=("sequential", "parallel"), default="sequential")
    parser.add_argument("--weights", choices=("op", "ols"), default="op")
    parser.add_argument("--activation", choices=("identity", "threshold", "topk", "attention"),
                        default="identity")
    parser.add_argument("--beta", type=finite_float(0, inclusive=False), default=None,
                        help="attention inverse temperature")
    parser.add_argument("--threshold", type=finite_float(), default=None, help="threshold, a fraction of D")
    parser.add_argument("--k", type=positive_int, default=None, help="top-k similarities kept")
    parser.add_argument("--noise", type=finite_float(0), default=0.0, help="similarity noise sigma")
    parser.add_argument("--stop", choices=("fixed_point", "similarity"), default="fixed_point")
    parser.add_argument("--theta", type=finite_float(), default=None, help="similarity stop, a fraction of D")
    parser.add_argument("--detect-cycles", type=nonnegative_int, default=0, help="longest limit cycle looked for")
    parser.add_argument("--seed", type=nonnegative_int, default=0)
    parser.add_argument("--backend", default="auto", choices=("auto", "cuda", "triton", "cpu", "torch"))
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--capacity", action="store_true",
                        help="measure accuracy over --sizes instead of one batch")
    parser.add_argument("--sizes", type=positive_int, nargs="+", default=None,
                        help="M values for --capacity (default: 8 values from M/2 to 3M/2)")
    parser.add_argument("--trials", type=positive_int, default=1000, help="problems per M for --capacity")
    parser.add_argument("--cap", type=_cap, default="kent",
                        help="iteration cap for --capacity: kent, ibm or a number")
    parser.add_argument("--out", default=None, help="PNG path for the accuracy-vs-M plot (--capacity)")


def _check_arguments(args: argparse.Namespace) -> None:
    """What argparse cannot check alone, before any problem is generated."""
    if args.out is not None:
        if not args.capacity:
            raise CommandError("--out (the accuracy plot) only applies with --capacity")
        check_output_file("--out", args.out, ".png")
    if args.sizes is not None and not args.capacity:
        raise CommandError("--sizes only applies with --capacity")
    if args.capacity and args.max_iters is not None:
        raise CommandError("--max-iters does not apply with --capacity (its cap comes from --cap)")
    if args.k is not None and args.k > args.codebook and not args.capacity:
        raise CommandError(f"--k {args.k} is more than --codebook {args.codebook}")
    check_device(args.device)


def _options(args: argparse.Namespace) -> dict:
    options = dict(update=args.update, weights=args.weights, activation=args.activation,
                   noise=args.noise, stop=args.stop, detect_cycles=args.detect_cycles)
    for name in ("beta", "threshold", "k", "theta"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.noise > 0:
        options["seed"] = args.seed
    return options


def _plot(report, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [p.size for p in report.points]
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(sizes, [p.accuracy for p in report.points], "o-", label="all factors")
    axis.plot(sizes, [p.factor_accuracy for p in report.points], "s--", label="per factor")
    axis.axhline(0.99, color="gray", lw=0.8, ls=":", label="99%")
    axis.set_xlabel("codevectors per factor M")
    axis.set_ylabel("accuracy")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run(args: argparse.Namespace) -> int:
    try:
        _check_arguments(args)
        return _run(args)
    except (CommandError, ValueError, TypeError, IndexError, RuntimeError) as exc:
        return report("factorize", exc)


def _run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from pyinterp.ops.resonator import resonator
    from pyinterp.vsa.capacity import capacity, iteration_cap
    from pyinterp.vsa.vectors import random_codebooks, random_problems

    cap = args.cap
    options = _options(args)
    if args.capacity:
        sizes = args.sizes or sorted({max(2, round(args.codebook * (0.5 + i / 7))) for i in range(8)})
        report = capacity(args.dim, args.factors, sizes, trials=args.trials, cap=cap, seed=args.seed,
                          backend=args.backend, progress=True, device=args.device, **options)
        if args.out:
            _plot(report, args.out, f"resonator capacity, F={args.factors}, D={args.dim}, "
                                    f"{args.weights.upper()}, cap={args.cap}")
            print(f"wrote {args.out}")
        return 0
    codebooks = random_codebooks([args.codebook] * args.factors, args.dim, seed=args.seed,
                                 device=args.device)
    s, targets = random_problems(codebooks, args.problems, seed=args.seed + 1)
    max_iters = iteration_cap(cap, args.codebook, args.factors) if args.max_iters is None else args.max_iters
    chunk = max(1, min(256, args.problems))
    resonator(s[:1], codebooks, max_iters=1, backend=args.backend, **options)  # bad options fail here
    results = []
    start = time.perf_counter()
    with tqdm(total=args.problems, unit="problem") as bar:
        for first in range(0, args.problems, chunk):
            results.append(resonator(s[first:first + chunk], codebooks, max_iters=max_iters,
                                     backend=args.backend, **options))
            bar.update(min(chunk, args.problems - first))
    seconds = time.perf_counter() - start
    indices = torch.cat([r.indices for r in results])
    iterations = torch.cat([r.iterations for r in results]).double()
    hits = indices == targets
    print(f"F={args.factors} D={args.dim} M={args.codebook} B={args.problems} max_iters={max_iters}")
    print(f"per-factor accuracy {hits.double().mean():.4f}, all-factor accuracy "
          f"{hits.all(1).double().mean():.4f}, converged "
          f"{torch.cat([r.converged for r in results]).double().mean():.4f}")
    print(f"sweeps mean {iterations.mean():.1f}, median {iterations.median():.0f}, "
          f"p99 {torch.quantile(iterations, 0.99):.0f}")
    print(f"{seconds:.2f} s, {args.problems / seconds:,.0f} problems/s")
    return 0
