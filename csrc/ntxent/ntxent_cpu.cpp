// CPU forward and backward of the contrastive op (math in ntxent.h).
//
// Tiles come from the raw rows: one BLAS product of raw q and k rows per tile, each entry scaled by the two
// rows' inverse norms (cosine() in ntxent.h), so that no normalized copy of q or k is made (float16 /
// bfloat16 inputs are widened once for BLAS). Extra memory: the inverse norms, one tile per thread and the
// gradients' accumulators (written in place for float32 / float64 inputs).
// Forward, streamed: query rows are processed in blocks of kCpuRowBlock against key tiles of kCpuKeyBlock;
// each tile is consumed at once (online log-sum-exp), so the M x L matrix never exists. two_way (CLIP): the
// same tiles also feed each key column's log-sum-exp, kept per task and merged in task order.
// Forward, kept (small problems, when the caller asks for it: keep_probs): each row block's full row of
// cosines is written straight into an M x L buffer of softmax probabilities, which the op returns and the
// backward reads instead of recomputing scores and exps. simclr_ext/ops.py asks for it only below a size
// limit (see _KEEP_PROBS_MAX_ELEMENTS there for how it was chosen).
//
// Backward. The products run on G = dL/dcos scaled by both rows' inverse norms, against the raw rows; the
// normalization backward turns their results into the gradients.
//   symmetric (q is k, same labels, self_offset 0): S is symmetric, dL/dzhat = (dS + dS^T) zhat: one pass
//       over row blocks, each tile recomputed once (or read from the kept probabilities) into
//       H = dS + dS^T and multiplied once: three GEMM passes in all (two with kept probabilities).
//   general: a dq pass over query blocks and a dk pass over key blocks, each recomputing its tiles from
//       the saved log-sum-exp (or reading the kept probabilities).
//   In both, each output row is owned by exactly one task, which accumulates it in a fixed order: the
//   result is deterministic whatever the thread count.
//   two_way: one pass over query blocks, each tile recomputed once and multiplied twice (dq rows owned,
//       dk accumulated per task and summed in task order: deterministic for a given thread count); four
//       GEMM passes in all.
// Which path ran is counted (ntxent_paths.h) so that tests can assert it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "common/acc_type.h"
#include "common/dispatch.h"
#include "common/simd.h"
#include "ntxent/ntxent.h"
#include "ntxent/ntxent_checks.h"
#include "ntxent/ntxent_paths.h"

// The BLAS products of the tiles (see gemm_abt below): weak, null where libtorch_cpu exports no such symbol.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c, const int* ldc)
    __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace simclr_ext {
namespace ntxent {
namespace {

// One side (q or k) as the kernels read it: the raw rows in the accumulation dtype (the input itself when it
// is contiguous in that dtype: no copy; float16 / bfloat16 are widened once, for BLAS) and their norms. The
// normalized rows are never stored: a tile of cosines is a product of raw rows scaled by the inverse norms.
// Without normalization (dot products as given) the inverse norms are 1: cosine() then returns the dot product
// itself, and the normalization backward is the identity.
template <typename acc_t>
struct Side {
  at::Tensor rows;              // (n, D) contiguous, accumulation dtype
  std::vector<acc_t> inv_norm;  // 1 / max(|x|, eps)
  std::vector<acc_t> norm;      // max(|x|, eps), negative where the norm was clamped
  bool normalized;
  const acc_t* data() const { return rows.data_ptr<acc_t>(); }
};

template <typename acc_t>
Side<acc_t> prepare(const at::Tensor& x, bool normalize) {
  Side<acc_t> side{x.to(acc_type(x.scalar_type())).contiguous(), {}, {}, normalize};
  const int64_t n = x.size(0), d = x.size(1);
  if (!normalize) {
    side.inv_norm.assign(n, acc_t(1));
    side.norm.assign(n, acc_t(1));
    return side;
  }
  side.inv_norm.resize(n);
  side.norm.resize(n);
  const acc_t* src = side.data();
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      acc_t sum_squares = 0;
      for (int64_t c = 0; c < d; ++c) sum_squares += src[r * d + c] * src[r * d + c];
      const acc_t norm = clamped_norm(sum_squares);
      side.inv_norm[r] = acc_t(1) / norm;
      // The normalization backward tells a clamped norm by this sign: it then skips the projection term.
      side.norm[r] = norm_clamped(sum_squares) ? -norm : norm;
    }
  });
  return side;
}

// The backward's products give a_i = sum_j G_ij y_j with G = dL/dcos scaled by both inverse norms, i.e.
// a_i = dzhat_i / max(|z_i|, eps). Turns them into dz_i = (dzhat_i - zhat_i <zhat_i, dzhat_i>) / |z_i|
// (dzhat_i / eps where the norm was clamped), written in the input dtype (in place when that is the
// accumulation dtype). zhat is recomputed as z / |z| (a division, as F.normalize does), so that for D = 1
// the projection cancels exactly. `radial` (nullable) gets <zhat_i, dzhat_i> of every row, clamped ones
// included: the temperature's gradient is their sum (ntxent.h).
template <typename scalar_t, typename acc_t>
at::Tensor normalization_backward(const Side<acc_t>& side, const at::Tensor& a_in, at::ScalarType out_dtype,
                                  acc_t* radial = nullptr) {
  const int64_t rows = a_in.size(0), d = a_in.size(1);
  at::Tensor dz = out_dtype == a_in.scalar_type() ? a_in : at::empty({rows, d}, a_in.options().dtype(out_dtype));
  const acc_t* z = side.data();
  const acc_t* a = a_in.data_ptr<acc_t>();
  scalar_t* out = dz.data_ptr<scalar_t>();
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const acc_t* zr = z + r * d;
      const acc_t* ar = a + r * d;
      const bool clamped = side.norm[r] < 0;
      const acc_t norm = clamped ? -side.norm[r] : side.norm[r];
      acc_t dot = 0;
      for (int64_t c = 0; c < d; ++c) dot += (zr[c] / norm) * (ar[c] * norm);
      if (radial != nullptr) radial[r] = dot;
      // Unnormalized rows (norm 1): no projection, dz = a.
      const acc_t projected = clamped || !side.normalized ? acc_t(0) : dot;
      for (int64_t c = 0; c < d; ++c) {
        out[r * d + c] = static_cast<scalar_t>((ar[c] * norm - (zr[c] / norm) * projected) / norm);
      }
    }
  });
  return dz;
}

// Row-major tile products. They call the BLAS that torch itself calls for at::mm on the CPU (the sgemm_ /
// dgemm_ that libtorch_cpu exports: MKL on x86 wheels) directly: at::mm_out on borrowed views costs a tensor
// construction, a dispatch and argument checks per call, a large share of a 64 x 256 tile's product. The
// symbols (declared at the top of the file) are weak references, bound at load time where libtorch_cpu
// exports them; elsewhere (and for
// shapes past int32 leading dimensions) the products go through at::mm_out on views (at::from_blob: no
// allocation, no copy). Both are the same BLAS routine on the same operands.

