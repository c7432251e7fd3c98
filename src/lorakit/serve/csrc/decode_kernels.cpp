// The serving engine's compiled CPU kernels: lora_rows_ (below) and bf16_gemv_ (at the end); the module also
// binds decode_step_ and prefill_attention_ (decode_step.cpp) and lora_segments_ (lora_segments.cpp). Shared
// cores: kernels.h; AVX-512 helpers: simd.h.
//
// lora_rows_: the LoRA branch of one projection group for the decoding rows, in one call: each row reads its own
// adapter's factors where they lie (Punica's BGMV, on the CPU), out[i] += (x[i] A_i^T) Bt_i, then *= g_i (DoRA).
//
// Why: at decoding batch sizes the branch is tiny (8 x 576 multiply-adds per rank row), but written as torch
// ops a group costs 4-7 kernel calls (cast, A product, a B product per projection, add) of 15-25 us each on a
// small CPU, more than the arithmetic; and batched matmuls need per-row copies of the factors, which at 16 rows
// are more bytes than half the base model's weights. Here a group is one call: x is read once, h = x A^T stays
// in a few floats, sums run in fp32, out is rounded once, and rows on the same adapter run one after another
// (the table is sorted that way) so its factors are read from memory once.
//
// Operands:
//   x      (n, d_in)  fp32 or bf16 (the model's dtype), innermost contiguous
//   out    (n, d_out) x's dtype, innermost contiguous, updated in place
//   table  (m, 3 + 3 * blocks) int64, one line per row on an adapter that touches this group:
//          [row, A, g, then per block: Bt, rank, Bt's row stride]; A, g and Bt are addresses of the adapter's
//          own factors (the caller keeps them alive): A (sum of ranks, d_in) contiguous, g (d_out) or 0 (no
//          DoRA), Bt (rank, width) with the given row stride. Block b adds into the next widths[b] columns.
//   widths the blocks' output widths (every projection of the group, adapted or not)
//   bf16_factors: A, Bt and g are bf16 (else fp32)
#include <torch/csrc/utils/pybind.h>

#include "kernels.h"

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace lorakit {

namespace {

template <typename XT, typename FT>
void run(const at::Tensor& x, const at::Tensor& out, const at::Tensor& table, const std::vector<int64_t>& widths) {
  lora_update<XT, FT>(x.data_ptr<XT>(), x.stride(0), out.data_ptr<XT>(), out.stride(0), x.size(1), out.size(1),
                      table.data_ptr<int64_t>(), table.size(0), table.size(1), widths);
}

}  // namespace

void lora_rows_(const at::Tensor& x, const at::Tensor& out, const at::Tensor& table, const std::vector<int64_t>& widths,
                bool bf16_factors) {
  check_lora_operands("lora_rows_", x, out, table, widths);
  const int64_t* tp = table.data_ptr<int64_t>();
  for (int64_t line = 0; line < table.size(0); ++line)
    TORCH_CHECK(tp[line * table.size(1)] >= 0 && tp[line * table.size(1)] < x.size(0), "lora_rows_: a row index is out of range");
  dispatch_lora_dtypes("lora_rows_", x.scalar_type(), bf16_factors, [&](auto xt, auto ft) {
    run<decltype(xt), decltype(ft)>(x, out, table, widths);
  });
}


// bf16_gemv_: out (n, d_out) = x (n, d_in) W^T for bf16, W (d_out, d_in) as nn.Linear holds it, n <= 16.
// Why: a batch-1 decoding step is a matrix-vector product per weight, bound by how fast the weights stream
// in; oneDNN's packed bf16 linear reaches about a third of this CPU's memory bandwidth at batch 1. Here each
// weight row is read once with AVX-512 BF16 dot products (vdpbf16ps: bf16 pairs, fp32 sums), one fp32
// accumulator per x row, and output rows are split between the threads. Only where the compiler targets
// AVX-512 BF16 (has_bf16_gemv says).
bool has_bf16_gemv() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

void bf16_gemv_columns(const c10::BFloat16* x, int64_t n, const c10::BFloat16* W, int64_t d_out, int64_t d_in,
                       c10::BFloat16* out, int64_t j0, int64_t j1) {
#if defined(__AVX512BF16__)
  const int64_t tail = d_in % 32, body = d_in - tail;
  const __mmask32 tail_mask = tail ? static_cast<__mmask32>((1ull << tail) - 1) : 0;
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x);
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(W);
  __m512 acc[16];
  for (int64_t j = j0; j < j1; ++j) {
    const uint16_t* w = wp + j * d_in;
    for (int64_t i = 0; i < n; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t k = 0; k < body; k += 32) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + k);
      for (int64_t i = 0; i < n; ++i)
        acc[i] = _mm512_dpbf16_ps(acc[i], wv, (__m512bh)_mm512_loadu_si512(xp + i * d_in + k));
    }
    if (tail) {
      const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(tail_mask, w + body);
      for (int64_t i = 0; i < n; ++i)
        acc[i] = _mm512_dpbf16_ps(acc[i], wv, (__m512bh)_mm512_maskz_loadu_epi16(tail_mask, xp + i * d_in + body));
    }
    for (int64_t i = 0; i < n; ++i) out[i * d_out + j] = c10::BFloat16(_mm512_reduce_add_ps(acc[i]));
  }
