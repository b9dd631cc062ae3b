// spsc_chain.h - an unbounded-looking, bounded single-producer single-consumer queue whose
// memory follows its occupancy: a chain of rings (chunks) that the producer grows by doubling
// when its chunk is full and shrinks when a long stretch of pushes never filled a quarter of it.
//
// Why not SpscRing: a virtual socket's inbound queue must take a whole receive buffer of tiny
// segments (4096 of them) but usually holds a handful. A ring sized for the worst case costs its
// worst case once a busy socket has cycled through its slots (192 KB per connection, whether it
// holds 3 segments or 3,000); the chain costs ~3 KB at rest and gives a burst's chunks back
// after it.
//
// Allocation happens on the producer's side only when the chain changes size (a burst deeper
// than the current chunk, or a quiet stretch of 4x the chunk's pushes after one): never per
// item. The consumer frees a chunk once it drained it and the producer has moved on (the
// producer links the next chunk after its last push to this one, so a drained chunk with a
// successor is done).
#pragma once

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
class SpscChain {
  static_assert(std::is_trivially_copyable_v<T> && std::is_trivially_destructible_v<T>);

 public:
  // `capacity`: the most items held at once (Room() counts down from it); chunks hold
  // `min_chunk` to `capacity` items (powers of two).
  explicit SpscChain(uint32_t capacity, uint32_t min_chunk = 64)
      : capacity_(capacity), min_chunk_(std::min(min_chunk, capacity)) {
    assert(capacity && (capacity & (capacity - 1)) == 0 && "capacity must be a power of two");
    assert(min_chunk_ && (min_chunk_ & (min_chunk_ - 1)) == 0);
    prod_ = cons_ = Chunk::New(min_chunk_);
    allocated_.store(min_chunk_, std::memory_order_relaxed);
  }
  ~SpscChain() {
    for (Chunk* c = cons_; c != nullptr;) {
      Chunk* next = c->next.load(std::memory_order_acquire);
      Chunk::Delete(c);
      c = next;
    }
  }
  SpscChain(const SpscChain&) = delete;
  SpscChain& operator=(const SpscChain&) = delete;

  uint32_t capacity() const { return capacity_; }
  // Slots allocated right now, over all chunks (either side; for tests and metrics).
  uint32_t allocated_slots() const { return allocated_.load(std::memory_order_relaxed); }

  // ---- producer side ------------------------------------------------------------------------
  // Free room, exact for the producer.
  uint32_t Room() const {
    return capacity_ -
           (pushed_.load(std::memory_order_relaxed) - popped_.load(std::memory_order_acquire));
  }
  bool PushOne(const T& item) {
    const uint32_t pushed = pushed_.load(std::memory_order_relaxed);
    const uint32_t held = pushed - popped_.load(std::memory_order_acquire);
    if (held >= capacity_) return false;
    // A quiet stretch: 4x the chunk's size of pushes never found it a quarter full. The next
    // chunk is half the size (the producer moves on; the consumer frees this one once drained).
    high_water_ = std::max(high_water_, held + 1);
    if (++since_resize_ >= 4 * prod_->size() && prod_->size() > min_chunk_) {
      if (high_water_ <= prod_->size() / 4) Switch(prod_->size() / 2);
      since_resize_ = 0;
      high_water_ = 0;
    }
    if (!prod_->Push(item)) {
      // Full chunk: a deeper burst than it holds. The next chunk doubles (as far as the room
      // left in the chain needs).
      Switch(std::min(prod_->size() * 2, capacity_));
      since_resize_ = 0;
      high_water_ = 0;
      const bool ok = prod_->Push(item);
      assert(ok);
      (void)ok;
    }
    pushed_.store(pushed + 1, std::memory_order_release);
    return true;
  }

  // ---- consumer side ------------------------------------------------------------------------
  uint32_t Pop(std::span<T> out) {
    uint32_t n = 0;
    while (n < out.size()) {
      const uint32_t got = cons_->Pop(out.subspan(n));
      n += got;
      if (n == out.size()) break;
      // Drained: done with this chunk if the producer has moved on (it links the next one
      // after its last push here, so what we see now is all this chunk will ever hold).
      Chunk* next = cons_->next.load(std::memory_order_acquire);
      if (next == nullptr) break;
      // (Pushes that landed between our look and the link: this chunk's last.)
      if (const uint32_t late = cons_->Pop(out.subspan(n)); late > 0) {
        n += late;
        continue;
      }
      allocated_.fetch_sub(cons_->size(), std::memory_order_relaxed);
      Chunk::Delete(cons_);
      cons_ = next;
    }
    if (n) popped_.store(popped_.load(std::memory_order_relaxed) + n, std::memory_order_release);
    return n;
  }
  // Named apart from Pop(span): an array argument would otherwise decay to T* and pop one item.
  bool PopOne(T* item) { return Pop(std::span<T>(item, 1)) == 1; }

  // Either side: an instantaneous, possibly stale, answer.
  bool EmptyApprox() const {
    return pushed_.load(std::memory_order_acquire) == popped_.load(std::memory_order_acquire);
  }

 private:
  // One SPSC ring with its successor. Allocated with its slots in one block.
  struct Chunk {
    static Chunk* New(uint32_t size) {
      void* p = ::operator new (sizeof(Chunk) + size * sizeof(T), std::align_val_t{64});
      return new (p) Chunk(size);
    }
    static void Delete(Chunk* c) {
      c->~Chunk();
      ::operator delete (c, std::align_val_t{64});
    }
    explicit Chunk(uint32_t size) : mask(size - 1) {}
    uint32_t size() const { return mask + 1; }
    T* slots() { return reinterpret_cast<T*>(this + 1); }
    bool Push(const T& item) {  // producer
      const uint32_t h = head.load(std::memory_order_relaxed);
      if (h - tail.load(std::memory_order_acquire) == size()) return false;
      slots()[h & mask] = item;
      head.store(h + 1, std::memory_order_release);
      return true;
    }
    uint32_t Pop(std::span<T> out) {  // consumer
      const uint32_t t = tail.load(std::memory_order_relaxed);
      const uint32_t n = std::min<uint32_t>(head.load(std::memory_order_acquire) - t, out.size());
      for (uint32_t i = 0; i < n; ++i) out[i] = slots()[(t + i) & mask];
      if (n) tail.store(t + n, std::memory_order_release);
      return n;
    }
    const uint32_t mask;
    alignas(64) std::atomic<uint32_t> head{0};  // producer
    alignas(64) std::atomic<uint32_t> tail{0};  // consumer
    std::atomic<Chunk*> next{nullptr};          // producer, once
  };
  static_assert(sizeof(Chunk) % alignof(T) == 0);

  void Switch(uint32_t size) {
    Chunk* c = Chunk::New(size);
    allocated_.fetch_add(size, std::memory_order_relaxed);
    prod_->next.store(c, std::memory_order_release);
    prod_ = c;
  }

  const uint32_t capacity_;
  const uint32_t min_chunk_;
  // Producer only.
  Chunk* prod_;
  uint32_t since_resize_ = 0;  // pushes since the chain last changed size (or looked at it)
  uint32_t high_water_ = 0;    // most items held at a push in that stretch
  alignas(64) std::atomic<uint32_t> pushed_{0};  // written by the producer
  // Consumer only.
  alignas(64) Chunk* cons_;
  std::atomic<uint32_t> popped_{0};  // written by the consumer
  std::atomic<uint32_t> allocated_{0};
};

}  // namespace netch
