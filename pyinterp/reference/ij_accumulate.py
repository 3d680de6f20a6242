"""ij_accumulate, the specification: one chunk of quadrature nodes of the integrated Jacobian
(docs/ij_accumulate.md, "Definition"; Moeller et al., "An Attribution Method for Siamese Encoders", EMNLP 2023).

    Jbar_chunk[e, s, d] = sum_k weights[k] * grads[k, e, s, d]
    P_chunk[e, s]       = sum_d Jbar_chunk[e, s, d] * delta[s, d]

Sums are taken in the accumulator dtype (fp32, fp64 for fp64 gradients) whatever the input dtype."""
from __future__ import annotations

import torch
from torch import Tensor

from pyinterp._dtypes import accumulator_dtype


def ij_accumulate(grads: Tensor, weights: Tensor, delta: Tensor,
                  return_jbar: bool = False) -> tuple[Tensor, Tensor | None]:
    """grads (K, E, S, *features), weights (K), delta (S, *features) -> P_chunk (E, S),
    Jbar_chunk (E, S, *features) or None."""
    acc = accumulator_dtype(grads.dtype)
    jbar = torch.einsum("k,kes...->es...", weights.to(acc), grads.to(acc))
    p = (jbar * delta.to(acc)).flatten(2).sum(-1)
    return p, (jbar if return_jbar else None)