template <typename acc_t>
at::Tensor view(const acc_t* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<acc_t*>(p), {rows, cols}, {ld, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
}

bool blas_ints(std::initializer_list<int64_t> values) {
  for (const int64_t v : values) {
    if (v < 1 || v > std::numeric_limits<int>::max()) return false;
  }
  return true;
}

// Column-major BLAS C (m x n, ldc) = op(A) op(B) (+ C), op = transpose where the flag is 'T'. False when
// no BLAS symbol is bound or a size is out of BLAS's range (the caller then uses at::mm_out).
template <typename acc_t>
bool blas_gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, const acc_t* a, int64_t lda, const acc_t* b,
               int64_t ldb, bool accumulate, acc_t* c, int64_t ldc) {
  if (!blas_ints({m, n, k, lda, ldb, ldc})) return false;
  const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
  const int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
  const acc_t one = 1, beta = accumulate ? acc_t(1) : acc_t(0);
  if constexpr (std::is_same_v<acc_t, float>) {
    if (sgemm_ == nullptr) return false;
    sgemm_(&ta, &tb, &mi, &ni, &ki, &one, a, &la, b, &lb, &beta, c, &lc);
  } else {
    if (dgemm_ == nullptr) return false;
    dgemm_(&ta, &tb, &mi, &ni, &ki, &one, a, &la, b, &lb, &beta, c, &lc);
  }
  return true;
}

// Accumulates into c (beta = 1) or overwrites it (beta = 0).
template <typename acc_t>
void product(at::Tensor c, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (accumulate) {
    c.addmm_(a, b);
  } else {
    at::mm_out(c, a, b);
  }
}

// A row-major (r x c, ld) matrix is the column-major (c x r, ld) one: each product below is its transpose
// in BLAS's terms (C^T = B^T A^T), operands swapped.

// C (rows x cols, ldc) = A (rows x d, lda) B^T (B: cols x d, ldb).
template <typename acc_t>
void gemm_abt(int64_t rows, int64_t cols, int64_t d, const acc_t* a, int64_t lda, const acc_t* b, int64_t ldb, acc_t* c,
              int64_t ldc) {
  if (blas_gemm('T', 'N', cols, rows, d, b, ldb, a, lda, false, c, ldc)) return;
  product<acc_t>(view(c, rows, cols, ldc), view(a, rows, d, lda), view(b, cols, d, ldb).t(), false);
}
// C (rows x d, ldc) (+)= A (rows x k, lda) B (k x d, ldb).
template <typename acc_t>
void gemm_ab(int64_t rows, int64_t d, int64_t k, const acc_t* a, int64_t lda, const acc_t* b, int64_t ldb,
             bool accumulate, acc_t* c, int64_t ldc) {
  if (blas_gemm('N', 'N', d, rows, k, b, ldb, a, lda, accumulate, c, ldc)) return;
  product<acc_t>(view(c, rows, d, ldc), view(a, rows, k, lda), view(b, k, d, ldb), accumulate);
}
// C (rows x d, ldc) (+)= A^T (A: k x rows, lda) B (k x d, ldb).
template <typename acc_t>
void gemm_atb(int64_t rows, int64_t d, int64_t k, const acc_t* a, int64_t lda, const acc_t* b, int64_t ldb,
              bool accumulate, acc_t* c, int64_t ldc) {
  if (blas_gemm('N', 'T', d, rows, k, b, ldb, a, lda, accumulate, c, ldc)) return;
  product<acc_t>(view(c, rows, d, ldc), view(a, k, rows, lda).t(), view(b, k, d, ldb), accumulate);
}

// A row's log-sum-exp over its key tiles. double: the online (max, sum of exp(x - max)) merge of ntxent.h.
template <typename acc_t>
struct RowLse {
  OnlineLSE<acc_t> lse = OnlineLSE<acc_t>::empty();

  void add_block(const acc_t* x, int64_t n, acc_t block_max) {
    acc_t block_sum = 0;
    // A NaN logit is skipped by the max but makes block_sum NaN, so it still reaches the result.
#pragma omp simd reduction(+ : block_sum)
    for (int64_t j = 0; j < n; ++j) block_sum += fast_exp(x[j] - block_max);
    lse.merge(block_max, block_sum);
  }
  void add_nan(acc_t nan) { lse.merge(nan, nan); }
  void set_full(acc_t row_max, double sum) { lse.merge(row_max, static_cast<acc_t>(sum)); }
  acc_t value() const { return lse.value(); }
};

