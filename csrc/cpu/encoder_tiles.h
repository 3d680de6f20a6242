// What the fused SAE encoders (csrc/cpu/topk_encode.cpp, csrc/cpu/threshold_encode.cpp) share: the
// tiled pre-activation GEMM, z = (x - b_dec) @ W^T for a block of rows x a tile of latents at a time
// (one single-threaded BLAS call; threads split the row blocks), handed tile by tile to a per-thread
// scanner so that the N x M pre-activations never exist (memory O(threads x tile)); and the (value,
// index) keys their selections rank by; and the checks and conversions of their common inputs.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "checks.h"

namespace pyinterp::cpu {

// A fused encoder's common inputs, checked (each error names the op and the argument) and converted
// once, not per tile: x contiguous; W, bias (zeros without b_enc) and center (b_dec) contiguous in the
// accumulator dtype. Detached: the worker threads run with grad mode on, and ATen's out= ops refuse
// inputs that require grad.
struct EncoderInputs {
  int64_t N, D, M;
  at::Tensor x, W, bias;
  c10::optional<at::Tensor> center;
};

inline EncoderInputs prepare_encoder_inputs(const char* op, const at::Tensor& x, const at::Tensor& W_enc,
                                            const c10::optional<at::Tensor>& b_enc,
                                            const c10::optional<at::Tensor>& b_dec) {
  check_matrix(op, "x", x);
  check_matrix(op, "W_enc", W_enc);
  check_float(op, "x", x);
  check_float(op, "W_enc", W_enc);
  const int64_t N = x.size(0), D = x.size(1), M = W_enc.size(0);
  TORCH_CHECK(W_enc.size(1) == D, op, ": W_enc must be (M, D) with D = x.size(1) = ", D, ", got shape ",
              W_enc.sizes());
  TORCH_CHECK(M <= std::numeric_limits<int32_t>::max(), op,
              ": at most 2^31 - 1 latents (int32 indices), W_enc has ", M);
  if (b_enc.has_value()) {
    check_vector(op, "b_enc", *b_enc, M, "M = W_enc.size(0)");
    check_float(op, "b_enc", *b_enc);
  }
  if (b_dec.has_value()) {
    check_vector(op, "b_dec", *b_dec, D, "D = x.size(1)");
    check_float(op, "b_dec", *b_dec);
  }
  const auto acc = acc_dtype(x.scalar_type());
  EncoderInputs in{N, D, M, x.detach().contiguous(), W_enc.detach().to(acc).contiguous(),
                   b_enc.has_value() ? b_enc->detach().to(acc).contiguous() : at::zeros({M}, x.options().dtype(acc)),
                   c10::nullopt};
  if (b_dec.has_value()) in.center = b_dec->detach().to(acc).contiguous();
  return in;
}

// Tuned on 2 cores at N=4096, D=384, M=16384, k=32 (fp32): a 128 x 2048 fp32 tile is 1 MiB, it stays
// in L2 between the GEMM that writes it and the scan that reads it.
constexpr int64_t kRowBlock = 128;
constexpr int64_t kLatentTile = 2048;

// How the N x M pre-activations are cut: row blocks of `rows` (smaller for small batches, so that
// every thread still gets rows) and latent tiles of `latents`, a multiple of 64 when M allows (BLAS
// may sum the columns of a partial register block in another order than the others).
struct EncoderTiling {
  int64_t rows, latents, blocks, tiles;

