// The emulated CUDA runtime of tests/cuda_emu/include/cuda_emu.h: fibers, barriers, launches.
#include "cuda_emu.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <cstdarg>

// Context switch: saves the callee-saved registers on the current stack, stores its stack pointer
// to *save, continues on `next` (System V x86-64; a fresh stack starts in fiber_entry).
extern "C" void cuda_emu_switch(void** save, void* next);
asm(R"(
.text
.globl cuda_emu_switch
.type cuda_emu_switch,@function
cuda_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size cuda_emu_switch, .-cuda_emu_switch
)");

namespace cuda_emu {

Thread* g_current = nullptr;
dim3 g_grid, g_block_dim;

namespace {

constexpr size_t kStackBytes = size_t(256) << 10;
constexpr size_t kStaticSharedLimit = 48 << 10;
constexpr int kDefaultDynamicLimit = 48 << 10;
constexpr int kOptinLimit = 232448;  // 227 KiB, H100/H200
constexpr unsigned char kPoison = 0xFF;
constexpr uint32_t kWindowBase = 0x100000;

struct Scheduler {
  void* sp = nullptr;
  const void* stack_bottom = nullptr;
  size_t stack_bytes = 0;
  void* asan_fake_stack = nullptr;
  void* tsan_fiber = nullptr;
  const std::function<void()>* body = nullptr;
  std::vector<Block*> wave;
};
Scheduler g_sched;
cudaError_t g_last_error = cudaSuccess;
std::map<const void*, int> g_dynamic_limit;
std::map<const void*, size_t> g_static_bytes;  // the most static shared memory a block of the kernel used
char g_launch_done;  // TSan: every thread releases here at exit, the host acquires after the grid
std::string g_kernel_name;

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoi(v) : fallback;
}

[[noreturn]] void on_alarm(int) {
  static const char msg[] = "cuda_emu: timeout (CUDA_EMU_TIMEOUT): a kernel is stuck or far too slow\n";
  (void)!write(2, msg, sizeof(msg) - 1);
  std::abort();
}

struct Init {
  Init() {
    const int seconds = env_int("CUDA_EMU_TIMEOUT", 0);
    if (seconds > 0) {
      std::signal(SIGALRM, on_alarm);
      alarm(static_cast<unsigned>(seconds));
    }
  }
} g_init;

// Switches from the running context to `to` (nullptr: the scheduler); `exiting` drops the fiber's
// ASan fake stack.
void switch_to(Thread* to, bool exiting) {
  Thread* from = __atomic_load_n(&g_current, __ATOMIC_RELAXED);
  void** save = from ? &from->sp : &g_sched.sp;
  void* next = to ? to->sp : g_sched.sp;
#ifdef CUDA_EMU_ASAN
  void** fake = exiting ? nullptr : (from ? &from->asan_fake_stack : &g_sched.asan_fake_stack);
  if (to)
    __sanitizer_start_switch_fiber(fake, to->stack, to->stack_bytes);
  else
    __sanitizer_start_switch_fiber(fake, g_sched.stack_bottom, g_sched.stack_bytes);
#endif
#ifdef CUDA_EMU_TSAN
  // Only the first entry of a thread synchronises (it sees the launch's arguments and everything
  // the host did before); afterwards memory is ordered by the barriers' own annotations.
  const bool first = to && !to->started;
  __tsan_switch_to_fiber(to ? to->tsan_fiber : g_sched.tsan_fiber, first ? 0 : __tsan_switch_to_fiber_no_sync);
#endif
  if (to) to->started = true;
  __atomic_store_n(&g_current, to, __ATOMIC_RELAXED);
  cuda_emu_switch(save, next);
  // resumed
#ifdef CUDA_EMU_ASAN
  __sanitizer_finish_switch_fiber(from ? from->asan_fake_stack : g_sched.asan_fake_stack, nullptr, nullptr);
#endif
}

extern "C" void fiber_entry() {
#ifdef CUDA_EMU_ASAN
  const void* bottom = nullptr;
  size_t bytes = 0;
  __sanitizer_finish_switch_fiber(nullptr, &bottom, &bytes);
  if (!g_sched.stack_bottom) {
    g_sched.stack_bottom = bottom;
    g_sched.stack_bytes = bytes;
  }
#endif
  (*g_sched.body)();
  Thread* self = current();
  // cp.async groups still in flight complete when the thread exits.
  for (const CpAsyncCopy& c : self->cp_pending) {
    if (c.src) std::memcpy(c.dst, c.src, 16); else std::memset(c.dst, 0, 16);
  }
  {
    IgnoreAccesses ignore;
    self->done = true;
    Block* b = self->block;
    --b->live;
  }
#ifdef CUDA_EMU_TSAN
  __tsan_release(&g_launch_done);
#endif
  switch_to(nullptr, true);
  fail("an exited thread was resumed");
}

void prepare_stack(Thread* t) {
  // 16-byte aligned top, a fake return address, fiber_entry as the return target, six registers.
  auto* top = reinterpret_cast<uintptr_t*>(t->stack + t->stack_bytes);
  *--top = 0;
  *--top = reinterpret_cast<uintptr_t>(&fiber_entry);
  for (int i = 0; i < 6; ++i) *--top = 0;
  t->sp = top;
}

const char* describe(const Thread* t) {
  static char buf[160];
  std::snprintf(buf, sizeof(buf), "block (%u,%u,%u) thread (%u,%u,%u)", t->block->idx.x, t->block->idx.y,
                t->block->idx.z, t->idx.x, t->idx.y, t->idx.z);
  return buf;
}

void release(Barrier& bar) {
  ++bar.generation;
  bar.arrived = 0;
  bar.site = nullptr;
  for (Thread* t : bar.waiting) {
    t->blocked = false;
    t->waiting_at = nullptr;
  }
  bar.waiting.clear();
}

// A barrier completes when every live participant has arrived; threads that exited are excused
// (as on sm_70+), but a warp collective whose mask names an exited lane is an error.
void check_complete(Barrier& bar, int live) {
  if (bar.arrived > 0 && bar.arrived == live) release(bar);
}

}  // namespace

