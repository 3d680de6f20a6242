"""sparse_decode: x_hat = sum_j values[:, j] * W_dec[indices[:, j]] + b_dec, and the sparse products
(gather_sum, gather_dot, sparse_t_matmul) that both SAE ops' backwards are made of.

Native kernels (cpu, cuda) are registered in C++ against the schemas in csrc/bindings.cpp; the Triton
kernels (kernels/triton/sparse_decode.py) are registered here as custom ops."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from pyinterp import _dispatch, _dtypes, _extension, _validation
from pyinterp.reference import sparse_decode as reference

_extension.cpu_extension()  # defines the pyinterp:: schemas


# ---- fake (meta) functions: shapes only ----
@torch.library.register_fake("pyinterp::gather_sum")
def _gather_sum_fake(values, indices, weight, bias):
    return values.new_empty(values.shape[0], weight.shape[1])


@torch.library.register_fake("pyinterp::gather_dot")
def _gather_dot_fake(grad, indices, weight):
    return grad.new_empty(indices.shape)


@torch.library.register_fake("pyinterp::sparse_t_matmul")
def _sparse_t_matmul_fake(coef, indices, rows, num_latents):
    return (rows.new_empty(num_latents, rows.shape[1]),
            rows.new_empty(num_latents, dtype=_dtypes.accumulator_dtype(rows.dtype)))


# ---- Triton kernels as custom ops ----
@torch.library.custom_op("pyinterp::gather_sum_triton", mutates_args=())
def gather_sum_triton(values: Tensor, indices: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return _dispatch.triton_kernels("sparse_decode").gather_sum(values, indices, weight, bias)


@torch.library.custom_op("pyinterp::gather_dot_triton", mutates_args=())
def gather_dot_triton(grad: Tensor, indices: Tensor, weight: Tensor) -> Tensor:
    return _dispatch.triton_kernels("sparse_decode").gather_dot(grad, indices, weight)


@torch.library.custom_op("pyinterp::sparse_t_matmul_triton", mutates_args=())
def sparse_t_matmul_triton(coef: Tensor, indices: Tensor, rows: Tensor,
                           num_latents: int) -> tuple[Tensor, Tensor]:
    return _dispatch.triton_kernels("sparse_decode").sparse_t_matmul(coef, indices, rows, num_latents)


gather_sum_triton.register_fake(_gather_sum_fake)
gather_dot_triton.register_fake(_gather_dot_fake)
sparse_t_matmul_triton.register_fake(_sparse_t_matmul_fake)


class SparseKernels(NamedTuple):
    """The sparse products of one backend; both SAE ops' backwards are made of them."""
    gather_sum: object
    gather_dot: object
    sparse_t_matmul: object


def _native() -> SparseKernels:  # cpu and cuda: the dispatcher picks the kernel of the tensors' device
    ops = torch.ops.pyinterp
    return SparseKernels(ops.gather_sum, ops.gather_dot, ops.sparse_t_matmul)


def _triton() -> SparseKernels:
    ops = torch.ops.pyinterp
    return SparseKernels(ops.gather_sum_triton, ops.gather_dot_triton, ops.sparse_t_matmul_triton)


SPEC = _dispatch.register(_dispatch.OpSpec(
    "sparse_decode", kernels={"cuda": _native, "triton": _triton, "cpu": _native}))


def _narrow_indices(indices: Tensor, num_latents: int, check: bool) -> Tensor:
    """Range-check (when asked, and always for int64, which could wrap), then narrow to int32."""
    if check or indices.dtype == torch.int64:
        _validation.check_index_range("sparse_decode", "indices", indices, num_latents,
                                      "the number of latents, W_dec.shape[0]")
    return indices.to(torch.int32)


# ---- the public op ----
@torch.library.custom_op("pyinterp::sparse_decode", mutates_args=())
def _sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Optional[Tensor],
                   backend: str, check_indices: bool) -> Tensor:
    indices = _narrow_indices(indices, W_dec.shape[0], check_indices)
    return SPEC.kernel(backend).gather_sum(values, indices, W_dec, b_dec)


@_sparse_decode.register_fake
def _(values, indices, W_dec, b_dec, backend, check_indices):
    return values.new_empty(values.shape[0], W_dec.shape[1])


def _setup_context(ctx, inputs, output):
    values, indices, W_dec, b_dec, backend, _ = inputs
    ctx.save_for_backward(values, indices, W_dec)
    ctx.backend = backend
    ctx.has_b_dec = b_dec is not None


def _backward(ctx, grad):
    values, indices, W_dec = ctx.saved_tensors
    indices = indices.to(torch.int32)  # checked in the forward
    kernels = SPEC.kernel(ctx.backend)
    grad = grad.contiguous()
    grad_values = grad_W_dec = grad_b_dec = None
    if ctx.needs_input_grad[0]:
        grad_values = kernels.gather_dot(grad, indices, W_dec)
    if ctx.needs_input_grad[2]:
        grad_W_dec, _ = kernels.sparse_t_matmul(values, indices, grad, W_dec.shape[0])
    if ctx.has_b_dec and ctx.needs_input_grad[3]:
        grad_b_dec = grad.sum(0, dtype=_dtypes.accumulator_dtype(grad.dtype)).to(grad.dtype)
    return grad_values, None, grad_W_dec, grad_b_dec, None, None


_sparse_decode.register_autograd(_backward, setup_context=_setup_context)


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor | None = None, *,
                  backend: str = "auto", check_indices: bool = True) -> Tensor:
    """Decode sparse codes: x_hat[..., :] = sum_j values[..., j] * W_dec[indices[..., j]] + b_dec.

    values (..., k) float; indices (..., k) int32 or int64 in [0, M); W_dec (M, D), row i = latent i's
    direction; b_dec (D) or None. Returns (..., D) in values' dtype, accumulated in fp32; no rows in,
    no rows out. Differentiable in values, W_dec and b_dec; the W_dec gradient is deterministic.
    check_indices=False skips the (host-syncing) range check of int32 indices, for indices that come
    from topk_encode; int64 indices are always checked before they are narrowed to int32. Unchecked
    out-of-range int32 indices are never read through: cuda and triton count such an entry as zero
    (forward and backward), cpu checks anyway (it costs no sync there) and raises.
    backend: "auto", "cuda", "triton", "cpu" or "torch" (the reference)."""
    op = "sparse_decode"
    num_latents, width, k = _validation.check_sparse_code(op, values, indices, W_dec, b_dec)
    leading = values.shape[:-1]
    flat_values = values.reshape(-1, k)
    flat_indices = indices.reshape(-1, k)
    backend = SPEC.resolve(backend, values.device)
    if backend == "torch" or flat_values.shape[0] == 0:  # no rows: the reference's empty result
        flat_indices = _narrow_indices(flat_indices, num_latents, check_indices)
        out = reference.sparse_decode(flat_values, flat_indices, W_dec, b_dec)
    else:
        out = torch.ops.pyinterp.sparse_decode(flat_values, flat_indices, W_dec, b_dec, backend,
                                               check_indices)
    return out.reshape(*leading, width)
