// Fused top-k SAE encoder (contract in topk_encode.cuh).
//
// Fast path (k <= 256 without AuxK; k <= 128 and k_aux <= 128 with AuxK, whose two per-row states
// leave no fused config above 128 in kFusedConfigs): one kernel computes z tile by tile on the
// tensor cores (mma.sync m16n8k16, fp32 accumulators; fp32 inputs take a SIMT FFMA path so that they
// stay exact fp32) and folds every tile into a per-row running top-k held in shared memory. Each CTA
// owns BM rows and one contiguous range of latents (a "split"); it writes its sorted top-k candidates,
// and a second kernel merges the splits' candidates per row. z is never written to memory.
//
// General path (larger k or k_aux, or a GPU with too little shared memory): z is materialised in fp32
// for a bounded chunk of rows (256 MiB), a radix select per row picks the top-k, cub sorts the picks.
// The default k_aux = min(D/2, M) (docs/sae.md, "AuxK") lands here: a per-row AuxK state of thousands of keys does not fit
// in shared memory (fusing it needs a global-memory candidate buffer per row and split).
//
// Ordering: a candidate is one 64-bit key, order-preserving bits of z in the high word and
// 0xFFFFFFFF - latent in the low word, so "larger key" means "larger z, then lower latent index",
// exactly the reference's stable descending sort. Keys of one row are unique.
#include "topk_encode.cuh"

#include <algorithm>
#include <type_traits>

#include <cub/block/block_scan.cuh>
#include <cub/device/device_segmented_sort.cuh>

#include "common.cuh"

