// dispatcher.cc - the stack's dispatcher thread: drains every channel, demultiplexes segments to
// connections by port pair and conn_id, answers NCSYNs, tracks dead channels and breaks the
// connections they carried.
#include <array>
#include <span>

#include "vns_lib/stack_impl.h"

namespace netch::vns {

// How long an idle dispatcher sleeps between looks (NothingToRetryLocked): everything else that
// needs it — a segment, a failed channel, a new channel, a socket that read — wakes it.
constexpr uint64_t kIdleDispatchSleepUs = 250'000;
// A non-blocking connect gets a channel opening of its own (ReopenFor) only with this much of
// its timeout left.
constexpr uint64_t kReopenMinUs = 50'000;

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

bool StackImpl::Deliver(chan::Channel* ch, RxLane& lane, const chan::RxSegment& seg) {
  const wire::SegHeader& h = seg.hdr;
  lane.shared |= h.type != NC_DATA;
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
        {
          std::lock_guard r(c->rx_mu);
          c->rx_chans.push_back(ch);
        }
        std::lock_guard g2(mu_);
        conns_[key] = c;
        l->accept_q.push_back(c);
      }
      QueueControl(ch, c->key, c->conn_id, c->app_class, NC_SYN_ACK, c->rcvbuf);
      l->Signal();
      release();
      return true;
    }
    case NC_DRAIN:
      // The peer puts nothing more on this channel: we seal our side too (the dispatcher's
      // drain step), and both destroy it once everything on it is acknowledged and read.
      // seq 0: the peer scales down; 1: the peer answers our NC_DRAIN.
      drained_by_peer_.insert(ch);
      if (h.seq == 0) peer_initiated_.insert(ch);
      if (!ch->sealed()) to_seal_.push_back(ch);
      release();
      return true;
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
    // Data (or a handshake answer) for a connection that is gone: the sender must learn it. A
    // window update or FIN is what a peer sends while we close (its reads after our FIN, its own
    // FIN crossing ours): answering those with RST would turn its clean end of stream into a
    // reset, as TCP's TIME_WAIT exists to avoid.
    if (h.type == NC_DATA || h.type == NC_SYN_ACK) Rst(ch, h);
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
  {
    std::lock_guard r(c->rx_mu);
    if (std::find(c->rx_chans.begin(), c->rx_chans.end(), ch) == c->rx_chans.end())
      c->rx_chans.push_back(ch);
  }
  switch (h.type) {
    case NC_SYN_ACK: {
      c->snd_limit.store(h.seq, std::memory_order_release);
      ConnState want = ConnState::kConnecting;
      c->state.compare_exchange_strong(want, ConnState::kEstablished);
      c->WakeSender();  // writable: the connect completed
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
    case NC_WND:
      c->RaiseSendLimit(h.seq);
      release();
      return true;
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
  HeldSeg hs = HeldSeg::Of(ch, seg);
  std::unique_lock r(c->rx_mu);  // engines deliver to the same socket (DeliverData)
  if (c->inq.Room() == 0) return false;
  lane.NoteSocket(c->id);
  const bool copied = ch->rx_under_pressure() && lane.Shared(*ch);
  if (copied) {
    // Sockets hold more than half of this channel's buffers (a slow reader) and other sockets'
    // data shares it: keep a private copy and give the buffer back, so the channel keeps
    // flowing for every socket on it (RxLane::NoteSocket). Off the fast path: a reader that
    // keeps up never gets here.
    auto* copy = new uint8_t[hs.len];
    std::memcpy(copy, hs.data, hs.len);
    hs.data = copy;
    hs.ch = nullptr;
    rx_pressure_copies_.fetch_add(1, std::memory_order_relaxed);
  }
  c->inq.PushOne(hs);
  r.unlock();
  // Released only now: a Release may wait for the engine, whose inline delivery may be waiting
  // for this socket's rx_mu.
  if (copied) release();
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
      bool used;
      {
        std::lock_guard r(c->rx_mu);
        used = std::find(c->rx_chans.begin(), c->rx_chans.end(), ch) != c->rx_chans.end();
      }
      if (!used) {
        std::lock_guard m(c->map_mu);
        used = std::find(c->tx_chans.begin(), c->tx_chans.end(), ch) != c->tx_chans.end();
      }
      if (used) hit.push_back(c);
    }
  }
  auto ctl = p.ControlChannel();
  for (const auto& c : hit) {
    c->broken_cause.store(ch->fail_cause(), std::memory_order_relaxed);
    c->broken.store(true, std::memory_order_release);
    conns_broken_.fetch_add(1, std::memory_order_relaxed);
    c->Signal();
    c->WakeSender();
    // The other end may not have seen this channel fail (or may wait on a hole it left).
    if (ctl) QueueControl(ctl.get(), c->key, c->conn_id, c->app_class, NC_RST);
  }
}

