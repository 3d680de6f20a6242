// Host stand-ins for the cub primitives kernels/cuda uses, with cub's contracts:
// - BlockScan<T, BLOCK_DIM_X>::ExclusiveSum(input, output, aggregate): a block-wide collective; the
//   block must have exactly BLOCK_DIM_X threads; the TempStorage may be reused only after a
//   __syncthreads (a reuse without one is a race under TSan).
// - DeviceSegmentedSort::SortKeysDescending and DeviceRadixSort::SortPairs: the size query with a
//   null temp pointer, then a call that needs at least that much temp storage (which it scribbles
//   over), non-overlapping in/out; SortPairs is stable and orders by bits [begin_bit, end_bit) only.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

#include "cuda_emu.h"

namespace cub {

template <typename T, int BLOCK_DIM_X>
class BlockScan {
 public:
  struct TempStorage {
    T items[BLOCK_DIM_X];
  };
  explicit BlockScan(TempStorage& storage) : storage_(storage) {}

  void ExclusiveSum(T input, T& output, T& block_aggregate) {
    if (blockDim.x != BLOCK_DIM_X || blockDim.y != 1 || blockDim.z != 1)
      ::cuda_emu::fail("cub::BlockScan<%d> in a block of %u threads", BLOCK_DIM_X, blockDim.x);
    const unsigned me = threadIdx.x;
    storage_.items[me] = input;
    ::cuda_emu::arrive(false, "cub::BlockScan::ExclusiveSum", ~0u, ::cuda_emu::Reduce::none, 0, nullptr, 0);
    T before = 0, total = 0;
    for (unsigned i = 0; i < BLOCK_DIM_X; ++i) {
      if (i == me) before = total;
      total += storage_.items[i];
    }
    output = before;
    block_aggregate = total;
  }

 private:
  TempStorage& storage_;
};

namespace emu_detail {
inline size_t temp_bytes(int64_t items) { return 1024 + 16 * static_cast<size_t>(items); }

inline cudaError_t check_temp(void* temp, size_t bytes, int64_t items) {
  if (bytes < temp_bytes(items)) return cudaErrorInvalidValue;
  std::memset(temp, 0xA5, temp_bytes(items));  // cub owns all of it: a caller's data there is lost
  return cudaSuccess;
}

inline void check_disjoint(const void* a, size_t a_bytes, const void* b, size_t b_bytes, const char* what) {
  const auto* x = static_cast<const char*>(a);
  const auto* y = static_cast<const char*>(b);
  if (a_bytes && b_bytes && x < y + b_bytes && y < x + a_bytes) ::cuda_emu::fail("cub: %s overlap", what);
}
}  // namespace emu_detail

struct DeviceSegmentedSort {
  template <typename KeyT, typename BeginOffsetIteratorT, typename EndOffsetIteratorT>
  static cudaError_t SortKeysDescending(void* d_temp_storage, size_t& temp_storage_bytes, const KeyT* d_keys_in,
                                        KeyT* d_keys_out, int64_t num_items, int64_t num_segments,
                                        BeginOffsetIteratorT d_begin_offsets, EndOffsetIteratorT d_end_offsets,
                                        cudaStream_t = nullptr) {
    if (!d_temp_storage) {
      temp_storage_bytes = emu_detail::temp_bytes(num_items);
      return cudaSuccess;
    }
    if (const cudaError_t e = emu_detail::check_temp(d_temp_storage, temp_storage_bytes, num_items)) return e;
    emu_detail::check_disjoint(d_keys_in, sizeof(KeyT) * num_items, d_keys_out, sizeof(KeyT) * num_items,
                               "SortKeysDescending keys in/out");
    std::memcpy(d_keys_out, d_keys_in, sizeof(KeyT) * num_items);
    for (int64_t s = 0; s < num_segments; ++s) {
      const int64_t b = d_begin_offsets[s], e = d_end_offsets[s];
      if (b < 0 || e > num_items || b > e) ::cuda_emu::fail("cub: segment %ld is [%ld, %ld)", long(s), long(b), long(e));
      std::sort(d_keys_out + b, d_keys_out + e, [](KeyT x, KeyT y) { return x > y; });  // not stable in cub
    }
    return cudaSuccess;
  }
};

struct DeviceRadixSort {
  template <typename KeyT, typename ValueT, typename NumItemsT>
  static cudaError_t SortPairs(void* d_temp_storage, size_t& temp_storage_bytes, const KeyT* d_keys_in,
                               KeyT* d_keys_out, const ValueT* d_values_in, ValueT* d_values_out,
                               NumItemsT num_items, int begin_bit = 0, int end_bit = sizeof(KeyT) * 8,
                               cudaStream_t = nullptr) {
    const int64_t n = static_cast<int64_t>(num_items);
    if (!d_temp_storage) {
      temp_storage_bytes = emu_detail::temp_bytes(n);
      return cudaSuccess;
    }
    if (const cudaError_t e = emu_detail::check_temp(d_temp_storage, temp_storage_bytes, n)) return e;
    if (begin_bit < 0 || end_bit > int(sizeof(KeyT) * 8) || begin_bit >= end_bit) return cudaErrorInvalidValue;
    emu_detail::check_disjoint(d_keys_in, sizeof(KeyT) * n, d_keys_out, sizeof(KeyT) * n, "SortPairs keys");
    emu_detail::check_disjoint(d_values_in, sizeof(ValueT) * n, d_values_out, sizeof(ValueT) * n, "SortPairs values");
    const int bits = end_bit - begin_bit;
    const uint64_t mask = bits >= 64 ? ~uint64_t(0) : (uint64_t(1) << bits) - 1;
    const auto digit = [&](KeyT k) { return (static_cast<uint64_t>(k) >> begin_bit) & mask; };
    std::vector<int64_t> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return digit(d_keys_in[a]) < digit(d_keys_in[b]); });
    for (int64_t i = 0; i < n; ++i) {
      d_keys_out[i] = d_keys_in[order[i]];
      d_values_out[i] = d_values_in[order[i]];
    }
    return cudaSuccess;
  }
};

}  // namespace cub
