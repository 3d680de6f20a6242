// The one header of the CUDA glue (csrc/cuda/*.cpp), on LibTorch's stable ABI only: argument checks
// whose errors name the op and the argument, dtype dispatch, CUDA error checks, the current stream.
// Every glue file uses these; none defines its own stream getter or CUDA error check.
#pragma once

#include <dlfcn.h>

#include <cstdint>
#include <optional>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

namespace pyinterp::glue {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// The current CUDA stream of `device`, through the stable C shim aoti_torch_get_current_cuda_stream.
// That shim lives in libtorch_cuda.so, which the CPU wheel (this module must build against it and load
// into it) does not have, so it is resolved at first use from the libtorch_cuda.so the running torch
// has loaded instead of being linked. (torch::stable::accelerator::Stream::nativeHandle() would avoid
// dlsym but needs TORCH_TARGET_VERSION >= 2.13; this module targets 2.11.)
inline cudaStream_t current_stream(int32_t device) {
  using Fn = decltype(&aoti_torch_get_current_cuda_stream);
  static const Fn fn = [] {
    const char* name = "aoti_torch_get_current_cuda_stream";
    void* sym = dlsym(RTLD_DEFAULT, name);
    if (!sym) {
      if (void* lib = dlopen("libtorch_cuda.so", RTLD_LAZY | RTLD_NOLOAD)) sym = dlsym(lib, name);
    }
    return reinterpret_cast<Fn>(sym);
  }();
  STD_TORCH_CHECK(fn != nullptr, "pyinterp CUDA kernels: this torch build has no CUDA support "
                  "(libtorch_cuda.so is not loaded)");
  void* stream = nullptr;
  STD_TORCH_CHECK(fn(device, &stream) == AOTI_TORCH_SUCCESS,
                  "pyinterp CUDA kernels: could not get the current CUDA stream of device ", device);
  return static_cast<cudaStream_t>(stream);
}

// `step` names what failed when an op makes several CUDA calls (e.g. "packing s").
inline void check_cuda(cudaError_t err, const char* op, const char* step = nullptr) {
  if (err == cudaSuccess) return;
  if (step) STD_TORCH_CHECK(false, op, ": ", step, ": CUDA error: ", cudaGetErrorString(err));
  STD_TORCH_CHECK(false, op, ": CUDA error: ", cudaGetErrorString(err));
}

inline void check_tensor(const char* op, const char* name, const Tensor& t, int64_t dim,
                         const Tensor* same_device_as = nullptr) {
  STD_TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor");
  STD_TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got ", t.dim(), "-D");
  if (same_device_as)
    STD_TORCH_CHECK(t.get_device_index() == same_device_as->get_device_index(), op, ": ", name,
                    " is on cuda:", t.get_device_index(), " but the other inputs are on cuda:",
                    same_device_as->get_device_index());
}

inline void check_contiguous(const char* op, const char* name, const Tensor& t) {
  STD_TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline void check_dtype(const char* op, const char* name, const Tensor& t, ScalarType expected) {
  STD_TORCH_CHECK(t.scalar_type() == expected, op, ": ", name, " must be ",
                  torch::headeronly::toString(expected), ", got ",
                  torch::headeronly::toString(t.scalar_type()));
}

inline void check_size(const char* op, const char* name, const Tensor& t, int64_t dim, int64_t size,
                       const char* meaning) {
  STD_TORCH_CHECK(t.size(dim) == size, op, ": ", name, ".shape[", dim, "] must be ", size, " (",
                  meaning, "), got ", t.size(dim));
}

// indices (N, k) int32 on like's device, of the shape of `like` (named like_name in errors): the
// codes of a sparse op (sparse_decode, prefix_decode).
inline void check_indices(const char* op, const Tensor& indices, const Tensor& like, const char* like_name) {
  check_tensor(op, "indices", indices, 2, &like);
  check_dtype(op, "indices", indices, ScalarType::Int);
  STD_TORCH_CHECK(indices.size(0) == like.size(0) && indices.size(1) == like.size(1), op,
                  ": indices must have the shape of ", like_name, " (", like.size(0), ", ", like.size(1),
                  "), got (", indices.size(0), ", ", indices.size(1), ")");
}

// f(T{}) with T the CUDA type of `t`'s dtype (float32, float16, bfloat16).
template <typename F>
void dispatch_float(const char* op, const char* name, const Tensor& t, F&& f) {
  switch (t.scalar_type()) {
    case ScalarType::Float: f(float{}); break;
    case ScalarType::Half: f(__half{}); break;
    case ScalarType::BFloat16: f(__nv_bfloat16{}); break;
    default:
      STD_TORCH_CHECK(false, op, ": ", name, " must be float32, float16 or bfloat16 on CUDA, got ",
                      torch::headeronly::toString(t.scalar_type()));
  }
}

template <typename T>
const T* const_ptr(const Tensor& t) {
  return static_cast<const T*>(t.const_data_ptr());
}

template <typename T>
T* mutable_ptr(const Tensor& t) {
  return static_cast<T*>(t.mutable_data_ptr());
}

// Scratch memory for a launcher, from torch's caching allocator on the current stream.
inline Tensor workspace(const Tensor& like, size_t bytes) {
  return torch::stable::new_empty(like, {static_cast<int64_t>(bytes)}, ScalarType::Byte);
}

}  // namespace pyinterp::glue
