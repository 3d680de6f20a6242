"""Top-k transcoder ("Transcoders Find Interpretable LLM Feature Circuits", Dunefsky, Chlenski and
Nanda 2024): sparse latents of one hookpoint's input x that reconstruct another hookpoint's output y,

    z = x @ W_enc^T + b_enc,   a = top-k ReLU of z,   y_hat = a @ W_dec + b_dec (+ x @ W_skip^T)

on the same fused ops as TopKSAE (no pre-encoder bias: x and y live in different spaces), with the
optional linear skip connection of sparsify's `skip_connection` (zero at init). The losses are
TopKSAE's with y as the target: FVU of y, and AuxK on y's residual (docs/sae.md, "Losses").

A Trainer feeds it rows of width d_in + d_out, x then y of the same token (a paired stream,
pyinterp/sae/stream.py), so `d_model` here is that row width. Saved in sparsify's transcoder layout:
cfg.json with transcode = true, sae.safetensors with encoder.weight (M, d_in), W_dec (M, d_out),
b_dec (d_out) and W_skip (d_out, d_in) when there is a skip connection."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from pyinterp import _validation
from pyinterp._dtypes import accumulator_dtype
from pyinterp.nn.sae import CONFIG_FILE, EXPORT_NAMES, WEIGHTS_FILE, SAEOutput, TopKSAE, total_variance
from pyinterp.ops.topk_encode import topk_encode


class TopKTranscoder(TopKSAE):
    architecture = "topk_transcoder"

    def __init__(self, d_in: int, d_out: int, n_latents: int, k: int, *, skip_connection: bool = False,
                 **kwargs):
        name = type(self).__name__
        _validation.check_int(name, "d_in", d_in, low=1)
        _validation.check_int(name, "d_out", d_out, low=1)
        kwargs.setdefault("k_aux", min(d_out // 2, n_latents))
        super().__init__(d_out, n_latents, k, **kwargs)
        self.d_in, self.d_out, self.skip_connection = d_in, d_out, bool(skip_connection)
        self.d_model = d_in + d_out  # the paired row the trainer feeds: x, then y
        factory = {"device": self.W_dec.device, "dtype": self.W_dec.dtype}
        generator = torch.Generator().manual_seed(self.seed + 1)
        W_enc = torch.randn(n_latents, d_in, generator=generator)
        self.W_enc = nn.Parameter((W_enc / W_enc.norm(dim=1, keepdim=True)).to(**factory))
        self.W_skip = nn.Parameter(torch.zeros(d_out, d_in, **factory)) if self.skip_connection else None

    def config(self) -> dict:
        return dict(super().config(), d_model=self.d_out, d_in=self.d_in, d_out=self.d_out,
                    skip_connection=self.skip_connection)

    @torch.no_grad()
    def init_b_dec(self, x: Tensor) -> None:
        """b_dec = the mean target y of the first batch of paired rows."""
        self._check_input(x)
        self.b_dec.copy_(x.reshape(-1, self.d_model)[:, self.d_in:].double().mean(0))

    def _split(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        self._check_input(rows)
        flat = rows.reshape(-1, self.d_model)
        return flat[:, :self.d_in], flat[:, self.d_in:]

    def _select(self, x: Tensor, dead_mask: Tensor | None):
        W_enc, b_enc = self._cast(self.W_enc, self.b_enc)
        if dead_mask is None or self.k_aux == 0:
            values, indices = topk_encode(x, W_enc, b_enc, self.k, backend=self.backend)
            return values, indices, None, None, None
        values, indices, aux_values, aux_indices = topk_encode(
            x, W_enc, b_enc, self.k, dead_mask=dead_mask, k_aux=self.k_aux, backend=self.backend)
        return values, indices, aux_values, aux_indices, dead_mask.sum()

    def _skip(self, x: Tensor) -> Tensor | int:
        if self.W_skip is None:
            return 0
        (W_skip,) = self._cast(self.W_skip)
        return x @ W_skip.T

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(values, indices) (..., k) of inputs x (..., d_in)."""
        _validation.check_tensor(type(self).__name__, "x", x, dtypes=_validation.FLOAT_DTYPES)
        if x.dim() < 1 or x.shape[-1] != self.d_in:
            raise ValueError(f"{type(self).__name__}: x must have shape (..., {self.d_in}) (d_in), "
                             f"got {tuple(x.shape)}")
        (flat,) = self._cast(x.reshape(-1, self.d_in))
        values, indices = self._select(flat, None)[:2]
        return values.reshape(*x.shape[:-1], -1), indices.reshape(*x.shape[:-1], -1)

    def transcode(self, x: Tensor) -> Tensor:
        """y_hat (..., d_out) for inputs x (..., d_in), the skip connection included."""
        values, indices = self.encode(x)
        (flat,) = self._cast(x.reshape(-1, self.d_in))
        y_hat = self.decode(values.reshape(flat.shape[0], -1), indices.reshape(flat.shape[0], -1))
        return (y_hat + self._skip(flat)).reshape(*x.shape[:-1], self.d_out)

    def forward(self, rows: Tensor, dead_mask: Tensor | None = None, *,
                variance_floor: float | None = None) -> SAEOutput:
        """rows (..., d_in + d_out): each token's input x, then its target y."""
        x, y = self._split(rows)
        x, y = self._cast(x, y)
        values, indices, aux_values, aux_indices, num_dead = self._select(x, dead_mask)
        (b_dec,) = self._cast(self.b_dec)
        y_hat = self._decode_sum(values, indices) + b_dec + self._skip(x)
        target = y.to(accumulator_dtype(y.dtype))
        fvu = (target - y_hat.to(target.dtype)).pow(2).sum() / total_variance(target, variance_floor)
        if aux_values is None:
            aux_loss = fvu.new_zeros(())
        else:
            aux_loss = self._aux_loss(target, y_hat, aux_values, aux_indices, num_dead, variance_floor)
        return SAEOutput(y_hat.reshape(*rows.shape[:-1], self.d_out), values, indices, fvu, aux_loss,
                         fvu + self.aux_alpha * aux_loss)

    def export_tensors(self) -> dict[str, Tensor]:
        tensors = super().export_tensors()
        if self.W_skip is not None:
            tensors["W_skip"] = self.W_skip.detach()
        return tensors

    def import_tensors(self, tensors: dict[str, Tensor]) -> None:
        super().import_tensors(tensors)
        if self.W_skip is not None:
            with torch.no_grad():
                self.W_skip.copy_(tensors["W_skip"])

    def sparsify_config(self) -> dict:
        return dict(super().sparsify_config(), d_in=self.d_in, transcode=True,
                    skip_connection=self.skip_connection,
                    expansion_factor=max(self.n_latents // self.d_in, 1))

    @classmethod
    def load(cls, path: str | Path, *, backend: str = "auto",
             device: torch.device | str | None = None) -> "TopKTranscoder":
        """A transcoder saved by pyinterp or sparsify (cfg.json with transcode = true)."""
        import json

        path = Path(path)
        config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
        if not config_path.is_file() or not weights_path.is_file():
            raise FileNotFoundError(f"no transcoder at {path}: expected {CONFIG_FILE} and {WEIGHTS_FILE}")
        try:
            config = json.loads(config_path.read_text())
            with safe_open(str(weights_path), framework="pt") as handle:
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as exc:
            raise ValueError(f"{path}: not a readable transcoder ({exc})") from exc
        if not isinstance(config, dict) or not config.get("transcode"):
            raise ValueError(f"{config_path}: not a transcoder (transcode is not true); load it with TopKSAE.load")
        needed = set(EXPORT_NAMES.values()) | ({"W_skip"} if config.get("skip_connection") else set())
        if needed - tensors.keys():
            raise ValueError(f"{weights_path}: missing tensors {sorted(needed - tensors.keys())}")
        n_latents, d_in = tensors["encoder.weight"].shape
        d_out = tensors["W_dec"].shape[1]
        own = config.get("pyinterp", {}) if isinstance(config.get("pyinterp"), dict) else {}
        kwargs = {key: own[key] for key in ("k_aux", "aux_alpha", "seed") if key in own}
        module = cls(d_in, d_out, n_latents, config["k"], skip_connection=bool(config.get("skip_connection")),
                     backend=backend, device=device, dtype=tensors["encoder.weight"].dtype, **kwargs)
        module.import_tensors(tensors)
        return module
