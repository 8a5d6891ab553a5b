// The host emulation of CUDA (csrc/common/simt_host.h) as the backend of the ops' host orchestration
// (csrc/ntxent/ntxent_cuda.cu, csrc/augment/augment_cuda.cu), the counterpart of
// csrc/common/cuda_backend.cuh: "device" tensors are CPU tensors, launches run at once on CPU threads, the
// device's SM count and shared-memory limit are those set by set_emulated_device (tests pick small SM
// counts so that the split plans run), and every buffer the orchestration allocates for the kernels to
// write is poisoned first (NaN, or INT_MIN in integer buffers), so that an element no kernel writes shows.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <utility>

#include "common/simt_host.h"

namespace simclr_ext {

struct EmulatedDevice {
  std::atomic<int64_t> sm_count{4};
  std::atomic<int64_t> smem_optin{232448};  // an H100's opt-in limit (227 KiB)
};

inline EmulatedDevice& emulated_device() {
  static EmulatedDevice device;
  return device;
}

struct EmuBackend {
  using Stream = int;  // one implicit stream: every launch has finished when it returns
  struct Guard {
    explicit Guard(const c10::Device& /*device*/) {}
  };
  static constexpr const char* kName = "CUDA emulation";

  static void check_device(const at::Tensor& q) {
    TORCH_CHECK(q.is_cpu(), "q must be a CPU tensor for the emulated CUDA kernel, got ", q.device());
  }
  static Stream stream(const at::Tensor& /*on*/) { return 0; }
  static int64_t sm_count(const at::Tensor& /*on*/) { return emulated_device().sm_count.load(); }
  static int64_t smem_optin(const at::Tensor& /*on*/) { return emulated_device().smem_optin.load(); }
  // The static shared memory of a kernel is known to nvcc's output only; the augmentation kernel's (its
  // BlockSample, ~100 bytes) is taken as 1 KiB, so the blur plan keeps a margin below the opt-in limit.
  template <auto Kernel>
  static int64_t static_smem(const at::Tensor& /*on*/) {
    return 1024;
  }
  template <typename Kernel>
  static void set_max_dynamic_smem(Kernel kernel, int64_t bytes) {
    simt::func_set_max_dynamic_shared(kernel, static_cast<size_t>(bytes));
  }
  template <typename... P, typename... A>
  static void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, Stream /*stream*/, A&&... args) {
    try {
      simt::launch(kernel, grid, block, smem, std::forward<A>(args)...);
    } catch (const std::runtime_error& e) {
      TORCH_CHECK(false, e.what());
    }
  }
  static at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options,
                          at::MemoryFormat format = at::MemoryFormat::Contiguous) {
    at::Tensor t = at::empty(sizes, options, format);
    if (at::isFloatingType(t.scalar_type())) {
      t.fill_(std::numeric_limits<double>::quiet_NaN());
    } else {
      t.fill_(std::numeric_limits<int32_t>::min());
    }
    return t;
  }
  // Every tensor is a "device" tensor here: a float64 temperature or bias (what simclr_ext.ops makes of a number) is
  // read on the host and passed by value, any other dtype (a learnable float32 temperature) is read by the
  // kernels from memory, so both of the kernels' temperature paths run.
  static bool scalar_on_host(const at::Tensor& t) { return t.scalar_type() == at::kDouble; }
};

}  // namespace simclr_ext
