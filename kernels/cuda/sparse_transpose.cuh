// The deterministic sparse-transpose product of the SAE backwards, shared by sparse_decode.cu
// (sparse_t_matmul) and prefix_decode.cu (prefix_t_matmul); device code and launcher plumbing,
// include from .cu only (after common.cuh).
//
//   weight_grad[i] = sum_{(n,j): indices[n,j] = i} coef[n, j] * rows(i, n)     (M, D)
//   coef_sum[i]    = sum_{(n,j): indices[n,j] = i} coef[n, j]                  (M), fp32, optional
//
// rows(i, n) is a functor: the row of an (N, D) matrix that latent i's pair in token n scales (for
// sparse_t_matmul the token's row alone; for prefix_t_matmul the row of latent i's bucket).
//   1. pairs (latent, n*k + j), invalid latents mapped to M (they sort last and are ignored);
//   2. cub radix sort by latent (stable: each latent's positions stay increasing);
//   3. seg[i] = first sorted slot of latent i (seg[M] = number of valid pairs);
//   4. the sorted pairs are cut into fixed chunks of `chunk` slots, one CTA each (balanced however
//      skewed the latents are): a CTA sums each latent run it sees in slot order and writes the
//      result directly when the run is the latent's whole segment, else as a partial (slot 0: the
//      run continues one from the previous chunk; slot 1: it starts here and continues);
//   5. one warp per latent writes zeros for unused latents and sums the partials, in chunk order,
//      for latents that span chunks.
// Deterministic: each latent's pairs are summed in increasing n*k + j order (in fixed chunks of that
// order, then the chunks in order); no atomics.
#pragma once

#include <algorithm>
#include <type_traits>

#include <cub/device/device_radix_sort.cuh>

#include "common.cuh"

namespace pyinterp::cuda::detail {
namespace {  // internal linkage in each .cu that includes it, as if written there

constexpr int kStmThreads = 256;
constexpr int kStmWarps = kStmThreads / 32;
constexpr int kChunkUnroll = 4;          // pairs whose rows are loaded before any is accumulated
constexpr int kChunkVecsPerThread = 2;   // 16-byte column chunks per thread and pass over the pairs
constexpr int64_t kPartialBytes = int64_t(128) << 20;

__global__ void make_pairs_kernel(const int32_t* __restrict__ indices, int64_t L, int64_t M,
                                  uint32_t* __restrict__ keys, int64_t* __restrict__ pos) {
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < L;
       p += int64_t(gridDim.x) * blockDim.x) {
    const int32_t i = indices[p];
    keys[p] = (i >= 0 && i < M) ? static_cast<uint32_t>(i) : static_cast<uint32_t>(M);
    pos[p] = p;
  }
}

__global__ void segment_starts_kernel(const uint32_t* __restrict__ sorted_keys, int64_t L, int64_t M,
                                      int64_t* __restrict__ seg) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i <= M;
       i += int64_t(gridDim.x) * blockDim.x) {
    int64_t lo = 0, hi = L;
    while (lo < hi) {
      const int64_t mid = (lo + hi) >> 1;
      if (sorted_keys[mid] < static_cast<uint64_t>(i)) lo = mid + 1; else hi = mid;
    }
    seg[i] = lo;
  }
}

template <int VEC>
__device__ __forceinline__ void load_partial(const float* __restrict__ p, float (&v)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int e = 0; e < VEC; e += 4) {
      const float4 q = *reinterpret_cast<const float4*>(p + e);
      v[e] = q.x;
      v[e + 1] = q.y;
      v[e + 2] = q.z;
      v[e + 3] = q.w;
    }
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) v[e] = p[e];
  }
}

template <int VEC>
__device__ __forceinline__ void store_partial(float* __restrict__ p, const float (&v)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int e = 0; e < VEC; e += 4)
      *reinterpret_cast<float4*>(p + e) = make_float4(v[e], v[e + 1], v[e + 2], v[e + 3]);
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) p[e] = v[e];
  }
}

template <typename T, int VEC, typename Rows>
struct ChunkArgs {
  const uint32_t* keys;   // sorted latents
  const int64_t* pos;     // their n*k + j
  const int64_t* seg;     // (M + 1) segment starts
  const T* coef;          // (N*k)
  Rows rows;              // rows(latent, n): the row that pair (latent, n*k + j) scales
  int64_t k, D, M, chunk;
  T* weight_grad;         // (M, D)
  float* coef_sum;        // (M), or nullptr: not wanted
  float* partial;         // (chunks, 2, D)
  float* partial_coef;    // (chunks, 2)
};

