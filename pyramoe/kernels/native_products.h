// Matrix products y[m, n] = x[m, :] . W[n, :] + b[n] for the native kernels (see native.cpp): a
// portable kernel, the AVX512-BF16 kernels for plain [N, K] and blocked bf16 weights, and the
// threads' split of a phase's products. Included once, by native.cpp.
#pragma once

#include "native_numbers.h"

namespace {

// One product of a phase: rows [0, M) of x (fp32, and its bf16 copy for bf16 weights), W [N, K].
struct Job {
  const float *x;
  const uint16_t *xb;
  int64_t M, K, N;
  const void *W;
  const float *bias;
  float *y;  // [M, N]
  bool blocked = false;
};

constexpr int64_t kRowBlock = 16;  // weight rows per unit of work (the threads split these)

inline int64_t padded16(int64_t n) { return (n + 15) / 16 * 16; }

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
  if (j.M <= 16) blocks_with<1, 16>(j, b0, b1);
  else blocks_with<2, 12>(j, b0, b1);
}
#else
constexpr bool kNativeBf16 = false;
void rows_bf16(const Job &j, int64_t n0, int64_t n1) { rows_generic<uint16_t>(j, n0, n1); }
void blocks_bf16(const Job &, int64_t, int64_t) {}  // never called: nothing is blocked without AVX512-BF16
#endif

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
  if (!bf16) rows_generic<float>(j, n0, n1);
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
    if (reads_bf16_x(j, bf16)) {  // the kernels read x as bf16
      rows_to_bf16(j.x, xb_scratch, j.M * j.K);
      j.xb = xb_scratch;
      xb_scratch += j.M * j.K;
    }
    unit_rows[i] = j.blocked ? 128 : kRowBlock;
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
