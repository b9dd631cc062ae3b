// channel.h - the NetDriver's promise: the Channel API, the one interface every transport driver
// implements and the only one the layers above (VNS, NetScheduler) use.
//
// A channel is one instance of a transport between this host and one peer: reliable, in-order,
// flow-controlled delivery of *segments* (a NetChannel header — the metadata — plus up to
// max_payload() bytes). What a channel does not know: which virtual socket a segment belongs to
// (the header says; VNS demultiplexes), or whether other channels carry the same socket.
//
//   Driver::Connect(params) -> Channel        (state kConnecting, then kUp or kFailed)
//   Driver::Accept()        -> Channel        (channels peers opened to us)
//   Channel::Enqueue(segments)                copies them into stack buffers, queues them
//   Channel::Dequeue(max bytes) -> segments   in order; payload points into stack buffers
//   Channel::Release(segments)                gives the buffers back, reopens the receive window
//   Driver::Destroy(channel)
//
// Threads. Each channel is run by one engine thread of its driver at a time (or, busy polling,
// by an application thread running that engine's round: PollInline, never both at once); the
// application side talks to it through lock-free single-producer/single-consumer rings. Enqueue may
// be called from any thread, Dequeue/Release from any thread, but each is serialized per channel
// by a small lock of its own that the engine never takes (a DeliveryHook's Dequeue runs on the
// engine's thread: no one waits for the engine while holding the Dequeue lock; a Release may wait
// for room while the engine drains, so a hook must not Release — TryRelease never waits). Nothing
// blocks: a full send buffer makes Enqueue return 0, an empty receive queue makes Dequeue return 0;
// Wait() or notify_fd() (poll/epoll) tell when to retry.
//
// A DATA segment is a byte range of its socket's stream (seq, payload): Dequeue may hand one
// segment over as several consecutive pieces, each a DATA segment with the same socket fields,
// seq advanced and payload shortened (a 64 KB segment received as a chain of UMEM frames). The
// bytes and their order are what a channel keeps; segment boundaries of DATA are not.
//
// Flow control is end to end: a consumer that stops releasing buffers closes the channel's receive
// window, the peer's sender stops, and the peer's Enqueue starts returning 0. Nothing is dropped.
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "bpf/wire.h"

namespace netch::bpf {
class SteerProgram;
}