bool StackImpl::NothingToRetryLocked() {
  if (!ctl_backlog_.empty() || !to_seal_.empty() || !sealed_by_us_.empty() ||
      !drained_by_peer_.empty())
    return false;
  for (const DispatchChan& cs : dchans_)
    if (cs.dead || cs.drained) return false;
  std::lock_guard g(mu_);
  return connecting_.empty();
}

bool StackImpl::SealRequested() {
  bool any = false;
  std::erase_if(to_seal_, [&](chan::Channel* ch) {
    if (sealed_by_us_.contains(ch)) return true;
    if (!IsLive(ch->state())) return true;  // died meanwhile: the dead-channel path has it
    chan::TxSegment last;
    last.hdr = {NC_DRAIN, 0, 0, 0, 0, initiated_by_us_.contains(ch) ? 0u : 1u};
    if (!ch->Seal(last)) return false;  // no room yet: next round
    sealed_by_us_.insert(ch);
    peers_->Get(ch->peer_ipv4())->NoteSealed();
    any = true;
    return true;
  });
  return any;
}

bool StackImpl::DeliverPending(DispatchChan& cs, bool* worked) {
  std::deque<chan::RxSegment>& pending = cs.lane->pending;
  while (!pending.empty() && Deliver(cs.ch.get(), *cs.lane, pending.front())) {
    pending.pop_front();
    *worked = true;
  }
  return pending.empty();
}

bool StackImpl::DeliverNew(DispatchChan& cs, bool* worked) {
  const std::span<chan::RxSegment> segs(cs.lane->batch);
  std::deque<chan::RxSegment>& pending = cs.lane->pending;
  const size_t n = cs.ch->Dequeue(SIZE_MAX, segs);
  if (n == 0) return pending.empty();
  *worked = true;
  segments_in_.fetch_add(n, std::memory_order_relaxed);
  for (size_t i = 0; i < n; ++i) {
    if (!pending.empty() || !Deliver(cs.ch.get(), *cs.lane, segs[i])) {
      if (pending.empty()) blocked_.fetch_add(1, std::memory_order_relaxed);
      pending.push_back(segs[i]);
    }
  }
  return pending.empty();
}

bool StackImpl::DeliverData(chan::Channel& ch, RxLane& lane, const chan::RxSegment& seg) {
  const wire::SegHeader& h = seg.hdr;
  // Deliver's rules, its fast cases only: data, and the peer's window updates (another
  // socket's, on the peer's control channel, sit between an L-app socket's segments). A buffer
  // a shared channel needs back (rx pressure) is copied, and a copy is the dispatcher's to make.
  const bool wnd = h.type == NC_WND;
  if (!wnd && (h.type != NC_DATA || seg.payload.empty())) return false;
  auto c = Lookup(ConnKey{ch.peer_ipv4(), h.dst_port, h.src_port});
  if (!c || c->conn_id != h.conn_id) return false;
  if (!wnd) {
    if (c->closed.load() || c->state.load() != ConnState::kEstablished ||
        h.seq + seg.payload.size() > c->adv_edge.load(std::memory_order_acquire))
      return false;
    lane.NoteSocket(c->id);
    if (ch.rx_under_pressure() && lane.Shared(ch)) return false;
  }
  {
    std::lock_guard g(c->rx_mu);
    if (std::find(c->rx_chans.begin(), c->rx_chans.end(), &ch) == c->rx_chans.end()) return false;
    if (wnd) {
      if (!ch.TryRelease(seg)) return false;
      lane.shared = true;
    } else {
      if (c->inq.Room() == 0) return false;
      c->inq.PushOne(HeldSeg::Of(&ch, seg));
    }
  }
  if (wnd) {
    c->RaiseSendLimit(h.seq);
  } else {
    c->Signal();
  }
  return true;
}

