// Persistent resonator-network kernel: each block pulls problems from a counter and runs one problem's
// sweeps to its stop with the whole state (estimates, running product, similarities) in shared
// memory, so a converged problem frees its block for the next one at once (per-problem early exit).
// Similarities are XNOR-popcounts of packed words; the projection sum_m w_m X_f[m, d] is exact in
// int32 (int64 with noise). Rules: pyinterp/reference/resonator.py.
#include "resonator.cuh"

#include <algorithm>

#include "common.cuh"

namespace pyinterp::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xFFFFFFFFu;

// ---- counter-based noise: the integer definition of pyinterp.reference.resonator.noise_units ----
__device__ __forceinline__ uint64_t mix64(uint64_t x) {
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

__device__ __forceinline__ int64_t noise_units(uint64_t key, int64_t m, double sigma) {
  int64_t total = 0;
  for (uint64_t word = 0; word < 3; ++word) {
    const uint64_t bits = mix64(key + (3 * static_cast<uint64_t>(m) + word + 1) * 0x9E3779B97F4A7C15ull);
    total += static_cast<int64_t>((bits & 0xFFFF) + ((bits >> 16) & 0xFFFF) + ((bits >> 32) & 0xFFFF) + (bits >> 48));
  }
  return __double2ll_rn(__dmul_rn(sigma, static_cast<double>(total - 393210)));  // half to even
}

__device__ __forceinline__ uint32_t valid_bits(int32_t dim, int32_t word) {
  const int32_t valid = dim - word * 32;
  return valid >= 32 ? kFullMask : ((1u << valid) - 1u);
}

__global__ void pack_sign_bits_kernel(const int8_t* values, int64_t rows, int32_t dim, int32_t words,
                                      uint32_t* out) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= rows * words) return;
  const int64_t row = index / words;
  const int32_t word = static_cast<int32_t>(index % words);
  const int8_t* source = values + row * dim;
  uint32_t bits = 0;
  for (int32_t b = 0; b < 32 && word * 32 + b < dim; ++b) bits |= static_cast<uint32_t>(source[word * 32 + b] < 0) << b;
  out[index] = bits;
}

// one warp per packed word of one factor: lane b counts the -1 entries of column 32 w + b
__global__ void superposition_bits_kernel(const uint32_t* projection_rows, const int32_t* offsets,
                                          const int32_t* sizes, int32_t factors, int32_t dim, int32_t words,
                                          uint32_t* out) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= static_cast<int64_t>(factors) * words) return;
  const int32_t f = static_cast<int32_t>(warp / words), word = static_cast<int32_t>(warp % words);
  int32_t negatives = 0;
  for (int32_t m = 0; m < sizes[f]; ++m)
    negatives += (projection_rows[static_cast<int64_t>(offsets[f] + m) * words + word] >> lane) & 1;
  const uint32_t bits = __ballot_sync(kFullMask, sizes[f] - 2 * negatives < 0);
  if (lane == 0) out[warp] = bits & valid_bits(dim, word);
}

struct SharedLayout {
  uint32_t* state;         // [factors][words]
  uint32_t* running;       // [words], s XOR all estimates
  uint32_t* unbound;       // [words]
  int32_t* similarity;     // [max_size]
  int64_t* weights;        // [max_size]
  int32_t* nonzero;        // [max_size], the codevectors with a nonzero weight
};

constexpr size_t kSharedBytesPerLatent = 8 + 4 + 4;  // weights, similarity, nonzero

__host__ __device__ inline size_t shared_bytes(const ResonatorBitsArgs& a) {
  const size_t words = static_cast<size_t>(a.factors + 2) * a.words * 4;
  const size_t aligned = (words + 7) / 8 * 8;
  return aligned + static_cast<size_t>(a.max_size) * kSharedBytesPerLatent;
}

__device__ SharedLayout carve(const ResonatorBitsArgs& a, unsigned char* base) {
  SharedLayout s;
  s.state = reinterpret_cast<uint32_t*>(base);
  s.running = s.state + static_cast<size_t>(a.factors) * a.words;
  s.unbound = s.running + a.words;
  const size_t aligned = (static_cast<size_t>(a.factors + 2) * a.words * 4 + 7) / 8 * 8;
  s.weights = reinterpret_cast<int64_t*>(base + aligned);
  s.similarity = reinterpret_cast<int32_t*>(s.weights + a.max_size);
  s.nonzero = s.similarity + a.max_size;
  return s;
}

