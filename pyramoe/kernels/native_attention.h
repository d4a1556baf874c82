// Attention of the native step (see native.cpp): each row's query heads over its slot's cached
// keys [0, pos], read through the paged block table as they are stored (bf16, fp32, or int8 rows
// with one fp32 scale each: a row is widened to fp32 and multiplied by its scale where it is read;
// on CPUs with AVX512-VNNI the int8 keys are multiplied as integers, see attend_part_vnni).
//
// Why this shape: the two-pass kernel before it (all scores, then the softmax, then the values)
// reduced every key's dot product horizontally and kept a row's scores in a buffer as long as the
// context; a batch-16 step at ~1K positions spent ~3.5 ms in it against ~6 ms for the whole
// short-context step. Here keys come in tiles of 16: a query head's 16 dot products end in one
// 16-lane vector (one transposing reduction per tile instead of 16 horizontal sums), the softmax is
// online (a running max and sum per query head; the output is rescaled when the max grows past a
// slack), so nothing but the reads grows with the context. Each key/value row is widened once for all
// the query heads that share it (GQA), and the next tile's rows are prefetched. Rows with many keys are split into parts over the
// threads (flash-decoding): each part keeps its (max, sum, unnormalised output) and a row's parts
// merge after, so a batch-1 step at 4K positions uses every thread.
//
// Included once, by native.cpp, after PmModel, PmLayer, Workspace and cache_row.
#pragma once

namespace {

constexpr int64_t kKeyTile = 16;        // keys scored together: one 16-lane vector per query head
constexpr int64_t kMinPartKeys = 256;   // fewest keys in a part of a split row: a merge costs about a tile
constexpr int64_t kPartsPerThread = 4;  // parts per thread a step aims for: rows differ in length

inline int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

// How the cache stores a row: the template argument of the kernels.
enum KvKind : int { kKvF32 = 0, kKvBf16 = 1, kKvInt8 = 2 };
inline KvKind kv_kind(const PmModel &m) { return m.kv_int8 ? kKvInt8 : m.bf16 ? kKvBf16 : kKvF32; }

// x[0, n) as int8 and a scale: scale = max|x| / 127, q = x / scale rounded half to even (what
// quantize_rows in pyramoe/inference/kv_cache.py computes, so both steps store the same rows).
inline void quantize_row(const float *x, int64_t n, int8_t *q, float *scale) {
  float top = 0.0f;
  for (int64_t d = 0; d < n; ++d) top = std::max(top, std::fabs(x[d]));
  const float s = top / 127.0f, divisor = s > 0.0f ? s : 1.0f;
  *scale = s;
  for (int64_t d = 0; d < n; ++d) q[d] = int8_t(std::min(127.0f, std::max(-127.0f, std::nearbyint(x[d] / divisor))));
}

// One part's result, per query head: the unnormalised output [G, Dh], then the running max [G] and sum [G].
inline int64_t part_floats(const PmModel &m) {
  return round16((m.n_heads / m.n_kv_heads) * (m.head_dim + 2));
}

// A thread's scratch: the tile's keys and values in fp32 (the AVX512 kernel widens values in
// registers), the G heads' probabilities for the tile, the scaled queries, the G heads' 16-lane sums.
// The VNNI kernel (int8 cache) takes less: the probabilities, the sums, a scale, 3 correction
// words and 3 bytes per query dim per head.
inline int64_t tile_floats(const PmModel &m) {
  const int64_t G = m.n_heads / m.n_kv_heads, Dh = m.head_dim;
  return round16(2 * kKeyTile * Dh + G * kKeyTile + G * Dh + G * 16);
}

// Parts of a step of B rows: each (row, key/value head) is split into ceil(keys / part keys)
// parts, at most B * Hkv + kPartsPerThread * threads in all (see attention()).
inline int64_t max_parts(const PmModel &m, int64_t B) { return B * m.n_kv_heads + kPartsPerThread * m.threads; }

// The workspace's attention scratch in floats (parts, then one tile scratch per thread).
int64_t attention_scratch_floats(const PmModel &m, int64_t B) {
  return max_parts(m, B) * part_floats(m) + m.threads * tile_floats(m);
}

struct AttentionPart {
  int64_t row, head, first, end;  // keys [first, end) of row `row`'s key/value head `head`
};

// The cached row at `at` in fp32: in place for an fp32 cache, else converted into `dst` (int8 rows
// times their scale, scales[at / Dh]).
inline const float *row_f32(const void *cache, const float *scales, int64_t at, int64_t Dh, KvKind kind, float *dst) {
  if (kind == kKvF32) return static_cast<const float *>(cache) + at;
  if (kind == kKvInt8) {
    const int8_t *src = static_cast<const int8_t *>(cache) + at;
    const float scale = scales[at / Dh];
    for (int64_t d = 0; d < Dh; ++d) dst[d] = float(src[d]) * scale;
    return dst;
  }
  const uint16_t *src = static_cast<const uint16_t *>(cache) + at;
  int64_t d = 0;
#if defined(__AVX512F__)
  for (; d + 16 <= Dh; d += 16) {
    const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(src + d));
    _mm512_storeu_ps(dst + d, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16)));
  }
