"""Resonator-network search in fp32, one persistent program per problem (the rules are those of
pyinterp/reference/resonator.py). Every similarity and projection of +-1 vectors is an integer below
max M_f * D < 2^24, so fp32 sums are exact in any order and the trajectory is the reference's.
Elementwise products and tl.sum (not tl.dot, which would round inputs to tf32 on a GPU).

A program runs its problem's sweeps until it stops: that is the per-problem early exit. Its state
lives in a scratch tensor: estimates double-buffered by sweep parity (the parallel rule reads the
previous sweep's estimates) and the running product R = s * prod_f xhat_f."""
import torch
import triton
import triton.language as tl

from ._common import interpreting

ACTIVATION_CODES = {"identity": 0, "threshold": 1, "topk": 2}


@triton.jit
def _top_k_mask(a, valid, k, D):
    """The k largest valid entries of a, ties to the lower index. a holds integers in [-D, D], so
    the k-th largest value t is found by bisection (O(BLOCK_M log D), not a BLOCK_M^2 rank matrix):
    the largest t with count(a >= t) >= k; then the entries equal to t are taken in index order."""
    low = tl.full((), 0, tl.int32) - D  # count(a >= -D) = M_f >= k
    high = tl.full((), 1, tl.int32) + D  # count(a >= D + 1) = 0 < k
    while high - low > 1:
        middle = (low + high) // 2
        enough = tl.sum((valid & (a >= middle.to(tl.float32))).to(tl.int32), axis=0) >= k
        low = tl.where(enough, middle, low)
        high = tl.where(enough, high, middle)
    t = low.to(tl.float32)
    above = valid & (a > t)
    tied = (valid & (a == t)).to(tl.int32)
    tied_before = tl.cumsum(tied, axis=0) - tied
    room = k - tl.sum(above.to(tl.int32), axis=0)
    return above | ((tied != 0) & (tied_before < room))


@triton.jit
def _resonator_float_kernel(s_ptr, similarity_ptr, projection_ptr, offsets_ptr, sizes_ptr, known_ptr,
                            estimates_ptr, running_ptr, indices_ptr, iterations_ptr, converged_ptr,
                            similarities_ptr, D, F, padded_d, max_iters, threshold_units, theta_units, k,
                            PARALLEL: tl.constexpr, ACTIVATION: tl.constexpr, STOP_ON_SIMILARITY: tl.constexpr,
                            HAS_KNOWN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    m = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    row_estimates = estimates_ptr + row.to(tl.int64) * 2 * F * padded_d  # [parity][factor][d]
    running = running_ptr + row.to(tl.int64) * padded_d
    composite = s_ptr + row.to(tl.int64) * D

    # init: known codevector, or the superposition sgn(sum_m X_f[m]) with ties to +1
    for f in range(F):
        size = tl.load(sizes_ptr + f)
        offset = tl.load(offsets_ptr + f)
        known = tl.load(known_ptr + row * F + f) if HAS_KNOWN else -1
        for start in range(0, D, BLOCK_D):
            cols = start + d
            if known >= 0:
                value = tl.load(projection_ptr + (offset + known).to(tl.int64) * D + cols, mask=cols < D, other=1.0)
            else:
                total = tl.zeros([BLOCK_D], dtype=tl.float32)
                for first in range(0, size, BLOCK_M):
                    rows = first + m
                    tile = tl.load(projection_ptr + (offset + rows[:, None]).to(tl.int64) * D + cols[None, :],
                                   mask=(rows[:, None] < size) & (cols[None, :] < D), other=0.0)
                    total += tl.sum(tile, axis=0)
                value = tl.where(total >= 0, 1.0, -1.0)
            tl.store(row_estimates + f * padded_d + cols, value)
    # Barriers: a [BLOCK_D] or [BLOCK_M] tensor may be replicated across warps (on sm_90 whenever
    # BLOCK_D < 128); one replica stores to the scratch, every replica loads. A load of what another
    # warp stored must wait for a barrier: here the product reads the initial estimates.
    tl.debug_barrier()
    for start in range(0, D, BLOCK_D):
        cols = start + d
        product = tl.load(composite + cols, mask=cols < D, other=1.0)
        for f in range(F):
            product *= tl.load(row_estimates + f * padded_d + cols)
        tl.store(running + cols, product)
    tl.debug_barrier()

    sweep = 0
    done = 0
    while (sweep < max_iters) & (done == 0):
        old = row_estimates + (sweep % 2) * F * padded_d
        new = row_estimates + ((sweep + 1) % 2) * F * padded_d
        changed = 0
        similar = 1
        for f in range(F):
            size = tl.load(sizes_ptr + f)
            offset = tl.load(offsets_ptr + f)
            known = tl.load(known_ptr + row * F + f) if HAS_KNOWN else -1
            valid = m < size
            if known >= 0:  # fixed estimate: carried over to the next parity, nothing else changes
                for start in range(0, D, BLOCK_D):
                    tl.store(new + f * padded_d + start + d, tl.load(old + f * padded_d + start + d))
                # The copy is read by the parallel product, the next sweep's copy and the readout.
                tl.debug_barrier()
            else:
                # similarities a = X_f u with u = R * xhat_f (R holds xhat_f: multiplying removes it)
                a = tl.zeros([BLOCK_M], dtype=tl.float32)
                for start in range(0, D, BLOCK_D):
                    cols = start + d
                    u = tl.load(running + cols) * tl.load(old + f * padded_d + cols)
                    tile = tl.load(similarity_ptr + (offset + m[:, None]).to(tl.int64) * D + cols[None, :],
                                   mask=valid[:, None] & (cols[None, :] < D), other=0.0)
                    a += tl.sum(tile * u[None, :], axis=1)
                if STOP_ON_SIMILARITY:
                    best = tl.max(tl.where(valid, tl.abs(a), -1.0), axis=0)
                    similar = similar & (best > theta_units).to(tl.int32)
                w = a
                if ACTIVATION == 1:
                    w = tl.where(a >= threshold_units, a, 0.0)
                if ACTIVATION == 2:
                    w = tl.where(_top_k_mask(a, valid, k, D), a, 0.0)
                w = tl.where(valid, w, 0.0)
                tl.debug_barrier()
                # projection xhat_f = sgn(X_f^T w); sequential sweeps refresh R as they go
                for start in range(0, D, BLOCK_D):
                    cols = start + d
                    tile = tl.load(projection_ptr + (offset + m[:, None]).to(tl.int64) * D + cols[None, :],
                                   mask=valid[:, None] & (cols[None, :] < D), other=0.0)
                    fresh = tl.where(tl.sum(tile * w[:, None], axis=0) >= 0, 1.0, -1.0)
                    fresh = tl.where(cols < D, fresh, 1.0)
                    previous = tl.load(old + f * padded_d + cols)
                    changed = changed | tl.max((fresh != previous).to(tl.int32), axis=0)
                    tl.store(new + f * padded_d + cols, fresh)
                    if not PARALLEL:
                        tl.store(running + cols, tl.load(running + cols) * previous * fresh)
                tl.debug_barrier()
        if PARALLEL:
            for start in range(0, D, BLOCK_D):
                cols = start + d
                product = tl.load(composite + cols, mask=cols < D, other=1.0)
                for f in range(F):
                    product *= tl.load(new + f * padded_d + cols)
                tl.store(running + cols, product)
            tl.debug_barrier()
        sweep += 1
        if STOP_ON_SIMILARITY:
            done = similar
        else:
            done = 1 - changed

    tl.store(iterations_ptr + row, sweep)
    tl.store(converged_ptr + row, done.to(tl.int8))
    final = row_estimates + (sweep % 2) * F * padded_d
    for f in range(F):
        size = tl.load(sizes_ptr + f)
        offset = tl.load(offsets_ptr + f)
        known = tl.load(known_ptr + row * F + f) if HAS_KNOWN else -1
        valid = m < size
        scores = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, D, BLOCK_D):
            cols = start + d
            tile = tl.load(projection_ptr + (offset + m[:, None]).to(tl.int64) * D + cols[None, :],
                           mask=valid[:, None] & (cols[None, :] < D), other=0.0)
            scores += tl.sum(tile * tl.load(final + f * padded_d + cols)[None, :], axis=1)
        best = tl.argmax(tl.where(valid, tl.abs(scores), -1.0), axis=0, tie_break_left=True)
        if known >= 0:
            best = known
        tl.store(indices_ptr + row * F + f, best)
        tl.store(similarities_ptr + row * F + f, tl.sum(tl.where(m == best, scores, 0.0), axis=0) / D)