RxLane* StackImpl::InlineLane(const chan::Channel* ch) {
  struct Memo {
    const chan::Channel* ch = nullptr;
    std::shared_ptr<RxLane> lane;
  };
  // (An engine serves a few queues' channels; a miss only costs the locked lookup.)
  thread_local std::array<Memo, 8> t_memo;
  thread_local size_t t_next = 0;
  for (Memo& m : t_memo)
    if (m.ch == ch && !m.lane->left.load(std::memory_order_acquire)) return m.lane.get();
  std::shared_ptr<RxLane> lane = Lane(ch);
  if (!lane) return nullptr;
  Memo& m = t_memo[t_next++ % t_memo.size()];
  m = {ch, std::move(lane)};
  return m.lane.get();
}

bool StackImpl::DeliverInline(chan::Channel& ch) {
  inline_active_.fetch_add(1, std::memory_order_seq_cst);
  struct Leave {
    std::atomic<int>& n;
    ~Leave() { n.fetch_sub(1, std::memory_order_release); }
  } leave{inline_active_};
  if (!deliver_inline_.load(std::memory_order_seq_cst)) return false;
  RxLane* lane = InlineLane(&ch);
  // A lane a socket busy-polls is that socket's to drain (it takes its own segments first,
  // right after this round, or when it comes back for more): left alone, as the dispatcher
  // leaves it, until the poller has been gone for kStandDownRecheckUs after its lease. A lane
  // holding segments back is the dispatcher's: they go first.
  if (!lane ||
      lane->polled_until_us.load(std::memory_order_relaxed) + chan::kStandDownRecheckUs >
          chan::RoundNowUs() ||
      lane->npending.load(std::memory_order_relaxed) != 0 || !lane->TryOwn())
    return false;
  bool all = !lane->gone && lane->pending.empty();
  const std::span<chan::RxSegment> segs(lane->batch);
  while (all) {
    const size_t n = ch.Dequeue(SIZE_MAX, segs);
    segments_in_.fetch_add(n, std::memory_order_relaxed);
    size_t k = 0;
    while (k < n && DeliverData(ch, *lane, segs[k])) ++k;
    for (size_t j = k; j < n; ++j) lane->pending.push_back(segs[j]);
    all = k == n;
    if (n < segs.size()) break;
  }
  lane->Disown();
  if (all) deliveries_inline_.fetch_add(1, std::memory_order_relaxed);
  return all;  // false: the dispatcher is told, and finds the rest in the lane
}

void StackImpl::ServeChannel(DispatchChan& cs, bool* worked) {
  if (!DeliverPending(cs, worked)) return;  // still blocked: leave the channel's window to close
  // Scale-down: the side that asked destroys the channel once the peer's answer arrived (it
  // follows every byte the peer put on the channel, and the peer sent it after our NC_DRAIN,
  // so every byte of ours reached it) and the sockets gave back every buffer of it. The
  // answering side waits for that close (the dead-channel path below): were it to destroy
  // too, segments still queued in its own send ring could be dropped. (Both sides asking at
  // once: each destroys once its own bytes are acknowledged; Destroy lingers for them.)
  const chan::Channel* key = cs.ch.get();
  if (!cs.dead && sealed_by_us_.contains(key) && initiated_by_us_.contains(key) &&
      drained_by_peer_.contains(key) && cs.ch->rx_outstanding() == 0 &&
      (!peer_initiated_.contains(key) || cs.ch->tx_queued_bytes() == 0) && IsLive(cs.ch->state())) {
    cs.dead = cs.drained = true;
    scale_downs_.fetch_add(1, std::memory_order_relaxed);
    *worked = true;
  }
  if (!cs.dead && !IsLive(cs.ch->state())) {
    // Drain what it delivered before it died first (next rounds), then break whatever it
    // left incomplete.
    cs.dead = true;
    cs.peer->NoteDead(cs.ch->fail_cause());
    if (cs.ch->state() == chan::ChannelState::kFailed) BreakConnsOn(*cs.peer, cs.ch.get());
    *worked = true;
  }
  DeliverNew(cs, worked);
}

