// Sparse decode (gather_sum), its input gradient (gather_dot) and the deterministic sparse^T x dense
// weight gradient (sparse_t_matmul). Contract in sparse_decode.cuh.
//
// All three are bandwidth-bound on gathered rows of D elements: rows are read with 16-byte vector
// loads (when D and the pointers allow, else element by element), several independent loads in
// flight per thread, fp32 accumulation.
#include "sparse_decode.cuh"

#include "common.cuh"
#include "sparse_transpose.cuh"
#include "warp_gather.cuh"

namespace pyinterp::cuda {
namespace {

using namespace detail;  // common.cuh, sparse_transpose.cuh, warp_gather.cuh

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// ------------------------------------------------------------------------------------------------
// gather_sum: one warp per output row. A lane owns kSumGroup 16-byte column chunks at a time and
// walks the row's k (index, value) pairs, which the warp stages 32 at a time in registers and
// broadcasts by shuffle, kSumUnroll at a time (warp_gather.cuh).
// ------------------------------------------------------------------------------------------------
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
        int id[kSumUnroll];
        float v[kSumUnroll];
        bool ok[kSumUnroll];
#pragma unroll
        for (int u = 0; u < kSumUnroll; ++u) {
          const int src = jj + u;
          id[u] = __shfl_sync(kFullWarp, my_idx, src & 31);
          v[u] = __shfl_sync(kFullWarp, my_val, src & 31);
          // Pairs past the row's end or with an invalid index add nothing.
          ok[u] = src < jn && id[u] >= 0 && id[u] < M;
        }
        add_weight_chunks<T, VEC>(weight, D, nvec, c0, lane, id, v, ok, acc);
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
// gather_dot: one warp per row, kDotGroup latents at a time, each dot product finished by a fixed
// xor-shuffle tree (warp_gather.cuh).
// ------------------------------------------------------------------------------------------------
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
    const T* g_rows[kDotGroup];
    bool ok[kDotGroup];
    float acc[kDotGroup];
#pragma unroll
    for (int u = 0; u < kDotGroup; ++u) {
      const int id = j0 + u < k ? indices[row * k + j0 + u] : -1;
      ok[u] = id >= 0 && id < M;
      w_rows[u] = weight + int64_t(ok[u] ? id : 0) * D;
      g_rows[u] = g_row;  // every latent meets the token's gradient row
      acc[u] = 0.0f;
    }
    dot_chunks<T, VEC>(g_rows, w_rows, ok, nvec, lane, acc);
    store_warp_dots<T>(acc, out + row * k, j0, k, lane);
  }
}

// ------------------------------------------------------------------------------------------------
// sparse_t_matmul: the sparse-transpose sum of sparse_transpose.cuh, each pair scaling its token's row.
// ------------------------------------------------------------------------------------------------
template <typename T>
struct TokenRows {
  const T* rows;  // (N, D)
  int64_t D;
  __device__ __forceinline__ const T* operator()(uint32_t, int64_t n) const { return rows + n * D; }
};

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
  return detail::sparse_transpose_sum(coef, indices, TokenRows<T>{rows, D}, aligned16(rows), N, k, M, D,
                                      weight_grad, coef_sum, workspace, workspace_bytes, stream);
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
