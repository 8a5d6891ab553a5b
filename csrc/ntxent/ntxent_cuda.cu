// CUDA backend of the contrastive op, host side: argument checks, buffers, launches (math: ntxent.h; tiling:
// ntxent_cuda_plan.h, which the CPU tests check; the kernels themselves: ntxent_cuda_kernels.cuh). Written
// once as templates over a backend B, registered at the end on the CUDA runtime (csrc/common/cuda_backend.cuh);
// the test build tests/cuda_emu/ includes this file and runs it on the host emulation of the same kernels
// (csrc/common/simt_host.h), so that CI runs the very launch sequence a GPU runs. B provides Stream, Guard,
// kName, check_device, stream, sm_count, smem_optin, static_smem, set_max_dynamic_smem, launch, empty and
// scalar_on_host.
//
// One call runs:
//   normalize   q, k -> zero-padded normalized copies qhat, khat (input dtype; O((M + L) D) memory)
//   forward     per block of 64 query rows: stream 64-key tiles, score tile on the tensor cores,
//               online log-sum-exp + positive sum / count per row; merge -> loss, lse, npos
//   backward    dQ pass: blocks of 64 query rows x 128 columns of D stream key tiles, recompute the
//               scores, form dL/dcos from the saved lse and accumulate dqhat = dC khat;
//               dK pass: the same with keys as rows, dkhat = dC^T qhat. Every output element has one
//               owner block and a fixed summation order: no atomics, bit-identical reruns.
//               q is k (same labels tensor, self_offset 0): one symmetric pass instead, the dQ pass with
//               dL/dcos = H = dS + dS^T (both from the one recomputed tile), dzhat = H zhat: three GEMM
//               passes in all instead of five.
//               two_way (CLIP): the forward runs once per direction (keys as rows the second time) on
//               the same copies; the dQ and dK passes take dL/dcos from both sides' factors.
//               norm backward: dz = (dzhat - zhat <zhat, dzhat>) / |z|, in the input dtype; the radial
//               dots <zhat, dzhat> of the query rows give the temperature's gradient (ntxent.h).
// The temperature comes as a 0-d tensor: a CPU one is read on the host and passed by value, a GPU one is
// read by the kernels from device memory (Temperature below): never a host synchronization.
// When the row tiles alone cannot fill the GPU (2N = 16384: 256 tiles), the streamed tiles are cut into
// a few contiguous splits, one block each; partial results (the forward's per-row lse state, the
// backward's dzhat slices) are summed in split order by the merge / norm-backward kernels, so reruns on
// the same GPU stay bit-identical (the split count depends on its number of SMs).
// The M x L matrix is never stored: memory is O((M + L) D) plus fixed shared-memory tiles.
//
// Precision paths (all accumulate in fp32, fp64 for float64 inputs):
//   float16 / bfloat16      wmma 16x16x16 tensor-core products
//   float32, allow_tf32     wmma 16x16x8 TF32 tensor-core products (simclr_ext.set_tf32 / allow_tf32=)
//   float32, !allow_tf32    exact fp32 FMA products (SIMT)
//   float64                 exact fp64 FMA products (SIMT)
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "common/acc_type.h"
#include "common/cuda_types.cuh"
#include "common/dispatch.h"
#include "ntxent/ntxent.h"
#include "ntxent/ntxent_checks.h"
#include "ntxent/ntxent_cuda_kernels.cuh"
#include "ntxent/ntxent_cuda_plan.h"
#include "ntxent/ntxent_paths.h"
#if !defined(SIMCLR_EXT_CUDA_EMU)
#include "common/cuda_backend.cuh"
#endif

