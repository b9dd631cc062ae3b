// stack_impl.h - the stack object behind vns.h's Stack (internal to vns_lib): the connection
// table, the peers, the control-segment plumbing and the dispatcher (dispatcher.cc); sockets
// live in socket.cc, the rest in stack.cc.
#pragma once

#include <poll.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "afxdp_channels/engine.h"
#include "afxdp_channels/netdev.h"
#include "bpf/steer_program.h"
#include "common/errno_status.h"
#include "common/netns.h"
#include "common/random.h"
#include "policies/net_scheduler.h"
#include "vns_lib/conn.h"
#include "vns_lib/copy_workers.h"
#include "vns_lib/peer_set.h"
#include "vns_lib/reassembly.h"
#include "vns_lib/sock_error.h"
#include "vns_lib/vns.h"

namespace netch::vns {

class SocketImpl;

// The consumer side of one channel inside VNS. The dispatcher drains it, except for the moments a
// busy-polling socket does (run to completion): whoever owns the lane dequeues, and what was
// dequeued but not yet taken by its socket waits in `pending`, in order, for the next owner.
struct RxLane {
  bool TryOwn() {
    return !owned.load(std::memory_order_relaxed) &&
           !owned.exchange(true, std::memory_order_acquire);
  }
  void Disown() {
    npending.store(pending.size(), std::memory_order_relaxed);
    owned.store(false, std::memory_order_release);
  }
  std::atomic<bool> owned{false};
  std::deque<chan::RxSegment> pending;  // the owner's only
  // The owner's batch for Channel::Dequeue (which sets every field): not a local array, whose
  // initializers zeroed 3 KB per delivery and per busy-poll spin.
  chan::RxSegment batch[64];
  std::atomic<size_t> npending{0};  // pending.size() as the last owner left it
  // A socket polls this lane until then: the dispatcher does not ask the channel to wake it.
  std::atomic<uint64_t> polled_until_us{0};
  bool gone = false;  // under ownership: the dispatcher let the channel go; pollers drop the lane
  std::atomic<bool> left{false};  // `gone`, readable without ownership (set with it)
  // Head-of-line resolution copies a segment out of a channel under pressure only if the
  // channel is shared: it carried more than one socket's data, or control segments (a window
  // update stuck behind a reader that waits for it would never arrive). A channel only one
  // slow reader's data uses gains nothing from the copies — its own window stops the sender —
  // and they took a quarter of a bulk stream's segments and the receiving core's time with them
  // (docs/BENCHMARKS.md). The owner's only; once shared, always.
  // The peer's control channel counts as shared even before a control segment came on it (it
  // took over from one that went while this one was full).
  uint64_t last_conn = 0;
  bool shared = false;
  Peer* peer = nullptr;  // set before the lane is published
  // Notes the socket of a data segment.
  void NoteSocket(uint64_t conn) {
    shared |= last_conn != 0 && conn != last_conn;
    last_conn = conn;
  }
  // Under rx pressure: whether `ch` (this lane's) is shared, so a segment is copied out of it.
  bool Shared(const chan::Channel& ch) const {
    return shared || (peer && peer->ControlChannel().get() == &ch);
  }
};

class StackImpl final : public Stack {
 public:
  explicit StackImpl(const StackOptions& o) : opts_(o), workers_(0) {}
  ~StackImpl() override;
  absl::Status Init();

  absl::StatusOr<std::unique_ptr<VirtualSocket>> Listen(uint16_t port, int backlog,
                                                        const SocketOptions& o) override;
  absl::StatusOr<std::unique_ptr<VirtualSocket>> Connect(uint32_t peer_ipv4, uint16_t port,
                                                         const SocketOptions& o) override;
  absl::Status SetCopyWorkers(int n) override;
  int copy_workers() const override { return nworkers_.load(); }
  bool PollInline(uint64_t stand_down_us) override;
  void EndPollInline() override;
  void HandOverWatches() override;
  size_t BorrowInputs(std::span<chan::InputLoan> out) override;
  std::vector<int> copy_worker_cores() const override {
    std::vector<int> out;
    for (int i = 0; i < nworkers_.load(); ++i) out.push_back(workers_.core(i));
    return out;
  }
  StackStats Stats() const override;
  chan::Driver& driver() override { return *driver_; }
  std::vector<SocketInfo> Sockets() const override;
  absl::Status MapSocket(uint64_t id, const std::vector<uint32_t>& channel_ids) override;
  PolicyInfo Policy() const override;
  absl::Status SetPolicy(const std::string& name,
                         const std::vector<std::pair<std::string, std::string>>& knobs) override;
  // The active NetScheduler policy. Sockets keep a reference and refresh it only when the
  // version moves: no lock per Send.
  std::shared_ptr<const sched::NetScheduler> policy() const {
    std::lock_guard g(policy_mu_);
    return policy_;
  }
  uint64_t policy_version() const { return policy_version_.load(std::memory_order_acquire); }
  PeerSet& peers() { return *peers_; }
  uint64_t NextId() { return next_conn_id_.fetch_add(1, std::memory_order_relaxed); }

