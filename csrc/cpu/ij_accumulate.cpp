// ij_accumulate_ on CPU: one chunk of quadrature nodes of the integrated Jacobian, added in place
// (schema and shapes in csrc/bindings.cpp; math in pyinterp/reference/ij_accumulate.py).
// Each worker owns whole (e, s) rows: it sums the K weighted gradient rows into a D-long buffer in the
// accumulator dtype, dots it with delta[s] into P[e, s] and, when asked, adds it to Jbar[e, s].
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"

namespace {

template <typename in_t, typename acc_t>
void accumulate_rows(const in_t* grads, const acc_t* weights, const acc_t* delta, acc_t* P, acc_t* Jbar,
                     int64_t num_nodes, int64_t rows, int64_t tokens, int64_t width) {
  // About 64k gradient elements per task: enough work to amortise a task, small enough to balance.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, num_nodes * width));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> jrow(width);
    for (int64_t row = begin; row < end; ++row) {
      std::fill(jrow.begin(), jrow.end(), acc_t(0));
      for (int64_t k = 0; k < num_nodes; ++k) {
        const in_t* g = grads + (k * rows + row) * width;
        const acc_t w = weights[k];
        for (int64_t d = 0; d < width; ++d) {
          jrow[d] += w * static_cast<acc_t>(g[d]);
        }
      }
      const acc_t* delta_row = delta + (row % tokens) * width;
      acc_t p = 0;
      for (int64_t d = 0; d < width; ++d) {
        p += jrow[d] * delta_row[d];
      }
      P[row] += p;
      if (Jbar != nullptr) {
        acc_t* jbar_row = Jbar + row * width;
        for (int64_t d = 0; d < width; ++d) {
          jbar_row[d] += jrow[d];
        }
      }
    }
  });
}

void ij_accumulate_cpu(at::Tensor& P, const std::optional<at::Tensor>& Jbar, const at::Tensor& grads,
                       const at::Tensor& weights, const at::Tensor& delta) {
  TORCH_CHECK(grads.dim() == 4, "ij_accumulate_: grads must be (K, E, S, D), got ", grads.sizes());
  const int64_t K = grads.size(0), E = grads.size(1), S = grads.size(2), D = grads.size(3);
  const auto acc = pyinterp::cpu::acc_dtype(grads.scalar_type());
  TORCH_CHECK(P.scalar_type() == acc, "ij_accumulate_: P must be ", acc, " for ", grads.scalar_type(),
              " grads, got ", P.scalar_type());
  TORCH_CHECK(P.sizes() == at::IntArrayRef({E, S}) && P.is_contiguous(),
              "ij_accumulate_: P must be contiguous (E, S) = (", E, ", ", S, "), got ", P.sizes());
  TORCH_CHECK(weights.scalar_type() == acc && weights.dim() == 1 && weights.size(0) == K,
              "ij_accumulate_: weights must be (K,) = (", K, ",) in P's dtype");
  TORCH_CHECK(delta.scalar_type() == acc && delta.sizes() == at::IntArrayRef({S, D}),
              "ij_accumulate_: delta must be (S, D) = (", S, ", ", D, ") in P's dtype");
  const bool write_jbar = Jbar.has_value() && Jbar->defined();
  if (write_jbar) {
    TORCH_CHECK(Jbar->scalar_type() == acc && Jbar->sizes() == at::IntArrayRef({E, S, D}) &&
                    Jbar->is_contiguous(),
                "ij_accumulate_: Jbar must be contiguous (E, S, D) in P's dtype, got ", Jbar->sizes());
  }
  if (P.numel() == 0 || K == 0) {
    return;
  }
  const at::Tensor grads_c = grads.contiguous();
  const at::Tensor weights_c = weights.contiguous();
  const at::Tensor delta_c = delta.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads.scalar_type(), "ij_accumulate_cpu", [&] {
    using in_t = scalar_t;
    auto run = [&](auto acc_tag) {
      using acc_t = decltype(acc_tag);
      accumulate_rows<in_t, acc_t>(grads_c.const_data_ptr<in_t>(), weights_c.const_data_ptr<acc_t>(),
                                   delta_c.const_data_ptr<acc_t>(), P.mutable_data_ptr<acc_t>(),
                                   write_jbar ? Jbar->mutable_data_ptr<acc_t>() : nullptr, K, E * S, S, D);
    };
    if (acc == at::kDouble) {
      run(double{});
    } else {
      run(float{});
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pyinterp, CPU, m) {
  m.impl("ij_accumulate_", &ij_accumulate_cpu);
}
