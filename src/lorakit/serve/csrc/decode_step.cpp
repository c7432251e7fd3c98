// decode_step_: a whole decoding step of a Llama-family model (bf16) in one call: for every layer RMSNorm, the
// fused q/k/v product, rotary, the KV cache write, attention over the cache, the o product, the residual add,
// RMSNorm, the fused gate/up product, SiLU-gate, the down product, the residual add, each product followed by
// the rows' LoRA update (from the fused strategy's tables); then the final norm and the output head. The rows'
// elementwise work (norms, rotary, SiLU-gate) is split between the threads from 4 rows on.
// prefill_attention_ (at the end) runs the same attention for a new prompt's tokens over its own cache slot.
//
// Why: with the products at about 0.8x the memory bandwidth (bf16_gemv), a batch-1 step of the default model
// still spent about a third of its time in the ~25 small torch ops per layer between them (norms, rotary,
// attention's bookkeeping, casts, adds: 10-20 us of dispatch each, for a few hundred values of work). Here
// they are plain loops over one row's values, and the whole step crosses from Python once.
//
// Roundings follow the engine's torch path (lorakit.serve.llama): the norm in fp32 rounded before the weight
// scales it, each product rounded once, rotary as round(round(x cos) + roll(x) sin), attention in fp32 with
// its output rounded once, SiLU rounded before the gate multiplies it, residual adds rounded.
//
// Operands (bf16 unless said; L layers, n <= 16 decoding rows, row i in cache slot i):
//   h          (n, d) the embedded tokens, contiguous; holds the last layer's hidden states afterwards
//   weights    4 per layer: qkv (q + 2 kv, d), o (d, q), gate_up (2 I, d), down (d, I), as nn.Linear holds them
//   packed     copies of the weights, then the head's: oneDNN's packed copies (the gemv layout's) for steps of
//              more than one row, or tiled copies (the tiles layout's: tile_weight_) for every step; or empty
//              (every product runs bf16_gemv)
//   biases     4 per layer: that product's bias (d_out), or an empty tensor for none
//   norms      2 per layer (input, post-attention) then the final norm's: (d)
//   head       (vocab, d) the output head's weight
//   k_cache, v_cache (L, slots, kv_heads, max_seq_len, head_dim)
//   positions  (n) int64: each row's position (the cache is written there; attention covers 0..position)
//   cos, signed_sin (max_seq_len, head_dim): the rotary tables (signed_sin: -sin on the first half)
//   lora_tables 4 (the groups qkv, o, gate_up, down): (L, lines, 3 + 3 * blocks) int64 of lora_update, or empty
//   lora_widths each group's block widths; bf16_factors: the factors are bf16 (else fp32)
// Returns the logits (n, vocab).
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <type_traits>

#include "kernels.h"
#include "simd.h"

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace lorakit {

#if defined(__AVX512BF16__)  // the step runs its products with bf16_gemv, its attention with AVX-512

namespace {

using bf16 = c10::BFloat16;
using simd::exp16, simd::hsum16, simd::load16, simd::round_bf16;

inline float f32(bf16 v) { return static_cast<float>(v); }

// 16 fp32 values stored as bf16 (rounded to nearest even, as c10::BFloat16)
inline void store16(bf16* out, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), (__m256i)_mm512_cvtneps_pbh(v));
}

// h = round(h + part) where part is given (the residual add), then y = round(round(h / rms(h)) * w), the rms in fp32
void add_norm(bf16* h, const bf16* part, const bf16* w, bf16* y, int64_t d, float eps) {
  if (d % 16 != 0) {
    if (part != nullptr)
      for (int64_t k = 0; k < d; ++k) h[k] = bf16(f32(h[k]) + f32(part[k]));
    float squares = 0.f;
    for (int64_t k = 0; k < d; ++k) squares += f32(h[k]) * f32(h[k]);
    const float inv = 1.f / std::sqrt(squares / static_cast<float>(d) + eps);
    for (int64_t k = 0; k < d; ++k) y[k] = bf16(f32(bf16(f32(h[k]) * inv)) * f32(w[k]));
    return;
  }
  __m512 squares = _mm512_setzero_ps();
  for (int64_t k = 0; k < d; k += 16) {
    __m512 v = load16(h + k);
    if (part != nullptr) {
      v = round_bf16(_mm512_add_ps(v, load16(part + k)));
      store16(h + k, v);
    }
    squares = _mm512_fmadd_ps(v, v, squares);
  }
  const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(squares) / static_cast<float>(d) + eps));
  for (int64_t k = 0; k < d; k += 16)
    store16(y + k, _mm512_mul_ps(round_bf16(_mm512_mul_ps(load16(h + k), inv)), load16(w + k)));
}