namespace pyinterp::cuda {
namespace {

using namespace detail;  // common.cuh

// ------------------------------------------------------------------------------------------------
// Keys
// ------------------------------------------------------------------------------------------------
constexpr uint32_t kOrderedNegInf = 0x007FFFFFu;  // ordered_bits(-inf)

__device__ __forceinline__ uint32_t ordered_bits(float z) {
  uint32_t u = __float_as_uint(z + 0.0f);  // -0 becomes +0: the reference sort sees them equal
  if (z != z) u = 0x7FFFFFFFu;             // any NaN ranks above +inf, as in torch.sort
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float from_ordered_bits(uint32_t o) {
  return __uint_as_float((o & 0x80000000u) ? (o & 0x7FFFFFFFu) : ~o);
}

__device__ __forceinline__ uint64_t make_key(uint32_t ordered, uint32_t latent) {
  return (static_cast<uint64_t>(ordered) << 32) | (0xFFFFFFFFu - latent);
}

template <typename T>
__device__ __forceinline__ void decode_key(uint64_t key, T* value, int32_t* index) {
  const float z = from_ordered_bits(static_cast<uint32_t>(key >> 32));
  *value = from_float<T>(z < 0.0f ? 0.0f : z);  // ReLU; NaN stays NaN like torch.relu
  *index = static_cast<int32_t>(0xFFFFFFFFu - static_cast<uint32_t>(key));
}

// Number of entries of a (descending, unique) that are greater than x.
__device__ __forceinline__ int count_greater(const uint64_t* a, int len, uint64_t x) {
  int lo = 0, hi = len;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (a[mid] > x) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// ------------------------------------------------------------------------------------------------
// GEMM tiles: C[BM x 256] = X[BM x K] * W[256 x K]^T, both operands K-contiguous ("TN").
// 8 warps as 2 (rows) x 4 (latents); a 3-stage cp.async pipeline over 64-byte k-slices
// (32 halves or 16 floats per row per stage).
// ------------------------------------------------------------------------------------------------
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBN = 256;
constexpr int kStages = 3;
constexpr int kRowBytes = 64;
constexpr int kChunks = kRowBytes / 16;

template <int BM>
struct Tile {
  static constexpr int WM = BM / 2;
  static constexpr int WN = kBN / 4;
  static constexpr int MI = WM / 16;  // m16 fragments per warp
  static constexpr int NI = WN / 8;   // n8 fragments per warp
  static constexpr int kABytes = BM * kRowBytes;
  static constexpr int kStageBytes = (BM + kBN) * kRowBytes;
  static constexpr int kPipeBytes = kStages * kStageBytes;
};

// Byte offset of 16-byte chunk c of row r in a stage. Chunks are XOR-swizzled by (r >> 1) & 3 so that
// the 8 rows one ldmatrix phase (or one quarter-warp LDS.128) reads cover all 32 banks once: rows
// r..r+7 then differ in (r & 1, (r >> 1) & 3), i.e. in which 16 bytes of a 128-byte line they use.
__device__ __forceinline__ uint32_t swz(int r, int c) {
  return static_cast<uint32_t>(r * kRowBytes + ((c ^ ((r >> 1) & 3)) << 4));
}

// min(left, cap) for the rows/latents a tile still covers.
__device__ __forceinline__ int clamp_count(int64_t left, int cap) {
  return left < cap ? static_cast<int>(left) : cap;
}

// Issues the copies of k-slice [k0, k0 + 64 bytes) of the X rows and W rows of one tile.
template <typename T, int BM>
__device__ __forceinline__ void load_stage(uint32_t stage, const T* __restrict__ X,
                                           const T* __restrict__ W, int64_t ld, int rows, int cols,
                                           int64_t K, int64_t k0) {
  constexpr int kVec = detail::kVec16<T>;
  static_assert((BM * kChunks) % kThreads == 0 && (kBN * kChunks) % kThreads == 0, "whole chunks per thread");
#pragma unroll
  for (int i = 0; i < BM * kChunks / kThreads; ++i) {
    const int q = threadIdx.x + i * kThreads;
    const int r = q / kChunks, c = q % kChunks;
    const int64_t kk = k0 + c * kVec;
    const bool valid = r < rows && kk < K;
    cp_async16(stage + swz(r, c), valid ? X + r * ld + kk : X, valid);
  }
#pragma unroll
  for (int i = 0; i < kBN * kChunks / kThreads; ++i) {
    const int q = threadIdx.x + i * kThreads;
    const int r = q / kChunks, c = q % kChunks;
    const int64_t kk = k0 + c * kVec;
    const bool valid = r < cols && kk < K;
    cp_async16(stage + Tile<BM>::kABytes + swz(r, c), valid ? W + r * ld + kk : W, valid);
  }
}

// Accumulator element (mi, ni, e) of a thread is at tile row wm*WM + mi*16 + lane/4 + 8*(e/2) and tile
// column wn*WN + ni*8 + 2*(lane%4) + e%2: the m16n8 C fragment (PTX ISA, "mma.m16n8k16" fragments).
// The fp32 SIMT path computes the same elements per thread so that both share one epilogue.
template <typename T, int BM>
__device__ __forceinline__ void compute_stage(float (&acc)[Tile<BM>::MI][Tile<BM>::NI][4],
                                              const uint8_t* stage, int wm, int wn, int lane) {
  using Tl = Tile<BM>;
  if constexpr (std::is_same_v<T, float>) {
    const uint8_t* a_s = stage;
    const uint8_t* b_s = stage + Tl::kABytes;
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {  // 4 consecutive k per chunk, summed in k order
      float4 a[Tl::MI][2];
#pragma unroll
      for (int mi = 0; mi < Tl::MI; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          a[mi][h] = *reinterpret_cast<const float4*>(a_s + swz(wm * Tl::WM + mi * 16 + g + 8 * h, c));
#pragma unroll
      for (int ni = 0; ni < Tl::NI; ++ni)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const float4 b =
              *reinterpret_cast<const float4*>(b_s + swz(wn * Tl::WN + ni * 8 + 2 * t + j, c));
#pragma unroll
          for (int mi = 0; mi < Tl::MI; ++mi)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              float& d = acc[mi][ni][2 * h + j];
              d = fmaf(a[mi][h].x, b.x, d);
              d = fmaf(a[mi][h].y, b.y, d);
              d = fmaf(a[mi][h].z, b.z, d);
              d = fmaf(a[mi][h].w, b.w, d);
            }
        }
    }
  } else {
    const uint32_t a_base = smem_u32(stage);
    const uint32_t b_base = a_base + Tl::kABytes;
#pragma unroll
    for (int ks = 0; ks < kChunks / 2; ++ks) {  // two k16 steps per stage
      uint32_t af[Tl::MI][4];
      uint32_t bf[Tl::NI][2];
      // A 16x16: matrices (rows 0-7 | 8-15) x (k 0-7 | 8-15) -> a0a1, a2a3, a4a5, a6a7.
#pragma unroll
      for (int mi = 0; mi < Tl::MI; ++mi)
        ldmatrix_x4(af[mi], a_base + swz(wm * Tl::WM + mi * 16 + (lane & 15), 2 * ks + (lane >> 4)));
      // B as W rows (n, k): matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
      // -> b0b1, b2b3 of two n8 fragments.
#pragma unroll
      for (int p = 0; p < Tl::NI / 2; ++p) {
        uint32_t r[4];
        ldmatrix_x4(r, b_base + swz(wn * Tl::WN + p * 16 + (lane & 7) + ((lane >> 4) << 3),
                                    2 * ks + ((lane >> 3) & 1)));
        bf[2 * p][0] = r[0];
        bf[2 * p][1] = r[1];
        bf[2 * p + 1][0] = r[2];
        bf[2 * p + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < Tl::MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < Tl::NI; ++ni) mma_16816<T>(acc[mi][ni], af[mi], bf[ni][0], bf[ni][1]);
    }
  }
}

// acc = X[0:rows) . W[0:cols)^T over K (a multiple of the 16-byte vector); rows/cols past the ends
// read as zeros. Ends with a barrier, so the caller may reuse the pipeline memory at once.
template <typename T, int BM>
__device__ __forceinline__ void gemm_tile(float (&acc)[Tile<BM>::MI][Tile<BM>::NI][4],
                                          const T* __restrict__ X, const T* __restrict__ W,
                                          int64_t ld, int rows, int cols, int64_t K, uint8_t* smem) {
  using Tl = Tile<BM>;
  constexpr int kSliceElems = kRowBytes / static_cast<int>(sizeof(T));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = warp >> 2, wn = warp & 3;
  const uint32_t s_base = smem_u32(smem);
#pragma unroll
  for (int mi = 0; mi < Tl::MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < Tl::NI; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.0f;

  const int64_t KT = ceil_div(K, kSliceElems);
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < KT) load_stage<T, BM>(s_base + s * Tl::kStageBytes, X, W, ld, rows, cols, K, s * kSliceElems);
    cp_async_commit();
  }
  for (int64_t kt = 0; kt < KT; ++kt) {
    cp_async_wait<kStages - 2>();  // slice kt has landed (for this thread) ...
    __syncthreads();               // ... for every thread; and slice kt-1's stage is free again
    const int64_t next = kt + kStages - 1;
    if (next < KT)
      load_stage<T, BM>(s_base + (next % kStages) * Tl::kStageBytes, X, W, ld, rows, cols, K,
                        next * kSliceElems);
    cp_async_commit();
    compute_stage<T, BM>(acc, smem + (kt % kStages) * Tl::kStageBytes, wm, wn, lane);
  }
  cp_async_wait<0>();
  __syncthreads();
}

// ------------------------------------------------------------------------------------------------
// Per-row running top-k in shared memory
// ------------------------------------------------------------------------------------------------
constexpr int kBuf = 32;      // fresh candidates per row between merges (one per lane of a merge)
constexpr int kMergeAt = 16;  // merge a row once this many candidates wait

// kept[r]: the row's best keys so far, sorted descending (nkept of them); buf[r]: unsorted newer
// candidates; thr[r]: a key <= thr cannot enter (the keff-th kept key once there are keff, else 0,
// below every real key).
template <int BM, int KC>
struct RowTopK {
  static constexpr int kBytes = BM * (KC * 8 + kBuf * 8 + 8 + 4 + 4);
  uint64_t* kept;
  uint64_t* buf;
  uint64_t* thr;
  int* nbuf;  // may pass kBuf: the excess candidates were not stored and retry after a merge
  int* nkept;

  __device__ explicit RowTopK(uint8_t* base)
      : kept(reinterpret_cast<uint64_t*>(base)),
        buf(kept + BM * KC),
        thr(buf + BM * kBuf),
        nbuf(reinterpret_cast<int*>(thr + BM)),
        nkept(nbuf + BM) {}

  __device__ void init() const {
    for (int r = threadIdx.x; r < BM; r += kThreads) {
      thr[r] = 0;
      nbuf[r] = 0;
      nkept[r] = 0;
    }
  }
};

// Bitonic sort of one key per lane, descending across the warp (lane 0 largest).
__device__ __forceinline__ uint64_t warp_sort_desc(uint64_t v, int lane) {
#pragma unroll
  for (int size = 2; size <= 32; size <<= 1)
#pragma unroll
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      const uint64_t o = __shfl_xor_sync(0xFFFFFFFFu, v, stride);
      const bool take_max = ((lane & stride) == 0) == ((lane & size) == 0);
      v = take_max ? (v > o ? v : o) : (v < o ? v : o);
    }
  return v;
}

// One warp folds row r's buffer into its kept list: sort the buffer, then every key's rank in the
// union is its own position plus the number of keys of the other list above it (both lists sorted,
// keys unique), and the keys ranked below keff go to kept[rank].
template <int BM, int KC>
__device__ void merge_row(const RowTopK<BM, KC>& st, int r, int keff, int lane) {
  uint64_t* kept = st.kept + r * KC;
  uint64_t* buf = st.buf + r * kBuf;
  const int n = min(st.nbuf[r], kBuf);
  const int kc = st.nkept[r];
  uint64_t b = lane < n ? buf[lane] : 0;
  b = warp_sort_desc(b, lane);
  __syncwarp();
  buf[lane] = b;
  __syncwarp();
  uint64_t kv[KC / 32];
  int kr[KC / 32];
#pragma unroll
  for (int t = 0; t < KC / 32; ++t) {
    const int i = t * 32 + lane;
    kv[t] = i < kc ? kept[i] : 0;
    kr[t] = i < kc ? i + count_greater(buf, n, kv[t]) : keff;
  }
  const int br = lane < n ? lane + count_greater(kept, kc, b) : keff;
  __syncwarp();
#pragma unroll
  for (int t = 0; t < KC / 32; ++t)
    if (kr[t] < keff) kept[kr[t]] = kv[t];
  if (br < keff) kept[br] = b;
  __syncwarp();
  if (lane == 0) {
    const int nk = min(keff, kc + n);
    st.nkept[r] = nk;
    st.nbuf[r] = 0;
    st.thr[r] = nk == keff ? kept[keff - 1] : 0;
  }
  __syncwarp();
}

template <int BM, int KC>
__device__ void merge_rows(const RowTopK<BM, KC>& st, int keff, int min_fill) {
  const int lane = threadIdx.x & 31;
  for (int r = threadIdx.x >> 5; r < BM; r += kWarps)
    if (st.nbuf[r] >= min_fill) merge_row(st, r, keff, lane);
}

// Offers this thread's pending tile elements (bit ni*2+j of pend[mi][h]) to the rows' buffers; an
// element leaves `pend` once stored or once it cannot enter (key <= threshold).
template <int BM, int KC>
__device__ __forceinline__ void offer(const RowTopK<BM, KC>& st,
                                      const float (&acc)[Tile<BM>::MI][Tile<BM>::NI][4],
                                      uint32_t (&pend)[Tile<BM>::MI][2], uint32_t col0) {
  using Tl = Tile<BM>;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = warp >> 2, wn = warp & 3;
#pragma unroll
  for (int mi = 0; mi < Tl::MI; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (!pend[mi][h]) continue;
      const int r = wm * Tl::WM + mi * 16 + (lane >> 2) + 8 * h;
      const uint64_t thr = st.thr[r];
#pragma unroll
      for (int ni = 0; ni < Tl::NI; ++ni)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const uint32_t bit = 1u << (ni * 2 + j);
          if (!(pend[mi][h] & bit)) continue;
          const uint32_t col = col0 + wn * Tl::WN + ni * 8 + 2 * (lane & 3) + j;
          const uint64_t key = make_key(ordered_bits(acc[mi][ni][2 * h + j]), col);
          if (key > thr) {
            const int slot = atomicAdd(&st.nbuf[r], 1);
            if (slot >= kBuf) continue;  // buffer full: retry after this row's merge
            st.buf[r * kBuf + slot] = key;
          }
          pend[mi][h] &= ~bit;
        }
    }
}

template <int BM, int KC>
__device__ void write_candidates(const RowTopK<BM, KC>& st, uint64_t* __restrict__ cand,
                                 int64_t row0, int rows, int split, int splits) {
  for (int e = threadIdx.x; e < rows * KC; e += kThreads) {
    const int r = e / KC, i = e % KC;
    cand[((row0 + r) * splits + split) * KC + i] = i < st.nkept[r] ? st.kept[r * KC + i] : 0;
  }
}

template <typename T>
struct FusedParams {
  const T* X;           // (N, ld) GEMM rows (x, or x - b_dec / padded)
  const T* W;           // (M, ld)
  const float* zbias;   // (M) added to each z, or nullptr
  const bool* dead;     // (M), read when AUX
  int64_t N, M, ld;
  int tiles, tiles_per_split, splits;
  int k, k_aux;
  uint64_t* cand;       // (N, splits, KC) sorted keys, 0-padded
  uint64_t* cand_aux;   // likewise over dead latents
};

template <int BM, int KC, bool AUX>
constexpr int fused_smem_bytes() {
  return Tile<BM>::kPipeBytes + (AUX ? 2 : 1) * RowTopK<BM, KC>::kBytes;
}

// CTA (row block, split): z tiles of its latent range, each folded into the rows' running top-k
// (and the AuxK top-k over dead latents) before the next tile.
template <typename T, int BM, int KC, bool AUX>
__global__ void __launch_bounds__(kThreads, 1) fused_topk_kernel(const FusedParams<T> p) {
  using Tl = Tile<BM>;
  extern __shared__ __align__(128) uint8_t smem[];
  const RowTopK<BM, KC> best(smem + Tl::kPipeBytes);
  const RowTopK<BM, KC> aux(smem + Tl::kPipeBytes + RowTopK<BM, KC>::kBytes);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = warp >> 2, wn = warp & 3;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int rows = clamp_count(p.N - row0, BM);
  const int split = blockIdx.y;
  const int t_begin = split * p.tiles_per_split;
  const int t_end = min(p.tiles, t_begin + p.tiles_per_split);

  best.init();
  if constexpr (AUX) aux.init();
  __syncthreads();

  for (int t = t_begin; t < t_end; ++t) {
    const int64_t col0 = static_cast<int64_t>(t) * kBN;
    const int cols = clamp_count(p.M - col0, kBN);
    float acc[Tl::MI][Tl::NI][4];
    gemm_tile<T, BM>(acc, p.X + row0 * p.ld, p.W + col0 * p.ld, p.ld, rows, cols, p.ld, smem);

    uint32_t col_ok = 0, col_dead = 0;
#pragma unroll
    for (int ni = 0; ni < Tl::NI; ++ni)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int c = wn * Tl::WN + ni * 8 + 2 * (lane & 3) + j;
        if (c >= cols) continue;
        col_ok |= 1u << (ni * 2 + j);
        if constexpr (AUX) {
          if (p.dead[col0 + c]) col_dead |= 1u << (ni * 2 + j);
        }
        if (p.zbias) {
          const float b = p.zbias[col0 + c];
#pragma unroll
          for (int mi = 0; mi < Tl::MI; ++mi) {
            acc[mi][ni][j] += b;
            acc[mi][ni][2 + j] += b;
          }
        }
      }
    uint32_t pend[Tl::MI][2], pend_aux[Tl::MI][2];
#pragma unroll
    for (int mi = 0; mi < Tl::MI; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const bool row_ok = wm * Tl::WM + mi * 16 + (lane >> 2) + 8 * h < rows;
        pend[mi][h] = row_ok ? col_ok : 0u;
        pend_aux[mi][h] = row_ok ? col_dead : 0u;
      }
    // Offer, merge the rows that filled up, and repeat while some element found its row's buffer
    // full. Merges are rare once the thresholds have risen: most elements fail one comparison.
    while (true) {
      offer(best, acc, pend, static_cast<uint32_t>(col0));
      if constexpr (AUX) offer(aux, acc, pend_aux, static_cast<uint32_t>(col0));
      __syncthreads();
      merge_rows(best, p.k, kMergeAt);
      if constexpr (AUX) merge_rows(aux, p.k_aux, kMergeAt);
      uint32_t left = 0;
#pragma unroll
      for (int mi = 0; mi < Tl::MI; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) left |= pend[mi][h] | (AUX ? pend_aux[mi][h] : 0u);
      if (!__syncthreads_or(left != 0)) break;
    }
  }
  merge_rows(best, p.k, 1);
  if constexpr (AUX) merge_rows(aux, p.k_aux, 1);
  __syncthreads();
  write_candidates(best, p.cand, row0, rows, split, p.splits);
  if constexpr (AUX) write_candidates(aux, p.cand_aux, row0, rows, split, p.splits);
}

