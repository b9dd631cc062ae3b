// socket.cc - virtual sockets: Send (window, policy, copy workers), Recv (reassembly, window
// updates), Accept, Shutdown, Close.
#include <optional>
#include <span>
#include <string>

#include "vns_lib/stack_impl.h"

namespace netch::vns {

// The largest write that transmits on the caller's thread (StackOptions::transmit_inline).
constexpr size_t kTransmitInlineMaxBytes = 32 << 10;
// A write up to this long that follows data the socket read is an answer: the policy may send it
// back on the channel that data came on (sched::SocketRef::reply_to). Longer ones are bulk.
constexpr size_t kReplyMaxBytes = 64 << 10;
// How long a blocked Recv sleeps between looks when nothing is owed (see RecvLocked).
constexpr int kIdleRecvWaitMs = 500;

class SocketImpl final : public VirtualSocket {
 public:
  SocketImpl(StackImpl* st, std::shared_ptr<Conn> c, const SocketOptions& o)
      : st_(st),
        c_(std::move(c)),
        nonblocking_(o.nonblocking),
        nodelay_(o.nodelay),
        channels_hint_(o.channels),
        busy_poll_opt_(o.busy_poll_us) {}
  ~SocketImpl() override { (void)Close(); }

  absl::StatusOr<size_t> Send(std::span<const uint8_t> data) override;
  absl::StatusOr<size_t> Recv(std::span<uint8_t> buf) override;
  absl::StatusOr<std::unique_ptr<VirtualSocket>> Accept() override;
  absl::Status Shutdown() override;
  absl::Status Close() override;
  int fd() const override { return c_ ? c_->efd : -1; }
  int write_fd() const override { return c_ ? c_->wefd : -1; }
  void SetLazyReadiness() override {
    if (c_ && !lazy_.exchange(true)) c_->waiters.fetch_sub(1, std::memory_order_relaxed);
  }
  void BeginWait() override {
    if (c_) c_->BeginWait();
  }
  void EndWait() override {
    if (c_) c_->EndWait();
  }
  short Poll() const override;
  int Error() const override;
  size_t Available() override {
    std::lock_guard g(recv_mu_);
    if (!c_ || c_->listening) return 0;
    DrainInq();
    return reasm_.Readable();
  }
  void SetNonBlocking(bool nb) override { nonblocking_ = nb; }
  void SetNoDelay(bool on) override { nodelay_.store(on, std::memory_order_relaxed); }
  void SetBusyPoll(int us) override { busy_poll_opt_.store(us, std::memory_order_relaxed); }
  uint16_t local_port() const override { return c_ ? c_->key.local_port : 0; }
  uint16_t remote_port() const override { return c_ ? c_->key.remote_port : 0; }
  uint32_t remote_ipv4() const override { return c_ ? c_->key.peer : 0; }
  AppClass app_class() const override { return c_ ? c_->app_class : AppClass::kUnspecified; }
  TransportInfo Info() const override;

