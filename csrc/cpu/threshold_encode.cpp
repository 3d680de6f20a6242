// CPU JumpReLU threshold encoder (pyinterp::threshold_encode_forward, schema in csrc/bindings.cpp;
// the algorithm in docs/sae_family.md, "JumpReLU"). z = (x - b_dec) @ W_enc^T + b_enc comes tile by
// tile from the shared tiled GEMM (encoder_tiles.h); each row keeps the latents whose shifted
// pre-activation s = z - lower is positive by appending them to a capped list, so the list is in
// ascending latent index and needs no ranking. Only a row with more than max_active candidates ranks
// them (keeping the max_active largest s, ties to the lower index) and is sorted back by index.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "checks.h"
#include "encoder_tiles.h"

namespace {

using namespace pyinterp::cpu;

// The scan tests this many latents at once.
constexpr int64_t kScanChunk = 16;

// Whether some l < kScanChunk has (z[l] + bias[l]) - lower[l] > floor (the scalar test, lane by lane).
template <typename T>
inline bool chunk_has_candidate(const T* z, const T* bias, const T* lower, T floor) {
  typedef T vec_t __attribute__((vector_size(16)));
  constexpr int64_t lanes = 16 / sizeof(T);
  vec_t f;
  for (int64_t l = 0; l < lanes; ++l) f[l] = floor;
  using mask_t = decltype(f > f);
  mask_t passed = mask_t{};
  for (int64_t l = 0; l < kScanChunk; l += lanes) {
    vec_t zv, bv, lv;
    std::memcpy(&zv, z + l, sizeof(zv));
    std::memcpy(&bv, bias + l, sizeof(bv));
    std::memcpy(&lv, lower + l, sizeof(lv));
    passed |= ((zv + bv) - lv) > f;
  }
  uint64_t words[2];
  std::memcpy(words, &passed, sizeof(words));
  return (words[0] | words[1]) != 0;
}

// The per-thread scanner of a block of rows: per row, the candidates (s > 0) in arrival order, i.e.
// ascending index. A row whose list reaches `cap` (> max_active) slots is cut back to its best
// max_active (nth_element on (s, index) keys) and from then on admits only s above its max_active-th
// best: a later latent has a higher index, so an equal s would lose the tie.
template <typename acc_t>
class ThresholdScanner {
 public:
  using K = Keys<acc_t>;

  ThresholdScanner(int64_t rows, int64_t max_active, int64_t M, const acc_t* bias, const acc_t* lower,
                   acc_t* preacts, int32_t* indices, int32_t* listed, bool* truncated)
      : k_(max_active),
        cap_(std::min<int64_t>(max_active + std::max<int64_t>(max_active, 32), M)),
        bias_(bias), lower_(lower), preacts_(preacts), indices_(indices), listed_(listed),
        truncated_(truncated), buf_(rows * cap_), count_(rows), floor_(rows), cut_(rows) {}

  void begin_block(int64_t, int64_t nr) {
    std::fill(count_.begin(), count_.begin() + nr, 0);
    std::fill(floor_.begin(), floor_.begin() + nr, acc_t(0));
    std::fill(cut_.begin(), cut_.begin() + nr, 0);
  }

  void scan(int64_t r, const acc_t* __restrict z, int64_t l0, int64_t len, int64_t) {
    const acc_t* __restrict bias = bias_ + l0;
    const acc_t* __restrict lower = lower_ + l0;
    acc_t floor = floor_[r];
    int64_t j = 0;
    for (; j + kScanChunk <= len; j += kScanChunk) {
      if (!chunk_has_candidate(z + j, bias + j, lower + j, floor)) continue;
      for (int64_t l = j; l < j + kScanChunk; ++l) {
        const acc_t v = z[l] + bias[l];
        if (v - lower[l] > floor) floor = append(r, v, v - lower[l], static_cast<int32_t>(l0 + l));
      }
    }
    for (; j < len; ++j) {
      const acc_t v = z[j] + bias[j];
      if (v - lower[j] > floor) floor = append(r, v, v - lower[j], static_cast<int32_t>(l0 + j));
    }
  }

