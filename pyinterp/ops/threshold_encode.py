"""threshold_encode: the JumpReLU SAE encoder (docs/sae_family.md, "JumpReLU"), with a variable number
of active latents per row in a capped, padded list (ascending latent index) plus per-row counts.

The latents above theta - eps/2 are the ones whose shifted pre-activation s = z - (theta - eps/2) is
positive. Every backend's selection returns, per row, those latents in ascending index with their
pre-activations z (accumulator dtype), how many it listed and whether the row had more than
max_active: the cpu kernel (csrc/cpu/threshold_encode.cpp) compacts them out of the tiled encoder GEMM
directly; cuda and triton select them with topk_encode's fused kernels (bias b_enc - theta + eps/2,
k = max_active + 1, the extra slot tells a truncated row), recompute z exactly with sparse_decode's
gather_dot and sort the list by index. The values, masks and counts follow from z elementwise; the
backward is sparse_decode's gather_sum / sparse_t_matmul, as in topk_encode."""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from pyinterp import _dispatch, _dtypes, _validation
from pyinterp.ops import sparse_decode, topk_encode
from pyinterp.reference import threshold_encode as reference


class ThresholdEncodeOutput(NamedTuple):
    """values / indices (..., max_active): the listed latents in ascending index, the active ones
    (z > theta) with their value, those in the STE band with value 0; after them the unused slots,
    index 0, value 0. counts (...) int32: active latents listed per row. l0 (...): the same count as
    a float, differentiable in threshold (straight-through). truncated_rows (): rows that had more
    than max_active latents above threshold - bandwidth / 2 (they keep the max_active largest
    z - threshold + bandwidth / 2)."""
    values: Tensor
    indices: Tensor
    counts: Tensor
    l0: Tensor
    truncated_rows: Tensor


@torch.library.register_fake("pyinterp::threshold_encode_forward")
def _threshold_encode_forward_fake(x, W_enc, b_enc, b_dec, lower, max_active):
    n = x.shape[0]
    return (x.new_empty(n, max_active, dtype=_dtypes.accumulator_dtype(x.dtype)),
            x.new_empty(n, max_active, dtype=torch.int32), x.new_empty(n, dtype=torch.int32),
            x.new_empty(n, dtype=torch.bool))


def _select_with_topk(backend, x, W_enc, b_enc, b_dec, lower, max_active):
    """The selection contract of threshold_encode_forward on topk_encode's kernels: top-(max_active + 1)
    of the shifted pre-activations, the positive ones kept, z recomputed, the list sorted by index."""
    num_latents = W_enc.shape[0]
    lower = lower.to(x.dtype)  # folded into the bias in x's dtype (docs/sae_family.md, "Limits")
    shifted_bias = -lower if b_enc is None else b_enc - lower
    selected = min(max_active + 1, num_latents)
    shifted, indices = topk_encode.SPEC.kernel(backend)(x, W_enc, shifted_bias.contiguous(), b_dec, selected,
                                                        None, 0)[:2]
    if selected > max_active:
        truncated = shifted[:, max_active] > 0
    else:
        truncated = shifted.new_zeros(x.shape[0], dtype=torch.bool)
    listed = shifted[:, :max_active] > 0
    indices = torch.where(listed, indices[:, :max_active], num_latents).sort(1).values
    listed = indices < num_latents
    indices = torch.where(listed, indices, 0).contiguous()
    dtype = _dtypes.accumulator_dtype(x.dtype)
    x_centered = x.to(dtype) if b_dec is None else x.to(dtype) - b_dec.to(dtype)
    z = sparse_decode.SPEC.kernel(backend).gather_dot(x_centered, indices, W_enc.to(dtype))
    z = z if b_enc is None else z + b_enc.to(dtype)[indices.long()]
    return torch.where(listed, z, 0), indices, listed.sum(1, dtype=torch.int32), truncated


