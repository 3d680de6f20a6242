// CPU matching-pursuit encoder (pyinterp::matching_pursuit_forward, schema in csrc/bindings.cpp; the
// rules are pyinterp/reference/matching_pursuit_encode.py, the math docs/sae_family.md "Matching pursuit").
// Threads split blocks of rows; a block holds its residuals and one (rows x M) score tile, so the
// N x M scores never exist. Without `gram` the tile is recomputed by one GEMM per step (k GEMMs, as the
// dense loop); with gram = W W^T it is computed once and each step updates a row's scores by
// <r - c w_j, w_i> = <r, w_i> - c G[j, i], fused with the next argmax: O(M) per row and step instead of
// O(M D). The coefficient itself is always the exact <r, w_j>, so only the selection sees the update's
// rounding.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "checks.h"

namespace {

using namespace pyinterp::cpu;

// 128 rows x 16384 fp32 latents is an 8 MiB tile per thread.
constexpr int64_t kRowBlock = 128;

// The selection rule's key of a score: larger wins, ties to the lower index (strict > while scanning).
template <typename T>
inline T key(T score, bool positive) {
  return positive ? score : std::abs(score);
}

template <typename T>
inline int64_t argmax(const T* s, int64_t M, bool positive) {
  int64_t best = 0;
  T best_key = key(s[0], positive);
  for (int64_t i = 1; i < M; ++i) {
    const T v = key(s[i], positive);
    if (v > best_key) best_key = v, best = i;
  }
  return best;
}

template <typename T>
inline T dot(const T* a, const T* b, int64_t D) {
  T sum = 0;
  for (int64_t d = 0; d < D; ++d) sum += a[d] * b[d];
  return sum;
}

struct Options {
  int64_t k;
  bool positive;
  double residual_threshold;
  bool stop_on_duplicate_support;
};

// One greedy step of one row, given the selected latent j: the coefficient, the residual update, the
// listed slot and the done flag (the reference's rules). Returns the coefficient (0 if not live).
template <typename T, typename scalar_t>
inline T step_row(T* r, const T* W, int64_t D, int64_t j, int64_t t, scalar_t* out_v, int32_t* out_i,
                  bool& done, const Options& o) {
  const T* w = W + j * D;
  const T c = dot(r, w, D);
  const bool live = o.positive ? c > 0 : c != 0;
  if (!live) {
    if (o.stop_on_duplicate_support) done = true;
    return 0;
  }
  T norm2 = 0;
  for (int64_t d = 0; d < D; ++d) {
    r[d] -= c * w[d];
    norm2 += r[d] * r[d];
  }
  if (o.stop_on_duplicate_support) {
    for (int64_t u = 0; u < t; ++u) {
      if (out_i[u] == j && out_v[u] != scalar_t(0)) done = true;
    }
  }
  if (o.residual_threshold > 0 && std::sqrt(norm2) < o.residual_threshold) done = true;
  out_v[t] = static_cast<scalar_t>(c);
  out_i[t] = static_cast<int32_t>(j);
  return c;
}

template <typename scalar_t>
void matching_pursuit_kernel(const at::Tensor& x, const at::Tensor& W, const c10::optional<at::Tensor>& b_dec,
                             const c10::optional<at::Tensor>& gram, const Options& o, at::Tensor& values,
                             at::Tensor& indices) {
  using T = acc_type<scalar_t>;
  const int64_t N = x.size(0), D = x.size(1), M = W.size(0), k = o.k;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t rb = std::max<int64_t>(1, std::min(kRowBlock, (N + threads - 1) / threads));
  const int64_t blocks = (N + rb - 1) / rb;
  const T* Wp = W.data_ptr<T>();
  const T* G = gram.has_value() ? gram->data_ptr<T>() : nullptr;
  scalar_t* out_v = values.data_ptr<scalar_t>();
  int32_t* out_i = indices.data_ptr<int32_t>();

  at::parallel_for(0, blocks, 1, [&](int64_t blk_begin, int64_t blk_end) {
    const auto opts = x.options().dtype(c10::CppTypeToScalarType<T>::value);
    at::Tensor r_buf = at::empty({rb * D}, opts);
    at::Tensor s_buf = at::empty({rb * M}, opts);
    std::vector<char> done(rb);
    for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
      const int64_t r0 = blk * rb, nr = std::min(rb, N - r0);
      at::Tensor res = r_buf.narrow(0, 0, nr * D).view({nr, D});
      if (b_dec.has_value()) {
        at::sub_out(res, x.narrow(0, r0, nr), *b_dec);
      } else {
        res.copy_(x.narrow(0, r0, nr));
      }
      at::Tensor scores = s_buf.narrow(0, 0, nr * M).view({nr, M});
      T* rp = res.data_ptr<T>();
      T* sp = scores.data_ptr<T>();
      std::fill(done.begin(), done.begin() + nr, 0);
      if (G != nullptr) {
        at::mm_out(scores, res, W.t());
        for (int64_t row = 0; row < nr; ++row) {
          T* r = rp + row * D;
          T* s = sp + row * M;
          bool row_done = false;
          int64_t j = argmax(s, M, o.positive);
          for (int64_t t = 0; t < k && !row_done; ++t) {
            const int64_t o_row = (r0 + row) * k;
            const T c = step_row(r, Wp, D, j, t, out_v + o_row, out_i + o_row, row_done, o);
            if (row_done || t + 1 == k) break;
            if (c == T(0)) continue;  // nothing subtracted: the same scores, the same selection
            // s_i -= c G[j, i], and the next argmax in the same pass.
            const T* g = G + j * M;
            int64_t best = 0;
            T best_key = -std::numeric_limits<T>::infinity();
            for (int64_t i = 0; i < M; ++i) {
              s[i] -= c * g[i];
              const T v = key(s[i], o.positive);
              if (v > best_key) best_key = v, best = i;
            }
            j = best;
          }
        }
      } else {
        for (int64_t t = 0; t < k; ++t) {
          at::mm_out(scores, res, W.t());
          for (int64_t row = 0; row < nr; ++row) {
            if (done[row]) continue;
            bool row_done = false;
            const int64_t o_row = (r0 + row) * k;
            step_row(rp + row * D, Wp, D, argmax(sp + row * M, M, o.positive), t, out_v + o_row,
                     out_i + o_row, row_done, o);
            done[row] = row_done;
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> matching_pursuit_forward_cpu(
    const at::Tensor& x, const at::Tensor& W_dec, const c10::optional<at::Tensor>& b_dec,
    const c10::optional<at::Tensor>& gram, int64_t k, bool positive, double residual_threshold,
    bool stop_on_duplicate_support) {
  const char* op = "matching_pursuit_forward";
  check_matrix(op, "x", x);
  check_matrix(op, "W_dec", W_dec);
  check_float(op, "x", x);
  check_same_dtype(op, "W_dec", W_dec, "x", x);
  const int64_t N = x.size(0), D = x.size(1), M = W_dec.size(0);
  TORCH_CHECK(W_dec.size(1) == D, op, ": W_dec must be (M, D) with D = x.size(1) = ", D, ", got shape ",
              W_dec.sizes());
  TORCH_CHECK(M >= 1 && M <= std::numeric_limits<int32_t>::max(), op,
              ": W_dec must have 1 to 2^31 - 1 latents (int32 indices), got ", M);
  TORCH_CHECK(k >= 1 && k <= D, op, ": k must be in [1, D = ", D, "], got ", k);
  const auto acc = acc_dtype(x.scalar_type());
  if (b_dec.has_value()) {
    check_vector(op, "b_dec", *b_dec, D, "D = x.size(1)");
    check_same_dtype(op, "b_dec", *b_dec, "x", x);
  }
  if (gram.has_value()) {
    check_matrix(op, "gram", *gram);
    TORCH_CHECK(gram->size(0) == M && gram->size(1) == M, op, ": gram must be (M, M) = W_dec W_dec^T with M = ",
                M, ", got shape ", gram->sizes());
    TORCH_CHECK(gram->scalar_type() == acc, op, ": gram must be in the accumulator dtype ", acc, ", got ",
                gram->scalar_type());
  }
  at::Tensor values = at::zeros({N, k}, x.options());
  at::Tensor indices = at::zeros({N, k}, x.options().dtype(at::kInt));
  if (N == 0) return {values, indices};
  // Detached: the kernel's own ATen calls (sub_out, mm_out) must not see tensors that require grad.
  const at::Tensor W = W_dec.detach().to(acc).contiguous();
  const c10::optional<at::Tensor> bias =
      b_dec.has_value() ? c10::optional<at::Tensor>(b_dec->detach().to(acc)) : c10::nullopt;
  const c10::optional<at::Tensor> G =
      gram.has_value() ? c10::optional<at::Tensor>(gram->detach().contiguous()) : c10::nullopt;
  const Options o{k, positive, residual_threshold, stop_on_duplicate_support};
  const at::Tensor xc = x.detach().contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "matching_pursuit_forward", [&] {
    matching_pursuit_kernel<scalar_t>(xc, W, bias, G, o, values, indices);
  });
  return {values, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyinterp, CPU, m) {
  m.impl("matching_pursuit_forward", &matching_pursuit_forward_cpu);
}
