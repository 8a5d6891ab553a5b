// What the device code of every op includes for CUDA's types and built-ins: the CUDA headers, or with
// SIMCLR_EXT_CUDA_EMU (test builds, tests/cuda_emu/) the host emulation of CUDA's execution model
// (csrc/common/simt_host.h) that runs the same kernels on CPU threads. Also the two shared-memory
// declarations whose form differs between the two (a declaration qualifier cannot be emulated by a macro):
//   SIMCLR_DYNAMIC_SHARED(type, name)   extern __shared__ __align__(128) type name[]  (a type* in emulation)
//   SIMCLR_STATIC_SHARED(type, name)    __shared__ type name                          (a type& in emulation)
#pragma once

#if defined(SIMCLR_EXT_CUDA_EMU)
#include "common/simt_host.h"

#define SIMCLR_DYNAMIC_SHARED(type, name) type* const name = ::simclr_ext::simt::dynamic_shared<type>()
#define SIMCLR_STATIC_SHARED(type, name)   \
  static const char name##_shared_key = 0; \
  ::simclr_ext::shared_type<type>& name =  \
      ::simclr_ext::simt::static_shared<::simclr_ext::shared_type<type>>(&name##_shared_key)
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#define SIMCLR_DYNAMIC_SHARED(type, name) extern __shared__ __align__(128) type name[]
#define SIMCLR_STATIC_SHARED(type, name) __shared__::simclr_ext::shared_type<type> name
#endif

namespace simclr_ext {
// Lets SIMCLR_STATIC_SHARED take array types: shared_type<float[32]> name declares float name[32].
template <typename T>
using shared_type = T;
}  // namespace simclr_ext
