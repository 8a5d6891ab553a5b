// The assertion of the host-side C++ tests in this folder: CHECK(cond, printf-style message) counts a failure
// and prints the first 20; each test's main ends with `return check_summary();`, whose "ok" and exit code
// tests/host_cpp.py reads.
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

// The count of failed checks, or "ok"; the process's exit code (0 when every check passed).
inline int check_summary() {
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