  // For sockets.
  const StackOptions& opts() const { return opts_; }
  CopyWorkers& workers() { return workers_; }
  void Unregister(const std::shared_ptr<Conn>& c);
  void UnregisterListener(uint16_t port);
  // Sends a header-only segment (SYN, SYN_ACK, FIN, RST) on one of the peer's channels.
  absl::Status SendControl(chan::Channel& ch, const Conn& c, uint8_t type, uint64_t seq) {
    return SendControl(ch, c.key, c.conn_id, c.app_class, type, seq);
  }
  absl::Status SendControl(chan::Channel& ch, const ConnKey& k, uint32_t conn_id, AppClass cls,
                           uint8_t type, uint64_t seq);
  // Application threads: waits (up to `timeout`) while the channel has no free buffer — right
  // after a channel comes up its buffers are still on their way from the engine.
  absl::Status SendControlWait(chan::Channel& ch, const Conn& c, uint8_t type, uint64_t seq,
                               absl::Duration timeout = absl::Seconds(1));
  void WakeDispatcher() {
    uint64_t one = 1;
    (void)!write(wake_fd_, &one, sizeof(one));
  }
  // A socket consumed data: only a dispatcher holding a channel for a full socket cares.
  // A non-blocking Send stopped on full channels: the dispatcher sets the socket's write
  // readiness when one of its peer's channels has room again (checked each round, and at least
  // every millisecond while anyone is watched).
  void WatchWritable(const std::shared_ptr<Conn>& c);
  absl::Status SetPeerChannels(uint32_t ip, int n) override;
  // The active policy's placement of a peer's channels (queue, engine), for PeerSet::Ensure.
  std::function<void(size_t, chan::ChannelParams*)> Placer(int count);
  // How many channels a peer's first opening starts: its scaler's target, else the stack's.
  int ChannelsWanted(const Peer& p) const {
    const int target = p.target.load(std::memory_order_relaxed);
    return target > 0 ? target : opts_.channels_per_peer;
  }
  // A non-blocking connect whose peer's opening timed out on another connect's earlier deadline:
  // a new opening, with this one's deadline (the peer may have come up since). False if none
  // could start.
  bool ReopenFor(Conn& c);
  // A busy poller renewed its lease on a lane or on the whole stack until `until_us`: the
  // dispatcher, not watching what the poller drains, wakes only once such a lease has run out
  // (chan::StandbyTimer).
  void CoverPolledUntil(uint64_t until_us) {
    dispatch_standby_.Cover(until_us + chan::kStandDownRecheckUs);
  }
  void NotifyConsumed() {
    if (holding_.load(std::memory_order_seq_cst)) WakeDispatcher();
  }
  // Tests: the lock a dispatcher round holds, held by the caller as a long round would.
  std::unique_lock<std::mutex> HoldDispatcherForTest() { return std::unique_lock(dispatch_mu_); }