  void finish_block(int64_t r0, int64_t nr) {
    for (int64_t r = 0; r < nr; ++r) {
      Entry* b = row(r);
      int64_t n = count_[r];
      const bool over = cut_[r] || n > k_;
      if (n > k_) {
        cut(b, n);
        n = k_;
      }
      if (over) std::sort(b, b + n, [](const Entry& a, const Entry& c) { return K::index(a.key) < K::index(c.key); });
      const int64_t o = (r0 + r) * k_;
      for (int64_t j = 0; j < n; ++j) {
        preacts_[o + j] = b[j].z;
        indices_[o + j] = K::index(b[j].key);
      }
      std::fill(preacts_ + o + n, preacts_ + o + k_, acc_t(0));
      std::fill(indices_ + o + n, indices_ + o + k_, 0);
      listed_[r0 + r] = static_cast<int32_t>(n);
      truncated_[r0 + r] = over;
    }
  }

 private:
  struct Entry {
    typename K::key_t key;  // (s, index): the rank of an over-full row
    acc_t z;                // the pre-activation itself, exact (not s + lower)
  };

  Entry* row(int64_t r) { return buf_.data() + r * cap_; }

  // Keeps the best k_ of b[0, n) in b[0, k_).
  void cut(Entry* b, int64_t n) {
    std::nth_element(b, b + k_ - 1, b + n, [](const Entry& a, const Entry& c) { return K::better(a.key, c.key); });
  }

  // Appends latent i (pre-activation v, shifted s) to row r; returns the row's floor for s.
  acc_t append(int64_t r, acc_t v, acc_t s, int32_t i) {
    Entry* b = row(r);
    b[count_[r]++] = {K::make(s, i), v};
    if (count_[r] == cap_ && cap_ > k_) {
      cut(b, cap_);
      count_[r] = k_;
      floor_[r] = K::value(b[k_ - 1].key);
      cut_[r] = 1;
    }
    return floor_[r];
  }

  int64_t k_, cap_;
  const acc_t* bias_;
  const acc_t* lower_;
  acc_t* preacts_;
  int32_t* indices_;
  int32_t* listed_;
  bool* truncated_;
  std::vector<Entry> buf_;
  std::vector<int64_t> count_;
  std::vector<acc_t> floor_;
  std::vector<uint8_t> cut_;
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> threshold_encode_forward_cpu(
    const at::Tensor& x, const at::Tensor& W_enc, const c10::optional<at::Tensor>& b_enc,
    const c10::optional<at::Tensor>& b_dec, const at::Tensor& lower, int64_t max_active) {
  const char* op = "threshold_encode_forward";
  const EncoderInputs in = prepare_encoder_inputs(op, x, W_enc, b_enc, b_dec);
  const int64_t N = in.N, M = in.M;
  TORCH_CHECK(max_active >= 1 && max_active <= M, op, ": max_active must be in [1, M = ", M, "], got ",
              max_active);
  check_vector(op, "lower", lower, M, "M = W_enc.size(0)");
  check_float(op, "lower", lower);

  const auto acc = acc_dtype(x.scalar_type());
  at::Tensor preacts = at::empty({N, max_active}, x.options().dtype(acc));
  at::Tensor indices = at::empty({N, max_active}, x.options().dtype(at::kInt));
  at::Tensor listed = at::empty({N}, x.options().dtype(at::kInt));
  at::Tensor truncated = at::empty({N}, x.options().dtype(at::kBool));
  if (N == 0) return {preacts, indices, listed, truncated};

  const at::Tensor low = lower.detach().to(acc).contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "threshold_encode_forward", [&] {
    using acc_t = acc_type<scalar_t>;
    const EncoderTiling tiling(N, M);
    const acc_t* bias_p = in.bias.data_ptr<acc_t>();
    const acc_t* lower_p = low.data_ptr<acc_t>();
    acc_t* preacts_p = preacts.data_ptr<acc_t>();
    int32_t* indices_p = indices.data_ptr<int32_t>();
    int32_t* listed_p = listed.data_ptr<int32_t>();
    bool* truncated_p = truncated.data_ptr<bool>();
    scan_preactivation_tiles<acc_t>(in.x, in.W, in.center, tiling, [&](int64_t rows) {
      return ThresholdScanner<acc_t>(rows, max_active, M, bias_p, lower_p, preacts_p, indices_p, listed_p,
                                     truncated_p);
    });
  });
  return {preacts, indices, listed, truncated};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyinterp, CPU, m) {
  m.impl("threshold_encode_forward", &threshold_encode_forward_cpu);
}
