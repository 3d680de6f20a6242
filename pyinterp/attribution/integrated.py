"""Integrated Jacobians (vector-output integrated gradients) of any batched callable.

For g: R^{S x D} -> R^E, input x and reference r (Delta = x - r), docs/attribution.md defines
    Jbar = int_0^1 J_g(r + a * Delta) da  ~  sum_k w_k J_g(r + a_k * Delta)        (E, S, D)
    P[e, s] = sum_d Jbar[e, s, d] * Delta[s, d]                                      (E, S)
    eps = P @ 1_S - (g(x) - g(r))                        completeness residual, returned for free
(Sundararajan et al. 2017 for E = 1; Moeller et al., EMNLP 2023 for vector outputs.)

Two ways to get P, chosen by cost under mode="auto":
  vjp  one reverse pass per (node, output dim): E * N samples. Many cotangents go through one backward
       by replicating the path batch (replica b carries cotangent e_b); each backward's gradients are
       folded into fp32 running sums by pyinterp.ij_accumulate, so (E, N, S, D) never exists. Gives Jbar.
  jvp  one forward-mode pass per (node, token): S * N samples, tangent = Delta restricted to token s,
       whose JVP is exactly the column P[:, s]. Attention runs in its math form (PyTorch has no
       forward-mode rule for the fused SDPA kernels)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.nn.attention import SDPBackend, sdpa_kernel

from pyinterp._dtypes import FLOAT_DTYPES, accumulator_dtype
from pyinterp._validation import check_int, check_tensor
from pyinterp.attribution.quadrature import check_method, nodes_and_weights
from pyinterp.ops.ij_accumulate import ij_accumulate

MODES = ("auto", "vjp", "jvp")
# One forward-mode sample costs about this many reverse-mode samples (PyTorch 2.13 on CPU, BERT layers:
# 2.8x at 16 tokens, 7x at 128; the math attention and the tangent copies dominate). Under "auto",
# jvp is chosen when FORWARD_MODE_COST * tokens < outputs.
FORWARD_MODE_COST = 4.0

# fn(states, owners) -> (B, E): states (B, S, *features) are path points, owners (B,) int64 says which
# input of the batch each row belongs to (models need each input's own attention mask).
BatchFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class IntegratedJacobian:
    """P (E, S): integrated Jacobian contracted with Delta per token; eps (E): completeness residual
    P.sum(1) - (g_x - g_r); g_x, g_r (E): outputs at input and reference; jbar (E, *x.shape) or None."""
    P: Tensor
    eps: Tensor
    g_x: Tensor
    g_r: Tensor
    jbar: Optional[Tensor]
    method: str
    n_steps: int
    mode: str


def choose_mode(mode: str, tokens: int, outputs: int, return_jbar: bool, where: str) -> str:
    if mode not in MODES:
        raise ValueError(f"{where}: unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "jvp" and return_jbar:
        raise ValueError(f"{where}: return_jbar needs mode='vjp' (or 'auto'): forward mode gives P "
                         "one token at a time, never the full Jacobian")
    if mode != "auto":
        return mode
    if return_jbar:
        return "vjp"
    return "jvp" if FORWARD_MODE_COST * tokens < outputs else "vjp"


def check_path_inputs(x: Tensor, reference: Tensor, where: str) -> None:
    check_tensor(where, "x", x, dtypes=FLOAT_DTYPES)
    check_tensor(where, "reference", reference, dtypes=FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError(f"{where}: x must have a token dimension first, (S, *features); got a scalar")
    if reference.shape != x.shape:
        raise ValueError(f"{where}: reference must have the shape of x {tuple(x.shape)}, "
                         f"got {tuple(reference.shape)}")
    if reference.device != x.device or reference.dtype != x.dtype:
        raise ValueError(f"{where}: reference must have x's device and dtype ({x.device}, {x.dtype}), "
                         f"got ({reference.device}, {reference.dtype})")


def _outputs(fn: BatchFn, states: Tensor, owners: Tensor, where: str) -> Tensor:
    out = fn(states, owners)
    if out.dim() == 1:
        out = out.unsqueeze(1)
    if out.dim() != 2 or out.shape[0] != states.shape[0]:
        raise ValueError(f"{where}: fn must map a batch of {states.shape[0]} path points to "
                         f"({states.shape[0]}, E) outputs, got shape {tuple(out.shape)} (for a function "
                         "of one unbatched input, pass batched=False)")
    return out


def integrate_batch(fn: BatchFn, xs: Tensor, refs: Tensor, *, n_steps: int, method: str, mode: str,
                    chunk_size: int, return_jbar: bool, lengths: Optional[list[int]] = None,
                    backend: str = "auto", where: str = "integrated_jacobian") -> list[IntegratedJacobian]:
    """Integrated Jacobians of T inputs xs (T, S, *features) against refs, sharing fn. lengths[t] (default
    S) is the number of leading tokens of input t that can matter (padding beyond it gets P = 0)."""
    check_method(method, n_steps, where)
    check_int(where, "chunk_size", chunk_size, low=1, meaning="path samples per forward/backward pass")
    num_inputs, tokens = xs.shape[0], xs.shape[1]
    lengths = lengths or [tokens] * num_inputs
    device = xs.device
    owners = torch.arange(num_inputs, device=device)
    with torch.no_grad():
        ends = _outputs(fn, torch.cat([xs, refs]), torch.cat([owners, owners]), where)
    outputs = ends.shape[1]
    automatic = mode == "auto"
    mode = choose_mode(mode, max(lengths), outputs, return_jbar, where)
    alphas, weights = nodes_and_weights(method, n_steps)
    acc = accumulator_dtype(xs.dtype)
    alphas, weights = alphas.to(device, xs.dtype), weights.to(device, acc)
    results = []
    for t in range(num_inputs):
        delta = xs[t] - refs[t]
        P = torch.zeros(outputs, tokens, dtype=acc, device=device)
        jbar = torch.zeros(outputs, *xs.shape[1:], dtype=acc, device=device) if return_jbar else None
        owner = owners[t:t + 1]
        if mode == "jvp":
            try:
                _accumulate_jvp(fn, refs[t], delta, owner, alphas, weights, P, lengths[t], chunk_size)
            except NotImplementedError as exc:  # an op of fn without a forward-mode rule (if the error
                if not automatic:                 # has another cause, reverse mode raises it again)
                    raise
                warnings.warn(f"{where}: an op of fn has no forward-mode rule ({str(exc).splitlines()[0]}); "
                              "using reverse mode", RuntimeWarning, stacklevel=2)
                mode = "vjp"
                P.zero_()
        if mode == "vjp":
            _accumulate_vjp(fn, refs[t], delta, owner, alphas, weights, P, jbar, chunk_size, backend)
        g_x, g_r = ends[t].to(acc), ends[num_inputs + t].to(acc)
        eps = P.sum(1) - (g_x - g_r)
        results.append(IntegratedJacobian(P, eps, g_x, g_r, jbar, method, n_steps, mode))
    return results


def _path_points(reference: Tensor, delta: Tensor, alphas: Tensor) -> Tensor:
    """(K, S, *features): r + a_k * Delta."""
    shape = (-1,) + (1,) * reference.dim()
    return reference.unsqueeze(0) + alphas.view(shape) * delta.unsqueeze(0)


def _accumulate_vjp(fn, reference, delta, owner, alphas, weights, P, jbar, chunk_size, backend):
    outputs = P.shape[0]
    out_chunk = min(outputs, chunk_size)
    node_chunk = max(1, chunk_size // out_chunk)
    sample_shape = reference.shape
    for k0 in range(0, alphas.numel(), node_chunk):
        points = _path_points(reference, delta, alphas[k0:k0 + node_chunk])
        nodes = points.shape[0]
        for e0 in range(0, outputs, out_chunk):
            dims = min(out_chunk, outputs - e0)
            # replica (k, j) of node k carries the cotangent of output dim e0 + j
            states = points.unsqueeze(1).expand(nodes, dims, *sample_shape).reshape(nodes * dims, *sample_shape)
            states = states.contiguous().requires_grad_(True)
            with torch.enable_grad():
                out = _outputs(fn, states, owner.expand(nodes * dims), "integrated_jacobian")
                cotangent = torch.zeros_like(out)
                replica = torch.arange(nodes * dims, device=out.device)
                cotangent[replica, e0 + replica % dims] = 1
                (grads,) = torch.autograd.grad(out, states, cotangent)
            ij_accumulate(grads.view(nodes, dims, *sample_shape), weights[k0:k0 + nodes], delta,
                          P=P[e0:e0 + dims], Jbar=jbar[e0:e0 + dims] if jbar is not None else None,
                          backend=backend)


def _accumulate_jvp(fn, reference, delta, owner, alphas, weights, P, length, chunk_size):
    token_chunk = min(length, chunk_size)
    node_chunk = max(1, chunk_size // token_chunk)
    sample_shape = reference.shape
    for s0 in range(0, length, token_chunk):
        count = min(token_chunk, length - s0)
        picked = torch.arange(count, device=delta.device)
        # tangent j = Delta on token s0 + j, zero elsewhere: its JVP is P[:, s0 + j] at that node
        tangents = torch.zeros(count, *sample_shape, dtype=delta.dtype, device=delta.device)
        tangents[picked, s0 + picked] = delta[s0:s0 + count]
        for k0 in range(0, alphas.numel(), node_chunk):
            points = _path_points(reference, delta, alphas[k0:k0 + node_chunk])
            nodes = points.shape[0]
            # contiguous copies: make_dual refuses expanded (self-overlapping) views
            states = points.unsqueeze(1).expand(nodes, count, *sample_shape).reshape(-1, *sample_shape).contiguous()
            directions = tangents.unsqueeze(0).expand(nodes, -1, *sample_shape).reshape(-1, *sample_shape).contiguous()
            with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), forward_ad.dual_level():
                out = _outputs(fn, forward_ad.make_dual(states, directions), owner.expand(nodes * count),
                               "integrated_jacobian")
                jvp = forward_ad.unpack_dual(out).tangent
            if jvp is None:  # fn does not depend on its input
                continue
            P[:, s0:s0 + count] += torch.einsum("k,kje->ej", weights[k0:k0 + nodes],
                                                jvp.view(nodes, count, -1).to(P.dtype))


def _batched(fn: Callable[[Tensor], Tensor], batched: bool) -> BatchFn:
    if batched:
        return lambda states, owners: fn(states)
    return lambda states, owners: torch.stack([fn(state) for state in states])


def integrated_jacobian(fn: Callable[[Tensor], Tensor], x: Tensor, reference: Tensor, *, n_steps: int = 10,
                        method: str = "gauss_legendre", mode: str = "auto", chunk_size: int = 64,
                        return_jbar: bool = False, batched: bool = True,
                        backend: str = "auto") -> IntegratedJacobian:
    """Integrated Jacobian of fn from reference to x.

    fn maps a batch of inputs (B, *x.shape) to (B, E) (or (B,) for E = 1); with batched=False it maps
    one input x.shape to (E,) and is called once per path point. x: (S, *features), tokens first.
    method: left | right | midpoint | trapezoid | gauss_legendre. mode: auto | vjp | jvp.
    chunk_size: path samples per forward/backward pass (bounds the memory: fn's activations for that
    many samples, plus P (E, S) and, with return_jbar, Jbar (E, *x.shape) in fp32)."""
    where = "integrated_jacobian"
    check_path_inputs(x, reference, where)
    check_method(method, n_steps, where)
    if mode not in MODES:
        raise ValueError(f"{where}: unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    (result,) = integrate_batch(_batched(fn, batched), x.unsqueeze(0), reference.unsqueeze(0), n_steps=n_steps,
                                method=method, mode=mode, chunk_size=chunk_size, return_jbar=return_jbar,
                                backend=backend, where=where)
    return result


@dataclass
class IntegratedGradients:
    """attributions (x.shape): Delta * integrated gradient; eps: completeness residual
    attributions.sum() - (g_x - g_r); g_x, g_r: the scalar outputs at input and reference."""
    attributions: Tensor
    eps: Tensor
    g_x: Tensor
    g_r: Tensor


def integrated_gradients(fn: Callable[[Tensor], Tensor], x: Tensor, reference: Tensor, *, n_steps: int = 10,
                         method: str = "gauss_legendre", chunk_size: int = 64, batched: bool = True,
                         backend: str = "auto") -> IntegratedGradients:
    """Integrated gradients of a scalar-output fn (the E = 1 case), one attribution per input feature.
    fn maps (B, *x.shape) to (B,) or (B, 1) (batched=False: x.shape to a scalar)."""
    if not batched:
        scalar_fn = fn
        fn, batched = (lambda states: torch.stack([scalar_fn(state).reshape(()) for state in states])), True
    result = integrated_jacobian(fn, x, reference, n_steps=n_steps, method=method, mode="vjp",
                                 chunk_size=chunk_size, return_jbar=True, batched=batched, backend=backend)
    if result.P.shape[0] != 1:
        raise ValueError(f"integrated_gradients: fn must have one output per input (E = 1), got "
                         f"E = {result.P.shape[0]}; use integrated_jacobian for vector outputs")
    attributions = result.jbar[0] * (x - reference).to(result.jbar.dtype)
    return IntegratedGradients(attributions, result.eps[0], result.g_x[0], result.g_r[0])
