"""SAELens (PyPI sae-lens) TopK training on pyinterp's fused ops, opt in:

    from pyinterp.integrations import saelens as pyinterp_saelens
    pyinterp_saelens.apply()                   # every TopKTrainingSAE; or apply(sae=sae) for one
    ...                                        # SAELens' SAETrainer / training_forward_pass as before
    pyinterp_saelens.revert()

Patched: `TopKTrainingSAE.training_forward_pass` (the class, or one instance): the encoder is
`topk_encode` with `scale=` the decoder row norms when `rescale_acts_by_decoder_norm` (SAELens'
default: selection on s_i * z_i), the decoder `sparse_decode` of the codes divided by the same
norms. `process_sae_in`, the hooks' identity defaults, the MSE and the `TrainStepOutput` are the
host's. The fused ops run in the parameters' dtype, also under the trainer's bf16 autocast
(`cfg.autocast`): there SAELens adds its fp32 bias to the bf16 matmul and selects in fp32, so its
activations are closer to fp32 than bf16 kernels' would be (tests/test_integrations.py compares
both against float64). `TrainStepOutput.hidden_pre` is None in both modes: SAELens' trainer does not read it, and
it is the N x M tensor the fused encoder never forms.

Modes (`mode=`):
- "faithful": SAELens' training exactly. `feature_acts` are dense (N, d_sae) as the host returns
  them (a COO tensor with `use_sparse_activations`), since its trainer's firing statistics read them.
  Its AuxK takes the top-k_aux of the raw (not ReLU'd, possibly negative) pre-activations of the
  dead latents, with gradient into the encoder: on steps with dead latents only, those latents'
  pre-activations (N x #dead) are computed densely; never the N x d_sae ones.
- "fused": no N x d_sae tensor: `feature_acts` is always a sparse COO tensor (the trainer's
  statistics accept one), and AuxK is pyinterp's, from the same pass over the dead latents with
  post-ReLU values (a dead latent with a negative pre-activation contributes zero, where the host
  lets it fit the residual with its negative value).

Not supported (raises): architectures other than "topk" (BatchTopKTrainingSAE and the Matryoshka
SAE subclass TopKTrainingSAE and call its forward, which would silently select k per token), hooks
on `hook_sae_acts_pre` / `hook_sae_acts_post`, activation normalisation other than "none",
`reshape_activations` other than "none".

`to_pyinterp` / `from_pyinterp` convert TopK, BatchTopK and JumpReLU SAEs to pyinterp.nn modules
and back (see their docstrings for what they refuse)."""
from __future__ import annotations


import torch

from pyinterp.integrations._patching import ClassPatches, HostMismatch, Patches, check_mode, checked_host
from pyinterp.ops.sparse_decode import sparse_decode
from pyinterp.ops.topk_encode import topk_encode

DISTRIBUTION = "sae-lens"
SUPPORTED = ("6.54.0", "6.55.0")
_SIGNATURES = {
    "TopKTrainingSAE.training_forward_pass": ("self", "step_input"),
    "TopKTrainingSAE.calculate_topk_aux_loss": ("self", "sae_in", "sae_out", "hidden_pre", "dead_neuron_mask"),
    "TopKTrainingSAE.process_sae_in": ("self", "sae_in"),
    "TopKTrainingSAE.encode_with_hidden_pre": ("self", "x"),
}

_class = ClassPatches("pyinterp.integrations.saelens")
revert = _class.revert
is_applied = _class.is_applied


def _host():
    host, version = checked_host("sae_lens.saes.topk_sae", DISTRIBUTION, SUPPORTED, _SIGNATURES)
    import sae_lens.saes.sae as sae_module

    if not hasattr(sae_module, "TrainStepOutput"):
        raise HostMismatch(f"sae_lens.saes.sae.TrainStepOutput is missing in {DISTRIBUTION} {version}")
    return host, sae_module.TrainStepOutput


