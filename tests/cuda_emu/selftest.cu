// Kernels for the harness's own tests (tests/test_cuda_emu.py::test_harness_*): correct ones whose
// results are checked, and deliberately broken ones that the emulator or a sanitizer must stop.
// Built exactly like kernels/cuda/*.cu (same rewrites, same headers).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "common.cuh"
#include "driver.h"

namespace {

using pyinterp::cuda::detail::cp_async16;
using pyinterp::cuda::detail::cp_async_commit;
using pyinterp::cuda::detail::cp_async_wait;
using pyinterp::cuda::detail::ldmatrix_x4;
using pyinterp::cuda::detail::mma_16816;
using pyinterp::cuda::detail::smem_u32;

// Block sum through shared memory and a shuffle tree; out[block] = sum of in[block * 256 + t].
__global__ void block_sum(const int* in, int* out) {
  __shared__ int partial[8];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int v = in[blockIdx.x * blockDim.x + threadIdx.x];
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    int total = 0;
    for (int w = 0; w < 8; ++w) total += partial[w];
    out[blockIdx.x] = total;
  }
}

__global__ void dynamic_overflow(int n) {
  extern __shared__ int dyn[];
  dyn[threadIdx.x] = n;  // the launch asks for fewer ints than threads
}

__global__ void static_overflow() {
  __shared__ int small[32];
  small[threadIdx.x] = 1;  // 64 threads
}

__global__ void global_overflow(int* out, int n) {
  if (static_cast<int>(threadIdx.x) <= n) out[threadIdx.x] = 1;  // off by one
}

__global__ void uninitialised_read(int* out) {
  __shared__ int never_written[4];
  out[threadIdx.x] = never_written[threadIdx.x % 4];
}

__global__ void missing_barrier(int* out) {
  __shared__ int value;
  if (threadIdx.x == 0) value = 42;
  // no __syncthreads(): thread 1 reads what thread 0 wrote
  if (threadIdx.x == 1) out[0] = value;
}

__global__ void divergent_barrier(int* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void warp_deadlock(int* out) {
  if (threadIdx.x == 0) __syncwarp();
  else __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void partial_mask(int* out) {
  out[threadIdx.x] = __shfl_sync(0x0000FFFFu, static_cast<int>(threadIdx.x), 0);
}

__global__ void misaligned_vector(const int* in, int* out) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(in + 1));
  out[threadIdx.x] = static_cast<int>(v.x);
}

// Each thread copies 16 bytes with cp.async and reads them before and after the wait.
__global__ void cp_async_order(const int* in, int* before, int* after) {
  extern __shared__ __align__(16) unsigned char buf[];
  const int t = threadIdx.x;
  cp_async16(smem_u32(buf + 16 * t), in + 4 * t, true);
  cp_async_commit();
  before[t] = reinterpret_cast<const int*>(buf)[4 * t];
  cp_async_wait<0>();
  after[t] = reinterpret_cast<const int*>(buf)[4 * t];
}

// One warp: D (16x8) = A (16x16, row-major) * B (16x8) with B given as Bt (8x16, row-major), through
// ldmatrix.x4 and mma.m16n8k16 with the fragment addressing of kernels/cuda/topk_encode.cu.
__global__ void mma_tile(const __half* A, const __half* Bt, float* D) {
  extern __shared__ __align__(16) unsigned char buf[];
  __half* a_s = reinterpret_cast<__half*>(buf);
  __half* b_s = a_s + 16 * 16;
  const int lane = threadIdx.x;
  for (int i = lane; i < 16 * 16; i += 32) a_s[i] = A[i];
  for (int i = lane; i < 8 * 16; i += 32) b_s[i] = Bt[i];
  for (int i = lane; i < 8 * 16; i += 32) b_s[8 * 16 + i] = __float2half_rn(0.0f);  // rows 8-15 of the x4 load
  __syncwarp();
  uint32_t a[4], b[4];
  ldmatrix_x4(a, smem_u32(a_s + (lane & 15) * 16 + 8 * (lane >> 4)));
  ldmatrix_x4(b, smem_u32(b_s + ((lane & 7) + ((lane >> 4) << 3)) * 16 + 8 * ((lane >> 3) & 1)));
  float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  mma_16816<__half>(d, a, b[0], b[1]);
  const int g = lane >> 2, t = lane & 3;
  for (int e = 0; e < 4; ++e) D[(g + 8 * (e >> 1)) * 8 + 2 * t + (e & 1)] = d[e];
}

