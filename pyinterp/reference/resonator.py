"""Resonator-network search in plain torch: the specification every backend reproduces.

A composite s = x_1[i_1] * ... * x_F[i_F] (bipolar, elementwise product) is factored by iterating, for
each factor f (Frady, Kent, Olshausen, Sommer, "Resonator networks 1", Neural Computation 32, 2020;
Kent, Frady, Sommer, Olshausen, "Resonator networks 2", same volume):

    u_f    = s * prod_{g != f} xhat_g              unbind the other estimates
    a_f    = X_f u_f                               similarities, (M_f,)
    xhat_f = sgn( X_f^T act(a_f) )                 OP weights
    xhat_f = sgn( X_f^T (X_f X_f^T)^-1 act(a_f) )  OLS weights, the inverse Gram computed once

from xhat_f = sgn(sum_m X_f[m]), with sgn(0) = +1 everywhere. Every intermediate of the bipolar sign
rules is an integer, so this reference computes in float64, where they are exact, and the kernels
(fp32, int32, bit-packed) reproduce its trajectory exactly.

Definitions the backends share (docs of pyinterp.vsa.resonator repeat them for users):
- iterations counts sweeps; a sweep updates every factor once. Sequential sweeps use the freshest
  estimates (a running product R = s * prod_g xhat_g makes each unbinding O(D)); parallel sweeps use
  the previous sweep's estimates for every factor.
- stop="fixed_point": a problem stops after a sweep that changed no estimate (converged = True).
  stop="similarity": it stops after a sweep in which every factor's max_m |a_f[m]| / D exceeded theta.
  detect_cycles=L >= 2: it also stops (converged = False, cycle = p) when the state after a sweep equals
  the state p in [2, L] sweeps earlier. Stopped problems keep their state and cost no more work.
- noise=sigma: a_f[m] += sigma * z with z a counter-based function of (seed, problem row, sweep, factor,
  m) (Langenegger et al., "In-memory factorization of holographic perceptual representations",
  Nature Nanotechnology 18, 2023): z is the Irwin-Hall sum of twelve 16-bit uniforms minus 6 (mean 0,
  variance 1 - 2^-32, within +-6) and sigma * z is rounded to a multiple of 2^-16, so that every
  backend computes the same noisy similarities and sums them exactly.
- activation: identity; threshold (similarities below threshold * D set to 0); topk (the k largest
  kept, ties to the lower index); attention (xhat_f = X_f^T softmax(beta * a_f / D), a real-valued
  estimate; Yeung, Poduval, Imani, "Self-attention based semantic decomposition in vector symbolic
  architectures", 2024).
- asymmetry=p: the similarity codebooks have round(p * M_f * D) entries flipped, chosen once from the
  seed; the projection uses the clean codebooks.
- known[b, f] >= 0 fixes factor f of problem b to that codevector.
- readout: index = argmax_m |<xhat_f, X_f[m]>| (the first on ties): a negative winner means the
  estimate is the codevector's negation, which the sign symmetry of binding allows; similarity =
  <xhat_f, X_f[index]> / D keeps the sign. For phasors, the magnitude.
- FHRR (complex phasor) vectors: bind = elementwise product, unbind = conjugate, nonlinearity z/|z|
  (0 -> 1); estimates that moved by at most PHASOR_TOLERANCE count as unchanged.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

SIGN_ACTIVATIONS = ("identity", "threshold", "topk")
ACTIVATIONS = SIGN_ACTIVATIONS + ("attention",)
# Noisy similarities are kept as integers in units of 2^-NOISE_FRACTION_BITS.
NOISE_FRACTION_BITS = 16
# Continuous estimates (phasors, attention) that moved by at most this much count as unchanged.
PHASOR_TOLERANCE = 1e-9

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_IRWIN_HALL_TERMS = 12
_IRWIN_HALL_MEAN = _IRWIN_HALL_TERMS * 65535 // 2  # 393210: the mean of twelve uniforms on [0, 65535]


class ResonatorResult(NamedTuple):
    """indices (B, F) int64; iterations (B,) int64 sweeps run; converged (B,) bool; cycle (B,) int64
    period of the detected limit cycle (0 if none); similarities (B, F) float32 (see readout)."""
    indices: torch.Tensor
    iterations: torch.Tensor
    converged: torch.Tensor
    cycle: torch.Tensor
    similarities: torch.Tensor


# ---- counter-based noise (the kernels implement the same integer arithmetic) ----
def _signed(value: int) -> int:
    """A uint64 constant as the int64 with the same bits (torch has no uint64 arithmetic)."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right_logical(x: torch.Tensor, bits: int) -> torch.Tensor:
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finalizer on int64 tensors holding uint64 bits (multiplication wraps mod 2^64)."""
    x = (x ^ _shift_right_logical(x, 30)) * _signed(0xBF58476D1CE4E5B9)
    x = (x ^ _shift_right_logical(x, 27)) * _signed(0x94D049BB133111EB)
    return x ^ _shift_right_logical(x, 31)


def noise_key(seed: int, rows: torch.Tensor, sweep: int, factor: int) -> torch.Tensor:
    """One 64-bit stream key per problem row for (seed, sweep, factor); rows are batch indices."""
    seed_key = mix64(torch.tensor([_signed(seed)], dtype=torch.int64, device=rows.device))
    row_key = mix64(seed_key ^ rows.to(torch.int64))
    return mix64(row_key ^ _signed((sweep << 16) | factor))


def noise_units(seed: int, rows: torch.Tensor, sweep: int, factor: int, size: int,
                sigma: float) -> torch.Tensor:
    """sigma * z for (len(rows), size) similarities, as float64 integers in units of 2^-16."""
    key = noise_key(seed, rows, sweep, factor)[:, None]
    counters = torch.arange(size, dtype=torch.int64, device=rows.device)[None, :] * 3
    total = torch.zeros(rows.numel(), size, dtype=torch.int64, device=rows.device)
    for word in range(3):
        bits = mix64(key + (counters + (word + 1)) * _signed(_GOLDEN))
        for chunk in range(4):
            total += _shift_right_logical(bits, 16 * chunk) & 0xFFFF
    z_units = (total - _IRWIN_HALL_MEAN).to(torch.float64)  # z * 2^16, exact
    return torch.round(sigma * z_units)  # float64 product, rounded half to even as in C++/CUDA rint


def noise_z_python(seed: int, row: int, sweep: int, factor: int, m: int) -> int:
    """z * 2^16 for one similarity, in plain Python integers: the definition the tensor code follows."""
    def mix(x: int) -> int:
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        return x ^ (x >> 31)

    key = mix(mix(mix(seed & _MASK64) ^ row) ^ ((sweep << 16) | factor))
    total = 0
    for word in range(3):
        bits = mix((key + (3 * m + word + 1) * _GOLDEN) & _MASK64)
        total += sum((bits >> (16 * chunk)) & 0xFFFF for chunk in range(4))
    return total - _IRWIN_HALL_MEAN


# ---- quantities the kernels receive precomputed, so that every backend rounds them alike ----
def similarity_scale(noise: float) -> int:
    """Units of the similarities fed to the activation: raw integers, or 2^-16 steps with noise."""
    return 1 << NOISE_FRACTION_BITS if noise > 0 else 1


def threshold_units(threshold: float, dim: int, scale: int) -> int:
    """Smallest integer similarity (in `scale` units) that the threshold activation keeps."""
    return math.ceil(threshold * dim * scale)


def theta_units(theta: float, dim: int) -> int:
    """|a| > theta * D  <=>  |a| > floor(theta * D) for integer similarities."""
    return math.floor(theta * dim)


def similarity_codebooks(codebooks: Sequence[torch.Tensor], asymmetry: float,
                         seed: int) -> list[torch.Tensor]:
    """Asymmetric codebooks: round(asymmetry * M_f * D) entries of each codebook flipped, chosen once
    from the seed (the projection keeps the clean codebooks)."""
    if asymmetry == 0:
        return list(codebooks)
    perturbed = []
    for factor, codebook in enumerate(codebooks):
        generator = torch.Generator().manual_seed((seed * 1000003 + factor) % (1 << 63))
        count = round(asymmetry * codebook.numel())
        flat = codebook.flatten().clone()
        where = torch.randperm(codebook.numel(), generator=generator)[:count].to(codebook.device)
        flat[where] = -flat[where]
        perturbed.append(flat.view_as(codebook))
    return perturbed


def sgn(x: torch.Tensor) -> torch.Tensor:
    """sign with sgn(0) = +1."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def phasor(z: torch.Tensor) -> torch.Tensor:
    """z / |z| with 0 -> 1."""
    magnitude = z.abs()
    return torch.where(magnitude > 0, z / torch.where(magnitude > 0, magnitude, 1.0), 1.0 + 0j)


