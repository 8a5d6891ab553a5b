// Every op schema of simclr_ext, in one place. Kernels register per backend in their own files
// (csrc/<op>/<op>_<backend>.{cpp,cu}, functions <op>_forward_<backend> / <op>_backward_<backend>); Python
// adds fake kernels in simclr_ext/ops.py, whose wrappers are named like the schemas. Shared by both op
// families: csrc/common/ (host/device macro, accumulation type, dispatch, SIMD-clone policy, CUDA device
// attributes).
//
// Index: public function -> wrapper -> schema -> kernel files -> tests -> benchmark
//   contrastive_loss, nt_xent, NTXentLoss, clip_loss, ClipLoss, supcon_loss, SupConLoss, dcl_loss, dclw_loss,
//   DCLLoss, DCLWLoss (simclr_ext/loss.py, clip_loss.py, supcon_loss.py, dcl_loss.py)
//     -> simclr_ext.ops.ntxent -> simclr_ext::ntxent, simclr_ext::_ntxent_backward
//     -> csrc/ntxent/: ntxent.h (math), ntxent_checks.h, ntxent_cpu.cpp (ntxent_forward_cpu,
//        ntxent_backward_cpu), ntxent_cuda.cu (ntxent_forward_cuda, ntxent_backward_cuda) with
//        ntxent_cuda_kernels.cuh and ntxent_cuda_plan.h, ntxent_autograd.cpp, ntxent_paths.h
//     -> tests/test_ntxent_parity.py (the contract on every device), test_ntxent_cuda_only.py (GPU-only
//        properties), test_ntxent_*.py (paths, variants, two-way, output mask, errors, registration, memory,
//        lightly drop-in), tests/cpp/ntxent_cuda_plan_test.cpp (via test_ntxent_cuda_host.py);
//        tests/test_clip_loss.py, test_supcon_loss.py, test_dcl_loss.py, test_losses_distributed.py
//     -> benchmarks/bench_ntxent.py, bench_losses.py
//   augment, SimCLRAugment, SimCLRTransform (simclr_ext/augment.py, transforms.py)
//     -> simclr_ext.ops.augment -> simclr_ext::augment
//     -> csrc/augment/: augment.h (math), augment_checks.h, augment_cpu.cpp (augment_forward_cpu),
//        augment_cuda.cu (augment_forward_cuda) with augment_cuda_kernels.cuh and augment_cuda_plan.h
//     -> tests/test_augment.py (the contract on every device), test_augment_*.py,
//        tests/cpp/augment_cuda_plan_test.cpp (via test_augment_cuda_host.py), tests/test_transforms.py
//     -> benchmarks/bench_augment.py
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "common/simd.h"
#include "ntxent/ntxent_paths.h"

// setup.py passes the CUDA targets unquoted (e.g. sm_80+sm_90): it travels through a shell.
#define SIMCLR_EXT_STRINGIFY_(x) #x
#define SIMCLR_EXT_STRINGIFY(x) SIMCLR_EXT_STRINGIFY_(x)
#ifdef SIMCLR_EXT_CUDA_ARCHS
#define SIMCLR_EXT_ARCHS_STR SIMCLR_EXT_STRINGIFY(SIMCLR_EXT_CUDA_ARCHS)
#else
#define SIMCLR_EXT_ARCHS_STR ""
#endif

// Importing simclr_ext._C loads this shared object, which runs the TORCH_LIBRARY registrations below.
// No pybind11 module: the ops are reached through torch.ops.simclr_ext.*.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace {

// How this binary was built, for simclr_ext.info(): "cuda=<0|1>;archs=<list>;openmp=<0|1>".
std::string build_info() {
#ifdef SIMCLR_EXT_WITH_CUDA
  const char* cuda = "1";
#else
  const char* cuda = "0";
#endif
#ifdef _OPENMP
  const char* openmp = "1";
#else
  const char* openmp = "0";
#endif
  return std::string("cuda=") + cuda + ";archs=" + SIMCLR_EXT_ARCHS_STR + ";openmp=" + openmp;
}

// The SIMD clone the CPU kernels run and the best this CPU and build could (csrc/common/simd.h), for
// simclr_ext.info(): "active=<name>;best=<name>". Raises for a SIMCLR_EXT_CPU_ISA that cannot run.
std::string cpu_isa_info() {
  return std::string("active=") + simclr_ext::cpu_isa_name(simclr_ext::cpu_isa()) +
         ";best=" + simclr_ext::cpu_isa_name(simclr_ext::best_cpu_isa());
}

}  // namespace

