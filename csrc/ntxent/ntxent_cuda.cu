// The contrastive op's CUDA kernels registered for CUDA tensors: the host orchestration
// (ntxent_cuda_host.h) on the CUDA runtime (csrc/common/cuda_backend.cuh).
#include <torch/library.h>

#include "common/cuda_backend.cuh"
#include "ntxent/ntxent_cuda_host.h"

namespace simclr_ext {
namespace ntxent {

TORCH_LIBRARY_IMPL(simclr_ext, CUDA, m) {
  m.impl("ntxent", &ntxent_forward_cuda<CudaBackend>);
  m.impl("_ntxent_backward", &ntxent_backward_cuda<CudaBackend>);
}

}  // namespace ntxent
}  // namespace simclr_ext
