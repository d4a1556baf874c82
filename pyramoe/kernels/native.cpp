// One forward of a pyramoe GPT on the CPU in one call, from the embedded tokens to the logits: a
// decode step, prefill chunks, or both as rows of the same call.
//
// Why: an eager PyTorch decode step of the benchmark model is ~650 small ops at ~5 us of dispatch
// each, more than the weight reads themselves; here the step is plain loops, every weight matrix is
// streamed once per step (a batch's rows share each read), bf16 weights go through AVX512-BF16 dot
// products where the CPU has them (and products of many rows through AMX tiles where it has those,
// native_amx.h), and only the matrix products run on several threads.
//
// Built at first use by pyramoe/kernels/build.py (g++ -O3 -march=native -fopenmp) and driven
// through ctypes by pyramoe/inference/native/forward.py, which fills the structs below from a model,
// and by pyramoe/kernels/blocked.py (pm_linear: one product, for modules whose weights are blocked).
// Activations stay fp32; matrices and the KV cache are bf16 or fp32 (the model's dtype).
//
// Blocked bf16 layout (where the CPU has AVX512-BF16): an [N, K] matrix as [ceil(N/16), K/2, 16, 2],
// rows padded to 16 with zeros: 64 bytes hold 16 outputs x 2 inputs, so a product loads each piece
// of weight once into a register and multiplies it with every row of x broadcast pairwise, 16
// outputs per instruction and no horizontal sums (the layout oneDNN's packed bf16 weights use).
//
// Legend: B rows (one token each), D width, H/Hkv query/key-value heads, Dh head width, G = H/Hkv,
// E experts, F hidden width of an MLP or expert, A (token, expert) assignments, V vocabulary.

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "native_products.h"

extern "C" {

// A matrix's format where it is not the model's (see PmModel.bf16/blocked): int8 in its blocked
// layout (native_products.h) with fp32 scales and int32 128 x row sums, [stack, padded16(N)] each.
// Or int4 (kFormatInt4) in its blocked layout with fp16 group scales and mins (null: symmetric),
// [stack, ceil(N/16), K/group, 16] each; scales and sums are then unused.
struct PmQuant {
  int64_t format;  // kFormatInt8 or kFormatInt4
  const float *scales;
  const int32_t *sums;
  int64_t group;
  const uint16_t *group_scales, *group_mins;
};

struct PmMlp {  // a dense MLP: in [F or 2F (SwiGLU: gate | up), D], out [D, F]; biases fp32 or null
  const void *in_w, *out_w;
  const float *in_b, *out_b;
  int64_t ff;
  const PmQuant *in_q, *out_q;  // null: the model's format
};

struct PmLayer {
  const float *attn_norm_w, *attn_norm_b;  // b: LayerNorm only
  const void *qkv_w, *o_w;                 // [(H + 2 Hkv) Dh, D], [D, H Dh]
  const float *qkv_b, *o_b;
  const float *q_norm_w, *k_norm_w;        // per head (Dh) or full (H Dh, Hkv Dh) gains, or null
  void *k_cache, *v_cache;                 // [blocks, Hkv, block_size, Dh] (paged; see PmModel.block_table)
  const float *ffn_norm_w, *ffn_norm_b;
  int64_t is_moe;
  PmMlp mlp;                               // the dense FFN, or Residual-MoE's MLP (ff 0: none)
  // MoE
  int64_t num_experts, top_k, expert_ff;
  const float *router_w;                   // [E, D] fp32
  const float *score_bias;                 // [E] or null (DeepSeek-V3 selection bias)
  int64_t router_sigmoid, plain_selection, groups, topk_groups, renormalize;
  double routed_scale;
  const void *exp_in_w, *exp_out_w;        // [E, F or 2F, D], [E, D, F]
  const float *exp_in_b, *exp_out_b;       // [E, F or 2F], [E, D] or null
  PmMlp shared;                            // shared expert (ff 0: none)
  const float *shared_gate_w;              // [D] or null
  const float *coef_w, *coef_b;            // Residual-MoE mixing [2, D], [2], or null
  int64_t *expert_counts;                  // [E] rows routed to each expert, added to by every forward, or null
  const PmQuant *qkv_q, *o_q, *exp_in_q, *exp_out_q;  // per-matrix formats (null: the model's)
  float *k_scales, *v_scales;              // int8 cache (PmModel.kv_int8): [blocks, Hkv, block_size], else null
};

struct PmModel {
  // max_len: the positions a row may take (the cache's, fewer where a learned position table is shorter)
  int64_t n_layers, d_model, n_heads, n_kv_heads, head_dim, rot_dim, vocab, slots, max_len;
  int64_t bf16;        // matrices and KV cache: 1 bf16, 0 fp32
  int64_t blocked;     // bf16 matrices in the blocked layout (see the top of this file)
  int64_t rmsnorm;     // 1 RMSNorm, 0 LayerNorm
  int64_t swiglu;      // 1 SwiGLU, 0 GELU (erf)
  int64_t qk_norm;     // 0 off, 1 per head, 2 full projection
  double eps, qkv_clip;  // qkv_clip <= 0: none
  const float *final_norm_w, *final_norm_b;
  const void *head_w;  // [V, D]
  PmLayer *layers;
  int64_t threads;
  int64_t max_rows;    // the B the workspace was sized for
  int64_t max_ff;      // the widest F of any MLP or expert
  int64_t max_experts;
  const void *tok_emb, *pos_emb;  // [V, D], [max positions, D] or null
  const float *inv_freq;          // [rot_dim / 2] (RoPE) or null
  double rope_factor;             // YaRN's attention factor (1: none)
  // The paged KV cache: position p of the sequence in slot s is row p % block_size of block
  // block_table[s * max_blocks + p / block_size] (a slot cache is one block of max_len per slot).
  const int64_t *block_table;     // [slots, max_blocks]
  int64_t block_size, block_shift, max_blocks, num_blocks;  // block_shift: log2(block_size), or -1
  const PmQuant *head_q;          // the LM head's format (null: the model's)
  int64_t kv_int8;                // 1: the KV cache holds int8 rows, each with an fp32 scale (PmLayer.k_scales)
};

}  // extern "C"

