// channel_core.h - the application-facing half of a channel, shared by every driver (internal).
//
// Four SPSC rings connect the application side to the engine thread that runs the channel:
//
//   free_  engine -> producer   empty stack buffers (UMEM frames, slab slots)
//   txq_   producer -> engine   filled buffers: NetChannel header + payload, in order
//   rxq_   engine -> consumer   delivered buffers, in order
//   ret_   consumer -> engine   buffers the consumer released
//
// A buffer is named by a token; BufAddr(token) is where its NetChannel header starts. The
// producer writes the header and payload there (the one copy on the send side), the driver puts
// its own framing in the headroom in front. Statistics are relaxed atomics the engine publishes.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "afxdp_channels/channel.h"
#include "afxdp_channels/engine.h"
#include "common/spsc_ring.h"

namespace netch::chan {

// No default member initializers, on purpose: batches of these are scratch arrays on every
// enqueue, dequeue and engine round, which initializers would zero (1 KB per array per call).
// Whoever produces one sets both fields.
struct BufRef {
  uint64_t token;
  uint32_t len;  // NetChannel header + payload
};

class ChannelCore : public Channel {
 public:
  ChannelCore(uint32_t id, uint32_t ring_size, size_t max_payload);
  ~ChannelCore() override;

  // ---- Channel --------------------------------------------------------------------------------
  uint32_t id() const override { return id_; }
  ChannelState state() const override { return state_.load(std::memory_order_acquire); }
  FailCause fail_cause() const override { return fail_cause_.load(std::memory_order_acquire); }
  ChannelStats stats() const override;
  uint64_t tx_queued_bytes() const override {
    return pub_.tx_queued_bytes.load(std::memory_order_relaxed);
  }
  // Looked at in the order a segment moves (open segment -> txq_ -> transport), each move
  // published before the segment leaves the earlier place: one in transit is always seen.
  bool tx_idle() const override {
    return !has_open() && txq_.EmptyApprox() && tx_queued_bytes() == 0;
  }
  bool writable() const override { return writable_segments() > 0; }
  uint32_t writable_segments() const override;
  uint64_t rx_outstanding() const override {
    return outstanding_.load(std::memory_order_acquire) + rxq_.SizeApprox();
  }
  bool Seal(const TxSegment& last) override;
  bool sealed() const override { return sealed_.load(std::memory_order_acquire); }
  bool rx_under_pressure() const override {
    return pub_.rx_pressure.load(std::memory_order_relaxed);
  }
  size_t max_payload() const override { return max_payload_; }
  absl::StatusOr<size_t> Enqueue(std::span<const TxSegment> segs) override;
  size_t Dequeue(size_t max_bytes, std::span<RxSegment> out) override;
  void Release(std::span<const RxSegment> segs) override;
  bool TryRelease(const RxSegment& seg) override;
  bool Wait(absl::Duration timeout, Interest interest = kBoth) override;
  int notify_fd(Interest side) const override {
    return side == kWritable ? notify_[1].fd : notify_[0].fd;
  }
  void ArmNotify(Interest interest = kBoth) override;
  void SetDeliveryHook(DeliveryHook* hook) override {
    hook_.store(hook, std::memory_order_release);
  }
  void Flush() override;
  bool PollInline(uint64_t now_us, uint64_t stand_down_us) override;
  void EndPollInline() override;
  InputLoan BorrowInput() override;

  // ---- engine side ----------------------------------------------------------------------------
  virtual uint8_t* BufAddr(uint64_t token) = 0;
  // Destroy's linger: waits until nothing enqueued is left unacknowledged, the channel is no
  // longer up, or `linger` passed.
  void Linger(absl::Duration linger);

  // Teardown, on the engine thread once the channel is failed or closed: takes back every buffer
  // the application side still has in the rings — empty ones in free_ and queued ones in txq_
  // (`give_tx`), delivered ones in rxq_ and returned ones in ret_ (`give_rx`, with their length).
  // free_ and rxq_ are consumed by the application, so they are emptied under its locks; ret_ is
  // drained while waiting for the Dequeue lock.
  // With `keep_delivered`, rxq_ stays for the consumer: data that arrived in order before the
  // channel died is still read (a peer's FIN after its last segment must not lose that segment).
  void Reclaim(const std::function<void(uint64_t)>& give_tx,
               const std::function<void(uint64_t, uint32_t)>& give_rx, bool keep_delivered);
  // An idle producer's empty buffers beyond `keep` go back through `give` (the engine's
  // share trim); returns how many, 0 when a producer holds the lock (try again later).
  uint32_t TakeBackFree(uint32_t keep, const std::function<void(uint64_t)>& give);
  // Once the application dropped its last reference: frees what it never dequeued.
  void DropDelivered(const std::function<void(uint64_t)>& give);
  // True when no producer is copying outside the producer lock (its buffers would reach txq_
  // later).
  bool ProducersIdle();

  // Coalescing (TxSegment::coalesce) for a driver whose engine calls FlushOpen every round; in
  // other drivers the flag is ignored.
  void EnableCoalescing() { coalescing_ = true; }
  // Engine side: commits the open segment to txq_ when `idle` (the channel has nothing
  // unacknowledged: Nagle) and it is kCorkIdleUs old — a streaming writer fills it meanwhile —
  // or when it has been held kCorkHoldUs; lowers *deadline_us to when it must look again. Never
  // blocks: a producer holding the lock defers it by a few µs.
  // With `now` (a waiting event loop asked for it, RoundFlushesOpen) it commits at once.
  bool FlushOpen(uint64_t now_us, bool idle, bool now, uint64_t* deadline_us);
  bool has_open() const { return open_pending_.load(std::memory_order_acquire); }