 private:
  void Dispatch();  // the dispatcher thread: rounds, and sleeping between them
  // One dispatcher round (dispatch_mu_ held): seal requests, connect expiry, control backlog,
  // accepted channels, every channel's lane served, dead channels retired. True if it did work.
  bool DispatchRound();
  struct DispatchChan {
    std::shared_ptr<chan::Channel> ch;
    Peer* peer;
    std::shared_ptr<RxLane> lane;  // owned while served; `pending` lives there
    bool dead = false;             // seen failed or closed
    bool drained = false;          // scaled down: sealed both ways and emptied
  };
  void ServeChannel(DispatchChan& cs, bool* worked);  // dispatch_mu_ held, lane owned
  // The data half of ServeChannel (dispatch_mu_ held, lane owned): what the lane holds back,
  // then what the channel has, to their sockets. False while a full socket holds some back.
  bool DeliverPending(DispatchChan& cs, bool* worked);
  bool DeliverNew(DispatchChan& cs, bool* worked);
  // Channel::DeliveryHook (StackOptions::deliver_inline), on an engine's thread: hands the data
  // segments `ch` just delivered straight to their sockets, without the dispatcher's lock — an
  // engine never waits for a dispatcher round, which may be serving a bulk channel on a busy
  // core (isolate-classes' L-app segments waited milliseconds behind it, docs/BENCHMARKS.md).
  // Anything else (control segments, a full or unknown socket, a lane with segments held
  // back) is left in the lane for the dispatcher, in order. Never blocks.
  bool DeliverInline(chan::Channel& ch);
  struct InlineDelivery final : chan::Channel::DeliveryHook {
    explicit InlineDelivery(StackImpl* s) : st(s) {}
    bool Delivered(chan::Channel& ch) override { return st->DeliverInline(ch); }
    StackImpl* st;
  } delivery_hook_{this};
  // The hook serves while set; the destructor clears it and waits for hooks inside
  // (inline_active_) before anything they touch goes.
  std::atomic<bool> deliver_inline_{false};
  std::atomic<int> inline_active_{0};
  std::atomic<uint64_t> deliveries_inline_{0};
  // Everything the dispatcher keeps is guarded by dispatch_mu_: its thread takes it per round, a
  // busy-polling application thread (PollInline) only try_locks it to run a round itself.
  std::mutex dispatch_mu_;
  std::vector<DispatchChan> dchans_;  // dispatch_mu_
  uint64_t known_version_ = ~0ull;    // dispatch_mu_: peers_->version() last scanned
  uint64_t next_expiry_ = 0;          // dispatch_mu_
  std::atomic<uint64_t> dispatch_stand_down_until_us_{0};
  chan::StandbyTimer dispatch_standby_;
  std::atomic<uint64_t> dispatch_sleeps_{0};
  // Every channel of every peer, as of peers_->version() `version`; AllChannels refreshes it
  // (the caller holds the lock that guards the cache).
  struct ChannelCache {
    std::vector<std::shared_ptr<chan::Channel>> chans;
    uint64_t version = ~0ull;
  };
  const std::vector<std::shared_ptr<chan::Channel>>& AllChannels(ChannelCache& cache);
  std::mutex inline_mu_;       // one stack poller at a time (PollInline)
  ChannelCache inline_chans_;  // inline_mu_
  std::mutex loan_mu_;         // BorrowInputs
  ChannelCache loan_chans_;    // loan_mu_
  // A channel died: connections whose bytes it carried are broken (their peers are told with an
  // RST on a live channel). Dispatcher thread.
  void BreakConnsOn(Peer& p, const chan::Channel* ch);
  // Resets one connection (protocol violation): its socket reports ECONNRESET, the peer gets RST.
  void ResetConn(Conn& c, chan::Channel* ch);
  // Hands one segment to its socket. False: the socket is full, keep the segment and stop
  // draining this channel.
  bool Deliver(chan::Channel* ch, RxLane& lane, const chan::RxSegment& seg);
  void Rst(chan::Channel* ch, const wire::SegHeader& h);
  std::shared_ptr<Conn> Lookup(const ConnKey& k);
  // The dispatcher never blocks: a control segment a full channel refused waits here.
  struct CtlMsg {
    chan::Channel* ch;
    ConnKey key;
    uint32_t conn_id;
    AppClass cls;
    uint8_t type;
    uint64_t seq;
  };
  void QueueControl(chan::Channel* ch, const ConnKey& k, uint32_t conn_id, AppClass cls,
                    uint8_t type, uint64_t seq = 0);
  std::deque<CtlMsg> ctl_backlog_;            // dispatch_mu_
  std::atomic<uint64_t> ctl_backlog_len_{0};  // its size after the last round, for Stats()
  void ExpireConnects();  // dispatcher: non-blocking connects past their deadline time out
  // mu_ held: a connect still in progress ends as `fail` (kTimedOut, kRefused): it leaves the
  // connection table and its socket learns at once (write readiness, Error()).
  void FailConnectLocked(const std::shared_ptr<Conn>& c, ConnState fail);
  // Dispatcher: finishes the peers' channel openings a non-blocking connect started, then sends
  // the NCSYN of each connection whose peer has a channel up, or fails it with the peer's open
  // failure. True while any connection still waits.
  bool ServeAwaitingChannels();
  // Connect's new connection to `peer` (a free local port, registered), or null.
  std::shared_ptr<Conn> NewClientConn(uint32_t ip, uint16_t port, Peer* peer,
                                      const SocketOptions& o);
  void CheckWatched();   // dispatcher: write-watched sockets whose channels have room
  bool SealRequested();  // dispatcher: seals channels being scaled down (NC_DRAIN)
  // dispatch_mu_: nothing the dispatcher retries on its own clock — control segments a full
  // channel refused, seals, releases, channels being drained or dying, connects that may time
  // out. Then it sleeps kIdleDispatchSleepUs between looks instead of 10 ms.
  bool NothingToRetryLocked();
  // dispatch_mu_: channels being scaled down.
  std::vector<chan::Channel*> to_seal_;
  absl::flat_hash_set<const chan::Channel*> sealed_by_us_, drained_by_peer_, initiated_by_us_,
      peer_initiated_;

