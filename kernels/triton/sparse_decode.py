"""Triton kernels for sparse decoding and the sparse products of both SAE backwards (docs/sae.md, "Decoder (`sparse_decode`)", "Gradients").

gather_sum       out[n]    = sum_j values[n,j] * weight[indices[n,j]] (+ bias)       (N, D)
gather_dot       out[n,j]  = <grad[n], weight[indices[n,j]]>                         (N, k)
sparse_t_matmul  wg[i]     = sum_{(n,j): indices[n,j]=i} coef[n,j] * rows[n]        (L, D)
                 csum[i]   = sum_{(n,j): indices[n,j]=i} coef[n,j]                  (L,)

All three are memory-bound row gathers: programs stream weight/activation rows (contiguous
along D, vectorised loads) through int64 offsets and accumulate in fp32 (fp64 for fp64 inputs,
so gradcheck works); partial sums keep their gather axis and are reduced once, at the end.
An index outside [0, M) (possible only with sparse_decode(check_indices=False)) is never read through:
its entry adds nothing (gather_sum), dots to zero (gather_dot) and falls outside every latent's segment
(sparse_t_matmul), as in the CUDA kernels. sparse_t_matmul is deterministic: a stable sort groups the (n, j) pairs by latent in increasing
n*k+j order and each latent's entries are added one at a time in that order; no atomics.

Block sizes differ between the GPU and the CPU interpreter, which pays per operation rather than
per element (wide tiles, few programs there).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyinterp._dtypes import accumulator_dtype

from ._common import accumulator, check_float, interpreting, pow2, to_out


@triton.jit
def _gather_sum_kernel(val_ptr, idx_ptr, w_ptr, bias_ptr, out_ptr, N, K, M, D,
                       HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    pairs = rows.to(tl.int64)[:, None] * K
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    # Partial sums keep the j axis so the cross-thread reduction over j happens once, at the end.
    acc = tl.zeros((BLOCK_R, BLOCK_K, BLOCK_D), ACC)
    for j0 in range(0, K, BLOCK_K):
        js = j0 + tl.arange(0, BLOCK_K)
        ok = row_ok[:, None] & (js < K)[None, :]
        lat = tl.load(idx_ptr + pairs + js[None, :], mask=ok, other=0).to(tl.int64)
        ok = ok & (lat >= 0) & (lat < M)  # unchecked out-of-range indices add nothing
        v = tl.load(val_ptr + pairs + js[None, :], mask=ok, other=0.0).to(ACC)
        w = tl.load(w_ptr + lat[:, :, None] * D + cols[None, None, :],
                    mask=ok[:, :, None] & col_ok[None, None, :], other=0.0).to(ACC)
        acc += v[:, :, None] * w
    out = tl.sum(acc, axis=1)
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :],
             to_out(out, out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _gather_dot_kernel(g_ptr, idx_ptr, w_ptr, out_ptr, NK, K, M, D,
                       ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    # One block of flattened (n, j) pairs per program.
    pairs = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = pairs < NK
    g_rows = g_ptr + (pairs // K)[:, None] * D
    lat = tl.load(idx_ptr + pairs, mask=p_ok, other=0).to(tl.int64)
    lat_ok = p_ok & (lat >= 0) & (lat < M)  # unchecked out-of-range indices: a zero dot
    w_rows = w_ptr + lat[:, None] * D
    acc = tl.zeros((BLOCK_P, BLOCK_D), ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        ok = lat_ok[:, None] & (cols < D)[None, :]
        g = tl.load(g_rows + cols[None, :], mask=ok, other=0.0).to(ACC)
        w = tl.load(w_rows + cols[None, :], mask=ok, other=0.0).to(ACC)
        acc += g * w
    tl.store(out_ptr + pairs, to_out(tl.sum(acc, axis=1), out_ptr.dtype.element_ty), mask=p_ok)


@triton.jit
def _segment_sum_kernel(coef_ptr, perm_ptr, seg_ptr, rows_ptr, out_ptr, csum_ptr, L, K, D,
                        ACC: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    lats = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    lat_ok = lats < L
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    start = tl.load(seg_ptr + lats, mask=lat_ok, other=0)
    length = tl.load(seg_ptr + lats + 1, mask=lat_ok, other=0) - start
    acc = tl.zeros((BLOCK_L, BLOCK_D), ACC)
    cacc = tl.zeros((BLOCK_L,), ACC)
    # Step e adds entry e of every latent's segment: each latent's entries are summed one by
    # one in sorted (= increasing n*k+j) order, so the result is bitwise reproducible.
    for e in range(0, tl.max(length, axis=0)):
        e_ok = e < length
        flat = tl.load(perm_ptr + start + e, mask=e_ok, other=0)
        c = tl.load(coef_ptr + flat, mask=e_ok, other=0.0).to(ACC)
        r = tl.load(rows_ptr + (flat // K)[:, None] * D + cols[None, :],
                    mask=e_ok[:, None] & col_ok[None, :], other=0.0).to(ACC)
        acc += c[:, None] * r
        cacc += c
    tl.store(out_ptr + lats.to(tl.int64)[:, None] * D + cols[None, :],
             to_out(acc, out_ptr.dtype.element_ty), mask=lat_ok[:, None] & col_ok[None, :])
    if tl.program_id(1) == 0:
        tl.store(csum_ptr + lats, cacc, mask=lat_ok)


def gather_sum(values: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    """out[n] = sum_j values[n,j] * weight[indices[n,j]] (+ bias); (N, D) in values' dtype."""
    check_float("gather_sum", values=values, weight=weight, bias=bias)
    values, indices, weight = values.contiguous(), indices.contiguous(), weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    N, K = indices.shape
    D = weight.shape[1]
    out = torch.empty((N, D), dtype=values.dtype, device=values.device)
    if N == 0 or D == 0:
        return out
    if K == 0:
        return out.copy_(bias.expand(N, D)) if bias is not None else out.zero_()
    acc = accumulator(values.dtype)
    if interpreting():
        block_r, block_k, block_d = min(64, pow2(N)), min(32, pow2(K)), min(128, pow2(D))
        warps = 4
    else:  # one row, 8 gathered weight rows of 512 contiguous columns in flight per program
        block_r, block_k, block_d, warps = 1, 8, min(512, pow2(D)), 4
    grid = (triton.cdiv(N, block_r), triton.cdiv(D, block_d))
    _gather_sum_kernel[grid](values, indices, weight, bias if bias is not None else values, out,
                             N, K, weight.shape[0], D, HAS_BIAS=bias is not None, ACC=acc, BLOCK_R=block_r,
                             BLOCK_K=block_k, BLOCK_D=block_d, num_warps=warps)
    return out