// exp(x) 2^-ref as a float: exp(x) = p 2^k with k = round(x log2 e) and p = exp(x - k ln 2) in [0.7, 1.42]
// (vec_expf's reduction), both functions of x alone, then scaled by the exact power of two 2^(k - ref) (the
// caller keeps k - ref in [-126, 1]: no rounding but in subnormal terms, 2^-126 below the row's max). Plain
// inline, not cloned: it must inline into its (cloned) caller's vectorized loop.
inline float scaled_exp(float x, float ref) {
  const float k = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const float p = exp_reduced(x, k);
  const float e = k - ref < -126.f ? -126.f : k - ref;
  const int32_t bits = (static_cast<int32_t>(e) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

// sum_j exp(x_j) 2^-ref over a tile row, each term a float, summed in double: terms below 2^(ref - 126) count
// as 0, -inf gives 0, NaN stays NaN.
SIMCLR_SIMD_CLONES inline double scaled_exp_sum(const float* x, int64_t n, int32_t ref) {
  const float ref_f = static_cast<float>(ref);
  const float lo = (ref_f - 126.f) * 0.693147181f;
  double sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const float v = x[j];
    const float t = scaled_exp(v > lo ? v : lo, ref_f);
    sum += static_cast<double>(v != v ? v : (v > lo ? t : 0.f));
  }
  return sum;
}

// float: a log-sum-exp that does not depend on the order of the keys (swapping NT-Xent's views permutes them),
// up to double rounding (2^-53 relative, far below float's): each exp(x_j) is p_j 2^(k_j), a function of x_j
// alone, scaled by 2^-ref (ref: the exponent of the row's max so far, which ends as the row max's whatever the
// order) and summed in double; a new max rescales the sum by an exact power of two. Logits beyond +-2^20 (no
// real loss has them) take the online merge instead, in double.
template <>
struct RowLse<float> {
  static constexpr int32_t kEmpty = std::numeric_limits<int32_t>::min();
  static constexpr int32_t kOnline = std::numeric_limits<int32_t>::max();
  int32_t ref = kEmpty;
  double offset = 0;  // kOnline, or the kept path: value = offset + log(acc)
  double acc = 0;

  void add_block(const float* x, int64_t n, float block_max) {
    if (ref == kOnline || !(std::fabs(block_max) < 1048576.f)) return add_online(x, n, block_max);
    const auto k = static_cast<int32_t>(std::nearbyint(block_max * 1.44269504088896341f));
    if (k > ref) {
      acc = ref == kEmpty ? 0.0 : std::ldexp(acc, ref - k);
      ref = k;
    }
    acc += scaled_exp_sum(x, n, ref);
  }
  void add_online(const float* x, int64_t n, float block_max) {
    if (ref != kOnline) {  // switch representation: value = offset + log(acc)
      offset = ref == kEmpty ? double(block_max) : ref * 0.69314718055994531;
      ref = kOnline;
    }
    double block_sum = 0;
    for (int64_t j = 0; j < n; ++j) block_sum += std::exp(double(x[j]) - double(block_max));
    const double new_offset = std::max(offset, double(block_max));
    acc = acc * std::exp(offset - new_offset) + block_sum * std::exp(double(block_max) - new_offset);
    offset = new_offset;
  }
  void add_nan(float nan) { acc = nan; }
  // The kept path's one full row: sum = sum_j exp(x_j - row_max) in double, row_max the row's (order-free).
  void set_full(float row_max, double sum) {
    ref = kOnline;
    offset = row_max;
    acc = sum;
  }
  float value() const {
    if (!(acc > 0)) return acc != acc ? static_cast<float>(acc) : -std::numeric_limits<float>::infinity();
    const double base = ref == kOnline ? offset : ref * 0.69314718055994531;
    return static_cast<float>(base + std::log(acc));
  }
};

// Per-row results of the forward for one query row.
template <typename acc_t>
struct RowState {
  RowLse<acc_t> lse;
  acc_t positive_sum = 0;
  int64_t num_positives = 0;
  // Sigmoid mode: sum_j softplus(z_ij) and sum_j sigmoid(z_ij) (ntxent.h).
  acc_t softplus_sum = 0;
  acc_t sigmoid_sum = 0;
};

template <typename acc_t>
void finish_entry(acc_t lse_value, acc_t positive_sum, int64_t num_positives, int64_t row, acc_t* loss, acc_t* lse,
                  int32_t* npos, const acc_t* weight) {
  lse[row] = lse_value;
  loss[row] = row_loss(lse_value, positive_sum, num_positives, weight != nullptr ? weight[row] : acc_t(1));
  npos[row] = static_cast<int32_t>(num_positives);
}

template <typename acc_t>
void finish_row(const RowState<acc_t>& st, int64_t row, acc_t* loss, acc_t* lse, int32_t* npos, const acc_t* weight) {
  finish_entry(st.lse.value(), st.positive_sum, st.num_positives, row, loss, lse, npos, weight);
}

// Sigmoid mode: loss_i = sum_j softplus(z_ij) - sum_{j in P(i)} z_ij (positive_sum holds the positives' z); the
// lse slot gets sum_j sigmoid(z_ij), which dL/dbias needs (ntxent.h).
template <typename acc_t>
void finish_sigmoid_row(const RowState<acc_t>& st, int64_t row, acc_t* loss, acc_t* lse, int32_t* npos) {
  loss[row] = st.softplus_sum - st.positive_sum;
  lse[row] = st.sigmoid_sum;
  npos[row] = static_cast<int32_t>(st.num_positives);
}

// The hot loops below are written as plain passes over contiguous arrays (no per-element branches,
// labels or indices) so that the compiler vectorizes them; the few positives and the single self
// entry of a row are handled by scalar fix-ups afterwards. Their callers reach them through simd_dispatch,
// which compiles them once per ISA clone (csrc/common/simd.h) and runs the clone cpu_isa() names.

// Whether any of labels[0, n) equals `label`: a vectorized pre-check, since most tiles hold no
// positive of a given row and the scalar loop that handles positives is then skipped.
SIMCLR_SIMD_CLONES inline bool any_label(const int64_t* labels, int64_t n, int64_t label) {
  int64_t hits = 0;
#pragma omp simd reduction(+ : hits)
  for (int64_t j = 0; j < n; ++j) hits += labels[j] == label ? 1 : 0;
  return hits > 0;
}

// Running state of the key columns in the two-way forward (CLIP): each column's log-sum-exp over the query
// rows, its positives' logit sum and count. A task keeps its own; they are merged in task order.
template <typename acc_t>
struct ColumnStates {
  std::vector<OnlineLSE<acc_t>> lse;
  std::vector<acc_t> positive_sum;
  std::vector<int64_t> num_positives;

  explicit ColumnStates(int64_t l = 0)
      : lse(l, OnlineLSE<acc_t>::empty()), positive_sum(l, acc_t(0)), num_positives(l, 0) {}

  void merge(const ColumnStates& o) {
    for (size_t j = 0; j < lse.size(); ++j) {
      lse[j].merge(o.lse[j].max, o.lse[j].sum);
      positive_sum[j] += o.positive_sum[j];
      num_positives[j] += o.num_positives[j];
    }
  }
};

// Turns one row of raw dot products (keys [key0, key0 + n); rk: their inverse norms) into logits in place
// (self entry: -inf, and the positives' too with exclude_positives), adds its positives to the row's state
// (and to the key columns' with `cols`, two-way) and returns the row's maximum logit (NaN skipped; -inf when
// none).
template <typename acc_t>
SIMCLR_SIMD_CLONES acc_t logits_row(acc_t* row, int64_t n, int64_t key0, int64_t self, int64_t label,
                                    const int64_t* k_labels, acc_t inv_t, acc_t rq, const acc_t* rk,
                                    bool exclude_positives, RowState<acc_t>& st, ColumnStates<acc_t>* cols) {
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) row[j] = logit(cosine(row[j], rq, rk[j]), inv_t);
  if (self >= key0 && self < key0 + n) row[self - key0] = neg_inf;
  if (any_label(k_labels, n, label)) {
    for (int64_t j = 0; j < n; ++j) {
      if (k_labels[j] == label && key0 + j != self) {
        st.positive_sum += row[j];
        st.num_positives += 1;
        if (cols != nullptr) {
          cols->positive_sum[key0 + j] += row[j];
          cols->num_positives[key0 + j] += 1;
        }
        if (exclude_positives) row[j] = neg_inf;  // DCL: out of the denominator
      }
    }
  }
  acc_t block_max = neg_inf;
#pragma omp simd reduction(max : block_max)
  for (int64_t j = 0; j < n; ++j) block_max = row[j] > block_max ? row[j] : block_max;
  return block_max;
}

// Only the self key, or only NaN: NaN must still poison the row.
template <typename acc_t>
void merge_nans(const acc_t* row, int64_t n, RowState<acc_t>& st) {
  for (int64_t j = 0; j < n; ++j) {
    if (row[j] != row[j]) st.lse.add_nan(row[j]);
  }
}

// Folds one row of a tile of raw dot products (keys [key0, key0 + n)) into the row's running state.
// Overwrites `row` with logits.
template <typename acc_t>
SIMCLR_SIMD_CLONES void scan_tile_row(acc_t* row, int64_t n, int64_t key0, int64_t self, int64_t label,
                                      const int64_t* k_labels, acc_t inv_t, acc_t rq, const acc_t* rk,
                                      bool exclude_positives, RowState<acc_t>& st, ColumnStates<acc_t>* cols) {
  const acc_t block_max = logits_row(row, n, key0, self, label, k_labels, inv_t, rq, rk, exclude_positives, st, cols);
  if (block_max == -std::numeric_limits<acc_t>::infinity()) {
    merge_nans(row, n, st);
    return;
  }
  st.lse.add_block(row, n, block_max);
}