 private:
  // No live channel to the peer is left: the connection cannot make progress.
  bool PeerGone() const { return c_->peer && c_->peer->gone(); }
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
    // A connect that failed says how, even if the peer's channels are gone too (they may never
    // have come up: the peer has no stack).
    if (const ConnState s = c_->state.load();
        s == ConnState::kRefused || s == ConnState::kTimedOut || s == ConnState::kUnreachable)
      return StateError();
    if (c_->broken.load(std::memory_order_acquire)) return BrokenError();
    if (PeerGone()) return GoneError();
    return StateError();
  }
  // Every channel in `chans` is down: why, from the first that failed.
  static absl::Status DownError(const std::vector<std::shared_ptr<chan::Channel>>& chans) {
    chan::FailCause f = chan::FailCause::kNone;
    for (const auto& ch : chans)
      if (f == chan::FailCause::kNone && ch->state() == chan::ChannelState::kFailed)
        f = ch->fail_cause();
    return SockError(ECONNRESET, "every channel to the peer is down", f);
  }
  absl::Status GoneError() const {
    return SockError(ECONNRESET, "every channel to the peer is down", c_->peer->last_failure());
  }
  absl::Status BrokenError() const {
    return SockError(ECONNRESET, "a channel carrying the connection failed",
                     c_->broken_cause.load(std::memory_order_relaxed));
  }
  // What the peer told us: reset, refused; or our own connect timeout, or no host answered.
  absl::Status StateError() const { return ConnStateError(c_->state.load()); }
  // Sends [off, off+len) of the stream (stream offset base + off) from data; blocks while the
  // channels are full unless non-blocking. Returns bytes taken.
  // `parallel`: copy workers run several ranges of one write at once.
  absl::StatusOr<size_t> SendRange(const uint8_t* data, size_t len, uint64_t seq, size_t rr,
                                   bool parallel);
  // A non-blocking Send was cut short: write readiness off until the window or a channel opens.
  void WriteBlocked(bool on_channels);
  // Waits until one of the channels the policy tried and found full (loads[i].full) can take
  // more — all of them if it tried none — or the connection breaks (noticed after ≤ 10 ms).
  void WaitChannels(const std::vector<std::shared_ptr<chan::Channel>>& chans,
                    std::span<const sched::ChannelLoad> loads);
  void DrainInq();
  void UpdateReadiness();
  // Busy polling (recv_mu_ held). The socket's poll set: the channels its data arrived on, with
  // their lanes, learned from what the dispatcher delivered.
  uint32_t BusyPollUs();
  void LearnLane(const chan::Channel* ch);
  // The peer's reference to one of its channels a segment names (nullptr once it let go of it):
  // what keeps a learned channel alive while the socket polls it.
  std::shared_ptr<chan::Channel> PeerChannel(const chan::Channel* ch) const;
  // One round: each channel's engine round, then its lane's segments that are this socket's
  // straight into the reassembler; the first that is not (another socket's, a control segment)
  // and everything after it go to the dispatcher, in order. True if anything was done.
  bool PollOnce(uint64_t now_us, uint64_t stand_down_us);
  bool TakeOwn(chan::Channel* ch, const chan::RxSegment& seg);
  absl::StatusOr<size_t> RecvLocked(std::span<uint8_t> buf);
  // Run to completion on the receive side (StackOptions::receive_inline; recv_mu_ held): the
  // channels this socket's data arrived on, learned by DrainInq, and the loans of their engines'
  // input a blocked Recv holds while it sleeps.
  void LearnRxChannel(const chan::Channel* ch);
  void BorrowInputs();
  void ReturnInputs() {
    for (size_t i = 0; i < nloans_; ++i) loans_[i].Return();
    nloans_ = 0;
  }
  void EndPoll();  // the engines and the dispatcher take over again
  // Bytes the peer's receive window still takes; waits (blocking sockets) until it opens or the
  // connection fails. 0 with OK status: non-blocking and the window is closed.
  absl::StatusOr<size_t> SendWindow();
  absl::StatusOr<size_t> SendPart(std::span<const uint8_t> data);  // within the window
  // Tells the peer our window moved once a quarter of the buffer was read since the last time.
  void MaybeAdvertiseWindow();
  // A window update is due (the reader moved a quarter of rcvbuf past the last one sent).
  bool WindowOwed() const;
  // The peer's live channels this socket may send on: the operator's map (or all, when what it
  // names is gone), cut to SocketOptions::channels.
  std::vector<std::shared_ptr<chan::Channel>> UsableChannels() const;
  void RefreshChannels();  // send_mu_ held
  // The active policy into *p, re-read only when its version moved (one load otherwise). Send
  // and Recv keep their own copy, each under its lock.
  void RefreshPolicy(uint64_t* version, std::shared_ptr<const sched::NetScheduler>* p) {
    if (const uint64_t v = st_->policy_version(); v != *version || !*p) {
      *version = v;
      *p = st_->policy();
    }
  }
  // This socket's busy-poll budget: its own option, or else what policy p says for its class.
  uint32_t BusyPollBudget(const sched::NetScheduler& p) const {
    const int opt = busy_poll_opt_.load(std::memory_order_relaxed);
    return opt >= 0 ? static_cast<uint32_t>(opt)
                    : p.BusyPollUs({c_->id, static_cast<uint8_t>(c_->app_class)});
  }
  // How what this thread queues on its channels leaves. A blocking socket's message for a
  // sleeping engine leaves in a round this thread runs (no engine wakeup): the writer of a
  // request or a reply, which then waits. Not a bulk write: the engine transmits it on another
  // core while this thread copies the next one (128 KiB streams lost ~7% transmitting inline).
  // Nor an event loop's (nonblocking) write: what one pass of the loop writes to many sockets
  // leaves in one engine round and one sendmmsg, beside the loop rather than on it (Redis -P 16
  // lost up to 25% transmitting inline); it leaves when the loop comes back to wait. Busy-polled
  // sockets transmit in their own rounds. An L-app socket's message (blocking or not) leaves on
  // this thread at once, even when the engine is awake between rounds (spinning) if it is
  // pinned to this thread's core: waiting for the engine's turn on that core cost ~20 µs a hop
  // (placed 4 KiB rpc p50 68 → 42 µs).
  class TransmitScope {
   public:
    TransmitScope(const SocketImpl& s, uint32_t busy_us, size_t bytes) {
      if (busy_us > 0) return;
      const bool latency = s.c_->app_class == AppClass::kLatency;
      if ((!s.nonblocking_ || latency) && bytes <= kTransmitInlineMaxBytes &&
          s.st_->opts().transmit_inline)
        here_.emplace(/*even_if_awake=*/latency);
      else if (s.nonblocking_ && s.st_->opts().defer_transmit)
        at_flush_.emplace();
    }

