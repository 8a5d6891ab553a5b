// The contrastive op's CUDA kernels, emulated on the CPU (csrc/common/simt_host.h), registered for CPU tensors
// as simclr_ext_emu::ntxent / _ntxent_backward: the host orchestration a GPU runs (ntxent_cuda.cu) on the
// emulated backend (emu_backend.h). Test build only (tests/cuda_emu/build.py).
#include <torch/library.h>

#include "emu_backend.h"
#include "ntxent/ntxent_cuda.cu"  // the host orchestration, as the GPU build compiles it

namespace simclr_ext {
namespace ntxent {

TORCH_LIBRARY_IMPL(simclr_ext_emu, CPU, m) {
  m.impl("ntxent", &ntxent_forward_cuda<EmuBackend>);
  m.impl("_ntxent_backward", &ntxent_backward_cuda<EmuBackend>);
}

}  // namespace ntxent
}  // namespace simclr_ext
