// CUDA glue of resonator_bits (schema in csrc/bindings.cpp; kernels in kernels/cuda/resonator.cu), on
// LibTorch's stable ABI only: checks, device guard, current stream, scratch, launches.
#include <dlfcn.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include "resonator.cuh"

// Defined in libtorch_cuda, which this module does not link (it builds against the CPU wheel too):
// a weak reference loads anywhere, and current_stream() finds the symbol in the loaded torch.
#pragma weak aoti_torch_get_current_cuda_stream

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

constexpr const char* kOp = "resonator_bits (cuda)";

cudaStream_t current_stream(int32_t device) {
  using Getter = AOTITorchError (*)(int32_t, void**);
  static const Getter getter = []() -> Getter {
    if (&aoti_torch_get_current_cuda_stream != nullptr) return &aoti_torch_get_current_cuda_stream;
    void* library = dlopen("libtorch_cuda.so", RTLD_NOLOAD | RTLD_LAZY);  // torch's, already loaded
    return library ? reinterpret_cast<Getter>(dlsym(library, "aoti_torch_get_current_cuda_stream")) : nullptr;
  }();
  STD_TORCH_CHECK(getter != nullptr, kOp, ": this torch has no CUDA runtime (libtorch_cuda is not loaded)");
  void* stream = nullptr;
  STD_TORCH_CHECK(getter(device, &stream) == AOTI_TORCH_SUCCESS, kOp, ": cannot read the current CUDA stream");
  return static_cast<cudaStream_t>(stream);
}

void check_cuda(cudaError_t status, const char* what) {
  STD_TORCH_CHECK(status == cudaSuccess, kOp, ": ", what, " failed: ", cudaGetErrorString(status));
}

void check_matrix(const Tensor& t, const char* name, ScalarType dtype, int64_t rows, int64_t cols,
                  int32_t device) {
  STD_TORCH_CHECK(t.is_cuda() && t.get_device_index() == device, kOp, ": ", name,
                  " must be on the CUDA device of s");
  STD_TORCH_CHECK(t.scalar_type() == dtype, kOp, ": ", name, " has the wrong dtype");
  STD_TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, kOp, ": ", name, " must have shape (",
                  rows, ", ", cols, ")");
  STD_TORCH_CHECK(t.is_contiguous(), kOp, ": ", name, " must be contiguous");
}