#else
  TORCH_CHECK(false, "bf16_gemv: built without AVX-512 BF16");
#endif
}

void bf16_gemv(const c10::BFloat16* x, int64_t n, const c10::BFloat16* W, int64_t d_out, int64_t d_in,
               c10::BFloat16* out) {
  at::parallel_for(0, d_out, 64, [&](int64_t begin, int64_t end) {
    bf16_gemv_columns(x, n, W, d_out, d_in, out, begin, end);
  });
}

namespace {

void bf16_gemv_(const at::Tensor& x, const at::Tensor& W, const at::Tensor& out) {
  TORCH_CHECK(has_bf16_gemv(), "bf16_gemv_: built without AVX-512 BF16");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && W.scalar_type() == at::kBFloat16 && out.scalar_type() == at::kBFloat16,
              "bf16_gemv_: bf16 tensors only");
  TORCH_CHECK(x.dim() == 2 && W.dim() == 2 && out.dim() == 2 && x.size(1) == W.size(1) && out.size(0) == x.size(0) &&
                  out.size(1) == W.size(0) && x.size(0) <= 16,
              "bf16_gemv_: x (n <= 16, d_in), W (d_out, d_in), out (n, d_out)");
  TORCH_CHECK(x.is_contiguous() && W.is_contiguous() && out.is_contiguous(), "bf16_gemv_: contiguous tensors only");
  bf16_gemv(x.data_ptr<c10::BFloat16>(), x.size(0), W.data_ptr<c10::BFloat16>(), W.size(0), W.size(1),
            out.data_ptr<c10::BFloat16>());
}

}  // namespace

}  // namespace lorakit

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace lorakit;
  m.def("lora_rows_", &lora_rows_, "out[row] += (x[row] A^T) Bt (then *= g) for each line of the table, in one call");
  m.def("lora_segments_", &lora_segments_, "out[t] += (x[t] A^T) Bt (then *= g) for every token t of each segment",
        py::call_guard<py::gil_scoped_release>());
  m.def("has_bf16_gemv", &has_bf16_gemv, "whether bf16_gemv_ was built (the compiler targets AVX-512 BF16)");
  m.def("bf16_gemv_", &bf16_gemv_, "out = x W^T for bf16 x (n <= 16, d_in) and W (d_out, d_in)");
  m.def("bf16_tiles_", &bf16_tiles_, "out = x W^T for bf16 x (n, d_in) and W's tiled copy (tile_weight_)",
        py::call_guard<py::gil_scoped_release>());
  m.def("tile_weight_", &tile_weight_, "W (d_out, d_in) bf16 tiled for bf16_tiles_: (d_out/16, d_in/2, 16, 2), zero-padded");
  m.def("decode_step_", &decode_step_, "a whole bf16 decoding step of a Llama-family model; returns the logits",
        py::call_guard<py::gil_scoped_release>());
  m.def("prefill_attention_", &prefill_attention_, "causal attention of one bf16 prompt over its cache slot",
        py::call_guard<py::gil_scoped_release>());
}
