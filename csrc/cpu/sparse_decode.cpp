// CPU sparse products of the SAE decoder and of both SAE backwards (schemas in csrc/bindings.cpp):
//   gather_sum       out[n]  = sum_j values[n,j] * weight[indices[n,j]] (+ bias)
//   gather_dot       out[n,j] = <grad[n], weight[indices[n,j]]>
//   sparse_t_matmul  weight_grad[i] = sum_{indices[n,j]=i} coef[n,j] * rows[n], coef_sum[i] likewise
// Everything accumulates in fp32 (float64 for float64 inputs). Rows of fp16/bf16 matrices are widened
// into a small per-thread buffer before the arithmetic, so that one set of vectorised fp32 loops serves
// every dtype.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "sparse_rows.h"

namespace {

using namespace pyinterp::cpu;

// ---------------------------------------------------------------------------------------------------
// gather_sum

template <typename scalar_t, typename index_t>
void gather_sum_kernel(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& bias, at::Tensor& out) {
  using acc_t = acc_type<scalar_t>;
  const int64_t N = values.size(0), k = values.size(1), M = weight.size(0), D = weight.size(1);
  const acc_t* v = values.data_ptr<acc_t>();
  const index_t* idx = indices.data_ptr<index_t>();
  const scalar_t* w = weight.data_ptr<scalar_t>();
  const acc_t* b = bias.has_value() ? bias->data_ptr<acc_t>() : nullptr;
  scalar_t* o = out.data_ptr<scalar_t>();
  constexpr bool direct = std::is_same_v<acc_t, scalar_t>;

  at::parallel_for(0, N, row_grain(k * D), [&](int64_t n0, int64_t n1) {
    std::vector<acc_t> acc_buf(direct ? 0 : D), stage(direct ? 0 : kGroup * D);
    acc_t* s = stage.data();
    for (int64_t n = n0; n < n1; ++n) {
      acc_t* acc = acc_buf.data();
      if constexpr (direct) acc = o + n * D;
      if (b != nullptr) {
        std::copy(b, b + D, acc);
      } else {
        std::fill(acc, acc + D, acc_t(0));
      }
      const acc_t* vn = v + n * k;
      const acc_t* r[kGroup];
      int64_t j = 0;
      for (; j + kGroup <= k; j += kGroup) {
        for (int q = 0; q < kGroup; ++q) {
          const int64_t i = checked_index(idx, n, j + q, k, M, "gather_sum", "rows of weight");
          r[q] = widen(w + i * D, D, s + q * D);
        }
        axpy_group(acc, r, vn + j, D);
      }
      for (; j < k; ++j) {
        const int64_t i = checked_index(idx, n, j, k, M, "gather_sum", "rows of weight");
        r[0] = widen(w + i * D, D, s);
        axpy_one(acc, r, vn + j, D);
      }
      if constexpr (!direct) narrow_store(acc, D, o + n * D);
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// gather_dot

template <typename scalar_t, typename index_t>
void gather_dot_kernel(const at::Tensor& grad, const at::Tensor& indices, const at::Tensor& weight,
                       at::Tensor& out) {
  using acc_t = acc_type<scalar_t>;
  const int64_t N = grad.size(0), D = grad.size(1), k = indices.size(1), M = weight.size(0);
  const scalar_t* g = grad.data_ptr<scalar_t>();
  const index_t* idx = indices.data_ptr<index_t>();
  const scalar_t* w = weight.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  constexpr bool direct = std::is_same_v<acc_t, scalar_t>;

  at::parallel_for(0, N, row_grain(k * D), [&](int64_t n0, int64_t n1) {
    std::vector<acc_t> stage(direct ? 0 : (kGroup + 1) * D);
    acc_t* s = stage.data();
    acc_t dots[kGroup];
    for (int64_t n = n0; n < n1; ++n) {
      const acc_t* gn = widen(g + n * D, D, s + kGroup * D);
      const acc_t* r[kGroup];
      int64_t j = 0;
      for (; j + kGroup <= k; j += kGroup) {
        for (int q = 0; q < kGroup; ++q) {
          const int64_t i = checked_index(idx, n, j + q, k, M, "gather_dot", "rows of weight");
          r[q] = widen(w + i * D, D, s + q * D);
        }
        dot_group(gn, r, D, dots);
        for (int q = 0; q < kGroup; ++q) o[n * k + j + q] = static_cast<scalar_t>(dots[q]);
      }
      for (; j < k; ++j) {
        const int64_t i = checked_index(idx, n, j, k, M, "gather_dot", "rows of weight");
        r[0] = widen(w + i * D, D, s);
        dot_one(gn, r, D, dots);
        o[n * k + j] = static_cast<scalar_t>(dots[0]);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// sparse_t_matmul

template <typename scalar_t, typename index_t>
void sparse_t_matmul_kernel(const at::Tensor& coef, const at::Tensor& indices, const at::Tensor& rows,
                            int64_t M, at::Tensor& weight_grad, at::Tensor& coef_sum) {
  using acc_t = acc_type<scalar_t>;
  const int64_t N = rows.size(0), D = rows.size(1), k = indices.size(1);
  const acc_t* c = coef.data_ptr<acc_t>();
  const scalar_t* x = rows.data_ptr<scalar_t>();
  scalar_t* wg = weight_grad.data_ptr<scalar_t>();
  acc_t* cs = coef_sum.data_ptr<acc_t>();
  constexpr bool direct = std::is_same_v<acc_t, scalar_t>;

  std::vector<int64_t> offsets, positions;
  latent_csr(indices.data_ptr<index_t>(), N, k, M, "sparse_t_matmul", offsets, positions);
  const int64_t* off = offsets.data();
  const int64_t* pos = positions.data();

  // Latent counts are skewed (a few latents fire often), so split the latents into pieces of equal
  // work rather than equal count: latent i costs its entries plus one row written.
  const int64_t pieces = std::min<int64_t>(M, 16 * at::get_num_threads());
  const int64_t work = N * k + M;
  std::vector<int64_t> cut(pieces + 1, M);
  cut[0] = 0;
  for (int64_t q = 1; q < pieces; ++q) {
    const int64_t target = work * q / pieces;
    int64_t lo = cut[q - 1], hi = M;  // first latent i with off[i] + i >= target
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (off[mid] + mid >= target) hi = mid; else lo = mid + 1;
    }
    cut[q] = lo;
  }

  at::parallel_for(0, pieces, 1, [&](int64_t q0, int64_t q1) {
    std::vector<acc_t> acc_buf(direct ? 0 : D), stage(direct ? 0 : kGroup * D);
    acc_t* s = stage.data();
    for (int64_t i = cut[q0]; i < cut[q1]; ++i) {
      acc_t* acc = acc_buf.data();
      if constexpr (direct) acc = wg + i * D;
      std::fill(acc, acc + D, acc_t(0));
      acc_t sum = 0;
      const acc_t* r[kGroup];
      acc_t cq[kGroup];
      int64_t e = off[i];
      const int64_t end = off[i + 1];
      for (; e + kGroup <= end; e += kGroup) {
        for (int q = 0; q < kGroup; ++q) {
          const int64_t p = pos[e + q];
          cq[q] = c[p];
          sum += cq[q];
          r[q] = widen(x + (p / k) * D, D, s + q * D);
        }
        axpy_group(acc, r, cq, D);
      }
      for (; e < end; ++e) {
        const int64_t p = pos[e];
        cq[0] = c[p];
        sum += cq[0];
        r[0] = widen(x + (p / k) * D, D, s);
        axpy_one(acc, r, cq, D);
      }
      cs[i] = sum;
      if constexpr (!direct) narrow_store(acc, D, wg + i * D);
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// argument checks and dispatch

// indices must be an (N, k) int32/int64 matrix with the shape of `like`.
void check_indices(const char* op, const at::Tensor& indices, const char* like_name, const at::Tensor& like) {
  check_matrix(op, "indices", indices);
  check_index_dtype(op, "indices", indices);
  TORCH_CHECK(indices.sizes() == like.sizes(), op, ": indices must have the shape of ", like_name,
              " ", like.sizes(), ", got ", indices.sizes());
}

at::Tensor gather_sum_cpu(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias) {
  const char* op = "gather_sum";
  check_matrix(op, "values", values);
  check_float(op, "values", values);
  check_indices(op, indices, "values", values);
  check_matrix(op, "weight", weight);
  check_same_dtype(op, "weight", weight, "values", values);
  const int64_t D = weight.size(1);
  if (bias.has_value()) {
    check_vector(op, "bias", *bias, D, "D = weight.size(1)");
    check_float(op, "bias", *bias);
  }
  at::Tensor out = at::empty({values.size(0), D}, values.options());
  if (out.numel() == 0) return out;
  // The small operands are widened once; weight is read in place (a row at a time).
  const auto acc = acc_dtype(values.scalar_type());
  const at::Tensor v = values.to(acc).contiguous();
  c10::optional<at::Tensor> b;
  if (bias.has_value()) b = bias->to(acc).contiguous();
  const at::Tensor idx = indices.contiguous(), w = weight.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "gather_sum", [&] {
    if (idx.scalar_type() == at::kInt) {
      gather_sum_kernel<scalar_t, int32_t>(v, idx, w, b, out);
    } else {
      gather_sum_kernel<scalar_t, int64_t>(v, idx, w, b, out);
    }
  });
  return out;
}

at::Tensor gather_dot_cpu(const at::Tensor& grad, const at::Tensor& indices, const at::Tensor& weight) {
  const char* op = "gather_dot";
  check_matrix(op, "grad", grad);
  check_float(op, "grad", grad);
  check_matrix(op, "indices", indices);
  check_index_dtype(op, "indices", indices);
  TORCH_CHECK(indices.size(0) == grad.size(0), op, ": indices must have one row per row of grad (",
              grad.size(0), "), got shape ", indices.sizes());
  check_matrix(op, "weight", weight);
  check_same_dtype(op, "weight", weight, "grad", grad);
  TORCH_CHECK(weight.size(1) == grad.size(1), op, ": weight must be (M, D) with D = grad.size(1) = ",
              grad.size(1), ", got shape ", weight.sizes());
  at::Tensor out = at::empty({grad.size(0), indices.size(1)}, grad.options());
  if (out.numel() == 0) return out;
  const at::Tensor g = grad.contiguous(), idx = indices.contiguous(), w = weight.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "gather_dot", [&] {
    if (idx.scalar_type() == at::kInt) {
      gather_dot_kernel<scalar_t, int32_t>(g, idx, w, out);
    } else {
      gather_dot_kernel<scalar_t, int64_t>(g, idx, w, out);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sparse_t_matmul_cpu(const at::Tensor& coef, const at::Tensor& indices,
                                                       const at::Tensor& rows, int64_t num_latents) {
  const char* op = "sparse_t_matmul";
  check_matrix(op, "coef", coef);
  check_float(op, "coef", coef);
  check_indices(op, indices, "coef", coef);
  check_matrix(op, "rows", rows);
  check_float(op, "rows", rows);
  TORCH_CHECK(rows.size(0) == coef.size(0), op, ": rows must have one row per row of coef (",
              coef.size(0), "), got shape ", rows.sizes());
  TORCH_CHECK(num_latents >= 0, op, ": num_latents must be >= 0, got ", num_latents);
  const auto acc = acc_dtype(rows.scalar_type());
  at::Tensor weight_grad = at::empty({num_latents, rows.size(1)}, rows.options());
  at::Tensor coef_sum = at::empty({num_latents}, rows.options().dtype(acc));
  if (num_latents == 0) {
    TORCH_CHECK(indices.numel() == 0, op, ": indices must be empty when num_latents = 0");
    return {weight_grad, coef_sum};
  }
  const at::Tensor c = coef.to(acc).contiguous();
  const at::Tensor idx = indices.contiguous(), x = rows.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "sparse_t_matmul", [&] {
    if (idx.scalar_type() == at::kInt) {
      sparse_t_matmul_kernel<scalar_t, int32_t>(c, idx, x, num_latents, weight_grad, coef_sum);
    } else {
      sparse_t_matmul_kernel<scalar_t, int64_t>(c, idx, x, num_latents, weight_grad, coef_sum);
    }
  });
  return {weight_grad, coef_sum};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyinterp, CPU, m) {
  m.impl("gather_sum", &gather_sum_cpu);
  m.impl("gather_dot", &gather_dot_cpu);
  m.impl("sparse_t_matmul", &sparse_t_matmul_cpu);
}
