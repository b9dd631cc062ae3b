// net_scheduler.h - the NetScheduler: the policy layer between virtual sockets and channels
// (thesis §3.3.3). This is the layer's one public header.
//
// VNS asks the active policy, for every batch of a socket's segments (up to 32), which of the
// socket's channels carries it. The policy sees a cheap snapshot of each channel (bytes queued
// and unacknowledged, whether it just refused a batch) and keeps per-socket state in a cursor the
// caller owns, so one policy object serves every socket on every thread without locks. Because
// VNS reorders by its own 64-bit stream offsets, any choice — and a policy swapped at run time
// (`netchctl policy set NAME k=v`) — keeps every byte and its order.
//
// Policies: "round-robin" (the paper's default: skip a channel holding more than
// skip_queued_bytes = 2 MiB unacknowledged while another holds less), "shortest-queue" (the
// channel with the fewest queued bytes), "one-per-socket" (the kernel-like baseline: a socket
// always uses one channel, chosen from its id). A new policy is one more RegisterPolicy call.
//
// Every policy also makes the copy plan (§3.3.3's third task): whether one Send/Recv copy is
// split into chunks shared with the copy workers, and how large they are (PlanCopy, with the
// copy knobs every policy has: inline_copy_bytes, copy_chunk_bytes, skip_worker_queued_bytes).
//
// And where each of a peer's channels runs (PlaceChannel: queue and engine; isolate-classes gives
// L-app channels their own; EngineForQueue: the same on the host that accepts them), how many
// channels a peer gets (WantChannels, with scale=on), and whether L-app sockets busy-poll
// (BusyPollUs: run to completion on the application thread).
//
// Copy workers are placed by the policy too (PlaceCopyWorker: isolate-classes keeps them off the
// L-app engine's core).
#pragma once

#include <algorithm>
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

namespace netch::sched {

// One of a socket's usable channels, as the policy sees it for one decision.
struct ChannelLoad {
  uint32_t id = 0;
  uint64_t tx_queued_bytes = 0;  // enqueued and not yet acknowledged by the peer
  bool full = false;             // refused a batch during this decision: do not pick it
};

inline constexpr size_t kNoReply = static_cast<size_t>(-1);

// The socket a decision is for.
struct SocketRef {
  uint64_t id = 0;        // stack-wide socket id (as netchctl shows it)
  uint8_t app_class = 0;  // enum nc_app_class
  // When what the socket sends now answers data it received (a short message, the first batch
  // since that data was read): the index in the decision's channels of the channel that data
  // came on; kNoReply otherwise.
  size_t reply_to = kNoReply;
};

using Knobs = std::vector<std::pair<std::string, std::string>>;

// Channels per peer (§3.3.3's second task): what the stack's scaler measures each tick, and the
// scaler's memory for one peer (the caller keeps it, like a cursor).
struct ScaleSample {
  uint64_t now_us = 0;
  int channels = 0;           // live channels to the peer
  uint64_t queued_bytes = 0;  // unacknowledged bytes on them, summed
  double engine_busy = 0;     // the engines' busy share since the last tick, 0..1
};
struct ScaleState {
  uint64_t grow_since_us = 0, shrink_since_us = 0;  // 0: the condition does not hold
  uint64_t last_change_us = 0;
};

// Where a channel runs: an AF_XDP queue and an engine (-1: the driver decides).
struct Placement {
  int queue = -1;
  int engine = -1;
};

// How one copy between the application's buffer and stack buffers runs.
struct CopyPlan {
  bool parallel = false;  // split into chunks that the caller and the copy workers share
  size_t chunk_bytes = 0;
};

class NetScheduler {
 public:
  static constexpr size_t kWait = static_cast<size_t>(-1);

  virtual ~NetScheduler() = default;
  virtual std::string_view name() const = 0;
  // How it decides, in one sentence for operators (netchctl sockets --explain, policy list).
  virtual std::string Explain() const = 0;

  // The channel for the socket's next batch: an index into `chans` (never empty; a stable order
  // for a given socket), never one marked full; kWait when the policy would rather wait than use
  // any of them (the caller then waits for room and asks again). `cursor` is the socket's own
  // state for this policy, 0 at first, kept by the caller. Called per batch on the application's
  // and copy workers' threads: it must not block, allocate or take locks.
  virtual size_t PickChannel(const SocketRef& s, std::span<const ChannelLoad> chans,
                             uint64_t* cursor) const = 0;

  // Where the peer's channel number `index` (of `count`, in opening order) runs, given the
  // driver's queues and engines. Default: wherever the driver puts it (least loaded queue).
  virtual Placement PlaceChannel(size_t index, size_t count, int queues, int engines) const {
    (void)index, (void)count, (void)queues, (void)engines;
    return {};
  }
  // Where copy worker `index` runs: a core, or -1 for wherever the OS schedules it. `engine_cores`
  // are the engines' pinned cores (-1: unpinned), `cpus` the cores there are. Default: -1.
  virtual int PlaceCopyWorker(int index, const std::vector<int>& engine_cores, int cpus) const {
    (void)index, (void)engine_cores, (void)cpus;
    return -1;
  }
  // The accepting side's half of placement: the engine that should run a channel a peer opened
  // to us on `queue` (the peer chose the queue; its packets arrive there), or -1 for wherever the
  // driver put it. Default: -1.
  virtual int EngineForQueue(int queue, int queues, int engines) const {
    (void)queue, (void)queues, (void)engines;
    return -1;
  }
  // How many of the driver's first queues this policy gives latency-class channels, asked once
  // when the stack opens its driver with `engines` engines: those queues transmit through AF_XDP
  // (DriverOptions::afxdp_tx_queues; fewer per-packet costs than the kernel's UDP path, which
  // the other queues keep for bulk). Default: 0. A policy set later does not change it.
  virtual uint32_t LatencyQueues(int engines) const {
    (void)engines;
    return 0;
  }
  // The policy's own typed knobs, validated when set, with their current values.
  virtual Knobs GetKnobs() const = 0;
  virtual absl::Status SetKnob(std::string_view key, std::string_view value) = 0;
  // Its own knobs and the copy knobs; a key may name either.
  Knobs AllKnobs() const;
  absl::Status SetAnyKnob(std::string_view key, std::string_view value);
  // Copy-plan and scaling knobs: every policy has them, and they carry over to a new policy.
  static bool IsCommonKnob(std::string_view key);
  Knobs CopyKnobs() const;  // all the common knobs (copy plan and scaling)