namespace {

// Seconds spent per phase of the step since the last reset (pm_profile): for benchmarks/decode_breakdown.py.
enum Phase { kNorms, kQkv, kAttention, kOutProj, kRouting, kExpertIn, kActivation, kExpertOut, kCombine, kHead,
             kPhases };
double g_profile[kPhases] = {0};
struct PhaseTimer {
  Phase phase;
  double start = omp_get_wtime();
  explicit PhaseTimer(Phase p) : phase(p) {}
  ~PhaseTimer() { g_profile[phase] += omp_get_wtime() - start; }
};

// ---- the step ------------------------------------------------------------------------------------

// Element offset of head h's key/value row for position p, `blocks` being the sequence's block table
// row: a shift and a mask where the block size is a power of two (block_shift >= 0), else a division.
inline int64_t cache_row(const PmModel &m, const int64_t *blocks, int64_t h, int64_t p) {
  const int64_t bs = m.block_size;
  const int64_t block = m.block_shift >= 0 ? p >> m.block_shift : p / bs;
  const int64_t row = m.block_shift >= 0 ? p & (bs - 1) : p % bs;
  return ((blocks[block] * m.n_kv_heads + h) * bs + row) * m.head_dim;
}

struct Workspace {  // carved from the caller's buffer (sizes from pm_workspace_bytes)
  float *h, *qkv, *att, *tmp, *moe, *router, *act, *gate_up, *expert_out, *x, *attn_scratch;
  float *expert_x;
  uint16_t *xb;
  int64_t *assign_token;
  float *assign_weight;
  int64_t *assign_expert;
};

int64_t widest(const PmModel &m) { return std::max(m.d_model, m.n_heads * m.head_dim); }

}  // namespace

#include "native_attention.h"  // attention(): it needs the structs above

