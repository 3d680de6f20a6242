// ij_accumulate_ kernel (see ij_accumulate.cuh). One warp owns one (e, s) row: lanes stride over the
// feature width (coalesced loads of each node's gradient row), sum the K weighted nodes in registers in
// the accumulator type, add the result to Jbar when asked, and a warp shuffle reduces the dot with
// delta into P[row]. Each row has one owner, so there are no atomics and the result is deterministic.
// The op is memory bound: it reads each gradient element once (K * rows * width elements).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "ij_accumulate.cuh"

namespace pyinterp::cuda {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 8;

template <typename acc_t>
__device__ __forceinline__ acc_t to_acc(float x) { return static_cast<acc_t>(x); }
template <typename acc_t>
__device__ __forceinline__ acc_t to_acc(double x) { return static_cast<acc_t>(x); }
template <typename acc_t>
__device__ __forceinline__ acc_t to_acc(__half x) { return static_cast<acc_t>(__half2float(x)); }
template <typename acc_t>
__device__ __forceinline__ acc_t to_acc(__nv_bfloat16 x) { return static_cast<acc_t>(__bfloat162float(x)); }

template <typename in_t, typename acc_t>
__global__ void __launch_bounds__(kWarpsPerBlock * kWarpSize)
ij_accumulate_kernel(const in_t* __restrict__ grads, const acc_t* __restrict__ weights,
                     const acc_t* __restrict__ delta, acc_t* __restrict__ P, acc_t* __restrict__ Jbar,
                     int64_t num_nodes, int64_t rows, int64_t tokens, int64_t width) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (row >= rows) {
    return;  // the whole warp leaves together: one row per warp
  }
  const int64_t node_stride = rows * width;
  const in_t* grad_row = grads + row * width;
  const acc_t* delta_row = delta + (row % tokens) * width;
  acc_t partial = 0;
  for (int64_t d = lane; d < width; d += kWarpSize) {
    acc_t jbar = 0;
#pragma unroll 4
    for (int64_t k = 0; k < num_nodes; ++k) {
      jbar += weights[k] * to_acc<acc_t>(grad_row[k * node_stride + d]);
    }
    partial += jbar * delta_row[d];
    if (Jbar != nullptr) {
      Jbar[row * width + d] += jbar;
    }
  }
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    partial += __shfl_down_sync(0xffffffffu, partial, offset);
  }
  if (lane == 0) {
    P[row] += partial;
  }
}

template <typename in_t, typename acc_t>
cudaError_t launch(const void* grads, const void* weights, const void* delta, void* P, void* Jbar,
                   int64_t num_nodes, int64_t rows, int64_t tokens, int64_t width, cudaStream_t stream) {
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  ij_accumulate_kernel<in_t, acc_t><<<static_cast<unsigned>(blocks), kWarpsPerBlock * kWarpSize, 0, stream>>>(
      static_cast<const in_t*>(grads), static_cast<const acc_t*>(weights), static_cast<const acc_t*>(delta),
      static_cast<acc_t*>(P), static_cast<acc_t*>(Jbar), num_nodes, rows, tokens, width);
  return cudaGetLastError();
}

}  // namespace

cudaError_t ij_accumulate(const void* grads, GradDtype grads_dtype, const void* weights,
                          const void* delta, void* P, void* Jbar, int64_t num_nodes, int64_t rows,
                          int64_t tokens, int64_t width, cudaStream_t stream) {
  if (rows == 0 || num_nodes == 0) {
    return cudaSuccess;
  }
  if ((rows + kWarpsPerBlock - 1) / kWarpsPerBlock > 0x7fffffff) {
    return cudaErrorInvalidConfiguration;
  }
  switch (grads_dtype) {
    case GradDtype::kFloat32:
      return launch<float, float>(grads, weights, delta, P, Jbar, num_nodes, rows, tokens, width, stream);
    case GradDtype::kFloat16:
      return launch<__half, float>(grads, weights, delta, P, Jbar, num_nodes, rows, tokens, width, stream);
    case GradDtype::kBFloat16:
      return launch<__nv_bfloat16, float>(grads, weights, delta, P, Jbar, num_nodes, rows, tokens, width, stream);
    case GradDtype::kFloat64:
      return launch<double, double>(grads, weights, delta, P, Jbar, num_nodes, rows, tokens, width, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace pyinterp::cuda