#endif
  for (; d < Dh; ++d) dst[d] = bf16_to_f32(src[d]);
  return dst;
}

// Rows first..first+n-1 of head h of `cache` (n <= kKeyTile) as fp32 row pointers; the pointers past
// n repeat the last row (scored, then masked out, so a short tile needs no branch in its products).
inline void tile_rows(const PmModel &m, const void *cache, const float *scales, const int64_t *blocks, int64_t h,
                      int64_t first, int64_t n, float *scratch, const float **rows) {
  const int64_t Dh = m.head_dim;
  for (int64_t k = 0; k < n; ++k)
    rows[k] = row_f32(cache, scales, cache_row(m, blocks, h, first + k), Dh, kv_kind(m), scratch + k * Dh);
  for (int64_t k = n; k < kKeyTile; ++k) rows[k] = rows[n - 1];
}

// The running max, sum and output of one query head take a tile's scores: returns the factor the
// earlier output and sum are scaled by (1 where the max did not grow); the caller scales the output.
inline float raise_max(float *run_max, float *run_sum, float tile_max) {
  if (!(tile_max > *run_max)) return 1.0f;
  const float factor = std::exp(*run_max - tile_max);  // exp(-inf) = 0 at the first tile
  *run_max = tile_max;
  *run_sum *= factor;
  return factor;
}

#if defined(__AVX512F__)
// r[k] = the sum of v[k]'s 16 lanes, for 16 vectors: unpacks within 128-bit lanes, then lane
// shuffles (45 instructions against ~8 per horizontal sum).
inline __m512 sum_lanes16(const __m512 *v) {
  __m512 pairs[8], quads[4];
  for (int i = 0; i < 8; ++i)  // lane j of 128 bits: [v0(0+2), v1(0+2), v0(1+3), v1(1+3)]
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // lane j: [v0, v1, v2, v3] summed over lane j
    const __m512d a = _mm512_castps_pd(pairs[2 * i]), b = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  __m512 halves[2];
  for (int i = 0; i < 2; ++i)  // [q0 lanes 0+1, q0 lanes 2+3, q1 lanes 0+1, q1 lanes 2+3]
    halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                              _mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(halves[0], halves[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(halves[0], halves[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// Above this much over a query head's running max a tile's scores raise it (and rescale the output):
// exp(score - max) <= e^8 keeps a part's sums far from overflow, and most tiles of a long row then
// take no horizontal max, no scalar exp and no rescale (the max settles within a few tiles).
constexpr float kMaxSlack = 8.0f;
// A weight below exp(-64) of the max's (under 1e-27 of the sum, which holds the max's weight, >= 1) is 0.
constexpr float kNegligible = -64.0f;

// A cached row as C 16-lane fp32 vectors. bf16 rows come in "paired" order: a 32-bit lane holds two
// neighbouring dims, so shifting it up gives the even dim and masking it the odd one (two instructions
// per 32 dims, no widening shuffle); vector 2i holds dims 32i, 32i+2, ..., vector 2i+1 dims 32i+1, ...,
// an odd C's last vector its 16 dims in order. fp32 and int8 rows are in order; int8 rows come
// unscaled (the kernel applies a tile's 16 scales to its scores and weights: one multiply per tile
// and query head instead of C per row).
template <int C, KvKind KV>
inline void load_row(const void *cache, int64_t at, __m512 *v) {
  if constexpr (KV == kKvInt8) {
    const int8_t *src = static_cast<const int8_t *>(cache) + at;
    for (int c = 0; c < C; ++c)
      v[c] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(src + 16 * c))));
  } else if constexpr (KV == kKvBf16) {
    const uint16_t *src = static_cast<const uint16_t *>(cache) + at;
    const __m512i odd = _mm512_set1_epi32(int(0xffff0000u));
    for (int c = 0; c + 1 < C; c += 2) {
      const __m512i x = _mm512_loadu_si512(src + 16 * c);
      v[c] = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
      v[c + 1] = _mm512_castsi512_ps(_mm512_and_si512(x, odd));
    }
    if constexpr (C % 2 == 1) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(src + 16 * (C - 1)));
      v[C - 1] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16));
    }
  } else {
    const float *src = static_cast<const float *>(cache) + at;
    for (int c = 0; c < C; ++c) v[c] = _mm512_loadu_ps(src + 16 * c);
  }
}

// The head dim that lane j of load_row's vector c holds.
template <int C, KvKind KV>
constexpr int64_t row_dim(int c, int j) {
  return KV != kKvBf16 || (C % 2 == 1 && c == C - 1) ? 16 * c + j : 32 * (c / 2) + 2 * j + c % 2;
}

