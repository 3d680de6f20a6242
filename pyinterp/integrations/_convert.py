"""Host SAEs to pyinterp.nn modules and back: the checks every host's converter shares (why each
conversion is exact or refused: docs/sae_family.md, "Host SAEs as pyinterp modules")."""
from __future__ import annotations

import torch
from torch import Tensor

from pyinterp.nn.jumprelu import JumpReLUSAE
from pyinterp.nn.sae import BatchTopKSAE, TopKSAE


def _threshold_shape(module: type[TopKSAE], n_latents: int) -> tuple[int, ...] | None:
    """The threshold a module holds: one per latent (JumpReLU), one scalar (BatchTopK), none (TopK)."""
    if issubclass(module, JumpReLUSAE):
        return (n_latents,)
    if issubclass(module, BatchTopKSAE):
        return ()
    return None


def build_pyinterp_sae(where: str, module: type[TopKSAE], W_enc: Tensor, b_enc: Tensor, W_dec: Tensor,
                       b_dec: Tensor, k: int, *, threshold: Tensor | None = None, backend: str = "auto",
                       **kwargs) -> TopKSAE:
    """A pyinterp SAE holding these tensors: W_enc, W_dec (M, D), row i = latent i; b_enc (M); b_dec (D);
    threshold (M) for a JumpReLUSAE, () for a BatchTopKSAE, None for a TopKSAE; k is the module's
    third argument (max_active for JumpReLUSAE). Raises ValueError naming the tensor whose shape
    disagrees (widths, d_model), that is non-finite, or a threshold missing or given where the
    module has none."""
    n_latents, d_model = W_enc.shape
    expected = {"W_enc": (n_latents, d_model), "W_dec": (n_latents, d_model), "b_enc": (n_latents,),
                "b_dec": (d_model,)}
    threshold_shape = _threshold_shape(module, n_latents)
    if (threshold is None) != (threshold_shape is None):
        raise ValueError(f"{where}: a {module.__name__} " + ("needs a threshold; the source has none" if threshold is None
                                                             else "has no threshold, but the source has one"))
    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if threshold is not None:
        tensors["threshold"], expected["threshold"] = threshold, threshold_shape
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"{where}: {name} has shape {tuple(tensor.shape)}, expected {expected[name]} "
                             f"(d_model={d_model}, n_latents={n_latents})")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{where}: {name} holds non-finite values; not converting")
    sae = module(d_model, n_latents, int(k), backend=backend, device=W_enc.device, dtype=W_enc.dtype, **kwargs)
    exported = {"encoder.weight": W_enc.detach(), "encoder.bias": b_enc.detach(), "W_dec": W_dec.detach(),
                "b_dec": b_dec.detach()}
    if threshold is not None:
        exported["threshold"] = threshold.detach()
    sae.import_tensors(exported)
    return sae


def check_nonnegative_threshold(where: str, threshold: Tensor, host_rule: str) -> None:
    """pyinterp's JumpReLU is z * 1[z > theta]; a host's relu(z) * 1[z > theta] is the same only
    where theta >= 0 (a negative theta would let negative z through here)."""
    negative = int((threshold < 0).sum())
    if negative:
        raise ValueError(f"{where}: {negative} latents have a negative threshold; the host computes {host_rule}, "
                         "pyinterp z * 1[z > threshold], which differ there (negative activations)")


def integer_k(where: str, k) -> int:
    if float(k) != int(float(k)) or int(float(k)) < 1:
        raise ValueError(f"{where}: k={k} is not a positive integer; pyinterp's BatchTopKSAE keeps k * N "
                         "activations per batch for an integer k only")
    return int(float(k))
