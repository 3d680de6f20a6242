"""topk_encode: pyinterp backends vs torch eager (GEMM + torch.topk), torch.compile of it, and
EleutherAI sparsify's encoder, on the sae.md shapes. Roofline unit: TFLOP/s of the 2*N*M*D GEMM."""
from __future__ import annotations

import pytest
import torch

import pyinterp
from harness import peak_memory_bytes
from sae_shapes import (DIRECTIONS, PAPER_SHAPES, SMALL_SHAPES, bench_device, bench_dtype,
                        skip_reason, synchronize)

PROVIDERS = ("pyinterp-cuda", "pyinterp-triton", "pyinterp-cpu", "torch-eager", "torch-compile", "sparsify")
DEVICE = bench_device()


def eager_encode(x, W_enc, b_enc, b_dec, k):
    values, indices = torch.topk((x - b_dec) @ W_enc.T + b_enc, k, dim=-1)
    return torch.relu(values), indices


def sparsify_encode(x, W_enc, b_enc, b_dec, k):
    # sparsify's encoder: dense linear (N x M written to memory) + top-k, index_add backward.
    from sparsify.fused_encoder import fused_encoder
    values, indices, _ = fused_encoder(x - b_dec, W_enc, b_enc, k, "topk")
    return values, indices


def make_encoder(provider: str):
    if provider.startswith("pyinterp-"):
        backend = provider.removeprefix("pyinterp-")
        return lambda x, W, b, bd, k: pyinterp.topk_encode(x, W, b, k, b_dec=bd, backend=backend)
    if provider == "torch-compile":
        return torch.compile(eager_encode)
    if provider == "sparsify":
        return sparsify_encode
    return eager_encode


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", list(SMALL_SHAPES) + list(PAPER_SHAPES))
def test_topk_encode(benchmark, record, request, shape, provider, direction):
    option = request.config.getoption("--shapes")
    if (shape in PAPER_SHAPES and option == "small") or (shape in SMALL_SHAPES and option == "paper"):
        pytest.skip(f"--shapes={option}")
    width, latents, k, tokens = {**SMALL_SHAPES, **PAPER_SHAPES}[shape]
    dtype = bench_dtype(DEVICE)
    row = {"op": "topk_encode", "shape": shape, "N": tokens, "D": width, "M": latents, "k": k,
           "dtype": str(dtype).removeprefix("torch."), "direction": direction, "provider": provider,
           "device_kind": DEVICE}
    reason = skip_reason(provider, shape, DEVICE)
    if reason:
        record({**row, "skipped": reason})
        pytest.skip(reason)

    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(tokens, width, device=DEVICE, dtype=dtype, generator=g)
    W_enc = (torch.randn(latents, width, device=DEVICE, dtype=dtype, generator=g) / width ** 0.5)
    b_enc = torch.randn(latents, device=DEVICE, dtype=dtype, generator=g) * 0.01
    b_dec = torch.randn(width, device=DEVICE, dtype=dtype, generator=g) * 0.01
    encode = make_encoder(provider)
    if direction == "forward+backward":
        params = [t.requires_grad_() for t in (W_enc, b_enc, b_dec)]
        grad_values = torch.randn(tokens, k, device=DEVICE, dtype=dtype, generator=g)

        def step():
            values, _ = encode(x, *params[:1], params[1], params[2], k)
            torch.autograd.backward(values, grad_values)
            for p in params:
                p.grad = None
            synchronize(DEVICE)
    else:
        def step():
            with torch.no_grad():
                encode(x, W_enc, b_enc, b_dec, k)
            synchronize(DEVICE)

    step()  # warm-up (and compilation for torch-compile)
    rounds = 3 if DEVICE == "cpu" else 10
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=1, iterations=1)
    median_ms = benchmark.stats.stats.median * 1e3
    peak = peak_memory_bytes(step, DEVICE)
    flops = 2 * tokens * latents * width  # the forward GEMM: the unit both directions are quoted in
    tflops = flops / (median_ms * 1e-3) / 1e12
    record({**row, "median_ms": round(median_ms, 3), "peak_mib": round(peak / 2**20, 1),
            "throughput": round(tflops, 4), "unit": "TFLOP/s"})
    benchmark.extra_info.update(peak_mib=round(peak / 2**20, 1), tflops=round(tflops, 3))