   private:
    std::optional<chan::TransmitInlineScope> here_;
    std::optional<chan::DeferTransmitScope> at_flush_;
  };
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
  std::atomic<bool> nodelay_;  // read by copy workers running SendRange
  int channels_hint_;
  std::atomic<int> busy_poll_opt_;  // SocketOptions::busy_poll_us (Send and Recv read it)
  struct PollLane {
    std::shared_ptr<chan::Channel> ch;
    std::shared_ptr<RxLane> lane;
  };
  std::vector<PollLane> poll_lanes_;  // recv_mu_
  bool learning_ = false;             // recv_mu_: busy polling is on, DrainInq learns lanes
  chan::PollYielder yielder_;         // recv_mu_
  static constexpr size_t kMaxLoans = 4;
  bool learn_rx_ = false;                                 // recv_mu_: DrainInq learns rx_chans_
  std::vector<std::shared_ptr<chan::Channel>> rx_chans_;  // recv_mu_, at most kMaxLoans
  chan::InputLoan loans_[kMaxLoans];                      // recv_mu_: the first nloans_
  size_t nloans_ = 0;
  uint32_t send_busy_us_ = 0;         // send_mu_: this Send's busy polling
  std::atomic<uint64_t> sent_on_{0};  // bit i: this Send used chans_[i] (busy polling)
  // The channel the data read last came on, until an answer takes it (SendRange): compared as an
  // address only, never dereferenced here.
  std::atomic<const chan::Channel*> reply_chan_{nullptr};
  uint64_t snd_next_ = 0;
  std::atomic<bool> lazy_{false};      // SetLazyReadiness was called
  std::atomic<bool> fin_sent_{false};  // written under send_mu_, read by Poll()
  // The channels this socket sends on, rebuilt only when its peer gains a channel or the
  // operator remaps the socket (version counters), not on every Send.
  std::vector<std::shared_ptr<chan::Channel>> chans_;
  uint64_t peer_version_ = ~0ull, map_version_ = ~0ull;
  std::shared_ptr<const sched::NetScheduler> policy_;  // send_mu_; refreshed on a version move
  uint64_t policy_version_ = ~0ull;
  std::shared_ptr<const sched::NetScheduler> recv_policy_;  // recv_mu_: the copy plan's
  uint64_t recv_policy_version_ = ~0ull;
  size_t rr_ = 0;
  Reassembler reasm_;
  std::vector<CopyPiece> pieces_;
  std::vector<HeldSeg> done_;
  std::mutex send_mu_, recv_mu_;  // one Send and one Recv at a time per socket

  friend class StackImpl;
};

absl::StatusOr<std::unique_ptr<VirtualSocket>> MakeSocket(StackImpl* st, std::shared_ptr<Conn> c,
                                                          const SocketOptions& o) {
  if (!c->listening && c->state.load() == ConnState::kEstablished) c->SignalWritable();
  return std::unique_ptr<VirtualSocket>(new SocketImpl(st, std::move(c), o));
}

