// The SIMD-clone policy of the CPU kernels of both op families. Their hot loops (the functions marked
// SIMCLR_SIMD_CLONES), written as plain passes over contiguous arrays so that the compiler vectorizes them,
// are reached through simd_dispatch(f): on x86-64 with GCC, f and everything it calls is inlined
// (`flatten`) into three copies compiled for AVX-512 (x86-64-v4), AVX2 + FMA (x86-64-v3) and the baseline
// ISA, and the copy of the clone cpu_isa() names runs: the best the CPU supports, or the one that
// SIMCLR_EXT_CPU_ISA (avx512 | avx2 | baseline, read once) asks for, so that an AVX2 machine's code can be
// run and profiled on an AVX-512 one. Elsewhere (aarch64, clang, GCC < 11, SIMCLR_EXT_PORTABLE_ONLY) there is one
// copy, the baseline, which is what cpu_isa() then reports.
// The build passes -ffp-contract=off and no -ffast-math, so no clone fuses a multiply-add or reorders a
// sum of its own accord: element-wise results are identical in every clone (sums reordered on purpose,
// `omp simd reduction`, follow the vector width).
#pragma once

// GCC 11 is the first to know the x86-64-v3 / v4 targets; older ones build the baseline only.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__) && \
    !defined(SIMCLR_EXT_PORTABLE_ONLY)
#define SIMCLR_X86_CLONES 1
#endif

// Marks a hot loop function: its callers reach it through simd_dispatch, which compiles it once per clone.
#define SIMCLR_SIMD_CLONES

namespace simclr_ext {

enum class CpuIsa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// The clone simd_dispatch runs (csrc/common/simd.cpp): chosen on first use; a SIMCLR_EXT_CPU_ISA this CPU
// (or this build) cannot run, or an unknown name, is an error that names the variable and the value.
CpuIsa cpu_isa();
// The best clone this CPU and this build can run.
CpuIsa best_cpu_isa();
const char* cpu_isa_name(CpuIsa isa);

// Floats per vector register of the clone that runs: 16 (AVX-512), 8 (AVX2), 4 (the baseline: SSE2 on x86,
// NEON on aarch64), for loops written with GCC vectors of an explicit width.
inline int simd_floats() {
  switch (cpu_isa()) {
    case CpuIsa::kAvx512:
      return 16;
    case CpuIsa::kAvx2:
      return 8;
    default:
      return 4;
  }
}

#ifdef SIMCLR_X86_CLONES
template <typename F>
__attribute__((target("arch=x86-64-v4"), flatten)) void run_avx512(const F& f) {
  f();
}
template <typename F>
__attribute__((target("arch=x86-64-v3"), flatten)) void run_avx2(const F& f) {
  f();
}
template <typename F>
__attribute__((flatten)) void run_baseline(const F& f) {
  f();
}

template <typename F>
inline void simd_dispatch(const F& f) {
  switch (cpu_isa()) {
    case CpuIsa::kAvx512:
      run_avx512(f);
      break;
    case CpuIsa::kAvx2:
      run_avx2(f);
      break;
    default:
      run_baseline(f);
      break;
  }
}
#else
template <typename F>
inline void simd_dispatch(const F& f) {
  f();
}
#endif

}  // namespace simclr_ext
