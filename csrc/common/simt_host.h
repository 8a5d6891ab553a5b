// CUDA's execution model on the host, for running the unmodified device code of csrc/*/..._kernels.cuh with a
// C++ compiler (test builds only: tests/cuda_emu/, `make test` and `make test-tsan`). Included instead of the
// CUDA headers when SIMCLR_EXT_CUDA_EMU is defined (csrc/common/cuda_device.cuh); never part of a normal build.
//
// A launch runs its blocks one after another, each with one OS thread per CUDA thread, so that the kernels'
// barriers, shuffles and shared memory really are shared between concurrent threads (and ThreadSanitizer sees
// a missing barrier as a data race). What is emulated:
//   threadIdx / blockIdx / blockDim / gridDim   thread-local, set per thread and block
//   __syncthreads, __syncwarp                    mutex + condition-variable barriers (TSan understands them);
//                                                a barrier not reached by every thread of its block / warp
//                                                (a thread returned, another call site, a deadlock between
//                                                a block and a warp barrier) fails the launch: "divergent
//                                                barrier", with the call sites
//   __shfl_xor_sync, __shfl_down_sync            through a per-warp buffer and the warp barrier; only
//                                                full-warp masks (the kernels use no other)
//   dynamic and static shared memory             per launch / per block, filled with 0xff bytes (NaN in
//                                                every floating type, -1 in integers) before each block
//   nvcuda::wmma                                 fragments hold the whole 16 x 16 tile in every lane; an
//                                                accumulator element is computed and stored by one lane
//                                                (e % 32), so stores never write twice; TF32 operands are
//                                                truncated to 10 mantissa bits as the tensor cores read them
//   __half, __nv_bfloat16                        16-bit storage with round-to-nearest-even conversions
//   __ldg, min/max, uint4, launch-time checks    a launch with more than 48 KiB of dynamic shared memory
//                                                needs the opt-in (func_set_max_dynamic_shared), as on CUDA
// What it cannot show: speed, nvcc's code generation and register limits, the tensor cores' summation order,
// races between blocks (blocks never overlap here) and the GPU's weaker memory model (docs/DESIGN.md).
#pragma once

#include <math.h>  // the float overloads of exp, fma, fmax, ... in the global namespace, as in CUDA device code

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace simclr_ext {
namespace simt {

// ------------------------------------------------------------------------------------------------
// Index types and the per-thread built-ins
// ------------------------------------------------------------------------------------------------
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};
constexpr int warpSize = 32;

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max(int64_t a, int64_t b) { return a > b ? a : b; }

// ------------------------------------------------------------------------------------------------
// 16-bit floating types (bit-exact storage; conversions round to nearest even, as __float2half_rn)
// ------------------------------------------------------------------------------------------------
inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_half_bits(float f) {
  const uint32_t x = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);   // NaN
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 (and inf): inf
  if (ax < 0x38800000u) {  // below 2^-14: a multiple of 2^-24 (subnormal), rounded by the FPU (to even)
    const float scaled = std::nearbyint(bits_float(ax) * 16777216.0f);
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(scaled));
  }
  const uint32_t v = ax - 0x38000000u;  // rebias the exponent 127 -> 15
  return static_cast<uint16_t>(sign | ((v + 0xfffu + ((v >> 13) & 1u)) >> 13));
}

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0) {
    const float v = static_cast<float>(man) * (1.0f / 16777216.0f);
    return sign ? -v : v;
  }
  if (exp == 31) return bits_float(sign | 0x7f800000u | (man << 13));
  return bits_float(sign | ((exp + 112) << 23) | (man << 13));
}