  // The task whose engine runs this channel; producers wake it after queuing.
  void set_task(EngineTask* t) { task_ = t; }
  // The engine running the channel's task now (nullptr: none yet, or between engines).
  Engine* engine() const;
  void set_id(uint32_t id) { id_ = id; }  // before the channel is published
  // State changes wake a waiting application.
  void SetState(ChannelState s);
  // SetState(kFailed) with its cause, stored first: whoever sees kFailed can read why. The first
  // cause sticks.
  void Fail(FailCause c);
  // Wakes the application if it armed a notification for `what`.
  void NotifyApp(Interest what = kBoth);
  // The engine's round delivered data: the delivery hook takes it on this thread, or the
  // consumer is notified.
  void NotifyDelivered() {
    if (DeliveryHook* h = hook_.load(std::memory_order_acquire); h && h->Delivered(*this)) return;
    NotifyApp(kReadable);
  }

  SpscRing<uint64_t> free_;
  SpscRing<BufRef> txq_;
  SpscRing<BufRef> rxq_;
  SpscRing<BufRef> ret_;

  // Published by the engine (relaxed stores), read by stats().
  struct Published {
    std::atomic<uint64_t> tx_queued_bytes{0}, rx_queued_bytes{0}, rx_dropped_stale{0}, timeouts{0},
        spurious_timeouts{0}, tail_probes{0}, ecn_echoes{0}, rx_ignored_acks{0},
        send_window_bytes{0}, srtt_us{0}, retransmits{0};
    std::atomic<uint32_t> cwnd_packets{0};
    std::atomic<uint64_t> tx_segments{0}, tx_bytes{0};
    std::atomic<int> engine{-1}, queue{-1};
    std::atomic<bool> rx_pressure{false};
  } pub_;

 private:
  bool Ready(Interest interest) const;
  // After buffers went to ret_: wakes the engine if it needs them soon (or `now`: ret_ is full).
  void WakeForReturns(bool now);
  // One side's wakeup: [0] receive, [1] send.
  struct Notifier {
    int fd = -1;
    std::atomic<bool> armed{false};
    std::atomic<uint32_t> seen_state_changes{0};  // by this side's waiters (several may wait)
  };
  static int SideIndex(Interest side) { return side == kWritable ? 1 : 0; }
  bool SideReady(int side) const;

  uint32_t id_;
  const size_t max_payload_;
  EngineTask* task_ = nullptr;
  std::atomic<ChannelState> state_{ChannelState::kConnecting};
  std::atomic<FailCause> fail_cause_{FailCause::kNone};
  Notifier notify_[2];
  std::atomic<uint32_t> state_changes_{0};
  std::atomic<DeliveryHook*> hook_{nullptr};

  // Takes one coalescable segment (producer_mu_ held): appends it to the open segment or opens
  // a new one. False when no buffer or txq_ slot is free.
  bool CoalesceLocked(const TxSegment& s);
  bool CommitOpenLocked();  // producer_mu_ held; false when txq_ has no free slot

  // Serializes producers' ring operations. The engine only ever try_locks it (FlushOpen).
  std::mutex producer_mu_;
  uint32_t txq_reserved_ = 0;        // txq_ slots reserved by producers copying outside the lock
  std::atomic<bool> sealed_{false};  // written under producer_mu_: Enqueue takes nothing more
  std::atomic<uint64_t> outstanding_{0};  // segments Dequeue handed out, not yet Released
  bool coalescing_ = false;
  struct OpenSeg {
    uint64_t token = 0;
    wire::SegHeader hdr;
    uint32_t len = 0;  // payload bytes so far
    bool valid = false;
  } open_;  // under producer_mu_
  std::atomic<bool> open_pending_{false};
  std::atomic<uint64_t> open_since_us_{0};
  // Consumers are serialized per side: Dequeue under dequeue_mu_, Release under release_mu_.
  // Apart, because a releaser waits for the engine to drain ret_ while it holds release_mu_,
  // and an engine delivering inline (DeliveryHook) dequeues: it must never wait behind that.
  std::mutex dequeue_mu_, release_mu_;
  // Consumer-side accounting (under dequeue_mu_).
  std::atomic<uint64_t> rx_segments_{0}, rx_bytes_{0};
};

// Channels peers opened, waiting for Driver::Accept(); fd() is readable while one waits. Shared
// by every driver.
class AcceptQueue {
 public:
  AcceptQueue();
  ~AcceptQueue();
  AcceptQueue(const AcceptQueue&) = delete;
  AcceptQueue& operator=(const AcceptQueue&) = delete;
  int fd() const { return fd_; }
  void Push(std::shared_ptr<Channel> c);
  // The oldest waiting channel, or nullptr. With `only_up`, a channel still in its handshake is
  // not handed out yet (and keeps the fd readable).
  std::shared_ptr<Channel> Pop(bool only_up = false);

 private:
  void Signal();
  int fd_ = -1;
  std::mutex mu_;
  std::deque<std::shared_ptr<Channel>> q_;
  // q_.size(), readable without the lock: Pop on an empty queue (every dispatcher round) costs
  // one load, not a lock and a read() of the eventfd (which is clear while nothing waits).
  std::atomic<size_t> size_{0};
};

// Driver helpers: a channel by object or id from a driver's list (under its mutex), and the
// argument check of MoveChannel.
template <typename C, typename Pred>
std::shared_ptr<C> FindChannel(std::mutex& mu, const std::vector<std::shared_ptr<C>>& v, Pred p) {
  std::lock_guard g(mu);
  for (const auto& c : v)
    if (p(*c)) return c;
  return nullptr;
}
absl::Status CheckEngineIndex(int engine, size_t engines);

}  // namespace netch::chan
