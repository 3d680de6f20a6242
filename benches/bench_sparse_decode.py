"""sparse_decode: pyinterp backends vs torch's embedding_bag, torch.compile of it, and EleutherAI
sparsify's decoder, on the sae.md shapes. Roofline unit: GB/s of the bytes a decode must move
(forward: the N*k gathered rows + the N x D output; backward adds the gather-dot and the
sparse^T x dense reads of the same rows and of the N x D gradient)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import pyinterp
from harness import peak_memory_bytes
from sae_shapes import (DIRECTIONS, PAPER_SHAPES, SMALL_SHAPES, bench_device, bench_dtype,
                        skip_reason, synchronize)

PROVIDERS = ("pyinterp-cuda", "pyinterp-triton", "pyinterp-cpu", "torch-embedding_bag", "torch-compile",
             "sparsify")
DEVICE = bench_device()
ROTATIONS = 4  # distinct input sets cycled through so caches do not flatter small kernels


def embedding_bag_decode(values, indices, W_dec, b_dec):
    return F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum") + b_dec


def sparsify_decode(values, indices, W_dec, b_dec):
    if DEVICE == "cpu":
        os.environ["SPARSIFY_DISABLE_TRITON"] = "1"  # its Triton decoder needs a GPU
    from sparsify.utils import decoder_impl
    return decoder_impl(indices, values, W_dec.mT) + b_dec


def make_decoder(provider: str):
    if provider.startswith("pyinterp-"):
        backend = provider.removeprefix("pyinterp-")
        return lambda v, i, W, b: pyinterp.sparse_decode(v, i, W, b, backend=backend, check_indices=False)
    if provider == "torch-compile":
        return torch.compile(embedding_bag_decode)
    if provider == "sparsify":
        return sparsify_decode
    return embedding_bag_decode


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", list(SMALL_SHAPES) + list(PAPER_SHAPES))
def test_sparse_decode(benchmark, record, request, shape, provider, direction):
    option = request.config.getoption("--shapes")
    if (shape in PAPER_SHAPES and option == "small") or (shape in SMALL_SHAPES and option == "paper"):
        pytest.skip(f"--shapes={option}")
    width, latents, k, tokens = {**SMALL_SHAPES, **PAPER_SHAPES}[shape]
    dtype = bench_dtype(DEVICE)
    row = {"op": "sparse_decode", "shape": shape, "N": tokens, "D": width, "M": latents, "k": k,
           "dtype": str(dtype).removeprefix("torch."), "direction": direction, "provider": provider,
           "device_kind": DEVICE}
    reason = skip_reason(provider, shape, DEVICE)
    if reason:
        record({**row, "skipped": reason})
        pytest.skip(reason)

    g = torch.Generator(device=DEVICE).manual_seed(0)
    W_dec = torch.randn(latents, width, device=DEVICE, dtype=dtype, generator=g)
    b_dec = torch.randn(width, device=DEVICE, dtype=dtype, generator=g)
    inputs = []
    for _ in range(ROTATIONS):
        # Distinct latents per row, as top-k produces; random values that are never all zero.
        scores = torch.rand(tokens, latents, device=DEVICE, generator=g) if latents * tokens <= 2**28 else None
        indices = (scores.topk(k, dim=1).indices if scores is not None else
                   torch.randint(0, latents, (tokens, k), device=DEVICE, generator=g))
        values = torch.rand(tokens, k, device=DEVICE, dtype=dtype, generator=g) + 0.1
        inputs.append((values, indices.to(torch.int32 if provider.startswith("pyinterp") else torch.int64)))
        del scores
    grad_out = torch.randn(tokens, width, device=DEVICE, dtype=dtype, generator=g)
    decode = make_decoder(provider)
    counter = iter(range(10**9))

    if direction == "forward+backward":
        params = [t.requires_grad_() for t in (W_dec, b_dec)]

        def step():
            values, indices = inputs[next(counter) % ROTATIONS]
            values = values.detach().requires_grad_()
            torch.autograd.backward(decode(values, indices, *params), grad_out)
            for p in params:
                p.grad = None
            synchronize(DEVICE)
    else:
        def step():
            values, indices = inputs[next(counter) % ROTATIONS]
            with torch.no_grad():
                decode(values, indices, W_dec, b_dec)
            synchronize(DEVICE)

    step()  # warm-up (and compilation for torch-compile)
    benchmark.pedantic(step, rounds=5 if DEVICE == "cpu" else 20, warmup_rounds=1, iterations=1)
    median_ms = benchmark.stats.stats.median * 1e3
    peak = peak_memory_bytes(step, DEVICE)
    element = torch.finfo(dtype).bits // 8
    rows_bytes = tokens * k * width * element
    dense_bytes = tokens * width * element
    moved = rows_bytes + dense_bytes if direction == "forward" else 3 * rows_bytes + 3 * dense_bytes
    gbps = moved / (median_ms * 1e-3) / 1e9
    record({**row, "median_ms": round(median_ms, 3), "peak_mib": round(peak / 2**20, 1),
            "throughput": round(gbps, 3), "unit": "GB/s"})
    benchmark.extra_info.update(peak_mib=round(peak / 2**20, 1), gbps=round(gbps, 2))
