"""Triton matching-pursuit encoder (the rules of pyinterp/reference/matching_pursuit_encode.py; the math
docs/sae_family.md, "Matching pursuit").

One program per row keeps the row's residual (D wide) and its listed slots in registers for all k
steps, and nothing goes back to the host between steps; done rows keep running the loop with their
updates masked off. Without a Gram matrix each step streams the decoder in (BLOCK_M x D) tiles, scores
the tile against the residual and keeps a running argmax (ties to the lower index), so no score beyond
one tile is ever held. With gram = W W^T, a chunk of rows' scores is computed once by one GEMM and each
step updates the row's scores in place, s -= c G[j] (docs/sae_family.md, "Scores without the N x M
matrix"), streaming BLOCK_M-wide slices of s and of G's row fused with the next argmax.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyinterp._dtypes import accumulator_dtype

from ._common import accumulator, check_float, interpreting, pow2, to_out

# Scores held at once by the Gram path (2^27 fp32: 512 MiB).
CHUNK_SCORES = 1 << 27


@triton.jit
def _step(r, w, best, t, slots, listed_v, listed_i, done, residual_threshold, POSITIVE: tl.constexpr,
          STOP_DUPLICATE: tl.constexpr, USE_THRESHOLD: tl.constexpr):
    """Step t of one row given its selected latent `best` (row w): the coefficient (recomputed exactly,
    so only the selection sees any score update's rounding), the residual update, the listed slot and
    the done flag, by the reference's rules. Flags are 0/1 integers: the interpreter has no & of scalar
    booleans."""
    c = tl.sum(r * w, axis=0)
    if POSITIVE:
        live = tl.where(c > 0, 1 - done, 0)
    else:
        live = tl.where(c != 0, 1 - done, 0)
    c = tl.where(live != 0, c, 0.0)
    r -= c * w
    if STOP_DUPLICATE:
        held = tl.sum(tl.where((listed_i == best) & (listed_v != 0) & (slots < t), 1, 0), axis=0)
        done = tl.maximum(done, tl.where(live == 0, 1, 0))
        done = tl.maximum(done, tl.where(held > 0, 1, 0))
    if USE_THRESHOLD:
        done = tl.maximum(done, tl.where(tl.sqrt(tl.sum(r * r, axis=0)) < residual_threshold, 1, 0))
    here = slots == t
    listed_v = tl.where(here, c, listed_v)
    listed_i = tl.where(here, tl.where(live != 0, best, 0), listed_i)
    return r, c, listed_v, listed_i, done


@triton.jit
def _matching_pursuit_kernel(x_ptr, w_ptr, b_ptr, val_ptr, idx_ptr, M, D, K, residual_threshold,
                             HAS_BIAS: tl.constexpr, POSITIVE: tl.constexpr, STOP_DUPLICATE: tl.constexpr,
                             USE_THRESHOLD: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    r = tl.load(x_ptr + row * D + cols, mask=col_ok, other=0.0).to(ACC)
    if HAS_BIAS:
        r -= tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    slots = tl.arange(0, BLOCK_K)
    listed_v = tl.zeros([BLOCK_K], ACC)
    listed_i = tl.zeros([BLOCK_K], tl.int32)
    done = row * 0
    for t in range(0, K):
        best_key = tl.full((), float("-inf"), ACC)
        best = tl.full((), 0, tl.int32)
        for m0 in range(0, M, BLOCK_M):
            lat = m0 + tl.arange(0, BLOCK_M)
            lat_ok = lat < M
            w = tl.load(w_ptr + lat.to(tl.int64)[:, None] * D + cols[None, :],
                        mask=lat_ok[:, None] & col_ok[None, :], other=0.0).to(ACC)
            score = tl.sum(w * r[None, :], axis=1)
            if not POSITIVE:
                score = tl.abs(score)
            score = tl.where(lat_ok, score, float("-inf"))
            tile_key = tl.max(score, axis=0)
            tile_arg = tl.argmax(score, axis=0, tie_break_left=True).to(tl.int32)
            better = tile_key > best_key  # strict: an equal key in a later tile has a larger index
            best = tl.where(better, m0 + tile_arg, best)
            best_key = tl.where(better, tile_key, best_key)
        w = tl.load(w_ptr + best.to(tl.int64) * D + cols, mask=col_ok, other=0.0).to(ACC)
        r, _, listed_v, listed_i, done = _step(r, w, best, t, slots, listed_v, listed_i, done, residual_threshold,
                                               POSITIVE, STOP_DUPLICATE, USE_THRESHOLD)
    out = row * K + slots
    slot_ok = slots < K
    tl.store(val_ptr + out, to_out(listed_v, val_ptr.dtype.element_ty), mask=slot_ok)
    tl.store(idx_ptr + out, listed_i, mask=slot_ok)


@triton.jit
def _matching_pursuit_gram_kernel(s_ptr, x_ptr, w_ptr, b_ptr, g_ptr, val_ptr, idx_ptr, row0, M, D, K,
                                  residual_threshold, HAS_BIAS: tl.constexpr, POSITIVE: tl.constexpr,
                                  STOP_DUPLICATE: tl.constexpr, USE_THRESHOLD: tl.constexpr, ACC: tl.constexpr,
                                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    # s_ptr: this chunk's scores <r_0, w_i> (rows x M, ACC), updated in place step by step.
    local = tl.program_id(0).to(tl.int64)
    row = row0 + local
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    r = tl.load(x_ptr + row * D + cols, mask=col_ok, other=0.0).to(ACC)
    if HAS_BIAS:
        r -= tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    scores = s_ptr + local * M
    slots = tl.arange(0, BLOCK_K)
    listed_v = tl.zeros([BLOCK_K], ACC)
    listed_i = tl.zeros([BLOCK_K], tl.int32)
    done = row * 0
    last = tl.full((), 0, tl.int32)        # the previous step's latent and coefficient (0: no update)
    last_c = tl.full((), 0.0, ACC)
    for t in range(0, K):
        best_key = tl.full((), float("-inf"), ACC)
        best = tl.full((), 0, tl.int32)
        gram_row = g_ptr + last.to(tl.int64) * M
        for m0 in range(0, M, BLOCK_M):
            lat = m0 + tl.arange(0, BLOCK_M)
            lat_ok = lat < M
            s = tl.load(scores + lat, mask=lat_ok, other=0.0)
            if last_c != 0:
                s -= last_c * tl.load(gram_row + lat, mask=lat_ok, other=0.0).to(ACC)
                tl.store(scores + lat, s, mask=lat_ok)
            key = s if POSITIVE else tl.abs(s)
            key = tl.where(lat_ok, key, float("-inf"))
            tile_key = tl.max(key, axis=0)
            tile_arg = tl.argmax(key, axis=0, tie_break_left=True).to(tl.int32)
            better = tile_key > best_key
            best = tl.where(better, m0 + tile_arg, best)
            best_key = tl.where(better, tile_key, best_key)
        # A [BLOCK_M] tile may be replicated across warps: one replica stores the updated scores and
        # every replica loads them next step, so the stores must land before the next step reads.
        tl.debug_barrier()
        w = tl.load(w_ptr + best.to(tl.int64) * D + cols, mask=col_ok, other=0.0).to(ACC)
        r, c, listed_v, listed_i, done = _step(r, w, best, t, slots, listed_v, listed_i, done, residual_threshold,
                                               POSITIVE, STOP_DUPLICATE, USE_THRESHOLD)
        last = best
        last_c = c
    out = row * K + slots
    slot_ok = slots < K
    tl.store(val_ptr + out, to_out(listed_v, val_ptr.dtype.element_ty), mask=slot_ok)
    tl.store(idx_ptr + out, listed_i, mask=slot_ok)


def latent_block(d: int, m: int, *, gram: bool, interpreter: bool) -> int:
    """BLOCK_M of the kernels. The interpreter pays per operation: wide tiles there. On a GPU the plain
    kernel's (BLOCK_M x D) tile holds at most 8K elements and the Gram kernel streams 1K scores at a time
    (benches/triton_aot_report.py mp, sm_90: 107 / 127 registers at D = 768 / 4096 and 63 / 120 for the
    Gram kernel, no spills; a 16 x 4096 tile spilled)."""
    if gram:
        return min(pow2(m), 1 << 12 if interpreter else 1 << 10)
    tile, least = (1 << 16, 16) if interpreter else (1 << 13, 1)
    return max(least, min(pow2(m), tile // pow2(d)))


def matching_pursuit_forward(x: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor | None,
                             gram: torch.Tensor | None, k: int, positive: bool, residual_threshold: float,
                             stop_on_duplicate_support: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, D), W_dec (M, D), b_dec (D) or None, gram (M, M) in the accumulator dtype or None ->
    (values (N, k) in x's dtype, indices (N, k) int32)."""
    check_float("matching_pursuit_forward", x=x, W_dec=W_dec, b_dec=b_dec)
    n, d = x.shape
    m = W_dec.shape[0]
    values = torch.zeros(n, k, device=x.device, dtype=x.dtype)
    indices = torch.zeros(n, k, device=x.device, dtype=torch.int32)
    if n == 0:
        return values, indices
    block_d = pow2(d)
    x = x.contiguous()
    W_dec = W_dec.contiguous()
    flags = dict(HAS_BIAS=b_dec is not None, POSITIVE=positive, STOP_DUPLICATE=stop_on_duplicate_support,
                 USE_THRESHOLD=residual_threshold > 0, ACC=accumulator(x.dtype), BLOCK_D=block_d, BLOCK_K=pow2(k))
    bias = b_dec if b_dec is not None else x
    block_m = latent_block(d, m, gram=gram is not None, interpreter=interpreting())
    if gram is None:
        _matching_pursuit_kernel[(n,)](x, W_dec, bias, values, indices, m, d, k, float(residual_threshold),
                                       BLOCK_M=block_m, **flags)
        return values, indices
    acc_dtype = accumulator_dtype(x.dtype)
    W_acc = W_dec.to(acc_dtype)
    gram = gram.contiguous()
    # Scores of at most CHUNK_SCORES elements at a time: one chunk of rows, never the N x M matrix.
    rows = max(1, min(n, CHUNK_SCORES // m))
    for row0 in range(0, n, rows):
        chunk = x[row0:row0 + rows].to(acc_dtype)
        if b_dec is not None:
            chunk = chunk - b_dec.to(acc_dtype)
        scores = (chunk @ W_acc.T).contiguous()
        _matching_pursuit_gram_kernel[(chunk.shape[0],)](
            scores, x, W_dec, bias, gram, values, indices, row0, m, d, k, float(residual_threshold),
            BLOCK_M=block_m, **flags)
    return values, indices
