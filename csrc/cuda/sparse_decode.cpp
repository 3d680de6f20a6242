// CUDA implementations of pyinterp::gather_sum, gather_dot and sparse_t_matmul (schemas in
// csrc/bindings.cpp; kernels in kernels/cuda/sparse_decode.cu), on LibTorch's stable ABI.
#include <tuple>

#include "stable_glue.h"
#include "sparse_decode.cuh"

namespace {

using namespace pyinterp::glue;

Tensor gather_sum_cuda(Tensor values, Tensor indices, Tensor weight, std::optional<Tensor> bias) {
  const char* op = "gather_sum";
  check_tensor(op, "values", values, 2);
  dispatch_float(op, "values", values, [](auto) {});
  check_indices(op, indices, values, "values");
  check_tensor(op, "weight", weight, 2, &values);
  check_dtype(op, "weight", weight, values.scalar_type());
  const int64_t N = values.size(0), k = values.size(1), M = weight.size(0), D = weight.size(1);
  if (bias) {
    check_tensor(op, "bias", *bias, 1, &values);
    check_dtype(op, "bias", *bias, values.scalar_type());
    check_size(op, "bias", *bias, 0, D, "weight.shape[1]");
  }
  torch::stable::accelerator::DeviceGuard guard(values.get_device_index());
  const cudaStream_t stream = current_stream(values.get_device_index());
  values = torch::stable::contiguous(values);
  indices = torch::stable::contiguous(indices);
  weight = torch::stable::contiguous(weight);
  if (bias) bias = torch::stable::contiguous(*bias);
  Tensor out = torch::stable::new_empty(values, {N, D});
  dispatch_float(op, "values", values, [&](auto tag) {
    using T = decltype(tag);
    check_cuda(pyinterp::cuda::gather_sum<T>(const_ptr<T>(values), const_ptr<int32_t>(indices),
                                             const_ptr<T>(weight), bias ? const_ptr<T>(*bias) : nullptr,
                                             N, k, M, D, mutable_ptr<T>(out), stream),
               op);
  });
  return out;
}

Tensor gather_dot_cuda(Tensor grad, Tensor indices, Tensor weight) {
  const char* op = "gather_dot";
  check_tensor(op, "grad", grad, 2);
  dispatch_float(op, "grad", grad, [](auto) {});
  check_tensor(op, "indices", indices, 2, &grad);
  check_dtype(op, "indices", indices, ScalarType::Int);
  check_size(op, "indices", indices, 0, grad.size(0), "grad.shape[0], one row per row of grad");
  check_tensor(op, "weight", weight, 2, &grad);
  check_dtype(op, "weight", weight, grad.scalar_type());
  check_size(op, "weight", weight, 1, grad.size(1), "grad.shape[1]");
  const int64_t N = grad.size(0), D = grad.size(1), k = indices.size(1), M = weight.size(0);
  torch::stable::accelerator::DeviceGuard guard(grad.get_device_index());
  const cudaStream_t stream = current_stream(grad.get_device_index());
  grad = torch::stable::contiguous(grad);
  indices = torch::stable::contiguous(indices);
  weight = torch::stable::contiguous(weight);
  Tensor out = torch::stable::new_empty(grad, {N, k});
  dispatch_float(op, "grad", grad, [&](auto tag) {
    using T = decltype(tag);
    check_cuda(pyinterp::cuda::gather_dot<T>(const_ptr<T>(grad), const_ptr<int32_t>(indices),
                                             const_ptr<T>(weight), N, k, M, D, mutable_ptr<T>(out),
                                             stream),
               op);
  });
  return out;
}

std::tuple<Tensor, Tensor> sparse_t_matmul_cuda(Tensor coef, Tensor indices, Tensor rows,
                                                int64_t num_latents) {
  const char* op = "sparse_t_matmul";
  check_tensor(op, "rows", rows, 2);
  dispatch_float(op, "rows", rows, [](auto) {});
  check_tensor(op, "coef", coef, 2, &rows);
  check_dtype(op, "coef", coef, rows.scalar_type());
  check_size(op, "coef", coef, 0, rows.size(0), "rows.shape[0], one row of coefficients per row");
  check_indices(op, indices, coef, "coef");
  STD_TORCH_CHECK(num_latents >= 0 && num_latents <= INT32_MAX, op,
                  ": num_latents must be in [0, 2^31-1] (int32 indices), got ", num_latents);
  const int64_t N = rows.size(0), D = rows.size(1), k = coef.size(1), M = num_latents;
  torch::stable::accelerator::DeviceGuard guard(rows.get_device_index());
  const cudaStream_t stream = current_stream(rows.get_device_index());
  Tensor weight_grad = torch::stable::new_empty(rows, {M, D});
  Tensor coef_sum = torch::stable::new_empty(rows, {M}, ScalarType::Float);
  if (M == 0) return {weight_grad, coef_sum};
  coef = torch::stable::contiguous(coef);
  indices = torch::stable::contiguous(indices);
  rows = torch::stable::contiguous(rows);
  dispatch_float(op, "rows", rows, [&](auto tag) {
    using T = decltype(tag);
    size_t bytes = 0;
    check_cuda(pyinterp::cuda::sparse_t_matmul_workspace_bytes<T>(N, k, M, D, &bytes), op);
    Tensor scratch = workspace(rows, bytes);
    check_cuda(pyinterp::cuda::sparse_t_matmul<T>(const_ptr<T>(coef), const_ptr<int32_t>(indices),
                                                  const_ptr<T>(rows), N, k, M, D,
                                                  mutable_ptr<T>(weight_grad),
                                                  mutable_ptr<float>(coef_sum),
                                                  scratch.mutable_data_ptr(), bytes, stream),
               op);
  });
  return {weight_grad, coef_sum};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(pyinterp, CUDA, m) {
  m.impl("gather_sum", TORCH_BOX(&gather_sum_cuda));
  m.impl("gather_dot", TORCH_BOX(&gather_dot_cuda));
  m.impl("sparse_t_matmul", TORCH_BOX(&sparse_t_matmul_cuda));
}