TORCH_LIBRARY(simclr_ext, m) {
  // Contrastive loss over cosine similarities (see csrc/ntxent/ntxent.h for the math).
  // q: (M, D), k: (L, D) floating; q_labels: (M,) int64, k_labels: (L,) int64.
  // temperature: 0-d floating tensor on the CPU or q's device; differentiable (_ntxent_backward returns its
  // gradient). self_offset: -1, or query i is key i + self_offset (excluded from numerator and denominator).
  // exclude_positives: the positives leave the denominator too (DCL). positive_weight: None, or (M,) weights of
  // the positive term in the accumulation dtype (DCLW).
  // keep_probs (CPU only; CUDA ignores it): also return the (M, L) softmax probabilities for the backward,
  // which then skips recomputing scores (simclr_ext/ops.py asks for it on small problems only).
  // two_way (CLIP): also the loss of every key column over the queries, from the same tiles; needs
  // self_offset -1 and no DCL/DCLW terms or kept probabilities.
  // normalize=False: dot products of the rows as given instead of cosines (open_clip's logits).
  // sigmoid (SigLIP): per-pair sigmoid losses sum_j softplus(-y_ij (s_ij + bias)) per query row instead of the
  // softmax; bias: None (0) or a 0-d floating tensor on the CPU or q's device, differentiable; needs
  // self_offset -1 and none of two_way, keep_probs, DCL / DCLW terms. Its lse output is sum_j sigmoid(z_ij).
  // Returns (loss, lse, npos int32, probs): (M,) each, (M + L,) with two_way (query rows, then key columns);
  // loss/lse/probs are float64 for float64 inputs, else float32; probs is (M, L) when kept, else (0, 0).
  m.def(
      "ntxent(Tensor q, Tensor k, Tensor q_labels, Tensor k_labels, Tensor temperature, "
      "int self_offset, bool allow_tf32, bool keep_probs=False, bool exclude_positives=False, "
      "Tensor? positive_weight=None, bool two_way=False, bool normalize=True, bool sigmoid=False, "
      "Tensor? bias=None) -> (Tensor, Tensor, Tensor, Tensor)");
  // Gradients of sum_i grad_loss[i] * loss[i] with respect to q and k (dtype and shape of q and k) and the
  // temperature (0-d, accumulation dtype, on q's device). The bias's gradient needs no pass: the autograd
  // forms it from the forward's outputs (ntxent.h).
  // probs: the forward's, when kept. When q is k (same labels tensor, self_offset 0, not two_way) the whole
  // gradient of that one tensor is returned as grad_q and grad_k is zero.
  // output_mask: which of (grad_q, grad_k, grad_temperature) to compute; the others come back undefined
  // (None), and the passes only they need are skipped (keys detached: no dK pass; ntxent_checks.h).
  m.def(
      "_ntxent_backward(Tensor grad_loss, Tensor q, Tensor k, Tensor q_labels, Tensor k_labels, "
      "Tensor lse, Tensor npos, Tensor temperature, int self_offset, bool allow_tf32, Tensor? probs=None, "
      "bool exclude_positives=False, Tensor? positive_weight=None, bool two_way=False, "
      "bool[3] output_mask=[True, True, True], bool normalize=True, bool sigmoid=False, Tensor? bias=None) "
      "-> (Tensor, Tensor, Tensor)");
  // How the extension was built, for simclr_ext.info().
  m.def("_build_info() -> str", &build_info);
  // Which SIMD clone the CPU kernels run, for simclr_ext.info().
  m.def("_cpu_isa_info() -> str", &cpu_isa_info);
  // Debug counters of the kernels' code paths and backward passes (csrc/ntxent/ntxent_paths.h):
  // "name=count;..."; the reset clears both.
  m.def("_ntxent_path_counts() -> str", &simclr_ext::ntxent::path_counts);
  m.def("_ntxent_pass_counts() -> str", &simclr_ext::ntxent::pass_counts);
  m.def("_ntxent_reset_path_counts() -> ()", &simclr_ext::ntxent::reset_path_counts);
  // Fused SimCLR augmentation (see csrc/augment/augment.h for the pipeline and the params columns).
  // src: packed images, 1-D uint8 or float32 on the op's device; image b starts at offsets[b] and is
  // channels x shapes[b] = (H, W), laid out (C, H, W) or (H, W, C) (src_channels_last). offsets (B,) int64,
  // shapes (B, 2) int64 and params (B, P) float32 are CPU tensors. Returns (B, channels, out_h, out_w) of
  // out_dtype (float32 / float16 / bfloat16), contiguous or channels_last (out_channels_last).
  m.def(
      "augment(Tensor src, Tensor offsets, Tensor shapes, Tensor params, int channels, bool src_channels_last, "
      "int out_h, int out_w, int blur_kernel, float solarize_threshold, float[] mean, float[] std, "
      "ScalarType out_dtype, bool out_channels_last) -> Tensor");
}