// Sigmoid mode: folds one row of a tile of raw dot products (keys [key0, key0 + n)) into the row's sums; every
// entry counts as a negative in the vectorized loop, and the few positives then subtract their z (ntxent.h).
template <typename acc_t>
SIMCLR_SIMD_CLONES void scan_tile_row_sigmoid(acc_t* row, int64_t n, int64_t label, const int64_t* k_labels,
                                              acc_t inv_t, acc_t bias, acc_t rq, const acc_t* rk, RowState<acc_t>& st) {
  acc_t sp = 0, sg = 0;
#pragma omp simd reduction(+ : sp, sg)
  for (int64_t j = 0; j < n; ++j) {
    const acc_t z = logit(cosine(row[j], rq, rk[j]), inv_t) + bias;
    row[j] = z;
    sp += softplus(z);
    sg += sigmoid(z);
  }
  st.softplus_sum += sp;
  st.sigmoid_sum += sg;
  if (!any_label(k_labels, n, label)) return;
  for (int64_t j = 0; j < n; ++j) {
    if (k_labels[j] == label) {
      st.positive_sum += row[j];
      st.num_positives += 1;
    }
  }
}

// Two-way: folds a tile of logits (rows x n keys, from key0) into the key columns' log-sum-exps, a column
// max and a sum of exps per tile (vectorized along the keys). The two-way mode has no -inf entries (no self
// key, no DCL), so a column max of -inf means an all-NaN column, whose sum is then NaN: NaN reaches the loss.
template <typename acc_t>
SIMCLR_SIMD_CLONES void scan_tile_columns(const acc_t* tile, int64_t rows, int64_t n, int64_t key0, acc_t* col_max,
                                          acc_t* col_sum, ColumnStates<acc_t>& cols) {
  std::fill(col_max, col_max + n, -std::numeric_limits<acc_t>::infinity());
  std::fill(col_sum, col_sum + n, acc_t(0));
  for (int64_t i = 0; i < rows; ++i) {
    const acc_t* t = tile + i * n;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) col_max[j] = t[j] > col_max[j] ? t[j] : col_max[j];
  }
  for (int64_t i = 0; i < rows; ++i) {
    const acc_t* t = tile + i * n;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) col_sum[j] += fast_exp(t[j] - col_max[j]);
  }
  for (int64_t j = 0; j < n; ++j) cols.lse[key0 + j].merge(col_max[j], col_sum[j]);
}

// Turns a full row of raw dot products (all L keys) into the row's softmax probabilities in place (self
// entry: 0) and its state. One exp per entry, as in the streamed forward; the backward then needs none.
template <typename acc_t>
SIMCLR_SIMD_CLONES void probs_row(acc_t* row, int64_t n, int64_t self, int64_t label, const int64_t* k_labels,
                                  acc_t inv_t, acc_t rq, const acc_t* rk, bool exclude_positives, RowState<acc_t>& st) {
  const acc_t row_max = logits_row(row, n, 0, self, label, k_labels, inv_t, rq, rk, exclude_positives, st,
                                   static_cast<ColumnStates<acc_t>*>(nullptr));
  if (row_max == -std::numeric_limits<acc_t>::infinity()) {
    merge_nans(row, n, st);
    for (int64_t j = 0; j < n; ++j) row[j] = row[j] != row[j] ? row[j] : acc_t(0);
    return;
  }
  // Summed in double: the row max is the whole row's, so each e_j depends on its logit alone, and the sum (then
  // the log-sum-exp) on the order of the keys only through double rounding.
  double sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const acc_t e = fast_exp(row[j] - row_max);
    row[j] = e;
    sum += static_cast<double>(e);
  }
  st.lse.set_full(row_max, sum);
  const acc_t inv_sum = static_cast<acc_t>(1.0 / sum);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) row[j] *= inv_sum;
}

// The operands of one call, forward and backward: raw rows and inverse norms of both sides, labels and
// options (pointers into contiguous tensors).
template <typename acc_t>
struct Operands {
  const acc_t* q;
  const acc_t* k;
  const acc_t* rq;  // 1 / max(|q_i|, eps)
  const acc_t* rk;
  int64_t m, l, d;
  const int64_t* q_labels;
  const int64_t* k_labels;
  acc_t inv_t;
  int64_t self_offset;
  bool exclude_positives;  // DCL
  bool two_way;            // CLIP: key columns' losses too
  bool sigmoid;            // SigLIP: per-pair sigmoid losses (ntxent.h)
  acc_t bias;              // the sigmoid mode's bias b, 0 otherwise
};

// Outputs of the forward: M entries, M + L with two_way (query rows, then key columns).
template <typename acc_t>
struct ForwardOutputs {
  const acc_t* weight;  // DCLW's weights of the positive term, or null
  acc_t* loss;
  acc_t* lse;
  int32_t* npos;
};

// Contiguous ranges of row blocks, one per task, for passes whose tasks each keep a private accumulator
// (the two-way column states and dk): the split depends only on the thread count, and the accumulators
// are summed in task order, so the result is deterministic for a given thread count.
int64_t num_tasks(int64_t blocks) { return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks)); }

template <typename F>
void for_each_task(int64_t blocks, F&& f) {
  const int64_t tasks = num_tasks(blocks);
  at::parallel_for(0, tasks, 1, [&](int64_t t_begin, int64_t t_end) {
    for (int64_t t = t_begin; t < t_end; ++t) f(t, t * blocks / tasks, (t + 1) * blocks / tasks);
  });
}

// Row blocks [b_begin, b_end) of the streamed forward; `cols` (two-way) gets the key columns' states.
template <typename acc_t>
void forward_blocks(const Operands<acc_t>& a, const ForwardOutputs<acc_t>& out, int64_t b_begin, int64_t b_end,
                    ColumnStates<acc_t>* cols) {
  std::vector<acc_t> buffer(kCpuRowBlock * kCpuKeyBlock);
  std::vector<acc_t> col_max(cols != nullptr ? kCpuKeyBlock : 0), col_sum(col_max.size());
  std::vector<RowState<acc_t>> states(kCpuRowBlock);
  for (int64_t rb = b_begin; rb < b_end; ++rb) {
    const int64_t r0 = rb * kCpuRowBlock, rows = std::min(kCpuRowBlock, a.m - r0);
    std::fill(states.begin(), states.end(), RowState<acc_t>{});
    for (int64_t k0 = 0; k0 < a.l; k0 += kCpuKeyBlock) {
      const int64_t keys = std::min(kCpuKeyBlock, a.l - k0);
      // The backward recomputes this tile with exactly this call (same operands, shape and order).
      gemm_abt(rows, keys, a.d, a.q + r0 * a.d, a.d, a.k + k0 * a.d, a.d, buffer.data(), keys);
      simd_dispatch([&] {
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t row = r0 + i;
          if (a.sigmoid) {
            scan_tile_row_sigmoid(buffer.data() + i * keys, keys, a.q_labels[row], a.k_labels + k0, a.inv_t, a.bias,
                                  a.rq[row], a.rk + k0, states[i]);
            continue;
          }
          scan_tile_row(buffer.data() + i * keys, keys, k0, self_key(row, a.self_offset), a.q_labels[row],
                        a.k_labels + k0, a.inv_t, a.rq[row], a.rk + k0, a.exclude_positives, states[i], cols);
        }
        if (cols != nullptr) scan_tile_columns(buffer.data(), rows, keys, k0, col_max.data(), col_sum.data(), *cols);
      });
    }
    for (int64_t i = 0; i < rows; ++i) {
      if (a.sigmoid) {
        finish_sigmoid_row(states[i], r0 + i, out.loss, out.lse, out.npos);
      } else {
        finish_row(states[i], r0 + i, out.loss, out.lse, out.npos, out.weight);
      }
    }
  }
}

