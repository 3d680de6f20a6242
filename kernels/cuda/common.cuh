// Helpers shared by the kernels/cuda/*.cu files (device code and launcher plumbing; include from .cu
// only).
// Larger pieces that several ops share have their own device headers: sparse_transpose.cuh (the
// deterministic sparse^T x dense sum) and warp_gather.cuh (warp-per-row gathers of decoder rows).
//
// Naming rule of kernels/cuda, for every op:
//   - everything lives in namespace pyinterp::cuda (device helpers in pyinterp::cuda::detail,
//     a file's own kernels and host helpers in an anonymous namespace inside it);
//   - a launcher (a host function in <op>.cuh that enqueues work on a cudaStream_t and returns the
//     cudaError_t of its launches, never synchronising) is named after the schema op it implements
//     (csrc/bindings.cpp): gather_sum, gather_dot, sparse_t_matmul, topk_encode_forward,
//     ij_accumulate (the in-place ij_accumulate_ without its trailing underscore), resonator_bits;
//   - a launcher of one step of an op that its glue sequences itself is <op>_<step>
//     (resonator_bits_pack_signs), and a host query made before launching is <op>_<quantity>
//     (topk_encode_forward_workspace_bytes, resonator_bits_grid); queries return cudaError_t too
//     and write their answer through a pointer;
//   - a __global__ function is <what it computes>_kernel.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

// Returns from the enclosing launcher with the first CUDA error.
#define PI_TRY(expr)                            \
  do {                                          \
    const cudaError_t pi_err_ = (expr);         \
    if (pi_err_ != cudaSuccess) return pi_err_; \
  } while (0)

namespace pyinterp::cuda::detail {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Elements of T in one 16-byte access.
template <typename T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

// VEC consecutive elements of T as fp32. VEC * sizeof(T) == 16 uses one 16-byte read-only load
// (the caller guarantees 16-byte alignment); VEC == 1 is the scalar path for unaligned rows.
template <typename T, int VEC>
__device__ __forceinline__ void load_as_float(const T* __restrict__ p, float (&out)[VEC]) {
  if constexpr (VEC == 1) {
    out[0] = to_float(__ldg(p));
  } else {
    static_assert(VEC * sizeof(T) == 16, "vector loads are 16 bytes");
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = to_float(e[i]);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_from_float(T* __restrict__ p, const float (&in)[VEC]) {
  if constexpr (VEC == 1) {
    p[0] = from_float<T>(in[0]);
  } else {
    static_assert(VEC * sizeof(T) == 16, "vector stores are 16 bytes");
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) e[i] = from_float<T>(in[i]);
    *reinterpret_cast<uint4*>(p) = raw;
  }
}

// VEC elements of T as loaded, not yet converted: a loop that loads several of these before
// converting any keeps that many loads in flight.
template <typename T, int VEC>
using Packed = std::conditional_t<VEC == 1, T, uint4>;

template <typename T, int VEC>
__device__ __forceinline__ Packed<T, VEC> load_packed(const T* __restrict__ p) {
  if constexpr (VEC == 1) {
    return __ldg(p);
  } else {
    static_assert(VEC * sizeof(T) == 16, "vector loads are 16 bytes");
    return __ldg(reinterpret_cast<const uint4*>(p));
  }
}

template <typename T, int VEC>
__device__ __forceinline__ Packed<T, VEC> zero_packed() {
  if constexpr (VEC == 1) {
    return from_float<T>(0.0f);
  } else {
    return make_uint4(0u, 0u, 0u, 0u);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void unpack(const Packed<T, VEC>& raw, float (&out)[VEC]) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = to_float(e[i]);
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// The only inline PTX in kernels/cuda: tests/cuda_emu/include/cuda_emu_ptx.h defines the same
// functions as CPU emulations (cp.async deferred to its wait_group, ldmatrix/mma warp-collective).
#ifndef PYINTERP_CUDA_EMU
// 16-byte global->shared copy; src_bytes = 0 writes zeros (PTX ISA, cp.async: src-size).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// D += A * B for one m16n8k16 tile, fp32 accumulators (PTX ISA, "mma.m16n8k16" fragments).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}
#endif  // PYINTERP_CUDA_EMU

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Offset of the next `bytes` of a launcher's workspace, 256-byte aligned; advances `cursor`.
inline size_t carve(size_t& cursor, size_t bytes) {
  const size_t off = (cursor + 255) / 256 * 256;
  cursor = off + bytes;
  return off;
}

}  // namespace pyinterp::cuda::detail