template <typename T, int VEC, typename Rows>
__device__ __forceinline__ void flush_run(const ChunkArgs<T, VEC, Rows>& a, uint32_t lat, int64_t begin,
                                          int64_t end, int64_t v0, float (&acc)[kChunkVecsPerThread][VEC],
                                          float coef_acc) {
  const int64_t nvec = a.D / VEC;
  const int64_t s = a.seg[lat], e = a.seg[lat + 1];
  const bool whole = begin == s && end == e;
  float* dst_f = nullptr;
  if (!whole) {
    const int64_t slot = blockIdx.x * int64_t(2) + (begin > s ? 0 : 1);
    dst_f = a.partial + slot * a.D;
    if (a.coef_sum && v0 == 0 && threadIdx.x == 0) a.partial_coef[slot] = coef_acc;
  } else if (a.coef_sum && v0 == 0 && threadIdx.x == 0) {
    a.coef_sum[lat] = coef_acc;
  }
#pragma unroll
  for (int u = 0; u < kChunkVecsPerThread; ++u) {
    const int64_t vi = v0 + u * int64_t(blockDim.x) + threadIdx.x;
    if (vi >= nvec) continue;
    if (whole)
      store_from_float<T, VEC>(a.weight_grad + int64_t(lat) * a.D + vi * VEC, acc[u]);
    else
      store_partial<VEC>(dst_f + vi * VEC, acc[u]);
  }
}

template <typename T, int VEC, typename Rows>
__global__ void __launch_bounds__(kStmThreads) chunk_reduce_kernel(const ChunkArgs<T, VEC, Rows> a) {
  const int64_t valid = a.seg[a.M];
  const int64_t p0 = blockIdx.x * a.chunk;
  if (p0 >= valid) return;
  const int64_t p1 = p0 + a.chunk < valid ? p0 + a.chunk : valid;
  const int64_t nvec = a.D / VEC;
  // At least one pass: coef_sum is flushed with the first column pass, and D = 0 has no columns.
  for (int64_t v0 = 0; v0 == 0 || v0 < nvec; v0 += int64_t(kChunkVecsPerThread) * blockDim.x) {
    float acc[kChunkVecsPerThread][VEC];
#pragma unroll
    for (int u = 0; u < kChunkVecsPerThread; ++u)
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[u][e] = 0.0f;
    float coef_acc = 0.0f;
    uint32_t cur = a.keys[p0];
    int64_t run_begin = p0;
    for (int64_t p = p0; p < p1; p += kChunkUnroll) {
      uint32_t lat[kChunkUnroll];
      float cf[kChunkUnroll];
      float r[kChunkUnroll][kChunkVecsPerThread][VEC];
#pragma unroll
      for (int q = 0; q < kChunkUnroll; ++q) {
        if (p + q >= p1) continue;
        lat[q] = a.keys[p + q];
        const int64_t pos = a.pos[p + q];
        cf[q] = to_float(a.coef[pos]);
        const T* row = a.rows(lat[q], pos / a.k);
#pragma unroll
        for (int u = 0; u < kChunkVecsPerThread; ++u) {
          const int64_t vi = v0 + u * int64_t(blockDim.x) + threadIdx.x;
          if (vi < nvec) {
            load_as_float<T, VEC>(row + vi * VEC, r[q][u]);
          } else {
#pragma unroll
            for (int e = 0; e < VEC; ++e) r[q][u][e] = 0.0f;
          }
        }
      }
#pragma unroll
      for (int q = 0; q < kChunkUnroll; ++q) {
        if (p + q >= p1) continue;
        if (lat[q] != cur) {
          flush_run(a, cur, run_begin, p + q, v0, acc, coef_acc);
#pragma unroll
          for (int u = 0; u < kChunkVecsPerThread; ++u)
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[u][e] = 0.0f;
          coef_acc = 0.0f;
          cur = lat[q];
          run_begin = p + q;
        }
        coef_acc += cf[q];
#pragma unroll
        for (int u = 0; u < kChunkVecsPerThread; ++u)
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[u][e] = fmaf(cf[q], r[q][u][e], acc[u][e]);
      }
    }
    flush_run(a, cur, run_begin, p1, v0, acc, coef_acc);
  }
}