// Every 64-byte line of a tile's n key and value rows (offsets `at`), asked for ahead of their use:
// the paged cache's 16-row blocks of one head are 2 KB pieces that the hardware prefetcher, which
// stops at 4 KB pages, mostly reaches too late.
inline void prefetch_rows(const PmLayer &L, const int64_t *at, int64_t n, int64_t row_bytes, int64_t elem,
                          int64_t Dh) {
  if (L.k_scales != nullptr && n > 0) {  // int8: the tile's scales, a line or two of each
    for (const int64_t k : {int64_t(0), n - 1}) {
      _mm_prefetch(reinterpret_cast<const char *>(L.k_scales + at[k] / Dh), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char *>(L.v_scales + at[k] / Dh), _MM_HINT_T0);
    }
  }
  for (int64_t k = 0; k < n; ++k) {
    const char *kr = static_cast<const char *>(L.k_cache) + at[k] * elem;
    const char *vr = static_cast<const char *>(L.v_cache) + at[k] * elem;
    for (int64_t b = 0; b < row_bytes; b += 64) {
      _mm_prefetch(kr + b, _MM_HINT_T0);
      _mm_prefetch(vr + b, _MM_HINT_T0);
    }
  }
}

// out[g] += sum over the tile's n keys of probs[g][k] * value row k, for G query heads; each value row is
// widened in registers once per kHeadsAtOnce heads, whose outputs stay in registers over the tile.
template <int C, KvKind KV>
inline void accumulate_values(const PmLayer &L, const int64_t *at, int64_t n, const float *probs, int64_t G,
                              float *out) {
  constexpr int64_t Dh = 16 * C;
  constexpr int64_t kHeadsAtOnce = C >= 8 ? 2 : 16 / C;  // their outputs (and a value row) fit the 32 registers
  for (int64_t g0 = 0; g0 < G; g0 += kHeadsAtOnce) {
    const int64_t heads = std::min<int64_t>(kHeadsAtOnce, G - g0);
    __m512 acc[kHeadsAtOnce][C];
    for (int64_t i = 0; i < heads; ++i)
      for (int c = 0; c < C; ++c) acc[i][c] = _mm512_loadu_ps(out + (g0 + i) * Dh + 16 * c);
    for (int64_t k = 0; k < n; ++k) {
      __m512 v[C];
      load_row<C, KV>(L.v_cache, at[k], v);
      for (int64_t i = 0; i < heads; ++i) {
        const __m512 w = _mm512_set1_ps(probs[(g0 + i) * kKeyTile + k]);
        for (int c = 0; c < C; ++c) acc[i][c] = _mm512_fmadd_ps(w, v[c], acc[i][c]);
      }
    }
    for (int64_t i = 0; i < heads; ++i)
      for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + (g0 + i) * Dh + 16 * c, acc[i][c]);
  }
}

