// Resonator-network search on bit-packed +-1 vectors, one problem per worker at a time.
// The rules (init, sweeps, stopping, noise, readout) are those of pyinterp/reference/resonator.py;
// this file reproduces its trajectory exactly with integer arithmetic:
//   similarity  a_m = D - 2 popcount(X_f[m] XOR u)            (XNOR-popcount on packed bits)
//   projection  p_d = sum_m X_f[m, d] w_m = sum(w) - 2 q_d,   q_d = sum_m b_md w_m, b = 1 where X = -1
// q is computed limb by limb: w = sum_j 256^j w_j with signed digits w_j in [-128, 127]; a limb that
// is dense goes through VNNI u8 x s8 dot products (64 MACs per instruction), a sparse one (few
// similarities beyond +-127, or the few survivors of threshold / top-k) through masked adds.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "checks.h"

namespace {

constexpr int kMaxLimbs = 8;  // signed base-256 digits of an int64

// ---- counter-based noise: the integer definition of pyinterp.reference.resonator.noise_units ----
inline uint64_t mix64(uint64_t x) {
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

inline uint64_t noise_key(uint64_t seed, uint64_t row, uint64_t sweep, uint64_t factor) {
  return mix64(mix64(mix64(seed) ^ row) ^ ((sweep << 16) | factor));
}

// sigma * z in units of 2^-16, z * 2^16 the Irwin-Hall sum of twelve 16-bit uniforms minus its mean.
inline int64_t noise_units(uint64_t key, int64_t m, double sigma) {
  int64_t total = 0;
  for (uint64_t word = 0; word < 3; ++word) {
    const uint64_t bits = mix64(key + (3 * static_cast<uint64_t>(m) + word + 1) * 0x9E3779B97F4A7C15ull);
    total += static_cast<int64_t>((bits & 0xFFFF) + ((bits >> 16) & 0xFFFF) + ((bits >> 32) & 0xFFFF) +
                                  (bits >> 48));
  }
  // One rounded product, rounded half to even like torch.round.
  return static_cast<int64_t>(std::nearbyint(sigma * static_cast<double>(total - 393210)));
}

// ---- codebooks in the layouts the kernels read ----
struct Codebook {
  int64_t size = 0;    // M_f
  int64_t size8 = 0;   // M_f rounded up to 8 (similarity columns)
  int64_t groups = 0;  // ceil(M_f / 4): 4 codevectors per VNNI dot product
  std::vector<uint64_t> similarity_columns;  // [words][size8]: word w of similarity codevector m
  std::vector<uint64_t> projection_rows;     // [size][words]
  // [blocks / 8][groups][8 blocks]: bit 4 * lane + r of tile (block, g) is b[4 g + r, 16 block + lane],
  // the byte order of a VNNI dot product; the 8 tiles of one group share a cache line.
  std::vector<uint64_t> projection_tiles;
  std::vector<uint64_t> superposition;       // [words]: sgn(sum_m X[m]) with ties to +1
};

struct Shape {
  int64_t dim;     // D
  int64_t words;   // ceil(D / 64): packed words of a vector
  int64_t padded;  // D rounded up to 128: the length of every per-d buffer
  int64_t blocks;  // padded / 16, a multiple of 8: blocks of 16 d in the projection tiles
};

// Packs the signs of a +-1 row; returns false if it holds any other value.
bool pack_row(const int8_t* row, const Shape& shape, uint64_t* out) {
  bool bipolar = true;
  for (int64_t w = 0; w < shape.words; ++w) {
    uint64_t bits = 0;
    const int64_t end = std::min<int64_t>(64, shape.dim - w * 64);
    for (int64_t b = 0; b < end; ++b) {
      const int8_t value = row[w * 64 + b];
      bipolar = bipolar && (value == 1 || value == -1);
      bits |= static_cast<uint64_t>(value < 0) << b;
    }
    out[w] = bits;
  }
  return bipolar;
}

// Spreads the 16 bits of x to bits 0, 4, 8, ..., 60.
inline uint64_t spread_by_4(uint64_t x) {
  x = (x | (x << 24)) & 0x000000FF000000FFull;
  x = (x | (x << 12)) & 0x000F000F000F000Full;
  x = (x | (x << 6)) & 0x0303030303030303ull;
  return (x | (x << 3)) & 0x1111111111111111ull;
}

inline int64_t tile_index(const Codebook& book, int64_t block, int64_t group) {
  return ((block / 8) * book.groups + group) * 8 + block % 8;
}

Codebook prepare_codebook(const int8_t* similarity, const int8_t* projection, int64_t size,
                          const Shape& shape, bool& bipolar) {
  Codebook book;
  book.size = size;
  book.size8 = (size + 7) / 8 * 8;
  book.groups = (size + 3) / 4;
  book.similarity_columns.assign(shape.words * book.size8, 0);
  book.projection_rows.assign(size * shape.words, 0);
  book.projection_tiles.assign(shape.blocks * book.groups, 0);
  book.superposition.assign(shape.words, 0);
  std::vector<uint64_t> packed(shape.words);
  std::vector<int32_t> column_sum(shape.dim, 0);
  for (int64_t m = 0; m < size; ++m) {
    const int8_t* row = projection + m * shape.dim;
    uint64_t* packed_row = book.projection_rows.data() + m * shape.words;
    bipolar = pack_row(row, shape, packed_row) && bipolar;
    if (similarity != projection)  // asymmetric codebooks: the similarity rows differ
      bipolar = pack_row(similarity + m * shape.dim, shape, packed.data()) && bipolar;
    const uint64_t* similarity_row = similarity != projection ? packed.data() : packed_row;
    for (int64_t w = 0; w < shape.words; ++w) book.similarity_columns[w * book.size8 + m] = similarity_row[w];
    for (int64_t d = 0; d < shape.dim; ++d) column_sum[d] += row[d];
  }
  // tile (block, g): the 16-bit slices of rows 4g..4g+3 over block's 16 entries, interleaved
  const uint16_t* slices = reinterpret_cast<const uint16_t*>(book.projection_rows.data());
  for (int64_t block = 0; block < shape.words * 4; ++block)
    for (int64_t m = 0; m < size; ++m)
      book.projection_tiles[tile_index(book, block, m / 4)] |=
          spread_by_4(slices[m * shape.words * 4 + block]) << (m % 4);
  for (int64_t d = 0; d < shape.dim; ++d)
    book.superposition[d >> 6] |= static_cast<uint64_t>(column_sum[d] < 0) << (d & 63);
  return book;
}

// ---- the four inner loops, portable and AVX-512 ----
// similarity: a[m] = D - 2 popcount(X[m] ^ u) for m < size
// dense_limb: q[d] = sum_m b[m, d] limb[m] over all blocks (limb padded to groups * 4)
// sparse_limb: q[d] = sum over the listed m of limb[m] b[m, d], the few nonzero digits
// combine_sign: bit d of out = (p_d < 0), p_d = wsum - 2 q_d, q_d = sum_j 256^j q_j[d]; bits past D 0.
//   narrow: every |p_d| and |q_d| < 2^31, so int32 arithmetic (wrapping in the partial sums) is exact,
//   and p_d < 0 <=> q_d > floor(wsum / 2).
struct Portable {
  static void similarity(const Codebook& book, const uint64_t* u, const Shape& shape, int32_t* a) {
    for (int64_t m = 0; m < book.size; ++m) {
      int64_t distance = 0;
      for (int64_t w = 0; w < shape.words; ++w)
        distance += __builtin_popcountll(book.similarity_columns[w * book.size8 + m] ^ u[w]);
      a[m] = static_cast<int32_t>(shape.dim - 2 * distance);
    }
  }
  static void dense_limb(const Codebook& book, const int8_t* limb, const Shape& shape, int32_t* q) {
    for (int64_t block = 0; block < shape.blocks; ++block) {
      int32_t acc[16] = {0};
      for (int64_t g = 0; g < book.groups; ++g) {
        const uint64_t tile = book.projection_tiles[tile_index(book, block, g)];
        for (int bit = 0; bit < 64; ++bit) acc[bit / 4] += static_cast<int32_t>((tile >> bit) & 1) * limb[g * 4 + bit % 4];
      }
      std::memcpy(q + block * 16, acc, sizeof(acc));
    }
  }
  static void sparse_limb(const Codebook& book, const int8_t* limb, const int32_t* rows, int64_t count,
                          const Shape& shape, int32_t* q) {
    std::fill(q, q + shape.padded, 0);
    for (int64_t i = 0; i < count; ++i) {
      const uint64_t* row = book.projection_rows.data() + rows[i] * shape.words;
      for (int64_t d = 0; d < shape.dim; ++d)
        q[d] += limb[rows[i]] * static_cast<int32_t>((row[d >> 6] >> (d & 63)) & 1);
    }
  }
  static void combine_sign(const int32_t* const* q, int limbs, int64_t wsum, bool /*narrow*/,
                           const Shape& shape, uint64_t* out) {
    std::fill(out, out + shape.words, 0);
    for (int64_t d = 0; d < shape.dim; ++d) {
      int64_t acc = 0;
      for (int j = limbs - 1; j >= 0; --j) acc = acc * 256 + q[j][d];
      out[d >> 6] |= static_cast<uint64_t>(wsum - 2 * acc < 0) << (d & 63);
    }
  }
};

#define PYINTERP_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vpopcntdq")))

struct Avx512 {
  PYINTERP_AVX512 static void similarity(const Codebook& book, const uint64_t* u, const Shape& shape,
                                         int32_t* a) {
    for (int64_t m0 = 0; m0 < book.size8; m0 += 8) {
      __m512i distance = _mm512_setzero_si512();
      const uint64_t* column = book.similarity_columns.data() + m0;
      for (int64_t w = 0; w < shape.words; ++w, column += book.size8) {
        const __m512i x = _mm512_xor_si512(_mm512_loadu_si512(column), _mm512_set1_epi64(static_cast<long long>(u[w])));
        distance = _mm512_add_epi64(distance, _mm512_popcnt_epi64(x));
      }
      const __m512i sim = _mm512_sub_epi64(_mm512_set1_epi64(shape.dim), _mm512_slli_epi64(distance, 1));
      alignas(64) int64_t values[8];
      _mm512_store_si512(values, sim);
      for (int64_t i = 0; i < 8 && m0 + i < book.size; ++i) a[m0 + i] = static_cast<int32_t>(values[i]);
    }
  }
  PYINTERP_AVX512 static void dense_limb(const Codebook& book, const int8_t* limb, const Shape& shape,
                                         int32_t* q) {
    // Bit tiles expand to 0/1 bytes in a register (8 bytes read per 64 multiply-adds instead of 64:
    // the codebooks stay in L1/L2). Eight blocks of 16 d at a time: eight independent accumulator
    // chains hide the dot-product latency.
    constexpr int64_t kChains = 8;
    const __m512i ones = _mm512_set1_epi8(1);
    for (int64_t block = 0; block < shape.blocks; block += kChains) {
      __m512i acc[kChains];
      for (auto& chain : acc) chain = _mm512_setzero_si512();
      const uint64_t* tiles = book.projection_tiles.data() + block * book.groups;
      for (int64_t g = 0; g < book.groups; ++g, tiles += kChains) {
        int32_t four;
        std::memcpy(&four, limb + g * 4, 4);
        const __m512i weights = _mm512_set1_epi32(four);
        for (int64_t c = 0; c < kChains; ++c)
          acc[c] = _mm512_dpbusd_epi32(acc[c], _mm512_maskz_mov_epi8(_cvtu64_mask64(tiles[c]), ones), weights);
      }
      for (int64_t c = 0; c < kChains; ++c) _mm512_storeu_si512(q + (block + c) * 16, acc[c]);
    }
  }
  PYINTERP_AVX512 static void sparse_limb(const Codebook& book, const int8_t* limb, const int32_t* rows,
                                          int64_t count, const Shape& shape, int32_t* q) {
    // Block by block, every listed row added in a register: one load and store per 16 d.
    for (int64_t block = 0; block < shape.blocks; ++block) {
      __m512i acc = _mm512_setzero_si512();
      for (int64_t i = 0; i < count; ++i) {
        const uint16_t* row = reinterpret_cast<const uint16_t*>(book.projection_rows.data() + rows[i] * shape.words);
        const __mmask16 mask = block < shape.words * 4 ? row[block] : 0;
        acc = _mm512_mask_add_epi32(acc, mask, acc, _mm512_set1_epi32(limb[rows[i]]));
      }
      _mm512_storeu_si512(q + block * 16, acc);
    }
  }
  PYINTERP_AVX512 static void combine_sign(const int32_t* const* q, int limbs, int64_t wsum, bool narrow,
                                           const Shape& shape, uint64_t* out) {
    if (narrow) {
      const __m512i half = _mm512_set1_epi32(static_cast<int32_t>(wsum >> 1));  // floor(wsum / 2)
      for (int64_t w = 0; w < shape.words; ++w) {
        uint64_t word = 0;
        for (int part = 0; part < 4; ++part) {
          const int64_t d = w * 64 + part * 16;
          __m512i acc = _mm512_loadu_si512(q[limbs - 1] + d);
          for (int j = limbs - 2; j >= 0; --j)
            acc = _mm512_add_epi32(_mm512_slli_epi32(acc, 8), _mm512_loadu_si512(q[j] + d));
          word |= static_cast<uint64_t>(_mm512_cmpgt_epi32_mask(acc, half)) << (part * 16);
        }
        const int64_t valid = shape.dim - w * 64;
        out[w] = valid >= 64 ? word : word & ((uint64_t{1} << valid) - 1);
      }
      return;
    }
    const __m512i total = _mm512_set1_epi64(wsum);
    for (int64_t w = 0; w < shape.words; ++w) {
      uint64_t word = 0;
      for (int part = 0; part < 8; ++part) {
        const int64_t d = w * 64 + part * 8;
        __m512i acc = _mm512_setzero_si512();
        for (int j = limbs - 1; j >= 0; --j)
          acc = _mm512_add_epi64(_mm512_slli_epi64(acc, 8),
                                 _mm512_cvtepi32_epi64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[j] + d))));
        const __mmask8 negative_p = _mm512_cmplt_epi64_mask(_mm512_sub_epi64(total, _mm512_slli_epi64(acc, 1)),
                                                            _mm512_setzero_si512());
        word |= static_cast<uint64_t>(negative_p) << (part * 8);
      }
      const int64_t valid = shape.dim - w * 64;
      out[w] = valid >= 64 ? word : word & ((uint64_t{1} << valid) - 1);
    }
  }
};