// What finalize_kernel reads of ChunkArgs (it never touches the pairs or their rows).
template <typename T>
struct FinalizeArgs {
  const int64_t* seg;
  int64_t D, M, chunk;
  T* weight_grad;
  float* coef_sum;
  const float* partial;
  const float* partial_coef;
};

template <typename T, int VEC>
__global__ void __launch_bounds__(kStmThreads) finalize_kernel(const FinalizeArgs<T> a) {
  const int lane = threadIdx.x & 31;
  const int64_t lat = blockIdx.x * int64_t(kStmWarps) + (threadIdx.x >> 5);
  if (lat >= a.M) return;
  const int64_t s = a.seg[lat], e = a.seg[lat + 1];
  const int64_t first = s / a.chunk, last = (e - 1) / a.chunk;
  if (e > s && first == last) return;  // summed whole by chunk_reduce_kernel
  const int64_t nvec = a.D / VEC;
  for (int64_t vi = lane; vi < nvec; vi += 32) {
    float acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = 0.0f;
    if (e > s) {
      load_partial<VEC>(a.partial + (first * 2 + 1) * a.D + vi * VEC, acc);
      for (int64_t c = first + 1; c <= last; ++c) {
        float part[VEC];
        load_partial<VEC>(a.partial + (c * 2) * a.D + vi * VEC, part);
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[i] += part[i];
      }
    }
    store_from_float<T, VEC>(a.weight_grad + lat * a.D + vi * VEC, acc);
  }
  if (a.coef_sum && lane == 0) {
    float cs = 0.0f;
    if (e > s) {
      cs = a.partial_coef[first * 2 + 1];
      for (int64_t c = first + 1; c <= last; ++c) cs += a.partial_coef[c * 2];
    }
    a.coef_sum[lat] = cs;
  }
}

int grid_for(int64_t n, int threads) {
  return static_cast<int>(std::clamp<int64_t>(ceil_div(n, threads), 1, 4096));
}

struct StmPlan {
  int64_t L = 0, chunk = 1, chunks = 0;
  int end_bit = 1;
  size_t cub_bytes = 0;
  size_t off_keys = 0, off_keys_sorted = 0, off_pos = 0, off_pos_sorted = 0, off_seg = 0;
  size_t off_partial = 0, off_partial_coef = 0, off_cub = 0, total = 0;
};

cudaError_t make_stm_plan(int64_t N, int64_t k, int64_t M, int64_t D, StmPlan& p) {
  if (N < 0 || k < 0 || M < 1 || M > INT32_MAX || D < 0) return cudaErrorInvalidValue;
  int device = 0, sms = 0;
  PI_TRY(cudaGetDevice(&device));
  PI_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  p.L = N * k;
  // ~16 chunks per SM for balance, fewer if their fp32 partials would pass kPartialBytes.
  const int64_t by_memory = std::max<int64_t>(1, kPartialBytes / std::max<int64_t>(1, 2 * D * 4));
  const int64_t target = std::min<int64_t>(int64_t(16) * sms, by_memory);
  p.chunk = std::max<int64_t>(32, ceil_div(p.L, target));
  p.chunks = ceil_div(p.L, p.chunk);
  p.end_bit = 32 - __builtin_clz(static_cast<uint32_t>(M));  // keys 0..M (M = invalid)
  size_t cursor = 0;
  p.off_keys = carve(cursor, sizeof(uint32_t) * p.L);
  p.off_keys_sorted = carve(cursor, sizeof(uint32_t) * p.L);
  p.off_pos = carve(cursor, sizeof(int64_t) * p.L);
  p.off_pos_sorted = carve(cursor, sizeof(int64_t) * p.L);
  p.off_seg = carve(cursor, sizeof(int64_t) * (M + 1));
  p.off_partial = carve(cursor, sizeof(float) * p.chunks * 2 * D);
  p.off_partial_coef = carve(cursor, sizeof(float) * p.chunks * 2);
  if (p.L > 0)
    PI_TRY(cub::DeviceRadixSort::SortPairs(nullptr, p.cub_bytes, static_cast<const uint32_t*>(nullptr),
                                           static_cast<uint32_t*>(nullptr),
                                           static_cast<const int64_t*>(nullptr),
                                           static_cast<int64_t*>(nullptr), p.L, 0, p.end_bit));
  p.off_cub = carve(cursor, p.cub_bytes);
  p.total = cursor;
  return cudaSuccess;
}