// Keys [first, end) of head h for its G query heads, head width 16 C: the part's (output, max, sum).
// Per tile of 16 keys: each key row is read and widened once for all G query heads (into `keys`, in
// load_row's order; the scaled queries are permuted to match and the output back at the end); a
// query head's 16 dot products end in one vector (sum_lanes16); the running sums stay 16-lane
// vectors; the max moves only past kMaxSlack; each value row is widened in registers once per
// kHeadsAtOnce query heads, whose outputs stay in registers over the tile.
template <int C, KvKind KV>
void attend_part_avx512(const PmModel &m, const PmLayer &L, const float *q, const int64_t *blocks, int64_t h,
                        int64_t first, int64_t end, float scale, float *scratch, float *part) {
  constexpr int64_t Dh = 16 * C, elem = KV == kKvBf16 ? 2 : KV == kKvInt8 ? 1 : 4;
  const int64_t G = m.n_heads / m.n_kv_heads;
  float *keys = scratch, *values = keys + kKeyTile * Dh, *probs = values + kKeyTile * Dh, *qs = probs + G * kKeyTile;
  float *out = part, *run_max = part + G * Dh, *run_sum = run_max + G;
  for (int64_t g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c)
      for (int j = 0; j < 16; ++j) qs[g * Dh + 16 * c + j] = q[g * Dh + row_dim<C, KV>(c, j)] * scale;
  for (int64_t i = 0; i < G * Dh; ++i) out[i] = 0.0f;
  float *sums = qs + G * Dh;  // per query head, 16 lanes: its sum is their total
  for (int64_t g = 0; g < G; ++g) run_max[g] = -INFINITY, _mm512_storeu_ps(sums + 16 * g, _mm512_setzero_ps());
  int64_t at[kKeyTile], ahead[kKeyTile];
  assert(first % kKeyTile == 0);
  const bool one_block = m.block_shift >= 0 && m.block_size % kKeyTile == 0;
  auto offsets = [&](int64_t t, int64_t *dst) {
    const int64_t n = std::min(kKeyTile, end - t);
    if (one_block) {  // tiles start at multiples of 16: a tile lies in one block of 16 * 2^i rows
      const int64_t at0 = cache_row(m, blocks, h, t);
      for (int64_t k = 0; k < n; ++k) dst[k] = at0 + k * Dh;
    } else {
      for (int64_t k = 0; k < n; ++k) dst[k] = cache_row(m, blocks, h, t + k);
    }
    return n;
  };
  int64_t n = offsets(first, at);
  prefetch_rows(L, at, n, Dh * elem, elem, Dh);
  for (int64_t t = first; t < end; t += kKeyTile) {
    const int64_t next = t + kKeyTile < end ? offsets(t + kKeyTile, ahead) : 0;
    prefetch_rows(L, ahead, next, Dh * elem, elem, Dh);
    const __mmask16 valid = __mmask16((1u << n) - 1);
    __m512 key_scales = _mm512_setzero_ps(), value_scales = _mm512_setzero_ps();
    if constexpr (KV == kKvInt8) {  // the tile's rows' scales (past n: the last row's, masked out)
      alignas(64) float ks[kKeyTile], vs[kKeyTile];
      for (int64_t k = 0; k < kKeyTile; ++k) {
        const int64_t row = at[std::min(k, n - 1)] / Dh;
        ks[k] = L.k_scales[row], vs[k] = L.v_scales[row];
      }
      key_scales = _mm512_load_ps(ks), value_scales = _mm512_load_ps(vs);
    }
    for (int64_t k = 0; k < kKeyTile; ++k) {  // keys past n repeat the last (scored, then masked out)
      __m512 v[C];
      load_row<C, KV>(L.k_cache, at[std::min(k, n - 1)], v);
      for (int c = 0; c < C; ++c) _mm512_storeu_ps(keys + k * Dh + 16 * c, v[c]);
    }
    for (int64_t g = 0; g < G; ++g) {
      __m512 dots[kKeyTile];
      const __m512 q0 = _mm512_loadu_ps(qs + g * Dh);
      for (int k = 0; k < kKeyTile; ++k) dots[k] = _mm512_mul_ps(q0, _mm512_loadu_ps(keys + k * Dh));
      for (int c = 1; c < C; ++c) {
        const __m512 qc = _mm512_loadu_ps(qs + g * Dh + 16 * c);
        for (int k = 0; k < kKeyTile; ++k) dots[k] = _mm512_fmadd_ps(qc, _mm512_loadu_ps(keys + k * Dh + 16 * c), dots[k]);
      }
      __m512 scores = sum_lanes16(dots);
      if constexpr (KV == kKvInt8) scores = _mm512_mul_ps(scores, key_scales);
      __m512 top = _mm512_set1_ps(run_max[g]);
      if (_mm512_mask_cmp_ps_mask(valid, scores, _mm512_add_ps(top, _mm512_set1_ps(kMaxSlack)), _CMP_GT_OQ)) {
        const float raised = std::max(run_max[g], _mm512_mask_reduce_max_ps(valid, scores));
        const float factor = std::exp(run_max[g] - raised);  // exp(-inf) = 0 at the first tile
        run_max[g] = raised;
        top = _mm512_set1_ps(raised);
        _mm512_storeu_ps(sums + 16 * g, _mm512_mul_ps(_mm512_loadu_ps(sums + 16 * g), _mm512_set1_ps(factor)));
        for (int c = 0; c < C; ++c)
          _mm512_storeu_ps(out + g * Dh + 16 * c, _mm512_mul_ps(_mm512_loadu_ps(out + g * Dh + 16 * c), _mm512_set1_ps(factor)));
      }
      // Far below the max a weight is 0 rather than exp16's floor (~1e-38): its products would be
      // denormals, a microcode assist each (rows whose scores spread over ~90 ran 10x slower).
      const __m512 x = _mm512_sub_ps(scores, top);
      const __mmask16 live = _mm512_mask_cmp_ps_mask(valid, x, _mm512_set1_ps(kNegligible), _CMP_GT_OQ);
      const __m512 p = _mm512_maskz_mov_ps(live, exp16(x));
      _mm512_storeu_ps(sums + 16 * g, _mm512_add_ps(_mm512_loadu_ps(sums + 16 * g), p));
      // int8: the weights carry the value rows' scales (the sum does not).
      _mm512_storeu_ps(probs + g * kKeyTile, KV == kKvInt8 ? _mm512_mul_ps(p, value_scales) : p);
    }
    accumulate_values<C, KV>(L, at, n, probs, G, out);
    n = next;
    std::copy(ahead, ahead + next, at);
  }
  for (int64_t g = 0; g < G; ++g) run_sum[g] = _mm512_reduce_add_ps(_mm512_loadu_ps(sums + 16 * g));
  if constexpr (KV == kKvBf16) {  // the output back to dim order (through `keys`, free now)
    for (int64_t g = 0; g < G; ++g) {
      for (int c = 0; c < C; ++c)
        for (int j = 0; j < 16; ++j) keys[row_dim<C, KV>(c, j)] = out[g * Dh + 16 * c + j];
      std::copy(keys, keys + Dh, out + g * Dh);
    }
  }
}
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// int8 cache, VNNI: the scores as integer dot products (vpdpbusd, 64 byte products into 16 int32
// lanes per instruction) over the key rows as stored, the values as in attend_part_avx512 (fp32
// weights times widened rows). Each query head is quantized once per part to kQueryBytes signed
// bytes per dim (24 bits, one scale: q = sum of byte b 256^b); keys are made unsigned (k + 128, an
// XOR: exact), and each byte plane's 128 sum(q_b) is subtracted, so a plane's int32 sum is k . q_b
// exactly. A score then differs from the fp32 kernel's by the query's rounding, about
// max|q| / 2^24 per dim at most (fp32's own rounding is 2^-24 of each product): the tests' 2e-5 agreement
// with the PyTorch step, which scores with fp32 queries, still holds. Fewer bytes take fewer
// products (one: a third), but a score then moves by up to about max|q| / 2^(8 bytes) per dim: with
// 16-bit queries (and 16-bit softmax weights) tests/test_kv_cache_int8.py's logits left the PyTorch
// step's by 2.2e-5 at head width 64, past its 2e-5 (run over the emulation in tests/native_emulated).
constexpr int kQueryBytes = 3;

