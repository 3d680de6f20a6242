"""Reference matching-pursuit encoder (docs/sae_family.md, "Matching pursuit").

The encoder is the decoder transposed (a tied SAE, as SAELens' MatchingPursuitSAE). From r_0 = x - b_dec,
k greedy steps t = 1..k, each on the rows that are not done yet:
    s_t = argmax_i <r_{t-1}, w_i>      (positive=True; SAELens' rule)  or  argmax_i |<r_{t-1}, w_i>|
    c_t = <r_{t-1}, w_{s_t}>           (no division by ||w_i||^2: exact MP for unit-norm decoder rows)
    r_t = r_{t-1} - c_t w_{s_t}
ties to the lower latent index. A step is live when c_t > 0 (positive) or c_t != 0 (signed); a step
that is not live subtracts nothing and lists index 0, value 0. After each step a row is done when
||r_t|| < residual_threshold (if > 0), or, with stop_on_duplicate_support, when the step was not live or
picked a latent the row already holds (SAELens' "support did not change"); a done row's later slots are
index 0, value 0. A latent may be listed twice (without stop_on_duplicate_support): sparse_decode sums
the slots, so the decode equals SAELens' dense one. Gradients flow through the coefficients and the
residual updates with the selected indices held fixed; torch's autograd of this loop is the spec."""
from __future__ import annotations

import torch

from pyinterp._dtypes import accumulator_dtype


def matching_pursuit_encode(x: torch.Tensor, W_dec: torch.Tensor, k: int, b_dec: torch.Tensor | None = None,
                            positive: bool = False, residual_threshold: float = 0.0,
                            stop_on_duplicate_support: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, D), W_dec (M, D) -> (values (N, k) in x's dtype, indices (N, k) int32)."""
    dtype = accumulator_dtype(x.dtype)
    residual = x.to(dtype) if b_dec is None else x.to(dtype) - b_dec.to(dtype)
    W = W_dec.to(dtype)
    done = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    values, indices = [], []
    for _ in range(k):
        with torch.no_grad():
            scores = residual @ W.T
            best = (scores if positive else scores.abs()).argmax(1)
        atom = W[best]
        coefficient = (residual * atom).sum(1)
        live = ~done & ((coefficient > 0) if positive else (coefficient != 0))
        coefficient = torch.where(live, coefficient, 0)
        residual = residual - coefficient[:, None] * atom
        if stop_on_duplicate_support:
            held = torch.zeros_like(done)
            for value, index in zip(values, indices):
                held |= (index == best) & (value != 0)
            done = done | ~live | held
        if residual_threshold > 0:
            done = done | (residual.detach().norm(dim=1) < residual_threshold)
        values.append(coefficient)
        indices.append(torch.where(live, best, 0))
    return (torch.stack(values, 1).to(x.dtype),
            torch.stack(indices, 1).to(torch.int32))
