"""Reference sparse decoder (docs/sae.md, "Decoder (`sparse_decode`)") and the sparse products of both SAE backwards."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pyinterp._dtypes import accumulator_dtype


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor,
                  b_dec: torch.Tensor | None = None) -> torch.Tensor:
    """x_hat[n] = sum_j values[n,j] * W_dec[indices[n,j]] + b_dec, for values/indices (N, k)."""
    return gather_sum(values, indices, W_dec, b_dec)


def gather_sum(values, indices, weight, bias=None):
    dtype = accumulator_dtype(values.dtype)
    out = F.embedding_bag(indices.long(), weight.to(dtype), per_sample_weights=values.to(dtype),
                          mode="sum")
    if bias is not None:
        out = out + bias.to(dtype)
    return out.to(values.dtype)


def gather_dot(grad, indices, weight):
    dtype = accumulator_dtype(grad.dtype)
    rows = weight.to(dtype)[indices.long()]                      # (N, k, D)
    return torch.einsum("nkd,nd->nk", rows, grad.to(dtype)).to(grad.dtype)


def sparse_t_matmul(coef, indices, rows, num_latents):
    dtype = accumulator_dtype(rows.dtype)
    flat = indices.long().reshape(-1)
    weight_grad = torch.zeros(num_latents, rows.shape[1], dtype=dtype, device=rows.device)
    weight_grad.index_add_(0, flat, (coef.to(dtype)[:, :, None] * rows.to(dtype)[:, None, :])
                           .reshape(-1, rows.shape[1]))
    coef_sum = torch.zeros(num_latents, dtype=accumulator_dtype(dtype),
                           device=rows.device)
    coef_sum.index_add_(0, flat, coef.to(coef_sum.dtype).reshape(-1))
    return weight_grad.to(rows.dtype), coef_sum