inline uint16_t float_to_bfloat16_bits(float f) {
  const uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

struct half {
  uint16_t bits;
};
struct bfloat16 {
  uint16_t bits;
};

inline float __half2float(half h) { return half_bits_to_float(h.bits); }
inline half __float2half_rn(float f) { return half{float_to_half_bits(f)}; }
inline float __bfloat162float(bfloat16 b) { return bits_float(static_cast<uint32_t>(b.bits) << 16); }
inline bfloat16 __float2bfloat16_rn(float f) { return bfloat16{float_to_bfloat16_bits(f)}; }

// ------------------------------------------------------------------------------------------------
// Launch state: barriers, shuffle buffers, shared memory
// ------------------------------------------------------------------------------------------------
struct Site {
  const char* file = nullptr;
  int line = 0;
  bool operator==(const Site& o) const {
    return line == o.line && file != nullptr && o.file != nullptr && std::strcmp(file, o.file) == 0;
  }
  std::string str() const { return std::string(file != nullptr ? file : "?") + ":" + std::to_string(line); }
};

// Thrown through a kernel thread once the launch has failed: every thread unwinds, the launch reports.
struct Aborted {};

struct BarrierState {
  std::mutex m;
  std::condition_variable cv;
  int expected = 0;  // threads of the block (block barrier) or lanes of the warp
  int arrived = 0;
  int exited = 0;  // threads of the group that returned from the kernel in this block
  uint64_t gen = 0;
  Site site;  // where the current arrivals wait
};

constexpr size_t kDefaultDynamicShared = 48 * 1024;  // more needs cudaFuncSetAttribute's opt-in

struct LaunchState {
  dim3 grid, block;
  int nthreads = 0, nwarps = 0;
  std::atomic<bool> failed{false};
  std::mutex message_mutex;
  std::string message;
  // Deadlock detection: threads waiting in any barrier, and barriers completed (relaxed: no ordering).
  std::atomic<int> blocked{0};
  std::atomic<uint64_t> progress{0};
  BarrierState block_barrier;
  std::unique_ptr<BarrierState[]> warp_barriers;
  std::unique_ptr<uint64_t[]> shuffle;  // [warp][parity][lane]
  BarrierState end;                     // every thread has finished the block
  std::unique_ptr<unsigned char[]> dynamic_raw;
  unsigned char* dynamic = nullptr;  // 128-byte aligned
  size_t dynamic_bytes = 0;
  std::mutex static_mutex;
  std::map<const void*, std::unique_ptr<unsigned char[]>> static_shared;

  void fail(const std::string& why) {
    const std::lock_guard<std::mutex> lock(message_mutex);
    if (!failed.load()) {
      message = why;
      failed.store(true);
    }
  }
  void poison_shared() {
    if (dynamic_bytes > 0) std::memset(dynamic, 0xff, dynamic_bytes);
    const std::lock_guard<std::mutex> lock(static_mutex);
    static_shared.clear();
  }
};

struct ThreadContext {
  LaunchState* launch = nullptr;
  int tid = 0, warp = 0, lane = 0;
  unsigned parity = 0;  // which of the warp's two shuffle buffers this lane's next shuffle uses
};
inline thread_local ThreadContext context;

inline LaunchState& current_launch() {
  if (context.launch == nullptr) throw std::logic_error("simt: a device function was called outside a launch");
  return *context.launch;
}

inline std::string thread_name() {
  return "thread (" + std::to_string(threadIdx.x) + "," + std::to_string(threadIdx.y) + "," +
         std::to_string(threadIdx.z) + ") of block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) +
         "," + std::to_string(blockIdx.z) + ")";
}

[[noreturn]] inline void fail_launch(LaunchState& L, const std::string& why) {
  L.fail(why);
  throw Aborted{};
}

// Waits on b.cv until b.gen moves past gen. Every 100 ms it checks for a failed launch, and for a deadlock:
// all threads of the block waiting (in any barrier) while no barrier completes for 3 s. A waiter counts in
// L.blocked from its arrival until the barrier completes: the completing thread (release_waiters) takes the
// waiters off the count, so a woken thread the OS has not yet scheduled never looks blocked.
inline void wait_generation(LaunchState& L, BarrierState& b, std::unique_lock<std::mutex>& lock, uint64_t gen,
                            const char* what) {
  L.blocked.fetch_add(1, std::memory_order_relaxed);
  bool stalled = false;
  uint64_t stalled_progress = 0;
  auto stalled_since = std::chrono::steady_clock::now();
  while (b.gen == gen) {
    if (L.failed.load(std::memory_order_relaxed)) {
      L.blocked.fetch_sub(1, std::memory_order_relaxed);
      throw Aborted{};
    }
    if (b.cv.wait_for(lock, std::chrono::milliseconds(100)) == std::cv_status::no_timeout) continue;
    const bool all_waiting = L.blocked.load(std::memory_order_relaxed) == L.nthreads;
    const uint64_t progress = L.progress.load(std::memory_order_relaxed);
    const auto now = std::chrono::steady_clock::now();
    if (!all_waiting || !stalled || progress != stalled_progress) {
      stalled = all_waiting;
      stalled_progress = progress;
      stalled_since = now;
    } else if (now - stalled_since > std::chrono::seconds(3)) {
      L.blocked.fetch_sub(1, std::memory_order_relaxed);
      fail_launch(L, std::string("divergent barrier: deadlock, every thread of the block waits and none can "
                                 "proceed; ") +
                         thread_name() + " waits at " + what + " at " + b.site.str());
    }
  }
}

// The barrier's `waiters` threads are released: no longer blocked (called under the barrier's mutex).
inline void release_waiters(LaunchState& L, BarrierState& b, int waiters) {
  ++b.gen;
  L.blocked.fetch_sub(waiters, std::memory_order_relaxed);
  L.progress.fetch_add(1, std::memory_order_relaxed);
  b.cv.notify_all();
}

// One arrival at a barrier of `b.expected` threads, all of which must come from the same call site.
inline void arrive(LaunchState& L, BarrierState& b, Site site, const char* what) {
  std::unique_lock<std::mutex> lock(b.m);
  if (L.failed.load(std::memory_order_relaxed)) throw Aborted{};
  if (b.exited > 0) {
    fail_launch(L, std::string("divergent barrier: ") + what + " at " + site.str() + " reached by " + thread_name() +
                       " after " + std::to_string(b.exited) + " thread(s) of its group returned");
  }
  if (b.arrived > 0 && !(b.site == site)) {
    fail_launch(L, std::string("divergent barrier: ") + what + " at " + site.str() + " (" + thread_name() +
                       ") while other threads wait at " + b.site.str());
  }
  b.site = site;
  if (++b.arrived == b.expected) {
    b.arrived = 0;
    release_waiters(L, b, b.expected - 1);
    return;
  }
  wait_generation(L, b, lock, b.gen, what);
}

inline void sync_threads(const char* file, int line) {
  LaunchState& L = current_launch();
  arrive(L, L.block_barrier, Site{file, line}, "__syncthreads()");
}

inline void check_warp_mask(LaunchState& L, unsigned mask, Site site) {
  const int lanes = std::min(32, L.nthreads - 32 * context.warp);
  const unsigned full = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
  if (mask != full) {
    fail_launch(L, "simt: " + site.str() + ": only full-warp masks are emulated (mask " + std::to_string(mask) +
                       ", warp of " + std::to_string(lanes) + " lanes)");
  }
}

inline void sync_warp(const char* file, int line, unsigned mask = 0xffffffffu) {
  LaunchState& L = current_launch();
  check_warp_mask(L, mask, Site{file, line});
  arrive(L, L.warp_barriers[context.warp], Site{file, line}, "__syncwarp()");
}

// Every lane publishes its value, the warp meets, every lane reads its source lane's value. Two buffers
// alternate, so the next shuffle's writes never overwrite values a slower lane has still to read.
template <typename T>
T shuffle(const char* file, int line, unsigned mask, T value, int width, int (*source)(int lane, int arg), int arg) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>, "shuffle of a register value");
  LaunchState& L = current_launch();
  const Site site{file, line};
  check_warp_mask(L, mask, site);
  if (width != warpSize) fail_launch(L, "simt: " + site.str() + ": only full-warp shuffles (width 32) are emulated");
  uint64_t* buffer = L.shuffle.get() + (static_cast<size_t>(context.warp) * 2 + context.parity) * 32;
  context.parity ^= 1u;
  std::memcpy(&buffer[context.lane], &value, sizeof(T));
  arrive(L, L.warp_barriers[context.warp], site, "a warp shuffle");
  T out;
  std::memcpy(&out, &buffer[source(context.lane, arg)], sizeof(T));
  return out;
}

