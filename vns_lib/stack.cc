// stack.cc - the embedded NetChannel stack: creation (driver, steering program, peers,
// dispatcher, copy workers), listen/connect, control segments, and the control-plane API.
#include "vns_lib/stack_impl.h"

namespace netch::vns {

absl::Status SockError(int err, std::string_view what) {
  return ErrnoStatus(err, std::string(what));
}

absl::Status SockError(int err, std::string_view what, chan::FailCause why) {
  if (why == chan::FailCause::kNone) return SockError(err, what);
  std::string w(what);
  w += " (";
  w += chan::FailCauseText(why);
  w += ")";
  return SockError(err, w);
}

absl::Status ConnStateError(ConnState s) {
  switch (s) {
    case ConnState::kReset:
      return SockError(ECONNRESET, "connection reset by peer");
    case ConnState::kRefused:
      return SockError(ECONNREFUSED, "connection refused");
    case ConnState::kTimedOut:
      return SockError(ETIMEDOUT, "connection timed out");
    case ConnState::kUnreachable:
      return SockError(EHOSTUNREACH, "no route to host", chan::FailCause::kUnreachable);
    case ConnState::kConnecting:
    case ConnState::kEstablished:
      break;
  }
  return absl::OkStatus();
}

absl::Status StackImpl::Init() {
  if (!dispatch_standby_.ok())
    return ErrnoStatus(dispatch_standby_.error(),
                       "timerfd_create (the dispatcher's standby timer)");
  // The copy plan is the policy's too: StackOptions' copy sizes are its first knobs.
  sched::Knobs knobs = {{"inline_copy_bytes", std::to_string(opts_.inline_copy_bytes)},
                        {"copy_chunk_bytes", std::to_string(opts_.chunk_bytes)}};
  knobs.insert(knobs.end(), opts_.policy_knobs.begin(), opts_.policy_knobs.end());
  auto policy = sched::CreatePolicy(opts_.policy, knobs);
  if (!policy.ok()) return policy.status();
  policy_ = std::move(*policy);
  chan::DriverOptions dopts = opts_.driver_opts;
  if (dopts.afxdp_tx_queues == 0) dopts.afxdp_tx_queues = policy_->LatencyQueues(dopts.engines);
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
  wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (wake_fd_ < 0) return ErrnoStatus(errno, "eventfd (the dispatcher's)");
  peers_ = std::make_unique<PeerSet>(driver_.get(), [this] { WakeDispatcher(); });
  if (opts_.channels_per_peer < 1 || opts_.channels_per_peer > 64)
    return absl::InvalidArgumentError("channels_per_peer must be 1..64");
  if (auto st = SetCopyWorkers(opts_.copy_workers); !st.ok()) return st;
  next_port_ = static_cast<uint16_t>(40000 + netch::RandomU32() % 20000);
  deliver_inline_ = opts_.deliver_inline;  // (before the dispatcher runs)
  dispatcher_ = std::thread([this] {
    pthread_setname_np(pthread_self(), "netch-disp");
    Dispatch();
  });
  scaler_ = std::thread([this] {
    pthread_setname_np(pthread_self(), "netch-scale");
    Scale();
  });
  return absl::OkStatus();
}

// Every 100 ms, when the policy scales (knob scale=on): each peer's live channels, their
// unacknowledged bytes and the engines' busy share go to the policy, which says how many
// channels the peer should have; SetPeerChannels opens or drains the difference. A policy that
// does not scale is looked at once a second (and at once when it is swapped: SetPolicy).
void StackImpl::Scale() {
  absl::flat_hash_map<uint32_t, sched::ScaleState> state;
  uint64_t last_busy = 0, last_us = 0;
  bool scaling = true;
  std::unique_lock lk(scale_mu_);
  while (!stop_.load()) {
    scale_cv_.wait_for(lk, std::chrono::milliseconds(scaling ? 100 : 1000));
    if (stop_.load()) break;
    auto pol = policy();
    const uint64_t now = NowUs();
    uint64_t busy = 0;
    const auto engines = driver_->Engines();
    for (const auto& e : engines) busy += e.busy_ns;
    const double share = last_us && now > last_us && !engines.empty()
                             ? static_cast<double>(busy - last_busy) / 1000.0 /
                                   static_cast<double>(now - last_us) /
                                   static_cast<double>(engines.size())
                             : 0.0;
    last_busy = busy;
    last_us = now;
    scaling = pol->scaling();
    if (!scaling) {
      state.clear();
      continue;
    }
    peers_->ForEach([&](Peer& p) {
      const auto live = p.Live();
      if (live.empty()) return;
      sched::ScaleSample smp;
      smp.now_us = now;
      smp.channels = static_cast<int>(live.size());
      for (const auto& ch : live) smp.queued_bytes += ch->tx_queued_bytes();
      smp.engine_busy = share;
      const int want = pol->WantChannels(smp, &state[p.ip()]);
      if (want != smp.channels) (void)SetPeerChannels(p.ip(), want);
    });
  }
}

StackImpl::~StackImpl() {
  stop_ = true;
  // Engines keep running until the driver goes: their hooks stop touching the stack now.
  deliver_inline_.store(false, std::memory_order_seq_cst);
  while (inline_active_.load(std::memory_order_seq_cst) != 0) std::this_thread::yield();
  {
    std::lock_guard g(scale_mu_);
    scale_cv_.notify_all();
  }
  if (scaler_.joinable()) scaler_.join();
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
  std::lock_guard g(workers_mu_);
  workers_.Resize(n);
  nworkers_ = n;
  PlaceCopyWorkersLocked();
  return absl::OkStatus();
}

void StackImpl::PlaceCopyWorkersLocked() {
  std::vector<int> cores;
  for (const auto& e : driver_->Engines()) cores.push_back(e.core);
  const int cpus = static_cast<int>(sysconf(_SC_NPROCESSORS_ONLN));
  workers_.Place([p = policy(), cores, cpus](int i) { return p->PlaceCopyWorker(i, cores, cpus); });
}

StackStats StackImpl::Stats() const {
  StackStats s;
  s.segments_in = segments_in_.load();
  s.segments_inline = inline_segments_.load();
  s.dispatch_inline = inline_rounds_.load();
  s.deliveries_inline = deliveries_inline_.load();
  s.segments_out_ctl = ctl_out_.load();
  s.rst_sent = rst_sent_.load();
  s.dispatcher_blocked = blocked_.load();
  s.dispatcher_wakeups = dispatch_sleeps_.load();
  s.copy_chunks = const_cast<CopyWorkers&>(workers_).chunks_run();
  s.copy_busy_ns = const_cast<CopyWorkers&>(workers_).busy_ns();
  s.sched_batches = sched_batches_.load();
  s.sched_skips = retired_skips_.load() + policy()->skips();
  s.rx_bad_conn = rx_bad_conn_.load();
  s.conns_broken = conns_broken_.load();
  s.rx_beyond_window = rx_beyond_window_.load();
  s.rx_pressure_copies = rx_pressure_copies_.load();
  s.channels_scaled_up = scale_ups_.load();
  s.channels_drained = scale_downs_.load();
  s.window_updates = window_updates_.load();
  s.ctl_backlog = ctl_backlog_len_.load(std::memory_order_relaxed);
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
    for (const auto& slot : c.batches_by_channel)
      if (const uint32_t id = slot.id.load(std::memory_order_relaxed))
        si.batches_by_channel.emplace_back(id - 1, slot.batches.load(std::memory_order_relaxed));
    std::sort(si.batches_by_channel.begin(), si.batches_by_channel.end());
    si.batches_other = c.batches_other.load(std::memory_order_relaxed);
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
  return {std::string(p->name()), p->Explain(), p->AllKnobs()};
}

absl::Status StackImpl::SetPolicy(const std::string& name,
                                  const std::vector<std::pair<std::string, std::string>>& knobs) {
  // A fresh policy object, built and validated before the swap: a bad knob changes nothing.
  // Setting the active policy again keeps its other knobs; the copy knobs every policy has carry
  // over to a new one.
  auto cur = policy();
  sched::Knobs all = cur->name() == name ? cur->AllKnobs() : cur->CopyKnobs();
  all.insert(all.end(), knobs.begin(), knobs.end());
  auto p = sched::CreatePolicy(name, all);
  if (!p.ok()) return p.status();
  {
    std::lock_guard g(policy_mu_);
    retired_skips_.fetch_add(policy_->skips(), std::memory_order_relaxed);
    policy_ = std::move(*p);
  }
  policy_version_.fetch_add(1, std::memory_order_release);
  {
    std::lock_guard g(scale_mu_);
    scale_cv_.notify_all();  // a policy that scales starts its 100 ms ticks now
  }
  std::lock_guard g(workers_mu_);
  PlaceCopyWorkersLocked();
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

std::shared_ptr<Conn> StackImpl::NewClientConn(uint32_t ip, uint16_t port, Peer* peer,
                                               const SocketOptions& o) {
  std::lock_guard g(mu_);
  for (int tries = 0; tries < 20000; ++tries) {
    const uint16_t lp = next_port_;
    next_port_ = next_port_ >= 60999 ? 40000 : next_port_ + 1;
    ConnKey k{ip, lp, port};
    if (conns_.contains(k)) continue;
    auto c = std::make_shared<Conn>(k, netch::RandomU32() | 1, o.app_class, o.rcvbuf);
    c->id = NextId();
    c->peer = peer;
    conns_[k] = c;
    return c;
  }
  return nullptr;
}

absl::StatusOr<std::unique_ptr<VirtualSocket>> StackImpl::Connect(uint32_t ip, uint16_t port,
                                                                  const SocketOptions& o) {
  if (port == 0 || ip == 0) return SockError(EINVAL, "connect to address 0 or port 0");
  if (o.rcvbuf < 4096) return SockError(EINVAL, "rcvbuf below 4096 bytes");
  const uint64_t end =
      NowUs() + static_cast<uint64_t>(absl::ToInt64Microseconds(o.connect_timeout));
  Peer* p = peers_->Get(ip);
  const int want = ChannelsWanted(*p);
  if (o.nonblocking && p->live_count() == 0) {
    // The first connection to a new (or unreachable) peer must not hold an event loop for the
    // channel handshake, up to the whole connect timeout: its NCSYN leaves from the dispatcher
    // once a channel is up (ServeAwaitingChannels); EINPROGRESS now.
    uint64_t failures = 0;
    if (auto st = peers_->StartOpen(p, want, o.connect_timeout, end, Placer(want), &failures);
        !st.ok())
      return st;
    auto c = NewClientConn(ip, port, p, o);
    if (!c) return SockError(EADDRNOTAVAIL, "no free local port");
    c->connect_deadline_us = end;
    c->open_failures_seen = failures;
    {
      std::lock_guard g(mu_);
      connecting_.push_back(c);
      awaiting_channels_.push_back(c);
      awaiting_.store(true, std::memory_order_release);
    }
    WakeDispatcher();
    return MakeSocket(this, c, o);
  }
  auto peer = peers_->Ensure(ip, want, o.connect_timeout, Placer(want));
  if (!peer.ok()) return peer.status();
  std::shared_ptr<Conn> c = NewClientConn(ip, port, *peer, o);
  if (!c) return SockError(EADDRNOTAVAIL, "no free local port");
  auto ctl = (*peer)->ControlChannel();
  auto st = ctl ? SendControlWait(*ctl, *c, NC_SYN, c->rcvbuf, o.connect_timeout)
                : SockError(ECONNRESET, "no channel to the peer");
  if (!st.ok()) {
    Unregister(c);
    return st;
  }
  if (o.nonblocking) {
    // The handshake finishes without us: NCSYN_ACK or RST arrive through the dispatcher, which
    // also times the connection out (WakeSender makes write_fd() readable either way).
    c->connect_deadline_us = end;
    {
      std::lock_guard g(mu_);
      connecting_.push_back(c);
    }
    return MakeSocket(this, c, o);
  }
  while (c->state.load() == ConnState::kConnecting && NowUs() < end) {
    pollfd p{c->wefd, POLLIN, 0};
    c->BeginWait();
    if (c->state.load() == ConnState::kConnecting) poll(&p, 1, 5);
    c->EndWait();
  }
  switch (c->state.load()) {
    case ConnState::kEstablished:
      return MakeSocket(this, c, o);
    case ConnState::kConnecting:
      c->state = ConnState::kTimedOut;  // our own timeout ended it
      [[fallthrough]];
    default:
      Unregister(c);
      return ConnStateError(c->state.load());
  }
}

std::function<void(size_t, chan::ChannelParams*)> StackImpl::Placer(int count) {
  return [this, count](size_t index, chan::ChannelParams* cp) {
    const sched::Placement pl =
        policy()->PlaceChannel(index, static_cast<size_t>(count), driver_->queue_count(),
                               static_cast<int>(driver_->Engines().size()));
    cp->queue = pl.queue;
    cp->engine = pl.engine;
  };
}

absl::Status StackImpl::SetPeerChannels(uint32_t ip, int n) {
  if (n < 1 || n > 64) return absl::InvalidArgumentError("channels per peer must be 1..64");
  Peer* p = peers_->Get(ip);
  const int live = static_cast<int>(p->live_count());
  if (live == 0) return absl::NotFoundError("no channel to that peer: connect first");
  p->target.store(n, std::memory_order_relaxed);
  if (n > live) {
    auto st = peers_->Ensure(ip, n, absl::Seconds(2), Placer(n));
    if (!st.ok()) return st.status();
    scale_ups_.fetch_add(n - live, std::memory_order_relaxed);
    return absl::OkStatus();
  }
  // Scale down: the newest channels are sealed by the dispatcher (an NC_DRAIN after their last
  // segment) and destroyed once both sides have sealed them and every byte on them is acked
  // and read.
  // (Counted again: a channel may have been sealed or died since live_count().)
  const auto newest = p->LiveBeyondOldest(static_cast<size_t>(n));
  std::lock_guard g(drain_mu_);
  for (const auto& ch : newest) drain_requests_.push_back(ch);
  WakeDispatcher();
  return absl::OkStatus();
}

void StackImpl::ExpireConnects() {
  const uint64_t now = NowUs();
  std::lock_guard g(mu_);
  std::erase_if(connecting_, [&](const std::shared_ptr<Conn>& c) {
    if (c->state.load() != ConnState::kConnecting) return true;
    if (now < c->connect_deadline_us) return false;
    FailConnectLocked(c, ConnState::kTimedOut);
    return true;
  });
}

void StackImpl::FailConnectLocked(const std::shared_ptr<Conn>& c, ConnState fail) {
  ConnState want = ConnState::kConnecting;
  if (!c->state.compare_exchange_strong(want, fail)) return;
  if (auto it = conns_.find(c->key); it != conns_.end() && it->second == c) conns_.erase(it);
  c->Signal();
  c->WakeSender();
}

namespace {
thread_local bool t_loop_polls_on_wait = false;
}  // namespace

void Stack::SetLoopPollsOnWait(bool polls) { t_loop_polls_on_wait = polls; }

void StackImpl::WatchWritable(const std::shared_ptr<Conn>& c) {
  bool added = false;
  {
    std::lock_guard g(watch_mu_);
    if (!c->watched.load(std::memory_order_relaxed)) {  // (once: whoever checks finds it)
      c->watched.store(true, std::memory_order_release);
      watch_.push_back(c);
      added = true;
    }
  }
  if (added) watching_.store(true, std::memory_order_seq_cst);
  if (t_loop_polls_on_wait) {
    // The loop's next wait runs the rounds that check it (PollInline → CheckWatched).
    if (added) watch_unannounced_.store(true, std::memory_order_relaxed);
    return;
  }
  if (added || watch_unannounced_.exchange(false, std::memory_order_relaxed)) WakeDispatcher();
}

void StackImpl::HandOverWatches() {
  if (watch_unannounced_.load(std::memory_order_relaxed) &&
      watch_unannounced_.exchange(false, std::memory_order_relaxed) &&
      watching_.load(std::memory_order_seq_cst))
    WakeDispatcher();
}

void StackImpl::CheckWatched() {
  std::lock_guard g(watch_mu_);
  // Room is shared out in watch order, a segment's worth per socket: an event loop's 50
  // sockets blocked on one channel, all woken for the few buffers the engine just freed, had
  // most find it full again and re-arm their write interest (Redis MSET -P 16 under netchrun
  // spent a quarter of its loop on such retries).
  room_.clear();
  auto room = [&](const chan::Channel& ch) -> uint32_t& {
    for (auto& [c, n] : room_)
      if (c == &ch) return n;
    return room_.emplace_back(&ch, ch.writable_segments()).second;
  };
  std::erase_if(watch_, [&](const std::weak_ptr<Conn>& w) {
    auto c = w.lock();
    if (!c) return true;
    if (c->closed.load(std::memory_order_relaxed) || c->wsignaled.load(std::memory_order_acquire)) {
      c->watched.store(false, std::memory_order_release);
      return true;
    }
    if (!c->peer) return false;
    const auto live = c->peer->Live();
    std::lock_guard m(c->map_mu);
    auto wanted = [&](const chan::Channel& ch) {
      return std::find(c->full_ids.begin(), c->full_ids.end(), ch.id()) != c->full_ids.end();
    };
    // The full channels may have gone since (scaled down, failed): then any channel will do.
    const bool any =
        std::none_of(live.begin(), live.end(), [&](const auto& ch) { return wanted(*ch); });
    for (const auto& ch : live) {
      if (uint32_t& r = room(*ch); (any || wanted(*ch)) && r > 0) {
        if (r != UINT32_MAX) --r;
        c->SignalWritable();
        c->watched.store(false, std::memory_order_release);
        return true;
      }
    }
    return false;
  });
  watching_.store(!watch_.empty(), std::memory_order_release);
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

absl::Status StackImpl::SendControl(chan::Channel& ch0, const ConnKey& k, uint32_t conn_id,
                                    AppClass cls, uint8_t type, uint64_t seq) {
  chan::TxSegment s;
  s.hdr = {type, static_cast<uint8_t>(cls), k.local_port, k.remote_port, conn_id, seq};
  // A channel sealed for scale-down takes nothing more: control segments go on the peer's
  // control channel instead.
  std::shared_ptr<chan::Channel> alt;
  if (ch0.sealed()) alt = peers_->Get(ch0.peer_ipv4())->ControlChannel();
  chan::Channel& ch = alt ? *alt : ch0;
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

int Errno(const absl::Status& s) { return StatusErrno(s); }

absl::StatusOr<std::unique_ptr<Stack>> Stack::Create(const StackOptions& opts) {
  auto s = std::make_unique<StackImpl>(opts);
  if (auto st = s->Init(); !st.ok()) return st;
  return std::unique_ptr<Stack>(std::move(s));
}

}  // namespace netch::vns
