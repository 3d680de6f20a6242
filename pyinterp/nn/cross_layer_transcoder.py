"""Sparse cross-layer transcoder (CLT; Anthropic's "Circuit Tracing", 2025, with top-k latents): layer l
has an encoder reading layer l's input x_l, and its latents write into the outputs of every layer t >= l,

    a_l = top-k ReLU of (x_l @ W_enc_l^T + b_enc_l),    y_hat_t = sum over l <= t of a_l @ W_dec_{l->t} + b_dec_t

(docs/sae_family.md, "Cross-layer transcoders"). The forward and backward never form an N x M latent
matrix: each layer's latents come from the fused top-k encoder (`topk_encode`), and each target t is
ONE `sparse_decode` over the union of the active latents of layers 0..t.

Decoder layout (what makes that union a plain prefix, with no copy per step): target t's decoders are
one tensor W_dec[t] of shape ((t+1) * M, d_out) whose row l*M + i is latent (l, i)'s decoder into
layer t. Latents get the global index l*M + i; the encoder outputs of all layers are concatenated
layer by layer into (N, L*k), so the first (t+1)*k columns are exactly the latents that write into t,
with indices that are already rows of W_dec[t]. W_enc is (L*M, d_in) (layer l's encoder is rows
l*M .. (l+1)*M, split without a copy), b_enc (L*M), b_dec (L, d_out).

The trainer (pyinterp/sae/trainer.py) feeds rows of width L * (d_in + d_out): the L inputs x_0..x_{L-1},
then the L targets y_0..y_{L-1} of the same token (pyinterp/sae/stream.py, `train-sae --clt`). Losses:
FVU per target layer and AuxK per target layer (dead latents of layers <= t reconstructing target t's
residual, on the same kernels); `loss` is their sum over layers, `fvu` / `aux_loss` their means.

Saved as a folder with cfg.json and sae.safetensors holding W_enc, b_enc, W_dec.0 .. W_dec.{L-1}
(the layout above) and b_dec. circuit-tracer's CLT layout (W_enc_{l}.safetensors with W_enc_{l},
b_enc_{l}, b_dec_{l}; W_dec_{l}.safetensors with W_dec_{l} of shape (M, L - l, d)) is read by
load_circuit_tracer and written by save_circuit_tracer."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from torch import Tensor, nn

from pyinterp import _validation
from pyinterp._atomic import atomic_write_safetensors
from pyinterp._dtypes import accumulator_dtype
from pyinterp.nn.sae import CONFIG_FILE, WEIGHTS_FILE, total_variance, write_sae_folder
from pyinterp.ops.sparse_decode import sparse_decode
from pyinterp.ops.topk_encode import topk_encode


class CLTOutput(NamedTuple):
    """y_hat (..., L, d_out) the reconstructions of every target layer; values / indices (N, L*k)
    the active latents, layer by layer, with global indices l*M + i; fvu and aux_loss the means over
    target layers of fvu_per_layer / aux_per_layer (L,); loss = sum over layers of
    fvu_t + aux_alpha * aux_t. Losses in fp32 (float64 for a float64 CLT)."""
    y_hat: Tensor
    values: Tensor
    indices: Tensor
    fvu: Tensor
    aux_loss: Tensor
    loss: Tensor
    fvu_per_layer: Tensor
    aux_per_layer: Tensor


class CrossLayerTranscoder(nn.Module):
    """n_layers layers of latents_per_layer (M) latents each, k active per layer and token.
    backend: that of the fused ops ("auto", "cuda", "triton", "cpu", "torch"). Init: encoder rows and
    each latent's decoder (all its target layers together) random unit vectors, biases zero; call
    init_b_dec(first_batch) before training. AuxK's k_aux is per layer (default d_out / 2)."""

    architecture = "cross_layer_transcoder"

    def __init__(self, n_layers: int, d_in: int, d_out: int, latents_per_layer: int, k: int, *,
                 k_aux: int | None = None, aux_alpha: float = 1 / 32, backend: str = "auto", seed: int = 0,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        name = type(self).__name__
        for field, value in (("n_layers", n_layers), ("d_in", d_in), ("d_out", d_out),
                             ("latents_per_layer", latents_per_layer)):
            _validation.check_int(name, field, value, low=1)
        _validation.check_int(name, "k", k, low=1, high=latents_per_layer, meaning="1 <= k <= latents_per_layer")
        k_aux = min(d_out // 2, latents_per_layer) if k_aux is None else k_aux
        _validation.check_int(name, "k_aux", k_aux, low=0, high=latents_per_layer,
                              meaning="0 <= k_aux <= latents_per_layer; 0 turns AuxK off")
        if not (isinstance(aux_alpha, (int, float)) and math.isfinite(aux_alpha) and aux_alpha >= 0):
            raise ValueError(f"{name}: aux_alpha must be a finite number >= 0, got {aux_alpha!r}")
        self.n_layers, self.d_in, self.d_out = n_layers, d_in, d_out
        self.latents_per_layer, self.n_latents = latents_per_layer, n_layers * latents_per_layer
        self.k, self.k_aux, self.aux_alpha = k, k_aux, float(aux_alpha)
        self.backend, self.seed = backend, seed
        self.d_model = n_layers * (d_in + d_out)  # the row the trainer feeds: inputs, then targets
        # Drawn on the CPU from a seeded generator: the same init on every device.
        generator = torch.Generator().manual_seed(seed)
        W_enc = torch.randn(self.n_latents, d_in, generator=generator)
        W_dec = [torch.randn((t + 1) * latents_per_layer, d_out, generator=generator) for t in range(n_layers)]
        norms = self._decoder_norms(W_dec)
        factory = {"device": device, "dtype": dtype}
        self.W_enc = nn.Parameter((W_enc / W_enc.norm(dim=1, keepdim=True)).to(**factory))
        self.b_enc = nn.Parameter(torch.zeros(self.n_latents, **factory))
        self.W_dec = nn.ParameterList([nn.Parameter((w / norms[:w.shape[0], None]).to(**factory)) for w in W_dec])
        self.b_dec = nn.Parameter(torch.zeros(n_layers, d_out, **factory))

    # ---- config and initialisation ----
    def config(self) -> dict:
        return {"architecture": self.architecture, "n_layers": self.n_layers, "d_in": self.d_in,
                "d_out": self.d_out, "latents_per_layer": self.latents_per_layer, "k": self.k,
                "k_aux": self.k_aux, "aux_alpha": self.aux_alpha, "seed": self.seed}

    @torch.no_grad()
    def init_b_dec(self, rows: Tensor) -> None:
        """b_dec = each target layer's mean over the first batch of rows."""
        _, targets = self._split(rows)
        self.b_dec.copy_(targets.double().mean(0))

    def _decoder_norms(self, W_dec) -> Tensor:
        """(L*M,) the norm of each latent's whole decoder: its rows in every target layer."""
        squares = torch.zeros(self.n_latents, dtype=torch.float64, device=W_dec[0].device)
        for w in W_dec:
            squares[:w.shape[0]] += w.double().pow(2).sum(1)
        return squares.sqrt().to(W_dec[0].dtype)

    @torch.no_grad()
    def normalize_decoder(self, applied: Tensor | None = None) -> None:
        """Each latent's decoder (all its target layers together) back to unit norm, after each
        optimiser step; applied=False (a skipped step) leaves it bit for bit as it is."""
        norms = self._decoder_norms(list(self.W_dec))
        if applied is not None:
            norms = torch.where(applied, norms, 1.0)
        for w in self.W_dec:
            w.div_(norms[:w.shape[0], None])

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove from each latent's decoder gradient (all target layers together) its component
        along the (unit) decoder, so the step moves the direction rather than the norm."""
        if any(w.grad is None for w in self.W_dec):
            return
        parallel = torch.zeros(self.n_latents, dtype=self.W_dec[0].dtype, device=self.W_dec[0].device)
        for w in self.W_dec:
            parallel[:w.shape[0]] += (w.grad * w).sum(1)
        for w in self.W_dec:
            w.grad.sub_(parallel[:w.shape[0], None] * w)

    # ---- forward ----
    def _cast(self, *tensors: Tensor) -> list[Tensor]:
        """The compute dtype: the autocast dtype inside torch.autocast (custom ops are not cast by
        autocast itself), else the parameters'; the casts are differentiable."""
        device_type = self.W_enc.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else self.W_enc.dtype
        return [t.to(dtype) for t in tensors]

    def _split(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Rows (..., L*(d_in + d_out)) -> inputs (N, L, d_in), targets (N, L, d_out) (views)."""
        name = type(self).__name__
        _validation.check_tensor(name, "rows", rows, dtypes=_validation.FLOAT_DTYPES)
        if rows.dim() < 1 or rows.shape[-1] != self.d_model:
            raise ValueError(f"{name}: rows must have shape (..., {self.d_model}) (n_layers * (d_in + d_out): "
                             f"the {self.n_layers} inputs, then the {self.n_layers} targets), got {tuple(rows.shape)}")
        flat = rows.reshape(-1, self.d_model)
        split = self.n_layers * self.d_in
        return (flat[:, :split].reshape(-1, self.n_layers, self.d_in),
                flat[:, split:].reshape(-1, self.n_layers, self.d_out))

    def _check_inputs(self, x: Tensor) -> None:
        name = type(self).__name__
        _validation.check_tensor(name, "x", x, dtypes=_validation.FLOAT_DTYPES)
        if x.dim() < 2 or tuple(x.shape[-2:]) != (self.n_layers, self.d_in):
            raise ValueError(f"{name}: x must have shape (..., {self.n_layers}, {self.d_in}) (n_layers, d_in), "
                             f"got {tuple(x.shape)}")

    def _encode(self, x: Tensor, dead_mask: Tensor | None):
        """x (N, L, d_in) in the compute dtype -> values, indices (N, L*k) and, with AuxK, aux_values,
        aux_indices (N, L*k_aux); indices global (l*M + i), layer by layer."""
        W_enc, b_enc = self._cast(self.W_enc, self.b_enc)
        per_layer = self.latents_per_layer
        with_aux = dead_mask is not None and self.k_aux > 0
        masks = dead_mask.split(per_layer) if with_aux else [None] * self.n_layers
        # split, not indexing: its backward is one concatenation of the layers' gradients
        encoders, biases = W_enc.split(per_layer), b_enc.split(per_layer)
        parts: list[list[Tensor]] = [[], [], [], []]
        for layer in range(self.n_layers):
            outputs = topk_encode(x[:, layer], encoders[layer], biases[layer], self.k, dead_mask=masks[layer],
                                  k_aux=self.k_aux if with_aux else 0, backend=self.backend)
            offset = layer * per_layer
            for slot, tensor in enumerate(outputs):
                parts[slot].append(tensor + offset if slot % 2 else tensor)
        joined = [torch.cat(part, dim=1) if part else None for part in parts]
        return tuple(joined)

    def _decode(self, values: Tensor, indices: Tensor, per_layer_k: int, with_bias: bool) -> list[Tensor]:
        """Target t's reconstruction: ONE sparse decode of the first (t+1) * per_layer_k columns
        (the latents of layers 0..t) against W_dec[t]; indices come from _encode."""
        decoders = self._cast(*self.W_dec)
        biases = self._cast(self.b_dec)[0].unbind(0) if with_bias else [None] * self.n_layers
        return [sparse_decode(values[:, :(t + 1) * per_layer_k], indices[:, :(t + 1) * per_layer_k], decoders[t],
                              biases[t], backend=self.backend, check_indices=False)
                for t in range(self.n_layers)]

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(values, indices) (..., L*k) of inputs x (..., L, d_in): layer l's k latents in columns
        l*k .. (l+1)*k, with global indices l*M + i."""
        self._check_inputs(x)
        (flat,) = self._cast(x.reshape(-1, self.n_layers, self.d_in))
        values, indices = self._encode(flat, None)[:2]
        leading = x.shape[:-2]
        return values.reshape(*leading, -1), indices.reshape(*leading, -1)

    def decode(self, values: Tensor, indices: Tensor) -> Tensor:
        """y_hat (..., L, d_out) from (values, indices) (..., L*j) laid out as encode's: columns
        l*j .. (l+1)*j hold layer l's latents (global indices in [l*M, (l+1)*M), checked)."""
        name = type(self).__name__
        _validation.check_tensor(name, "values", values, dtypes=_validation.FLOAT_DTYPES)
        _validation.check_tensor(name, "indices", indices, dtypes=_validation.INDEX_DTYPES)
        if values.dim() < 1 or values.shape != indices.shape or values.shape[-1] % self.n_layers:
            raise ValueError(f"{name}: values and indices must have one shape (..., n_layers * j) = "
                             f"(..., {self.n_layers} * j), got {tuple(values.shape)} and {tuple(indices.shape)}")
        per_layer_k = values.shape[-1] // self.n_layers
        flat_values = values.reshape(-1, values.shape[-1])
        flat_indices = indices.reshape(-1, values.shape[-1]).long()
        owner = torch.arange(self.n_layers, device=indices.device).repeat_interleave(per_layer_k)
        if not bool((flat_indices.div(self.latents_per_layer, rounding_mode="floor") == owner).all()):
            raise ValueError(f"{name}: indices in columns l*{per_layer_k} .. (l+1)*{per_layer_k} must be layer l's "
                             f"latents, in [l*{self.latents_per_layer}, (l+1)*{self.latents_per_layer})")
        (flat_values,) = self._cast(flat_values)
        y_hat = torch.stack(self._decode(flat_values, flat_indices.int(), per_layer_k, True), 1)
        return y_hat.reshape(*values.shape[:-1], self.n_layers, self.d_out)

    def transcode(self, x: Tensor) -> Tensor:
        """y_hat (..., L, d_out) of inputs x (..., L, d_in)."""
        self._check_inputs(x)
        (flat,) = self._cast(x.reshape(-1, self.n_layers, self.d_in))
        values, indices = self._encode(flat, None)[:2]
        y_hat = torch.stack(self._decode(values, indices, self.k, True), 1)
        return y_hat.reshape(*x.shape[:-2], self.n_layers, self.d_out)

    def forward(self, rows: Tensor, dead_mask: Tensor | None = None, *,
                variance_floor: float | None = None) -> CLTOutput:
        """rows (..., L*(d_in + d_out)): each token's L inputs then its L targets. dead_mask (L*M,
        bool): the latents that count as dead, for AuxK (None: no AuxK). variance_floor: the least
        per-token variance of the FVU / AuxK denominators (None: the batch's own)."""
        x, y = self._split(rows)
        if dead_mask is not None:
            _validation.check_tensor(type(self).__name__, "dead_mask", dead_mask, dtypes=(torch.bool,))
            _validation.check_shape(type(self).__name__, "dead_mask", dead_mask, (self.n_latents,),
                                    "one flag per latent, n_layers * latents_per_layer")
        (x,) = self._cast(x)
        values, indices, aux_values, aux_indices = self._encode(x, dead_mask)
        y_hat = self._decode(values, indices, self.k, True)
        target = y.to(accumulator_dtype(x.dtype))  # losses in fp32 (float64 stays float64), y never rounded
        fvu = torch.stack([(target[:, t] - y_hat[t].to(target.dtype)).pow(2).sum()
                           / total_variance(target[:, t], variance_floor) for t in range(self.n_layers)])
        if aux_values is None:
            aux = fvu.new_zeros(self.n_layers)
        else:
            aux = self._aux_losses(target, y_hat, aux_values, aux_indices, dead_mask, variance_floor)
        y_hat = torch.stack(y_hat, 1).reshape(*rows.shape[:-1], self.n_layers, self.d_out)
        return CLTOutput(y_hat, values, indices, fvu.mean(), aux.mean(), (fvu + self.aux_alpha * aux).sum(),
                         fvu, aux)

    def _aux_losses(self, target: Tensor, y_hat: list[Tensor], aux_values: Tensor, aux_indices: Tensor,
                    dead_mask: Tensor, variance_floor: float | None) -> Tensor:
        """AuxK per target t: the dead latents of layers 0..t (each layer's top k_aux dead ones, one
        sparse decode, no b_dec) reconstruct the residual e_t = y_t - y_hat_t (stop-grad), over
        ||e_t - mean(e_t)||^2, scaled by min(#dead of layers <= t / ((t+1) k_aux), 1) on the device."""
        residual_hat = self._decode(aux_values, aux_indices, self.k_aux, False)
        dead_below = dead_mask.reshape(self.n_layers, -1).sum(1).cumsum(0).to(target.dtype)
        losses = []
        for t in range(self.n_layers):
            residual = (target[:, t] - y_hat[t].to(target.dtype)).detach()
            scale = (dead_below[t] / ((t + 1) * self.k_aux)).clamp(max=1.0)
            losses.append(scale * (residual_hat[t].to(target.dtype) - residual).pow(2).sum()
                          / total_variance(residual, variance_floor))
        return torch.stack(losses)

    # ---- saving and loading ----
    def gather_latent_rows(self, name: str, tensor: Tensor) -> Tensor:
        """The trainer's hook for latent-sharded modules: a CLT is always whole."""
        return tensor

    def local_latent_rows(self, name: str, tensor: Tensor) -> Tensor:
        return tensor

    def export_tensors(self) -> dict[str, Tensor]:
        return {name: parameter.detach() for name, parameter in self.named_parameters()}

    def import_tensors(self, tensors: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for name, parameter in self.named_parameters():
                parameter.copy_(tensors[name])

    def sparsify_config(self) -> dict:
        """cfg.json (the trainer writes it beside sae.safetensors). sparsify's loaders refuse it
        (transcode with cross_layer), pyinterp's TopKSAE / TopKTranscoder too."""
        return {"architecture": self.architecture, "cross_layer": True, "transcode": True,
                "activation": "topk", "n_layers": self.n_layers, "d_in": self.d_in, "d_out": self.d_out,
                "num_latents": self.latents_per_layer, "k": self.k, "pyinterp": self.config()}

    def save(self, path: str | Path) -> None:
        """cfg.json + sae.safetensors (the layout of the module's docstring) in the folder `path`."""
        write_sae_folder(path, self.export_tensors(), self.sparsify_config())

    @classmethod
    def load(cls, path: str | Path, *, backend: str = "auto",
             device: torch.device | str | None = None) -> "CrossLayerTranscoder":
        """A CLT saved by save() (or by a Trainer)."""
        path = Path(path)
        config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
        if not config_path.is_file() or not weights_path.is_file():
            hint = "; it holds circuit-tracer's layout: use load_circuit_tracer" if (
                path / "W_enc_0.safetensors").is_file() else ""
            raise FileNotFoundError(f"no cross-layer transcoder at {path}: expected {CONFIG_FILE} and "
                                    f"{WEIGHTS_FILE}{hint}")
        try:
            config = json.loads(config_path.read_text())
            with safe_open(str(weights_path), framework="pt") as handle:
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as exc:  # safetensors raises its own error types for a damaged file
            raise ValueError(f"{path}: not a readable cross-layer transcoder ({exc})") from exc
        own = config.get("pyinterp") if isinstance(config, dict) else None
        if not isinstance(own, dict) or own.get("architecture") != cls.architecture:
            raise ValueError(f"{config_path}: not a cross-layer transcoder (pyinterp.architecture is not "
                             f"{cls.architecture!r})")
        kwargs = {key: own[key] for key in ("n_layers", "d_in", "d_out", "latents_per_layer", "k", "k_aux",
                                            "aux_alpha", "seed") if key in own}
        module = cls(**kwargs, backend=backend, device=device, dtype=tensors["W_enc"].dtype)
        module._import_checked(tensors, weights_path)
        return module

    def _import_checked(self, tensors: dict[str, Tensor], where) -> None:
        for name, parameter in self.named_parameters():
            if name not in tensors:
                raise ValueError(f"{where}: missing tensor {name!r}")
            if tuple(tensors[name].shape) != tuple(parameter.shape):
                raise ValueError(f"{where}: {name} has shape {tuple(tensors[name].shape)}, expected "
                                 f"{tuple(parameter.shape)}")
        self.import_tensors({name: tensors[name] for name, _ in self.named_parameters()})

    # ---- circuit-tracer's layout ----
    def save_circuit_tracer(self, path: str | Path) -> None:
        """circuit-tracer's CLT folder: W_enc_{l}.safetensors (W_enc_{l} (M, d_in), b_enc_{l} (M),
        b_dec_{l} (d_out)) and W_dec_{l}.safetensors (W_dec_{l} (M, L - l, d_out): latent i of layer l
        into targets l, l+1, ...). Only top-k is pyinterp's: circuit-tracer runs it with its ReLU."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        per_layer = self.latents_per_layer
        for layer in range(self.n_layers):
            rows = slice(layer * per_layer, (layer + 1) * per_layer)
            atomic_write_safetensors(path / f"W_enc_{layer}.safetensors", {
                f"W_enc_{layer}": self.W_enc[rows].detach().contiguous(),
                f"b_enc_{layer}": self.b_enc[rows].detach().contiguous(),
                f"b_dec_{layer}": self.b_dec[layer].detach().contiguous()})
            decoder = torch.stack([self.W_dec[t][rows].detach() for t in range(layer, self.n_layers)], 1)
            atomic_write_safetensors(path / f"W_dec_{layer}.safetensors", {f"W_dec_{layer}": decoder})

    @classmethod
    def load_circuit_tracer(cls, path: str | Path, k: int, *, drop_thresholds: bool = False,
                            backend: str = "auto", device: torch.device | str | None = None,
                            dtype: torch.dtype | None = None, **kwargs) -> "CrossLayerTranscoder":
        """A CLT in circuit-tracer's layout (see save_circuit_tracer), run with top-k selection of k
        latents per layer (circuit-tracer's own activation is ReLU or JumpReLU, which this module does
        not reproduce: with k at least the number of positive pre-activations, top-k of ReLU equals
        ReLU). A JumpReLU CLT (threshold_{l} tensors) is refused unless drop_thresholds=True."""
        path = Path(path)
        layers = 0
        while (path / f"W_enc_{layers}.safetensors").is_file():
            layers += 1
        if layers == 0:
            raise FileNotFoundError(f"no circuit-tracer CLT at {path}: expected W_enc_0.safetensors, ...")
        encoder, decoders = {}, []
        try:
            for layer in range(layers):
                with safe_open(str(path / f"W_enc_{layer}.safetensors"), framework="pt") as handle:
                    encoder.update({name: handle.get_tensor(name) for name in handle.keys()})
                with safe_open(str(path / f"W_dec_{layer}.safetensors"), framework="pt") as handle:
                    decoders.append(handle.get_tensor(f"W_dec_{layer}"))
        except Exception as exc:
            raise ValueError(f"{path}: not a readable circuit-tracer CLT ({exc})") from exc
        if any(name.startswith("threshold_") for name in encoder) and not drop_thresholds:
            raise ValueError(f"{path}: a JumpReLU CLT (threshold_* tensors); this module selects the top k "
                             "per layer instead: pass drop_thresholds=True to load its weights anyway")
        for layer in range(layers):
            for name in (f"W_enc_{layer}", f"b_enc_{layer}", f"b_dec_{layer}"):
                if name not in encoder:
                    raise ValueError(f"{path / f'W_enc_{layer}.safetensors'}: missing tensor {name!r}")
        per_layer, d_in = encoder["W_enc_0"].shape
        d_out = encoder["b_dec_0"].shape[0]
        for layer, decoder in enumerate(decoders):
            if tuple(decoder.shape) != (per_layer, layers - layer, d_out):
                raise ValueError(f"{path / f'W_dec_{layer}.safetensors'}: W_dec_{layer} has shape "
                                 f"{tuple(decoder.shape)}, expected {(per_layer, layers - layer, d_out)}")
        dtype = dtype or encoder["W_enc_0"].dtype
        module = cls(layers, d_in, d_out, per_layer, k, backend=backend, device=device, dtype=dtype, **kwargs)
        tensors = {"W_enc": torch.cat([encoder[f"W_enc_{l}"] for l in range(layers)]),
                   "b_enc": torch.cat([encoder[f"b_enc_{l}"] for l in range(layers)]),
                   "b_dec": torch.stack([encoder[f"b_dec_{l}"] for l in range(layers)])}
        for t in range(layers):
            tensors[f"W_dec.{t}"] = torch.cat([decoders[l][:, t - l] for l in range(t + 1)])
        module._import_checked(tensors, path)
        return module
