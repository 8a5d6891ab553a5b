// CPU forward and backward of the contrastive op (math in ntxent.h).
//
// Forward, streamed: query rows are processed in blocks of kCpuRowBlock against key tiles of kCpuKeyBlock;
// each tile of cosines comes from one BLAS product of the normalized rows and is consumed at once (online
// log-sum-exp), so the M x L matrix never exists. Extra memory is the normalized copies of q and k, their
// gradients, and one tile per thread.
// Forward, kept (small problems, when the caller asks for it: keep_probs): each row block's full row of
// cosines is written straight into an M x L buffer of softmax probabilities, which the op returns and the
// backward reads instead of recomputing scores and exps. simclr_ext/ops.py asks for it only below a size
// limit (see _KEEP_PROBS_MAX_ELEMENTS there for how it was chosen).
//
// Backward, in every case each output row is owned by exactly one task, which accumulates it in a fixed
// order: the result is deterministic whatever the thread count, and no per-thread copy of dk is needed.
//   symmetric (q is k, same labels, self_offset 0): S is symmetric, dL/dzhat = (dS + dS^T) zhat: one pass
//       over row blocks, each tile recomputed once (or read from the kept probabilities) into
//       H = dS + dS^T and multiplied once: three GEMM passes in all (two with kept probabilities).
//   general: a dq pass over query blocks and a dk pass over key blocks, each recomputing its tiles from
//       the saved log-sum-exp (or reading the kept probabilities).
// Which path ran is counted (ntxent_paths.h) so that tests can assert it.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <optional>
#include <string>
#include <limits>
#include <vector>

#include "ntxent/ntxent.h"
#include "ntxent/ntxent_checks.h"
#include "ntxent/ntxent_paths.h"

namespace simclr_ext {
namespace ntxent {
namespace {

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Rows of x divided by max(|x|, eps), in the accumulation dtype, and the divisors used.
template <typename scalar_t, typename acc_t>
void normalize_rows(const at::Tensor& x, at::Tensor& hat, at::Tensor& norms) {
  const int64_t rows = x.size(0), d = x.size(1);
  const scalar_t* src = x.data_ptr<scalar_t>();
  acc_t* dst = hat.data_ptr<acc_t>();
  acc_t* divisor = norms.data_ptr<acc_t>();
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* in = src + r * d;
      acc_t* out = dst + r * d;
      acc_t sum_squares = 0;
      for (int64_t c = 0; c < d; ++c) {
        const acc_t v = static_cast<acc_t>(in[c]);
        sum_squares += v * v;
      }
      const acc_t norm = clamped_norm(sum_squares);
      for (int64_t c = 0; c < d; ++c) out[c] = static_cast<acc_t>(in[c]) / norm;
      // Backward tells a clamped norm by this sign: it then skips the projection term.
      divisor[r] = norm_clamped(sum_squares) ? -norm : norm;
    }
  });
}

struct Normalized {
  at::Tensor hat;        // (rows, D), accumulation dtype
  at::Tensor norms;      // (rows,), max(|x|, eps), negative where the norm was clamped
};

template <typename scalar_t, typename acc_t>
Normalized normalize(const at::Tensor& x) {
  const at::Tensor xc = x.contiguous();
  const auto acc = acc_type(x.scalar_type());
  Normalized n{at::empty(xc.sizes(), xc.options().dtype(acc)), at::empty({xc.size(0)}, xc.options().dtype(acc))};
  normalize_rows<scalar_t, acc_t>(xc, n.hat, n.norms);
  return n;
}