def _unsupported(sae) -> None:
    cfg = sae.cfg
    if cfg.architecture() != "topk":
        # BatchTopKTrainingSAE (and Matryoshka) subclass TopKTrainingSAE and call its forward
        raise NotImplementedError(f"pyinterp.integrations.saelens: architecture {cfg.architecture()!r} "
                                  f"({type(sae).__name__}) is not supported (only 'topk': the patched forward "
                                  "selects k per token); revert() to use SAELens' own forward")
    if cfg.normalize_activations != "none" or getattr(cfg, "reshape_activations", "none") != "none":
        raise NotImplementedError(f"pyinterp.integrations.saelens: normalize_activations="
                                  f"{cfg.normalize_activations!r} / reshape_activations="
                                  f"{getattr(cfg, 'reshape_activations', 'none')!r} are not supported (only "
                                  "'none'); revert() to use SAELens' own forward")
    for hook in (sae.hook_sae_acts_pre, sae.hook_sae_acts_post):
        if hook._forward_hooks or hook._backward_hooks:
            raise NotImplementedError("pyinterp.integrations.saelens: hooks on the dense activations "
                                      "(hook_sae_acts_pre/post) need them dense; revert() to use SAELens' forward")


def _coo(values: torch.Tensor, indices: torch.Tensor, latents: int) -> torch.Tensor:
    rows = torch.arange(values.shape[0], device=values.device).repeat_interleave(values.shape[1])
    return torch.sparse_coo_tensor(torch.stack([rows, indices.flatten().long()]), values.flatten(),
                                   (values.shape[0], latents), check_invariants=False)  # indices from topk_encode


