"""Quadrature rules on [0, 1] for the path integral of integrated gradients / Jacobians.

Nodes are built from integer indices (k / N), never from a float arange: arange(1, 0, -1/N) returns
N + 1 points for some N (49, 98) because of rounding in the step. All weights sum to 1 (a popular
library's trapezoid rule uses 1/N with halved endpoints, which sums to 1 - 1/N and biases
attributions low; see docs/attribution.md, "Quadrature")."""
from __future__ import annotations

import numpy as np
import torch

# rule -> error order for smooth integrands ("spectral": faster than any power of 1/N)
METHODS = {"left": 1, "right": 1, "midpoint": 2, "trapezoid": 2, "gauss_legendre": "spectral"}


def check_method(method: str, n_steps: int, where: str) -> None:
    if method not in METHODS:
        raise ValueError(f"{where}: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if isinstance(n_steps, bool) or not isinstance(n_steps, int):
        raise TypeError(f"{where}: n_steps must be an int, got {type(n_steps).__name__}")
    minimum = 2 if method == "trapezoid" else 1
    if n_steps < minimum:
        raise ValueError(f"{where}: n_steps must be >= {minimum} for method {method!r}, got {n_steps}")


def nodes_and_weights(method: str, n_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(alphas, weights), float64 tensors of length n_steps, alphas in [0, 1] ascending, sum(weights) = 1."""
    check_method(method, n_steps, "nodes_and_weights")
    k = torch.arange(n_steps, dtype=torch.int64)
    n = n_steps
    if method == "left":
        alphas, weights = k.double() / n, torch.full((n,), 1.0 / n, dtype=torch.float64)
    elif method == "right":
        alphas, weights = (k + 1).double() / n, torch.full((n,), 1.0 / n, dtype=torch.float64)
    elif method == "midpoint":
        alphas, weights = (2 * k + 1).double() / (2 * n), torch.full((n,), 1.0 / n, dtype=torch.float64)
    elif method == "trapezoid":
        alphas = k.double() / (n - 1)
        weights = torch.full((n,), 1.0 / (n - 1), dtype=torch.float64)
        weights[0] = weights[-1] = 0.5 / (n - 1)
    else:  # Gauss-Legendre on [-1, 1] mapped to [0, 1]: exact for polynomials of degree 2N - 1
        t, w = np.polynomial.legendre.leggauss(n)
        alphas, weights = torch.from_numpy((t + 1) / 2), torch.from_numpy(w / 2)
    return alphas, weights
