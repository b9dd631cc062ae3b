// conn.h - one virtual connection's state, shared by the dispatcher (producer: it delivers
// segments and control events) and the socket (consumer: it reassembles and reads). Internal to
// vns_lib.
#pragma once

#include <sys/eventfd.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <vector>

#include "afxdp_channels/engine.h"
#include "common/spsc_chain.h"
#include "vns_lib/peer_set.h"
#include "vns_lib/reassembly.h"
#include "vns_lib/sock_error.h"
#include "vns_lib/vns.h"

namespace netch::vns {

inline uint64_t NowUs() { return chan::NowUs(); }

enum class ConnState : int { kConnecting, kEstablished, kRefused, kReset, kTimedOut, kUnreachable };
// How a connect ends when its peer's channel opening failed with `err` (PeerSet's errno).
inline ConnState ConnStateFor(int err) {
  if (err == ECONNREFUSED) return ConnState::kRefused;
  return err == EHOSTUNREACH ? ConnState::kUnreachable : ConnState::kTimedOut;
}
// The error a connection in state `s` reports (reset, refused, timed out, unreachable): one
// mapping for the blocking connect and every later socket call; OK while connecting or open.
absl::Status ConnStateError(ConnState s);

struct ConnKey {
  uint32_t peer;
  uint16_t local_port, remote_port;
  bool operator==(const ConnKey& o) const {
    return peer == o.peer && local_port == o.local_port && remote_port == o.remote_port;
  }
  template <typename H>
  friend H AbslHashValue(H h, const ConnKey& k) {
    return H::combine(std::move(h), k.peer, k.local_port, k.remote_port);
  }
};

class StackImpl;

struct Conn {
  Conn(const ConnKey& k, uint32_t id, AppClass c, size_t rcvbuf)
      : key(k), conn_id(id), app_class(c), rcvbuf(rcvbuf), inq(4096), adv_edge(rcvbuf) {
    efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    wefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  }
  ~Conn();

  // Readiness: `signaled` is set when something arrives and cleared when the socket has
  // consumed everything; the eventfd follows it while anyone may sleep on it (`waiters` > 0), at
  // one syscall per transition, not per segment.
  void Signal() { Raise(efd, signaled, efd_up); }
  void Unsignal() { Lower(efd, signaled, efd_up); }
  // Write readiness, the same way: wefd is readable while Send would not block. Set when the
  // connection is established, when the peer's window moves, on any error, and by the
  // dispatcher when a full channel gets room; cleared by a non-blocking Send that was cut short.
  void SignalWritable() { Raise(wefd, wsignaled, wefd_up); }
  void UnsignalWritable() { Lower(wefd, wsignaled, wefd_up); }
  // A thread may sleep on the eventfds from now until EndWait (VirtualSocket::BeginWait):
  // announced first, then the eventfds are brought up to date with the flags; a raise that comes
  // later sees the waiter (the seq_cst pair: our increment then flag load, a raiser's flag store
  // then `waiters` load). The caller looks at the flags before it sleeps.
  void BeginWait() {
    waiters.fetch_add(1, std::memory_order_seq_cst);
    Sync(efd, signaled, efd_up);
    Sync(wefd, wsignaled, wefd_up);
  }
  void EndWait() { waiters.fetch_sub(1, std::memory_order_relaxed); }