template <typename acc_t>
void forward_streamed(const Operands<acc_t>& a, const ForwardOutputs<acc_t>& out) {
  const int64_t blocks = ceil_div(a.m, kCpuRowBlock);
  if (!a.two_way) {
    at::parallel_for(0, blocks, 1, [&](int64_t b_begin, int64_t b_end) {
      forward_blocks(a, out, b_begin, b_end, static_cast<ColumnStates<acc_t>*>(nullptr));
    });
    return;
  }
  std::vector<ColumnStates<acc_t>> cols(num_tasks(blocks), ColumnStates<acc_t>(a.l));
  for_each_task(blocks,
                [&](int64_t t, int64_t b_begin, int64_t b_end) { forward_blocks(a, out, b_begin, b_end, &cols[t]); });
  for (size_t t = 1; t < cols.size(); ++t) cols[0].merge(cols[t]);
  for (int64_t j = 0; j < a.l; ++j) {
    finish_entry(cols[0].lse[j].value(), cols[0].positive_sum[j], cols[0].num_positives[j], a.m + j, out.loss, out.lse,
                 out.npos, static_cast<const acc_t*>(nullptr));
  }
}

// Each row block's dot products go straight into its rows of `probs` (M x L), then become probabilities.
template <typename acc_t>
void forward_kept(const Operands<acc_t>& a, const ForwardOutputs<acc_t>& out, acc_t* probs) {
  at::parallel_for(0, ceil_div(a.m, kCpuRowBlock), 1, [&](int64_t rb_begin, int64_t rb_end) {
    for (int64_t rb = rb_begin; rb < rb_end; ++rb) {
      const int64_t r0 = rb * kCpuRowBlock, rows = std::min(kCpuRowBlock, a.m - r0);
      acc_t* block = probs + r0 * a.l;
      gemm_abt(rows, a.l, a.d, a.q + r0 * a.d, a.d, a.k, a.d, block, a.l);
      simd_dispatch([&] {
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t row = r0 + i;
          RowState<acc_t> st;
          probs_row(block + i * a.l, a.l, self_key(row, a.self_offset), a.q_labels[row], a.k_labels, a.inv_t, a.rq[row],
                    a.rk, a.exclude_positives, st);
          finish_row(st, row, out.loss, out.lse, out.npos, out.weight);
        }
      });
    }
  });
}

// RowFactors (ntxent.h) of every query row, stored as arrays so that the hot loops read a tile's worth of
// the other rows' factors contiguously.
template <typename acc_t>
struct Factors {
  std::vector<acc_t> g, lse, inv_np;

  // sigmoid: every row has a gradient, and weight 1 on each positive (ntxent.h); lse is not read.
  Factors(const at::Tensor& grad_loss, const at::Tensor& lse_in, const at::Tensor& npos_in, acc_t inv_t,
          const acc_t* weight, bool sigmoid) {
    const int64_t m = lse_in.size(0);
    const at::Tensor gl = grad_loss.to(lse_in.scalar_type()).contiguous();
    const at::Tensor ls = lse_in.contiguous(), np = npos_in.contiguous();
    const acc_t* gp = gl.data_ptr<acc_t>();
    const acc_t* lp = ls.data_ptr<acc_t>();
    const int32_t* npp = np.data_ptr<int32_t>();
    g.resize(m);
    lse.resize(m);
    inv_np.resize(m);
    for (int64_t i = 0; i < m; ++i) {
      const RowFactors<acc_t> f =
          sigmoid ? RowFactors<acc_t>{gp[i] * inv_t, acc_t(0), acc_t(1)}
                  : row_factors(gp[i], lp[i], npp[i], inv_t, weight != nullptr ? weight[i] : acc_t(1));
      g[i] = f.g;
      lse[i] = f.lse;
      inv_np[i] = f.inv_np;
    }
  }
  RowFactors<acc_t> operator[](int64_t i) const { return {g[i], lse[i], inv_np[i]}; }
};

// Backward inputs of one call: the operands, the per-row factors and, when kept, the probabilities.
template <typename acc_t>
struct BackwardArgs : Operands<acc_t> {
  const Factors<acc_t>* f;  // of the query rows (then of the key columns, two-way)
  const acc_t* probs;       // kept softmax probabilities (M x L), or null
};

// dL/dcos -> G = dL/dcos * (1 / |x_i|) (1 / |y_j|) over one tile row: the products then run on the raw rows
// (a_i = sum_j G_ij y_j = dzhat_i / |z_i|, see normalization_backward).
template <typename acc_t>
SIMCLR_SIMD_CLONES void scale_row(acc_t* t, int64_t n, acc_t r_i, const acc_t* r) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) t[j] *= r_i * r[j];
}

// General case, recomputed: turns a (queries x keys) tile of raw dot products into G in place; indices global.
// DCL: a positive's softmax term is 0 (the kept probabilities already are).
template <typename acc_t>
SIMCLR_SIMD_CLONES void tile_grad(acc_t* tile, int64_t q0, int64_t nq, int64_t k0, int64_t nk,
                                  const BackwardArgs<acc_t>& a) {
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t row = q0 + i, self = self_key(row, a.self_offset), label = a.q_labels[row];
    const RowFactors<acc_t> fi = (*a.f)[row];
    const acc_t rq = a.rq[row];
    const acc_t* rk = a.rk + k0;
    acc_t* t = tile + i * nk;
    if (a.sigmoid) {  // p = sigmoid(z): the softmax form otherwise (ntxent.h)
      const acc_t bias = a.bias;
#pragma omp simd
      for (int64_t j = 0; j < nk; ++j)
        t[j] = prob_grad(sigmoid(logit(cosine(t[j], rq, rk[j]), a.inv_t) + bias), fi, false);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < nk; ++j) {
        t[j] = prob_grad(fast_exp(logit(cosine(t[j], rq, rk[j]), a.inv_t) - fi.lse), fi, false);
      }
    }
    if (any_label(a.k_labels + k0, nk, label)) {
      for (int64_t j = 0; j < nk; ++j) {
        if (a.k_labels[k0 + j] == label) t[j] = (a.exclude_positives ? acc_t(0) : t[j]) - fi.g * fi.inv_np;
      }
    }
    if (self >= k0 && self < k0 + nk) t[self - k0] = 0;  // also undoes the positive term if it matched
    scale_row(t, nk, rq, rk);
  }
}

