// stack.cc - the embedded NetChannel stack: peers and their channels, the dispatcher that
// demultiplexes segments to virtual sockets, and the sockets themselves.
#include <poll.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "afxdp_channels/engine.h"
#include "afxdp_channels/netdev.h"
#include "bpf/steer_program.h"
#include "common/errno_status.h"
#include "common/netns.h"
#include "common/random.h"
#include "common/spsc_ring.h"
#include "policies/net_scheduler.h"
#include "vns_lib/copy_workers.h"
#include "vns_lib/peer_set.h"
#include "vns_lib/reassembly.h"
#include "vns_lib/sock_error.h"
#include "vns_lib/vns.h"

namespace netch::vns {

constexpr char kErrnoUrl[] = "netch.errno";

absl::Status SockError(int err, std::string_view what) {
  absl::Status s = ErrnoStatus(err, std::string(what));
  s.SetPayload(kErrnoUrl, absl::Cord(std::to_string(err)));
  return s;
}

namespace {

uint64_t NowUs() { return chan::NowUs(); }

// ---- connection state shared by the dispatcher (producer) and the socket (consumer) ----------

enum class ConnState : int { kConnecting, kEstablished, kRefused, kReset, kTimedOut };

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
  }
  ~Conn();

  // Readiness: the eventfd is written when something arrives and cleared when the socket has
  // consumed everything; one syscall per transition, not per segment.
  void Signal() {
    if (!signaled.exchange(true, std::memory_order_acq_rel)) {
      uint64_t one = 1;
      (void)!write(efd, &one, sizeof(one));
    }
  }
  void Unsignal() {
    if (signaled.exchange(false, std::memory_order_acq_rel)) {
      uint64_t v;
      (void)!read(efd, &v, sizeof(v));
    }
  }

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
  int efd = -1;
  std::atomic<bool> signaled{false};
  std::atomic<ConnState> state{ConnState::kConnecting};
  std::atomic<uint64_t> fin_seq{UINT64_MAX};  // stream length announced by the peer's FIN
  std::atomic<bool> closed{false};
  // A channel that carried this connection's bytes failed: bytes may be lost, so the socket
  // reports ECONNRESET once what did arrive was read (set by the dispatcher).
  std::atomic<bool> broken{false};
  std::vector<const chan::Channel*> tx_chans;  // guarded by map_mu: every channel sends used
  std::vector<const chan::Channel*> rx_chans;  // dispatcher only: channels that delivered

  // Dispatcher -> socket.
  SpscRing<HeldSeg> inq;
  // The receive window in stream offsets: the dispatcher admits a segment only if it starts
  // below rcv_next + rcvbuf. Counting held bytes instead would deadlock: out-of-order segments
  // could fill the buffer while the one that fills the hole waits behind them on its channel.
  std::atomic<uint64_t> rcv_next{0};  // published by the application after each read

  // Per-socket flow control. The receiver advertises a right edge (stream offset it takes bytes
  // below: rcv_next + rcvbuf, in NCSYN/NCSYN_ACK and then NC_WND), so a slow reader stops its
  // own sender instead of filling channels that other sockets share. Data beyond the edge is a
  // protocol violation and resets the one socket.
  std::atomic<uint64_t> adv_edge{0};   // what we advertised (written by the reader, then sent)
  std::atomic<uint64_t> snd_limit{0};  // what the peer advertised (dispatcher)
  std::mutex wnd_mu;                   // with wnd_cv: a sender waits for the window to open
  std::condition_variable wnd_cv;
  std::atomic<int> wnd_waiters{0};
  void WakeSender() {
    if (wnd_waiters.load(std::memory_order_seq_cst) == 0) return;
    std::lock_guard g(wnd_mu);
    wnd_cv.notify_all();
  }

  // Listening sockets: connections accepted by the dispatcher, waiting for Accept().
  bool listening = false;
  int backlog = 0;
  std::mutex accept_mu;
  std::deque<std::shared_ptr<Conn>> accept_q;
};

void ReleaseHeld(std::vector<HeldSeg>& segs) {
  // Group per channel: one Release call (one lock) per channel.
  std::vector<chan::RxSegment> batch;
  std::erase_if(segs, [](const HeldSeg& h) {
    if (h.ch != nullptr) return false;
    delete[] h.data;
    return true;
  });
  while (!segs.empty()) {
    chan::Channel* ch = segs.front().ch;
    batch.clear();
    auto keep = std::remove_if(segs.begin(), segs.end(), [&](const HeldSeg& h) {
      if (h.ch != ch) return false;
      batch.push_back(h.rx);
      return true;
    });
    segs.erase(keep, segs.end());
    ch->Release(batch);
  }
}

Conn::~Conn() {
  std::vector<HeldSeg> left;
  for (HeldSeg h; inq.PopOne(&h);) left.push_back(h);
  ReleaseHeld(left);
  if (efd >= 0) close(efd);
}

// ---- the stack ---------------------------------------------------------------------------------

class SocketImpl;

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
  void NotifyConsumed() {
    if (holding_.load(std::memory_order_seq_cst)) WakeDispatcher();
  }

 private:
  void Dispatch();
  // A channel died: connections whose bytes it carried are broken (their peers are told with an
  // RST on a live channel). Dispatcher thread.
  void BreakConnsOn(Peer& p, const chan::Channel* ch);
  // Resets one connection (protocol violation): its socket reports ECONNRESET, the peer gets RST.
  void ResetConn(Conn& c, chan::Channel* ch);
  // Hands one segment to its socket. False: the socket is full, keep the segment and stop
  // draining this channel.
  bool Deliver(chan::Channel* ch, const chan::RxSegment& seg);
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
  std::deque<CtlMsg> ctl_backlog_;  // dispatcher thread only

  StackOptions opts_;
  std::unique_ptr<bpf::SteerProgram> steer_;
  std::string steer_netns_;
  std::unique_ptr<chan::Driver> driver_;
  CopyWorkers workers_;
  std::atomic<int> nworkers_{0};

  std::unique_ptr<PeerSet> peers_;
  mutable std::mutex mu_;  // conns_, listeners_: connection setup and teardown only
  absl::flat_hash_map<ConnKey, std::shared_ptr<Conn>> conns_;
  absl::flat_hash_map<uint16_t, std::shared_ptr<Conn>> listeners_;
  uint16_t next_port_ = 0;

  std::thread dispatcher_;
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

 private:
};

// ---- sockets
// -------------------------------------------------------------------------------------

