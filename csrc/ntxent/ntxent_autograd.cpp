// Autograd of the contrastive op, in C++ for every backend: the forward saves what the backward op needs
// (inputs, lse, npos and, when kept, the probabilities) and the backward calls `_ntxent_backward`.
// A Python autograd registration (torch.library.register_autograd) costs tens of microseconds per call
// in Python; at 2N = 256 on a CPU that was a large share of the whole loss.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "ntxent/ntxent_checks.h"

namespace simclr_ext {
namespace ntxent {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

ForwardOut call_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_labels,
                        const at::Tensor& k_labels, double temperature, int64_t self_offset, bool allow_tf32,
                        bool keep_probs) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("simclr_ext::ntxent", "")
                             .typed<ForwardOut(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, double, int64_t, bool, bool)>();
  return op.call(q, k, q_labels, k_labels, temperature, self_offset, allow_tf32, keep_probs);
}

std::tuple<at::Tensor, at::Tensor> call_backward(const at::Tensor& grad_loss, const at::Tensor& q,
                                                 const at::Tensor& k, const at::Tensor& q_labels,
                                                 const at::Tensor& k_labels, const at::Tensor& lse,
                                                 const at::Tensor& npos, double temperature, int64_t self_offset,
                                                 bool allow_tf32, const std::optional<at::Tensor>& probs) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("simclr_ext::_ntxent_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, double, int64_t, bool,
                                                    const std::optional<at::Tensor>&)>();
  return op.call(grad_loss, q, k, q_labels, k_labels, lse, npos, temperature, self_offset, allow_tf32, probs);
}

class NTXentFunction : public torch::autograd::Function<NTXentFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& q_labels, const at::Tensor& k_labels, double temperature,
                               int64_t self_offset, bool allow_tf32, bool keep_probs) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, lse, npos, probs] =
        call_forward(q, k, q_labels, k_labels, temperature, self_offset, allow_tf32, keep_probs);
    ctx->save_for_backward({q, k, q_labels, k_labels, lse, npos, probs});
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["self_offset"] = self_offset;
    ctx->saved_data["allow_tf32"] = allow_tf32;
    ctx->saved_data["one_input"] = is_symmetric_case(q, k, q_labels, k_labels, self_offset);
    ctx->mark_non_differentiable({lse, npos, probs});
    return {loss, lse, npos, probs};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad_loss = grads[0];
    const variable_list none(8);
    if (!grad_loss.defined()) return none;
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor &q = s[0], &k = s[1], &q_labels = s[2], &k_labels = s[3], &lse = s[4], &npos = s[5],
                     &probs = s[6];
    const double temperature = ctx->saved_data["temperature"].toDouble();
    const int64_t self_offset = ctx->saved_data["self_offset"].toInt();
    const bool allow_tf32 = ctx->saved_data["allow_tf32"].toBool();
    // Empty (0, 0) when the forward did not keep them: the kernels tell by its size.
    const std::optional<at::Tensor> kept = probs;
    at::Tensor grad_q, grad_k;
    if (torch::autograd::GradMode::is_enabled()) {
      // create_graph=True: through the backward op's own autograd, which refuses a second derivative.
      std::tie(grad_q, grad_k) = call_backward(grad_loss, q, k, q_labels, k_labels, lse, npos, temperature,
                                               self_offset, allow_tf32, kept);
    } else {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(grad_q, grad_k) = call_backward(grad_loss, q, k, q_labels, k_labels, lse, npos, temperature,
                                               self_offset, allow_tf32, kept);
    }
    variable_list out = none;
    const auto needs = ctx->needs_input_grad(0) || ctx->needs_input_grad(1);
    if (!needs) return out;
    out[0] = ctx->needs_input_grad(0) ? grad_q : at::Tensor();
    // The symmetric backward returns the one input's whole gradient as grad_q (and zeros as grad_k):
    // leaving grad_k out spares autograd adding those zeros.
    out[1] = ctx->needs_input_grad(1) && !ctx->saved_data["one_input"].toBool() ? grad_k : at::Tensor();
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ntxent_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_labels, const at::Tensor& k_labels,
    double temperature, int64_t self_offset, bool allow_tf32, bool keep_probs) {
  const variable_list out =
      NTXentFunction::apply(q, k, q_labels, k_labels, temperature, self_offset, allow_tf32, keep_probs);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(simclr_ext, Autograd, m) { m.impl("ntxent", &ntxent_autograd); }

}  // namespace ntxent
}  // namespace simclr_ext