template <typename T, int VEC, typename Rows>
cudaError_t run_stm(const ChunkArgs<T, VEC, Rows>& a, const StmPlan& p, cudaStream_t stream) {
  const int64_t nvec = a.D / VEC;
  if (p.chunks > 0) {
    // Enough threads for the row's vector chunks (kChunkVecsPerThread each), in whole warps.
    const int threads = static_cast<int>(
        std::clamp<int64_t>(ceil_div(ceil_div(nvec, kChunkVecsPerThread), 32) * 32, 32, kStmThreads));
    chunk_reduce_kernel<T, VEC, Rows><<<static_cast<unsigned>(p.chunks), threads, 0, stream>>>(a);
    PI_TRY(cudaGetLastError());
  }
  const FinalizeArgs<T> f{a.seg, a.D, a.M, a.chunk, a.weight_grad, a.coef_sum, a.partial, a.partial_coef};
  finalize_kernel<T, VEC><<<static_cast<unsigned>(ceil_div(a.M, kStmWarps)), kStmThreads, 0, stream>>>(f);
  return cudaGetLastError();
}


// The whole product on `stream`; `workspace` holds at least make_stm_plan's total bytes.
// rows_aligned16: every row rows(i, n) starts 16-byte aligned (then D % kVec16<T> == 0 takes
// vector loads), as does weight_grad.
template <typename T, typename Rows>
cudaError_t sparse_transpose_sum(const T* coef, const int32_t* indices, const Rows& rows, bool rows_aligned16,
                                 int64_t N, int64_t k, int64_t M, int64_t D, T* weight_grad, float* coef_sum,
                                 void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  constexpr int kVec = kVec16<T>;
  StmPlan p;
  PI_TRY(make_stm_plan(N, k, M, D, p));
  if (workspace_bytes < p.total) return cudaErrorInvalidValue;
  auto* ws = static_cast<uint8_t*>(workspace);
  auto* keys = reinterpret_cast<uint32_t*>(ws + p.off_keys);
  auto* keys_sorted = reinterpret_cast<uint32_t*>(ws + p.off_keys_sorted);
  auto* pos = reinterpret_cast<int64_t*>(ws + p.off_pos);
  auto* pos_sorted = reinterpret_cast<int64_t*>(ws + p.off_pos_sorted);
  auto* seg = reinterpret_cast<int64_t*>(ws + p.off_seg);
  if (p.L > 0) {
    make_pairs_kernel<<<grid_for(p.L, kStmThreads), kStmThreads, 0, stream>>>(indices, p.L, M, keys, pos);
    PI_TRY(cudaGetLastError());
    size_t cub_bytes = p.cub_bytes;
    PI_TRY(cub::DeviceRadixSort::SortPairs(ws + p.off_cub, cub_bytes, keys, keys_sorted, pos, pos_sorted,
                                           p.L, 0, p.end_bit, stream));
  }
  segment_starts_kernel<<<grid_for(M + 1, kStmThreads), kStmThreads, 0, stream>>>(keys_sorted, p.L, M, seg);
  PI_TRY(cudaGetLastError());

  const bool vec = D % kVec == 0 && rows_aligned16 && aligned16(weight_grad);
  auto args = [&](auto vec_tag) {
    constexpr int V = decltype(vec_tag)::value;
    ChunkArgs<T, V, Rows> a{};
    a.keys = keys_sorted;
    a.pos = pos_sorted;
    a.seg = seg;
    a.coef = coef;
    a.rows = rows;
    a.k = k;
    a.D = D;
    a.M = M;
    a.chunk = p.chunk;
    a.weight_grad = weight_grad;
    a.coef_sum = coef_sum;
    a.partial = reinterpret_cast<float*>(ws + p.off_partial);
    a.partial_coef = reinterpret_cast<float*>(ws + p.off_partial_coef);
    return a;
  };
  if (vec) return run_stm(args(std::integral_constant<int, kVec>{}), p, stream);
  return run_stm(args(std::integral_constant<int, 1>{}), p, stream);
}

}  // namespace
}  // namespace pyinterp::cuda::detail
