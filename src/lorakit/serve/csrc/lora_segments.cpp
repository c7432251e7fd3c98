// lora_segments_: the LoRA branch of new prompts (prefill) for one projection group, in one call. Each prompt's
// tokens are one segment on one adapter: out[t] += (x[t] A^T) Bt, then *= g (DoRA), for every token t of every
// segment (S-LoRA's SGMV, on the CPU).
//
// Why: as torch ops a prompt costs two GEMMs per layer and group whose inner size is the rank (8 to 24 here), and
// the CPU runs such thin bf16 GEMMs far below its speed: a mixed batch's prompts took 1.24x the base's time, where
// the LoRA arithmetic is 2% of the base's. Here a group is one call. A segment's tokens go in blocks of 16: the
// block's h = x A^T with AVX-512 BF16 dot products (each factor row read once per block, 16 sums at once), then
// each 16-column chunk of Bt is read once per block and added into all its tokens; sums in fp32, out rounded
// once, as lora_rows_ rounds. Without AVX-512 BF16, or with fp32 factors or an fp32 model, each token runs
// lora_rows_'s row update (kernels.h).
//
// Operands (as lora_rows_'s, decode_kernels.cpp):
//   x       (T, d_in) fp32 or bf16, innermost contiguous; out (T, d_out) x's dtype, updated in place
//   table   (segments, 3 + 3 * blocks) int64: lora_rows_'s lines with the segment's first token where the row is
//   lengths (segments) int64: each segment's token count
//   widths  the blocks' output widths; bf16_factors: A, Bt and g are bf16 (else fp32)
#include <type_traits>

#include "kernels.h"
#include "simd.h"

namespace lorakit {

namespace {

using bf16 = c10::BFloat16;
constexpr int64_t kBlock = LoraBlock::kRows;

// Every row of a block through the row update (lora_columns), all columns.
template <typename XT, typename FT>
void block_by_rows(const XT* xp, int64_t sx, XT* op, int64_t so, int64_t d_in, int64_t d_out, const LoraBlock& block,
                   int64_t fields, const std::vector<int64_t>& widths) {
  std::vector<int64_t> line(block.entry, block.entry + fields);
  for (int64_t i = 0; i < block.count; ++i) {
    line[0] = block.rows[i];
    lora_columns<XT, FT>(xp, sx, op, so, d_in, line.data(), 0, 1, fields, widths, 0, d_out);
  }
}

#if defined(__AVX512BF16__)

// The block's N rows are a template argument so that their sums stay in registers (with a count known only at run
// time the compiler kept them on the stack: a load and a store per multiply-add, 3x slower).

// h[r * kBlock + i] = x[rows[i]] . A[r] for the block's rows i (bf16 dot products, fp32 sums)
template <int N>
void block_h(const bf16* xp, int64_t sx, int64_t d_in, const bf16* A, int64_t ranks, const LoraBlock& block, float* h) {
  const int64_t tail = d_in % 32, body = d_in - tail;
  const __mmask32 tail_mask = tail ? static_cast<__mmask32>((1ull << tail) - 1) : 0;
  const uint16_t* x[N];
  for (int i = 0; i < N; ++i) x[i] = reinterpret_cast<const uint16_t*>(xp + block.rows[i] * sx);
  for (int64_t r = 0; r < ranks; ++r) {
    const uint16_t* a = reinterpret_cast<const uint16_t*>(A + r * d_in);
    __m512 acc[N < 8 ? N : kBlock];  // from 8 rows on, all 16 summed at once by a transposing tree
    for (auto& v : acc) v = _mm512_setzero_ps();
    for (int64_t k = 0; k < body; k += 32) {
      const __m512bh av = (__m512bh)_mm512_loadu_si512(a + k);
      for (int i = 0; i < N; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], av, (__m512bh)_mm512_loadu_si512(x[i] + k));
    }
    if (tail) {
      const __m512bh av = (__m512bh)_mm512_maskz_loadu_epi16(tail_mask, a + body);
      for (int i = 0; i < N; ++i)
        acc[i] = _mm512_dpbf16_ps(acc[i], av, (__m512bh)_mm512_maskz_loadu_epi16(tail_mask, x[i] + body));
    }
    if constexpr (N < 8) {
      for (int i = 0; i < N; ++i) h[r * kBlock + i] = _mm512_reduce_add_ps(acc[i]);
    } else {
      _mm512_storeu_ps(h + r * kBlock, simd::hsum16(acc));
    }
  }
}

inline __m512 load16_masked(const bf16* v, __mmask16 mask) {
  const __m256i raw = _mm256_maskz_loadu_epi16(mask, v);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// out[rows[i]] = round((out + h Bt) * g) over the group's columns [c0, c1), for the block's rows
template <int N>
void block_add(bf16* op, int64_t so, const std::vector<int64_t>& widths, const float* h, const LoraBlock& block,
               int64_t c0, int64_t c1) {
  const int64_t* entry = block.entry;
  const bf16* g = reinterpret_cast<const bf16*>(entry[2]);
  int64_t first = 0, col = 0;  // the projection's first value of h and first column of out
  for (size_t b = 0; b < widths.size(); ++b) {
    const int64_t rank = entry[3 + 3 * b + 1], stride = entry[3 + 3 * b + 2], width = widths[b];
    const bf16* Bt = reinterpret_cast<const bf16*>(entry[3 + 3 * b]);
    const int64_t lo = std::max(c0 - col, int64_t{0}), hi = std::min(c1 - col, width);  // within the projection
    if ((rank || g != nullptr) && lo < hi) {
      for (int64_t c = lo; c < hi; c += 16) {
        const __mmask16 mask = hi - c >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (hi - c)) - 1);
        __m512 acc[N];
        for (auto& v : acc) v = _mm512_setzero_ps();
        for (int64_t r = 0; r < rank; ++r) {
          const __m512 bv = load16_masked(Bt + r * stride + c, mask);
          const float* hr = h + (first + r) * kBlock;
          for (int i = 0; i < N; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(hr[i]), bv, acc[i]);
        }
        const __m512 scale = g != nullptr ? load16_masked(g + col + c, mask) : _mm512_set1_ps(1.f);
        for (int i = 0; i < N; ++i) {
          bf16* o = op + block.rows[i] * so + col + c;
          __m512 v = _mm512_add_ps(load16_masked(o, mask), acc[i]);
          if (g != nullptr) v = _mm512_mul_ps(v, scale);
          _mm256_mask_storeu_epi16(o, mask, (__m256i)_mm512_cvtneps_pbh(v));
        }
      }
    }
    first += rank;
    col += width;
  }
}

