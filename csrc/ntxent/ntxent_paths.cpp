// Path and pass counters of the contrastive op (ntxent_paths.h), shared by its CPU and CUDA backends; its own
// file so that the test build of the emulated CUDA kernels (tests/cuda_emu/) has counters of its own.
#include "ntxent/ntxent_paths.h"

#include <array>
#include <atomic>
#include <cstdint>
#include <string>

namespace simclr_ext {
namespace ntxent {

namespace {
std::array<std::atomic<int64_t>, static_cast<size_t>(Path::kCount)> g_path_counts{};
std::array<std::atomic<int64_t>, static_cast<size_t>(Pass::kCount)> g_pass_counts{};
constexpr const char* kPathNames[] = {
    "cpu_forward_streamed",  "cpu_forward_kept",          "cpu_backward_symmetric", "cpu_backward_symmetric_kept",
    "cpu_backward_general",  "cpu_backward_general_kept", "cuda_forward",           "cuda_backward_symmetric",
    "cuda_backward_general", "cpu_forward_two_way",       "cpu_backward_two_way",   "cuda_forward_two_way",
    "cuda_backward_two_way"};
constexpr const char* kPassNames[] = {"cpu_dq", "cpu_dk", "cuda_dq", "cuda_dk"};
static_assert(sizeof(kPathNames) / sizeof(kPathNames[0]) == static_cast<size_t>(Path::kCount), "one name per path");
static_assert(sizeof(kPassNames) / sizeof(kPassNames[0]) == static_cast<size_t>(Pass::kCount), "one name per pass");

template <size_t N>
std::string format_counts(const std::array<std::atomic<int64_t>, N>& counts, const char* const* names) {
  std::string out;
  for (size_t i = 0; i < N; ++i) {
    if (i) out += ";";
    out += std::string(names[i]) + "=" + std::to_string(counts[i].load(std::memory_order_relaxed));
  }
  return out;
}
}  // namespace

void count_path(Path path) { g_path_counts[static_cast<size_t>(path)].fetch_add(1, std::memory_order_relaxed); }
void count_pass(Pass pass) { g_pass_counts[static_cast<size_t>(pass)].fetch_add(1, std::memory_order_relaxed); }

std::string path_counts() { return format_counts(g_path_counts, kPathNames); }
std::string pass_counts() { return format_counts(g_pass_counts, kPassNames); }

void reset_path_counts() {
  for (auto& c : g_path_counts) c.store(0, std::memory_order_relaxed);
  for (auto& c : g_pass_counts) c.store(0, std::memory_order_relaxed);
}

}  // namespace ntxent
}  // namespace simclr_ext