def _make_forward(TrainStepOutput, mode: str):
    fused = mode == "fused"

    def training_forward_pass(self, step_input):
        _unsupported(self)
        cfg = self.cfg
        sae_in = self.process_sae_in(step_input.sae_in)
        W_enc = self.W_enc.mT  # (d_sae, d_in): row i = latent i
        norms = self.W_dec.norm(dim=-1) if cfg.rescale_acts_by_decoder_norm else None
        dead_mask = step_input.dead_neuron_mask
        num_dead = int(dead_mask.sum()) if dead_mask is not None else 0
        # SAELens' AuxK sizes (Appendix B.1 of Gao et al.): k_aux = d_in / 2, scaled down when few are dead
        k_aux = min(sae_in.shape[-1] // 2, num_dead)
        aux_scale = min(num_dead / (sae_in.shape[-1] // 2), 1.0) if num_dead else 0.0
        if fused and k_aux > 0:
            values, indices, aux_values, aux_indices = topk_encode(
                sae_in, W_enc, self.b_enc, cfg.k, dead_mask=dead_mask, k_aux=k_aux, scale=norms)
        else:
            values, indices = topk_encode(sae_in, W_enc, self.b_enc, cfg.k, scale=norms)
        sae_out = _decode(values, indices, self.W_dec, norms) + self.b_dec
        sae_out = self.reshape_fn_out(self.run_time_activation_norm_fn_out(self.hook_sae_recons(sae_out)),
                                      self.d_head)
        mse_loss = self.mse_loss_fn(sae_out, step_input.sae_in).sum(dim=-1).mean()
        if k_aux > 0:
            if not fused:  # the host's top-k_aux of the dead latents' raw pre-activations
                dead = dead_mask.nonzero().squeeze(1)
                hidden_dead = sae_in @ self.W_enc[:, dead] + self.b_enc[dead]
                if norms is not None:
                    hidden_dead = hidden_dead * norms[dead]
                aux_values, positions = hidden_dead.topk(k_aux, dim=-1, sorted=False)
                aux_indices = dead[positions]
            residual = (step_input.sae_in - sae_out).detach()
            # no b_dec: it is inside the residual already
            reconstruction = _decode(aux_values, aux_indices, self.W_dec, norms)
            aux_loss = cfg.aux_loss_coefficient * aux_scale * (reconstruction - residual).pow(2).sum(-1).mean()
        else:
            aux_loss = sae_out.new_tensor(0.0)
        if fused or cfg.use_sparse_activations:
            feature_acts = _coo(values, indices, cfg.d_sae)
        else:
            feature_acts = values.new_zeros(values.shape[0], cfg.d_sae).scatter(-1, indices.long(), values)
        return TrainStepOutput(sae_in=step_input.sae_in, sae_out=sae_out, feature_acts=feature_acts,
                               hidden_pre=None, loss=mse_loss + aux_loss,
                               losses={"mse_loss": mse_loss, "auxiliary_reconstruction_loss": aux_loss})

    return training_forward_pass


def _decode(values, indices, W_dec, norms):
    """SAELens' act_times_W_dec of sparse codes: (acts / ||W_dec row||) @ W_dec when rescaling."""
    if norms is not None:
        values = values / norms[indices.long()]
    return sparse_decode(values, indices, W_dec, check_indices=False)


def apply(mode: str = "faithful", *, sae=None) -> Patches:
    """Route TopKTrainingSAE.training_forward_pass through pyinterp's topk_encode / sparse_decode.

    sae=None patches the class (every TopKTrainingSAE); sae=<TopKTrainingSAE> that instance only.
    Returns the Patches (their revert() undoes it; also a context manager); revert() undoes the
    class-level one. Raises HostMismatch when the installed sae-lens is outside the supported
    versions or the signatures of the functions it relies on changed."""
    check_mode("pyinterp.integrations.saelens.apply", mode)
    host, TrainStepOutput = _host()
    forward = _make_forward(TrainStepOutput, mode)
    if sae is not None:
        if not isinstance(sae, host.TopKTrainingSAE):
            raise TypeError(f"pyinterp.integrations.saelens.apply: sae must be a TopKTrainingSAE, "
                            f"got {type(sae).__name__}")
        _unsupported(sae)
    return _class.patch_method(host.TopKTrainingSAE, sae, "training_forward_pass", forward, mode)


# ---- SAELens SAEs to pyinterp.nn modules and back ----
_CONVERTIBLE = ("topk", "batchtopk", "jumprelu")


def to_pyinterp(sae, *, backend: str = "auto"):
    """A SAELens SAE as the pyinterp.nn module with the same activations and reconstruction (load a
    saved one with SAELens' own `SAE.load_from_disk(path)`):
    - TopK (inference TopKSAE or TopKTrainingSAE) -> TopKSAE;
    - BatchTopKTrainingSAE -> BatchTopKSAE(max_k_per_row=d_sae, threshold=topk_threshold): its
      training-mode activations are SAELens' batch top-k, its eval ones the JumpReLU SAELens saves
      the BatchTopK SAE as (SAELens saves a BatchTopK SAE as a JumpReLU one);
    - JumpReLU (JumpReLUSAE or JumpReLUTrainingSAE) -> JumpReLUSAE(max_active=d_sae), the
      threshold per latent (and the training SAE's bandwidth).
    The decoder-norm rescaling is folded in (W_enc, b_enc times ||W_dec row||, W_dec rows divided by
    it) as SAELens' own fold does, and apply_b_dec_to_input=False folds into b_enc. Refused, naming
    what differs: other architectures, activation normalisation, reshaped (hook_z) activations, a
    BatchTopK k that is not an integer or whose threshold was never set, a JumpReLU without a
    threshold or with a negative one (SAELens' relu(z) * 1[z > theta] is pyinterp's z * 1[z > theta]
    only for theta >= 0)."""
    from pyinterp.integrations._convert import build_pyinterp_sae, check_nonnegative_threshold, integer_k
    from pyinterp.nn.jumprelu import JumpReLUSAE
    from pyinterp.nn.sae import BatchTopKSAE, TopKSAE

    where = "pyinterp.integrations.saelens.to_pyinterp"
    cfg = sae.cfg
    architecture = cfg.architecture()
    if architecture not in _CONVERTIBLE:
        raise ValueError(f"{where}: architecture {architecture!r} has no pyinterp module with the same "
                         f"activations (converted: {', '.join(_CONVERTIBLE)})")
    if cfg.normalize_activations != "none" or getattr(cfg, "reshape_activations", "none") != "none":
        raise ValueError(f"{where}: normalize_activations={cfg.normalize_activations!r} / reshape_activations="
                         f"{getattr(cfg, 'reshape_activations', 'none')!r} change the input; only 'none' converts")
    with torch.no_grad():
        W_enc, b_enc, W_dec, b_dec = sae.W_enc.mT, sae.b_enc, sae.W_dec, sae.b_dec
        if getattr(cfg, "rescale_acts_by_decoder_norm", False):
            # the activations (and a BatchTopK threshold) are in units of z * ||W_dec row||
            norms = W_dec.norm(dim=-1)
            W_enc, b_enc, W_dec = W_enc * norms[:, None], b_enc * norms, W_dec / norms[:, None]
        if not cfg.apply_b_dec_to_input:  # z = W x + b = W (x - b_dec) + (b + W b_dec)
            b_enc = b_enc + W_enc @ b_dec
        tensors = (W_enc.contiguous(), b_enc, W_dec.contiguous(), b_dec)
        if architecture == "topk":
            return build_pyinterp_sae(where, TopKSAE, *tensors, cfg.k, backend=backend)
        if architecture == "batchtopk":
            k = integer_k(where, cfg.k)
            threshold = sae.topk_threshold.to(torch.float32)
            if not float(threshold) > 0:
                raise ValueError(f"{where}: topk_threshold is {float(threshold)} (never updated by training); its eval "
                                 "activations would keep every positive latent")
            return build_pyinterp_sae(where, BatchTopKSAE, *tensors, k, threshold=threshold, backend=backend,
                                      max_k_per_row=cfg.d_sae)
        threshold = getattr(sae, "threshold", None)
        if threshold is None:
            raise ValueError(f"{where}: this JumpReLU SAE has no threshold parameter")
        check_nonnegative_threshold(where, threshold, "relu(z) * 1[z > threshold]")
        kwargs = {"bandwidth": cfg.jumprelu_bandwidth} if hasattr(cfg, "jumprelu_bandwidth") else {}
        return build_pyinterp_sae(where, JumpReLUSAE, *tensors, cfg.d_sae, threshold=threshold.to(W_enc.dtype),
                                  backend=backend, **kwargs)


def from_pyinterp(sae, *, device: str = "cpu"):
    """A pyinterp.nn SAE as SAELens' inference SAE (then its `save_model(path)`): TopKSAE -> TopKSAE;
    JumpReLUSAE -> JumpReLUSAE; BatchTopKSAE -> JumpReLUSAE with its scalar threshold on every
    latent (its eval activations; SAELens saves its own BatchTopK SAEs so). Refused: a JumpReLUSAE
    whose max_active, or a BatchTopKSAE whose max_k_per_row, caps a token's latents below n_latents
    (SAELens keeps every latent above the threshold), and a negative threshold."""
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE as HostJumpReLUSAE
    from sae_lens.saes.jumprelu_sae import JumpReLUSAEConfig
    from sae_lens.saes.topk_sae import TopKSAE as HostTopKSAE
    from sae_lens.saes.topk_sae import TopKSAEConfig

    from pyinterp.integrations._convert import check_nonnegative_threshold
    from pyinterp.nn.jumprelu import JumpReLUSAE
    from pyinterp.nn.sae import BatchTopKSAE

    where = "pyinterp.integrations.saelens.from_pyinterp"
    common = {"d_in": sae.d_model, "d_sae": sae.n_latents, "device": device,
              "dtype": str(sae.W_enc.dtype).removeprefix("torch."), "apply_b_dec_to_input": True}
    threshold = None
    if isinstance(sae, (JumpReLUSAE, BatchTopKSAE)):
        cap_name, cap = (("max_active", sae.max_active) if isinstance(sae, JumpReLUSAE)
                         else ("max_k_per_row", sae.max_k_per_row))
        if cap != sae.n_latents:
            raise ValueError(f"{where}: this {type(sae).__name__} keeps at most {cap_name}={cap} latents per token; "
                             "SAELens' JumpReLU keeps every latent above the threshold, so the conversion would "
                             "change activations")
        threshold = sae.threshold.detach().to(sae.W_enc.dtype).expand(sae.n_latents)
        check_nonnegative_threshold(where, threshold, "relu(z) * 1[z > threshold]")
        host = HostJumpReLUSAE(JumpReLUSAEConfig(**common))
    else:
        host = HostTopKSAE(TopKSAEConfig(**common, k=sae.k, rescale_acts_by_decoder_norm=False))
    with torch.no_grad():
        host.W_enc.copy_(sae.W_enc.mT)
        host.b_enc.copy_(sae.b_enc)
        host.W_dec.copy_(sae.W_dec)
        host.b_dec.copy_(sae.b_dec)
        if threshold is not None:
            host.threshold.copy_(threshold)
    return host
