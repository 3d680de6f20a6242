"""EleutherAI sparsify (PyPI eai-sparsify) on pyinterp's fused ops, opt in:

    from pyinterp.integrations import sparsify as pyinterp_sparsify
    pyinterp_sparsify.apply()                  # every SparseCoder; or apply(sae=coder) for one
    ...                                        # sparsify's own training code, unchanged
    pyinterp_sparsify.revert()

Patched: `SparseCoder.forward`, `.encode` and `.decode` (class or one instance), and the names
`fused_encoder` / `decoder_impl` that `sparsify.sparse_coder` imported (patching `sparsify.utils`
would change nothing after import). The host's conventions are kept: `ForwardOutput` and
`EncoderOutput` tuples, int64 `latent_indices`, activations in the SAE's dtype.

Modes (`mode=`):
- "faithful": sparsify's training behaviour. Its AuxK reads the dense pre-activations, but its
  `fused_encoder` backward drops their gradient, so AuxK trains only the decoder; here the dead
  latents' top-k_aux come from a second, gradient-free `topk_encode` pass over the dead latents, run
  only on steps with dead latents: no N x M tensor anywhere in `forward`.
- "fused": pyinterp's exact AuxK from the same encoder pass; its gradient reaches W_enc and b_enc,
  so the dead latents' encoder rows train too (changed host behaviour) and the second pass is gone.

`multi_topk=True` (Multi-TopK, Gao et al.): `multi_topk_fvu` is the FVU of the 4k best latents'
reconstruction, and `sae_out` / `latent_acts` / `latent_indices` are then the 4k ones, as the
host returns them. faithful: a second, gradient-free `topk_encode` pass with 4k (the host's 4k
codes come from its dense pre-activations, whose gradient its backward drops: the Multi-TopK loss
trains the decoder only). fused: one pass with 4k whose first k are the top-k; the Multi-TopK
gradient reaches the encoder too (changed host behaviour).

In both modes a row with fewer than k positive pre-activations differs from the host in the zero
activations only: the host sends gradient to whichever zero latents `torch.topk` picked, pyinterp
stops it at the ReLU. `latent_acts` come in descending order (the host's are unordered).
`encode()` returns the host's `EncoderOutput`; its dense `pre_acts` are computed without gradient
in faithful mode (the host returns them) and are None in fused mode. `skip_connection` (W_skip)
and `transcode` (no b_dec on the input, target y) are the host's. Not supported (raises):
`activation="groupmax"`."""
from __future__ import annotations

import types

import torch
from torch import Tensor

from pyinterp.integrations._patching import ClassPatches, Patches, check_mode, checked_host, compute_dtype
from pyinterp.ops.sparse_decode import sparse_decode
from pyinterp.ops.topk_encode import topk_encode

DISTRIBUTION = "eai-sparsify"
SUPPORTED = ("1.3.0", "1.4.0")
_SIGNATURES = {
    "fused_encoder": ("input", "weight", "bias", "k", "activation"),
    "decoder_impl": ("top_indices", "top_acts", "W_dec"),
    "SparseCoder.forward": ("self", "x", "y", "dead_mask", "total_variance"),
    "SparseCoder.encode": ("self", "x"),
    "SparseCoder.decode": ("self", "top_acts", "top_indices"),
}

_class = ClassPatches("pyinterp.integrations.sparsify")
revert = _class.revert
is_applied = _class.is_applied


def _host():
    return checked_host("sparsify.sparse_coder", DISTRIBUTION, SUPPORTED, _SIGNATURES)[0]


def _encode(x: Tensor, weight: Tensor, bias: Tensor, k: int, b_dec: Tensor | None, **aux):
    """topk_encode in the host's compute dtype."""
    dtype = compute_dtype(weight)
    x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
    b_dec = None if b_dec is None else b_dec.to(dtype)
    return topk_encode(x, weight, bias, k, b_dec=b_dec, **aux)


def _decode(top_acts: Tensor, top_indices: Tensor, W_dec: Tensor) -> Tensor:
    return sparse_decode(top_acts, top_indices, W_dec, check_indices=False)


def _unsupported(cfg) -> None:
    if cfg.activation != "topk":
        raise NotImplementedError(f"pyinterp.integrations.sparsify: activation={cfg.activation!r} is not "
                                  "supported (only 'topk'); revert() to use sparsify's own encoder")