def gather_dot(grad: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """out[n,j] = <grad[n], weight[indices[n,j]]>; (N, k) in grad's dtype."""
    check_float("gather_dot", grad=grad, weight=weight)
    grad, indices, weight = grad.contiguous(), indices.contiguous(), weight.contiguous()
    N, K = indices.shape
    D = grad.shape[1]
    out = torch.empty((N, K), dtype=grad.dtype, device=grad.device)
    if N == 0 or K == 0:
        return out
    if D == 0:
        return out.zero_()
    acc = accumulator(grad.dtype)
    if interpreting():
        block_p, block_d, warps = min(1024, pow2(N * K)), min(128, pow2(D)), 4
    else:
        block_p, block_d, warps = 16, min(256, pow2(D)), 4
    grid = (triton.cdiv(N * K, block_p),)
    _gather_dot_kernel[grid](grad, indices, weight, out, N * K, K, weight.shape[0], D, ACC=acc,
                             BLOCK_P=block_p, BLOCK_D=block_d, num_warps=warps)
    return out


def sparse_t_matmul(coef: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor,
                    num_latents: int) -> tuple[torch.Tensor, torch.Tensor]:
    """weight_grad[i] = sum_{(n,j): indices[n,j]=i} coef[n,j] * rows[n]: (num_latents, D) in rows'
    dtype; coef_sum[i] = sum of those coef[n,j]: fp32 (fp64 for fp64 rows). Deterministic."""
    check_float("sparse_t_matmul", coef=coef, rows=rows)
    coef, indices, rows = coef.contiguous(), indices.contiguous(), rows.contiguous()
    N, K = indices.shape
    D = rows.shape[1]
    L = int(num_latents)
    acc = accumulator(rows.dtype)
    weight_grad = torch.empty((L, D), dtype=rows.dtype, device=rows.device)
    coef_sum = torch.empty((L,), dtype=accumulator_dtype(rows.dtype),
                           device=rows.device)
    if L == 0:
        return weight_grad, coef_sum
    # Stable sort keeps each latent's entries in increasing n*k+j order; segment i of `perm` is
    # seg[i]:seg[i+1]. searchsorted (not bincount) stays deterministic on CUDA.
    sorted_idx, perm = torch.sort(indices.reshape(-1), stable=True)
    bounds = torch.arange(L + 1, device=rows.device, dtype=sorted_idx.dtype)
    seg = torch.searchsorted(sorted_idx, bounds)
    if interpreting():
        block_l, block_d, warps = min(512, pow2(L)), min(128, pow2(D)), 4
    else:
        block_l, block_d, warps = 4, min(1024, pow2(D)), 4
    grid = (triton.cdiv(L, block_l), max(1, triton.cdiv(D, block_d)))
    _segment_sum_kernel[grid](coef, perm, seg, rows, weight_grad, coef_sum, L, K, D, ACC=acc,
                              BLOCK_L=block_l, BLOCK_D=block_d, num_warps=warps)
    return weight_grad, coef_sum