def keep_topk(w: torch.Tensor, k: int) -> torch.Tensor:
    """Zero all but the k largest entries of each row; ties go to the lower index (stable sort)."""
    order = torch.sort(w, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.zeros_like(w).scatter(1, order, w.gather(1, order))


def readout(estimates: Sequence[torch.Tensor], codebooks: Sequence[torch.Tensor],
            known: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sign-corrected readout: (indices (B, F) int64, similarities (B, F) float32)."""
    indices, similarities = [], []
    for factor, (estimate, codebook) in enumerate(zip(estimates, codebooks)):
        scores = estimate @ codebook.conj().T
        index = scores.abs().argmax(dim=1)  # the first maximum on ties
        if known is not None:
            index = torch.where(known[:, factor] >= 0, known[:, factor], index)
        best = scores.gather(1, index[:, None])[:, 0]
        best = best.abs() if best.is_complex() else best
        indices.append(index)
        similarities.append(best / estimate.shape[1])
    return torch.stack(indices, 1), torch.stack(similarities, 1).float()


def resonator(s: torch.Tensor, codebooks: Sequence[torch.Tensor], *, max_iters: int,
              update: str = "sequential", weights: str = "op", activation: str = "identity",
              beta: float | None = None, threshold: float | None = None, k: int | None = None,
              noise: float = 0.0, seed: int = 0, stop: str = "fixed_point", theta: float | None = None,
              detect_cycles: int = 0, known: torch.Tensor | None = None,
              asymmetry: float = 0.0) -> ResonatorResult:
    """The reference solver; arguments are validated by pyinterp.vsa.resonator. s (B, D) real or
    complex; codebooks F tensors (M_f, D); known (B, F) int64 with -1 for unknown, or None."""
    phasors = s.is_complex()
    work = torch.complex128 if phasors else torch.float64
    batch, dim = s.shape
    factors = len(codebooks)
    device = s.device
    s = s.to(work)
    projection = [codebook.to(work) for codebook in codebooks]
    similarity = similarity_codebooks(projection, asymmetry, seed)
    inverse_gram = ([torch.linalg.pinv(x.conj() @ x.T) for x in projection]
                    if weights == "ols" else None)
    sign_rule = not phasors and activation in SIGN_ACTIVATIONS
    nonlinearity = phasor if phasors else (sgn if sign_rule else (lambda p: p))
    scale = similarity_scale(noise)

    # the superposition init is sgn (phasor) for every activation, the attention rule included
    initial = phasor if phasors else sgn
    estimates = [initial(x.sum(0, keepdim=True)).expand(batch, dim).clone() for x in projection]
    is_known = torch.zeros(batch, factors, dtype=torch.bool, device=device)
    if known is not None:
        is_known = known >= 0
        for f in range(factors):
            rows = is_known[:, f]
            estimates[f][rows] = projection[f][known[rows, f]]
    running = None
    if sign_rule:  # R = s * prod_g xhat_g, exact for +-1 vectors
        running = s.clone()
        for estimate in estimates:
            running *= estimate

    iterations = torch.zeros(batch, dtype=torch.int64, device=device)
    converged = torch.zeros(batch, dtype=torch.bool, device=device)
    cycle = torch.zeros(batch, dtype=torch.int64, device=device)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    history = None
    if detect_cycles:  # states after the last detect_cycles + 1 sweeps, as int8
        history = torch.zeros(detect_cycles + 1, batch, factors, dim, dtype=torch.int8, device=device)
        history[0] = torch.stack(estimates, 1).to(torch.int8)

    for sweep in range(max_iters):
        rows = active.nonzero()[:, 0]
        if rows.numel() == 0:
            break
        old = [estimate[rows] for estimate in estimates]
        new = list(old)
        row_known = is_known[rows]
        product = running[rows] if sign_rule else None
        changed = torch.zeros(rows.numel(), dtype=torch.bool, device=device)
        similar = torch.ones(rows.numel(), dtype=torch.bool, device=device)
        for f in range(factors):
            current = old if update == "parallel" else new
            if sign_rule:
                # the running product holds every estimate; multiplying by xhat_f removes it again
                u = product * old[f]
            else:
                u = s[rows].clone()
                for g in range(factors):
                    if g != f:
                        u *= current[g].conj()
            a = u @ similarity[f].conj().T
            if stop == "similarity":
                similar &= (a.abs().amax(1) > theta * dim) | row_known[:, f]
            w = a.real * scale if not phasors else a
            if noise > 0:
                w = w + noise_units(seed, rows, sweep, f, w.shape[1], noise)
            if activation == "threshold":
                w = torch.where(w >= threshold_units(threshold, dim, scale), w, 0.0)
            elif activation == "topk":
                w = keep_topk(w, k)
            elif activation == "attention":
                w = torch.softmax(beta * w / (scale * dim), dim=1)
            if inverse_gram is not None:
                w = w.to(work) @ inverse_gram[f].T
            estimate = nonlinearity(w.to(work) @ projection[f])
            estimate = torch.where(row_known[:, f, None], old[f], estimate)
            if sign_rule:
                changed |= (estimate != old[f]).any(1)
            else:
                changed |= ((estimate - old[f]).abs() > PHASOR_TOLERANCE).any(1)
            new[f] = estimate
            if sign_rule and update == "sequential":
                product = u * estimate
        if sign_rule and update == "parallel":
            product = s[rows].clone()
            for estimate in new:
                product *= estimate

        for f in range(factors):
            estimates[f][rows] = new[f]
        if sign_rule:
            running[rows] = product
        iterations[rows] += 1
        done = ~changed if stop == "fixed_point" else similar
        converged[rows] = done
        if history is not None:
            state = torch.stack(new, 1).to(torch.int8)
            period = torch.zeros(rows.numel(), dtype=torch.int64, device=device)
            for p in range(detect_cycles, 1, -1):  # the smallest period wins
                if sweep + 1 - p >= 0:
                    same = (history[(sweep + 1 - p) % (detect_cycles + 1)][rows] == state).flatten(1).all(1)
                    period = torch.where(same, p, period)
            period = torch.where(done, 0, period)
            cycle[rows] = period
            done = done | (period > 0)
            history[(sweep + 1) % (detect_cycles + 1), rows] = state
        active[rows] = ~done

    indices, similarities = readout(estimates, projection, known)
    return ResonatorResult(indices, iterations, converged, cycle, similarities)
