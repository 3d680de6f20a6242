"""Triton kernels of the Matryoshka prefix decode (docs/sae_family.md, "Matryoshka", "The prefix decode").

Latent i lies in bucket b(i) = #{p : prefixes[p] <= i}; prefixes is strictly increasing, ending at M.
prefix_decode      out[p, n] = sum_{j: indices[n,j] < prefixes[p]} values[n,j] * weight[indices[n,j]] (+ bias)
prefix_gather_dot  out[n, j] = <grad_suffix[b(i), n], weight[i]>,  i = indices[n, j]
prefix_t_matmul    out[i]    = sum_{(n,j): indices[n,j]=i} coef[n,j] * grad_suffix[b(i), n]

The forward keeps one accumulator per (row, column block) across the buckets: bucket p's entries are
added to it and the running sum is stored as prefix p's reconstruction, so each weight row is read
once however many prefixes there are. Accumulation in fp32 (fp64 for fp64 inputs). An index outside
[0, M) (only with check_indices=False) lies in no bucket and is never read through. prefix_t_matmul
is deterministic: a stable sort groups the entries by latent, each latent's added in n*k+j order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import accumulator, check_float, interpreting, pow2, to_out


@triton.jit
def _prefix_decode_kernel(val_ptr, idx_ptr, w_ptr, bias_ptr, pref_ptr, out_ptr, N, K, D, P,
                          HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    pairs = rows.to(tl.int64)[:, None] * K
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    bias = tl.zeros((BLOCK_D,), ACC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    acc = tl.zeros((BLOCK_R, BLOCK_K, BLOCK_D), ACC)
    for p in range(0, P):
        low = tl.load(pref_ptr + p - 1, mask=p > 0, other=0)
        high = tl.load(pref_ptr + p)
        for j0 in range(0, K, BLOCK_K):
            js = j0 + tl.arange(0, BLOCK_K)
            ok = row_ok[:, None] & (js < K)[None, :]
            lat = tl.load(idx_ptr + pairs + js[None, :], mask=ok, other=-1).to(tl.int64)
            ok = ok & (lat >= low) & (lat < high)  # this bucket's entries only
            v = tl.load(val_ptr + pairs + js[None, :], mask=ok, other=0.0).to(ACC)
            w = tl.load(w_ptr + lat[:, :, None] * D + cols[None, None, :],
                        mask=ok[:, :, None] & col_ok[None, None, :], other=0.0).to(ACC)
            acc += v[:, :, None] * w
        out = tl.sum(acc, axis=1) + bias[None, :]
        tl.store(out_ptr + (p * N + rows.to(tl.int64))[:, None] * D + cols[None, :],
                 to_out(out, out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _bucket(lat, pref_ptr, P):
    """#{p < P - 1 : prefixes[p] <= lat} (the last prefix is M, above every valid latent)."""
    bucket = tl.zeros(lat.shape, tl.int64)
    for p in range(0, P - 1):
        bucket += (lat >= tl.load(pref_ptr + p)).to(tl.int64)
    return bucket


