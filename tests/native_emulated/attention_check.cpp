// The native attention's int8 kernels against a double-precision softmax over the dequantized rows,
// built over tests/native_emulated/immintrin.h (SIMDe) with the AVX-512/VNNI macros defined: run by
// tests/test_native_attention_vnni.py. Each case prints the largest |error| over the largest |output|
// of the kernel attention() dispatches to (attend_part_vnni) and of attend_part_avx512<C, kKvInt8>
// (fp32 products over widened rows); exits 1 when a case's first exceeds the bound (argv[1]).
#if !defined(__AVX512VNNI__) || !defined(__AVX512BW__)
#error "build with -D__AVX512F__ -D__AVX512BW__ -D__AVX512VNNI__ over the emulated immintrin.h"
#endif
#include <immintrin.h>
#include <omp.h>
#include <cassert>
#include <cstdint>
#include <cstdio>
#include <vector>
#include <algorithm>
#include <cstdlib>
#include <random>
#include "native_numbers.h"
namespace {  // the fields native_attention.h reads, as native.cpp declares them
struct PmModel { int64_t n_heads, n_kv_heads, head_dim, bf16, threads; const int64_t *block_table; int64_t block_size, block_shift, max_blocks; int64_t kv_int8; };
struct PmLayer { void *k_cache, *v_cache; float *k_scales, *v_scales; };
struct Workspace { float *qkv, *att, *attn_scratch; };
inline int64_t cache_row(const PmModel &m, const int64_t *blocks, int64_t h, int64_t p) {
  const int64_t bs = m.block_size;
  const int64_t block = m.block_shift >= 0 ? p >> m.block_shift : p / bs;
  const int64_t row = m.block_shift >= 0 ? p & (bs - 1) : p % bs;
  return ((blocks[block] * m.n_kv_heads + h) * bs + row) * m.head_dim;
}
}
#include "native_attention.h"

template <int C>
void old_kernel(const PmModel &m, const PmLayer &L, const float *qkv, const int64_t *slot, const int64_t *pos, int64_t B, float *att) {
  const int64_t H = m.n_heads, Hkv = m.n_kv_heads, Dh = m.head_dim, G = H / Hkv, width = (H + 2 * Hkv) * Dh;
  std::vector<float> scratch(tile_floats(m) + 64), part(part_floats(m));
  for (int64_t r = 0; r < B; ++r)
    for (int64_t h = 0; h < Hkv; ++h) {
      attend_part_avx512<C, kKvInt8>(m, L, qkv + r * width + h * G * Dh, m.block_table + slot[r] * m.max_blocks, h, 0,
                                     pos[r] + 1, 1.0f / std::sqrt(float(Dh)), scratch.data(), part.data());
      merge_parts(m, part.data(), 1, att + (r * Hkv + h) * G * Dh);
    }
}

