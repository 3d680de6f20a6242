// The Matryoshka prefix decode and its two backward products, on CUDA (kernels in prefix_decode.cu;
// docs/sae_family.md, "Matryoshka", "The prefix decode"). Host-only declarations: torch-free,
// includable from host C++ compiled by gcc.
//
// prefixes: a host array of P strictly increasing sizes m_0 < ... < m_{P-1} = M (the number of
// latents), 1 <= P <= kMaxPrefixes (they travel to the kernels as a launch argument); latent i lies
// in bucket b(i) = #{p : m_p <= i}, the first prefix that contains it. All tensors contiguous and on
// the current device; T is float, __half or __nv_bfloat16; every sum accumulates in fp32. Indices
// outside [0, M) lie in no bucket and contribute nothing (range checks are the caller's).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace pyinterp::cuda {

constexpr int64_t kMaxPrefixes = 64;

// out[p, n] = sum_{j: indices[n, j] < m_p} values[n, j] * weight[indices[n, j]] (+ bias)
// values, indices (N, k); weight (M, D); bias (D) or nullptr; out (P, N, D)
template <typename T>
cudaError_t prefix_decode_forward(const T* values, const int32_t* indices, const T* weight, const T* bias,
                                  const int64_t* prefixes, int64_t P, int64_t N, int64_t k, int64_t D, T* out,
                                  cudaStream_t stream);

// out[n, j] = <grad_suffix[b(i), n], weight[i]>, i = indices[n, j]       grad_suffix (P, N, D); out (N, k)
template <typename T>
cudaError_t prefix_gather_dot(const T* grad_suffix, const int32_t* indices, const T* weight,
                              const int64_t* prefixes, int64_t P, int64_t N, int64_t k, int64_t D, T* out,
                              cudaStream_t stream);

// weight_grad[i] = sum_{(n,j): indices[n,j] = i} coef[n, j] * grad_suffix[b(i), n]        (M, D)
// Deterministic as sparse_t_matmul is (kernels/cuda/sparse_transpose.cuh): each latent's pairs are
// summed in increasing n*k + j order; no atomics.
template <typename T>
cudaError_t prefix_t_matmul_workspace_bytes(int64_t N, int64_t k, int64_t M, int64_t D, size_t* bytes);
template <typename T>
cudaError_t prefix_t_matmul(const T* coef, const int32_t* indices, const T* grad_suffix, const int64_t* prefixes,
                            int64_t P, int64_t N, int64_t k, int64_t D, T* weight_grad, void* workspace,
                            size_t workspace_bytes, cudaStream_t stream);

#define PYINTERP_PREFIX_DECODE_EXTERN(T)                                                              \
  extern template cudaError_t prefix_decode_forward<T>(const T*, const int32_t*, const T*, const T*,  \
                                                       const int64_t*, int64_t, int64_t, int64_t,     \
                                                       int64_t, T*, cudaStream_t);                    \
  extern template cudaError_t prefix_gather_dot<T>(const T*, const int32_t*, const T*, const int64_t*, \
                                                   int64_t, int64_t, int64_t, int64_t, T*,            \
                                                   cudaStream_t);                                     \
  extern template cudaError_t prefix_t_matmul_workspace_bytes<T>(int64_t, int64_t, int64_t, int64_t,  \
                                                                 size_t*);                            \
  extern template cudaError_t prefix_t_matmul<T>(const T*, const int32_t*, const T*, const int64_t*,  \
                                                 int64_t, int64_t, int64_t, int64_t, T*, void*,       \
                                                 size_t, cudaStream_t);
PYINTERP_PREFIX_DECODE_EXTERN(float)
PYINTERP_PREFIX_DECODE_EXTERN(__half)
PYINTERP_PREFIX_DECODE_EXTERN(__nv_bfloat16)
#undef PYINTERP_PREFIX_DECODE_EXTERN

}  // namespace pyinterp::cuda