// Bytes 16 c .. 16 c + 15 of the 16 rows: 4 vectors whose lane k holds row k's 4 bytes 16 c + 4 i ..,
// as unsigned (+128). Lanes of 128 bits carry rows k, k + 4, k + 8, k + 12; a 4 x 4 transpose of
// 32-bit words within each lane puts row 4 l + a's word i at lane 4 l + a of vector i.
inline void keys_transposed(const int8_t *const *rows, int c, __m512i *kt) {
  __m512i a[4];
  for (int i = 0; i < 4; ++i) {
    __m512i v = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i *>(rows[i] + 16 * c)));
    v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i *>(rows[i + 4] + 16 * c)), 1);
    v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i *>(rows[i + 8] + 16 * c)), 2);
    a[i] = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i *>(rows[i + 12] + 16 * c)), 3);
  }
  const __m512i t0 = _mm512_unpacklo_epi32(a[0], a[1]), t1 = _mm512_unpackhi_epi32(a[0], a[1]);
  const __m512i t2 = _mm512_unpacklo_epi32(a[2], a[3]), t3 = _mm512_unpackhi_epi32(a[2], a[3]);
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  kt[0] = _mm512_xor_si512(_mm512_unpacklo_epi64(t0, t2), flip);
  kt[1] = _mm512_xor_si512(_mm512_unpackhi_epi64(t0, t2), flip);
  kt[2] = _mm512_xor_si512(_mm512_unpacklo_epi64(t1, t3), flip);
  kt[3] = _mm512_xor_si512(_mm512_unpackhi_epi64(t1, t3), flip);
}