  // The channels the peer should have, with hysteresis (knobs scale=on|off, scale_min,
  // scale_max, scale_grow_queued_bytes, scale_shrink_queued_bytes, scale_grow_busy,
  // scale_shrink_busy, scale_hold_ms): one more when the mean unacknowledged bytes per channel
  // exceed the grow mark or the engines are busier than scale_grow_busy, continuously for
  // scale_hold_ms; one fewer when both stay under the shrink marks as long; never outside
  // [scale_min, scale_max]; nothing for scale_hold_ms after a change. With scale=off: the
  // current count.
  int WantChannels(const ScaleSample& s, ScaleState* st) const;
  bool scaling() const { return scale_on_.load(std::memory_order_relaxed); }

  // The copy plan for `bytes` (the paper's rules, as knobs): below inline_copy_bytes, or with no
  // copy workers, on the caller's thread; otherwise chunks of copy_chunk_bytes shared with the
  // workers — unless they already have more than skip_worker_queued_bytes (640 KiB) to copy, when
  // queueing behind others would be slower than copying alone. Cheap: three relaxed loads.
  CopyPlan PlanCopy(size_t bytes, int workers, uint64_t workers_queued_bytes) const;

  // Busy polling for L-app sockets (knob busy_poll_us, 0: off): how long a waiting Recv runs its
  // channels' engine rounds and demultiplexing on its own thread (run to completion: no engine
  // or dispatcher thread between the wire and the application) before it sleeps on the socket.
  // Other classes never busy-poll. One relaxed load.
  uint32_t BusyPollUs(const SocketRef& s) const {
    return s.app_class == kLatencyAppClass ? busy_poll_us_.load(std::memory_order_relaxed) : 0;
  }

  // Decisions that passed over a channel for its load (a policy's own measure; metrics).
  uint64_t skips() const { return skips_.load(std::memory_order_relaxed); }
  // Decisions that sent an answer back on its request's channel (ReplyChannel; for tests,
  // not yet exported as a metric).
  uint64_t replies() const { return replies_.load(std::memory_order_relaxed); }

 protected:
  // Reply affinity (common knob reply_affinity=on|off, on by default), for the policies that
  // spread a socket over channels: an answer goes back on the channel its request came on
  // (SocketRef::reply_to, when that is among chans[lo, hi)) while that channel can take it and
  // holds at most `mark` bytes unacknowledged. The answer then carries the channel's ACK of the
  // request. Spread in turn, every request/response pair left two channels each a pure ACK to
  // send — a packet whose only effect is to wake the peer — and a 4 KiB rpc over 4 channels
  // ran at 2-3x the p50 of one channel. Bulk writes are not answers (SocketRef) and spread as
  // before. kWait when it does not apply.
  size_t ReplyChannel(const SocketRef& s, std::span<const ChannelLoad> chans, uint64_t mark,
                      size_t lo = 0, size_t hi = kNoReply) const {
    if (s.reply_to == kNoReply || !reply_affinity_.load(std::memory_order_relaxed) ||
        s.reply_to < lo || s.reply_to >= std::min(hi, chans.size()))
      return kWait;
    const ChannelLoad& c = chans[s.reply_to];
    if (c.full || c.tx_queued_bytes > mark) return kWait;
    replies_.fetch_add(1, std::memory_order_relaxed);
    return s.reply_to;
  }
  mutable std::atomic<uint64_t> skips_{0};
  mutable std::atomic<uint64_t> replies_{0};

 private:
  static constexpr uint8_t kLatencyAppClass = 1;  // NC_CLASS_LATENCY
  std::atomic<uint32_t> busy_poll_us_{0};
  std::atomic<uint64_t> inline_copy_bytes_{256 << 10}, copy_chunk_bytes_{256 << 10},
      skip_worker_queued_bytes_{640 << 10};
  std::atomic<bool> scale_on_{false};
  std::atomic<bool> reply_affinity_{true};
  std::atomic<uint64_t> scale_min_{1}, scale_max_{4}, scale_grow_queued_{1 << 20},
      scale_shrink_queued_{64 << 10}, scale_hold_ms_{500};
  std::atomic<double> scale_grow_busy_{0.8}, scale_shrink_busy_{0.25};
};

using PolicyFactory = std::function<std::unique_ptr<NetScheduler>()>;

// Policies by name. CreatePolicy applies `knobs` in order; an unknown policy or knob, or a bad
// value, is an InvalidArgument error naming what is accepted.
absl::Status RegisterPolicy(const std::string& name, PolicyFactory factory);
absl::StatusOr<std::unique_ptr<NetScheduler>> CreatePolicy(const std::string& name,
                                                           const Knobs& knobs = {});
std::vector<std::string> PolicyNames();

}  // namespace netch::sched