// Both-factor cases, recomputed: turns a (queries x keys) tile of raw dot products into G, dL/dcos with a term
// from row i's factors and one from column j's (ntxent.h): the symmetric case (q is k: column j's factors are
// row j's, H = dS + dS^T) and the two-way case (CLIP: column j's factors are entry M + j). Indices global.
template <typename acc_t>
SIMCLR_SIMD_CLONES void both_factors_tile_grad(acc_t* tile, int64_t q0, int64_t nq, int64_t k0, int64_t nk,
                                               const BackwardArgs<acc_t>& a) {
  const Factors<acc_t>& f = *a.f;
  const int64_t col_base = (a.two_way ? a.m : 0) + k0;
  const acc_t* g_col = f.g.data() + col_base;
  const acc_t* lse_col = f.lse.data() + col_base;
  const acc_t* rk = a.rk + k0;
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t row = q0 + i, self = self_key(row, a.self_offset), label = a.q_labels[row];
    const RowFactors<acc_t> fi = f[row];
    const acc_t rq = a.rq[row];
    acc_t* t = tile + i * nk;
#pragma omp simd
    for (int64_t j = 0; j < nk; ++j) {
      t[j] = symmetric_softmax_part(logit(cosine(t[j], rq, rk[j]), a.inv_t), fi, g_col[j], lse_col[j]);
    }
    if (any_label(a.k_labels + k0, nk, label)) {
      for (int64_t j = 0; j < nk; ++j) {
        if (a.k_labels[k0 + j] == label) {
          t[j] = (a.exclude_positives ? acc_t(0) : t[j]) - symmetric_positive_part(fi, f[col_base + j]);
        }
      }
    }
    if (self >= k0 && self < k0 + nk) t[self - k0] = 0;  // the self pair: no term, positive or not
    scale_row(t, nk, rq, rk);
  }
}

// Symmetric case, kept: rows [r0, r0 + nr) of G from H = dS + dS^T (all n columns) from the probabilities.
template <typename acc_t>
SIMCLR_SIMD_CLONES void symmetric_kept_rows(acc_t* h, int64_t r0, int64_t nr, const BackwardArgs<acc_t>& a) {
  const Factors<acc_t>& f = *a.f;
  const int64_t n = a.m;
  for (int64_t i = 0; i < nr; ++i) {
    const acc_t gi = f.g[r0 + i];
    const acc_t* p = a.probs + (r0 + i) * n;
    acc_t* hr = h + i * n;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) hr[j] = gi * p[j];
  }
  // + g_j p_ji: read column-wise in chunks of 64 rows of P, which stay in L1 across the block's rows.
  constexpr int64_t kChunk = 64;
  for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
    const int64_t nj = std::min(kChunk, n - j0);
    for (int64_t i = 0; i < nr; ++i) {
      const acc_t* pc = a.probs + j0 * n + r0 + i;
      acc_t* hr = h + i * n + j0;
      for (int64_t j = 0; j < nj; ++j) hr[j] += f.g[j0 + j] * pc[j * n];
    }
  }
  for (int64_t i = 0; i < nr; ++i) {
    const int64_t row = r0 + i, label = a.q_labels[row];
    acc_t* hr = h + i * n;
    if (any_label(a.q_labels, n, label)) {
      const RowFactors<acc_t> fi = f[row];
      for (int64_t j = 0; j < n; ++j) {
        if (a.q_labels[j] == label) hr[j] -= symmetric_positive_part(fi, f[j]);
      }
    }
    hr[row] = 0;
    scale_row(hr, n, a.rq[row], a.rq);
  }
}

// General case, kept: rows [q0, q0 + nq) of G (all L columns), for the dq pass.
template <typename acc_t>
SIMCLR_SIMD_CLONES void kept_query_rows(acc_t* out, int64_t q0, int64_t nq, const BackwardArgs<acc_t>& a) {
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t row = q0 + i, self = self_key(row, a.self_offset), label = a.q_labels[row];
    const RowFactors<acc_t> fi = (*a.f)[row];
    const acc_t* p = a.probs + row * a.l;
    acc_t* o = out + i * a.l;
#pragma omp simd
    for (int64_t j = 0; j < a.l; ++j) o[j] = prob_grad(p[j], fi, false);
    if (any_label(a.k_labels, a.l, label)) {
      for (int64_t j = 0; j < a.l; ++j) {
        if (a.k_labels[j] == label) o[j] -= fi.g * fi.inv_np;
      }
    }
    if (self >= 0) o[self] = 0;
    scale_row(o, a.l, a.rq[row], a.rk);
  }
}

// General case, kept: columns [k0, k0 + nk) of G, transposed (nk x M), for the dk pass.
template <typename acc_t>
void kept_key_rows(acc_t* out, int64_t k0, int64_t nk, const BackwardArgs<acc_t>& a) {
  for (int64_t i = 0; i < a.m; ++i) {
    const int64_t self = self_key(i, a.self_offset), label = a.q_labels[i];
    const RowFactors<acc_t> fi = (*a.f)[i];
    const acc_t* p = a.probs + i * a.l + k0;
    for (int64_t j = 0; j < nk; ++j) {
      const int64_t key = k0 + j;
      const acc_t h = key == self ? acc_t(0) : prob_grad(p[j], fi, a.k_labels[key] == label);
      out[j * a.m + i] = h * (a.rq[i] * a.rk[key]);
    }
  }
}

// a = G q (symmetric case): one pass over row blocks; each tile is recomputed once (or read from the kept
// probabilities) into G and multiplied once.
template <typename acc_t>
void symmetric_pass(const BackwardArgs<acc_t>& a, acc_t* dz) {
  const int64_t n = a.m, d = a.d;
  at::parallel_for(0, ceil_div(n, kCpuRowBlock), 1, [&](int64_t b_begin, int64_t b_end) {
    std::vector<acc_t> buffer(kCpuRowBlock * (a.probs ? n : kCpuKeyBlock));
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t r0 = b * kCpuRowBlock, rows = std::min(kCpuRowBlock, n - r0);
      if (a.probs) {
        simd_dispatch([&] { symmetric_kept_rows(buffer.data(), r0, rows, a); });
        gemm_ab(rows, d, n, buffer.data(), n, a.k, d, false, dz + r0 * d, d);
        continue;
      }
      for (int64_t c0 = 0; c0 < n; c0 += kCpuKeyBlock) {
        const int64_t cols = std::min(kCpuKeyBlock, n - c0);
        gemm_abt(rows, cols, d, a.q + r0 * d, d, a.k + c0 * d, d, buffer.data(), cols);  // = the forward's
        simd_dispatch([&] { both_factors_tile_grad(buffer.data(), r0, rows, c0, cols, a); });
        gemm_ab(rows, d, cols, buffer.data(), cols, a.k + c0 * d, d, c0 != 0, dz + r0 * d, d);
      }
    }
  });
}

