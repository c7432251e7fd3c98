// The cores shared by the engine's compiled kernels (decode_kernels.cpp: one call per product; decode_step.cpp:
// a whole decoding step in one call). Raw pointers in, so that both can call them without building tensors.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <vector>

namespace lorakit {

// The LoRA update of the rows in one table (lines of [row, A, g, then per block: Bt, rank, Bt's row stride]; see
// decode_kernels.cpp), in two parts: lora_h computes a line's h = x[row] A^T (its ranks' sum of values), then
// lora_add adds h Bt into the row's output columns [c0, c1) and applies DoRA's g there, so that callers may split
// either the lines or the columns between threads.

inline int64_t rank_sum(const int64_t* entry, size_t blocks) {
  int64_t sum = 0;
  for (size_t b = 0; b < blocks; ++b) sum += entry[3 + 3 * b + 1];
  return sum;
}

// h (rank_sum values) = x A^T for one line; xf: scratch of d_in floats
template <typename XT, typename FT>
void lora_h(const XT* x, int64_t d_in, const int64_t* entry, size_t blocks, float* xf, float* h) {
  const FT* A = reinterpret_cast<const FT*>(entry[1]);
  for (int64_t k = 0; k < d_in; ++k) xf[k] = static_cast<float>(x[k]);
  for (int64_t r = 0, ranks = rank_sum(entry, blocks); r < ranks; ++r) {
    const FT* a = A + r * d_in;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < d_in; ++k) s += xf[k] * static_cast<float>(a[k]);
    h[r] = s;
  }
}

// o[c0:c1] = (o + h Bt)[c0:c1], then *= g there; acc: scratch of c1 - c0 floats
template <typename XT, typename FT>
void lora_add(const int64_t* entry, const std::vector<int64_t>& widths, const float* h, XT* o, int64_t c0,
              int64_t c1, float* acc) {
  const FT* g = reinterpret_cast<const FT*>(entry[2]);
  std::fill(acc, acc + (c1 - c0), 0.f);
  int64_t first = 0, col = 0;  // the block's first value of h and first column of out
  for (size_t b = 0; b < widths.size(); ++b) {
    const int64_t rank = entry[3 + 3 * b + 1], stride = entry[3 + 3 * b + 2], width = widths[b];
    const int64_t lo = std::max(col, c0), hi = std::min(col + width, c1);  // this block's columns in range
    if (rank && lo < hi) {
      const FT* Bt = reinterpret_cast<const FT*>(entry[3 + 3 * b]) + (lo - col);
      float* acc_b = acc + (lo - c0);
      for (int64_t r = 0; r < rank; ++r) {
        const float hr = h[first + r];
        const FT* line_r = Bt + r * stride;
#pragma omp simd
        for (int64_t j = 0; j < hi - lo; ++j) acc_b[j] += hr * static_cast<float>(line_r[j]);
      }
    }
    first += rank;
    col += width;
  }
  if (g != nullptr) {  // DoRA: (base + update) * g over every column of the group
    for (int64_t j = c0; j < c1; ++j)
      o[j] = static_cast<XT>((static_cast<float>(o[j]) + acc[j - c0]) * static_cast<float>(g[j]));
  } else {
    for (int64_t j = c0; j < c1; ++j) o[j] = static_cast<XT>(static_cast<float>(o[j]) + acc[j - c0]);
  }
}

// Both parts for lines [begin, end) over columns [c0, c1). x and out have row strides sx, so.
template <typename XT, typename FT>
void lora_columns(const XT* xp, int64_t sx, XT* op, int64_t so, int64_t d_in, const int64_t* tp, int64_t begin,
                  int64_t end, int64_t fields, const std::vector<int64_t>& widths, int64_t c0, int64_t c1) {
  std::vector<float> xf(d_in), h, acc(c1 - c0);
  for (int64_t line = begin; line < end; ++line) {
    const int64_t* entry = tp + line * fields;
    if (entry[1] == 0) continue;  // the adapter leaves this layer's group alone
    h.resize(rank_sum(entry, widths.size()));
    lora_h<XT, FT>(xp + entry[0] * sx, d_in, entry, widths.size(), xf.data(), h.data());
    lora_add<XT, FT>(entry, widths, h.data(), op + entry[0] * so, c0, c1, acc.data());
  }
}