  const ConnKey key;
  uint64_t id = 0;  // control-plane id, unique per stack
  std::atomic<uint64_t> tx_bytes{0}, rx_bytes{0};
  std::mutex map_mu;                     // guards channel_ids: taken once per Send, not per segment
  std::vector<uint32_t> channel_ids;     // empty: all the peer's channels
  std::atomic<uint64_t> map_version{0};  // bumped by MapSocket
  const uint32_t conn_id;
  const AppClass app_class;
  const size_t rcvbuf;
  Peer* peer = nullptr;
  int efd = -1, wefd = -1;
  std::atomic<bool> signaled{false}, wsignaled{false};  // readiness (Poll() reads these)
  // Whether each eventfd's counter is non-zero (changed under sig_mu; up implies the flag set).
  std::atomic<bool> efd_up{false}, wefd_up{false};
  // Threads that may sleep on the eventfds. 1 for good on an eager socket (the default: anyone
  // may poll fd() at any time); a lazy one (SetLazyReadiness) counts announced waits only.
  std::atomic<int> waiters{1};
  uint64_t connect_deadline_us = 0;  // non-blocking connects: when the dispatcher gives up
  // A non-blocking connect waiting for its peer's first channels: the peer's open_failures()
  // when it started (a later failure is its own).
  uint64_t open_failures_seen = 0;
  std::atomic<ConnState> state{ConnState::kConnecting};
  std::atomic<uint64_t> fin_seq{UINT64_MAX};  // stream length announced by the peer's FIN
  std::atomic<bool> closed{false};
  // A channel that carried this connection's bytes failed: bytes may be lost, so the socket
  // reports ECONNRESET once what did arrive was read (set by the dispatcher).
  std::atomic<bool> broken{false};
  std::atomic<chan::FailCause> broken_cause{chan::FailCause::kNone};  // stored before `broken`
  // Send left a small write held open in a channel (coalescing): a Recv about to wait flushes.
  std::atomic<bool> corked{false};
  // Scheduler decisions for this socket: batches per channel id, in a small lock-free table
  // (senders claim a slot with a CAS; a socket that used more channels counts them in `other`).
  struct ChannelCount {
    std::atomic<uint32_t> id{0};  // channel id + 1; 0: free
    std::atomic<uint64_t> batches{0};
  };
  static constexpr size_t kCountSlots = 16;
  std::array<ChannelCount, kCountSlots> batches_by_channel;
  std::atomic<uint64_t> batches_other{0};
  void CountBatch(uint32_t channel_id) {
    const uint32_t key = channel_id + 1;
    for (size_t i = 0; i < kCountSlots; ++i) {
      ChannelCount& s = batches_by_channel[(channel_id + i) % kCountSlots];
      uint32_t cur = s.id.load(std::memory_order_relaxed);
      if (cur == 0 && s.id.compare_exchange_strong(cur, key)) cur = key;
      if (cur == key) {
        s.batches.fetch_add(1, std::memory_order_relaxed);
        return;
      }
    }
    batches_other.fetch_add(1, std::memory_order_relaxed);
  }
  std::vector<const chan::Channel*> tx_chans;  // guarded by map_mu: every channel sends used
  // Guarded by map_mu: the channels a non-blocking Send found full, by id. Write readiness comes
  // back when one of these has room (empty: any of the peer's channels) — not when a channel the
  // policy does not give this socket has room (isolate-classes' L-app channels for a bulk
  // socket): the writer would find the same channels full again, and spin.
  std::vector<uint32_t> full_ids;
  // In the stack's write watch: blocked on full channels (written under StackImpl::watch_mu_).
  std::atomic<bool> watched{false};
  // The producer side of inq and rx_chans: the dispatcher and the engines delivering inline
  // (StackImpl::DeliverData) may deliver to one socket from two channels at once. Uncontended
  // unless a socket's channels run on two cores.
  std::mutex rx_mu;
  std::vector<const chan::Channel*> rx_chans;  // rx_mu: channels that delivered

  // Dispatcher and engines -> socket (one producer at a time: rx_mu). Takes a receive buffer of
  // tiny segments (4096); its memory follows what it holds (~3 KB at rest, a burst's chunks
  // given back after it), not its worst case (common/spsc_chain.h).
  SpscChain<HeldSeg> inq;
  // The reader's progress, published after each read. No one needs its value any more (the
  // window check uses adv_edge below); its seq_cst store is the store half of the store/load
  // pairing with the dispatcher's holding_ flag (reader: consume from inq, store rcv_next, load
  // holding_; dispatcher: store holding_, retry inq), so a reader that frees room in inq
  // either sees holding_ set and wakes the dispatcher, or the dispatcher sees the room.
  std::atomic<uint64_t> rcv_next{0};