bool StackImpl::ServeAwaitingChannels() {
  const bool opening = peers_->FinishOpens();
  std::vector<std::shared_ptr<Conn>> waiting;
  {
    std::lock_guard g(mu_);
    waiting = awaiting_channels_;
  }
  // Looked at outside mu_ (a peer's lock is not taken under it); handled ones leave the list.
  std::vector<const Conn*> done;
  std::vector<std::pair<std::shared_ptr<Conn>, ConnState>> failed;
  for (const auto& c : waiting) {
    // Timed out (ExpireConnects), or closed by its socket before a channel came up: no NCSYN.
    if (c->state.load() != ConnState::kConnecting || c->closed.load()) {
      done.push_back(c.get());
      continue;
    }
    if (auto ctl = c->peer->ControlChannel()) {
      QueueControl(ctl.get(), c->key, c->conn_id, c->app_class, NC_SYN, c->rcvbuf);
      done.push_back(c.get());
      continue;
    }
    if (c->peer->open_failures() == c->open_failures_seen) continue;
    // The opening it waited for timed out on the deadline of the connect that started it
    // (joiners share an opening's outcome); this connect's own may be later. (Not for the last
    // few ms of it: connects started together would each leave a doomed opening behind.)
    if (c->peer->open_errno() == ETIMEDOUT && NowUs() + kReopenMinUs < c->connect_deadline_us &&
        ReopenFor(*c))
      continue;
    failed.emplace_back(c, ConnStateFor(c->peer->open_errno()));
    done.push_back(c.get());
  }
  std::lock_guard g(mu_);
  for (const auto& [c, fail] : failed) FailConnectLocked(c, fail);
  std::erase_if(awaiting_channels_, [&](const std::shared_ptr<Conn>& c) {
    return std::find(done.begin(), done.end(), c.get()) != done.end();
  });
  awaiting_.store(!awaiting_channels_.empty(), std::memory_order_release);
  return opening || !awaiting_channels_.empty();
}

bool StackImpl::ReopenFor(Conn& c) {
  const int want = ChannelsWanted(*c.peer);
  const uint64_t left = c.connect_deadline_us - NowUs();
  uint64_t failures = 0;
  if (!peers_
           ->StartOpen(c.peer, want, absl::Microseconds(left), c.connect_deadline_us, Placer(want),
                       &failures)
           .ok())
    return false;
  c.open_failures_seen = failures;
  return true;
}