// Per row: the top keff keys of `lists` sorted, 0-padded candidate lists of length kc (the splits'
// lists, plus `extra` if given), by pairwise merging in shared memory; then decoded to the outputs.
template <typename T>
__global__ void __launch_bounds__(kThreads) merge_splits_kernel(const uint64_t* __restrict__ cand,
                                                                int splits, int kc,
                                                                const uint64_t* __restrict__ extra,
                                                                int keff, T* __restrict__ values,
                                                                int32_t* __restrict__ indices) {
  extern __shared__ uint64_t lists[];
  const int64_t row = blockIdx.x;
  int n = splits + (extra ? 1 : 0);
  uint64_t* a = lists;
  uint64_t* b = lists + n * kc;
  for (int e = threadIdx.x; e < splits * kc; e += kThreads) a[e] = cand[row * splits * kc + e];
  if (extra)
    for (int e = threadIdx.x; e < kc; e += kThreads) a[splits * kc + e] = extra[e];
  __syncthreads();
  while (n > 1) {
    const int half = (n + 1) / 2;
    for (int e = threadIdx.x; e < half * kc; e += kThreads) b[e] = 0;
    __syncthreads();
    for (int e = threadIdx.x; e < n * kc; e += kThreads) {
      const uint64_t key = a[e];
      if (!key) continue;
      const int list = e / kc, pos = e % kc, other = list ^ 1;
      const int rank = pos + (other < n ? count_greater(a + other * kc, kc, key) : 0);
      if (rank < kc) b[(list >> 1) * kc + rank] = key;
    }
    __syncthreads();
    uint64_t* swap = a;
    a = b;
    b = swap;
    n = half;
  }
  for (int j = threadIdx.x; j < keff; j += kThreads)
    decode_key(a[j], values + row * keff + j, indices + row * keff + j);
}

