// Which SIMD clone the CPU kernels run (simd.h): the best this CPU supports, or SIMCLR_EXT_CPU_ISA's.
#include "common/simd.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace simclr_ext {
namespace {

CpuIsa requested_or(CpuIsa best) {
  const char* env = std::getenv("SIMCLR_EXT_CPU_ISA");
  if (env == nullptr || *env == '\0') return best;
  const std::string name(env);
  CpuIsa want;
  if (name == "avx512") {
    want = CpuIsa::kAvx512;
  } else if (name == "avx2") {
    want = CpuIsa::kAvx2;
  } else if (name == "baseline") {
    want = CpuIsa::kBaseline;
  } else {
    TORCH_CHECK(false, "SIMCLR_EXT_CPU_ISA must be avx512, avx2 or baseline (or unset: the best this CPU runs), got '",
                name, "'");
  }
  TORCH_CHECK(static_cast<int>(want) <= static_cast<int>(best), "SIMCLR_EXT_CPU_ISA=", name,
              ": this CPU and build run at most the ", cpu_isa_name(best), " clone");
  return want;
}

}  // namespace

CpuIsa best_cpu_isa() {
#if defined(SIMCLR_X86_CLONES) && __GNUC__ >= 12
  // The x86-64-v4 / v3 levels the clones are compiled for (CPU features of __builtin_cpu_supports since GCC 12).
  if (__builtin_cpu_supports("x86-64-v4")) return CpuIsa::kAvx512;
  if (__builtin_cpu_supports("x86-64-v3")) return CpuIsa::kAvx2;
#elif defined(SIMCLR_X86_CLONES)
  // GCC 11 (the first with the x86-64-v3 / v4 targets): the levels' vector and bit-manipulation features.
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2")) {
    const bool v4 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                    __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
                    __builtin_cpu_supports("avx512vl");
    return v4 ? CpuIsa::kAvx512 : CpuIsa::kAvx2;
  }
#endif
  return CpuIsa::kBaseline;
}

CpuIsa cpu_isa() {
  static const CpuIsa isa = requested_or(best_cpu_isa());  // read once; a throw is retried on the next call
  return isa;
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512:
      return "avx512";
    case CpuIsa::kAvx2:
      return "avx2";
    default:
      return "baseline";
  }
}

}  // namespace simclr_ext
