// Fused top-k SAE encoder on CUDA (kernels in topk_encode.cu). Host-only declarations: torch-free,
// includable from host C++ compiled by gcc.
//
//   z       = (x - b_dec) @ W_enc^T + b_enc              (N, M), fp32 accumulation, never stored
//   values  = ReLU(top-k of z per row), x's dtype       (N, k), descending, ties -> lower latent
//   indices = their latents, int32                        (N, k)
//   aux     = the same over dead latents only (live latents count as -inf), (N, k_aux)
// 16-bit inputs fold b_dec into the bias: z = x W_enc^T + (b_enc - b_dec W_enc^T), both in fp32, which
// differs from (x - b_dec) W_enc^T by rounding, at most about 2^-24 (D + 16) (|x| + |b_dec|) |W_enc|^T
// per entry; with a large b_dec, latents whose z are that close may order unlike the reference.
// Exact 16-bit data (e.g. small integers) give the reference's z exactly.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace pyinterp::cuda {

// All tensors contiguous and on the current device; T is float, __half or __nv_bfloat16.
template <typename T>
struct TopkEncodeArgs {
  const T* x = nullptr;             // (N, D)
  const T* W_enc = nullptr;         // (M, D)
  const T* b_enc = nullptr;         // (M) or nullptr
  const T* b_dec = nullptr;         // (D) or nullptr
  const bool* dead_mask = nullptr;  // (M) or nullptr; required when k_aux > 0
  T* values = nullptr;              // (N, k)
  int32_t* indices = nullptr;       // (N, k)
  T* aux_values = nullptr;          // (N, k_aux)
  int32_t* aux_indices = nullptr;   // (N, k_aux)
  int64_t N = 0, D = 0, M = 0;      // M < 2^31 (int32 indices)
  int64_t k = 0, k_aux = 0;         // 1 <= k <= M, 0 <= k_aux <= M
};

// Bytes of device scratch memory topk_encode_forward needs for these arguments on the current
// device (pointers matter: unaligned rows take a padded copy).
template <typename T>
cudaError_t topk_encode_forward_workspace_bytes(const TopkEncodeArgs<T>& args, size_t* bytes);

// Enqueues the whole encode on `stream`; `workspace` holds at least
// topk_encode_forward_workspace_bytes.
template <typename T>
cudaError_t topk_encode_forward(const TopkEncodeArgs<T>& args, void* workspace,
                                size_t workspace_bytes, cudaStream_t stream);

extern template cudaError_t topk_encode_forward_workspace_bytes<float>(const TopkEncodeArgs<float>&,
                                                                       size_t*);
extern template cudaError_t topk_encode_forward_workspace_bytes<__half>(const TopkEncodeArgs<__half>&,
                                                                        size_t*);
extern template cudaError_t topk_encode_forward_workspace_bytes<__nv_bfloat16>(
    const TopkEncodeArgs<__nv_bfloat16>&, size_t*);
extern template cudaError_t topk_encode_forward<float>(const TopkEncodeArgs<float>&, void*, size_t,
                                                       cudaStream_t);
extern template cudaError_t topk_encode_forward<__half>(const TopkEncodeArgs<__half>&, void*, size_t,
                                                        cudaStream_t);
extern template cudaError_t topk_encode_forward<__nv_bfloat16>(const TopkEncodeArgs<__nv_bfloat16>&,
                                                               void*, size_t, cudaStream_t);

}  // namespace pyinterp::cuda
