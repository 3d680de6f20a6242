// The Matryoshka prefix decode (prefix_decode_forward) and its backward products (prefix_gather_dot,
// prefix_t_matmul); contract in prefix_decode.cuh, math in docs/sae_family.md ("The prefix decode",
// "Its backward").
//
// The forward is sparse_decode.cu's gather_sum with a bucket loop: one warp per row keeps one fp32
// accumulator per column chunk, adds bucket 0's entries, stores the running sum as prefix 0's
// reconstruction, adds bucket 1's, and so on, so each decoder row is read once whatever P is. Each
// bucket's entries are picked out of the row's 32-entry stages by a ballot and walked in index order.
// The backward reads the gradient row of the latent's bucket (the suffix sum G_b) instead of the
// token's; the weight gradient is sparse_transpose.cuh's deterministic sort-and-chunk sum.
#include "prefix_decode.cuh"

#include "common.cuh"
#include "sparse_transpose.cuh"
#include "warp_gather.cuh"

namespace pyinterp::cuda {
namespace {

using namespace detail;  // common.cuh, sparse_transpose.cuh, warp_gather.cuh

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// The prefix sizes as a launch argument (P is small: nested dictionaries double in size).
struct Buckets {
  int32_t count;                 // P
  int32_t latents;               // M = m_{P-1}
  int32_t end[kMaxPrefixes];     // m_0 < ... < m_{P-1}