@triton.jit
def _prefix_gather_dot_kernel(g_ptr, idx_ptr, w_ptr, pref_ptr, out_ptr, NK, N, K, M, D, P,
                              ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    pairs = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = pairs < NK
    lat = tl.load(idx_ptr + pairs, mask=p_ok, other=0).to(tl.int64)
    lat_ok = p_ok & (lat >= 0) & (lat < M)
    g_rows = g_ptr + (_bucket(lat, pref_ptr, P) * N + pairs // K)[:, None] * D
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
def _prefix_segment_sum_kernel(coef_ptr, perm_ptr, seg_ptr, g_ptr, pref_ptr, out_ptr, L, N, K, D, P,
                               ACC: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    lats = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    lat_ok = lats < L
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    start = tl.load(seg_ptr + lats, mask=lat_ok, other=0)
    length = tl.load(seg_ptr + lats + 1, mask=lat_ok, other=0) - start
    bucket_rows = _bucket(lats.to(tl.int64), pref_ptr, P) * N  # latent i reads its bucket's suffix sum
    acc = tl.zeros((BLOCK_L, BLOCK_D), ACC)
    for e in range(0, tl.max(length, axis=0)):  # entry e of every segment, in sorted order
        e_ok = e < length
        flat = tl.load(perm_ptr + start + e, mask=e_ok, other=0)
        c = tl.load(coef_ptr + flat, mask=e_ok, other=0.0).to(ACC)
        r = tl.load(g_ptr + (bucket_rows + flat // K)[:, None] * D + cols[None, :],
                    mask=e_ok[:, None] & col_ok[None, :], other=0.0).to(ACC)
        acc += c[:, None] * r
    tl.store(out_ptr + lats.to(tl.int64)[:, None] * D + cols[None, :],
             to_out(acc, out_ptr.dtype.element_ty), mask=lat_ok[:, None] & col_ok[None, :])


def _prefix_tensor(prefixes, device) -> torch.Tensor:
    return torch.tensor(list(prefixes), dtype=torch.int64, device=device)


def prefix_decode(values: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None, prefixes: list[int]) -> torch.Tensor:
    """(P, N, D) cumulative reconstructions in values' dtype."""
    check_float("prefix_decode", values=values, weight=weight, bias=bias)
    values, indices, weight = values.contiguous(), indices.contiguous(), weight.contiguous()
    N, K = indices.shape
    D, P = weight.shape[1], len(prefixes)
    out = torch.empty((P, N, D), dtype=values.dtype, device=values.device)
    if N == 0 or D == 0:
        return out
    if interpreting():
        block_r, block_k, block_d = min(64, pow2(N)), min(32, pow2(K)), min(128, pow2(D))
    else:
        block_r, block_k, block_d = 1, 8, min(512, pow2(D))
    grid = (triton.cdiv(N, block_r), triton.cdiv(D, block_d))
    _prefix_decode_kernel[grid](values, indices, weight, bias.contiguous() if bias is not None else values,
                                _prefix_tensor(prefixes, values.device), out, N, K, D, P,
                                HAS_BIAS=bias is not None, ACC=accumulator(values.dtype), BLOCK_R=block_r,
                                BLOCK_K=block_k, BLOCK_D=block_d, num_warps=4)
    return out


def prefix_gather_dot(grad_suffix: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor,
                      prefixes: list[int]) -> torch.Tensor:
    """(N, k) in grad_suffix's dtype."""
    check_float("prefix_gather_dot", grad_suffix=grad_suffix, weight=weight)
    grad_suffix, indices, weight = grad_suffix.contiguous(), indices.contiguous(), weight.contiguous()
    P, N, D = grad_suffix.shape
    K = indices.shape[1]
    out = torch.empty((N, K), dtype=grad_suffix.dtype, device=grad_suffix.device)
    if N == 0 or K == 0:
        return out
    if D == 0:
        return out.zero_()
    if interpreting():
        block_p, block_d = min(1024, pow2(N * K)), min(128, pow2(D))
    else:
        block_p, block_d = 16, min(256, pow2(D))
    _prefix_gather_dot_kernel[(triton.cdiv(N * K, block_p),)](
        grad_suffix, indices, weight, _prefix_tensor(prefixes, weight.device), out, N * K, N, K,
        weight.shape[0], D, P, ACC=accumulator(grad_suffix.dtype), BLOCK_P=block_p, BLOCK_D=block_d,
        num_warps=4)
    return out


def prefix_t_matmul(coef: torch.Tensor, indices: torch.Tensor, grad_suffix: torch.Tensor,
                    prefixes: list[int]) -> torch.Tensor:
    """(M, D) in grad_suffix's dtype, M = prefixes[-1]. Deterministic."""
    check_float("prefix_t_matmul", coef=coef, grad_suffix=grad_suffix)
    coef, indices, grad_suffix = coef.contiguous(), indices.contiguous(), grad_suffix.contiguous()
    P, N, D = grad_suffix.shape
    K = indices.shape[1]
    L = int(prefixes[-1])
    out = torch.empty((L, D), dtype=grad_suffix.dtype, device=grad_suffix.device)
    if D == 0:
        return out
    sorted_idx, perm = torch.sort(indices.reshape(-1), stable=True)
    seg = torch.searchsorted(sorted_idx, torch.arange(L + 1, device=coef.device, dtype=sorted_idx.dtype))
    if interpreting():
        block_l, block_d = min(512, pow2(L)), min(128, pow2(D))
    else:
        block_l, block_d = 4, min(1024, pow2(D))
    grid = (triton.cdiv(L, block_l), triton.cdiv(D, block_d))
    _prefix_segment_sum_kernel[grid](coef, perm, seg, grad_suffix, _prefix_tensor(prefixes, coef.device), out,
                                     L, N, K, D, P, ACC=accumulator(grad_suffix.dtype), BLOCK_L=block_l,
                                     BLOCK_D=block_d, num_warps=4)
    return out
