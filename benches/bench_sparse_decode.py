"""sparse_decode: pyinterp backends vs torch's embedding_bag, torch.compile of it, and EleutherAI
sparsify's decoder, on the shapes of docs/sae.md ("Benchmark shapes"), all providers of a case in interleaved rounds. Roofline
unit: GB/s of the bytes a decode must move (forward: the N*k gathered rows + the N x D output;
backward adds the gather-dot and the sparse^T x dense reads of the same rows and of the N x D
gradient)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pyinterp
from sae_shapes import (ALL_SHAPES, DIRECTIONS, direction_step, measure_and_record, parameters_for,
                        provider_function, sae_case)

PROVIDERS = ("pyinterp-cuda", "pyinterp-triton", "pyinterp-cpu", "torch-embedding_bag", "torch-compile",
             "sparsify")
ROTATIONS = 4  # distinct input sets cycled through so caches do not flatter small kernels


def pyinterp_decode(values, indices, W_dec, b_dec, *, backend):
    return pyinterp.sparse_decode(values, indices, W_dec, b_dec, backend=backend, check_indices=False)


def embedding_bag_decode(values, indices, W_dec, b_dec):
    return F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum") + b_dec


def sparsify_decode(values, indices, W_dec, b_dec):
    from sparsify.utils import decoder_impl
    return decoder_impl(indices, values, W_dec.mT) + b_dec


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("shape", list(ALL_SHAPES))
def test_sparse_decode(record, progress, request, shape, direction):
    case = sae_case("sparse_decode", request, record, shape, direction, PROVIDERS)
    device, dtype, tokens, width, latents, k = (case.device, case.dtype, case.tokens, case.width,
                                                case.latents, case.k)
    g = torch.Generator(device=device).manual_seed(0)
    W_dec = torch.randn(latents, width, device=device, dtype=dtype, generator=g)
    b_dec = torch.randn(width, device=device, dtype=dtype, generator=g)
    params = parameters_for(direction, [W_dec, b_dec])
    inputs = []
    for _ in range(ROTATIONS):
        # Distinct latents per row, as top-k produces; values that are never all zero.
        indices = torch.rand(tokens, latents, device=device, generator=g).topk(k, dim=1).indices
        values = torch.rand(tokens, k, device=device, dtype=dtype, generator=g) + 0.1
        inputs.append((values, indices))
    grad_out = torch.randn(tokens, width, device=device, dtype=dtype, generator=g)

    steps = {}
    for provider in case.providers:
        decode = provider_function(provider, pyinterp_decode, embedding_bag_decode, sparsify_decode)
        index_dtype = torch.int32 if provider.startswith("pyinterp") else torch.int64
        rotation = [(v, i.to(index_dtype)) for v, i in inputs]
        counter = iter(range(10**9))

        def run(decode=decode, rotation=rotation, counter=counter):
            values, indices = rotation[next(counter) % ROTATIONS]
            return decode(values.detach().requires_grad_(direction == "forward+backward"), indices, *params)
        steps[provider] = direction_step(direction, run, params, grad_out, device)

    element = torch.finfo(dtype).bits // 8
    rows_bytes, dense_bytes = tokens * k * width * element, tokens * width * element
    moved = rows_bytes + dense_bytes if direction == "forward" else 3 * (rows_bytes + dense_bytes)
    measure_and_record(case, steps, record, progress, work=moved, unit="GB/s")