// a_q = G k (for_keys = false: blocks of queries, tiles of keys) or a_k = G^T q (for_keys = true: blocks of
// keys, tiles of queries), one owner per output row. Recomputed tiles are always queries x keys, the
// forward's operand order, so that the cosines are the forward's (a pair whose softmax is exactly 1 must
// cancel exactly against its positive term).
template <typename acc_t>
void general_pass(const BackwardArgs<acc_t>& a, bool for_keys, acc_t* grad) {
  const int64_t n_own = for_keys ? a.l : a.m, n_other = for_keys ? a.m : a.l, d = a.d;
  const acc_t* other = for_keys ? a.q : a.k;
  at::parallel_for(0, ceil_div(n_own, kCpuRowBlock), 1, [&](int64_t b_begin, int64_t b_end) {
    std::vector<acc_t> buffer(kCpuRowBlock * (a.probs ? n_other : kCpuKeyBlock));
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t o0 = b * kCpuRowBlock, n_o = std::min(kCpuRowBlock, n_own - o0);
      acc_t* out = grad + o0 * d;
      if (a.probs) {
        simd_dispatch([&] {
          if (for_keys) {
            kept_key_rows(buffer.data(), o0, n_o, a);
          } else {
            kept_query_rows(buffer.data(), o0, n_o, a);
          }
        });
        gemm_ab(n_o, d, n_other, buffer.data(), n_other, other, d, false, out, d);
        continue;
      }
      for (int64_t t0 = 0; t0 < n_other; t0 += kCpuKeyBlock) {
        const int64_t n_t = std::min(kCpuKeyBlock, n_other - t0);
        const bool accumulate = t0 != 0;
        if (for_keys) {
          gemm_abt(n_t, n_o, d, a.q + t0 * d, d, a.k + o0 * d, d, buffer.data(), n_o);
          simd_dispatch([&] { tile_grad(buffer.data(), t0, n_t, o0, n_o, a); });
          gemm_atb(n_o, d, n_t, buffer.data(), n_o, a.q + t0 * d, d, accumulate, out, d);
        } else {
          gemm_abt(n_o, n_t, d, a.q + o0 * d, d, a.k + t0 * d, d, buffer.data(), n_t);
          simd_dispatch([&] { tile_grad(buffer.data(), o0, n_o, t0, n_t, a); });
          gemm_ab(n_o, d, n_t, buffer.data(), n_t, a.k + t0 * d, d, accumulate, out, d);
        }
      }
    }
  });
}

// a_q = G k and a_k = G^T q of the two-way case in one pass over query blocks: each tile is recomputed once
// and multiplied for each side asked for (dq null: no a_q; dk_out undefined: no a_k). a_q rows have one
// owner; a_k is accumulated by every task, task 0 into a_k itself and the others into their own copies,
// summed in task order (deterministic for a given thread count).
template <typename acc_t>
void two_way_pass(const BackwardArgs<acc_t>& a, acc_t* dq, at::Tensor& dk_out) {
  const int64_t d = a.d, blocks = ceil_div(a.m, kCpuRowBlock), tasks = num_tasks(blocks);
  const bool with_dk = dk_out.defined();
  std::vector<at::Tensor> copies;
  if (with_dk) {
    dk_out.zero_();
    for (int64_t t = 1; t < tasks; ++t) copies.push_back(at::zeros_like(dk_out));
  }
  for_each_task(blocks, [&](int64_t task, int64_t b_begin, int64_t b_end) {
    acc_t* dk = with_dk ? (task == 0 ? dk_out : copies[task - 1]).template data_ptr<acc_t>() : nullptr;
    std::vector<acc_t> buffer(kCpuRowBlock * kCpuKeyBlock);
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t r0 = b * kCpuRowBlock, rows = std::min(kCpuRowBlock, a.m - r0);
      for (int64_t k0 = 0; k0 < a.l; k0 += kCpuKeyBlock) {
        const int64_t keys = std::min(kCpuKeyBlock, a.l - k0);
        gemm_abt(rows, keys, d, a.q + r0 * d, d, a.k + k0 * d, d, buffer.data(), keys);  // = the forward's
        simd_dispatch([&] { both_factors_tile_grad(buffer.data(), r0, rows, k0, keys, a); });
        if (dq) gemm_ab(rows, d, keys, buffer.data(), keys, a.k + k0 * d, d, k0 != 0, dq + r0 * d, d);
        if (dk) gemm_atb(keys, d, rows, buffer.data(), keys, a.q + r0 * d, d, true, dk + k0 * d, d);
      }
    }
  });
  for (const at::Tensor& c : copies) dk_out.add_(c);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ntxent_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_labels, const at::Tensor& k_labels,
    const at::Tensor& temperature_t, int64_t self_offset, bool allow_tf32, bool keep_probs, bool exclude_positives,
    const std::optional<at::Tensor>& positive_weight, bool two_way, bool normalize, bool sigmoid,
    const std::optional<at::Tensor>& bias) {
  check_forward_args(q, k, q_labels, k_labels, temperature_t, self_offset, positive_weight);
  check_two_way(two_way, self_offset, keep_probs, exclude_positives, positive_weight);
  check_sigmoid(sigmoid, self_offset, keep_probs, exclude_positives, positive_weight, two_way, bias, q);
  const double temperature = temperature_t.item<double>();  // a CPU scalar here (checked): no synchronization
  const double bias_value = bias.has_value() ? bias->item<double>() : 0.0;
  const at::Tensor weight = positive_weight.has_value() ? positive_weight->contiguous() : at::Tensor();
  const int64_t m = q.size(0), l = k.size(0), n_out = two_way ? m + l : m;
  const auto acc = acc_type(q.scalar_type());
  at::Tensor loss = at::empty({n_out}, q.options().dtype(acc));
  at::Tensor lse = at::empty({n_out}, q.options().dtype(acc));
  at::Tensor npos = at::empty({n_out}, q.options().dtype(at::kInt));
  at::Tensor probs = keep_probs ? at::empty({m, l}, q.options().dtype(acc)) : at::empty({0, 0}, q.options().dtype(acc));
  if (m == 0 || (two_way && l == 0)) {  // nothing to score: empty log-sum-exps, no positives
    loss.zero_();
    lse.fill_(-std::numeric_limits<double>::infinity());
    npos.zero_();
    return {loss, lse, npos, probs};
  }
  if (sigmoid && l == 0) {  // no pair: zero sums
    loss.zero_();
    lse.zero_();
    npos.zero_();
    return {loss, lse, npos, probs};
  }
  count_path(keep_probs ? Path::kCpuForwardKept : (two_way ? Path::kCpuForwardTwoWay : Path::kCpuForwardStreamed));
  const at::Tensor ql = q_labels.contiguous(), kl = k_labels.contiguous();
  dispatch_floating(q.scalar_type(), "ntxent_forward_cpu", [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_t_of<scalar_t>;
    const Side<acc_t> sq = prepare<acc_t>(q, normalize);
    std::optional<Side<acc_t>> k_own;  // k's own side, unless k is q
    if (!same_tensor(q, k)) k_own = prepare<acc_t>(k, normalize);
    const Side<acc_t>& sk = k_own ? *k_own : sq;
    const Operands<acc_t> args{sq.data(),
                               sk.data(),
                               sq.inv_norm.data(),
                               sk.inv_norm.data(),
                               m,
                               l,
                               q.size(1),
                               ql.data_ptr<int64_t>(),
                               kl.data_ptr<int64_t>(),
                               acc_t(1.0 / temperature),
                               self_offset,
                               exclude_positives,
                               two_way,
                               sigmoid,
                               acc_t(bias_value)};
    const ForwardOutputs<acc_t> out{weight.defined() ? weight.data_ptr<acc_t>() : nullptr, loss.data_ptr<acc_t>(),
                                    lse.data_ptr<acc_t>(), npos.data_ptr<int32_t>()};
    if (keep_probs) {
      forward_kept(args, out, probs.data_ptr<acc_t>());
    } else {
      forward_streamed(args, out);
    }
  });
  return {loss, lse, npos, probs};
}

