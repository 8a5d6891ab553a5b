// The assertion of the host-side C++ tests in this folder: CHECK(cond, printf-style message) counts a failure
// and prints the first 20; each test's main returns the count (non-zero fails the pytest runner).
#pragma once

#include <cstdio>

static int failures = 0;
#define CHECK(cond, ...)                                              \
  do {                                                                \
    if (!(cond)) {                                                    \
      if (failures++ < 20) {                                          \
        std::printf("FAILED %s:%d: %s: ", __FILE__, __LINE__, #cond); \
        std::printf(__VA_ARGS__);                                     \
        std::printf("\n");                                            \
      }                                                               \
    }                                                                 \
  } while (0)
