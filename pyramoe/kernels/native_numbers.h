// Numbers for the native kernels (see native.cpp): bf16 conversion, a vectorised exp and SwiGLU,
// dot products, argmax. Included once, by native.cpp.
#pragma once

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline float bf16_to_f32(uint16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float load_f(const void *p, int64_t i, bool bf16) {
  return bf16 ? bf16_to_f32(static_cast<const uint16_t *>(p)[i]) : static_cast<const float *>(p)[i];
}

inline void store_f(void *p, int64_t i, float v, bool bf16) {
  if (bf16) static_cast<uint16_t *>(p)[i] = f32_to_bf16(v);
  else static_cast<float *>(p)[i] = v;
}

inline float silu(float x) { return x / (1.0f + std::exp(-x)); }

#if defined(__AVX512F__)
// exp on 16 lanes (Cephes' expf polynomial after reduction by ln 2; within 2 ulp of expf): the
// SwiGLU and softmax exponentials were a tenth of a batch-16 step as scalar calls.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-87.3365447504019f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}
#endif

// y[i] = exp(x[i] - shift) for i < n; returns their sum.
inline float exp_shifted(const float *x, float *y, int64_t n, float shift) {
  int64_t i = 0;
  float total = 0;
#if defined(__AVX512F__)
  __m512 sum = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(x + i), _mm512_set1_ps(shift)));
    _mm512_storeu_ps(y + i, e);
    sum = _mm512_add_ps(sum, e);
  }
  total = _mm512_reduce_add_ps(sum);
#endif
  for (; i < n; ++i) total += (y[i] = std::exp(x[i] - shift));
  return total;
}

// y[i] = silu(gate[i]) * up[i]
inline void swiglu(const float *gate, const float *up, float *y, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    const __m512 g = _mm512_loadu_ps(gate + i);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
    const __m512 s = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
    _mm512_storeu_ps(y + i, _mm512_mul_ps(s, _mm512_loadu_ps(up + i)));
  }
#endif
  for (; i < n; ++i) y[i] = silu(gate[i]) * up[i];
}

// Index of the largest value, the first of equal maxima (as torch.argmax): one pass, 16 lanes.
inline int64_t first_argmax(const float *x, int64_t n) {
  int64_t i = 0, best = 0;
  float top = -INFINITY;
#if defined(__AVX512F__)
  if (n >= 16) {
    __m512 lane_top = _mm512_loadu_ps(x);
    __m512i lane_at = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512i at = lane_at;
    for (i = 16; i + 16 <= n; i += 16) {
      at = _mm512_add_epi32(at, _mm512_set1_epi32(16));
      const __m512 v = _mm512_loadu_ps(x + i);
      const __mmask16 higher = _mm512_cmp_ps_mask(v, lane_top, _CMP_GT_OQ);
      lane_top = _mm512_mask_mov_ps(lane_top, higher, v);
      lane_at = _mm512_mask_mov_epi32(lane_at, higher, at);
    }
    top = _mm512_reduce_max_ps(lane_top);
    const __mmask16 is_top = _mm512_cmp_ps_mask(lane_top, _mm512_set1_ps(top), _CMP_EQ_OQ);
    best = _mm512_mask_reduce_min_epi32(is_top, lane_at);
  }
#endif
  for (; i < n; ++i)
    if (x[i] > top) top = x[best = i];
  return best;
}

inline float dot(const float *a, const float *b, int64_t n) {
  float acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

inline float gelu(float x) { return 0.5f * x * (1.0f + std::erf(x * 0.70710678118654752f)); }

}  // namespace