// x (heads, head_dim) in place: round(round(x cos) + roll(x, head_dim / 2) signed_sin)
void rotate(bf16* x, int64_t heads, int64_t head_dim, const bf16* cos, const bf16* signed_sin) {
  const int64_t half = head_dim / 2;
  if (head_dim % 32 == 0 && head_dim <= 512) {  // halves of whole 16-value chunks
    __m512 v[32];
    const int64_t chunks = head_dim / 16, shift = half / 16;
    for (int64_t head = 0; head < heads; ++head) {
      bf16* row = x + head * head_dim;
      for (int64_t c = 0; c < chunks; ++c) v[c] = load16(row + 16 * c);
      for (int64_t c = 0; c < chunks; ++c) {
        const __m512 cos_part = round_bf16(_mm512_mul_ps(v[c], load16(cos + 16 * c)));
        store16(row + 16 * c, _mm512_fmadd_ps(v[(c + shift) % chunks], load16(signed_sin + 16 * c), cos_part));
      }
    }
    return;
  }
  float rolled[512];
  for (int64_t head = 0; head < heads; ++head) {
    bf16* v = x + head * head_dim;
    for (int64_t j = 0; j < head_dim; ++j) rolled[j] = f32(v[(j + half) % head_dim]);
    for (int64_t j = 0; j < head_dim; ++j)
      v[j] = bf16(f32(bf16(f32(v[j]) * f32(cos[j]))) + rolled[j] * f32(signed_sin[j]));
  }
}

// f(i) for each of the step's n rows: split between the threads from 4 rows on (below that the hand-off costs more
// than the rows' work)
template <typename F>
void each_row(int64_t n, const F& f) {
  auto rows = [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) f(i);
  };
  if (n >= 4) {
    at::parallel_for(0, n, 1, rows);
  } else {
    rows(0, n);
  }
}

struct Shape {
  int64_t n, d, heads, kv_heads, head_dim, slots, max_seq;
};

// out[j] = round(round(silu(gate[j])) * up[j]) for j < width, up = gate + width (the fused gate/up product's row)
void silu_gate(const bf16* gate, int64_t width, bf16* out) {
  const bf16* up = gate + width;
  int64_t j = 0;
  for (; j + 16 <= width; j += 16) {
    const __m512 g = load16(gate + j);
    const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
    const __m512 product = _mm512_mul_ps(round_bf16(silu), load16(up + j));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), (__m256i)_mm512_cvtneps_pbh(product));
  }
  for (; j < width; ++j) {
    const float g = f32(gate[j]);
    out[j] = bf16(f32(bf16(g / (1.f + std::exp(-g)))) * f32(up[j]));
  }
}

// acc[h][c] += p[h][t] V[t][16c .. 16c + 15] over every position t, each value row read once (C = hd / 16 chunks,
// G x C sums in registers); out[h] = round(acc[h] / total[h])
template <int G, int C>
void weighted_values(const float* scores, int64_t padded, const bf16* V, int64_t length, const float* total, bf16* out) {
  __m512 acc[G][C];
  for (auto& head : acc)
    for (auto& v : head) v = _mm512_setzero_ps();
  for (int64_t t = 0; t < length; ++t) {
    for (int c = 0; c < C; ++c) {
      const __m512 v = load16(V + t * 16 * C + 16 * c);
      for (int h = 0; h < G; ++h) acc[h][c] = _mm512_fmadd_ps(_mm512_set1_ps(scores[h * padded + t]), v, acc[h][c]);
    }
  }
  for (int h = 0; h < G; ++h)
    for (int c = 0; c < C; ++c) {
      const __m512 o = _mm512_div_ps(acc[h][c], _mm512_set1_ps(total[h]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + h * 16 * C + 16 * c), (__m256i)_mm512_cvtneps_pbh(o));
    }
}

