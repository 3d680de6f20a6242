// Row helpers of the CPU sparse products (csrc/cpu/sparse_decode.cpp, csrc/cpu/prefix_decode.cpp):
// widening 16-bit rows to the accumulator type, grouped axpy / dot over gathered rows in a fixed
// order (deterministic), the checked index read, the parallel grain, and the per-latent CSR that
// orders a sparse transpose-product's reduction.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

namespace pyinterp::cpu {
namespace {  // one copy per kernel file: the fp32 entry points are target_clones functions

// Row `row` of width D as acc_t: the row itself when it already is acc_t, else widened into buf.
template <typename acc_t, typename scalar_t>
inline const acc_t* widen(const scalar_t* row, int64_t D, acc_t* buf) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    return row;
  } else {
    for (int64_t d = 0; d < D; ++d) buf[d] = static_cast<acc_t>(row[d]);
    return buf;
  }
}

template <typename acc_t, typename scalar_t>
inline void narrow_store(const acc_t* src, int64_t D, scalar_t* dst) {
  for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(src[d]);
}

// The rows are taken kGroup at a time: one pass over acc (or over g) per group, and kGroup independent
// row streams in flight, which is what the gathers are bound by (rows come from L3 / DRAM).
constexpr int kGroup = 8;

// acc += sum_q c[q] r[q] for G rows, summed in a fixed tree.
template <int G, typename T>
__attribute__((always_inline)) inline void axpy_rows(T* __restrict acc, const T* const* r, const T* c,
                                                     int64_t D) {
  if constexpr (G == kGroup) {
    static_assert(kGroup == 8, "the tree below is written out for 8 rows");
    const T *r0 = r[0], *r1 = r[1], *r2 = r[2], *r3 = r[3], *r4 = r[4], *r5 = r[5], *r6 = r[6], *r7 = r[7];
    for (int64_t d = 0; d < D; ++d) {
      acc[d] += ((c[0] * r0[d] + c[1] * r1[d]) + (c[2] * r2[d] + c[3] * r3[d])) +
                ((c[4] * r4[d] + c[5] * r5[d]) + (c[6] * r6[d] + c[7] * r7[d]));
    }
  } else {
    static_assert(G == 1);
    const T* r0 = r[0];
    for (int64_t d = 0; d < D; ++d) acc[d] += c[0] * r0[d];
  }
}

// out[q] = <g, r[q]> for G rows: g is read once for all of them. Each dot keeps 8 partial sums (a
// vector) so that it vectorises without reassociation flags; the partials and the D % 8 tail are then
// added in a fixed order, so the result is deterministic.
template <int G, typename T>
__attribute__((always_inline)) inline void dot_rows(const T* __restrict g, const T* const* r, int64_t D,
                                                    T* out) {
  typedef T lanes_t __attribute__((vector_size(8 * sizeof(T))));
  lanes_t s[G] = {};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    lanes_t gv;
    std::memcpy(&gv, g + d, sizeof(gv));
    for (int q = 0; q < G; ++q) {
      lanes_t rv;
      std::memcpy(&rv, r[q] + d, sizeof(rv));
      s[q] += gv * rv;
    }
  }
  for (int q = 0; q < G; ++q) {
    T tail = 0;
    for (int64_t t = d; t < D; ++t) tail += g[t] * r[q][t];
    out[q] = (((s[q][0] + s[q][1]) + (s[q][2] + s[q][3])) + ((s[q][4] + s[q][5]) + (s[q][6] + s[q][7]))) +
             tail;
  }
}

// fp32 entry points, built for the baseline ISA and for AVX2+FMA (picked at load time); float64 (only
// gradcheck) uses the templates directly.
#define PYINTERP_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
PYINTERP_CLONES void axpy_group(float* acc, const float* const* r, const float* c, int64_t D) {
  axpy_rows<kGroup>(acc, r, c, D);
}
PYINTERP_CLONES void axpy_one(float* acc, const float* const* r, const float* c, int64_t D) {
  axpy_rows<1>(acc, r, c, D);
}
PYINTERP_CLONES void dot_group(const float* g, const float* const* r, int64_t D, float* out) {
  dot_rows<kGroup>(g, r, D, out);
}
PYINTERP_CLONES void dot_one(const float* g, const float* const* r, int64_t D, float* out) {
  dot_rows<1>(g, r, D, out);
}
#undef PYINTERP_CLONES
void axpy_group(double* acc, const double* const* r, const double* c, int64_t D) {
  axpy_rows<kGroup>(acc, r, c, D);
}
void axpy_one(double* acc, const double* const* r, const double* c, int64_t D) {
  axpy_rows<1>(acc, r, c, D);
}
void dot_group(const double* g, const double* const* r, int64_t D, double* out) {
  dot_rows<kGroup>(g, r, D, out);
}
void dot_one(const double* g, const double* const* r, int64_t D, double* out) {
  dot_rows<1>(g, r, D, out);
}

// Reads indices[n, j] and checks it before anything is read through it.
template <typename index_t>
inline int64_t checked_index(const index_t* idx, int64_t n, int64_t j, int64_t k, int64_t M,
                             const char* op, const char* what) {
  const int64_t i = static_cast<int64_t>(idx[n * k + j]);
  TORCH_CHECK(i >= 0 && i < M, op, ": indices[", n, ", ", j, "] = ", i, " is out of range [0, ", M,
              ") (", what, ")");
  return i;
}

// Rows per parallel chunk: at least ~16K multiply-adds, to amortise the dispatch.
int64_t row_grain(int64_t row_cost) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_cost));
}

// CSR of the (latent, n*k + j) pairs by a counting sort: offsets (M + 1) and the flat positions, each
// latent's positions in increasing order (the fixed reduction order that makes the result deterministic).
// The positions are split into `parts` contiguous ranges counted and scattered in parallel; part t's
// entries of a latent go after those of parts < t, so the order is the serial one.
template <typename index_t>
void latent_csr(const index_t* idx, int64_t N, int64_t k, int64_t M, const char* op, std::vector<int64_t>& offsets,
                std::vector<int64_t>& positions) {
  const int64_t total = N * k;
  // A part costs a histogram of M counters: only worth it with several entries per counter.
  const int64_t parts =
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total / (4 * std::max<int64_t>(M, 1))));
  std::vector<int64_t> cursor(parts * M, 0);  // counts of part t, then where its next entry goes
  at::parallel_for(0, parts, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int64_t* count = cursor.data() + t * M;
      for (int64_t p = total * t / parts; p < total * (t + 1) / parts; ++p) {
        const int64_t i = static_cast<int64_t>(idx[p]);
        TORCH_CHECK(i >= 0 && i < M, op, ": indices[", p / k, ", ", p % k, "] = ", i,
                    " is out of range [0, num_latents = ", M, ")");
        ++count[i];
      }
    }
  });
  offsets.assign(M + 1, 0);
  for (int64_t i = 0; i < M; ++i) {
    int64_t next = offsets[i];
    for (int64_t t = 0; t < parts; ++t) {
      const int64_t c = cursor[t * M + i];
      cursor[t * M + i] = next;
      next += c;
    }
    offsets[i + 1] = next;
  }
  positions.resize(total);
  at::parallel_for(0, parts, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int64_t* next = cursor.data() + t * M;
      for (int64_t p = total * t / parts; p < total * (t + 1) / parts; ++p) positions[next[idx[p]]++] = p;
    }
  });
}

}  // namespace
}  // namespace pyinterp::cpu