// The k_aux lowest-index live latents as AuxK keys (z = -inf), sorted descending, 0-padded to kc:
// they fill the AuxK outputs when fewer than k_aux latents are dead, as -inf does in the reference.
constexpr int kFillThreads = 1024;
__global__ void __launch_bounds__(kFillThreads) aux_fill_kernel(const bool* __restrict__ dead,
                                                                int64_t M, int k_aux, int kc,
                                                                uint64_t* __restrict__ fill) {
  using Scan = cub::BlockScan<int, kFillThreads>;
  __shared__ typename Scan::TempStorage scan;
  int found = 0;
  for (int64_t start = 0; start < M && found < k_aux; start += kFillThreads) {
    const int64_t i = start + threadIdx.x;
    const int live = (i < M && !dead[i]) ? 1 : 0;
    int pos, total;
    Scan(scan).ExclusiveSum(live, pos, total);
    if (live && found + pos < k_aux) fill[found + pos] = make_key(kOrderedNegInf, static_cast<uint32_t>(i));
    found += total;
    __syncthreads();
  }
  for (int i = threadIdx.x; i < kc; i += kFillThreads)
    if (i >= min(found, k_aux)) fill[i] = 0;
}

// ------------------------------------------------------------------------------------------------
// Operand preparation
// ------------------------------------------------------------------------------------------------
// out (rows, ld) = in (rows, D) - sub (D), zero-padded to ld columns; sub may be nullptr.
template <typename T>
__global__ void center_pad_kernel(const T* __restrict__ in, const T* __restrict__ sub, int64_t rows,
                                  int64_t D, int64_t ld, T* __restrict__ out) {
  const int64_t total = rows * ld;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = e / ld, c = e % ld;
    float v = 0.0f;
    if (c < D) v = to_float(in[r * D + c]) - (sub ? to_float(sub[c]) : 0.0f);
    out[e] = from_float<T>(v);
  }
}

