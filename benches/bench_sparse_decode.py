"""sparse_decode: pyinterp backends vs torch's embedding_bag, torch.compile of it, and EleutherAI
sparsify's decoder, on the sae.md shapes. Roofline unit: GB/s of the bytes a decode must move
(forward: the N*k gathered rows + the N x D output; backward adds the gather-dot and the
sparse^T x dense reads of the same rows and of the N x D gradient)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pyinterp
from sae_shapes import DIRECTIONS, PAPER_SHAPES, SMALL_SHAPES, sae_case, synchronize, time_and_record

PROVIDERS = ("pyinterp-cuda", "pyinterp-triton", "pyinterp-cpu", "torch-embedding_bag", "torch-compile",
             "sparsify")
ROTATIONS = 4  # distinct input sets cycled through so caches do not flatter small kernels


def embedding_bag_decode(values, indices, W_dec, b_dec):
    return F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum") + b_dec


def sparsify_decode(values, indices, W_dec, b_dec):
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
    case = sae_case("sparse_decode", request, record, shape, provider, direction)
    device, dtype, tokens, width, latents, k = (case.device, case.dtype, case.tokens, case.width,
                                                case.latents, case.k)
    g = torch.Generator(device=device).manual_seed(0)
    W_dec = torch.randn(latents, width, device=device, dtype=dtype, generator=g)
    b_dec = torch.randn(width, device=device, dtype=dtype, generator=g)
    inputs = []
    for _ in range(ROTATIONS):
        # Distinct latents per row, as top-k produces; values that are never all zero.
        indices = torch.rand(tokens, latents, device=device, generator=g).topk(k, dim=1).indices
        values = torch.rand(tokens, k, device=device, dtype=dtype, generator=g) + 0.1
        inputs.append((values, indices.to(torch.int32 if provider.startswith("pyinterp") else torch.int64)))
    grad_out = torch.randn(tokens, width, device=device, dtype=dtype, generator=g)
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
            synchronize(device)
    else:
        def step():
            values, indices = inputs[next(counter) % ROTATIONS]
            with torch.no_grad():
                decode(values, indices, W_dec, b_dec)
            synchronize(device)

    element = torch.finfo(dtype).bits // 8
    rows_bytes, dense_bytes = tokens * k * width * element, tokens * width * element
    moved = rows_bytes + dense_bytes if direction == "forward" else 3 * (rows_bytes + dense_bytes)
    time_and_record(benchmark, record, case, step, rounds=5 if device == "cpu" else 20,
                    work=moved, unit="GB/s")