void fail(const char* fmt, ...) {
  std::fprintf(stderr, "cuda_emu: ");
  if (g_current) std::fprintf(stderr, "[%s, %s] ", g_kernel_name.c_str(), describe(g_current));
  va_list ap;
  va_start(ap, fmt);
  std::vfprintf(stderr, fmt, ap);
  va_end(ap);
  std::fprintf(stderr, "\n");
  std::fflush(stderr);
  std::abort();
}

Thread* current() {
  Thread* t = __atomic_load_n(&g_current, __ATOMIC_RELAXED);
  if (!t) fail("device code called outside a kernel");
  return t;
}

int arrive(bool warp, const char* site, unsigned mask, Reduce reduce, int value, const void* payload,
           size_t bytes) {
  Thread* self = current();
  Block* b = self->block;
  Barrier* bar;
  int participants;
  const int lane = self->linear & 31;
  uint64_t gen;
  {
    IgnoreAccesses ignore;
    if (warp) {
      if (mask != 0xFFFFFFFFu) fail("%s: warp collective with mask 0x%08x (only full warps are emulated)", site, mask);
      const int w = self->linear / 32;
      if ((w + 1) * 32 > b->threads) fail("%s: full-mask warp collective in a partial warp", site);
      for (int l = 0; l < 32; ++l)
        if (b->thread[w * 32 + l]->done) fail("%s: full-mask warp collective but lane %d has exited", site, l);
      bar = &b->warp_barrier[w];
      participants = 32;
    } else {
      bar = &b->block_barrier;
      participants = b->live;
    }
    gen = bar->generation;
    const int parity = static_cast<int>(gen & 1);
    if (bar->arrived == 0) {
      bar->site = site;
      bar->mask = mask;
      bar->result[parity] = reduce == Reduce::all ? 1 : 0;
    } else if (std::strcmp(bar->site, site) != 0) {
      fail("barrier divergence: %s waits at %s while others wait at %s", describe(self), site, bar->site);
    } else if (bar->mask != mask) {
      fail("%s: masks differ between lanes", site);
    }
    int& r = bar->result[parity];
    switch (reduce) {
      case Reduce::none:
      case Reduce::exchange: break;
      case Reduce::any: r |= value; break;
      case Reduce::all: r &= value; break;
      case Reduce::count: r += value; break;
      case Reduce::ballot: r |= value ? int(1u << lane) : 0; break;
    }
    if (bytes) std::memcpy(bar->payload[parity][lane], payload, bytes);
    ++bar->arrived;
    self->collective_generation = gen;
  }
  // Only barriers order memory; shuffles and ballots exchange values but no memory (as in CUDA).
  const bool orders_memory = !warp || reduce == Reduce::none;
  void* sync = &bar->tsan_sync[gen & 1];
#ifdef CUDA_EMU_TSAN
  if (orders_memory) __tsan_release(sync);
#endif
  {
    IgnoreAccesses ignore;
    if (bar->arrived == participants) {
      release(*bar);
    } else {
      self->blocked = true;
      self->waiting_at = site;
      bar->waiting.push_back(self);
      switch_to(nullptr, false);
    }
  }
#ifdef CUDA_EMU_TSAN
  if (orders_memory) __tsan_acquire(sync);
#endif
  (void)orders_memory;
  (void)sync;
  // Generation gen's result and payload stay put until every participant has passed gen + 1.
  IgnoreAccesses ignore;
  return bar->result[gen & 1];
}

