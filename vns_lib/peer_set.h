// peer_set.h - the channels to each peer host (VNS-internal).
//
// A Peer holds every channel to one address that VNS still references: live ones (connecting or
// up) carry new segments; dead ones (failed or closed) stay until the dispatcher has drained
// what they delivered and every segment a socket took from them was released, because sockets
// hold raw pointers to the channel of each buffer they hold. Then the channel is removed.
//
// Threads: any thread reads (Live, ControlChannel, version); channels are added by connecting
// threads and the dispatcher, marked dead and removed by the dispatcher only.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "afxdp_channels/channel.h"

namespace netch::vns {

bool IsLive(chan::ChannelState s);

class Peer {
 public:
  // `set_version` is bumped with this peer's version: the dispatcher rescans only then;
  // `on_change` (the set's, may be empty) is called after.
  Peer(uint32_t ip, std::atomic<uint64_t>* set_version,
       const std::function<void()>* on_change = nullptr)
      : ip_(ip), set_version_(set_version), on_change_(on_change) {}
  uint32_t ip() const { return ip_; }

  // Channels that take new segments (connecting or up, not sealed for scale-down), in queue
  // order, then by id (Add says why).
  std::vector<std::shared_ptr<chan::Channel>> Live() const;
  // Every channel still referenced, dead ones included, in the same order.
  std::vector<std::shared_ptr<chan::Channel>> All() const;
  // The channel control segments (NCSYN, FIN, RST, window updates) go on: the first one up.
  std::shared_ptr<chan::Channel> ControlChannel() const;
  size_t live_count() const;
  // No channel takes new segments any more, as of the last change the dispatcher saw (a death
  // shows once it notes it, NoteDead): one load, for a socket's readiness check, which runs
  // for every socket of an event loop on each epoll_wait and must not take mu_, which engines
  // and the dispatcher share.
  bool gone() const { return live_hint_.load(std::memory_order_acquire) == 0; }
  // The live channels but the `keep` added first, newest first: what a scale-down drains.
  std::vector<std::shared_ptr<chan::Channel>> LiveBeyondOldest(size_t keep) const;

  void Add(std::shared_ptr<chan::Channel> c);
  // The dispatcher saw a channel die (`cause`: why it failed; kNone if it closed): senders
  // rebuild their lists without it.
  void NoteDead(chan::FailCause cause) {
    if (cause != chan::FailCause::kNone) last_failure_.store(cause, std::memory_order_relaxed);
    Bump();
  }
  // Why the last of its channels that failed did (kNone: none failed), for error messages.
  chan::FailCause last_failure() const { return last_failure_.load(std::memory_order_relaxed); }
  // A channel was sealed (scale-down): senders rebuild their lists without it.
  void NoteSealed() { Bump(); }
  void Remove(const chan::Channel* c);
  // Bumped whenever the set of live channels changes.
  uint64_t version() const { return version_.load(std::memory_order_acquire); }

  // One connecting thread at a time opens channels to the peer.
  // std::mutex, not absl::Mutex: Debian's Abseil is built without TSan, which then cannot see
  // absl::Mutex's happens-before edges and reports every guarded access as a race.
  std::mutex connect_mu;
  // Channels wanted to this peer, as last set by scaling (0: the stack's channels_per_peer).
  std::atomic<int> target{0};
  // Channels a non-blocking connect started opening (PeerSet::StartOpen) that are not up yet:
  // the dispatcher adds them once up (FinishOpens), or a blocking Ensure adopts them.
  std::vector<std::shared_ptr<chan::Channel>> opening;  // guarded by connect_mu
  uint64_t opening_deadline_us = 0;                     // guarded by connect_mu
  // Attempts to open channels here that failed, and the errno a connect() sees for the last: a
  // connection waiting for this peer's channels fails once the count passes what it saw.
  uint64_t open_failures() const { return open_failures_.load(std::memory_order_acquire); }
  int open_errno() const { return open_errno_.load(std::memory_order_relaxed); }
  void NoteOpenFailed(int err) {
    open_errno_.store(err, std::memory_order_relaxed);
    open_failures_.fetch_add(1, std::memory_order_release);
  }