inline int xor_source(int lane, int lane_mask) { return (lane ^ lane_mask) & 31; }
inline int down_source(int lane, int delta) { return lane + delta < warpSize ? lane + delta : lane; }

template <typename T>
T shfl_xor_sync(const char* file, int line, unsigned mask, T value, int lane_mask, int width = warpSize) {
  return shuffle(file, line, mask, value, width, &xor_source, lane_mask);
}
template <typename T>
T shfl_down_sync(const char* file, int line, unsigned mask, T value, unsigned delta, int width = warpSize) {
  return shuffle(file, line, mask, value, width, &down_source, static_cast<int>(delta));
}

// The block's dynamic shared memory (extern __shared__), 128-byte aligned.
template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(current_launch().dynamic);
}

// A static __shared__ variable of the running block, identified by `key` (the address of a per-declaration
// tag): the first thread to ask allocates it, poisoned; it lives until the block ends.
template <typename T>
T& static_shared(const void* key) {
  static_assert(std::is_trivially_destructible_v<T>, "__shared__ variables have no destructor");
  LaunchState& L = current_launch();
  const std::lock_guard<std::mutex> lock(L.static_mutex);
  std::unique_ptr<unsigned char[]>& slot = L.static_shared[key];
  if (!slot) {
    slot.reset(new unsigned char[sizeof(T) + 128]);
    std::memset(slot.get(), 0xff, sizeof(T) + 128);
  }
  const uintptr_t at = (reinterpret_cast<uintptr_t>(slot.get()) + 127) & ~uintptr_t{127};
  return *reinterpret_cast<T*>(at);
}