const unsigned char* payload_of(int lane) {
  Thread* self = current();
  const Barrier& bar = self->block->warp_barrier[self->linear / 32];
  return bar.payload[self->collective_generation & 1][lane];
}

unsigned char* dynamic_shared() { return current()->block->dynamic_smem; }

void* static_shared(const char* key, size_t bytes, size_t align) {
  IgnoreAccesses ignore;
  Block* b = current()->block;
  auto it = b->statics.find(key);
  if (it != b->statics.end()) return it->second;
  void* p = nullptr;
  if (posix_memalign(&p, std::max<size_t>(align, 16), bytes) != 0) fail("out of memory");
  std::memset(p, kPoison, bytes);
  b->static_bytes += bytes;
  if (b->static_bytes > kStaticSharedLimit) fail("static shared memory over 48 KiB (%s)", key);
  if (b->static_bytes + b->dynamic_bytes > size_t(kOptinLimit)) fail("shared memory over 227 KiB (%s)", key);
  b->statics.emplace(key, p);
  return p;
}

uint32_t to_shared_window(const void* p) {
  const Block* b = current()->block;
  const auto* c = static_cast<const unsigned char*>(p);
  if (c < b->dynamic_smem || c > b->dynamic_smem + b->dynamic_bytes)
    fail("__cvta_generic_to_shared of %p, outside the dynamic shared memory", p);
  return kWindowBase + static_cast<uint32_t>(c - b->dynamic_smem);
}

void* from_shared_window(uint32_t address, size_t bytes) {
  const Block* b = current()->block;
  if (address < kWindowBase || address - kWindowBase + bytes > b->dynamic_bytes)
    fail("shared address 0x%x (+%zu bytes) outside the %zu-byte dynamic shared memory", address - kWindowBase,
         bytes, b->dynamic_bytes);
  return b->dynamic_smem + (address - kWindowBase);
}

void set_last_error(cudaError_t e) { g_last_error = e; }

cudaError_t check_launch(const char* name, const void* kernel, dim3 grid, dim3 block, size_t smem) {
  g_kernel_name = name;
  if (const char* log = std::getenv("CUDA_EMU_LOG")) {  // one line per launch, for the tests' path checks
    if (FILE* f = std::fopen(log, "a")) {
      std::fprintf(f, "%s grid=%u,%u,%u block=%u,%u,%u smem=%zu\n", name, grid.x, grid.y, grid.z, block.x, block.y,
                   block.z, smem);
      std::fclose(f);
    }
  }
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0 || block.x > 1024 || block.y > 1024 || block.z > 64 ||
      threads > 1024)
    return cudaErrorInvalidConfiguration;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7FFFFFFFu || grid.y > 65535 || grid.z > 65535)
    return cudaErrorInvalidConfiguration;
  auto it = g_dynamic_limit.find(kernel);
  const int limit = it == g_dynamic_limit.end() ? kDefaultDynamicLimit : it->second;
  if (smem > size_t(limit)) return cudaErrorInvalidValue;
  return cudaSuccess;
}

void run_grid(const void* kernel, dim3 grid, dim3 block_dim, size_t smem, const std::function<void()>& body) {
  g_grid = grid;
  g_block_dim = block_dim;
  g_sched.body = &body;
  const int threads = static_cast<int>(block_dim.x * block_dim.y * block_dim.z);
  const int per_wave = std::max(1, env_int("CUDA_EMU_CONCURRENT_BLOCKS", 2));
  std::vector<uint3> order;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) order.push_back({x, y, z});
  if (env_int("CUDA_EMU_REVERSE_BLOCKS", 0)) std::reverse(order.begin(), order.end());
#ifdef CUDA_EMU_TSAN
  if (!g_sched.tsan_fiber) g_sched.tsan_fiber = __tsan_get_current_fiber();
