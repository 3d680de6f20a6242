// Sparse SAE decoding and the sparse products of both SAE backwards, on CUDA (kernels in
// sparse_decode.cu). Host-only declarations: torch-free, includable from host C++ compiled by gcc.
// All tensors contiguous and on the current device; T is float, __half or __nv_bfloat16; every sum
// accumulates in fp32. Indices outside [0, M) contribute nothing (range checks are the caller's).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace pyinterp::cuda {

// out[n] = sum_j values[n, j] * weight[indices[n, j]] (+ bias)          out (N, D); weight (M, D)
template <typename T>
cudaError_t gather_sum(const T* values, const int32_t* indices, const T* weight, const T* bias,
                       int64_t N, int64_t k, int64_t M, int64_t D, T* out, cudaStream_t stream);

// out[n, j] = <grad[n], weight[indices[n, j]]>                            out (N, k); grad (N, D)
template <typename T>
cudaError_t gather_dot(const T* grad, const int32_t* indices, const T* weight, int64_t N, int64_t k,
                       int64_t M, int64_t D, T* out, cudaStream_t stream);

// weight_grad[i] = sum_{(n,j): indices[n,j] = i} coef[n, j] * rows[n]     (M, D)
// coef_sum[i]    = sum_{(n,j): indices[n,j] = i} coef[n, j]               (M), fp32
// Deterministic: the pairs are sorted stably by latent, and each latent's pairs are summed in
// increasing n*k + j order (in fixed chunks of that order, then the chunks in order); no atomics.
template <typename T>
cudaError_t sparse_t_matmul_workspace_bytes(int64_t N, int64_t k, int64_t M, int64_t D,
                                            size_t* bytes);
template <typename T>
cudaError_t sparse_t_matmul(const T* coef, const int32_t* indices, const T* rows, int64_t N,
                            int64_t k, int64_t M, int64_t D, T* weight_grad, float* coef_sum,
                            void* workspace, size_t workspace_bytes, cudaStream_t stream);

#define PYINTERP_SPARSE_DECODE_EXTERN(T)                                                          \
  extern template cudaError_t gather_sum<T>(const T*, const int32_t*, const T*, const T*, int64_t, \
                                            int64_t, int64_t, int64_t, T*, cudaStream_t);         \
  extern template cudaError_t gather_dot<T>(const T*, const int32_t*, const T*, int64_t, int64_t,  \
                                            int64_t, int64_t, T*, cudaStream_t);                  \
  extern template cudaError_t sparse_t_matmul_workspace_bytes<T>(int64_t, int64_t, int64_t,       \
                                                                 int64_t, size_t*);               \
  extern template cudaError_t sparse_t_matmul<T>(const T*, const int32_t*, const T*, int64_t,     \
                                                 int64_t, int64_t, int64_t, T*, float*, void*,    \
                                                 size_t, cudaStream_t);
PYINTERP_SPARSE_DECODE_EXTERN(float)
PYINTERP_SPARSE_DECODE_EXTERN(__half)
PYINTERP_SPARSE_DECODE_EXTERN(__nv_bfloat16)
#undef PYINTERP_SPARSE_DECODE_EXTERN

}  // namespace pyinterp::cuda
