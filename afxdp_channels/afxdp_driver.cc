#include "afxdp_channels/afxdp_driver.h"

#include <arpa/inet.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <bitset>
#include <condition_variable>
#include <mutex>
#include <random>

#include "absl/strings/str_format.h"
#include "afxdp_channels/channel_core.h"
#include "afxdp_channels/engine.h"
#include "afxdp_channels/netdev.h"
#include "afxdp_channels/transport.h"
#include "afxdp_channels/xsk.h"
#include "bpf/steer_program.h"
#include "common/netns.h"

namespace netch::chan {
namespace {

using afxdp::kNoFrame;
using afxdp::Transport;
using afxdp::TransportConfig;
using afxdp::TxPacket;

constexpr uint32_t kBatch = 64;
constexpr uint32_t kChanRing = 256;       // per-channel SPSC rings
constexpr uint32_t kCtlReserve = 64;      // frames kept for ACKs and handshakes
constexpr uint16_t kSrcPortBase = 49152;  // channel id -> UDP source port (RSS/ECMP entropy)

uint32_t RandomIsn() {
  thread_local std::mt19937 rng{std::random_device{}()};
  return rng();
}

class AfxdpDriver;
class XskQueue;

// Handshake progress, engine-side.
enum class Hs : uint8_t { kSynSent, kEstablished, kDead };

class AfxdpChannel final : public ChannelCore {
 public:
  AfxdpChannel(uint32_t id, size_t max_payload, afxdp::Umem* umem)
      : ChannelCore(id, kChanRing, max_payload), umem_(umem) {}
  uint8_t* BufAddr(uint64_t token) override { return umem_->Data(token); }
  uint32_t peer_ipv4() const override { return peer_ip; }

  // Engine-side state: touched only by the engine running the channel's queue (and by the
  // creating thread before the channel is handed to that engine).
  afxdp::Umem* umem_;
  XskQueue* queue = nullptr;
  wire::FrameAddrs addrs;
  uint32_t peer_ip = 0;
  uint16_t peer_chan = 0;
  uint32_t isn = 0;
  bool active = false;
  bool send_synack = false;
  Hs hs = Hs::kSynSent;
  uint64_t syn_next_us = 0, syn_rto_us = 0, connect_deadline_us = 0;
  uint64_t rx_held = 0;  // delivered to rxq_, not yet returned
  std::unique_ptr<Transport> transport;
};

struct QueueCounters {
  std::atomic<uint64_t> rx_frames{0}, rx_malformed{0}, rx_unknown_chan{0}, handshakes_rx{0},
      fill_ring_empty{0}, tx_ring_full{0}, frames_free{0}, frames_in_fill{0};
};

class XskQueue final : public EngineTask, public Transport::BufferOwner {
 public:
  XskQueue(AfxdpDriver* d, uint32_t q) : driver_(d), queue_(q), by_id_(NC_MAX_CHANNELS, nullptr) {}

  absl::Status Open(const std::string& ifname, uint32_t frames);
  ~XskQueue() override;

  bool Run(uint64_t now_us, uint64_t* deadline_us) override;
  int wait_fd() const override { return xsk_->fd(); }

  void ReleaseTx(uint64_t handle) override { umem_->FreeFrame(handle); }
  void ReleaseRx(uint64_t handle) override { umem_->FreeFrame(handle); }

  // Control operations, applied by the engine running the queue; return once applied.
  void AddChannel(AfxdpChannel* ch);
  void RemoveChannel(AfxdpChannel* ch, bool send_fin);

  uint32_t queue() const { return queue_; }
  afxdp::Umem* umem() { return umem_.get(); }
  afxdp::XskSocket* xsk() { return xsk_.get(); }
  size_t channel_count() const { return nchans_.load(std::memory_order_relaxed); }
  QueueCounters counters;

 private:
  struct Op {
    AfxdpChannel* ch;
    bool add;
    bool fin;
  };
  void PostOp(const Op& op);
  void ApplyOps(uint64_t now);
  void HandleFrame(const xdp_desc& d, uint64_t now);
  void HandleSyn(const wire::ParsedFrame& pf, const uint8_t* frame, uint64_t now);
  bool RunChannel(AfxdpChannel& ch, uint64_t now, uint64_t* deadline);
  void Establish(AfxdpChannel& ch, const wire::ChanHeader& h, uint64_t now);
  void Kill(AfxdpChannel& ch, ChannelState st);
  bool Drain(AfxdpChannel& ch);
  // Sends one header-only packet (handshake, FIN, RST); false when no frame or TX slot is free.
  bool SendControl(const wire::FrameAddrs& a, const wire::ChanHeader& h);
  wire::ChanHeader HandshakeHeader(const AfxdpChannel& ch, uint8_t type, uint64_t now) const;
  void Publish(AfxdpChannel& ch);

  AfxdpDriver* driver_;
  const uint32_t queue_;
  std::unique_ptr<afxdp::Umem> umem_;
  std::unique_ptr<afxdp::XskSocket> xsk_;
  uint32_t fill_target_ = 0;