namespace {

// Sizes in elements; the order here is the order in the buffer.
void workspace_layout(const PmModel &m, int64_t B, int64_t *counts) {
  const int64_t D = m.d_model, qkv = (m.n_heads + 2 * m.n_kv_heads) * m.head_dim;
  int64_t top_k = 1;
  for (int64_t l = 0; l < m.n_layers; ++l) top_k = std::max(top_k, m.layers[l].top_k);
  const int64_t A = B * top_k + 2 * B;  // expert assignments, then the shared expert and the MLP
  const int64_t F2 = 2 * m.max_ff;
  counts[0] = B * D;                      // h
  counts[1] = B * qkv;                    // qkv
  counts[2] = B * m.n_heads * m.head_dim; // att
  counts[3] = B * D;                      // tmp (output projection; the LM head's rows)
  counts[4] = B * D;                      // moe
  counts[5] = B * m.max_experts;          // router logits
  counts[6] = A * m.max_ff;               // act
  counts[7] = A * F2;                     // gate_up
  counts[8] = A * D;                      // expert_out
  counts[9] = B * D;                      // x (the residual stream)
  counts[10] = attention_scratch_floats(m, B);  // attention: its parts' results, each thread's tile
  counts[11] = A * D;                     // expert_x
  // xb: bf16 inputs of one phase's products (uint16 counted as floats: room for twice the largest,
  // the experts' A rows of width D or F, or B rows of an attention product)
  counts[12] = std::max(A * std::max(D, m.max_ff), B * widest(m));
  counts[12] += 16 * (A + 4);  // int8 products: their u8 rows and scales, each job's aligned to 64 bytes
  counts[13] = A;                         // assign_token (int64: 2 floats each)
  counts[14] = A;                         // assign_weight
  counts[15] = A;                         // assign_expert (int64)
}

constexpr int kParts = 16;

Workspace carve(const PmModel &m, int64_t B, void *buffer) {
  int64_t counts[kParts];
  workspace_layout(m, B, counts);
  char *p = static_cast<char *>(buffer);
  auto take = [&](int64_t n, int64_t elem) {
    char *at = p;
    p += ((n * elem + 63) / 64) * 64;
    return at;
  };
  Workspace w;
  float **floats[] = {&w.h, &w.qkv, &w.att, &w.tmp, &w.moe, &w.router, &w.act, &w.gate_up, &w.expert_out,
                      &w.x, &w.attn_scratch, &w.expert_x};
  for (int i = 0; i < 12; ++i) *floats[i] = reinterpret_cast<float *>(take(counts[i], 4));
  w.xb = reinterpret_cast<uint16_t *>(take(counts[12], 4));
  w.assign_token = reinterpret_cast<int64_t *>(take(counts[13], 8));
  w.assign_weight = reinterpret_cast<float *>(take(counts[14], 4));
  w.assign_expert = reinterpret_cast<int64_t *>(take(counts[15], 8));
  return w;
}

void norm_rows(const PmModel &m, const float *x, const float *w, const float *b, float *y, int64_t B) {
  const int64_t D = m.d_model;
  for (int64_t r = 0; r < B; ++r) {
    const float *xr = x + r * D;
    float *yr = y + r * D;
    if (m.rmsnorm) {
      const float inv = 1.0f / std::sqrt(dot(xr, xr, D) / D + float(m.eps));
      for (int64_t i = 0; i < D; ++i) yr[i] = xr[i] * inv * w[i];
    } else {
      double mean = 0, var = 0;
      for (int64_t i = 0; i < D; ++i) mean += xr[i];
      mean /= D;
      for (int64_t i = 0; i < D; ++i) var += (xr[i] - mean) * (xr[i] - mean);
      const float inv = 1.0f / std::sqrt(float(var / D) + float(m.eps));
      for (int64_t i = 0; i < D; ++i) yr[i] = float(xr[i] - mean) * inv * w[i] + (b ? b[i] : 0.0f);
    }
  }
}

void rms_inplace(float *x, int64_t n, const float *w, double eps) {
  const float inv = 1.0f / std::sqrt(dot(x, x, n) / n + float(eps));
  for (int64_t i = 0; i < n; ++i) x[i] = x[i] * inv * w[i];
}

// q/k norms, clipping, RoPE on one row's fused [q | k | v] projection.
void prepare_qkv(const PmModel &m, const PmLayer &L, float *qkv, const float *cos, const float *sin) {
  const int64_t H = m.n_heads, Hkv = m.n_kv_heads, Dh = m.head_dim;
  float *q = qkv, *k = qkv + H * Dh;
  if (m.qk_norm == 2) {
    rms_inplace(q, H * Dh, L.q_norm_w, m.eps);
    rms_inplace(k, Hkv * Dh, L.k_norm_w, m.eps);
  }
  if (m.qkv_clip > 0) {
    const float c = float(m.qkv_clip);
    for (int64_t i = 0; i < (H + 2 * Hkv) * Dh; ++i) qkv[i] = std::min(c, std::max(-c, qkv[i]));
  }
  if (m.qk_norm == 1) {
    for (int64_t h = 0; h < H; ++h) rms_inplace(q + h * Dh, Dh, L.q_norm_w, m.eps);
    for (int64_t h = 0; h < Hkv; ++h) rms_inplace(k + h * Dh, Dh, L.k_norm_w, m.eps);
  }
  const int64_t half = m.rot_dim / 2;
  if (half == 0) return;
  for (int64_t h = 0; h < H + Hkv; ++h) {  // q heads then k heads: contiguous
    float *v = qkv + h * Dh;
    for (int64_t i = 0; i < half; ++i) {
      const float a = v[i], b = v[i + half];
      v[i] = a * cos[i] - b * sin[i];
      v[i + half] = b * cos[i + half] + a * sin[i + half];
    }
  }
}

void activate_rows(const PmModel &m, const float *in, float *out, int64_t rows, int64_t ff) {
  for (int64_t r = 0; r < rows; ++r) {
    const float *x = in + r * (m.swiglu ? 2 * ff : ff);
    float *y = out + r * ff;
    if (m.swiglu)
      swiglu(x, x + ff, y, ff);
    else
      for (int64_t i = 0; i < ff; ++i) y[i] = gelu(x[i]);
  }
}

// Top-k experts of each row and their combine weights, as the router and combine_weights compute
// them for dropless inference; each row's k experts get +1 in L.expert_counts (where not null).
int64_t route(const PmModel &m, const PmLayer &L, const Workspace &w, int64_t B) {
  const int64_t E = L.num_experts, K = L.top_k, D = m.d_model;
  int64_t a = 0;
  std::vector<float> score(E), choice(E);
  std::vector<int64_t> order(E);
  for (int64_t r = 0; r < B; ++r) {
    const float *h = w.h + r * D;
    float *logit = w.router + r * E;
    for (int64_t e = 0; e < E; ++e) logit[e] = dot(h, L.router_w + e * D, D);
    if (L.router_sigmoid) {
      for (int64_t e = 0; e < E; ++e) score[e] = 1.0f / (1.0f + std::exp(-logit[e]));
    } else {
      const float top = *std::max_element(logit, logit + E);
      float total = 0;
      for (int64_t e = 0; e < E; ++e) total += (score[e] = std::exp(logit[e] - top));
      for (int64_t e = 0; e < E; ++e) score[e] /= total;
    }
    for (int64_t e = 0; e < E; ++e)
      choice[e] = L.plain_selection ? logit[e] : score[e] + (L.score_bias ? L.score_bias[e] : 0.0f);
    if (!L.plain_selection && L.groups > 1) {  // keep the topk_groups groups with the best two-choice sums
      const int64_t per = E / L.groups;
      std::vector<std::pair<float, int64_t>> group_score(L.groups);
      for (int64_t g = 0; g < L.groups; ++g) {
        std::vector<float> c(choice.begin() + g * per, choice.begin() + (g + 1) * per);
        std::partial_sort(c.begin(), c.begin() + std::min<int64_t>(2, per), c.end(), std::greater<float>());
        group_score[g] = {per >= 2 ? c[0] + c[1] : c[0], g};
      }
      std::stable_sort(group_score.begin(), group_score.end(),
                       [](auto &x, auto &y) { return x.first > y.first; });
      for (int64_t g = L.topk_groups; g < L.groups; ++g)
        for (int64_t e = 0; e < per; ++e) choice[group_score[g].second * per + e] = -INFINITY;
    }
    for (int64_t e = 0; e < E; ++e) order[e] = e;
    std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return choice[x] > choice[y]; });
    float total = 0;
    for (int64_t k = 0; k < K; ++k) total += score[order[k]];
    const float norm = L.renormalize ? 1.0f / std::max(total, 1.1920929e-07f) : 1.0f;
    if (L.expert_counts)  // route runs on one thread (outside any parallel region): plain adds
      for (int64_t k = 0; k < K; ++k) ++L.expert_counts[order[k]];
    for (int64_t k = 0; k < K; ++k, ++a) {
      w.assign_token[a] = r;
      w.assign_expert[a] = order[k];
      w.assign_weight[a] = score[order[k]] * norm * float(L.routed_scale);
    }
  }
  return a;
}

