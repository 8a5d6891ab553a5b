// The augmentation op's CUDA kernels, emulated on the CPU (csrc/common/simt_host.h), registered for CPU
// tensors as simclr_ext_emu::augment: the host orchestration a GPU runs (augment_cuda.cu) on the
// emulated backend (emu_backend.h). Test build only (tests/cuda_emu/build.py).
#include <torch/library.h>

#include "augment/augment_cuda.cu"  // the host orchestration, as the GPU build compiles it
#include "emu_backend.h"

namespace simclr_ext {
namespace augment {

TORCH_LIBRARY_IMPL(simclr_ext_emu, CPU, m) { m.impl("augment", &augment_forward_cuda<EmuBackend>); }

}  // namespace augment
}  // namespace simclr_ext
