"""Shared by the SAE training tests: backends to train with, a float64 dense reference of the SAE
loss (sae.md, with switches that reintroduce the popular libraries' bugs), and small sources."""
from __future__ import annotations

import torch

from helpers import backends


def training_backends() -> list[str]:
    """Backends for the float64 training checks: the Triton encoder has no float64 path (its
    gradients are checked against the float64 reference in float32 in tests/test_topk_encode.py)."""
    return [b for b in backends("topk_encode") if b != "triton"]


def correlated_activations(tokens: int, width: int, *, seed: int = 0, offset: float = 2.0) -> torch.Tensor:
    """Gaussian tokens with correlated features and a non-zero mean (so b_dec matters)."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(width, width, generator=g) / width ** 0.5
    return torch.randn(tokens, width, generator=g) @ mixing + offset


def dense_reference_loss(W_enc, b_enc, W_dec, b_dec, x, k, *, dead_mask=None, k_aux=0, aux_alpha=1 / 32,
                         relu_mask=True, aux_reaches_encoder=True, aux_adds_b_dec=False):
    """(loss, fvu, aux_loss, active mask (N, M)) of sae.md, dense (N x M), differentiated by torch.
    The switches reproduce the traps: relu_mask=False lets gradient through negative selected
    pre-activations; aux_reaches_encoder=False detaches the encoder in AuxK; aux_adds_b_dec=True
    adds b_dec to the AuxK reconstruction a second time."""
    z = (x - b_dec) @ W_enc.T + b_enc
    selected = torch.zeros_like(z, dtype=torch.bool).scatter_(1, z.topk(k, dim=1).indices, True)
    activation = torch.relu(z) if relu_mask else z + (torch.relu(z) - z).detach()
    a = torch.where(selected, activation, 0)
    x_hat = a @ W_dec + b_dec
    fvu = (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    aux_loss = fvu.new_zeros(())
    if dead_mask is not None and k_aux > 0:
        z_aux = z if aux_reaches_encoder else z.detach()
        z_dead = z_aux.masked_fill(~dead_mask, float("-inf"))
        aux_selected = torch.zeros_like(z, dtype=torch.bool).scatter_(1, z_dead.topk(k_aux, dim=1).indices, True)
        a_aux = torch.where(aux_selected & dead_mask, torch.relu(z_aux), 0)
        e = (x - x_hat).detach()
        e_hat = a_aux @ W_dec + (b_dec if aux_adds_b_dec else 0)
        scale = min(int(dead_mask.sum()) / k_aux, 1.0)
        aux_loss = scale * (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    return fvu + aux_alpha * aux_loss, fvu, aux_loss, selected & (z > 0)