namespace netch::chan {

enum class ChannelState : uint8_t {
  kConnecting,  // handshake in progress; segments may already be enqueued
  kUp,
  kFailed,  // handshake timed out, peer dead (nothing heard within the timeout) or reset
  kClosed,  // the peer closed the channel, or Destroy() was called
};
std::string_view StateName(ChannelState s);

// Why a channel went kFailed: a socket's error and the driver's counters say which, because
// "reset by the peer", "the peer went silent" and "the peer restarted" call for different
// fixes. Read after state() returned kFailed (the cause is stored first).
enum class FailCause : uint8_t {
  kNone,              // not failed (or closed in order)
  kHandshakeTimeout,  // the peer never completed the handshake in time
  kRefused,           // the peer refused the channel, or its handshake did not match ours
  kReset,             // the peer reset it (with the channel's token, in its window)
  kPeerSilent,        // nothing heard for the dead-peer timeout, not even a keepalive answer
  kPeerRestarted,     // the peer's stack restarted (a new incarnation, or its ids reused)
  kBroken,            // the kernel connection under it broke (TCP driver: EPIPE, ECONNRESET)
  kProtocolError,     // the peer sent what the transport cannot parse
  kUnreachable,       // the peer's address never resolved (no ARP answer): no host there
  kWrongQueue,        // handshake timed out with its replies arriving on another rx queue
};
inline constexpr size_t kFailCauses = 10;
std::string_view FailCauseName(FailCause c);  // one word, for metrics labels and netchctl
std::string_view FailCauseText(FailCause c);  // a phrase, for error messages

// What a scheduler reads, cheaply: a snapshot the engine publishes once per batch (relaxed
// atomics, no lock, no syscall).
struct ChannelStats {
  ChannelState state = ChannelState::kConnecting;
  uint64_t tx_queued_bytes = 0;    // enqueued and not yet acknowledged by the peer
  uint64_t rx_queued_bytes = 0;    // received in order, not yet released by the consumer
  uint64_t send_window_bytes = 0;  // what the transport may still put in flight right now
  uint32_t cwnd_packets = 0;       // congestion window (AF_XDP driver; 0 where the kernel owns it)
  uint64_t srtt_us = 0;            // smoothed RTT estimate
  uint64_t retransmits = 0;
  uint64_t timeouts = 0;           // retransmission timeouts (the costly way to recover a loss)
  uint64_t spurious_timeouts = 0;  // of those, undone: the data had arrived, its ACKs were late
  uint64_t tail_probes = 0;        // tail-loss probes: the last packet resent when ACKs stop
  uint64_t ecn_echoes = 0;         // ACKs from the peer echoing congestion (CE) marks
  uint64_t rx_dropped_stale = 0;   // DATA already received or outside the window: dropped
  uint64_t rx_ignored_acks = 0;    // ACKs for data never sent (spoofed or corrupt): ignored
  uint64_t tx_segments = 0, tx_bytes = 0;  // payload handed to the transport
  uint64_t rx_segments = 0, rx_bytes = 0;  // payload delivered to the consumer
  int engine = -1;                         // index of the engine thread running the channel
  int queue = -1;                          // AF_XDP: the interface queue the channel is bound to
};

struct ChannelParams {
  uint32_t peer_ipv4 = 0;  // host order, on the driver's interface subnet
  int engine = -1;         // engine to run on; -1: the driver picks the least loaded
  int queue = -1;          // AF_XDP queue; -1: the driver picks the least loaded
  absl::Duration connect_timeout = absl::Seconds(2);
};

// One segment to send: header fields (payload_len is derived) and the payload bytes.
struct TxSegment {
  wire::SegHeader hdr;
  std::span<const uint8_t> payload;
  // May be merged into the channel's open segment of the same socket (its bytes continue that
  // segment's) and held until the segment is full, until it is kCorkIdleUs old while the channel
  // has nothing unacknowledged (TCP's Nagle rule; on a busy channel it is autocork), until
  // Flush(), or for at most kCorkHoldUs. For small DATA writes of throughput sockets;
  // latency-sensitive ones never set it. Drivers that do not coalesce send it as is.
  bool coalesce = false;
};
inline constexpr uint64_t kCorkHoldUs = 200;
inline constexpr uint64_t kCorkIdleUs = 20;

// Busy polling on a machine with fewer cores than busy threads (both test hosts share two here).
// A poller that has found nothing for kPollYieldAfterUs yields between its rounds: another
// spinner on its core — the peer's, on a shared machine — then runs within a round instead of
// after a whole scheduler slice (p99.9 of a busy-polled 4 KiB rpc: ~500 µs without it, ~100 µs
// with it, docs/BENCHMARKS.md). Before that it spins flat out: most replies come sooner.
inline constexpr uint64_t kPollYieldAfterUs = 20;
// But a yield that comes back only after kPollYieldSlowUs handed the core to a thread that does
// not give it back soon — a bulk sender, not a fellow spinner — and every further yield would
// lose the poller a whole slice: it stops yielding for kPollYieldPauseUs and competes for the
// core like any busy thread (a busy-polled rpc beside a stream: p50 ~2 ms if it kept yielding).
inline constexpr uint64_t kPollYieldSlowUs = 200;
inline constexpr uint64_t kPollYieldPauseUs = 10'000;
class PollYielder {
 public:
  // `spun_us`: how long this poll has found nothing; `now_us` NowUs() of this round.
  void MaybeYield(uint64_t now_us, uint64_t spun_us);

