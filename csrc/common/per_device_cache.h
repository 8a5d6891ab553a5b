// A value per device index, computed on first use and then read without a lock. Plain C++ (no CUDA
// headers) so tests/cpp checks it on machines without a GPU; device_attributes.h fills it with CUDA
// queries. Shared by every op's CUDA code.
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>

namespace simclr_ext {

template <typename T>
class PerDeviceCache {
 public:
  explicit PerDeviceCache(int device_count)
      : count_(device_count > 0 ? device_count : 0), slots_(new Slot[count_ > 0 ? count_ : 1]) {}
  PerDeviceCache(const PerDeviceCache&) = delete;
  PerDeviceCache& operator=(const PerDeviceCache&) = delete;

  int device_count() const { return count_; }

  // The cached value of `device`, computing it with query(device) the first time. Concurrent first calls
  // run the query once; a query that throws caches nothing (the exception propagates, the next call asks
  // again). Values never move, so the reference stays valid for the cache's lifetime.
  template <typename Query>
  const T& get(int device, Query&& query) {
    if (device < 0 || device >= count_) {
      throw std::out_of_range("device index " + std::to_string(device) + " is outside [0, " + std::to_string(count_) +
                              ")");
    }
    Slot& slot = slots_[device];
    if (slot.ready.load(std::memory_order_acquire)) return slot.value;
    // First use of this device: rare, so one lock for all devices is enough.
    const std::lock_guard<std::mutex> lock(mutex_);
    if (!slot.ready.load(std::memory_order_relaxed)) {
      slot.value = query(device);
      slot.ready.store(true, std::memory_order_release);
    }
    return slot.value;
  }

 private:
  struct Slot {
    std::atomic<bool> ready{false};
    T value{};
  };
  int count_;
  std::unique_ptr<Slot[]> slots_;
  std::mutex mutex_;
};

}  // namespace simclr_ext