// zbias[m] = b_enc[m] - <b_dec, W[m]> in fp32 (one warp per latent): for 16-bit inputs b_dec is folded
// into the bias instead of rounding x - b_dec to 16 bits, so z matches the fp32 reference up to the
// rounding bound in topk_encode.cuh ((x - b_dec) W^T = x W^T - b_dec W^T, exactly so for exact data;
// tests/test_cuda_emu.py::test_topk_large_b_dec_contract). One extra read of W_enc.
template <typename T, int VEC>
__global__ void zbias_kernel(const T* __restrict__ W, const T* __restrict__ b_enc,
                             const T* __restrict__ b_dec, int64_t M, int64_t D,
                             float* __restrict__ zbias) {
  const int64_t m = blockIdx.x * int64_t(kWarps) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (m >= M) return;
  float dot = 0.0f;
  if (b_dec) {
#pragma unroll 4
    for (int64_t c = lane; c < D / VEC; c += 32) {
      float w[VEC], b[VEC];
      detail::load_as_float<T, VEC>(W + m * D + c * VEC, w);
      detail::load_as_float<T, VEC>(b_dec + c * VEC, b);
#pragma unroll
      for (int e = 0; e < VEC; ++e) dot = fmaf(b[e], w[e], dot);
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xFFFFFFFFu, dot, o);
  if (lane == 0) zbias[m] = (b_enc ? to_float(b_enc[m]) : 0.0f) - dot;
}

// ------------------------------------------------------------------------------------------------
// General path: z materialised per row chunk
// ------------------------------------------------------------------------------------------------
constexpr int kStoreBM = 128;

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) gemm_store_kernel(const T* __restrict__ X,
                                                                 const T* __restrict__ W,
                                                                 const float* __restrict__ zbias,
                                                                 int64_t rows_total, int64_t M,
                                                                 int64_t ld, float* __restrict__ z) {
  using Tl = Tile<kStoreBM>;
  extern __shared__ __align__(128) uint8_t smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = warp >> 2, wn = warp & 3;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kStoreBM;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const int rows = clamp_count(rows_total - row0, kStoreBM);
  const int cols = clamp_count(M - col0, kBN);
  float acc[Tl::MI][Tl::NI][4];
  gemm_tile<T, kStoreBM>(acc, X + row0 * ld, W + col0 * ld, ld, rows, cols, ld, smem);
#pragma unroll
  for (int mi = 0; mi < Tl::MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < Tl::NI; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = wm * Tl::WM + mi * 16 + (lane >> 2) + 8 * (e >> 1);
        const int c = wn * Tl::WN + ni * 8 + 2 * (lane & 3) + (e & 1);
        if (r < rows && c < cols)
          z[(row0 + r) * M + col0 + c] = acc[mi][ni][e] + (zbias ? zbias[col0 + c] : 0.0f);
      }
}

// One CTA per row (blockIdx.y: 0 = top-k, 1 = AuxK): finds the k-th largest key by a 4-pass MSD radix
// select over the ordered z bits, then writes the k selected keys (unordered) to out.
constexpr int kSelThreads = 512;
__device__ __forceinline__ uint32_t select_bits(const float* zr, const bool* dead, bool is_aux, int64_t i) {
  return (is_aux && !dead[i]) ? kOrderedNegInf : ordered_bits(zr[i]);
}
__global__ void __launch_bounds__(kSelThreads, 1) select_kernel(const float* __restrict__ z, int64_t M,
                                                             const bool* __restrict__ dead, int k,
                                                             int k_aux, uint64_t* __restrict__ out_top,
                                                             uint64_t* __restrict__ out_aux) {
  using Scan = cub::BlockScan<int, kSelThreads>;
  __shared__ typename Scan::TempStorage scan;
  __shared__ uint32_t hist[256];
  __shared__ uint32_t s_prefix;
  __shared__ int s_remaining, s_greater;
  const bool is_aux = blockIdx.y == 1;
  const int kk = is_aux ? k_aux : k;
  const int64_t row = blockIdx.x;
  const float* zr = z + row * M;
  uint64_t* out = (is_aux ? out_aux : out_top) + row * kk;
  const int lane = threadIdx.x & 31;

  uint32_t prefix = 0, mask = 0;
  int remaining = kk;  // how many of the keys matching `prefix` still belong to the top kk
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += kSelThreads) hist[b] = 0;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < M; i += kSelThreads) {
      const uint32_t o = select_bits(zr, dead, is_aux, i);
      if ((o & mask) == prefix) atomicAdd(&hist[(o >> shift) & 0xFFu], 1u);
    }
    __syncthreads();
    if (threadIdx.x < 32) {
      // Lane l holds digits 255-8l down to 248-8l; `above` counts the keys with larger digits.
      uint32_t local = 0;
#pragma unroll
      for (int d = 0; d < 8; ++d) local += hist[255 - 8 * lane - d];
      uint32_t above = local;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const uint32_t v = __shfl_up_sync(0xFFFFFFFFu, above, o);
        if (lane >= o) above += v;
      }
      above -= local;
      if (above < static_cast<uint32_t>(remaining) && above + local >= static_cast<uint32_t>(remaining)) {
#pragma unroll 1
        for (int d = 0; d < 8; ++d) {
          const int digit = 255 - 8 * lane - d;
          if (above + hist[digit] >= static_cast<uint32_t>(remaining)) {
            s_prefix = prefix | (static_cast<uint32_t>(digit) << shift);
            s_remaining = remaining - static_cast<int>(above);
            break;
          }
          above += hist[digit];
        }
      }
    }
    __syncthreads();
    prefix = s_prefix;
    remaining = s_remaining;
    mask |= 0xFFu << shift;
  }
  // prefix is now the k-th largest ordered value: keep every key above it and the `remaining`
  // lowest-index keys equal to it.
  if (threadIdx.x == 0) s_greater = 0;
  __syncthreads();
  const int n_greater = kk - remaining;
  int eq_seen = 0;
  for (int64_t start = 0; start < M; start += kSelThreads) {
    const int64_t i = start + threadIdx.x;
    const uint32_t o = i < M ? select_bits(zr, dead, is_aux, i) : 0u;
    if (i < M && o > prefix) out[atomicAdd(&s_greater, 1)] = make_key(o, static_cast<uint32_t>(i));
    const int eq = (i < M && o == prefix) ? 1 : 0;
    int pos, total;
    Scan(scan).ExclusiveSum(eq, pos, total);
    if (eq && eq_seen + pos < remaining)
      out[n_greater + eq_seen + pos] = make_key(o, static_cast<uint32_t>(i));
    eq_seen += total;
    __syncthreads();
  }
}