// ---- one problem's sweeps ----
struct Settings {
  int64_t max_iters;
  bool parallel;
  enum class Activation { identity, threshold, topk } activation;
  int64_t k;
  int64_t threshold_units;
  double noise;
  uint64_t seed;
  bool stop_on_similarity;
  int64_t theta_units;
  int64_t detect_cycles;
};

Settings::Activation parse_activation(const std::string& name) {
  if (name == "identity") return Settings::Activation::identity;
  if (name == "threshold") return Settings::Activation::threshold;
  TORCH_CHECK(name == "topk", "resonator_bits: activation must be identity, threshold or topk, got ", name);
  return Settings::Activation::topk;
}

struct Outputs {
  int32_t* indices;
  int32_t* iterations;
  bool* converged;
  int32_t* cycle;
  float* similarities;
};

template <class Isa>
class Solver {
 public:
  Solver(const std::vector<Codebook>& books, const Shape& shape, const Settings& settings)
      : books_(books), shape_(shape), settings_(settings), factors_(static_cast<int64_t>(books.size())) {
    int64_t groups = 0;
    for (const auto& book : books) groups = std::max(groups, book.groups);
    state_.resize(factors_ * shape.words);
    running_.resize(shape.words);
    unbound_.resize(shape.words);
    fresh_.resize(shape.words);
    similarity_.resize(groups * 4);
    weights_.resize(groups * 4);
    limbs_.resize(kMaxLimbs * groups * 4);
    sums_.resize(kMaxLimbs * shape.padded);
    order_.resize(groups * 4);
    if (settings.detect_cycles) history_.resize((settings.detect_cycles + 1) * state_.size());
  }