  EncoderTiling(int64_t N, int64_t M) {
    const int64_t threads = at::get_num_threads();
    rows = std::max<int64_t>(1, std::min(kRowBlock, (N + threads - 1) / threads));
    latents = M < 64 ? M : std::min(kLatentTile, M / 64 * 64);
    blocks = (N + rows - 1) / rows;
    tiles = (M + latents - 1) / latents;
  }
};

// Runs the tiled GEMM of x (N, D) against W (M, D) in acc_t (W already in acc_t, contiguous), with
// x - b_dec when b_dec is given. make_scanner(rows) builds one scanner per thread, with
//   begin_block(r0, nr)                           before the tiles of rows [r0, r0 + nr)
//   scan(r, z, l0, len, t)                        row r (block-relative) of tile t: z[j] is the
//                                                 product for latent l0 + j, j < len
//   finish_block(r0, nr)                          after the block's last tile
// Latents arrive in increasing index within each row.
template <typename acc_t, typename MakeScanner>
void scan_preactivation_tiles(const at::Tensor& x, const at::Tensor& W, const c10::optional<at::Tensor>& b_dec,
                              const EncoderTiling& tiling, MakeScanner make_scanner) {
  const int64_t N = x.size(0), D = x.size(1), M = W.size(0);
  const int64_t rb = tiling.rows, tile = tiling.latents;
  at::parallel_for(0, tiling.blocks, 1, [&](int64_t blk_begin, int64_t blk_end) {
    const auto opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    at::Tensor xt_buf = at::empty({rb * D}, opts);
    at::Tensor z_buf = at::empty({rb * tile}, opts);
    auto scanner = make_scanner(rb);
    for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
      const int64_t r0 = blk * rb, nr = std::min(rb, N - r0);
      at::Tensor xt = xt_buf.narrow(0, 0, nr * D).view({nr, D});
      if (b_dec.has_value()) {
        at::sub_out(xt, x.narrow(0, r0, nr), *b_dec);
      } else {
        xt.copy_(x.narrow(0, r0, nr));
      }
      scanner.begin_block(r0, nr);
      for (int64_t t = 0; t < tiling.tiles; ++t) {
        const int64_t l0 = t * tile, len = std::min(tile, M - l0);
        // Every GEMM has the same shape: the tail tile is computed as the last `tile` latents (it
        // overlaps the tile before) and only its new columns are scanned. A narrower GEMM may sum
        // in another order, and duplicated latents would then not tie.
        const int64_t w0 = M - l0 < tile ? M - tile : l0;
        at::Tensor z = z_buf.narrow(0, 0, nr * tile).view({nr, tile});
        at::mm_out(z, xt, W.narrow(0, w0, tile).t());
        const acc_t* zp = z.data_ptr<acc_t>() + (l0 - w0);
        for (int64_t r = 0; r < nr; ++r) scanner.scan(r, zp + r * tile, l0, len, t);
      }
      scanner.finish_block(r0, nr);
    }
  });
}

// A selection's order: larger value first, NaN above everything (as torch.topk), equal values ->
// lower index. A candidate is a key; `better(a, b)` means a ranks before b.
template <typename T>
struct Keys;

// fp32: (value, index) packed in one uint64 so that ranking, cutting and sorting are integer compares.
// High half: the float's bits mapped to an unsigned that orders like the float (-0 folded into +0, every
// NaN the largest); low half: ~index, so that the lower index wins a tie.
template <>
struct Keys<float> {
  using key_t = uint64_t;
  static key_t make(float v, int32_t i) {
    uint32_t u;
    const float folded = v + 0.0f;
    std::memcpy(&u, &folded, sizeof(u));
    u = std::isnan(v) ? 0xFFFFFFFFu : ((u & 0x80000000u) ? ~u : (u | 0x80000000u));
    return (static_cast<uint64_t>(u) << 32) | static_cast<uint32_t>(~static_cast<uint32_t>(i));
  }
  static float value(key_t key) {
    const uint32_t u = static_cast<uint32_t>(key >> 32);
    if (u == 0xFFFFFFFFu) return std::numeric_limits<float>::quiet_NaN();
    const uint32_t bits = (u & 0x80000000u) ? (u & 0x7FFFFFFFu) : ~u;
    float v;
    std::memcpy(&v, &bits, sizeof(v));
    return v;
  }
  static int32_t index(key_t key) { return static_cast<int32_t>(~static_cast<uint32_t>(key)); }
  static bool better(key_t a, key_t b) { return a > b; }
};

// float64 (gradcheck only): a plain pair and the comparison spelled out.
template <>
struct Keys<double> {
  struct key_t {
    double v;
    int32_t i;
  };
  static key_t make(double v, int32_t i) { return {v, i}; }
  static double value(const key_t& key) { return key.v; }
  static int32_t index(const key_t& key) { return key.i; }
  static bool better(const key_t& a, const key_t& b) {
    const bool a_nan = std::isnan(a.v), b_nan = std::isnan(b.v);
    if (a_nan || b_nan) return a_nan && (!b_nan || a.i < b.i);
    return a.v > b.v || (a.v == b.v && a.i < b.i);
  }
};

}  // namespace pyinterp::cpu
