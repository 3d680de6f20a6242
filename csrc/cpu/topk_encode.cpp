// CPU top-k SAE encoder (pyinterp::topk_encode_forward, schema in csrc/bindings.cpp).
// z = (x - b_dec) @ W_enc^T + b_enc comes tile by tile from the shared tiled GEMM (encoder_tiles.h)
// and each row of a tile is streamed into a running top-k, so the N x M pre-activations never exist.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "encoder_tiles.h"

namespace {

using namespace pyinterp::cpu;

// The scan tests this many pre-activations against the threshold at once.
constexpr int64_t kScanChunk = 16;

// Whether some v = z[l] + bias[l], l < kScanChunk, passes `!(v <= thr)` (NaN passes): a few vector
// compares for the common case, a chunk with nothing to offer.
template <typename T>
inline bool chunk_passes(const T* z, const T* bias, T thr) {
  typedef T vec_t __attribute__((vector_size(16)));
  constexpr int64_t lanes = 16 / sizeof(T);
  vec_t t;
  for (int64_t l = 0; l < lanes; ++l) t[l] = thr;
  using mask_t = decltype(t <= t);
  mask_t rejected = ~mask_t{};
  for (int64_t l = 0; l < kScanChunk; l += lanes) {
    vec_t zv, bv;
    std::memcpy(&zv, z + l, sizeof(zv));
    std::memcpy(&bv, bias + l, sizeof(bv));
    rejected &= (zv + bv) <= t;
  }
  uint64_t words[2];
  std::memcpy(words, &rejected, sizeof(words));
  return (words[0] & words[1]) != ~uint64_t{0};
}

// Running top-k of a block of rows. Candidates of a row arrive in increasing latent index, so a newcomer
// equal in value to the current k-th best loses the tie: one `v <= thr` rejects it. Accepted candidates
// pile up in a buffer of `cap` slots that is cut back to the best k (nth_element) when it fills; the
// k-th best after a cut is the new threshold. `extra` slots per row are left for finish_with().
template <typename T>
class RunningTopK {
 public:
  using K = Keys<T>;
  using key_t = typename K::key_t;

  RunningTopK(int64_t rows, int64_t k, int64_t cap, int64_t extra)
      : k_(k), cap_(cap), stride_(cap + extra), buf_(rows * stride_), count_(rows), thr_(rows),
        thr_v_(rows), has_thr_(rows) {}

  void reset(int64_t rows) {
    for (int64_t r = 0; r < rows; ++r) {
      count_[r] = 0;
      has_thr_[r] = 0;
      // NaN makes every `v <= thr` false: all candidates reach offer() until the first cut.
      thr_v_[r] = std::numeric_limits<T>::quiet_NaN();
    }
  }

  // z[j] + bias[j] for latents base + j, j in [0, len).
  void push_dense(int64_t r, const T* __restrict z, const T* __restrict bias, int32_t base,
                  int64_t len) {
    T thr = thr_v_[r];
    int64_t j = 0;
    for (; j + kScanChunk <= len; j += kScanChunk) {
      if (!chunk_passes(z + j, bias + j, thr)) continue;
      for (int64_t l = 0; l < kScanChunk; ++l) {
        const T v = z[j + l] + bias[j + l];
        if (!(v <= thr)) {
          offer(r, v, base + static_cast<int32_t>(j + l));
          thr = thr_v_[r];
        }
      }
    }
    for (; j < len; ++j) {
      const T v = z[j] + bias[j];
      if (!(v <= thr)) {
        offer(r, v, base + static_cast<int32_t>(j));
        thr = thr_v_[r];
      }
    }
  }

  // Only the latents in idx[0, n) (increasing, global indices); z is the tile starting at latent base
  // and bias is indexed globally.
  void push_list(int64_t r, const T* __restrict z, const T* __restrict bias,
                 const int32_t* __restrict idx, int64_t n, int32_t base) {
    T thr = thr_v_[r];
    for (int64_t j = 0; j < n; ++j) {
      const int32_t i = idx[j];
      const T v = z[i - base] + bias[i];
      if (!(v <= thr)) {
        offer(r, v, i);
        thr = thr_v_[r];
      }
    }
  }

  // The best `out_k` of row r together with `fill` (extra candidates, best first), best first.
  const key_t* finish_with(int64_t r, int64_t out_k, const std::vector<key_t>& fill) {
    key_t* b = row(r);
    int64_t n = count_[r];
    // Usually the row's own candidates already hold out_k better than every fill entry.
    if (n >= out_k) {
      std::nth_element(b, b + out_k - 1, b + n, K::better);
      if (fill.empty() || K::better(b[out_k - 1], fill.front())) {
        std::sort(b, b + out_k, K::better);
        return b;
      }
    }
    std::copy(fill.begin(), fill.end(), b + n);
    n += static_cast<int64_t>(fill.size());
    TORCH_INTERNAL_ASSERT(n <= stride_ && n >= out_k);
    std::nth_element(b, b + out_k - 1, b + n, K::better);
    std::sort(b, b + out_k, K::better);
    return b;
  }

