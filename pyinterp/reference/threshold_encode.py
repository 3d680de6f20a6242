"""Reference JumpReLU threshold encoder (docs/sae_family.md, "JumpReLU").

f_i = z_i * 1[z_i > theta_i] with z = (x - b_dec) @ W_enc^T + b_enc, dense, plus the straight-through
gradients of Rajamanoharan et al. 2024 with a rectangle kernel of width `bandwidth` (eps):
    df/dz = 1[z > theta],  df/dtheta = -(theta / eps) * 1[|z - theta| < eps / 2],
    l0 = sum_i 1[z_i > theta_i],  dl0/dtheta = -(1 / eps) * 1[|z - theta| < eps / 2],  dl0/dz = 0.
The sparse output lists, per row, the latents with z > theta - eps / 2 (the active ones and those
in the kernel's band, whose theta gradient is not zero) in ascending latent index, at most max_active
of them: a row with more keeps the max_active largest shifted pre-activations s = z - (theta - eps / 2)
(ties to the lower index). The unused slots, after the listed ones, hold index 0 and value 0."""
from __future__ import annotations

import torch

from pyinterp.reference.topk_encode import preactivations, topk_lower_index_ties


def in_band(z: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """1[|z - theta| < eps / 2]: the rectangle kernel's support (empty for eps = 0)."""
    return (z - theta).abs() < bandwidth / 2


class JumpReLU(torch.autograd.Function):
    """z * 1[z > theta] with the straight-through gradient to theta (rectangle kernel)."""

    @staticmethod
    def forward(ctx, z, theta, bandwidth):
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return torch.where(z > theta, z, 0)

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        grad_z = torch.where(z > theta, grad, 0)
        grad_theta = torch.where(in_band(z, theta, ctx.bandwidth), -(theta / ctx.bandwidth) * grad, 0)
        return grad_z, grad_theta, None


class Step(torch.autograd.Function):
    """1[z > theta] (the L0 count) with the straight-through gradient to theta; none to z."""

    @staticmethod
    def forward(ctx, z, theta, bandwidth):
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        grad_theta = torch.where(in_band(z, theta, ctx.bandwidth), -grad / ctx.bandwidth, 0)
        return None, grad_theta, None


def threshold_encode(x, W_enc, b_enc, threshold, max_active: int, b_dec=None, bandwidth: float = 0.0):
    """x (N, D) -> (values (N, max_active) in x's dtype, indices int32, counts int32 (N,) of active
    latents, l0 (N,) differentiable in threshold, truncated_rows int64 () the rows with more than
    max_active latents above threshold - bandwidth / 2). l0 and the gradients count the listed
    latents only (all of them unless the row is truncated). bandwidth 0: no theta gradient."""
    z = preactivations(x, W_enc, b_enc, b_dec)
    theta = threshold.to(z.dtype).expand_as(z)
    shifted = z - (theta - bandwidth / 2)  # above the band's lower edge (bandwidth 0: the active set)
    candidate = shifted > 0
    _, ranked = topk_lower_index_ties(torch.where(candidate, shifted, float("-inf")), max_active)
    # The kept latents in ascending index, the padding (key M) after them.
    num_latents = z.shape[1]
    indices = torch.where(candidate.gather(1, ranked), ranked, num_latents).sort(1).values
    listed = indices < num_latents
    indices = torch.where(listed, indices, 0)
    z_listed, theta_listed = z.gather(1, indices), theta.gather(1, indices)
    values = torch.where(listed, JumpReLU.apply(z_listed, theta_listed, bandwidth), 0).to(x.dtype)
    l0 = torch.where(listed, Step.apply(z_listed, theta_listed, bandwidth), 0).sum(1).to(x.dtype)
    counts = (listed & (z_listed > theta_listed)).sum(1).to(torch.int32)
    indices = indices.to(torch.int32)
    truncated_rows = (candidate.sum(1) > max_active).sum()
    return values, indices, counts, l0, truncated_rows
