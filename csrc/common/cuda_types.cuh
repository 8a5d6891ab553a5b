// CUDA's storage type of each C++ type dispatch_floating (csrc/common/dispatch.h) hands to a kernel's host
// code: c10::Half -> __half, c10::BFloat16 -> __nv_bfloat16 (same bits, the CUDA intrinsics' types), float
// and double unchanged. The body of a dispatch then reads `using T = cuda_storage_t<decltype(tag)>;`.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "common/cuda_device.cuh"

namespace simclr_ext {

template <typename T>
struct CudaStorage {
  using type = T;
};
template <>
struct CudaStorage<c10::Half> {
  using type = __half;
};
template <>
struct CudaStorage<c10::BFloat16> {
  using type = __nv_bfloat16;
};
template <typename T>
using cuda_storage_t = typename CudaStorage<T>::type;

static_assert(sizeof(cuda_storage_t<c10::Half>) == sizeof(c10::Half), "same bits");
static_assert(sizeof(cuda_storage_t<c10::BFloat16>) == sizeof(c10::BFloat16), "same bits");

}  // namespace simclr_ext