// attend_part_avx512<C, kKvInt8> with the scores above: the same tiles, online softmax, slack and
// value loop; no key row is widened and no tile needs sum_lanes16 (a tile's lanes are its keys).
template <int C>
void attend_part_vnni(const PmModel &m, const PmLayer &L, const float *q, const int64_t *blocks, int64_t h,
                      int64_t first, int64_t end, float scale, float *scratch, float *part) {
  constexpr int64_t Dh = 16 * C;
  constexpr int32_t kQMax = 127 << (8 * (kQueryBytes - 1));  // the top byte stays in [-127, 127]
  const int64_t G = m.n_heads / m.n_kv_heads;
  float *probs = scratch, *sums = probs + G * kKeyTile;  // [G][16] each
  float *qscale = sums + G * 16;                         // [G]
  int32_t *qcorr = reinterpret_cast<int32_t *>(qscale + G);              // [G][kQueryBytes]
  int8_t *qbytes = reinterpret_cast<int8_t *>(qcorr + kQueryBytes * G);  // [G][kQueryBytes][Dh]
  float *out = part, *run_max = part + G * Dh, *run_sum = run_max + G;
  for (int64_t g = 0; g < G; ++g) {
    const float *qg = q + g * Dh;
    float top = 0.0f;
    for (int64_t d = 0; d < Dh; ++d) top = std::max(top, std::fabs(qg[d]));
    const float s = top / float(kQMax), inv = s > 0.0f ? 1.0f / s : 0.0f;
    int32_t totals[kQueryBytes] = {};
    for (int64_t d = 0; d < Dh; ++d) {
      int32_t v = std::min(kQMax, std::max(-kQMax, int32_t(std::nearbyint(qg[d] * inv))));
      for (int b = 0; b < kQueryBytes; ++b) {  // each byte in [-128, 127], the last in [-127, 127]
        const int32_t low = b + 1 < kQueryBytes ? ((v + 128) & 255) - 128 : v;
        qbytes[(g * kQueryBytes + b) * Dh + d] = int8_t(low), totals[b] += low;
        v = (v - low) / 256;
      }
    }
    qscale[g] = s * scale;
    for (int b = 0; b < kQueryBytes; ++b) qcorr[g * kQueryBytes + b] = 128 * totals[b];
    run_max[g] = -INFINITY;
    _mm512_storeu_ps(sums + 16 * g, _mm512_setzero_ps());
    for (int64_t d = 0; d < Dh; ++d) out[g * Dh + d] = 0.0f;
  }
  int64_t at[kKeyTile], ahead[kKeyTile];
  assert(first % kKeyTile == 0);
  const bool one_block = m.block_shift >= 0 && m.block_size % kKeyTile == 0;
  auto offsets = [&](int64_t t, int64_t *dst) {
    const int64_t n = std::min(kKeyTile, end - t);
    if (one_block) {
      const int64_t at0 = cache_row(m, blocks, h, t);
      for (int64_t k = 0; k < n; ++k) dst[k] = at0 + k * Dh;
    } else {
      for (int64_t k = 0; k < n; ++k) dst[k] = cache_row(m, blocks, h, t + k);
    }
    return n;
  };
  const int8_t *kc = static_cast<const int8_t *>(L.k_cache);
  int64_t n = offsets(first, at);
  prefetch_rows(L, at, n, Dh, 1, Dh);
  for (int64_t t = first; t < end; t += kKeyTile) {
    const int64_t next = t + kKeyTile < end ? offsets(t + kKeyTile, ahead) : 0;
    prefetch_rows(L, ahead, next, Dh, 1, Dh);
    const __mmask16 valid = __mmask16((1u << n) - 1);
    const int8_t *rows[kKeyTile];  // past n: the last row (scored, then masked out)
    __m512 key_scales, value_scales;
    if (one_block && n == kKeyTile) {  // 16 rows in a row, and their scales (a gather otherwise)
      for (int64_t k = 0; k < kKeyTile; ++k) rows[k] = kc + at[0] + k * Dh;
      key_scales = _mm512_loadu_ps(L.k_scales + at[0] / Dh), value_scales = _mm512_loadu_ps(L.v_scales + at[0] / Dh);
    } else {
      alignas(64) float ks[kKeyTile], vs[kKeyTile];
      for (int64_t k = 0; k < kKeyTile; ++k) {
        const int64_t a = at[std::min(k, n - 1)];
        rows[k] = kc + a, ks[k] = L.k_scales[a / Dh], vs[k] = L.v_scales[a / Dh];
      }
      key_scales = _mm512_load_ps(ks), value_scales = _mm512_load_ps(vs);
    }
    __m512i kt[4 * C];
    for (int c = 0; c < C; ++c) keys_transposed(rows, c, kt + 4 * c);
    for (int64_t g = 0; g < G; ++g) {
      __m512i acc[kQueryBytes][2];  // two chains per plane
      for (int b = 0; b < kQueryBytes; ++b) acc[b][0] = acc[b][1] = _mm512_setzero_si512();
      for (int i = 0; i < 4 * C; ++i)
        for (int b = 0; b < kQueryBytes; ++b) {
          int32_t word;
          std::memcpy(&word, qbytes + (g * kQueryBytes + b) * Dh + 4 * i, 4);
          acc[b][i % 2] = _mm512_dpbusd_epi32(acc[b][i % 2], kt[i], _mm512_set1_epi32(word));
        }
      // Planes from the top: |k . q_b| < 2^22 (head width 128), so each is exact in fp32 and so is
      // its product by 256^b; only the sum rounds.
      __m512 dots = _mm512_setzero_ps();
      for (int b = kQueryBytes - 1; b >= 0; --b) {
        const __m512i plane = _mm512_sub_epi32(_mm512_add_epi32(acc[b][0], acc[b][1]),
                                               _mm512_set1_epi32(qcorr[g * kQueryBytes + b]));
        dots = _mm512_fmadd_ps(dots, _mm512_set1_ps(256.0f), _mm512_cvtepi32_ps(plane));
      }
      const __m512 scores = _mm512_mul_ps(dots, _mm512_mul_ps(_mm512_set1_ps(qscale[g]), key_scales));
      __m512 top = _mm512_set1_ps(run_max[g]);
      if (_mm512_mask_cmp_ps_mask(valid, scores, _mm512_add_ps(top, _mm512_set1_ps(kMaxSlack)), _CMP_GT_OQ)) {
        const float raised = std::max(run_max[g], _mm512_mask_reduce_max_ps(valid, scores));
        const __m512 factor = _mm512_set1_ps(std::exp(run_max[g] - raised));  // exp(-inf) = 0 at the first tile
        run_max[g] = raised;
        top = _mm512_set1_ps(raised);
        _mm512_storeu_ps(sums + 16 * g, _mm512_mul_ps(_mm512_loadu_ps(sums + 16 * g), factor));
        for (int c = 0; c < C; ++c)
          _mm512_storeu_ps(out + g * Dh + 16 * c, _mm512_mul_ps(_mm512_loadu_ps(out + g * Dh + 16 * c), factor));
      }
      const __m512 x = _mm512_sub_ps(scores, top);
      const __mmask16 live = _mm512_mask_cmp_ps_mask(valid, x, _mm512_set1_ps(kNegligible), _CMP_GT_OQ);
      const __m512 p = _mm512_maskz_mov_ps(live, exp16(x));
      _mm512_storeu_ps(sums + 16 * g, _mm512_add_ps(_mm512_loadu_ps(sums + 16 * g), p));
      _mm512_storeu_ps(probs + g * kKeyTile, _mm512_mul_ps(p, value_scales));  // the weights carry the value scales
    }
    accumulate_values<C, kKvInt8>(L, at, n, probs, G, out);
    n = next;
    std::copy(ahead, ahead + next, at);
  }
  for (int64_t g = 0; g < G; ++g) run_sum[g] = _mm512_reduce_add_ps(_mm512_loadu_ps(sums + 16 * g));
}
#endif

