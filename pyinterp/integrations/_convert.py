"""Host SAEs to pyinterp.nn modules and back: the shape checks every host's converter shares."""
from __future__ import annotations

import torch
from torch import Tensor

from pyinterp.nn.sae import TopKSAE


def build_pyinterp_sae(where: str, module: type[TopKSAE], W_enc: Tensor, b_enc: Tensor, W_dec: Tensor,
                       b_dec: Tensor, k: int, *, backend: str = "auto", **kwargs) -> TopKSAE:
    """A pyinterp SAE holding these tensors: W_enc, W_dec (M, D), row i = latent i; b_enc (M); b_dec (D).
    Raises ValueError naming the tensor whose shape disagrees (widths, d_model) or that is non-finite."""
    n_latents, d_model = W_enc.shape
    expected = {"W_enc": (n_latents, d_model), "W_dec": (n_latents, d_model), "b_enc": (n_latents,),
                "b_dec": (d_model,)}
    for name, tensor in (("W_enc", W_enc), ("W_dec", W_dec), ("b_enc", b_enc), ("b_dec", b_dec)):
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"{where}: {name} has shape {tuple(tensor.shape)}, expected {expected[name]} "
                             f"(d_model={d_model}, n_latents={n_latents})")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{where}: {name} holds non-finite values; not converting")
    sae = module(d_model, n_latents, int(k), backend=backend, device=W_enc.device, dtype=W_enc.dtype, **kwargs)
    sae.import_tensors({"encoder.weight": W_enc.detach(), "encoder.bias": b_enc.detach(),
                        "W_dec": W_dec.detach(), "b_dec": b_dec.detach()})
    return sae
