// Helpers for CUDA glue that uses only the LibTorch stable ABI and links against the CPU wheel.
// The shims that need libtorch_cuda (aoti_torch_get_current_cuda_stream, torch_c10_cuda_check_msg,
// hence STD_CUDA_CHECK) are absent from torch_cpu, so a module that references them fails to load;
// these helpers reach them only at run time, from the libtorch_cuda that a CUDA torch has loaded.
#pragma once

#include <cuda_runtime.h>
#include <dlfcn.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/headeronly/util/Exception.h>

namespace pyinterp_stable {

// The stream PyTorch is using on `device` (torch.cuda.current_stream()).
inline cudaStream_t current_cuda_stream(int32_t device) {
  using GetStream = decltype(&aoti_torch_get_current_cuda_stream);
  static const GetStream get_stream = [] {
    void* library = dlopen("libtorch_cuda.so", RTLD_LAZY | RTLD_NOLOAD);
    return library ? reinterpret_cast<GetStream>(dlsym(library, "aoti_torch_get_current_cuda_stream"))
                   : nullptr;
  }();
  STD_TORCH_CHECK(get_stream != nullptr,
                  "pyinterp CUDA kernels need a CUDA build of torch (libtorch_cuda is not loaded)");
  void* stream = nullptr;
  STD_TORCH_CHECK(get_stream(device, &stream) == AOTI_TORCH_SUCCESS,
                  "could not get the current CUDA stream of device ", device);
  return static_cast<cudaStream_t>(stream);
}

inline void check_cuda(cudaError_t error, const char* what) {
  STD_TORCH_CHECK(error == cudaSuccess, what, ": ", cudaGetErrorString(error));
}

}  // namespace pyinterp_stable
