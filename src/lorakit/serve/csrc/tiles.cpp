// bf16_tiles: out (n, d_out) = x (n, d_in) W^T for bf16 decoding steps of a few rows, over a tiled copy of W.
//
// Why: a decoding step of 1-16 rows is a skinny product, bound by how fast the weights stream in and, from about 8
// rows on, by the multiply-adds. oneDNN's packed bf16 linear streams the weights well below the memory bandwidth at
// a few rows; bf16_gemv (decode_kernels.cpp) reads each weight row once but sums every (row, column) pair
// horizontally, so it slows down with each row it adds. Here the weights are held tiled (the
// layout AMX and oneDNN's VNNI kernels use): for every 16 output columns and every pair of inputs, the 16 columns'
// two weights side by side, so one 64-byte load feeds a vdpbf16ps (bf16 pairs, fp32 sums) for all 16 columns, with
// x's pair broadcast; each of up to 16 rows keeps its own accumulators, no horizontal sums, and the tiled copy is
// read front to back, once per step. More than 16 rows (new prompts) go 8 at a time over a few column blocks, which
// stay in the caches meanwhile, so the weights still stream in once (tile_many_rows). Only where the compiler targets AVX-512 BF16 (has_bf16_gemv says).
//
// Tiled copy (tile_weight_): (ceil(d_out / 16), ceil(d_in / 2), 16, 2) bf16; [b, p, c, e] = W[16 b + c, 2 p + e],
// zero past W's edges, so any shape is held and the padding adds nothing to the sums.
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <utility>

#include "kernels.h"

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace lorakit {

#if defined(__AVX512BF16__)

namespace {

using bf16 = c10::BFloat16;

// R rows times V column blocks (16 columns each) starting at block b: R * V accumulators. From 9 rows on the
// multiply-adds take long enough that the hardware prefetcher falls behind the stream; a software prefetch 64
// lines ahead keeps it fed (README, Serving, for the measurements).
template <int R, int V>
void tile_block(const uint16_t* x, int64_t d_in, const uint16_t* tiles, int64_t pairs, int64_t b, int64_t d_out,
                bf16* out) {
  constexpr int64_t kPrefetch = R > 8 ? 64 * 32 : 0;  // in bf16 elements: 64 lines of 64 bytes
  const int64_t stride = pairs * 32;                   // one column block of the tiled copy
  const uint16_t* w = tiles + b * stride;
  __m512 acc[R * V];
  for (int t = 0; t < R * V; ++t) acc[t] = _mm512_setzero_ps();
  const int64_t full = d_in / 2;  // pairs whose both halves lie in x
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh wv[V];
    for (int v = 0; v < V; ++v) {
      wv[v] = (__m512bh)_mm512_loadu_si512(w + v * stride + p * 32);
      if constexpr (kPrefetch > 0) _mm_prefetch(reinterpret_cast<const char*>(w + v * stride + p * 32 + kPrefetch), _MM_HINT_T0);
    }
    for (int r = 0; r < R; ++r) {
      // x's pair p as one 32-bit lane: (x[2p], x[2p + 1]); past an odd d_in the last one is (x[d_in - 1], 0)
      const uint16_t* row = x + r * d_in;
      const uint32_t xp = p < full ? *reinterpret_cast<const uint32_t*>(row + 2 * p) : row[2 * p];
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(xp));
      for (int v = 0; v < V; ++v) acc[r * V + v] = _mm512_dpbf16_ps(acc[r * V + v], wv[v], xv);
    }
  }
  for (int v = 0; v < V; ++v) {
    const int64_t c0 = (b + v) * 16;
    const __mmask16 keep = c0 + 16 <= d_out ? static_cast<__mmask16>(0xFFFF)
                                            : static_cast<__mmask16>((1u << (d_out - c0)) - 1);
    for (int r = 0; r < R; ++r)
      _mm256_mask_storeu_epi16(out + r * d_out + c0, keep, (__m256i)_mm512_cvtneps_pbh(acc[r * V + v]));
  }
}

// R rows over the column blocks [b0, b1): V blocks at a time (as many accumulators as the registers hold beside
// the weights), the rest one at a time
template <int R>
void tile_rows(const uint16_t* x, int64_t d_in, const uint16_t* tiles, int64_t pairs, int64_t b0, int64_t b1,
               int64_t d_out, bf16* out) {
  constexpr int V = R <= 6 ? 4 : (R <= 12 ? 2 : 1);
  int64_t b = b0;
  for (; b + V <= b1; b += V) tile_block<R, V>(x, d_in, tiles, pairs, b, d_out, out);
  for (; b < b1; ++b) tile_block<R, 1>(x, d_in, tiles, pairs, b, d_out, out);
}

template <int... Rs>
void tile_rows_n(int64_t rows, const uint16_t* x, int64_t d_in, const uint16_t* tiles, int64_t pairs, int64_t b0,
                 int64_t b1, int64_t d_out, bf16* out, std::integer_sequence<int, Rs...>) {
  // rows is 1..16: the matching instance, R = rows
  ((rows == Rs + 1 ? tile_rows<Rs + 1>(x, d_in, tiles, pairs, b0, b1, d_out, out) : void()), ...);
}