 private:
  uint64_t paused_until_us_ = 0;
};
// A stood-down engine or dispatcher checks on its poller this long after the poller's lease
// (stand_down_us past its last round) ran out. A poller ending its spin hands the work back at
// once (EndPollInline); this bounds the wait only for one that stopped calling without ending (a
// Recv that returned data to an application that then did not call again), and sets how often
// the stood-down threads wake — each wakeup pre-empts a spinner on a shared core.
inline constexpr uint64_t kStandDownRecheckUs = 2000;

// What a stood-down thread (an engine, the stack's dispatcher) sleeps on besides its eventfd: a
// timer its pollers push ahead as they renew their leases, so that it wakes only once they stopped
// renewing without saying so (the lease plus kStandDownRecheckUs, up to kStandbySlackUs later).
// A sleep timed from the lease it saw instead woke every ~2.2 ms while the lease was renewed: on
// a busy-polled 4 KiB rpc an engine and the dispatcher of each host, ~1,700 wakeups a second
// over both, each pre-empting a spinner on these two cores. A poller pushes the timer once per
// kStandbySlackUs (one timerfd_settime); every other renewal costs one relaxed load. Two threads
// pushing it at once may leave it set earlier than the later one asked: an early wakeup, which
// finds the lease renewed and sleeps again — never a later one.
inline constexpr uint64_t kStandbySlackUs = 4000;
class StandbyTimer {
 public:
  StandbyTimer();
  ~StandbyTimer();
  StandbyTimer(const StandbyTimer&) = delete;
  StandbyTimer& operator=(const StandbyTimer&) = delete;
  bool ok() const { return fd_ >= 0; }
  int error() const { return error_; }  // why the timer could not be made (errno), if !ok()
  int fd() const { return fd_; }        // readable once the timer fired
  // Makes the timer fire no sooner than `due_us` (NowUs clock): if it would, sets it for
  // due_us + kStandbySlackUs.
  void Cover(uint64_t due_us) {
    uint64_t at = armed_us_.load(std::memory_order_relaxed);
    if (at >= due_us) return;
    if (armed_us_.compare_exchange_strong(at, due_us + kStandbySlackUs, std::memory_order_relaxed))
      Arm(due_us + kStandbySlackUs);
  }
  // The sleeper saw fd() readable: clears it (the next Cover arms it again).
  void Fired();

 private:
  void Arm(uint64_t at_us);
  int fd_ = -1;
  int error_ = 0;
  std::atomic<uint64_t> armed_us_{0};  // when it fires; 0: not armed
};

// Run to completion on the sending side. While a TransmitInlineScope lives on a thread, an
// Enqueue/Seal/Flush on that thread that finds its channel's engine asleep runs that engine's round
// itself — the segments leave on the caller's thread (copy-mode AF_XDP TX and UDP transmit are a
// syscall either way) — instead of waking the engine: one thread hand-off less per message, which
// is most of a blocking round trip's cost on these machines (docs/ARCHITECTURE.md). An engine
// that is awake, in a round or stood down for a poller is left to it, as Wake() would. Only for
// threads that hold no lock a round may take (a channel's producer or consumer locks, the locks
// a DeliveryHook takes): VNS opens one in a socket's Send. Scopes nest.
// `even_if_awake`: an engine pinned to the caller's core that is awake but not in a round
// (spinning between rounds) is run too. For latency-sensitive senders: on the engine's core,
// leaving the work to its next turn costs a scheduler round-trip per message (a 4 KiB rpc's p50
// 68 → 42 µs, L-app classes placed on one core); an engine on another core takes the work at
// once (running its round from here made a floating rpc 2.5× slower); and not for streams of
// small writes, whose engine batches better on its own (4 KiB writes 7 → 2.6 Gbit/s).
class TransmitInlineScope {
 public:
  explicit TransmitInlineScope(bool even_if_awake = false);
  ~TransmitInlineScope();
  TransmitInlineScope(const TransmitInlineScope&) = delete;
  TransmitInlineScope& operator=(const TransmitInlineScope&) = delete;

