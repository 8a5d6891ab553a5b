// CPU forward and backward of the contrastive op (math in ntxent.h).
//
// Query rows are processed in blocks of kCpuRowBlock against key tiles of kCpuKeyBlock: each tile of
// cosines comes from one BLAS product of the normalized rows and is consumed at once (online
// log-sum-exp forward, gradient products backward), so the M x L matrix never exists. Extra memory is
// the normalized copies of q and k, their gradients, and one tile per thread.
//
// Backward runs two passes (dq over query blocks, dk over key blocks), each recomputing its tiles from
// the saved log-sum-exp: every output row is owned by exactly one task, so the result is deterministic
// whatever the thread count, and no per-thread copy of dk is needed.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "ntxent/ntxent.h"
#include "ntxent/ntxent_checks.h"

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

// SimCLR passes one tensor as both queries and keys: normalize it once.
bool same_tensor(const at::Tensor& a, const at::Tensor& b) {
  return a.is_same(b) || (a.data_ptr() == b.data_ptr() && a.sizes() == b.sizes() && a.strides() == b.strides());
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
// written in the input dtype.
template <typename scalar_t, typename acc_t>
at::Tensor normalization_backward(const Normalized& n, const at::Tensor& dhat, at::ScalarType out_dtype) {
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
      if (!clamped) {
        for (int64_t c = 0; c < d; ++c) dot += zr[c] * gr[c];
      }
      for (int64_t c = 0; c < d; ++c) out[r * d + c] = static_cast<scalar_t>((gr[c] - zr[c] * dot) / norm);
    }
  });
  return dz;
}

// A (rows x cols) tile view into a per-thread buffer: contiguous, so BLAS writes it directly.
at::Tensor tile_view(const at::Tensor& buffer, int64_t rows, int64_t cols) {
  return buffer.narrow(0, 0, rows * cols).view({rows, cols});
}

// Per-row results of the forward for one query row.
template <typename acc_t>
struct RowState {
  OnlineLSE<acc_t> lse = OnlineLSE<acc_t>::empty();
  acc_t positive_sum = 0;
  int64_t num_positives = 0;
};

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

// Folds one row of a cosine tile (keys [key0, key0 + n)) into the row's running state. Overwrites
// `row` with logits (self entry: -inf).
template <typename acc_t>
SIMCLR_HOT_LOOP void scan_tile_row(acc_t* row, int64_t n, int64_t key0, int64_t self, int64_t label, const int64_t* k_labels,
                   acc_t inv_t, RowState<acc_t>& st) {
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) row[j] = logit(row[j], inv_t);
  const bool self_here = self >= key0 && self < key0 + n;
  if (self_here) row[self - key0] = neg_inf;
  if (any_label(k_labels, n, label)) {
    for (int64_t j = 0; j < n; ++j) {
      if (k_labels[j] == label && key0 + j != self) {
        st.positive_sum += row[j];
        st.num_positives += 1;
      }
    }
  }
  acc_t block_max = neg_inf;
#pragma omp simd reduction(max : block_max)
  for (int64_t j = 0; j < n; ++j) block_max = row[j] > block_max ? row[j] : block_max;
  if (block_max == neg_inf) {
    // Only the self key, or only NaN: NaN must still poison the row.
    for (int64_t j = 0; j < n; ++j) {
      if (row[j] != row[j]) st.lse.merge(row[j], row[j]);
    }
    return;
  }
  // A NaN logit is skipped by the max above but makes block_sum NaN, so it still reaches the result.
  acc_t block_sum = 0;
#pragma omp simd reduction(+ : block_sum)
  for (int64_t j = 0; j < n; ++j) block_sum += fast_exp(row[j] - block_max);
  st.lse.merge(block_max, block_sum);
}