bool StackImpl::DispatchRound() {
  bool worked = false;
  if (watching_.load(std::memory_order_acquire)) CheckWatched();
  if (awaiting_.load(std::memory_order_acquire) || peers_->opens_pending())
    (void)ServeAwaitingChannels();
  if (const uint64_t now = NowUs(); now >= next_expiry_) {
    ExpireConnects();
    next_expiry_ = now + 10000;
  }
  // Control segments refused by a full channel, in order. A dead channel takes none: the
  // segment is dropped (its connection is broken or gone anyway).
  while (!ctl_backlog_.empty()) {
    const CtlMsg& m = ctl_backlog_.front();
    auto st = SendControl(*m.ch, m.key, m.conn_id, m.cls, m.type, m.seq);
    if (Errno(st) == EAGAIN) break;
    ctl_backlog_.pop_front();
    worked = true;
  }
  // Channels peers opened to us, on the engine the policy wants for their queue (a queue moves
  // as a whole; rare: once per channel a peer opens).
  while (auto ch = driver_->Accept()) {
    const chan::ChannelStats cs = ch->stats();
    const int engine = policy()->EngineForQueue(cs.queue, driver_->queue_count(),
                                                static_cast<int>(driver_->Engines().size()));
    if (engine >= 0 && engine != cs.engine) {
      if (auto st = driver_->MoveChannel(ch->id(), engine); !st.ok())
        fprintf(stderr, "netch: placing channel %u on engine %d: %s\n", ch->id(), engine,
                std::string(st.message()).c_str());
    }
    peers_->Get(ch->peer_ipv4())->Add(ch);
    worked = true;
  }
  // Pick up channels added by Connect/Accept.
  if (const uint64_t v = peers_->version(); v != known_version_) {
    known_version_ = v;
    peers_->ForEach([&](Peer& p) {
      for (auto& ch : p.All()) {
        bool have = false;
        for (auto& cs : dchans_) have |= cs.ch == ch;
        if (have) continue;
        auto lane = std::make_shared<RxLane>();
        lane->peer = &p;
        {
          std::lock_guard g(lanes_mu_);
          lanes_[ch.get()] = lane;
        }
        dchans_.push_back({ch, &p, std::move(lane)});
        if (deliver_inline_) ch->SetDeliveryHook(&delivery_hook_);
      }
    });
  }
  // Scale-down requests, for channels this round serves (so picked up above): the dispatcher's
  // sets keep raw pointers, which dchans_ keeps valid until it retires a channel and erases
  // them. A request for a channel already retired (the scaler saw it live just before its
  // drain finished) is dropped: its pointer may already name a new channel.
  {
    std::lock_guard g(drain_mu_);
    for (auto& ch : drain_requests_) {
      const bool served = std::any_of(dchans_.begin(), dchans_.end(), [&](const DispatchChan& cs) {
        return cs.ch == ch && !cs.dead;
      });
      if (!served) continue;
      to_seal_.push_back(ch.get());
      initiated_by_us_.insert(ch.get());
    }
    drain_requests_.clear();
  }
  worked |= SealRequested();
  for (DispatchChan& cs : dchans_) {
    if (!cs.lane->TryOwn()) continue;  // a busy-polling socket drains it right now
    ServeChannel(cs, &worked);
    cs.lane->Disown();
  }
  // A dead channel leaves once drained and once no socket holds a buffer of it (sockets keep
  // raw pointers to the channel of each segment they hold).
  std::erase_if(dchans_, [&](DispatchChan& cs) {
    // (A drained channel is still up: its engine may not have published the last deliveries
    // in stats() yet, so the consumer side's exact count decides.)
    // Either way no consumer may still be inside Release (it lowers rx_outstanding last).
    if (!cs.dead || cs.lane->npending.load(std::memory_order_relaxed) != 0 ||
        cs.ch->rx_outstanding() != 0 || (!cs.drained && cs.ch->stats().rx_queued_bytes != 0))
      return false;
    // A socket polling the lane is told it left (it drops it), under the lane.
    if (!cs.lane->TryOwn()) return false;
    {
      std::lock_guard g(lanes_mu_);
      lanes_.erase(cs.ch.get());
    }
    cs.lane->gone = true;
    cs.lane->left.store(true, std::memory_order_release);
    cs.lane->Disown();
    cs.ch->SetDeliveryHook(nullptr);
    if (cs.drained || cs.ch->sealed()) {
      // Control segments waiting for it go on the peer's control channel instead.
      auto ctl = cs.peer->ControlChannel();
      for (CtlMsg& m : ctl_backlog_)
        if (m.ch == cs.ch.get()) m.ch = ctl.get();
      std::erase_if(ctl_backlog_, [](const CtlMsg& m) { return m.ch == nullptr; });
    } else {
      std::erase_if(ctl_backlog_, [&](const CtlMsg& m) { return m.ch == cs.ch.get(); });
    }
    sealed_by_us_.erase(cs.ch.get());
    drained_by_peer_.erase(cs.ch.get());
    initiated_by_us_.erase(cs.ch.get());
    peer_initiated_.erase(cs.ch.get());
    std::erase(to_seal_, cs.ch.get());
    const uint64_t before = peers_->version();
    cs.peer->Remove(cs.ch.get());
    // Our own removal needs no rescan; a channel added meanwhile does (it bumped too).
    if (before == known_version_) known_version_ = before + 1;
    (void)driver_->Destroy(*cs.ch);
    return true;
  });
  bool any_pending = false;
  for (const DispatchChan& cs : dchans_)
    any_pending |= cs.lane->npending.load(std::memory_order_relaxed) != 0;
  // Announce the hold, then look again: a socket that read just before seeing holding_ set
  // did not wake us, so the room it freed in its inbound ring must be noticed here (the same
  // pairing as the engines' sleeping flag; the reader stores rcv_next, then loads holding_).
  holding_.store(any_pending, std::memory_order_seq_cst);
  if (any_pending && !worked) {
    for (DispatchChan& cs : dchans_) {
      if (cs.lane->npending.load(std::memory_order_relaxed) == 0 || !cs.lane->TryOwn()) continue;
      auto& pending = cs.lane->pending;
      while (!pending.empty() && Deliver(cs.ch.get(), *cs.lane, pending.front())) {
        pending.pop_front();
        worked = true;
      }
      cs.lane->Disown();
    }
  }
  ctl_backlog_len_.store(ctl_backlog_.size(), std::memory_order_relaxed);
  return worked;
}