def _make_methods(host, mode: str):
    fused = mode == "fused"

    def fused_encoder(input, weight, bias, k, activation):
        if activation != "topk":
            raise NotImplementedError(f"pyinterp.integrations.sparsify: activation={activation!r} is not "
                                      "supported (only 'topk')")
        top_acts, top_indices = _encode(input, weight, bias, k, None)
        pre_acts = None
        if not fused:  # the host's EncoderOutput carries them; its backward ignores their gradient
            with torch.no_grad():
                dtype = compute_dtype(weight)
                pre_acts = torch.relu(torch.nn.functional.linear(input.to(dtype), weight.to(dtype),
                                                                 bias.to(dtype)))
        return host.EncoderOutput(top_acts, top_indices.long(), pre_acts)

    def decoder_impl(top_indices, top_acts, W_dec):
        return _decode(top_acts, top_indices, W_dec.mT)

    def encode(self, x):
        _unsupported(self.cfg)
        if not self.cfg.transcode:
            x = x - self.b_dec
        return fused_encoder(x, self.encoder.weight, self.encoder.bias, self.cfg.k, self.cfg.activation)

    def decode(self, top_acts, top_indices):
        assert self.W_dec is not None, "Decoder weight was not initialized."
        return _decode(top_acts.to(self.dtype), top_indices, self.W_dec) + self.b_dec

    def forward(self, x, y=None, *, dead_mask=None, total_variance=None):
        _unsupported(self.cfg)
        assert self.W_dec is not None, "Decoder weight was not initialized."
        if y is None:
            y = x
        b_dec_in = None if self.cfg.transcode else self.b_dec
        weight, bias = self.encoder.weight, self.encoder.bias
        num_dead = int(dead_mask.sum()) if dead_mask is not None else 0
        # sparsify's AuxK sizes (Appendix B.1 of Gao et al.): k_aux = d_out / 2, scaled down when few are dead
        k_aux = min(y.shape[-1] // 2, num_dead)
        scale = min(num_dead / (y.shape[-1] // 2), 1.0) if num_dead else 0.0
        k = self.cfg.k
        # fused multi-TopK: one pass of the 4k best, whose first k (descending) are the top-k
        # (docs/sae_family.md, "Host SAEs as pyinterp modules")
        k_pass = 4 * k if fused and self.cfg.multi_topk else k
        if fused and k_aux > 0:
            top_acts, top_indices, aux_acts, aux_indices = _encode(x, weight, bias, k_pass, b_dec_in,
                                                                   dead_mask=dead_mask, k_aux=k_aux)
        else:
            top_acts, top_indices = _encode(x, weight, bias, k_pass, b_dec_in)
            if k_aux > 0:  # the host's AuxK activations carry no gradient into the encoder
                with torch.no_grad():
                    aux_b_dec = None if b_dec_in is None else b_dec_in.detach()
                    _, _, aux_acts, aux_indices = _encode(x.detach(), weight.detach(), bias.detach(), 1,
                                                          aux_b_dec, dead_mask=dead_mask, k_aux=k_aux)
        if k_pass != k:
            multi_acts, multi_indices = top_acts, top_indices
            top_acts, top_indices = top_acts[:, :k], top_indices[:, :k]
        sae_out = _decode(top_acts.to(self.dtype), top_indices, self.W_dec) + self.b_dec
        if self.W_skip is not None:
            sae_out = sae_out + x.to(self.dtype) @ self.W_skip.mT
        e = y - sae_out
        if total_variance is None:
            total_variance = (y - y.mean(0)).pow(2).sum()
        if k_aux > 0:
            # b_dec is inside the residual e already, so e_hat has none
            e_hat = _decode(aux_acts.to(self.dtype), aux_indices, self.W_dec)
            auxk_loss = scale * (e_hat - e.detach()).pow(2).sum() / total_variance
        else:
            auxk_loss = sae_out.new_tensor(0.0)
        fvu = e.pow(2).sum() / total_variance
        multi_topk_fvu = sae_out.new_tensor(0.0)
        if self.cfg.multi_topk:
            # The host's Multi-TopK: the FVU of the 4k best latents' reconstruction (no skip term),
            # which then replaces sae_out and the codes in ForwardOutput. Its 4k codes come from the
            # encoder's dense output, whose gradient the host drops: only the decoder trains on it.
            if not fused:
                with torch.no_grad():
                    multi_acts, multi_indices = _encode(x.detach(), weight.detach(), bias.detach(), 4 * k,
                                                        None if b_dec_in is None else b_dec_in.detach())
            sae_out = _decode(multi_acts.to(self.dtype), multi_indices, self.W_dec) + self.b_dec
            multi_topk_fvu = (sae_out - y).pow(2).sum() / total_variance
            top_acts, top_indices = multi_acts, multi_indices
        return host.ForwardOutput(sae_out, top_acts, top_indices.long(), fvu, auxk_loss, multi_topk_fvu)

    return fused_encoder, decoder_impl, {"forward": forward, "encode": encode, "decode": decode}


def apply(mode: str = "faithful", *, sae=None) -> Patches:
    """Route sparsify's SparseCoder through pyinterp's topk_encode / sparse_decode.

    sae=None patches the class (every SparseCoder, and sparsify.sparse_coder's fused_encoder and
    decoder_impl); sae=<SparseCoder> patches that instance only. Returns the Patches: their
    revert() (or leaving them as a context manager) undoes it; revert() undoes the class-level one.
    Raises HostMismatch when the installed sparsify is outside the supported versions or the
    signatures of the functions it replaces changed."""
    check_mode("pyinterp.integrations.sparsify.apply", mode)
    host = _host()
    fused_encoder, decoder_impl, methods = _make_methods(host, mode)
    if sae is not None:
        if not isinstance(sae, host.SparseCoder):
            raise TypeError(f"pyinterp.integrations.sparsify.apply: sae must be a sparsify SparseCoder, "
                            f"got {type(sae).__name__}")
        _unsupported(sae.cfg)
        patches = _class.start_instance(sae, "forward", mode)
        for name, method in methods.items():
            patches.set(sae, name, types.MethodType(method, sae))
        return patches
    patches = _class.start(mode)
    patches.set(host, "fused_encoder", fused_encoder)
    patches.set(host, "decoder_impl", decoder_impl)
    for name, method in methods.items():
        patches.set(host.SparseCoder, name, method)
    return patches