// ------------------------------------------------------------------------------------------------
// Launch
// ------------------------------------------------------------------------------------------------
inline std::mutex& attribute_mutex() {
  static std::mutex m;
  return m;
}
inline std::map<const void*, size_t>& max_dynamic_shared() {
  static std::map<const void*, size_t> m;
  return m;
}

// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes).
template <typename... P>
void func_set_max_dynamic_shared(void (*kernel)(P...), size_t bytes) {
  const std::lock_guard<std::mutex> lock(attribute_mutex());
  max_dynamic_shared()[reinterpret_cast<const void*>(kernel)] = bytes;
}

template <typename... P>
size_t allowed_dynamic_shared(void (*kernel)(P...)) {
  const std::lock_guard<std::mutex> lock(attribute_mutex());
  const auto it = max_dynamic_shared().find(reinterpret_cast<const void*>(kernel));
  return it == max_dynamic_shared().end() ? kDefaultDynamicShared : std::max(it->second, kDefaultDynamicShared);
}

// The end of a thread's part of a block: a return while others wait at a barrier is a divergent barrier;
// then the thread waits for the whole block, and the last one resets the block state for the next.
inline void finish_block(LaunchState& L) {
  {
    const std::lock_guard<std::mutex> lock(L.block_barrier.m);
    if (L.failed.load(std::memory_order_relaxed)) throw Aborted{};
    if (L.block_barrier.arrived > 0) {
      fail_launch(L, "divergent barrier: " + thread_name() + " returned while " +
                         std::to_string(L.block_barrier.arrived) + " thread(s) wait at __syncthreads() at " +
                         L.block_barrier.site.str());
    }
    ++L.block_barrier.exited;
  }
  BarrierState& warp = L.warp_barriers[context.warp];
  {
    const std::lock_guard<std::mutex> lock(warp.m);
    if (warp.arrived > 0) {
      fail_launch(L, "divergent barrier: " + thread_name() + " returned while " + std::to_string(warp.arrived) +
                         " lane(s) of its warp wait at " + warp.site.str());
    }
    ++warp.exited;
  }
  std::unique_lock<std::mutex> lock(L.end.m);
  if (++L.end.arrived < L.end.expected) {
    wait_generation(L, L.end, lock, L.end.gen, "the end of the block");
    return;
  }
  // Every thread is here, the others wait: reset the block's barriers and shared memory.
  {
    const std::lock_guard<std::mutex> g(L.block_barrier.m);
    L.block_barrier.exited = 0;
  }
  for (int w = 0; w < L.nwarps; ++w) {
    const std::lock_guard<std::mutex> g(L.warp_barriers[w].m);
    L.warp_barriers[w].exited = 0;
  }
  L.poison_shared();
  L.end.arrived = 0;
  release_waiters(L, L.end, L.end.expected - 1);
}

