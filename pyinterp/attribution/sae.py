"""Attribution to sparse-autoencoder features at a layer (the sparse-feature-circuits use case:
Marks et al., "Sparse Feature Circuits", 2024, with integrated gradients over SAE latents).

At layer l, h = decode(z) + err with z = encode(h) the SAE's latent code and err its error term. The
path interpolates z and err from the reference's to the input's. decode is affine, so that path maps
onto the straight path r + a * Delta in h, and by the chain rule
    contribution of latent m at token s = (Jbar[:, s, :] . W_dec[m]) * (z_x[s, m] - z_r[s, m])
    contribution of the error at token s = Jbar[:, s, :] . (err_x[s] - err_r[s])
with Jbar the integrated Jacobian over h (one reverse-mode pass accumulated by ij_accumulate). They sum
to P[:, s] exactly. Only latents active at the input or the reference can contribute.

The SAE is given as plain tensors with a plain-torch top-k encoder (no dependency on pyinterp's SAE ops)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from pyinterp._validation import check_int, check_shape, check_tensor
from pyinterp.attribution.encoders import TextAttribution, attribute_texts
from pyinterp.attribution.integrated import IntegratedJacobian


@dataclass
class SparseAutoencoder:
    """Top-k SAE: z = TopK(ReLU((h - b_dec) W_enc^T + b_enc)), h_hat = z W_dec + b_dec.
    W_enc, W_dec: (M, D); b_enc: (M,); b_dec: (D,)."""
    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    k: int

    def __post_init__(self):
        where = "SparseAutoencoder"
        check_tensor(where, "W_enc", self.W_enc, ndim=2)
        latents, width = self.W_enc.shape
        check_shape(where, "W_dec", self.W_dec, (latents, width))
        check_shape(where, "b_enc", self.b_enc, (latents,))
        check_shape(where, "b_dec", self.b_dec, (width,))
        check_int(where, "k", self.k, low=1, high=latents, meaning="active latents per token")

    def encode(self, h: Tensor) -> Tensor:
        """Dense codes (..., M) with at most k non-zeros per row."""
        pre = (h - self.b_dec) @ self.W_enc.T + self.b_enc
        values, indices = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, indices, values.relu())

    def decode(self, z: Tensor) -> Tensor:
        return z @ self.W_dec + self.b_dec


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


def sae_feature_attribution(attribution: TextAttribution, sae: SparseAutoencoder) -> SAEAttribution:
    """Split one text's integrated Jacobian (computed with return_jbar=True) over the SAE's latents."""
    result = attribution.result
    if result.jbar is None:
        raise ValueError("sae_feature_attribution: the attribution needs Jbar (return_jbar=True)")
    if sae.W_dec.shape[1] != attribution.x.shape[-1]:
        raise ValueError(f"sae_feature_attribution: the SAE's width {sae.W_dec.shape[1]} differs from the "
                         f"layer's width {attribution.x.shape[-1]}")
    acc = result.jbar.dtype
    x, r = attribution.x.to(sae.W_dec.dtype), attribution.reference.to(sae.W_dec.dtype)
    z_x, z_r = sae.encode(x), sae.encode(r)
    delta_z = (z_x - z_r).to(acc)
    delta_err = ((x - sae.decode(z_x)) - (r - sae.decode(z_r))).to(acc)
    active = (z_x != 0) | (z_r != 0)                                  # (S, M)
    slots = max(int(active.sum(1).max()), 1)
    # active latent ids first in each row, then -1
    order = active.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :slots]
    used = active.gather(1, order)
    features = torch.where(used, order, torch.full_like(order, -1))
    safe = features.clamp(min=0)
    directions = sae.W_dec.to(acc)[safe]                              # (S, U, D)
    contributions = torch.einsum("esd,sud->esu", result.jbar, directions) * \
        (delta_z.gather(1, safe) * used).unsqueeze(0)
    error = torch.einsum("esd,sd->es", result.jbar, delta_err)
    return SAEAttribution(attribution.tokens, features, contributions, error, result)


def sae_attribution(model, texts: Sequence[str], sae: SparseAutoencoder, *, layer: Optional[int] = None,
                    n_steps: int = 10, method: str = "gauss_legendre", reference=None,
                    chunk_size: Optional[int] = None,
                    tokenizer=None, backend: str = "auto") -> list[SAEAttribution]:
    """Attribute each text's sentence embedding to the SAE latents (and error term) at layer `layer`."""
    attributions = attribute_texts(model, texts, layer=layer, n_steps=n_steps, method=method,
                                   reference=reference, mode="vjp", chunk_size=chunk_size, return_jbar=True,
                                   tokenizer=tokenizer, backend=backend, where="sae_attribution")
    return [sae_feature_attribution(a, sae) for a in attributions]
