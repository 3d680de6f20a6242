"""Matryoshka BatchTopK SAE (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka
Sparse Autoencoders"; docs/sae_family.md, "Matryoshka"): BatchTopK selection, and one reconstruction
loss per nested prefix of the dictionary, all from one prefix decode (pyinterp.prefix_decode)."""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

from torch import Tensor

from pyinterp._dtypes import accumulator_dtype
from pyinterp.nn.sae import BatchTopKSAE, total_variance
from pyinterp.ops.prefix_decode import check_prefixes, prefix_decode


class MatryoshkaOutput(NamedTuple):
    """SAEOutput's fields (fvu: the whole dictionary's) plus prefix_fvu (P,): the FVU of each nested
    reconstruction. loss = sum_p prefix_weights[p] * prefix_fvu[p] + aux_alpha * aux_loss."""
    x_hat: Tensor
    values: Tensor
    indices: Tensor
    fvu: Tensor
    aux_loss: Tensor
    loss: Tensor
    prefix_fvu: Tensor


def default_prefixes(n_latents: int) -> list[int]:
    """M/16, M/8, M/4, M/2, M (sizes below 1 and repeats dropped)."""
    return sorted({max(1, n_latents >> shift) for shift in range(4, -1, -1)})


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """A BatchTopKSAE trained on the reconstructions of nested dictionary prefixes.

    prefixes: m_0 < ... < m_{P-1} = n_latents (default M/16, M/8, M/4, M/2, M); prefix p reconstructs
    x from the active latents with index < m_p (plus b_dec). prefix_weights: the weight of each prefix's
    FVU in the loss, default 1/P each (the mean): the loss then stays on a single FVU's scale, so lr and
    aux_alpha carry over from BatchTopK, and it is dictionary_learning's default; SAELens sums the
    per-prefix MSEs instead, which is prefix_weights=[1]*P up to its MSE normalisation. AuxK is that of
    the whole dictionary (SAELens' default, use_matryoshka_aux_loss=False). Eval mode: BatchTopKSAE's
    threshold encoder. backend: the ops'."""

    architecture = "matryoshka_batch_topk"
    load_keys = BatchTopKSAE.load_keys + ("prefixes", "prefix_weights")

    def __init__(self, d_model: int, n_latents: int, k: int, *, prefixes: Sequence[int] | None = None,
                 prefix_weights: Sequence[float] | None = None, **kwargs):
        super().__init__(d_model, n_latents, k, **kwargs)
        name = type(self).__name__
        prefixes = default_prefixes(n_latents) if prefixes is None else prefixes
        self.prefixes = check_prefixes(name, "prefixes", prefixes, n_latents, "n_latents")
        count = len(self.prefixes)
        weights = [1 / count] * count if prefix_weights is None else list(prefix_weights)
        if len(weights) != count or not all(isinstance(w, (int, float)) and not isinstance(w, bool)
                                            and math.isfinite(w) and w >= 0 for w in weights):
            raise ValueError(f"{name}: prefix_weights must be {count} finite numbers >= 0 (one per prefix), "
                             f"got {prefix_weights!r}")
        self.prefix_weights = [float(w) for w in weights]

    def config(self) -> dict:
        return {**super().config(), "prefixes": list(self.prefixes), "prefix_weights": list(self.prefix_weights)}

    def forward(self, x: Tensor, dead_mask: Tensor | None = None, *,
                variance_floor: float | None = None) -> MatryoshkaOutput:
        """As TopKSAE.forward, with the nested reconstructions of one prefix decode; x_hat is the
        whole dictionary's."""
        self._check_input(x)
        (flat,) = self._cast(x.reshape(-1, self.d_model))
        values, indices, aux_values, aux_indices, num_dead = self._select(flat, dead_mask)
        W_dec, b_dec = self._cast(self.W_dec, self.b_dec)
        nested = prefix_decode(values, indices, W_dec, self.prefixes, b_dec, backend=self.backend,
                               check_indices=False)                                  # (P, N, D)
        target = flat.to(accumulator_dtype(flat.dtype))
        errors = (target - nested.to(target.dtype)).pow(2).sum((1, 2))
        prefix_fvu = errors / total_variance(target, variance_floor)
        fvu = prefix_fvu[-1]
        x_hat = nested[-1]
        if aux_values is None:
            aux_loss = fvu.new_zeros(())
        else:
            aux_loss = self._aux_loss(target, x_hat, aux_values, aux_indices, num_dead, variance_floor)
        weights = prefix_fvu.new_tensor(self.prefix_weights)
        loss = (weights * prefix_fvu).sum() + self.aux_alpha * aux_loss
        return MatryoshkaOutput(x_hat.reshape(x.shape), values, indices, fvu, aux_loss, loss, prefix_fvu)
