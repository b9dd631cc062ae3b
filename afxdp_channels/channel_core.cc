#include "afxdp_channels/channel_core.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cstring>
#include <thread>

#include "absl/strings/str_format.h"

namespace netch::chan {

std::string_view StateName(ChannelState s) {
  switch (s) {
    case ChannelState::kConnecting:
      return "connecting";
    case ChannelState::kUp:
      return "up";
    case ChannelState::kFailed:
      return "failed";
    case ChannelState::kClosed:
      return "closed";
  }
  return "?";
}

namespace {
static_assert(static_cast<size_t>(FailCause::kWrongQueue) + 1 == kFailCauses);
// Indexed by FailCause: the metrics label and the phrase a socket's error carries.
constexpr std::string_view kFailCauseWords[kFailCauses][2] = {
    {"none", "no cause recorded"},
    {"handshake_timeout", "the peer did not complete the handshake in time"},
    {"refused", "the peer refused the channel"},
    {"reset", "reset by the peer"},
    {"peer_silent", "nothing heard from the peer within the dead-peer timeout"},
    {"peer_restarted", "the peer's stack restarted"},
    {"broken", "the connection under the channel broke"},
    {"protocol_error", "the peer sent what the transport cannot parse"},
    {"unreachable", "no host answered for the peer's address (neighbour resolution failed)"},
    {"wrong_queue",
     "the peer's replies arrived on another rx queue: a router or the NIC's RSS picks it (one "
     "queue per link, or the tcp driver)"},
};
}  // namespace

std::string_view FailCauseName(FailCause c) {
  const auto i = static_cast<size_t>(c);
  return i < kFailCauses ? kFailCauseWords[i][0] : "?";
}

std::string_view FailCauseText(FailCause c) {
  const auto i = static_cast<size_t>(c);
  return i < kFailCauses ? kFailCauseWords[i][1] : "?";
}

ChannelCore::ChannelCore(uint32_t id, uint32_t ring_size, size_t max_payload)
    : free_(ring_size),
      txq_(ring_size),
      rxq_(ring_size),
      ret_(ring_size),
      id_(id),
      max_payload_(max_payload) {
  for (Notifier& n : notify_) n.fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
}

ChannelCore::~ChannelCore() {
  for (Notifier& n : notify_)
    if (n.fd >= 0) close(n.fd);
}

ChannelStats ChannelCore::stats() const {
  ChannelStats s;
  s.state = state();
  s.tx_queued_bytes = pub_.tx_queued_bytes.load(std::memory_order_relaxed);
  s.rx_queued_bytes = pub_.rx_queued_bytes.load(std::memory_order_relaxed);
  s.send_window_bytes = pub_.send_window_bytes.load(std::memory_order_relaxed);
  s.cwnd_packets = pub_.cwnd_packets.load(std::memory_order_relaxed);
  s.srtt_us = pub_.srtt_us.load(std::memory_order_relaxed);
  s.retransmits = pub_.retransmits.load(std::memory_order_relaxed);
  s.timeouts = pub_.timeouts.load(std::memory_order_relaxed);
  s.spurious_timeouts = pub_.spurious_timeouts.load(std::memory_order_relaxed);
  s.tail_probes = pub_.tail_probes.load(std::memory_order_relaxed);
  s.ecn_echoes = pub_.ecn_echoes.load(std::memory_order_relaxed);
  s.rx_dropped_stale = pub_.rx_dropped_stale.load(std::memory_order_relaxed);
  s.rx_ignored_acks = pub_.rx_ignored_acks.load(std::memory_order_relaxed);
  s.tx_segments = pub_.tx_segments.load(std::memory_order_relaxed);
  s.tx_bytes = pub_.tx_bytes.load(std::memory_order_relaxed);
  s.rx_segments = rx_segments_.load(std::memory_order_relaxed);
  s.rx_bytes = rx_bytes_.load(std::memory_order_relaxed);
  s.engine = pub_.engine.load(std::memory_order_relaxed);
  s.queue = pub_.queue.load(std::memory_order_relaxed);
  return s;
}

absl::StatusOr<size_t> ChannelCore::Enqueue(std::span<const TxSegment> segs) {
  for (const TxSegment& s : segs) {
    if (s.payload.size() > max_payload_)
      return absl::InvalidArgumentError(absl::StrFormat(
          "segment payload of %u bytes exceeds the channel's %u", s.payload.size(), max_payload_));
  }
  const ChannelState st = state();
  if (st == ChannelState::kFailed || st == ChannelState::kClosed) return 0;
  // The copy runs outside the producer lock so that several copy workers can fill one channel
  // at once: under the lock a producer only reserves buffers and txq_ slots, and publishes them
  // afterwards. Segments of concurrent producers may interleave in any order (each producer's
  // own order is kept); VNS orders by its stream offsets, not by channel order.
  constexpr size_t kBatch = 64;
  uint64_t tokens[kBatch];
  BufRef out[kBatch];
  size_t done = 0;
  while (done < segs.size()) {
    if (coalescing_ && segs[done].coalesce) {
      std::lock_guard g(producer_mu_);
      if (sealed_.load(std::memory_order_relaxed) || !CoalesceLocked(segs[done])) break;
      done++;
      continue;
    }
    uint32_t n;
    {
      std::lock_guard g(producer_mu_);
      if (sealed_.load(std::memory_order_relaxed)) break;
      // What was held open goes first (a full-size write after small ones).
      if (open_.valid && !CommitOpenLocked()) break;
      // Both a free buffer and a txq_ slot are needed: the engine refills free_ independently of
      // draining txq_, so one having room says nothing about the other.
      const uint32_t room = txq_.Room() - txq_reserved_;
      size_t run = 0;  // the segments up to the next coalescable one
      while (done + run < segs.size() && !(coalescing_ && segs[done + run].coalesce)) run++;
      const size_t want = std::min<size_t>({kBatch, run, room});
      n = free_.Pop(std::span<uint64_t>(tokens, want));
      txq_reserved_ += n;
    }
    if (n == 0) break;
    for (uint32_t i = 0; i < n; ++i) {
      const TxSegment& s = segs[done + i];
      uint8_t* p = BufAddr(tokens[i]);
      const size_t hl = wire::WriteSegHeader(p, s.hdr, s.payload.size());
      if (!s.payload.empty()) std::memcpy(p + hl, s.payload.data(), s.payload.size());
      out[i] = {tokens[i], static_cast<uint32_t>(hl + s.payload.size())};
    }
    {
      std::lock_guard g(producer_mu_);
      txq_.Push(std::span<const BufRef>(out, n));  // fits: the slots were reserved
      txq_reserved_ -= n;
    }
    done += n;
  }
  if (done && task_) task_->Wake();
  return done;
}

bool ChannelCore::Seal(const TxSegment& last) {
  std::unique_lock g(producer_mu_);
  sealed_.store(true, std::memory_order_release);  // no new reservations from here on
  // Producers copying outside the lock publish what they reserved first: `last` goes after.
  for (int i = 0; txq_reserved_ > 0 && i < 100000; ++i) {
    g.unlock();
    std::this_thread::yield();
    g.lock();
  }
  if (txq_reserved_ > 0 || (open_.valid && !CommitOpenLocked())) return false;
  uint64_t tok;
  if (txq_.Room() < 1 || !free_.PopOne(&tok)) return false;
  uint8_t* p = BufAddr(tok);
  const size_t hl = wire::WriteSegHeader(p, last.hdr, last.payload.size());
  if (!last.payload.empty()) std::memcpy(p + hl, last.payload.data(), last.payload.size());
  txq_.PushOne({tok, static_cast<uint32_t>(hl + last.payload.size())});
  g.unlock();
  if (task_) task_->Wake();
  return true;
}

Engine* ChannelCore::engine() const {
  return task_ ? task_->engine.load(std::memory_order_acquire) : nullptr;
}

bool ChannelCore::PollInline(uint64_t now_us, uint64_t stand_down_us) {
  Engine* e = engine();
  return e && e->RunInline(now_us, stand_down_us);
}

void ChannelCore::EndPollInline() {
  if (Engine* e = engine()) e->Resume();
}

InputLoan ChannelCore::BorrowInput() {
  Engine* e = engine();
  return e ? e->BorrowInput() : InputLoan();
}

void ChannelCore::Flush() {
  if (!open_pending_.load(std::memory_order_acquire)) return;
  bool committed;
  {
    std::lock_guard g(producer_mu_);
    committed = open_.valid && CommitOpenLocked();
  }
  if (committed && task_) task_->Wake();
}

bool ChannelCore::CommitOpenLocked() {
  if (txq_.Room() <= txq_reserved_) return false;
  const size_t hl = wire::WriteSegHeader(BufAddr(open_.token), open_.hdr, open_.len);
  txq_.PushOne({open_.token, static_cast<uint32_t>(hl + open_.len)});
  open_.valid = false;
  open_pending_.store(false, std::memory_order_release);
  return true;
}

bool ChannelCore::CoalesceLocked(const TxSegment& s) {
  // Checked under the lock: Reclaim (after the state changed) takes the lock too, so an open
  // segment is either seen and given back there or never created.
  const ChannelState st = state();
  if (st == ChannelState::kFailed || st == ChannelState::kClosed) return false;
  const uint8_t* src = s.payload.data();
  size_t len = s.payload.size();
  wire::SegHeader hdr = s.hdr;
  const size_t full = max_payload_ - std::min<size_t>(1024, max_payload_ / 8);
  auto free_slots = [&] { return txq_.Room() - txq_reserved_; };
  if (open_.valid) {
    const wire::SegHeader& h = open_.hdr;
    const bool same_socket = h.type == hdr.type && h.app_class == hdr.app_class &&
                             h.src_port == hdr.src_port && h.dst_port == hdr.dst_port &&
                             h.conn_id == hdr.conn_id;
    if (same_socket && h.seq + open_.len == hdr.seq) {
      // Continue the open segment up to its end; the rest opens the next one. Everything that
      // takes is checked first: the segment is taken whole or not at all.
      const size_t n1 = std::min<size_t>(len, max_payload_ - open_.len);
      // A spill takes two send slots (the full segment now, the rest's open one later): with
      // one, taking part of the write and refusing the rest would send those bytes twice.
      if (n1 < len && (free_slots() < 2 || free_.EmptyApprox())) return false;
      std::memcpy(BufAddr(open_.token) + wire::kSegHdrLen + open_.len, src, n1);
      open_.len += static_cast<uint32_t>(n1);
      if (open_.len >= full) (void)CommitOpenLocked();  // a full one leaves now (if a slot is free)
      if (n1 == len) return true;
      src += n1;
      len -= n1;
      hdr.seq += n1;
    } else if (!CommitOpenLocked()) {
      return false;
    }
  }
  uint64_t tok;
  if (free_slots() < 1 || !free_.PopOne(&tok)) return false;
  open_ = {tok, hdr, static_cast<uint32_t>(len), true};
  if (len) std::memcpy(BufAddr(tok) + wire::kSegHdrLen, src, len);
  open_since_us_.store(NowUs(), std::memory_order_relaxed);
  open_pending_.store(true, std::memory_order_release);
  NoteOpenSegment(engine());
  if (open_.len >= full) (void)CommitOpenLocked();
  return true;
}

bool ChannelCore::FlushOpen(uint64_t now_us, bool idle, bool now, uint64_t* deadline_us) {
  if (!open_pending_.load(std::memory_order_acquire)) return false;
  const uint64_t since = open_since_us_.load(std::memory_order_relaxed);
  const uint64_t due = now ? 0 : since + (idle ? kCorkIdleUs : kCorkHoldUs);
  if (now_us < due) {
    *deadline_us = std::min(*deadline_us, due);
    return false;
  }
  if (!producer_mu_.try_lock()) {
    *deadline_us = std::min(*deadline_us, now_us + 5);
    return false;
  }
  const bool ok = open_.valid && CommitOpenLocked();
  producer_mu_.unlock();
  if (!ok && open_pending_.load(std::memory_order_relaxed))
    *deadline_us = std::min(*deadline_us, now_us + 5);
  return ok;
}

size_t ChannelCore::Dequeue(size_t max_bytes, std::span<RxSegment> out) {
  // Nothing delivered: no lock. A busy-polling reader asks on every spin, and the lock's
  // cache line is shared with the dispatcher and the engine delivering inline.
  if (rxq_.EmptyApprox()) return 0;
  std::lock_guard g(dequeue_mu_);
  size_t n = 0, bytes = 0;
  constexpr size_t kBatch = 64;
  BufRef bufs[kBatch];
  while (n < out.size()) {
    const size_t want = std::min(kBatch, out.size() - n);
    const uint32_t got = rxq_.Peek(std::span<BufRef>(bufs, want));
    if (got == 0) break;
    uint32_t taken = 0;
    for (; taken < got; ++taken) {
      const BufRef& b = bufs[taken];
      RxSegment& r = out[n];
      size_t off = 0;
      const uint8_t* p = BufAddr(b.token);
      // The driver validated the segment before delivering it; parsing again only copies the
      // header out (unaligned in a UMEM frame).
      wire::ParseSegment({p, b.len}, &r.hdr, &off);
      if (n > 0 && bytes + (b.len - off) > max_bytes) break;
      r.payload = {p + off, b.len - off};
      r.token = b.token;
      r.charge = b.len;
      bytes += b.len - off;
      n++;
      if (n == out.size()) {
        taken++;
        break;
      }
    }
    rxq_.Consume(taken);
    if (taken < got || bytes >= max_bytes) break;
  }
  if (n) {
    rx_segments_.fetch_add(n, std::memory_order_relaxed);
    rx_bytes_.fetch_add(bytes, std::memory_order_relaxed);
    outstanding_.fetch_add(n, std::memory_order_release);
  }
  return n;
}

void ChannelCore::WakeForReturns(bool now) {
  if (!task_) return;
  // Returned buffers reopen the receive window and refill the UMEM, but an engine that is not
  // short of either takes them in its next round — the next arrival's, which it runs anyway.
  // Waking it for every read cost an event loop an engine wakeup per pass (Redis -P 16: the
  // server woke its engine 3,400 times a second, 2,300 without these, and a woken engine waited
  // ~0.7 ms for a core both programs were using). It is woken when the window is below half (the
  // sender may be waiting for it: rx_pressure, published by the engine's last round; the window
  // only opens between rounds) or ret_ is full.
  if (now) {
    if (Engine* e = engine()) e->Wake();
  } else if (rx_under_pressure()) {
    task_->Wake();
  }
}

void ChannelCore::Release(std::span<const RxSegment> segs) {
  std::unique_lock g(release_mu_);
  constexpr size_t kBatch = 64;
  BufRef bufs[kBatch];
  size_t i = 0;
  while (i < segs.size()) {
    const size_t n = std::min(kBatch, segs.size() - i);
    for (size_t k = 0; k < n; ++k) bufs[k] = {segs[i + k].token, segs[i + k].charge};
    size_t pushed = 0;
    // ret_ is as large as rxq_ and only holds buffers that came from it: it cannot stay full.
    while (pushed < n) {
      pushed += ret_.Push(std::span<const BufRef>(bufs + pushed, n - pushed));
      if (pushed < n) {
        WakeForReturns(/*now=*/true);
        std::this_thread::yield();
      }
    }
    i += n;
  }
  g.unlock();
  if (!segs.empty()) WakeForReturns(false);
  // Last: once nothing is outstanding the consumer may destroy the channel (the dispatcher
  // retires a dead one then), so nothing of it may be touched after this (TSan saw the unlock
  // of release_mu_ land on a destroyed channel).
  outstanding_.fetch_sub(segs.size(), std::memory_order_release);
}

bool ChannelCore::TryRelease(const RxSegment& seg) {
  std::unique_lock g(release_mu_, std::try_to_lock);
  const BufRef b{seg.token, seg.charge};
  if (!g.owns_lock() || ret_.Push(std::span<const BufRef>(&b, 1)) != 1) return false;
  g.unlock();
  WakeForReturns(false);
  outstanding_.fetch_sub(1, std::memory_order_release);  // last, as in Release
  return true;
}

uint32_t ChannelCore::TakeBackFree(uint32_t keep, const std::function<void(uint64_t)>& give) {
  std::unique_lock g(producer_mu_, std::try_to_lock);
  if (!g.owns_lock()) return 0;
  uint32_t n = 0;
  uint64_t t;
  while (free_.SizeApprox() > keep && free_.PopOne(&t)) give(t), ++n;
  return n;
}

void ChannelCore::Reclaim(const std::function<void(uint64_t)>& give_tx,
                          const std::function<void(uint64_t, uint32_t)>& give_rx,
                          bool keep_delivered) {
  BufRef b[64];
  auto drain_ret = [&] {
    for (uint32_t m; (m = ret_.Pop(b)) > 0;)
      for (uint32_t i = 0; i < m; ++i) give_rx(b[i].token, b[i].len);
  };
  {
    std::lock_guard g(producer_mu_);
    uint64_t t;
    while (free_.PopOne(&t)) give_tx(t);
    if (open_.valid) {
      give_tx(open_.token);
      open_.valid = false;
      open_pending_.store(false, std::memory_order_release);
    }
  }
  for (uint32_t m; (m = txq_.Pop(b)) > 0;)
    for (uint32_t i = 0; i < m; ++i) give_tx(b[i].token);
  if (!keep_delivered) {
    while (!dequeue_mu_.try_lock()) {
      drain_ret();
      std::this_thread::yield();
    }
    for (BufRef r; rxq_.PopOne(&r);) give_rx(r.token, r.len);
    dequeue_mu_.unlock();
  }
  drain_ret();
}

void ChannelCore::DropDelivered(const std::function<void(uint64_t)>& give) {
  // Under the consumer locks although no consumer is left: the locks are what order the last
  // consumer's ring operations before ours (a reference count read says nobody is left, but
  // does not order their memory with ours).
  std::scoped_lock g(release_mu_, dequeue_mu_);
  for (BufRef r; rxq_.PopOne(&r);) give(r.token);
}

bool ChannelCore::ProducersIdle() {
  std::lock_guard g(producer_mu_);
  return txq_reserved_ == 0;
}

bool ChannelCore::SideReady(int side) const {
  const bool changed = state_changes_.load(std::memory_order_acquire) !=
                       notify_[side].seen_state_changes.load(std::memory_order_relaxed);
  if (side == 0) return changed || !rxq_.EmptyApprox();
  // "Enqueue can make progress" needs both an empty buffer and a txq_ slot.
  return changed || (!free_.EmptyApprox() && txq_.SizeApprox() < txq_.capacity());
}

uint32_t ChannelCore::writable_segments() const {
  // Not SideReady(1): its "the state changed since the write side last armed" stays true for a
  // caller that never arms, and a watcher would then call every full channel writable.
  const ChannelState st = state();
  if (st == ChannelState::kFailed || st == ChannelState::kClosed) return UINT32_MAX;
  const uint32_t queued = txq_.SizeApprox();
  return queued >= txq_.capacity() ? 0 : std::min(free_.SizeApprox(), txq_.capacity() - queued);
}

bool ChannelCore::Ready(Interest interest) const {
  return ((interest & kReadable) && SideReady(0)) || ((interest & kWritable) && SideReady(1));
}

void ChannelCore::ArmNotify(Interest interest) {
  for (int side = 0; side < 2; ++side) {
    if (!(interest & (1 << side))) continue;
    Notifier& n = notify_[side];
    n.armed.store(true, std::memory_order_seq_cst);
    const bool ready = SideReady(side);
    n.seen_state_changes.store(state_changes_.load(std::memory_order_acquire),
                               std::memory_order_relaxed);
    if (ready) NotifyApp(static_cast<Interest>(1 << side));
  }
}

bool ChannelCore::Wait(absl::Duration timeout, Interest interest) {
  pollfd p[2];
  nfds_t np = 0;
  for (int side = 0; side < 2; ++side) {
    if (!(interest & (1 << side))) continue;
    notify_[side].armed.store(true, std::memory_order_seq_cst);
    p[np++] = {notify_[side].fd, POLLIN, 0};
  }
  bool ready = Ready(interest);
  if (!ready) {
    const int64_t us = absl::ToInt64Microseconds(timeout);
    timespec ts{static_cast<time_t>(us / 1'000'000), static_cast<long>((us % 1'000'000) * 1000)};
    if (ppoll(p, np, &ts, nullptr) > 0) {
      for (nfds_t i = 0; i < np; ++i) {
        uint64_t v;
        if (p[i].revents & POLLIN) (void)!read(p[i].fd, &v, sizeof(v));
      }
    }
    ready = Ready(interest);
  }
  for (int side = 0; side < 2; ++side) {
    if (!(interest & (1 << side))) continue;
    notify_[side].armed.store(false, std::memory_order_relaxed);
    notify_[side].seen_state_changes.store(state_changes_.load(std::memory_order_acquire),
                                           std::memory_order_relaxed);
  }
  return ready;
}

void ChannelCore::Fail(FailCause c) {
  FailCause none = FailCause::kNone;
  fail_cause_.compare_exchange_strong(none, c, std::memory_order_acq_rel);
  SetState(ChannelState::kFailed);
}

void ChannelCore::SetState(ChannelState s) {
  if (state_.exchange(s, std::memory_order_acq_rel) == s) return;
  state_changes_.fetch_add(1, std::memory_order_release);
  NotifyApp(kBoth);
}

void ChannelCore::NotifyApp(Interest what) {
  std::atomic_thread_fence(std::memory_order_seq_cst);
  for (int side = 0; side < 2; ++side) {
    if (!(what & (1 << side))) continue;
    Notifier& n = notify_[side];
    if (n.armed.load(std::memory_order_relaxed) && n.armed.exchange(false)) {
      uint64_t one = 1;
      (void)!write(n.fd, &one, sizeof(one));
    }
  }
}

void ChannelCore::Linger(absl::Duration linger) {
  const uint64_t end = NowUs() + static_cast<uint64_t>(absl::ToInt64Microseconds(linger));
  while (state() == ChannelState::kUp && NowUs() < end &&
         (has_open() || !txq_.EmptyApprox() ||
          pub_.tx_queued_bytes.load(std::memory_order_relaxed) > 0)) {
    usleep(500);
  }
}

AcceptQueue::AcceptQueue() { fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC); }

