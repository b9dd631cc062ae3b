// spsc_ring.h - bounded single-producer single-consumer ring, the hand-off between an engine
// thread and the one application (or copy-worker) thread on the other side of a channel.
//
// Fixed capacity (a power of two) reserved at construction; batch push/pop publish once per batch
// (one release store), so a batch of 64 costs two cache-line transfers, not 128. Each index lives
// on its own cache line and each side caches the other's index to avoid reading it every call.
//
// A large ring's slots are anonymous memory the kernel maps on first touch, never initialized
// here: a ring sized for its worst case costs one page at creation and grows with the slots it
// actually cycles through (filling a socket's 4096-slot ring at construction cost 375 KB and
// ~0.3 ms per virtual connection; sockets now use common/spsc_chain.h, whose memory also
// shrinks back after a burst).
#pragma once

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cassert>
#include <cstddef>
#include <cstdint>
#include <new>
#include <span>
#include <type_traits>

namespace netch {

template <typename T>
class SpscRing {
  // Slots are only ever assigned whole before they are read, so raw storage will do.
  static_assert(std::is_trivially_copyable_v<T> && std::is_trivially_destructible_v<T>);
  static constexpr size_t kMapAtBytes = 64 << 10;

 public:
  explicit SpscRing(uint32_t capacity) : mask_(capacity - 1), bytes_(capacity * sizeof(T)) {
    assert(capacity && (capacity & mask_) == 0 && "capacity must be a power of two");
    void* p = nullptr;
    if (bytes_ >= kMapAtBytes) {
      p = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) throw std::bad_alloc();
    } else {
      p = ::operator new (bytes_, std::align_val_t{alignof(T)});
    }
    slots_ = static_cast<T*>(p);
  }
  ~SpscRing() {
    if (bytes_ >= kMapAtBytes) {
      munmap(slots_, bytes_);
    } else {
      ::operator delete (slots_, std::align_val_t{alignof(T)});
    }
  }
  SpscRing(const SpscRing&) = delete;
  SpscRing& operator=(const SpscRing&) = delete;

  uint32_t capacity() const { return mask_ + 1; }

  // Producer side. Pushes a prefix of `items`; returns how many fit.
  uint32_t Push(std::span<const T> items) {
    const uint32_t head = head_.load(std::memory_order_relaxed);
    uint32_t room = capacity() - (head - tail_cache_);
    if (room < items.size()) {
      tail_cache_ = tail_.load(std::memory_order_acquire);
      room = capacity() - (head - tail_cache_);
    }
    const uint32_t n = std::min<uint32_t>(room, static_cast<uint32_t>(items.size()));
    for (uint32_t i = 0; i < n; ++i) slots_[(head + i) & mask_] = items[i];
    if (n) head_.store(head + n, std::memory_order_release);
    return n;
  }
  bool PushOne(const T& item) { return Push(std::span<const T>(&item, 1)) == 1; }
  // Free slots as the producer sees them (exact for the producer).
  uint32_t Room() {
    tail_cache_ = tail_.load(std::memory_order_acquire);
    return capacity() - (head_.load(std::memory_order_relaxed) - tail_cache_);
  }

  // Consumer side. Copies up to out.size() items without removing them.
  uint32_t Peek(std::span<T> out) {
    const uint32_t tail = tail_.load(std::memory_order_relaxed);
    uint32_t avail = head_cache_ - tail;
    if (avail < out.size()) {
      head_cache_ = head_.load(std::memory_order_acquire);
      avail = head_cache_ - tail;
    }
    const uint32_t n = std::min<uint32_t>(avail, static_cast<uint32_t>(out.size()));
    for (uint32_t i = 0; i < n; ++i) out[i] = slots_[(tail + i) & mask_];
    return n;
  }
  // Removes `n` items previously returned by Peek.
  void Consume(uint32_t n) {
    if (n) tail_.store(tail_.load(std::memory_order_relaxed) + n, std::memory_order_release);
  }
  uint32_t Pop(std::span<T> out) {
    const uint32_t n = Peek(out);
    Consume(n);
    return n;
  }
  // Named apart from Pop(span): an array argument would otherwise decay to T* and pop one item.
  bool PopOne(T* item) { return Pop(std::span<T>(item, 1)) == 1; }

  // Either side: an instantaneous, possibly stale, count.
  uint32_t SizeApprox() const {
    return head_.load(std::memory_order_acquire) - tail_.load(std::memory_order_acquire);
  }
  bool EmptyApprox() const { return SizeApprox() == 0; }

 private:
  T* slots_ = nullptr;
  const uint32_t mask_;
  const size_t bytes_;
  alignas(64) std::atomic<uint32_t> head_{0};  // written by the producer
  uint32_t tail_cache_ = 0;                    // producer's view of tail_
  alignas(64) std::atomic<uint32_t> tail_{0};  // written by the consumer
  uint32_t head_cache_ = 0;                    // consumer's view of head_
};

}  // namespace netch