  // b(i) = #{p : m_p <= i} for i in [0, M); P for any other i (no bucket). Unrolled with constant
  // indices so that `end` is read from the parameter space, never copied to local memory.
  __device__ __forceinline__ int of(int32_t latent) const {
    if (latent < 0 || latent >= latents) return count;
    int b = 0;
#pragma unroll
    for (int p = 0; p < kMaxPrefixes - 1; ++p) {
      if (p + 1 >= count) break;
      b += latent >= end[p];
    }
    return b;
  }
};

cudaError_t make_buckets(const int64_t* prefixes, int64_t P, Buckets& b) {
  if (P < 1 || P > kMaxPrefixes) return cudaErrorInvalidValue;
  b.count = static_cast<int32_t>(P);
  for (int64_t p = 0; p < P; ++p) {
    if (prefixes[p] < 1 || prefixes[p] > INT32_MAX || (p > 0 && prefixes[p] <= prefixes[p - 1]))
      return cudaErrorInvalidValue;
    b.end[p] = static_cast<int32_t>(prefixes[p]);
  }
  b.latents = b.end[P - 1];
  return cudaSuccess;
}

// ------------------------------------------------------------------------------------------------
// prefix_decode_forward: one warp per row. A lane owns kSumGroup 16-byte column chunks at a time.
// For each bucket, the warp walks the row's k entries 32 at a time (one per lane), a ballot marks
// the stage's entries of this bucket, and those are taken kSumUnroll at a time in increasing j,
// broadcast by shuffle (warp_gather.cuh).
// ------------------------------------------------------------------------------------------------
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) prefix_decode_forward_kernel(
    const T* __restrict__ values, const int32_t* __restrict__ indices, const T* __restrict__ weight,
    const T* __restrict__ bias, const Buckets buckets, int64_t N, int64_t k, int64_t D, T* __restrict__ out) {
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
    for (int p = 0; p < buckets.count; ++p) {
      for (int64_t j0 = 0; j0 < k; j0 += 32) {
        const int jn = static_cast<int>(k - j0 < 32 ? k - j0 : 32);
        int my_idx = -1;
        float my_val = 0.0f;
        if (lane < jn) {
          my_idx = idx_row[j0 + lane];
          my_val = to_float(val_row[j0 + lane]);
        }
        // The same mask in every lane: the loop below is warp-uniform.
        unsigned pending = __ballot_sync(kFullWarp, buckets.of(my_idx) == p);
        while (pending != 0u) {
          int id[kSumUnroll];
          float v[kSumUnroll];
          bool ok[kSumUnroll];
#pragma unroll
          for (int u = 0; u < kSumUnroll; ++u) {
            ok[u] = pending != 0u;  // past the last pending entry: nothing
            const int src = ok[u] ? __ffs(pending) - 1 : 0;
            pending &= pending - 1u;
            id[u] = __shfl_sync(kFullWarp, my_idx, src);
            v[u] = __shfl_sync(kFullWarp, my_val, src);
          }
          add_weight_chunks<T, VEC>(weight, D, nvec, c0, lane, id, v, ok, acc);
        }
      }
      // The running sum is prefix p's reconstruction (bias added on the way out, as the reference
      // adds it to each prefix's sum).
      T* out_row = out + (int64_t(p) * N + row) * D;
#pragma unroll
      for (int g = 0; g < kSumGroup; ++g) {
        const int64_t c = c0 + g * 32 + lane;
        if (c >= nvec) continue;
        float o[VEC];
        if (bias) {
          load_as_float<T, VEC>(bias + c * VEC, o);
#pragma unroll
          for (int e = 0; e < VEC; ++e) o[e] += acc[g][e];
        } else {
#pragma unroll
          for (int e = 0; e < VEC; ++e) o[e] = acc[g][e];
        }
        store_from_float<T, VEC>(out_row + c * VEC, o);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// prefix_gather_dot: sparse_decode.cu's gather_dot (one warp per row, kDotGroup latents at a time,
// warp_gather.cuh), each latent meeting the gradient row of its bucket.
// ------------------------------------------------------------------------------------------------
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) prefix_gather_dot_kernel(
    const T* __restrict__ grad_suffix, const int32_t* __restrict__ indices, const T* __restrict__ weight,
    const Buckets buckets, int64_t N, int64_t k, int64_t D, T* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t row = blockIdx.x * int64_t(kWarps) + (threadIdx.x >> 5);
  if (row >= N) return;
  const int64_t nvec = D / VEC;
  for (int64_t j0 = 0; j0 < k; j0 += kDotGroup) {
    const T* w_rows[kDotGroup];
    const T* g_rows[kDotGroup];
    bool ok[kDotGroup];
    float acc[kDotGroup];
#pragma unroll
    for (int u = 0; u < kDotGroup; ++u) {
      const int id = j0 + u < k ? indices[row * k + j0 + u] : -1;
      const int b = buckets.of(id);
      ok[u] = b < buckets.count;
      w_rows[u] = weight + int64_t(ok[u] ? id : 0) * D;
      g_rows[u] = grad_suffix + (int64_t(ok[u] ? b : 0) * N + row) * D;
      acc[u] = 0.0f;
    }
    dot_chunks<T, VEC>(g_rows, w_rows, ok, nvec, lane, acc);
    store_warp_dots<T>(acc, out + row * k, j0, k, lane);
  }
}

// ------------------------------------------------------------------------------------------------
// prefix_t_matmul: the sparse-transpose sum of sparse_transpose.cuh, each pair scaling the row of
// its latent's bucket in the stacked suffix sums.
// ------------------------------------------------------------------------------------------------
template <typename T>
struct BucketRows {
  const T* grad_suffix;  // (P, N, D)
  int64_t N, D;
  Buckets buckets{};
  __device__ __forceinline__ const T* operator()(uint32_t latent, int64_t n) const {
    return grad_suffix + (int64_t(buckets.of(static_cast<int32_t>(latent))) * N + n) * D;
  }
};

}  // namespace

template <typename T>
cudaError_t prefix_decode_forward(const T* values, const int32_t* indices, const T* weight, const T* bias,
                                  const int64_t* prefixes, int64_t P, int64_t N, int64_t k, int64_t D, T* out,
                                  cudaStream_t stream) {
  constexpr int kVec = detail::kVec16<T>;
  Buckets buckets{};
  PI_TRY(make_buckets(prefixes, P, buckets));
  if (N == 0 || D == 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(ceil_div(N, kWarps));
  const bool vec = D % kVec == 0 && aligned16(weight) && aligned16(out) && (!bias || aligned16(bias));
  if (vec)
    prefix_decode_forward_kernel<T, kVec><<<grid, kThreads, 0, stream>>>(values, indices, weight, bias, buckets,
                                                                         N, k, D, out);
  else
    prefix_decode_forward_kernel<T, 1><<<grid, kThreads, 0, stream>>>(values, indices, weight, bias, buckets,
                                                                      N, k, D, out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t prefix_gather_dot(const T* grad_suffix, const int32_t* indices, const T* weight,
                              const int64_t* prefixes, int64_t P, int64_t N, int64_t k, int64_t D, T* out,
                              cudaStream_t stream) {
  constexpr int kVec = detail::kVec16<T>;
  Buckets buckets{};
  PI_TRY(make_buckets(prefixes, P, buckets));
  if (N == 0 || k == 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(ceil_div(N, kWarps));
  const bool vec = D % kVec == 0 && aligned16(weight) && aligned16(grad_suffix);
  if (vec)
    prefix_gather_dot_kernel<T, kVec><<<grid, kThreads, 0, stream>>>(grad_suffix, indices, weight, buckets, N, k,
                                                                     D, out);
  else
    prefix_gather_dot_kernel<T, 1><<<grid, kThreads, 0, stream>>>(grad_suffix, indices, weight, buckets, N, k,
                                                                  D, out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t prefix_t_matmul_workspace_bytes(int64_t N, int64_t k, int64_t M, int64_t D, size_t* bytes) {
  StmPlan p;
  PI_TRY(make_stm_plan(N, k, M, D, p));
  *bytes = p.total;
  return cudaSuccess;
}

template <typename T>
cudaError_t prefix_t_matmul(const T* coef, const int32_t* indices, const T* grad_suffix, const int64_t* prefixes,
                            int64_t P, int64_t N, int64_t k, int64_t D, T* weight_grad, void* workspace,
                            size_t workspace_bytes, cudaStream_t stream) {
  Buckets buckets{};
  PI_TRY(make_buckets(prefixes, P, buckets));
  const int64_t M = prefixes[P - 1];
  // Every bucket's (N, D) block starts 16-byte aligned when the stack does and D % kVec16 == 0.
  return detail::sparse_transpose_sum(coef, indices, BucketRows<T>{grad_suffix, N, D, buckets},
                                      aligned16(grad_suffix), N, k, M, D, weight_grad, nullptr, workspace,
                                      workspace_bytes, stream);
}

#define PI_INSTANTIATE(T)                                                                                     \
  template cudaError_t prefix_decode_forward<T>(const T*, const int32_t*, const T*, const T*, const int64_t*, \
                                                int64_t, int64_t, int64_t, int64_t, T*, cudaStream_t);        \
  template cudaError_t prefix_gather_dot<T>(const T*, const int32_t*, const T*, const int64_t*, int64_t,     \
                                            int64_t, int64_t, int64_t, T*, cudaStream_t);                    \
  template cudaError_t prefix_t_matmul_workspace_bytes<T>(int64_t, int64_t, int64_t, int64_t, size_t*);      \
  template cudaError_t prefix_t_matmul<T>(const T*, const int32_t*, const T*, const int64_t*, int64_t,       \
                                          int64_t, int64_t, int64_t, T*, void*, size_t, cudaStream_t);
PI_INSTANTIATE(float)
PI_INSTANTIATE(__half)
PI_INSTANTIATE(__nv_bfloat16)
#undef PI_INSTANTIATE

}  // namespace pyinterp::cuda
