"""Attribution to sparse-autoencoder features at a layer (the sparse-feature-circuits use case:
Marks et al., "Sparse Feature Circuits", 2024, with integrated gradients over SAE latents).

At layer l, h = decode(z) + err with z = encode(h) the SAE's latent code and err its error term. The
path interpolates z and err from the reference's to the input's. decode is affine, so that path maps
onto the straight path r + a * Delta in h, and by the chain rule
    contribution of latent m at token s = (Jbar[:, s, :] . W_dec[m]) * (z_x[s, m] - z_r[s, m])
    contribution of the error at token s = Jbar[:, s, :] . (err_x[s] - err_r[s])
with Jbar the integrated Jacobian over h (one reverse-mode pass accumulated by ij_accumulate). They sum
to P[:, s] exactly. Only latents active at the input or the reference can contribute.

The SAE is a pyinterp.nn.TopKSAE (or BatchTopKSAE, in its inference form), encoded by pyinterp's
fused ops, so ties among pre-activations go to the lower latent index as everywhere (docs/sae.md)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from pyinterp.attribution.encoders import TextAttribution, attribute_texts, eval_mode
from pyinterp.attribution.integrated import IntegratedJacobian
from pyinterp.nn.sae import TopKSAE


@dataclass
class SAEAttribution:
    """features (S, U): latent ids active at the input or the reference of each token (-1 = unused slot);
    contributions (E, S, U): each (token, latent)'s share of g(x) - g(r); error (E, S): the SAE error
    term's share per token. contributions.sum(-1) + error == result.P."""
    tokens: list[str]
    features: Tensor
    contributions: Tensor
    error: Tensor
    result: IntegratedJacobian

    def units(self) -> tuple[Tensor, list[tuple[int, int]]]:
        """(E, U_total) contributions of every (token, latent) and (token, error) unit, and their labels
        (token index, latent id or -1 for the error term): for pairs, A = U_a^T U_b * scale."""
        columns, labels = [], []
        for s in range(self.features.shape[0]):
            for u in range(self.features.shape[1]):
                if self.features[s, u] >= 0:
                    columns.append(self.contributions[:, s, u])
                    labels.append((s, int(self.features[s, u])))
            columns.append(self.error[:, s])
            labels.append((s, -1))
        return torch.stack(columns, 1), labels


def check_sae(sae, width: int, device: torch.device, where: str) -> None:
    if not isinstance(sae, TopKSAE):
        raise TypeError(f"{where}: sae must be a pyinterp.nn.TopKSAE or BatchTopKSAE (TopKSAE.load(folder) "
                        f"reads one saved by pyinterp or sparsify), got {type(sae).__name__}")
    if sae.d_model != width:
        raise ValueError(f"{where}: the SAE's d_model {sae.d_model} differs from the layer's width {width}")
    if sae.W_dec.device != device:
        raise ValueError(f"{where}: the SAE is on {sae.W_dec.device} but the layer states are on {device}; "
                         "move one of them (sae.to(device))")


@torch.no_grad()
def codes_and_reconstruction(sae: TopKSAE, h: Tensor) -> tuple[Tensor, Tensor]:
    """(z, h_hat): the dense latent code (..., n_latents) of h (..., d_model) and its decoding, by the
    SAE's own ops in its inference form (BatchTopK: its threshold), at the SAE's dtype."""
    with eval_mode(sae):
        values, indices = sae.encode(h)
        reconstruction = sae.decode(values, indices)
    # Summed, not assigned: a JumpReLU SAE's padding slots repeat index 0 with value 0.
    codes = values.new_zeros(*values.shape[:-1], sae.n_latents).scatter_add_(-1, indices.long(), values)
    return codes, reconstruction


def sae_feature_attribution(attribution: TextAttribution, sae: TopKSAE) -> SAEAttribution:
    """Split one text's integrated Jacobian (computed with return_jbar=True) over the SAE's latents."""
    where = "sae_feature_attribution"
    result = attribution.result
    if result.jbar is None:
        raise ValueError(f"{where}: the attribution needs Jbar (return_jbar=True)")
    check_sae(sae, attribution.x.shape[-1], attribution.x.device, where)
    acc = result.jbar.dtype
    W_dec = sae.W_dec.detach()
    x, r = attribution.x.to(W_dec.dtype), attribution.reference.to(W_dec.dtype)
    z_x, x_hat = codes_and_reconstruction(sae, x)
    z_r, r_hat = codes_and_reconstruction(sae, r)
    delta_z = (z_x - z_r).to(acc)
    delta_err = ((x - x_hat) - (r - r_hat)).to(acc)
    active = (z_x != 0) | (z_r != 0)                                  # (S, M)
    slots = max(int(active.sum(1).max()), 1)
    # active latent ids first in each row, then -1
    order = active.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :slots]
    used = active.gather(1, order)
    features = torch.where(used, order, torch.full_like(order, -1))
    safe = features.clamp(min=0)
    directions = W_dec.to(acc)[safe]                                  # (S, U, D)
    contributions = torch.einsum("esd,sud->esu", result.jbar, directions) * \
        (delta_z.gather(1, safe) * used).unsqueeze(0)
    error = torch.einsum("esd,sd->es", result.jbar, delta_err)
    return SAEAttribution(attribution.tokens, features, contributions, error, result)


def sae_attribution(model, texts: Sequence[str], sae: TopKSAE, *, layer: Optional[int] = None,
                    n_steps: int = 10, method: str = "gauss_legendre", reference=None,
                    chunk_size: Optional[int] = None,
                    tokenizer=None, backend: str = "auto") -> list[SAEAttribution]:
    """Attribute each text's sentence embedding to the SAE latents (and error term) at the input of
    layer `layer` (default: the middle layer). sae: a pyinterp.nn.TopKSAE or BatchTopKSAE trained on
    that layer's states."""
    where = "sae_attribution"
    attributions = attribute_texts(model, texts, layer=layer, n_steps=n_steps, method=method,
                                   reference=reference, mode="vjp", chunk_size=chunk_size, return_jbar=True,
                                   tokenizer=tokenizer, backend=backend, where=where,
                                   check_states=lambda states: check_sae(sae, states.shape[-1], states.device,
                                                                         where))
    return [sae_feature_attribution(a, sae) for a in attributions]
