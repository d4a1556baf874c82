// Matrix products y[m, n] = x[m, :] . W[n, :] + b[n] for the native kernels (see native.cpp): a
// portable kernel, the AVX512-BF16 kernels for plain [N, K] and blocked bf16 weights, and the
// threads' split of a phase's products. Included once, by native.cpp.
#pragma once

#include "native_amx.h"
#include "native_job.h"
#include "native_numbers.h"

namespace {

// Portable kernel: any K, fp32 or bf16 weights (the compiler vectorises the 16 lanes).
template <typename WT>
void rows_generic(const Job &j, int64_t n0, int64_t n1) {
  const WT *W = static_cast<const WT *>(j.W);
  for (int64_t n = n0; n < n1; ++n) {
    const WT *w = W + n * j.K;
    for (int64_t m = 0; m < j.M; ++m) {
      const float *x = j.x + m * j.K;
      float acc[16] = {0};
      int64_t k = 0;
      for (; k + 16 <= j.K; k += 16)
        for (int l = 0; l < 16; ++l) {
          float wv;
          if constexpr (sizeof(WT) == 2) wv = bf16_to_f32(w[k + l]);
          else wv = w[k + l];
          acc[l] += x[k + l] * wv;
        }
      float sum = 0;
      for (int l = 0; l < 16; ++l) sum += acc[l];
      for (; k < j.K; ++k) {
        float wv;
        if constexpr (sizeof(WT) == 2) wv = bf16_to_f32(w[k]);
        else wv = w[k];
        sum += x[k] * wv;
      }
      j.y[m * j.N + n] = sum + (j.bias ? j.bias[n] : 0.0f);
    }
  }
}

#if defined(__AVX512BF16__)
constexpr bool kNativeBf16 = true;
#ifndef PM_PREFETCH_ROWS
#define PM_PREFETCH_ROWS 8
#endif
constexpr int64_t kPrefetchRows = PM_PREFETCH_ROWS;

// R weight rows x MB rows of x, K a multiple of 32: each 64-byte piece of a weight row is loaded
// once and multiplied into every row of x (vdpbf16ps: 32 bf16 products per instruction).
template <int R, int MB>
inline void tile_bf16(const Job &j, int64_t n, int64_t m) {
  const uint16_t *W = static_cast<const uint16_t *>(j.W);
  __m512 acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < MB; ++b) acc[r][b] = _mm512_setzero_ps();
  // The hardware prefetchers alone kept a core at ~half the memory bandwidth: ask for the rows
  // PM_PREFETCH_ROWS ahead while this tile computes.
  const uint16_t *ahead = W + std::min(n + kPrefetchRows, j.N - 1) * j.K;
  for (int64_t k = 0; k < j.K; k += 32) {
    __m512i w[R];
    if (m == 0)
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char *>(ahead + r * j.K + k), _MM_HINT_T0);
    for (int r = 0; r < R; ++r) w[r] = _mm512_loadu_si512(W + (n + r) * j.K + k);
    for (int b = 0; b < MB; ++b) {
      __m512i xv = _mm512_loadu_si512(j.xb + (m + b) * j.K + k);
      for (int r = 0; r < R; ++r)
        acc[r][b] = _mm512_dpbf16_ps(acc[r][b], reinterpret_cast<__m512bh &>(xv), reinterpret_cast<__m512bh &>(w[r]));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < MB; ++b)
      j.y[(m + b) * j.N + n + r] = _mm512_reduce_add_ps(acc[r][b]) + (j.bias ? j.bias[n + r] : 0.0f);
}

template <int R>
inline void tiles_for_rows(const Job &j, int64_t n) {
  int64_t m = 0;
  for (; m + 4 <= j.M; m += 4) tile_bf16<R, 4>(j, n, m);
  switch (j.M - m) {
    case 3: tile_bf16<R, 3>(j, n, m); break;
    case 2: tile_bf16<R, 2>(j, n, m); break;
    case 1: tile_bf16<R, 1>(j, n, m); break;
    default: break;
  }
}