 private:
  bool awake_;
};

// Run to completion for an event loop's writes. A thread that comes back to wait within
// microseconds of writing — an event loop, which calls FlushDeferredTransmit() each time it
// returns to its wait (the preload's epoll_wait does) — opens a DeferTransmitScope around a
// write: work the write queues for a sleeping engine then waits for the loop's flush instead of
// waking the engine, so what one pass of the loop wrote to many sockets leaves in one round on
// the loop's own thread, no engine thread woken. If the loop does not come back, the engine's
// own timer runs the round kDeferTransmitUs later. A thread that never flushed does not defer
// (the scope is then a no-op), nor does an engine that is awake or stood down for a poller.
inline constexpr uint64_t kDeferTransmitUs = 200;
class DeferTransmitScope {
 public:
  DeferTransmitScope();
  ~DeferTransmitScope();
  DeferTransmitScope(const DeferTransmitScope&) = delete;
  DeferTransmitScope& operator=(const DeferTransmitScope&) = delete;
};
// Runs, on the calling thread, the rounds its DeferTransmitScopes deferred, and marks the thread
// as one that flushes (from now on its scopes defer). Cheap when nothing was deferred.
void FlushDeferredTransmit();

class Engine;

// Run to completion on the receive side, for a consumer about to block until data arrives
// (Channel::BorrowInput): while the loan lives, the engine that carries the channel sleeps on
// without watching its input (its timers and producers still wake it); the borrower polls fd()
// — readable when any of the engine's tasks has input — and runs the round on its own thread
// with Run(), so an arrival wakes the one thread that waits for it instead of the engine and
// then, after its round, the consumer. Loans of one engine are counted: the engine watches its
// input again when the last one ends. Move-only; destroying it returns the loan.
class InputLoan {
 public:
  InputLoan() = default;
  InputLoan(InputLoan&& o) noexcept : engine_(std::exchange(o.engine_, nullptr)) {}
  InputLoan& operator=(InputLoan&& o) noexcept;
  ~InputLoan() { Return(); }
  explicit operator bool() const { return engine_ != nullptr; }
  int fd() const;
  // Runs the engine's round on this thread (timers it sets stay the engine's). False when another
  // thread runs one right now: that round takes the input.
  bool Run();
  void Return();
  bool same_engine(const InputLoan& o) const { return engine_ == o.engine_; }

 private:
  friend class Engine;
  explicit InputLoan(Engine* e) : engine_(e) {}
  Engine* engine_ = nullptr;
};

// One received segment. `payload` points into a stack buffer owned by the caller until Release().
struct RxSegment {
  wire::SegHeader hdr;
  std::span<const uint8_t> payload;
  uint64_t token = 0;   // the driver's buffer handle
  uint32_t charge = 0;  // bytes this buffer holds against the receive window
};

class Channel {
 public:
  virtual ~Channel() = default;

  virtual uint32_t id() const = 0;         // local id, unique per driver instance
  virtual uint32_t peer_ipv4() const = 0;  // host order
  virtual ChannelState state() const = 0;
  virtual FailCause fail_cause() const { return FailCause::kNone; }
  virtual ChannelStats stats() const = 0;
  // stats().tx_queued_bytes, in one load: what a scheduler reads per batch.
  virtual uint64_t tx_queued_bytes() const { return stats().tx_queued_bytes; }
  // Nothing left to transmit or to be acknowledged: no segment queued for the engine, none held
  // open for coalescing, none unacknowledged (tx_queued_bytes counts only what the transport
  // took). What a process about to exit waits for (a FIN queued behind data counts too).
  virtual bool tx_idle() const { return tx_queued_bytes() == 0; }
  // The consumer holds more than half of the channel's receive buffer: a consumer that keeps
  // buffers for long (a slow socket) should copy what it holds and release the buffers, or the
  // channel's window closes for everyone who shares it. One relaxed load: fine per segment.
  virtual bool rx_under_pressure() const { return false; }
  // The largest payload one segment may carry (from the MTU for AF_XDP).
  virtual size_t max_payload() const = 0;
  // Enqueue would take at least one segment now (or the channel is down and would refuse at
  // once): what a poller of a socket's write readiness checks. Two relaxed loads.
  virtual bool writable() const { return true; }
  // About how many segments Enqueue would take now (UINT32_MAX: no limit the caller could
  // share out, or down): a watcher wakes no more writers than the channel has room for.
  virtual uint32_t writable_segments() const { return writable() ? UINT32_MAX : 0; }

