// Stand-in for <immintrin.h> (found first on the include path) for tests/test_native_attention_vnni.py:
// SIMDe's portable AVX-512 (libsimde-dev; no native instructions), so the native kernels' AVX-512
// and VNNI paths build and run on a CPU without them (slowly; for their results, not their speed),
// plus the few intrinsics SIMDe 0.7.4 lacks, as plain loops.
#pragma once
#define SIMDE_NO_NATIVE
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include <cstring>
#include <cmath>
#include <cstdint>
typedef uint16_t __mmask16;
typedef uint64_t __mmask64;
#ifndef _MM_FROUND_NO_EXC
#define _MM_FROUND_NO_EXC SIMDE_MM_FROUND_NO_EXC
#endif
#ifndef _CMP_GT_OQ
#define _CMP_GT_OQ SIMDE_CMP_GT_OQ
#endif
#define EMU_LANES(T, n, v, a) \
  T a[n];                     \
  std::memcpy(a, &(v), sizeof(a))
inline simde__m512 emu_ps(const float *a) { simde__m512 r; std::memcpy(&r, a, 64); return r; }
inline simde__m512i emu_si(const void *a) { simde__m512i r; std::memcpy(&r, a, 64); return r; }
inline simde__m128i _mm512_cvtepi32_epi8(simde__m512i v) { EMU_LANES(int32_t, 16, v, a); int8_t r[16]; for (int i = 0; i < 16; ++i) r[i] = int8_t(a[i]); simde__m128i o; std::memcpy(&o, r, 16); return o; }
inline simde__m512 _mm512_cvtepi32_ps(simde__m512i v) { EMU_LANES(int32_t, 16, v, a); float r[16]; for (int i = 0; i < 16; ++i) r[i] = float(a[i]); return emu_ps(r); }
inline simde__m512i _mm512_cvtps_epi32(simde__m512 v) { EMU_LANES(float, 16, v, a); int32_t r[16]; for (int i = 0; i < 16; ++i) r[i] = int32_t(std::nearbyint(a[i])); return emu_si(r); }
inline simde__m512i _mm512_cvtepi8_epi32(simde__m128i v) { EMU_LANES(int8_t, 16, v, a); int32_t r[16]; for (int i = 0; i < 16; ++i) r[i] = a[i]; return emu_si(r); }
inline simde__m512i _mm512_cvtepu16_epi32(simde__m256i v) { EMU_LANES(uint16_t, 16, v, a); int32_t r[16]; for (int i = 0; i < 16; ++i) r[i] = a[i]; return emu_si(r); }
inline __mmask16 _mm512_mask_cmp_ps_mask(__mmask16 k, simde__m512 x, simde__m512 y, int imm) {
  EMU_LANES(float, 16, x, a); EMU_LANES(float, 16, y, b); __mmask16 r = 0;
  for (int i = 0; i < 16; ++i) if ((k >> i & 1) && imm == _CMP_GT_OQ && a[i] > b[i]) r |= __mmask16(1u << i);
  return r;
}
inline float _mm512_reduce_add_ps(simde__m512 v) { EMU_LANES(float, 16, v, a); float s = 0; for (float x : a) s += x; return s; }
inline float _mm512_mask_reduce_max_ps(__mmask16 k, simde__m512 v) { EMU_LANES(float, 16, v, a); float s = -INFINITY; for (int i = 0; i < 16; ++i) if (k >> i & 1) s = std::fmax(s, a[i]); return s; }
inline float _mm512_reduce_max_ps(simde__m512 v) { return _mm512_mask_reduce_max_ps(0xffff, v); }
inline int32_t _mm512_mask_reduce_min_epi32(__mmask16 k, simde__m512i v) { EMU_LANES(int32_t, 16, v, a); int32_t s = INT32_MAX; for (int i = 0; i < 16; ++i) if (k >> i & 1) s = a[i] < s ? a[i] : s; return s; }
inline simde__m512i _mm512_maskz_loadu_epi8(__mmask64 k, const void *p) { int8_t r[64]; for (int i = 0; i < 64; ++i) r[i] = (k >> i & 1) ? static_cast<const int8_t *>(p)[i] : 0; return emu_si(r); }
#define _mm512_shuffle_f32x4(a, b, imm) simde_mm512_castsi512_ps(simde_mm512_shuffle_i32x4(simde_mm512_castps_si512(a), simde_mm512_castps_si512(b), imm))
inline simde__m512 _mm512_maskz_loadu_ps(__mmask16 k, const void *p) { float r[16]; for (int i = 0; i < 16; ++i) r[i] = (k >> i & 1) ? static_cast<const float *>(p)[i] : 0.0f; return emu_ps(r); }
inline void _mm512_mask_storeu_ps(void *p, __mmask16 k, simde__m512 v) { EMU_LANES(float, 16, v, a); for (int i = 0; i < 16; ++i) if (k >> i & 1) static_cast<float *>(p)[i] = a[i]; }
inline int32_t _mm512_reduce_add_epi32(simde__m512i v) { EMU_LANES(int32_t, 16, v, a); int32_t s = 0; for (int32_t x : a) s += x; return s; }
inline float emu_half(uint16_t h) {
  const int e = h >> 10 & 31, f = h & 1023;
  const float v = e == 0 ? std::ldexp(float(f), -24) : e == 31 ? (f ? NAN : INFINITY) : std::ldexp(float(f | 1024), e - 25);
  return (h & 0x8000) ? -v : v;
}
inline simde__m512 _mm512_cvtph_ps(simde__m256i v) { EMU_LANES(uint16_t, 16, v, a); float r[16]; for (int i = 0; i < 16; ++i) r[i] = emu_half(a[i]); return emu_ps(r); }