void rows_bf16(const Job &j, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) tiles_for_rows<4>(j, n);
  for (; n < n1; ++n) tiles_for_rows<1>(j, n);
}

constexpr int64_t kPrefetchPairs = 64;  // blocked layout: 4 KB ahead in each stream (2 and 8 KB: no better)

// NB blocks of 16 outputs x MB rows of x, blocked layout.
template <int NB, int MB>
inline void tile_blocked(const Job &j, int64_t nb, int64_t m) {
  const int64_t K2 = j.K / 2;
  const uint16_t *base = static_cast<const uint16_t *>(j.W) + nb * K2 * 32;
  __m512 acc[MB][NB];
  for (int b = 0; b < MB; ++b)
    for (int c = 0; c < NB; ++c) acc[b][c] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < K2; ++kp) {
    __m512i w[NB];
    for (int c = 0; c < NB; ++c) {
      w[c] = _mm512_loadu_si512(base + (c * K2 + kp) * 32);
      if (m == 0) _mm_prefetch(reinterpret_cast<const char *>(base + (c * K2 + kp + kPrefetchPairs) * 32), _MM_HINT_T0);
    }
    for (int b = 0; b < MB; ++b) {
      int32_t pair;
      std::memcpy(&pair, j.xb + (m + b) * j.K + 2 * kp, 4);
      const __m512i xv = _mm512_set1_epi32(pair);
      for (int c = 0; c < NB; ++c)
        acc[b][c] = _mm512_dpbf16_ps(acc[b][c], reinterpret_cast<const __m512bh &>(xv),
                                     reinterpret_cast<__m512bh &>(w[c]));
    }
  }
  for (int c = 0; c < NB; ++c) {
    const int64_t n = (nb + c) * 16, left = std::min<int64_t>(16, j.N - n);
    const __mmask16 mask = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
    const __m512 bias = j.bias ? _mm512_maskz_loadu_ps(mask, j.bias + n) : _mm512_setzero_ps();
    for (int b = 0; b < MB; ++b) _mm512_mask_storeu_ps(j.y + (m + b) * j.N + n, mask, _mm512_add_ps(acc[b][c], bias));
  }
}

template <int NB, int R>
inline void blocked_rest(const Job &j, int64_t nb, int64_t m, int64_t rows) {
  if constexpr (R >= 1) {
    if (rows == R) tile_blocked<NB, R>(j, nb, m);
    else blocked_rest<NB, R - 1>(j, nb, m, rows);
  }
}

template <int NB, int MB>
inline void blocked_tiles(const Job &j, int64_t nb) {
  int64_t m = 0;
  for (; m + MB <= j.M; m += MB) tile_blocked<NB, MB>(j, nb, m);
  blocked_rest<NB, MB - 1>(j, nb, m, j.M - m);
}

// Output blocks [b0, b1) of a blocked product. Up to 16 rows of x: one block of 16 outputs at a time
// with every row in one pass, so a tile reads a single contiguous 16 KB stream (K = 512); tiles of
// 2-8 blocks read that many streams at once and streamed 10-13% slower (1-8 rows, 2 threads,
// 128 MB of weights: 45-46 against 50-51 GB/s; the bench model's decode steps 8-9% faster in an A/B
// within one process). Past 16 rows, 2 blocks x 12 rows (875 GFLOP/s at 256 rows, LM head shape).
template <int NB, int MB>
void blocks_with(const Job &j, int64_t b0, int64_t b1) {
  int64_t nb = b0;
  for (; nb + NB <= b1; nb += NB) blocked_tiles<NB, MB>(j, nb);
  for (; nb < b1; ++nb) blocked_tiles<1, MB>(j, nb);
}

void blocks_bf16(const Job &j, int64_t b0, int64_t b1) {
  if (amx_wanted(j)) blocks_amx(j, b0, b1);  // many rows: AMX tiles (native_amx.h)
  else if (j.M <= 16) blocks_with<1, 16>(j, b0, b1);
  else blocks_with<2, 12>(j, b0, b1);
}
#else
constexpr bool kNativeBf16 = false;
void rows_bf16(const Job &j, int64_t n0, int64_t n1) { rows_generic<uint16_t>(j, n0, n1); }
void blocks_bf16(const Job &, int64_t, int64_t) {}  // never called: nothing is blocked without AVX512-BF16
#endif

