// The CUDA runtime as the backend of the ops' host orchestration (csrc/ntxent/ntxent_cuda.cu,
// csrc/augment/augment_cuda.cu): the current device and stream, the device's attributes, the
// shared-memory opt-in, <<<>>> launches checked at once, and allocation. Its emulated counterpart, which runs
// the same orchestration on the CPU, is tests/cuda_emu/emu_backend.h. nvcc only.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <utility>

#include "common/device_attributes.h"
#include "common/per_device_cache.h"

namespace simclr_ext {

struct CudaBackend {
  using Stream = cudaStream_t;
  using Guard = c10::cuda::CUDAGuard;
  static constexpr const char* kName = "CUDA";

  static void check_device(const at::Tensor& q) {
    TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor for the CUDA kernel, got ", q.device());
  }
  static Stream stream(const at::Tensor& on) { return c10::cuda::getCurrentCUDAStream(on.device().index()).stream(); }
  // The device's limits, read once per device (csrc/common/device_attributes.h).
  static int64_t sm_count(const at::Tensor& on) { return device_attributes(on.get_device()).multiprocessor_count; }
  static int64_t smem_optin(const at::Tensor& on) {
    return device_attributes(on.get_device()).max_shared_memory_per_block_optin;
  }
  // A kernel's static shared memory on `on`'s device (it comes out of the opt-in limit too), asked once per
  // device.
  template <auto Kernel>
  static int64_t static_smem(const at::Tensor& on) {
    static PerDeviceCache<int64_t> cache(c10::cuda::device_count());
    return cache.get(on.get_device(), [](int d) {
      const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(d));
      cudaFuncAttributes attr;
      C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, Kernel));
      return static_cast<int64_t>(attr.sharedSizeBytes);
    });
  }
  template <typename Kernel>
  static void set_max_dynamic_smem(Kernel kernel, int64_t bytes) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
  template <typename... P, typename... A>
  static void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, Stream stream, A&&... args) {
    kernel<<<grid, block, smem, stream>>>(std::forward<A>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  static at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options,
                          at::MemoryFormat format = at::MemoryFormat::Contiguous) {
    return at::empty(sizes, options, format);
  }
  // A CPU scalar (the temperature, the sigmoid bias) is read on the host and passed by value; a GPU one is read by
  // the kernels.
  static bool scalar_on_host(const at::Tensor& t) { return t.device().is_cpu(); }
};

}  // namespace simclr_ext