// G query heads q (G x hd, one after another) attend over positions 0..length-1 of K and V (length x hd rows);
// out (G x hd). Scores in fp32 (bf16 dot products, 16 positions at a time, where hd is a multiple of 32), softmax
// with a vectorized exp, the values' weighted sum in fp32 (each value row read once for all G heads), each output
// rounded once. scores: scratch.
template <int G>
void attend_heads(const bf16* q, const bf16* K, const bf16* V, int64_t length, int64_t hd, float scale, bf16* out,
                  std::vector<float>& scores) {
  const int64_t padded = (length + 15) / 16 * 16;
  scores.resize(G * padded);
  float total[G];
  if (hd % 32 == 0) {  // 16 positions at a time, for every head while their keys are in L1
    for (int64_t t0 = 0; t0 < padded; t0 += 16) {
      for (int h = 0; h < G; ++h) {
        const bf16* qh = q + h * hd;
        __m512 a[16];
        for (int m = 0; m < 16; ++m) {
          a[m] = _mm512_setzero_ps();
          if (t0 + m >= length) continue;
          const bf16* k = K + (t0 + m) * hd;
          for (int64_t j = 0; j < hd; j += 32)
            a[m] = _mm512_dpbf16_ps(a[m], (__m512bh)_mm512_loadu_si512(k + j), (__m512bh)_mm512_loadu_si512(qh + j));
        }
        _mm512_storeu_ps(scores.data() + h * padded + t0, _mm512_mul_ps(hsum16(a), _mm512_set1_ps(scale)));
      }
    }
  } else {
    for (int h = 0; h < G; ++h)
      for (int64_t t = 0; t < length; ++t) {
        float dot = 0.f;
        for (int64_t j = 0; j < hd; ++j) dot += f32(q[h * hd + j]) * f32(K[t * hd + j]);
        scores[h * padded + t] = dot * scale;
      }
  }
  for (int h = 0; h < G; ++h) {
    float* sc = scores.data() + h * padded;
    for (int64_t t = length; t < padded; ++t) sc[t] = -INFINITY;  // e^-inf = 0 below
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int64_t t = 0; t < padded; t += 16) top = _mm512_max_ps(top, _mm512_loadu_ps(sc + t));
    top = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t t = 0; t < padded; t += 16) {
      const __m512 p = exp16(_mm512_sub_ps(_mm512_loadu_ps(sc + t), top));
      _mm512_storeu_ps(sc + t, p);
      sum = _mm512_add_ps(sum, p);
    }
    total[h] = _mm512_reduce_add_ps(sum);
  }
  if (hd == 64 && G <= 4) return weighted_values<G, 4>(scores.data(), padded, V, length, total, out);
  if (hd == 32) return weighted_values<G, 2>(scores.data(), padded, V, length, total, out);
  if (hd % 16 == 0) {  // wider heads: a chunk of 16 values at a time
    for (int64_t j = 0; j < hd; j += 16) {
      __m512 acc[G];
      for (int h = 0; h < G; ++h) acc[h] = _mm512_setzero_ps();
      for (int64_t t = 0; t < length; ++t) {
        const __m512 v = load16(V + t * hd + j);
        for (int h = 0; h < G; ++h) acc[h] = _mm512_fmadd_ps(_mm512_set1_ps(scores[h * padded + t]), v, acc[h]);
      }
      for (int h = 0; h < G; ++h) {
        const __m512 o = _mm512_div_ps(acc[h], _mm512_set1_ps(total[h]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + h * hd + j), (__m256i)_mm512_cvtneps_pbh(o));
      }
    }
  } else {
    for (int h = 0; h < G; ++h)
      for (int64_t j = 0; j < hd; ++j) {
        float a = 0.f;
        for (int64_t t = 0; t < length; ++t) a += scores[h * padded + t] * f32(V[t * hd + j]);
        out[h * hd + j] = bf16(a / total[h]);
      }
  }
}