  // Copies whole segments into stack buffers and queues them, in order (one caller's order;
  // concurrent callers' segments interleave, the copies run in parallel). Returns how many were
  // taken: fewer than asked when the send buffer is full (retry after Wait), 0 as well once the
  // channel is failed or closed. InvalidArgument for a payload larger than max_payload().
  virtual absl::StatusOr<size_t> Enqueue(std::span<const TxSegment> segs) = 0;
  // Up to out.size() in-order segments totalling at most max_bytes of payload (at least one
  // segment if any is ready, even if larger). Returns how many were written.
  virtual size_t Dequeue(size_t max_bytes, std::span<RxSegment> out) = 0;
  // Returns buffers obtained from Dequeue, in any order.
  virtual void Release(std::span<const RxSegment> segs) = 0;
  // Release of one segment that never waits (a delivery hook may call it): false, and nothing
  // done, when it would have to wait for room or for another releaser.
  virtual bool TryRelease(const RxSegment& seg) {
    (void)seg;
    return false;
  }
  // Sends at once what Enqueue holds open for coalescing (a writer about to wait for a reply).
  virtual void Flush() {}
  // Busy polling (run to completion, for latency-sensitive sockets): runs one round of the engine
  // that carries this channel on the calling thread — receive ring, acknowledgments, transmit of
  // what Enqueue queued — unless that engine is in a round right now; for `stand_down_us` the
  // engine thread leaves the work to the poller (arriving packets do not wake it). True if
  // anything was done. `now_us` is the caller's NowUs() (one clock read per polling round).
  // Drivers without engine threads return false.
  virtual bool PollInline(uint64_t now_us, uint64_t stand_down_us) {
    (void)now_us, (void)stand_down_us;
    return false;
  }
  // The poller stops (about to sleep): the engine thread takes over again at once.
  virtual void EndPollInline() {}
  // Run to completion on the receive side, for a blocking consumer (see InputLoan): an empty
  // loan when the driver has no engine threads.
  virtual InputLoan BorrowInput() { return {}; }
  // Scale-down: `last` becomes the final segment on this channel — after every segment enqueued
  // before (including those being copied right now), and Enqueue takes nothing after it. False
  // when the send queue has no room for it yet (try again later).
  virtual bool Seal(const TxSegment& last) {
    (void)last;
    return false;
  }
  virtual bool sealed() const { return false; }
  // Segments delivered (in rxq or handed out by Dequeue) that the consumer has not Released yet:
  // exact on the consumer's side, unlike stats().rx_queued_bytes, which the engine publishes
  // once per batch. 0 means no consumer holds a pointer into the channel's buffers.
  virtual uint64_t rx_outstanding() const { return 0; }

  // What a waiter cares about. The receive side (Dequeue) and the send side (Enqueue) have
  // separate notifications: a dispatcher draining a channel and an application filling it wait
  // on different fds and never consume each other's wakeups.
  enum Interest : int { kReadable = 1, kWritable = 2, kBoth = 3 };
  // Blocks until Dequeue has data (kReadable), Enqueue has room (kWritable), the state changes,
  // or `timeout`. Returns false on timeout.
  virtual bool Wait(absl::Duration timeout, Interest interest = kBoth) = 0;
  // An eventfd for poll/epoll per side (kReadable or kWritable): readable after that side's
  // condition or a state change, once ArmNotify() armed it (re-arm after each wakeup; read the
  // fd to clear it). A state change is reported once per side.
  virtual int notify_fd(Interest side) const = 0;
  virtual void ArmNotify(Interest interest = kBoth) = 0;

