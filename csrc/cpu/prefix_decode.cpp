// CPU kernels of the Matryoshka prefix decode (docs/sae_family.md, "Matryoshka", "The prefix decode";
// schemas in csrc/bindings.cpp). Latent i lies in bucket b(i) = #{p : prefixes[p] <= i}, the first
// prefix that contains it; prefixes is strictly increasing with prefixes[P-1] = M.
//   prefix_decode_forward  out[p, n]  = sum_{j: b(idx[n,j]) <= p} values[n,j] * weight[idx[n,j]] (+ bias)
//   prefix_gather_dot      out[n, j]  = <grad_suffix[b(i), n], weight[i]>,              i = idx[n,j]
//   prefix_t_matmul        out[i]     = sum_{(n,j): idx[n,j]=i} coef[n,j] * grad_suffix[b(i), n]
// The forward is one pass per row: its entries are grouped by bucket (a counting sort of k entries)
// and added bucket by bucket into one accumulator that is stored at every prefix boundary. Everything
// accumulates in fp32 (float64 for float64 inputs); fp16/bf16 rows are widened into a per-thread buffer.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "sparse_rows.h"

namespace {

using namespace pyinterp::cpu;

struct Buckets {
  std::vector<int64_t> prefixes;
  int64_t of(int64_t latent) const {  // #{p : prefixes[p] <= latent}
    return std::upper_bound(prefixes.begin(), prefixes.end(), latent) - prefixes.begin();
  }
};

template <typename scalar_t>
void forward_kernel(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& weight,
                    const c10::optional<at::Tensor>& bias, const Buckets& buckets, at::Tensor& out) {
  using acc_t = acc_type<scalar_t>;
  const int64_t N = values.size(0), k = values.size(1), M = weight.size(0), D = weight.size(1);
  const int64_t P = static_cast<int64_t>(buckets.prefixes.size());
  const acc_t* v = values.data_ptr<acc_t>();
  const int32_t* idx = indices.data_ptr<int32_t>();
  const scalar_t* w = weight.data_ptr<scalar_t>();
  const acc_t* b = bias.has_value() ? bias->data_ptr<acc_t>() : nullptr;
  scalar_t* o = out.data_ptr<scalar_t>();

  at::parallel_for(0, N, row_grain(k * D + P * D), [&](int64_t n0, int64_t n1) {
    std::vector<acc_t> acc(D), stage(D);
    std::vector<int64_t> bucket(k), start(P + 1), cursor(P), order(k), latent(k);
    for (int64_t n = n0; n < n1; ++n) {
      std::fill(start.begin(), start.end(), 0);
      for (int64_t j = 0; j < k; ++j) {
        latent[j] = checked_index(idx, n, j, k, M, "prefix_decode_forward", "the number of latents, prefixes[-1]");
        bucket[j] = buckets.of(latent[j]);
        ++start[bucket[j] + 1];
      }
      for (int64_t p = 0; p < P; ++p) start[p + 1] += start[p];
      std::copy(start.begin(), start.end() - 1, cursor.begin());
      for (int64_t j = 0; j < k; ++j) order[cursor[bucket[j]]++] = j;  // stable: j order within a bucket
      if (b != nullptr) {
        std::copy(b, b + D, acc.begin());
      } else {
        std::fill(acc.begin(), acc.end(), acc_t(0));
      }
      for (int64_t p = 0; p < P; ++p) {
        for (int64_t e = start[p]; e < start[p + 1]; ++e) {
          const int64_t j = order[e];
          const acc_t c = v[n * k + j];
          const acc_t* row = widen(w + latent[j] * D, D, stage.data());
          axpy_one(acc.data(), &row, &c, D);
        }
        scalar_t* dst = o + (p * N + n) * D;  // the cumulative reconstruction of prefix p
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(acc[d]);
      }
    }
  });
}

template <typename scalar_t>
void gather_dot_kernel(const at::Tensor& grad, const at::Tensor& indices, const at::Tensor& weight,
                       const Buckets& buckets, at::Tensor& out) {
  using acc_t = acc_type<scalar_t>;
  const int64_t N = grad.size(1), D = grad.size(2), k = indices.size(1), M = weight.size(0);
  const scalar_t* g = grad.data_ptr<scalar_t>();
  const int32_t* idx = indices.data_ptr<int32_t>();
  const scalar_t* w = weight.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();

  at::parallel_for(0, N, row_grain(k * D), [&](int64_t n0, int64_t n1) {
    std::vector<acc_t> stage(2 * D);
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t j = 0; j < k; ++j) {
        const int64_t i = checked_index(idx, n, j, k, M, "prefix_gather_dot", "the number of latents, prefixes[-1]");
        const acc_t* gn = widen(g + (buckets.of(i) * N + n) * D, D, stage.data());
        const acc_t* row = widen(w + i * D, D, stage.data() + D);
        acc_t dot;
        dot_one(gn, &row, D, &dot);
        o[n * k + j] = static_cast<scalar_t>(dot);
      }
    }
  });
}