// One step of rows (slot[r], pos[r]) over a cache of scattered blocks of random int8 rows (keys 4x
// the values' spread: a peaked softmax, as tests/test_kv_cache_int8.py fills it).
template <int C>
int run_case(int64_t H, int64_t Hkv, int64_t bs, std::vector<int64_t> slot, std::vector<int64_t> pos, int threads, double bound) {
  const int64_t Dh = 16 * C, G = H / Hkv, B = int64_t(pos.size()), slots = 4;
  int64_t max_len = 0;
  for (int64_t p : pos) max_len = std::max(max_len, p + 1);
  const int64_t max_blocks = (max_len + bs - 1) / bs, num_blocks = slots * max_blocks;
  std::mt19937 rng(int(Dh * 7 + H * 3 + bs + B));
  std::normal_distribution<float> normal;
  std::vector<int64_t> table(num_blocks);
  for (int64_t i = 0; i < num_blocks; ++i) table[i] = i;
  std::shuffle(table.begin(), table.end(), rng);
  std::vector<int8_t> kc(num_blocks * Hkv * bs * Dh), vc(kc.size());
  std::vector<float> ks(kc.size() / Dh), vs(ks.size()), row(Dh);
  for (int64_t i = 0; i < int64_t(ks.size()); ++i) {
    for (auto &x : row) x = 4.0f * normal(rng);
    quantize_row(row.data(), Dh, kc.data() + i * Dh, &ks[i]);
    for (auto &x : row) x = normal(rng);
    quantize_row(row.data(), Dh, vc.data() + i * Dh, &vs[i]);
  }
  int shift = -1;
  for (int b = 0; b < 20; ++b) if ((int64_t(1) << b) == bs) shift = b;
  PmModel m{H, Hkv, Dh, 0, threads, table.data(), bs, shift, max_blocks, 1};
  PmLayer L{kc.data(), vc.data(), ks.data(), vs.data()};
  const int64_t width = (H + 2 * Hkv) * Dh;
  std::vector<float> qkv(B * width), att(B * H * Dh), old(att.size());
  for (auto &x : qkv) x = normal(rng);
  std::vector<float> scratch(attention_scratch_floats(m, B) + 64);
  Workspace w{qkv.data(), att.data(), scratch.data()};
  attention(m, L, w, slot.data(), pos.data(), B);
  old_kernel<C>(m, L, qkv.data(), slot.data(), pos.data(), B, old.data());
  double top = 0, err = 0, err_old = 0;
  for (int64_t r = 0; r < B; ++r)
    for (int64_t hq = 0; hq < H; ++hq) {
      const int64_t h = hq / G;
      const float *q = qkv.data() + r * width + hq * Dh;
      const int64_t *blocks = table.data() + slot[r] * max_blocks;
      std::vector<double> s(pos[r] + 1), o(Dh, 0.0);
      double mx = -1e300, sum = 0;
      for (int64_t p = 0; p <= pos[r]; ++p) {
        const int64_t at = cache_row(m, blocks, h, p);
        double d = 0;
        for (int64_t i = 0; i < Dh; ++i) d += double(q[i]) * kc[at + i] * ks[at / Dh];
        s[p] = d / std::sqrt(double(Dh)), mx = std::max(mx, s[p]);
      }
      for (int64_t p = 0; p <= pos[r]; ++p) {
        const int64_t at = cache_row(m, blocks, h, p);
        const double e = std::exp(s[p] - mx);
        sum += e;
        for (int64_t i = 0; i < Dh; ++i) o[i] += e * vc[at + i] * vs[at / Dh];
      }
      for (int64_t i = 0; i < Dh; ++i) {
        const double ref = o[i] / sum;
        top = std::max(top, std::fabs(ref));
        err = std::max(err, std::fabs(att[(r * H + hq) * Dh + i] - ref));
        err_old = std::max(err_old, std::fabs(old[(r * H + hq) * Dh + i] - ref));
      }
    }
  const bool ok = err <= bound * top;
  std::printf("%s Dh %3lld H %2lld Hkv %lld block %2lld rows %2lld: error %.2e, fp32 kernel %.2e (of max %.3f)\n",
              ok ? "ok  " : "FAIL", (long long)Dh, (long long)H, (long long)Hkv, (long long)bs, (long long)B,
              err / top, err_old / top, top);
  return ok ? 0 : 1;
}

int main(int argc, char **argv) {
  const double bound = argc > 1 ? std::atof(argv[1]) : 1e-4;
  int bad = 0;
  const std::vector<int64_t> decode_slots{0, 1, 2, 3}, decode_pos{0, 16, 300, 1499};
  // a prefill chunk of slot 2 (positions 40..47) among decode rows of slots 0 and 3
  const std::vector<int64_t> chunk_slots{0, 2, 2, 2, 2, 2, 2, 2, 2, 3}, chunk_pos{999, 40, 41, 42, 43, 44, 45, 46, 47, 14};
  bad += run_case<4>(8, 2, 16, decode_slots, decode_pos, 2, bound);
  bad += run_case<4>(8, 2, 24, decode_slots, decode_pos, 2, bound);
  bad += run_case<4>(8, 2, 16, chunk_slots, chunk_pos, 2, bound);
  bad += run_case<4>(4, 4, 16, decode_slots, decode_pos, 1, bound);
  bad += run_case<1>(4, 2, 16, decode_slots, decode_pos, 2, bound);
  bad += run_case<2>(8, 1, 32, decode_slots, decode_pos, 2, bound);
  bad += run_case<3>(6, 2, 16, chunk_slots, chunk_pos, 2, bound);
  bad += run_case<5>(4, 1, 24, decode_slots, decode_pos, 2, bound);
  bad += run_case<6>(2, 2, 16, decode_slots, decode_pos, 2, bound);
  bad += run_case<8>(8, 2, 16, decode_slots, decode_pos, 2, bound);
  bad += run_case<8>(16, 2, 24, chunk_slots, chunk_pos, 2, bound);
  return bad;
}