  std::vector<AfxdpChannel*> chans_;  // engine-side
  std::vector<AfxdpChannel*> by_id_;  // engine-side, indexed by local channel id
  std::atomic<size_t> nchans_{0};

  std::mutex ops_mu_;
  std::condition_variable ops_cv_;
  std::vector<Op> ops_;
  uint64_t ops_posted_ = 0, ops_done_ = 0;
  std::atomic<bool> ops_pending_{false};
};

class AfxdpDriver final : public Driver {
 public:
  explicit AfxdpDriver(const DriverOptions& o) : opts_(o) {}
  ~AfxdpDriver() override;
  absl::Status Init();

  std::string_view name() const override { return "afxdp"; }
  absl::StatusOr<std::shared_ptr<Channel>> Connect(const ChannelParams& params) override;
  std::shared_ptr<Channel> Accept() override;
  int accept_fd() const override { return accept_q_.fd(); }
  absl::Status Destroy(Channel& ch) override;
  absl::Status MoveChannel(uint32_t id, int engine) override;
  std::vector<EngineInfo> Engines() const override;
  DriverStats Stats() const override;
  std::vector<std::shared_ptr<Channel>> Channels() const override;

  // ---- for XskQueue ---------------------------------------------------------------------------
  const afxdp::InterfaceInfo& ifinfo() const { return ifi_; }
  const DriverOptions& opts() const { return opts_; }
  size_t max_payload() const { return max_payload_; }
  TransportConfig TransportFor(uint16_t local, uint16_t peer, uint32_t isn_send,
                               uint32_t isn_recv) const;
  // A channel a peer opened: registers it (id, steering) or returns nullptr when refused.
  AfxdpChannel* NewPassive(XskQueue* q, uint32_t peer_ip, uint16_t peer_chan,
                           const wire::MacAddr& peer_mac);
  void PushAccepted(const std::shared_ptr<Channel>& ch);
  bool accepting() const { return opts_.accept; }
  wire::FrameAddrs AddrsFor(uint32_t id, uint32_t peer_ip, const wire::MacAddr& peer_mac) const;
  int EngineOf(XskQueue* q) const;

 private:
  absl::StatusOr<std::shared_ptr<AfxdpChannel>> Register(XskQueue* q, uint32_t peer_ip,
                                                         const wire::MacAddr& peer_mac);
  void Unregister(uint32_t id);
  absl::Status MoveQueueLocked(XskQueue* q, int engine);  // move_mu_ held

  DriverOptions opts_;
  afxdp::InterfaceInfo ifi_;
  size_t max_payload_ = 0;
  std::vector<std::unique_ptr<XskQueue>> queues_;
  std::vector<std::unique_ptr<Engine>> engines_;