template <typename scalar_t>
void t_matmul_kernel(const at::Tensor& coef, const at::Tensor& indices, const at::Tensor& grad,
                     const Buckets& buckets, at::Tensor& out) {
  using acc_t = acc_type<scalar_t>;
  const int64_t N = coef.size(0), k = coef.size(1), D = grad.size(2), M = out.size(0);
  const acc_t* c = coef.data_ptr<acc_t>();
  const int32_t* idx = indices.data_ptr<int32_t>();
  const scalar_t* g = grad.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();

  std::vector<int64_t> offsets, positions;
  latent_csr(idx, N, k, M, "prefix_t_matmul", offsets, positions);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, (N * k / std::max<int64_t>(M, 1) + 1) * D));
  at::parallel_for(0, M, grain, [&](int64_t i0, int64_t i1) {
    std::vector<acc_t> acc(D), stage(D);
    for (int64_t i = i0; i < i1; ++i) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      const scalar_t* rows = g + buckets.of(i) * N * D;  // latent i sees the suffix sum of its bucket
      for (int64_t e = offsets[i]; e < offsets[i + 1]; ++e) {
        const int64_t p = positions[e];
        const acc_t cp = c[p];
        const acc_t* row = widen(rows + (p / k) * D, D, stage.data());
        axpy_one(acc.data(), &row, &cp, D);
      }
      for (int64_t d = 0; d < D; ++d) o[i * D + d] = static_cast<scalar_t>(acc[d]);
    }
  });
}

// prefixes: strictly increasing, >= 1; the last is the number of latents M (the public op checks
// this with the argument's name; here it guards the kernels).
Buckets check_prefixes(const char* op, at::IntArrayRef prefixes, int64_t M) {
  TORCH_CHECK(!prefixes.empty(), op, ": prefixes must not be empty");
  for (size_t p = 0; p < prefixes.size(); ++p) {
    TORCH_CHECK(prefixes[p] >= 1 && (p == 0 || prefixes[p] > prefixes[p - 1]), op,
                ": prefixes must be strictly increasing positive sizes, got ", prefixes);
  }
  TORCH_CHECK(prefixes.back() == M, op, ": prefixes[-1] must be the number of latents ", M, ", got ",
              prefixes.back());
  return Buckets{std::vector<int64_t>(prefixes.begin(), prefixes.end())};
}

void check_codes(const char* op, const at::Tensor& indices, int64_t rows) {
  check_matrix(op, "indices", indices);
  TORCH_CHECK(indices.scalar_type() == at::kInt, op, ": indices must be int32, got ", indices.scalar_type());
  TORCH_CHECK(indices.size(0) == rows, op, ": indices must have ", rows, " rows, got shape ", indices.sizes());
}

// grad_suffix: (P, N, D) in weight's dtype.
void check_suffix(const char* op, const at::Tensor& grad, const at::Tensor& weight, int64_t P) {
  check_cpu(op, "grad_suffix", grad);
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == P && grad.size(2) == weight.size(1), op,
              ": grad_suffix must be (P, N, D) with P = len(prefixes) = ", P, " and D = ", weight.size(1),
              ", got shape ", grad.sizes());
  check_same_dtype(op, "grad_suffix", grad, "weight", weight);
}

