// Argument checks of the contrastive op, shared by every backend so that CPU and CUDA reject bad input
// with the same messages before any work is done. Host-only.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <array>
#include <cmath>
#include <optional>

#include "common/acc_type.h"

namespace simclr_ext {
namespace ntxent {

inline bool supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_embeddings(const at::Tensor& q, const at::Tensor& k) {
  TORCH_CHECK(q.dim() == 2, "q must be 2-D (M, D), got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 2, "k must be 2-D (L, D), got shape ", k.sizes());
  TORCH_CHECK(supported_float(q.scalar_type()), "q must be float16, bfloat16, float32 or float64, got ",
              q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "k must have the dtype of q (", q.scalar_type(), "), got ",
              k.scalar_type());
  TORCH_CHECK(k.device() == q.device(), "k must be on the device of q (", q.device(), "), got ", k.device());
  TORCH_CHECK(q.size(1) == k.size(1), "q and k must have the same feature dimension D, got q ", q.sizes(), " and k ",
              k.sizes());
  TORCH_CHECK(q.size(1) > 0, "the feature dimension D must be positive, got q ", q.sizes());
}

inline void check_labels(const at::Tensor& labels, const char* name, int64_t expected, const at::Tensor& q) {
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == expected, name, " must have shape [", expected, "], got ",
              labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, name, " must be int64, got ", labels.scalar_type());
  TORCH_CHECK(labels.device() == q.device(), name, " must be on the device of q (", q.device(), "), got ",
              labels.device());
}

// The temperature is a 0-d floating tensor on the CPU or on q's device. Its value is checked where reading it
// is free (on the CPU); a temperature on the GPU is never read on the host (no synchronization).
inline void check_temperature(const at::Tensor& temperature, const at::Tensor& q) {
  TORCH_CHECK(temperature.dim() == 0, "temperature must be a 0-d tensor, got shape ", temperature.sizes());
  TORCH_CHECK(temperature.is_floating_point(), "temperature must be a floating tensor, got ",
              temperature.scalar_type());
  TORCH_CHECK(temperature.device().is_cpu() || temperature.device() == q.device(),
              "temperature must be on the CPU or on the device of q (", q.device(), "), got ", temperature.device());
  if (temperature.device().is_cpu()) {
    const double t = temperature.item<double>();
    TORCH_CHECK(std::isfinite(t) && t > 0, "temperature must be finite and > 0, got ", t);
  }
}

// DCLW's per-row weights of the positive term: (M,) in the accumulation dtype, on q's device.
inline void check_positive_weight(const std::optional<at::Tensor>& weight, const at::Tensor& q) {
  if (!weight.has_value()) return;
  const auto acc = acc_type(q.scalar_type());
  TORCH_CHECK(weight->dim() == 1 && weight->size(0) == q.size(0) && weight->scalar_type() == acc &&
                  weight->device() == q.device(),
              "positive_weight must be a ", acc, " tensor of shape [", q.size(0), "] on ", q.device(), ", got ",
              weight->scalar_type(), " ", weight->sizes(), " on ", weight->device());
}

inline void check_forward_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_labels,
                               const at::Tensor& k_labels, const at::Tensor& temperature, int64_t self_offset,
                               const std::optional<at::Tensor>& positive_weight) {
  check_embeddings(q, k);
  check_labels(q_labels, "q_labels", q.size(0), q);
  check_labels(k_labels, "k_labels", k.size(0), q);
  check_temperature(temperature, q);
  TORCH_CHECK(self_offset == -1 || (self_offset >= 0 && self_offset + q.size(0) <= k.size(0)),
              "self_offset must be -1 or in [0, L - M] = [0, ", k.size(0) - q.size(0), "], got ", self_offset);
  check_positive_weight(positive_weight, q);
}

// The two-way mode (CLIP) scores every query against every key in both directions: no own key, no DCL or
// DCLW terms, and its outputs are M + L long, which the kept-probabilities path does not produce.
inline void check_two_way(bool two_way, int64_t self_offset, bool keep_probs, bool exclude_positives,
                          const std::optional<at::Tensor>& positive_weight) {
  if (!two_way) return;
  TORCH_CHECK(self_offset == -1, "two_way needs self_offset = -1 (no query is one of the keys), got ", self_offset);
  TORCH_CHECK(!keep_probs, "two_way does not keep probabilities: pass keep_probs=False");
  TORCH_CHECK(!exclude_positives && !positive_weight.has_value(),
              "two_way does not take exclude_positives or positive_weight (DCL / DCLW terms)");
}

// The sigmoid mode (SigLIP) scores every query against every key with its own loss: no own key, no DCL / DCLW
// terms, no second direction (the sum over all pairs is one direction's), no kept probabilities. The bias
// (0-d floating, on the CPU or q's device; none: 0) belongs to the sigmoid mode only.
inline void check_sigmoid(bool sigmoid, int64_t self_offset, bool keep_probs, bool exclude_positives,
                          const std::optional<at::Tensor>& positive_weight, bool two_way,
                          const std::optional<at::Tensor>& bias, const at::Tensor& q) {
  if (!sigmoid) {
    TORCH_CHECK(!bias.has_value(), "bias is the sigmoid mode's (sigmoid=True); pass bias=None");
    return;
  }
  TORCH_CHECK(self_offset == -1, "the sigmoid mode needs self_offset = -1 (no query is one of the keys), got ",
              self_offset);
  TORCH_CHECK(!keep_probs, "the sigmoid mode does not keep probabilities: pass keep_probs=False");
  TORCH_CHECK(!exclude_positives && !positive_weight.has_value() && !two_way,
              "the sigmoid mode does not take exclude_positives, positive_weight or two_way");
  if (!bias.has_value()) return;
  TORCH_CHECK(bias->dim() == 0 && bias->is_floating_point(), "bias must be a 0-d floating tensor, got ",
              bias->scalar_type(), " of shape ", bias->sizes());
  TORCH_CHECK(bias->device().is_cpu() || bias->device() == q.device(),
              "bias must be on the CPU or on the device of q (", q.device(), "), got ", bias->device());
}

// grad_loss, lse and npos have one entry per query row, and one more per key column with two_way.
inline void check_backward_args(const at::Tensor& grad_loss, const at::Tensor& q, const at::Tensor& k,
                                const at::Tensor& q_labels, const at::Tensor& k_labels, const at::Tensor& lse,
                                const at::Tensor& npos, const at::Tensor& temperature, int64_t self_offset,
                                const std::optional<at::Tensor>& positive_weight, bool two_way) {
  check_forward_args(q, k, q_labels, k_labels, temperature, self_offset, positive_weight);
  const int64_t m = two_way ? q.size(0) + k.size(0) : q.size(0);
  const auto acc = acc_type(q.scalar_type());
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == m, "grad_loss must have shape [", m, "], got ",
              grad_loss.sizes());
  TORCH_CHECK(grad_loss.is_floating_point(), "grad_loss must be floating, got ", grad_loss.scalar_type());
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == m && lse.scalar_type() == acc, "lse must be ", acc, " of shape [", m,
              "], got ", lse.scalar_type(), " ", lse.sizes());
  TORCH_CHECK(npos.dim() == 1 && npos.size(0) == m && npos.scalar_type() == at::kInt, "npos must be int32 of shape [",
              m, "], got ", npos.scalar_type(), " ", npos.sizes());
  for (const at::Tensor* t : {&grad_loss, &lse, &npos}) {
    TORCH_CHECK(t->device() == q.device(), "grad_loss, lse and npos must be on the device of q (", q.device(),
                "), got ", t->device());
  }
}

