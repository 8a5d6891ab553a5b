// Autograd of the contrastive op, in C++ for every backend: the forward saves what the backward op needs
// (inputs, lse, npos, the temperature tensor, DCLW's weights and, when kept, the probabilities) and the
// backward calls `_ntxent_backward`, which also returns the temperature's gradient.
// A Python autograd registration (torch.library.register_autograd) costs tens of microseconds per call
// in Python; at 2N = 256 on a CPU that was a large share of the whole loss.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/op_namespace.h"
#include "ntxent/ntxent_checks.h"

namespace simclr_ext {
namespace ntxent {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

ForwardOut call_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_labels,
                        const at::Tensor& k_labels, const at::Tensor& temperature, int64_t self_offset, bool allow_tf32,
                        bool keep_probs, bool exclude_positives, const std::optional<at::Tensor>& positive_weight,
                        bool two_way, bool normalize, bool sigmoid, const std::optional<at::Tensor>& bias) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow(SIMCLR_EXT_OP_NAME("ntxent"), "")
          .typed<ForwardOut(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, int64_t, bool, bool, bool, const std::optional<at::Tensor>&, bool, bool,
                            bool, const std::optional<at::Tensor>&)>();
  return op.call(q, k, q_labels, k_labels, temperature, self_offset, allow_tf32, keep_probs, exclude_positives,
                 positive_weight, two_way, normalize, sigmoid, bias);
}

using BackwardOut = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

BackwardOut call_backward(const at::Tensor& grad_loss, const at::Tensor& q, const at::Tensor& k,
                          const at::Tensor& q_labels, const at::Tensor& k_labels, const at::Tensor& lse,
                          const at::Tensor& npos, const at::Tensor& temperature, int64_t self_offset, bool allow_tf32,
                          const std::optional<at::Tensor>& probs, bool exclude_positives,
                          const std::optional<at::Tensor>& positive_weight, bool two_way, const OutputMask& output_mask,
                          bool normalize, bool sigmoid, const std::optional<at::Tensor>& bias) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow(SIMCLR_EXT_OP_NAME("_ntxent_backward"), "")
          .typed<BackwardOut(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, bool,
                             const std::optional<at::Tensor>&, bool, const std::optional<at::Tensor>&, bool, OutputMask,
                             bool, bool, const std::optional<at::Tensor>&)>();
  return op.call(grad_loss, q, k, q_labels, k_labels, lse, npos, temperature, self_offset, allow_tf32, probs,
                 exclude_positives, positive_weight, two_way, output_mask, normalize, sigmoid, bias);
}