// dz = (dzhat - zhat <zhat, dzhat>) / |z| for every row (dzhat / eps where the norm was clamped),
// written in the input dtype. `radial` (nullable) gets the dots <zhat, dzhat> of every row, clamped ones
// included: the temperature's gradient is their sum (ntxent.h).
template <typename scalar_t, typename acc_t>
at::Tensor normalization_backward(const Normalized& n, const at::Tensor& dhat, at::ScalarType out_dtype,
                                  acc_t* radial = nullptr) {
  const int64_t rows = dhat.size(0), d = dhat.size(1);
  at::Tensor dz = at::empty({rows, d}, dhat.options().dtype(out_dtype));
  const acc_t* zhat = n.hat.data_ptr<acc_t>();
  const acc_t* norms = n.norms.data_ptr<acc_t>();
  const acc_t* g = dhat.data_ptr<acc_t>();
  scalar_t* out = dz.data_ptr<scalar_t>();
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const acc_t* zr = zhat + r * d;
      const acc_t* gr = g + r * d;
      const bool clamped = norms[r] < 0;
      const acc_t norm = clamped ? -norms[r] : norms[r];
      acc_t dot = 0;
      for (int64_t c = 0; c < d; ++c) dot += zr[c] * gr[c];
      if (radial != nullptr) radial[r] = dot;
      const acc_t projected = clamped ? acc_t(0) : dot;
      for (int64_t c = 0; c < d; ++c) out[r * d + c] = static_cast<scalar_t>((gr[c] - zr[c] * projected) / norm);
    }
  });
  return dz;
}

