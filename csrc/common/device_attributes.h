// Device attributes the CUDA kernels plan their launches with, queried once per device per process
// (cudaDeviceGetAttribute is a driver round trip; launches ask on every call). Host-only, CUDA builds.
// Shared by every op's CUDA code.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime.h>

#include "common/per_device_cache.h"

namespace simclr_ext {

struct DeviceAttributes {
  int max_shared_memory_per_block_optin;  // static + dynamic shared memory a block may opt in to
  int multiprocessor_count;
};

inline DeviceAttributes query_device_attributes(int device) {
  DeviceAttributes a{};
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&a.max_shared_memory_per_block_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&a.multiprocessor_count, cudaDevAttrMultiProcessorCount, device));
  return a;
}

// The attributes of CUDA device `device` (an index of this process's visible devices).
inline const DeviceAttributes& device_attributes(int device) {
  static PerDeviceCache<DeviceAttributes> cache(c10::cuda::device_count());
  return cache.get(device, query_device_attributes);
}

}  // namespace simclr_ext