namespace simclr_ext {
namespace ntxent {
namespace {

// Calls f(std::integral_constant<bool, tensor cores>) for the precision path of T.
template <typename T, typename F>
void dispatch_path(bool allow_tf32, F&& f) {
  if constexpr (std::is_same_v<T, double>) {
    f(std::false_type{});
  } else if constexpr (std::is_same_v<T, float>) {
    if (allow_tf32) {
      f(std::true_type{});
    } else {
      f(std::false_type{});
    }
  } else {
    f(std::true_type{});
  }
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

// Opts a kernel into `bytes` of dynamic shared memory, failing clearly where the device has less.
template <typename B, typename Kernel>
void set_smem(Kernel kernel, int64_t bytes, const at::Tensor& on) {
  const int64_t optin = B::smem_optin(on);
  TORCH_CHECK(bytes <= optin, "simclr_ext ntxent (", B::kName, "): needs ", bytes,
              " bytes of shared memory per block, the device ", "allows ", optin);
  B::set_max_dynamic_smem(kernel, bytes);
}

// Normalized, zero-padded copy of x (rows_padded x dim, dtype of x); grid: ceil(rows_padded / 8) blocks.
template <typename B, typename T>
at::Tensor normalized_copy(const at::Tensor& x, int64_t rows_padded, int64_t dim, int64_t grid, bool normalize,
                           typename B::Stream stream) {
  at::Tensor xhat = B::empty({rows_padded, dim}, x.options());
  B::launch(normalize_kernel<T>, dim3(static_cast<unsigned>(grid)), dim3(32 * kCudaNormRowsPerBlock), 0, stream,
            ptr<const T>(x), x.size(0), x.size(1), rows_padded, dim, normalize, ptr<T>(xhat));
  return xhat;
}

// The op's tensors made contiguous once; q and k stay one tensor when they are one (SimCLR's
// q = k = cat(z1, z2)), so that they are also normalized once.
struct ContiguousInputs {
  at::Tensor q, k, q_labels, k_labels;
};

ContiguousInputs contiguous_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_labels,
                                   const at::Tensor& k_labels) {
  const at::Tensor qc = q.contiguous();
  return {qc, same_tensor(k, q) ? qc : k.contiguous(), q_labels.contiguous(), k_labels.contiguous()};
}

// The launch plan of a call and the normalized copies of q and k it streams.
struct Normalized {
  CudaPlan plan;
  at::Tensor qhat, khat;
};

// normalize = false: padded copies of the rows as given (the dot-product similarity).
template <typename B, typename T>
Normalized normalize_inputs(const ContiguousInputs& in, bool normalize, typename B::Stream stream) {
  const CudaPlan plan =
      make_cuda_plan(in.q.size(0), in.k.size(0), in.q.size(1), sizeof(T), sizeof(acc_of<T>), B::sm_count(in.q));
  const at::Tensor qhat = normalized_copy<B, T>(in.q, plan.rows_q, plan.dim, plan.norm_grid_q, normalize, stream);
  const at::Tensor khat = same_tensor(in.k, in.q)
                              ? qhat
                              : normalized_copy<B, T>(in.k, plan.rows_k, plan.dim, plan.norm_grid_k, normalize, stream);
  return {plan, qhat, khat};
}

at::ScalarType acc_dtype(const at::Tensor& q) { return acc_type(q.scalar_type()); }

// The sigmoid mode's bias for the kernels, like the temperature: a CPU scalar is read here, a GPU one stays there.
struct HostBias {
  at::Tensor on_device;  // undefined when the bias is absent or on the CPU
  double value = 0;
};

template <typename B>
HostBias host_bias(const std::optional<at::Tensor>& bias, const at::Tensor& q) {
  HostBias h;
  if (!bias.has_value()) return h;
  if (B::scalar_on_host(*bias)) {
    h.value = bias->item<double>();
  } else {
    h.on_device = bias->to(acc_dtype(q)).contiguous();
  }
  return h;
}

template <typename acc_t>
Bias<acc_t> kernel_bias(const HostBias& h) {
  return {static_cast<acc_t>(h.value), h.on_device.defined() ? ptr<const acc_t>(h.on_device) : nullptr};
}

// The temperature for the kernels: 1 / t rounded from the double reciprocal, as on the CPU. A CPU scalar is
// read here (free); a GPU one stays on the device (inv_on_device), read by the kernels: no synchronization.
struct HostTemperature {
  at::Tensor inv_on_device;  // undefined when the temperature is on the CPU
  double inv_value = 0;
};

template <typename B>
HostTemperature host_temperature(const at::Tensor& temperature, const at::Tensor& q) {
  HostTemperature h;
  if (B::scalar_on_host(temperature)) {
    h.inv_value = 1.0 / temperature.item<double>();
  } else {
    h.inv_on_device = temperature.to(at::kDouble).reciprocal().to(acc_dtype(q)).contiguous();
  }
  return h;
}

template <typename acc_t>
Temperature<acc_t> kernel_temperature(const HostTemperature& h) {
  return {static_cast<acc_t>(h.inv_value), h.inv_on_device.defined() ? ptr<const acc_t>(h.inv_on_device) : nullptr};
}

// x * (1 / t) on the stream, for either kind of temperature.
at::Tensor times_inverse_temperature(const at::Tensor& x, const HostTemperature& h) {
  return h.inv_on_device.defined() ? x.mul(h.inv_on_device) : x.mul(h.inv_value);
}

template <typename acc_t>
const acc_t* weight_ptr(const at::Tensor& weight) {
  return weight.defined() ? ptr<const acc_t>(weight) : nullptr;
}

// One direction of the forward: own rows (queries) against the other side's tiles, then the split merge,
// into loss / lse / npos[0, own_n). The two-way mode runs it once per direction on the same normalized
// copies (the column sums of one direction are the row sums of the other).
template <typename B, typename T>
void forward_direction(const T* own_hat, const T* other_hat, const int64_t* own_labels, const int64_t* other_labels,
                       int64_t own_n, int64_t other_n, const CudaPlan& plan, const Temperature<acc_of<T>>& inv_t,
                       int64_t self_offset, bool exclude_positives, const acc_of<T>* weight, bool allow_tf32,
                       bool sigmoid, const Bias<acc_of<T>>& bias, acc_of<T>* loss, acc_of<T>* lse, int* npos,
                       const at::Tensor& on, typename B::Stream stream) {
  using acc_t = acc_of<T>;
  const int64_t splits = plan.splits_fwd;
  const at::Tensor part = B::empty({3, splits, own_n}, on.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  const at::Tensor part_count = B::empty({splits, own_n}, on.options().dtype(at::kInt));
  const RowPartials<acc_t> parts{ptr<acc_t>(part), ptr<acc_t>(part) + splits * own_n,
                                 ptr<acc_t>(part) + 2 * splits * own_n, ptr<int>(part_count)};
  dispatch_path<T>(allow_tf32, [&](auto tensor_cores) {
    constexpr bool kTC = decltype(tensor_cores)::value;
    auto kernel = forward_kernel<T, kTC>;
    set_smem<B>(kernel, plan.smem_fwd, on);
    const dim3 grid(static_cast<unsigned>(plan.grid_q), static_cast<unsigned>(splits));
    B::launch(kernel, grid, dim3(kCudaThreads), plan.smem_fwd, stream, own_hat, other_hat, own_labels, other_labels,
              own_n, other_n, plan.dim, inv_t, self_offset, exclude_positives, sigmoid, bias, parts);
  });
  constexpr int kMergeThreads = 256;
  B::launch(merge_rows_kernel<acc_t>, dim3(static_cast<unsigned>(ceil_div(own_n, kMergeThreads))), dim3(kMergeThreads),
            0, stream, parts, own_n, splits, weight, sigmoid, loss, lse, npos);
}

// keep_probs is a CPU-only optimization (small problems, where recomputing costs more than the memory):
// the CUDA kernels always recompute, and the fourth output is empty.
template <typename B>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ntxent_forward_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& q_labels_in, const at::Tensor& k_labels_in,
    const at::Tensor& temperature, int64_t self_offset, bool allow_tf32, bool /*keep_probs*/, bool exclude_positives,
    const std::optional<at::Tensor>& positive_weight, bool two_way, bool normalize, bool sigmoid,
    const std::optional<at::Tensor>& bias) {
  check_forward_args(q_in, k_in, q_labels_in, k_labels_in, temperature, self_offset, positive_weight);
  check_two_way(two_way, self_offset, false, exclude_positives, positive_weight);
  check_sigmoid(sigmoid, self_offset, false, exclude_positives, positive_weight, two_way, bias, q_in);
  B::check_device(q_in);
  const typename B::Guard guard(q_in.device());
  const int64_t m = q_in.size(0), l = k_in.size(0), n_out = two_way ? m + l : m;
  const auto acc = acc_dtype(q_in);
  at::Tensor loss = B::empty({n_out}, q_in.options().dtype(acc));
  at::Tensor lse = B::empty({n_out}, q_in.options().dtype(acc));
  at::Tensor npos = B::empty({n_out}, q_in.options().dtype(at::kInt));
  const at::Tensor probs = at::empty({0, 0}, q_in.options().dtype(acc));
  if (n_out == 0) return {loss, lse, npos, probs};
  if (m == 0 || l == 0) {  // nothing to score: empty log-sum-exps (sigmoid mode: empty sums), no positives
    loss.zero_();
    lse.fill_(sigmoid ? 0.0 : -std::numeric_limits<double>::infinity());
    npos.zero_();
    return {loss, lse, npos, probs};
  }
  count_path(two_way ? Path::kCudaForwardTwoWay : Path::kCudaForward);
  const ContiguousInputs in = contiguous_inputs(q_in, k_in, q_labels_in, k_labels_in);
  const at::Tensor& q = in.q;
  const HostTemperature temp = host_temperature<B>(temperature, q);
  const HostBias hbias = host_bias<B>(bias, q);
  const at::Tensor weight = positive_weight.has_value() ? positive_weight->contiguous() : at::Tensor();
  const typename B::Stream stream = B::stream(q);

  dispatch_floating(q.scalar_type(), "simclr_ext ntxent (CUDA)", [&](auto tag) {
    using T = cuda_storage_t<decltype(tag)>;
    using acc_t = acc_of<T>;
    const Normalized nz = normalize_inputs<B, T>(in, normalize, stream);
    const Temperature<acc_t> inv_t = kernel_temperature<acc_t>(temp);
    const Bias<acc_t> b = kernel_bias<acc_t>(hbias);
    forward_direction<B, T>(ptr<const T>(nz.qhat), ptr<const T>(nz.khat), ptr<const int64_t>(in.q_labels),
                            ptr<const int64_t>(in.k_labels), m, l, nz.plan, inv_t, self_offset, exclude_positives,
                            weight_ptr<acc_t>(weight), allow_tf32, sigmoid, b, ptr<acc_t>(loss), ptr<acc_t>(lse),
                            ptr<int>(npos), q, stream);
    if (two_way) {
      // The keys' plan is the queries' with the sides swapped; the padded copies serve both.
      const CudaPlan swapped = make_cuda_plan(l, m, q.size(1), sizeof(T), sizeof(acc_t), B::sm_count(q));
      forward_direction<B, T>(ptr<const T>(nz.khat), ptr<const T>(nz.qhat), ptr<const int64_t>(in.k_labels),
                              ptr<const int64_t>(in.q_labels), l, m, swapped, inv_t, -1, false, nullptr, allow_tf32,
                              false, b, ptr<acc_t>(loss) + m, ptr<acc_t>(lse) + m, ptr<int>(npos) + m, q, stream);
    }
  });
  return {loss, lse, npos, probs};
}

template <typename B>
std::tuple<at::Tensor, at::Tensor, at::Tensor> ntxent_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& q_labels_in,
    const at::Tensor& k_labels_in, const at::Tensor& lse_in, const at::Tensor& npos_in, const at::Tensor& temperature,
    int64_t self_offset, bool allow_tf32, const std::optional<at::Tensor>& probs, bool exclude_positives,
    const std::optional<at::Tensor>& positive_weight, bool two_way, OutputMask output_mask, bool normalize,
    bool sigmoid, const std::optional<at::Tensor>& bias) {
  check_backward_args(grad_loss, q_in, k_in, q_labels_in, k_labels_in, lse_in, npos_in, temperature, self_offset,
                      positive_weight, two_way);
  check_two_way(two_way, self_offset, false, exclude_positives, positive_weight);
  check_sigmoid(sigmoid, self_offset, false, exclude_positives, positive_weight, two_way, bias, q_in);
  if (probs.has_value()) check_probs(*probs, q_in, k_in);  // never kept on CUDA: recomputed below
  B::check_device(q_in);
  const typename B::Guard guard(q_in.device());
  const int64_t m = q_in.size(0), l = k_in.size(0), d = q_in.size(1);
  const ContiguousInputs in = contiguous_inputs(q_in, k_in, q_labels_in, k_labels_in);
  const at::Tensor& q = in.q;
  const at::Tensor& k = in.k;
  at::Tensor grad_q, grad_k, grad_t;
  if (m == 0 || l == 0) {
    if (output_mask[0]) grad_q = at::zeros_like(q, at::MemoryFormat::Contiguous);
    if (output_mask[1]) grad_k = at::zeros_like(k, at::MemoryFormat::Contiguous);
    if (output_mask[2]) grad_t = at::zeros({}, q.options().dtype(acc_dtype(q)));
    return {grad_q, grad_k, grad_t};
  }
  // q is k (NT-Xent, multi-view, SupCon): one pass gives the whole gradient (H = dS + dS^T), returned as
  // grad_q; grad_k is zero. Only the passes the output mask needs run (backward_passes, ntxent_checks.h).
  const bool symmetric = !two_way && is_symmetric_case(q_in, k_in, q_labels_in, k_labels_in, self_offset);
  const BackwardPasses passes = backward_passes(output_mask, symmetric);
  count_path(two_way ? Path::kCudaBackwardTwoWay
                     : (symmetric ? Path::kCudaBackwardSymmetric : Path::kCudaBackwardGeneral));
  if (passes.dq) count_pass(Pass::kCudaDq);
  if (passes.dk) count_pass(Pass::kCudaDk);
  if (symmetric && output_mask[1]) grad_k = at::zeros_like(k, at::MemoryFormat::Contiguous);
  if (!passes.dq && !passes.dk) return {grad_q, grad_k, grad_t};
  // The dq pass's output also when only the temperature needs it (its radial dots); dropped below then.
  const at::Tensor grad_q_buffer = passes.dq ? B::empty(q.sizes(), q.options()) : at::Tensor();
  if (passes.dk) grad_k = B::empty(k.sizes(), k.options());
  const auto acc = acc_dtype(q);
  const at::Tensor g = grad_loss.to(acc).contiguous();
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor npos = npos_in.contiguous();
  const HostTemperature temp = host_temperature<B>(temperature, q);
  const HostBias hbias = host_bias<B>(bias, q);
  const at::Tensor weight = positive_weight.has_value() ? positive_weight->contiguous() : at::Tensor();
  // Radial dots <qhat_i, dqhat_i> of the query rows: the temperature's gradient (ntxent.h).
  const at::Tensor radial = B::empty({m}, q.options().dtype(acc));
  const typename B::Stream stream = B::stream(q);

  dispatch_floating(q.scalar_type(), "simclr_ext ntxent (CUDA)", [&](auto tag) {
    using T = cuda_storage_t<decltype(tag)>;
    using acc_t = acc_of<T>;
    const Normalized nz = normalize_inputs<B, T>(in, normalize, stream);
    const CudaPlan& plan = nz.plan;
    // One slice of partial sums per split of the streamed tiles; normalize_backward adds them up.
    const at::Tensor dqhat =
        passes.dq ? B::empty({plan.splits_dq, plan.rows_q, plan.dim}, q.options().dtype(acc)) : at::Tensor();
    const at::Tensor dkhat =
        passes.dk ? B::empty({plan.splits_dk, plan.rows_k, plan.dim}, q.options().dtype(acc)) : at::Tensor();
    const Temperature<acc_t> inv_t = kernel_temperature<acc_t>(temp);
    // Bound of |dL/dcos| for the float16 operand scale (pow2_scale, ntxent.h), on the stream: no sync.
    // Sigmoid mode: every row has a gradient, |dL/dcos| <= |g| / t too.
    at::Tensor g_bound = sigmoid ? g.abs() : g.abs().masked_fill(npos == 0, 0);
    if (weight.defined()) g_bound = g_bound * weight.abs().clamp_min(1);
    const at::Tensor grad_bound = times_inverse_temperature(g_bound.amax(), temp);
    dispatch_path<T>(allow_tf32, [&](auto tensor_cores) {
      constexpr bool kTC = decltype(tensor_cores)::value;
      // One pass: dhat of the own rows (queries: dQ, keys: dK) from the other side's tiles.
      // own_base / other_base: where the own and the other rows' factors start in lse / grad / npos.
      auto pass = [&](auto own_is_query, auto both_factors, const at::Tensor& own_hat, const at::Tensor& other_hat,
                      const at::Tensor& own_labels, const at::Tensor& other_labels, int64_t own_n, int64_t other_n,
                      int64_t grid, int64_t splits, const at::Tensor& dhat, int64_t own_base, int64_t other_base) {
        auto kernel = grad_kernel<T, kTC, decltype(own_is_query)::value, decltype(both_factors)::value>;
        set_smem<B>(kernel, plan.smem_bwd, q);
        const dim3 blocks(static_cast<unsigned>(grid), static_cast<unsigned>(plan.out_chunks),
                          static_cast<unsigned>(splits));
        B::launch(kernel, blocks, dim3(kCudaThreads), plan.smem_bwd, stream, ptr<const T>(own_hat),
                  ptr<const T>(other_hat), ptr<const int64_t>(own_labels), ptr<const int64_t>(other_labels), own_n,
                  other_n, plan.dim, ptr<const acc_t>(lse), ptr<const acc_t>(g), ptr<const int>(npos), own_base,
                  other_base, ptr<const acc_t>(grad_bound), inv_t, self_offset, exclude_positives,
                  weight_ptr<acc_t>(weight), sigmoid, kernel_bias<acc_t>(hbias), ptr<acc_t>(dhat));
      };
      if (symmetric) {
        pass(std::true_type{}, std::true_type{}, nz.qhat, nz.qhat, in.q_labels, in.q_labels, m, m, plan.grid_q,
             plan.splits_dq, dqhat, 0, 0);
        return;
      }
      if (two_way) {  // query rows' factors at [0, M), key columns' at [M, M + L)
        if (passes.dq) {
          pass(std::true_type{}, std::true_type{}, nz.qhat, nz.khat, in.q_labels, in.k_labels, m, l, plan.grid_q,
               plan.splits_dq, dqhat, 0, m);
        }
        if (passes.dk) {
          pass(std::false_type{}, std::true_type{}, nz.khat, nz.qhat, in.k_labels, in.q_labels, l, m, plan.grid_k,
               plan.splits_dk, dkhat, m, 0);
        }
        return;
      }
      if (passes.dq) {
        pass(std::true_type{}, std::false_type{}, nz.qhat, nz.khat, in.q_labels, in.k_labels, m, l, plan.grid_q,
             plan.splits_dq, dqhat, 0, 0);
      }
      if (passes.dk) {
        pass(std::false_type{}, std::false_type{}, nz.khat, nz.qhat, in.k_labels, in.q_labels, l, m, plan.grid_k,
             plan.splits_dk, dkhat, 0, 0);
      }
    });
    // Back through the normalization, summing the split slices: grad = (dxhat - xhat <xhat, dxhat>) / |x|.
    auto norm_backward = [&](const at::Tensor& x, const at::Tensor& dxhat, int64_t n, int64_t grid, int64_t splits,
                             int64_t rows_padded, const at::Tensor& grad, acc_t* radial_out) {
      B::launch(normalize_backward_kernel<T>, dim3(static_cast<unsigned>(grid)), dim3(32 * kCudaNormRowsPerBlock), 0,
                stream, ptr<const T>(x), ptr<const acc_t>(dxhat), n, d, plan.dim, splits, rows_padded * plan.dim,
                normalize, ptr<T>(grad), radial_out);
    };
    if (passes.dq) {
      norm_backward(q, dqhat, m, plan.norm_grid_q, plan.splits_dq, plan.rows_q, grad_q_buffer, ptr<acc_t>(radial));
    }
    if (passes.dk) norm_backward(k, dkhat, l, plan.norm_grid_k, plan.splits_dk, plan.rows_k, grad_k, nullptr);
  });
  if (output_mask[0]) grad_q = grad_q_buffer;
  // dL/dt = -(1/t) sum_i <qhat_i, dqhat_i>, halved when the rows count both sides (q is k); on the stream.
  if (output_mask[2]) grad_t = times_inverse_temperature(radial.sum(), temp).mul(symmetric ? -0.5 : -1.0);
  return {grad_q, grad_k, grad_t};
}

}  // namespace

// The CUDA build registers the kernels for CUDA tensors; the emulated test build (tests/cuda_emu/) includes
// this file and registers the same orchestration on its own backend.
#if !defined(SIMCLR_EXT_CUDA_EMU)
TORCH_LIBRARY_IMPL(simclr_ext, CUDA, m) {
  m.impl("ntxent", &ntxent_forward_cuda<CudaBackend>);
  m.impl("_ntxent_backward", &ntxent_backward_cuda<CudaBackend>);
}
#endif

}  // namespace ntxent
}  // namespace simclr_ext