// Row-major products of raw buffers through at::mm_out on borrowed views (at::from_blob: no allocation,
// no copy). The kernels hold plain pointers so that the per-element loops stay free of tensor
// indexing; only the products go through ATen (and BLAS).
template <typename acc_t>
at::Tensor view(const acc_t* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<acc_t*>(p), {rows, cols}, {ld, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
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

// C (rows x cols, ldc) = A (rows x d, lda) B^T (B: cols x d, ldb).
template <typename acc_t>
void gemm_abt(int64_t rows, int64_t cols, int64_t d, const acc_t* a, int64_t lda, const acc_t* b, int64_t ldb,
              acc_t* c, int64_t ldc) {
  product<acc_t>(view(c, rows, cols, ldc), view(a, rows, d, lda), view(b, cols, d, ldb).t(), false);
}
// C (rows x d, ldc) (+)= A (rows x k, lda) B (k x d, ldb).
template <typename acc_t>
void gemm_ab(int64_t rows, int64_t d, int64_t k, const acc_t* a, int64_t lda, const acc_t* b, int64_t ldb,
             bool accumulate, acc_t* c, int64_t ldc) {
  product<acc_t>(view(c, rows, d, ldc), view(a, rows, k, lda), view(b, k, d, ldb), accumulate);
}
// C (rows x d, ldc) (+)= A^T (A: k x rows, lda) B (k x d, ldb).
template <typename acc_t>
void gemm_atb(int64_t rows, int64_t d, int64_t k, const acc_t* a, int64_t lda, const acc_t* b, int64_t ldb,
              bool accumulate, acc_t* c, int64_t ldc) {
  product<acc_t>(view(c, rows, d, ldc), view(a, k, rows, lda).t(), view(b, k, d, ldb), accumulate);
}

// Per-row results of the forward for one query row.
template <typename acc_t>
struct RowState {
  OnlineLSE<acc_t> lse = OnlineLSE<acc_t>::empty();
  acc_t positive_sum = 0;
  int64_t num_positives = 0;
};

template <typename acc_t>
void finish_row(const RowState<acc_t>& st, int64_t row, acc_t* loss, acc_t* lse, int32_t* npos, const acc_t* weight) {
  lse[row] = st.lse.value();
  loss[row] = row_loss(lse[row], st.positive_sum, st.num_positives, weight != nullptr ? weight[row] : acc_t(1));
  npos[row] = static_cast<int32_t>(st.num_positives);
}

// The hot loops below are written as plain passes over contiguous arrays (no per-element branches,
// labels or indices) so that the compiler vectorizes them; the few positives and the single self
// entry of a row are handled by scalar fix-ups afterwards. They are compiled twice, for AVX2+FMA and
// for the baseline ISA, and the loader picks the version the CPU supports.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SIMCLR_HOT_LOOP __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SIMCLR_HOT_LOOP
#endif

// Whether any of labels[0, n) equals `label`: a vectorized pre-check, since most tiles hold no
// positive of a given row and the scalar loop that handles positives is then skipped.
SIMCLR_HOT_LOOP inline bool any_label(const int64_t* labels, int64_t n, int64_t label) {
  int64_t hits = 0;
#pragma omp simd reduction(+ : hits)
  for (int64_t j = 0; j < n; ++j) hits += labels[j] == label ? 1 : 0;
  return hits > 0;
}

// Turns one row of cosines (keys [key0, key0 + n)) into logits in place (self entry: -inf, and the
// positives' too with exclude_positives), adds its positives to the row's state and returns the row's
// maximum logit (NaN skipped; -inf when none).
template <typename acc_t>
SIMCLR_HOT_LOOP acc_t logits_row(acc_t* row, int64_t n, int64_t key0, int64_t self, int64_t label,
                                 const int64_t* k_labels, acc_t inv_t, bool exclude_positives, RowState<acc_t>& st) {
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) row[j] = logit(row[j], inv_t);
  if (self >= key0 && self < key0 + n) row[self - key0] = neg_inf;
  if (any_label(k_labels, n, label)) {
    for (int64_t j = 0; j < n; ++j) {
      if (k_labels[j] == label && key0 + j != self) {
        st.positive_sum += row[j];
        st.num_positives += 1;
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
    if (row[j] != row[j]) st.lse.merge(row[j], row[j]);
  }
}

// Folds one row of a cosine tile (keys [key0, key0 + n)) into the row's running state. Overwrites
// `row` with logits.
template <typename acc_t>
SIMCLR_HOT_LOOP void scan_tile_row(acc_t* row, int64_t n, int64_t key0, int64_t self, int64_t label,
                                   const int64_t* k_labels, acc_t inv_t, bool exclude_positives,
                                   RowState<acc_t>& st) {
  const acc_t block_max = logits_row(row, n, key0, self, label, k_labels, inv_t, exclude_positives, st);
  if (block_max == -std::numeric_limits<acc_t>::infinity()) {
    merge_nans(row, n, st);
    return;
  }
  // A NaN logit is skipped by the max above but makes block_sum NaN, so it still reaches the result.
  acc_t block_sum = 0;
#pragma omp simd reduction(+ : block_sum)
  for (int64_t j = 0; j < n; ++j) block_sum += fast_exp(row[j] - block_max);
  st.lse.merge(block_max, block_sum);
}

// Turns a full row of cosines (all L keys) into the row's softmax probabilities in place (self entry: 0)
// and its state. One exp per entry, as in the streamed forward; the backward then needs none.
template <typename acc_t>
SIMCLR_HOT_LOOP void probs_row(acc_t* row, int64_t n, int64_t self, int64_t label, const int64_t* k_labels,
                               acc_t inv_t, bool exclude_positives, RowState<acc_t>& st) {
  const acc_t row_max = logits_row(row, n, 0, self, label, k_labels, inv_t, exclude_positives, st);
  if (row_max == -std::numeric_limits<acc_t>::infinity()) {
    merge_nans(row, n, st);
    for (int64_t j = 0; j < n; ++j) row[j] = row[j] != row[j] ? row[j] : acc_t(0);
    return;
  }
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const acc_t e = fast_exp(row[j] - row_max);
    row[j] = e;
    sum += e;
  }
  st.lse.merge(row_max, sum);
  const acc_t inv_sum = acc_t(1) / sum;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) row[j] *= inv_sum;
}

// Forward inputs and outputs of one call (pointers into contiguous tensors).
template <typename acc_t>
struct ForwardArgs {
  const acc_t* qhat;
  const acc_t* khat;
  int64_t m, l, d;
  const int64_t* q_labels;
  const int64_t* k_labels;
  acc_t inv_t;
  int64_t self_offset;
  bool exclude_positives;  // DCL
  const acc_t* weight;     // DCLW's weights of the positive term, or null
  acc_t* loss;
  acc_t* lse;
  int32_t* npos;
};

template <typename acc_t>
void forward_streamed(const ForwardArgs<acc_t>& a) {
  at::parallel_for(0, ceil_div(a.m, kCpuRowBlock), 1, [&](int64_t rb_begin, int64_t rb_end) {
    std::vector<acc_t> buffer(kCpuRowBlock * kCpuKeyBlock);
    std::vector<RowState<acc_t>> states(kCpuRowBlock);
    for (int64_t rb = rb_begin; rb < rb_end; ++rb) {
      const int64_t r0 = rb * kCpuRowBlock, rows = std::min(kCpuRowBlock, a.m - r0);
      std::fill(states.begin(), states.end(), RowState<acc_t>{});
      for (int64_t k0 = 0; k0 < a.l; k0 += kCpuKeyBlock) {
        const int64_t keys = std::min(kCpuKeyBlock, a.l - k0);
        // The backward recomputes this tile with exactly this call (same operands, shape and order).
        gemm_abt(rows, keys, a.d, a.qhat + r0 * a.d, a.d, a.khat + k0 * a.d, a.d, buffer.data(), keys);
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t row = r0 + i;
          scan_tile_row(buffer.data() + i * keys, keys, k0, self_key(row, a.self_offset), a.q_labels[row],
                        a.k_labels + k0, a.inv_t, a.exclude_positives, states[i]);
        }
      }
      for (int64_t i = 0; i < rows; ++i) finish_row(states[i], r0 + i, a.loss, a.lse, a.npos, a.weight);
    }
  });
}