// ---- int8 weights ------------------------------------------------------------------------------
// Layout: an [N, K] matrix of int8 (symmetric, per-output scale s_n: w = s_n q) as [ceil(N/16), K/4,
// 16, 4], rows padded to 16 with zeros: 64 bytes hold 16 outputs x 4 inputs, which one vpdpbusd
// multiplies with 4 broadcast u8 inputs into 16 int32 sums. Rows of x are quantized on the fly (per
// row: u = round(x / s_x) + 128, s_x = max|x| / 127), so y = s_x s_n (sum_k u_k q_nk - 128 sum_k q_nk).
// The +128 makes x unsigned, as vpdpbusd wants; the 128 x row sums (`sums`) are precomputed.
// Against widening int8 to bf16 for the bf16 kernel: 64 products per instruction instead of 32, and
// no conversion instructions per weight.

// Rows of x [M, K] as u8 and their scales (a zero row: scale 1, all 128). The same float operations
// as pyramoe.kernels.quantized.quantize_rows, so both round the same inputs to the same integers.
void quantize_rows_u8(const float *x, int64_t M, int64_t K, uint8_t *q, float *scales) {
  for (int64_t m = 0; m < M; ++m) {
    const float *xr = x + m * K;
    uint8_t *qr = q + m * K;
    float amax = 0.0f;
    int64_t i = 0;
#if defined(__AVX512F__)
    __m512 top = _mm512_setzero_ps();
    for (; i + 16 <= K; i += 16) top = _mm512_max_ps(top, _mm512_abs_ps(_mm512_loadu_ps(xr + i)));
    amax = _mm512_reduce_max_ps(top);
#endif
    for (; i < K; ++i) amax = std::max(amax, std::fabs(xr[i]));
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    scales[m] = amax > 0.0f ? amax / 127.0f : 1.0f;
    i = 0;
#if defined(__AVX512F__)
    const __m512 vinv = _mm512_set1_ps(inv);
    for (; i + 16 <= K; i += 16) {
      const __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xr + i), vinv));  // nearest even
      _mm_storeu_si128(reinterpret_cast<__m128i *>(qr + i),
                       _mm512_cvtepi32_epi8(_mm512_add_epi32(r, _mm512_set1_epi32(128))));
    }
#endif
    for (; i < K; ++i) qr[i] = uint8_t(int32_t(std::nearbyint(xr[i] * inv)) + 128);
  }
}

// Output n of row m from its integer sum.
inline float int8_output(const Job &j, int64_t m, int64_t n, int32_t acc) {
  return float(acc - j.sums[n]) * (j.x_scales[m] * j.scales[n]) + (j.bias ? j.bias[n] : 0.0f);
}

// Portable kernel: output blocks [b0, b1) of an int8 product (the compiler vectorises the 16 lanes).
void blocks_int8_generic(const Job &j, int64_t b0, int64_t b1) {
  const int64_t K4 = j.K / 4;
  for (int64_t nb = b0; nb < b1; ++nb) {
    const int8_t *base = static_cast<const int8_t *>(j.W) + nb * K4 * 64;
    const int64_t left = std::min<int64_t>(16, j.N - nb * 16);
    for (int64_t m = 0; m < j.M; ++m) {
      const uint8_t *x = j.xq + m * j.K;
      int32_t acc[16] = {0};
      for (int64_t kq = 0; kq < K4; ++kq)
        for (int o = 0; o < 16; ++o)
          for (int i = 0; i < 4; ++i) acc[o] += int32_t(x[4 * kq + i]) * int32_t(base[kq * 64 + o * 4 + i]);
      for (int o = 0; o < left; ++o) j.y[m * j.N + nb * 16 + o] = int8_output(j, m, nb * 16 + o, acc[o]);
    }
  }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr bool kNativeInt8 = true;
constexpr int64_t kPrefetchQuads = 64;  // 4 KB ahead in each stream, as the bf16 blocked kernel

// Row `row`'s 16 outputs from n (mask: those below N) out of their integer sums: shared with the
// AMX kernel (native_amx_quant.h) so that both round alike.
inline void int8_store(const Job &j, int64_t row, int64_t n, __mmask16 mask, __m512i total, __m512i sums,
                       __m512 scales, __m512 bias) {
  const __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(total, sums));
  const __m512 s = _mm512_mul_ps(_mm512_set1_ps(j.x_scales[row]), scales);
  _mm512_mask_storeu_ps(j.y + row * j.N + n, mask, _mm512_add_ps(_mm512_mul_ps(v, s), bias));
}

