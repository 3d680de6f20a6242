"""Triton kernels for the fused top-k SAE encoder (docs/sae.md, "Encoder (`topk_encode`)", "The tie rule: lower index first"):

    z = (x - b_dec) @ W_enc^T + b_enc,   values, indices = top-k of z per row (ties -> lower index),
    values = ReLU(values); optionally a second top-k_aux over dead latents only (live ones = -inf).

z is never stored. Each program owns BLOCK_N rows and one contiguous range of latents (a "split"),
walks it in BLOCK_M-latent tiles (tl.dot over D in BLOCK_D chunks, fp32 accumulation) and keeps a
running top-K per row in registers as 64-bit keys

    key = order-preserving int32 image of the fp32 value << 32 | (0xFFFFFFFF - latent index)

so that larger key = larger value, and among equal values the lower latent index. Keys are unique,
which lets the running list be unordered: "replace the row's minimum" is then exact.
Per tile and list, only keys above the row's current minimum can enter. When few do (the usual
case once a list has filled) they are inserted one round at a time, largest first (each round:
two row reductions); when many do, the tile's top-K is selected with a bitonic network and
merged with the running list by the bitonic "max of opposite-sorted halves" step.
Each program writes its K candidates per row to (N, splits, K); a second kernel takes the top-k
of the splits' candidates, sorts it descending and decodes values / indices.

The bitonic network is written here (compare-exchange via a pair sum on a [rows] + [2]*n view)
rather than taken from tl.sort/tl.topk: those reduce with xor_sum, which the CPU interpreter runs
element by element (seconds per call), while tl.sum runs there as one numpy call.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from ._common import interpreting, pow2, to_out

_SENT = tl.constexpr(-(2**63))  # below every real key (the key of -inf is about -2^63 + 2^55)
_NEG_INF = tl.constexpr(float("-inf"))


# ---------------------------------------------------------------------------------------------
# keys

@triton.jit
def _pack(z, lat):
    """Order-preserving 64-bit key of fp32 value z and latent index lat (broadcastable)."""
    bits = (z + 0.0).to(tl.int32, bitcast=True)  # + 0.0 turns -0.0 into +0.0 so they tie
    # Every NaN (either sign) becomes the positive quiet NaN, above +inf: NaN ranks first, as in the
    # reference's descending sort, and NaNs tie among themselves (lower index first).
    bits = tl.where(z != z, 0x7FC00000, bits)
    # Negative floats order backwards in their bits: flip the magnitude bits to restore the order.
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (ordered.to(tl.int64) << 32) | (-1 - lat).to(tl.uint32).to(tl.int64)


@triton.jit
def _unpack(key):
    ordered = (key >> 32).to(tl.int32)
    bits = tl.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
    return bits.to(tl.float32, bitcast=True), -1 - key.to(tl.int32)


# ---------------------------------------------------------------------------------------------
# bitonic network on a [rows] + [2] * n view: axis n - b holds index bit b

@triton.jit
def _cswap(h, n: tl.constexpr, j: tl.constexpr, s: tl.constexpr, DESC: tl.constexpr):
    """Compare-exchange the pairs that differ in index bit j. The pair is put in ascending order
    where index bit s is 0 and descending where it is 1 (s >= n: bit s is 0 everywhere); DESC
    reverses both."""
    partner = tl.sum(h, axis=n - j, keep_dims=True) - h  # wraps for large keys; exact mod 2^64
    upper = tl.reshape(tl.arange(0, 2), [1] * (n - j) + [2] + [1] * j)
    if s < n:
        upper = upper ^ tl.reshape(tl.arange(0, 2), [1] * (n - s) + [2] + [1] * s)
    if DESC:
        upper = 1 - upper
    # Keep h where it is the larger one exactly when this position takes the max.
    return tl.where((h > partner) == (upper != 0), h, partner)


@triton.jit
def _sort_runs(h, n: tl.constexpr, k: tl.constexpr, DESC: tl.constexpr):
    """Sort every run of 2^k consecutive elements; runs alternate direction (k < n)."""
    for s in tl.static_range(1, k + 1):
        for i in tl.static_range(s):
            h = _cswap(h, n, s - 1 - i, s, DESC)
    return h


@triton.jit
def _bitonic_sort(x, LOG_L: tl.constexpr, DESC: tl.constexpr):
    """Sort each row of x (R, 2^LOG_L)."""
    h = tl.reshape(x, [x.shape[0]] + [2] * LOG_L)
    h = _sort_runs(h, LOG_L, LOG_L, DESC)
    return tl.reshape(h, x.shape)


@triton.jit
def _bitonic_topk(x, LOG_L: tl.constexpr, LOG_K: tl.constexpr, DESC: tl.constexpr):
    """The 2^LOG_K largest of each row of x (R, 2^LOG_L), sorted (ascending unless DESC)."""
    R: tl.constexpr = x.shape[0]
    h = tl.reshape(x, [R] + [2] * LOG_L)
    h = _sort_runs(h, LOG_L, LOG_K, DESC)
    for level in tl.static_range(LOG_L - LOG_K):
        # h has LOG_L - level index bits. Neighbouring runs are sorted in opposite directions:
        # their elementwise max holds the top 2^LOG_K of both as a bitonic sequence, which
        # LOG_K exchanges sort again.
        h = tl.max(h, axis=LOG_L - level - LOG_K)
        for i in tl.static_range(LOG_K):
            h = _cswap(h, LOG_L - level - 1, LOG_K - 1 - i, LOG_K, DESC)
    return tl.reshape(h, [R, 2**LOG_K])


# ---------------------------------------------------------------------------------------------
# running top-K

@triton.jit
def _insert(running, thr, cand, rounds):
    """`rounds` rounds of: each row's largest remaining candidate replaces the row's minimum if
    larger. Keys are unique, so `running == thr` picks exactly one slot."""
    for _ in range(rounds):
        best = tl.max(cand, axis=1)
        take = (running == thr[:, None]) & (best > thr)[:, None]
        running = tl.where(take, best[:, None], running)
        cand = tl.where(cand == best[:, None], _SENT, cand)
        thr = tl.min(running, axis=1)
    return running, thr


@triton.jit
def _merge(running, thr, keys, first, LOG_K: tl.constexpr, LOG_BM: tl.constexpr,
           EXTRACT_MAX: tl.constexpr):
    """Top-K of (running list, tile keys) per row; thr is the running list's minimum."""
    new = keys > thr[:, None]
    cand = tl.where(new, keys, _SENT)
    n_new = tl.max(tl.sum(new.to(tl.int32), axis=1), axis=0)
    if LOG_K <= LOG_BM:
        if n_new > EXTRACT_MAX:
            top = _bitonic_topk(cand, LOG_BM, LOG_K, False)
            if first:
                ordered = running  # the initial sentinels are already descending
            else:
                ordered = _bitonic_sort(running, LOG_K, True)
            running = tl.maximum(ordered, top)
            thr = tl.min(running, axis=1)
        else:
            running, thr = _insert(running, thr, cand, n_new)
    else:
        running, thr = _insert(running, thr, cand, n_new)
    return running, thr


