// Math of the contrastive op shared by the CPU and CUDA kernels (host and device).
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
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define SIMCLR_HD __host__ __device__ __forceinline__
#else
#define SIMCLR_HD inline
#endif
// For helpers that also size arrays and template arguments at compile time.
#define SIMCLR_HDC SIMCLR_HD constexpr

namespace simclr_ext {
namespace ntxent {

// Same clamp as torch.nn.functional.normalize's default eps.
constexpr double kNormEps = 1e-12;

// Tile sizes of the CPU kernel: a task owns kCpuRowBlock output rows (queries in the forward and dq
// pass, keys in the dk pass) and streams the other side in tiles of kCpuKeyBlock rows. A 64 x 256 float32
// tile (64 KiB) stays in L2 while the tile GEMMs keep an inner dimension of D or 256 for BLAS.
constexpr int64_t kCpuRowBlock = 64;
constexpr int64_t kCpuKeyBlock = 256;

SIMCLR_HDC int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Index of query `row`'s own key, or -1 when queries are not a slice of the keys.
SIMCLR_HDC int64_t self_key(int64_t row, int64_t self_offset) {
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

// dL/dc_ij for one pair: c is the cosine (pre-temperature), g the row's incoming gradient.
template <typename acc_t>
SIMCLR_HD acc_t cosine_grad(acc_t c, acc_t inv_temperature, acc_t lse, acc_t g, bool positive,
                            acc_t inv_num_positives, bool exclude_positives = false) {
  // inv_num_positives is the row's w_i / |P(i)|; an excluded positive (DCL) is not in the softmax.
  const acc_t p = positive && exclude_positives ? acc_t(0) : fast_exp(logit(c, inv_temperature) - lse);
  return g * inv_temperature * (p - (positive ? inv_num_positives : acc_t(0)));
}

// ---------------------------------------------------------------------------------------------------
// Tiling of the CUDA kernels (ntxent_cuda.cu). Kept here, host and device, so that the CPU tests can
// check every launch choice and index map without a GPU (tests/cpp/ntxent_cuda_plan_test.cpp).
//
// Normalized copies of q and k are written once per call into zero-padded buffers of
// padded_rows(n) x padded_dim(D) elements, so that the tile loops never test bounds and every
// shared-memory copy is 16-byte vectorized. One thread block of kCudaThreads (4 warps) owns kCudaTile
// rows of one side ("own": queries in forward and dQ, keys in dK) and streams kCudaTile-row tiles of the
// other side. Warp w owns rows [16 w, 16 w + 16) of the block's tile, for the score tile and for the
// gradient accumulators, so the score tile it writes to shared memory is read back by itself only.
// Scores are accumulated over D in chunks of score_chunk() elements (256 bytes of a row); the backward
// accumulates dX for output_chunk() columns of D per block (grid.y walks the chunks).
// ---------------------------------------------------------------------------------------------------
constexpr int64_t kCudaTile = 64;       // own rows per block = other rows per streamed tile
constexpr int kCudaWarps = 4;           // warp w owns rows [16 w, 16 w + 16)
constexpr int kCudaThreads = 32 * kCudaWarps;
constexpr int64_t kCudaDimAlign = 32;   // D is zero-padded to a multiple of this (elements)
constexpr int64_t kCudaSmemAlign = 128; // every shared-memory region starts on this many bytes
constexpr int64_t kCudaNormRowsPerBlock = 8;  // normalize / finalize kernels: one warp per row

SIMCLR_HDC int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
SIMCLR_HDC int64_t padded_rows(int64_t n) { return round_up(n, kCudaTile); }
SIMCLR_HDC int64_t padded_dim(int64_t d) { return round_up(d, kCudaDimAlign); }

// Elements of D per score chunk (256 bytes of a row) and shared-memory row padding (16 bytes), which
// keeps wmma's 32-byte fragment alignment and spreads rows over the banks.
SIMCLR_HDC int64_t score_chunk(int64_t elem_bytes) { return 256 / elem_bytes; }
SIMCLR_HDC int64_t smem_pad(int64_t elem_bytes) { return 16 / elem_bytes; }
// Columns of dX one backward block accumulates: 128 (float accumulators), 64 for double.
SIMCLR_HDC int64_t output_chunk(int64_t acc_bytes) { return acc_bytes == 8 ? 64 : 128; }
// Width of chunk c of a padded dimension cut into chunks of `chunk` (the last may be shorter; always a
// positive multiple of kCudaDimAlign when dim_padded is).
SIMCLR_HDC int64_t chunk_width(int64_t dim_padded, int64_t chunk, int64_t c) {
  const int64_t rest = dim_padded - c * chunk;
  return rest < chunk ? rest : chunk;
}

// Tile copies (global -> shared) move 16 bytes per thread and step and issue kCudaCopyBatch loads
// before their stores, so that a batch of loads is in flight at once rather than one.
constexpr int kCudaCopyBatch = 8;

// Shared-memory layout of the forward (with_grad = false) and backward kernels, in bytes from the
// start of the dynamic shared memory. Regions, each kCudaSmemAlign-aligned:
//   x   own rows, one score chunk      kCudaTile x (score_chunk + pad)       elem
//   y   other rows, one score chunk    kCudaTile x (score_chunk + pad)       elem
//   s   scores of the tile             kCudaTile x (kCudaTile + acc pad)     acc
//   lab other rows' labels             kCudaTile                             int64
//   (backward only)
//   p   dL/dcos of the tile            kCudaTile x (kCudaTile + pad)         elem
//   yd  other rows, one output chunk   kCudaTile x (output_chunk + pad)      elem
//   meta other rows' lse, grad, 1/npos 3 x kCudaTile                         acc
struct SmemLayout {
  int64_t ld_in, ld_s, ld_p, ld_yd;                 // leading dimensions, in elements of the region
  int64_t x, y, s, lab, p, yd, meta, total;         // byte offsets and total size
};

SIMCLR_HD SmemLayout smem_layout(int64_t elem_bytes, int64_t acc_bytes, bool with_grad) {
  SmemLayout l{};
  const int64_t pad = smem_pad(elem_bytes);
  l.ld_in = score_chunk(elem_bytes) + pad;
  l.ld_s = kCudaTile + smem_pad(acc_bytes);
  l.ld_p = kCudaTile + pad;
  l.ld_yd = output_chunk(acc_bytes) + pad;
  l.x = 0;
  l.y = l.x + round_up(kCudaTile * l.ld_in * elem_bytes, kCudaSmemAlign);
  l.s = l.y + round_up(kCudaTile * l.ld_in * elem_bytes, kCudaSmemAlign);
  l.lab = l.s + round_up(kCudaTile * l.ld_s * acc_bytes, kCudaSmemAlign);
  l.total = l.lab + round_up(kCudaTile * 8, kCudaSmemAlign);
  l.p = l.yd = l.meta = -1;
  if (with_grad) {
    l.p = l.total;
    l.yd = l.p + round_up(kCudaTile * l.ld_p * elem_bytes, kCudaSmemAlign);
    l.meta = l.yd + round_up(kCudaTile * l.ld_yd * elem_bytes, kCudaSmemAlign);
    l.total = l.meta + round_up(3 * kCudaTile * acc_bytes, kCudaSmemAlign);
  }
  return l;
}

// Lane map of the per-row work on a warp's 16 x kCudaTile score strip: lane l serves row (l & 15) and
// the half (l >> 4) of the columns; its c-th column (c < 32) is rotated by the lane so that the 32 reads
// of a step fall on 32 distinct banks of the float score strip (row stride 68 words: bank 5r + c + 16 h;
// a rotation by the row alone put the two halves on the same 16 banks, a 2-way conflict).
SIMCLR_HDC int strip_row(int lane) { return lane & 15; }
SIMCLR_HDC int strip_col(int lane, int c) { return (lane >> 4) * 32 + ((c + lane) & 31); }

// Lane map of the SIMT (exact fp32 / fp64) products on a warp's 16-row strip: lane l owns rows
// (l >> 3) + 4 r (r < 4) and columns (l & 7) + 8 c, so that the 8 lanes of a row group read 8 distinct
// banks of the other operand.
SIMCLR_HDC int simt_row(int lane, int r) { return (lane >> 3) + 4 * r; }
SIMCLR_HDC int simt_col(int lane, int c) { return (lane & 7) + 8 * c; }

// Power of two in (m / 2, m] (1 when m is not positive and finite). The backward divides dL/dcos by it
// before the products and multiplies the sums back, so that float16 operands neither underflow
// (dL/dcos ~ 1 / (2N) for the mean over a large batch) nor overflow: |dL/dcos| <= m gives operands of
// magnitude < 2. A power of two keeps the scaling exact in every format. m is taken over the rows that
// have a positive (the others' gradients are 0 whatever their incoming gradient), times max(1, |w|) with
// DCLW's weights. What remains: an operand is g p / m with p a softmax probability, ~1 / L for the
// negatives of a row, and float16's smallest normal is 2^-14 = 1 / 16384: from L ~ 16k keys those terms
// are float16 subnormals (one bit of precision less per doubling of L; zero below 2^-24, L ~ 16M). They
// are the small terms of each sum, but for L >= 16k prefer bfloat16 (float32's exponent range).
template <typename acc_t>
SIMCLR_HD acc_t pow2_scale(acc_t m) {
  if (!(m > acc_t(0)) || !(m <= std::numeric_limits<acc_t>::max())) return acc_t(1);
  int e = 0;
  frexp(m, &e);  // m = f 2^e with f in [0.5, 1)
  return ldexp(acc_t(1), e - 1);
}

// Splits of the streamed tiles. A launch with few row tiles (2N = 16384 gives 256) leaves most SMs idle,
// so the other rows' tiles are cut into `splits` contiguous ranges, one per block (grid.y in forward,
// grid.z in backward); each writes partial results that a second kernel sums in split order, which keeps
// the result deterministic. Splits are only added until every SM has `blocks_per_sm` blocks.
// The blocks per SM are also the kernels' __launch_bounds__ (ptxas then caps the registers to fit them):
// forward 4 (<= 128 registers, ~52 KB of shared memory; float64: 165 registers, 68 KB: 3), backward 2
// (191-246 registers, ~80 KB of shared memory for 16-bit inputs; float64: 135 KB: 1).
constexpr int64_t kCudaMaxSplits = 8;
SIMCLR_HDC int64_t fwd_blocks_per_sm(int64_t elem_bytes) { return elem_bytes == 8 ? 3 : 4; }
SIMCLR_HDC int64_t bwd_blocks_per_sm(int64_t elem_bytes) { return elem_bytes == 8 ? 1 : 2; }

SIMCLR_HDC int64_t num_splits(int64_t base_blocks, int64_t tiles, int64_t sm_count, int64_t blocks_per_sm) {
  int64_t s = ceil_div(blocks_per_sm * sm_count, base_blocks);
  if (s > kCudaMaxSplits) s = kCudaMaxSplits;
  if (s > tiles) s = tiles;
  return s < 1 ? 1 : s;
}
// Split `split` of `splits` streams tiles [split_begin(split), split_begin(split + 1)).
SIMCLR_HDC int64_t split_begin(int64_t tiles, int64_t splits, int64_t split) { return split * tiles / splits; }

// Launch plan of one forward / backward call: grids and dynamic shared memory.
struct CudaPlan {
  int64_t rows_q, rows_k;   // padded rows of the normalized copies
  int64_t dim;              // padded D
  int64_t score_chunks;     // chunks of D per score tile
  int64_t out_chunks;       // grid.y of the backward kernels
  int64_t grid_q, grid_k;   // grid.x: row tiles of q (forward, dQ) and of k (dK)
  int64_t tiles_q, tiles_k; // real (not all-padding) tiles of q and k
  int64_t splits_fwd, splits_dq, splits_dk;  // grid.y of forward, grid.z of the dQ and dK passes
  int64_t norm_grid_q, norm_grid_k;  // normalize and normalization-backward kernels (a warp per row)
  int64_t smem_fwd, smem_bwd;
};

SIMCLR_HD CudaPlan make_cuda_plan(int64_t m, int64_t l, int64_t d, int64_t elem_bytes, int64_t acc_bytes,
                                  int64_t sm_count) {
  CudaPlan p{};
  p.rows_q = padded_rows(m);
  p.rows_k = padded_rows(l);
  p.dim = padded_dim(d);
  p.score_chunks = ceil_div(p.dim, score_chunk(elem_bytes));
  p.out_chunks = ceil_div(p.dim, output_chunk(acc_bytes));
  p.grid_q = p.rows_q / kCudaTile;
  p.grid_k = p.rows_k / kCudaTile;
  p.tiles_q = ceil_div(m, kCudaTile);
  p.tiles_k = ceil_div(l, kCudaTile);
  p.splits_fwd = num_splits(p.grid_q, p.tiles_k, sm_count, fwd_blocks_per_sm(elem_bytes));
  p.splits_dq = num_splits(p.grid_q * p.out_chunks, p.tiles_k, sm_count, bwd_blocks_per_sm(elem_bytes));
  p.splits_dk = num_splits(p.grid_k * p.out_chunks, p.tiles_q, sm_count, bwd_blocks_per_sm(elem_bytes));
  p.norm_grid_q = ceil_div(p.rows_q, kCudaNormRowsPerBlock);
  p.norm_grid_k = ceil_div(p.rows_k, kCudaNormRowsPerBlock);
  p.smem_fwd = smem_layout(elem_bytes, acc_bytes, false).total;
  p.smem_bwd = smem_layout(elem_bytes, acc_bytes, true).total;
  return p;
}

}  // namespace ntxent
}  // namespace simclr_ext
