"""topk_encode: the fused top-k SAE encoder (docs/sae.md). The N x M pre-activations are never stored.

Forward kernels: native (cpu, cuda) registered in C++ as pyinterp::topk_encode_forward, Triton
registered here. The backward is sparse: it reuses sparse_decode's gather_sum (dx) and
sparse_t_matmul (dW_enc, db_enc), plus one GEMV for db_dec; no N x M or N x k x D intermediate."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from pyinterp import _dispatch, _validation
from pyinterp.ops import sparse_decode
from pyinterp.reference import topk_encode as reference


@torch.library.register_fake("pyinterp::topk_encode_forward")
def _topk_encode_forward_fake(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux):
    n = x.shape[0]
    return (x.new_empty(n, k), x.new_empty(n, k, dtype=torch.int32),
            x.new_empty(n, k_aux), x.new_empty(n, k_aux, dtype=torch.int32))


@torch.library.custom_op("pyinterp::topk_encode_forward_triton", mutates_args=())
def topk_encode_forward_triton(x: Tensor, W_enc: Tensor, b_enc: Optional[Tensor],
                               b_dec: Optional[Tensor], k: int, dead_mask: Optional[Tensor],
                               k_aux: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _dispatch.triton_kernels("topk_encode").topk_encode_forward(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux)


topk_encode_forward_triton.register_fake(_topk_encode_forward_fake)


def _unsupported(backend: str, *, tensors_on: torch.device, rows: int, latents: int, k: int,
                 k_aux: int) -> str:
    """Why `backend` cannot run this request (naming the argument), or ''. The Triton kernels on a
    GPU bound the keys one program merges (kernels/triton/topk_encode.py, MAX_FINALIZE_KEYS); the
    interpreter has no such bound."""
    if backend != "triton" or tensors_on.type != "cuda" or rows == 0:
        return ""
    return _dispatch.triton_kernels("topk_encode").gpu_unsupported(rows, latents, k, k_aux, tensors_on)


SPEC = _dispatch.register(_dispatch.OpSpec("topk_encode", kernels={
    "cuda": lambda: torch.ops.pyinterp.topk_encode_forward,
    "triton": lambda: torch.ops.pyinterp.topk_encode_forward_triton,
    "cpu": lambda: torch.ops.pyinterp.topk_encode_forward,
}, supports=_unsupported))


@torch.library.custom_op("pyinterp::topk_encode", mutates_args=())
def _topk_encode(x: Tensor, W_enc: Tensor, b_enc: Optional[Tensor], b_dec: Optional[Tensor], k: int,
                 dead_mask: Optional[Tensor], k_aux: int,
                 backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return SPEC.kernel(backend)(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux)


@_topk_encode.register_fake
def _(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux, backend):
    return _topk_encode_forward_fake(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux)


def _setup_context(ctx, inputs, output):
    x, W_enc, b_enc, b_dec, _, _, _, backend = inputs
    values, indices, aux_values, aux_indices = output
    ctx.save_for_backward(x, W_enc, b_dec, values, indices, aux_values, aux_indices)
    ctx.backend = backend
    ctx.has_b_enc = b_enc is not None
    ctx.mark_non_differentiable(indices, aux_indices)


def _backward(ctx, grad_values, _grad_indices, grad_aux_values, _grad_aux_indices):
    x, W_enc, b_dec, values, indices, aux_values, aux_indices = ctx.saved_tensors
    # Top-k selection is constant; the ReLU mask (value > 0) stops gradient at unfired latents.
    coef = torch.where(values > 0, grad_values, 0) if grad_values is not None else torch.zeros_like(values)
    selected = indices
    if aux_indices.shape[1] > 0 and grad_aux_values is not None:
        coef = torch.cat([coef, torch.where(aux_values > 0, grad_aux_values, 0)], dim=1)
        selected = torch.cat([indices, aux_indices], dim=1)
    coef = coef.to(x.dtype).contiguous()
    kernels = sparse_decode.SPEC.kernel(ctx.backend)
    grad_x = grad_W_enc = grad_b_enc = grad_b_dec = None
    if ctx.needs_input_grad[0]:
        grad_x = kernels.gather_sum(coef, selected, W_enc, None)
    need_b_dec = b_dec is not None and ctx.needs_input_grad[3]
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2] or need_b_dec:
        x_centered = x if b_dec is None else x - b_dec
        grad_W, coef_sum = kernels.sparse_t_matmul(coef, selected, x_centered, W_enc.shape[0])
        grad_W_enc = grad_W if ctx.needs_input_grad[1] else None
        if ctx.has_b_enc and ctx.needs_input_grad[2]:
            grad_b_enc = coef_sum.to(x.dtype)
        if need_b_dec:
            # d/db_dec of x - b_dec summed over rows: -(sum_n dL/dx~[n]) = -(coef_sum @ W_enc)
            grad_b_dec = -(coef_sum @ W_enc.to(coef_sum.dtype)).to(x.dtype)
    return grad_x, grad_W_enc, grad_b_enc, grad_b_dec, None, None, None, None


_topk_encode.register_autograd(_backward, setup_context=_setup_context)


def topk_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor | None, k: int, *, b_dec: Tensor | None = None,
                dead_mask: Tensor | None = None, k_aux: int = 0, scale: Tensor | None = None,
                scaled_values: bool = True, backend: str = "auto"):
    """Fused top-k SAE encoder: top-k of z = (x - b_dec) @ W_enc^T + b_enc per row, then ReLU.

    x (..., D); W_enc (M, D); b_enc (M) or None; b_dec (D) or None (the decoder's pre-bias).
    Returns (values, indices), each (..., k): values post-ReLU in x's dtype, descending, ties to the
    lower latent index; indices int32; no rows in, no rows out. With dead_mask (M, bool) and k_aux > 0
    it also returns (aux_values, aux_indices) (..., k_aux): the top-k_aux over dead latents only, from
    the same pass (for the AuxK loss; its gradient reaches W_enc and b_enc). With scale (M,) > 0 (e.g.
    the decoder row norms) both selections rank s_i * z_i and the values are s_i * z_i, or z_i with
    scaled_values=False; the kernels fold s into a scaled copy of W_enc and b_enc (one M x D product per
    call), and gradients reach scale when it requires grad. Gradients flow to x, W_enc, b_enc and b_dec;
    weight gradients are deterministic. backend: "auto", "cuda", "triton", "cpu" or "torch"."""
    op = "topk_encode"
    num_latents, width = _validation.check_encoder(op, x, W_enc, b_enc=b_enc, b_dec=b_dec, scale=scale,
                                                   dead_mask=dead_mask)
    _validation.check_same_device(op, "x", x, W_enc=W_enc, b_enc=b_enc, b_dec=b_dec, dead_mask=dead_mask,
                                  scale=scale)
    _validation.check_same_dtype(op, "x", x, W_enc=W_enc, b_enc=b_enc, b_dec=b_dec, scale=scale)
    _validation.check_shape(op, "b_enc", b_enc, (num_latents,), "one bias per latent, W_enc.shape[0]")
    _validation.check_shape(op, "b_dec", b_dec, (width,), "x.shape[-1]")
    _validation.check_shape(op, "scale", scale, (num_latents,), "one scale per latent, W_enc.shape[0]")
    _validation.check_top_k(op, "k", k, num_latents)
    _validation.check_int(op, "k_aux", k_aux, low=0, high=num_latents,
                          meaning="0 <= k_aux <= the number of latents")
    if dead_mask is not None:
        _validation.check_tensor(op, "dead_mask", dead_mask, dtypes=(torch.bool,))
        _validation.check_shape(op, "dead_mask", dead_mask, (num_latents,), "one flag per latent")
    if k_aux > 0 and dead_mask is None:
        raise ValueError(f"{op}: k_aux={k_aux} needs dead_mask (which latents are dead)")
    if scale is not None and not bool(((scale > 0) & torch.isfinite(scale)).all()):
        raise ValueError(f"{op}: scale must be positive and finite (the ranking s_i * z_i keeps the "
                         "ReLU's sign only for s_i > 0)")
    leading = x.shape[:-1]
    with_aux = dead_mask is not None and k_aux > 0
    dead_mask, k_aux = (dead_mask, k_aux) if with_aux else (None, 0)
    flat_x = x.reshape(-1, width)
    backend = SPEC.resolve(backend, x.device, tensors_on=x.device, rows=flat_x.shape[0],
                           latents=num_latents, k=k, k_aux=k_aux)
    if backend == "torch" or flat_x.shape[0] == 0:  # no rows: the reference's empty result
        outputs = reference.topk_encode(flat_x, W_enc, b_enc, k, b_dec, dead_mask, k_aux, scale,
                                        scaled_values)
    else:
        weight, bias = W_enc, b_enc
        if scale is not None:  # s_i * z_i = (s_i w_i) . (x - b_dec) + s_i b_i
            weight = W_enc * scale[:, None]
            bias = None if b_enc is None else b_enc * scale
        outputs = torch.ops.pyinterp.topk_encode(flat_x.contiguous(), weight.contiguous(), bias, b_dec, k,
                                                 dead_mask, k_aux, backend)
        if not with_aux:
            outputs = outputs[:2]
        if scale is not None and not scaled_values:
            outputs = _unscale(outputs, scale)
    return tuple(t.reshape(*leading, t.shape[-1]) for t in outputs)


def _unscale(outputs: tuple[Tensor, ...], scale: Tensor) -> tuple[Tensor, ...]:
    """(s_i z_i, i) pairs -> (z_i, i): divide each value by its latent's scale."""
    unscaled = list(outputs)
    for position in range(0, len(outputs), 2):
        values, indices = outputs[position], outputs[position + 1]
        unscaled[position] = values / scale[indices.long()]
    return tuple(unscaled)