  void solve(int64_t row, const uint64_t* composite, const int32_t* known, const Outputs& out) {
    const int64_t words = shape_.words;
    for (int64_t f = 0; f < factors_; ++f) {
      const uint64_t* start = known && known[f] >= 0
                                  ? books_[f].projection_rows.data() + known[f] * words
                                  : books_[f].superposition.data();
      std::copy(start, start + words, estimate(f));
    }
    product_of_estimates(composite);
    if (settings_.detect_cycles) std::copy(state_.begin(), state_.end(), history_.begin());

    bool converged = false;
    int64_t period = 0, sweep = 0;
    while (sweep < settings_.max_iters && !converged && period == 0) {
      bool changed = false, similar = true;
      for (int64_t f = 0; f < factors_; ++f) {
        if (known && known[f] >= 0) continue;  // fixed estimate: u, a and the update change nothing
        uint64_t* current = estimate(f);
        for (int64_t w = 0; w < words; ++w) unbound_[w] = running_[w] ^ current[w];
        const Codebook& book = books_[f];
        Isa::similarity(book, unbound_.data(), shape_, similarity_.data());
        if (settings_.stop_on_similarity) {
          int64_t best = 0;
          for (int64_t m = 0; m < book.size; ++m) best = std::max<int64_t>(best, std::abs(similarity_[m]));
          similar = similar && best > settings_.theta_units;
        }
        activate(book, row, sweep, f);
        project(book);
        for (int64_t w = 0; w < words; ++w) {
          changed = changed || fresh_[w] != current[w];
          current[w] = fresh_[w];
          if (!settings_.parallel) running_[w] = unbound_[w] ^ fresh_[w];
        }
      }
      if (settings_.parallel) product_of_estimates(composite);
      ++sweep;
      converged = settings_.stop_on_similarity ? similar : !changed;
      if (settings_.detect_cycles && !converged) period = detect_cycle(sweep);
    }
    out.iterations[row] = static_cast<int32_t>(sweep);
    out.converged[row] = converged;
    out.cycle[row] = static_cast<int32_t>(period);
    readout(row, known, out);
  }