__device__ __forceinline__ int32_t warp_sum(int32_t value) {
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(kFullMask, value, offset);
  return value;
}

// the running product s XOR (all estimates)
__device__ void product_of_estimates(const ResonatorBitsArgs& a, const SharedLayout& s, const uint32_t* composite) {
  for (int32_t w = threadIdx.x; w < a.words; w += kThreads) {
    uint32_t product = composite[w];
    for (int32_t f = 0; f < a.factors; ++f) product ^= s.state[f * a.words + w];
    s.running[w] = product;
  }
}

template <typename Acc>
__global__ void __launch_bounds__(kThreads) resonator_bits_kernel(const ResonatorBitsArgs a) {
  extern __shared__ __align__(16) unsigned char shared_memory[];
  const SharedLayout s = carve(a, shared_memory);
  __shared__ int64_t row_shared;
  __shared__ int32_t changed, similar, nonzero_count, best_similarity;
  __shared__ int32_t warp_best_abs[kWarps], warp_best_index[kWarps], warp_best_score[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t scale = a.noise > 0 ? 65536 : 1;
  const int64_t state_words = static_cast<int64_t>(a.factors) * a.words;
  uint32_t* history =
      a.detect_cycles ? a.history + static_cast<int64_t>(blockIdx.x) * (a.detect_cycles + 1) * state_words : nullptr;

  while (true) {
    if (threadIdx.x == 0) row_shared = atomicAdd(a.next_problem, 1);
    __syncthreads();
    const int64_t row = row_shared;
    if (row >= a.batch) return;
    const uint32_t* composite = a.composites + row * a.words;
    const int32_t* known = a.known ? a.known + row * a.factors : nullptr;

    for (int64_t i = threadIdx.x; i < state_words; i += kThreads) {
      const int32_t f = static_cast<int32_t>(i / a.words), w = static_cast<int32_t>(i % a.words);
      s.state[i] = known && known[f] >= 0
                       ? a.projection_rows[static_cast<int64_t>(a.offsets[f] + known[f]) * a.words + w]
                       : a.superpositions[i];
    }
    __syncthreads();
    product_of_estimates(a, s, composite);
    if (a.detect_cycles)
      for (int64_t i = threadIdx.x; i < state_words; i += kThreads) history[i] = s.state[i];
    __syncthreads();

    int64_t sweep = 0;
    bool converged = false;
    int32_t period = 0;
    while (sweep < a.max_iters && !converged && period == 0) {
      if (threadIdx.x == 0) {
        changed = 0;
        similar = 1;
      }
      __syncthreads();
      for (int32_t f = 0; f < a.factors; ++f) {
        if (known && known[f] >= 0) continue;  // fixed estimate: nothing changes
        const int32_t size = a.sizes[f];
        const int64_t first_row = a.offsets[f];
        uint32_t* estimate = s.state + f * a.words;
        for (int32_t w = threadIdx.x; w < a.words; w += kThreads) s.unbound[w] = s.running[w] ^ estimate[w];
        if (threadIdx.x == 0) {
          nonzero_count = 0;
          best_similarity = 0;
        }
        __syncthreads();

        // similarities: one warp per codevector, lanes over words
        for (int32_t m = warp; m < size; m += kWarps) {
          const uint32_t* codevector = a.similarity_rows + (first_row + m) * a.words;
          int32_t distance = 0;
          for (int32_t w = lane; w < a.words; w += 32) distance += __popc(__ldg(codevector + w) ^ s.unbound[w]);
          distance = warp_sum(distance);
          if (lane == 0) s.similarity[m] = a.dim - 2 * distance;
        }
        __syncthreads();

        // weights = activation(similarity * scale + noise)
        const uint64_t key = a.noise > 0 ? mix64(mix64(mix64(a.seed) ^ static_cast<uint64_t>(row)) ^
                                                 ((static_cast<uint64_t>(sweep) << 16) | static_cast<uint64_t>(f)))
                                         : 0;
        for (int32_t m = threadIdx.x; m < size; m += kThreads) {
          if (a.stop_on_similarity) atomicMax(&best_similarity, abs(s.similarity[m]));
          int64_t weight = static_cast<int64_t>(s.similarity[m]) * scale;
          if (a.noise > 0) weight += noise_units(key, m, a.noise);
          if (a.activation == ResonatorActivation::threshold && weight < a.threshold_units) weight = 0;
          s.weights[m] = weight;
        }
        __syncthreads();
        if (a.activation == ResonatorActivation::topk) {
          // keep the k largest, ties to the lower index: rank = entries ahead of this one
          for (int32_t m = threadIdx.x; m < size; m += kThreads) {
            const int64_t mine = s.weights[m];
            int32_t ahead = 0;
            for (int32_t other = 0; other < size; ++other) {
              const int64_t theirs = s.weights[other];
              ahead += theirs > mine || (theirs == mine && other < m);
            }
            s.nonzero[m] = ahead < a.k;
          }
          __syncthreads();
          for (int32_t m = threadIdx.x; m < size; m += kThreads)
            if (!s.nonzero[m]) s.weights[m] = 0;
          __syncthreads();
        }
        if (warp == 0) {  // list the nonzero weights in index order
          for (int32_t base = 0; base < size; base += 32) {
            const int32_t m = base + lane;
            const bool keep = m < size && s.weights[m] != 0;
            const uint32_t ballot = __ballot_sync(kFullMask, keep);
            if (keep) s.nonzero[nonzero_count + __popc(ballot & ((1u << lane) - 1u))] = m;
            __syncwarp();
            if (lane == 0) nonzero_count += __popc(ballot);
            __syncwarp();
          }
        }
        __syncthreads();
        if (a.stop_on_similarity && threadIdx.x == 0 && best_similarity <= a.theta_units) similar = 0;

        // projection: one warp per packed word, lane b owns entry 32 w + b
        const int32_t count = nonzero_count;
        for (int32_t w = warp; w < a.words; w += kWarps) {
          Acc p = 0;
          for (int32_t j = 0; j < count; ++j) {
            const int32_t m = s.nonzero[j];
            const uint32_t word = __ldg(a.projection_rows + (first_row + m) * a.words + w);
            const Acc weight = static_cast<Acc>(s.weights[m]);
            p += ((word >> lane) & 1) ? -weight : weight;
          }
          const uint32_t fresh = __ballot_sync(kFullMask, p < 0) & valid_bits(a.dim, w);
          if (lane == 0) {
            if (fresh != estimate[w]) atomicOr(&changed, 1);  // warps race here: plain stores would be a data race
            estimate[w] = fresh;
            if (!a.parallel) s.running[w] = s.unbound[w] ^ fresh;
          }
        }
        __syncthreads();
      }
      if (a.parallel) {
        product_of_estimates(a, s, composite);
        __syncthreads();
      }
      ++sweep;
      converged = a.stop_on_similarity ? similar != 0 : changed == 0;
      if (a.detect_cycles && !converged) {
        const int64_t slots = a.detect_cycles + 1;
        for (int32_t p = 2; p <= a.detect_cycles && sweep - p >= 0 && period == 0; ++p) {
          const uint32_t* past = history + ((sweep - p) % slots) * state_words;
          bool differs = false;
          for (int64_t i = threadIdx.x; i < state_words; i += kThreads) differs = differs || past[i] != s.state[i];
          if (!__syncthreads_or(differs)) period = p;
        }
        uint32_t* slot = history + (sweep % slots) * state_words;
        for (int64_t i = threadIdx.x; i < state_words; i += kThreads) slot[i] = s.state[i];
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      a.iterations[row] = static_cast<int32_t>(sweep);
      a.converged[row] = converged;
      a.cycle[row] = period;
    }

    // readout: argmax_m |<xhat_f, X_f[m]>|, the first on ties; a known factor reports its index
    for (int32_t f = 0; f < a.factors; ++f) {
      const uint32_t* estimate = s.state + f * a.words;
      int32_t best_abs = -1, best_index = 0, best_score = 0;
      for (int32_t m = warp; m < a.sizes[f]; m += kWarps) {
        const uint32_t* codevector = a.projection_rows + (static_cast<int64_t>(a.offsets[f]) + m) * a.words;
        int32_t distance = 0;
        for (int32_t w = lane; w < a.words; w += 32) distance += __popc(__ldg(codevector + w) ^ estimate[w]);
        const int32_t score = a.dim - 2 * __shfl_sync(kFullMask, warp_sum(distance), 0);
        const bool chosen = known && known[f] >= 0 ? m == known[f] : abs(score) > best_abs;
        if (chosen) {
          best_abs = known && known[f] >= 0 ? a.dim + 1 : abs(score);
          best_index = m;
          best_score = score;
        }
      }
      if (lane == 0) {
        warp_best_abs[warp] = best_abs;
        warp_best_index[warp] = best_index;
        warp_best_score[warp] = best_score;
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        int chosen = 0;
        for (int i = 1; i < kWarps; ++i)
          if (warp_best_abs[i] > warp_best_abs[chosen] ||
              (warp_best_abs[i] == warp_best_abs[chosen] && warp_best_index[i] < warp_best_index[chosen]))
            chosen = i;
        a.indices[row * a.factors + f] = warp_best_index[chosen];
        a.similarities[row * a.factors + f] = static_cast<float>(static_cast<double>(warp_best_score[chosen]) / a.dim);
      }
      __syncthreads();
    }
  }
}

// Dynamic shared memory is the opt-in maximum per block less the kernel's static shared memory.
template <typename Acc>
cudaError_t max_codebook_size(const ResonatorBitsArgs& args, int device, int64_t* size) {
  int optin = 0;
  PI_TRY(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  cudaFuncAttributes attributes{};
  PI_TRY(cudaFuncGetAttributes(&attributes, resonator_bits_kernel<Acc>));
  ResonatorBitsArgs without_codebooks = args;
  without_codebooks.max_size = 0;
  const int64_t left = int64_t{optin} - static_cast<int64_t>(attributes.sharedSizeBytes) -
                       static_cast<int64_t>(shared_bytes(without_codebooks));
  *size = std::max<int64_t>(left, 0) / static_cast<int64_t>(kSharedBytesPerLatent);
  return cudaSuccess;
}

template <typename Acc>
cudaError_t grid_for(const ResonatorBitsArgs& args, int device, int32_t* grid) {
  int sms = 0, per_sm = 0;
  PI_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const size_t bytes = shared_bytes(args);
  if (bytes > 48 * 1024)
    PI_TRY(cudaFuncSetAttribute(resonator_bits_kernel<Acc>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                static_cast<int>(bytes)));
  PI_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, resonator_bits_kernel<Acc>, kThreads, bytes));
  const int64_t blocks = std::min<int64_t>(args.batch, static_cast<int64_t>(std::max(per_sm, 1)) * sms);
  *grid = static_cast<int32_t>(std::max<int64_t>(blocks, 1));
  return cudaSuccess;
}

}  // namespace