// Each row block's cosines go straight into its rows of `probs` (M x L), then become probabilities.
template <typename acc_t>
void forward_kept(const ForwardArgs<acc_t>& a, acc_t* probs) {
  at::parallel_for(0, ceil_div(a.m, kCpuRowBlock), 1, [&](int64_t rb_begin, int64_t rb_end) {
    for (int64_t rb = rb_begin; rb < rb_end; ++rb) {
      const int64_t r0 = rb * kCpuRowBlock, rows = std::min(kCpuRowBlock, a.m - r0);
      acc_t* block = probs + r0 * a.l;
      gemm_abt(rows, a.l, a.d, a.qhat + r0 * a.d, a.d, a.khat, a.d, block, a.l);
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t row = r0 + i;
        RowState<acc_t> st;
        probs_row(block + i * a.l, a.l, self_key(row, a.self_offset), a.q_labels[row], a.k_labels, a.inv_t,
                  a.exclude_positives, st);
        finish_row(st, row, a.loss, a.lse, a.npos, a.weight);
      }
    }
  });
}

// RowFactors (ntxent.h) of every query row, stored as arrays so that the hot loops read a tile's worth of
// the other rows' factors contiguously.
template <typename acc_t>
struct Factors {
  std::vector<acc_t> g, lse, inv_np;

  Factors(const at::Tensor& grad_loss, const at::Tensor& lse_in, const at::Tensor& npos_in, acc_t inv_t,
          const acc_t* weight) {
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
      const RowFactors<acc_t> f = row_factors(gp[i], lp[i], npp[i], inv_t, weight != nullptr ? weight[i] : acc_t(1));
      g[i] = f.g;
      lse[i] = f.lse;
      inv_np[i] = f.inv_np;
    }
  }
  RowFactors<acc_t> operator[](int64_t i) const { return {g[i], lse[i], inv_np[i]}; }
};

