"""topk_encode: pyinterp backends vs torch eager (GEMM + torch.topk), torch.compile of it, and
EleutherAI sparsify's encoder, on the sae.md shapes. Roofline unit: TFLOP/s of the 2*N*M*D GEMM."""
from __future__ import annotations

import pytest
import torch

import pyinterp
from sae_shapes import DIRECTIONS, PAPER_SHAPES, SMALL_SHAPES, sae_case, synchronize, time_and_record

PROVIDERS = ("pyinterp-cuda", "pyinterp-triton", "pyinterp-cpu", "torch-eager", "torch-compile", "sparsify")


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
    case = sae_case("topk_encode", request, record, shape, provider, direction)
    device, dtype, tokens, width, latents, k = (case.device, case.dtype, case.tokens, case.width,
                                                case.latents, case.k)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, width, device=device, dtype=dtype, generator=g)
    W_enc = (torch.randn(latents, width, device=device, dtype=dtype, generator=g) / width ** 0.5)
    b_enc = torch.randn(latents, device=device, dtype=dtype, generator=g) * 0.01
    b_dec = torch.randn(width, device=device, dtype=dtype, generator=g) * 0.01
    encode = make_encoder(provider)
    if direction == "forward+backward":
        params = [t.requires_grad_() for t in (W_enc, b_enc, b_dec)]
        grad_values = torch.randn(tokens, k, device=device, dtype=dtype, generator=g)

        def step():
            values, _ = encode(x, *params, k)
            torch.autograd.backward(values, grad_values)
            for p in params:
                p.grad = None
            synchronize(device)
    else:
        def step():
            with torch.no_grad():
                encode(x, W_enc, b_enc, b_dec, k)
            synchronize(device)

    # Both directions are quoted in the forward GEMM's FLOPs (2*N*M*D).
    time_and_record(benchmark, record, case, step, rounds=3 if device == "cpu" else 10,
                    work=2 * tokens * latents * width, unit="TFLOP/s")
