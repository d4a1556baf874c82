// int8 and int4 products on Intel AMX-INT8 tiles for many rows of x (run_rows in native_products.h
// picks these or the VNNI kernels, with the bf16 products' mode switch: amx_quant_wanted). Included
// by native_products.h after the VNNI kernels, whose epilogues (int8_store, int4_group, int4_store)
// these share so that both give the same floats.
//
// int8: the blocked layout [ceil(N/16), K/4, 16, 4] is AMX's B operand for int8 as it stands (16
// rows of 64 bytes = 16 quads of inputs x 16 outputs); x as u8 (+128) gives the A tiles (64 inputs
// per row), and tdpbusd (u8 x s8) sums the same integers as vpdpbusd, so the outputs equal the VNNI
// kernel's bit for bit. int4: a block's codes are unpacked per pass into a buffer of B rows (low
// nibbles of a 64-byte chunk = the quad of inputs 8p .. 8p + 3, high = 8p + 4 .. 8p + 7), x is s8,
// and each group's integer sums land in a C tile (a group of 32 is one product with A 32 bytes wide
// and B 8 rows; of 64 or 128, one or two products of 64 inputs): asymmetric, codes u8 and tdpbsud
// (s8 x u8) give D_g; symmetric, codes s8 u - 8 and tdpbssd give D_g - 8 S_g, the integer the VNNI
// kernel forms. int4_group then scales them into fp32 in the VNNI kernel's order: equal bit for bit.
//
// Rows of x from which auto mode runs them (kAmxInt8MinRows, kAmxInt4MinRows): see the figures there.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <vector>

#include "native_amx.h"
#include "native_job.h"

namespace {

// Measured with benchmarks/amx_quant_rows.py (one product at a time on the bench model's shapes:
// expert in [2048, 512], expert out [512, 1024], LM head [32000, 512]; ~64 MB of copies so weights
// come from memory; tiles against VNNI interleaved in one process, 1 thread, median of 5, on the
// 2-core AMX VM while 4 other jobs ran, so +-10-15%).
// int8, tiles / VNNI speed: 1-8 rows 0.90-1.08x (both stream the weights at memory speed), 12 rows
// 1.13-1.24x, 16 rows 1.32-1.58x, 32 rows 2.1-2.7x, 64 rows 2.7-3.7x, 256 rows 3.5-4.3x.
constexpr int64_t kAmxInt8MinRows = 12;
// int4 (group 32, 3 rounds): 1-8 rows 0.65-0.85x (LM head 8 rows 1.05x), 12 rows 0.91-1.28x,
// 16 rows 1.01-1.46x, 32 rows 1.19-1.55x, 64 rows 1.22-1.77x, 256 rows 1.65-1.80x. Less than int8's
// gain: each group's C tile still goes through the VNNI kernel's fp32 scaling per row (a store of the
// tile, a load, conversion and FMA per row and group), which the tiles do not shorten; batching 4
// groups' products before their stores took 256 rows from 1.15-1.40x to this.
constexpr int64_t kAmxInt4MinRows = 16;

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && \
    defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr bool kAmxInt8Built = true;

// int8: rows [m, m + ra + rb) (two groups of A where rb > 0) x NB blocks from nb; tiles as
// configure_tiles lays them out (C 0-3, A 4-5, B 6-7), K a multiple of 64.
template <int RG, int NB>
inline void amx_int8_tile(const Job &j, int64_t nb, int64_t m, int ra, int rb) {
  const int8_t *w0 = static_cast<const int8_t *>(j.W) + nb * j.K * 16, *w1 = w0 + j.K * 16;
  const uint8_t *x0 = j.xq + m * j.K, *x1 = x0 + 16 * j.K;
  _tile_zero(0);
  if constexpr (NB == 2) _tile_zero(1);
  if constexpr (RG == 2) {
    _tile_zero(2);
    if constexpr (NB == 2) _tile_zero(3);
  }
  for (int64_t k = 0; k < j.K; k += 64) {  // B tile of inputs k .. k + 63: quads k / 4 .. k / 4 + 15
    if (m == 0)
      for (int line = 0; line < 1024; line += 64) {
        _mm_prefetch(reinterpret_cast<const char *>(w0 + k * 16) + kAmxPrefetch + line, _MM_HINT_T0);
        if constexpr (NB == 2)
          _mm_prefetch(reinterpret_cast<const char *>(w1 + k * 16) + kAmxPrefetch + line, _MM_HINT_T0);
      }
    _tile_loadd(4, x0 + k, j.K);
    _tile_loadd(6, w0 + k * 16, 64);
    _tile_dpbusd(0, 4, 6);
    if constexpr (NB == 2) {
      _tile_loadd(7, w1 + k * 16, 64);
      _tile_dpbusd(1, 4, 7);
    }
    if constexpr (RG == 2) {
      _tile_loadd(5, x1 + k, j.K);
      _tile_dpbusd(2, 5, 6);
      if constexpr (NB == 2) _tile_dpbusd(3, 5, 7);
    }
  }
  alignas(64) int32_t out[4][256];
  _tile_stored(0, out[0], 64);
  if constexpr (NB == 2) _tile_stored(1, out[1], 64);
  if constexpr (RG == 2) {
    _tile_stored(2, out[2], 64);
    if constexpr (NB == 2) _tile_stored(3, out[3], 64);
  }
  for (int c = 0; c < NB; ++c) {
    const int64_t n = (nb + c) * 16, left = std::min<int64_t>(16, j.N - n);
    const __mmask16 mask = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
    const __m512 bias = j.bias ? _mm512_maskz_loadu_ps(mask, j.bias + n) : _mm512_setzero_ps();
    const __m512i sums = _mm512_loadu_si512(j.sums + n);
    const __m512 scales = _mm512_loadu_ps(j.scales + n);
    for (int g = 0; g < RG; ++g) {
      const int rows = g == 0 ? ra : rb;
      for (int r = 0; r < rows; ++r)
        int8_store(j, m + 16 * g + r, n, mask, _mm512_load_si512(out[2 * g + c] + 16 * r), sums, scales, bias);
    }
  }
}

// Output blocks [b0, b1) of an int8 product, K a multiple of 64: the bf16 tile kernel's passes.
void blocks_amx_int8(const Job &j, int64_t b0, int64_t b1) {
  amx_row_passes(j, b0, b1, [&j](auto groups, auto nbs, int64_t nb, int64_t m, int ra, int rb) {
    amx_int8_tile<decltype(groups)::value, decltype(nbs)::value>(j, nb, m, ra, rb);
  });
}

// int4 tiles: 0-3 = C of 4 consecutive groups (so their products overlap, and the stores and the
// scaling of one batch follow the products of the whole batch); 4, 5 = A (rows x `step` inputs),
// 6, 7 = B (step / 4 rows of 16 outputs x 4 inputs), alternating between consecutive groups.
void configure_int4_tiles(int rows, int step) {
  TileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = uint8_t(t < 6 ? rows : step / 4);
    c.colsb[t] = uint16_t(t == 4 || t == 5 ? step : 64);
  }
  _tile_loadconfig(&c);
}

