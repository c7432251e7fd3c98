// The LoRA branch of one projection group for a few rows, in one call: out[i] += (x[i] A[i]^T) Bt[i].
//
// Why: at decoding batch sizes the branch is tiny (8 x 576 multiply-adds per rank row) but, written as
// torch ops, it costs 4-7 kernel calls per group (cast, A product, B product per projection, add), each
// 15-25 us of dispatch on a small CPU: more than the arithmetic. Here it is one call that reads x once,
// keeps h = x A^T (a few floats) in registers, accumulates in fp32 and rounds into out once.
//
// Shapes (every innermost dimension contiguous; other strides free, so views need no copy):
//   x    (n, d_in)                 fp32 or bf16 (the model's dtype)
//   A    (n or 1, R, d_in)         fp32 or bf16; a first dimension of 1 serves every row (one adapter)
//   Bts  [(n or 1, r_b, d_b), ...] the factors' dtype; block b takes h's next r_b values and adds into
//                                  out's next d_b columns (sum of r_b == R; a block of rank 0 skips columns)
//   out  (n, >= sum d_b)           x's dtype; updated in place
// Rows run in parallel over torch's threads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <torch/csrc/utils/pybind.h>

#include <vector>

namespace {

struct Block {
  const void* data;
  int64_t row_stride_n, row_stride_r, rank, width;
};

template <typename XT, typename FT>
void run(const at::Tensor& x, const at::Tensor& A, const std::vector<Block>& blocks, const at::Tensor& out) {
  const int64_t n = x.size(0), d_in = x.size(1), R = A.size(1);
  const XT* xp = x.data_ptr<XT>();
  const FT* ap = A.data_ptr<FT>();
  XT* op = out.data_ptr<XT>();
  const int64_t sx = x.stride(0), so = out.stride(0), sa = A.size(0) == 1 ? 0 : A.stride(0), sr = A.stride(1);
  int64_t widest = 0;
  for (const Block& b : blocks) widest = std::max(widest, b.width);

  auto rows = [&](int64_t begin, int64_t end) {
    std::vector<float> xf(d_in), h(R), acc(widest);
    for (int64_t i = begin; i < end; ++i) {
      const XT* xi = xp + i * sx;
      for (int64_t k = 0; k < d_in; ++k) xf[k] = static_cast<float>(xi[k]);
      const FT* ai = ap + i * sa;
      for (int64_t r = 0; r < R; ++r) {
        const FT* a = ai + r * sr;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t k = 0; k < d_in; ++k) s += xf[k] * static_cast<float>(a[k]);
        h[r] = s;
      }
      XT* o = op + i * so;
      int64_t first = 0;  // block's first value of h
      for (const Block& b : blocks) {
        if (b.rank > 0) {
          const FT* bi = static_cast<const FT*>(b.data) + i * b.row_stride_n;
          std::fill(acc.begin(), acc.begin() + b.width, 0.f);
          for (int64_t r = 0; r < b.rank; ++r) {
            const float hr = h[first + r];
            const FT* row = bi + r * b.row_stride_r;
#pragma omp simd
            for (int64_t j = 0; j < b.width; ++j) acc[j] += hr * static_cast<float>(row[j]);
          }
          for (int64_t j = 0; j < b.width; ++j) o[j] = static_cast<XT>(static_cast<float>(o[j]) + acc[j]);
        }
        first += b.rank;
        o += b.width;
      }
    }
  };
  if (n == 1) {
    rows(0, 1);  // no thread hand-off for a single row
  } else {
    at::parallel_for(0, n, 1, rows);
  }
}

void lora_update_(const at::Tensor& x, const at::Tensor& A, const std::vector<at::Tensor>& Bts, const at::Tensor& out) {
  TORCH_CHECK(x.device().is_cpu() && A.device().is_cpu() && out.device().is_cpu(), "lora_update_: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && A.dim() == 3 && out.dim() == 2, "lora_update_: x (n, d_in), A (n|1, R, d_in), out (n, d_out)");
  const int64_t n = x.size(0);
  TORCH_CHECK(out.size(0) == n && (A.size(0) == n || A.size(0) == 1) && A.size(2) == x.size(1),
              "lora_update_: x, A and out disagree in rows or d_in");
  TORCH_CHECK(x.stride(1) == 1 && A.stride(2) == 1 && out.stride(1) == 1, "lora_update_: innermost dims must be contiguous");
  TORCH_CHECK(x.scalar_type() == out.scalar_type(), "lora_update_: x and out must share a dtype");
  std::vector<Block> blocks;
  int64_t ranks = 0, width = 0;
  for (const at::Tensor& b : Bts) {
    TORCH_CHECK(b.dim() == 3 && (b.size(0) == n || b.size(0) == 1) && b.stride(2) == 1 && b.scalar_type() == A.scalar_type(),
                "lora_update_: each Bt is (n|1, r, d) in A's dtype, innermost contiguous");
    TORCH_CHECK(b.device().is_cpu(), "lora_update_: CPU tensors only");
    blocks.push_back({b.data_ptr(), b.size(0) == 1 ? 0 : b.stride(0), b.stride(1), b.size(1), b.size(2)});
    ranks += b.size(1);
    width += b.size(2);
  }
  TORCH_CHECK(ranks == A.size(1), "lora_update_: the blocks' ranks must add up to A's rows");
  TORCH_CHECK(width <= out.size(1), "lora_update_: the blocks are wider than out");
  const auto xt = x.scalar_type(), ft = A.scalar_type();
  if (xt == at::kBFloat16 && ft == at::kFloat) {
    run<c10::BFloat16, float>(x, A, blocks, out);
  } else if (xt == at::kBFloat16 && ft == at::kBFloat16) {
    run<c10::BFloat16, c10::BFloat16>(x, A, blocks, out);
  } else if (xt == at::kFloat && ft == at::kFloat) {
    run<float, float>(x, A, blocks, out);
  } else {
    TORCH_CHECK(false, "lora_update_: x in fp32 or bf16 with fp32 factors, or bf16 with bf16 factors");
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lora_update_", &lora_update_, "out (n, d_out) += (x A^T) Bt per row, in one call");
}