// The same for any head width, plain loops (CPUs without AVX512, widths not a multiple of 16).
void attend_part_portable(const PmModel &m, const PmLayer &L, const float *q, const int64_t *blocks, int64_t h,
                          int64_t first, int64_t end, float scale, float *scratch, float *part) {
  const int64_t G = m.n_heads / m.n_kv_heads, Dh = m.head_dim;
  float *keys = scratch, *values = keys + kKeyTile * Dh, *probs = values + kKeyTile * Dh, *qs = probs + G * kKeyTile;
  float *out = part, *run_max = part + G * Dh, *run_sum = run_max + G;
  for (int64_t i = 0; i < G * Dh; ++i) qs[i] = q[i] * scale, out[i] = 0.0f;
  for (int64_t g = 0; g < G; ++g) run_max[g] = -INFINITY, run_sum[g] = 0.0f;
  const float *rows[kKeyTile];
  for (int64_t t = first; t < end; t += kKeyTile) {
    const int64_t n = std::min(kKeyTile, end - t);
    tile_rows(m, L.k_cache, L.k_scales, blocks, h, t, n, keys, rows);
    for (int64_t g = 0; g < G; ++g) {
      float *p = probs + g * kKeyTile, tile_max = -INFINITY;
      for (int64_t k = 0; k < n; ++k) tile_max = std::max(tile_max, p[k] = dot(qs + g * Dh, rows[k], Dh));
      const float factor = raise_max(run_max + g, run_sum + g, tile_max);
      if (factor != 1.0f)
        for (int64_t d = 0; d < Dh; ++d) out[g * Dh + d] *= factor;
      run_sum[g] += exp_shifted(p, p, n, run_max[g]);
    }
    tile_rows(m, L.v_cache, L.v_scales, blocks, h, t, n, values, rows);
    for (int64_t g = 0; g < G; ++g) {
      float *o = out + g * Dh;
      for (int64_t k = 0; k < n; ++k) {
        const float p = probs[g * kKeyTile + k], *v = rows[k];
#pragma omp simd
        for (int64_t d = 0; d < Dh; ++d) o[d] += p * v[d];
      }
    }
  }
}

void attend_part(const PmModel &m, const PmLayer &L, const float *q, const int64_t *blocks, int64_t h, int64_t first,
                 int64_t end, float scale, float *scratch, float *part) {
#if defined(__AVX512F__)
#define ARGS m, L, q, blocks, h, first, end, scale, scratch, part
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define INT8_KERNEL(C) attend_part_vnni<C>(ARGS)
#else
#define INT8_KERNEL(C) attend_part_avx512<C, kKvInt8>(ARGS)
#endif
#define KINDS(C)                                                                         \
  (m.kv_int8 ? INT8_KERNEL(C)                                                            \
   : m.bf16  ? attend_part_avx512<C, kKvBf16>(ARGS)                                      \
             : attend_part_avx512<C, kKvF32>(ARGS))
  switch (m.head_dim) {
    case 16: return KINDS(1);
    case 32: return KINDS(2);
    case 48: return KINDS(3);
    case 64: return KINDS(4);
    case 80: return KINDS(5);
    case 96: return KINDS(6);
    case 128: return KINDS(8);
    default: break;
  }
#undef KINDS
#undef INT8_KERNEL
#undef ARGS
#endif
  attend_part_portable(m, L, q, blocks, h, first, end, scale, scratch, part);
}

