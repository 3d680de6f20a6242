// CUDA on the CPU for the harness in tests/test_cuda_emu.py: the runtime API, the device intrinsics
// and the execution model the kernels in kernels/cuda rely on, emulated strictly enough that a
// kernel bug shows up as an abort, a sanitizer report or a wrong result.
//
// Execution: every CUDA thread is a fiber (its own stack, switched in user space). The threads of a
// wave of CUDA_EMU_CONCURRENT_BLOCKS blocks (default 2) run interleaved, a thread runs until it
// blocks on a barrier or exits, and the waves run one after another. Barriers really block: a thread
// waits until every live thread of its block (or warp) arrives, at the same call site with the same
// mask, else the emulator aborts; if no thread can run, it reports the deadlock and aborts.
//
// Memory: dynamic shared memory is a fresh heap buffer of exactly the requested size and every
// __shared__ variable its own fresh buffer, both filled with 0xFF, so that AddressSanitizer bounds
// them and a read of memory nobody wrote shows up. Under ThreadSanitizer every fiber is a TSan thread
// and only barriers (and kernel boundaries) order memory, so a missing __syncthreads is a race.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define CUDA_EMU_ASAN 1
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#if defined(__SANITIZE_THREAD__)
#define CUDA_EMU_TSAN 1
#include <sanitizer/tsan_interface.h>
extern "C" void __tsan_ignore_thread_begin();  // exported by libtsan, not declared by gcc 12's header
extern "C" void __tsan_ignore_thread_end();
#endif

// ---- qualifiers -------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// __shared__ declarations and kernel launches are rewritten by tests/cuda_emu/build.py; one left
// over fails to compile here.

// ---- vector types -----------------------------------------------------------------------------
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