def _supports(backend: str, *, dtype: torch.dtype) -> str:
    if backend == "triton" and dtype == torch.float64:
        return "the triton encoder takes float32, float16 or bfloat16 x, got float64 (use cpu, cuda or torch)"
    return ""


SPEC = _dispatch.register(_dispatch.OpSpec("threshold_encode", kernels={
    "cuda": lambda: functools.partial(_select_with_topk, "cuda"),
    "triton": lambda: functools.partial(_select_with_topk, "triton"),
    "cpu": lambda: torch.ops.pyinterp.threshold_encode_forward,
}, supports=_supports))


@torch.library.custom_op("pyinterp::threshold_encode", mutates_args=())
def _threshold_encode(x: Tensor, W_enc: Tensor, b_enc: Optional[Tensor], b_dec: Optional[Tensor],
                      threshold: Tensor, bandwidth: float, max_active: int,
                      backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    theta = threshold.to(_dtypes.accumulator_dtype(x.dtype))
    z, indices, listed_count, truncated = SPEC.kernel(backend)(x, W_enc, b_enc, b_dec, theta - bandwidth / 2,
                                                               max_active)
    listed = torch.arange(max_active, device=x.device) < listed_count[:, None]
    active = listed & (z > theta[indices.long()])
    values = torch.where(active, z, 0).to(x.dtype)
    counts = active.sum(1, dtype=torch.int32)
    # `listed` and z go out too, for the backward: the padding slots (index 0 may be active) and the
    # masks, without recomputing z.
    return values, indices, counts, counts.to(x.dtype), truncated.sum(), listed, z


@_threshold_encode.register_fake
def _(x, W_enc, b_enc, b_dec, threshold, bandwidth, max_active, backend):
    n = x.shape[0]
    return (x.new_empty(n, max_active), x.new_empty(n, max_active, dtype=torch.int32),
            x.new_empty(n, dtype=torch.int32), x.new_empty(n), x.new_empty((), dtype=torch.int64),
            x.new_empty(n, max_active, dtype=torch.bool),
            x.new_empty(n, max_active, dtype=_dtypes.accumulator_dtype(x.dtype)))


def _setup_context(ctx, inputs, output):
    x, W_enc, b_enc, b_dec, threshold, bandwidth, _, backend = inputs
    ctx.save_for_backward(x, W_enc, b_enc, b_dec, threshold, output[1], output[5], output[6])
    ctx.bandwidth, ctx.backend = bandwidth, backend
    ctx.mark_non_differentiable(output[1], output[2], output[4], output[5], output[6])


def _backward(ctx, grad_values, _grad_indices, _grad_counts, grad_l0, _grad_truncated, _grad_listed, _grad_z):
    x, W_enc, b_enc, b_dec, threshold, indices, listed, z = ctx.saved_tensors
    theta = threshold.to(z.dtype)[indices.long()]
    band = listed & reference.in_band(z, theta, ctx.bandwidth)
    grad_values = torch.zeros_like(z) if grad_values is None else grad_values.to(z.dtype)
    grad_l0 = torch.zeros_like(z[:, 0]) if grad_l0 is None else grad_l0.to(z.dtype)
    coef = torch.where(listed & (z > theta), grad_values, 0).to(x.dtype).contiguous()
    kernels = sparse_decode.SPEC.kernel(ctx.backend)
    num_latents = W_enc.shape[0]
    grad_x = grad_W_enc = grad_b_enc = grad_b_dec = grad_threshold = None
    if ctx.needs_input_grad[0]:
        grad_x = kernels.gather_sum(coef, indices, W_enc, None)
    if any(ctx.needs_input_grad[1:4]):
        x_centered = x if b_dec is None else x - b_dec
        grad_W, coef_sum = kernels.sparse_t_matmul(coef, indices, x_centered, num_latents)
        grad_W_enc = grad_W if ctx.needs_input_grad[1] else None
        if b_enc is not None and ctx.needs_input_grad[2]:
            grad_b_enc = coef_sum.to(x.dtype)
        if b_dec is not None and ctx.needs_input_grad[3]:
            grad_b_dec = -(coef_sum @ W_enc.to(coef_sum.dtype)).to(x.dtype)
    if ctx.needs_input_grad[4]:
        # Straight-through (docs/sae_family.md): -(theta grad_f + grad_l0) / eps inside the band.
        coef_theta = torch.where(band, -(theta * grad_values + grad_l0[:, None]) / ctx.bandwidth, 0)
        ones = x.new_ones(x.shape[0], 1)  # a per-latent sum as a deterministic segment reduction
        grad_threshold = kernels.sparse_t_matmul(coef_theta.to(x.dtype).contiguous(), indices, ones,
                                                 num_latents)[1].to(x.dtype)
    return grad_x, grad_W_enc, grad_b_enc, grad_b_dec, grad_threshold, None, None, None


_threshold_encode.register_autograd(_backward, setup_context=_setup_context)


def threshold_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor | None, threshold: Tensor, max_active: int,
                     *, b_dec: Tensor | None = None, bandwidth: float = 0.0,
                     backend: str = "auto") -> ThresholdEncodeOutput:
    """JumpReLU encoder: f_i = z_i * 1[z_i > threshold_i], z = (x - b_dec) @ W_enc^T + b_enc.

    x (..., D); W_enc (M, D); b_enc (M) or None; threshold (M,); b_dec (D) or None; at most
    max_active latents listed per row (ThresholdEncodeOutput says what comes back). bandwidth eps
    > 0 turns on the straight-through gradient to threshold (rectangle kernel of width eps,
    Rajamanoharan et al. 2024) and lists the band's latents too; eps = 0 is inference. Gradients
    flow to x, W_enc, b_enc, b_dec (through the active latents) and threshold (through values and
    l0). backend: "auto", "cuda", "triton", "cpu" or "torch"."""
    op = "threshold_encode"
    num_latents, width = _validation.check_encoder(op, x, W_enc, threshold=threshold, b_enc=b_enc, b_dec=b_dec)
    _validation.check_same_device(op, "x", x, W_enc=W_enc, b_enc=b_enc, b_dec=b_dec, threshold=threshold)
    _validation.check_same_dtype(op, "x", x, W_enc=W_enc, b_enc=b_enc, b_dec=b_dec, threshold=threshold)
    _validation.check_shape(op, "threshold", threshold, (num_latents,), "one threshold per latent, W_enc.shape[0]")
    _validation.check_shape(op, "b_enc", b_enc, (num_latents,), "one bias per latent, W_enc.shape[0]")
    _validation.check_shape(op, "b_dec", b_dec, (width,), "x.shape[-1]")
    _validation.check_top_k(op, "max_active", max_active, num_latents)
    bandwidth = _validation.check_number(op, "bandwidth", bandwidth, low=0.0,
                                         meaning="the width of the STE's rectangle kernel")
    if bandwidth == 0 and threshold.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{op}: bandwidth must be > 0 for a gradient to threshold (the straight-through "
                         "estimator's kernel width); pass bandwidth or detach threshold")
    leading = x.shape[:-1]
    flat_x = x.reshape(-1, width)
    backend = SPEC.resolve(backend, x.device, dtype=x.dtype)
    if backend == "torch" or flat_x.shape[0] == 0:  # no rows: the reference's empty result
        outputs = reference.threshold_encode(flat_x, W_enc, b_enc, threshold, max_active, b_dec, bandwidth)
    else:
        outputs = torch.ops.pyinterp.threshold_encode(flat_x.contiguous(), W_enc.contiguous(), b_enc, b_dec,
                                                      threshold, bandwidth, max_active, backend)
    values, indices, counts, l0, truncated_rows = outputs[:5]
    return ThresholdEncodeOutput(values.reshape(*leading, max_active), indices.reshape(*leading, max_active),
                                 counts.reshape(leading), l0.reshape(leading), truncated_rows)
