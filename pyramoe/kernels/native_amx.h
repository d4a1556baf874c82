// bf16 products on Intel AMX tiles for blocked weights with many rows of x (see native_products.h,
// blocks_bf16, which picks this kernel or the AVX512-BF16 one). Included by native_products.h.
//
// The blocked layout [ceil(N/16), K/2, 16, 2] is AMX's VNNI-packed B operand as it stands: the 16
// input pairs k/2 .. k/2 + 15 of one block of 16 outputs are 16 rows of 64 bytes, contiguous (one
// 1 KB B tile, stride 64). x in bf16 [M, K] gives the A tiles (up to 16 rows x 32 inputs, stride 2K
// bytes), and a C tile holds 16 rows x 16 outputs in fp32. One tdpbf16ps does 16 x 16 x 32
// products, against 16 x 32 for a vdpbf16ps, so past a few rows the tiles win; below, both read
// the weights at memory speed and the AVX512-BF16 kernel is as fast (kAmxMinRows: where, measured).
#pragma once

#include <immintrin.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "native_job.h"

namespace {

// Which kernel blocked bf16 products with K a multiple of 32 use (pm_set_amx; PYRAMOE_NATIVE_AMX on
// the Python side): the AVX512-BF16 one always, AMX always, or AMX from kAmxMinRows rows of x. int8
// and int4 products follow the same mode (native_amx_quant.h, with their own thresholds).
constexpr int64_t kAmxOff = 0, kAmxOn = 1, kAmxAuto = 2;
std::atomic<int64_t> g_amx_mode{kAmxAuto};
std::atomic<int64_t> g_amx_products{0};  // products run on tiles (pm_amx_products: tests check the path taken)

// Rows of x from which the tiles run a product (auto mode). Measured with pm_linear on the
// Mixtral-shaped bench model's matrices (expert in [2048, 512], expert out [512, 1024], LM head
// [32000, 512]; 64 MB of copies so weights come from memory as in a step), 2 threads, the two
// kernels interleaved in one process, on a 2-core AMX VM shared with other jobs (so +-10%):
// AMX / AVX512-BF16 speed at 1 row 0.87-1.0x (the LM head and expert in slower), 2-4 rows 0.97-1.13x
// (both stream the weights at memory speed), 5 rows 1.2-1.3x, 8 rows 1.6-1.7x, 16 rows 2.4-2.9x,
// 32 rows 3.0-3.8x, 256 rows 3.9-4.7x (AVX512-BF16 peaked at ~200 GFLOP/s here, AMX at 750-920).
constexpr int64_t kAmxMinRows = 5;

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
constexpr bool kAmxBuilt = true;

// Linux hands out the 8 KB of tile state only on request, once per process (all threads then have
// it); without it the first tile instruction faults. Refused (an old kernel, a seccomp filter): the
// AVX512-BF16 kernels run everything and pm_native_amx says so.
bool amx_permitted() {
  static const bool permitted = [] {
#if defined(__linux__)
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return true;
#endif
  }();
  return permitted;
}

// Palette 1's configuration block (64 bytes, as ldtilecfg reads it).
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles: 0, 1 = C of row group 0 x blocks 0, 1; 2, 3 = C of row group 1; 4, 5 = A of row groups
// 0, 1 (ra and rb rows of x; rb = 0 leaves group 1 unconfigured); 6, 7 = B of blocks 0, 1.
// Each call configures its thread anew: oneDNN (torch's bf16 matmuls) shares the OpenMP threads
// and loads its own configurations, so a configuration cached per thread could be stale.
void configure_tiles(int ra, int rb) {
  TileConfig c;
  const int rows[8] = {ra, ra, rb, rb, ra, rb, 16, 16};
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = uint8_t(rows[t]);
    c.colsb[t] = rows[t] ? 64 : 0;
  }
  _tile_loadconfig(&c);
}

// Weights prefetched 4 KB ahead in each block's stream, as the AVX512 kernel does. Whether it helps
// the tiles is unsettled: with and without (-DPM_AMX_PREFETCH=0), interleaved on the loaded 2-core
// VM, 5-256 rows differed by +-30% either way from run to run; a quiet machine should decide.
#ifndef PM_AMX_PREFETCH
#define PM_AMX_PREFETCH 1
#endif
constexpr int64_t kAmxPrefetch = 4096;