@triton.jit
def _dot16(a, b, acc, EMULATE: tl.constexpr):
    """acc + a @ b for 16-bit a and b. EMULATE (the interpreter, whose bf16 tl.dot gives garbage):
    the same arithmetic in fp32, where every product of two 16-bit values is exact."""
    if EMULATE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _encode_kernel(x_ptr, w_ptr, benc_ptr, bdec_ptr, dead_ptr, cand_ptr, aux_cand_ptr,
                   N, M, D, lat_per_split, n_splits,
                   HAS_BENC: tl.constexpr, HAS_BDEC: tl.constexpr, HAS_AUX: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, EMULATE_DOT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_D: tl.constexpr, LOG_BM: tl.constexpr, K: tl.constexpr,
                   LOG_K: tl.constexpr, KA: tl.constexpr, LOG_KA: tl.constexpr,
                   EXTRACT_MAX: tl.constexpr):
    pid = tl.program_id(0)
    # Splits vary fastest: programs running together share row blocks of x and W tiles in L2.
    split = pid % n_splits
    rows = (pid // n_splits) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * D

    # Distinct sentinels, descending, so the lists hold unique keys from the start.
    slots = tl.arange(0, K)
    running = tl.zeros((BLOCK_N, K), tl.int64) + ((K - 1 - slots).to(tl.int64) + _SENT)[None, :]
    thr = tl.min(running, axis=1)
    aux_slots = tl.arange(0, KA)
    aux = tl.zeros((BLOCK_N, KA), tl.int64) + ((KA - 1 - aux_slots).to(tl.int64)
                                                + _SENT)[None, :]
    aux_thr = tl.min(aux, axis=1)

    lat_lo = split * lat_per_split
    lat_hi = tl.minimum(lat_lo + lat_per_split, M)
    for m0 in range(lat_lo, lat_hi, BLOCK_M):
        lats = m0 + tl.arange(0, BLOCK_M)
        lat_ok = lats < lat_hi
        w_rows = w_ptr + lats.to(tl.int64)[:, None] * D
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < D
            xt = tl.load(x_rows + ds[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            wt = tl.trans(tl.load(w_rows + ds[None, :], mask=lat_ok[:, None] & d_ok[None, :],
                                  other=0.0))
            if HAS_BDEC:
                b = tl.load(bdec_ptr + ds, mask=d_ok, other=0.0).to(tl.float32)
                xt = xt.to(tl.float32) - b[None, :]
            if DOT_DTYPE == tl.float32:
                acc = tl.dot(xt.to(tl.float32), wt.to(tl.float32), acc, input_precision="ieee")
            elif HAS_BDEC:
                # x - b_dec is exact in fp32 (as in the reference) but not in 16 bits: it is split
                # into hi + lo 16-bit parts, two dots. Products with 16-bit W are exact, so what
                # is left of the rounding is lo's: below 2^-16 |x - b_dec| (bf16), 2^-22 (fp16).
                hi = to_out(xt, DOT_DTYPE)
                lo = xt - hi.to(tl.float32)
                lo = to_out(tl.where(lo == lo, lo, 0.0), DOT_DTYPE)  # inf - inf: hi carries the inf
                acc = _dot16(lo, wt, _dot16(hi, wt, acc, EMULATE_DOT), EMULATE_DOT)
            else:
                acc = _dot16(xt, wt, acc, EMULATE_DOT)
        z = acc
        if HAS_BENC:
            z += tl.load(benc_ptr + lats, mask=lat_ok, other=0.0).to(tl.float32)[None, :]
        valid = row_ok[:, None] & lat_ok[None, :]
        first = m0 == lat_lo
        keys = tl.where(valid, _pack(z, lats[None, :]), _SENT)
        running, thr = _merge(running, thr, keys, first, LOG_K, LOG_BM, EXTRACT_MAX)
        if HAS_AUX:
            dead = tl.load(dead_ptr + lats, mask=lat_ok, other=0) != 0
            aux_keys = tl.where(valid, _pack(tl.where(dead[None, :], z, _NEG_INF), lats[None, :]),
                                _SENT)
            aux, aux_thr = _merge(aux, aux_thr, aux_keys, first, LOG_KA, LOG_BM, EXTRACT_MAX)

    out_rows = (rows.to(tl.int64) * n_splits + split)[:, None]
    tl.store(cand_ptr + out_rows * K + slots[None, :], running, mask=row_ok[:, None])
    if HAS_AUX:
        tl.store(aux_cand_ptr + out_rows * KA + aux_slots[None, :], aux, mask=row_ok[:, None])


@triton.jit
def _finalize_kernel(cand_ptr, val_ptr, idx_ptr, N, width, k,
                     LOG_W: tl.constexpr, LOG_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """Top-k of each row's `width` candidate keys, descending, decoded to ReLU'd values and int32
    indices."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    cols = tl.arange(0, 2**LOG_W)
    c = tl.load(cand_ptr + rows.to(tl.int64)[:, None] * width + cols[None, :],
                mask=row_ok[:, None] & (cols < width)[None, :], other=_SENT)
    top = _bitonic_topk(c, LOG_W, LOG_K, True)
    z, lat = _unpack(top)
    out_cols = tl.arange(0, 2**LOG_K)
    out = rows.to(tl.int64)[:, None] * k + out_cols[None, :]
    ok = row_ok[:, None] & (out_cols < k)[None, :]
    # ReLU that keeps NaN (tl.maximum may return the number where one operand is NaN).
    relu = tl.where(z < 0.0, 0.0, z)
    tl.store(val_ptr + out, to_out(relu, val_ptr.dtype.element_ty), mask=ok)
    tl.store(idx_ptr + out, lat, mask=ok)


# ---------------------------------------------------------------------------------------------
# launcher

@dataclasses.dataclass(frozen=True)
class EncodeConfig:
    """Launch parameters; `splits` is the number of latent ranges (programs per row block)."""
    block_n: int
    block_m: int
    block_d: int
    splits: int
    extract_max: int
    num_warps: int = 4
    num_stages: int = 2


def _log2(n: int) -> int:
    return max(int(n), 1).bit_length() - 1


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_config(N: int, M: int, D: int, K: int, KA: int, device: torch.device) -> EncodeConfig:
    """K, KA: padded list sizes (KA = 0 without aux)."""
    if interpreting():
        # The interpreter pays per operation, not per element: few, wide tiles. Two splits when
        # there are two tiles, so the split-merge path is exercised too.
        block_m = min(512, max(128, pow2(max(K, KA))))
        tiles = triton.cdiv(M, block_m)
        return EncodeConfig(block_n=max(16, min(64, pow2(N))), block_m=block_m,
                            block_d=max(16, min(64, pow2(D))), splits=min(2, tiles),
                            extract_max=16)
    # GPU (H100 class), not yet timed on one: tiles chosen so that ptxas does not spill (see
    # gpu_config). The 64-bit key tile and the bitonic network cost more registers than the
    # accumulator, so tiles are smaller than a plain GEMM's; K > BLOCK_M = 64 uses round-by-round
    # insertion only.
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return gpu_config(N, M, K, KA, sms)


def gpu_config(N: int, M: int, K: int, KA: int, sms: int) -> EncodeConfig:
    """The GPU launch parameters on a device with `sms` multiprocessors."""
    # From sm_90 ptxas reports (benches/triton_aot_report.py, bf16 with b_dec, 2026-12-02): the
    # largest tiles that fit 255 registers without spilling. Each thread holds
    # block_n * (K + KA) * 2 / (32 * num_warps) words of running lists, and the bitonic network
    # doubles a key tile, so rows per program shrink as the lists grow. No spill up to K = 256
    # without aux and up to K = 128 with KA = 512 (k_aux = 384, the default at D = 768); larger
    # lists spill (slow, not wrong; backend='cuda' keeps them in shared memory).
    block_m = 64
    if KA:
        block_n, block_d, num_warps = 16, 16, 4
    elif K <= 32:
        block_n, block_d, num_warps = 64, 32, 8
    else:
        block_n, block_d, num_warps = 32, 32, 8
    row_blocks = triton.cdiv(N, block_n)
    tiles = triton.cdiv(M, block_m)
    # ~8 splits keep the per-wave working set (the x row blocks plus one W tile per split) inside
    # L2; more when there are too few row blocks to fill the SMs; each split >= 4 tiles.
    splits = 8
    while row_blocks * splits < sms and splits < 64:
        splits *= 2
    splits = max(1, min(splits, tiles // 4))
    return EncodeConfig(block_n=block_n, block_m=block_m, block_d=block_d, splits=splits,
                        extract_max=16, num_warps=num_warps, num_stages=3)


# One finalize program sorts next_pow2(splits * K) keys of a row: at 2^15 keys it needs 256 KiB of
# shared memory (issue 13's sm_90 AOT compile), over the 227 KiB an H100/H200 block may have.
MAX_FINALIZE_KEYS = 1 << 15


def finalize_keys(N: int, M: int, k: int, k_aux: int, sms: int) -> tuple[int, int]:
    """Keys per row the GPU finalize sorts for the top-k and for the top-k_aux (0 without aux)."""
    K = pow2(max(k, 2))
    KA = pow2(max(k_aux, 2)) if k_aux else 0
    cfg = gpu_config(N, M, K, KA, sms)
    splits = triton.cdiv(M, triton.cdiv(triton.cdiv(M, cfg.block_m), cfg.splits) * cfg.block_m)
    return pow2(splits * K), pow2(splits * KA) if KA else 0


def gpu_unsupported(N: int, M: int, k: int, k_aux: int, device: torch.device) -> str:
    """Why the GPU kernels cannot run this request, or ''."""
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    for name, value, keys in zip(("k", "k_aux"), (k, k_aux), finalize_keys(N, M, k, k_aux, sms)):
        if keys >= MAX_FINALIZE_KEYS:
            return (f"{name}={value} with {N} rows and {M} latents makes backend='triton' merge "
                    f"{keys} candidate keys per row in one program, more shared memory than a GPU "
                    f"block has (at most {MAX_FINALIZE_KEYS // 2}); use backend='cuda' or 'torch', "
                    f"a smaller {name}, or more rows per call")
    return ""


def topk_encode_forward(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor | None,
                        b_dec: torch.Tensor | None, k: int, dead_mask: torch.Tensor | None,
                        k_aux: int, *, config: EncodeConfig | None = None):
    """Returns (values (N, k) x.dtype, indices (N, k) int32, aux_values (N, k_aux), aux_indices)."""
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"topk_encode_forward (triton): x must be float32, float16 or bfloat16, "
                        f"got {x.dtype}")
    x, W_enc = x.contiguous(), W_enc.contiguous()
    N, D = x.shape
    M = W_enc.shape[0]
    k, k_aux = int(k), int(k_aux)
    if not 1 <= k <= M or not 0 <= k_aux <= M:
        raise ValueError(f"topk_encode_forward (triton): need 1 <= k <= M and 0 <= k_aux <= M, "
                         f"got k={k}, k_aux={k_aux}, M={M}")
    dev = x.device
    values = torch.empty((N, k), dtype=x.dtype, device=dev)
    indices = torch.empty((N, k), dtype=torch.int32, device=dev)
    aux_values = torch.empty((N, k_aux), dtype=x.dtype, device=dev)
    aux_indices = torch.empty((N, k_aux), dtype=torch.int32, device=dev)
    if N == 0:
        return values, indices, aux_values, aux_indices

    K = pow2(max(k, 2))
    KA = pow2(max(k_aux, 2)) if k_aux else 0
    cfg = config or default_config(N, M, D, K, KA, dev)
    block_m = cfg.block_m
    lat_per_split = triton.cdiv(triton.cdiv(M, block_m), cfg.splits) * block_m
    splits = triton.cdiv(M, lat_per_split)

    has_aux = k_aux > 0
    if has_aux:
        dead = (torch.zeros(M, dtype=torch.uint8, device=dev) if dead_mask is None
                else dead_mask.contiguous().to(torch.uint8))
    else:
        dead = x  # never read
    b_enc = None if b_enc is None else b_enc.contiguous()
    b_dec = None if b_dec is None else b_dec.contiguous()
    dot_dtype = {torch.float32: tl.float32, torch.float16: tl.float16,
                 torch.bfloat16: tl.bfloat16}[x.dtype]

    cand = torch.empty((N, splits, K), dtype=torch.int64, device=dev)
    aux_cand = torch.empty((N, splits, KA), dtype=torch.int64, device=dev) if has_aux else cand
    grid = (triton.cdiv(N, cfg.block_n) * splits,)
    _encode_kernel[grid](
        x, W_enc, b_enc if b_enc is not None else x, b_dec if b_dec is not None else x, dead,
        cand, aux_cand, N, M, D, lat_per_split, splits,
        HAS_BENC=b_enc is not None, HAS_BDEC=b_dec is not None, HAS_AUX=has_aux,
        DOT_DTYPE=dot_dtype, EMULATE_DOT=interpreting() and x.dtype == torch.bfloat16, BLOCK_N=cfg.block_n, BLOCK_M=block_m, BLOCK_D=cfg.block_d,
        LOG_BM=_log2(block_m), K=K, LOG_K=_log2(K), KA=max(KA, 2), LOG_KA=_log2(max(KA, 2)),
        EXTRACT_MAX=cfg.extract_max, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    _finalize(cand, values, indices, k, K)
    if has_aux:
        _finalize(aux_cand, aux_values, aux_indices, k_aux, KA)
    return values, indices, aux_values, aux_indices


def _finalize(cand: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, k: int, K: int):
    N, splits, _ = cand.shape
    width = splits * K
    log_w = _log2(pow2(width))
    # Bound the (rows, width) key tile: ~4K keys per program on GPU, one program per call when
    # interpreting.
    budget = 1 << 16 if interpreting() else 1 << 12
    block_r = max(1, min(pow2(N), budget >> log_w))
    _finalize_kernel[(triton.cdiv(N, block_r),)](
        cand, values, indices, N, width, k, LOG_W=log_w, LOG_K=_log2(K), BLOCK_R=block_r,
        num_warps=4)
