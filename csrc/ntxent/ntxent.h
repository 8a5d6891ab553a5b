// Math of the contrastive op shared by the CPU and CUDA kernels (host and device). The CUDA kernels' tiling
// and launch plan are in ntxent_cuda_plan.h.
//
// Queries q (M, D) and keys k (L, D) are L2-normalized (norm clamped below at kNormEps, like
// F.normalize); s_ij = <qhat_i, khat_j> / temperature. Key j is a positive of query i when
// k_labels[j] == q_labels[i] and j is not i's own key (j == i + self_offset when self_offset >= 0);
// the own key is also left out of the denominator N(i) (and so are the positives with exclude_positives, DCL):
//   loss_i = logsumexp_{j in N(i)} s_ij - w_i mean_{j in P(i)} s_ij,   loss_i = 0 when P(i) is empty,
// with w_i = positive_weight[i] (DCLW) or 1. two_way (CLIP): also a loss per key column j over the queries,
//   loss'_j = logsumexp_i s_ij - mean_{i in P'(j)} s_ij, P'(j) = {i : q_labels[i] == k_labels[j]},
// from the same tiles (outputs (M + L,): query rows, then key columns; self_offset -1, no DCL/DCLW terms).
// Backward, with g_i the incoming gradient of loss_i (0 for rows without positives):
//   dL/ds_ij = g_i * ([j in N(i)] exp(s_ij - lse_i) - w_i [j in P(i)] / |P(i)|),   dL/dc_ij = dL/ds_ij / t,
//   dqhat = dC khat, dkhat = dC^T qhat, dz = (dzhat - zhat <zhat, dzhat>) / |z| (dzhat / eps when clamped).
// Temperature: with u = 1/t and S = u C, dL/du = sum_ij dL/ds_ij C_ij = (1/u) sum_i <dqhat_i, qhat_i>, the
// radial dots that the normalization backward forms anyway (every row, clamped ones included), so
// dL/dt = -(1/t) sum_i <dqhat_i, qhat_i>: no extra pass, nothing more in the forward. When q is k the rows'
// dzhat = dqhat + dkhat count both sides: dL/dt = -(1/(2t)) sum_i <dzhat_i, zhat_i>.
//
// Similarity: s_ij = <qhat_i, khat_j> / t (cosine, normalize = true) or <q_i, k_j> / t (dot products as given,
// normalize = false: open_clip's logit_scale * x @ y.T; no normalization, so its backward has no radial
// projection, and dL/dt keeps the same formula with the raw rows in place of the normalized ones).
// Sigmoid mode (SigLIP, sigmoid = true): no softmax; with z_ij = s_ij + b (b: the bias) and y_ij = +1 for a
// positive, -1 otherwise, loss_i = sum_j softplus(-y_ij z_ij) = sum_j softplus(z_ij) - sum_{j in P(i)} z_ij.
// dL/dz_ij = g_i (sigmoid(z_ij) - [j in P(i)]): the softmax form with sigmoid for the probability and weight 1 on
// every positive. The forward's lse output holds sum_j sigmoid(z_ij) instead, so that
// dL/db = sum_i g_i (lse_i - |P(i)|) costs nothing more; every row has a loss (no positive is needed).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "common/host_device.h"

namespace simclr_ext {
namespace ntxent {

// Same clamp as torch.nn.functional.normalize's default eps.
constexpr double kNormEps = 1e-12;

// Tile sizes of the CPU kernel: a task owns kCpuRowBlock output rows (queries in the forward and dq
// pass, keys in the dk pass) and streams the other side in tiles of kCpuKeyBlock rows. A 64 x 256 float32
// tile (64 KiB) stays in L2 while the tile GEMMs keep an inner dimension of D or 256 for BLAS.
constexpr int64_t kCpuRowBlock = 64;
constexpr int64_t kCpuKeyBlock = 256;

// Index of query `row`'s own key, or -1 when queries are not a slice of the keys.
SIMCLR_HDC int64_t self_key(int64_t row, int64_t self_offset) { return self_offset >= 0 ? row + self_offset : -1; }

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

