"""Reference (dense) cross-layer transcoder (docs/sae_family.md, "Cross-layer transcoders"): every
layer's top-k latents as a dense N x M matrix and one dense matmul per (source, target) pair. The
spec that pyinterp/nn/cross_layer_transcoder.py's sparse forward and backward are tested against;
differentiable by torch's own autograd.

Layout (the module's): W_enc (L*M, D_in), layer l's encoder is rows l*M .. (l+1)*M; b_enc (L*M);
W_dec[t] ((t+1)*M, D_out), row l*M + i is latent (l, i)'s decoder into target layer t; b_dec (L, D_out)."""
from __future__ import annotations

from typing import Sequence

import torch

from pyinterp._dtypes import accumulator_dtype
from pyinterp.reference import topk_encode as topk_reference


def dense_latents(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor | None, k: int,
                  dead_mask: torch.Tensor | None = None, k_aux: int = 0):
    """x (N, L, D_in) -> (latents, aux_latents): (N, L*M) each layer's top-k ReLU'd pre-activations
    scattered into zeros (selection as topk_encode's reference: ties to the lower index), and with
    dead_mask (L*M, bool) and k_aux > 0 the same for each layer's top-k_aux dead latents (else None)."""
    n, layers, _ = x.shape
    per_layer = W_enc.shape[0] // layers
    dtype = accumulator_dtype(x.dtype)
    latents, aux_latents = [], []
    for layer in range(layers):
        rows = slice(layer * per_layer, (layer + 1) * per_layer)
        bias = None if b_enc is None else b_enc[rows]
        with_aux = dead_mask is not None and k_aux > 0
        outputs = topk_reference.topk_encode(x[:, layer], W_enc[rows], bias, k,
                                             dead_mask=dead_mask[rows] if with_aux else None,
                                             k_aux=k_aux if with_aux else 0)
        zeros = torch.zeros(n, per_layer, dtype=dtype, device=x.device)
        latents.append(zeros.scatter(1, outputs[1].long(), outputs[0].to(dtype)))
        if with_aux:
            aux_latents.append(zeros.scatter(1, outputs[3].long(), outputs[2].to(dtype)))
    return torch.cat(latents, 1), (torch.cat(aux_latents, 1) if aux_latents else None)


def cross_layer_transcoder(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor | None,
                           W_dec: Sequence[torch.Tensor], b_dec: torch.Tensor | None, k: int,
                           dead_mask: torch.Tensor | None = None, k_aux: int = 0):
    """x (N, L, D_in) -> (y_hat (N, L, D_out), aux_hat (N, L, D_out) or None, latents (N, L*M)).
    y_hat[:, t] = sum over sources l <= t of latents_l @ W_dec[t][l*M:(l+1)*M] + b_dec[t]; aux_hat is
    the same sum over the dead latents' aux latents, without b_dec."""
    layers = x.shape[1]
    per_layer = W_enc.shape[0] // layers
    dtype = accumulator_dtype(x.dtype)
    latents, aux_latents = dense_latents(x, W_enc, b_enc, k, dead_mask, k_aux)
    y_hat, aux_hat = [], []
    for target in range(layers):
        sources = slice(0, (target + 1) * per_layer)
        decoder = W_dec[target].to(dtype)
        out = latents[:, sources] @ decoder
        y_hat.append(out if b_dec is None else out + b_dec[target].to(dtype))
        if aux_latents is not None:
            aux_hat.append(aux_latents[:, sources] @ decoder)
    stacked_aux = torch.stack(aux_hat, 1).to(x.dtype) if aux_hat else None
    return torch.stack(y_hat, 1).to(x.dtype), stacked_aux, latents.to(x.dtype)


def _total_variance(x: torch.Tensor, floor: float | None) -> torch.Tensor:
    variance = (x - x.mean(0)).pow(2).sum()
    return variance if floor is None else variance.clamp_min(x.shape[0] * floor)


def losses(y: torch.Tensor, y_hat: torch.Tensor, aux_hat: torch.Tensor | None = None,
           dead_mask: torch.Tensor | None = None, k_aux: int = 0, variance_floor: float | None = None):
    """(fvu per layer (L,), aux per layer (L,) or None) for targets y and outputs (N, L, D_out).
    FVU_t = ||y_t - y_hat_t||^2 / ||y_t - mean(y_t)||^2. AuxK_t: aux_hat_t against the residual
    e_t = y_t - y_hat_t (no gradient through e_t), over ||e_t - mean(e_t)||^2, scaled by
    min(dead latents of layers <= t / ((t + 1) * k_aux), 1)."""
    dtype = accumulator_dtype(y.dtype)
    y, y_hat = y.to(dtype), y_hat.to(dtype)
    layers = y.shape[1]
    fvu = torch.stack([(y[:, t] - y_hat[:, t]).pow(2).sum() / _total_variance(y[:, t], variance_floor)
                       for t in range(layers)])
    if aux_hat is None:
        return fvu, None
    dead_per_layer = dead_mask.reshape(layers, -1).sum(1).to(dtype)
    aux = []
    for t in range(layers):
        residual = (y[:, t] - y_hat[:, t]).detach()
        scale = (dead_per_layer[:t + 1].sum() / ((t + 1) * k_aux)).clamp(max=1.0)
        aux.append(scale * (aux_hat[:, t].to(dtype) - residual).pow(2).sum()
                   / _total_variance(residual, variance_floor))
    return fvu, torch.stack(aux)