 private:
  void Bump();
  size_t LiveCountLocked() const;
  const uint32_t ip_;
  std::atomic<uint64_t>* set_version_;
  const std::function<void()>* on_change_;
  std::atomic<uint64_t> version_{0};
  std::atomic<size_t> live_hint_{0};  // live_count() as of the last Bump
  std::atomic<chan::FailCause> last_failure_{chan::FailCause::kNone};
  std::atomic<uint64_t> open_failures_{0};
  std::atomic<int> open_errno_{0};
  mutable std::mutex mu_;
  std::vector<std::shared_ptr<chan::Channel>> chans_;  // guarded by mu_
  std::vector<uint64_t> added_;  // guarded by mu_: when chans_[i] was added (a count)
  uint64_t next_added_ = 0;      // guarded by mu_
};

class PeerSet {
 public:
  // `on_change` is called whenever a peer's channels change (from the thread that changed them):
  // the stack wakes its dispatcher, which watches only the channels it knew when it went to sleep
  // — a connect's new channels waited for its idle timeout (250 ms) before their first segment
  // was looked at.
  explicit PeerSet(chan::Driver* driver, std::function<void()> on_change = {})
      : driver_(driver), on_change_(std::move(on_change)) {}
  ~PeerSet();  // destroys every channel

  Peer* Get(uint32_t ip);  // created on first use; never freed before the set
  // Opens channels until `want` are live (the peer may have lost some: failed channels are not
  // counted), and waits for the new ones to come up. Fails with the errno a connect() would see.
  // `place` (optional) sets the queue and engine of the channel with the given index.
  absl::StatusOr<Peer*> Ensure(
      uint32_t ip, int want, absl::Duration timeout,
      const std::function<void(size_t index, chan::ChannelParams*)>& place = nullptr);
  // A non-blocking connect's first channels: starts opening `want` channels to `p` if it has
  // no live channel and nobody is opening any, and returns without waiting for them (an error
  // only if the driver cannot even start one). The connection then waits for the peer's
  // channels in the dispatcher (FinishOpens, Peer::open_failures).
  // `deadline_us`: when the opening gives up, the starting connection's own deadline — so the
  // opening has failed (open_failures) before that connection learns it timed out, and a
  // connect the program makes next starts afresh instead of joining the dying opening.
  // `failures_seen`: the peer's open_failures() once any finished opening is settled — a later
  // failure is one of the attempt the connection waits for.
  absl::Status StartOpen(Peer* p, int want, absl::Duration timeout, uint64_t deadline_us,
                         const std::function<void(size_t index, chan::ChannelParams*)>& place,
                         uint64_t* failures_seen);
  // The dispatcher's part of StartOpen, each round while any is pending: channels that came up
  // join their peer; a peer whose opening failed or outlived its timeout has them destroyed and
  // the failure noted. Never blocks (a peer whose connect_mu is held waits for the next round).
  // True while an opening is still pending.
  bool FinishOpens();
  bool opens_pending() const { return opening_peers_.load(std::memory_order_acquire) > 0; }
  void ForEach(const std::function<void(Peer&)>& fn);
  // Bumped whenever any peer's channels change.
  uint64_t version() const { return version_.load(std::memory_order_acquire); }

 private:
  // p.connect_mu held, p.opening not empty: channels that came up join the peer; failed ones,
  // or any still connecting past the deadline, are destroyed and the failure noted; either way
  // the opening ends. True while it is still in progress.
  bool SettleOpeningLocked(Peer& p);
  // Starts channels `from`..`to`-1 to `p` (handshakes under way) into `opened`; on an error
  // destroys all of `opened` and notes the failure on the peer.
  absl::Status Open(Peer* p, int from, int to, absl::Duration timeout,
                    const std::function<void(size_t index, chan::ChannelParams*)>& place,
                    std::vector<std::shared_ptr<chan::Channel>>* opened);
  chan::Driver* driver_;
  const std::function<void()> on_change_;
  std::atomic<uint64_t> version_{0};
  std::atomic<int> opening_peers_{0};  // peers with a non-empty `opening`
  std::mutex mu_;
  std::unordered_map<uint32_t, std::unique_ptr<Peer>> peers_;  // guarded by mu_
};

}  // namespace netch::vns