// ---- runtime API types ------------------------------------------------------------------------
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorNotSupported = 801,
  cudaErrorLaunchOutOfResources = 701,
};
using cudaError = cudaError_t;
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaDeviceAttr {
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
// sharedSizeBytes: a kernel's static shared memory is only known here once it has run (its
// __shared__ variables are allocated as reached), so this is the most any of its blocks used so far.
struct cudaFuncAttributes {
  size_t sharedSizeBytes = 0;
  int maxDynamicSharedSizeBytes = 48 << 10;
};

// ---- 16-bit floats (IEEE binary16 and bfloat16, round to nearest even) -------------------------
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __half2float(__half h) { return static_cast<float>(__builtin_bit_cast(_Float16, h.bits)); }
inline __half __float2half_rn(float f) { return {__builtin_bit_cast(uint16_t, static_cast<_Float16>(f))}; }
inline float __bfloat162float(__nv_bfloat16 b) { return __builtin_bit_cast(float, uint32_t(b.bits) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t u = __builtin_bit_cast(uint32_t, f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return {static_cast<uint16_t>((u >> 16) | 0x40u)};  // quiet NaN
  return {static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16)};
}

// ---- bit casts and math -----------------------------------------------------------------------
inline unsigned __float_as_uint(float f) { return __builtin_bit_cast(unsigned, f); }
inline float __uint_as_float(unsigned u) { return __builtin_bit_cast(float, u); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }  // 1 + lowest set bit, 0 for none
inline long long __double2ll_rn(double v) { return std::llrint(v); }  // default rounding: half to even
inline double __dmul_rn(double a, double b) { return a * b; }
using std::fmaf;
template <class A, class B>
inline auto min(A a, B b) -> std::common_type_t<A, B> {
  return b < a ? b : a;
}
template <class A, class B>
inline auto max(A a, B b) -> std::common_type_t<A, B> {
  return a < b ? b : a;
}
template <class T>
inline T __ldg(const T* p) {
  return *p;
}

namespace cuda_emu {

[[noreturn]] void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// ---- fibers and blocks ------------------------------------------------------------------------
struct CpAsyncCopy {
  void* dst;
  const void* src;  // nullptr: zero fill
};

struct Block;

struct Thread {
  void* sp = nullptr;
  char* stack = nullptr;  // lowest address of the usable stack
  size_t stack_bytes = 0;
  uint3 idx{};
  int linear = 0;
  Block* block = nullptr;
  bool started = false, blocked = false, done = false;
  const char* waiting_at = nullptr;  // barrier site while blocked
  std::vector<CpAsyncCopy> cp_pending;  // issued, in order
  std::vector<size_t> cp_groups;        // end index into cp_pending of each committed group
  void* asan_fake_stack = nullptr;
  void* tsan_fiber = nullptr;
  uint64_t collective_generation = 0;  // of the last barrier this thread arrived at
};

// One barrier (a block's or a warp's): arrivals of one generation, their payloads, the result.
struct Barrier {
  uint64_t generation = 0;
  int arrived = 0;
  const char* site = nullptr;
  unsigned mask = 0;
  int result[2] = {0, 0};              // per generation parity: __syncthreads_or/and/count, __ballot_sync
  unsigned char payload[2][32][32]{};  // per generation parity, per lane: warp collectives' data
  std::vector<Thread*> waiting;
  char tsan_sync[2] = {0, 0};  // TSan sync objects, one per generation parity
};

struct Block {
  uint3 idx{};
  int threads = 0;
  int live = 0;
  std::vector<Thread*> thread;
  unsigned char* dynamic_smem = nullptr;
  size_t dynamic_bytes = 0;
  std::map<std::string, void*> statics;
  size_t static_bytes = 0;
  Barrier block_barrier;
  std::vector<Barrier> warp_barrier;
};

extern Thread* g_current;
extern dim3 g_grid, g_block_dim;
Thread* current();

inline const uint3& thread_idx() { return current()->idx; }
inline const uint3& block_idx() { return current()->block->idx; }

// Barrier of the current thread's block (warp = false) or warp; `value` feeds the reductions and the
// payload (bytes <= 32) is visible to the other participants afterwards through payload_of().
// Reduce::none is a barrier that orders memory (__syncthreads, __syncwarp); the others exchange values
// only, as shuffles, ballots, ldmatrix and mma do.
enum class Reduce { none, exchange, any, all, count, ballot };
int arrive(bool warp, const char* site, unsigned mask, Reduce reduce, int value, const void* payload,
           size_t bytes);
const unsigned char* payload_of(int lane);  // after arrive(warp = true): lane's payload

// Dynamic and static shared memory of the current block.
unsigned char* dynamic_shared();
void* static_shared(const char* key, size_t bytes, size_t align);
template <class T>
T& block_shared(const char* key) {
  return *static_cast<T*>(static_shared(key, sizeof(T), alignof(T)));
}

// Shared-window addresses (__cvta_generic_to_shared) of the dynamic buffer.
uint32_t to_shared_window(const void* p);
void* from_shared_window(uint32_t address, size_t bytes);

// TSan annotations for emulator internals (no-ops in other builds).
struct IgnoreAccesses {
#ifdef CUDA_EMU_TSAN
  IgnoreAccesses() { __tsan_ignore_thread_begin(); }
  ~IgnoreAccesses() { __tsan_ignore_thread_end(); }
#endif
};

// ---- launches ---------------------------------------------------------------------------------
cudaError_t check_launch(const char* name, const void* kernel, dim3 grid, dim3 block, size_t smem);
void run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body);
void set_last_error(cudaError_t e);

template <class... P, class... A>
void launch(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t,
            A&&... args) {
  const cudaError_t e = check_launch(name, reinterpret_cast<const void*>(kernel), grid, block, smem);
  if (e != cudaSuccess) {
    set_last_error(e);
    return;
  }
  const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);  // converted as CUDA does
  run_grid(reinterpret_cast<const void*>(kernel), grid, block, smem, [&] {
    std::tuple<std::decay_t<P>...> mine = params;  // each thread owns its copy of the parameters
    std::apply(kernel, mine);
  });
}
// ---- warp collectives -------------------------------------------------------------------------
template <class T>
T shuffle(const char* site, unsigned mask, T value, int lane_of(int lane, int arg), int arg, int width) {
  static_assert(sizeof(T) <= 16 && std::is_trivially_copyable_v<T>, "shuffled values are <= 16 bytes");
  if (width != 32) fail("%s: shuffle width %d is not emulated", site, width);
  unsigned char slot[16];
  std::memcpy(slot, &value, sizeof(T));
  arrive(true, site, mask, Reduce::exchange, 0, slot, sizeof(T));
  const int lane = static_cast<int>(current()->linear & 31);
  const int src = lane_of(lane, arg);
  T out;
  {
    IgnoreAccesses ignore;
    std::memcpy(&out, payload_of(src), sizeof(T));
  }
  return out;
}
inline int lane_idx(int, int src) { return src & 31; }
inline int lane_down(int lane, int delta) { return lane + delta < 32 ? lane + delta : lane; }
inline int lane_up(int lane, int delta) { return lane - delta >= 0 ? lane - delta : lane; }
inline int lane_xor(int lane, int m) { return (lane ^ m) & 31; }

}  // namespace cuda_emu

#define CUDA_EMU_STR2(x) #x
#define CUDA_EMU_STR(x) CUDA_EMU_STR2(x)
#define CUDA_EMU_SITE __FILE__ ":" CUDA_EMU_STR(__LINE__)

#define threadIdx (::cuda_emu::thread_idx())
#define blockIdx (::cuda_emu::block_idx())
#define blockDim (::cuda_emu::g_block_dim)
#define gridDim (::cuda_emu::g_grid)