 private:
  uint64_t* estimate(int64_t f) { return state_.data() + f * shape_.words; }

  void product_of_estimates(const uint64_t* composite) {
    std::copy(composite, composite + shape_.words, running_.begin());
    for (int64_t f = 0; f < factors_; ++f)
      for (int64_t w = 0; w < shape_.words; ++w) running_[w] ^= estimate(f)[w];
  }

  // weights_ = activation(similarity * scale + noise), the integers the projection sums
  void activate(const Codebook& book, int64_t row, int64_t sweep, int64_t f) {
    const int64_t size = book.size;
    if (settings_.noise > 0) {
      const uint64_t key = noise_key(settings_.seed, row, sweep, f);
      for (int64_t m = 0; m < size; ++m)
        weights_[m] = (int64_t{similarity_[m]} << 16) + noise_units(key, m, settings_.noise);
    } else {
      for (int64_t m = 0; m < size; ++m) weights_[m] = similarity_[m];
    }
    if (settings_.activation == Settings::Activation::threshold) {
      for (int64_t m = 0; m < size; ++m)
        if (weights_[m] < settings_.threshold_units) weights_[m] = 0;
    } else if (settings_.activation == Settings::Activation::topk) {
      for (int64_t m = 0; m < size; ++m) order_[m] = static_cast<int32_t>(m);
      const auto larger = [&](int32_t i, int32_t j) {
        return weights_[i] > weights_[j] || (weights_[i] == weights_[j] && i < j);
      };
      std::nth_element(order_.begin(), order_.begin() + (settings_.k - 1), order_.begin() + size, larger);
      for (int64_t r = settings_.k; r < size; ++r) weights_[order_[r]] = 0;
    }
  }

