// What host and device code of both op families share: the function qualifier of helpers compiled for both
// (nvcc sees __host__ __device__, the C++ compiler a plain inline) and integer helpers the launch plans and
// the CPU tiles use. Includes nothing, so that host-only tests (tests/cpp) compile it with any C++ compiler.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SIMCLR_HD __host__ __device__ __forceinline__
#else
#define SIMCLR_HD inline
#endif
// For helpers that also size arrays and template arguments at compile time.
#define SIMCLR_HDC SIMCLR_HD constexpr

namespace simclr_ext {

SIMCLR_HDC int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
SIMCLR_HDC int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

}  // namespace simclr_ext
