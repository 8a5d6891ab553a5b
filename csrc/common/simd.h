// The SIMD-clone policy of the CPU kernels of both op families: the hot loops, written as plain passes over
// contiguous arrays so that the compiler vectorizes them, are compiled for AVX-512 (x86-64-v4), AVX2 + FMA
// (x86-64-v3) and the baseline ISA, and the loader picks the version the CPU supports (GCC function
// multiversioning): up to four times the baseline's vector width, one portable .so. The build passes
// -ffp-contract=off and no -ffast-math, so no clone fuses a multiply-add or reorders a sum: every clone
// rounds identically and results do not depend on the machine's ISA. Other compilers get one version.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SIMCLR_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SIMCLR_SIMD_CLONES
#endif