class SocketImpl final : public VirtualSocket {
 public:
  SocketImpl(StackImpl* st, std::shared_ptr<Conn> c, const SocketOptions& o)
      : st_(st), c_(std::move(c)), nonblocking_(o.nonblocking), channels_hint_(o.channels) {}
  ~SocketImpl() override { (void)Close(); }

  absl::StatusOr<size_t> Send(std::span<const uint8_t> data) override;
  absl::StatusOr<size_t> Recv(std::span<uint8_t> buf) override;
  absl::StatusOr<std::unique_ptr<VirtualSocket>> Accept() override;
  absl::Status Shutdown() override;
  absl::Status Close() override;
  int fd() const override { return c_ ? c_->efd : -1; }
  void SetNonBlocking(bool nb) override { nonblocking_ = nb; }
  uint16_t local_port() const override { return c_ ? c_->key.local_port : 0; }
  uint16_t remote_port() const override { return c_ ? c_->key.remote_port : 0; }
  uint32_t remote_ipv4() const override { return c_ ? c_->key.peer : 0; }
  AppClass app_class() const override { return c_ ? c_->app_class : AppClass::kUnspecified; }

 private:
  // No live channel to the peer is left: the connection cannot make progress.
  bool PeerGone() const { return c_->peer && c_->peer->live_count() == 0; }
  static bool AllDown(const std::vector<std::shared_ptr<chan::Channel>>& chans) {
    if (chans.empty()) return false;
    for (const auto& ch : chans) {
      const auto s = ch->state();
      if (s != chan::ChannelState::kFailed && s != chan::ChannelState::kClosed) return false;
    }
    return true;
  }
  absl::Status Usable() const {
    if (!c_) return SockError(EBADF, "socket closed");
    if (c_->broken.load(std::memory_order_acquire))
      return SockError(ECONNRESET, "a channel carrying the connection failed");
    if (PeerGone()) return SockError(ECONNRESET, "every channel to the peer is down");
    return StateError();
  }
  // What the peer told us: reset, refused, or our own connect timeout.
  absl::Status StateError() const {
    switch (c_->state.load()) {
      case ConnState::kReset:
        return SockError(ECONNRESET, "connection reset by peer");
      case ConnState::kRefused:
        return SockError(ECONNREFUSED, "connection refused");
      case ConnState::kTimedOut:
        return SockError(ETIMEDOUT, "connection timed out");
      default:
        return absl::OkStatus();
    }
  }
  // Sends [off, off+len) of the stream (stream offset base + off) from data; blocks while the
  // channels are full unless non-blocking. Returns bytes taken.
  absl::StatusOr<size_t> SendRange(const uint8_t* data, size_t len, uint64_t seq, size_t rr);
  // Waits until one of the channels can take more, or the connection breaks.
  void WaitChannels(const std::vector<std::shared_ptr<chan::Channel>>& chans);
  void DrainInq();
  void UpdateReadiness();
  // Bytes the peer's receive window still takes; waits (blocking sockets) until it opens or the
  // connection fails. 0 with OK status: non-blocking and the window is closed.
  absl::StatusOr<size_t> SendWindow();
  absl::StatusOr<size_t> SendPart(std::span<const uint8_t> data);  // within the window
  // Tells the peer our window moved once a quarter of the buffer was read since the last time.
  void MaybeAdvertiseWindow();
  void RefreshChannels();  // send_mu_ held
  // A control segment of ours (FIN, WND) went on `ch`: if it fails, that segment may be lost,
  // so the connection breaks with it.
  void NoteControlChannel(const chan::Channel* ch) {
    std::lock_guard g(c_->map_mu);
    if (std::find(c_->tx_chans.begin(), c_->tx_chans.end(), ch) == c_->tx_chans.end())
      c_->tx_chans.push_back(ch);
  }

  StackImpl* st_;
  std::shared_ptr<Conn> c_;
  bool nonblocking_;
  int channels_hint_;
  uint64_t snd_next_ = 0;
  bool fin_sent_ = false;
  // The channels this socket sends on, rebuilt only when its peer gains a channel or the
  // operator remaps the socket (version counters), not on every Send.
  std::vector<std::shared_ptr<chan::Channel>> chans_;
  uint64_t peer_version_ = ~0ull, map_version_ = ~0ull;
  std::shared_ptr<const sched::NetScheduler> policy_;  // send_mu_; refreshed on a version move
  uint64_t policy_version_ = ~0ull;
  size_t rr_ = 0;
  Reassembler reasm_;
  std::vector<CopyPiece> pieces_;
  std::vector<HeldSeg> done_;
  std::mutex send_mu_, recv_mu_;  // one Send and one Recv at a time per socket

  friend class StackImpl;
};

absl::StatusOr<std::unique_ptr<VirtualSocket>> MakeSocket(StackImpl* st, std::shared_ptr<Conn> c,
                                                          const SocketOptions& o) {
  return std::unique_ptr<VirtualSocket>(new SocketImpl(st, std::move(c), o));
}

void SocketImpl::WaitChannels(const std::vector<std::shared_ptr<chan::Channel>>& chans) {
  std::vector<pollfd> fds;
  for (const auto& ch : chans) {
    ch->ArmNotify(chan::Channel::kWritable);
    fds.push_back({ch->notify_fd(chan::Channel::kWritable), POLLIN, 0});
  }
  // (Not the socket's own fd: it stays readable while unread data waits, which would turn this
  // into a busy loop. A reset is noticed by the caller after at most one timeout.)
  if (poll(fds.data(), fds.size(), 10) > 0) {
    for (size_t i = 0; i < fds.size(); ++i) {
      uint64_t v;
      if (fds[i].revents & POLLIN) (void)!read(fds[i].fd, &v, sizeof(v));
    }
  }
}

void SocketImpl::RefreshChannels() {
  const uint64_t pv = c_->peer->version(), mv = c_->map_version.load(std::memory_order_acquire);
  if (pv == peer_version_ && mv == map_version_ && !chans_.empty()) return;
  peer_version_ = pv;
  map_version_ = mv;
  chans_ = c_->peer->Live();
  std::lock_guard g(c_->map_mu);
  if (!c_->channel_ids.empty()) {
    std::erase_if(chans_, [&](const auto& ch) {
      return std::find(c_->channel_ids.begin(), c_->channel_ids.end(), ch->id()) ==
             c_->channel_ids.end();
    });
  }
  if (channels_hint_ > 0 && static_cast<size_t>(channels_hint_) < chans_.size())
    chans_.resize(channels_hint_);
  // Remembered for the dispatcher: if one of these fails, bytes this socket sent may be lost.
  for (const auto& ch : chans_)
    if (std::find(c_->tx_chans.begin(), c_->tx_chans.end(), ch.get()) == c_->tx_chans.end())
      c_->tx_chans.push_back(ch.get());
}