  // fresh_ = sgn(X^T weights_) packed, via signed base-256 limbs
  void project(const Codebook& book) {
    const int64_t padded = book.groups * 4;
    int64_t wsum = 0, largest = 0;
    for (int64_t m = 0; m < book.size; ++m) {
      wsum += weights_[m];
      largest = std::max(largest, std::abs(weights_[m]));
    }
    // L signed digits in [-128, 127] represent every |x| <= 127 (256^L - 1) / 255.
    int limbs = 1;
    for (int64_t reach = 127; largest > reach; reach = reach * 256 + 127) ++limbs;
    for (int64_t m = 0; m < padded; ++m) {
      int64_t value = m < book.size ? weights_[m] : 0;
      for (int j = 0; j < limbs; ++j) {
        const int8_t digit = static_cast<int8_t>(value);  // value mod 256 in [-128, 127]
        limbs_[j * padded + m] = digit;
        value = (value - digit) >> 8;  // exact: value - digit is a multiple of 256
      }
    }
    const int32_t* sums[kMaxLimbs];
    const int64_t stride = shape_.padded;
    for (int j = 0; j < limbs; ++j) {
      const int8_t* limb = limbs_.data() + j * padded;
      int32_t* q = sums_.data() + j * stride;
      sums[j] = q;
      int64_t nonzero = 0;
      for (int64_t m = 0; m < book.size; ++m)
        if (limb[m] != 0) order_[nonzero++] = static_cast<int32_t>(m);
      // A masked add per 16 d costs about what a 4-codevector dot product does: dense past M / 4.
      if (nonzero * 4 > book.size)
        Isa::dense_limb(book, limb, shape_, q);
      else
        Isa::sparse_limb(book, limb, order_.data(), nonzero, shape_, q);
    }
    const bool narrow = largest * book.size < (int64_t{1} << 31);
    Isa::combine_sign(sums, limbs, wsum, narrow, shape_, fresh_.data());
  }

