"""prefix_decode: the nested reconstructions of a Matryoshka SAE from ONE sparse decode
(docs/sae_family.md, "Matryoshka", "The prefix decode").

out[p] = sum over the active latents with index < prefixes[p] of value * W_dec row, + b_dec: each row's
active latents are grouped by prefix bucket and added bucket by bucket into one accumulator, whose
running sum is emitted at every prefix boundary, so each decoder row is read once for all P prefixes.
The backward takes the suffix sums G[b] = sum_{p >= b} dL/dout[p] (a latent of bucket b is in every
prefix from b on) and runs the bucket-aware analogues of sparse_decode's gather_dot and
sparse_t_matmul, whose grad row depends on the latent's bucket (so theirs, which take one grad row per
token, do not fit without P-fold work).

Backends: cuda (kernels/cuda/prefix_decode.cu, glue csrc/cuda/prefix_decode.cpp; at most
CUDA_MAX_PREFIXES prefixes, float32/float16/bfloat16; other calls fall to triton under auto), triton (kernels/triton/prefix_decode.py),
cpu (csrc/cpu/prefix_decode.cpp) and torch (the reference)."""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from pyinterp import _dispatch, _dtypes, _extension, _validation
from pyinterp.reference import prefix_decode as reference

_extension.cpu_extension()  # defines the pyinterp:: schemas


@torch.library.register_fake("pyinterp::prefix_decode_forward")
def _forward_fake(values, indices, weight, bias, prefixes):
    return values.new_empty(len(prefixes), values.shape[0], weight.shape[1])


@torch.library.register_fake("pyinterp::prefix_gather_dot")
def _gather_dot_fake(grad_suffix, indices, weight, prefixes):
    return grad_suffix.new_empty(indices.shape)


@torch.library.register_fake("pyinterp::prefix_t_matmul")
def _t_matmul_fake(coef, indices, grad_suffix, prefixes):
    return grad_suffix.new_empty(prefixes[-1], grad_suffix.shape[2])


@torch.library.custom_op("pyinterp::prefix_decode_forward_triton", mutates_args=())
def prefix_decode_forward_triton(values: Tensor, indices: Tensor, weight: Tensor, bias: Optional[Tensor],
                                 prefixes: list[int]) -> Tensor:
    return _dispatch.triton_kernels("prefix_decode").prefix_decode(values, indices, weight, bias, prefixes)


@torch.library.custom_op("pyinterp::prefix_gather_dot_triton", mutates_args=())
def prefix_gather_dot_triton(grad_suffix: Tensor, indices: Tensor, weight: Tensor, prefixes: list[int]) -> Tensor:
    return _dispatch.triton_kernels("prefix_decode").prefix_gather_dot(grad_suffix, indices, weight, prefixes)


@torch.library.custom_op("pyinterp::prefix_t_matmul_triton", mutates_args=())
def prefix_t_matmul_triton(coef: Tensor, indices: Tensor, grad_suffix: Tensor, prefixes: list[int]) -> Tensor:
    return _dispatch.triton_kernels("prefix_decode").prefix_t_matmul(coef, indices, grad_suffix, prefixes)


prefix_decode_forward_triton.register_fake(_forward_fake)
prefix_gather_dot_triton.register_fake(_gather_dot_fake)
prefix_t_matmul_triton.register_fake(_t_matmul_fake)


class PrefixKernels(NamedTuple):
    forward: object
    gather_dot: object
    t_matmul: object


def _native() -> PrefixKernels:  # cpu and cuda: the dispatcher picks the kernel of the tensors' device
    ops = torch.ops.pyinterp
    return PrefixKernels(ops.prefix_decode_forward, ops.prefix_gather_dot, ops.prefix_t_matmul)


def _triton() -> PrefixKernels:
    ops = torch.ops.pyinterp
    return PrefixKernels(ops.prefix_decode_forward_triton, ops.prefix_gather_dot_triton,
                         ops.prefix_t_matmul_triton)


# The prefix sizes reach the CUDA kernels as a launch argument of this many (kernels/cuda/prefix_decode.cuh,
# kMaxPrefixes).
CUDA_MAX_PREFIXES = 64


def _supports(backend: str, *, num_prefixes: int, dtype: torch.dtype) -> str:
    if backend != "cuda":
        return ""
    if num_prefixes > CUDA_MAX_PREFIXES:
        return (f"the cuda prefix decode takes at most {CUDA_MAX_PREFIXES} prefixes, got {num_prefixes} "
                f"(use triton or torch)")
    if dtype == torch.float64:
        return "the cuda prefix decode takes float32, float16 or bfloat16 values, got float64 (use triton or torch)"
    return ""


SPEC = _dispatch.register(_dispatch.OpSpec(
    "prefix_decode", kernels={"cuda": _native, "triton": _triton, "cpu": _native}, supports=_supports))