  SIMCLR_HD static OnlineLSE empty() { return {-std::numeric_limits<acc_t>::infinity(), acc_t(0)}; }

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

// exp(r) for |r| <= ln2/2 by its Taylor series to degree 7, given x = n*ln2 + r; the CPU's scaled exponential
// (ntxent_cpu.cpp) shares it, so both round alike.
SIMCLR_HD float exp_reduced(float x, float n) {
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 split in two for an exact product
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  return p * r + 1.f;
}

// exp written so that compilers vectorize loops over it (a libm call per element does not): the
// argument is split as n*ln2 + r with |r| <= ln2/2, exp(r) by its Taylor series to degree 7 (relative
// error < 1.2e-7, i.e. about 1 ulp in float), and 2^n assembled in the exponent bits. Underflows to 0
// below -87.3; NaN stays NaN. Used by the CPU kernel for float; double keeps std::exp.
SIMCLR_HD float vec_expf(float x) {
  const bool tiny = x < -87.3f;
  const float xc = x > 88.7f ? 88.7f : (tiny ? -87.3f : x);
  // Round to nearest by adding and removing 1.5 * 2^23 (vectorizes where nearbyintf does not).
  const float n = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const float p = exp_reduced(xc, n);
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

// log(1 + u) for u in [0, 1] written so that loops over it vectorize: log1p(u) = 2 atanh(s), s = u / (2 + u) in
// [0, 1/3] (no rounding of 1 + u), by its series to s^15 (relative error < 2e-9). double keeps std::log1p.
SIMCLR_HD float fast_log1p(float u) {
  const float s = u / (2.f + u);
  const float s2 = s * s;
  float p = 1.f / 15.f;
  p = p * s2 + 1.f / 13.f;
  p = p * s2 + 1.f / 11.f;
  p = p * s2 + 1.f / 9.f;
  p = p * s2 + 1.f / 7.f;
  p = p * s2 + 1.f / 5.f;
  p = p * s2 + 1.f / 3.f;
  p = p * s2 + 1.f;
  return 2.f * s * p;
}
SIMCLR_HD double fast_log1p(double u) { return log1p(u); }

// softplus(z) = log(1 + exp(z)) = max(z, 0) + log1p(exp(-|z|)), and sigmoid(z) from the same exp: the sigmoid
// mode's per-pair terms (NaN stays NaN).
template <typename acc_t>
SIMCLR_HD acc_t softplus(acc_t z) {
  const acc_t e = fast_exp(z > acc_t(0) ? -z : z);
  return (z > acc_t(0) ? z : acc_t(0)) + fast_log1p(e);
}
template <typename acc_t>
SIMCLR_HD acc_t sigmoid(acc_t z) {
  const acc_t e = fast_exp(z > acc_t(0) ? -z : z);
  const acc_t r = acc_t(1) / (acc_t(1) + e);
  return z > acc_t(0) ? r : e * r;
}

// loss_i from the row's log-sum-exp (over its denominator), sum of positive logits, positive count and the
// weight of the positive term (1 but for DCLW).
template <typename acc_t>
SIMCLR_HD acc_t row_loss(acc_t lse, acc_t positive_sum, int64_t num_positives, acc_t weight = acc_t(1)) {
  return num_positives > 0 ? lse - weight * (positive_sum / acc_t(num_positives)) : acc_t(0);
}

// The logit c / t, as a rounded product that is never fused with a following subtraction (the CPU
// build uses -ffp-contract=off; CUDA's default contraction is avoided with __fmul_rn). The backward
// then recomputes exactly the forward's logits: where a row's softmax is exactly 1 (its only key is
// its positive) the gradient cancels to exactly 0, as in the reference.
SIMCLR_HD float logit(float c, float inv_temperature) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(c, inv_temperature);
#else
  return c * inv_temperature;
#endif
}

SIMCLR_HD double logit(double c, double inv_temperature) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(c, inv_temperature);
#else
  return c * inv_temperature;
#endif
}

// Cosine of a pair from the raw dot product <x_i, y_j> and the rows' inverse norms 1 / max(|x|, eps): the
// CPU kernel multiplies the raw rows (no normalized copies) and scales each tile entry. One rounding order
// everywhere, so that the backward recomputes exactly the forward's cosines.
template <typename acc_t>
SIMCLR_HD acc_t cosine(acc_t dot, acc_t inv_norm_i, acc_t inv_norm_j) {
  return dot * (inv_norm_i * inv_norm_j);
}

// Per-row factors of the backward, one struct per row so that a new per-row quantity (a weight on the
// positive term, a learned temperature's running mean) is one more field here:
//   g       dL/dc scale of the row: incoming gradient / temperature; 0 for a row without positives
//           (its loss is the constant 0, so its gradient must not flow)
//   lse     the row's log-sum-exp from the forward; +inf for a row without positives, so that its
//           softmax terms below are exactly 0 (no inf * 0 even where the forward's lse is -inf)
//   inv_np  w_i / |P(i)| (w_i: the positive term's weight, 1 but for DCLW), 0 for a row without positives
template <typename acc_t>
struct RowFactors {
  acc_t g;
  acc_t lse;
  acc_t inv_np;
};

template <typename acc_t>
SIMCLR_HD RowFactors<acc_t> row_factors(acc_t grad, acc_t lse, int64_t num_positives, acc_t inv_temperature,
                                        acc_t weight = acc_t(1)) {
  if (num_positives <= 0) return {acc_t(0), std::numeric_limits<acc_t>::infinity(), acc_t(0)};
  return {grad * inv_temperature, lse, weight / acc_t(num_positives)};
}

// dL/dc_ij of row i from its softmax probability p_ij (kept from the forward or recomputed).
template <typename acc_t>
SIMCLR_HD acc_t prob_grad(acc_t p, const RowFactors<acc_t>& f, bool positive) {
  return f.g * p - (positive ? f.g * f.inv_np : acc_t(0));
}

// The symmetric case (queries are the keys, identical labels, self_offset 0): S is symmetric and the
// coefficient of zhat_j in dL/dzhat_i is H_ij = dS_ij + dS_ji, both from the one cosine c = c_ij = c_ji:
//   H_ij = g_i exp(s - lse_i) + g_j exp(s - lse_j) - [j in P(i)] (g_i / |P(i)| + g_j / |P(j)|)
// (j in P(i) iff i in P(j) here). The two-way case (CLIP: a loss per query row over the keys and one per key
// column over the queries, with column log-sum-exps lse'_j) has the same form with fj the factors of key
// column j: dL/dc_ij = g_i (p_ij - [pos] / |P(i)|) + h_j (p'_ij - [pos] / |P'(j)|).
// The softmax part and the positive part are separate helpers so that the CPU kernel can vectorize the
// first over a tile row and apply the second to the few positives.
template <typename acc_t>
SIMCLR_HD acc_t symmetric_softmax_part(acc_t s, const RowFactors<acc_t>& fi, acc_t g_j, acc_t lse_j) {
  return fi.g * fast_exp(s - fi.lse) + g_j * fast_exp(s - lse_j);
}
template <typename acc_t>
SIMCLR_HD acc_t symmetric_positive_part(const RowFactors<acc_t>& fi, const RowFactors<acc_t>& fj) {
  return fi.g * fi.inv_np + fj.g * fj.inv_np;
}
template <typename acc_t>
SIMCLR_HD acc_t symmetric_cosine_grad(acc_t c, acc_t inv_temperature, const RowFactors<acc_t>& fi,
                                      const RowFactors<acc_t>& fj, bool positive, bool exclude_positives = false) {
  // An excluded positive (DCL) is in neither softmax: only its positive part remains.
  if (positive && exclude_positives) return -symmetric_positive_part(fi, fj);
  const acc_t h = symmetric_softmax_part(logit(c, inv_temperature), fi, fj.g, fj.lse);
  return positive ? h - symmetric_positive_part(fi, fj) : h;
}

// Sigmoid mode: dL/dc_ij = g_i / t (sigmoid(z_ij) - [positive]), z_ij = c_ij / t + b (see the header).
template <typename acc_t>
SIMCLR_HD acc_t sigmoid_cosine_grad(acc_t c, acc_t inv_temperature, acc_t bias, acc_t g, bool positive) {
  return g * inv_temperature * (sigmoid(logit(c, inv_temperature) + bias) - (positive ? acc_t(1) : acc_t(0)));
}

// dL/dc_ij for one pair: c is the cosine (pre-temperature), g the row's incoming gradient.
template <typename acc_t>
SIMCLR_HD acc_t cosine_grad(acc_t c, acc_t inv_temperature, acc_t lse, acc_t g, bool positive, acc_t inv_num_positives,
                            bool exclude_positives = false) {
  // inv_num_positives is the row's w_i / |P(i)|; an excluded positive (DCL) is not in the softmax.
  const acc_t p = positive && exclude_positives ? acc_t(0) : fast_exp(logit(c, inv_temperature) - lse);
  return g * inv_temperature * (p - (positive ? inv_num_positives : acc_t(0)));
}

}  // namespace ntxent
}  // namespace simclr_ext