// The group's G query heads of one row; G up to 8 in one pass (each value row read once for all of them)
void attend_group(const bf16* q, int64_t G, const bf16* K, const bf16* V, int64_t length, int64_t hd, float scale,
                  bf16* out, std::vector<float>& scores) {
  switch (G) {
    case 1: return attend_heads<1>(q, K, V, length, hd, scale, out, scores);
    case 2: return attend_heads<2>(q, K, V, length, hd, scale, out, scores);
    case 3: return attend_heads<3>(q, K, V, length, hd, scale, out, scores);
    case 4: return attend_heads<4>(q, K, V, length, hd, scale, out, scores);
    case 8: return attend_heads<8>(q, K, V, length, hd, scale, out, scores);
    default:
      for (int64_t h = 0; h < G; ++h) attend_heads<1>(q + h * hd, K, V, length, hd, scale, out + h * hd, scores);
  }
}

// Row i's query heads attend over its cache slot's positions 0..pos, one (row, kv head) pair per task;
// out (n, heads * head_dim)
void attend(const bf16* qkv, int64_t qkv_stride, const bf16* keys, const bf16* values, const int64_t* positions,
            const Shape& s, float scale, bf16* out) {
  const int64_t group = s.heads / s.kv_heads, hd = s.head_dim;
  at::parallel_for(0, s.n * s.kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t i = pair / s.kv_heads, g = pair % s.kv_heads;
      const int64_t at = (i * s.kv_heads + g) * s.max_seq * hd;
      attend_group(qkv + i * qkv_stride + g * group * hd, group, keys + at, values + at, positions[i] + 1, hd, scale,
                   out + i * s.heads * hd + g * group * hd, scores);
    }
  });
}

// Causal attention of one new prompt over itself, its keys and values already in its cache slot: token t's query
// heads attend over positions 0..t. q (L, heads, hd) with rows `q_stride` apart; keys, values (kv_heads, max_seq,
// hd). One (token, kv head) pair per task, the tokens ordered first, last, second, second to last... so that the
// threads' contiguous shares of the tasks hold equal work.
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, int64_t length,
                             double scale) {
  const int64_t heads = q.size(1), hd = q.size(2), kv_heads = keys.size(0), max_seq = keys.size(1);
  const int64_t group = heads / kv_heads, q_stride = q.stride(0);
  at::Tensor out = at::empty({length, heads * hd}, q.options());
  const bf16* qp = q.data_ptr<bf16>();
  const bf16* kp = keys.data_ptr<bf16>();
  const bf16* vp = values.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  at::parallel_for(0, length * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t k = task / kv_heads, g = task % kv_heads;
      const int64_t t = k % 2 == 0 ? k / 2 : length - 1 - k / 2;
      attend_group(qp + t * q_stride + g * group * hd, group, kp + g * max_seq * hd, vp + g * max_seq * hd, t + 1, hd,
                   static_cast<float>(scale), op + t * heads * hd + g * group * hd, scores);
    }
  });
  return out;
}

struct Lora {
  const at::Tensor* table;  // (L, lines, fields) or empty
  const std::vector<int64_t>* widths;
  bool bf16_factors;
};

// oneDNN's linear on a packed weight (torch.ops.mkldnn._linear_pointwise, as lorakit.serve.weights calls it)
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         c10::string_view, c10::List<std::optional<at::Scalar>>,
                                         std::optional<c10::string_view>)>();
  return op.call(x, packed, std::nullopt, "none", c10::List<std::optional<at::Scalar>>(), std::nullopt);
}

// out[:, c0:c1] += bias[c0:c1] on each of the n rows (out is (n, d_out)).
void add_bias(const bf16* bias, int64_t n, int64_t d_out, bf16* out, int64_t c0, int64_t c1) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = c0; j < c1; ++j) out[i * d_out + j] = bf16(f32(out[i * d_out + j]) + f32(bias[j]));
}

