// CUDA glue of ij_accumulate_ (schema in csrc/bindings.cpp, kernel in kernels/cuda/ij_accumulate.cu).
// LibTorch stable ABI only, so that it builds against the CPU wheel and loads into torch >= 2.11.
#include "stable_glue.h"
#include "ij_accumulate.cuh"

namespace {

using namespace pyinterp::glue;
using pyinterp::cuda::GradDtype;

constexpr const char* kOp = "ij_accumulate_";

GradDtype grad_dtype(ScalarType type) {
  switch (type) {
    case ScalarType::Float: return GradDtype::kFloat32;
    case ScalarType::Half: return GradDtype::kFloat16;
    case ScalarType::BFloat16: return GradDtype::kBFloat16;
    case ScalarType::Double: return GradDtype::kFloat64;
    default:
      STD_TORCH_CHECK(false, kOp, ": grads must be float32, float16, bfloat16 or float64, got ",
                      torch::headeronly::toString(type));
  }
  return GradDtype::kFloat32;
}

// A contiguous `dims`-D operand in the accumulator dtype, on grads' device.
void check_operand(const char* name, const Tensor& t, ScalarType acc, int64_t dims, const Tensor& grads) {
  check_tensor(kOp, name, t, dims, &grads);
  check_dtype(kOp, name, t, acc);
  check_contiguous(kOp, name, t);
}

void ij_accumulate_cuda(Tensor P, std::optional<Tensor> Jbar, Tensor grads, Tensor weights, Tensor delta) {
  check_tensor(kOp, "grads", grads, 4);
  check_contiguous(kOp, "grads", grads);
  const int64_t K = grads.size(0), E = grads.size(1), S = grads.size(2), D = grads.size(3);
  const GradDtype dtype = grad_dtype(grads.scalar_type());
  const ScalarType acc = dtype == GradDtype::kFloat64 ? ScalarType::Double : ScalarType::Float;
  check_operand("P", P, acc, 2, grads);
  check_operand("weights", weights, acc, 1, grads);
  check_operand("delta", delta, acc, 2, grads);
  check_size(kOp, "P", P, 0, E, "grads.shape[1]");
  check_size(kOp, "P", P, 1, S, "grads.shape[2]");
  check_size(kOp, "weights", weights, 0, K, "grads.shape[0], one weight per node");
  check_size(kOp, "delta", delta, 0, S, "grads.shape[2]");
  check_size(kOp, "delta", delta, 1, D, "grads.shape[3]");
  void* jbar_ptr = nullptr;
  if (Jbar.has_value()) {
    check_operand("Jbar", *Jbar, acc, 3, grads);
    check_size(kOp, "Jbar", *Jbar, 0, E, "grads.shape[1]");
    check_size(kOp, "Jbar", *Jbar, 1, S, "grads.shape[2]");
    check_size(kOp, "Jbar", *Jbar, 2, D, "grads.shape[3]");
    jbar_ptr = Jbar->mutable_data_ptr();
  }
  const int32_t device = grads.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  check_cuda(pyinterp::cuda::ij_accumulate(grads.const_data_ptr(), dtype, weights.const_data_ptr(),
                                           delta.const_data_ptr(), P.mutable_data_ptr(), jbar_ptr, K,
                                           E * S, S, D, current_stream(device)),
             kOp);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(pyinterp, CUDA, m) {
  m.impl("ij_accumulate_", TORCH_BOX(&ij_accumulate_cuda));
}
