// The simclr_ext_emu op namespace: the emulated kernels' ops take the schemas of simclr_ext's (read from the
// dispatcher, so they never drift: simclr_ext must be imported first), plus the path counters of this
// binary and the emulated device's SM count and shared-memory limit.
#include <ATen/core/dispatch/Dispatcher.h>
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "emu_backend.h"
#include "ntxent/ntxent_paths.h"

// Importing the module (tests/cuda_emu/build.py) runs the registrations below; no pybind11 module.
PyMODINIT_FUNC PyInit_simclr_ext_emu(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "simclr_ext_emu", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}

namespace {

// simclr_ext::<name>'s schema, as "<name>(...) -> ..." for this namespace.
std::string schema_of(const char* name) {
  const auto handle = c10::Dispatcher::singleton().findSchema({std::string("simclr_ext::") + name, ""});
  TORCH_CHECK(handle.has_value(), "simclr_ext_emu: simclr_ext::", name, " is not registered: import simclr_ext first");
  std::string s = c10::toString(handle->schema());
  return s.substr(s.find("::") + 2);
}

void set_emulated_device(int64_t sm_count, int64_t smem_optin) {
  TORCH_CHECK(sm_count >= 1, "sm_count must be >= 1, got ", sm_count);
  TORCH_CHECK(smem_optin >= 48 * 1024, "smem_optin must be >= 49152 bytes, got ", smem_optin);
  simclr_ext::emulated_device().sm_count = sm_count;
  simclr_ext::emulated_device().smem_optin = smem_optin;
}

}  // namespace

TORCH_LIBRARY(simclr_ext_emu, m) {
  for (const char* name : {"ntxent", "_ntxent_backward", "augment"}) m.def(schema_of(name).c_str());
  m.def("_ntxent_path_counts() -> str", &simclr_ext::ntxent::path_counts);
  m.def("_ntxent_pass_counts() -> str", &simclr_ext::ntxent::pass_counts);
  m.def("_ntxent_reset_path_counts() -> ()", &simclr_ext::ntxent::reset_path_counts);
  m.def("set_emulated_device(int sm_count, int smem_optin) -> ()", &set_emulated_device);
}
