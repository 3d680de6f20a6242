// CUDA implementations of pyinterp::prefix_decode_forward, prefix_gather_dot and prefix_t_matmul
// (schemas in csrc/bindings.cpp; kernels in kernels/cuda/prefix_decode.cu), on LibTorch's stable ABI.
#include <vector>

#include "prefix_decode.cuh"
#include "stable_glue.h"

namespace {

using namespace pyinterp::glue;

// prefixes: 1..kMaxPrefixes strictly increasing sizes >= 1 whose last is the number of latents M
// (the public op checks this with the argument's name; here it guards the kernels).
void check_prefixes(const char* op, const std::vector<int64_t>& prefixes, int64_t M, const char* M_name) {
  const int64_t P = static_cast<int64_t>(prefixes.size());
  STD_TORCH_CHECK(P >= 1 && P <= pyinterp::cuda::kMaxPrefixes, op, ": prefixes must hold 1 to ",
                  pyinterp::cuda::kMaxPrefixes, " sizes on CUDA (they travel as a launch argument), got ", P,
                  " (backend='triton' takes any number)");
  for (int64_t p = 0; p < P; ++p)
    STD_TORCH_CHECK(prefixes[p] >= 1 && (p == 0 || prefixes[p] > prefixes[p - 1]), op,
                    ": prefixes must be strictly increasing positive sizes, got prefixes[", p, "] = ", prefixes[p]);
  STD_TORCH_CHECK(prefixes.back() == M && M <= INT32_MAX, op, ": prefixes[-1] must be ", M_name, " = ", M,
                  " (int32 indices), got ", prefixes.back());
}

// grad_suffix (P, N, D) in `dtype`, on like's device.
void check_suffix(const char* op, const Tensor& grad_suffix, const Tensor& like, int64_t P, int64_t N) {
  check_tensor(op, "grad_suffix", grad_suffix, 3, &like);
  check_dtype(op, "grad_suffix", grad_suffix, like.scalar_type());
  check_size(op, "grad_suffix", grad_suffix, 0, P, "len(prefixes)");
  check_size(op, "grad_suffix", grad_suffix, 1, N, "one row per row of indices");
}

Tensor prefix_decode_forward_cuda(Tensor values, Tensor indices, Tensor weight, std::optional<Tensor> bias,
                                  std::vector<int64_t> prefixes) {
  const char* op = "prefix_decode_forward";
  check_tensor(op, "values", values, 2);
  dispatch_float(op, "values", values, [](auto) {});
  check_indices(op, indices, values, "values");
  check_tensor(op, "weight", weight, 2, &values);
  check_dtype(op, "weight", weight, values.scalar_type());
  const int64_t N = values.size(0), k = values.size(1), M = weight.size(0), D = weight.size(1);
  const int64_t P = static_cast<int64_t>(prefixes.size());
  check_prefixes(op, prefixes, M, "weight.shape[0]");
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
  Tensor out = torch::stable::new_empty(values, {P, N, D});
  dispatch_float(op, "values", values, [&](auto tag) {
    using T = decltype(tag);
    check_cuda(pyinterp::cuda::prefix_decode_forward<T>(
                   const_ptr<T>(values), const_ptr<int32_t>(indices), const_ptr<T>(weight),
                   bias ? const_ptr<T>(*bias) : nullptr, prefixes.data(), P, N, k, D, mutable_ptr<T>(out), stream),
               op);
  });
  return out;
}

Tensor prefix_gather_dot_cuda(Tensor grad_suffix, Tensor indices, Tensor weight, std::vector<int64_t> prefixes) {
  const char* op = "prefix_gather_dot";
  check_tensor(op, "weight", weight, 2);
  dispatch_float(op, "weight", weight, [](auto) {});
  const int64_t M = weight.size(0), D = weight.size(1), P = static_cast<int64_t>(prefixes.size());
  check_prefixes(op, prefixes, M, "weight.shape[0]");
  check_tensor(op, "indices", indices, 2, &weight);
  check_dtype(op, "indices", indices, ScalarType::Int);
  const int64_t N = indices.size(0), k = indices.size(1);
  check_suffix(op, grad_suffix, weight, P, N);
  check_size(op, "grad_suffix", grad_suffix, 2, D, "weight.shape[1]");
  torch::stable::accelerator::DeviceGuard guard(weight.get_device_index());
  const cudaStream_t stream = current_stream(weight.get_device_index());
  grad_suffix = torch::stable::contiguous(grad_suffix);
  indices = torch::stable::contiguous(indices);
  weight = torch::stable::contiguous(weight);
  Tensor out = torch::stable::new_empty(grad_suffix, {N, k});
  dispatch_float(op, "weight", weight, [&](auto tag) {
    using T = decltype(tag);
    check_cuda(pyinterp::cuda::prefix_gather_dot<T>(const_ptr<T>(grad_suffix), const_ptr<int32_t>(indices),
                                                    const_ptr<T>(weight), prefixes.data(), P, N, k, D,
                                                    mutable_ptr<T>(out), stream),
               op);
  });
  return out;
}

Tensor prefix_t_matmul_cuda(Tensor coef, Tensor indices, Tensor grad_suffix, std::vector<int64_t> prefixes) {
  const char* op = "prefix_t_matmul";
  check_tensor(op, "coef", coef, 2);
  dispatch_float(op, "coef", coef, [](auto) {});
  check_indices(op, indices, coef, "coef");
  STD_TORCH_CHECK(!prefixes.empty(), op, ": prefixes must not be empty");
  const int64_t M = prefixes.back(), P = static_cast<int64_t>(prefixes.size());
  check_prefixes(op, prefixes, M, "the number of latents");
  const int64_t N = coef.size(0), k = coef.size(1);
  check_suffix(op, grad_suffix, coef, P, N);
  const int64_t D = grad_suffix.size(2);
  torch::stable::accelerator::DeviceGuard guard(coef.get_device_index());
  const cudaStream_t stream = current_stream(coef.get_device_index());
  coef = torch::stable::contiguous(coef);
  indices = torch::stable::contiguous(indices);
  grad_suffix = torch::stable::contiguous(grad_suffix);
  Tensor weight_grad = torch::stable::new_empty(grad_suffix, {M, D});
  dispatch_float(op, "coef", coef, [&](auto tag) {
    using T = decltype(tag);
    size_t bytes = 0;
    check_cuda(pyinterp::cuda::prefix_t_matmul_workspace_bytes<T>(N, k, M, D, &bytes), op);
    Tensor scratch = workspace(coef, bytes);
    check_cuda(pyinterp::cuda::prefix_t_matmul<T>(const_ptr<T>(coef), const_ptr<int32_t>(indices),
                                                  const_ptr<T>(grad_suffix), prefixes.data(), P, N, k, D,
                                                  mutable_ptr<T>(weight_grad), scratch.mutable_data_ptr(), bytes,
                                                  stream),
               op);
  });
  return weight_grad;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(pyinterp, CUDA, m) {
  m.impl("prefix_decode_forward", TORCH_BOX(&prefix_decode_forward_cuda));
  m.impl("prefix_gather_dot", TORCH_BOX(&prefix_gather_dot_cuda));
  m.impl("prefix_t_matmul", TORCH_BOX(&prefix_t_matmul_cuda));
}