// The G query heads' outputs [G, Dh] of `count` parts of one (row, key/value head): each part's
// output and sum rescaled to the largest of their maxima, summed, and divided by the total.
void merge_parts(const PmModel &m, const float *parts, int64_t count, float *o) {
  const int64_t G = m.n_heads / m.n_kv_heads, Dh = m.head_dim, stride = part_floats(m);
  for (int64_t g = 0; g < G; ++g) {
    float top = -INFINITY, total = 0.0f;
    for (int64_t i = 0; i < count; ++i) top = std::max(top, parts[i * stride + G * Dh + g]);
    float *og = o + g * Dh;
    for (int64_t d = 0; d < Dh; ++d) og[d] = 0.0f;
    for (int64_t i = 0; i < count; ++i) {
      const float *part = parts + i * stride;
      const float weight = std::exp(part[G * Dh + g] - top);
      total += weight * part[G * Dh + G + g];
      const float *out = part + g * Dh;
#pragma omp simd
      for (int64_t d = 0; d < Dh; ++d) og[d] += weight * out[d];
    }
    const float inv = 1.0f / total;
    for (int64_t d = 0; d < Dh; ++d) og[d] *= inv;
  }
}

// Row r's key and value go to cache slot slot[r] at position pos[r] (all rows first: rows of one
// sequence at consecutive positions, a prefill chunk, then see each other); its queries attend to
// that slot's positions [0, pos[r]].
void attention(const PmModel &m, const PmLayer &L, const Workspace &w, const int64_t *slot, const int64_t *pos,
               int64_t B) {
  const int64_t H = m.n_heads, Hkv = m.n_kv_heads, Dh = m.head_dim, G = H / Hkv;
  const int64_t qkv_width = (H + 2 * Hkv) * Dh;
  const bool bf16 = m.bf16;
  for (int64_t r = 0; r < B; ++r) {
    const float *k = w.qkv + r * qkv_width + H * Dh, *v = k + Hkv * Dh;
    const int64_t *blocks = m.block_table + slot[r] * m.max_blocks;
    for (int64_t h = 0; h < Hkv; ++h) {
      const int64_t at = cache_row(m, blocks, h, pos[r]);
      if (m.kv_int8) {
        quantize_row(k + h * Dh, Dh, static_cast<int8_t *>(L.k_cache) + at, L.k_scales + at / Dh);
        quantize_row(v + h * Dh, Dh, static_cast<int8_t *>(L.v_cache) + at, L.v_scales + at / Dh);
        continue;
      }
      for (int64_t d = 0; d < Dh; ++d) {
        store_f(L.k_cache, at + d, k[h * Dh + d], bf16);
        store_f(L.v_cache, at + d, v[h * Dh + d], bf16);
      }
    }
  }
  // Parts of about equal keys, kPartsPerThread per thread over the step's keys (no fewer than
  // kMinPartKeys each): a long row of a small batch spreads over the threads, a batch of short rows
  // keeps one part per (row, head). Each (row, head) takes ceil(keys / part_keys) <= keys /
  // part_keys + 1 parts, so max_parts() bounds them. Boundaries fall on tiles of 16 keys.
  const int threads = int(m.threads);
  int64_t total_keys = 0;
  for (int64_t r = 0; r < B; ++r) total_keys += (pos[r] + 1) * Hkv;
  const int64_t aim = kPartsPerThread * threads;
  const int64_t part_keys = std::max(kMinPartKeys, (total_keys + aim - 1) / aim);
  std::vector<AttentionPart> parts;
  std::vector<int64_t> first_part(B * Hkv + 1);
  for (int64_t r = 0; r < B; ++r)
    for (int64_t h = 0; h < Hkv; ++h) {
      const int64_t len = pos[r] + 1, count = (len + part_keys - 1) / part_keys;
      first_part[r * Hkv + h] = int64_t(parts.size());
      for (int64_t i = 0; i < count; ++i)
        parts.push_back({r, h, i == 0 ? 0 : len * i / count / kKeyTile * kKeyTile,
                         i + 1 == count ? len : len * (i + 1) / count / kKeyTile * kKeyTile});
    }
  first_part[B * Hkv] = int64_t(parts.size());
  assert(int64_t(parts.size()) <= max_parts(m, B));
  const float scale = 1.0f / std::sqrt(float(Dh));
  const int64_t n_parts = int64_t(parts.size()), stride = part_floats(m);
  float *results = w.attn_scratch, *scratch = results + max_parts(m, B) * stride;
#pragma omp parallel num_threads(threads) if (threads > 1 && n_parts > 1)
  {
    float *mine = scratch + int64_t(omp_get_thread_num()) * tile_floats(m);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n_parts; ++i) {
      const AttentionPart &p = parts[i];
      const float *q = w.qkv + p.row * qkv_width + p.head * G * Dh;  // the G query heads of this key/value head
      attend_part(m, L, q, m.block_table + slot[p.row] * m.max_blocks, p.head, p.first, p.end, scale, mine,
                  results + i * stride);
    }
#pragma omp for schedule(static)
    for (int64_t rh = 0; rh < B * Hkv; ++rh)
      merge_parts(m, results + first_part[rh] * stride, first_part[rh + 1] - first_part[rh],
                  w.att + rh * G * Dh);  // row r's heads h G .. h G + G - 1: [r, H, Dh] with rh = r Hkv + h
  }
}

}  // namespace
