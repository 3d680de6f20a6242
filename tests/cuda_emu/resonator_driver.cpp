// Harness driver for kernels/cuda/resonator.cu, doing what csrc/cuda/resonator.cpp does around the
// kernels (pack, superposition, codebook-size check, grid, history, counter). Params: batch dim sizes (comma list)
// max_iters parallel activation (0 identity, 1 threshold, 2 topk) k threshold_units noise seed
// stop_on_similarity theta_units detect_cycles has_known; grid overrides the kernel's own choice.
// Arrays: s (batch, dim) int8, similarity / projection (sum M_f, dim) int8, known (batch, F) int32.
// Outputs: indices, iterations, cycle (int32), converged (uint8), similarities (fp32).
#include <numeric>

#include "driver.h"
#include "resonator.cuh"

namespace kernels = pyinterp::cuda;

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  const driver::Case c(argv[1]);
  const int64_t batch = c.i("batch");
  const int32_t dim = static_cast<int32_t>(c.i("dim"));
  const int32_t words = (dim + 31) / 32;
  const std::vector<int64_t> sizes = c.list("sizes");
  const int32_t factors = static_cast<int32_t>(sizes.size());
  std::vector<int32_t> offsets, sizes32;
  int64_t total = 0, largest = 0;
  for (int64_t m : sizes) {
    offsets.push_back(static_cast<int32_t>(total));
    sizes32.push_back(static_cast<int32_t>(m));
    total += m;
    largest = std::max(largest, m);
  }
  const auto* s = driver::device_array<int8_t>(c, "s");
  const auto* similarity = driver::device_array<int8_t>(c, "similarity");
  const auto* projection = driver::device_array<int8_t>(c, "projection");
  auto* composites = driver::device_empty<uint32_t>(batch * words);
  auto* similarity_rows = driver::device_empty<uint32_t>(total * words);
  auto* projection_rows = driver::device_empty<uint32_t>(total * words);
  auto* superpositions = driver::device_empty<uint32_t>(factors * words);
  auto* offsets_device = static_cast<int32_t*>(driver::device_bytes(sizeof(int32_t) * factors, 0, offsets.data()));
  auto* sizes_device = static_cast<int32_t*>(driver::device_bytes(sizeof(int32_t) * factors, 0, sizes32.data()));
  const int32_t zero = 0;
  auto* counter = static_cast<int32_t*>(driver::device_bytes(sizeof(int32_t), 0, &zero));
  driver::check(kernels::resonator_bits_pack_signs(s, batch, dim, words, composites, nullptr), "packing s");
  driver::check(kernels::resonator_bits_pack_signs(similarity, total, dim, words, similarity_rows, nullptr), "packing similarity");
  driver::check(kernels::resonator_bits_pack_signs(projection, total, dim, words, projection_rows, nullptr), "packing projection");
  driver::check(kernels::resonator_bits_superpositions(projection_rows, offsets_device, sizes_device, factors, dim, words,
                                            superpositions, nullptr),
                "resonator_bits_superpositions");
  kernels::ResonatorBitsArgs a{};
  a.composites = composites;
  a.similarity_rows = similarity_rows;
  a.projection_rows = projection_rows;
  a.superpositions = superpositions;
  a.offsets = offsets_device;
  a.sizes = sizes_device;
  a.known = c.i("has_known") ? driver::device_array<int32_t>(c, "known") : nullptr;
  a.indices = driver::device_empty<int32_t>(batch * factors);
  a.iterations = driver::device_empty<int32_t>(batch);
  a.converged = driver::device_empty<bool>(batch);
  a.cycle = driver::device_empty<int32_t>(batch);
  a.similarities = driver::device_empty<float>(batch * factors);
  a.next_problem = counter;
  a.batch = batch;
  a.dim = dim;
  a.words = words;
  a.factors = factors;
  a.max_size = static_cast<int32_t>(largest);
  a.max_iters = c.i("max_iters");
  a.parallel = c.i("parallel") != 0;
  a.activation = static_cast<kernels::ResonatorActivation>(c.i("activation"));
  a.k = static_cast<int32_t>(c.i("k"));
  a.threshold_units = c.i("threshold_units");
  a.noise = c.f("noise");
  a.seed = static_cast<uint64_t>(c.i("seed"));
  a.stop_on_similarity = c.i("stop_on_similarity") != 0;
  a.theta_units = c.i("theta_units");
  a.detect_cycles = static_cast<int32_t>(c.i("detect_cycles"));
  int64_t size_limit = 0;
  driver::check(kernels::resonator_bits_max_codebook_size(a, 0, &size_limit), "resonator_bits_max_codebook_size");
  if (largest > size_limit) {  // the glue refuses these codebooks with an error naming M_f
    std::printf("codebook too large: M_f = %ld > %ld\n", long(largest), long(size_limit));
    return 4;
  }
  int32_t grid = 0;
  driver::check(kernels::resonator_bits_grid(a, 0, &grid), "resonator_bits_grid");  // also opts in to the shared memory
  if (c.has("grid")) grid = static_cast<int32_t>(c.i("grid"));
  if (a.detect_cycles > 0) a.history = driver::device_empty<uint32_t>(int64_t(grid) * (a.detect_cycles + 1) * factors * words);
  driver::check(kernels::resonator_bits(a, grid, nullptr), "resonator_bits");
  std::printf("grid %d\n", grid);
  c.write("indices", a.indices, sizeof(int32_t) * batch * factors);
  c.write("iterations", a.iterations, sizeof(int32_t) * batch);
  c.write("converged", a.converged, batch);
  c.write("cycle", a.cycle, sizeof(int32_t) * batch);
  c.write("similarities", a.similarities, sizeof(float) * batch * factors);
  return 0;
}