// Backward inputs of one call.
template <typename acc_t>
struct BackwardArgs {
  const acc_t* qhat;
  const acc_t* khat;
  int64_t m, l, d;
  const int64_t* q_labels;
  const int64_t* k_labels;
  acc_t inv_t;
  int64_t self_offset;
  const Factors<acc_t>* f;  // of the query rows
  bool exclude_positives;   // DCL: a positive's softmax term is 0 (the kept probabilities already are)
  const acc_t* probs;       // kept softmax probabilities (M x L), or null
};

// General case, recomputed: turns a (queries x keys) tile of cosines into dL/dcos in place; indices global.
template <typename acc_t>
SIMCLR_HOT_LOOP void tile_grad(acc_t* tile, int64_t q0, int64_t nq, int64_t k0, int64_t nk, const BackwardArgs<acc_t>& a) {
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t row = q0 + i, self = self_key(row, a.self_offset), label = a.q_labels[row];
    const RowFactors<acc_t> fi = (*a.f)[row];
    acc_t* t = tile + i * nk;
#pragma omp simd
    for (int64_t j = 0; j < nk; ++j) t[j] = prob_grad(fast_exp(logit(t[j], a.inv_t) - fi.lse), fi, false);
    if (any_label(a.k_labels + k0, nk, label)) {
      for (int64_t j = 0; j < nk; ++j) {
        if (a.k_labels[k0 + j] == label) t[j] = (a.exclude_positives ? acc_t(0) : t[j]) - fi.g * fi.inv_np;
      }
    }
    if (self >= k0 && self < k0 + nk) t[self - k0] = 0;  // also undoes the positive term if it matched
  }
}

// Symmetric case, recomputed: turns a tile of cosines (rows [r0, r0 + nr) x columns [c0, c0 + nc) of the
// one matrix) into H = dS + dS^T in place.
template <typename acc_t>
SIMCLR_HOT_LOOP void symmetric_tile_grad(acc_t* tile, int64_t r0, int64_t nr, int64_t c0, int64_t nc,
                                         const BackwardArgs<acc_t>& a) {
  const Factors<acc_t>& f = *a.f;
  const acc_t* g_col = f.g.data() + c0;
  const acc_t* lse_col = f.lse.data() + c0;
  for (int64_t i = 0; i < nr; ++i) {
    const int64_t row = r0 + i, label = a.q_labels[row];
    const RowFactors<acc_t> fi = f[row];
    acc_t* t = tile + i * nc;
#pragma omp simd
    for (int64_t j = 0; j < nc; ++j) t[j] = symmetric_softmax_part(logit(t[j], a.inv_t), fi, g_col[j], lse_col[j]);
    if (any_label(a.q_labels + c0, nc, label)) {
      for (int64_t j = 0; j < nc; ++j) {
        if (a.q_labels[c0 + j] == label) {
          t[j] = (a.exclude_positives ? acc_t(0) : t[j]) - symmetric_positive_part(fi, f[c0 + j]);
        }
      }
    }
    if (row >= c0 && row < c0 + nc) t[row - c0] = 0;  // the self pair: no term, positive or not
  }
}

// Symmetric case, kept: rows [r0, r0 + nr) of H = dS + dS^T (all n columns) from the probabilities.
template <typename acc_t>
SIMCLR_HOT_LOOP void symmetric_kept_rows(acc_t* h, int64_t r0, int64_t nr, const BackwardArgs<acc_t>& a) {
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
  }
}

// General case, kept: rows [q0, q0 + nq) of dS (all L columns), for the dq pass.
template <typename acc_t>
SIMCLR_HOT_LOOP void kept_query_rows(acc_t* out, int64_t q0, int64_t nq, const BackwardArgs<acc_t>& a) {
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
  }
}

