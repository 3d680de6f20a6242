// Resonator-network search on bit-packed +-1 vectors: a persistent kernel (torch-free).
// The rules are those of pyinterp/reference/resonator.py; the kernel reproduces its trajectory exactly.
// Bit b of word w of a packed vector is 1 where entry 32 w + b is -1, so binding is XOR and a similarity
// is D - 2 popcount(x XOR y).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace pyinterp::cuda {

enum class ResonatorActivation : int32_t { identity = 0, threshold = 1, topk = 2 };

struct ResonatorBitsArgs {
  const uint32_t* composites;       // [batch][words]
  const uint32_t* similarity_rows;  // [sum M_f][words], the codebooks the similarities use
  const uint32_t* projection_rows;  // [sum M_f][words], the codebooks of the update and the readout
  const uint32_t* superpositions;   // [factors][words], sgn(sum_m X_f[m]) (superposition_bits)
  const int32_t* offsets;           // [factors], first row of each codebook
  const int32_t* sizes;             // [factors], M_f
  const int32_t* known;             // [batch][factors], -1 = unknown; nullptr when none is known
  int32_t* indices;                 // [batch][factors]
  int32_t* iterations;              // [batch]
  bool* converged;                  // [batch]
  int32_t* cycle;                   // [batch]
  float* similarities;              // [batch][factors]
  uint32_t* history;                // [grid][detect_cycles + 1][factors][words] if detect_cycles > 0
  int32_t* next_problem;            // one zeroed counter: blocks pull problems from it
  int64_t batch;
  int32_t dim, words, factors, max_size;
  int64_t max_iters;
  bool parallel;
  ResonatorActivation activation;
  int32_t k;
  int64_t threshold_units;  // reference.threshold_units
  double noise;             // sigma, 0 = none
  uint64_t seed;
  bool stop_on_similarity;
  int64_t theta_units;      // reference.theta_units
  int32_t detect_cycles;    // 0 or the longest period looked for
};

// out[r][w] = packed signs of the int8 rows (values are read by sign; the caller passes +-1).
cudaError_t resonator_bits_pack_signs(const int8_t* values, int64_t rows, int32_t dim, int32_t words,
                                      uint32_t* out, cudaStream_t stream);

// out[f][w] = packed sgn(sum_m X_f[m]) with ties to +1, from the packed projection rows.
cudaError_t resonator_bits_superpositions(const uint32_t* projection_rows, const int32_t* offsets,
                                          const int32_t* sizes, int32_t factors, int32_t dim, int32_t words,
                                          uint32_t* out, cudaStream_t stream);

// The largest max M_f the kernel runs on `device` for args.factors, args.words and args.noise: a block
// keeps one problem's whole state (per-codevector similarities and weights) in shared memory.
cudaError_t resonator_bits_max_codebook_size(const ResonatorBitsArgs& args, int device, int64_t* size);

// Blocks the persistent kernel runs on `device` for these arguments (needed to size args.history).
// It also opts the kernel in to the shared memory args need, so resonator_bits must come after it.
cudaError_t resonator_bits_grid(const ResonatorBitsArgs& args, int device, int32_t* grid);

cudaError_t resonator_bits(const ResonatorBitsArgs& args, int32_t grid, cudaStream_t stream);

}  // namespace pyinterp::cuda