template <typename Params, typename Kernel>
void run_thread(LaunchState& L, int tid, Kernel kernel, const Params& params) {
  context = ThreadContext{&L, tid, tid / warpSize, tid % warpSize, 0};
  blockDim = L.block;
  gridDim = L.grid;
  threadIdx = uint3{tid % L.block.x, (tid / L.block.x) % L.block.y, tid / (L.block.x * L.block.y)};
  try {
    for (unsigned z = 0; z < L.grid.z; ++z) {
      for (unsigned y = 0; y < L.grid.y; ++y) {
        for (unsigned x = 0; x < L.grid.x; ++x) {
          blockIdx = uint3{x, y, z};
          context.parity = 0;
          std::apply(kernel, params);
          finish_block(L);
        }
      }
    }
  } catch (const Aborted&) {
  } catch (const std::exception& e) {
    L.fail(std::string("exception in a kernel thread: ") + e.what());
  }
  context = ThreadContext{};
}

// kernel<<<grid, block, dynamic_bytes>>>(args...): the blocks run one after another, each on
// block.x * block.y * block.z OS threads. Throws std::runtime_error when the launch fails.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t dynamic_bytes, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel arguments");
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024) throw std::runtime_error("simt: invalid block size " + std::to_string(threads));
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
    throw std::runtime_error("simt: invalid grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " +
                             std::to_string(grid.z) + ")");
  }
  if (dynamic_bytes > allowed_dynamic_shared(kernel)) {
    throw std::runtime_error("simt: launch with " + std::to_string(dynamic_bytes) +
                             " bytes of dynamic shared memory, more than the kernel's limit " +
                             std::to_string(allowed_dynamic_shared(kernel)) +
                             " (cudaFuncSetAttribute opts in beyond 48 KiB)");
  }
  const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  LaunchState L;
  L.grid = grid;
  L.block = block;
  L.nthreads = static_cast<int>(threads);
  L.nwarps = (L.nthreads + warpSize - 1) / warpSize;
  L.block_barrier.expected = L.nthreads;
  L.end.expected = L.nthreads;
  L.warp_barriers.reset(new BarrierState[L.nwarps]);
  for (int w = 0; w < L.nwarps; ++w) L.warp_barriers[w].expected = std::min(warpSize, L.nthreads - warpSize * w);
  L.shuffle.reset(new uint64_t[static_cast<size_t>(L.nwarps) * 2 * 32]());
  L.dynamic_bytes = dynamic_bytes;
  if (dynamic_bytes > 0) {
    L.dynamic_raw.reset(new unsigned char[dynamic_bytes + 128]);
    L.dynamic =
        reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(L.dynamic_raw.get()) + 127) & ~uintptr_t{127});
  }
  L.poison_shared();
  std::vector<std::thread> pool;
  pool.reserve(L.nthreads);
  for (int t = 0; t < L.nthreads; ++t) {
    pool.emplace_back([&L, t, kernel, &params] { run_thread(L, t, kernel, params); });
  }
  for (std::thread& th : pool) th.join();
  if (L.failed.load()) throw std::runtime_error("simt: kernel launch failed: " + L.message);
}

// ------------------------------------------------------------------------------------------------
// nvcuda::wmma
// ------------------------------------------------------------------------------------------------
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

// cvt.rna.tf32.f32: round to 10 mantissa bits, ties away from zero (the result is a float).
inline float __float_to_tf32(float f) {
  const uint32_t x = float_bits(f);
  if ((x & 0x7f800000u) == 0x7f800000u) return f;  // inf, NaN
  return bits_float((x + 0x1000u) & 0xffffe000u);
}