 private:
  key_t* row(int64_t r) { return buf_.data() + r * stride_; }

  void offer(int64_t r, T v, int32_t i) {
    const key_t c = K::make(v, i);
    // A NaN threshold (none yet, or a NaN k-th best) lets everything through the fast test.
    if (has_thr_[r] && !K::better(c, thr_[r])) return;
    key_t* b = row(r);
    b[count_[r]++] = c;
    if (count_[r] == cap_) {
      std::nth_element(b, b + k_ - 1, b + cap_, K::better);
      count_[r] = k_;
      thr_[r] = b[k_ - 1];
      thr_v_[r] = K::value(b[k_ - 1]);
      has_thr_[r] = 1;
    }
  }

  int64_t k_, cap_, stride_;
  std::vector<key_t> buf_;
  std::vector<int64_t> count_;
  std::vector<key_t> thr_;
  std::vector<T> thr_v_;
  std::vector<uint8_t> has_thr_;
};

// Buffer slots for a running top-k over `universe` candidates: twice k (amortised O(1) cuts) but never
// more than the candidates themselves.
int64_t buffer_cap(int64_t k, int64_t universe) {
  return std::max<int64_t>(k, std::min<int64_t>(k + std::max<int64_t>(k, 32), universe));
}

template <typename T>
inline T relu(T v) {
  return std::isnan(v) ? v : (v > T(0) ? v : T(0));
}

// The tile scanner of encode(): a running top-k (and one over the dead latents for AuxK) per row of
// the block, written out post-ReLU when the block's tiles are done.
template <typename scalar_t, typename acc_t>
class TopKScanner {
 public:
  using K = Keys<acc_t>;

  TopKScanner(int64_t rows, int64_t k, int64_t M, const acc_t* bias, const std::vector<int32_t>& dead,
              const std::vector<int64_t>& tile_dead, const std::vector<typename K::key_t>& aux_fill,
              int64_t k_aux, scalar_t* out_v, int32_t* out_i, scalar_t* aux_v, int32_t* aux_i)
      : k_(k), k_aux_(k_aux), bias_(bias), dead_(dead), tile_dead_(tile_dead), aux_fill_(aux_fill),
        out_v_(out_v), out_i_(out_i), aux_v_(aux_v), aux_i_(aux_i), top_(rows, k, buffer_cap(k, M), 0),
        aux_(k_aux > 0 ? rows : 0, k_aux, buffer_cap(k_aux, static_cast<int64_t>(dead.size())),
             static_cast<int64_t>(aux_fill.size())) {}

  void begin_block(int64_t, int64_t nr) {
    top_.reset(nr);
    if (k_aux_ > 0) aux_.reset(nr);
  }

  void scan(int64_t r, const acc_t* z, int64_t l0, int64_t len, int64_t t) {
    const int32_t base = static_cast<int32_t>(l0);
    top_.push_dense(r, z, bias_ + l0, base, len);
    if (k_aux_ > 0) {
      aux_.push_list(r, z, bias_, dead_.data() + tile_dead_[t], tile_dead_[t + 1] - tile_dead_[t], base);
    }
  }

  void finish_block(int64_t r0, int64_t nr) {
    for (int64_t r = 0; r < nr; ++r) {
      const auto* best = top_.finish_with(r, k_, no_fill_);
      const int64_t o = (r0 + r) * k_;
      for (int64_t j = 0; j < k_; ++j) {
        out_v_[o + j] = static_cast<scalar_t>(relu(K::value(best[j])));
        out_i_[o + j] = K::index(best[j]);
      }
      if (k_aux_ > 0) {
        const auto* best_aux = aux_.finish_with(r, k_aux_, aux_fill_);
        const int64_t oa = (r0 + r) * k_aux_;
        for (int64_t j = 0; j < k_aux_; ++j) {
          aux_v_[oa + j] = static_cast<scalar_t>(relu(K::value(best_aux[j])));
          aux_i_[oa + j] = K::index(best_aux[j]);
        }
      }
    }
  }