// NB blocks of 16 outputs x MB rows of x. U independent sums per (row, block) over alternate 4-input
// groups: one row has a single chain of vpdpbusd (5 cycles each), which held a core below its memory
// speed; U = 2 breaks it where the tile has few sums.
template <int NB, int MB, int U>
inline void tile_int8(const Job &j, int64_t nb, int64_t m) {
  const int64_t K4 = j.K / 4;
  const int8_t *base = static_cast<const int8_t *>(j.W) + nb * K4 * 64;
  __m512i acc[U][MB][NB];
  for (int u = 0; u < U; ++u)
    for (int b = 0; b < MB; ++b)
      for (int c = 0; c < NB; ++c) acc[u][b][c] = _mm512_setzero_si512();
  int64_t kq = 0;
  for (; kq + U <= K4; kq += U) {
    for (int u = 0; u < U; ++u) {
      __m512i w[NB];
      for (int c = 0; c < NB; ++c) {
        w[c] = _mm512_loadu_si512(base + (c * K4 + kq + u) * 64);
        if (m == 0) _mm_prefetch(reinterpret_cast<const char *>(base + (c * K4 + kq + u + kPrefetchQuads) * 64), _MM_HINT_T0);
      }
      for (int b = 0; b < MB; ++b) {
        int32_t quad;
        std::memcpy(&quad, j.xq + (m + b) * j.K + 4 * (kq + u), 4);
        const __m512i xv = _mm512_set1_epi32(quad);
        for (int c = 0; c < NB; ++c) acc[u][b][c] = _mm512_dpbusd_epi32(acc[u][b][c], xv, w[c]);
      }
    }
  }
  for (; kq < K4; ++kq) {
    for (int c = 0; c < NB; ++c) {
      const __m512i w = _mm512_loadu_si512(base + (c * K4 + kq) * 64);
      for (int b = 0; b < MB; ++b) {
        int32_t quad;
        std::memcpy(&quad, j.xq + (m + b) * j.K + 4 * kq, 4);
        acc[0][b][c] = _mm512_dpbusd_epi32(acc[0][b][c], _mm512_set1_epi32(quad), w);
      }
    }
  }
  for (int c = 0; c < NB; ++c) {
    const int64_t n = (nb + c) * 16, left = std::min<int64_t>(16, j.N - n);
    const __mmask16 mask = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
    const __m512 bias = j.bias ? _mm512_maskz_loadu_ps(mask, j.bias + n) : _mm512_setzero_ps();
    const __m512i sums = _mm512_loadu_si512(j.sums + n);  // padded to 16 outputs
    const __m512 scales = _mm512_loadu_ps(j.scales + n);
    for (int b = 0; b < MB; ++b) {
      __m512i total = acc[0][b][c];
      for (int u = 1; u < U; ++u) total = _mm512_add_epi32(total, acc[u][b][c]);
      int8_store(j, m + b, n, mask, total, sums, scales, bias);
    }
  }
}

template <int NB, int U, int R>
inline void int8_rest(const Job &j, int64_t nb, int64_t m, int64_t rows) {
  if constexpr (R >= 1) {
    if (rows == R) tile_int8<NB, R, (R <= 2 ? U : 1)>(j, nb, m);
    else int8_rest<NB, U, R - 1>(j, nb, m, rows);
  }
}