def check_prefixes(op: str, name: str, prefixes, num_latents: int, latents_name: str) -> list[int]:
    """prefixes: a non-empty sequence of ints, strictly increasing, >= 1, the last = num_latents."""
    if isinstance(prefixes, (str, bytes)) or not isinstance(prefixes, Sequence) or len(prefixes) == 0:
        raise TypeError(f"{op}: {name} must be a non-empty list of ints (nested dictionary sizes), "
                        f"got {prefixes!r}")
    sizes = [_validation.check_int(op, f"{name}[{p}]", size, low=1, meaning="each prefix holds >= 1 latent")
             for p, size in enumerate(prefixes)]
    for p in range(1, len(sizes)):
        if sizes[p] <= sizes[p - 1]:
            raise ValueError(f"{op}: {name} must be strictly increasing, got {sizes} "
                             f"({name}[{p}] = {sizes[p]} <= {name}[{p - 1}] = {sizes[p - 1]})")
    if sizes[-1] != num_latents:
        raise ValueError(f"{op}: {name}[-1] must be {latents_name} = {num_latents} (the last prefix is the "
                         f"whole dictionary), got {sizes[-1]}")
    return sizes


@torch.library.custom_op("pyinterp::prefix_decode", mutates_args=())
def _prefix_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Optional[Tensor],
                   prefixes: list[int], backend: str) -> Tensor:
    return SPEC.kernel(backend).forward(values, indices, W_dec, b_dec, prefixes)


@_prefix_decode.register_fake
def _(values, indices, W_dec, b_dec, prefixes, backend):
    return _forward_fake(values, indices, W_dec, b_dec, prefixes)


def _setup_context(ctx, inputs, output):
    values, indices, W_dec, b_dec, prefixes, backend = inputs
    ctx.save_for_backward(values, indices, W_dec)
    ctx.prefixes, ctx.backend, ctx.has_b_dec = prefixes, backend, b_dec is not None


def _backward(ctx, grad):
    values, indices, W_dec = ctx.saved_tensors
    kernels = SPEC.kernel(ctx.backend)
    grad_suffix = reference.suffix_sum(grad).to(W_dec.dtype).contiguous()
    grad_values = grad_W_dec = grad_b_dec = None
    if ctx.needs_input_grad[0]:
        grad_values = kernels.gather_dot(grad_suffix, indices, W_dec, ctx.prefixes)
    if ctx.needs_input_grad[2]:
        grad_W_dec = kernels.t_matmul(values, indices, grad_suffix, ctx.prefixes)
    if ctx.has_b_dec and ctx.needs_input_grad[3]:
        grad_b_dec = grad.sum((0, 1), dtype=_dtypes.accumulator_dtype(grad.dtype)).to(grad.dtype)
    return grad_values, None, grad_W_dec, grad_b_dec, None, None


_prefix_decode.register_autograd(_backward, setup_context=_setup_context)


def prefix_decode(values: Tensor, indices: Tensor, W_dec: Tensor, prefixes: Sequence[int],
                  b_dec: Tensor | None = None, *, backend: str = "auto", check_indices: bool = True) -> Tensor:
    """The reconstructions of every nested prefix of the dictionary from one sparse decode:

        out[p, ...] = sum_{j: indices[..., j] < prefixes[p]} values[..., j] * W_dec[indices[..., j]] + b_dec

    values (..., k) float; indices (..., k) int32 or int64 in [0, M); W_dec (M, D); prefixes the
    nested dictionary sizes m_0 < m_1 < ... < m_{P-1} = M (e.g. M/16, M/8, ..., M); b_dec (D) or None.
    Returns (P, ..., D) in values' dtype, accumulated in fp32; out[-1] is sparse_decode's result.
    Differentiable in values, W_dec and b_dec (weight gradients deterministic). check_indices=False
    skips the host-syncing range check of int32 indices that come from pyinterp's encoders (an
    out-of-range one lies in no prefix on cuda and triton; cpu raises). backend: "auto", "cuda" (at
    most CUDA_MAX_PREFIXES prefixes, no float64; auto takes triton for the others), "triton", "cpu" or "torch" (the
    reference)."""
    op = "prefix_decode"
    num_latents, width, k = _validation.check_sparse_code(op, values, indices, W_dec, b_dec)
    sizes = check_prefixes(op, "prefixes", prefixes, num_latents, "W_dec.shape[0]")
    leading = values.shape[:-1]
    flat_values, flat_indices = values.reshape(-1, k), indices.reshape(-1, k)
    if check_indices or flat_indices.dtype == torch.int64:
        _validation.check_index_range(op, "indices", flat_indices, num_latents,
                                      "the number of latents, W_dec.shape[0]")
    flat_indices = flat_indices.to(torch.int32)
    backend = SPEC.resolve(backend, values.device, num_prefixes=len(sizes), dtype=values.dtype)
    if backend == "torch" or flat_values.shape[0] == 0:  # no rows: the reference's empty result
        out = reference.prefix_decode(flat_values, flat_indices, W_dec, sizes, b_dec)
    else:
        out = torch.ops.pyinterp.prefix_decode(flat_values.contiguous(), flat_indices.contiguous(),
                                               W_dec.contiguous(), b_dec, sizes, backend)
    return out.reshape(len(sizes), *leading, width)
