#include "vns_lib/copy_workers.h"

#include <pthread.h>
#include <time.h>

#include <algorithm>
#include <string>

#include "common/affinity.h"

namespace netch::vns {

std::vector<std::pair<size_t, size_t>> SplitChunks(size_t total, size_t chunk) {
  std::vector<std::pair<size_t, size_t>> out;
  if (chunk == 0) chunk = total ? total : 1;
  for (size_t off = 0; off < total; off += chunk)
    out.emplace_back(off, std::min(chunk, total - off));
  return out;
}

void CopyWorkers::Resize(int n) {
  n = std::max(0, n);
  {
    std::lock_guard g(mu_);
    target_ = n;
  }
  cv_.notify_all();
  while (static_cast<int>(threads_.size()) > n) {
    threads_.back().join();
    threads_.pop_back();
  }
  while (static_cast<int>(threads_.size()) < n) {
    const int index = static_cast<int>(threads_.size());
    threads_.emplace_back([this, index] { Loop(index); });
    // Named here, not by the thread: the name is there as soon as Resize returns.
    pthread_setname_np(threads_.back().native_handle(),
                       ("netch-copy" + std::to_string(index)).c_str());
    Pin(index);
  }
  std::lock_guard g(mu_);
  cores_.resize(threads_.size(), -1);
}

void CopyWorkers::Place(std::function<int(int)> core_of) {
  core_of_ = std::move(core_of);
  for (int i = 0; i < static_cast<int>(threads_.size()); ++i) Pin(i);
}

void CopyWorkers::Pin(int i) {
  const int core = core_of_ ? core_of_(i) : -1;  // unpinned: every core this process may use
  const bool ok = PinThread(threads_[i].native_handle(), core).ok();
  std::lock_guard g(mu_);
  if (static_cast<int>(cores_.size()) <= i) cores_.resize(i + 1, -1);
  cores_[i] = ok ? core : -1;
}

void CopyWorkers::Work(Job* j, std::atomic<uint64_t>* counter, std::atomic<uint64_t>* busy_ns) {
  for (size_t i; (i = j->next.fetch_add(1)) < j->n;) {
    timespec a, b;
    if (busy_ns) clock_gettime(CLOCK_MONOTONIC, &a);
    (*j->fn)(i);
    if (busy_ns) {
      clock_gettime(CLOCK_MONOTONIC, &b);
      busy_ns->fetch_add(
          static_cast<uint64_t>((b.tv_sec - a.tv_sec) * 1'000'000'000ll + (b.tv_nsec - a.tv_nsec)),
          std::memory_order_relaxed);
    }
    counter->fetch_add(1, std::memory_order_relaxed);
    j->done.fetch_add(1, std::memory_order_acq_rel);
  }
}

void CopyWorkers::Loop(int index) {
  std::unique_lock lk(mu_);
  for (;;) {
    cv_.wait(lk, [&] { return index >= target_ || !jobs_.empty(); });
    if (index >= target_) return;
    Job* j = jobs_.front();
    if (j->next.load() >= j->n) {  // exhausted: nothing left to take, let its owner finish it
      jobs_.pop_front();
      continue;
    }
    j->active++;
    lk.unlock();
    Work(j, &chunks_run_, &busy_ns_);
    lk.lock();
    j->active--;  // after this the owner may free the job: never touch it again
    done_cv_.notify_all();
  }
}

void CopyWorkers::ParallelFor(size_t n, const std::function<void(size_t)>& fn, uint64_t bytes) {
  if (n == 0) return;
  queued_bytes_.fetch_add(bytes, std::memory_order_relaxed);
  struct Done {
    std::atomic<uint64_t>& q;
    uint64_t b;
    ~Done() { q.fetch_sub(b, std::memory_order_relaxed); }
  } done{queued_bytes_, bytes};
  Job j;
  j.fn = &fn;
  j.n = n;
  bool parallel;
  {
    std::lock_guard g(mu_);
    parallel = n > 1 && target_ > 0;
    if (parallel) jobs_.push_back(&j);
  }
  if (parallel) cv_.notify_all();
  std::atomic<uint64_t> mine{0};
  Work(&j, &mine, nullptr);  // the caller takes chunks too
  if (!parallel) return;
  std::unique_lock lk(mu_);
  jobs_.erase(std::remove(jobs_.begin(), jobs_.end(), &j), jobs_.end());  // no new takers
  done_cv_.wait(lk, [&] { return j.active == 0 && j.done.load(std::memory_order_acquire) == n; });
}

}  // namespace netch::vns