  StackOptions opts_;
  std::unique_ptr<bpf::SteerProgram> steer_;
  std::string steer_netns_;
  std::unique_ptr<chan::Driver> driver_;
  CopyWorkers workers_;
  std::atomic<int> nworkers_{0};
  std::mutex workers_mu_;         // Resize and Place of workers_: control calls, one at a time
  void PlaceCopyWorkersLocked();  // the policy's PlaceCopyWorker for each worker

  std::unique_ptr<PeerSet> peers_;
  mutable std::mutex mu_;  // conns_, listeners_: connection setup and teardown only
  absl::flat_hash_map<ConnKey, std::shared_ptr<Conn>> conns_;
  absl::flat_hash_map<uint16_t, std::shared_ptr<Conn>> listeners_;
  uint16_t next_port_ = 0;
  std::vector<std::shared_ptr<Conn>> connecting_;  // guarded by mu_: non-blocking connects
  // Non-blocking connects whose NCSYN waits for the peer's first channel (also in connecting_).
  std::vector<std::shared_ptr<Conn>> awaiting_channels_;  // guarded by mu_
  std::atomic<bool> awaiting_{false};                     // awaiting_channels_ is not empty
  std::mutex watch_mu_;
  std::vector<std::weak_ptr<Conn>> watch_;                       // guarded by watch_mu_
  std::vector<std::pair<const chan::Channel*, uint32_t>> room_;  // guarded by watch_mu_
  std::atomic<bool> watching_{false};
  // Watches a polling loop left to its own next rounds: the dispatcher has not been told.
  std::atomic<bool> watch_unannounced_{false};
  // Scale-down (dispatcher.cc): channels to seal, asked by SetPeerChannels.
  std::mutex drain_mu_;
  std::vector<std::shared_ptr<chan::Channel>> drain_requests_;  // guarded by drain_mu_
  std::atomic<uint64_t> scale_ups_{0}, scale_downs_{0};

  std::thread dispatcher_;
  void Scale();  // the scaler thread
  std::thread scaler_;
  std::mutex scale_mu_;
  std::condition_variable scale_cv_;
  std::atomic<bool> stop_{false};
  int wake_fd_ = -1;
  std::atomic<uint64_t> segments_in_{0}, ctl_out_{0}, rst_sent_{0}, blocked_{0};
  std::atomic<bool> holding_{false};       // some channel is held back for a full socket
  std::atomic<uint64_t> rx_bad_conn_{0};   // segments for a port pair with the wrong conn_id
  std::atomic<uint64_t> conns_broken_{0};  // connections reset because a channel failed
  std::atomic<uint64_t> rx_beyond_window_{0};
  std::atomic<uint64_t> rx_pressure_copies_{0};
  mutable std::mutex policy_mu_;
  std::shared_ptr<sched::NetScheduler> policy_;  // guarded by policy_mu_
  std::atomic<uint64_t> policy_version_{0};
  std::atomic<uint64_t> retired_skips_{0};  // skips counted by policies swapped out
  std::atomic<uint64_t> next_conn_id_{1};

 public:
  std::atomic<uint64_t> sched_batches_{0};
  std::atomic<uint64_t> window_updates_{0};
  std::atomic<uint64_t> inline_segments_{0};  // taken by busy-polling sockets themselves
  std::atomic<uint64_t> inline_rounds_{0};    // dispatcher rounds run by PollInline callers
  // One data segment or window update to its socket, as Deliver would, or false (nothing done)
  // for anything it leaves to the dispatcher; `lane` owned by the caller: an engine delivering
  // inline, or a busy-polling socket for the segments in its lane that are not its own.
  bool DeliverData(chan::Channel& ch, RxLane& lane, const chan::RxSegment& seg);
  // The lane of a channel the dispatcher serves (null once it left); created by the dispatcher.
  // Takes lanes_mu_: DeliverInline, per delivery, asks InlineLane instead.
  std::shared_ptr<RxLane> Lane(const chan::Channel* ch) {
    std::lock_guard g(lanes_mu_);
    auto it = lanes_.find(ch);
    return it == lanes_.end() ? nullptr : it->second;
  }

 private:
  // Lane() for the thread delivering inline, without a lock shared with the other engines: a
  // per-thread memo of the lanes it served, looked up again when the remembered lane left (a
  // new channel may have the old one's address). The memo keeps a left lane's memory, never
  // its buffers (they went back when it left).
  RxLane* InlineLane(const chan::Channel* ch);
  std::mutex lanes_mu_;
  absl::flat_hash_map<const chan::Channel*, std::shared_ptr<RxLane>> lanes_;  // lanes_mu_

 private:
};

// A socket object for a connection (socket.cc).
absl::StatusOr<std::unique_ptr<VirtualSocket>> MakeSocket(StackImpl* st, std::shared_ptr<Conn> c,
                                                          const SocketOptions& o);

}  // namespace netch::vns