absl::StatusOr<size_t> SocketImpl::SendRange(const uint8_t* data, size_t len, uint64_t seq,
                                             size_t rr) {
  // chans_ and policy_ are refreshed by Send (under send_mu_) before any SendRange runs: copy
  // workers only read them.
  const auto& chans = chans_;
  if (chans.empty()) return SockError(ECONNRESET, "no channel to the peer");
  const sched::NetScheduler& policy = *policy_;
  const sched::SocketRef sref{c_->id, static_cast<uint8_t>(c_->app_class)};
  size_t seg = SIZE_MAX;
  for (const auto& ch : chans) seg = std::min(seg, ch->max_payload());
  constexpr size_t kBatch = 32, kMaxChans = 64;  // a socket spreads over at most 64 channels
  const size_t nch = std::min(chans.size(), kMaxChans);
  chan::TxSegment segs[kBatch];
  sched::ChannelLoad loads[kMaxChans];
  uint64_t cursor = rr;
  size_t off = 0;
  while (off < len) {
    for (size_t i = 0; i < nch; ++i)
      loads[i] = {chans[i]->id(), chans[i]->tx_queued_bytes(), false};
    bool progress = false;
    // The policy picks; a channel that refuses the batch (full) is excluded and it picks again.
    for (size_t k; !progress && (k = policy.PickChannel(sref, {loads, nch}, &cursor)) < nch;) {
      size_t n = 0;
      for (size_t o2 = off; n < kBatch && o2 < len; ++n) {
        const size_t l = std::min(seg, len - o2);
        segs[n].hdr = {NC_DATA,
                       static_cast<uint8_t>(c_->app_class),
                       c_->key.local_port,
                       c_->key.remote_port,
                       c_->conn_id,
                       seq + o2};
        segs[n].payload = {data + o2, l};
        o2 += l;
      }
      auto taken = chans[k]->Enqueue({segs, n});
      if (!taken.ok()) return taken.status();
      if (*taken == 0) {
        loads[k].full = true;
        continue;
      }
      st_->sched_batches_.fetch_add(1, std::memory_order_relaxed);
      for (size_t i = 0; i < *taken; ++i) off += segs[i].payload.size();
      progress = true;
    }
    if (off == len || progress) continue;
    if (auto st = StateError(); !st.ok()) return st;
    if (c_->broken.load(std::memory_order_acquire))
      return SockError(ECONNRESET, "a channel carrying the connection failed");
    if (AllDown(chans)) return SockError(ECONNRESET, "every channel to the peer failed");
    if (nonblocking_) break;
    WaitChannels(chans);
  }
  return off;
}

absl::StatusOr<size_t> SocketImpl::Send(std::span<const uint8_t> data) {
  std::lock_guard g(send_mu_);
  if (!c_) return SockError(EBADF, "socket closed");
  if (auto st = StateError(); !st.ok()) return st;
  if (c_->listening) return SockError(EINVAL, "send on a listening socket");
  if (fin_sent_) return SockError(EPIPE, "send after shutdown");
  if (data.data() == nullptr && !data.empty()) return SockError(EINVAL, "null buffer");
  if (data.empty()) return 0;
  // Wait out the handshake (data before our SYN_ACK would reach a socket that does not exist).
  while (c_->state.load() == ConnState::kConnecting) {
    if (nonblocking_) return SockError(EAGAIN, "still connecting");
    pollfd p{c_->efd, POLLIN, 0};
    poll(&p, 1, 10);
  }
  if (auto st = Usable(); !st.ok()) return st;
  size_t total = 0;
  while (total < data.size()) {
    auto window = SendWindow();
    if (!window.ok()) return total > 0 ? absl::StatusOr<size_t>(total) : window.status();
    if (*window == 0) {
      if (total > 0) break;
      return SockError(EAGAIN, "the peer's receive window is full");
    }
    auto part = data.subspan(total, std::min(*window, data.size() - total));
    auto sent = SendPart(part);
    if (!sent.ok()) return total > 0 && Errno(sent.status()) == EAGAIN ? total : sent;
    total += *sent;
    if (*sent < part.size()) break;  // non-blocking: the channels are full
  }
  return total;
}

absl::StatusOr<size_t> SocketImpl::SendWindow() {
  for (;;) {
    const uint64_t limit = c_->snd_limit.load(std::memory_order_acquire);
    if (limit > snd_next_) return static_cast<size_t>(limit - snd_next_);
    if (nonblocking_) return size_t{0};
    if (auto st = Usable(); !st.ok()) return st;
    std::unique_lock lk(c_->wnd_mu);
    c_->wnd_waiters.fetch_add(1, std::memory_order_seq_cst);
    // Checked again after registering: the dispatcher stores the limit, then looks for waiters.
    if (c_->snd_limit.load(std::memory_order_seq_cst) <= snd_next_)
      c_->wnd_cv.wait_for(lk, std::chrono::milliseconds(10));
    c_->wnd_waiters.fetch_sub(1, std::memory_order_relaxed);
  }
}

absl::StatusOr<size_t> SocketImpl::SendPart(std::span<const uint8_t> data) {
  if (c_->peer) RefreshChannels();
  if (const uint64_t v = st_->policy_version(); v != policy_version_ || !policy_) {
    policy_version_ = v;
    policy_ = st_->policy();
  }
  if (chans_.empty() || AllDown(chans_))
    return SockError(ECONNRESET, "every channel to the peer is down");
  const StackOptions& so = st_->opts();
  size_t sent = 0;
  if (!nonblocking_ && st_->copy_workers() > 0 && data.size() >= so.inline_copy_bytes) {
    // Chunks copied in parallel, each on the next channel; the receiver orders by offset.
    const auto chunks = SplitChunks(data.size(), so.chunk_bytes);
    std::vector<absl::Status> errs(chunks.size());
    const size_t rr = rr_;
    st_->workers().ParallelFor(chunks.size(), [&](size_t i) {
      auto r = SendRange(data.data() + chunks[i].first, chunks[i].second,
                         snd_next_ + chunks[i].first, rr + i);
      if (!r.ok()) errs[i] = r.status();
    });
    rr_ += chunks.size();
    for (const auto& e : errs)
      if (!e.ok()) return e;
    sent = data.size();
  } else {
    auto r = SendRange(data.data(), data.size(), snd_next_, rr_++);
    if (!r.ok()) return r.status();
    sent = *r;
    if (sent == 0) return SockError(EAGAIN, "send buffer full");
  }
  snd_next_ += sent;
  c_->tx_bytes.fetch_add(sent, std::memory_order_relaxed);
  return sent;
}

