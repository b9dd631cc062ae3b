// copy_workers.h - per-core copy workers: one large copy split into chunks run in parallel, the
// caller taking its share (internal to VNS). The number of workers changes at run time.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace netch::vns {

// The chunks of [0, total): `chunk` bytes each, the last one shorter. Exposed for tests.
std::vector<std::pair<size_t, size_t>> SplitChunks(size_t total, size_t chunk);

class CopyWorkers {
 public:
  explicit CopyWorkers(int n = 0) { Resize(n); }
  ~CopyWorkers() { Resize(0); }
  CopyWorkers(const CopyWorkers&) = delete;
  CopyWorkers& operator=(const CopyWorkers&) = delete;

  // Starts or stops workers; waits for stopped ones to finish their current chunk.
  void Resize(int n);  // from one control thread at a time
  // Pins worker i to core_of(i) (-1: any core); workers started later by Resize are pinned the
  // same way. From the control thread, like Resize.
  void Place(std::function<int(int)> core_of);
  // The core worker i is pinned to, -1 if none (for tests and operators).
  int core(int i) const {
    std::lock_guard g(mu_);
    return i < static_cast<int>(cores_.size()) ? cores_[i] : -1;
  }
  int size() {
    std::lock_guard g(mu_);
    return target_;
  }

  // Runs fn(i) for i in [0, n): the caller runs some of them itself, the workers the rest; returns
  // when all have finished. fn must be safe to call concurrently for different i.
  // `bytes`: what the job copies in all, counted in queued_bytes() until it ends.
  void ParallelFor(size_t n, const std::function<void(size_t)>& fn, uint64_t bytes = 0);
  // Bytes of the jobs in progress: what a new job would queue behind (the copy plan's input).
  uint64_t queued_bytes() const { return queued_bytes_.load(std::memory_order_relaxed); }
  uint64_t chunks_run() const { return chunks_run_.load(std::memory_order_relaxed); }
  // Time worker threads (not callers) spent copying.
  uint64_t busy_ns() const { return busy_ns_.load(std::memory_order_relaxed); }

 private:
  struct Job {
    const std::function<void(size_t)>* fn;
    size_t n;
    std::atomic<size_t> next{0};
    std::atomic<size_t> done{0};
    int active = 0;  // guarded by mu_: workers inside Work(); the owner waits for 0
  };
  void Loop(int index);
  static void Work(Job* j, std::atomic<uint64_t>* counter, std::atomic<uint64_t>* busy_ns);

  void Pin(int i);  // applies core_of_ to worker i (control thread)
  mutable std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  std::function<int(int)> core_of_;  // control thread
  std::vector<int> cores_;           // guarded by mu_: worker i's pinned core
  std::deque<Job*> jobs_;            // guarded by mu_
  int target_ = 0;                   // guarded by mu_: workers with index >= target_ exit
  std::vector<std::thread> threads_;
  std::atomic<uint64_t> chunks_run_{0};
  std::atomic<uint64_t> busy_ns_{0};
  std::atomic<uint64_t> queued_bytes_{0};
};

}  // namespace netch::vns