template <int NB, int MB>
inline void int8_tiles(const Job &j, int64_t nb) {
  int64_t m = 0;
  for (; m + MB <= j.M; m += MB) tile_int8<NB, MB, 1>(j, nb, m);
  int8_rest<NB, 2, MB - 1>(j, nb, m, j.M - m);
}

template <int NB, int MB>
void int8_blocks_with(const Job &j, int64_t b0, int64_t b1) {
  int64_t nb = b0;
  for (; nb + NB <= b1; nb += NB) int8_tiles<NB, MB>(j, nb);
  for (; nb < b1; ++nb) int8_tiles<1, MB>(j, nb);
}

// Up to 16 rows: one block at a time with every row (one weight stream, as the bf16 kernel);
// beyond, 2 blocks x 12 rows.
void blocks_int8(const Job &j, int64_t b0, int64_t b1) {
  if (j.M <= 16) int8_blocks_with<1, 16>(j, b0, b1);
  else int8_blocks_with<2, 12>(j, b0, b1);
}
#else
constexpr bool kNativeInt8 = false;
void blocks_int8(const Job &j, int64_t b0, int64_t b1) { blocks_int8_generic(j, b0, b1); }
#endif

// ---- int4 weights ------------------------------------------------------------------------------
// Layout (pyramoe/kernels/quantized4.py): an [N, K] matrix as [ceil(N/16), K/8, 64] bytes; byte i of
// chunk p holds the 4-bit codes of output i / 4 at inputs 8p + i % 4 (low nibble) and 8p + 4 + i % 4
// (high nibble). Groups of `group` inputs carry fp16 scales s (and mins m; symmetric: m = -8 s) for
// 16 outputs at a time, [ceil(N/16), K/group, 16]: w = s u + m. Rows of x are quantized on the fly
// to s8 (q = round(x / s_x), s_x = max|x| / 127, the int8 products' integers) with per-group sums
// S_g, and y = s_x sum_g (s_g D_g + m_g S_g) + b, D_g = sum_{k in g} u_k q_k: the codes are the
// unsigned operand of vpdpbusd, x the signed one. Widened to int8 for the VNNI products rather than to
// bf16: 64 products per instruction against 32, and two masks per 128 weights against a conversion
// per 16 (the int8 products made the same choice).

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
  uint32_t bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else {  // zero or subnormal: mantissa x 2^-24, exact in fp32
    const float v = float(mantissa) * 5.9604644775390625e-08f;
    std::memcpy(&bits, &v, 4);
    bits |= sign;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Rows of x [M, K] as s8 (the integers of quantize_rows_u8, without its +128), their scales and
// per-group sums [M, K / group] (group a multiple of 16).
void quantize_rows_s8(const float *x, int64_t M, int64_t K, int64_t group, int8_t *q, float *scales, int32_t *sums) {
  const int64_t groups = K / group;
  for (int64_t m = 0; m < M; ++m) {
    const float *xr = x + m * K;
    int8_t *qr = q + m * K;
    float amax = 0.0f;
    int64_t i = 0;
#if defined(__AVX512F__)
    __m512 top = _mm512_setzero_ps();
    for (; i + 16 <= K; i += 16) top = _mm512_max_ps(top, _mm512_abs_ps(_mm512_loadu_ps(xr + i)));
    amax = _mm512_reduce_max_ps(top);
#endif
    for (; i < K; ++i) amax = std::max(amax, std::fabs(xr[i]));
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    scales[m] = amax > 0.0f ? amax / 127.0f : 1.0f;
    for (int64_t g = 0; g < groups; ++g) {
      int64_t k = g * group;
      const int64_t end = k + group;
      int32_t total = 0;
#if defined(__AVX512F__)
      const __m512 vinv = _mm512_set1_ps(inv);
      __m512i acc = _mm512_setzero_si512();
      for (; k < end; k += 16) {
        const __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xr + k), vinv));  // nearest even
        acc = _mm512_add_epi32(acc, r);
        _mm_storeu_si128(reinterpret_cast<__m128i *>(qr + k), _mm512_cvtepi32_epi8(r));
      }
      total = _mm512_reduce_add_epi32(acc);
#endif
      for (; k < end; ++k) {
        const int32_t r = int32_t(std::nearbyint(xr[k] * inv));
        qr[k] = int8_t(r);
        total += r;
      }
      sums[m * groups + g] = total;
    }
  }
}

