// A product of a phase for the native kernels (see native.cpp, native_products.h): its inputs,
// weights and format. Included by the product headers.
#pragma once

#include <cstdint>

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
  // Per-matrix format (kFormatInt8: W int8 blocked, see the int8 kernels in native_products.h; 0:
  // the model's bf16 or fp32 as `blocked` says), with its per-output scales and 128 x row sums
  // (padded to 16 outputs).
  int64_t format = 0;
  const float *scales = nullptr;
  const int32_t *sums = nullptr;
  const uint8_t *xq = nullptr;      // x per row as u8 (round(x / x_scales[m]) + 128), set by run_jobs
  const float *x_scales = nullptr;  // [M]
  // kFormatInt4 (see the int4 kernels in native_products.h): the group size, fp16 scales and mins
  // (null: symmetric) [ceil(N/16), K/group, 16]; x per row as s8 with its per-group sums, set by
  // run_jobs.
  int64_t group = 0;
  const uint16_t *group_scales = nullptr, *group_mins = nullptr;
  const int32_t *x_sums = nullptr;  // [M, K/group]
};

constexpr int64_t kFormatInt8 = 1;
constexpr int64_t kFormatInt4 = 2;

constexpr int64_t kRowBlock = 16;  // weight rows per unit of work (the threads split these)

inline int64_t padded16(int64_t n) { return (n + 15) / 16 * 16; }

}  // namespace
