// ij_accumulate_ on CUDA: torch-free device code and its launcher (glue: csrc/cuda/ij_accumulate.cpp).
// One chunk of K quadrature nodes of an integrated Jacobian (Moeller et al., EMNLP 2023), in place:
//   Jc[r, :] = sum_k weights[k] * grads[k, r, :]      for every row r = e * S + s
//   P[r]    += Jc[r, :] . delta[r % S, :]            Jbar[r, :] += Jc[r, :]   (Jbar may be null)
// grads (K, rows, width) contiguous in grads_dtype; weights (K), delta (S, width), P (rows) and
// Jbar (rows, width) contiguous in the accumulator type: double for kFloat64 grads, float otherwise.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace pyinterp::cuda {

enum class GradDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

cudaError_t ij_accumulate(const void* grads, GradDtype grads_dtype, const void* weights,
                          const void* delta, void* P, void* Jbar, int64_t num_nodes, int64_t rows,
                          int64_t tokens, int64_t width, cudaStream_t stream);

}  // namespace pyinterp::cuda