__global__ void fill_offsets_kernel(int64_t* __restrict__ offsets, int64_t count, int64_t stride) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x)
    offsets[i] = i * stride;
}

template <typename T>
__global__ void decode_kernel(const uint64_t* __restrict__ keys, int64_t count, T* __restrict__ values,
                              int32_t* __restrict__ indices) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x)
    decode_key(keys[i], values + i, indices + i);
}

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------
constexpr int64_t kMergeMaxKeys = 2048;             // splits * kc, the merge kernel's list budget
constexpr int64_t kGeneralZBytes = int64_t(256) << 20;  // z chunk of the general path
constexpr int kElementwiseBlocks = 1024;

struct FusedConfig {
  int kc;
  bool aux;
  int bm;
  int smem;
};
// BM shrinks as the rows' top-k state grows so that pipeline + state fit the 227 KB of an H100 CTA.
constexpr FusedConfig kFusedConfigs[] = {
    {32, false, 128, fused_smem_bytes<128, 32, false>()},
    {64, false, 128, fused_smem_bytes<128, 64, false>()},
    {128, false, 64, fused_smem_bytes<64, 128, false>()},
    {256, false, 64, fused_smem_bytes<64, 256, false>()},
    {32, true, 128, fused_smem_bytes<128, 32, true>()},
    {64, true, 64, fused_smem_bytes<64, 64, true>()},
    {128, true, 64, fused_smem_bytes<64, 128, true>()},
};

int state_capacity(int64_t k) {
  for (int kc : {32, 64, 128, 256})
    if (k <= kc) return kc;
  return 0;
}

struct Plan {
  int64_t ld = 0;          // row stride of the GEMM operands
  bool copy_x = false;     // X = x - b_dec (fp32) and/or a padded/aligned copy of x
  bool copy_w = false;     // padded/aligned copy of W_enc
  bool zbias_pass = false; // zbias from b_enc/b_dec by zbias_kernel (16-bit inputs)
  bool fused = false;
  FusedConfig cfg{};
  int tiles = 0, splits = 0, tiles_per_split = 0;
  int64_t chunk_rows = 0;
  size_t cub_bytes = 0;
  size_t off_x = 0, off_w = 0, off_zbias = 0, off_cand = 0, off_cand_aux = 0, off_fill = 0;
  size_t off_z = 0, off_sel = 0, off_sel_sorted = 0, off_sel_aux = 0, off_sel_aux_sorted = 0;
  size_t off_offsets = 0, off_offsets_aux = 0, off_cub = 0;
  size_t total = 0;
};

cudaError_t sort_bytes(int64_t rows, int64_t k, size_t* bytes) {
  *bytes = 0;
  if (rows == 0 || k == 0) return cudaSuccess;
  return cub::DeviceSegmentedSort::SortKeysDescending(
      nullptr, *bytes, static_cast<const uint64_t*>(nullptr), static_cast<uint64_t*>(nullptr),
      rows * k, rows, static_cast<const int64_t*>(nullptr), static_cast<const int64_t*>(nullptr));
}