// General case, kept: columns [k0, k0 + nk) of dS, transposed (nk x M), for the dk pass.
template <typename acc_t>
void kept_key_rows(acc_t* out, int64_t k0, int64_t nk, const BackwardArgs<acc_t>& a) {
  for (int64_t i = 0; i < a.m; ++i) {
    const int64_t self = self_key(i, a.self_offset), label = a.q_labels[i];
    const RowFactors<acc_t> fi = (*a.f)[i];
    const acc_t* p = a.probs + i * a.l + k0;
    for (int64_t j = 0; j < nk; ++j) {
      const int64_t key = k0 + j;
      out[j * a.m + i] = key == self ? acc_t(0) : prob_grad(p[j], fi, a.k_labels[key] == label);
    }
  }
}

// dzhat of the symmetric case: one pass over row blocks; each tile is recomputed once (or read from the
// kept probabilities) into H and multiplied once.
template <typename acc_t>
void symmetric_pass(const BackwardArgs<acc_t>& a, acc_t* dz) {
  const int64_t n = a.m, d = a.d;
  at::parallel_for(0, ceil_div(n, kCpuRowBlock), 1, [&](int64_t b_begin, int64_t b_end) {
    std::vector<acc_t> buffer(kCpuRowBlock * (a.probs ? n : kCpuKeyBlock));
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t r0 = b * kCpuRowBlock, rows = std::min(kCpuRowBlock, n - r0);
      if (a.probs) {
        symmetric_kept_rows(buffer.data(), r0, rows, a);
        gemm_ab(rows, d, n, buffer.data(), n, a.khat, d, false, dz + r0 * d, d);
        continue;
      }
      for (int64_t c0 = 0; c0 < n; c0 += kCpuKeyBlock) {
        const int64_t cols = std::min(kCpuKeyBlock, n - c0);
        gemm_abt(rows, cols, d, a.qhat + r0 * d, d, a.khat + c0 * d, d, buffer.data(), cols);  // = the forward's
        symmetric_tile_grad(buffer.data(), r0, rows, c0, cols, a);
        gemm_ab(rows, d, cols, buffer.data(), cols, a.khat + c0 * d, d, c0 != 0, dz + r0 * d, d);
      }
    }
  });
}