// The fd is readable exactly while Recv would not block: data in order, end of stream, or an
// error. Cleared first and set again if a delivery raced with the check.
void SocketImpl::UpdateReadiness() {
  auto readable = [&] {
    return reasm_.Readable() > 0 || !c_->inq.EmptyApprox() ||
           reasm_.next() == c_->fin_seq.load(std::memory_order_acquire) ||
           c_->state.load() != ConnState::kEstablished;
  };
  if (readable()) {
    c_->Signal();
    return;
  }
  c_->Unsignal();
  if (readable()) c_->Signal();
}

void SocketImpl::DrainInq() {
  HeldSeg h[64];
  for (uint32_t n; (n = c_->inq.Pop(h)) > 0;) {
    for (uint32_t i = 0; i < n; ++i) {
      if (!reasm_.Insert(h[i])) done_.push_back(h[i]);  // overlapping: drop it
    }
  }
  if (!done_.empty()) ReleaseHeld(done_);
}

absl::StatusOr<size_t> SocketImpl::Recv(std::span<uint8_t> buf) {
  std::lock_guard g(recv_mu_);
  if (!c_) return SockError(EBADF, "socket closed");
  if (c_->listening) return SockError(EINVAL, "recv on a listening socket");
  if (buf.data() == nullptr) return SockError(EINVAL, "null buffer");
  if (buf.empty()) return 0;
  for (;;) {
    DrainInq();
    size_t readable = reasm_.Readable();
    if (readable > 0) {
      pieces_.clear();
      const size_t n = reasm_.Take(std::min(buf.size(), readable), &pieces_, &done_);
      const StackOptions& so = st_->opts();
      if (st_->copy_workers() > 0 && n >= so.inline_copy_bytes) {
        // Split the pieces into chunks of about chunk_bytes and copy them in parallel.
        std::vector<std::pair<size_t, size_t>> ranges;  // [first piece, last piece)
        size_t start = 0, acc = 0;
        for (size_t i = 0; i < pieces_.size(); ++i) {
          acc += pieces_[i].len;
          if (acc >= so.chunk_bytes || i + 1 == pieces_.size()) {
            ranges.emplace_back(start, i + 1);
            start = i + 1;
            acc = 0;
          }
        }
        st_->workers().ParallelFor(ranges.size(), [&](size_t r) {
          for (size_t i = ranges[r].first; i < ranges[r].second; ++i)
            std::memcpy(buf.data() + pieces_[i].dst_off, pieces_[i].src, pieces_[i].len);
        });
      } else {
        for (const CopyPiece& p : pieces_) std::memcpy(buf.data() + p.dst_off, p.src, p.len);
      }
      if (!done_.empty()) ReleaseHeld(done_);
      c_->rcv_next.store(reasm_.next(), std::memory_order_seq_cst);
      c_->rx_bytes.fetch_add(n, std::memory_order_relaxed);
      MaybeAdvertiseWindow();
      st_->NotifyConsumed();  // the dispatcher may be holding a channel for us
      UpdateReadiness();
      return n;
    }
    // A reset wins over an end of stream seen before it, as in TCP; an orderly end of stream
    // wins over the peer's channels going away afterwards.
    if (auto st = StateError(); !st.ok()) return st;
    if (reasm_.next() == c_->fin_seq.load(std::memory_order_acquire)) return 0;  // end of stream
    if (auto st = Usable(); !st.ok()) return st;
    MaybeAdvertiseWindow();  // an update the channel could not take last time
    if (nonblocking_) {
      UpdateReadiness();
      return SockError(EAGAIN, "no data");
    }
    // Adaptive: spin briefly for the next delivery (a reply usually follows within tens of
    // microseconds), then sleep on the socket's fd.
    const uint64_t spin_end = NowUs() + st_->opts().recv_spin_us;
    while (c_->inq.EmptyApprox() && NowUs() < spin_end) std::this_thread::yield();
    if (!c_->inq.EmptyApprox()) continue;
    pollfd p{c_->efd, POLLIN, 0};
    c_->Unsignal();
    if (c_->inq.EmptyApprox() && c_->fin_seq.load() != reasm_.next() &&
        c_->state.load() == ConnState::kEstablished)
      poll(&p, 1, 10);
  }
}

void SocketImpl::MaybeAdvertiseWindow() {
  const uint64_t edge = reasm_.next() + c_->rcvbuf;
  if (edge - c_->adv_edge.load(std::memory_order_relaxed) < c_->rcvbuf / 4) return;
  auto ctl = c_->peer ? c_->peer->ControlChannel() : nullptr;
  if (!ctl) return;
  // Stored before it is sent: data the peer sends on the strength of it is checked against it.
  NoteControlChannel(ctl.get());
  const uint64_t old = c_->adv_edge.exchange(edge, std::memory_order_seq_cst);
  if (!st_->SendControlWait(*ctl, *c_, NC_WND, edge, absl::Milliseconds(50)).ok()) {
    c_->adv_edge.store(old, std::memory_order_seq_cst);  // not sent: retried on the next read
    return;
  }
  st_->window_updates_.fetch_add(1, std::memory_order_relaxed);
}

absl::StatusOr<std::unique_ptr<VirtualSocket>> SocketImpl::Accept() {
  if (!c_) return SockError(EBADF, "socket closed");
  if (!c_->listening) return SockError(EINVAL, "accept on a socket that does not listen");
  for (;;) {
    std::shared_ptr<Conn> nc;
    {
      std::lock_guard g(c_->accept_mu);
      if (!c_->accept_q.empty()) {
        nc = c_->accept_q.front();
        c_->accept_q.pop_front();
      }
      if (c_->accept_q.empty()) c_->Unsignal();
    }
    if (nc) {
      SocketOptions o;
      o.nonblocking = false;
      return MakeSocket(st_, std::move(nc), o);
    }
    if (nonblocking_) return SockError(EAGAIN, "no pending connection");
    pollfd p{c_->efd, POLLIN, 0};
    poll(&p, 1, 10);
  }
}