at::Tensor prefix_decode_forward_cpu(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& weight,
                                     const c10::optional<at::Tensor>& bias, at::IntArrayRef prefixes) {
  const char* op = "prefix_decode_forward";
  check_matrix(op, "values", values);
  check_float(op, "values", values);
  check_codes(op, indices, values.size(0));
  TORCH_CHECK(indices.sizes() == values.sizes(), op, ": indices must have the shape of values ",
              values.sizes(), ", got ", indices.sizes());
  check_matrix(op, "weight", weight);
  check_same_dtype(op, "weight", weight, "values", values);
  const Buckets buckets = check_prefixes(op, prefixes, weight.size(0));
  const int64_t P = static_cast<int64_t>(prefixes.size()), D = weight.size(1);
  if (bias.has_value()) {
    check_vector(op, "bias", *bias, D, "D = weight.size(1)");
    check_same_dtype(op, "bias", *bias, "values", values);
  }
  at::Tensor out = at::empty({P, values.size(0), D}, values.options());
  if (out.numel() == 0) return out;
  const auto acc = acc_dtype(values.scalar_type());
  const at::Tensor v = values.to(acc).contiguous(), idx = indices.contiguous(), w = weight.contiguous();
  c10::optional<at::Tensor> b;
  if (bias.has_value()) b = bias->to(acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "prefix_decode_forward", [&] {
    forward_kernel<scalar_t>(v, idx, w, b, buckets, out);
  });
  return out;
}

at::Tensor prefix_gather_dot_cpu(const at::Tensor& grad_suffix, const at::Tensor& indices, const at::Tensor& weight,
                                 at::IntArrayRef prefixes) {
  const char* op = "prefix_gather_dot";
  check_matrix(op, "weight", weight);
  check_float(op, "weight", weight);
  const Buckets buckets = check_prefixes(op, prefixes, weight.size(0));
  check_suffix(op, grad_suffix, weight, static_cast<int64_t>(prefixes.size()));
  check_codes(op, indices, grad_suffix.size(1));
  at::Tensor out = at::empty(indices.sizes(), grad_suffix.options());
  if (out.numel() == 0) return out;
  if (weight.size(1) == 0) return out.zero_();
  const at::Tensor g = grad_suffix.contiguous(), idx = indices.contiguous(), w = weight.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "prefix_gather_dot", [&] {
    gather_dot_kernel<scalar_t>(g, idx, w, buckets, out);
  });
  return out;
}

at::Tensor prefix_t_matmul_cpu(const at::Tensor& coef, const at::Tensor& indices, const at::Tensor& grad_suffix,
                               at::IntArrayRef prefixes) {
  const char* op = "prefix_t_matmul";
  check_matrix(op, "coef", coef);
  check_float(op, "coef", coef);
  check_codes(op, indices, coef.size(0));
  TORCH_CHECK(indices.sizes() == coef.sizes(), op, ": indices must have the shape of coef ", coef.sizes(),
              ", got ", indices.sizes());
  TORCH_CHECK(!prefixes.empty(), op, ": prefixes must not be empty");
  const int64_t M = prefixes.back();
  at::Tensor out = at::empty({M, grad_suffix.dim() == 3 ? grad_suffix.size(2) : 0}, grad_suffix.options());
  const Buckets buckets = check_prefixes(op, prefixes, M);
  check_suffix(op, grad_suffix, out, static_cast<int64_t>(prefixes.size()));
  TORCH_CHECK(grad_suffix.size(1) == coef.size(0), op, ": grad_suffix must have one row per row of coef (",
              coef.size(0), "), got shape ", grad_suffix.sizes());
  if (out.numel() == 0) return out;
  const auto acc = acc_dtype(grad_suffix.scalar_type());
  const at::Tensor c = coef.to(acc).contiguous(), idx = indices.contiguous(), g = grad_suffix.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_suffix.scalar_type(), "prefix_t_matmul", [&] {
    t_matmul_kernel<scalar_t>(c, idx, g, buckets, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyinterp, CPU, m) {
  m.impl("prefix_decode_forward", &prefix_decode_forward_cpu);
  m.impl("prefix_gather_dot", &prefix_gather_dot_cpu);
  m.impl("prefix_t_matmul", &prefix_t_matmul_cpu);
}
