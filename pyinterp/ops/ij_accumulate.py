"""ij_accumulate: add one chunk of quadrature nodes of an integrated Jacobian into running fp32 sums.

    Jc[e, s, :] = sum_k weights[k] * grads[k, e, s, :]
    P[e, s]    += Jc[e, s, :] . delta[s, :]          Jbar[e, s, :] += Jc[e, s, :]   (only when asked)

It is called once per chunk inside the attribution loop (pyinterp.attribution) on the gradients of one
backward pass, so the (E, N, S, D) tensor of per-node gradients never exists.

Native kernels (cpu, cuda) are registered in C++ against the schema in csrc/bindings.cpp; the Triton
kernel (kernels/triton/ij_accumulate.py) is registered here as a custom op.

No autograd formula: the op mutates its running sums (torch.library does not differentiate mutable
custom ops), and its inputs are gradients taken at the end of a backward pass; differentiating an
attribution would need second derivatives of the model, which the attribution loop never builds."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from pyinterp import _dispatch, _dtypes, _extension, _validation
from pyinterp.reference import ij_accumulate as reference

OP = "ij_accumulate"

if _extension.cpu_extension() is not None:  # defines the pyinterp:: schemas (absent in a pure-Python build)
    @torch.library.register_fake("pyinterp::ij_accumulate_")
    def _ij_accumulate_fake(P, Jbar, grads, weights, delta):
        return None


@torch.library.custom_op("pyinterp::ij_accumulate_triton_", mutates_args=("P", "Jbar"))
def ij_accumulate_triton_(P: Tensor, Jbar: Optional[Tensor], grads: Tensor, weights: Tensor,
                          delta: Tensor) -> None:
    _dispatch.triton_kernels("ij_accumulate").ij_accumulate_(P, Jbar, grads, weights, delta)


@ij_accumulate_triton_.register_fake
def _ij_accumulate_triton_fake(P, Jbar, grads, weights, delta):
    return None


# Every kernel adds one chunk into P (and Jbar) in place: (P, Jbar or None, grads, weights, delta).
def _reference_accumulate_(P: Tensor, Jbar: Optional[Tensor], grads: Tensor, weights: Tensor,
                           delta: Tensor) -> None:
    p_chunk, jbar_chunk = reference.ij_accumulate(grads, weights, delta, Jbar is not None)
    P.add_(p_chunk)
    if Jbar is not None:
        Jbar.add_(jbar_chunk)


SPEC = _dispatch.register(_dispatch.OpSpec(OP, kernels={
    "cuda": lambda: torch.ops.pyinterp.ij_accumulate_,
    "triton": lambda: ij_accumulate_triton_,
    "cpu": lambda: torch.ops.pyinterp.ij_accumulate_,
    "torch": lambda: _reference_accumulate_,
}))


def _check_running_sum(name: str, tensor: Optional[Tensor], shape: tuple[int, ...], dtype: torch.dtype,
                       device: torch.device) -> None:
    if tensor is None:
        return
    _validation.check_tensor(OP, name, tensor)
    _validation.check_shape(OP, name, tensor, shape)
    if tensor.dtype != dtype:
        raise TypeError(f"{OP}: {name} must be {dtype} (the accumulator dtype for these grads), "
                        f"got {tensor.dtype}")
    if tensor.device != device:
        raise ValueError(f"{OP}: {name} is on {tensor.device} but grads is on {device}")
    if not tensor.is_contiguous():
        raise ValueError(f"{OP}: {name} must be contiguous (it is updated in place)")


def ij_accumulate(grads: Tensor, weights: Tensor, delta: Tensor, *, P: Optional[Tensor] = None,
                  Jbar: Optional[Tensor] = None, return_jbar: bool = False,
                  backend: str = "auto") -> tuple[Tensor, Optional[Tensor]]:
    """Add one chunk of K quadrature nodes into P (and Jbar), in place; returns (P, Jbar or None).

    grads: (K, E, S, *features), the gradients of E outputs at K path points, any float dtype.
    weights: (K,) quadrature weights of those nodes. delta: (S, *features) = input - reference.
    P: running (E, S) sum, or None to start from zeros. Jbar: running (E, S, *features) sum, or None;
    with return_jbar=True and no Jbar a zero one is started. Both are in the accumulator dtype: fp32,
    or fp64 for fp64 grads. backend: auto | cuda | triton | cpu | torch."""
    _validation.check_tensor(OP, "grads", grads, dtypes=_validation.FLOAT_DTYPES)
    if grads.dim() < 3:
        raise ValueError(f"{OP}: grads must be (K, E, S, *features), got shape {tuple(grads.shape)}")
    num_nodes, outputs, tokens = grads.shape[:3]
    features = tuple(grads.shape[3:])
    _validation.check_tensor(OP, "weights", weights, ndim=1, dtypes=_validation.FLOAT_DTYPES)
    _validation.check_shape(OP, "weights", weights, (num_nodes,), "one weight per node of grads")
    _validation.check_tensor(OP, "delta", delta, dtypes=_validation.FLOAT_DTYPES)
    _validation.check_shape(OP, "delta", delta, (tokens, *features), "grads.shape[2:]")
    _validation.check_same_device(OP, "grads", grads, weights=weights, delta=delta)
    acc = _dtypes.accumulator_dtype(grads.dtype)
    _check_running_sum("P", P, (outputs, tokens), acc, grads.device)
    _check_running_sum("Jbar", Jbar, (outputs, tokens, *features), acc, grads.device)
    backend = SPEC.resolve(backend, grads.device)

    if P is None:
        P = torch.zeros(outputs, tokens, dtype=acc, device=grads.device)
    if Jbar is None and return_jbar:
        Jbar = torch.zeros(outputs, tokens, *features, dtype=acc, device=grads.device)
    width = math.prod(features)
    grads_2d = grads.reshape(num_nodes, outputs, tokens, width).contiguous()
    weights_acc = weights.to(acc).contiguous()
    delta_acc = delta.reshape(tokens, width).to(acc).contiguous()
    jbar_2d = Jbar.view(outputs, tokens, width) if Jbar is not None else None

    SPEC.kernel(backend)(P, jbar_2d, grads_2d, weights_acc, delta_acc)
    return P, Jbar
