// Host checks of csrc/common/per_device_cache.h (the per-device attribute cache of the CUDA launches),
// run by tests/test_augment_cuda_host.py: one query per device however many threads ask at once, values
// kept apart per device, a failing query cached as nothing (retried), indices outside the device count
// refused. Prints "ok" and exits 0, or names the first failures.
#include "common/per_device_cache.h"

#include <atomic>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "check.h"

using simclr_ext::PerDeviceCache;

struct Attrs {
  int smem, sms;
};

constexpr int kDevices = 5;

static void check_concurrent_first_use() {
  PerDeviceCache<Attrs> cache(kDevices);
  std::atomic<int> queries[kDevices];
  for (auto& q : queries) q = 0;
  std::atomic<int> wrong{0};
  std::atomic<bool> go{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      while (!go.load()) std::this_thread::yield();  // start together: first uses race
      for (int i = 0; i < 20000; ++i) {
        const int d = (i * 7 + t) % kDevices;
        const Attrs& a = cache.get(d, [&](int dev) {
          queries[dev].fetch_add(1);
          std::this_thread::yield();  // widen the window in which a second query could start
          return Attrs{1000 * (dev + 1), dev + 7};
        });
        if (a.smem != 1000 * (d + 1) || a.sms != d + 7) wrong.fetch_add(1);
      }
    });
  }
  go = true;
  for (auto& th : threads) th.join();
  for (int d = 0; d < kDevices; ++d) CHECK(queries[d].load() == 1, "device %d queried %d times", d, queries[d].load());
  CHECK(wrong.load() == 0, "%d reads returned another device's value", wrong.load());
  CHECK(cache.device_count() == kDevices, "device_count %d", cache.device_count());
}

static void check_failed_query_is_retried() {
  PerDeviceCache<int> cache(2);
  int calls = 0;
  bool threw = false;
  try {
    cache.get(1, [&](int) -> int {
      ++calls;
      throw std::runtime_error("driver not ready");
    });
  } catch (const std::runtime_error& e) {
    threw = std::string(e.what()) == "driver not ready";
  }
  CHECK(threw, "the query's exception did not propagate unchanged");
  const int v = cache.get(1, [&](int d) { return ++calls, 40 + d; });
  CHECK(v == 41 && calls == 2, "after a failure: value %d after %d calls", v, calls);
  const int again = cache.get(1, [&](int) { return ++calls, -1; });
  CHECK(again == 41 && calls == 2, "cached value not kept: %d after %d calls", again, calls);
  const int other = cache.get(0, [&](int d) { return ++calls, 40 + d; });
  CHECK(other == 40 && calls == 3, "device 0: %d after %d calls", other, calls);
}

static void check_out_of_range() {
  for (int count : {0, 3}) {
    PerDeviceCache<int> cache(count);
    for (int d : {-1, count, count + 100}) {
      bool threw = false;
      int calls = 0;
      try {
        cache.get(d, [&](int) { return ++calls; });
      } catch (const std::out_of_range& e) {
        const std::string msg = e.what();
        threw = msg.find("device index " + std::to_string(d)) != std::string::npos &&
                msg.find("[0, " + std::to_string(count) + ")") != std::string::npos;
      }
      CHECK(threw && calls == 0, "device %d of %d: threw %d (with the index and range), queried %d times", d, count,
            threw, calls);
    }
  }
  PerDeviceCache<int> negative(-2);
  CHECK(negative.device_count() == 0, "a negative device count must hold no devices, got %d", negative.device_count());
}

int main() {
  check_concurrent_first_use();
  check_failed_query_is_retried();
  check_out_of_range();
  return check_summary();
}