// Portable kernel: output blocks [b0, b1) of an int4 product.
void blocks_int4_generic(const Job &j, int64_t b0, int64_t b1) {
  const int64_t K8 = j.K / 8, groups = j.K / j.group, chunks = j.group / 8;
  const int8_t *xs = reinterpret_cast<const int8_t *>(j.xq);
  for (int64_t nb = b0; nb < b1; ++nb) {
    const uint8_t *base = static_cast<const uint8_t *>(j.W) + nb * K8 * 64;
    const int64_t left = std::min<int64_t>(16, j.N - nb * 16);
    for (int64_t m = 0; m < j.M; ++m) {
      const int8_t *x = xs + m * j.K;
      float out[16] = {0};
      for (int64_t g = 0; g < groups; ++g) {
        int32_t acc[16] = {0};
        for (int64_t c = 0; c < chunks; ++c) {
          const int64_t p = g * chunks + c;
          for (int o = 0; o < 16; ++o)
            for (int i = 0; i < 4; ++i) {
              const uint8_t byte = base[p * 64 + o * 4 + i];
              acc[o] += int32_t(byte & 15) * x[8 * p + i] + int32_t(byte >> 4) * x[8 * p + 4 + i];
            }
        }
        const int32_t S = j.x_sums[m * groups + g];
        const uint16_t *s = j.group_scales + (nb * groups + g) * 16;
        for (int o = 0; o < 16; ++o) {
          if (j.group_mins)
            out[o] += f16_to_f32(s[o]) * float(acc[o]) + f16_to_f32(j.group_mins[(nb * groups + g) * 16 + o]) * float(S);
          else
            out[o] += f16_to_f32(s[o]) * float(acc[o] - 8 * S);
        }
      }
      for (int o = 0; o < left; ++o) {
        const int64_t n = nb * 16 + o;
        j.y[m * j.N + n] = out[o] * j.x_scales[m] + (j.bias ? j.bias[n] : 0.0f);
      }
    }
  }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// One group's integer sums d (16 outputs of one row; S: the row's sum of q over the group) scaled
// into the row's fp32 outputs, and those outputs stored: shared with the AMX kernel
// (native_amx_quant.h), so both take the same float steps in the same order.
template <bool ASYMMETRIC>
inline __m512 int4_group(__m512 out, __m512i d, __m512 s, __m512 mins, int32_t S) {
  if constexpr (ASYMMETRIC) {
    out = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(d), out);
    return _mm512_fmadd_ps(mins, _mm512_set1_ps(float(S)), out);
  }
  return _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(_mm512_sub_epi32(d, _mm512_set1_epi32(8 * S))), out);
}

inline void int4_store(const Job &j, int64_t nb, int64_t row, __m512 out) {
  const int64_t n = nb * 16, left = std::min<int64_t>(16, j.N - n);
  const __mmask16 mask = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
  const __m512 bias = j.bias ? _mm512_maskz_loadu_ps(mask, j.bias + n) : _mm512_setzero_ps();
  _mm512_mask_storeu_ps(j.y + row * j.N + n, mask, _mm512_fmadd_ps(out, _mm512_set1_ps(j.x_scales[row]), bias));
}