void SocketImpl::WaitChannels(const std::vector<std::shared_ptr<chan::Channel>>& chans,
                              std::span<const sched::ChannelLoad> loads) {
  // Only the channels the policy wanted: one it does not use for this socket may well have room,
  // and waking for that would make this a busy loop.
  const bool tried = std::any_of(loads.begin(), loads.end(), [](const auto& l) { return l.full; });
  std::vector<pollfd> fds;
  for (size_t i = 0; i < loads.size(); ++i) {
    if (tried && !loads[i].full) continue;
    chans[i]->ArmNotify(chan::Channel::kWritable);
    fds.push_back({chans[i]->notify_fd(chan::Channel::kWritable), POLLIN, 0});
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

std::vector<std::shared_ptr<chan::Channel>> SocketImpl::UsableChannels() const {
  auto chans = c_->peer->Live();
  std::lock_guard g(c_->map_mu);
  if (!c_->channel_ids.empty()) {
    auto mapped = chans;
    std::erase_if(mapped, [&](const auto& ch) {
      return std::find(c_->channel_ids.begin(), c_->channel_ids.end(), ch->id()) ==
             c_->channel_ids.end();
    });
    // The operator's map names channels that are gone (scaled down): the socket uses the rest.
    if (!mapped.empty()) chans = std::move(mapped);
  }
  if (channels_hint_ > 0 && static_cast<size_t>(channels_hint_) < chans.size())
    chans.resize(channels_hint_);
  return chans;
}

void SocketImpl::RefreshChannels() {
  const uint64_t pv = c_->peer->version(), mv = c_->map_version.load(std::memory_order_acquire);
  if (pv == peer_version_ && mv == map_version_ && !chans_.empty()) return;
  peer_version_ = pv;
  map_version_ = mv;
  chans_ = UsableChannels();
  std::lock_guard g(c_->map_mu);
  // Remembered for the dispatcher: if one of these fails, bytes this socket sent may be lost.
  for (const auto& ch : chans_)
    if (std::find(c_->tx_chans.begin(), c_->tx_chans.end(), ch.get()) == c_->tx_chans.end())
      c_->tx_chans.push_back(ch.get());
}

absl::StatusOr<size_t> SocketImpl::SendRange(const uint8_t* data, size_t len, uint64_t seq,
                                             size_t rr, bool parallel) {
  // chans_ and policy_ are refreshed by Send (under send_mu_) before any SendRange runs: copy
  // workers only read them.
  const auto& chans = chans_;
  if (chans.empty()) return SockError(ECONNRESET, "no channel to the peer");
  const sched::NetScheduler& policy = *policy_;
  sched::SocketRef sref{c_->id, static_cast<uint8_t>(c_->app_class)};
  if (!parallel && len <= kReplyMaxBytes) {
    if (const chan::Channel* in = reply_chan_.exchange(nullptr, std::memory_order_relaxed))
      for (size_t i = 0; i < chans.size() && sref.reply_to == sched::kNoReply; ++i)
        if (chans[i].get() == in) sref.reply_to = i;
  }
  size_t seg = SIZE_MAX;
  for (const auto& ch : chans) seg = std::min(seg, ch->max_payload());
  // Throughput sockets let the channel coalesce (autocork): small writes merge, and a write's
  // segments continue what the last write left open, so a 128 KiB write is two full segments
  // rather than two and a 250 B tail. Not with copy workers: merged copies run under the
  // channel's producer lock, which would serialize the workers.
  const bool cork =
      !nodelay_.load(std::memory_order_relaxed) && c_->app_class != AppClass::kLatency;
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
        segs[n].coalesce = cork && (l < seg || !parallel);
        o2 += l;
      }
      auto taken = chans[k]->Enqueue({segs, n});
      if (!taken.ok()) return taken.status();
      if (*taken == 0) {
        loads[k].full = true;
        continue;
      }
      st_->sched_batches_.fetch_add(1, std::memory_order_relaxed);
      c_->CountBatch(chans[k]->id());
      if (send_busy_us_ > 0) sent_on_.fetch_or(1ull << k, std::memory_order_relaxed);
      if (segs[*taken - 1].coalesce) c_->corked.store(true, std::memory_order_relaxed);
      for (size_t i = 0; i < *taken; ++i) off += segs[i].payload.size();
      progress = true;
      sref.reply_to = sched::kNoReply;  // (the answer's first batch went where it could)
    }
    if (off == len || progress) continue;
    if (auto st = StateError(); !st.ok()) return st;
    if (c_->broken.load(std::memory_order_acquire)) return BrokenError();
    if (AllDown(chans)) return DownError(chans);
    if (nonblocking_) {
      std::lock_guard g(c_->map_mu);
      c_->full_ids.clear();
      for (size_t i = 0; i < nch; ++i)
        if (loads[i].full) c_->full_ids.push_back(loads[i].id);
      break;
    }
    WaitChannels(chans, {loads, nch});
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
    if (nonblocking_) {
      c_->UnsignalWritable();
      if (c_->state.load() != ConnState::kConnecting) c_->SignalWritable();
      return SockError(EAGAIN, "still connecting");
    }
    pollfd p{c_->wefd, POLLIN, 0};
    c_->BeginWait();
    if (c_->state.load() == ConnState::kConnecting) poll(&p, 1, 10);
    c_->EndWait();
  }
  if (auto st = Usable(); !st.ok()) return st;
  // Busy polling: the engine stands down for this thread, so what we queued leaves in the round
  // we run ourselves right after (below), not on an engine wakeup. Not so for a nonblocking
  // socket: it belongs to an event loop, which polls the stack when it comes back to wait
  // (Stack::PollInline; the preload's epoll_wait), so what the loop wrote in one pass leaves in
  // one round and one sendmmsg instead of a round per write (Redis under netchrun
  // --busy-poll-us, docs/BENCHMARKS.md). An engine stood down for a loop that does not come back
  // takes over chan::kStandDownRecheckUs after its lease.
  RefreshPolicy(&policy_version_, &policy_);
  send_busy_us_ = BusyPollBudget(*policy_);
  struct PollAfter {
    SocketImpl* s;
    ~PollAfter() {
      uint64_t used = s->sent_on_.exchange(0, std::memory_order_relaxed);
      if (s->send_busy_us_ == 0 || s->nonblocking_) return;
      // (Bits index chans_ as SendRange saw it; a refresh in between only makes us poll
      // another of the peer's channels.)
      for (; used != 0; used &= used - 1)
        if (const size_t k = static_cast<size_t>(__builtin_ctzll(used)); k < s->chans_.size())
          s->chans_[k]->PollInline(NowUs(), s->send_busy_us_);
    }
  } poll_after{this};
  TransmitScope transmit(*this, send_busy_us_, data.size());
  size_t total = 0;
  while (total < data.size()) {
    auto window = SendWindow();
    if (!window.ok()) return total > 0 ? absl::StatusOr<size_t>(total) : window.status();
    if (*window == 0) {
      WriteBlocked(/*on_channels=*/false);
      if (total > 0) break;
      return SockError(EAGAIN, "the peer's receive window is full");
    }
    auto part = data.subspan(total, std::min(*window, data.size() - total));
    auto sent = SendPart(part);
    if (!sent.ok()) {
      if (Errno(sent.status()) != EAGAIN) return sent;
      WriteBlocked(/*on_channels=*/true);
      return total > 0 ? absl::StatusOr<size_t>(total) : sent;
    }
    total += *sent;
    if (*sent < part.size()) {  // non-blocking: the channels are full
      WriteBlocked(/*on_channels=*/true);
      break;
    }
  }
  return total;
}