// One tensor passed twice (SimCLR's q = k = cat(z1, z2)), decided here for both backends (which then prepare
// or normalize it once, and take the symmetric backward with one labels tensor). Identity, not equal memory: k =
// q.detach() (MoCo style) shares q's memory but only q's role may receive a gradient. Autograd hands saved inputs back
// as the same tensors, so identity survives into the backward.
inline bool same_tensor(const at::Tensor& a, const at::Tensor& b) { return a.is_same(b); }

// Whether the symmetric backward applies: the queries are the keys (same tensor, self_offset 0) and the
// labels are one tensor, so that S is symmetric and j is a positive of i exactly when i is one of j.
// Decided on identity, not values: no device sync, and it is what NT-Xent / SupCon callers pass.
inline bool is_symmetric_case(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_labels,
                              const at::Tensor& k_labels, int64_t self_offset) {
  return self_offset == 0 && same_tensor(q, k) && same_tensor(q_labels, k_labels);
}

// The backward's output mask: which of (grad_q, grad_k, grad_temperature) the caller needs (autograd passes
// needs_input_grad). An output left out comes back undefined (None in Python), as with ATen's own
// output_mask backwards; the fake kernel returns None there too. A pass runs only when an output needs it:
// dq for grad_q and for the temperature, whose gradient is the sum of the dq pass's radial dots (ntxent.h);
// dk for grad_k only. The symmetric pass (q is k) is the dq pass; its grad_k is zeros when asked for.
using OutputMask = std::array<bool, 3>;

struct BackwardPasses {
  bool dq, dk;
};

inline BackwardPasses backward_passes(const OutputMask& mask, bool symmetric) {
  return {mask[0] || mask[2], mask[1] && !symmetric};
}

// The softmax probabilities the forward keeps for the backward: empty (not kept), or (M, L) contiguous
// in the accumulation dtype.
inline void check_probs(const at::Tensor& probs, const at::Tensor& q, const at::Tensor& k) {
  if (!probs.defined() || probs.numel() == 0) return;
  const auto acc = acc_type(q.scalar_type());
  TORCH_CHECK(probs.dim() == 2 && probs.size(0) == q.size(0) && probs.size(1) == k.size(0) &&
                  probs.scalar_type() == acc && probs.is_contiguous() && probs.device() == q.device(),
              "probs must be empty or the forward's contiguous ", acc, " (M, L) = [", q.size(0), ", ", k.size(0),
              "] on ", q.device(), ", got ", probs.scalar_type(), " ", probs.sizes(), " on ", probs.device());
}

}  // namespace ntxent
}  // namespace simclr_ext