template <typename acc_t>
void forward_kernel(const Normalized& q, const Normalized& k, const int64_t* q_labels, const int64_t* k_labels,
                    acc_t inv_t, int64_t self_offset, acc_t* loss, acc_t* lse, int32_t* npos) {
  const int64_t m = q.hat.size(0), l = k.hat.size(0);
  const int64_t row_blocks = ceil_div(m, kCpuRowBlock);
  at::parallel_for(0, row_blocks, 1, [&](int64_t rb_begin, int64_t rb_end) {
    const at::Tensor buffer = at::empty({kCpuRowBlock * kCpuKeyBlock}, q.hat.options());
    std::vector<RowState<acc_t>> states(kCpuRowBlock);
    for (int64_t rb = rb_begin; rb < rb_end; ++rb) {
      const int64_t r0 = rb * kCpuRowBlock, rows = std::min(kCpuRowBlock, m - r0);
      std::fill(states.begin(), states.end(), RowState<acc_t>{});
      const at::Tensor q_block = q.hat.narrow(0, r0, rows);
      for (int64_t k0 = 0; k0 < l; k0 += kCpuKeyBlock) {
        const int64_t keys = std::min(kCpuKeyBlock, l - k0);
        at::Tensor tile = tile_view(buffer, rows, keys);
        at::mm_out(tile, q_block, k.hat.narrow(0, k0, keys).t());
        acc_t* cos = tile.data_ptr<acc_t>();
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t row = r0 + i;
          scan_tile_row(cos + i * keys, keys, k0, self_key(row, self_offset), q_labels[row], k_labels + k0, inv_t,
                        states[i]);
        }
      }
      for (int64_t i = 0; i < rows; ++i) {
        const RowState<acc_t>& st = states[i];
        lse[r0 + i] = st.lse.value();
        loss[r0 + i] = row_loss(lse[r0 + i], st.positive_sum, st.num_positives);
        npos[r0 + i] = static_cast<int32_t>(st.num_positives);
      }
    }
  });
}

// Per-query quantities the gradient of a pair needs.
template <typename acc_t>
struct RowGrad {
  const acc_t* lse;
  const acc_t* g;                  // incoming gradient / temperature, 0 for rows without positives
  const acc_t* inv_num_positives;  // 1 / |P(i)|, 0 for rows without positives
  const int64_t* labels;
};

// Turns a (queries x keys) tile of cosines into dL/dcos in place (see cosine_grad in ntxent.h);
// indices are global.
template <typename acc_t>
SIMCLR_HOT_LOOP void tile_grad(acc_t* tile, int64_t q0, int64_t nq, int64_t k0, int64_t nk, const RowGrad<acc_t>& rg,
                               const int64_t* k_labels, acc_t inv_t, int64_t self_offset) {
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t row = q0 + i, self = self_key(row, self_offset), label = rg.labels[row];
    const acc_t lse = rg.lse[row], g = rg.g[row];
    acc_t* t = tile + i * nk;
#pragma omp simd
    for (int64_t j = 0; j < nk; ++j) t[j] = g * fast_exp(logit(t[j], inv_t) - lse);
    if (any_label(k_labels + k0, nk, label)) {
      const acc_t pos = g * rg.inv_num_positives[row];
      for (int64_t j = 0; j < nk; ++j) {
        if (k_labels[k0 + j] == label) t[j] -= pos;
      }
    }
    if (self >= k0 && self < k0 + nk) t[self - k0] = 0;  // also undoes the positive term if it matched
  }
}