#define __syncthreads() ((void)::cuda_emu::arrive(false, CUDA_EMU_SITE, ~0u, ::cuda_emu::Reduce::none, 0, nullptr, 0))
#define __syncthreads_or(p) \
  (::cuda_emu::arrive(false, CUDA_EMU_SITE, ~0u, ::cuda_emu::Reduce::any, (p) ? 1 : 0, nullptr, 0))
#define __syncthreads_and(p) \
  (::cuda_emu::arrive(false, CUDA_EMU_SITE, ~0u, ::cuda_emu::Reduce::all, (p) ? 1 : 0, nullptr, 0))
#define __syncthreads_count(p) \
  (::cuda_emu::arrive(false, CUDA_EMU_SITE, ~0u, ::cuda_emu::Reduce::count, (p) ? 1 : 0, nullptr, 0))
#define __syncwarp(...) ((void)::cuda_emu::syncwarp(CUDA_EMU_SITE __VA_OPT__(,) __VA_ARGS__))
#define __ballot_sync(mask, p) \
  (static_cast<unsigned>(::cuda_emu::arrive(true, CUDA_EMU_SITE, (mask), ::cuda_emu::Reduce::ballot, (p) ? 1 : 0, nullptr, 0)))
#define __any_sync(mask, p) \
  (::cuda_emu::arrive(true, CUDA_EMU_SITE, (mask), ::cuda_emu::Reduce::any, (p) ? 1 : 0, nullptr, 0))
#define __all_sync(mask, p) \
  (::cuda_emu::arrive(true, CUDA_EMU_SITE, (mask), ::cuda_emu::Reduce::all, (p) ? 1 : 0, nullptr, 0))
#define CUDA_EMU_SHFL(mask, v, arg, width, rule) \
  ::cuda_emu::shuffle(CUDA_EMU_SITE, (mask), (v), ::cuda_emu::rule, static_cast<int>(arg), (width))
#define __shfl_sync(mask, v, src, ...) CUDA_EMU_SHFL(mask, v, src, ::cuda_emu::width_or_32(__VA_ARGS__), lane_idx)
#define __shfl_down_sync(mask, v, d, ...) CUDA_EMU_SHFL(mask, v, d, ::cuda_emu::width_or_32(__VA_ARGS__), lane_down)
#define __shfl_up_sync(mask, v, d, ...) CUDA_EMU_SHFL(mask, v, d, ::cuda_emu::width_or_32(__VA_ARGS__), lane_up)
#define __shfl_xor_sync(mask, v, m, ...) CUDA_EMU_SHFL(mask, v, m, ::cuda_emu::width_or_32(__VA_ARGS__), lane_xor)

namespace cuda_emu {
constexpr int width_or_32() { return 32; }
constexpr int width_or_32(int w) { return w; }
inline int syncwarp(const char* site, unsigned mask = ~0u) {
  return arrive(true, site, mask, Reduce::none, 0, nullptr, 0);
}

// Atomics are relaxed, as in CUDA: they order nothing else (TSan sees that too).
template <class T>
inline T atomic_add(T* p, T v) {
  return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
template <class T>
inline T atomic_max(T* p, T v) {
  T old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (old < v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
}  // namespace cuda_emu

inline int atomicAdd(int* p, int v) { return cuda_emu::atomic_add(p, v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return cuda_emu::atomic_add(p, v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) { return cuda_emu::atomic_add(p, v); }
inline int atomicOr(int* p, int v) { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }
inline unsigned atomicOr(unsigned* p, unsigned v) { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }
inline int atomicMax(int* p, int v) { return cuda_emu::atomic_max(p, v); }
inline unsigned atomicMax(unsigned* p, unsigned v) { return cuda_emu::atomic_max(p, v); }

inline size_t __cvta_generic_to_shared(const void* p) { return cuda_emu::to_shared_window(p); }

// ---- runtime API ------------------------------------------------------------------------------
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t e);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
namespace cuda_emu {
cudaError_t set_function_attribute(const void* kernel, cudaFuncAttribute attr, int value);
cudaError_t occupancy(int* blocks, const void* kernel, int block_size, size_t smem);
cudaError_t function_attributes(cudaFuncAttributes* out, const void* kernel);
}  // namespace cuda_emu
template <class F>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* out, F* kernel) {
  return cuda_emu::function_attributes(out, reinterpret_cast<const void*>(kernel));
}
template <class F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  return cuda_emu::set_function_attribute(reinterpret_cast<const void*>(kernel), attr, value);
}
template <class F>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, F* kernel, int block_size, size_t smem) {
  return cuda_emu::occupancy(blocks, reinterpret_cast<const void*>(kernel), block_size, smem);
}
