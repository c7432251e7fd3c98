// Small AVX-512 helpers shared by the compiled kernels (decode_step.cpp, lora_segments.cpp). Only where the
// compiler targets AVX-512 BF16.
#pragma once

#if defined(__AVX512BF16__)
#include <immintrin.h>

#include <c10/util/BFloat16.h>

namespace lorakit {
namespace simd {

// e^x for 16 floats: 2^(x log2 e) as 2^n (scalef) times a degree-6 polynomial of the fraction (relative error
// about 1e-7 in fp32); below -87 it is taken as -87, above about 88 it is inf
inline __m512 exp16(__m512 x) {
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
  for (float c : {1.339887440266574e-3f, 9.618437357674640e-3f, 5.550332471162809e-2f, 2.402264791363012e-1f,
                  6.931472028550421e-1f, 1.f})
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// 16 bf16 values as fp32
inline __m512 load16(const c10::BFloat16* v) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// 16 fp32 values rounded to bf16 (to nearest even, as c10::BFloat16) and back
inline __m512 round_bf16(__m512 v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}

// r[t] = the sum of a[t]'s 16 lanes, for t < 16: a transposing tree of adds (4 levels, 15 vector adds) instead of
// 16 horizontal sums
inline __m512 hsum16(const __m512* a) {
  __m512 b[8], c[4];
  for (int k = 0; k < 8; ++k)  // per 128-bit lane: [a2k: 0+2, a2k+1: 0+2, a2k: 1+3, a2k+1: 1+3]
    b[k] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * k], a[2 * k + 1]), _mm512_unpackhi_ps(a[2 * k], a[2 * k + 1]));
  for (int k = 0; k < 4; ++k) {  // per 128-bit lane: the lane's sums of a4k .. a4k+3
    const __m512d x = _mm512_castps_pd(b[2 * k]), y = _mm512_castps_pd(b[2 * k + 1]);
    c[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  // across the four 128-bit lanes: lane k of the result gathers c[k]'s four lanes
  const __m512 e0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x44), _mm512_shuffle_f32x4(c[0], c[1], 0xEE));
  const __m512 e1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x44), _mm512_shuffle_f32x4(c[2], c[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(e0, e1, 0x88), _mm512_shuffle_f32x4(e0, e1, 0xDD));
}

}  // namespace simd
}  // namespace lorakit

#endif