// Block nb's codes as B rows: row 2p = the low nibbles of chunk p, row 2p + 1 the high ones; SYM:
// as s8 u - 8, so the tiles sum D_g - 8 S_g (symmetric groups' integer) directly; else u8 u.
template <bool SYM>
void unpack_int4_block(const Job &j, int64_t nb, uint8_t *b) {
  const int64_t K8 = j.K / 8;
  const uint8_t *base = static_cast<const uint8_t *>(j.W) + nb * K8 * 64;
  const __m512i low = _mm512_set1_epi8(15), eight = _mm512_set1_epi8(SYM ? 8 : 0);
  for (int64_t p = 0; p < K8; ++p) {
    const __m512i v = _mm512_loadu_si512(base + p * 64);
    _mm_prefetch(reinterpret_cast<const char *>(base + (p + kPrefetchQuads) * 64), _MM_HINT_T0);
    _mm512_storeu_si512(b + p * 128, _mm512_sub_epi8(_mm512_and_si512(v, low), eight));
    _mm512_storeu_si512(b + p * 128 + 64, _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(v, 4), low), eight));
  }
}

// Group g's integer sums into C tile C (its inputs in tile products of `step`), with A and B in
// tiles A, A + 2. The tile intrinsics paste their tile numbers into the assembly: literals only.
#define PM_INT4_GROUP_PRODUCT(C, A, B)                                     \
  do {                                                                     \
    _tile_zero(C);                                                         \
    for (int64_t k = g * j.group; k < (g + 1) * j.group; k += step) {      \
      _tile_loadd(A, x + k, j.K);                                          \
      _tile_loadd(B, b + k * 16, 64);                                      \
      if constexpr (SYM) _tile_dpbssd(C, A, B);                            \
      else _tile_dpbsud(C, A, B);                                          \
    }                                                                      \
  } while (0)

template <int T, bool SYM>
inline void int4_group_product(const Job &j, const int8_t *x, const uint8_t *b, int64_t g, int step) {
  if constexpr (T == 0) PM_INT4_GROUP_PRODUCT(0, 4, 6);
  else if constexpr (T == 1) PM_INT4_GROUP_PRODUCT(1, 5, 7);
  else if constexpr (T == 2) PM_INT4_GROUP_PRODUCT(2, 4, 6);
  else PM_INT4_GROUP_PRODUCT(3, 5, 7);
}
#undef PM_INT4_GROUP_PRODUCT

