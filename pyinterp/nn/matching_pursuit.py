"""Matching-pursuit SAE (MP-SAE, as SAELens' MatchingPursuitSAE) on pyinterp.matching_pursuit_encode
(docs/sae_family.md, "Matching pursuit"): a tied SAE whose encoder is k greedy steps on the decoder.

Saved in the sparsify-style folder of TopKSAE (sae.safetensors with W_dec and b_dec, cfg.json with
activation "matching_pursuit"); MatchingPursuitSAE.load also reads SAELens' folders of this
architecture (cfg.json architecture "matching_pursuit", sae_weights.safetensors)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from pyinterp import _validation
from pyinterp.nn.sae import CONFIG_FILE, WEIGHTS_FILE, SAEOutput, TopKSAE
from pyinterp.ops.matching_pursuit_encode import gram_matrix, matching_pursuit_encode

SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
# The largest M whose Gram matrix (M^2 fp32 words, 1 GiB at 16384) the module builds by default.
GRAM_MAX_LATENTS = 16384


class MatchingPursuitSAE(TopKSAE):
    """x_hat = sum_t c_t W_dec[s_t] + b_dec with (c, s) from k matching-pursuit steps on x - b_dec
    (the encoder is W_dec transposed). positive=True, residual_threshold and stop_on_duplicate_support
    are SAELens' rules (its defaults: True, 1e-2, True); here the defaults train (no early stop).
    Parameters W_dec (n_latents, d_model) with unit rows, b_dec. With use_gram (default: n_latents <=
    16384) the kernels update scores through W_dec W_dec^T, cached while W_dec is unchanged.
    The loss is the FVU (no auxiliary loss)."""

    architecture = "matching_pursuit"

    def __init__(self, d_model: int, n_latents: int, k: int, *, positive: bool = True,
                 residual_threshold: float = 0.0, stop_on_duplicate_support: bool = False,
                 use_gram: bool | None = None, k_aux: int | None = None, aux_alpha: float = 0.0,
                 backend: str = "auto", seed: int = 0, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32):
        nn.Module.__init__(self)
        name = type(self).__name__
        if k_aux:  # aux_alpha (the trainer passes its default) weighs a loss that does not exist here
            raise ValueError(f"{name}: k_aux must be 0 or None: a matching-pursuit SAE has no AuxK loss, got {k_aux}")
        _validation.check_int(name, "d_model", d_model, low=1)
        _validation.check_int(name, "n_latents", n_latents, low=1)
        _validation.check_int(name, "k", k, low=1, high=d_model, meaning="1 <= k <= d_model")
        self.residual_threshold = _validation.check_number(name, "residual_threshold", residual_threshold, low=0.0)
        self.d_model, self.n_latents, self.k, self.k_aux, self.aux_alpha = d_model, n_latents, k, 0, 0.0
        self.multi_topk = False  # TopKSAE.forward reads it; a sparsify loss option, not MP's
        self.positive, self.stop_on_duplicate_support = bool(positive), bool(stop_on_duplicate_support)
        self.use_gram = n_latents <= GRAM_MAX_LATENTS if use_gram is None else bool(use_gram)
        self.backend, self.seed = backend, seed
        generator = torch.Generator().manual_seed(seed)
        W_dec = torch.randn(n_latents, d_model, generator=generator)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec.to(device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_model, device=device, dtype=dtype))
        self._gram_key, self._gram = None, None

    @property
    def W_enc(self) -> Tensor:
        """The tied encoder: W_dec (the trainer reads its device and n_latents from it)."""
        return self.W_dec

    def config(self) -> dict:
        return {"architecture": self.architecture, "d_model": self.d_model, "n_latents": self.n_latents,
                "k": self.k, "positive": self.positive, "residual_threshold": self.residual_threshold,
                "stop_on_duplicate_support": self.stop_on_duplicate_support, "seed": self.seed}

    def _gram_for(self, W_dec: Tensor) -> Tensor | None:
        """W_dec W_dec^T for the kernels, rebuilt only when W_dec changed (version counter)."""
        if not self.use_gram:
            return None
        key = (self.W_dec.data_ptr(), self.W_dec._version, W_dec.dtype)
        if key != self._gram_key:
            self._gram_key, self._gram = key, gram_matrix(W_dec)
        return self._gram

    def _select(self, x: Tensor, dead_mask: Tensor | None):
        W_dec, b_dec = self._cast(self.W_dec, self.b_dec)
        values, indices = matching_pursuit_encode(
            x, W_dec, self.k, b_dec=b_dec, positive=self.positive, residual_threshold=self.residual_threshold,
            stop_on_duplicate_support=self.stop_on_duplicate_support, gram=self._gram_for(W_dec),
            backend=self.backend)
        return values, indices, None, None, None

    def forward(self, x: Tensor, dead_mask: Tensor | None = None, *,
                variance_floor: float | None = None) -> SAEOutput:
        """As TopKSAE.forward; dead_mask is accepted for the trainer's signature and unused (no AuxK)."""
        return super().forward(x, None, variance_floor=variance_floor)

    def export_tensors(self) -> dict[str, Tensor]:
        return {"W_dec": self.W_dec.detach(), "b_dec": self.b_dec.detach()}

    def import_tensors(self, tensors: dict[str, Tensor]) -> None:
        with torch.no_grad():
            self.W_dec.copy_(tensors["W_dec"])
            self.b_dec.copy_(tensors["b_dec"])

    def sparsify_config(self) -> dict:
        return {"d_in": self.d_model, "num_latents": self.n_latents, "k": self.k,
                "activation": "matching_pursuit", "pyinterp": self.config()}

    @classmethod
    def load(cls, path: str | Path, *, backend: str = "auto",
             device: torch.device | str | None = None) -> "MatchingPursuitSAE":
        """An MP-SAE saved by pyinterp (sae.safetensors + cfg.json) or by SAELens (sae_weights.safetensors
        + cfg.json with architecture "matching_pursuit"; its apply_b_dec_to_input must be true and no
        activation normalisation, which pyinterp does not apply)."""
        path = Path(path)
        config_path = path / CONFIG_FILE
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{config_path}: not a readable JSON SAE config ({exc})") from exc
        if not isinstance(config, dict):
            raise ValueError(f"{config_path}: expected a JSON object, got {str(config)[:80]}")
        if config.get("activation") == "matching_pursuit":
            own = config.get("pyinterp", {})
            weights_path = path / WEIGHTS_FILE
            options = {key: own[key] for key in ("positive", "residual_threshold", "stop_on_duplicate_support",
                                                 "seed") if key in own}
        elif config.get("architecture") == "matching_pursuit":
            if not config.get("apply_b_dec_to_input", True) or config.get("normalize_activations", "none") != "none":
                raise ValueError(f"{config_path}: only SAELens MP-SAEs with apply_b_dec_to_input=true and "
                                 "normalize_activations='none' load")
            weights_path = path / SAELENS_WEIGHTS_FILE
            options = {"positive": True, "residual_threshold": float(config.get("residual_threshold", 1e-2)),
                       "stop_on_duplicate_support": bool(config.get("stop_on_duplicate_support", True))}
            max_iterations = config.get("max_iterations")
            config = {"k": max_iterations if max_iterations is not None else config.get("d_in")}
        else:
            raise ValueError(f"{config_path}: not a matching-pursuit SAE (activation or architecture "
                             "'matching_pursuit')")
        try:
            with safe_open(str(weights_path), framework="pt") as handle:
                tensors = {name: handle.get_tensor(name) for name in ("W_dec", "b_dec")}
        except Exception as exc:  # safetensors raises its own error types (a missing name too)
            raise ValueError(f"{weights_path}: not a readable safetensors file with W_dec and b_dec ({exc})") from exc
        if tensors["W_dec"].dim() != 2 or tuple(tensors["b_dec"].shape) != (tensors["W_dec"].shape[1],):
            raise ValueError(f"{weights_path}: W_dec must be (n_latents, d_model) and b_dec (d_model,), got "
                             f"{tuple(tensors['W_dec'].shape)} and {tuple(tensors['b_dec'].shape)}")
        n_latents, d_model = tensors["W_dec"].shape
        try:
            sae = cls(d_model, n_latents, config.get("k"), backend=backend, device=device,
                      dtype=tensors["W_dec"].dtype, **options)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{config_path}: {exc}") from exc
        sae.import_tensors(tensors)
        return sae