template <int N>
void block_rows(const bf16* xp, int64_t sx, bf16* op, int64_t so, int64_t d_in, const std::vector<int64_t>& widths,
                const LoraBlock& block, std::vector<float>& h, int64_t c0, int64_t c1) {
  if constexpr (N > 1) {
    if (block.count < N) return block_rows<N - 1>(xp, sx, op, so, d_in, widths, block, h, c0, c1);
  }
  h.resize(rank_sum(block.entry, widths.size()) * kBlock);
  block_h<N>(xp, sx, d_in, reinterpret_cast<const bf16*>(block.entry[1]), h.size() / kBlock, block, h.data());
  block_add<N>(op, so, widths, h.data(), block, c0, c1);
}

#endif

}  // namespace

#if defined(__AVX512BF16__)
void lora_block_bf16(const bf16* xp, int64_t sx, bf16* op, int64_t so, int64_t d_in, const std::vector<int64_t>& widths,
                     const LoraBlock& block, std::vector<float>& h, int64_t c0, int64_t c1) {
  block_rows<kBlock>(xp, sx, op, so, d_in, widths, block, h, c0, c1);  // instantiated for 16 rows down to 1
}
#endif

namespace {

template <typename XT, typename FT>
void run(const at::Tensor& x, const at::Tensor& out, const std::vector<LoraBlock>& blocks, int64_t fields,
         const std::vector<int64_t>& widths) {
  const XT* xp = x.data_ptr<XT>();
  XT* op = out.data_ptr<XT>();
  const int64_t sx = x.stride(0), so = out.stride(0), d_in = x.size(1), d_out = out.size(1);
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t begin, int64_t end) {
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<XT, bf16> && std::is_same_v<FT, bf16>) {
      std::vector<float> h;
      for (int64_t k = begin; k < end; ++k) lora_block_bf16(xp, sx, op, so, d_in, widths, blocks[k], h, 0, d_out);
      return;
    }
#endif
    for (int64_t k = begin; k < end; ++k) block_by_rows<XT, FT>(xp, sx, op, so, d_in, d_out, blocks[k], fields, widths);
  });
}

}  // namespace

void lora_segments_(const at::Tensor& x, const at::Tensor& out, const at::Tensor& table, const at::Tensor& lengths,
                    const std::vector<int64_t>& widths, bool bf16_factors) {
  check_lora_operands("lora_segments_", x, out, table, widths);
  TORCH_CHECK(lengths.device().is_cpu() && lengths.scalar_type() == at::kLong && lengths.is_contiguous() &&
                  lengths.numel() == table.size(0),
              "lora_segments_: lengths is (segments) int64, contiguous, on the CPU");
  const int64_t fields = table.size(1);
  const int64_t* tp = table.data_ptr<int64_t>();
  const int64_t* lp = lengths.data_ptr<int64_t>();
  std::vector<LoraBlock> blocks;
  for (int64_t line = 0; line < table.size(0); ++line) {
    const int64_t* entry = tp + line * fields;
    TORCH_CHECK(entry[0] >= 0 && lp[line] >= 0 && entry[0] + lp[line] <= x.size(0),
                "lora_segments_: a segment lies outside x's rows");
    if (entry[1] == 0) continue;  // the adapter leaves this layer's group alone
    for (int64_t t = entry[0]; t < entry[0] + lp[line]; t += kBlock) {
      LoraBlock block{entry, std::min(kBlock, entry[0] + lp[line] - t), {}};
      for (int64_t i = 0; i < block.count; ++i) block.rows[i] = t + i;
      blocks.push_back(block);
    }
  }
  dispatch_lora_dtypes("lora_segments_", x.scalar_type(), bf16_factors, [&](auto xt, auto ft) {
    run<decltype(xt), decltype(ft)>(x, out, blocks, fields, widths);
  });
}

}  // namespace lorakit