  // Run to completion on the receive side (optional): a consumer that takes what a round
  // delivered on the engine's own thread, right after that round, instead of being woken
  // through notify_fd(kReadable) — one thread hand-off less per delivery. Delivered() must not
  // block, nor Release (hand released buffers to another thread, or TryRelease, which never
  // waits); true means it dequeued
  // everything (no wakeup is sent and an armed notification stays armed), false falls back to
  // the notification. Set by the consumer while it serves the channel, cleared (nullptr) before
  // it lets go of it; drivers without it never call it.
  class DeliveryHook {
   public:
    virtual ~DeliveryHook() = default;
    virtual bool Delivered(Channel& ch) = 0;
  };
  virtual void SetDeliveryHook(DeliveryHook* hook) { (void)hook; }
};

struct DriverStats {
  uint64_t rx_frames = 0;        // frames taken from the wire (AF_XDP) / segments read (TCP)
  uint64_t rx_malformed = 0;     // failed validation in the driver: dropped
  uint64_t rx_unknown_chan = 0;  // for no channel of ours (or from the wrong peer): dropped
  uint64_t handshakes_rx = 0;    // channel SYNs received (each answered statelessly)
  uint64_t handshakes_bad = 0;   // handshake packets with a bad cookie or not matching ours
  // Handshakes refused or closed before a channel existed: not accepting, over the pending or
  // per-peer caps, out of ids (kernel-TCP also: hello timed out). AF_XDP logs each reason.
  uint64_t handshakes_dropped = 0;
  uint64_t handshakes_pending = 0;  // kernel-TCP: accepted connections awaiting their hello
  uint64_t rx_bad_token = 0;        // for a channel of ours without its token, or a FIN/RST out of
                                    // window: forged or stale, dropped (XDP drops most before this)
  uint64_t channels_reaped = 0;     // failed/closed channels whose ids and buffers were reclaimed
  std::array<uint64_t, kFailCauses> channels_failed{};  // channels failed, by FailCause
  uint64_t fill_ring_empty = 0;  // times the fill ring was found empty when refilling
  uint64_t tx_ring_full = 0;     // times transmit was held back by a full TX ring
  uint64_t xsk_rx_dropped = 0;   // XDP_STATISTICS, summed over the driver's sockets
  uint64_t xsk_rx_ring_full = 0;
  uint64_t xsk_fill_ring_empty = 0;
  uint64_t xsk_tx_ring_empty = 0;
  uint64_t frames_total = 0;     // UMEM frames owned by the driver
  uint64_t frames_free = 0;      // ... of which in the free pools right now
  uint64_t frames_in_fill = 0;   // ... of which lent to the kernel in the fill rings
  uint64_t fill_target = 0;      // the depth the fill rings are kept at now (shallow or deep)
  uint64_t fill_deepened = 0;    // times a fill ring went from shallow to deep (a burst)
  uint64_t tx_slots_total = 0;   // 64 KB UMEM slots for AF_XDP TX of large segments
  uint64_t tx_slots_free = 0;    // ... of which free right now
  uint64_t rx_multi_buffer = 0;  // frames that arrived as a chain of UMEM frames (XDP_USE_SG)
  uint64_t udp_tx_packets = 0;   // packets sent through the kernel's UDP socket
  uint64_t udp_tx_errors = 0;    // ... refused by it (the transport resends them as lost)
  uint64_t udp_gso_trains = 0;   // ... of which sent as UDP_SEGMENT trains of several packets
  bool tx_udp = false;           // DATA leaves through the kernel's UDP socket (tx "udp")
  uint32_t afxdp_tx_queues = 0;  // ... except on queues [0, n): AF_XDP TX (latency queues)
};

struct EngineInfo {
  int index = 0;
  int core = -1;  // pinned core, -1 if unpinned
  int tid = 0;    // OS thread id
  uint64_t busy_ns = 0, wakeups = 0;
  uint64_t inline_rounds = 0;  // rounds producers ran on their own threads (TransmitInlineScope)
  uint64_t loan_rounds = 0;    // rounds blocked receivers ran on their own threads (InputLoan)
};

class Driver {
 public:
  virtual ~Driver() = default;
  virtual std::string_view name() const = 0;

  // Opens a channel to the peer. Returns at once in kConnecting.
  virtual absl::StatusOr<std::shared_ptr<Channel>> Connect(const ChannelParams& params) = 0;
  // The next channel a peer opened to us, or nullptr. accept_fd() is readable when one is waiting
  // (read it to clear).
  virtual std::shared_ptr<Channel> Accept() = 0;
  virtual int accept_fd() const = 0;
  // Lingers (up to DriverOptions::close_linger) until what was enqueued is acknowledged, tells
  // the peer, and releases everything the channel holds. The channel object stays valid for
  // stats; its state becomes kClosed.
  virtual absl::Status Destroy(Channel& ch) = 0;