  // the smallest period p in [2, L] with state == state p sweeps ago, or 0
  int64_t detect_cycle(int64_t sweep) {
    const int64_t slots = settings_.detect_cycles + 1;
    const size_t size = state_.size();
    int64_t period = 0;
    for (int64_t p = 2; p <= settings_.detect_cycles && sweep - p >= 0 && period == 0; ++p)
      if (std::equal(state_.begin(), state_.end(), history_.begin() + ((sweep - p) % slots) * size)) period = p;
    std::copy(state_.begin(), state_.end(), history_.begin() + (sweep % slots) * size);
    return period;
  }

  void readout(int64_t row, const int32_t* known, const Outputs& out) {
    for (int64_t f = 0; f < factors_; ++f) {
      const Codebook& book = books_[f];
      const uint64_t* current = estimate(f);
      int64_t best_index = 0, best = 0, best_abs = -1;
      for (int64_t m = 0; m < book.size; ++m) {
        int64_t distance = 0;
        const uint64_t* codevector = book.projection_rows.data() + m * shape_.words;
        for (int64_t w = 0; w < shape_.words; ++w) distance += __builtin_popcountll(codevector[w] ^ current[w]);
        const int64_t score = shape_.dim - 2 * distance;
        const bool chosen = known && known[f] >= 0 ? m == known[f] : std::abs(score) > best_abs;
        if (chosen) {
          best_index = m;
          best = score;
          best_abs = std::abs(score);
        }
      }
      out.indices[row * factors_ + f] = static_cast<int32_t>(best_index);
      out.similarities[row * factors_ + f] = static_cast<float>(static_cast<double>(best) / shape_.dim);
    }
  }

