"""JumpReLU sparse autoencoder (Rajamanoharan et al. 2024) on pyinterp.threshold_encode
(docs/sae_family.md, "JumpReLU"): a learned threshold per latent, trained through the
straight-through estimator with a rectangle kernel, and an L0 sparsity penalty."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from pyinterp import _validation
from pyinterp._dtypes import accumulator_dtype
from pyinterp.nn.sae import TopKSAE, read_sae_folder, total_variance
from pyinterp.ops.threshold_encode import threshold_encode


class JumpReLUOutput(NamedTuple):
    """x_hat (N, D); values / indices (N, max_active) as threshold_encode lists them; fvu as in
    TopKSAE; l0 = the mean active latents per token (differentiable in the threshold);
    aux_loss = l0_coefficient * l0, the sparsity penalty (what the trainer logs as aux_loss);
    loss = fvu + aux_loss; truncated_rows: tokens over the max_active cap."""
    x_hat: Tensor
    values: Tensor
    indices: Tensor
    fvu: Tensor
    l0: Tensor
    aux_loss: Tensor
    loss: Tensor
    truncated_rows: Tensor


class JumpReLUSAE(TopKSAE):
    """f = z * 1[z > threshold], z = (x - b_dec) @ W_enc^T + b_enc; x_hat = f @ W_dec + b_dec.
    At most max_active latents per token are kept (truncated_rows counts the tokens that hit the
    cap). Training (module.training) uses the STE of width `bandwidth`; eval mode is the fused
    threshold encode. Initialised as TopKSAE, with every threshold = init_threshold."""

    architecture = "jumprelu"
    load_keys = ("aux_alpha", "seed", "bandwidth", "l0_coefficient")  # no AuxK; its own STE settings

    def __init__(self, d_model: int, n_latents: int, max_active: int, *, bandwidth: float = 1e-3,
                 l0_coefficient: float = 1e-3, init_threshold: float = 1e-3, **kwargs):
        super().__init__(d_model, n_latents, max_active, k_aux=0, **kwargs)
        name = type(self).__name__
        self.bandwidth = _validation.check_number(name, "bandwidth", bandwidth, low=0.0, low_open=True,
                                                  meaning="the STE's kernel width")
        self.l0_coefficient = _validation.check_number(name, "l0_coefficient", l0_coefficient, low=0.0)
        _validation.check_number(name, "init_threshold", init_threshold, low=0.0)
        self.threshold = nn.Parameter(torch.full_like(self.b_enc, init_threshold))

    @property
    def max_active(self) -> int:
        return self.k

    def config(self) -> dict:
        return {**super().config(), "bandwidth": self.bandwidth, "l0_coefficient": self.l0_coefficient}

    def _encode(self, flat: Tensor):
        W_enc, b_enc, b_dec, threshold = self._cast(self.W_enc, self.b_enc, self.b_dec, self.threshold)
        if not self.training:  # inference: no straight-through band, no threshold gradient
            return threshold_encode(flat, W_enc, b_enc, threshold.detach(), self.k, b_dec=b_dec,
                                    backend=self.backend)
        return threshold_encode(flat, W_enc, b_enc, threshold, self.k, b_dec=b_dec, bandwidth=self.bandwidth,
                                backend=self.backend)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check_input(x)
        (flat,) = self._cast(x.reshape(-1, self.d_model))
        out = self._encode(flat)
        return out.values.reshape(*x.shape[:-1], -1), out.indices.reshape(*x.shape[:-1], -1)

    def forward(self, x: Tensor, dead_mask: Tensor | None = None, *,
                variance_floor: float | None = None) -> JumpReLUOutput:
        """dead_mask is accepted for the trainer's signature and unused (JumpReLU has no AuxK)."""
        self._check_input(x)
        (flat,) = self._cast(x.reshape(-1, self.d_model))
        out = self._encode(flat)
        (b_dec,) = self._cast(self.b_dec)
        x_hat = self._decode_sum(out.values, out.indices) + b_dec
        target = flat.to(accumulator_dtype(flat.dtype))
        fvu = (target - x_hat.to(target.dtype)).pow(2).sum() / total_variance(target, variance_floor)
        l0 = out.l0.to(target.dtype).mean() if flat.shape[0] else fvu.new_zeros(())
        penalty = self.l0_coefficient * l0
        return JumpReLUOutput(x_hat.reshape(x.shape), out.values, out.indices, fvu, l0, penalty, fvu + penalty,
                              out.truncated_rows)

    def export_tensors(self) -> dict[str, Tensor]:
        return {**super().export_tensors(), "threshold": self.threshold.detach()}

    def import_tensors(self, tensors: dict[str, Tensor]) -> None:
        super().import_tensors(tensors)
        with torch.no_grad():
            self.threshold.copy_(tensors["threshold"])

    def sparsify_config(self) -> dict:
        return {**super().sparsify_config(), "activation": "jumprelu"}

    @classmethod
    def load(cls, path: str | Path, *, backend: str = "auto",
             device: torch.device | str | None = None) -> "JumpReLUSAE":
        """The JumpReLU SAE that save() wrote into the folder `path` (cfg.json with
        activation='jumprelu', sae.safetensors with a per-latent `threshold`), with TopKSAE.load's
        checks plus the threshold's presence and shape."""
        folder = read_sae_folder(path)
        activation, architecture = folder.config.get("activation"), folder.own.get("architecture", cls.architecture)
        if activation != "jumprelu" or architecture != cls.architecture:
            raise ValueError(f"{folder.config_path}: not a JumpReLU SAE (activation={activation!r}, pyinterp "
                             f"architecture={architecture!r}); load it with TopKSAE.load")
        if folder.config.get("transcode") or folder.config.get("skip_connection"):
            raise ValueError(f"{folder.config_path}: a JumpReLU transcoder or skip connection does not load "
                             f"(transcode={folder.config.get('transcode')}, "
                             f"skip_connection={folder.config.get('skip_connection')})")
        threshold = folder.tensors.get("threshold")
        n_latents = folder.shape[0]
        if threshold is None:
            raise ValueError(f"{folder.weights_path}: missing tensor 'threshold' (one per latent)")
        if tuple(threshold.shape) != (n_latents,):
            raise ValueError(f"{folder.weights_path}: threshold has shape {tuple(threshold.shape)}, expected "
                             f"({n_latents},) (from encoder.weight)")
        kwargs = {key: folder.own[key] for key in cls.load_keys if key in folder.own}
        return folder.build(cls, backend, device, kwargs)