// One block of 16 outputs x MB rows. SPLIT: low and high nibbles into separate sums (two chains of
// vpdpbusd where the tile has few rows, as the int8 kernel's U = 2).
template <int MB, bool SPLIT>
inline void tile_int4(const Job &j, int64_t nb, int64_t m) {
  const int64_t K8 = j.K / 8, groups = j.K / j.group, chunks = j.group / 8;
  const uint8_t *base = static_cast<const uint8_t *>(j.W) + nb * K8 * 64;
  const uint16_t *scales = j.group_scales + nb * groups * 16;
  const uint16_t *mins = j.group_mins ? j.group_mins + nb * groups * 16 : nullptr;
  const __m512i low = _mm512_set1_epi8(15);
  __m512 out[MB];
  for (int b = 0; b < MB; ++b) out[b] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i acc[MB], acc_high[SPLIT ? MB : 1];
    for (int b = 0; b < MB; ++b) acc[b] = _mm512_setzero_si512();
    if constexpr (SPLIT)
      for (int b = 0; b < MB; ++b) acc_high[b] = _mm512_setzero_si512();
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t p = g * chunks + c;
      const __m512i v = _mm512_loadu_si512(base + p * 64);
      if (m == 0) _mm_prefetch(reinterpret_cast<const char *>(base + (p + kPrefetchQuads) * 64), _MM_HINT_T0);
      const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      for (int b = 0; b < MB; ++b) {
        int32_t quads[2];
        std::memcpy(quads, j.xq + (m + b) * j.K + 8 * p, 8);
        acc[b] = _mm512_dpbusd_epi32(acc[b], lo, _mm512_set1_epi32(quads[0]));
        if constexpr (SPLIT) acc_high[b] = _mm512_dpbusd_epi32(acc_high[b], hi, _mm512_set1_epi32(quads[1]));
        else acc[b] = _mm512_dpbusd_epi32(acc[b], hi, _mm512_set1_epi32(quads[1]));
      }
    }
    const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(scales + g * 16)));
    const __m512 mn = mins ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(mins + g * 16)))
                           : _mm512_setzero_ps();
    __m512i d[MB];
    for (int b = 0; b < MB; ++b) {
      d[b] = acc[b];
      if constexpr (SPLIT) d[b] = _mm512_add_epi32(d[b], acc_high[b]);
    }
    if (mins)  // the branch outside the rows' loops
      for (int b = 0; b < MB; ++b) out[b] = int4_group<true>(out[b], d[b], s, mn, j.x_sums[(m + b) * groups + g]);
    else
      for (int b = 0; b < MB; ++b) out[b] = int4_group<false>(out[b], d[b], s, mn, j.x_sums[(m + b) * groups + g]);
  }
  for (int b = 0; b < MB; ++b) int4_store(j, nb, m + b, out[b]);
}

template <int R>
inline void int4_rest(const Job &j, int64_t nb, int64_t m, int64_t rows) {
  if constexpr (R >= 1) {
    if (rows == R) tile_int4<R, (R <= 2)>(j, nb, m);
    else int4_rest<R - 1>(j, nb, m, rows);
  }
}

// Output blocks [b0, b1): one block at a time with up to 12 rows per pass (registers: 2 x 12
// accumulators; rows past 12 read the block again, from L1/L2).
void blocks_int4(const Job &j, int64_t b0, int64_t b1) {
  for (int64_t nb = b0; nb < b1; ++nb) {
    int64_t m = 0;
    for (; m + 12 <= j.M; m += 12) tile_int4<12, false>(j, nb, m);
    int4_rest<11>(j, nb, m, j.M - m);
  }
}
#else
void blocks_int4(const Job &j, int64_t b0, int64_t b1) { blocks_int4_generic(j, b0, b1); }
#endif

#include "native_amx_quant.h"

// x rounded to bf16 (to nearest even, as torch): vcvtneps2bf16 where the CPU has it (a scalar loop
// spent ~0.2 ms of a batch-16 step on the experts' inputs).
void rows_to_bf16(const float *x, uint16_t *y, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512BF16__)
  for (; i + 16 <= n; i += 16) {
    const __m256bh v = _mm512_cvtneps_pbh(_mm512_loadu_ps(x + i));
    _mm256_storeu_si256(reinterpret_cast<__m256i *>(y + i), reinterpret_cast<const __m256i &>(v));
  }
#endif
  for (; i < n; ++i) y[i] = f32_to_bf16(x[i]);
}

bool reads_bf16_x(const Job &j, bool bf16) { return bf16 && kNativeBf16 && (j.blocked || j.K % 32 == 0); }