  const std::vector<Codebook>& books_;
  const Shape shape_;
  const Settings settings_;
  const int64_t factors_;
  std::vector<uint64_t> state_, running_, unbound_, fresh_, history_;
  std::vector<int32_t> similarity_, sums_, order_;
  std::vector<int64_t> weights_;
  std::vector<int8_t> limbs_;
};

bool use_avx512() {
  const char* choice = std::getenv("PYINTERP_CPU_ISA");  // "portable" forces the portable loops
  if (choice && std::string(choice) == "portable") return false;
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
         __builtin_cpu_supports("avx512vpopcntdq");
}

template <class Isa>
void solve_all(const std::vector<Codebook>& books, const Shape& shape, const Settings& settings,
               const std::vector<uint64_t>& composites, const int32_t* known, const Outputs& out,
               int64_t batch) {
  // Problems take very different numbers of sweeps: workers pull the next one from a shared counter.
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), batch);
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t worker = begin; worker < end; ++worker) {
      Solver<Isa> solver(books, shape, settings);
      for (int64_t row = next.fetch_add(1); row < batch; row = next.fetch_add(1))
        solver.solve(row, composites.data() + row * shape.words,
                     known ? known + row * static_cast<int64_t>(books.size()) : nullptr, out);
    }
  });
}

void check_int8_matrix(const at::Tensor& t, const char* name, int64_t rows, int64_t dim) {
  pyinterp::cpu::check_cpu("resonator_bits", name, t);
  TORCH_CHECK(t.dtype() == at::kChar, "resonator_bits: ", name, " must be int8 (+-1), got ", t.dtype());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == dim, "resonator_bits: ", name,
              " must have shape (", rows, ", ", dim, "), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "resonator_bits: ", name, " must be contiguous");
}

