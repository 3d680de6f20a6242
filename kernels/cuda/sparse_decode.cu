// Sparse decode (gather_sum), its input gradient (gather_dot) and the deterministic sparse^T x dense
// weight gradient (sparse_t_matmul). Contract in sparse_decode.cuh.
//
// All three are bandwidth-bound on gathered rows of D elements: rows are read with 16-byte vector
// loads (when D and the pointers allow, else element by element), several independent loads in
// flight per thread, fp32 accumulation.
#include "sparse_decode.cuh"

#include <algorithm>
#include <type_traits>

#include <cub/device/device_radix_sort.cuh>

#include "common.cuh"

namespace pyinterp::cuda {
namespace {

using namespace detail;  // common.cuh

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xFFFFFFFFu;

// ------------------------------------------------------------------------------------------------
// gather_sum: one warp per output row. A lane owns kSumGroup 16-byte column chunks at a time and
// walks the row's k (index, value) pairs, which the warp stages 32 at a time in registers and
// broadcasts by shuffle; the chunks of kSumUnroll pairs are loaded before any is accumulated.
// ------------------------------------------------------------------------------------------------
constexpr int kSumGroup = 4;
constexpr int kSumUnroll = 4;

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) gather_sum_kernel(const T* __restrict__ values,
                                                              const int32_t* __restrict__ indices,
                                                              const T* __restrict__ weight,
                                                              const T* __restrict__ bias, int64_t N,
                                                              int64_t k, int64_t M, int64_t D,
                                                              T* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t row = blockIdx.x * int64_t(kWarps) + (threadIdx.x >> 5);
  if (row >= N) return;
  const int64_t nvec = D / VEC;
  const int32_t* idx_row = indices + row * k;
  const T* val_row = values + row * k;
  for (int64_t c0 = 0; c0 < nvec; c0 += 32 * kSumGroup) {
    float acc[kSumGroup][VEC];
#pragma unroll
    for (int g = 0; g < kSumGroup; ++g)
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[g][e] = 0.0f;
    for (int64_t j0 = 0; j0 < k; j0 += 32) {
      const int jn = static_cast<int>(k - j0 < 32 ? k - j0 : 32);
      int my_idx = -1;
      float my_val = 0.0f;
      if (lane < jn) {
        my_idx = idx_row[j0 + lane];
        my_val = to_float(val_row[j0 + lane]);
      }
      for (int jj = 0; jj < jn; jj += kSumUnroll) {
        detail::Packed<T, VEC> raw[kSumUnroll][kSumGroup];
        float v[kSumUnroll];
#pragma unroll
        for (int u = 0; u < kSumUnroll; ++u) {
          const int src = jj + u;
          const int id = __shfl_sync(kFull, my_idx, src & 31);
          const float val = __shfl_sync(kFull, my_val, src & 31);
          // Pairs past the row's end or with an invalid index add 0 * 0 (nothing is loaded).
          const bool ok = src < jn && id >= 0 && id < M;
          v[u] = ok ? val : 0.0f;
          const T* w_row = weight + int64_t(ok ? id : 0) * D;
#pragma unroll
          for (int g = 0; g < kSumGroup; ++g) {
            const int64_t c = c0 + g * 32 + lane;
            raw[u][g] = (ok && c < nvec) ? detail::load_packed<T, VEC>(w_row + c * VEC)
                                         : detail::zero_packed<T, VEC>();
          }
        }
#pragma unroll
        for (int u = 0; u < kSumUnroll; ++u)
#pragma unroll
          for (int g = 0; g < kSumGroup; ++g) {
            float w[VEC];
            detail::unpack<T, VEC>(raw[u][g], w);
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[g][e] = fmaf(v[u], w[e], acc[g][e]);
          }
      }
    }
#pragma unroll
    for (int g = 0; g < kSumGroup; ++g) {
      const int64_t c = c0 + g * 32 + lane;
      if (c >= nvec) continue;
      if (bias) {
        float b[VEC];
        load_as_float<T, VEC>(bias + c * VEC, b);
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[g][e] += b[e];
      }
      store_from_float<T, VEC>(out + row * D + c * VEC, acc[g]);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// gather_dot: one warp per row, kDotGroup latents at a time so that each grad chunk, read once,
// meets kDotGroup weight chunks; two chunk steps are loaded before any is accumulated; a fixed
// xor-shuffle tree finishes each dot product.
// ------------------------------------------------------------------------------------------------
constexpr int kDotGroup = 4;
constexpr int kDotSteps = 2;

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) gather_dot_kernel(const T* __restrict__ grad,
                                                              const int32_t* __restrict__ indices,
                                                              const T* __restrict__ weight, int64_t N,
                                                              int64_t k, int64_t M, int64_t D,
                                                              T* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t row = blockIdx.x * int64_t(kWarps) + (threadIdx.x >> 5);
  if (row >= N) return;
  const int64_t nvec = D / VEC;
  const T* g_row = grad + row * D;
  for (int64_t j0 = 0; j0 < k; j0 += kDotGroup) {
    const T* w_rows[kDotGroup];
    bool ok[kDotGroup];
    float acc[kDotGroup];
#pragma unroll
    for (int u = 0; u < kDotGroup; ++u) {
      const int id = j0 + u < k ? indices[row * k + j0 + u] : -1;
      ok[u] = id >= 0 && id < M;
      w_rows[u] = weight + int64_t(ok[u] ? id : 0) * D;
      acc[u] = 0.0f;
    }
    for (int64_t c0 = lane; c0 < nvec; c0 += 32 * kDotSteps) {
      detail::Packed<T, VEC> g_raw[kDotSteps], w_raw[kDotSteps][kDotGroup];
#pragma unroll
      for (int s = 0; s < kDotSteps; ++s) {
        const int64_t c = c0 + 32 * s;
        const bool in = c < nvec;
        g_raw[s] = in ? detail::load_packed<T, VEC>(g_row + c * VEC) : detail::zero_packed<T, VEC>();
#pragma unroll
        for (int u = 0; u < kDotGroup; ++u)
          w_raw[s][u] = (in && ok[u]) ? detail::load_packed<T, VEC>(w_rows[u] + c * VEC)
                                      : detail::zero_packed<T, VEC>();
      }
#pragma unroll
      for (int s = 0; s < kDotSteps; ++s) {
        float g[VEC];
        detail::unpack<T, VEC>(g_raw[s], g);
#pragma unroll
        for (int u = 0; u < kDotGroup; ++u) {
          float w[VEC];
          detail::unpack<T, VEC>(w_raw[s][u], w);
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[u] = fmaf(g[e], w[e], acc[u]);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kDotGroup; ++u)
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) acc[u] += __shfl_xor_sync(kFull, acc[u], o);
#pragma unroll
    for (int u = 0; u < kDotGroup; ++u)
      if (lane == u && j0 + u < k) out[row * k + j0 + u] = from_float<T>(acc[u]);
  }
}

// ------------------------------------------------------------------------------------------------
// sparse_t_matmul
//   1. pairs (latent, n*k + j), invalid latents mapped to M (they sort last and are ignored);
//   2. cub radix sort by latent (stable: each latent's positions stay increasing);
//   3. seg[i] = first sorted slot of latent i (seg[M] = number of valid pairs);
//   4. the sorted pairs are cut into fixed chunks of `chunk` slots, one CTA each (balanced however
//      skewed the latents are): a CTA sums each latent run it sees in slot order and writes the
//      result directly when the run is the latent's whole segment, else as a partial (slot 0: the
//      run continues one from the previous chunk; slot 1: it starts here and continues);
//   5. one warp per latent writes zeros for unused latents and sums the partials, in chunk order,
//      for latents that span chunks.
// ------------------------------------------------------------------------------------------------
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

template <typename T, int VEC>
struct ChunkArgs {
  const uint32_t* keys;   // sorted latents
  const int64_t* pos;     // their n*k + j
  const int64_t* seg;     // (M + 1) segment starts
  const T* coef;          // (N*k)
  const T* rows;          // (N, D)
  int64_t k, D, M, chunk;
  T* weight_grad;         // (M, D)
  float* coef_sum;        // (M)
  float* partial;         // (chunks, 2, D)
  float* partial_coef;    // (chunks, 2)
};

template <typename T, int VEC>
__device__ __forceinline__ void flush_run(const ChunkArgs<T, VEC>& a, uint32_t lat, int64_t begin,
                                          int64_t end, int64_t v0, float (&acc)[kChunkVecsPerThread][VEC],
                                          float coef_acc) {
  const int64_t nvec = a.D / VEC;
  const int64_t s = a.seg[lat], e = a.seg[lat + 1];
  const bool whole = begin == s && end == e;
  float* dst_f = nullptr;
  if (!whole) {
    const int64_t slot = blockIdx.x * int64_t(2) + (begin > s ? 0 : 1);
    dst_f = a.partial + slot * a.D;
    if (v0 == 0 && threadIdx.x == 0) a.partial_coef[slot] = coef_acc;
  } else if (v0 == 0 && threadIdx.x == 0) {
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

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) chunk_reduce_kernel(const ChunkArgs<T, VEC> a) {
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
        const T* row = a.rows + (pos / a.k) * a.D;
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

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) finalize_kernel(const ChunkArgs<T, VEC> a) {
  const int lane = threadIdx.x & 31;
  const int64_t lat = blockIdx.x * int64_t(kWarps) + (threadIdx.x >> 5);
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
  if (lane == 0) {
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

template <typename T, int VEC>
cudaError_t run_stm(const ChunkArgs<T, VEC>& a, const StmPlan& p, cudaStream_t stream) {
  const int64_t nvec = a.D / VEC;
  if (p.chunks > 0) {
    // Enough threads for the row's vector chunks (kChunkVecsPerThread each), in whole warps.
    const int threads = static_cast<int>(
        std::clamp<int64_t>(ceil_div(ceil_div(nvec, kChunkVecsPerThread), 32) * 32, 32, kThreads));
    chunk_reduce_kernel<T, VEC><<<static_cast<unsigned>(p.chunks), threads, 0, stream>>>(a);
    PI_TRY(cudaGetLastError());
  }
  finalize_kernel<T, VEC><<<static_cast<unsigned>(ceil_div(a.M, kWarps)), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t gather_sum(const T* values, const int32_t* indices, const T* weight, const T* bias,
                       int64_t N, int64_t k, int64_t M, int64_t D, T* out, cudaStream_t stream) {
  constexpr int kVec = detail::kVec16<T>;
  if (N == 0 || D == 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(ceil_div(N, kWarps));
  const bool vec = D % kVec == 0 && aligned16(weight) && aligned16(out) && (!bias || aligned16(bias));
  if (vec)
    gather_sum_kernel<T, kVec><<<grid, kThreads, 0, stream>>>(values, indices, weight, bias, N, k, M, D, out);
  else
    gather_sum_kernel<T, 1><<<grid, kThreads, 0, stream>>>(values, indices, weight, bias, N, k, M, D, out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t gather_dot(const T* grad, const int32_t* indices, const T* weight, int64_t N, int64_t k,
                       int64_t M, int64_t D, T* out, cudaStream_t stream) {
  constexpr int kVec = detail::kVec16<T>;
  if (N == 0 || k == 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(ceil_div(N, kWarps));
  const bool vec = D % kVec == 0 && aligned16(weight) && aligned16(grad);
  if (vec)
    gather_dot_kernel<T, kVec><<<grid, kThreads, 0, stream>>>(grad, indices, weight, N, k, M, D, out);
  else
    gather_dot_kernel<T, 1><<<grid, kThreads, 0, stream>>>(grad, indices, weight, N, k, M, D, out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t sparse_t_matmul_workspace_bytes(int64_t N, int64_t k, int64_t M, int64_t D, size_t* bytes) {
  StmPlan p;
  PI_TRY(make_stm_plan(N, k, M, D, p));
  *bytes = p.total;
  return cudaSuccess;
}

template <typename T>
cudaError_t sparse_t_matmul(const T* coef, const int32_t* indices, const T* rows, int64_t N, int64_t k,
                            int64_t M, int64_t D, T* weight_grad, float* coef_sum, void* workspace,
                            size_t workspace_bytes, cudaStream_t stream) {
  constexpr int kVec = detail::kVec16<T>;
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
    make_pairs_kernel<<<grid_for(p.L, kThreads), kThreads, 0, stream>>>(indices, p.L, M, keys, pos);
    PI_TRY(cudaGetLastError());
    size_t cub_bytes = p.cub_bytes;
    PI_TRY(cub::DeviceRadixSort::SortPairs(ws + p.off_cub, cub_bytes, keys, keys_sorted, pos, pos_sorted,
                                           p.L, 0, p.end_bit, stream));
  }
  segment_starts_kernel<<<grid_for(M + 1, kThreads), kThreads, 0, stream>>>(keys_sorted, p.L, M, seg);
  PI_TRY(cudaGetLastError());

  const bool vec = D % kVec == 0 && aligned16(rows) && aligned16(weight_grad);
  auto args = [&](auto vec_tag) {
    constexpr int V = decltype(vec_tag)::value;
    ChunkArgs<T, V> a{};
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

#define PI_INSTANTIATE(T)                                                                            \
  template cudaError_t gather_sum<T>(const T*, const int32_t*, const T*, const T*, int64_t, int64_t, \
                                     int64_t, int64_t, T*, cudaStream_t);                           \
  template cudaError_t gather_dot<T>(const T*, const int32_t*, const T*, int64_t, int64_t, int64_t,  \
                                     int64_t, T*, cudaStream_t);                                    \
  template cudaError_t sparse_t_matmul_workspace_bytes<T>(int64_t, int64_t, int64_t, int64_t,       \
                                                          size_t*);                                 \
  template cudaError_t sparse_t_matmul<T>(const T*, const int32_t*, const T*, int64_t, int64_t,     \
                                          int64_t, int64_t, T*, float*, void*, size_t, cudaStream_t);
PI_INSTANTIATE(float)
PI_INSTANTIATE(__half)
PI_INSTANTIATE(__nv_bfloat16)
#undef PI_INSTANTIATE

}  // namespace pyinterp::cuda
