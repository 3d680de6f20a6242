"""Reference top-k SAE encoder (sae.md): dense pre-activations, top-k with ties to the lower index."""
from __future__ import annotations

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Low-precision inputs accumulate in fp32, as every kernel does; float64 stays float64.
    return torch.float64 if dtype == torch.float64 else torch.float32


def preactivations(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor | None,
                   b_dec: torch.Tensor | None) -> torch.Tensor:
    """z = (x - b_dec) @ W_enc^T + b_enc for x (N, D), in the compute dtype."""
    dtype = _compute_dtype(x.dtype)
    x_centered = x.to(dtype) if b_dec is None else x.to(dtype) - b_dec.to(dtype)
    z = x_centered @ W_enc.to(dtype).T
    return z if b_enc is None else z + b_enc.to(dtype)


def topk_lower_index_ties(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim, descending; equal values keep increasing index order.

    torch.topk does not promise an order among ties; a stable descending sort does."""
    values, indices = torch.sort(z, dim=-1, descending=True, stable=True)
    return values[..., :k], indices[..., :k]


def topk_encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor | None, k: int,
                b_dec: torch.Tensor | None = None, dead_mask: torch.Tensor | None = None,
                k_aux: int = 0):
    """x (N, D) -> (values, indices[, aux_values, aux_indices]); values post-ReLU in x's dtype,
    indices int32. The aux top-k ranges over dead latents only; live latents count as -inf there."""
    z = preactivations(x, W_enc, b_enc, b_dec)
    top_values, indices = topk_lower_index_ties(z, k)
    values = torch.relu(top_values).to(x.dtype)
    if dead_mask is None or k_aux == 0:
        return values, indices.to(torch.int32)
    z_dead = z.masked_fill(~dead_mask.to(torch.bool), float("-inf"))
    aux_top, aux_indices = topk_lower_index_ties(z_dead, k_aux)
    aux_values = torch.relu(aux_top).to(x.dtype)
    return values, indices.to(torch.int32), aux_values, aux_indices.to(torch.int32)
