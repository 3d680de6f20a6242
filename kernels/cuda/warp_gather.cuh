// The warp-per-row gathers of decoder rows shared by sparse_decode.cu (gather_sum, gather_dot) and
// prefix_decode.cu (their bucket-aware forms); device code, include from .cu only (after common.cuh).
// Rows are read in 16-byte vector chunks (VEC elements; VEC = 1 is the scalar path), several loads in
// flight per lane, fp32 accumulation.
#pragma once

#include "common.cuh"

namespace pyinterp::cuda::detail {

constexpr unsigned kFullWarp = 0xFFFFFFFFu;
constexpr int kSumGroup = 4;   // column chunks a lane owns at a time in a gather-sum (c0 + g*32 + lane)
constexpr int kSumUnroll = 4;  // entries whose chunks are loaded before any is accumulated
constexpr int kDotGroup = 4;   // latents whose dot products a warp forms together
constexpr int kDotSteps = 2;   // chunk steps loaded before any is accumulated

// acc[g] += v[u] * weight[id[u]] over the kSumUnroll entries, for the lane's chunks c0 + g*32 + lane
// below nvec. An entry with ok[u] false adds nothing and loads nothing.
template <typename T, int VEC>
__device__ __forceinline__ void add_weight_chunks(const T* __restrict__ weight, int64_t D, int64_t nvec, int64_t c0,
                                                  int lane, const int (&id)[kSumUnroll],
                                                  const float (&v)[kSumUnroll], const bool (&ok)[kSumUnroll],
                                                  float (&acc)[kSumGroup][VEC]) {
  Packed<T, VEC> raw[kSumUnroll][kSumGroup];
  float scale[kSumUnroll];
#pragma unroll
  for (int u = 0; u < kSumUnroll; ++u) {
    scale[u] = ok[u] ? v[u] : 0.0f;
    const T* w_row = weight + int64_t(ok[u] ? id[u] : 0) * D;
#pragma unroll
    for (int g = 0; g < kSumGroup; ++g) {
      const int64_t c = c0 + g * 32 + lane;
      raw[u][g] = (ok[u] && c < nvec) ? load_packed<T, VEC>(w_row + c * VEC) : zero_packed<T, VEC>();
    }
  }
#pragma unroll
  for (int u = 0; u < kSumUnroll; ++u) {
#pragma unroll
    for (int g = 0; g < kSumGroup; ++g) {
      float w[VEC];
      unpack<T, VEC>(raw[u][g], w);
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[g][e] = fmaf(scale[u], w[e], acc[g][e]);
    }
  }
}

// The warp's lane-partial dot products acc[u] = <g_rows[u], w_rows[u]> over this lane's chunks
// (lane, lane + 32, ...), kDotSteps chunk steps loaded before any is accumulated. Latents with ok[u]
// false load nothing and stay 0.
template <typename T, int VEC>
__device__ __forceinline__ void dot_chunks(const T* const (&g_rows)[kDotGroup], const T* const (&w_rows)[kDotGroup],
                                           const bool (&ok)[kDotGroup], int64_t nvec, int lane,
                                           float (&acc)[kDotGroup]) {
  for (int64_t c0 = lane; c0 < nvec; c0 += 32 * kDotSteps) {
    Packed<T, VEC> g_raw[kDotSteps][kDotGroup], w_raw[kDotSteps][kDotGroup];
#pragma unroll
    for (int s = 0; s < kDotSteps; ++s) {
      const int64_t c = c0 + 32 * s;
#pragma unroll
      for (int u = 0; u < kDotGroup; ++u) {
        const bool load = c < nvec && ok[u];
        g_raw[s][u] = load ? load_packed<T, VEC>(g_rows[u] + c * VEC) : zero_packed<T, VEC>();
        w_raw[s][u] = load ? load_packed<T, VEC>(w_rows[u] + c * VEC) : zero_packed<T, VEC>();
      }
    }
#pragma unroll
    for (int s = 0; s < kDotSteps; ++s)
#pragma unroll
      for (int u = 0; u < kDotGroup; ++u) {
        float g[VEC], w[VEC];
        unpack<T, VEC>(g_raw[s][u], g);
        unpack<T, VEC>(w_raw[s][u], w);
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[u] = fmaf(g[e], w[e], acc[u]);
      }
  }
}

// Finishes dot_chunks' sums with a fixed xor-shuffle tree (the same order every run) and stores
// dot u as out_row[j0 + u] for the entries below k.
template <typename T>
__device__ __forceinline__ void store_warp_dots(float (&acc)[kDotGroup], T* __restrict__ out_row, int64_t j0,
                                                int64_t k, int lane) {
#pragma unroll
  for (int u = 0; u < kDotGroup; ++u)
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc[u] += __shfl_xor_sync(kFullWarp, acc[u], o);
#pragma unroll
  for (int u = 0; u < kDotGroup; ++u)
    if (lane == u && j0 + u < k) out_row[j0 + u] = from_float<T>(acc[u]);
}

}  // namespace pyinterp::cuda::detail