// out (n, d_out) = x W^T (+ the rows' LoRA update) (+ bias). With a tiled copy of W (the tiles layout): bf16_tiles
// for any rows (tiles.cpp). Else one row: bf16_gemv on W's rows; more rows: oneDNN on the packed copy where there
// is one (its blocked kernel computes several rows per weight load; bf16_gemv reloads x for every weight row).
// LoRA with bf16 factors: several rows are grouped by adapter (lora_blocks), each group's both parts on one thread
// (lora_block_bf16: its factors read once), or its columns split between the threads where there are fewer groups
// than threads; one row runs the same kernel in the product's own pass over the columns, h on each thread (it
// costs less than a second hand-off between the threads). fp32 factors: the columns are split between the threads,
// each adding the LoRA update of its own columns, the lines' h = x A^T computed first, split by line (one line: on
// each thread).
template <typename FT>
void project(const at::Tensor& x_t, const at::Tensor& W, const at::Tensor* packed, const at::Tensor& bias,
             const Lora& lora, int64_t layer, bf16* out) {
  const int64_t n = x_t.size(0), d_out = W.size(0), d_in = W.size(1);
  const bf16* x = x_t.data_ptr<bf16>();
  const bool tiled = packed != nullptr && !packed->is_mkldnn();
  const bool gemv = !tiled && (n == 1 || packed == nullptr), onednn = !tiled && !gemv;
  const bf16* tiles = tiled ? packed->data_ptr<bf16>() : nullptr;
  if (onednn) {
    const at::Tensor y = packed_linear(x_t, *packed);
    std::copy_n(y.data_ptr<bf16>(), n * d_out, out);
  }
  const bf16* w = W.data_ptr<bf16>();
  const bf16* b = bias.numel() ? bias.data_ptr<bf16>() : nullptr;
  const int64_t lines = lora.table->numel() ? lora.table->size(1) : 0, fields = lines ? lora.table->size(2) : 0;
  const int64_t* tp = lines ? lora.table->data_ptr<int64_t>() + layer * lines * fields : nullptr;
  const size_t blocks = lora.widths->size();
  if (onednn && !lines && b == nullptr) return;
  auto base_columns = [&](int64_t c0, int64_t c1) {  // c0 a multiple of 16
    if (tiled) bf16_tiles_columns(x, n, tiles, d_out, d_in, out, c0, c1);
    if (gemv) bf16_gemv_columns(x, n, w, d_out, d_in, out, c0, c1);
  };
  if constexpr (std::is_same_v<FT, bf16>) {
    if (lines > 1) {
      const std::vector<LoraBlock> groups = lora_blocks(tp, lines, fields);
      if (tiled) bf16_tiles(x, n, tiles, d_out, d_in, out);
      if (gemv) bf16_gemv(x, n, w, d_out, d_in, out);
      // fewer groups than threads (rows on one adapter): each group's columns split between them, h on each
      const int64_t count = static_cast<int64_t>(groups.size()), threads = at::get_num_threads();
      const int64_t parts = count ? (threads + count - 1) / count : 1;
      const int64_t part_width = (d_out + 16 * parts - 1) / (16 * parts) * 16;
      at::parallel_for(0, count * parts, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> h;
        for (int64_t task = begin; task < end; ++task) {
          const int64_t c0 = task % parts * part_width, c1 = std::min(c0 + part_width, d_out);
          lora_block_bf16(x, d_in, out, d_out, d_in, *lora.widths, groups[task / parts], h, c0, c1);
        }
      });
      if (b != nullptr) add_bias(b, n, d_out, out, 0, d_out);
      return;
    }
  }
  int64_t ranks = 0;  // h's width per line: the largest sum of ranks
  for (int64_t line = 0; line < lines; ++line) ranks = std::max(ranks, rank_sum(tp + line * fields, blocks));
  std::vector<float> hs(lines > 1 ? lines * ranks : 0);
  if (lines > 1) {
    at::parallel_for(0, lines, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> xf(d_in);
      for (int64_t line = begin; line < end; ++line) {
        const int64_t* entry = tp + line * fields;
        if (entry[1] != 0) lora_h<bf16, FT>(x + entry[0] * d_in, d_in, entry, blocks, xf.data(), &hs[line * ranks]);
      }
    });
  }
  // one row with bf16 factors: its h with AVX-512 BF16 dot products (lora_block_bf16)
  std::vector<LoraBlock> one;
  if constexpr (std::is_same_v<FT, bf16>) {
    if (lines == 1) one = lora_blocks(tp, 1, fields);  // none where the adapter leaves this layer's group alone
  }
  at::parallel_for(0, (d_out + 15) / 16, 4, [&](int64_t u0, int64_t u1) {  // units of 16 columns
    const int64_t c0 = u0 * 16, c1 = std::min(u1 * 16, d_out);
    base_columns(c0, c1);
    if (lines == 1 && std::is_same_v<FT, bf16>) {
      std::vector<float> h;
      for (const LoraBlock& block : one) lora_block_bf16(x, d_in, out, d_out, d_in, *lora.widths, block, h, c0, c1);
    } else if (lines == 1) {
      lora_columns<bf16, FT>(x, d_in, out, d_out, d_in, tp, 0, 1, fields, *lora.widths, c0, c1);
    } else if (lines > 1) {
      std::vector<float> acc(c1 - c0);
      for (int64_t line = 0; line < lines; ++line) {
        const int64_t* entry = tp + line * fields;
        if (entry[1] != 0) lora_add<bf16, FT>(entry, *lora.widths, &hs[line * ranks], out + entry[0] * d_out, c0, c1, acc.data());
      }
    }
    if (b != nullptr) add_bias(b, n, d_out, out, c0, c1);
  });
}

