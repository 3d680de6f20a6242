"""dictionary_learning (PyPI dictionary-learning) on pyinterp's fused ops, opt in:

    from pyinterp.integrations import dictionary_learning as pyinterp_dl
    pyinterp_dl.apply()                        # every TopKTrainer; or apply(trainer=t) for one
    ...                                        # trainer.update(step, x) as before
    pyinterp_dl.revert()

Patched: `TopKTrainer.loss` (the class, or one trainer instance), the training step's forward; the
rest of `update()` (geometric-median init, decoder-gradient projection, clipping, Adam, schedule,
decoder renorm) is the host's own. The host's bookkeeping is kept: `num_tokens_since_fired`,
`dead_features`, `effective_l0`, `pre_norm_auxk_loss`, the threshold EMA, and the `LossLog` tuple
with the dense `f` when `logging=True` (the host returns it; only then is it built).

Modes (`mode=`):
- "faithful": the host's training exactly. dictionary_learning counts this step's firing before it
  takes the dead mask, so the dead latents' top-k_aux come from a second `topk_encode` pass after
  the first, only on steps with dead latents; its gradient reaches the encoder, as the host's does
  (its AuxK reads the post-ReLU activations with their gradient).
- "fused": one pass; the dead mask is the one before this step's firing is counted, so a dead
  latent that fires in this step still takes part in this step's AuxK (changed host behaviour).

No N x M tensor is built in either mode (except `f` for logging). Only `AutoEncoderTopK`
dictionaries are supported; another dict_class raises."""
from __future__ import annotations

from collections import namedtuple

import torch
from torch import Tensor

from pyinterp.integrations._patching import ClassPatches, Patches, check_mode, checked_host
from pyinterp.ops.sparse_decode import sparse_decode
from pyinterp.ops.topk_encode import topk_encode

DISTRIBUTION = "dictionary-learning"
SUPPORTED = ("0.1.0", "0.2.0")
_SIGNATURES = {
    "TopKTrainer.loss": ("self", "x", "step", "logging"),
    "TopKTrainer.get_auxiliary_loss": ("self", "residual_BD", "post_relu_acts_BF"),
    "TopKTrainer.update_threshold": ("self", "top_acts_BK"),
    "AutoEncoderTopK.encode": ("self", "x", "return_topk", "use_threshold"),
}
_LossLog = namedtuple("LossLog", ["x", "x_hat", "f", "losses"])

_class = ClassPatches("pyinterp.integrations.dictionary_learning")
revert = _class.revert
is_applied = _class.is_applied


def _host():
    return checked_host("dictionary_learning.trainers.top_k", DISTRIBUTION, SUPPORTED, _SIGNATURES)[0]


def undo_nnsight_import_patches() -> None:
    """dictionary_learning imports nnsight 0.3, which patches torch for the whole process at import
    (FakeTensor.__new__, math functions, autocast): torch.compile and torch.library.opcheck then fail
    with "FakeTensor.__new__() got an unexpected keyword argument". Call this after importing
    dictionary_learning when the process does not use nnsight's tracing (TopKTrainer does not)."""
    import nnsight

    nnsight.DEFAULT_PATCHER.__exit__(None, None, None)


def _encode(x: Tensor, ae, k: int, **aux):
    return topk_encode(x, ae.encoder.weight, ae.encoder.bias, k, b_dec=ae.b_dec, **aux)


def _decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor | None) -> Tensor:
    return sparse_decode(values, indices, W_dec, b_dec, check_indices=False)


def _aux_loss(trainer, residual: Tensor, aux_values: Tensor | None, aux_indices: Tensor | None,
              W_dec: Tensor) -> Tensor:
    """The host's normalised AuxK of the dead latents' codes (no b_dec: it is inside the residual)."""
    if aux_values is None:
        trainer.pre_norm_auxk_loss = -1
        return torch.tensor(0, dtype=residual.dtype, device=residual.device)
    reconstruction = _decode(aux_values, aux_indices, W_dec, None)
    l2_loss_aux = (residual.float() - reconstruction.float()).pow(2).sum(dim=-1).mean()
    trainer.pre_norm_auxk_loss = l2_loss_aux
    denominator = (residual.float() - residual.mean(dim=0).float()).pow(2).sum(dim=-1).mean()
    return (l2_loss_aux / denominator).nan_to_num(0.0)


def _make_loss(host, mode: str):
    fused = mode == "fused"

    def loss(self, x, step=None, logging=False):
        ae = self.ae
        if not isinstance(ae, host.AutoEncoderTopK):
            raise NotImplementedError(f"pyinterp.integrations.dictionary_learning: only AutoEncoderTopK "
                                      f"dictionaries are supported, got {type(ae).__name__}")
        k = int(ae.k)
        W_dec = ae.decoder.weight.mT.contiguous()  # (M, D), row i = latent i; differentiable copy
        use_aux = self.auxk_alpha > 0
        aux_values = aux_indices = None
        if fused and use_aux:
            dead_before = self.num_tokens_since_fired >= self.dead_feature_threshold
            k_aux = min(self.top_k_aux, int(dead_before.sum()))
        if fused and use_aux and k_aux > 0:
            values, indices, aux_values, aux_indices = _encode(x, ae, k, dead_mask=dead_before, k_aux=k_aux)
        else:
            values, indices = _encode(x, ae, k)
        if step > self.threshold_start_step:
            self.update_threshold(values)
        x_hat = _decode(values, indices, W_dec, ae.b_dec)
        e = x - x_hat
        self.effective_l0 = k
        did_fire = torch.zeros_like(self.num_tokens_since_fired, dtype=torch.bool)
        did_fire[indices.flatten().long()] = True
        self.num_tokens_since_fired += x.size(0)
        self.num_tokens_since_fired[did_fire] = 0
        l2_loss = e.pow(2).sum(dim=-1).mean()
        auxk_loss = 0
        if use_aux:
            dead = self.num_tokens_since_fired >= self.dead_feature_threshold
            self.dead_features = int(dead.sum())
            if not fused and self.dead_features > 0:
                k_aux = min(self.top_k_aux, self.dead_features)
                _, _, aux_values, aux_indices = _encode(x, ae, 1, dead_mask=dead, k_aux=k_aux)
            auxk_loss = _aux_loss(self, e.detach(), aux_values, aux_indices, W_dec)
        total = l2_loss + self.auxk_alpha * auxk_loss
        if not logging:
            return total
        f = torch.zeros(x.shape[0], ae.dict_size, dtype=values.dtype, device=values.device)
        f = f.scatter(-1, indices.long(), values)
        return _LossLog(x, x_hat, f, {"l2_loss": l2_loss.item(), "auxk_loss": float(torch.as_tensor(auxk_loss).detach()),
                                      "loss": total.item()})

    return loss


