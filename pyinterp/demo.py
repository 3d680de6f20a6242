"""`pyinterp demo`: runs what pyinterp has on the embedded defaults (all-MiniLM-L6-v2 and Python's own
docstrings), through every available backend, checks that they agree, and prints timings."""
from __future__ import annotations

import statistics
import time

import torch

HELP = "run every op on the embedded default model and text, check backends agree, print timings"


def add_arguments(parser) -> None:
    from pyinterp.cli import positive_int

    parser.add_argument("--layer", type=int, default=3, help="MiniLM layer whose outputs are encoded (default 3)")
    parser.add_argument("--latents", type=int, default=4096, help="SAE latents M (default 4096)")
    parser.add_argument("--k", type=int, default=32, help="active latents per token (default 32)")
    parser.add_argument("--texts", type=positive_int, default=64, help="docstring sentences to embed (default 64)")


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def sae_section(args) -> None:
    import pyinterp
    from pyinterp import _dispatch
    from pyinterp.models import docstring_sentences, layer_activations, load_default_model

    print("== top-k SAE encode / sparse decode on all-MiniLM-L6-v2 activations ==")
    model = load_default_model()
    texts = docstring_sentences(args.texts)
    x = layer_activations(model, texts, args.layer)
    tokens, width = x.shape
    print(f"activations: {tokens} tokens x {width} (layer {args.layer}, {len(texts)} docstring sentences)")

    generator = torch.Generator().manual_seed(0)
    W_dec = torch.randn(args.latents, width, generator=generator)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_enc = W_dec.clone()
    b_enc = torch.zeros(args.latents)
    b_dec = x.mean(0)

    backends = _dispatch.available_backends(x.device)
    if "triton" not in backends:
        print(f"triton: skipped ({_dispatch.unavailable_reason('triton', x.device)})")
    values_ref, indices_ref = pyinterp.topk_encode(x, W_enc, b_enc, args.k, b_dec=b_dec, backend="torch")
    x_hat_ref = pyinterp.sparse_decode(values_ref, indices_ref, W_dec, b_dec, backend="torch")
    fvu = ((x - x_hat_ref).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    print(f"shape N={tokens} D={width} M={args.latents} k={args.k}, fp32; untrained SAE FVU {fvu:.3f}")
    print(f"{'backend':8s} {'encode ms':>10s} {'decode ms':>10s} {'fwd+bwd ms':>11s} "
          f"{'same idx':>9s} {'max |dv|':>9s} {'max |dx_hat|':>12s}")
    for backend in backends:
        def encode():
            return pyinterp.topk_encode(x, W_enc, b_enc, args.k, b_dec=b_dec, backend=backend)

        values, indices = encode()
        x_hat = pyinterp.sparse_decode(values, indices, W_dec, b_dec, backend=backend)
        parameters = [p.detach().requires_grad_() for p in (W_enc, b_enc, W_dec, b_dec)]

        def train_step():
            W_e, b_e, W_d, b_d = parameters
            v, i = pyinterp.topk_encode(x, W_e, b_e, args.k, b_dec=b_d, backend=backend)
            loss = (pyinterp.sparse_decode(v, i, W_d, b_d, backend=backend,
                                           check_indices=False) - x).pow(2).sum()
            loss.backward()

        def decode():
            return pyinterp.sparse_decode(values, indices, W_dec, b_dec, backend=backend)

        same = (indices == indices_ref).float().mean().item()
        repeats = 1 if backend == "torch" else 3  # the reference takes seconds a call here
        print(f"{backend:8s} {_median_ms(encode, repeats):10.1f} {_median_ms(decode, repeats):10.1f} "
              f"{_median_ms(train_step, repeats):11.1f} {same:9.4f} "
              f"{(values - values_ref).abs().max().item():9.2e} {(x_hat - x_hat_ref).abs().max().item():12.2e}")


def training_section(args) -> None:
    from pyinterp.sae.cli import demo

    demo(backend="auto", steps=40)


def attribution_section(args) -> None:
    from pyinterp.attribution.cli import demo

    demo()


def resonator_section(args) -> None:
    from pyinterp.vsa.demo import demo

    demo()


DEMO_BENCH_OPS = ("topk_encode", "sparse_decode", "sae_training", "resonator")


def bench_section(args) -> None:
    """A short `pyinterp bench`: one small shape per op against torch and the installed peers, on one
    CPU thread (on a shared machine two would mostly wait on each other), a line per provider as it
    runs. The attribution bench is left out: its baselines take minutes."""
    import argparse

    from pyinterp import bench

    print("== pyinterp bench, short: one small shape per op, the providers of a case in turn "
          "(`pyinterp bench --shapes small` for the CPU shapes, `pyinterp bench` for the full run) ==",
          flush=True)
    if not bench.SOURCE_BENCHES.is_dir():
        print(f"skipped: no benchmark suites at {bench.SOURCE_BENCHES} (needs a source checkout)")
        return
    bench.run(argparse.Namespace(ops=list(DEMO_BENCH_OPS), shapes="demo", device=None, budget=None, threads=1,
                                 out=bench.SOURCE_BENCHES / "results", filter=None, no_record=True,
                                 bench_dir=bench.SOURCE_BENCHES))


SECTIONS = (sae_section, training_section, attribution_section, resonator_section, bench_section)


def run(args) -> int:
    torch.manual_seed(0)
    start = time.perf_counter()
    for section in SECTIONS:
        section_start = time.perf_counter()
        section(args)
        print(f"({time.perf_counter() - section_start:.0f} s)\n", flush=True)
    print(f"demo done in {time.perf_counter() - start:.0f} s")
    return 0