  // Per-socket flow control. The receiver advertises a right edge (stream offset it takes bytes
  // below: rcv_next + rcvbuf, in NCSYN/NCSYN_ACK and then NC_WND), so a slow reader stops its
  // own sender instead of filling channels that other sockets share. Data beyond the edge is a
  // protocol violation and resets the one socket.
  std::atomic<uint64_t> adv_edge{0};   // what we advertised (written by the reader, then sent)
  std::atomic<uint64_t> snd_limit{0};  // what the peer advertised (dispatcher)
  std::mutex wnd_mu;                   // with wnd_cv: a sender waits for the window to open
  std::condition_variable wnd_cv;
  std::atomic<int> wnd_waiters{0};
  // The window moved or the connection changed state: a blocked Send and a poller both look again.
  void WakeSender() {
    SignalWritable();
    if (wnd_waiters.load(std::memory_order_seq_cst) == 0) return;
    std::lock_guard g(wnd_mu);
    wnd_cv.notify_all();
  }

  // The peer's window update (NC_WND): edges only grow, so a stale (reordered) one changes
  // nothing; a waiting sender and a poller look again.
  void RaiseSendLimit(uint64_t edge) {
    uint64_t cur = snd_limit.load(std::memory_order_relaxed);
    while (edge > cur && !snd_limit.compare_exchange_weak(cur, edge)) {
    }
    // A socket blocked on full channels is not writable for a wider window: its watch says
    // when a channel has room (waking it on every window update had an event loop retry full
    // channels thousands of times a second, Redis MSET -P 16).
    if (!watched.load(std::memory_order_acquire)) {
      WakeSender();
    } else if (wnd_waiters.load(std::memory_order_seq_cst) != 0) {
      std::lock_guard g(wnd_mu);
      wnd_cv.notify_all();
    }
  }

  // Listening sockets: connections accepted by the dispatcher, waiting for Accept().
  bool listening = false;
  int backlog = 0;
  std::mutex accept_mu;
  std::deque<std::shared_ptr<Conn>> accept_q;

 private:
  // An eventfd readable exactly while `flag` is set and someone may be waiting: the flag
  // decides, the fd follows it. The flag and the eventfd's counter are two states, so a
  // transition changes both under sig_mu (unserialized, a Raise landing between a Lower's flag
  // store and its read() was swallowed: flag set, fd quiet, a poller asleep forever). The lock is
  // taken on transitions only, not per segment. The fences pair a raiser's "publish data, then
  // look at the flag" with a lowerer's "clear the flag, then look for data" (its caller
  // rechecks), and a raiser's "set the flag, then look for waiters" with BeginWait's "count the
  // waiter, then look at the flag", so one side of each pair sees the other.
  void Raise(int fd, std::atomic<bool>& flag, std::atomic<bool>& up) {
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (flag.load(std::memory_order_relaxed) &&
        (up.load(std::memory_order_relaxed) || waiters.load(std::memory_order_relaxed) == 0))
      return;
    std::lock_guard g(sig_mu);
    flag.store(true, std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (waiters.load(std::memory_order_relaxed) > 0 && !up.load(std::memory_order_relaxed)) {
      up.store(true, std::memory_order_relaxed);
      uint64_t one = 1;
      (void)!write(fd, &one, sizeof(one));
    }
  }
  void Lower(int fd, std::atomic<bool>& flag, std::atomic<bool>& up) {
    if (flag.load(std::memory_order_relaxed) || up.load(std::memory_order_relaxed)) {
      std::lock_guard g(sig_mu);
      flag.store(false, std::memory_order_relaxed);
      if (up.load(std::memory_order_relaxed)) {
        up.store(false, std::memory_order_relaxed);
        uint64_t v;
        (void)!read(fd, &v, sizeof(v));
      }
    }
    std::atomic_thread_fence(std::memory_order_seq_cst);
  }
  // A waiter arrived (its count is stored): an eventfd the flag left down goes up.
  void Sync(int fd, std::atomic<bool>& flag, std::atomic<bool>& up) {
    if (!flag.load(std::memory_order_seq_cst) || up.load(std::memory_order_relaxed)) return;
    std::lock_guard g(sig_mu);
    if (flag.load(std::memory_order_relaxed) && !up.load(std::memory_order_relaxed)) {
      up.store(true, std::memory_order_relaxed);
      uint64_t one = 1;
      (void)!write(fd, &one, sizeof(one));
    }
  }
  std::mutex sig_mu;
};

// Gives held segments back: private copies are freed, channel buffers released, one Release call
// per channel.
void ReleaseHeld(std::vector<HeldSeg>& segs);

}  // namespace netch::vns