// dqhat (for_keys = false: blocks of queries, tiles of keys) or dkhat (for_keys = true: blocks of keys,
// tiles of queries), accumulated block by block with one GEMM per tile. Tiles are always computed as
// queries x keys, the forward's operand order, so the recomputed cosines are the forward's bit for bit
// (a pair whose softmax is exactly 1 must cancel exactly against its positive term).
template <typename acc_t>
at::Tensor grad_pass(const Normalized& q, const Normalized& k, bool for_keys, const RowGrad<acc_t>& rg,
                     const int64_t* k_labels, acc_t inv_t, int64_t self_offset) {
  const at::Tensor& own = for_keys ? k.hat : q.hat;
  const at::Tensor& other = for_keys ? q.hat : k.hat;
  const int64_t block = kCpuRowBlock, tile = kCpuKeyBlock;
  at::Tensor grad = at::zeros_like(own);
  const int64_t n_own = own.size(0), n_other = other.size(0);
  at::parallel_for(0, ceil_div(n_own, block), 1, [&](int64_t b_begin, int64_t b_end) {
    const at::Tensor buffer = at::empty({block * tile}, own.options());
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t o0 = b * block, n_o = std::min(block, n_own - o0);
      const at::Tensor own_block = own.narrow(0, o0, n_o);
      at::Tensor grad_block = grad.narrow(0, o0, n_o);
      for (int64_t t0 = 0; t0 < n_other; t0 += tile) {
        const int64_t n_t = std::min(tile, n_other - t0);
        const at::Tensor other_tile = other.narrow(0, t0, n_t);
        if (for_keys) {
          at::Tensor cos = tile_view(buffer, n_t, n_o);
          at::mm_out(cos, other_tile, own_block.t());
          tile_grad(cos.data_ptr<acc_t>(), t0, n_t, o0, n_o, rg, k_labels, inv_t, self_offset);
          grad_block.addmm_(cos.t(), other_tile);
        } else {
          at::Tensor cos = tile_view(buffer, n_o, n_t);
          at::mm_out(cos, own_block, other_tile.t());
          tile_grad(cos.data_ptr<acc_t>(), o0, n_o, t0, n_t, rg, k_labels, inv_t, self_offset);
          grad_block.addmm_(cos, other_tile);
        }
      }
    }
  });
  return grad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ntxent_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                  const at::Tensor& q_labels,
                                                                  const at::Tensor& k_labels, double temperature,
                                                                  int64_t self_offset, bool allow_tf32) {
  check_forward_args(q, k, q_labels, k_labels, temperature, self_offset);
  const int64_t m = q.size(0);
  const auto acc = acc_type(q.scalar_type());
  at::Tensor loss = at::empty({m}, q.options().dtype(acc));
  at::Tensor lse = at::empty({m}, q.options().dtype(acc));
  at::Tensor npos = at::empty({m}, q.options().dtype(at::kInt));
  if (m == 0) return {loss, lse, npos};
  const at::Tensor ql = q_labels.contiguous(), kl = k_labels.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "ntxent_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Normalized nq = normalize<scalar_t, acc_t>(q);
    const Normalized nk = same_tensor(q, k) ? nq : normalize<scalar_t, acc_t>(k);
    forward_kernel<acc_t>(nq, nk, ql.data_ptr<int64_t>(), kl.data_ptr<int64_t>(), acc_t(1.0 / temperature),
                          self_offset, loss.data_ptr<acc_t>(), lse.data_ptr<acc_t>(), npos.data_ptr<int32_t>());
  });
  return {loss, lse, npos};
}

std::tuple<at::Tensor, at::Tensor> ntxent_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& q,
                                                       const at::Tensor& k, const at::Tensor& q_labels,
                                                       const at::Tensor& k_labels, const at::Tensor& lse,
                                                       const at::Tensor& npos, double temperature,
                                                       int64_t self_offset, bool allow_tf32) {
  check_backward_args(grad_loss, q, k, q_labels, k_labels, lse, npos, temperature, self_offset);
  const auto acc = acc_type(q.scalar_type());
  if (q.size(0) == 0 || k.size(0) == 0) {
    return {at::zeros(q.sizes(), q.options()), at::zeros(k.sizes(), k.options())};
  }
  // Rows without positives have a constant loss of 0: their incoming gradient must not flow.
  const at::Tensor has_pos = npos > 0;
  const at::Tensor g =
      at::where(has_pos, grad_loss.to(acc) / temperature, at::zeros({}, lse.options())).contiguous();
  const at::Tensor inv_np = at::where(has_pos, npos.to(acc).reciprocal(), at::zeros({}, lse.options())).contiguous();
  const at::Tensor lse_c = lse.contiguous(), ql = q_labels.contiguous(), kl = k_labels.contiguous();
  at::Tensor grad_q, grad_k;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "ntxent_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Normalized nq = normalize<scalar_t, acc_t>(q);
    const Normalized nk = same_tensor(q, k) ? nq : normalize<scalar_t, acc_t>(k);
    const RowGrad<acc_t> rg{lse_c.data_ptr<acc_t>(), g.data_ptr<acc_t>(), inv_np.data_ptr<acc_t>(),
                            ql.data_ptr<int64_t>()};
    const acc_t inv_t = acc_t(1.0 / temperature);
    const int64_t* k_labels_ptr = kl.data_ptr<int64_t>();
    const at::Tensor dq_hat = grad_pass<acc_t>(nq, nk, false, rg, k_labels_ptr, inv_t, self_offset);
    grad_q = normalization_backward<scalar_t, acc_t>(nq, dq_hat, q.scalar_type());
    const at::Tensor dk_hat = grad_pass<acc_t>(nq, nk, true, rg, k_labels_ptr, inv_t, self_offset);
    grad_k = normalization_backward<scalar_t, acc_t>(nk, dk_hat, k.scalar_type());
  });
  return {grad_q, grad_k};
}

}  // namespace

TORCH_LIBRARY_IMPL(simclr_ext, CPU, m) {
  m.impl("ntxent", &ntxent_forward_cpu);
  m.impl("_ntxent_backward", &ntxent_backward_cpu);
}

}  // namespace ntxent
}  // namespace simclr_ext