// Outputs [n0, n1) of a job (multiples of 16 for blocked weights, but n1 may be N).
void run_rows(const Job &j, int64_t n0, int64_t n1, bool bf16) {
  if (j.format == kFormatInt8 || j.format == kFormatInt4) {  // many rows: AMX tiles (native_amx_quant.h)
    if (amx_quant_wanted(j)) (j.format == kFormatInt8 ? blocks_amx_int8 : blocks_amx_int4)(j, n0 / 16, (n1 + 15) / 16);
    else (j.format == kFormatInt8 ? blocks_int8 : blocks_int4)(j, n0 / 16, (n1 + 15) / 16);
  }
  else if (!bf16) rows_generic<float>(j, n0, n1);
  else if (j.blocked) blocks_bf16(j, n0 / 16, (n1 + 15) / 16);
  else if (reads_bf16_x(j, bf16)) rows_bf16(j, n0, n1);
  else rows_generic<uint16_t>(j, n0, n1);
}

// All jobs of a phase in one parallel region, split by units of weight rows (contiguous units per
// thread, so its prefetches run ahead within its own range).
void run_jobs(std::vector<Job> &jobs, bool bf16, int threads, uint16_t *xb_scratch) {
  if (jobs.empty()) return;
  std::vector<int64_t> first_unit(jobs.size() + 1, 0);
  std::vector<int64_t> unit_rows(jobs.size());
  for (size_t i = 0; i < jobs.size(); ++i) {
    Job &j = jobs[i];
    if (j.format == kFormatInt8) {  // the kernels read x per row as u8 with a scale
      uint8_t *q = reinterpret_cast<uint8_t *>(xb_scratch);
      float *scales = reinterpret_cast<float *>(q + (j.M * j.K + 63) / 64 * 64);
      quantize_rows_u8(j.x, j.M, j.K, q, scales);
      j.xq = q, j.x_scales = scales;
      xb_scratch += ((j.M * j.K + 63) / 64 * 64 + (4 * j.M + 63) / 64 * 64) / 2;
    } else if (j.format == kFormatInt4) {  // x per row as s8 with a scale and per-group sums
      uint8_t *q = reinterpret_cast<uint8_t *>(xb_scratch);
      float *scales = reinterpret_cast<float *>(q + (j.M * j.K + 63) / 64 * 64);
      int32_t *sums = reinterpret_cast<int32_t *>(reinterpret_cast<char *>(scales) + (4 * j.M + 63) / 64 * 64);
      quantize_rows_s8(j.x, j.M, j.K, j.group, reinterpret_cast<int8_t *>(q), scales, sums);
      j.xq = q, j.x_scales = scales, j.x_sums = sums;
      xb_scratch += ((j.M * j.K + 63) / 64 * 64 + (4 * j.M + 63) / 64 * 64 + (4 * j.M * (j.K / j.group) + 63) / 64 * 64) / 2;
    } else if (reads_bf16_x(j, bf16)) {  // the kernels read x as bf16
      rows_to_bf16(j.x, xb_scratch, j.M * j.K);
      j.xb = xb_scratch;
      xb_scratch += j.M * j.K;
    }
    if ((j.format == 0 && j.blocked && bf16 && kNativeBf16 && amx_wanted(j)) || (j.format != 0 && amx_quant_wanted(j)))
      g_amx_products.fetch_add(1, std::memory_order_relaxed);
    unit_rows[i] = j.blocked || j.format != 0 ? 128 : kRowBlock;
    first_unit[i + 1] = first_unit[i] + (j.N + unit_rows[i] - 1) / unit_rows[i];
  }
  const int64_t units = first_unit.back();
#pragma omp parallel for num_threads(threads) schedule(static, 1) if (threads > 1 && units > 1)
  for (int64_t u = 0; u < units; ++u) {
    size_t i = std::upper_bound(first_unit.begin(), first_unit.end(), u) - first_unit.begin() - 1;
    const Job &j = jobs[i];
    int64_t n0 = (u - first_unit[i]) * unit_rows[i];
    run_rows(j, n0, std::min(n0 + unit_rows[i], j.N), bf16);
  }
}

}  // namespace
