"""Reference top-k SAE encoder (docs/sae.md, "Encoder (`topk_encode`)"): dense pre-activations, top-k with ties to the lower index."""
from __future__ import annotations

import torch

from pyinterp._dtypes import accumulator_dtype


def preactivations(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor | None,
                   b_dec: torch.Tensor | None) -> torch.Tensor:
    """z = (x - b_dec) @ W_enc^T + b_enc for x (N, D), in the compute dtype."""
    dtype = accumulator_dtype(x.dtype)
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
                k_aux: int = 0, scale: torch.Tensor | None = None, scaled_values: bool = True):
    """x (N, D) -> (values, indices[, aux_values, aux_indices]); values post-ReLU in x's dtype,
    indices int32. The aux top-k ranges over dead latents only; live latents count as -inf there.
    With scale (M,) > 0 both selections rank s_i * z_i; values are s_i * z_i (scaled_values) or z_i."""
    z = preactivations(x, W_enc, b_enc, b_dec)
    ranked = z if scale is None else z * scale.to(z.dtype)
    reported = ranked if scaled_values else z
    top_indices = topk_lower_index_ties(ranked, k)[1]
    values = torch.relu(reported.gather(-1, top_indices)).to(x.dtype)
    if dead_mask is None or k_aux == 0:
        return values, top_indices.to(torch.int32)
    ranked_dead = ranked.masked_fill(~dead_mask.to(torch.bool), float("-inf"))
    aux_indices = topk_lower_index_ties(ranked_dead, k_aux)[1]
    aux_values = torch.relu(reported.gather(-1, aux_indices))
    # Live latents are -inf in the aux ranking: a row with fewer dead latents than k_aux reports 0 there.
    aux_values = aux_values.masked_fill(~dead_mask.to(torch.bool)[aux_indices], 0).to(x.dtype)
    return values, top_indices.to(torch.int32), aux_values, aux_indices.to(torch.int32)
