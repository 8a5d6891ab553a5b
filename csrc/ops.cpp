// Every op schema of simclr_ext, in one place. Kernels register per backend in their own files
// (csrc/<family>/<family>_<backend>.{cpp,cu}); Python adds fake kernels and autograd in simclr_ext/ops.py.
#include <Python.h>
#include <torch/library.h>

// Importing simclr_ext._C loads this shared object, which runs the TORCH_LIBRARY registrations below.
// No pybind11 module: the ops are reached through torch.ops.simclr_ext.*.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(simclr_ext, m) {
  // Contrastive loss over cosine similarities (see csrc/ntxent/ntxent.h for the math).
  // q: (M, D), k: (L, D) floating; q_labels: (M,) int64, k_labels: (L,) int64.
  // self_offset: -1, or query i is key i + self_offset (excluded from numerator and denominator).
  // Returns (loss (M,), lse (M,), npos (M,) int32); loss/lse are float64 for float64 inputs, else float32.
  m.def(
      "ntxent(Tensor q, Tensor k, Tensor q_labels, Tensor k_labels, float temperature, "
      "int self_offset, bool allow_tf32) -> (Tensor, Tensor, Tensor)");
  // Gradients of sum_i grad_loss[i] * loss[i] with respect to q and k (dtype and shape of q and k).
  m.def(
      "_ntxent_backward(Tensor grad_loss, Tensor q, Tensor k, Tensor q_labels, Tensor k_labels, "
      "Tensor lse, Tensor npos, float temperature, int self_offset, bool allow_tf32) -> (Tensor, Tensor)");
}