template <typename T>
cudaError_t make_plan(const TopkEncodeArgs<T>& a, Plan& p) {
  constexpr int64_t kVec = detail::kVec16<T>;
  constexpr bool kFloat = std::is_same_v<T, float>;
  if (a.N < 0 || a.D < 0 || a.M < 1 || a.M > INT32_MAX || a.k < 1 || a.k > a.M || a.k_aux < 0 ||
      a.k_aux > a.M || (a.k_aux > 0 && !a.dead_mask))
    return cudaErrorInvalidValue;
  int device = 0, sms = 0, smem_optin = 0;
  PI_TRY(cudaGetDevice(&device));
  PI_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  PI_TRY(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (smem_optin < Tile<kStoreBM>::kPipeBytes) return cudaErrorNotSupported;

  // cp.async moves 16 bytes: rows must start 16-byte aligned, else the operands get a padded copy.
  p.ld = ceil_div(a.D, kVec) * kVec;
  p.copy_x = p.ld != a.D || !aligned16(a.x) || (kFloat && a.b_dec);
  p.copy_w = p.ld != a.D || !aligned16(a.W_enc);
  p.zbias_pass = !kFloat && (a.b_enc || a.b_dec);

  size_t cursor = 0;
  if (p.copy_x) p.off_x = carve(cursor, sizeof(T) * a.N * p.ld);
  if (p.copy_w) p.off_w = carve(cursor, sizeof(T) * a.M * p.ld);
  if (p.zbias_pass) p.off_zbias = carve(cursor, sizeof(float) * a.M);

  const bool aux = a.k_aux > 0;
  const int kc = aux ? (a.k <= 128 && a.k_aux <= 128
                            ? std::max(state_capacity(a.k), state_capacity(a.k_aux)) : 0)
                     : state_capacity(a.k);
  for (const FusedConfig& c : kFusedConfigs)
    if (c.kc == kc && c.aux == aux && c.smem <= smem_optin) {
      p.fused = true;
      p.cfg = c;
    }
  p.tiles = static_cast<int>(ceil_div(a.M, kBN));
  if (p.fused) {
    const int64_t row_blocks = ceil_div(a.N, p.cfg.bm);
    // About one CTA per SM: split the latents only as far as the row blocks leave SMs idle.
    int64_t splits = std::max<int64_t>(1, sms / std::max<int64_t>(1, row_blocks));
    splits = std::min<int64_t>({splits, p.tiles, kMergeMaxKeys / p.cfg.kc});
    p.tiles_per_split = static_cast<int>(ceil_div(p.tiles, splits));
    p.splits = static_cast<int>(ceil_div(p.tiles, p.tiles_per_split));
    const size_t cand = sizeof(uint64_t) * a.N * p.splits * p.cfg.kc;
    p.off_cand = carve(cursor, cand);
    if (aux) {
      p.off_cand_aux = carve(cursor, cand);
      p.off_fill = carve(cursor, sizeof(uint64_t) * p.cfg.kc);
    }
  } else {
    p.chunk_rows = std::clamp<int64_t>(kGeneralZBytes / (int64_t(sizeof(float)) * a.M), 1,
                                       std::max<int64_t>(a.N, 1));
    p.chunk_rows = std::min<int64_t>(p.chunk_rows, int64_t(65535) * kStoreBM);
    p.off_z = carve(cursor, sizeof(float) * p.chunk_rows * a.M);
    p.off_sel = carve(cursor, sizeof(uint64_t) * p.chunk_rows * a.k);
    p.off_sel_sorted = carve(cursor, sizeof(uint64_t) * p.chunk_rows * a.k);
    p.off_offsets = carve(cursor, sizeof(int64_t) * (p.chunk_rows + 1));
    size_t top_bytes = 0, aux_bytes = 0;
    PI_TRY(sort_bytes(p.chunk_rows, a.k, &top_bytes));
    if (aux) {
      p.off_sel_aux = carve(cursor, sizeof(uint64_t) * p.chunk_rows * a.k_aux);
      p.off_sel_aux_sorted = carve(cursor, sizeof(uint64_t) * p.chunk_rows * a.k_aux);
      p.off_offsets_aux = carve(cursor, sizeof(int64_t) * (p.chunk_rows + 1));
      PI_TRY(sort_bytes(p.chunk_rows, a.k_aux, &aux_bytes));
    }
    p.cub_bytes = std::max(top_bytes, aux_bytes);
    p.off_cub = carve(cursor, p.cub_bytes);
  }
  p.total = cursor;
  return cudaSuccess;
}

int elementwise_grid(int64_t n, int threads) {
  return static_cast<int>(std::clamp<int64_t>(ceil_div(n, threads), 1, kElementwiseBlocks));
}

template <typename T, int BM, int KC, bool AUX>
cudaError_t launch_fused_config(const FusedParams<T>& fp, int64_t N, cudaStream_t stream) {
  constexpr int smem = fused_smem_bytes<BM, KC, AUX>();
  auto* kernel = fused_topk_kernel<T, BM, KC, AUX>;
  PI_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 grid(static_cast<unsigned>(ceil_div(N, BM)), static_cast<unsigned>(fp.splits));
  kernel<<<grid, kThreads, smem, stream>>>(fp);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_fused(const Plan& p, const FusedParams<T>& fp, int64_t N, cudaStream_t stream) {
  switch (p.cfg.kc * 2 + (p.cfg.aux ? 1 : 0)) {
    case 64: return launch_fused_config<T, 128, 32, false>(fp, N, stream);
    case 128: return launch_fused_config<T, 128, 64, false>(fp, N, stream);
    case 256: return launch_fused_config<T, 64, 128, false>(fp, N, stream);
    case 512: return launch_fused_config<T, 64, 256, false>(fp, N, stream);
    case 65: return launch_fused_config<T, 128, 32, true>(fp, N, stream);
    case 129: return launch_fused_config<T, 64, 64, true>(fp, N, stream);
    case 257: return launch_fused_config<T, 64, 128, true>(fp, N, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t run_fused(const TopkEncodeArgs<T>& a, const Plan& p, const T* X, const T* W,
                      const float* zbias, uint8_t* ws, cudaStream_t stream) {
  FusedParams<T> fp{};
  fp.X = X;
  fp.W = W;
  fp.zbias = zbias;
  fp.dead = a.dead_mask;
  fp.N = a.N;
  fp.M = a.M;
  fp.ld = p.ld;
  fp.tiles = p.tiles;
  fp.tiles_per_split = p.tiles_per_split;
  fp.splits = p.splits;
  fp.k = static_cast<int>(a.k);
  fp.k_aux = static_cast<int>(a.k_aux);
  fp.cand = reinterpret_cast<uint64_t*>(ws + p.off_cand);
  fp.cand_aux = p.cfg.aux ? reinterpret_cast<uint64_t*>(ws + p.off_cand_aux) : nullptr;
  PI_TRY(launch_fused(p, fp, a.N, stream));

  const int kc = p.cfg.kc;
  const size_t merge_smem = 2 * sizeof(uint64_t) * size_t(p.splits + 1) * kc;
  merge_splits_kernel<T><<<static_cast<unsigned>(a.N), kThreads, merge_smem, stream>>>(
      fp.cand, p.splits, kc, nullptr, static_cast<int>(a.k), a.values, a.indices);
  PI_TRY(cudaGetLastError());
  if (p.cfg.aux) {
    uint64_t* fill = reinterpret_cast<uint64_t*>(ws + p.off_fill);
    aux_fill_kernel<<<1, kFillThreads, 0, stream>>>(a.dead_mask, a.M, static_cast<int>(a.k_aux), kc, fill);
    PI_TRY(cudaGetLastError());
    merge_splits_kernel<T><<<static_cast<unsigned>(a.N), kThreads, merge_smem, stream>>>(
        fp.cand_aux, p.splits, kc, fill, static_cast<int>(a.k_aux), a.aux_values, a.aux_indices);
    PI_TRY(cudaGetLastError());
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t sort_and_decode(const Plan& p, uint8_t* ws, size_t off_in, size_t off_out,
                            size_t off_offsets, int64_t rows, int64_t k, T* values,
                            int32_t* indices, cudaStream_t stream) {
  const auto* in = reinterpret_cast<const uint64_t*>(ws + off_in);
  auto* out = reinterpret_cast<uint64_t*>(ws + off_out);
  const auto* offsets = reinterpret_cast<const int64_t*>(ws + off_offsets);
  size_t bytes = p.cub_bytes;
  PI_TRY(cub::DeviceSegmentedSort::SortKeysDescending(ws + p.off_cub, bytes, in, out, rows * k, rows,
                                                       offsets, offsets + 1, stream));
  decode_kernel<T><<<elementwise_grid(rows * k, kThreads), kThreads, 0, stream>>>(out, rows * k, values,
                                                                                  indices);
  return cudaGetLastError();
}

template <typename T>
cudaError_t run_general(const TopkEncodeArgs<T>& a, const Plan& p, const T* X, const T* W,
                        const float* zbias, uint8_t* ws, cudaStream_t stream) {
  const bool aux = a.k_aux > 0;
  auto* offsets = reinterpret_cast<int64_t*>(ws + p.off_offsets);
  fill_offsets_kernel<<<elementwise_grid(p.chunk_rows + 1, kThreads), kThreads, 0, stream>>>(
      offsets, p.chunk_rows + 1, a.k);
  PI_TRY(cudaGetLastError());
  if (aux) {
    fill_offsets_kernel<<<elementwise_grid(p.chunk_rows + 1, kThreads), kThreads, 0, stream>>>(
        reinterpret_cast<int64_t*>(ws + p.off_offsets_aux), p.chunk_rows + 1, a.k_aux);
    PI_TRY(cudaGetLastError());
  }
  constexpr int smem = Tile<kStoreBM>::kPipeBytes;
  PI_TRY(cudaFuncSetAttribute(gemm_store_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  float* z = reinterpret_cast<float*>(ws + p.off_z);
  for (int64_t r0 = 0; r0 < a.N; r0 += p.chunk_rows) {
    const int64_t rows = std::min(p.chunk_rows, a.N - r0);
    const dim3 grid(static_cast<unsigned>(p.tiles), static_cast<unsigned>(ceil_div(rows, kStoreBM)));
    gemm_store_kernel<T><<<grid, kThreads, smem, stream>>>(X + r0 * p.ld, W, zbias, rows, a.M, p.ld, z);
    PI_TRY(cudaGetLastError());
    select_kernel<<<dim3(static_cast<unsigned>(rows), aux ? 2 : 1), kSelThreads, 0, stream>>>(
        z, a.M, a.dead_mask, static_cast<int>(a.k), static_cast<int>(a.k_aux),
        reinterpret_cast<uint64_t*>(ws + p.off_sel),
        aux ? reinterpret_cast<uint64_t*>(ws + p.off_sel_aux) : nullptr);
    PI_TRY(cudaGetLastError());
    PI_TRY(sort_and_decode<T>(p, ws, p.off_sel, p.off_sel_sorted, p.off_offsets, rows, a.k,
                              a.values + r0 * a.k, a.indices + r0 * a.k, stream));
    if (aux)
      PI_TRY(sort_and_decode<T>(p, ws, p.off_sel_aux, p.off_sel_aux_sorted, p.off_offsets_aux, rows,
                                a.k_aux, a.aux_values + r0 * a.k_aux, a.aux_indices + r0 * a.k_aux,
                                stream));
  }
  return cudaSuccess;
}

}  // namespace

template <typename T>
cudaError_t topk_encode_forward_workspace_bytes(const TopkEncodeArgs<T>& args, size_t* bytes) {
  Plan p;
  PI_TRY(make_plan(args, p));
  *bytes = p.total;
  return cudaSuccess;
}

template <typename T>
cudaError_t topk_encode_forward(const TopkEncodeArgs<T>& a, void* workspace, size_t workspace_bytes,
                                cudaStream_t stream) {
  Plan p;
  PI_TRY(make_plan(a, p));
  if (workspace_bytes < p.total) return cudaErrorInvalidValue;
  if (a.N == 0) return cudaSuccess;
  auto* ws = static_cast<uint8_t*>(workspace);

  const T* X = a.x;
  const T* W = a.W_enc;
  if (p.copy_x) {
    T* xc = reinterpret_cast<T*>(ws + p.off_x);
    const T* sub = std::is_same_v<T, float> ? a.b_dec : nullptr;
    center_pad_kernel<T><<<elementwise_grid(a.N * p.ld, kThreads), kThreads, 0, stream>>>(
        a.x, sub, a.N, a.D, p.ld, xc);
    PI_TRY(cudaGetLastError());
    X = xc;
  }
  if (p.copy_w) {
    T* wc = reinterpret_cast<T*>(ws + p.off_w);
    center_pad_kernel<T><<<elementwise_grid(a.M * p.ld, kThreads), kThreads, 0, stream>>>(
        a.W_enc, nullptr, a.M, a.D, p.ld, wc);
    PI_TRY(cudaGetLastError());
    W = wc;
  }
  // fp32: z = (x - b_dec) W^T + b_enc exactly as written; 16-bit: b_dec folded into zbias.
  const float* zbias = nullptr;
  if constexpr (std::is_same_v<T, float>) {
    zbias = a.b_enc;
  } else if (p.zbias_pass) {
    float* zb = reinterpret_cast<float*>(ws + p.off_zbias);
    constexpr int kVec = detail::kVec16<T>;
    const unsigned grid = static_cast<unsigned>(ceil_div(a.M, kWarps));
    if (a.D % kVec == 0 && !!aligned16(a.W_enc) && !!aligned16(a.b_dec))
      zbias_kernel<T, kVec><<<grid, kThreads, 0, stream>>>(a.W_enc, a.b_enc, a.b_dec, a.M, a.D, zb);
    else
      zbias_kernel<T, 1><<<grid, kThreads, 0, stream>>>(a.W_enc, a.b_enc, a.b_dec, a.M, a.D, zb);
    PI_TRY(cudaGetLastError());
    zbias = zb;
  }
  return p.fused ? run_fused(a, p, X, W, zbias, ws, stream) : run_general(a, p, X, W, zbias, ws, stream);
}

#define PI_INSTANTIATE(T)                                                                          \
  template cudaError_t topk_encode_forward_workspace_bytes<T>(const TopkEncodeArgs<T>&, size_t*); \
  template cudaError_t topk_encode_forward<T>(const TopkEncodeArgs<T>&, void*, size_t, cudaStream_t);
PI_INSTANTIATE(float)
PI_INSTANTIATE(__half)
PI_INSTANTIATE(__nv_bfloat16)
#undef PI_INSTANTIATE

}  // namespace pyinterp::cuda
