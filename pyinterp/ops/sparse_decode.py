"""sparse_decode: x_hat = sum_j values[:, j] * W_dec[indices[:, j]] + b_dec, and the sparse products
(gather_sum, gather_dot, sparse_t_matmul) that both SAE ops' backwards are made of.

Native kernels (cpu, cuda) are registered in C++ against the schemas in csrc/bindings.cpp; the Triton
kernels (kernels/triton/sparse_decode.py) are registered here as custom ops."""
from __future__ import annotations

import importlib
import math
from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor

from pyinterp import _backend, _extension, _validation
from pyinterp.reference import sparse_decode as reference

_extension.cpu_extension()  # defines the pyinterp:: schemas


def triton_kernels(op: str):
    """The Triton launcher module of `op`, imported on first use (the interpreter mode must be set first)."""
    return importlib.import_module(f"pyinterp._kernels.triton.{op}")


# ---- fake (meta) functions: shapes only ----
@torch.library.register_fake("pyinterp::gather_sum")
def _gather_sum_fake(values, indices, weight, bias):
    return values.new_empty(values.shape[0], weight.shape[1])


@torch.library.register_fake("pyinterp::gather_dot")
def _gather_dot_fake(grad, indices, weight):
    return grad.new_empty(indices.shape)


@torch.library.register_fake("pyinterp::sparse_t_matmul")
def _sparse_t_matmul_fake(coef, indices, rows, num_latents):
    coef_sum_dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
    return (rows.new_empty(num_latents, rows.shape[1]),
            rows.new_empty(num_latents, dtype=coef_sum_dtype))


# ---- Triton kernels as custom ops ----
@torch.library.custom_op("pyinterp::gather_sum_triton", mutates_args=())
def gather_sum_triton(values: Tensor, indices: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return triton_kernels("sparse_decode").gather_sum(values, indices, weight, bias)


@torch.library.custom_op("pyinterp::gather_dot_triton", mutates_args=())
def gather_dot_triton(grad: Tensor, indices: Tensor, weight: Tensor) -> Tensor:
    return triton_kernels("sparse_decode").gather_dot(grad, indices, weight)


@torch.library.custom_op("pyinterp::sparse_t_matmul_triton", mutates_args=())
def sparse_t_matmul_triton(coef: Tensor, indices: Tensor, rows: Tensor,
                           num_latents: int) -> tuple[Tensor, Tensor]:
    return triton_kernels("sparse_decode").sparse_t_matmul(coef, indices, rows, num_latents)


gather_sum_triton.register_fake(_gather_sum_fake)
gather_dot_triton.register_fake(_gather_dot_fake)
sparse_t_matmul_triton.register_fake(_sparse_t_matmul_fake)


def sparse_kernels(backend: str) -> SimpleNamespace:
    """gather_sum, gather_dot and sparse_t_matmul of a backend (torch: the reference)."""
    if backend in ("cpu", "cuda"):
        ops = torch.ops.pyinterp
        return SimpleNamespace(gather_sum=ops.gather_sum, gather_dot=ops.gather_dot,
                               sparse_t_matmul=ops.sparse_t_matmul)
    if backend == "triton":
        ops = torch.ops.pyinterp
        return SimpleNamespace(gather_sum=ops.gather_sum_triton, gather_dot=ops.gather_dot_triton,
                               sparse_t_matmul=ops.sparse_t_matmul_triton)
    return SimpleNamespace(gather_sum=reference.gather_sum, gather_dot=reference.gather_dot,
                           sparse_t_matmul=reference.sparse_t_matmul)


# ---- the public op ----
@torch.library.custom_op("pyinterp::sparse_decode", mutates_args=())
def _sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Optional[Tensor],
                   backend: str, check_indices: bool) -> Tensor:
    if check_indices:
        _validation.check_index_range("sparse_decode", "indices", indices, W_dec.shape[0],
                                      "the number of latents, W_dec.shape[0]")
    return sparse_kernels(backend).gather_sum(values, indices, W_dec, b_dec)


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
    kernels = sparse_kernels(ctx.backend)
    grad = grad.contiguous()
    grad_values = grad_W_dec = grad_b_dec = None
    if ctx.needs_input_grad[0]:
        grad_values = kernels.gather_dot(grad, indices, W_dec)
    if ctx.needs_input_grad[2]:
        grad_W_dec, _ = kernels.sparse_t_matmul(values, indices, grad, W_dec.shape[0])
    if ctx.has_b_dec and ctx.needs_input_grad[3]:
        grad_b_dec = grad.sum(0, dtype=torch.float32 if grad.dtype != torch.float64 else None)
        grad_b_dec = grad_b_dec.to(grad.dtype)
    return grad_values, None, grad_W_dec, grad_b_dec, None, None


_sparse_decode.register_autograd(_backward, setup_context=_setup_context)


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor | None = None, *,
                  backend: str = "auto", check_indices: bool = True) -> Tensor:
    """Decode sparse codes: x_hat[..., :] = sum_j values[..., j] * W_dec[indices[..., j]] + b_dec.

    values (..., k) float; indices (..., k) int32 or int64 in [0, M); W_dec (M, D), row i = latent i's
    direction; b_dec (D) or None. Returns (..., D) in values' dtype, accumulated in fp32.
    Differentiable in values, W_dec and b_dec; the W_dec gradient is deterministic.
    check_indices=False skips the (host-syncing) range check, for indices that come from topk_encode.
    backend: "auto", "cuda", "triton", "cpu" or "torch" (the reference)."""
    op = "sparse_decode"
    _validation.check_tensor(op, "values", values, dtypes=_validation.FLOAT_DTYPES)
    _validation.check_tensor(op, "indices", indices, dtypes=_validation.INDEX_DTYPES)
    _validation.check_tensor(op, "W_dec", W_dec, ndim=2)
    if values.dim() < 1 or indices.shape != values.shape:
        raise ValueError(f"{op}: indices must have the shape of values {tuple(values.shape)}, "
                         f"got {tuple(indices.shape)}")
    _validation.check_same_device(op, "values", values, indices=indices, W_dec=W_dec, b_dec=b_dec)
    _validation.check_same_dtype(op, "values", values, W_dec=W_dec, b_dec=b_dec)
    num_latents, width = W_dec.shape
    _validation.check_shape(op, "b_dec", b_dec, (width,), "W_dec.shape[1]")
    k = values.shape[-1]
    _validation.check_int(op, "k (values.shape[-1])", k, low=1)
    leading = values.shape[:-1]
    if math.prod(leading) == 0 or num_latents == 0:
        raise ValueError(f"{op}: empty input (values {tuple(values.shape)}, W_dec "
                         f"{tuple(W_dec.shape)}); nothing to decode")
    flat_values = values.reshape(-1, k)
    flat_indices = indices.reshape(-1, k).to(torch.int32)
    backend = _backend.resolve(backend, values.device, op)
    if backend == "torch":
        if check_indices:
            _validation.check_index_range(op, "indices", flat_indices, num_latents,
                                          "the number of latents, W_dec.shape[0]")
        out = reference.sparse_decode(flat_values, flat_indices, W_dec, b_dec)
    else:
        out = torch.ops.pyinterp.sparse_decode(flat_values, flat_indices, W_dec, b_dec, backend,
                                               check_indices)
    return out.reshape(*leading, width)