// RG row groups (rows m .. m + ra + rb) x NB blocks of 16 outputs from block nb.
template <int RG, int NB>
inline void amx_tile(const Job &j, int64_t nb, int64_t m, int ra, int rb) {
  const int64_t K2 = j.K / 2;
  const uint16_t *w0 = static_cast<const uint16_t *>(j.W) + nb * K2 * 32, *w1 = w0 + K2 * 32;
  const uint16_t *x0 = j.xb + m * j.K, *x1 = x0 + 16 * j.K;
  const int64_t x_stride = j.K * 2;
  _tile_zero(0);
  if constexpr (NB == 2) _tile_zero(1);
  if constexpr (RG == 2) {
    _tile_zero(2);
    if constexpr (NB == 2) _tile_zero(3);
  }
  for (int64_t k = 0; k < j.K; k += 32) {  // B tile of inputs k .. k + 31: 16 pairs at pair k / 2
    if (PM_AMX_PREFETCH && m == 0)  // the first row group reads the weights from memory; the others find them cached
      for (int line = 0; line < 1024; line += 64) {
        _mm_prefetch(reinterpret_cast<const char *>(w0 + k * 16) + kAmxPrefetch + line, _MM_HINT_T0);
        if constexpr (NB == 2)
          _mm_prefetch(reinterpret_cast<const char *>(w1 + k * 16) + kAmxPrefetch + line, _MM_HINT_T0);
      }
    _tile_loadd(4, x0 + k, x_stride);
    _tile_loadd(6, w0 + k * 16, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NB == 2) {
      _tile_loadd(7, w1 + k * 16, 64);
      _tile_dpbf16ps(1, 4, 7);
    }
    if constexpr (RG == 2) {
      _tile_loadd(5, x1 + k, x_stride);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (NB == 2) _tile_dpbf16ps(3, 5, 7);
    }
  }
  alignas(64) float out[4][256];  // C tiles as stored, [row][16 outputs]
  _tile_stored(0, out[0], 64);
  if constexpr (NB == 2) _tile_stored(1, out[1], 64);
  if constexpr (RG == 2) {
    _tile_stored(2, out[2], 64);
    if constexpr (NB == 2) _tile_stored(3, out[3], 64);
  }
  for (int c = 0; c < NB; ++c) {  // bias and the outputs past N masked off, as the AVX512 kernel
    const int64_t n = (nb + c) * 16, left = std::min<int64_t>(16, j.N - n);
    const __mmask16 mask = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
    const __m512 bias = j.bias ? _mm512_maskz_loadu_ps(mask, j.bias + n) : _mm512_setzero_ps();
    for (int g = 0; g < RG; ++g) {
      const float *o = out[2 * g + c];
      const int rows = g == 0 ? ra : rb;
      for (int r = 0; r < rows; ++r)
        _mm512_mask_storeu_ps(j.y + (m + 16 * g + r) * j.N + n, mask, _mm512_add_ps(_mm512_load_ps(o + 16 * r), bias));
    }
  }
}

// The passes over the rows of x of a tile kernel, bf16 or int8 alike: `tile(RG, NB, nb, m, ra, rb)`
// (RG, NB as std::integral_constant) computes rows [m, m + ra + rb) (rb > 0: two groups, the first
// of 16 rows) of NB blocks from nb. Rows go in pairs of 16-row groups (2 A x 2 B tiles into 4 C
// tiles: each loaded tile feeds two products), blocks in pairs where there are two; the rows past
// the last pair run in a second pass with tiles configured to their count (a 16-row group and the
// rest, or the rest alone), so no padded copy of x is needed.
template <typename TileFn>
void amx_row_passes(const Job &j, int64_t b0, int64_t b1, TileFn tile) {
  using One = std::integral_constant<int, 1>;
  using Two = std::integral_constant<int, 2>;
  auto blocks = [&](auto groups, int64_t m0, int64_t m1, int ra, int rb) {
    int64_t nb = b0;
    for (; nb + 2 <= b1; nb += 2)
      for (int64_t m = m0; m < m1; m += 32) tile(groups, Two{}, nb, m, ra, rb);
    if (nb < b1)
      for (int64_t m = m0; m < m1; m += 32) tile(groups, One{}, nb, m, ra, rb);
  };
  const int64_t full = j.M / 16, tail = j.M % 16, paired = full / 2 * 32;
  if (paired) {
    configure_tiles(16, 16);
    blocks(Two{}, 0, paired, 16, 16);
  }
  if (full % 2) {
    configure_tiles(16, int(tail));
    if (tail) blocks(Two{}, paired, paired + 1, 16, int(tail));
    else blocks(One{}, paired, paired + 1, 16, 0);
  } else if (tail) {
    configure_tiles(int(tail), 0);
    blocks(One{}, paired, paired + 1, int(tail), 0);
  }
  _tile_release();
}

// Output blocks [b0, b1) of a blocked bf16 product, K a multiple of 32.
void blocks_amx(const Job &j, int64_t b0, int64_t b1) {
  amx_row_passes(j, b0, b1, [&j](auto groups, auto nbs, int64_t nb, int64_t m, int ra, int rb) {
    amx_tile<decltype(groups)::value, decltype(nbs)::value>(j, nb, m, ra, rb);
  });
}
#else
constexpr bool kAmxBuilt = false;
bool amx_permitted() { return false; }
void blocks_amx(const Job &, int64_t, int64_t) {}  // never called: amx_wanted is false
#endif

// The tiles run this product: AMX built and permitted, K whole tiles, and the mode says so.
inline bool amx_wanted(const Job &j) {
  if (!kAmxBuilt || j.K % 32) return false;
  const int64_t mode = g_amx_mode.load(std::memory_order_relaxed);
  return (mode == kAmxOn || (mode == kAmxAuto && j.M >= kAmxMinRows)) && amx_permitted();
}

}  // namespace