// A product with one of the model's matrices (blocked where the model's are; in its own format
// where `q` gives one).
Job model_job(const PmModel &m, const float *x, int64_t M, int64_t K, int64_t N, const void *W, const float *bias,
              float *y, const PmQuant *q = nullptr) {
  Job j{x, nullptr, M, K, N, W, bias, y};
  j.blocked = m.bf16 && m.blocked;
  if (q) {
    j.blocked = false;
    j.format = q->format, j.scales = q->scales, j.sums = q->sums;
    j.group = q->group, j.group_scales = q->group_scales, j.group_mins = q->group_mins;
  }
  return j;
}

Job mlp_in_job(const PmModel &m, const PmMlp &mlp, const float *x, int64_t rows, float *y) {
  return model_job(m, x, rows, m.d_model, (m.swiglu ? 2 : 1) * mlp.ff, mlp.in_w, mlp.in_b, y, mlp.in_q);
}

Job mlp_out_job(const PmModel &m, const PmMlp &mlp, const float *x, int64_t rows, float *y) {
  return model_job(m, x, rows, mlp.ff, m.d_model, mlp.out_w, mlp.out_b, y, mlp.out_q);
}

// Expert e's matrix of a stack [E, N, K] in `q`'s format (int8 blocked: rows padded to 16, one
// byte each) or the model's; `one` receives its scales and sums.
const void *expert_matrix(const PmModel &m, const void *stack, const PmQuant *q, int64_t e, int64_t N, int64_t K,
                          PmQuant *one) {
  if (q && q->format == kFormatInt4) {  // half a byte per weight; group numbers per 16 outputs
    const int64_t rows = padded16(N), numbers = rows * (K / q->group);
    *one = PmQuant{q->format, nullptr, nullptr, q->group, q->group_scales + e * numbers,
                   q->group_mins ? q->group_mins + e * numbers : nullptr};
    return static_cast<const char *>(stack) + e * rows * K / 2;
  }
  if (q) {
    const int64_t rows = padded16(N);
    *one = PmQuant{q->format, q->scales + e * rows, q->sums + e * rows, 0, nullptr, nullptr};
    return static_cast<const char *>(stack) + e * rows * K;
  }
  const int64_t rows = m.bf16 && m.blocked ? padded16(N) : N;
  return static_cast<const char *>(stack) + e * rows * K * (m.bf16 ? 2 : 4);
}