#endif
  for (size_t first = 0; first < order.size(); first += per_wave) {
    IgnoreAccesses ignore;  // the host's bookkeeping of the wave, its setup and teardown
    const size_t count = std::min(order.size() - first, size_t(per_wave));
    std::vector<Block> blocks(count);
    std::vector<Thread> thread(count * threads);
    // Fresh stacks for every wave: TSan then sees no stale accesses of an earlier block's threads.
    const size_t stack_total = kStackBytes * thread.size();
    char* stacks = static_cast<char*>(
        mmap(nullptr, stack_total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    if (stacks == MAP_FAILED) fail("cannot map thread stacks");
    for (size_t bi = 0; bi < count; ++bi) {
      Block& b = blocks[bi];
      b.idx = order[first + bi];
      b.threads = threads;
      b.live = threads;
      b.warp_barrier.resize((threads + 31) / 32);
      b.dynamic_bytes = smem;
      void* p = nullptr;
      if (posix_memalign(&p, 1024, smem) != 0) fail("out of memory");
      b.dynamic_smem = static_cast<unsigned char*>(p);
      std::memset(b.dynamic_smem, kPoison, smem);
      for (int t = 0; t < threads; ++t) {
        Thread& th = thread[bi * threads + t];
        th.linear = t;
        th.idx = {unsigned(t) % block_dim.x, unsigned(t) / block_dim.x % block_dim.y,
                  unsigned(t) / (block_dim.x * block_dim.y)};
        th.block = &b;
        th.stack = stacks + (bi * threads + t) * kStackBytes + 4096;
        th.stack_bytes = kStackBytes - 4096;
        mprotect(stacks + (bi * threads + t) * kStackBytes, 4096, PROT_NONE);  // overflow guard
        prepare_stack(&th);
#ifdef CUDA_EMU_TSAN
        th.tsan_fiber = __tsan_create_fiber(0);
#endif
        b.thread.push_back(&th);
      }
    }
    // Round robin until every thread has exited.
    while (true) {
      bool ran = false, all_done = true;
      for (Thread& th : thread) {
        if (th.done) continue;
        all_done = false;
        if (th.blocked) continue;
        ran = true;
        switch_to(&th, false);
        // a thread that exited may complete the barrier its block's others wait at
        Block* b = th.block;
        if (th.done) check_complete(b->block_barrier, b->live);
      }
      if (all_done) break;
      if (!ran) {
        std::fprintf(stderr, "cuda_emu: deadlock in %s: no thread can run\n", g_kernel_name.c_str());
        for (const Thread& th : thread)
          if (th.blocked) std::fprintf(stderr, "  %s waits at %s\n", describe(&th), th.waiting_at);
        std::abort();
      }
    }
#ifdef CUDA_EMU_TSAN
    for (Thread& th : thread) __tsan_destroy_fiber(th.tsan_fiber);
#endif
    for (Block& b : blocks) {
      g_static_bytes[kernel] = std::max(g_static_bytes[kernel], b.static_bytes);
      std::free(b.dynamic_smem);
      for (auto& kv : b.statics) std::free(kv.second);
    }
#ifdef CUDA_EMU_ASAN
    __asan_unpoison_memory_region(stacks, stack_total);  // frames the exited fibers left poisoned
#endif
    munmap(stacks, stack_total);
  }
#ifdef CUDA_EMU_TSAN
  __tsan_acquire(&g_launch_done);
#endif
  g_sched.body = nullptr;
}

cudaError_t set_function_attribute(const void* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (value < 0 || value > kOptinLimit) return cudaErrorInvalidValue;
  g_dynamic_limit[kernel] = value;
  return cudaSuccess;
}

cudaError_t function_attributes(cudaFuncAttributes* out, const void* kernel) {
  *out = cudaFuncAttributes{};
  out->sharedSizeBytes = g_static_bytes[kernel];
  auto it = g_dynamic_limit.find(kernel);
  if (it != g_dynamic_limit.end()) out->maxDynamicSharedSizeBytes = it->second;
  return cudaSuccess;
}

cudaError_t occupancy(int* blocks, const void* kernel, int block_size, size_t smem) {
  (void)kernel;
  if (block_size <= 0 || block_size > 1024) return cudaErrorInvalidValue;
  const int by_threads = 2048 / block_size;
  const int by_smem = static_cast<int>(size_t(233472) / (smem + 1024));  // 228 KiB per SM, 1 KiB reserved per block
  *blocks = std::min({by_threads, by_smem, 32});
  return cudaSuccess;
}

}  // namespace cuda_emu

cudaError_t cudaGetLastError() {
  const cudaError_t e = cuda_emu::g_last_error;
  cuda_emu::g_last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return cuda_emu::g_last_error; }

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorNotSupported: return "operation not supported";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
  }
  return "unknown error";
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidValue;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = cuda_emu::env_int("CUDA_EMU_SMS", 132); return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 48 << 10; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = cuda_emu::env_int("CUDA_EMU_SMEM_OPTIN", cuda_emu::kOptinLimit);
      return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