 private:
  int64_t k_, k_aux_;
  const acc_t* bias_;
  const std::vector<int32_t>& dead_;
  const std::vector<int64_t>& tile_dead_;
  const std::vector<typename K::key_t>& aux_fill_;
  const std::vector<typename K::key_t> no_fill_;
  scalar_t* out_v_;
  int32_t* out_i_;
  scalar_t* aux_v_;
  int32_t* aux_i_;
  RunningTopK<acc_t> top_, aux_;
};

template <typename scalar_t, typename acc_t>
void encode(const at::Tensor& x, const at::Tensor& W, const at::Tensor& b_enc,
            const c10::optional<at::Tensor>& b_dec, int64_t k, const std::vector<int32_t>& dead,
            const std::vector<int32_t>& live_fill, int64_t k_aux, at::Tensor& values,
            at::Tensor& indices, at::Tensor& aux_values, at::Tensor& aux_indices) {
  const int64_t N = x.size(0), M = W.size(0);
  const EncoderTiling tiling(N, M);
  // dead[tile_dead[t], tile_dead[t + 1]) are the dead latents of tile t.
  std::vector<int64_t> tile_dead(tiling.tiles + 1);
  for (int64_t t = 0; t <= tiling.tiles; ++t) {
    const int64_t start = std::min(t * tiling.latents, M);
    tile_dead[t] = std::lower_bound(dead.begin(), dead.end(), start) - dead.begin();
  }
  // Live latents count as -inf in the aux top-k; as -inf ties go to the lower index, only the first
  // k_aux live latents can make it.
  using K = Keys<acc_t>;
  std::vector<typename K::key_t> aux_fill;
  for (int32_t i : live_fill) aux_fill.push_back(K::make(-std::numeric_limits<acc_t>::infinity(), i));

  const acc_t* bias = b_enc.data_ptr<acc_t>();
  scalar_t* out_v = values.data_ptr<scalar_t>();
  int32_t* out_i = indices.data_ptr<int32_t>();
  scalar_t* aux_v = aux_values.data_ptr<scalar_t>();
  int32_t* aux_i = aux_indices.data_ptr<int32_t>();
  scan_preactivation_tiles<acc_t>(x, W, b_dec, tiling, [&](int64_t rows) {
    return TopKScanner<scalar_t, acc_t>(rows, k, M, bias, dead, tile_dead, aux_fill, k_aux, out_v, out_i,
                                        aux_v, aux_i);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_encode_forward_cpu(
    const at::Tensor& x, const at::Tensor& W_enc, const c10::optional<at::Tensor>& b_enc,
    const c10::optional<at::Tensor>& b_dec, int64_t k, const c10::optional<at::Tensor>& dead_mask,
    int64_t k_aux) {
  const char* op = "topk_encode_forward";
  const EncoderInputs in = prepare_encoder_inputs(op, x, W_enc, b_enc, b_dec);
  const int64_t N = in.N, M = in.M;
  TORCH_CHECK(k >= 1 && k <= M, op, ": k must be in [1, M = ", M, "], got ", k);
  TORCH_CHECK(k_aux >= 0 && k_aux <= M, op, ": k_aux must be in [0, M = ", M, "], got ", k_aux);
  if (dead_mask.has_value()) {
    check_vector(op, "dead_mask", *dead_mask, M, "M = W_enc.size(0)");
    TORCH_CHECK(dead_mask->scalar_type() == at::kBool, op, ": dead_mask must be bool, got ",
                dead_mask->scalar_type());
  }
  TORCH_CHECK(k_aux == 0 || dead_mask.has_value(), op, ": k_aux = ", k_aux, " needs dead_mask");

  at::Tensor values = at::empty({N, k}, x.options());
  at::Tensor indices = at::empty({N, k}, x.options().dtype(at::kInt));
  at::Tensor aux_values = at::empty({N, k_aux}, x.options());
  at::Tensor aux_indices = at::empty({N, k_aux}, x.options().dtype(at::kInt));
  if (N == 0) return {values, indices, aux_values, aux_indices};

  std::vector<int32_t> dead, live_fill;
  if (k_aux > 0) {
    const at::Tensor mask = dead_mask->contiguous();
    const bool* m = mask.data_ptr<bool>();
    for (int64_t i = 0; i < M; ++i) {
      if (m[i]) {
        dead.push_back(static_cast<int32_t>(i));
      } else if (static_cast<int64_t>(live_fill.size()) < k_aux) {
        live_fill.push_back(static_cast<int32_t>(i));
      }
    }
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "topk_encode_forward", [&] {
    using acc_t = acc_type<scalar_t>;
    encode<scalar_t, acc_t>(in.x, in.W, in.bias, in.center, k, dead, live_fill, k_aux, values, indices,
                            aux_values, aux_indices);
  });
  return {values, indices, aux_values, aux_indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyinterp, CPU, m) {
  m.impl("topk_encode_forward", &topk_encode_forward_cpu);
}
