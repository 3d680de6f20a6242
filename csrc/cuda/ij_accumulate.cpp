// CUDA glue of ij_accumulate_ (schema in csrc/bindings.cpp, kernel in kernels/cuda/ij_accumulate.cu).
// LibTorch stable ABI only, so that it builds against the CPU wheel and loads into torch >= 2.11.
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <optional>

#include "cuda/stable_cuda.h"
#include "ij_accumulate.cuh"

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

pyinterp_cuda::GradDtype grad_dtype(ScalarType type) {
  switch (type) {
    case ScalarType::Float: return pyinterp_cuda::GradDtype::kFloat32;
    case ScalarType::Half: return pyinterp_cuda::GradDtype::kFloat16;
    case ScalarType::BFloat16: return pyinterp_cuda::GradDtype::kBFloat16;
    case ScalarType::Double: return pyinterp_cuda::GradDtype::kFloat64;
    default: STD_TORCH_CHECK(false, "ij_accumulate_: grads must be float32, float16, bfloat16 or float64");
  }
  return pyinterp_cuda::GradDtype::kFloat32;
}

void check_operand(const Tensor& t, const char* name, ScalarType acc, int64_t dims, const Tensor& grads) {
  STD_TORCH_CHECK(t.is_cuda() && t.get_device_index() == grads.get_device_index(),
                  "ij_accumulate_: ", name, " must be on grads' CUDA device");
  STD_TORCH_CHECK(t.scalar_type() == acc, "ij_accumulate_: ", name, " must be in the accumulator dtype");
  STD_TORCH_CHECK(t.dim() == dims && t.is_contiguous(), "ij_accumulate_: ", name, " must be a contiguous ",
                  dims, "-D tensor");
}

void ij_accumulate_cuda(Tensor P, std::optional<Tensor> Jbar, Tensor grads, Tensor weights, Tensor delta) {
  STD_TORCH_CHECK(grads.is_cuda() && grads.dim() == 4 && grads.is_contiguous(),
                  "ij_accumulate_: grads must be a contiguous (K, E, S, D) CUDA tensor");
  const int64_t K = grads.size(0), E = grads.size(1), S = grads.size(2), D = grads.size(3);
  const auto dtype = grad_dtype(grads.scalar_type());
  const ScalarType acc = dtype == pyinterp_cuda::GradDtype::kFloat64 ? ScalarType::Double : ScalarType::Float;
  check_operand(P, "P", acc, 2, grads);
  check_operand(weights, "weights", acc, 1, grads);
  check_operand(delta, "delta", acc, 2, grads);
  STD_TORCH_CHECK(P.size(0) == E && P.size(1) == S, "ij_accumulate_: P must be (E, S)");
  STD_TORCH_CHECK(weights.size(0) == K, "ij_accumulate_: weights must be (K,)");
  STD_TORCH_CHECK(delta.size(0) == S && delta.size(1) == D, "ij_accumulate_: delta must be (S, D)");
  void* jbar_ptr = nullptr;
  if (Jbar.has_value()) {
    check_operand(*Jbar, "Jbar", acc, 3, grads);
    STD_TORCH_CHECK(Jbar->size(0) == E && Jbar->size(1) == S && Jbar->size(2) == D,
                    "ij_accumulate_: Jbar must be (E, S, D)");
    jbar_ptr = Jbar->mutable_data_ptr();
  }
  const int32_t device = grads.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  pyinterp_stable::check_cuda(
      pyinterp_cuda::ij_accumulate_launch(grads.const_data_ptr(), dtype, weights.const_data_ptr(),
                                          delta.const_data_ptr(), P.mutable_data_ptr(), jbar_ptr, K, E * S,
                                          S, D, pyinterp_stable::current_cuda_stream(device)),
      "ij_accumulate_ kernel launch");
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(pyinterp, CUDA, m) {
  m.impl("ij_accumulate_", TORCH_BOX(&ij_accumulate_cuda));
}