cudaError_t resonator_bits_pack_signs(const int8_t* values, int64_t rows, int32_t dim, int32_t words,
                                      uint32_t* out, cudaStream_t stream) {
  const int64_t total = rows * words;
  if (total == 0) return cudaSuccess;
  pack_sign_bits_kernel<<<static_cast<unsigned>((total + 255) / 256), 256, 0, stream>>>(values, rows, dim, words, out);
  return cudaGetLastError();
}

cudaError_t resonator_bits_superpositions(const uint32_t* projection_rows, const int32_t* offsets,
                                          const int32_t* sizes, int32_t factors, int32_t dim, int32_t words,
                                          uint32_t* out, cudaStream_t stream) {
  const int64_t threads = static_cast<int64_t>(factors) * words * 32;
  superposition_bits_kernel<<<static_cast<unsigned>((threads + 255) / 256), 256, 0, stream>>>(
      projection_rows, offsets, sizes, factors, dim, words, out);
  return cudaGetLastError();
}

// int32 sums are exact while M_f * D < 2^31 (the glue checks it); noise needs int64.
cudaError_t resonator_bits_max_codebook_size(const ResonatorBitsArgs& args, int device, int64_t* size) {
  return args.noise > 0 ? max_codebook_size<int64_t>(args, device, size)
                        : max_codebook_size<int32_t>(args, device, size);
}

cudaError_t resonator_bits_grid(const ResonatorBitsArgs& args, int device, int32_t* grid) {
  return args.noise > 0 ? grid_for<int64_t>(args, device, grid) : grid_for<int32_t>(args, device, grid);
}

cudaError_t resonator_bits(const ResonatorBitsArgs& args, int32_t grid, cudaStream_t stream) {
  if (args.batch == 0) return cudaSuccess;
  const size_t bytes = shared_bytes(args);
  if (args.noise > 0)
    resonator_bits_kernel<int64_t><<<grid, kThreads, bytes, stream>>>(args);
  else
    resonator_bits_kernel<int32_t><<<grid, kThreads, bytes, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace pyinterp::cuda
