// The augmentation op's CUDA kernels registered for CUDA tensors: the host orchestration
// (augment_cuda_host.h) on the CUDA runtime (csrc/common/cuda_backend.cuh).
#include <torch/library.h>

#include "augment/augment_cuda_host.h"
#include "common/cuda_backend.cuh"

namespace simclr_ext {
namespace augment {

TORCH_LIBRARY_IMPL(simclr_ext, CUDA, m) { m.impl("augment", &augment_forward_cuda<CudaBackend>); }

}  // namespace augment
}  // namespace simclr_ext