absl::Status SocketImpl::Shutdown() {
  std::lock_guard g(send_mu_);
  if (!c_) return SockError(EBADF, "socket closed");
  if (c_->listening) return SockError(EINVAL, "shutdown on a listening socket");
  if (fin_sent_) return absl::OkStatus();
  if (c_->state.load() != ConnState::kEstablished) return Usable();
  auto ctl = c_->peer->ControlChannel();
  if (!ctl) return SockError(ECONNRESET, "no channel to the peer");
  // FIN carries the stream length: the peer reports end of stream once every byte before it
  // arrived, whichever channels they took.
  NoteControlChannel(ctl.get());
  if (auto st = st_->SendControlWait(*ctl, *c_, NC_FIN, snd_next_); !st.ok()) return st;
  fin_sent_ = true;
  return absl::OkStatus();
}

absl::Status SocketImpl::Close() {
  if (!c_) return SockError(EBADF, "socket already closed");
  if (c_->listening) {
    st_->UnregisterListener(c_->key.local_port);
  } else {
    if (c_->state.load() == ConnState::kEstablished) (void)Shutdown();
    st_->Unregister(c_);
    std::lock_guard g(recv_mu_);
    DrainInq();
    reasm_.ForEachHeld([&](const HeldSeg& h) { done_.push_back(h); });
    if (!done_.empty()) ReleaseHeld(done_);
  }
  c_->closed = true;
  c_.reset();
  return absl::OkStatus();
}

// ---- stack
// ---------------------------------------------------------------------------------------

absl::Status StackImpl::Init() {
  auto policy = sched::CreatePolicy(opts_.policy, opts_.policy_knobs);
  if (!policy.ok()) return policy.status();
  policy_ = std::move(*policy);
  chan::DriverOptions dopts = opts_.driver_opts;
  if (opts_.driver == "afxdp" && dopts.steer == nullptr) {
    // The stack owns its steering program until the controller (ctl/) takes it over.
    std::unique_ptr<NetnsScope> ns;
    if (!dopts.netns.empty()) {
      ns = std::make_unique<NetnsScope>(dopts.netns);
      if (!ns->ok()) return ns->status();
    }
    auto ifi = afxdp::GetInterfaceInfo(dopts.ifname);
    if (!ifi.ok()) return ifi.status();
    auto steer = bpf::SteerProgram::Load(dopts.udp_port);
    if (!steer.ok()) return steer.status();
    if (auto st = (*steer)->Attach(ifi->ifindex, bpf::AttachMode::kNative, opts_.replace_xdp);
        !st.ok())
      return st;
    steer_ = std::move(*steer);
    steer_netns_ = dopts.netns;
    dopts.steer = steer_.get();
  }
  auto d = chan::CreateDriver(opts_.driver, dopts);
  if (!d.ok()) return d.status();
  driver_ = std::move(*d);
  peers_ = std::make_unique<PeerSet>(driver_.get());
  if (opts_.channels_per_peer < 1 || opts_.channels_per_peer > 64)
    return absl::InvalidArgumentError("channels_per_peer must be 1..64");
  if (auto st = SetCopyWorkers(opts_.copy_workers); !st.ok()) return st;
  wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  next_port_ = static_cast<uint16_t>(40000 + netch::RandomU32() % 20000);
  dispatcher_ = std::thread([this] {
    pthread_setname_np(pthread_self(), "netch-disp");
    Dispatch();
  });
  return absl::OkStatus();
}

StackImpl::~StackImpl() {
  stop_ = true;
  if (dispatcher_.joinable()) {
    WakeDispatcher();
    dispatcher_.join();
  }
  {
    std::lock_guard g(mu_);
    conns_.clear();  // releases what they still hold while the channels exist
    listeners_.clear();
  }
  workers_.Resize(0);
  peers_.reset();  // destroys the channels while the driver exists
  driver_.reset();
  if (steer_) {
    std::unique_ptr<NetnsScope> ns;
    if (!steer_netns_.empty()) ns = std::make_unique<NetnsScope>(steer_netns_);
    (void)steer_->Detach();
  }
  if (wake_fd_ >= 0) close(wake_fd_);
}

absl::Status StackImpl::SetCopyWorkers(int n) {
  if (n < 0 || n > 64) return absl::InvalidArgumentError("copy workers must be 0..64");
  workers_.Resize(n);
  nworkers_ = n;
  return absl::OkStatus();
}

StackStats StackImpl::Stats() const {
  StackStats s;
  s.segments_in = segments_in_.load();
  s.segments_out_ctl = ctl_out_.load();
  s.rst_sent = rst_sent_.load();
  s.dispatcher_blocked = blocked_.load();
  s.copy_chunks = const_cast<CopyWorkers&>(workers_).chunks_run();
  s.copy_busy_ns = const_cast<CopyWorkers&>(workers_).busy_ns();
  s.sched_batches = sched_batches_.load();
  s.sched_skips = retired_skips_.load() + policy()->skips();
  s.rx_bad_conn = rx_bad_conn_.load();
  s.conns_broken = conns_broken_.load();
  s.rx_beyond_window = rx_beyond_window_.load();
  s.rx_pressure_copies = rx_pressure_copies_.load();
  s.window_updates = window_updates_.load();
  return s;
}

std::vector<SocketInfo> StackImpl::Sockets() const {
  std::vector<SocketInfo> out;
  auto info = [](const Conn& c) {
    SocketInfo si;
    si.id = c.id;
    si.listening = c.listening;
    si.local_port = c.key.local_port;
    si.remote_port = c.key.remote_port;
    si.remote_ipv4 = c.key.peer;
    si.app_class = c.app_class;
    si.tx_bytes = c.tx_bytes.load(std::memory_order_relaxed);
    si.rx_bytes = c.rx_bytes.load(std::memory_order_relaxed);
    std::lock_guard g(const_cast<Conn&>(c).map_mu);
    si.channels = c.channel_ids;
    return si;
  };
  std::lock_guard g(mu_);
  for (const auto& [k, c] : listeners_) out.push_back(info(*c));
  for (const auto& [k, c] : conns_) out.push_back(info(*c));
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.id < b.id; });
  return out;
}

absl::Status StackImpl::MapSocket(uint64_t id, const std::vector<uint32_t>& ids) {
  std::shared_ptr<Conn> c;
  {
    std::lock_guard g(mu_);
    for (const auto& [k, v] : conns_)
      if (v->id == id) c = v;
  }
  if (!c) return absl::NotFoundError(absl::StrFormat("no connected socket %u", id));
  const auto chans = c->peer->Live();
  for (uint32_t want : ids) {
    bool found = false;
    for (const auto& ch : chans) found |= ch->id() == want;
    if (!found)
      return absl::InvalidArgumentError(
          absl::StrFormat("channel %u does not lead to the socket's peer", want));
  }
  {
    std::lock_guard g(c->map_mu);
    c->channel_ids = ids;
  }
  c->map_version.fetch_add(1, std::memory_order_release);
  return absl::OkStatus();
}

