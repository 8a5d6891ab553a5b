// Math of the contrastive op shared by the CPU and CUDA kernels (host and device).
//
// Queries q (M, D) and keys k (L, D) are L2-normalized (norm clamped below at kNormEps, like
// F.normalize); s_ij = <qhat_i, khat_j> / temperature. Key j is a positive of query i when
// k_labels[j] == q_labels[i] and j is not i's own key (j == i + self_offset when self_offset >= 0);
// the own key is also left out of the denominator:
//   loss_i = logsumexp_{j != self(i)} s_ij - mean_{j in P(i)} s_ij,   loss_i = 0 when P(i) is empty.
// Backward, with g_i the incoming gradient of loss_i (0 for rows without positives):
//   dL/ds_ij = g_i * (exp(s_ij - lse_i) - [j in P(i)] / |P(i)|),   dL/dc_ij = dL/ds_ij / temperature,
//   dqhat = dC khat, dkhat = dC^T qhat, dz = (dzhat - zhat <zhat, dzhat>) / |z| (dzhat / eps when clamped).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define SIMCLR_HD __host__ __device__ __forceinline__
#else
#define SIMCLR_HD inline
#endif

namespace simclr_ext {
namespace ntxent {

// Same clamp as torch.nn.functional.normalize's default eps.
constexpr double kNormEps = 1e-12;

// Tile sizes of the CPU kernel: a task owns kCpuRowBlock output rows (queries in the forward and dq
// pass, keys in the dk pass) and streams the other side in tiles of kCpuKeyBlock rows. A 64 x 256 float32
// tile (64 KiB) stays in L2 while the tile GEMMs keep an inner dimension of D or 256 for BLAS.
constexpr int64_t kCpuRowBlock = 64;
constexpr int64_t kCpuKeyBlock = 256;

SIMCLR_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Index of query `row`'s own key, or -1 when queries are not a slice of the keys.
SIMCLR_HD int64_t self_key(int64_t row, int64_t self_offset) {
  return self_offset >= 0 ? row + self_offset : -1;
}

// max(|z|, eps) from the squared norm: the divisor F.normalize uses. Divide by it rather than multiply
// by its inverse: a one-element row then normalizes to exactly +-1, as in F.normalize.
template <typename acc_t>
SIMCLR_HD acc_t clamped_norm(acc_t sum_squares) {
  const acc_t norm = sqrt(sum_squares);
  return norm > acc_t(kNormEps) ? norm : acc_t(kNormEps);
}

// Whether the norm was clamped, in which case normalization's backward is a plain scale.
template <typename acc_t>
SIMCLR_HD bool norm_clamped(acc_t sum_squares) {
  return !(sqrt(sum_squares) > acc_t(kNormEps));
}

// Running log-sum-exp over a stream of logits: max and sum of exp(x - max).
// Starts empty (max = -inf, sum = 0).
template <typename acc_t>
struct OnlineLSE {
  acc_t max;
  acc_t sum;

  SIMCLR_HD static OnlineLSE empty() {
    return {-std::numeric_limits<acc_t>::infinity(), acc_t(0)};
  }

  // Merge a block summarized by its own max and sum of exp(x - block_max). An empty block has
  // sum 0 and is skipped; a NaN in the block makes its sum NaN, which then stays NaN.
  SIMCLR_HD void merge(acc_t block_max, acc_t block_sum) {
    if (block_sum == acc_t(0)) return;
    if (sum == acc_t(0)) {
      max = block_max;
      sum = block_sum;
      return;
    }
    const acc_t new_max = block_max > max ? block_max : max;
    sum = sum * exp(max - new_max) + block_sum * exp(block_max - new_max);
    max = new_max;
  }

  // log(sum_j exp(x_j)); -inf for an empty stream.
  SIMCLR_HD acc_t value() const {
    if (sum == acc_t(0)) return -std::numeric_limits<acc_t>::infinity();
    return max + log(sum);
  }
};

// exp written so that compilers vectorize loops over it (a libm call per element does not): the
// argument is split as n*ln2 + r with |r| <= ln2/2, exp(r) by its Taylor series to degree 7 (relative
// error < 1.2e-7, i.e. about 1 ulp in float), and 2^n assembled in the exponent bits. Underflows to 0
// below -87.3; NaN stays NaN. Used by the CPU kernel for float; double keeps std::exp.
SIMCLR_HD float vec_expf(float x) {
  const bool tiny = x < -87.3f;
  const float xc = x > 88.7f ? 88.7f : (tiny ? -87.3f : x);
  // Round to nearest by adding and removing 1.5 * 2^23 (vectorizes where nearbyintf does not).
  const float n = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 split in two for an exact product
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
#if defined(__CUDA_ARCH__)
  const float scale = __int_as_float(bits);
#else
  const float scale = __builtin_bit_cast(float, bits);  // a memcpy here would stop the vectorizer
#endif
  const float y = p * scale;
  return x != x ? x : (tiny ? 0.f : y);
}

SIMCLR_HD float fast_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return vec_expf(x);
#endif
}
SIMCLR_HD double fast_exp(double x) { return exp(x); }

// loss_i from the row's log-sum-exp, sum of positive logits and positive count.
template <typename acc_t>
SIMCLR_HD acc_t row_loss(acc_t lse, acc_t positive_sum, int64_t num_positives) {
  return num_positives > 0 ? lse - positive_sum / acc_t(num_positives) : acc_t(0);
}

// dL/dc_ij for one pair: c is the cosine (pre-temperature), g the row's incoming gradient.
template <typename acc_t>
SIMCLR_HD acc_t cosine_grad(acc_t c, acc_t inv_temperature, acc_t lse, acc_t g, bool positive,
                            acc_t inv_num_positives) {
  const acc_t p = fast_exp(c * inv_temperature - lse);
  return g * inv_temperature * (p - (positive ? inv_num_positives : acc_t(0)));
}

}  // namespace ntxent
}  // namespace simclr_ext