void project(const at::Tensor& x_t, const at::Tensor& W, const at::Tensor* packed, const at::Tensor& bias,
             const Lora& lora, int64_t layer, bf16* out) {
  if (lora.bf16_factors) {
    project<bf16>(x_t, W, packed, bias, lora, layer, out);
  } else {
    project<float>(x_t, W, packed, bias, lora, layer, out);
  }
}

void check(bool ok, const char* what) { TORCH_CHECK(ok, "decode_step_: ", what); }

bool is_bf16_contiguous(const at::Tensor& t) {
  return t.device().is_cpu() && t.scalar_type() == at::kBFloat16 && t.is_contiguous();
}

}  // namespace

at::Tensor decode_step_(const at::Tensor& h, const std::vector<at::Tensor>& weights,
                        const std::vector<at::Tensor>& packed, const std::vector<at::Tensor>& biases,
                        const std::vector<at::Tensor>& norms, const at::Tensor& head, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& signed_sin,
                        int64_t heads, double eps, double scale, const std::vector<at::Tensor>& lora_tables,
                        const std::vector<std::vector<int64_t>>& lora_widths, bool bf16_factors) {
  const int64_t layers = static_cast<int64_t>(weights.size()) / 4;
  check(layers > 0 && weights.size() == 4 * static_cast<size_t>(layers) && biases.size() == weights.size() &&
            norms.size() == 2 * static_cast<size_t>(layers) + 1,
        "4 weights and 4 biases per layer, 2 norms per layer and the final norm");
  check(is_bf16_contiguous(h) && h.dim() == 2 && h.size(0) >= 1 && h.size(0) <= 16, "h is (n <= 16, d) bf16, contiguous");
  check(is_bf16_contiguous(k_cache) && is_bf16_contiguous(v_cache) && k_cache.dim() == 5 &&
            k_cache.sizes() == v_cache.sizes() && k_cache.size(0) == layers,
        "the caches are (layers, slots, kv_heads, max_seq_len, head_dim) bf16, contiguous");
  const Shape s{h.size(0), h.size(1), heads, k_cache.size(2), k_cache.size(4), k_cache.size(1), k_cache.size(3)};
  const int64_t q_size = heads * s.head_dim, kv_size = s.kv_heads * s.head_dim;
  check(s.head_dim <= 512 && s.head_dim % 2 == 0 && heads % s.kv_heads == 0 && s.n <= s.slots,
        "head_dim is even and <= 512, heads a multiple of kv_heads, rows within the cache's slots");
  check(positions.scalar_type() == at::kLong && positions.is_contiguous() && positions.numel() == s.n,
        "positions is (n) int64, contiguous");
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t i = 0; i < s.n; ++i) check(pos[i] >= 0 && pos[i] < s.max_seq, "a position is outside the cache");
  check(is_bf16_contiguous(cos) && is_bf16_contiguous(signed_sin) && cos.dim() == 2 && cos.size(0) >= s.max_seq &&
            cos.size(1) == s.head_dim && signed_sin.sizes() == cos.sizes(),
        "cos and signed_sin are (max_seq_len, head_dim) bf16, contiguous");
  const int64_t inter = weights[3].size(1);
  const int64_t shapes[4][2] = {{q_size + 2 * kv_size, s.d}, {s.d, q_size}, {2 * inter, s.d}, {s.d, inter}};
  for (int64_t l = 0; l < layers; ++l) {
    for (int64_t p = 0; p < 4; ++p) {
      const at::Tensor& W = weights[4 * l + p];
      const at::Tensor& b = biases[4 * l + p];
      check(is_bf16_contiguous(W) && W.dim() == 2 && W.size(0) == shapes[p][0] && W.size(1) == shapes[p][1],
            "a layer's weights are qkv (q + 2 kv, d), o (d, q), gate_up (2 I, d), down (d, I), bf16, contiguous");
      check(b.numel() == 0 || (is_bf16_contiguous(b) && b.numel() == shapes[p][0]), "a bias is (d_out) bf16 or empty");
    }
    for (int64_t k = 0; k < 2; ++k) check(is_bf16_contiguous(norms[2 * l + k]) && norms[2 * l + k].numel() == s.d, "a norm is (d) bf16");
  }
  check(is_bf16_contiguous(norms.back()) && norms.back().numel() == s.d, "the final norm is (d) bf16");
  check(is_bf16_contiguous(head) && head.dim() == 2 && head.size(1) == s.d, "head is (vocab, d) bf16, contiguous");
  check(packed.empty() || packed.size() == weights.size() + 1, "packed holds the weights' copies and the head's, or nothing");
  for (size_t k = 0; k < packed.size(); ++k) {
    const at::Tensor& W = k < weights.size() ? weights[k] : head;
    const bool tiled = !packed[0].is_mkldnn();
    check(tiled ? !packed[k].is_mkldnn() && is_tiled_copy(packed[k], W.size(0), W.size(1))
                : packed[k].is_mkldnn() && packed[k].scalar_type() == at::kBFloat16 && packed[k].sizes() == W.sizes(),
          "the copies are all oneDNN's bf16 copies of their weights (torch.ops.mkldnn._reorder_linear_weight) or all "
          "their tiled copies (tile_weight_)");
  }
  auto packed_of = [&](size_t k) { return packed.empty() ? nullptr : &packed[k]; };
  check(lora_tables.size() == 4 && lora_widths.size() == 4, "one LoRA table and one list of widths per group");
  Lora lora[4];
  for (int64_t p = 0; p < 4; ++p) {
    const at::Tensor& t = lora_tables[p];
    lora[p] = Lora{&t, &lora_widths[p], bf16_factors};
    if (t.numel() == 0) continue;
    int64_t width = 0;
    for (int64_t w : lora_widths[p]) width += w;
    check(t.scalar_type() == at::kLong && t.is_contiguous() && t.dim() == 3 && t.size(0) == layers &&
              t.size(2) == 3 + 3 * static_cast<int64_t>(lora_widths[p].size()) && width == shapes[p][0],
          "a LoRA table is (layers, lines, 3 + 3 * blocks) int64 whose blocks' widths add up to the group's outputs");
    const int64_t* tp = t.data_ptr<int64_t>();
    for (int64_t line = 0; line < t.size(0) * t.size(1); ++line)
      check(tp[line * t.size(2)] >= 0 && tp[line * t.size(2)] < s.n, "a LoRA table's row index is out of range");
  }

  auto opts = h.options();
  at::Tensor x = at::empty({s.n, s.d}, opts), qkv = at::empty({s.n, q_size + 2 * kv_size}, opts);
  at::Tensor attn = at::empty({s.n, q_size}, opts), part = at::empty({s.n, s.d}, opts);
  at::Tensor gate_up = at::empty({s.n, 2 * inter}, opts), gated = at::empty({s.n, inter}, opts);
  bf16 *hp = h.data_ptr<bf16>(), *xp = x.data_ptr<bf16>(), *qkvp = qkv.data_ptr<bf16>();
  bf16 *attnp = attn.data_ptr<bf16>(), *partp = part.data_ptr<bf16>(), *gup = gate_up.data_ptr<bf16>();
  bf16* gatedp = gated.data_ptr<bf16>();
  const int64_t layer_cache = s.slots * s.kv_heads * s.max_seq * s.head_dim;
  // h = round(h + part) (where add) then x = norm(h) with the given norm weight, for every row
  auto add_norm_rows = [&](bool add, const at::Tensor& norm) {
    const bf16* w = norm.data_ptr<bf16>();
    each_row(s.n, [&](int64_t i) { add_norm(hp + i * s.d, add ? partp + i * s.d : nullptr, w, xp + i * s.d, s.d, eps); });
  };

  for (int64_t l = 0; l < layers; ++l) {
    add_norm_rows(l > 0, norms[2 * l]);  // the previous layer's second residual add, then this layer's first norm
    project(x, weights[4 * l], packed_of(4 * l), biases[4 * l], lora[0], l, qkvp);
    bf16* keys = k_cache.data_ptr<bf16>() + l * layer_cache;
    bf16* values = v_cache.data_ptr<bf16>() + l * layer_cache;
    each_row(s.n, [&](int64_t i) {  // q and k rotate, k and v go into the cache at the row's position
      bf16* row = qkvp + i * (q_size + 2 * kv_size);
      const bf16* c = cos.data_ptr<bf16>() + pos[i] * s.head_dim;
      const bf16* sn = signed_sin.data_ptr<bf16>() + pos[i] * s.head_dim;
      rotate(row, heads + s.kv_heads, s.head_dim, c, sn);
      for (int64_t g = 0; g < s.kv_heads; ++g) {
        const int64_t at_pos = ((i * s.kv_heads + g) * s.max_seq + pos[i]) * s.head_dim;
        std::copy_n(row + q_size + g * s.head_dim, s.head_dim, keys + at_pos);
        std::copy_n(row + q_size + kv_size + g * s.head_dim, s.head_dim, values + at_pos);
      }
    });
    attend(qkvp, q_size + 2 * kv_size, keys, values, pos, s, static_cast<float>(scale), attnp);
    project(attn, weights[4 * l + 1], packed_of(4 * l + 1), biases[4 * l + 1], lora[1], l, partp);
    add_norm_rows(true, norms[2 * l + 1]);
    project(x, weights[4 * l + 2], packed_of(4 * l + 2), biases[4 * l + 2], lora[2], l, gup);
    each_row(s.n, [&](int64_t i) { silu_gate(gup + i * 2 * inter, inter, gatedp + i * inter); });
    project(gated, weights[4 * l + 3], packed_of(4 * l + 3), biases[4 * l + 3], lora[3], l, partp);
  }
  add_norm_rows(true, norms.back());  // the last layer's second residual add, then the final norm
  const bool tiled = !packed.empty() && !packed.back().is_mkldnn();
  if (s.n > 1 && !packed.empty() && !tiled) return packed_linear(x, packed.back());
  at::Tensor logits = at::empty({s.n, head.size(0)}, opts);
  if (tiled) {
    bf16_tiles(xp, s.n, packed.back().data_ptr<bf16>(), head.size(0), s.d, logits.data_ptr<bf16>());
  } else {
    bf16_gemv(xp, s.n, head.data_ptr<bf16>(), head.size(0), s.d, logits.data_ptr<bf16>());
  }
  return logits;
}

