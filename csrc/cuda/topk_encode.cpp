// CUDA implementation of pyinterp::topk_encode_forward (schema in csrc/bindings.cpp; kernels in
// kernels/cuda/topk_encode.cu), on LibTorch's stable ABI.
#include <tuple>

#include "stable_glue.h"
#include "topk_encode.cuh"

namespace {

using namespace pyinterp::glue;

std::tuple<Tensor, Tensor, Tensor, Tensor> topk_encode_forward_cuda(
    Tensor x, Tensor W_enc, std::optional<Tensor> b_enc, std::optional<Tensor> b_dec, int64_t k,
    std::optional<Tensor> dead_mask, int64_t k_aux) {
  const char* op = "topk_encode_forward";
  check_tensor(op, "x", x, 2);
  check_tensor(op, "W_enc", W_enc, 2, &x);
  dispatch_float(op, "x", x, [](auto) {});
  check_dtype(op, "W_enc", W_enc, x.scalar_type());
  const int64_t N = x.size(0), D = x.size(1), M = W_enc.size(0);
  check_size(op, "W_enc", W_enc, 1, D, "x.shape[1], the model width");
  STD_TORCH_CHECK(M >= 1 && M <= INT32_MAX, op, ": W_enc must have between 1 and 2^31-1 rows "
                  "(latents, indexed by int32), got ", M);
  STD_TORCH_CHECK(k >= 1 && k <= M, op, ": k must satisfy 1 <= k <= number of latents (", M,
                  "), got ", k);
  STD_TORCH_CHECK(k_aux >= 0 && k_aux <= M, op, ": k_aux must satisfy 0 <= k_aux <= number of "
                  "latents (", M, "), got ", k_aux);
  STD_TORCH_CHECK(k_aux == 0 || dead_mask.has_value(), op, ": k_aux=", k_aux,
                  " needs dead_mask (which latents are dead)");
  if (b_enc) {
    check_tensor(op, "b_enc", *b_enc, 1, &x);
    check_dtype(op, "b_enc", *b_enc, x.scalar_type());
    check_size(op, "b_enc", *b_enc, 0, M, "one bias per latent, W_enc.shape[0]");
  }
  if (b_dec) {
    check_tensor(op, "b_dec", *b_dec, 1, &x);
    check_dtype(op, "b_dec", *b_dec, x.scalar_type());
    check_size(op, "b_dec", *b_dec, 0, D, "x.shape[1]");
  }
  if (dead_mask) {
    check_tensor(op, "dead_mask", *dead_mask, 1, &x);
    check_dtype(op, "dead_mask", *dead_mask, ScalarType::Bool);
    check_size(op, "dead_mask", *dead_mask, 0, M, "one flag per latent");
  }

  torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  const cudaStream_t stream = current_stream(x.get_device_index());
  x = torch::stable::contiguous(x);
  W_enc = torch::stable::contiguous(W_enc);
  if (b_enc) b_enc = torch::stable::contiguous(*b_enc);
  if (b_dec) b_dec = torch::stable::contiguous(*b_dec);
  const bool with_aux = k_aux > 0;
  if (with_aux) dead_mask = torch::stable::contiguous(*dead_mask);

  Tensor values = torch::stable::new_empty(x, {N, k});
  Tensor indices = torch::stable::new_empty(x, {N, k}, ScalarType::Int);
  Tensor aux_values = torch::stable::new_empty(x, {N, k_aux});
  Tensor aux_indices = torch::stable::new_empty(x, {N, k_aux}, ScalarType::Int);
  dispatch_float(op, "x", x, [&](auto tag) {
    using T = decltype(tag);
    pyinterp::cuda::TopkEncodeArgs<T> args;
    args.x = const_ptr<T>(x);
    args.W_enc = const_ptr<T>(W_enc);
    args.b_enc = b_enc ? const_ptr<T>(*b_enc) : nullptr;
    args.b_dec = b_dec ? const_ptr<T>(*b_dec) : nullptr;
    args.dead_mask = with_aux ? const_ptr<bool>(*dead_mask) : nullptr;
    args.values = mutable_ptr<T>(values);
    args.indices = mutable_ptr<int32_t>(indices);
    args.aux_values = with_aux ? mutable_ptr<T>(aux_values) : nullptr;
    args.aux_indices = with_aux ? mutable_ptr<int32_t>(aux_indices) : nullptr;
    args.N = N;
    args.D = D;
    args.M = M;
    args.k = k;
    args.k_aux = k_aux;
    size_t bytes = 0;
    check_cuda(pyinterp::cuda::topk_encode_forward_workspace_bytes(args, &bytes), op);
    Tensor scratch = workspace(x, bytes);
    check_cuda(pyinterp::cuda::topk_encode_forward(args, scratch.mutable_data_ptr(), bytes, stream), op);
  });
  return {values, indices, aux_values, aux_indices};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(pyinterp, CUDA, m) {
  m.impl("topk_encode_forward", TORCH_BOX(&topk_encode_forward_cuda));
}
