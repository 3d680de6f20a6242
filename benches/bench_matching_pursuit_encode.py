"""matching_pursuit_encode: the MP-SAE forward (pyinterp.matching_pursuit_encode + pyinterp.sparse_decode,
what pyinterp.nn.MatchingPursuitSAE runs) vs SAELens' MatchingPursuitSAE.forward, both with SAELens'
default rules (positive selection, residual_threshold 1e-2, stop on duplicate support) and
k = max_iterations, in interleaved rounds.

"pyinterp-<backend>" builds the Gram matrix W_dec W_dec^T in every call (a decoder that changes every
step, as in training) and "pyinterp-<backend>-cached-gram" reuses one built beforehand (inference: the
module caches it while W_dec is unchanged); all in the same interleaved rounds. Unit: tok/s."""
from __future__ import annotations

import pytest
import torch

import pyinterp
from pyinterp.ops.matching_pursuit_encode import gram_matrix
from sae_shapes import ALL_SHAPES, measure_and_record, sae_case, synchronize

PROVIDERS = ("pyinterp-triton", "pyinterp-cpu", "saelens")  # no CUDA kernel of its own
RULES = {"residual_threshold": 1e-2, "stop_on_duplicate_support": True}


def pyinterp_forward(backend, W_dec, b_dec, k, *, gram_per_call):
    cached = None if gram_per_call else gram_matrix(W_dec)

    def forward(x):
        gram = gram_matrix(W_dec) if gram_per_call else cached
        values, indices = pyinterp.matching_pursuit_encode(x, W_dec, k, b_dec=b_dec, positive=True, gram=gram,
                                                           backend=backend, **RULES)
        return pyinterp.sparse_decode(values, indices, W_dec, b_dec, backend=backend, check_indices=False)
    return forward


def saelens_forward(W_dec, b_dec, k):
    from sae_lens.saes.matching_pursuit_sae import MatchingPursuitSAE as SAELensMP, MatchingPursuitSAEConfig

    sae = SAELensMP(MatchingPursuitSAEConfig(d_in=W_dec.shape[1], d_sae=W_dec.shape[0], max_iterations=k,
                                             device=str(W_dec.device),
                                             dtype=str(W_dec.dtype).removeprefix("torch."), **RULES))
    with torch.no_grad():
        sae.W_dec.copy_(W_dec)
        sae.b_dec.copy_(b_dec)
    return sae


@pytest.mark.parametrize("shape", list(ALL_SHAPES))
def test_matching_pursuit_encode(record, progress, request, shape):
    case = sae_case("matching_pursuit_encode", request, record, shape, "forward", PROVIDERS)
    device = case.device
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(case.tokens, case.width, device=device, generator=g).to(case.dtype)
    W_dec = torch.randn(case.latents, case.width, device=device, generator=g)
    W_dec = (W_dec / W_dec.norm(dim=1, keepdim=True)).to(case.dtype)
    b_dec = (torch.randn(case.width, device=device, generator=g) * 0.01).to(case.dtype)
    forwards = {}
    for provider in case.providers:
        if provider == "saelens":
            forwards[provider] = saelens_forward(W_dec, b_dec, case.k)
            continue
        backend = provider.removeprefix("pyinterp-")
        forwards[provider] = pyinterp_forward(backend, W_dec, b_dec, case.k, gram_per_call=True)
        forwards[f"{provider}-cached-gram"] = pyinterp_forward(backend, W_dec, b_dec, case.k, gram_per_call=False)
    steps = {}
    for provider, forward in forwards.items():

        def step(forward=forward):
            with torch.no_grad():
                forward(x)
            synchronize(device)
        steps[provider] = step
    measure_and_record(case, steps, record, progress, work=case.tokens, unit="tok/s")