def apply(mode: str = "faithful", *, trainer=None) -> Patches:
    """Route TopKTrainer's training step through pyinterp's topk_encode / sparse_decode.

    trainer=None patches the class (every TopKTrainer); trainer=<TopKTrainer> that instance only.
    Returns the Patches (their revert() undoes it; also a context manager); revert() undoes the
    class-level one. Raises HostMismatch when the installed dictionary-learning is outside the
    supported versions or the signatures of the functions it relies on changed."""
    check_mode("pyinterp.integrations.dictionary_learning.apply", mode)
    host = _host()
    loss = _make_loss(host, mode)
    if trainer is not None:
        if not isinstance(trainer, host.TopKTrainer):
            raise TypeError(f"pyinterp.integrations.dictionary_learning.apply: trainer must be a TopKTrainer, "
                            f"got {type(trainer).__name__}")
    return _class.patch_method(host.TopKTrainer, trainer, "loss", loss, mode)


# ---- dictionaries to pyinterp.nn modules and back ----
def to_pyinterp(ae, *, backend: str = "auto"):
    """An AutoEncoderTopK as pyinterp.nn.TopKSAE, a BatchTopKSAE as pyinterp.nn.BatchTopKSAE
    (returned in eval mode) with the same activations: the host's BatchTopKSAE.forward/encode use
    the threshold (relu(z) * 1[relu(z) > threshold], every latent), pyinterp's eval mode the same with
    max_k_per_row = n_latents; in training mode both keep the batch's k * N largest. Load a saved
    dictionary with the host's own `AutoEncoderTopK.from_pretrained(path)` /
    `BatchTopKSAE.from_pretrained(path)` first. Refused: a BatchTopKSAE whose threshold was never set
    (the host's -1 keeps every positive latent), other dictionary classes."""
    import dictionary_learning.trainers.batch_top_k as batch_host
    import dictionary_learning.trainers.top_k as host
    from pyinterp.integrations._convert import build_pyinterp_sae
    from pyinterp.nn.sae import BatchTopKSAE, TopKSAE

    where = "pyinterp.integrations.dictionary_learning.to_pyinterp"
    tensors = (ae.encoder.weight, ae.encoder.bias, ae.decoder.weight.mT, ae.b_dec, int(ae.k))
    if isinstance(ae, batch_host.BatchTopKSAE):
        threshold = ae.threshold.detach().to(torch.float32)
        if not float(threshold) >= 0:
            raise ValueError(f"{where}: the BatchTopKSAE's threshold is {float(threshold)} (never set by training: "
                             "the host's -1); its eval activations would keep every positive latent")
        return build_pyinterp_sae(where, BatchTopKSAE, *tensors, threshold=threshold, backend=backend,
                                  max_k_per_row=ae.dict_size).eval()
    if isinstance(ae, host.AutoEncoderTopK):
        return build_pyinterp_sae(where, TopKSAE, *tensors, backend=backend)
    raise ValueError(f"{where}: only AutoEncoderTopK and BatchTopKSAE convert, got {type(ae).__name__}")


def from_pyinterp(sae):
    """A pyinterp.nn TopKSAE as AutoEncoderTopK, a BatchTopKSAE as dictionary_learning's BatchTopKSAE
    (then `torch.save(ae.state_dict(), path)` as the host saves). A BatchTopKSAE whose max_k_per_row
    caps a token's latents below n_latents is refused: the host's eval has no cap."""
    import dictionary_learning.trainers.batch_top_k as batch_host
    import dictionary_learning.trainers.top_k as host
    from pyinterp.nn.sae import BatchTopKSAE

    where = "pyinterp.integrations.dictionary_learning.from_pyinterp"
    if isinstance(sae, BatchTopKSAE):
        if sae.max_k_per_row != sae.n_latents:
            raise ValueError(f"{where}: this BatchTopKSAE keeps at most max_k_per_row={sae.max_k_per_row} "
                             f"latents per token in eval; dictionary_learning's keeps every latent above the "
                             "threshold, so the conversion would change activations")
        ae = batch_host.BatchTopKSAE(sae.d_model, sae.n_latents, sae.k)
        ae.threshold.fill_(float(sae.threshold))
    else:
        ae = host.AutoEncoderTopK(sae.d_model, sae.n_latents, sae.k)
    ae.to(device=sae.W_enc.device, dtype=sae.W_enc.dtype)
    with torch.no_grad():
        ae.encoder.weight.copy_(sae.W_enc)
        ae.encoder.bias.copy_(sae.b_enc)
        ae.decoder.weight.copy_(sae.W_dec.mT)
        ae.b_dec.copy_(sae.b_dec)
    return ae