// Rows [m, m + rows) of block nb (R > 0: rows = R, known here, so the outputs stay in registers),
// codes unpacked in b: per group its integer sums on the tiles, then scaled into the rows' outputs
// by int4_group in the VNNI kernel's order (symmetric: the tiles' D - 8 S with S = 0 there).
template <bool SYM, int R>
inline void amx_int4_rows(const Job &j, int64_t nb, const uint8_t *b, int64_t m, int rows, int step) {
  const int n_rows = R > 0 ? R : rows;
  const int64_t groups = j.K / j.group;
  const uint16_t *scales = j.group_scales + nb * groups * 16;
  const uint16_t *mins = SYM ? nullptr : j.group_mins + nb * groups * 16;
  const int8_t *x = reinterpret_cast<const int8_t *>(j.xq) + m * j.K;
  __m512 out[16];
  for (int r = 0; r < 16; ++r) out[r] = _mm512_setzero_ps();
  alignas(64) int32_t c[4][256];
  for (int64_t g0 = 0; g0 < groups; g0 += 4) {
    const int count = int(std::min<int64_t>(4, groups - g0));
    int4_group_product<0, SYM>(j, x, b, g0, step);
    if (count > 1) int4_group_product<1, SYM>(j, x, b, g0 + 1, step);
    if (count > 2) int4_group_product<2, SYM>(j, x, b, g0 + 2, step);
    if (count > 3) int4_group_product<3, SYM>(j, x, b, g0 + 3, step);
    _tile_stored(0, c[0], 64);
    if (count > 1) _tile_stored(1, c[1], 64);
    if (count > 2) _tile_stored(2, c[2], 64);
    if (count > 3) _tile_stored(3, c[3], 64);
    for (int t = 0; t < count; ++t) {
      const int64_t g = g0 + t;
      const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(scales + g * 16)));
      const __m512 mn = SYM ? _mm512_setzero_ps()
                            : _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(mins + g * 16)));
#pragma GCC unroll 16
      for (int r = 0; r < (R > 0 ? R : 16); ++r) {
        if (R == 0 && r >= n_rows) break;
        out[r] = int4_group<!SYM>(out[r], _mm512_load_si512(c[t] + 16 * r), s, mn,
                                  SYM ? 0 : j.x_sums[(m + r) * groups + g]);
      }
    }
  }
  for (int r = 0; r < n_rows; ++r) int4_store(j, nb, m + r, out[r]);
}

// Output blocks [b0, b1) of an int4 product: rows in 16-row passes over every block, then the rest
// of the rows (tiles configured to their count) in a second pass; each block unpacked per pass
// into this thread's buffer (K/8 loads: little beside the per-group scaling).
template <bool SYM>
void amx_int4_passes(const Job &j, int64_t b0, int64_t b1, uint8_t *b) {
  const int step = int(std::min<int64_t>(j.group, 64));
  const int64_t full = j.M / 16 * 16, tail = j.M % 16;
  if (full) {
    configure_int4_tiles(16, step);
    for (int64_t nb = b0; nb < b1; ++nb) {
      unpack_int4_block<SYM>(j, nb, b);
      for (int64_t m = 0; m < full; m += 16) amx_int4_rows<SYM, 16>(j, nb, b, m, 16, step);
    }
  }
  if (tail) {
    configure_int4_tiles(int(tail), step);
    for (int64_t nb = b0; nb < b1; ++nb) {
      unpack_int4_block<SYM>(j, nb, b);
      amx_int4_rows<SYM, 0>(j, nb, b, full, int(tail), step);
    }
  }
}

void blocks_amx_int4(const Job &j, int64_t b0, int64_t b1) {
  thread_local std::vector<uint8_t> buffer;
  if (int64_t(buffer.size()) < j.K * 16) buffer.resize(j.K * 16);
  if (j.group_mins) amx_int4_passes<false>(j, b0, b1, buffer.data());
  else amx_int4_passes<true>(j, b0, b1, buffer.data());
  _tile_release();
}
#else
constexpr bool kAmxInt8Built = false;
void blocks_amx_int8(const Job &, int64_t, int64_t) {}  // never called: amx_quant_wanted is false
void blocks_amx_int4(const Job &, int64_t, int64_t) {}
#endif

// The tiles run this int8 or int4 product: AMX-INT8 built and permitted, int8's K whole 64-input
// tiles (int4's groups are whole 32-input tiles), and the mode says so.
inline bool amx_quant_wanted(const Job &j) {
  if (!kAmxInt8Built || (j.format == kFormatInt8 && j.K % 64)) return false;
  const int64_t mode = g_amx_mode.load(std::memory_order_relaxed);
  const int64_t min_rows = j.format == kFormatInt8 ? kAmxInt8MinRows : kAmxInt4MinRows;
  return (mode == kAmxOn || (mode == kAmxAuto && j.M >= min_rows)) && amx_permitted();
}

}  // namespace