PolicyInfo StackImpl::Policy() const {
  auto p = policy();
  return {std::string(p->name()), p->GetKnobs()};
}

absl::Status StackImpl::SetPolicy(const std::string& name,
                                  const std::vector<std::pair<std::string, std::string>>& knobs) {
  // A fresh policy object, built and validated before the swap: a bad knob changes nothing.
  // Setting the active policy again keeps its other knobs.
  auto cur = policy();
  sched::Knobs all = cur->name() == name ? cur->GetKnobs() : sched::Knobs{};
  all.insert(all.end(), knobs.begin(), knobs.end());
  auto p = sched::CreatePolicy(name, all);
  if (!p.ok()) return p.status();
  {
    std::lock_guard g(policy_mu_);
    retired_skips_.fetch_add(policy_->skips(), std::memory_order_relaxed);
    policy_ = std::move(*p);
  }
  policy_version_.fetch_add(1, std::memory_order_release);
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<VirtualSocket>> StackImpl::Listen(uint16_t port, int backlog,
                                                                 const SocketOptions& o) {
  if (port == 0) return SockError(EINVAL, "listen on port 0");
  if (backlog < 1) return SockError(EINVAL, "backlog must be at least 1");
  auto c = std::make_shared<Conn>(ConnKey{0, port, 0}, 0, o.app_class, o.rcvbuf);
  c->listening = true;
  c->id = NextId();
  c->backlog = backlog;
  c->state = ConnState::kEstablished;
  {
    std::lock_guard g(mu_);
    if (listeners_.contains(port)) return SockError(EADDRINUSE, "port already listening");
    listeners_[port] = c;
  }
  return MakeSocket(this, c, o);
}

absl::StatusOr<std::unique_ptr<VirtualSocket>> StackImpl::Connect(uint32_t ip, uint16_t port,
                                                                  const SocketOptions& o) {
  if (port == 0 || ip == 0) return SockError(EINVAL, "connect to address 0 or port 0");
  if (o.rcvbuf < 4096) return SockError(EINVAL, "rcvbuf below 4096 bytes");
  auto peer = peers_->Ensure(ip, opts_.channels_per_peer, o.connect_timeout);
  if (!peer.ok()) return peer.status();
  std::shared_ptr<Conn> c;
  {
    std::lock_guard g(mu_);
    for (int tries = 0; tries < 20000 && !c; ++tries) {
      const uint16_t lp = next_port_;
      next_port_ = next_port_ >= 60999 ? 40000 : next_port_ + 1;
      ConnKey k{ip, lp, port};
      if (conns_.contains(k)) continue;
      c = std::make_shared<Conn>(k, netch::RandomU32() | 1, o.app_class, o.rcvbuf);
      c->id = NextId();
      c->peer = *peer;
      conns_[k] = c;
    }
  }
  if (!c) return SockError(EADDRNOTAVAIL, "no free local port");
  auto ctl = (*peer)->ControlChannel();
  auto st = ctl ? SendControlWait(*ctl, *c, NC_SYN, c->rcvbuf, o.connect_timeout)
                : SockError(ECONNRESET, "no channel to the peer");
  if (!st.ok()) {
    Unregister(c);
    return st;
  }
  const uint64_t end =
      NowUs() + static_cast<uint64_t>(absl::ToInt64Microseconds(o.connect_timeout));
  while (c->state.load() == ConnState::kConnecting && NowUs() < end) {
    pollfd p{c->efd, POLLIN, 0};
    poll(&p, 1, 5);
  }
  switch (c->state.load()) {
    case ConnState::kEstablished:
      c->Unsignal();
      return MakeSocket(this, c, o);
    case ConnState::kConnecting:
      c->state = ConnState::kTimedOut;
      Unregister(c);
      return SockError(ETIMEDOUT, "connect");
    case ConnState::kRefused:
      Unregister(c);
      return SockError(ECONNREFUSED, "connect");
    default:
      Unregister(c);
      return SockError(ECONNRESET, "connect");
  }
}

void StackImpl::Unregister(const std::shared_ptr<Conn>& c) {
  std::lock_guard g(mu_);
  auto it = conns_.find(c->key);
  if (it != conns_.end() && it->second == c) conns_.erase(it);
}

void StackImpl::UnregisterListener(uint16_t port) {
  std::shared_ptr<Conn> l;
  {
    std::lock_guard g(mu_);
    auto it = listeners_.find(port);
    if (it == listeners_.end()) return;
    l = it->second;
    listeners_.erase(it);
  }
  // Connections nobody accepted: reset them.
  std::lock_guard g(l->accept_mu);
  for (auto& c : l->accept_q) {
    if (auto ctl = c->peer->ControlChannel()) (void)SendControlWait(*ctl, *c, NC_RST, 0);
    Unregister(c);
  }
  l->accept_q.clear();
}

absl::Status StackImpl::SendControl(chan::Channel& ch, const ConnKey& k, uint32_t conn_id,
                                    AppClass cls, uint8_t type, uint64_t seq) {
  chan::TxSegment s;
  s.hdr = {type, static_cast<uint8_t>(cls), k.local_port, k.remote_port, conn_id, seq};
  auto n = ch.Enqueue({&s, 1});
  if (!n.ok()) return n.status();
  if (*n == 0) {
    const auto st = ch.state();
    if (st == chan::ChannelState::kFailed || st == chan::ChannelState::kClosed)
      return SockError(ECONNRESET, "channel to the peer is down");
    return SockError(EAGAIN, "channel full");
  }
  ctl_out_.fetch_add(1, std::memory_order_relaxed);
  return absl::OkStatus();
}

absl::Status StackImpl::SendControlWait(chan::Channel& ch, const Conn& c, uint8_t type,
                                        uint64_t seq, absl::Duration timeout) {
  const uint64_t end = NowUs() + static_cast<uint64_t>(absl::ToInt64Microseconds(timeout));
  for (;;) {
    auto st = SendControl(ch, c, type, seq);
    if (Errno(st) != EAGAIN || NowUs() >= end) return st;
    ch.Wait(absl::Milliseconds(1), chan::Channel::kWritable);
  }
}

void StackImpl::QueueControl(chan::Channel* ch, const ConnKey& k, uint32_t conn_id, AppClass cls,
                             uint8_t type, uint64_t seq) {
  auto st = SendControl(*ch, k, conn_id, cls, type, seq);
  if (Errno(st) == EAGAIN && ctl_backlog_.size() < 4096) {
    ctl_backlog_.push_back({ch, k, conn_id, cls, type, seq});
  } else if (st.ok() && type == NC_RST) {
    rst_sent_.fetch_add(1, std::memory_order_relaxed);
  }
}

std::shared_ptr<Conn> StackImpl::Lookup(const ConnKey& k) {
  std::lock_guard g(mu_);
  auto it = conns_.find(k);
  return it == conns_.end() ? nullptr : it->second;
}

void StackImpl::Rst(chan::Channel* ch, const wire::SegHeader& h) {
  QueueControl(ch, ConnKey{ch->peer_ipv4(), h.dst_port, h.src_port}, h.conn_id,
               AppClass::kUnspecified, NC_RST);
}

bool StackImpl::Deliver(chan::Channel* ch, const chan::RxSegment& seg) {
  const wire::SegHeader& h = seg.hdr;
  const ConnKey key{ch->peer_ipv4(), h.dst_port, h.src_port};
  auto release = [&] { ch->Release({&seg, 1}); };
  switch (h.type) {
    case NC_SYN: {
      std::shared_ptr<Conn> l;
      {
        std::lock_guard g(mu_);
        if (auto it = listeners_.find(h.dst_port); it != listeners_.end()) l = it->second;
        if (l && conns_.contains(key)) {  // a duplicate: the channel is reliable, ignore it
          release();
          return true;
        }
      }
      if (!l) {
        Rst(ch, h);  // nobody listens: refused, at once
        release();
        return true;
      }
      // The backlog admits the connection before anything is allocated for it: a flood of
      // NCSYNs costs the listener nothing beyond its backlog.
      std::shared_ptr<Conn> c;
      {
        std::lock_guard g(l->accept_mu);
        if (static_cast<int>(l->accept_q.size()) >= l->backlog) {
          Rst(ch, h);
          release();
          return true;
        }
        c = std::make_shared<Conn>(key, h.conn_id, static_cast<AppClass>(h.app_class), l->rcvbuf);
        c->peer = peers_->Get(key.peer);
        c->id = NextId();
        c->state = ConnState::kEstablished;
        c->snd_limit.store(h.seq, std::memory_order_release);
        c->rx_chans.push_back(ch);
        std::lock_guard g2(mu_);
        conns_[key] = c;
        l->accept_q.push_back(c);
      }
      QueueControl(ch, c->key, c->conn_id, c->app_class, NC_SYN_ACK, c->rcvbuf);
      l->Signal();
      release();
      return true;
    }
    case NC_SYN_ACK:
    case NC_FIN:
    case NC_RST:
    case NC_WND:
    case NC_DATA:
      break;
    default:
      release();
      return true;
  }
  auto c = Lookup(key);
  if (!c) {
    if (h.type != NC_RST) Rst(ch, h);
    release();
    return true;
  }
  if (c->conn_id != h.conn_id) {
    // A live port pair with another connection's id: stale, or forged to inject into this
    // socket. Dropped and counted; no RST, so a forger cannot make us reset anything either.
    rx_bad_conn_.fetch_add(1, std::memory_order_relaxed);
    release();
    return true;
  }
  if (std::find(c->rx_chans.begin(), c->rx_chans.end(), ch) == c->rx_chans.end())
    c->rx_chans.push_back(ch);
  switch (h.type) {
    case NC_SYN_ACK: {
      c->snd_limit.store(h.seq, std::memory_order_release);
      ConnState want = ConnState::kConnecting;
      c->state.compare_exchange_strong(want, ConnState::kEstablished);
      c->Signal();
      release();
      return true;
    }
    case NC_FIN:
      c->fin_seq.store(h.seq, std::memory_order_release);
      c->Signal();
      release();
      return true;
    case NC_RST:
      c->state =
          c->state.load() == ConnState::kConnecting ? ConnState::kRefused : ConnState::kReset;
      c->Signal();
      c->WakeSender();
      release();
      return true;
    case NC_WND: {
      // Edges only grow; a stale (reordered) update changes nothing.
      uint64_t cur = c->snd_limit.load(std::memory_order_relaxed);
      while (h.seq > cur && !c->snd_limit.compare_exchange_weak(cur, h.seq)) {
      }
      c->WakeSender();
      release();
      return true;
    }
    default:
      break;
  }
  if (c->closed.load() || seg.payload.empty() || c->state.load() == ConnState::kReset) {
    release();
    return true;
  }
  // Beyond the window this socket advertised: the sender broke the protocol. Only this socket
  // pays (reset, RST to the peer); the shared channel keeps draining.
  if (h.seq + seg.payload.size() > c->adv_edge.load(std::memory_order_acquire)) {
    rx_beyond_window_.fetch_add(1, std::memory_order_relaxed);
    ResetConn(*c, ch);
    release();
    return true;
  }
  HeldSeg hs;
  hs.seq = h.seq;
  hs.data = seg.payload.data();
  hs.len = static_cast<uint32_t>(seg.payload.size());
  hs.ch = ch;
  hs.rx = seg;
  if (c->inq.Room() == 0) return false;
  if (ch->rx_under_pressure()) {
    // Sockets hold more than half of this channel's buffers (a slow or departed reader): keep a
    // private copy and give the buffer back, so the channel keeps flowing for every socket on
    // it. Off the fast path: a reader that keeps up never gets here.
    auto* copy = new uint8_t[hs.len];
    std::memcpy(copy, hs.data, hs.len);
    hs.data = copy;
    hs.ch = nullptr;
    ch->Release({&seg, 1});
    rx_pressure_copies_.fetch_add(1, std::memory_order_relaxed);
  }
  c->inq.PushOne(hs);
  c->Signal();
  return true;
}

void StackImpl::ResetConn(Conn& c, chan::Channel* ch) {
  c.state = ConnState::kReset;
  c.Signal();
  c.WakeSender();
  QueueControl(ch, c.key, c.conn_id, c.app_class, NC_RST);
}

void StackImpl::BreakConnsOn(Peer& p, const chan::Channel* ch) {
  std::vector<std::shared_ptr<Conn>> hit;
  {
    std::lock_guard g(mu_);
    for (const auto& [k, c] : conns_) {
      if (c->peer != &p || c->broken.load(std::memory_order_relaxed)) continue;
      bool used = std::find(c->rx_chans.begin(), c->rx_chans.end(), ch) != c->rx_chans.end();
      if (!used) {
        std::lock_guard m(c->map_mu);
        used = std::find(c->tx_chans.begin(), c->tx_chans.end(), ch) != c->tx_chans.end();
      }
      if (used) hit.push_back(c);
    }
  }
  auto ctl = p.ControlChannel();
  for (const auto& c : hit) {
    c->broken.store(true, std::memory_order_release);
    conns_broken_.fetch_add(1, std::memory_order_relaxed);
    c->Signal();
    c->WakeSender();
    // The other end may not have seen this channel fail (or may wait on a hole it left).
    if (ctl) QueueControl(ctl.get(), c->key, c->conn_id, c->app_class, NC_RST);
  }
}

void StackImpl::Dispatch() {
  struct ChanState {
    std::shared_ptr<chan::Channel> ch;
    Peer* peer;
    bool dead = false;                    // seen failed or closed
    std::deque<chan::RxSegment> pending;  // dequeued, not yet taken by a full socket
  };
  std::vector<ChanState> chans;
  chan::RxSegment segs[64];
  uint64_t idle_since = NowUs();
  uint64_t known = ~0ull;  // peers_->version() last scanned
  while (!stop_.load(std::memory_order_relaxed)) {
    bool worked = false;
    // Control segments refused by a full channel, in order. A dead channel takes none: the
    // segment is dropped (its connection is broken or gone anyway).
    while (!ctl_backlog_.empty()) {
      const CtlMsg& m = ctl_backlog_.front();
      auto st = SendControl(*m.ch, m.key, m.conn_id, m.cls, m.type, m.seq);
      if (Errno(st) == EAGAIN) break;
      ctl_backlog_.pop_front();
      worked = true;
    }
    // Channels peers opened to us.
    while (auto ch = driver_->Accept()) {
      peers_->Get(ch->peer_ipv4())->Add(ch);
      worked = true;
    }
    // Pick up channels added by Connect/Accept.
    if (const uint64_t v = peers_->version(); v != known) {
      known = v;
      peers_->ForEach([&](Peer& p) {
        for (auto& ch : p.All()) {
          bool have = false;
          for (auto& cs : chans) have |= cs.ch == ch;
          if (!have) chans.push_back({ch, &p, false, {}});
        }
      });
    }
    for (ChanState& cs : chans) {
      // First what a full socket held back, in order.
      while (!cs.pending.empty() && Deliver(cs.ch.get(), cs.pending.front())) {
        cs.pending.pop_front();
        worked = true;
      }
      if (!cs.pending.empty()) continue;  // still blocked: leave the channel's window to close
      if (!cs.dead && !IsLive(cs.ch->state())) {
        // Drain what it delivered before it died first (next rounds), then break whatever it
        // left incomplete.
        cs.dead = true;
        cs.peer->NoteDead();
        if (cs.ch->state() == chan::ChannelState::kFailed) BreakConnsOn(*cs.peer, cs.ch.get());
        worked = true;
      }
      const size_t n = cs.ch->Dequeue(SIZE_MAX, segs);
      if (n == 0) continue;
      worked = true;
      segments_in_.fetch_add(n, std::memory_order_relaxed);
      for (size_t i = 0; i < n; ++i) {
        if (!cs.pending.empty() || !Deliver(cs.ch.get(), segs[i])) {
          if (cs.pending.empty()) blocked_.fetch_add(1, std::memory_order_relaxed);
          cs.pending.push_back(segs[i]);
        }
      }
    }
    // A dead channel leaves once drained and once no socket holds a buffer of it (sockets keep
    // raw pointers to the channel of each segment they hold).
    std::erase_if(chans, [&](ChanState& cs) {
      if (!cs.dead || !cs.pending.empty() || cs.ch->stats().rx_queued_bytes != 0) return false;
      std::erase_if(ctl_backlog_, [&](const CtlMsg& m) { return m.ch == cs.ch.get(); });
      const uint64_t before = peers_->version();
      cs.peer->Remove(cs.ch.get());
      // Our own removal needs no rescan; a channel added meanwhile does (it bumped too).
      if (before == known) known = before + 1;
      (void)driver_->Destroy(*cs.ch);
      return true;
    });
    bool any_pending = false;
    for (const ChanState& cs : chans) any_pending |= !cs.pending.empty();
    // Announce the hold, then look again: a socket that read just before seeing holding_ set
    // did not wake us, so its new window must be noticed here (the same pairing as the engines'
    // sleeping flag; the reader stores rcv_next, then loads holding_).
    holding_.store(any_pending, std::memory_order_seq_cst);
    if (any_pending && !worked) {
      for (ChanState& cs : chans) {
        while (!cs.pending.empty() && Deliver(cs.ch.get(), cs.pending.front())) {
          cs.pending.pop_front();
          worked = true;
        }
      }
    }
    const uint64_t now = NowUs();
    if (worked) {
      idle_since = now;
      continue;
    }
    if (now - idle_since < opts_.dispatcher_spin_us) {
      std::this_thread::yield();
      continue;
    }
    // Sleep until a channel has data, a socket read (unblocking a channel), or a new channel.
    std::vector<pollfd> fds;
    fds.push_back({wake_fd_, POLLIN, 0});
    fds.push_back({driver_->accept_fd(), POLLIN, 0});
    for (ChanState& cs : chans) {
      // A channel held back for a full socket has data waiting by definition; what unblocks it
      // is the socket reading, which writes wake_fd_.
      if (!cs.pending.empty()) continue;
      cs.ch->ArmNotify(chan::Channel::kReadable);
      fds.push_back({cs.ch->notify_fd(chan::Channel::kReadable), POLLIN, 0});
    }
    if (poll(fds.data(), fds.size(), 10) > 0) {
      for (size_t i = 0; i < fds.size(); ++i) {
        if (i == 1) continue;  // the driver's accept fd is cleared by Accept()
        uint64_t v;
        if (fds[i].revents & POLLIN) (void)!read(fds[i].fd, &v, sizeof(v));
      }
    }
  }
  // Whatever is still held goes back to its channel.
  for (ChanState& cs : chans)
    for (auto& s : cs.pending) cs.ch->Release({&s, 1});
}

}  // namespace

int Errno(const absl::Status& s) {
  if (s.ok()) return 0;
  if (auto p = s.GetPayload(kErrnoUrl)) {
    int e = 0;
    if (absl::SimpleAtoi(std::string(*p), &e)) return e;
  }
  return EIO;
}

absl::StatusOr<std::unique_ptr<Stack>> Stack::Create(const StackOptions& opts) {
  auto s = std::make_unique<StackImpl>(opts);
  if (auto st = s->Init(); !st.ok()) return st;
  return std::unique_ptr<Stack>(std::move(s));
}

}  // namespace netch::vns