// dqhat (for_keys = false: blocks of queries, tiles of keys) or dkhat (for_keys = true: blocks of keys,
// tiles of queries), one owner per output row. Recomputed tiles are always queries x keys, the forward's
// operand order, so that the cosines are the forward's (a pair whose softmax is exactly 1 must cancel
// exactly against its positive term).
template <typename acc_t>
void general_pass(const BackwardArgs<acc_t>& a, bool for_keys, acc_t* grad) {
  const int64_t n_own = for_keys ? a.l : a.m, n_other = for_keys ? a.m : a.l, d = a.d;
  const acc_t* other = for_keys ? a.qhat : a.khat;
  at::parallel_for(0, ceil_div(n_own, kCpuRowBlock), 1, [&](int64_t b_begin, int64_t b_end) {
    std::vector<acc_t> buffer(kCpuRowBlock * (a.probs ? n_other : kCpuKeyBlock));
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t o0 = b * kCpuRowBlock, n_o = std::min(kCpuRowBlock, n_own - o0);
      acc_t* out = grad + o0 * d;
      if (a.probs) {
        if (for_keys) {
          kept_key_rows(buffer.data(), o0, n_o, a);
        } else {
          kept_query_rows(buffer.data(), o0, n_o, a);
        }
        gemm_ab(n_o, d, n_other, buffer.data(), n_other, other, d, false, out, d);
        continue;
      }
      for (int64_t t0 = 0; t0 < n_other; t0 += kCpuKeyBlock) {
        const int64_t n_t = std::min(kCpuKeyBlock, n_other - t0);
        const bool accumulate = t0 != 0;
        if (for_keys) {
          gemm_abt(n_t, n_o, d, a.qhat + t0 * d, d, a.khat + o0 * d, d, buffer.data(), n_o);
          tile_grad(buffer.data(), t0, n_t, o0, n_o, a);
          gemm_atb(n_o, d, n_t, buffer.data(), n_o, a.qhat + t0 * d, d, accumulate, out, d);
        } else {
          gemm_abt(n_o, n_t, d, a.qhat + o0 * d, d, a.khat + t0 * d, d, buffer.data(), n_t);
          tile_grad(buffer.data(), o0, n_o, t0, n_t, a);
          gemm_ab(n_o, d, n_t, buffer.data(), n_t, a.khat + t0 * d, d, accumulate, out, d);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ntxent_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_labels, const at::Tensor& k_labels,
    const at::Tensor& temperature_t, int64_t self_offset, bool allow_tf32, bool keep_probs, bool exclude_positives,
    const std::optional<at::Tensor>& positive_weight) {
  check_forward_args(q, k, q_labels, k_labels, temperature_t, self_offset, positive_weight);
  const double temperature = temperature_t.item<double>();  // a CPU scalar here (checked): no synchronization
  const at::Tensor weight = positive_weight.has_value() ? positive_weight->contiguous() : at::Tensor();
  const int64_t m = q.size(0), l = k.size(0);
  const auto acc = acc_type(q.scalar_type());
  at::Tensor loss = at::empty({m}, q.options().dtype(acc));
  at::Tensor lse = at::empty({m}, q.options().dtype(acc));
  at::Tensor npos = at::empty({m}, q.options().dtype(at::kInt));
  at::Tensor probs = keep_probs ? at::empty({m, l}, q.options().dtype(acc)) : at::empty({0, 0}, q.options().dtype(acc));
  if (m == 0) return {loss, lse, npos, probs};
  count_path(keep_probs ? Path::kCpuForwardKept : Path::kCpuForwardStreamed);
  const at::Tensor ql = q_labels.contiguous(), kl = k_labels.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "ntxent_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Normalized nq = normalize<scalar_t, acc_t>(q);
    const Normalized nk = same_tensor(q, k) ? nq : normalize<scalar_t, acc_t>(k);
    const ForwardArgs<acc_t> args{nq.hat.data_ptr<acc_t>(), nk.hat.data_ptr<acc_t>(), m, l, q.size(1),
                                  ql.data_ptr<int64_t>(), kl.data_ptr<int64_t>(), acc_t(1.0 / temperature),
                                  self_offset, exclude_positives,
                                  weight.defined() ? weight.data_ptr<acc_t>() : nullptr, loss.data_ptr<acc_t>(),
                                  lse.data_ptr<acc_t>(), npos.data_ptr<int32_t>()};
    if (keep_probs) {
      forward_kept(args, probs.data_ptr<acc_t>());
    } else {
      forward_streamed(args);
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> ntxent_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_labels,
    const at::Tensor& k_labels, const at::Tensor& lse, const at::Tensor& npos, const at::Tensor& temperature_t,
    int64_t self_offset, bool allow_tf32, const std::optional<at::Tensor>& probs_in, bool exclude_positives,
    const std::optional<at::Tensor>& positive_weight) {
  check_backward_args(grad_loss, q, k, q_labels, k_labels, lse, npos, temperature_t, self_offset, positive_weight);
  const double temperature = temperature_t.item<double>();  // a CPU scalar here (checked)
  const at::Tensor weight = positive_weight.has_value() ? positive_weight->contiguous() : at::Tensor();
  const at::Tensor probs = probs_in.has_value() ? *probs_in : at::Tensor();
  check_probs(probs, q, k);
  const int64_t m = q.size(0), l = k.size(0), d = q.size(1);
  if (m == 0 || l == 0) {
    return {at::zeros(q.sizes(), q.options()), at::zeros(k.sizes(), k.options()),
            at::zeros({}, q.options().dtype(acc_type(q.scalar_type())))};
  }
  const bool kept = probs.defined() && probs.numel() > 0;
  const bool symmetric = is_symmetric_case(q, k, q_labels, k_labels, self_offset);
  count_path(symmetric ? (kept ? Path::kCpuBackwardSymmetricKept : Path::kCpuBackwardSymmetric)
                       : (kept ? Path::kCpuBackwardGeneralKept : Path::kCpuBackwardGeneral));
  const auto acc = acc_type(q.scalar_type());
  const at::Tensor ql = q_labels.contiguous(), kl = k_labels.contiguous();
  at::Tensor grad_q, grad_k, grad_t;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "ntxent_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t inv_t = acc_t(1.0 / temperature);
    const Factors<acc_t> factors(grad_loss, lse, npos, inv_t, weight.defined() ? weight.data_ptr<acc_t>() : nullptr);
    const Normalized nq = normalize<scalar_t, acc_t>(q);
    const Normalized nk = symmetric || same_tensor(q, k) ? nq : normalize<scalar_t, acc_t>(k);
    const BackwardArgs<acc_t> args{nq.hat.data_ptr<acc_t>(), nk.hat.data_ptr<acc_t>(), m, l, d,
                                   ql.data_ptr<int64_t>(), kl.data_ptr<int64_t>(), inv_t, self_offset, &factors,
                                   exclude_positives, kept ? probs.data_ptr<acc_t>() : nullptr};
    std::vector<acc_t> radial(m);
    at::Tensor dq_hat = at::empty({m, d}, q.options().dtype(acc));
    if (symmetric) {
      // The whole gradient of the one input comes back as grad_q; autograd adds grad_k (zero) to it.
      symmetric_pass(args, dq_hat.data_ptr<acc_t>());
      grad_q = normalization_backward<scalar_t, acc_t>(nq, dq_hat, q.scalar_type(), radial.data());
      grad_k = at::zeros(k.sizes(), k.options());
      grad_t = at::scalar_tensor(temperature_grad(radial, temperature, true), q.options().dtype(acc));
      return;
    }
    general_pass(args, false, dq_hat.data_ptr<acc_t>());
    grad_q = normalization_backward<scalar_t, acc_t>(nq, dq_hat, q.scalar_type(), radial.data());
    grad_t = at::scalar_tensor(temperature_grad(radial, temperature, false), q.options().dtype(acc));
    at::Tensor dk_hat = at::empty({l, d}, q.options().dtype(acc));
    general_pass(args, true, dk_hat.data_ptr<acc_t>());
    grad_k = normalization_backward<scalar_t, acc_t>(nk, dk_hat, k.scalar_type());
  });
  return {grad_q, grad_k, grad_t};
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// Path counters (ntxent_paths.h), shared with the CUDA backend.
namespace {
std::array<std::atomic<int64_t>, static_cast<size_t>(Path::kCount)> g_path_counts{};
constexpr const char* kPathNames[] = {
    "cpu_forward_streamed",  "cpu_forward_kept",   "cpu_backward_symmetric", "cpu_backward_symmetric_kept",
    "cpu_backward_general",  "cpu_backward_general_kept", "cuda_forward",    "cuda_backward_symmetric",
    "cuda_backward_general"};
static_assert(sizeof(kPathNames) / sizeof(kPathNames[0]) == static_cast<size_t>(Path::kCount),
              "one name per path");
}  // namespace

void count_path(Path path) { g_path_counts[static_cast<size_t>(path)].fetch_add(1, std::memory_order_relaxed); }

std::string path_counts() {
  std::string out;
  for (size_t i = 0; i < g_path_counts.size(); ++i) {
    if (i) out += ";";
    out += std::string(kPathNames[i]) + "=" + std::to_string(g_path_counts[i].load(std::memory_order_relaxed));
  }
  return out;
}

void reset_path_counts() {
  for (auto& c : g_path_counts) c.store(0, std::memory_order_relaxed);
}

TORCH_LIBRARY_IMPL(simclr_ext, CPU, m) {
  m.impl("ntxent", &ntxent_forward_cpu);
  m.impl("_ntxent_backward", &ntxent_backward_cpu);
}

}  // namespace ntxent
}  // namespace simclr_ext
