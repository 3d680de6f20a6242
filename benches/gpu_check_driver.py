"""Short workloads for benches/gpu_check.sh, one subcommand per stage that needs its own process:

  sanitize  every kernel of the given backends, forward and backward, at small shapes that reach each
            code path (fused and general top-k, AuxK, misaligned rows, D = 0, resonator variants),
            each result checked against the torch backend; run under compute-sanitizer.
  bench     CUDA-event timing (median of a few repetitions) of the SAE encode and a training step at
            two paper shapes, per backend; one JSON line per case.
  train     a few hundred TopKSAE training steps on synthetic sparse data with each backend from the
            same init; reports the loss curves' largest gap and fails when the backends disagree.

--device cpu runs the same code at tiny sizes (what `gpu_check.sh --dry-run` uses to test itself).
Exits non-zero when a check fails."""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from harness import median_ms  # benches/harness.py: CUDA events on a GPU, wall time on a CPU

import pyinterp
from pyinterp.nn import TopKSAE
from pyinterp.vsa import random_codebooks, random_problems, resonator


def _assert_close(name: str, actual, expected, tol: float) -> None:
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=tol, atol=tol,
                               msg=lambda m: f"{name}: {m}")


def _tol(dtype: torch.dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2


# ---------------------------------------------------------------------------------------------------
# sanitize
# ---------------------------------------------------------------------------------------------------
def _exact(shape, generator, device, dtype, scale=0.25):
    """Small multiples of `scale`: sums are exact in fp32, so every backend picks the same top-k."""
    return (torch.randint(-4, 5, shape, generator=generator).double() * scale).to(device=device, dtype=dtype)


def _encode_case(backend, device, dtype, n, d, m, k, k_aux, generator, b_dec_scale=1.0):
    x = _exact((n, d), generator, device, dtype, 1.0)
    W_enc = _exact((m, d), generator, device, dtype)
    b_enc = _exact((m,), generator, device, dtype)
    b_dec = _exact((d,), generator, device, dtype, b_dec_scale)
    dead = (torch.arange(m, device=device) % 3 == 0) if k_aux else None
    results = {}
    for name in (backend, "torch"):
        leaves = [t.clone().requires_grad_(True) for t in (x, W_enc, b_enc, b_dec)]
        out = pyinterp.topk_encode(leaves[0], leaves[1], leaves[2], k, b_dec=leaves[3], dead_mask=dead,
                                   k_aux=k_aux, backend=name)
        loss = sum((o.float() * (1 + torch.arange(o.shape[-1], device=device))).sum()
                   for o in out[0::2])
        loss.backward()
        results[name] = (out, [t.grad for t in leaves])
    (out, grads), (ref_out, ref_grads) = results[backend], results["torch"]
    label = f"topk_encode[{backend}, {dtype}, N={n} D={d} M={m} k={k} k_aux={k_aux} b_dec*{b_dec_scale:g}]"
    for i in range(0, len(out), 2):
        assert torch.equal(out[i + 1].cpu(), ref_out[i + 1].cpu()), f"{label}: indices differ"
        _assert_close(f"{label} values", out[i], ref_out[i], _tol(dtype))
    for g, r, leaf in zip(grads, ref_grads, ("x", "W_enc", "b_enc", "b_dec")):
        _assert_close(f"{label} grad {leaf}", g, r, _tol(dtype) * max(1.0, k))
    return label


def _decode_case(backend, device, dtype, n, d, m, k, generator):
    values = _exact((n, k), generator, device, dtype)
    indices = torch.randint(0, m, (n, k), generator=generator).to(device=device, dtype=torch.int32)
    W_dec = _exact((m, d), generator, device, dtype)
    b_dec = _exact((d,), generator, device, dtype)
    results = {}
    for name in (backend, "torch"):
        leaves = [t.clone().requires_grad_(True) for t in (values, W_dec, b_dec)]
        out = pyinterp.sparse_decode(leaves[0], indices, leaves[1], leaves[2], backend=name)
        (out.float() * torch.linspace(-1, 1, out.numel(), device=device).view_as(out)).sum().backward()
        results[name] = (out, [t.grad for t in leaves])
    label = f"sparse_decode[{backend}, {dtype}, N={n} D={d} M={m} k={k}]"
    (out, grads), (ref_out, ref_grads) = results[backend], results["torch"]
    _assert_close(label, out, ref_out, _tol(dtype))
    for g, r, leaf in zip(grads, ref_grads, ("values", "W_dec", "b_dec")):
        _assert_close(f"{label} grad {leaf}", g, r, _tol(dtype) * max(1.0, k))
    return label


def _prefix_decode_case(backend, device, dtype, n, d, prefixes, k, generator):
    """The Matryoshka prefix decode (all len(prefixes) nested reconstructions) and its two backward
    kernels, against the torch backend."""
    m = prefixes[-1]
    values = _exact((n, k), generator, device, dtype)
    indices = torch.randint(0, m, (n, k), generator=generator).to(device=device, dtype=torch.int32)
    W_dec = _exact((m, d), generator, device, dtype)
    b_dec = _exact((d,), generator, device, dtype)
    results = {}
    for name in (backend, "torch"):
        leaves = [t.clone().requires_grad_(True) for t in (values, W_dec, b_dec)]
        out = pyinterp.prefix_decode(leaves[0], indices, leaves[1], prefixes, leaves[2], backend=name)
        (out.float() * torch.linspace(-1, 1, out.numel(), device=device).view_as(out)).sum().backward()
        results[name] = (out, [t.grad for t in leaves])
    label = f"prefix_decode[{backend}, {dtype}, N={n} D={d} prefixes={prefixes} k={k}]"
    (out, grads), (ref_out, ref_grads) = results[backend], results["torch"]
    _assert_close(label, out, ref_out, _tol(dtype))
    for g, r, leaf in zip(grads, ref_grads, ("values", "W_dec", "b_dec")):
        _assert_close(f"{label} grad {leaf}", g, r, _tol(dtype) * max(1.0, k) * len(prefixes))
    return label


def _coef_sum_without_columns_case(backend, device, generator):
    """sparse_t_matmul with D = 0 (the op, below sparse_decode, which rejects D = 0): coef_sum, the
    b_enc gradient, is still the per-latent sum of coef."""
    coef = _exact((40, 6), generator, device, torch.float32)
    indices = torch.randint(0, 9, (40, 6), generator=generator).to(device=device, dtype=torch.int32)
    rows = torch.empty(40, 0, device=device)
    weight_grad, coef_sum = torch.ops.pyinterp.sparse_t_matmul(coef, indices, rows, 9)
    # (pyinterp.reference.sparse_decode.sparse_t_matmul cannot reshape a D = 0 product: summed here)
    expected = torch.zeros(9, device=device).index_add_(0, indices.reshape(-1).long(), coef.reshape(-1))
    label = f"sparse_t_matmul[{backend}, D=0]"
    assert weight_grad.shape == (9, 0), f"{label}: weight_grad has shape {tuple(weight_grad.shape)}"
    _assert_close(f"{label} coef_sum", coef_sum, expected, 1e-6)
    return label


def _ij_case(backend, device, dtype, k, e, s, d, generator):
    grads = _exact((k, e, s, d), generator, device, dtype)
    weights = torch.full((k,), 1.0 / k, device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    delta = _exact((s, d), generator, device, weights.dtype)
    P, Jbar = pyinterp.ij_accumulate(grads, weights, delta, return_jbar=True, backend=backend)
    P_ref, Jbar_ref = pyinterp.ij_accumulate(grads, weights, delta, return_jbar=True, backend="torch")
    label = f"ij_accumulate[{backend}, {dtype}, K={k} E={e} S={s} D={d}]"
    _assert_close(label, P, P_ref, 1e-4)
    _assert_close(f"{label} Jbar", Jbar, Jbar_ref, 1e-4)
    return label


def _resonator_case(backend, device, sizes, dim, options, seed):
    books = random_codebooks(sizes, dim, seed=seed, device=device)
    s, truth = random_problems(books, 6, seed=seed + 1)
    known = None
    if options.pop("with_known", False):
        known = torch.full_like(truth, -1)
        known[:, 0] = truth[:, 0]
    results = [resonator(s, books, max_iters=40, known=known, backend=name, **options)
               for name in (backend, "torch")]
    label = f"resonator[{backend}, sizes={sizes} D={dim} {options}{' known' if known is not None else ''}]"
    for field in ("indices", "iterations", "converged", "cycle"):
        assert torch.equal(getattr(results[0], field).cpu(), getattr(results[1], field).cpu()), \
            f"{label}: {field} differs from the torch backend"
    _assert_close(f"{label} similarities", results[0].similarities, results[1].similarities, 1e-6)
    return label


def _small_cases(backend, device, dtype, generator):
    tiny = device == "cpu"
    return [
        # fused path; AuxK fused (k, k_aux <= 128); general path (k > 128); odd D (misaligned rows)
        lambda: _encode_case(backend, device, dtype, 37, 64, 300, 17, 0, generator),
        lambda: _encode_case(backend, device, dtype, 19, 48, 700, 33, 24, generator),
        lambda: _encode_case(backend, device, dtype, 5, 16 if tiny else 320, 600, 150, 8 if tiny else 160,
                             generator),
        lambda: _encode_case(backend, device, dtype, 9, 13, 77, 5, 0, generator),
        lambda: _decode_case(backend, device, dtype, 33, 64, 500, 17, generator),
        lambda: _decode_case(backend, device, dtype, 7, 13, 40, 9, generator),
        lambda: _prefix_decode_case(backend, device, dtype, 21, 20, [5, 40, 64, 300], 37, generator),
        lambda: _ij_case(backend, device, dtype, 3, 2, 5, 37, generator),
    ]


def _large_cases(backend, device, dtype, generator):
    """The shapes the unit tests do not reach: many latent tiles merged across splits, the general path
    with the default k_aux = D/2, a large b_dec in 16-bit, decodes spanning many chunks."""
    if device == "cpu":  # the dry run: the same calls, small enough for a loaded CPU
        return [lambda: _encode_case(backend, device, dtype, 16, 32, 3000, 40, 16, generator, 64.0),
                lambda: _decode_case(backend, device, dtype, 64, 32, 2000, 16, generator),
                lambda: _prefix_decode_case(backend, device, dtype, 32, 32, [125, 500, 2000], 16, generator)]
    return [
        lambda: _encode_case(backend, device, dtype, 300, 256, 40000, 64, 0, generator),
        lambda: _encode_case(backend, device, dtype, 200, 256, 20000, 32, 128, generator),
        lambda: _encode_case(backend, device, dtype, 64, 768, 20000, 32, 384, generator),
        lambda: _encode_case(backend, device, dtype, 100, 512, 9000, 200, 256, generator),
        lambda: _encode_case(backend, device, dtype, 128, 256, 8192, 32, 0, generator, 64.0),
        lambda: _decode_case(backend, device, dtype, 4096, 512, 50000, 64, generator),
        lambda: _prefix_decode_case(backend, device, dtype, 2048, 512, [3125, 12500, 50000], 64, generator),
    ]


def _resonator_cases(backend, device, large):
    if backend == "triton":  # float arithmetic; D = 40 and codebooks of 256+ with known factors
        return [lambda: _resonator_case(backend, device, [256, 300], 40, {"with_known": True}, 11),
                lambda: _resonator_case(backend, device, [16, 9, 12], 40, {}, 3)]
    cases = [lambda: _resonator_case(backend, device, [16, 9, 12], 40, {}, 3),
             lambda: _resonator_case(backend, device, [300, 257], 96, {"with_known": True}, 5),
             lambda: _resonator_case(backend, device, [20, 20, 20], 64, {"noise": 0.5, "seed": 7}, 7),
             lambda: _resonator_case(backend, device, [20, 20, 20], 64, {"detect_cycles": 4}, 8),
             lambda: _resonator_case(backend, device, [12, 12], 33,
                                     {"activation": "topk", "k": 3, "update": "parallel"}, 9)]
    if large and device == "cuda":  # blocks pulling several problems, large codebooks
        cases.append(lambda: _resonator_case(backend, device, [2000, 1500, 1000], 1024, {}, 13))
    return cases


def sanitize(args) -> int:
    device = args.device
    generator = torch.Generator().manual_seed(0)
    dtypes = (torch.float32,) if device == "cpu" else (torch.float32, torch.bfloat16)
    make = _large_cases if args.large else _small_cases
    cases = []
    for backend in args.backends:
        for dtype in dtypes:
            cases += make(backend, device, dtype, generator)
        if not args.large:
            cases.append(lambda b=backend: _ij_case(b, device, torch.float64, 2, 3, 4, 9, generator))
            if backend in ("cuda", "cpu"):  # the backends of torch.ops.pyinterp.sparse_t_matmul
                cases.append(lambda b=backend: _coef_sum_without_columns_case(b, device, generator))
        cases += _resonator_cases(backend, device, args.large)
    failures = 0
    for case in cases:
        try:
            print("ok  ", case(), flush=True)
        except Exception as exc:  # every case runs; the exit code reports any failure
            failures += 1
            print("FAIL", f"{type(exc).__name__}: {exc}", flush=True)
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"{len(cases) - failures}/{len(cases)} cases passed")
    return 1 if failures else 0


# ---------------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------------
PAPER = {"gpt2-32k": (768, 32768, 32, 16384), "gemma2b-64k": (2304, 65536, 64, 8192)}
TINY = {"tiny": (64, 1024, 8, 256)}


def bench(args) -> int:
    device = args.device
    shapes = PAPER if device == "cuda" else TINY
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    status = 0
    with open(args.out, "a") as out:
        for shape, (d, m, k, n) in shapes.items():
            generator = torch.Generator().manual_seed(0)
            x = torch.randn(n, d, generator=generator).to(device=device, dtype=dtype)
            for backend in args.backends:
                sae = TopKSAE(d, m, k, k_aux=0, backend=backend, device=device)

                def encode():
                    with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
                        sae.encode(x)

                def step():
                    sae.zero_grad(set_to_none=True)
                    with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
                        loss = sae(x).loss
                    loss.backward()

                for direction, fn in (("forward", encode), ("forward+backward", step)):
                    record = {"shape": shape, "D": d, "M": m, "k": k, "N": n, "dtype": str(dtype),
                              "backend": backend, "direction": direction, "device": device,
                              "timer": "cuda-event" if device == "cuda" else "wall (dry run)"}
                    try:
                        record.update(median_ms=median_ms(fn, device, repeats=args.repeats), repeats=args.repeats)
                    except Exception as exc:  # a backend that fails at one shape must not hide the others
                        status = 1
                        record["error"] = f"{type(exc).__name__}: {exc}"
                    print(json.dumps(record), flush=True)
                    out.write(json.dumps(record) + "\n")
                del sae
                if device == "cuda":
                    torch.cuda.empty_cache()
    return status


# ---------------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------------
def _synthetic_batches(d: int, n: int, steps: int, device: str, seed: int):
    """Activations that a dictionary explains: sums of 8 of 4d random unit directions."""
    generator = torch.Generator().manual_seed(seed)
    atoms = torch.randn(4 * d, d, generator=generator)
    atoms /= atoms.norm(dim=1, keepdim=True)
    for _ in range(steps):
        which = torch.randint(0, 4 * d, (n, 8), generator=generator)
        weights = torch.rand(n, 8, generator=generator) * 2
        yield (weights[:, :, None] * atoms[which]).sum(1).to(device)


def _train(backend: str, args, d: int, m: int, k: int, n: int) -> list[float]:
    sae = TopKSAE(d, m, k, backend=backend, device=args.device, seed=0)
    optimizer = torch.optim.Adam(sae.parameters(), lr=args.lr)
    last_fired = torch.zeros(m, dtype=torch.long, device=args.device)
    losses = []
    for step, x in enumerate(_synthetic_batches(d, n, args.steps, args.device, seed=1)):
        if step == 0:
            sae.init_b_dec(x)
        dead = (step - last_fired) > 20
        out = sae(x, dead_mask=dead)
        last_fired[out.indices.reshape(-1).long()] = step
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.project_decoder_grad()
        optimizer.step()
        sae.normalize_decoder()
        losses.append(out.fvu.item())
    return losses


def train(args) -> int:
    d, m, k, n = (256, 8192, 32, 2048) if args.device == "cuda" else (32, 256, 8, 128)
    curves = {}
    for backend in args.backends:
        t0 = time.perf_counter()
        curves[backend] = _train(backend, args, d, m, k, n)
        print(f"{backend}: {args.steps} steps in {time.perf_counter() - t0:.1f} s; fvu first "
              f"{curves[backend][0]:.4f}, last {curves[backend][-1]:.4f}", flush=True)
    reference = curves.pop("torch")
    status = 0
    if reference[-1] >= 0.9 * reference[0]:
        print(f"FAIL torch: fvu did not fall ({reference[0]:.4f} -> {reference[-1]:.4f})")
        status = 1
    for backend, curve in curves.items():
        gaps = [abs(a - b) / max(abs(b), 1e-6) for a, b in zip(curve, reference)]
        worst = max(range(len(gaps)), key=gaps.__getitem__)
        verdict = "ok  " if gaps[-1] <= args.tolerance else "FAIL"
        status |= verdict == "FAIL"
        print(f"{verdict} {backend} vs torch: final relative fvu gap {gaps[-1]:.2e} (tolerance "
              f"{args.tolerance:g}); largest {gaps[worst]:.2e} at step {worst}", flush=True)
    return status


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("sanitize", "bench", "train"))
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--backends", default=None,
                        help="comma-separated; default cuda,triton (cpu on --device cpu); train adds torch")
    parser.add_argument("--large", action="store_true", help="sanitize: the larger shapes, not the small ones")
    parser.add_argument("--out", default="bench.jsonl", help="bench: JSON lines appended here")
    parser.add_argument("--repeats", type=int, default=10, help="bench: timed repetitions per case")
    parser.add_argument("--steps", type=int, default=300, help="train: optimiser steps per backend")
    parser.add_argument("--lr", type=float, default=1e-3, help="train: Adam learning rate")
    parser.add_argument("--tolerance", type=float, default=0.05,
                        help="train: largest relative gap of the final fvu to the torch backend's")
    args = parser.parse_args(argv)
    default = "cuda,triton" if args.device == "cuda" else "cpu"
    args.backends = (args.backends or default).split(",")
    if args.mode == "train" and "torch" not in args.backends:
        args.backends.append("torch")
    print(f"pyinterp {pyinterp.__version__}, torch {torch.__version__}, device {args.device}, "
          f"backends {args.backends}", flush=True)
    return {"sanitize": sanitize, "bench": bench, "train": train}[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
