// CPU emulations of the inline-PTX helpers of kernels/cuda/common.cuh (same names and signatures),
// built from the PTX ISA's definitions so that the kernels' own fragment indexing is what runs:
// - cp.async: a copy is queued and lands only when a cp.async.wait_group retires its group, so a
//   read of the destination before the wait sees the old contents;
// - ldmatrix.x4 and mma.sync m16n8k16 (f16/bf16 -> f32): warp-collective, each lane's registers
//   laid out as in the ISA's fragment tables ("Matrix Fragments for mma.m16n8k16", "ldmatrix").
#pragma once

#include <cstdint>
#include <type_traits>

#include "cuda_emu.h"

namespace pyinterp::cuda::detail {

inline void cp_async16(uint32_t dst, const void* src, bool valid) {
  ::cuda_emu::Thread* self = ::cuda_emu::current();
  void* d = ::cuda_emu::from_shared_window(dst, 16);
  if (dst % 16 != 0) ::cuda_emu::fail("cp.async destination 0x%x is not 16-byte aligned", dst);
  if (valid && reinterpret_cast<uintptr_t>(src) % 16 != 0)
    ::cuda_emu::fail("cp.async source %p is not 16-byte aligned", src);
  self->cp_pending.push_back({d, valid ? src : nullptr});
}

inline void cp_async_commit() {
  ::cuda_emu::Thread* self = ::cuda_emu::current();
  self->cp_groups.push_back(self->cp_pending.size());
}

// Retires the oldest committed groups until at most N are in flight (cp.async.wait_group N).
template <int N>
inline void cp_async_wait() {
  ::cuda_emu::Thread* self = ::cuda_emu::current();
  while (self->cp_groups.size() > static_cast<size_t>(N)) {
    const size_t end = self->cp_groups.front();
    for (size_t i = 0; i < end; ++i) {
      const ::cuda_emu::CpAsyncCopy& c = self->cp_pending[i];
      if (c.src) std::memcpy(c.dst, c.src, 16); else std::memset(c.dst, 0, 16);
    }
    self->cp_pending.erase(self->cp_pending.begin(), self->cp_pending.begin() + static_cast<long>(end));
    self->cp_groups.erase(self->cp_groups.begin());
    for (size_t& g : self->cp_groups) g -= end;
  }
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lanes 8i..8i+7 give the row addresses of matrix i;
// register i of lane l holds row l/4, elements 2(l%4) and 2(l%4)+1 of matrix i.
inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  if (addr % 16 != 0) ::cuda_emu::fail("ldmatrix row address 0x%x is not 16-byte aligned", addr);
  unsigned char row[16];
  std::memcpy(row, ::cuda_emu::from_shared_window(addr, 16), 16);
  ::cuda_emu::arrive(true, "ldmatrix.x4", ~0u, ::cuda_emu::Reduce::exchange, 0, row, 16);
  const int lane = ::cuda_emu::current()->linear & 31;
  ::cuda_emu::IgnoreAccesses ignore;
  for (int i = 0; i < 4; ++i) std::memcpy(&r[i], ::cuda_emu::payload_of(8 * i + lane / 4) + 4 * (lane % 4), 4);
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32, D = A B + D. With g = lane/4,
// t = lane%4: A regs (a0a1, a2a3, a4a5, a6a7) hold rows (g, g+8, g, g+8), cols 2t + (0,1) (+8 for
// the last two); B regs hold rows (k) 2t + (0,1) and 2t+8 + (0,1) of column g; D element e is row
// g + 8(e/2), col 2t + e%2. The products are summed exactly (double) and rounded once.
template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "f16 or bf16 operands");
  const uint32_t regs[6] = {a[0], a[1], a[2], a[3], b0, b1};
  ::cuda_emu::arrive(true, "mma.m16n8k16", ~0u, ::cuda_emu::Reduce::exchange, 0, regs, sizeof(regs));
  const int lane = ::cuda_emu::current()->linear & 31;
  const auto element = [](int owner, int reg, int half) {
    uint32_t word;
    {
      ::cuda_emu::IgnoreAccesses ignore;
      std::memcpy(&word, ::cuda_emu::payload_of(owner) + 4 * reg, 4);
    }
    const T v{static_cast<uint16_t>(half ? word >> 16 : word & 0xFFFFu)};
    if constexpr (std::is_same_v<T, __half>) return static_cast<double>(__half2float(v));
    else return static_cast<double>(__bfloat162float(v));
  };
  const int g = lane >> 2, t = lane & 3;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
    double sum = d[e];
    for (int k = 0; k < 16; ++k) {
      const double av = element((row % 8) * 4 + (k % 8) / 2, (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0), k & 1);
      const double bv = element(col * 4 + (k % 8) / 2, 4 + (k >= 8 ? 1 : 0), k & 1);
      sum += av * bv;
    }
    d[e] = static_cast<float>(sum);
  }
}

}  // namespace pyinterp::cuda::detail