  // Moves a channel to another engine thread: a hand-off between the two threads at a batch
  // boundary; no frame is lost or duplicated. The AF_XDP driver moves the channel's whole queue
  // (with any other channel bound to it): see docs/ARCHITECTURE.md.
  virtual absl::Status MoveChannel(uint32_t id, int engine) = 0;
  virtual std::vector<EngineInfo> Engines() const = 0;
  // Queues channels can be placed on (ChannelParams::queue < queue_count()).
  virtual int queue_count() const { return 1; }
  virtual DriverStats Stats() const = 0;
  virtual std::vector<std::shared_ptr<Channel>> Channels() const = 0;
};

// What any driver may need; each driver reads the fields that concern it.
struct DriverOptions {
  std::string netns;       // network namespace the driver lives in ("" = the caller's)
  std::string ifname;      // interface carrying the channels
  int engines = 1;         // engine threads
  std::vector<int> cores;  // core per engine (empty: not pinned)
  bool accept = true;      // accept channels opened by peers
  // AF_XDP driver.
  bpf::SteerProgram* steer = nullptr;  // loaded and attached on ifname; not owned
  uint32_t queues = 0;                 // queues to serve, 0 = every rx queue of ifname
  uint32_t frames_per_queue = 8192;
  uint32_t window_packets = 512;         // transport window (power of two)
  std::string congestion = "newreno";    // "newreno" | "dctcp" (sends ECT(0), reacts to ECN marks)
  uint32_t rcv_buf_bytes = 2 << 20;      // receive buffer advertised per channel
  uint32_t max_channels_per_peer = 256;  // channels one peer address may hold open here
  absl::Duration dead_peer_timeout = absl::Seconds(2);
  absl::Duration close_linger = absl::Seconds(1);  // Destroy waits this long for unacked data
  absl::Duration spin = absl::Microseconds(50);    // busy-poll this long before sleeping
  uint16_t udp_port = NC_DEFAULT_UDP_PORT;
  // How DATA leaves: "afxdp" (AF_XDP TX from UMEM frames; a segment fits one frame), "udp" (the
  // kernel's UDP socket from a send pool; segments up to 64 KB where the MTU allows, received as
  // multi-buffer frames), "auto" (udp on copy-mode devices — veth, NICs without zero-copy — when
  // the steering program's tc queue pinning is attached; afxdp otherwise). docs/DATAPATH.md.
  std::string tx = "auto";
  // With tx "auto" where it picks udp: queues [0, afxdp_tx_queues) transmit through AF_XDP all
  // the same (at most every queue but one). A packet then skips the kernel's UDP/IP stack, tc
  // and qdisc — ~1 µs less per packet on veth here, what a busy-polled round trip is made of —
  // while bulk keeps the UDP path's large datagrams and GSO trains. Left at 0, the stack sets it
  // from its NetScheduler policy (NetScheduler::LatencyQueues: isolate-classes' latency channels
  // run on those queues); fixed once the driver opens its queues. docs/DATAPATH.md, "Latency
  // queues".
  uint32_t afxdp_tx_queues = 0;
  uint32_t send_pool_bytes = 32 << 20;  // per queue, for tx "udp"
  // Kernel-TCP driver.
  uint16_t tcp_port = 9910;
  // Loopback driver (in-process channels for tests): this driver's address, host order.
  uint32_t loopback_ipv4 = 0;
};

using DriverFactory =
    std::function<absl::StatusOr<std::unique_ptr<Driver>>(const DriverOptions& opts)>;

// Drivers by name: "afxdp", "tcp" and "loopback" (in-process, for tests) are built in. A new
// transport is one more Register call.
absl::Status RegisterDriver(const std::string& name, DriverFactory factory);
absl::StatusOr<std::unique_ptr<Driver>> CreateDriver(const std::string& name,
                                                     const DriverOptions& opts);
std::vector<std::string> DriverNames();

}  // namespace netch::chan