AcceptQueue::~AcceptQueue() {
  if (fd_ >= 0) close(fd_);
}

void AcceptQueue::Signal() {
  uint64_t one = 1;
  (void)!write(fd_, &one, sizeof(one));
}

void AcceptQueue::Push(std::shared_ptr<Channel> c) {
  // Signalled under the lock, like Pop clears and re-signals under it: the fd is readable only
  // while a channel waits (a signal after the lock could outlive a Pop that emptied the queue
  // meanwhile, and Pop's empty fast path would never clear it).
  std::lock_guard g(mu_);
  q_.push_back(std::move(c));
  size_.store(q_.size(), std::memory_order_release);
  Signal();
}

std::shared_ptr<Channel> AcceptQueue::Pop(bool only_up) {
  // A Push racing with this check also signals the fd: its poller comes back.
  if (size_.load(std::memory_order_acquire) == 0) return nullptr;
  std::lock_guard g(mu_);
  uint64_t v;
  (void)!read(fd_, &v, sizeof(v));  // cleared; set again below while channels wait
  if (q_.empty()) return nullptr;
  if (only_up && q_.front()->state() == ChannelState::kConnecting) {
    Signal();
    return nullptr;
  }
  auto c = q_.front();
  q_.pop_front();
  size_.store(q_.size(), std::memory_order_release);
  if (!q_.empty()) Signal();
  return c;
}

absl::Status CheckEngineIndex(int engine, size_t engines) {
  if (engine >= 0 && engine < static_cast<int>(engines)) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrFormat("engine %d: the driver runs engines 0..%u", engine, engines - 1));
}

}  // namespace netch::chan