template <typename Use, int M, int N, int K>
struct Shape;
template <int M, int N, int K>
struct Shape<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct Shape<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct Shape<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  using element_type = std::conditional_t<std::is_same_v<T, precision::tf32>, float, T>;
  static constexpr int rows = Shape<Use, M, N, K>::rows;
  static constexpr int cols = Shape<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;
  element_type x[num_elements];                                        // row-major tile, whole in every lane
  fragment() { std::memset(static_cast<void*>(x), 0xff, sizeof(x)); }  // NaN until filled or loaded
};

template <typename Use, int M, int N, int K, typename T, typename Layout, typename V>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, V value) {
  for (auto& e : f.x) e = static_cast<typename fragment<Use, M, N, K, T, Layout>::element_type>(value);
}

template <typename Use, int M, int N, int K, typename T, typename Layout, typename P>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const P* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, Layout>;
  static_assert(std::is_same_v<P, typename F::element_type>, "operand pointer type");
  for (int r = 0; r < F::rows; ++r) {
    for (int c = 0; c < F::cols; ++c) {
      f.x[r * F::cols + c] =
          std::is_same_v<Layout, col_major> ? p[static_cast<size_t>(c) * ldm + r] : p[static_cast<size_t>(r) * ldm + c];
    }
  }
}

// Each lane stores the accumulator elements it owns (e % 32 == lane): every element is written once.
template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  for (int e = context.lane; e < M * N; e += warpSize) {
    const int r = e / N, c = e % N;
    p[layout == mem_row_major ? static_cast<size_t>(r) * ldm + c : static_cast<size_t>(c) * ldm + r] = f.x[e];
  }
}

// The value a tensor core multiplies: TF32 keeps the top 10 mantissa bits (unrounded operands lose the rest).
inline float operand_value(float v) { return bits_float(float_bits(v) & 0xffffe000u); }
inline float operand_value(half v) { return __half2float(v); }
inline float operand_value(bfloat16 v) { return __bfloat162float(v); }

// d = a b + c for the elements this lane owns; products of the 10/11-bit operands are exact in float.
template <int M, int N, int K, typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  for (int e = context.lane; e < M * N; e += warpSize) {
    const int i = e / N, j = e % N;
    float acc = c.x[e];
    for (int k = 0; k < K; ++k) acc = std::fma(operand_value(a.x[i * K + k]), operand_value(b.x[k * N + j]), acc);
    d.x[e] = acc;
  }
}

}  // namespace wmma
}  // namespace simt
}  // namespace simclr_ext

// The CUDA names the kernels use, in the global namespace as CUDA declares them (emulation builds only).
using simclr_ext::simt::__bfloat162float;
using simclr_ext::simt::__float2bfloat16_rn;
using simclr_ext::simt::__float2half_rn;
using simclr_ext::simt::__half2float;
using simclr_ext::simt::__ldg;
using simclr_ext::simt::blockDim;
using simclr_ext::simt::blockIdx;
using simclr_ext::simt::dim3;
using simclr_ext::simt::gridDim;
using simclr_ext::simt::max;
using simclr_ext::simt::min;
using simclr_ext::simt::threadIdx;
using simclr_ext::simt::uint3;
using simclr_ext::simt::uint4;
using simclr_ext::simt::warpSize;
using __half = simclr_ext::simt::half;
using __nv_bfloat16 = simclr_ext::simt::bfloat16;
namespace nvcuda {
namespace wmma = ::simclr_ext::simt::wmma;
}  // namespace nvcuda

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __syncthreads() ::simclr_ext::simt::sync_threads(__FILE__, __LINE__)
#define __syncwarp(...) ::simclr_ext::simt::sync_warp(__FILE__, __LINE__ __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_xor_sync(...) ::simclr_ext::simt::shfl_xor_sync(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) ::simclr_ext::simt::shfl_down_sync(__FILE__, __LINE__, __VA_ARGS__)