def resonator_float(s: torch.Tensor, similarity_codebooks: torch.Tensor, projection_codebooks: torch.Tensor,
                    sizes: list[int], known: torch.Tensor | None, max_iters: int, parallel: bool,
                    activation: str, k: int, threshold_units: int, stop: str, theta_units: int):
    """s (B, D) and the concatenated codebooks (sum M_f, D) fp32 +-1; known (B, F) int32 or None.
    Returns indices (B, F) int32, iterations (B,) int32, converged (B,) bool, cycle (B,) int32 (zeros:
    no cycle detection here), similarities (B, F) fp32."""
    batch, dim = s.shape
    factors = len(sizes)
    device = s.device
    block_m = max(16, triton.next_power_of_2(max(sizes)))
    # A codebook tile of at most 8192 fp32 over 8 warps fits sm_90's 255 registers without spilling
    # up to M_f = 512 (benches/triton_aot_report.py res, 2026-12-02; 16384 over 4 warps spilled
    # 0.9-3.2 KB); larger codebooks spill (slow, not wrong). The interpreter pays per operation:
    # wider tiles there.
    tile_elements, num_warps = (16384, 4) if interpreting() else (8192, 8)
    block_d = max(16, min(256, triton.next_power_of_2(dim), tile_elements // block_m))
    padded_d = triton.cdiv(dim, block_d) * block_d
    offsets = torch.tensor([sum(sizes[:f]) for f in range(factors)], dtype=torch.int64, device=device)
    sizes_tensor = torch.tensor(sizes, dtype=torch.int32, device=device)
    estimates = torch.empty((batch, 2, factors, padded_d), dtype=torch.float32, device=device)
    running = torch.empty((batch, padded_d), dtype=torch.float32, device=device)
    indices = torch.empty((batch, factors), dtype=torch.int32, device=device)
    iterations = torch.empty((batch,), dtype=torch.int32, device=device)
    converged = torch.empty((batch,), dtype=torch.int8, device=device)
    similarities = torch.empty((batch, factors), dtype=torch.float32, device=device)
    if batch > 0:
        _resonator_float_kernel[(batch,)](
            s, similarity_codebooks, projection_codebooks, offsets, sizes_tensor,
            known if known is not None else sizes_tensor, estimates, running, indices, iterations,
            converged, similarities, dim, factors, padded_d, max_iters, threshold_units, theta_units, k,
            PARALLEL=parallel, ACTIVATION=ACTIVATION_CODES[activation],
            STOP_ON_SIMILARITY=stop == "similarity", HAS_KNOWN=known is not None,
            BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps)
    cycle = torch.zeros((batch,), dtype=torch.int32, device=device)
    return indices, iterations, converged.bool(), cycle, similarities
