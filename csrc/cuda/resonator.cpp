// CUDA glue of resonator_bits (schema in csrc/bindings.cpp; kernels in kernels/cuda/resonator.cu), on
// LibTorch's stable ABI only: checks, device guard, current stream, scratch, launches.
#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "stable_glue.h"
#include "resonator.cuh"

namespace {

using namespace pyinterp::glue;
namespace kernels = pyinterp::cuda;

constexpr const char* kOp = "resonator_bits (cuda)";

// A contiguous (rows, cols) matrix of `dtype` on the device of s; the meanings go into the errors.
void check_matrix(const char* name, const Tensor& t, ScalarType dtype, int64_t rows, const char* rows_are,
                  int64_t cols, const char* cols_are, const Tensor& s) {
  check_tensor(kOp, name, t, 2, &s);
  check_dtype(kOp, name, t, dtype);
  check_size(kOp, name, t, 0, rows, rows_are);
  check_size(kOp, name, t, 1, cols, cols_are);
  check_contiguous(kOp, name, t);
}

Tensor device_int32(const Tensor& like, const std::vector<int32_t>& values, cudaStream_t stream) {
  Tensor out = torch::stable::new_empty(like, std::vector<int64_t>{static_cast<int64_t>(values.size())}, ScalarType::Int);
  check_cuda(cudaMemcpyAsync(out.mutable_data_ptr(), values.data(), values.size() * sizeof(int32_t),
                             cudaMemcpyHostToDevice, stream),
             kOp, "copying codebook offsets and sizes");
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> resonator_bits_cuda(
    Tensor s, Tensor similarity_codebooks, Tensor projection_codebooks, std::vector<int64_t> sizes,
    std::optional<Tensor> known, int64_t max_iters, bool parallel, std::string activation, int64_t k,
    int64_t threshold_units, double noise, int64_t seed, std::string stop, int64_t theta_units,
    int64_t detect_cycles) {
  check_tensor(kOp, "s", s, 2);
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
  check_matrix("s", s, ScalarType::Char, batch, "B", dim, "D", s);
  check_matrix("similarity_codebooks", similarity_codebooks, ScalarType::Char, total, "sum of sizes", dim,
               "s.shape[1]", s);
  check_matrix("projection_codebooks", projection_codebooks, ScalarType::Char, total, "sum of sizes", dim,
               "s.shape[1]", s);
  if (known.has_value())
    check_matrix("known", *known, ScalarType::Int, batch, "s.shape[0]", factors, "len(sizes)", s);
  STD_TORCH_CHECK(max_iters >= 1, kOp, ": max_iters must be >= 1");
  STD_TORCH_CHECK(noise >= 0, kOp, ": noise must be >= 0");
  STD_TORCH_CHECK(noise > 0 || largest * dim < (int64_t{1} << 31), kOp, ": max M_f * D must stay below 2^31");
  STD_TORCH_CHECK(detect_cycles == 0 || detect_cycles >= 2, kOp, ": detect_cycles must be 0 or >= 2");
  STD_TORCH_CHECK(stop == "fixed_point" || stop == "similarity", kOp, ": stop must be fixed_point or similarity");
  kernels::ResonatorActivation rule;
  if (activation == "identity") {
    rule = kernels::ResonatorActivation::identity;
  } else if (activation == "threshold") {
    rule = kernels::ResonatorActivation::threshold;
  } else {
    STD_TORCH_CHECK(activation == "topk", kOp, ": activation must be identity, threshold or topk");
    STD_TORCH_CHECK(k >= 1 && k <= smallest, kOp, ": k must be in [1, min M_f]");
    rule = kernels::ResonatorActivation::topk;
  }

  const int32_t words = static_cast<int32_t>((dim + 31) / 32);
  kernels::ResonatorBitsArgs args{};
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
  int64_t size_limit = 0;
  check_cuda(kernels::resonator_bits_max_codebook_size(args, device, &size_limit), kOp,
             "reading the shared-memory limit");
  STD_TORCH_CHECK(largest <= size_limit, kOp, ": the largest codebook has M_f = ", largest,
                  " codevectors, but with D = ", dim, " and ", factors, " codebooks one block's shared "
                  "memory on cuda:", device, " holds at most M_f = ", size_limit,
                  " (the kernel keeps a problem's similarities and weights there); use smaller "
                  "codebooks or the cpu or triton backend");
  int32_t grid = 0;
  check_cuda(kernels::resonator_bits_grid(args, device, &grid), kOp, "sizing the grid");

  const cudaStream_t stream = current_stream(device);
  const auto shape = [](std::initializer_list<int64_t> dims) { return std::vector<int64_t>(dims); };
  Tensor composites = torch::stable::new_empty(s, shape({batch, words}), ScalarType::Int);
  Tensor similarity_rows = torch::stable::new_empty(s, shape({total, words}), ScalarType::Int);
  Tensor projection_rows = torch::stable::new_empty(s, shape({total, words}), ScalarType::Int);
  Tensor superpositions = torch::stable::new_empty(s, shape({factors, words}), ScalarType::Int);
  Tensor offsets_device = device_int32(s, offsets, stream);
  Tensor sizes_device = device_int32(s, sizes32, stream);
  Tensor counter = torch::stable::new_zeros(s, shape({1}), ScalarType::Int);
  const auto words_of = [](const Tensor& t) { return mutable_ptr<uint32_t>(t); };
  const auto pack = [&](const Tensor& values, int64_t rows, const Tensor& out, const char* step) {
    check_cuda(kernels::resonator_bits_pack_signs(const_ptr<int8_t>(values), rows, args.dim, words,
                                                  words_of(out), stream),
               kOp, step);
  };
  pack(s, batch, composites, "packing s");
  pack(similarity_codebooks, total, similarity_rows, "packing similarity_codebooks");
  pack(projection_codebooks, total, projection_rows, "packing projection_codebooks");
  check_cuda(kernels::resonator_bits_superpositions(words_of(projection_rows), const_ptr<int32_t>(offsets_device),
                                                    const_ptr<int32_t>(sizes_device), args.factors, args.dim,
                                                    words, words_of(superpositions), stream),
             kOp, "the superposition init");

  Tensor indices = torch::stable::new_empty(s, shape({batch, factors}), ScalarType::Int);
  Tensor iterations = torch::stable::new_empty(s, shape({batch}), ScalarType::Int);
  Tensor converged = torch::stable::new_empty(s, shape({batch}), ScalarType::Bool);
  Tensor cycle = torch::stable::new_empty(s, shape({batch}), ScalarType::Int);
  Tensor similarities = torch::stable::new_empty(s, shape({batch, factors}), ScalarType::Float);
  args.composites = words_of(composites);
  args.similarity_rows = words_of(similarity_rows);
  args.projection_rows = words_of(projection_rows);
  args.superpositions = words_of(superpositions);
  args.offsets = const_ptr<int32_t>(offsets_device);
  args.sizes = const_ptr<int32_t>(sizes_device);
  args.known = known.has_value() ? const_ptr<int32_t>(*known) : nullptr;
  args.indices = mutable_ptr<int32_t>(indices);
  args.iterations = mutable_ptr<int32_t>(iterations);
  args.converged = mutable_ptr<bool>(converged);
  args.cycle = mutable_ptr<int32_t>(cycle);
  args.similarities = mutable_ptr<float>(similarities);
  args.next_problem = mutable_ptr<int32_t>(counter);
  Tensor history;
  if (detect_cycles > 0) {
    history = torch::stable::new_empty(s, shape({grid * (detect_cycles + 1) * factors * words}), ScalarType::Int);
    args.history = words_of(history);
  }
  check_cuda(kernels::resonator_bits(args, grid, stream), kOp, "the resonator kernel launch");
  return {indices, iterations, converged, cycle, similarities};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(pyinterp, CUDA, m) {
  m.impl("resonator_bits", TORCH_BOX(&resonator_bits_cuda));
}