at::Tensor prefill_attention_(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, int64_t length,
                              double scale) {
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kBFloat16 && q.dim() == 3 && q.stride(2) == 1 &&
                  q.stride(1) == q.size(2) && q.size(0) >= length,
              "prefill_attention_: q is (length, heads, head_dim) bf16 with contiguous heads");
  TORCH_CHECK(is_bf16_contiguous(keys) && is_bf16_contiguous(values) && keys.dim() == 3 && keys.sizes() == values.sizes() &&
                  keys.size(2) == q.size(2) && q.size(1) % keys.size(0) == 0 && length >= 1 && length <= keys.size(1),
              "prefill_attention_: keys and values are (kv_heads, max_seq_len, head_dim) bf16, contiguous, holding "
              "the prompt's first `length` positions");
  return prefill_attention(q, keys, values, length, scale);
}

#else

at::Tensor decode_step_(const at::Tensor&, const std::vector<at::Tensor>&, const std::vector<at::Tensor>&,
                        const std::vector<at::Tensor>&, const std::vector<at::Tensor>&, const at::Tensor&,
                        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        int64_t, double, double, const std::vector<at::Tensor>&,
                        const std::vector<std::vector<int64_t>>&, bool) {
  TORCH_CHECK(false, "decode_step_: built without AVX-512 BF16");
}

at::Tensor prefill_attention_(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double) {
  TORCH_CHECK(false, "prefill_attention_: built without AVX-512 BF16");
}

#endif

}  // namespace lorakit