const std::vector<std::shared_ptr<chan::Channel>>& StackImpl::AllChannels(ChannelCache& cache) {
  if (const uint64_t v = peers_->version(); v != cache.version || cache.chans.empty()) {
    cache.version = v;
    cache.chans.clear();
    peers_->ForEach([&](Peer& p) {
      for (auto& ch : p.All()) cache.chans.push_back(ch);
    });
  }
  return cache.chans;
}

bool StackImpl::PollInline(uint64_t stand_down_us) {
  std::unique_lock il(inline_mu_, std::try_to_lock);
  if (!il.owns_lock()) return false;  // another thread polls the stack right now
  const uint64_t now = NowUs();
  bool worked = false;
  // Every engine once (a channel's PollInline runs its engine's whole round; an engine serving
  // several channels runs once per channel, cheap when idle).
  const auto& chans = AllChannels(inline_chans_);
  for (const auto& ch : chans) worked |= ch->PollInline(now, stand_down_us);
  std::unique_lock l(dispatch_mu_, std::try_to_lock);
  if (!l.owns_lock()) return worked;  // the dispatcher (or another poller) is in a round
  if (dispatch_stand_down_until_us_.load(std::memory_order_relaxed) < now + stand_down_us) {
    dispatch_stand_down_until_us_.store(now + stand_down_us, std::memory_order_relaxed);
    CoverPolledUntil(now + stand_down_us);
  }
  worked |= DispatchRound();
  inline_rounds_.fetch_add(1, std::memory_order_relaxed);
  return worked;
}

size_t StackImpl::BorrowInputs(std::span<chan::InputLoan> out) {
  if (!opts_.receive_inline || !opts_.deliver_inline) return 0;
  std::lock_guard g(loan_mu_);
  size_t n = 0;
  for (const auto& ch : AllChannels(loan_chans_)) {
    if (n == out.size()) break;
    if (!IsLive(ch->state())) continue;
    chan::InputLoan l = ch->BorrowInput();
    if (!l) continue;
    bool dup = false;
    for (size_t i = 0; i < n && !dup; ++i) dup = out[i].same_engine(l);
    if (!dup) out[n++] = std::move(l);  // (a duplicate returns as it goes)
  }
  return n;
}

void StackImpl::EndPollInline() {
  std::lock_guard l(dispatch_mu_);
  for (const auto& cs : dchans_) cs.ch->EndPollInline();
  if (dispatch_stand_down_until_us_.exchange(0, std::memory_order_relaxed) != 0) WakeDispatcher();
}

