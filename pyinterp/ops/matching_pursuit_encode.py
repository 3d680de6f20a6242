"""matching_pursuit_encode: the MP-SAE encoder (docs/sae_family.md, "Matching pursuit"), k greedy steps
per row on the tied decoder, listed as (values, indices) that sparse_decode takes.

Forward kernels: cpu (csrc/cpu/matching_pursuit_encode.cpp) and triton
(kernels/triton/matching_pursuit_encode.py); given a Gram matrix both update the scores instead of
recomputing them. No CUDA kernel of its own: on a GPU, auto takes the Triton one. The backward is the
reverse pass over the k steps of docs/sae_family.md with the selected indices fixed: O(k D) per row,
made of row gathers and the backend's deterministic sparse_t_matmul (pyinterp/ops/sparse_decode.py)."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from pyinterp import _dispatch, _dtypes, _extension, _validation
from pyinterp.ops import sparse_decode
from pyinterp.reference import matching_pursuit_encode as reference

_extension.cpu_extension()  # defines the pyinterp:: schemas


class MatchingPursuitOutput(NamedTuple):
    """values / indices (..., k): the coefficient and latent of each greedy step, in step order; a
    step that was not live or came after the row was done lists value 0, index 0."""
    values: Tensor
    indices: Tensor


@torch.library.register_fake("pyinterp::matching_pursuit_forward")
def _forward_fake(x, W_dec, b_dec, gram, k, positive, residual_threshold, stop_on_duplicate_support):
    return x.new_empty(x.shape[0], k), x.new_empty(x.shape[0], k, dtype=torch.int32)


@torch.library.custom_op("pyinterp::matching_pursuit_forward_triton", mutates_args=())
def matching_pursuit_forward_triton(x: Tensor, W_dec: Tensor, b_dec: Optional[Tensor], gram: Optional[Tensor],
                                    k: int, positive: bool, residual_threshold: float,
                                    stop_on_duplicate_support: bool) -> tuple[Tensor, Tensor]:
    return _dispatch.triton_kernels("matching_pursuit_encode").matching_pursuit_forward(
        x, W_dec, b_dec, gram, k, positive, residual_threshold, stop_on_duplicate_support)


matching_pursuit_forward_triton.register_fake(_forward_fake)

SPEC = _dispatch.register(_dispatch.OpSpec("matching_pursuit_encode", kernels={
    "triton": lambda: torch.ops.pyinterp.matching_pursuit_forward_triton,
    "cpu": lambda: torch.ops.pyinterp.matching_pursuit_forward,
}))


@torch.library.custom_op("pyinterp::matching_pursuit_encode", mutates_args=())
def _matching_pursuit_encode(x: Tensor, W_dec: Tensor, b_dec: Optional[Tensor], gram: Optional[Tensor], k: int,
                             positive: bool, residual_threshold: float, stop_on_duplicate_support: bool,
                             backend: str) -> tuple[Tensor, Tensor]:
    return SPEC.kernel(backend)(x, W_dec, b_dec, gram, k, positive, residual_threshold, stop_on_duplicate_support)


@_matching_pursuit_encode.register_fake
def _(x, W_dec, b_dec, gram, k, positive, residual_threshold, stop_on_duplicate_support, backend):
    return x.new_empty(x.shape[0], k), x.new_empty(x.shape[0], k, dtype=torch.int32)


def _setup_context(ctx, inputs, output):
    x, W_dec, b_dec, _, _, _, _, _, backend = inputs
    ctx.save_for_backward(x, W_dec, b_dec, *output)
    ctx.backend = backend
    ctx.mark_non_differentiable(output[1])


def _unrolled_backward(grad_values: Tensor, x_centered: Tensor, W: Tensor, values: Tensor, indices: Tensor,
                      sparse_t_matmul) -> tuple[Tensor, Tensor]:
    """(dL/d(x - b_dec), dL/dW) of the k unrolled steps, the indices fixed (docs/sae_family.md, "Matching
    pursuit": the reverse pass). All in x_centered's dtype; a zero coefficient is a step that did nothing."""
    n, k = values.shape
    atoms = W[indices.long()]                                              # (N, k, D): w_{s_t}
    # r_k = r_0 - sum_t c_t w_{s_t}; walking back, r_{t-1} = r_t + c_t w_{s_t}.
    residual = x_centered - torch.einsum("nk,nkd->nd", values, atoms)
    adjoint = torch.zeros_like(x_centered)                                  # dL/dr_t, none at r_k
    weight_terms = torch.empty_like(atoms)
    live = values != 0
    for t in range(k - 1, -1, -1):
        atom, c = atoms[:, t], values[:, t:t + 1]
        residual = residual + c * atom                                      # r_{t-1}
        h = torch.where(live[:, t:t + 1], grad_values[:, t:t + 1] - (adjoint * atom).sum(1, keepdim=True), 0)
        weight_terms[:, t] = h * residual - c * adjoint                     # dL/dw_{s_t} of step t
        adjoint = adjoint + h * atom                                        # dL/dr_{t-1}
    ones = x_centered.new_ones(n * k, 1)
    grad_W, _ = sparse_t_matmul(ones, indices.reshape(n * k, 1).contiguous(),
                                weight_terms.reshape(n * k, -1), W.shape[0])
    return adjoint, grad_W


def _backward(ctx, grad_values, _grad_indices):
    x, W_dec, b_dec, values, indices = ctx.saved_tensors
    dtype = _dtypes.accumulator_dtype(x.dtype)
    x_centered = x.to(dtype) if b_dec is None else x.to(dtype) - b_dec.to(dtype)
    grad_values = torch.zeros_like(values, dtype=dtype) if grad_values is None else grad_values.to(dtype)
    kernels = sparse_decode.SPEC.kernel(ctx.backend)
    grad_centered, grad_W = _unrolled_backward(grad_values, x_centered, W_dec.to(dtype), values.to(dtype), indices,
                                              kernels.sparse_t_matmul)
    grad_x = grad_centered.to(x.dtype) if ctx.needs_input_grad[0] else None
    grad_W_dec = grad_W.to(W_dec.dtype) if ctx.needs_input_grad[1] else None
    grad_b_dec = (-grad_centered.sum(0)).to(x.dtype) if b_dec is not None and ctx.needs_input_grad[2] else None
    return grad_x, grad_W_dec, grad_b_dec, None, None, None, None, None, None


_matching_pursuit_encode.register_autograd(_backward, setup_context=_setup_context)


def gram_matrix(W_dec: Tensor) -> Tensor:
    """W_dec W_dec^T (M, M) in the accumulator dtype, without gradient: the kernels' score update."""
    with torch.no_grad():
        W = W_dec.detach().to(_dtypes.accumulator_dtype(W_dec.dtype))
        return W @ W.T


def matching_pursuit_encode(x: Tensor, W_dec: Tensor, k: int, *, b_dec: Tensor | None = None,
                            positive: bool = False, residual_threshold: float = 0.0,
                            stop_on_duplicate_support: bool = False, gram: Tensor | None = None,
                            backend: str = "auto") -> MatchingPursuitOutput:
    """Matching pursuit on the tied decoder: from r = x - b_dec, k times pick the latent i of largest
    <r, w_i> (positive=True, SAELens' MatchingPursuitSAE) or |<r, w_i>| (positive=False), list
    c = <r, w_i> (exact MP for unit-norm decoder rows; no division by ||w_i||^2, as SAELens) and
    subtract c w_i. A row stops after a step that leaves ||r|| < residual_threshold (if > 0) or, with
    stop_on_duplicate_support, that added no new latent (SAELens' rules; its defaults are positive=True,
    residual_threshold=1e-2, stop_on_duplicate_support=True). Decode with
    pyinterp.sparse_decode(values, indices, W_dec, b_dec).

    x (..., D); W_dec (M, D); 1 <= k <= D. gram: W_dec W_dec^T from gram_matrix(W_dec) (cache it while
    W_dec does not change) lets the cpu and triton kernels update scores in O(M) per step instead of
    O(M D); the selections agree up to rounding (the torch reference ignores it). Gradients flow to x,
    W_dec and b_dec through the coefficients and residual updates with the selections fixed (the exact
    gradient of the unrolled loop).
    backend: "auto", "triton", "cpu" or "torch"."""
    op = "matching_pursuit_encode"
    num_latents, width = _validation.check_encoder(op, x, W_dec, weight_name="W_dec", b_dec=b_dec)
    _validation.check_same_device(op, "x", x, W_dec=W_dec, b_dec=b_dec, gram=gram)
    _validation.check_same_dtype(op, "x", x, W_dec=W_dec, b_dec=b_dec)
    _validation.check_shape(op, "b_dec", b_dec, (width,), "x.shape[-1]")
    _validation.check_int(op, "k", k, low=1, high=width,
                          meaning="1 <= k <= D: matching pursuit takes at most D = x.shape[-1] steps")
    residual_threshold = _validation.check_number(op, "residual_threshold", residual_threshold, low=0.0,
                                                  meaning="the residual norm at which a row stops")
    if gram is not None:
        _validation.check_tensor(op, "gram", gram, ndim=2, dtypes=(_dtypes.accumulator_dtype(x.dtype),))
        _validation.check_shape(op, "gram", gram, (num_latents, num_latents), "W_dec @ W_dec.T")
    leading = x.shape[:-1]
    flat_x = x.reshape(-1, width)
    backend = SPEC.resolve(backend, x.device)
    options = (bool(positive), residual_threshold, bool(stop_on_duplicate_support))
    if backend == "torch" or flat_x.shape[0] == 0:  # no rows: the reference's empty result
        values, indices = reference.matching_pursuit_encode(flat_x, W_dec, k, b_dec, *options)
    else:
        values, indices = torch.ops.pyinterp.matching_pursuit_encode(
            flat_x.contiguous(), W_dec.contiguous(), b_dec, gram, k, *options, backend)
    return MatchingPursuitOutput(values.reshape(*leading, k), indices.reshape(*leading, k))