// The FFN of a block: y[B, D] (added to the residual by the caller).
void ffn(const PmModel &m, const PmLayer &L, const Workspace &w, int64_t B, float *y) {
  const int64_t D = m.d_model;
  const bool bf16 = m.bf16;
  const int threads = int(m.threads);
  // Every product of the block's first projection (each chosen expert on its rows, the shared
  // expert, the MLP) runs in one parallel region, then every second projection in another.
  std::vector<Job> in_jobs, out_jobs;
  std::vector<PmMlp> mlps;
  std::vector<int64_t> first_rows;
  int64_t rows = 0;
  auto add = [&](const PmMlp &mlp, const float *x, int64_t n) {
    in_jobs.push_back(mlp_in_job(m, mlp, x, n, w.gate_up + rows * 2 * m.max_ff));
    mlps.push_back(mlp);
    first_rows.push_back(rows);
    rows += n;
  };
  int64_t assignments = 0;
  if (L.is_moe) {
    {
      PhaseTimer t(kRouting);
      assignments = route(m, L, w, B);
    }
    // Group the assignments by expert (stable): each chosen expert reads its weights once.
    std::vector<int64_t> order(assignments);
    for (int64_t a = 0; a < assignments; ++a) order[a] = a;
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t x, int64_t z) { return w.assign_expert[x] < w.assign_expert[z]; });
    std::vector<int64_t> token(assignments), expert(assignments);
    std::vector<float> weight(assignments);
    for (int64_t i = 0; i < assignments; ++i) {
      token[i] = w.assign_token[order[i]];
      expert[i] = w.assign_expert[order[i]];
      weight[i] = w.assign_weight[order[i]];
      std::memcpy(w.expert_x + i * D, w.h + token[i] * D, D * 4);
    }
    std::copy(token.begin(), token.end(), w.assign_token);
    std::copy(weight.begin(), weight.end(), w.assign_weight);
    const int64_t F = L.expert_ff, width = (m.swiglu ? 2 : 1) * F;
    std::vector<PmQuant> formats(2 * L.num_experts);  // the chosen experts' scales (never reallocated)
    for (int64_t i = 0; i < assignments;) {
      const int64_t e = expert[i];
      int64_t n = 1;
      while (i + n < assignments && expert[i + n] == e) ++n;
      PmQuant *in_q = &formats[2 * e], *out_q = &formats[2 * e + 1];
      PmMlp one{expert_matrix(m, L.exp_in_w, L.exp_in_q, e, width, D, in_q),
                expert_matrix(m, L.exp_out_w, L.exp_out_q, e, D, F, out_q),
                L.exp_in_b ? L.exp_in_b + e * width : nullptr, L.exp_out_b ? L.exp_out_b + e * D : nullptr, F,
                L.exp_in_q ? in_q : nullptr, L.exp_out_q ? out_q : nullptr};
      add(one, w.expert_x + i * D, n);
      i += n;
    }
    if (L.shared.ff) add(L.shared, w.h, B);
  }
  if (L.mlp.ff) add(L.mlp, w.h, B);
  {
    PhaseTimer t(kExpertIn);
    run_jobs(in_jobs, bf16, threads, w.xb);
  }
  const double activation_start = omp_get_wtime();
  for (size_t p = 0; p < mlps.size(); ++p) {
    const int64_t first = first_rows[p], n = in_jobs[p].M;
    // Each product's rows are packed at its own width ((2)F in, F out).
    activate_rows(m, w.gate_up + first * 2 * m.max_ff, w.act + first * m.max_ff, n, mlps[p].ff);
    out_jobs.push_back(mlp_out_job(m, mlps[p], w.act + first * m.max_ff, n, w.expert_out + first * D));
  }
  g_profile[kActivation] += omp_get_wtime() - activation_start;
  {
    PhaseTimer t(kExpertOut);
    run_jobs(out_jobs, bf16, threads, w.xb);
  }
  PhaseTimer combine_timer(kCombine);
  for (int64_t i = 0; i < B * D; ++i) y[i] = 0;
  if (L.is_moe) {
    for (int64_t a = 0; a < assignments; ++a) {
      float *yr = y + w.assign_token[a] * D;
      const float *o = w.expert_out + a * D, wt = w.assign_weight[a];
      for (int64_t i = 0; i < D; ++i) yr[i] += wt * o[i];
    }
  }
  // expert_out holds the assignments' rows, then the shared expert's B rows, then the MLP's B rows.
  const float *shared_out = w.expert_out + assignments * D;
  const float *mlp_out = shared_out + (L.is_moe && L.shared.ff ? B * D : 0);
  if (L.mlp.ff) {
    if (!L.is_moe) {
      std::memcpy(y, mlp_out, B * D * 4);
    } else {  // Residual-MoE: a per-token softmax mix of the expert output and the MLP's
      for (int64_t r = 0; r < B; ++r) {
        float c[2];
        for (int j = 0; j < 2; ++j) {
          c[j] = (L.coef_b ? L.coef_b[j] : 0.0f) + dot(w.h + r * D, L.coef_w + j * D, D);
        }
        const float top = std::max(c[0], c[1]);
        const float e0 = std::exp(c[0] - top), e1 = std::exp(c[1] - top);
        const float c0 = e0 / (e0 + e1), c1 = e1 / (e0 + e1);
        for (int64_t i = 0; i < D; ++i) y[r * D + i] = y[r * D + i] * c0 + mlp_out[r * D + i] * c1;
      }
    }
  }
  // The shared expert joins after the Residual-MoE mix, as MoELayer adds it: the mix's coefficient
  // never scales it.
  if (L.is_moe && L.shared.ff) {
    for (int64_t r = 0; r < B; ++r) {
      float gate = 1.0f;
      if (L.shared_gate_w) {
        const float g = dot(w.h + r * D, L.shared_gate_w, D);
        gate = 1.0f / (1.0f + std::exp(-g));
      }
      const float *o = shared_out + r * D;
      for (int64_t i = 0; i < D; ++i) y[r * D + i] += gate * o[i];
    }
  }
}

}  // namespace

