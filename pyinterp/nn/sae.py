"""Top-k sparse autoencoders on pyinterp's fused ops, with the losses of docs/SAE_TRAINING.md (FVU + AuxK).

Saved in EleutherAI sparsify's layout (a folder with `sae.safetensors` holding encoder.weight,
encoder.bias, W_dec, b_dec, and `cfg.json`), so SAEs trained by either library load in the other."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from torch import Tensor, nn

from pyinterp import _validation
from pyinterp._dtypes import accumulator_dtype
from pyinterp._atomic import atomic_write_json, atomic_write_safetensors
from pyinterp.ops.sparse_decode import sparse_decode
from pyinterp.ops.threshold_encode import threshold_encode
from pyinterp.ops.topk_encode import topk_encode
from pyinterp.reference.topk_encode import topk_lower_index_ties

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "cfg.json"
# parameter -> tensor name in sae.safetensors (sparsify's names)
EXPORT_NAMES = {"W_enc": "encoder.weight", "b_enc": "encoder.bias", "W_dec": "W_dec", "b_dec": "b_dec"}


class SAEOutput(NamedTuple):
    """x_hat (N, D); values / indices (N, k') the active latents (values post-ReLU, zero where
    unused); fvu = ||x - x_hat||^2 / ||x - mean(x)||^2; aux_loss = the scaled, normalised AuxK loss
    (zero without dead latents); loss = fvu + aux_alpha * aux_loss (+ multi_topk_fvu / 8 with
    multi_topk). multi_topk_fvu: the FVU of the top-(4k) reconstruction (zero without multi_topk; None
    from modules that have no such option).
    Losses are fp32 scalars (float64 for a float64 SAE)."""
    x_hat: Tensor
    values: Tensor
    indices: Tensor
    fvu: Tensor
    aux_loss: Tensor
    loss: Tensor
    multi_topk_fvu: Tensor | None = None


# sparsify's multi-TopK (docs/sae_family.md, "Multi-TopK"): the extra FVU of the top-(4k) reconstruction,
# weighted 1/8 in the loss.
MULTI_TOPK_FACTOR = 4
MULTI_TOPK_WEIGHT = 1 / 8


def total_variance(x: Tensor, variance_floor: float | None = None) -> Tensor:
    """||x - mean(x)||^2 over the batch of N tokens (the FVU denominator), in fp32 or wider; with a
    variance_floor (per token), at least N * variance_floor, so that a batch of identical tokens has
    a finite FVU instead of x / 0 (docs/SAE_TRAINING.md, "Non-finite values")."""
    x = x.to(accumulator_dtype(x.dtype))
    variance = (x - x.mean(0)).pow(2).sum()
    if variance_floor is not None:
        variance = variance.clamp_min(x.shape[0] * variance_floor)
    return variance


class TopKSAE(nn.Module):
    """z = (x - b_dec) @ W_enc^T + b_enc; keep the k largest per token (ReLU'd); x_hat = sum of
    their W_dec rows + b_dec. Parameters are W_enc, W_dec (n_latents, d_model), b_enc, b_dec.

    Init (docs/SAE_TRAINING.md, Gao et al. 2024): W_dec rows random unit vectors, W_enc = W_dec, biases zero;
    call init_b_dec(first_batch) before training. Under torch.autocast the fused ops run in the
    autocast dtype on casts of the (fp32 master) weights. multi_topk (sparsify's option): the loss adds
    1/8 of the FVU of the top-(4k) reconstruction, from the same encode (k' = 4k, whose first k are the
    top-k). backend: that of the ops ("auto", "cuda", "triton", "cpu", "torch")."""

    architecture = "topk"
    # config() keys that load() passes back to the constructor
    load_keys = ("k_aux", "aux_alpha", "seed", "multi_topk")

    def __init__(self, d_model: int, n_latents: int, k: int, *, k_aux: int | None = None,
                 aux_alpha: float = 1 / 32, multi_topk: bool = False, backend: str = "auto", seed: int = 0,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        name = type(self).__name__
        _validation.check_int(name, "d_model", d_model, low=1)
        _validation.check_int(name, "n_latents", n_latents, low=1)
        _validation.check_int(name, "k", k, low=1, high=n_latents, meaning="1 <= k <= n_latents")
        k_aux = min(d_model // 2, n_latents) if k_aux is None else k_aux
        _validation.check_int(name, "k_aux", k_aux, low=0, high=n_latents,
                              meaning="0 <= k_aux <= n_latents; 0 turns AuxK off")
        if not (isinstance(aux_alpha, (int, float)) and math.isfinite(aux_alpha) and aux_alpha >= 0):
            raise ValueError(f"{name}: aux_alpha must be a finite number >= 0, got {aux_alpha!r}")
        self.d_model, self.n_latents, self.k, self.k_aux = d_model, n_latents, k, k_aux
        if not isinstance(multi_topk, bool):
            raise TypeError(f"{name}: multi_topk must be a bool, got {type(multi_topk).__name__}")
        self.aux_alpha, self.backend, self.seed = float(aux_alpha), backend, seed
        self.multi_topk = multi_topk
        # Drawn on the CPU from a seeded generator: the same init on every device and every rank.
        generator = torch.Generator().manual_seed(seed)
        W_dec = torch.randn(n_latents, d_model, generator=generator)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        factory = {"device": device, "dtype": dtype}
        self.W_enc = nn.Parameter(W_dec.to(**factory, copy=True))
        self.b_enc = nn.Parameter(torch.zeros(n_latents, **factory))
        self.W_dec = nn.Parameter(W_dec.to(**factory, copy=True))
        self.b_dec = nn.Parameter(torch.zeros(d_model, **factory))

    # ---- config and initialisation ----
    def config(self) -> dict:
        """The constructor's settings. multi_topk is listed only when on, so that the checkpoints of
        runs from before the option resume (the trainer compares every key)."""
        config = {"architecture": self.architecture, "d_model": self.d_model, "n_latents": self.n_latents,
                  "k": self.k, "k_aux": self.k_aux, "aux_alpha": self.aux_alpha, "seed": self.seed}
        return {**config, "multi_topk": True} if self.multi_topk else config

    @torch.no_grad()
    def init_b_dec(self, x: Tensor) -> None:
        """b_dec = the mean of the first batch (x (..., d_model)), so encoding starts centred."""
        self._check_input(x)
        self.b_dec.copy_(x.reshape(-1, self.d_model).double().mean(0))

    @torch.no_grad()
    def normalize_decoder(self, applied: Tensor | None = None) -> None:
        """Rows of W_dec back to unit norm (after each optimiser step). applied (bool, on the
        device): False after a skipped step, which leaves W_dec bit for bit as it is."""
        norm = self.W_dec.norm(dim=1, keepdim=True)
        if applied is not None:
            norm = torch.where(applied, norm, 1.0)
        self.W_dec.div_(norm)

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove from each W_dec row's gradient its component along the row: g_i -= <g_i, w_i> w_i
        (rows are unit norm), so the step moves the direction rather than the norm."""
        if self.W_dec.grad is not None:
            parallel = (self.W_dec.grad * self.W_dec).sum(1, keepdim=True)
            self.W_dec.grad.sub_(parallel * self.W_dec)

    # ---- forward ----
    def _check_input(self, x: Tensor) -> None:
        _validation.check_tensor(type(self).__name__, "x", x, dtypes=_validation.FLOAT_DTYPES)
        if x.dim() < 1 or x.shape[-1] != self.d_model:
            raise ValueError(f"{type(self).__name__}: x must have shape (..., {self.d_model}) "
                             f"(d_model), got {tuple(x.shape)}")

    def _cast(self, *tensors: Tensor) -> list[Tensor]:
        """Inside torch.autocast, the fused ops take the autocast dtype (custom ops are not cast by
        autocast itself); the casts are differentiable, so gradients reach the fp32 masters."""
        device_type = self.W_enc.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            return [t.to(dtype) for t in tensors]
        return [t.to(self.W_enc.dtype) for t in tensors]

    def _encode_k(self) -> int:
        """Latents the encoder selects per token: k, or min(4k, M) with multi_topk (its first k columns
        are the top-k: topk_encode's output is descending, ties to the lower index, so the top-k is
        the prefix of the top-4k)."""
        return min(MULTI_TOPK_FACTOR * self.k, self.n_latents) if self.multi_topk else self.k

    def _select(self, x: Tensor, dead_mask: Tensor | None):
        """(values, indices, aux_values, aux_indices, num_dead) for flat x (N, D) in compute dtype;
        values / indices have _encode_k() columns."""
        W_enc, b_enc, b_dec = self._cast(self.W_enc, self.b_enc, self.b_dec)
        if dead_mask is None or self.k_aux == 0:
            values, indices = topk_encode(x, W_enc, b_enc, self._encode_k(), b_dec=b_dec, backend=self.backend)
            return values, indices, None, None, None
        values, indices, aux_values, aux_indices = topk_encode(
            x, W_enc, b_enc, self._encode_k(), b_dec=b_dec, dead_mask=dead_mask, k_aux=self.k_aux,
            backend=self.backend)
        return values, indices, aux_values, aux_indices, dead_mask.sum()

    def _decode_sum(self, values: Tensor, indices: Tensor) -> Tensor:
        """sum_j values[:, j] * W_dec[indices[:, j]] without b_dec; indices come from _select."""
        (W_dec,) = self._cast(self.W_dec)
        return sparse_decode(values, indices, W_dec, None, backend=self.backend, check_indices=False)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(values, indices), each (..., k): the active latents of x (..., d_model)."""
        self._check_input(x)
        (flat,) = self._cast(x.reshape(-1, self.d_model))
        values, indices = self._select(flat, None)[:2]
        if self.multi_topk:
            values, indices = values[:, :self.k], indices[:, :self.k]
        return values.reshape(*x.shape[:-1], -1), indices.reshape(*x.shape[:-1], -1)

    def decode(self, values: Tensor, indices: Tensor) -> Tensor:
        """x_hat (..., d_model) from (values, indices) (..., k); indices are range-checked."""
        W_dec, b_dec = self._cast(self.W_dec, self.b_dec)
        return sparse_decode(values.to(W_dec.dtype), indices, W_dec, b_dec, backend=self.backend)

    def forward(self, x: Tensor, dead_mask: Tensor | None = None, *,
                variance_floor: float | None = None) -> SAEOutput:
        """Reconstruction, activations and losses of a batch x (..., d_model), flattened to (N, D).
        dead_mask (n_latents, bool): the latents that count as dead, for AuxK (None: no AuxK).
        variance_floor: the least per-token variance the FVU and AuxK denominators use (None: the
        batch's own, so a batch of identical tokens gives an infinite FVU)."""
        self._check_input(x)
        (flat,) = self._cast(x.reshape(-1, self.d_model))
        values, indices, aux_values, aux_indices, num_dead = self._select(flat, dead_mask)
        if self.multi_topk:  # columns k.. are the rest of the top-4k
            values, indices, more_values, more_indices = (values[:, :self.k], indices[:, :self.k],
                                                          values[:, self.k:], indices[:, self.k:])
        (b_dec,) = self._cast(self.b_dec)
        x_hat = self._decode_sum(values, indices) + b_dec
        target = flat.to(accumulator_dtype(flat.dtype))  # losses in fp32 (float64 stays float64)
        variance = total_variance(target, variance_floor)
        fvu = (target - x_hat.to(target.dtype)).pow(2).sum() / variance
        if aux_values is None:
            aux_loss = fvu.new_zeros(())
        else:
            aux_loss = self._aux_loss(target, x_hat, aux_values, aux_indices, num_dead, variance_floor)
        loss = fvu + self.aux_alpha * aux_loss
        multi_topk_fvu = fvu.new_zeros(())
        if self.multi_topk:
            # The top-4k reconstruction is the top-k one plus the other 3k latents: no second full decode.
            x_hat_multi = x_hat + self._decode_sum(more_values, more_indices)
            multi_topk_fvu = (target - x_hat_multi.to(target.dtype)).pow(2).sum() / variance
            loss = loss + MULTI_TOPK_WEIGHT * multi_topk_fvu
        return SAEOutput(x_hat.reshape(x.shape), values, indices, fvu, aux_loss, loss, multi_topk_fvu)

    def _aux_loss(self, target: Tensor, x_hat: Tensor, aux_values: Tensor, aux_indices: Tensor,
                  num_dead: Tensor, variance_floor: float | None) -> Tensor:
        """AuxK (docs/SAE_TRAINING.md): the dead latents' reconstruction e_hat of the residual e = x - x_hat
        (stop-grad); e_hat has NO b_dec (it is inside e already). Normalised by ||e - mean(e)||^2,
        scaled by min(#dead / k_aux, 1) on the device (zero when none are dead: no host sync)."""
        residual = (target - x_hat.to(target.dtype)).detach()
        residual_hat = self._decode_sum(aux_values, aux_indices).to(target.dtype)
        scale = (num_dead.to(target.dtype) / self.k_aux).clamp(max=1.0)
        return scale * (residual_hat - residual).pow(2).sum() / total_variance(residual, variance_floor)

    # ---- saving and loading (sparsify's layout) ----
    def gather_latent_rows(self, name: str, tensor: Tensor) -> Tensor:
        """The whole-SAE tensor of parameter `name` (or of its optimiser state) from this module's
        part; identity here, a collective gather for a latent-sharded SAE."""
        return tensor

    def local_latent_rows(self, name: str, tensor: Tensor) -> Tensor:
        """This module's part of a whole-SAE tensor (the inverse of gather_latent_rows)."""
        return tensor

    def export_tensors(self) -> dict[str, Tensor]:
        return {export: self.gather_latent_rows(name, getattr(self, name).detach())
                for name, export in EXPORT_NAMES.items()}

    def import_tensors(self, tensors: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for name, export in EXPORT_NAMES.items():
                getattr(self, name).copy_(self.local_latent_rows(name, tensors[export]))

    def sparsify_config(self) -> dict:
        """cfg.json: sparsify's fields (it ignores extra keys) plus pyinterp's own."""
        return {"d_in": self.d_model, "num_latents": self.n_latents, "k": self.k, "activation": "topk",
                "expansion_factor": max(self.n_latents // self.d_model, 1), "normalize_decoder": True,
                "multi_topk": self.multi_topk, "skip_connection": False, "transcode": False,
                "pyinterp": self.config()}

    def save(self, path: str | Path) -> None:
        """Write `sae.safetensors` + `cfg.json` into the folder `path`, each atomically."""
        write_sae_folder(path, self.export_tensors(), self.sparsify_config())

    @classmethod
    def load(cls, path: str | Path, *, backend: str = "auto",
             device: torch.device | str | None = None) -> "TopKSAE":
        """An SAE saved by pyinterp or by EleutherAI sparsify (a folder with cfg.json and
        sae.safetensors), ready to run on pyinterp's kernels."""
        folder = read_sae_folder(path)
        config, own = folder.config, folder.own
        activation = config.get("activation", "topk")
        from pyinterp.nn.jumprelu import JumpReLUSAE  # they build on this module
        from pyinterp.nn.matryoshka import MatryoshkaBatchTopKSAE

        if activation == "jumprelu":
            return JumpReLUSAE.load(path, backend=backend, device=device)
        if activation != "topk" or config.get("transcode") or config.get("skip_connection"):
            raise ValueError(f"{folder.config_path}: only plain top-k and JumpReLU SAEs load (activation 'topk' or "
                             f"'jumprelu', no transcoder, no skip connection); got activation={activation!r}, "
                             f"transcode={config.get('transcode')}, skip_connection={config.get('skip_connection')}")
        modules = {m.architecture: m for m in (BatchTopKSAE, MatryoshkaBatchTopKSAE)}
        module = modules.get(own.get("architecture"), TopKSAE)
        kwargs = {key: own[key] for key in module.load_keys if key in own}
        if module is TopKSAE and "multi_topk" not in own and isinstance(config.get("multi_topk"), bool):
            kwargs["multi_topk"] = config["multi_topk"]  # an SAE trained by sparsify
        return folder.build(module, backend, device, kwargs)


class SAEFolder(NamedTuple):
    """A saved SAE folder, read and checked: cfg.json (`config`, its "pyinterp" part `own`) and the
    tensors of sae.safetensors, whose four SAE tensors agree with encoder.weight's (n_latents, d_model)."""
    config: dict
    own: dict
    tensors: dict
    config_path: Path
    weights_path: Path

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.tensors["encoder.weight"].shape)

    def build(self, module: type["TopKSAE"], backend: str, device, kwargs: dict) -> "TopKSAE":
        n_latents, d_model = self.shape
        try:
            sae = module(d_model, n_latents, self.config["k"], backend=backend, device=device,
                         dtype=self.tensors["encoder.weight"].dtype, **kwargs)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{self.config_path}: {exc}") from exc
        sae.import_tensors(self.tensors)
        return sae


def read_sae_folder(path: str | Path) -> SAEFolder:
    """Reads and checks the folder an SAE's save() (or sparsify's) writes; raises FileNotFoundError /
    ValueError naming the file and what is wrong."""
    path = Path(path)
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        inner = sorted(p.parent.name for p in path.glob(f"*/{CONFIG_FILE}")) if path.is_dir() else []
        hint = f"; it holds one SAE per hookpoint: pass one of {', '.join(inner)}" if inner else ""
        raise FileNotFoundError(f"no SAE at {path}: expected {CONFIG_FILE} and {WEIGHTS_FILE}{hint}")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{config_path}: not a readable JSON SAE config ({exc})") from exc
    if not isinstance(config, dict) or not isinstance(config.get("k"), int):
        raise ValueError(f"{config_path}: expected a JSON object with an integer 'k' (active "
                         f"latents per token), got {str(config)[:80]}")
    own = config.get("pyinterp", {})
    if not isinstance(own, dict):
        raise ValueError(f"{config_path}: 'pyinterp' must be a JSON object, got {own!r}")
    try:
        with safe_open(str(weights_path), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise ValueError(f"{weights_path}: not a readable safetensors file ({exc})") from exc
    missing = set(EXPORT_NAMES.values()) - tensors.keys()
    if missing:
        raise ValueError(f"{weights_path}: missing tensors {sorted(missing)}")
    if tensors["encoder.weight"].dim() != 2:
        raise ValueError(f"{weights_path}: encoder.weight must be 2-D (n_latents, d_model), got "
                         f"shape {tuple(tensors['encoder.weight'].shape)}")
    n_latents, d_model = tensors["encoder.weight"].shape
    expected = {"encoder.weight": (n_latents, d_model), "encoder.bias": (n_latents,),
                "W_dec": (n_latents, d_model), "b_dec": (d_model,)}
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{weights_path}: {name} has shape {tuple(tensors[name].shape)}, "
                             f"expected {shape} (from encoder.weight)")
    return SAEFolder(config, own, tensors, config_path, weights_path)


def write_sae_folder(path: str | Path, tensors: dict[str, Tensor], config: dict) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_safetensors(path / WEIGHTS_FILE, tensors)
    atomic_write_json(path / CONFIG_FILE, config)


class BatchTopKSAE(TopKSAE):
    """BatchTopK (Bussmann et al. 2024): the k*N largest activations over the whole batch of N
    tokens, so the active count varies per token. Built on the per-token fused ops: each token
    proposes its max_k_per_row best latents, the batch keeps the k*N best proposals and the rest are
    zero-valued padding (exact while no token needs more than max_k_per_row; `saturated_rows`
    counts the tokens that hit the cap). In eval mode it is a JumpReLU with one global threshold,
    encoded by pyinterp.threshold_encode (a variable number of active latents per token, at most
    max_k_per_row; saturated_rows then counts the tokens over the cap): `threshold` is an EMA over
    training batches of the smallest kept activation (docs/sae_family.md, "BatchTopK's threshold")."""

    architecture = "batch_topk"
    load_keys = TopKSAE.load_keys + ("max_k_per_row", "threshold_momentum")

    def __init__(self, d_model: int, n_latents: int, k: int, *, max_k_per_row: int | None = None,
                 threshold_momentum: float = 0.01, **kwargs):
        if kwargs.get("multi_topk"):
            raise ValueError(f"{type(self).__name__}: multi_topk is a per-token TopK loss (sparsify's); "
                             "BatchTopK selection does not take it")
        super().__init__(d_model, n_latents, k, **kwargs)
        max_k_per_row = min(4 * k, n_latents) if max_k_per_row is None else max_k_per_row
        _validation.check_int(type(self).__name__, "max_k_per_row", max_k_per_row, low=k, high=n_latents,
                              meaning="k <= max_k_per_row <= n_latents")
        if not 0 < threshold_momentum <= 1:
            raise ValueError(f"{type(self).__name__}: threshold_momentum must be in (0, 1], "
                             f"got {threshold_momentum}")
        self.max_k_per_row, self.threshold_momentum = max_k_per_row, threshold_momentum
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float32, device=self.W_enc.device))
        # Diagnostic only (not saved): tokens whose max_k_per_row-th proposal made the batch top-k.
        self.register_buffer("saturated_rows", torch.zeros((), dtype=torch.int64, device=self.W_enc.device),
                             persistent=False)

    def config(self) -> dict:
        return {**super().config(), "max_k_per_row": self.max_k_per_row,
                "threshold_momentum": self.threshold_momentum}

    def export_tensors(self) -> dict[str, Tensor]:
        return {**super().export_tensors(), "threshold": self.threshold.detach()}

    def import_tensors(self, tensors: dict[str, Tensor]) -> None:
        super().import_tensors(tensors)
        if "threshold" in tensors:
            self.threshold.copy_(tensors["threshold"])

    def _select(self, x: Tensor, dead_mask: Tensor | None):
        W_enc, b_enc, b_dec = self._cast(self.W_enc, self.b_enc, self.b_dec)
        if not self.training:  # no AuxK in eval mode: it is a training loss
            threshold = self.threshold.to(x.dtype).expand(self.n_latents)
            encoded = threshold_encode(x, W_enc, b_enc, threshold, self.max_k_per_row, b_dec=b_dec,
                                       backend=self.backend)
            self.saturated_rows.add_(encoded.truncated_rows)
            return encoded.values, encoded.indices, None, None, None
        use_aux = dead_mask is not None and self.k_aux > 0
        outputs = topk_encode(x, W_enc, b_enc, self.max_k_per_row, b_dec=b_dec,
                              dead_mask=dead_mask if use_aux else None,
                              k_aux=self.k_aux if use_aux else 0, backend=self.backend)
        proposals, indices = outputs[:2]
        keep = self._batch_top(proposals.detach())
        values = proposals * keep  # dropped proposals: zero value, so zero gradient
        if not use_aux:
            return values, indices, None, None, None
        return values, indices, outputs[2], outputs[3], dead_mask.sum()

    @torch.no_grad()
    def _batch_top(self, proposals: Tensor) -> Tensor:
        """Mask of the k*N largest proposals of the batch (ties: the earlier token and rank); updates
        the threshold EMA and the saturation count on the device."""
        num_rows, cap = proposals.shape
        kept = min(self.k * num_rows, proposals.numel())
        _, flat_positions = topk_lower_index_ties(proposals.reshape(-1), kept)
        keep = torch.zeros(proposals.numel(), dtype=torch.bool, device=proposals.device)
        keep[flat_positions] = True
        keep = keep.reshape(num_rows, cap) & (proposals > 0)
        smallest_kept = torch.where(keep, proposals.float(), torch.inf).amin()
        smallest_kept = torch.where(torch.isfinite(smallest_kept), smallest_kept, self.threshold)
        # The first batch sets the threshold; later ones move it by the EMA.
        self.threshold.copy_(torch.where(self.threshold > 0,
                                         torch.lerp(self.threshold, smallest_kept, self.threshold_momentum),
                                         smallest_kept))
        self.saturated_rows.add_(keep[:, -1].sum())
        return keep