// dL/dt = -(1/t) sum_i <dqhat_i, qhat_i> (ntxent.h), halved when the rows count both sides (q is k); summed
// serially in double: deterministic for any thread count.
template <typename acc_t>
double temperature_grad(const std::vector<acc_t>& radial, double temperature, bool both_sides) {
  double sum = 0;
  for (const acc_t r : radial) sum += static_cast<double>(r);
  return -sum / (both_sides ? 2 * temperature : temperature);
}

// Which backward runs (counted in ntxent_paths.h).
Path backward_path(bool symmetric, bool two_way, bool kept) {
  if (two_way) return Path::kCpuBackwardTwoWay;
  if (symmetric) return kept ? Path::kCpuBackwardSymmetricKept : Path::kCpuBackwardSymmetric;
  return kept ? Path::kCpuBackwardGeneralKept : Path::kCpuBackwardGeneral;
}

// Runs the passes the output mask asks for (backward_passes, ntxent_checks.h) and returns the outputs it
// asks for; the others are undefined.
std::tuple<at::Tensor, at::Tensor, at::Tensor> ntxent_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_labels,
    const at::Tensor& k_labels, const at::Tensor& lse, const at::Tensor& npos, const at::Tensor& temperature_t,
    int64_t self_offset, bool allow_tf32, const std::optional<at::Tensor>& probs_in, bool exclude_positives,
    const std::optional<at::Tensor>& positive_weight, bool two_way, OutputMask output_mask, bool normalize,
    bool sigmoid, const std::optional<at::Tensor>& bias) {
  check_backward_args(grad_loss, q, k, q_labels, k_labels, lse, npos, temperature_t, self_offset, positive_weight,
                      two_way);
  const at::Tensor probs = probs_in.has_value() ? *probs_in : at::Tensor();
  check_probs(probs, q, k);
  const bool kept = probs.defined() && probs.numel() > 0;
  check_two_way(two_way, self_offset, kept, exclude_positives, positive_weight);
  check_sigmoid(sigmoid, self_offset, kept, exclude_positives, positive_weight, two_way, bias, q);
  const double temperature = temperature_t.item<double>();  // a CPU scalar here (checked)
  const double bias_value = bias.has_value() ? bias->item<double>() : 0.0;
  const at::Tensor weight = positive_weight.has_value() ? positive_weight->contiguous() : at::Tensor();
  const int64_t m = q.size(0), l = k.size(0), d = q.size(1);
  const auto acc = acc_type(q.scalar_type());
  at::Tensor grad_q, grad_k, grad_t;
  if (m == 0 || l == 0) {
    if (output_mask[0]) grad_q = at::zeros(q.sizes(), q.options());
    if (output_mask[1]) grad_k = at::zeros(k.sizes(), k.options());
    if (output_mask[2]) grad_t = at::zeros({}, q.options().dtype(acc));
    return {grad_q, grad_k, grad_t};
  }
  const bool symmetric = !two_way && is_symmetric_case(q, k, q_labels, k_labels, self_offset);
  const BackwardPasses passes = backward_passes(output_mask, symmetric);
  count_path(backward_path(symmetric, two_way, kept));
  if (passes.dq) count_pass(Pass::kCpuDq);
  if (passes.dk) count_pass(Pass::kCpuDk);
  // The symmetric case's grad_k: the whole gradient of the one input is grad_q (autograd adds zero to it).
  if (symmetric && output_mask[1]) grad_k = at::zeros(k.sizes(), k.options());
  if (!passes.dq && !passes.dk) return {grad_q, grad_k, grad_t};
  const at::Tensor ql = q_labels.contiguous(), kl = k_labels.contiguous();
  dispatch_floating(q.scalar_type(), "ntxent_backward_cpu", [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_t_of<scalar_t>;
    const acc_t inv_t = acc_t(1.0 / temperature);
    const Factors<acc_t> factors(grad_loss, lse, npos, inv_t, weight.defined() ? weight.data_ptr<acc_t>() : nullptr,
                                 sigmoid);
    const Side<acc_t> sq = prepare<acc_t>(q, normalize);
    std::optional<Side<acc_t>> k_own;  // k's own side, unless k is q
    if (!symmetric && !same_tensor(q, k)) k_own = prepare<acc_t>(k, normalize);
    const Side<acc_t>& sk = k_own ? *k_own : sq;
    const BackwardArgs<acc_t> args{
        {sq.data(), sk.data(), sq.inv_norm.data(), sk.inv_norm.data(), m, l, d, ql.data_ptr<int64_t>(),
         kl.data_ptr<int64_t>(), inv_t, self_offset, exclude_positives, two_way, sigmoid, acc_t(bias_value)},
        &factors,
        kept ? probs.data_ptr<acc_t>() : nullptr};
    // The products' outputs a (dzhat / |z|), turned into the gradients in place for float32 / float64.
    at::Tensor a_q = passes.dq ? at::empty({m, d}, q.options().dtype(acc)) : at::Tensor();
    at::Tensor a_k = passes.dk ? at::empty({l, d}, q.options().dtype(acc)) : at::Tensor();
    if (symmetric) {
      symmetric_pass(args, a_q.data_ptr<acc_t>());
    } else if (two_way) {
      two_way_pass(args, passes.dq ? a_q.data_ptr<acc_t>() : nullptr, a_k);
    } else {
      if (passes.dq) general_pass(args, false, a_q.data_ptr<acc_t>());
      if (passes.dk) general_pass(args, true, a_k.data_ptr<acc_t>());
    }
    if (passes.dq) {
      std::vector<acc_t> radial(m);
      const at::Tensor dq = normalization_backward<scalar_t, acc_t>(sq, a_q, q.scalar_type(), radial.data());
      if (output_mask[0]) grad_q = dq;
      if (output_mask[2]) {
        grad_t = at::scalar_tensor(temperature_grad(radial, temperature, symmetric), q.options().dtype(acc));
      }
    }
    if (passes.dk) grad_k = normalization_backward<scalar_t, acc_t>(sk, a_k, k.scalar_type());
  });
  return {grad_q, grad_k, grad_t};
}

}  // namespace

TORCH_LIBRARY_IMPL(simclr_ext, CPU, m) {
  m.impl("ntxent", &ntxent_forward_cpu);
  m.impl("_ntxent_backward", &ntxent_backward_cpu);
}

}  // namespace ntxent
}  // namespace simclr_ext