// More than 16 rows (new prompts): the column blocks [b0, b1) six at a time (they stay in L2 meanwhile) go through
// every row, 8 rows by 3 blocks at a time: 24 sums, 3 weight loads and 8 broadcasts per 24 multiply-adds, where
// 16 rows by one block take a broadcast per multiply-add. Rows past a multiple of 8 as tile_rows does them.
void tile_many_rows(int64_t n, const uint16_t* x, int64_t d_in, const uint16_t* tiles, int64_t pairs, int64_t b0,
                    int64_t b1, int64_t d_out, bf16* out) {
  constexpr int64_t kChunk = 6;
  for (int64_t b = b0; b < b1; b += kChunk) {
    const int64_t e = std::min(b + kChunk, b1);
    int64_t r = 0;
    for (; r + 8 <= n; r += 8) {
      int64_t c = b;
      for (; c + 3 <= e; c += 3) tile_block<8, 3>(x + r * d_in, d_in, tiles, pairs, c, d_out, out + r * d_out);
      for (; c < e; ++c) tile_block<8, 1>(x + r * d_in, d_in, tiles, pairs, c, d_out, out + r * d_out);
    }
    if (r < n) {
      tile_rows_n(n - r, x + r * d_in, d_in, tiles, pairs, b, e, d_out, out + r * d_out,
                  std::make_integer_sequence<int, 16>{});
    }
  }
}

}  // namespace

void bf16_tiles_columns(const bf16* x, int64_t n, const bf16* tiles, int64_t d_out, int64_t d_in, bf16* out,
                        int64_t c0, int64_t c1) {
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x);
  const uint16_t* tp = reinterpret_cast<const uint16_t*>(tiles);
  const int64_t pairs = (d_in + 1) / 2, b0 = c0 / 16, b1 = (c1 + 15) / 16;
  if (n <= 16) {
    tile_rows_n(n, xp, d_in, tp, pairs, b0, b1, d_out, out, std::make_integer_sequence<int, 16>{});
  } else {
    tile_many_rows(n, xp, d_in, tp, pairs, b0, b1, d_out, out);
  }
}

void bf16_tiles(const bf16* x, int64_t n, const bf16* tiles, int64_t d_out, int64_t d_in, bf16* out) {
  at::parallel_for(0, (d_out + 15) / 16, 4, [&](int64_t b0, int64_t b1) {
    bf16_tiles_columns(x, n, tiles, d_out, d_in, out, b0 * 16, std::min(b1 * 16, d_out));
  });
}

#else

void bf16_tiles_columns(const c10::BFloat16*, int64_t, const c10::BFloat16*, int64_t, int64_t, c10::BFloat16*, int64_t,
                        int64_t) {
  TORCH_CHECK(false, "bf16_tiles: built without AVX-512 BF16");
}

void bf16_tiles(const c10::BFloat16*, int64_t, const c10::BFloat16*, int64_t, int64_t, c10::BFloat16*) {
  TORCH_CHECK(false, "bf16_tiles: built without AVX-512 BF16");
}

#endif

bool is_tiled_copy(const at::Tensor& tiles, int64_t d_out, int64_t d_in) {
  return tiles.device().is_cpu() && tiles.scalar_type() == at::kBFloat16 && tiles.is_contiguous() &&
         tiles.dim() == 4 && tiles.size(0) == (d_out + 15) / 16 && tiles.size(1) == (d_in + 1) / 2 &&
         tiles.size(2) == 16 && tiles.size(3) == 2;
}

void bf16_tiles_(const at::Tensor& x, const at::Tensor& tiles, const at::Tensor& out) {
  TORCH_CHECK(has_bf16_gemv(), "bf16_tiles_: built without AVX-512 BF16");
  TORCH_CHECK(x.device().is_cpu() && out.device().is_cpu() && x.scalar_type() == at::kBFloat16 &&
                  out.scalar_type() == at::kBFloat16 && x.dim() == 2 && out.dim() == 2 && x.size(0) == out.size(0) &&
                  x.is_contiguous() && out.is_contiguous(),
              "bf16_tiles_: x (n, d_in) and out (n, d_out), bf16, contiguous");
  TORCH_CHECK(is_tiled_copy(tiles, out.size(1), x.size(1)),
              "bf16_tiles_: tiles is the tiled copy of a (d_out, d_in) bf16 weight (tile_weight_)");
  bf16_tiles(x.data_ptr<c10::BFloat16>(), x.size(0), tiles.data_ptr<c10::BFloat16>(), out.size(1), x.size(1),
             out.data_ptr<c10::BFloat16>());
}

at::Tensor tile_weight_(const at::Tensor& W) {
  TORCH_CHECK(W.device().is_cpu() && W.scalar_type() == at::kBFloat16 && W.dim() == 2 && W.size(0) > 0 && W.size(1) > 0,
              "tile_weight_: W is a (d_out, d_in) bf16 CPU tensor");
  const int64_t d_out = W.size(0), d_in = W.size(1), blocks = (d_out + 15) / 16, pairs = (d_in + 1) / 2;
  at::Tensor padded = at::zeros({blocks * 16, pairs * 2}, W.options());
  padded.narrow(0, 0, d_out).narrow(1, 0, d_in).copy_(W);
  return padded.view({blocks, 16, pairs, 2}).transpose(1, 2).contiguous();
}

}  // namespace lorakit