extern "C" {

int64_t pm_workspace_bytes(const PmModel *m, int64_t B) {
  int64_t counts[kParts];
  workspace_layout(*m, B, counts);
  const int64_t elem[kParts] = {4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 8, 4, 8};
  int64_t total = 0;
  for (int i = 0; i < kParts; ++i) total += ((counts[i] * elem[i] + 63) / 64) * 64;
  return total;
}

int64_t pm_native_bf16() { return kNativeBf16 ? 1 : 0; }

// 1 where blocked bf16 products with many rows run on AMX tiles, 0 where the library was built
// without them (the CPU lacks AMX-BF16), -1 where built with them but Linux refused the tile state.
int64_t pm_native_amx() {
  if (!kAmxBuilt) return 0;
  return amx_permitted() ? 1 : -1;
}

// Sets which kernel blocked bf16 products use (0: AVX512-BF16, 1: AMX at any row count, 2: AMX
// from pm_amx_min_rows() rows), int8/int4 products likewise (VNNI or AMX-INT8 tiles, from
// pm_amx_quant_min_rows), and returns the previous mode; -1 for a bad mode.
int64_t pm_set_amx(int64_t mode) {
  if (mode < kAmxOff || mode > kAmxAuto) return -1;
  return g_amx_mode.exchange(mode);
}

int64_t pm_amx_mode() { return g_amx_mode.load(); }

int64_t pm_amx_min_rows() { return kAmxMinRows; }

// 1 where int8 and int4 products with many rows run on AMX-INT8 tiles (native_amx_quant.h), 0 where
// the library was built without them, -1 where Linux refused the tile state.
int64_t pm_native_amx_int8() {
  if (!kAmxInt8Built) return 0;
  return amx_permitted() ? 1 : -1;
}

// Rows from which auto mode runs int8 (format 1) or int4 (format 2) products on tiles; -1 otherwise.
int64_t pm_amx_quant_min_rows(int64_t format) {
  return format == kFormatInt8 ? kAmxInt8MinRows : format == kFormatInt4 ? kAmxInt4MinRows : -1;
}

// Products run on AMX tiles since the library loaded (counted per product, not per thread's share).
int64_t pm_amx_products() { return g_amx_products.load(); }

// The size in bytes of the struct named `name` ("PmModel", "PmLayer", "PmMlp"), or -1: the ctypes
// mirrors in pyramoe/inference/native/forward.py are checked against them before any call.
int64_t pm_sizeof(const char *name) {
  if (std::strcmp(name, "PmModel") == 0) return sizeof(PmModel);
  if (std::strcmp(name, "PmLayer") == 0) return sizeof(PmLayer);
  if (std::strcmp(name, "PmMlp") == 0) return sizeof(PmMlp);
  if (std::strcmp(name, "PmQuant") == 0) return sizeof(PmQuant);
  return -1;
}

// 1 where the int8 products run on VNNI dot products, 0 where on the portable kernel.
int64_t pm_native_int8() { return kNativeInt8 ? 1 : 0; }

// y[M, N] = x[M, K] . W^T + bias with W int8 blocked (format kFormatInt8; K a multiple of 4), its
// scales and 128 x row sums; bias fp32 or null. Returns 1 for a bad format or K.
int64_t pm_linear_quantized(const void *W, int64_t format, const float *scales, const int32_t *sums, int64_t N,
                            int64_t K, const float *x, int64_t M, const float *bias, float *y, int64_t threads) {
  if (format != kFormatInt8 || K % 4) return 1;
  std::vector<uint16_t> scratch((M * K + 4 * M) / 2 + 64);
  Job j{x, nullptr, M, K, N, W, bias, y};
  j.format = format, j.scales = scales, j.sums = sums;
  std::vector<Job> jobs{j};
  run_jobs(jobs, false, int(threads), scratch.data());
  return 0;
}

// y[M, N] = x[M, K] . W^T + bias with W in the format `q` describes (int8: K a multiple of 4; int4:
// group 32, 64 or 128 dividing K); bias fp32 or null. Returns 1 for a bad format, K or group.
int64_t pm_linear_described(const void *W, const PmQuant *q, int64_t N, int64_t K, const float *x, int64_t M,
                            const float *bias, float *y, int64_t threads) {
  if (q->format == kFormatInt4 ? (q->group != 32 && q->group != 64 && q->group != 128) || K % q->group
                               : q->format != kFormatInt8 || K % 4)
    return 1;
  std::vector<uint16_t> scratch(M * K + 4 * M + 256);  // u8/s8 rows, scales, group sums (2 bytes each here)
  std::vector<Job> jobs{Job{x, nullptr, M, K, N, W, bias, y}};
  jobs[0].format = q->format, jobs[0].scales = q->scales, jobs[0].sums = q->sums;
  jobs[0].group = q->group, jobs[0].group_scales = q->group_scales, jobs[0].group_mins = q->group_mins;
  run_jobs(jobs, false, int(threads), scratch.data());
  return 0;
}

// A streaming read of `bytes` (a multiple of 4) at `p` on `threads` threads, each summing its
// contiguous share as floats (returned so the reads are not elided): the memory-read speed the
// bench's roofline uses beside torch's sum, which read ~10% slower than the kernels' weight streams.
double pm_read(const float *p, int64_t bytes, int64_t threads) {
  const int64_t n = bytes / 4;
  double total = 0;
#pragma omp parallel for num_threads(int(threads)) schedule(static) reduction(+ : total)
  for (int64_t t = 0; t < threads; ++t) {
    const int64_t lo = n * t / threads / 64 * 64, hi = t + 1 == threads ? n : n * (t + 1) / threads / 64 * 64;
    float acc[64] = {0};
    int64_t i = lo;
    for (; i + 64 <= hi; i += 64) {
      _mm_prefetch(reinterpret_cast<const char *>(p + i + 1024), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char *>(p + i + 1024 + 16), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char *>(p + i + 1024 + 32), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char *>(p + i + 1024 + 48), _MM_HINT_T0);
#pragma omp simd
      for (int l = 0; l < 64; ++l) acc[l] += p[i + l];
    }
    for (; i < hi; ++i) acc[0] += p[i];
    for (int l = 0; l < 64; ++l) total += acc[l];
  }
  return total;
}

// y[M, N] = x[M, K] . W^T + bias with W in `layout` (0: fp32 [N, K], 1: bf16 [N, K], 2: bf16
// blocked, which needs AVX512-BF16 and an even K); bias fp32 or null. Returns 1 for a bad layout.
int64_t pm_linear(const void *W, int64_t layout, int64_t N, int64_t K, const float *x, int64_t M, const float *bias,
                  float *y, int64_t threads) {
  if (layout < 0 || layout > 2 || (layout == 2 && (!kNativeBf16 || K % 2))) return 1;
  std::vector<uint16_t> xb(M * K);
  std::vector<Job> jobs{Job{x, nullptr, M, K, N, W, bias, y}};
  jobs[0].blocked = layout == 2;
  run_jobs(jobs, layout > 0, int(threads), xb.data());
  return 0;
}

// Seconds per phase since the last call (norms, qkv, attention, out projection, routing, expert/MLP
// first projections, activation, second projections, combine, LM head); resets them.
void pm_profile(double *out) {
  for (int i = 0; i < kPhases; ++i) {
    out[i] = g_profile[i];
    g_profile[i] = 0;
  }
}

// Rows are tokens: row r feeds tokens[r] at position pos[r] of the sequence in cache slot slot[r]
// (a decode step: one row per sequence; a prefill chunk: consecutive positions of one or more).
// Logits [n_logits, V] (and their argmax) of the rows logit_rows lists. Returns 0, or 1 for a bad
// row count, 2 for a bad slot or position, 3 for a bad token or logit row.
int64_t pm_forward(const PmModel *mp, const int64_t *tokens, const int64_t *slot, const int64_t *pos, int64_t B,
                   const int64_t *logit_rows, int64_t n_logits, float *logits, int64_t *argmax, void *workspace) {
  const PmModel &m = *mp;
  if (B < 1 || B > m.max_rows || n_logits < 0 || n_logits > B) return 1;
  for (int64_t r = 0; r < B; ++r) {
    if (slot[r] < 0 || slot[r] >= m.slots || pos[r] < 0 || pos[r] >= m.max_len) return 2;
    const int64_t *blocks = m.block_table + slot[r] * m.max_blocks;
    for (int64_t b = 0; b <= pos[r] / m.block_size; ++b)
      if (blocks[b] < 0 || blocks[b] >= m.num_blocks) return 2;
    if (tokens[r] < 0 || tokens[r] >= m.vocab) return 3;
  }
  for (int64_t i = 0; i < n_logits; ++i)
    if (logit_rows[i] < 0 || logit_rows[i] >= B) return 3;
  Workspace w = carve(m, m.max_rows, workspace);
  const int64_t D = m.d_model, qkv_width = (m.n_heads + 2 * m.n_kv_heads) * m.head_dim;
  const bool bf16 = m.bf16;
  const int threads = int(m.threads);
  float *x = w.x;
  for (int64_t r = 0; r < B; ++r)  // token embedding (+ learned position)
    for (int64_t i = 0; i < D; ++i)
      x[r * D + i] = load_f(m.tok_emb, tokens[r] * D + i, bf16) + (m.pos_emb ? load_f(m.pos_emb, pos[r] * D + i, bf16) : 0.0f);
  std::vector<float> cos(B * m.rot_dim), sin(B * m.rot_dim);
  const int64_t half = m.rot_dim / 2;
  for (int64_t r = 0; r < B; ++r)  // RoPE tables as RotaryEmbedding.cos_sin computes them, in fp32
    for (int64_t i = 0; i < half; ++i) {
      const float angle = float(pos[r]) * m.inv_freq[i];
      const float c = std::cos(angle) * float(m.rope_factor), sn = std::sin(angle) * float(m.rope_factor);
      cos[r * m.rot_dim + i] = cos[r * m.rot_dim + half + i] = c;
      sin[r * m.rot_dim + i] = sin[r * m.rot_dim + half + i] = sn;
    }
  for (int64_t l = 0; l < m.n_layers; ++l) {
    const PmLayer &L = m.layers[l];
    {
      PhaseTimer t(kNorms);
      norm_rows(m, x, L.attn_norm_w, L.attn_norm_b, w.h, B);
    }
    std::vector<Job> jobs{model_job(m, w.h, B, D, qkv_width, L.qkv_w, L.qkv_b, w.qkv, L.qkv_q)};
    {
      PhaseTimer t(kQkv);
      run_jobs(jobs, bf16, threads, w.xb);
    }
    {
      PhaseTimer t(kAttention);
      for (int64_t r = 0; r < B; ++r)
        prepare_qkv(m, L, w.qkv + r * qkv_width, cos.data() + r * m.rot_dim, sin.data() + r * m.rot_dim);
      attention(m, L, w, slot, pos, B);
    }
    jobs = {model_job(m, w.att, B, m.n_heads * m.head_dim, D, L.o_w, L.o_b, w.tmp, L.o_q)};
    {
      PhaseTimer t(kOutProj);
      run_jobs(jobs, bf16, threads, w.xb);
    }
    {
      PhaseTimer t(kNorms);
      for (int64_t i = 0; i < B * D; ++i) x[i] += w.tmp[i];
      norm_rows(m, x, L.ffn_norm_w, L.ffn_norm_b, w.h, B);
    }
    ffn(m, L, w, B, w.moe);
    for (int64_t i = 0; i < B * D; ++i) x[i] += w.moe[i];
  }
  if (n_logits == 0) return 0;
  PhaseTimer t(kHead);
  for (int64_t i = 0; i < n_logits; ++i) std::memcpy(w.tmp + i * D, x + logit_rows[i] * D, D * 4);
  norm_rows(m, w.tmp, m.final_norm_w, m.final_norm_b, w.h, n_logits);
  std::vector<Job> head{model_job(m, w.h, n_logits, D, m.vocab, m.head_w, nullptr, logits, m.head_q)};
  run_jobs(head, bf16, threads, w.xb);
  for (int64_t i = 0; i < n_logits; ++i) argmax[i] = first_argmax(logits + i * m.vocab, m.vocab);
  return 0;
}

}  // extern "C"