// The same update over every column, the lines split between the threads.
template <typename XT, typename FT>
void lora_update(const XT* xp, int64_t sx, XT* op, int64_t so, int64_t d_in, int64_t d_out, const int64_t* tp,
                 int64_t lines, int64_t fields, const std::vector<int64_t>& widths) {
  auto rows = [&](int64_t begin, int64_t end) {
    lora_columns<XT, FT>(xp, sx, op, so, d_in, tp, begin, end, fields, widths, 0, d_out);
  };
  if (lines <= 1) {
    rows(0, lines);  // no thread hand-off for a single row
  } else {
    at::parallel_for(0, lines, 1, rows);
  }
}

// The operand checks lora_rows_ and lora_segments_ share (`name` begins every message): x (rows, d_in) and out
// (rows, d_out) on the CPU, of one dtype, innermost contiguous; the table (lines, 3 + 3 * blocks) int64; the
// blocks' widths adding up to out's columns.
inline void check_lora_operands(const char* name, const at::Tensor& x, const at::Tensor& out, const at::Tensor& table,
                                const std::vector<int64_t>& widths) {
  TORCH_CHECK(x.device().is_cpu() && out.device().is_cpu() && table.device().is_cpu(), name, ": CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && x.size(0) == out.size(0), name, ": x (rows, d_in) and out (rows, d_out)");
  TORCH_CHECK(x.stride(1) == 1 && out.stride(1) == 1, name, ": x and out must be contiguous in their last dimension");
  TORCH_CHECK(x.scalar_type() == out.scalar_type(), name, ": x and out must share a dtype");
  TORCH_CHECK(table.scalar_type() == at::kLong && table.dim() == 2 && table.is_contiguous() &&
                  table.size(1) == 3 + 3 * static_cast<int64_t>(widths.size()),
              name, ": table is (lines, 3 + 3 * blocks) int64, contiguous");
  int64_t width = 0;
  for (int64_t w : widths) width += w;
  TORCH_CHECK(width == out.size(1), name, ": the blocks' widths must add up to out's columns");
}

// Calls run(XT{}, FT{}) with x's element type and the factors' (bf16 x with fp32 or bf16 factors, fp32 x with fp32
// factors), the combinations the LoRA kernels are built for.
template <typename Run>
void dispatch_lora_dtypes(const char* name, at::ScalarType x_dtype, bool bf16_factors, Run&& run) {
  if (x_dtype == at::kBFloat16 && !bf16_factors) {
    run(c10::BFloat16{}, float{});
  } else if (x_dtype == at::kBFloat16) {
    run(c10::BFloat16{}, c10::BFloat16{});
  } else if (x_dtype == at::kFloat && !bf16_factors) {
    run(float{}, float{});
  } else {
    TORCH_CHECK(false, name, ": x in fp32 with fp32 factors, or in bf16 with fp32 or bf16 factors");
  }
}

// Whether bf16_gemv was built (the compiler targets AVX-512 BF16).
bool has_bf16_gemv();

// out (n, d_out) = x (n, d_in) W^T, bf16, W (d_out, d_in) as nn.Linear holds it, all contiguous, n <= 16: the
// output columns [j0, j1) on the calling thread (bf16_gemv_columns), or all of them split between the threads.
void bf16_gemv_columns(const c10::BFloat16* x, int64_t n, const c10::BFloat16* W, int64_t d_out, int64_t d_in,
                       c10::BFloat16* out, int64_t j0, int64_t j1);
void bf16_gemv(const c10::BFloat16* x, int64_t n, const c10::BFloat16* W, int64_t d_out, int64_t d_in,
               c10::BFloat16* out);

// out (n, d_out) = x (n, d_in) W^T, bf16, over W's tiled copy (tile_weight_; tiles.cpp), any n: the output
// columns [c0, c1) on the calling thread (c0 a multiple of 16), or all of them split between the threads.
void bf16_tiles_columns(const c10::BFloat16* x, int64_t n, const c10::BFloat16* tiles, int64_t d_out, int64_t d_in,
                        c10::BFloat16* out, int64_t c0, int64_t c1);
void bf16_tiles(const c10::BFloat16* x, int64_t n, const c10::BFloat16* tiles, int64_t d_out, int64_t d_in,
                c10::BFloat16* out);
// Whether `tiles` is the tiled copy of a (d_out, d_in) bf16 weight; the checked entry points, and the tiling.
bool is_tiled_copy(const at::Tensor& tiles, int64_t d_out, int64_t d_in);
void bf16_tiles_(const at::Tensor& x, const at::Tensor& tiles, const at::Tensor& out);
at::Tensor tile_weight_(const at::Tensor& W);

// A whole bf16 decoding step of a Llama-family model (decode_step.cpp); returns the logits.
at::Tensor decode_step_(const at::Tensor& h, const std::vector<at::Tensor>& weights,
                        const std::vector<at::Tensor>& packed, const std::vector<at::Tensor>& biases,
                        const std::vector<at::Tensor>& norms, const at::Tensor& head, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& signed_sin,
                        int64_t heads, double eps, double scale, const std::vector<at::Tensor>& lora_tables,
                        const std::vector<std::vector<int64_t>>& lora_widths, bool bf16_factors);

// Up to kRows rows on the same adapter (one table line's factors): the unit of lora_block_bf16.
struct LoraBlock {
  static constexpr int64_t kRows = 16;
  const int64_t* entry;  // a table line; its row field is not read
  int64_t count;
  int64_t rows[kRows];
};

// The table's lines as blocks: consecutive lines on the same factors (an adapter's rows, which FusedPlan's tables
// keep together) share a block, up to kRows; lines of an adapter that leaves the group alone are skipped.
inline std::vector<LoraBlock> lora_blocks(const int64_t* tp, int64_t lines, int64_t fields) {
  std::vector<LoraBlock> blocks;
  for (int64_t line = 0; line < lines; ++line) {
    const int64_t* entry = tp + line * fields;
    if (entry[1] == 0) continue;
    LoraBlock* last = blocks.empty() ? nullptr : &blocks.back();
    if (last == nullptr || last->count == LoraBlock::kRows || !std::equal(entry + 1, entry + fields, last->entry + 1))
      last = &blocks.emplace_back(LoraBlock{entry, 0, {}});
    last->rows[last->count++] = entry[0];
  }
  return blocks;
}

#if defined(__AVX512BF16__)
// The block's rows' LoRA update over the group's columns [c0, c1), bf16 x and factors (lora_segments.cpp): h = x A^T
// for all its rows at once (each factor row read once), then each 16-column chunk of Bt read once and added into
// every row; fp32 sums, out rounded once. h: scratch.
void lora_block_bf16(const c10::BFloat16* xp, int64_t sx, c10::BFloat16* op, int64_t so, int64_t d_in,
                     const std::vector<int64_t>& widths, const LoraBlock& block, std::vector<float>& h, int64_t c0,
                     int64_t c1);
#endif

// The LoRA update of new prompts' tokens, one segment of tokens per table line (lora_segments.cpp).
void lora_segments_(const at::Tensor& x, const at::Tensor& out, const at::Tensor& table, const at::Tensor& lengths,
                    const std::vector<int64_t>& widths, bool bf16_factors);

// Causal attention of one new prompt (bf16) over its own keys and values in its cache slot (decode_step.cpp).
at::Tensor prefill_attention_(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, int64_t length,
                              double scale);

}  // namespace lorakit