class NTXentFunction : public torch::autograd::Function<NTXentFunction> {
 public:
  static constexpr size_t kNumInputs = 14;  // the forward's arguments: backward returns one entry per argument
  static constexpr size_t kBiasInput = 13;

  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& q_labels, const at::Tensor& k_labels, const at::Tensor& temperature,
                               int64_t self_offset, bool allow_tf32, bool keep_probs, bool exclude_positives,
                               const std::optional<at::Tensor>& positive_weight, bool two_way, bool normalize,
                               bool sigmoid, const std::optional<at::Tensor>& bias) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, lse, npos, probs] =
        call_forward(q, k, q_labels, k_labels, temperature, self_offset, allow_tf32, keep_probs, exclude_positives,
                     positive_weight, two_way, normalize, sigmoid, bias);
    // The weights are constants of the op (an undefined tensor when absent); an absent bias is undefined too.
    ctx->save_for_backward({q, k, q_labels, k_labels, lse, npos, probs, temperature,
                            positive_weight.has_value() ? *positive_weight : at::Tensor(),
                            bias.has_value() ? *bias : at::Tensor()});
    ctx->saved_data["normalize"] = normalize;
    ctx->saved_data["sigmoid"] = sigmoid;
    ctx->saved_data["exclude_positives"] = exclude_positives;
    ctx->saved_data["self_offset"] = self_offset;
    ctx->saved_data["allow_tf32"] = allow_tf32;
    ctx->saved_data["two_way"] = two_way;
    ctx->saved_data["one_input"] = !two_way && is_symmetric_case(q, k, q_labels, k_labels, self_offset);
    ctx->mark_non_differentiable({lse, npos, probs});
    return {loss, lse, npos, probs};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad_loss = grads[0];
    const variable_list none(kNumInputs);
    if (!grad_loss.defined()) return none;
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor &q = s[0], &k = s[1], &q_labels = s[2], &k_labels = s[3], &lse = s[4], &npos = s[5], &probs = s[6],
                     &temperature = s[7];
    const std::optional<at::Tensor> weight = s[8].defined() ? std::optional<at::Tensor>(s[8]) : std::nullopt;
    const std::optional<at::Tensor> bias = s[9].defined() ? std::optional<at::Tensor>(s[9]) : std::nullopt;
    const bool normalize = ctx->saved_data["normalize"].toBool();
    const bool sigmoid = ctx->saved_data["sigmoid"].toBool();
    const bool exclude_positives = ctx->saved_data["exclude_positives"].toBool();
    const int64_t self_offset = ctx->saved_data["self_offset"].toInt();
    const bool allow_tf32 = ctx->saved_data["allow_tf32"].toBool();
    const bool two_way = ctx->saved_data["two_way"].toBool();
    // Empty (0, 0) when the forward did not keep them: the kernels tell by its size.
    const std::optional<at::Tensor> kept = probs;
    // Only what autograd needs: detached keys (a queue, k = q.detach()) skip the dK pass. The symmetric
    // backward returns the one input's whole gradient as grad_q (and zeros as grad_k): leaving grad_k out
    // spares allocating and adding those zeros.
    const OutputMask mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1) && !ctx->saved_data["one_input"].toBool(),
                          ctx->needs_input_grad(4)};
    at::Tensor grad_q, grad_k, grad_t;
    if (torch::autograd::GradMode::is_enabled()) {
      // create_graph=True: through the backward op's own autograd, which refuses a second derivative.
      std::tie(grad_q, grad_k, grad_t) =
          call_backward(grad_loss, q, k, q_labels, k_labels, lse, npos, temperature, self_offset, allow_tf32, kept,
                        exclude_positives, weight, two_way, mask, normalize, sigmoid, bias);
    } else {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(grad_q, grad_k, grad_t) =
          call_backward(grad_loss, q, k, q_labels, k_labels, lse, npos, temperature, self_offset, allow_tf32, kept,
                        exclude_positives, weight, two_way, mask, normalize, sigmoid, bias);
    }
    variable_list out = none;
    out[0] = grad_q;
    out[1] = grad_k;
    // The temperature's gradient comes back on q's device in the accumulation dtype: the temperature's own.
    if (grad_t.defined()) out[4] = grad_t.to(temperature.options());
    // Sigmoid mode: dL/db = sum_i g_i (sum_j sigmoid(z_ij) - |P(i)|), from the forward's lse slot (ntxent.h).
    // needs_input_grad counts tensor inputs only: q, k, the labels, the temperature, the weights when given.
    const size_t bias_edge = weight.has_value() ? 6 : 5;
    if (sigmoid && bias.has_value() && ctx->needs_input_grad(bias_edge)) {
      const at::Tensor g = grad_loss.to(lse.scalar_type());
      out[kBiasInput] = g.mul(lse.sub(npos.to(lse.scalar_type()))).sum().to(bias->options());
    }
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ntxent_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_labels, const at::Tensor& k_labels,
    const at::Tensor& temperature, int64_t self_offset, bool allow_tf32, bool keep_probs, bool exclude_positives,
    const std::optional<at::Tensor>& positive_weight, bool two_way, bool normalize, bool sigmoid,
    const std::optional<at::Tensor>& bias) {
  const variable_list out =
      NTXentFunction::apply(q, k, q_labels, k_labels, temperature, self_offset, allow_tf32, keep_probs,
                            exclude_positives, positive_weight, two_way, normalize, sigmoid, bias);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(SIMCLR_EXT_OP_NAMESPACE, Autograd, m) { m.impl("ntxent", &ntxent_autograd); }

}  // namespace ntxent
}  // namespace simclr_ext