Tensor device_int32(const Tensor& like, const std::vector<int32_t>& values, cudaStream_t stream) {
  Tensor out = torch::stable::new_empty(like, std::vector<int64_t>{static_cast<int64_t>(values.size())}, ScalarType::Int);
  check_cuda(cudaMemcpyAsync(out.mutable_data_ptr(), values.data(), values.size() * sizeof(int32_t),
                             cudaMemcpyHostToDevice, stream),
             "copying codebook sizes");
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> resonator_bits_cuda(
    Tensor s, Tensor similarity_codebooks, Tensor projection_codebooks, std::vector<int64_t> sizes,
    std::optional<Tensor> known, int64_t max_iters, bool parallel, std::string activation, int64_t k,
    int64_t threshold_units, double noise, int64_t seed, std::string stop, int64_t theta_units,
    int64_t detect_cycles) {
  STD_TORCH_CHECK(s.is_cuda() && s.dim() == 2, kOp, ": s must be a (B, D) CUDA tensor");
  const int32_t device = s.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  const int64_t batch = s.size(0), dim = s.size(1), factors = static_cast<int64_t>(sizes.size());
  STD_TORCH_CHECK(dim >= 1 && factors >= 1, kOp, ": need D >= 1 and at least one codebook");
  int64_t total = 0, largest = 0, smallest = INT64_MAX;
  std::vector<int32_t> offsets, sizes32;
  for (int64_t size : sizes) {
    STD_TORCH_CHECK(size >= 1, kOp, ": every codebook needs M_f >= 1");
    offsets.push_back(static_cast<int32_t>(total));
    sizes32.push_back(static_cast<int32_t>(size));
    total += size;
    largest = std::max(largest, size);
    smallest = std::min(smallest, size);
  }
  check_matrix(s, "s", ScalarType::Char, batch, dim, device);
  check_matrix(similarity_codebooks, "similarity_codebooks", ScalarType::Char, total, dim, device);
  check_matrix(projection_codebooks, "projection_codebooks", ScalarType::Char, total, dim, device);
  if (known.has_value()) check_matrix(*known, "known", ScalarType::Int, batch, factors, device);
  STD_TORCH_CHECK(max_iters >= 1, kOp, ": max_iters must be >= 1");
  STD_TORCH_CHECK(noise >= 0, kOp, ": noise must be >= 0");
  STD_TORCH_CHECK(noise > 0 || largest * dim < (int64_t{1} << 31), kOp, ": max M_f * D must stay below 2^31");
  STD_TORCH_CHECK(detect_cycles == 0 || detect_cycles >= 2, kOp, ": detect_cycles must be 0 or >= 2");
  STD_TORCH_CHECK(stop == "fixed_point" || stop == "similarity", kOp, ": stop must be fixed_point or similarity");
  pyinterp_cuda::ResonatorActivation rule;
  if (activation == "identity") {
    rule = pyinterp_cuda::ResonatorActivation::identity;
  } else if (activation == "threshold") {
    rule = pyinterp_cuda::ResonatorActivation::threshold;
  } else {
    STD_TORCH_CHECK(activation == "topk", kOp, ": activation must be identity, threshold or topk");
    STD_TORCH_CHECK(k >= 1 && k <= smallest, kOp, ": k must be in [1, min M_f]");
    rule = pyinterp_cuda::ResonatorActivation::topk;
  }

  const cudaStream_t stream = current_stream(device);
  const int32_t words = static_cast<int32_t>((dim + 31) / 32);
  const auto shape = [](std::initializer_list<int64_t> dims) { return std::vector<int64_t>(dims); };
  Tensor composites = torch::stable::new_empty(s, shape({batch, words}), ScalarType::Int);
  Tensor similarity_rows = torch::stable::new_empty(s, shape({total, words}), ScalarType::Int);
  Tensor projection_rows = torch::stable::new_empty(s, shape({total, words}), ScalarType::Int);
  Tensor superpositions = torch::stable::new_empty(s, shape({factors, words}), ScalarType::Int);
  Tensor offsets_device = device_int32(s, offsets, stream);
  Tensor sizes_device = device_int32(s, sizes32, stream);
  Tensor counter = torch::stable::new_zeros(s, shape({1}), ScalarType::Int);
  const auto words_of = [](const Tensor& t) { return static_cast<uint32_t*>(t.mutable_data_ptr()); };
  check_cuda(pyinterp_cuda::pack_sign_bits(static_cast<const int8_t*>(s.const_data_ptr()), batch,
                                           static_cast<int32_t>(dim), words, words_of(composites), stream),
             "packing s");
  check_cuda(pyinterp_cuda::pack_sign_bits(static_cast<const int8_t*>(similarity_codebooks.const_data_ptr()), total,
                                           static_cast<int32_t>(dim), words, words_of(similarity_rows), stream),
             "packing similarity_codebooks");
  check_cuda(pyinterp_cuda::pack_sign_bits(static_cast<const int8_t*>(projection_codebooks.const_data_ptr()), total,
                                           static_cast<int32_t>(dim), words, words_of(projection_rows), stream),
             "packing projection_codebooks");
  check_cuda(pyinterp_cuda::superposition_bits(words_of(projection_rows),
                                               static_cast<const int32_t*>(offsets_device.const_data_ptr()),
                                               static_cast<const int32_t*>(sizes_device.const_data_ptr()),
                                               static_cast<int32_t>(factors), static_cast<int32_t>(dim), words,
                                               words_of(superpositions), stream),
             "the superposition init");

  Tensor indices = torch::stable::new_empty(s, shape({batch, factors}), ScalarType::Int);
  Tensor iterations = torch::stable::new_empty(s, shape({batch}), ScalarType::Int);
  Tensor converged = torch::stable::new_empty(s, shape({batch}), ScalarType::Bool);
  Tensor cycle = torch::stable::new_empty(s, shape({batch}), ScalarType::Int);
  Tensor similarities = torch::stable::new_empty(s, shape({batch, factors}), ScalarType::Float);

  pyinterp_cuda::ResonatorBitsArgs args{};
  args.composites = words_of(composites);
  args.similarity_rows = words_of(similarity_rows);
  args.projection_rows = words_of(projection_rows);
  args.superpositions = words_of(superpositions);
  args.offsets = static_cast<const int32_t*>(offsets_device.const_data_ptr());
  args.sizes = static_cast<const int32_t*>(sizes_device.const_data_ptr());
  args.known = known.has_value() ? static_cast<const int32_t*>(known->const_data_ptr()) : nullptr;
  args.indices = static_cast<int32_t*>(indices.mutable_data_ptr());
  args.iterations = static_cast<int32_t*>(iterations.mutable_data_ptr());
  args.converged = static_cast<bool*>(converged.mutable_data_ptr());
  args.cycle = static_cast<int32_t*>(cycle.mutable_data_ptr());
  args.similarities = static_cast<float*>(similarities.mutable_data_ptr());
  args.next_problem = static_cast<int32_t*>(counter.mutable_data_ptr());
  args.batch = batch;
  args.dim = static_cast<int32_t>(dim);
  args.words = words;
  args.factors = static_cast<int32_t>(factors);
  args.max_size = static_cast<int32_t>(largest);
  args.max_iters = max_iters;
  args.parallel = parallel;
  args.activation = rule;
  args.k = static_cast<int32_t>(k);
  args.threshold_units = threshold_units;
  args.noise = noise;
  args.seed = static_cast<uint64_t>(seed);
  args.stop_on_similarity = stop == "similarity";
  args.theta_units = theta_units;
  args.detect_cycles = static_cast<int32_t>(detect_cycles);
  const int32_t grid = pyinterp_cuda::resonator_bits_grid(args, device);
  Tensor history;
  if (detect_cycles > 0) {
    history = torch::stable::new_empty(s, shape({grid * (detect_cycles + 1) * factors * words}), ScalarType::Int);
    args.history = words_of(history);
  }
  check_cuda(pyinterp_cuda::launch_resonator_bits(args, grid, stream), "the resonator kernel launch");
  return {indices, iterations, converged, cycle, similarities};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(pyinterp, CUDA, m) {
  m.impl("resonator_bits", TORCH_BOX(&resonator_bits_cuda));
}
