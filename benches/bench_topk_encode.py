"""topk_encode: pyinterp backends vs torch eager (GEMM + torch.topk), torch.compile of it, and
EleutherAI sparsify's encoder, on the shapes of docs/sae.md ("Benchmark shapes"), all providers of a case in interleaved rounds.
Roofline unit: TFLOP/s of the 2*N*M*D GEMM."""
from __future__ import annotations

import pytest
import torch

import pyinterp
from sae_shapes import (ALL_SHAPES, DIRECTIONS, direction_step, measure_and_record, parameters_for,
                        provider_function, sae_case)

PROVIDERS = ("pyinterp-cuda", "pyinterp-triton", "pyinterp-cpu", "torch-eager", "torch-compile", "sparsify")


def pyinterp_encode(x, W_enc, b_enc, b_dec, k, *, backend):
    return pyinterp.topk_encode(x, W_enc, b_enc, k, b_dec=b_dec, backend=backend)


def eager_encode(x, W_enc, b_enc, b_dec, k):
    values, indices = torch.topk((x - b_dec) @ W_enc.T + b_enc, k, dim=-1)
    return torch.relu(values), indices


def sparsify_encode(x, W_enc, b_enc, b_dec, k):
    # sparsify's encoder: dense linear (N x M written to memory) + top-k, index_add backward.
    from sparsify.fused_encoder import fused_encoder
    values, indices, _ = fused_encoder(x - b_dec, W_enc, b_enc, k, "topk")
    return values, indices


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("shape", list(ALL_SHAPES))
def test_topk_encode(record, progress, request, shape, direction):
    case = sae_case("topk_encode", request, record, shape, direction, PROVIDERS)
    device, dtype, tokens, width, latents, k = (case.device, case.dtype, case.tokens, case.width,
                                                case.latents, case.k)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, width, device=device, dtype=dtype, generator=g)
    W_enc = (torch.randn(latents, width, device=device, dtype=dtype, generator=g) / width ** 0.5)
    b_enc = torch.randn(latents, device=device, dtype=dtype, generator=g) * 0.01
    b_dec = torch.randn(width, device=device, dtype=dtype, generator=g) * 0.01
    params = parameters_for(direction, [W_enc, b_enc, b_dec])
    grad_values = torch.randn(tokens, k, device=device, dtype=dtype, generator=g)
    steps = {}
    for provider in case.providers:
        encode = provider_function(provider, pyinterp_encode, eager_encode, sparsify_encode)
        steps[provider] = direction_step(direction, lambda encode=encode: encode(x, *params, k)[0], params,
                                         grad_values, device)
    # Both directions are quoted in the forward GEMM's FLOPs (2*N*M*D).
    measure_and_record(case, steps, record, progress, work=2 * tokens * latents * width, unit="TFLOP/s")