__global__ void noop(int* out) { out[threadIdx.x] = 1; }

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  const driver::Case c(argv[1]);
  const std::string s = c.str("scenario");
  int* out = driver::device_empty<int>(1024);
  if (s == "block_sum") {
    const int* in = driver::device_array<int>(c, "in");
    const int blocks = static_cast<int>(c.i("blocks"));
    block_sum<<<blocks, 256>>>(in, out);
    driver::check(cudaGetLastError(), "block_sum");
    c.write("out", out, sizeof(int) * blocks);
  } else if (s == "dynamic_overflow") {
    dynamic_overflow<<<1, 64, 32 * sizeof(int)>>>(1);
  } else if (s == "static_overflow") {
    static_overflow<<<1, 64>>>();
  } else if (s == "global_overflow") {
    int* small = driver::device_empty<int>(32);
    global_overflow<<<1, 64>>>(small, 32);
  } else if (s == "uninitialised_read") {
    uninitialised_read<<<1, 32>>>(out);
    c.write("out", out, sizeof(int) * 32);
  } else if (s == "missing_barrier") {
    missing_barrier<<<1, 64>>>(out);
    c.write("out", out, sizeof(int));
  } else if (s == "divergent_barrier") {
    divergent_barrier<<<1, 64>>>(out);
  } else if (s == "warp_deadlock") {
    warp_deadlock<<<1, 64>>>(out);
  } else if (s == "partial_mask") {
    partial_mask<<<1, 32>>>(out);
  } else if (s == "misaligned_vector") {
    const int* in = driver::device_array<int>(c, "in");
    misaligned_vector<<<1, 32>>>(in, out);
  } else if (s == "cp_async_order") {
    const int* in = driver::device_array<int>(c, "in");
    int* before = driver::device_empty<int>(64);
    int* after = driver::device_empty<int>(64);
    cp_async_order<<<1, 64, 64 * 16>>>(in, before, after);
    c.write("before", before, sizeof(int) * 64);
    c.write("after", after, sizeof(int) * 64);
  } else if (s == "mma_tile") {
    const __half* A = driver::device_array<__half>(c, "A");
    const __half* Bt = driver::device_array<__half>(c, "Bt");
    float* D = driver::device_empty<float>(16 * 8);
    mma_tile<<<1, 32, (16 * 16 + 16 * 16) * sizeof(__half)>>>(A, Bt, D);
    driver::check(cudaGetLastError(), "mma_tile");
    c.write("D", D, sizeof(float) * 16 * 8);
  } else if (s == "launch_limits") {
    // Error codes of launches just inside and just outside the limits, in this order.
    int codes[8];
    noop<<<1, 1024>>>(out);
    codes[0] = cudaGetLastError();
    noop<<<1, 1025>>>(out);
    codes[1] = cudaGetLastError();
    noop<<<dim3(1, 65536), 1>>>(out);
    codes[2] = cudaGetLastError();
    noop<<<1, 32, 48 * 1024>>>(out);
    codes[3] = cudaGetLastError();
    noop<<<1, 32, 48 * 1024 + 1>>>(out);
    codes[4] = cudaGetLastError();
    codes[5] = cudaFuncSetAttribute(noop, cudaFuncAttributeMaxDynamicSharedMemorySize, 227 * 1024 + 1);
    codes[6] = cudaFuncSetAttribute(noop, cudaFuncAttributeMaxDynamicSharedMemorySize, 100 * 1024);
    noop<<<1, 32, 100 * 1024>>>(out);
    codes[7] = cudaGetLastError();
    c.write("codes", codes, sizeof(codes));
  } else {
    return 2;
  }
  return 0;
}