void StackImpl::Dispatch() {
  uint64_t idle_since = NowUs();
  std::vector<pollfd> fds;
  std::vector<chan::Channel*> armed;
  while (!stop_.load(std::memory_order_relaxed)) {
    bool worked;
    uint64_t now;
    int sleep_us = 0;
    size_t standby_at = SIZE_MAX;  // the standby timer's place in fds, if there
    fds.clear();
    {
      std::lock_guard g(dispatch_mu_);
      // A busy-polling application thread runs the rounds for now (PollInline): stay off its
      // core until it stops or the stand-down ends.
      now = NowUs();
      const uint64_t until = dispatch_stand_down_until_us_.load(std::memory_order_relaxed);
      worked = until > now ? false : DispatchRound();
      now = NowUs();
      if (worked) {
        idle_since = now;
        continue;
      }
      if (until <= now && now - idle_since < opts_.dispatcher_spin_us) {
        sleep_us = -1;  // spin: yield below, outside the lock
      } else {
        // Sleep until a channel has data, a socket read (unblocking a channel), or a new
        // channel.
        fds.push_back({wake_fd_, POLLIN, 0});
        fds.push_back({driver_->accept_fd(), POLLIN, 0});
        uint64_t polled_until = 0;
        for (DispatchChan& cs : dchans_) {
          // A channel held back for a full socket has data waiting by definition; what
          // unblocks it is the socket reading, which writes wake_fd_. A channel a socket
          // busy-polls is that socket's to drain: its segments must not wake us (the socket
          // wakes us when it stops, or hands us what is not its own).
          if (cs.lane->npending.load(std::memory_order_relaxed) != 0) continue;
          if (const uint64_t p = cs.lane->polled_until_us.load(std::memory_order_relaxed);
              p > now) {
            polled_until = std::max(polled_until, p);
            continue;
          }
          if (until > now) continue;  // the stack is busy-polled: nothing arms
          cs.ch->ArmNotify(chan::Channel::kReadable);
          fds.push_back({cs.ch->notify_fd(chan::Channel::kReadable), POLLIN, 0});
        }
        // A polled lane, or a stack stood down for a poller, is looked at again once its poller
        // may have stopped renewing it without saying so: when the standby timer the pollers
        // push ahead fires (chan::StandbyTimer), not every few milliseconds — each wakeup
        // pre-empts a spinner.
        // (Connections waiting for a peer's first channel: looked at each millisecond, as the
        // channels' handshakes do not wake us.)
        uint64_t sleep = watching_.load(std::memory_order_acquire) ||
                                 awaiting_.load(std::memory_order_acquire) ||
                                 peers_->opens_pending()
                             ? 1000
                         : NothingToRetryLocked() ? kIdleDispatchSleepUs
                                                  : 10000;
        if (const uint64_t polled = std::max(polled_until, until); polled > now) {
          CoverPolledUntil(polled);
          standby_at = fds.size();
          fds.push_back({dispatch_standby_.fd(), POLLIN, 0});
        }
        sleep_us = static_cast<int>(sleep);
      }
    }
    if (sleep_us < 0) {
      std::this_thread::yield();
      continue;
    }
    const timespec ts{static_cast<time_t>(sleep_us / 1'000'000),
                      static_cast<long>(sleep_us % 1'000'000) * 1000};
    dispatch_sleeps_.fetch_add(1, std::memory_order_relaxed);
    if (ppoll(fds.data(), fds.size(), &ts, nullptr) > 0) {
      for (size_t i = 0; i < fds.size(); ++i) {
        if (i == 1 || !(fds[i].revents & POLLIN)) continue;  // (accept fd: cleared by Accept())
        if (i == standby_at) {
          dispatch_standby_.Fired();
          continue;
        }
        uint64_t v;
        (void)!read(fds[i].fd, &v, sizeof(v));
      }
    }
  }
  // Whatever is still held goes back to its channel.
  std::lock_guard g(dispatch_mu_);
  for (DispatchChan& cs : dchans_) {
    // (Even a lane someone owns: no thread's InlineLane memo may take it for a later channel
    // at the same address.)
    cs.lane->left.store(true, std::memory_order_release);
    if (!cs.lane->TryOwn()) continue;
    for (auto& s : cs.lane->pending) cs.ch->Release({&s, 1});
    cs.lane->pending.clear();
    cs.lane->gone = true;
    cs.lane->Disown();
  }
  std::lock_guard l(lanes_mu_);
  lanes_.clear();
}

}  // namespace netch::vns