void SocketImpl::WriteBlocked(bool on_channels) {
  c_->UnsignalWritable();
  if (on_channels) {
    st_->WatchWritable(c_);  // the dispatcher looks for room from now on
  } else if (c_->snd_limit.load(std::memory_order_seq_cst) > snd_next_ ||
             c_->state.load() != ConnState::kEstablished) {
    c_->SignalWritable();  // the window moved (or the connection failed) while we cleared it
  }
}

short SocketImpl::Poll() const {
  if (!c_) return POLLNVAL;
  short r = 0;
  if (c_->signaled.load(std::memory_order_acquire)) r |= POLLIN;
  if (c_->listening) return r;
  if (c_->wsignaled.load(std::memory_order_acquire) && !fin_sent_) r |= POLLOUT;
  if (c_->fin_seq.load(std::memory_order_acquire) != UINT64_MAX) r |= POLLRDHUP;
  const ConnState s = c_->state.load();
  if (s == ConnState::kConnecting) return r & ~POLLOUT;
  if (s != ConnState::kEstablished || c_->broken.load(std::memory_order_acquire) || PeerGone())
    r |= POLLERR | POLLHUP | POLLIN | POLLOUT;
  return r;
}

int SocketImpl::Error() const {
  if (!c_) return EBADF;
  if (c_->state.load() == ConnState::kConnecting) return 0;
  return Errno(Usable());
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
  RefreshPolicy(&policy_version_, &policy_);
  if (chans_.empty()) return SockError(ECONNRESET, "every channel to the peer is down");
  if (AllDown(chans_)) return DownError(chans_);
  size_t sent = 0;
  const sched::CopyPlan plan =
      policy_->PlanCopy(data.size(), st_->copy_workers(), st_->workers().queued_bytes());
  if (!nonblocking_ && plan.parallel) {
    // Chunks copied in parallel, each on the next channel; the receiver orders by offset.
    const auto chunks = SplitChunks(data.size(), plan.chunk_bytes);
    std::vector<absl::Status> errs(chunks.size());
    const size_t rr = rr_;
    st_->workers().ParallelFor(
        chunks.size(),
        [&](size_t i) {
          auto r = SendRange(data.data() + chunks[i].first, chunks[i].second,
                             snd_next_ + chunks[i].first, rr + i, /*parallel=*/true);
          if (!r.ok()) errs[i] = r.status();
        },
        data.size());
    rr_ += chunks.size();
    for (const auto& e : errs)
      if (!e.ok()) return e;
    sent = data.size();
  } else {
    auto r = SendRange(data.data(), data.size(), snd_next_, rr_++, /*parallel=*/false);
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
  const chan::Channel* last = nullptr;
  for (uint32_t n; (n = c_->inq.Pop(h)) > 0;) {
    for (uint32_t i = 0; i < n; ++i) {
      if (h[i].ch) last = h[i].ch;
      if (learning_ && h[i].ch) LearnLane(h[i].ch);
      if (learn_rx_ && h[i].ch) LearnRxChannel(h[i].ch);
      if (!reasm_.Insert(h[i])) done_.push_back(h[i]);  // overlapping: drop it
    }
  }
  if (last) reply_chan_.store(last, std::memory_order_relaxed);
  if (!done_.empty()) ReleaseHeld(done_);
}

absl::StatusOr<size_t> SocketImpl::Recv(std::span<uint8_t> buf) {
  // An event loop's read gives buffers back (and may owe the peer a window update): the engine
  // that recycles them runs at the loop's flush, when it comes back to wait, rather than being
  // woken for it per read — a thread switch per request on these 2-core hosts (Redis -P 16:
  // 4,000 context switches a second in the server, the kernel's TCP 140). A non-blocking Recv
  // does not wait for data; a window update that finds the control channel full waits for room
  // at most until the engine's timer runs the deferred round (chan::kDeferTransmitUs).
  std::optional<chan::DeferTransmitScope> at_flush;
  if (nonblocking_ && st_->opts().defer_transmit) at_flush.emplace();
  std::lock_guard g(recv_mu_);
  auto r = RecvLocked(buf);
  ReturnInputs();
  return r;
}

// A Recv whose borrowed input woke it this many times with nothing for it (another socket's
// traffic on the same engine, or a round the engine was running) hands the input back and sleeps
// like any socket until data comes.
constexpr int kLoanWakeupsWithoutData = 3;

void SocketImpl::LearnRxChannel(const chan::Channel* ch) {
  for (const auto& c : rx_chans_)
    if (c.get() == ch) return;
  if (rx_chans_.size() >= kMaxLoans) return;
  if (auto c = PeerChannel(ch)) rx_chans_.push_back(std::move(c));
}

void SocketImpl::BorrowInputs() {
  std::erase_if(rx_chans_, [](const auto& ch) { return !IsLive(ch->state()); });
  for (const auto& ch : rx_chans_) {
    chan::InputLoan l = ch->BorrowInput();
    if (!l) continue;
    bool dup = false;
    for (size_t i = 0; i < nloans_ && !dup; ++i) dup = loans_[i].same_engine(l);
    if (!dup) loans_[nloans_++] = std::move(l);  // (a duplicate returns as it goes)
  }
}

absl::StatusOr<size_t> SocketImpl::RecvLocked(std::span<uint8_t> buf) {
  if (!c_) return SockError(EBADF, "socket closed");
  if (c_->listening) return SockError(EINVAL, "recv on a listening socket");
  if (buf.data() == nullptr) return SockError(EINVAL, "null buffer");
  if (buf.empty()) return 0;
  int loan_wakeups = kLoanWakeupsWithoutData;
  for (;;) {
    DrainInq();
    size_t readable = reasm_.Readable();
    if (readable > 0) {
      pieces_.clear();
      const size_t n = reasm_.Take(std::min(buf.size(), readable), &pieces_, &done_);
      RefreshPolicy(&recv_policy_version_, &recv_policy_);
      const sched::CopyPlan plan =
          recv_policy_->PlanCopy(n, st_->copy_workers(), st_->workers().queued_bytes());
      if (plan.parallel) {
        // Split the pieces into chunks of about chunk_bytes and copy them in parallel.
        std::vector<std::pair<size_t, size_t>> ranges;  // [first piece, last piece)
        size_t start = 0, acc = 0;
        for (size_t i = 0; i < pieces_.size(); ++i) {
          acc += pieces_[i].len;
          if (acc >= plan.chunk_bytes || i + 1 == pieces_.size()) {
            ranges.emplace_back(start, i + 1);
            start = i + 1;
            acc = 0;
          }
        }
        st_->workers().ParallelFor(
            ranges.size(),
            [&](size_t r) {
              for (size_t i = ranges[r].first; i < ranges[r].second; ++i)
                std::memcpy(buf.data() + pieces_[i].dst_off, pieces_[i].src, pieces_[i].len);
            },
            n);
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
    // wins over the peer's channels going away afterwards. Either stays readable: a wait below
    // may have lowered the fd after the FIN or the reset had raised it.
    if (auto st = StateError(); !st.ok()) {
      UpdateReadiness();
      return st;
    }
    if (reasm_.next() == c_->fin_seq.load(std::memory_order_acquire)) {  // end of stream
      UpdateReadiness();
      return 0;
    }
    if (auto st = Usable(); !st.ok()) return st;
    MaybeAdvertiseWindow();  // an update the channel could not take last time
    // About to wait (or to return EAGAIN to a poll loop), perhaps for the reply to what we wrote:
    // what a channel holds open for coalescing leaves now, the way this socket's writes leave —
    // a blocking reader's in a round of its own, so the tail of a request does not wait for an
    // engine wakeup while the request's first segment has already reached the peer.
    if (c_->corked.exchange(false, std::memory_order_relaxed) && c_->peer) {
      RefreshPolicy(&recv_policy_version_, &recv_policy_);
      TransmitScope transmit(*this, BusyPollBudget(*recv_policy_), 0);
      for (const auto& ch : c_->peer->Live()) ch->Flush();
    }
    if (nonblocking_) {
      UpdateReadiness();
      return SockError(EAGAIN, "no data");
    }
    chan::FlushDeferredTransmit();  // what this thread's nonblocking writes left for its wait
    if (const uint32_t busy = BusyPollUs(); busy > 0) {
      // Run to completion: this thread runs its channels' engine rounds and takes its own
      // segments until something arrives or `busy` runs out, then sleeps like any socket.
      const uint64_t end = NowUs() + busy;
      bool got = false;
      for (;;) {
        const uint64_t now = NowUs();  // the round's one clock read
        PollOnce(now, busy);
        got = reasm_.Readable() > 0 || !c_->inq.EmptyApprox() ||
              reasm_.next() == c_->fin_seq.load(std::memory_order_acquire) ||
              c_->state.load() != ConnState::kEstablished ||
              c_->broken.load(std::memory_order_acquire);
        if (got || now >= end) break;
        if (poll_lanes_.empty())
          std::this_thread::yield();  // nothing to poll yet
        else
          yielder_.MaybeYield(now, now + busy - end);  // a spinner sharing this core may run
      }
      if (got) continue;
      EndPoll();
    }
    // Adaptive: spin briefly for the next delivery (a reply usually follows within tens of
    // microseconds), then sleep on the socket's fd. The engines' input is borrowed before the
    // spin, and the spin runs their rounds itself: the reply neither wakes an engine to deliver
    // it (a wakeup, and on these 2 shared cores a thread beside the spinner for one of them)
    // nor waits for one. Blocking 4 KiB rpc (netchperf --mode rpc): p50 47-74 -> 28-44 us
    // (kernel TCP 29-31; docs/ARCHITECTURE.md).
    learn_rx_ = st_->opts().receive_inline && st_->opts().deliver_inline;
    if (learn_rx_ && nloans_ == 0 && loan_wakeups > 0) BorrowInputs();
    const uint64_t spin_end = NowUs() + st_->opts().recv_spin_us;
    while (c_->inq.EmptyApprox() && NowUs() < spin_end) {
      for (size_t i = 0; i < nloans_; ++i) (void)loans_[i].Run();
      if (c_->inq.EmptyApprox()) std::this_thread::yield();
    }
    if (!c_->inq.EmptyApprox()) continue;
    pollfd p[1 + kMaxLoans];
    p[0] = {c_->efd, POLLIN, 0};
    for (size_t i = 0; i < nloans_; ++i) p[1 + i] = {loans_[i].fd(), POLLIN, 0};
    c_->Unsignal();
    c_->BeginWait();
    // Everything that ends the wait raises the fd (data, FIN, reset, a failed channel) or is
    // input on a loaned set. The timeout is a backstop, and the retry of a window update the
    // control channel could not take: then soon, else rarely — an idle blocked reader should
    // not wake 100 times a second.
    if (c_->inq.EmptyApprox() && c_->fin_seq.load() != reasm_.next() &&
        c_->state.load() == ConnState::kEstablished)
      poll(p, 1 + nloans_, WindowOwed() ? 10 : kIdleRecvWaitMs);
    c_->EndWait();
    bool input = false;
    for (size_t i = 0; i < nloans_; ++i) {
      if (!(p[1 + i].revents & POLLIN)) continue;
      input = true;
      // The round delivers this socket's segments into its inbound queue (DeliveryHook); the
      // engine (or a poller) running one right now takes the input instead: let it finish.
      if (!loans_[i].Run()) std::this_thread::yield();
    }
    if (input && c_->inq.EmptyApprox() && --loan_wakeups == 0) ReturnInputs();
  }
}

uint32_t SocketImpl::BusyPollUs() {
  RefreshPolicy(&recv_policy_version_, &recv_policy_);
  const uint32_t us = BusyPollBudget(*recv_policy_);
  learning_ = us > 0 && c_->peer;
  return learning_ ? us : 0;
}

void SocketImpl::LearnLane(const chan::Channel* ch) {
  for (const PollLane& pl : poll_lanes_)
    if (pl.ch.get() == ch) return;
  if (poll_lanes_.size() >= 8) return;  // a socket spread wider is served by the dispatcher
  auto lane = st_->Lane(ch);
  if (!lane) return;
  if (auto c = PeerChannel(ch)) poll_lanes_.push_back({std::move(c), std::move(lane)});
}

std::shared_ptr<chan::Channel> SocketImpl::PeerChannel(const chan::Channel* ch) const {
  for (auto& c : c_->peer->All())
    if (c.get() == ch) return std::move(c);
  return nullptr;
}

bool SocketImpl::PollOnce(uint64_t now_us, uint64_t stand_down_us) {
  bool worked = false;
  const uint64_t until = now_us + stand_down_us;
  if (!poll_lanes_.empty()) st_->CoverPolledUntil(until);
  for (size_t i = 0; i < poll_lanes_.size();) {
    PollLane& pl = poll_lanes_[i];
    RxLane& lane = *pl.lane;
    lane.polled_until_us.store(until, std::memory_order_relaxed);
    worked |= pl.ch->PollInline(now_us, stand_down_us);
    // Owned by the dispatcher right now, or holding what it must deliver first: its turn.
    if (lane.npending.load(std::memory_order_relaxed) != 0 || !lane.TryOwn()) {
      ++i;
      continue;
    }
    if (lane.gone) {  // the channel left: nothing more arrives on it
      lane.Disown();
      poll_lanes_.erase(poll_lanes_.begin() + static_cast<ptrdiff_t>(i));
      continue;
    }
    if (lane.pending.empty()) {
      const std::span<chan::RxSegment> segs(lane.batch);
      const size_t n = pl.ch->Dequeue(SIZE_MAX, segs);
      size_t k = 0;
      // Other sockets' data and window updates (a bulk socket's, on the control channel) go
      // to them from here too: left in the lane, they would hold this socket's next segments
      // back until the dispatcher's next round.
      for (; k < n; ++k) {
        if (TakeOwn(pl.ch.get(), segs[k])) {
          if (segs[k].hdr.type == NC_DATA) {
            lane.NoteSocket(c_->id);
          } else {
            lane.shared = true;
          }
        } else if (!st_->DeliverData(*pl.ch, lane, segs[k])) {
          break;
        }
      }
      if (k < n) {
        for (size_t j = k; j < n; ++j) lane.pending.push_back(segs[j]);
      }
      st_->inline_segments_.fetch_add(k, std::memory_order_relaxed);
      worked |= n > 0;
      lane.Disown();
      if (k < n) st_->WakeDispatcher();
    } else {
      lane.Disown();
    }
    ++i;
  }
  return worked;
}

bool SocketImpl::TakeOwn(chan::Channel* ch, const chan::RxSegment& seg) {
  const wire::SegHeader& h = seg.hdr;
  if (ch->peer_ipv4() != c_->key.peer || h.dst_port != c_->key.local_port ||
      h.src_port != c_->key.remote_port || h.conn_id != c_->conn_id)
    return false;
  switch (h.type) {
    case NC_DATA: {
      // The dispatcher's rules for anything unusual: a closed or reset socket, data beyond the
      // window this socket advertised (a reset), an empty segment.
      if (seg.payload.empty() || c_->state.load() != ConnState::kEstablished ||
          h.seq + seg.payload.size() > c_->adv_edge.load(std::memory_order_acquire))
        return false;
      HeldSeg hs = HeldSeg::Of(ch, seg);
      if (!reasm_.Insert(hs)) {
        done_.push_back(hs);  // overlapping: drop it
        ReleaseHeld(done_);
      }
      return true;
    }
    case NC_WND:
      c_->RaiseSendLimit(h.seq);
      ch->Release({&seg, 1});
      return true;
    case NC_FIN:
      c_->fin_seq.store(h.seq, std::memory_order_release);
      ch->Release({&seg, 1});
      return true;
    default:
      return false;
  }
}

void SocketImpl::EndPoll() {
  if (poll_lanes_.empty()) return;
  for (PollLane& pl : poll_lanes_) {
    pl.lane->polled_until_us.store(0, std::memory_order_relaxed);
    pl.ch->EndPollInline();
  }
  st_->WakeDispatcher();  // it arms the channels' notifications again
}

bool SocketImpl::WindowOwed() const {
  return reasm_.next() + c_->rcvbuf - c_->adv_edge.load(std::memory_order_relaxed) >=
         c_->rcvbuf / 4;
}

void SocketImpl::MaybeAdvertiseWindow() {
  if (!WindowOwed()) return;
  const uint64_t edge = reasm_.next() + c_->rcvbuf;
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
    c_->BeginWait();
    bool empty;
    {
      std::lock_guard g(c_->accept_mu);
      empty = c_->accept_q.empty();
    }
    if (empty) poll(&p, 1, 10);
    c_->EndWait();
  }
}

TransportInfo SocketImpl::Info() const {
  TransportInfo t;
  if (!c_) return t;
  if (c_->listening) {
    t.state = TransportInfo::State::kListening;
    return t;
  }
  switch (c_->state.load()) {
    case ConnState::kConnecting:
      t.state = TransportInfo::State::kConnecting;
      break;
    case ConnState::kEstablished:
      t.state =
          c_->broken.load() ? TransportInfo::State::kClosed : TransportInfo::State::kEstablished;
      break;
    default:
      t.state = TransportInfo::State::kClosed;
  }
  t.peer_finished = c_->fin_seq.load(std::memory_order_acquire) != UINT64_MAX;
  t.shut_down = fin_sent_.load();
  t.bytes_sent = c_->tx_bytes.load(std::memory_order_relaxed);
  t.bytes_received = c_->rx_bytes.load(std::memory_order_relaxed);
  if (!c_->peer) return t;
  for (const auto& ch : UsableChannels()) {
    const chan::ChannelStats cs = ch->stats();
    ++t.channels;
    t.srtt_us = std::max(t.srtt_us, cs.srtt_us);
    t.cwnd_packets += cs.cwnd_packets;
    t.mss = std::max(t.mss, static_cast<uint32_t>(ch->max_payload()));
    t.retransmits += cs.retransmits;
    t.unacked_bytes += cs.tx_queued_bytes;
  }
  return t;
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

}  // namespace netch::vns