  mutable std::mutex mu_;  // short critical sections only; never held while waiting on an engine
  std::bitset<NC_MAX_CHANNELS> used_ids_;
  uint32_t next_id_ = 1;
  std::vector<std::shared_ptr<AfxdpChannel>> channels_;
  AcceptQueue accept_q_;
  std::vector<int> queue_engine_;  // queue -> engine index
  std::mutex move_mu_;  // serializes moves and destroys (both hand tasks between threads)
};

// ---------------------------------------------------------------------------------------------
// XskQueue

absl::Status XskQueue::Open(const std::string& ifname, uint32_t frames) {
  afxdp::UmemConfig uc;
  uc.frame_count = frames;
  uc.frame_size = 4096;
  uc.fill_size = 4096;
  uc.comp_size = 4096;
  auto umem = afxdp::Umem::Create(uc);
  if (!umem.ok()) return umem.status();
  umem_ = std::move(*umem);
  afxdp::XskConfig xc;
  xc.ifname = ifname;
  xc.queue = queue_;
  xc.rx_size = 2048;
  xc.tx_size = 2048;
  absl::StatusOr<std::unique_ptr<afxdp::XskSocket>> xsk;
  // Re-binding a queue right after another socket on it was closed can fail with EBUSY for a
  // moment (the kernel releases the old binding asynchronously).
  for (int attempt = 0; attempt < 50; ++attempt) {
    xsk = afxdp::XskSocket::Create(umem_.get(), xc);
    if (xsk.ok() || !absl::IsUnavailable(xsk.status())) break;
    usleep(20'000);
  }
  if (!xsk.ok()) return xsk.status();
  xsk_ = std::move(*xsk);
  fill_target_ = std::min<uint32_t>(2048, frames / 4);
  umem_->Refill(fill_target_);
  counters.frames_free = umem_->free_frames();
  return absl::OkStatus();
}

XskQueue::~XskQueue() {
  xsk_.reset();
  umem_.reset();
}

void XskQueue::PostOp(const Op& op) {
  std::unique_lock lk(ops_mu_);
  ops_.push_back(op);
  const uint64_t ticket = ++ops_posted_;
  ops_pending_.store(true, std::memory_order_release);
  if (engine.load(std::memory_order_acquire) == nullptr) {
    // No engine runs the queue (driver shutting down): apply on this thread.
    lk.unlock();
    ApplyOps(NowUs());
    return;
  }
  Wake();
  ops_cv_.wait(lk, [&] { return ops_done_ >= ticket; });
}

void XskQueue::AddChannel(AfxdpChannel* ch) { PostOp({ch, true, false}); }
void XskQueue::RemoveChannel(AfxdpChannel* ch, bool fin) { PostOp({ch, false, fin}); }

void XskQueue::ApplyOps(uint64_t now) {
  std::lock_guard g(ops_mu_);
  for (const Op& op : ops_) {
    AfxdpChannel* ch = op.ch;
    if (op.add) {
      chans_.push_back(ch);
      by_id_[ch->id()] = ch;
      ch->set_task(this);
      ch->pub_.queue = static_cast<int>(queue_);
      if (ch->active) ch->syn_next_us = now;  // first SYN on the next round
    } else {
      if (op.fin && ch->hs == Hs::kEstablished) {
        SendControl(ch->addrs, HandshakeHeader(*ch, NC_CT_FIN, now));
      }
      if (ch->transport) ch->transport->ReleaseAll();
      ch->hs = Hs::kDead;
      Drain(*ch);
      // Buffers the producer has not filled yet.
      uint64_t t;
      while (ch->free_.PopOne(&t)) umem_->FreeFrame(t);
      // Delivered, never dequeued: the consumer can no longer ask for them.
      BufRef b;
      while (ch->rxq_.PopOne(&b)) umem_->FreeFrame(b.token);
      chans_.erase(std::remove(chans_.begin(), chans_.end(), ch), chans_.end());
      by_id_[ch->id()] = nullptr;
      ch->set_task(nullptr);
    }
    ops_done_++;
  }
  ops_.clear();
  nchans_.store(chans_.size(), std::memory_order_relaxed);
  ops_pending_.store(false, std::memory_order_relaxed);
  ops_cv_.notify_all();
}

bool XskQueue::SendControl(const wire::FrameAddrs& a, const wire::ChanHeader& h) {
  if (xsk_->tx_free() == 0) {
    counters.tx_ring_full.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  const uint64_t f = umem_->AllocFrame();
  if (f == kNoFrame) return false;
  const size_t len = wire::WriteHeaders(umem_->Data(f), a, h, nullptr, 0);
  xdp_desc d{f, static_cast<uint32_t>(len), 0};
  const bool ok = xsk_->Transmit({&d, 1}) == 1;
  umem_->FreeFrame(f);  // the TX ring holds its own reference until completion
  return ok;
}

wire::ChanHeader XskQueue::HandshakeHeader(const AfxdpChannel& ch, uint8_t type,
                                           uint64_t now) const {
  wire::ChanHeader h;
  h.type = type;
  h.dst_chan = type == NC_CT_SYN ? NC_CHAN_UNASSIGNED : ch.peer_chan;
  h.src_chan = static_cast<uint16_t>(ch.id());
  h.seq = ch.isn;
  h.wnd = driver_->opts().rcv_buf_bytes;
  h.ts_val = static_cast<uint32_t>(now) | 1;
  return h;
}

bool XskQueue::Run(uint64_t now, uint64_t* deadline) {
  bool worked = false;
  if (ops_pending_.load(std::memory_order_acquire)) {
    ApplyOps(now);
    worked = true;
  }
  worked |= umem_->ReapCompletions() > 0;

  xdp_desc descs[kBatch];
  const uint32_t n = xsk_->Receive(descs);
  for (uint32_t i = 0; i < n; ++i) HandleFrame(descs[i], now);
  worked |= n > 0;

  for (AfxdpChannel* ch : chans_) worked |= RunChannel(*ch, now, deadline);

  if (xsk_->tx_pending()) {
    xsk_->KickTx();
    worked = true;
  }
  // Keep the fill ring deep: a burst must never find it empty. The last kCtlReserve frames stay
  // for ACKs, which is what frees TX frames; starving them would deadlock the channel.
  const uint32_t level = umem_->fill_ring_level();
  if (level < fill_target_) {
    if (level == 0) counters.fill_ring_empty.fetch_add(1, std::memory_order_relaxed);
    const uint32_t spare =
        umem_->free_frames() > kCtlReserve ? umem_->free_frames() - kCtlReserve : 0;
    umem_->Refill(std::min(fill_target_ - level, spare));
  }
  counters.frames_free.store(umem_->free_frames(), std::memory_order_relaxed);
  counters.frames_in_fill.store(umem_->fill_ring_level(), std::memory_order_relaxed);
  return worked;
}

void XskQueue::HandleFrame(const xdp_desc& d, uint64_t now) {
  counters.rx_frames.fetch_add(1, std::memory_order_relaxed);
  const uint8_t* p = umem_->Data(d.addr);
  // The XDP program validated the frame; the driver checks again because a frame in its socket
  // is the input of a reliable transport and must not be trusted blindly (and the oracle is
  // the same parser, so this costs a few dozen nanoseconds).
  const wire::ParsedFrame pf = wire::ParseFrame({p, d.len}, driver_->opts().udp_port);
  if (!pf.valid() || pf.dst_ip != driver_->ifinfo().ipv4) {
    counters.rx_malformed.fetch_add(1, std::memory_order_relaxed);
    umem_->FreeFrame(d.addr);
    return;
  }
  if (pf.ch.dst_chan == NC_CHAN_UNASSIGNED) {
    if (pf.ch.type == NC_CT_SYN) HandleSyn(pf, p, now);
    umem_->FreeFrame(d.addr);
    return;
  }
  AfxdpChannel* ch = by_id_[pf.ch.dst_chan % NC_MAX_CHANNELS];
  if (!ch || pf.src_ip != ch->peer_ip ||
      (ch->hs != Hs::kSynSent && pf.ch.src_chan != ch->peer_chan)) {
    counters.rx_unknown_chan.fetch_add(1, std::memory_order_relaxed);
    umem_->FreeFrame(d.addr);
    return;
  }
  switch (pf.ch.type) {
    case NC_CT_SYN_ACK:
      if (ch->hs == Hs::kSynSent) Establish(*ch, pf.ch, now);
      umem_->FreeFrame(d.addr);
      return;
    case NC_CT_RST:
      if (ch->hs != Hs::kDead) Kill(*ch, ChannelState::kFailed);
      umem_->FreeFrame(d.addr);
      return;
    case NC_CT_FIN:
      if (ch->hs == Hs::kEstablished) Kill(*ch, ChannelState::kClosed);
      umem_->FreeFrame(d.addr);
      return;
    default:
      break;
  }
  if (ch->hs != Hs::kEstablished) {
    umem_->FreeFrame(d.addr);
    return;
  }
  if (pf.ch.type == NC_CT_DATA) {
    ch->transport->OnPacket(pf.ch, d.addr + pf.chan_payload_off,
                            static_cast<uint32_t>(pf.chan_payload_len), now,
                            (pf.tos & 3) == 3 /* CE */);
  } else {
    ch->transport->OnPacket(pf.ch, 0, 0, now);
    umem_->FreeFrame(d.addr);
  }
}

void XskQueue::HandleSyn(const wire::ParsedFrame& pf, const uint8_t* frame, uint64_t now) {
  counters.handshakes_rx.fetch_add(1, std::memory_order_relaxed);
  for (AfxdpChannel* ch : chans_) {
    if (!ch->active && ch->peer_ip == pf.src_ip && ch->peer_chan == pf.ch.src_chan) {
      ch->send_synack = true;  // our SYN_ACK was lost: the peer asks again
      return;
    }
  }
  wire::MacAddr peer_mac;
  std::memcpy(peer_mac.data(), frame + 6, 6);  // Ethernet source
  AfxdpChannel* ch = driver_->NewPassive(this, pf.src_ip, pf.ch.src_chan, peer_mac);
  if (!ch) {
    // Not accepting (or out of ids): tell the initiator now rather than let it time out.
    wire::FrameAddrs a = driver_->AddrsFor(0, pf.src_ip, peer_mac);
    wire::ChanHeader h;
    h.type = NC_CT_RST;
    h.dst_chan = pf.ch.src_chan;
    h.ts_val = static_cast<uint32_t>(now) | 1;
    SendControl(a, h);
    return;
  }
  ch->isn = RandomIsn();
  ch->transport = std::make_unique<Transport>(
      driver_->TransportFor(static_cast<uint16_t>(ch->id()), pf.ch.src_chan, ch->isn, pf.ch.seq),
      afxdp::MakeCongestionControl(driver_->opts().congestion, 16, driver_->opts().window_packets),
      this, now);
  if (ch->transport->wants_ecn()) ch->addrs.tos = 0x02;  // ECT(0)
  ch->hs = Hs::kEstablished;
  ch->send_synack = true;
  ch->pub_.engine = engine.load()->index();
  chans_.push_back(ch);
  by_id_[ch->id()] = ch;
  nchans_.store(chans_.size(), std::memory_order_relaxed);
  ch->set_task(this);
  ch->pub_.queue = static_cast<int>(queue_);
  ch->SetState(ChannelState::kUp);
}

void XskQueue::Establish(AfxdpChannel& ch, const wire::ChanHeader& h, uint64_t now) {
  ch.peer_chan = h.src_chan;
  ch.transport = std::make_unique<Transport>(
      driver_->TransportFor(static_cast<uint16_t>(ch.id()), h.src_chan, ch.isn, h.seq),
      afxdp::MakeCongestionControl(driver_->opts().congestion, 16, driver_->opts().window_packets),
      this, now);
  if (ch.transport->wants_ecn()) ch.addrs.tos = 0x02;  // ECT(0)
  ch.hs = Hs::kEstablished;
  ch.SetState(ChannelState::kUp);
}

void XskQueue::Kill(AfxdpChannel& ch, ChannelState st) {
  if (ch.transport) ch.transport->ReleaseAll();
  ch.hs = Hs::kDead;
  Publish(ch);
  ch.SetState(st);
}

bool XskQueue::Drain(AfxdpChannel& ch) {
  BufRef b[kBatch];
  bool any = false;
  for (uint32_t m; (m = ch.ret_.Pop(b)) > 0;) {
    for (uint32_t i = 0; i < m; ++i) umem_->FreeFrame(b[i].token), ch.rx_held -= b[i].len;
    any = true;
  }
  for (uint32_t m; (m = ch.txq_.Pop(b)) > 0;) {
    for (uint32_t i = 0; i < m; ++i) umem_->FreeFrame(b[i].token);
    any = true;
  }
  return any;
}

bool XskQueue::RunChannel(AfxdpChannel& ch, uint64_t now, uint64_t* deadline) {
  if (ch.hs == Hs::kDead) {
    if (Drain(ch)) ch.NotifyApp(Channel::kReadable);
    return false;
  }
  bool worked = false;
  if (ch.hs == Hs::kSynSent) {
    if (now >= ch.connect_deadline_us) {
      Kill(ch, ChannelState::kFailed);
      return true;
    }
    if (now >= ch.syn_next_us) {
      SendControl(ch.addrs, HandshakeHeader(ch, NC_CT_SYN, now));
      ch.syn_next_us = now + ch.syn_rto_us;
      ch.syn_rto_us = std::min<uint64_t>(ch.syn_rto_us * 2, 500'000);
      worked = true;
    }
    *deadline = std::min({*deadline, ch.syn_next_us, ch.connect_deadline_us});
    return worked;
  }
  Transport& t = *ch.transport;
  if (ch.send_synack) {
    wire::ChanHeader h = HandshakeHeader(ch, NC_CT_SYN_ACK, now);
    ch.send_synack = !SendControl(ch.addrs, h);
    worked = true;
  }
  BufRef b[kBatch];
  int notify = 0;  // Interest bits to signal
  // Buffers the consumer is done with: reopen the receive window.
  for (uint32_t m; (m = ch.ret_.Pop(b)) > 0;) {
    for (uint32_t i = 0; i < m; ++i) {
      t.Consumed(b[i].len);
      ch.rx_held -= b[i].len;
      umem_->FreeFrame(b[i].token);
    }
    worked = true;
  }
  // New segments from the producer, as far as the transport's window has slots.
  const uint32_t slots = driver_->opts().window_packets - t.send_queue_packets();
  if (const uint32_t m = ch.txq_.Peek({b, std::min(kBatch, slots)}); m > 0) {
    uint64_t bytes = 0;
    uint32_t taken = 0;
    for (; taken < m && t.Send(b[taken].token, b[taken].len); ++taken) bytes += b[taken].len;
    ch.txq_.Consume(taken);
    if (taken > 0) notify |= Channel::kWritable;  // room for the producer again
    ch.pub_.tx_segments.fetch_add(taken, std::memory_order_relaxed);
    ch.pub_.tx_bytes.fetch_add(bytes - taken * wire::kSegHdrLen, std::memory_order_relaxed);
    worked |= taken > 0;
  }
  // What the transport wants on the wire, never more than the TX ring takes now.
  const uint32_t room = std::min(kBatch, xsk_->tx_free());
  if (room == 0) counters.tx_ring_full.fetch_add(1, std::memory_order_relaxed);
  TxPacket pk[kBatch];
  const size_t k = t.Poll(now, {pk, room});
  if (k) {
    xdp_desc d[kBatch];
    uint64_t ctl[kBatch];
    uint32_t nd = 0, nctl = 0;
    for (size_t i = 0; i < k; ++i) {
      const size_t hl = wire::HeadersLen(pk[i].hdr, false);
      if (pk[i].hdr.type == NC_CT_DATA) {
        const uint64_t addr = pk[i].handle - hl;  // headers go in the headroom
        wire::WriteHeaders(umem_->Data(addr), ch.addrs, pk[i].hdr, nullptr, pk[i].len);
        d[nd++] = {addr, static_cast<uint32_t>(hl + pk[i].len), 0};
      } else {
        const uint64_t f = umem_->AllocFrame();
        if (f == kNoFrame) continue;  // the transport's timers will ask again
        wire::WriteHeaders(umem_->Data(f), ch.addrs, pk[i].hdr, nullptr, 0);
        d[nd++] = {f, static_cast<uint32_t>(hl), 0};
        ctl[nctl++] = f;
      }
    }
    xsk_->Transmit({d, nd});
    for (uint32_t i = 0; i < nctl; ++i) umem_->FreeFrame(ctl[i]);
    worked = true;
  }
  // In-order data for the consumer.
  if (uint32_t space = std::min(kBatch, ch.rxq_.Room()); space > 0) {
    uint32_t m = 0;
    while (m < space && t.PopDelivered(&b[m].token, &b[m].len)) ch.rx_held += b[m++].len;
    if (m) {
      ch.rxq_.Push({b, m});
      notify |= Channel::kReadable;
      worked = true;
    }
  }
  // Empty buffers for the producer, while the pool keeps enough for the fill ring and ACKs.
  if (uint32_t space = ch.free_.Room(); space > 0) {
    const uint32_t keep = fill_target_ + kCtlReserve;
    uint32_t m = 0;
    uint64_t tok[kBatch];
    while (m < std::min(space, kBatch) && umem_->free_frames() > keep)
      tok[m++] = umem_->AllocFrame() + kAfxdpHeadroom;
    if (m) {
      ch.free_.Push({tok, m});
      notify |= Channel::kWritable;
    }
  }
  if (t.state() == afxdp::TransportState::kFailed) {
    Kill(ch, ChannelState::kFailed);
    return true;
  }
  Publish(ch);
  if (notify) ch.NotifyApp(static_cast<Channel::Interest>(notify));
  *deadline = std::min(*deadline, t.next_timer_us());
  return worked;
}

void XskQueue::Publish(AfxdpChannel& ch) {
  auto& p = ch.pub_;
  p.rx_queued_bytes.store(ch.rx_held, std::memory_order_relaxed);
  if (!ch.transport) return;
  const Transport& t = *ch.transport;
  p.tx_queued_bytes.store(t.send_queue_bytes(), std::memory_order_relaxed);
  p.cwnd_packets.store(t.cwnd(), std::memory_order_relaxed);
  p.srtt_us.store(t.srtt_us(), std::memory_order_relaxed);
  p.retransmits.store(t.stats().retransmits, std::memory_order_relaxed);
  p.rx_dropped_stale.store(t.stats().dup_received + t.stats().out_of_window,
                           std::memory_order_relaxed);
  p.timeouts.store(t.stats().rto_events, std::memory_order_relaxed);
  p.tail_probes.store(t.stats().tail_probes, std::memory_order_relaxed);
  p.ecn_echoes.store(t.stats().ece_received, std::memory_order_relaxed);
  p.rx_ignored_acks.store(t.stats().bad_acks, std::memory_order_relaxed);
  const uint64_t cwnd_bytes = static_cast<uint64_t>(t.cwnd()) * driver_->max_payload();
  const uint64_t limit = std::min<uint64_t>(cwnd_bytes, t.peer_window());
  const uint64_t in_flight = static_cast<uint64_t>(t.in_flight_packets()) * driver_->max_payload();
  p.send_window_bytes.store(limit > in_flight ? limit - in_flight : 0, std::memory_order_relaxed);
}

// ---------------------------------------------------------------------------------------------
// AfxdpDriver

absl::Status AfxdpDriver::Init() {
  std::unique_ptr<NetnsScope> ns;
  if (!opts_.netns.empty()) {
    ns = std::make_unique<NetnsScope>(opts_.netns);
    if (!ns->ok()) return ns->status();
  }
  if (!opts_.steer)
    return absl::FailedPreconditionError(
        "the AF_XDP driver needs the steering program (DriverOptions::steer) loaded and attached");
  if (!afxdp::MakeCongestionControl(opts_.congestion, 16, 64))
    return absl::InvalidArgumentError(
        absl::StrFormat("unknown congestion control '%s' (newreno, dctcp)", opts_.congestion));
  if (opts_.window_packets == 0 || (opts_.window_packets & (opts_.window_packets - 1)))
    return absl::InvalidArgumentError("window_packets must be a power of two");
  auto ifi = afxdp::GetInterfaceInfo(opts_.ifname);
  if (!ifi.ok()) return ifi.status();
  ifi_ = *ifi;
  if (ifi_.ipv4 == 0)
    return absl::FailedPreconditionError(absl::StrFormat("%s has no IPv4 address", opts_.ifname));
  if (opts_.steer->attached_ifindex() != ifi_.ifindex)
    return absl::FailedPreconditionError(
        absl::StrFormat("the steering program is not attached to %s", opts_.ifname));
  // Segment size from the MTU: IPv4 + UDP + channel header with SACK blocks + NetChannel header.
  const size_t overhead = wire::kIpv4Len + wire::kUdpLen + wire::kChanHdrLen +
                          wire::kMaxSacks * sizeof(nc_sack_block) + wire::kSegHdrLen;
  const size_t by_frame = 4096 - kAfxdpHeadroom - wire::kSegHdrLen;
  if (ifi_.mtu <= overhead + 64)
    return absl::FailedPreconditionError(
        absl::StrFormat("MTU %u of %s is too small", ifi_.mtu, opts_.ifname));
  // Without multi-buffer, XDP on veth takes frames up to 3520 bytes.
  max_payload_ = std::min({ifi_.mtu - overhead, by_frame, size_t{3506} - overhead});

  uint32_t nq = opts_.queues ? std::min(opts_.queues, ifi_.rx_queues) : ifi_.rx_queues;
  nq = std::clamp<uint32_t>(nq, 1, NC_MAX_QUEUES);
  for (uint32_t q = 0; q < nq; ++q) {
    auto xq = std::make_unique<XskQueue>(this, q);
    if (auto st = xq->Open(opts_.ifname, opts_.frames_per_queue); !st.ok()) return st;
    if (auto st = opts_.steer->SetXsk(q, xq->xsk()->fd()); !st.ok()) return st;
    queues_.push_back(std::move(xq));
  }
  auto engines = StartEngines(opts_);
  if (!engines.ok()) return engines.status();
  engines_ = std::move(*engines);
  queue_engine_.resize(nq);
  for (uint32_t q = 0; q < nq; ++q) {
    queue_engine_[q] = static_cast<int>(q % engines_.size());
    engines_[queue_engine_[q]]->Add(queues_[q].get());
  }
  return absl::OkStatus();
}

AfxdpDriver::~AfxdpDriver() {
  std::vector<std::shared_ptr<AfxdpChannel>> chans;
  {
    std::lock_guard g(mu_);
    chans = channels_;
  }
  for (auto& c : chans) (void)Destroy(*c);
  for (auto& e : engines_) e->Stop();
  for (auto& q : queues_) (void)opts_.steer->ClearXsk(q->queue());
  queues_.clear();
}

TransportConfig AfxdpDriver::TransportFor(uint16_t local, uint16_t peer, uint32_t isn_send,
                                          uint32_t isn_recv) const {
  TransportConfig c;
  c.window_packets = opts_.window_packets;
  c.rcv_buf_bytes = opts_.rcv_buf_bytes;
  c.dead_peer_us = static_cast<uint64_t>(absl::ToInt64Microseconds(opts_.dead_peer_timeout));
  c.keepalive_idle_us = std::max<uint64_t>(c.dead_peer_us / 4, 1000);
  c.min_rto_us = 5'000;
  c.local_chan = local;
  c.peer_chan = peer;
  c.isn_send = isn_send;
  c.isn_recv = isn_recv;
  return c;
}

wire::FrameAddrs AfxdpDriver::AddrsFor(uint32_t id, uint32_t peer_ip,
                                       const wire::MacAddr& peer_mac) const {
  wire::FrameAddrs a;
  a.src_mac = ifi_.mac;
  a.dst_mac = peer_mac;
  a.src_ip = ifi_.ipv4;
  a.dst_ip = peer_ip;
  a.src_port = static_cast<uint16_t>(kSrcPortBase + id);
  a.dst_port = opts_.udp_port;
  return a;
}

absl::StatusOr<std::shared_ptr<AfxdpChannel>> AfxdpDriver::Register(XskQueue* q, uint32_t peer_ip,
                                                                    const wire::MacAddr& peer_mac) {
  uint32_t id = 0;
  {
    std::lock_guard g(mu_);
    for (uint32_t i = 0; i < NC_MAX_CHANNELS - 1; ++i) {
      const uint32_t c = (next_id_ - 1 + i) % (NC_MAX_CHANNELS - 1) + 1;
      if (!used_ids_[c]) {
        id = c;
        break;
      }
    }
    if (id == 0) return absl::ResourceExhaustedError("all channel ids are in use");
    used_ids_[id] = true;
    next_id_ = id % (NC_MAX_CHANNELS - 1) + 1;
  }
  auto ch = std::make_shared<AfxdpChannel>(id, max_payload_, q->umem());
  ch->queue = q;
  ch->peer_ip = peer_ip;
  ch->addrs = AddrsFor(id, peer_ip, peer_mac);
  if (auto st = opts_.steer->SetChannel(id, q->queue(), q->queue()); !st.ok()) {
    std::lock_guard g(mu_);
    used_ids_[id] = false;
    return st;
  }
  ch->pub_.engine = EngineOf(q);
  std::lock_guard g(mu_);
  channels_.push_back(ch);
  return ch;
}

void AfxdpDriver::Unregister(uint32_t id) {
  (void)opts_.steer->ClearChannel(id);
  std::lock_guard g(mu_);
  used_ids_[id] = false;
  channels_.erase(std::remove_if(channels_.begin(), channels_.end(),
                                 [&](const auto& c) { return c->id() == id; }),
                  channels_.end());
}

int AfxdpDriver::EngineOf(XskQueue* q) const {
  Engine* e = q->engine.load(std::memory_order_acquire);
  return e ? e->index() : -1;
}

absl::StatusOr<std::shared_ptr<Channel>> AfxdpDriver::Connect(const ChannelParams& p) {
  if (p.peer_ipv4 == 0) return absl::InvalidArgumentError("no peer address");
  XskQueue* q = nullptr;
  if (p.queue >= 0) {
    if (p.queue >= static_cast<int>(queues_.size()))
      return absl::InvalidArgumentError(
          absl::StrFormat("queue %d: the driver serves queues 0..%u", p.queue, queues_.size() - 1));
    q = queues_[p.queue].get();
  } else {
    for (auto& c : queues_)
      if (!q || c->channel_count() < q->channel_count()) q = c.get();
  }
  absl::StatusOr<wire::MacAddr> mac;
  {
    std::unique_ptr<NetnsScope> ns;
    if (!opts_.netns.empty()) ns = std::make_unique<NetnsScope>(opts_.netns);
    mac = afxdp::ResolveNeighbor(opts_.ifname, p.peer_ipv4);
  }
  if (!mac.ok()) return mac.status();
  auto ch = Register(q, p.peer_ipv4, *mac);
  if (!ch.ok()) return ch.status();
  AfxdpChannel& c = **ch;
  c.active = true;
  c.isn = RandomIsn();
  const uint64_t now = NowUs();
  c.syn_rto_us = 20'000;
  c.connect_deadline_us = now + static_cast<uint64_t>(absl::ToInt64Microseconds(p.connect_timeout));
  {
    std::lock_guard mv(move_mu_);  // the queue must not change engines while the op is posted
    if (p.engine >= 0) {
      if (auto st = MoveQueueLocked(q, p.engine); !st.ok()) {
        Unregister(c.id());
        return st;
      }
    }
    q->AddChannel(&c);
  }
  return std::shared_ptr<Channel>(*ch);
}

AfxdpChannel* AfxdpDriver::NewPassive(XskQueue* q, uint32_t peer_ip, uint16_t peer_chan,
                                      const wire::MacAddr& peer_mac) {
  if (!opts_.accept) return nullptr;
  auto ch = Register(q, peer_ip, peer_mac);
  if (!ch.ok()) return nullptr;
  (*ch)->peer_chan = peer_chan;
  PushAccepted(*ch);
  return ch->get();
}

void AfxdpDriver::PushAccepted(const std::shared_ptr<Channel>& ch) { accept_q_.Push(ch); }

// A channel is handed out once its handshake state is visible (kUp is set by the engine).
std::shared_ptr<Channel> AfxdpDriver::Accept() { return accept_q_.Pop(/*only_up=*/true); }

absl::Status AfxdpDriver::Destroy(Channel& base) {
  std::lock_guard mv(move_mu_);
  auto ch = FindChannel(mu_, channels_, [&](const Channel& c) { return &c == &base; });
  if (!ch) return absl::NotFoundError(absl::StrFormat("channel %u is not ours", base.id()));
  ch->Linger(opts_.close_linger);
  ch->queue->RemoveChannel(ch.get(), /*send_fin=*/true);
  Unregister(ch->id());
  if (ch->state() != ChannelState::kFailed) ch->SetState(ChannelState::kClosed);
  return absl::OkStatus();
}

absl::Status AfxdpDriver::MoveChannel(uint32_t id, int engine) {
  if (auto st = CheckEngineIndex(engine, engines_.size()); !st.ok()) return st;
  std::lock_guard mv(move_mu_);
  auto ch = FindChannel(mu_, channels_, [&](const Channel& c) { return c.id() == id; });
  if (!ch) return absl::NotFoundError(absl::StrFormat("no channel %u", id));
  return MoveQueueLocked(ch->queue, engine);
}

absl::Status AfxdpDriver::MoveQueueLocked(XskQueue* q, int engine) {
  if (auto st = CheckEngineIndex(engine, engines_.size()); !st.ok()) return st;
  const int from = queue_engine_[q->queue()];
  if (from == engine) return absl::OkStatus();
  // The whole queue moves: its XSK, fill and completion rings belong to one thread at a time.
  engines_[from]->Remove(q);
  engines_[engine]->Add(q);
  queue_engine_[q->queue()] = engine;
  std::lock_guard g(mu_);
  for (auto& c : channels_)
    if (c->queue == q) c->pub_.engine = engine;
  return absl::OkStatus();
}

std::vector<EngineInfo> AfxdpDriver::Engines() const { return DescribeEngines(engines_); }

DriverStats AfxdpDriver::Stats() const {
  DriverStats s;
  for (const auto& q : queues_) {
    const QueueCounters& c = q->counters;
    s.rx_frames += c.rx_frames.load(std::memory_order_relaxed);
    s.rx_malformed += c.rx_malformed.load(std::memory_order_relaxed);
    s.rx_unknown_chan += c.rx_unknown_chan.load(std::memory_order_relaxed);
    s.handshakes_rx += c.handshakes_rx.load(std::memory_order_relaxed);
    s.fill_ring_empty += c.fill_ring_empty.load(std::memory_order_relaxed);
    s.tx_ring_full += c.tx_ring_full.load(std::memory_order_relaxed);
    s.frames_total += opts_.frames_per_queue;
    s.frames_free += c.frames_free.load(std::memory_order_relaxed);
    s.frames_in_fill += c.frames_in_fill.load(std::memory_order_relaxed);
    if (auto x = q->xsk()->Stats(); x.ok()) {
      s.xsk_rx_dropped += x->rx_dropped;
      s.xsk_rx_ring_full += x->rx_ring_full;
      s.xsk_fill_ring_empty += x->rx_fill_ring_empty_descs;
      s.xsk_tx_ring_empty += x->tx_ring_empty_descs;
    }
  }
  return s;
}

std::vector<std::shared_ptr<Channel>> AfxdpDriver::Channels() const {
  std::lock_guard g(mu_);
  return {channels_.begin(), channels_.end()};
}

}  // namespace

absl::StatusOr<std::unique_ptr<Driver>> CreateAfxdpDriver(const DriverOptions& opts) {
  return MakeDriver<AfxdpDriver>(opts);
}

}  // namespace netch::chan