constexpr const char* kNotBipolar = " must hold only -1 and +1 (bit-packed arithmetic)";

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> resonator_bits_cpu(
    const at::Tensor& s, const at::Tensor& similarity_codebooks, const at::Tensor& projection_codebooks,
    at::IntArrayRef sizes, const std::optional<at::Tensor>& known, int64_t max_iters, bool parallel,
    c10::string_view activation, int64_t k, int64_t threshold_units, double noise, int64_t seed,
    c10::string_view stop, int64_t theta_units, int64_t detect_cycles) {
  TORCH_CHECK(s.dim() == 2, "resonator_bits: s must be (B, D), got ", s.sizes());
  const int64_t batch = s.size(0), dim = s.size(1), factors = static_cast<int64_t>(sizes.size());
  TORCH_CHECK(dim >= 1 && factors >= 1, "resonator_bits: need D >= 1 and at least one codebook");
  int64_t total = 0, largest = 0;
  for (int64_t size : sizes) {
    TORCH_CHECK(size >= 1, "resonator_bits: every codebook needs M_f >= 1, got ", sizes);
    total += size;
    largest = std::max(largest, size);
  }
  check_int8_matrix(s, "s", batch, dim);
  check_int8_matrix(similarity_codebooks, "similarity_codebooks", total, dim);
  check_int8_matrix(projection_codebooks, "projection_codebooks", total, dim);
  TORCH_CHECK(max_iters >= 1, "resonator_bits: max_iters must be >= 1, got ", max_iters);
  TORCH_CHECK(noise >= 0 && std::isfinite(noise), "resonator_bits: noise must be finite and >= 0");
  TORCH_CHECK(noise > 0 || largest * dim < (int64_t{1} << 31),
              "resonator_bits: max M_f * D must stay below 2^31 for int32 sums");
  TORCH_CHECK(detect_cycles == 0 || detect_cycles >= 2, "resonator_bits: detect_cycles must be 0 or >= 2");
  TORCH_CHECK(stop == "fixed_point" || stop == "similarity",
              "resonator_bits: stop must be fixed_point or similarity");
  const Settings settings{max_iters, parallel, parse_activation(std::string(activation)), k,
                          threshold_units, noise, static_cast<uint64_t>(seed), stop == "similarity",
                          theta_units, detect_cycles};
  TORCH_CHECK(settings.activation != Settings::Activation::topk || (k >= 1 && k <= *std::min_element(sizes.begin(), sizes.end())),
              "resonator_bits: k must be in [1, min M_f], got ", k);
  at::Tensor known_rows;
  if (known.has_value()) {
    pyinterp::cpu::check_cpu("resonator_bits", "known", *known);
    known_rows = known->contiguous();
    TORCH_CHECK(known_rows.dtype() == at::kInt && known_rows.dim() == 2 && known_rows.size(0) == batch &&
                    known_rows.size(1) == factors,
                "resonator_bits: known must be int32 (B, F)");
    for (int64_t f = 0; f < factors; ++f) {
      const at::Tensor column = known_rows.select(1, f);
      TORCH_CHECK(batch == 0 || (column.min().item<int32_t>() >= -1 && column.max().item<int32_t>() < sizes[f]),
                  "resonator_bits: known[:, ", f, "] must be -1 or an index below M_", f, " = ", sizes[f]);
    }
  }

  const Shape shape{dim, (dim + 63) / 64, (dim + 127) / 128 * 128, (dim + 127) / 128 * 8};
  std::vector<Codebook> books;
  const int8_t* similarity = similarity_codebooks.data_ptr<int8_t>();
  const int8_t* projection = projection_codebooks.data_ptr<int8_t>();
  bool bipolar_codebooks = true;
  for (int64_t size : sizes) {
    books.push_back(prepare_codebook(similarity, projection, size, shape, bipolar_codebooks));
    similarity += size * dim;
    projection += size * dim;
  }
  TORCH_CHECK(bipolar_codebooks, "resonator_bits: the codebooks", kNotBipolar);
  std::vector<uint64_t> composites(batch * shape.words);
  std::atomic<bool> bipolar_s{true};
  at::parallel_for(0, batch, 256, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row)
      if (!pack_row(s.data_ptr<int8_t>() + row * dim, shape, composites.data() + row * shape.words))
        bipolar_s = false;
  });
  TORCH_CHECK(bipolar_s.load(), "resonator_bits: s", kNotBipolar);

  const auto int_options = s.options().dtype(at::kInt);
  at::Tensor indices = at::empty({batch, factors}, int_options);
  at::Tensor iterations = at::empty({batch}, int_options);
  at::Tensor converged = at::empty({batch}, s.options().dtype(at::kBool));
  at::Tensor cycle = at::empty({batch}, int_options);
  at::Tensor similarities = at::empty({batch, factors}, s.options().dtype(at::kFloat));
  const Outputs out{indices.data_ptr<int32_t>(), iterations.data_ptr<int32_t>(), converged.data_ptr<bool>(),
                    cycle.data_ptr<int32_t>(), similarities.data_ptr<float>()};
  const int32_t* known_ptr = known.has_value() ? known_rows.data_ptr<int32_t>() : nullptr;
  if (batch > 0) {
    if (use_avx512())
      solve_all<Avx512>(books, shape, settings, composites, known_ptr, out, batch);
    else
      solve_all<Portable>(books, shape, settings, composites, known_ptr, out, batch);
  }
  return {indices, iterations, converged, cycle, similarities};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyinterp, CPU, m) {
  m.impl("resonator_bits", &resonator_bits_cpu);
}
