"""Reference prefix decoder (docs/sae_family.md, "Matryoshka", "The prefix decode"): one plain sparse
decode per prefix, the spec that the single-pass kernels must match."""
from __future__ import annotations

import torch

from pyinterp._dtypes import accumulator_dtype
from pyinterp.reference.sparse_decode import gather_sum


def prefix_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor,
                  prefixes: list[int], b_dec: torch.Tensor | None = None) -> torch.Tensor:
    """out[p, n] = sum_{j: indices[n,j] < prefixes[p]} values[n,j] * W_dec[indices[n,j]] + b_dec,
    for values/indices (N, k); (P, N, D) in values' dtype."""
    return torch.stack([gather_sum(torch.where(indices < width, values, 0), indices, W_dec, b_dec)
                        for width in prefixes])


def suffix_sum(grad: torch.Tensor) -> torch.Tensor:
    """G[b] = sum_{p >= b} grad[p] over the prefix axis (dim 0), in the accumulator dtype of grad:
    the gradient that reaches a latent of bucket b (it is in every prefix from b on)."""
    return grad.to(accumulator_dtype(grad.dtype)).flip(0).cumsum(0).flip(0)
