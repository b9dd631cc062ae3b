// loopback_driver.cc - the "loopback" NetDriver: channels between drivers of one process, no
// network and no privileges. It exists so that the layers above (VNS) can be unit-tested, and as
// the smallest example of a transport: a new driver is this file plus one registry line.
//
// Each driver instance takes the address DriverOptions::loopback_ipv4; Connect finds the driver
// with the peer address in a process-wide table. A channel pair copies each segment from one
// side's send buffers into a receive slot of the other; a side without free receive slots stops
// the copy (backpressure, nothing dropped). Destroy closes the peer's end; a driver that goes away
// fails its peers' channels, as a dead host would.
#include "afxdp_channels/loopback_driver.h"

#include <unistd.h>

#include <cstring>
#include <map>
#include <mutex>

#include "absl/strings/str_format.h"
#include "afxdp_channels/channel_core.h"
#include "afxdp_channels/engine.h"

namespace netch::chan {
namespace {

constexpr uint32_t kRing = 64;
constexpr uint32_t kSlot = 8192;
constexpr size_t kMaxPayload = kSlot - wire::kSegHdrLen;

class LoopDriver;

class LoopChannel final : public ChannelCore, public EngineTask {
 public:
  LoopChannel(uint32_t id, uint32_t peer_ip)
      : ChannelCore(id, kRing, kMaxPayload),
        rx_slots_(kRing),
        peer_ip_(peer_ip),
        slab_(static_cast<size_t>(2 * kRing) * kSlot) {
    for (uint32_t i = 0; i < kRing; ++i) free_.PushOne(uint64_t{i} * kSlot);
    for (uint32_t i = kRing; i < 2 * kRing; ++i) rx_slots_.PushOne(uint64_t{i} * kSlot);
    set_task(this);
  }
  uint8_t* BufAddr(uint64_t token) override { return slab_.data() + token; }
  uint32_t peer_ipv4() const override { return peer_ip_; }
  int wait_fd() const override { return -1; }

  std::shared_ptr<LoopChannel> peer() {
    std::lock_guard g(mu_);
    return peer_;
  }
  void Link(const std::shared_ptr<LoopChannel>& peer) {
    std::lock_guard g(mu_);
    peer_ = peer;
  }
  // The other end went away: kClosed for an orderly Destroy, kFailed for a vanished driver.
  void Unlink(ChannelState st) {
    {
      std::lock_guard g(mu_);
      peer_.reset();
    }
    if (state() == ChannelState::kUp) SetState(st);
    Wake();
  }

  bool Run(uint64_t, uint64_t*) override {
    bool worked = false;
    // Our receive slots the application released: hand them back to the copying side.
    BufRef b[kRing];
    for (uint32_t n; (n = ret_.Pop(b)) > 0;) {
      for (uint32_t i = 0; i < n; ++i) {
        rx_slots_.PushOne(b[i].token);
        pub_.rx_queued_bytes.fetch_sub(b[i].len, std::memory_order_relaxed);
      }
      worked = true;
    }
    std::shared_ptr<LoopChannel> peer;
    {
      std::lock_guard g(mu_);
      peer = peer_;
    }
    if (worked && peer) peer->Wake();  // it may be waiting for our slots
    if (!peer) {
      // Nobody to deliver to: what the producer queued goes back to it, unsent.
      for (uint32_t n; (n = txq_.Pop(b)) > 0;)
        for (uint32_t i = 0; i < n; ++i) free_.PushOne(b[i].token);
      return worked;
    }
    // Copy our queued segments into the peer's free receive slots, in order.
    uint32_t moved = 0;
    const uint32_t n = txq_.Peek(b);
    for (; moved < n; ++moved) {
      uint64_t slot;
      if (peer->rxq_.Room() == 0 || !peer->rx_slots_.PopOne(&slot)) break;
      std::memcpy(peer->BufAddr(slot), BufAddr(b[moved].token), b[moved].len);
      // Counted before it is visible: the consumer's release must never find it uncounted.
      peer->pub_.rx_queued_bytes.fetch_add(b[moved].len, std::memory_order_relaxed);
      peer->rxq_.PushOne({slot, b[moved].len});
      free_.PushOne(b[moved].token);
      pub_.tx_segments.fetch_add(1, std::memory_order_relaxed);
      pub_.tx_bytes.fetch_add(b[moved].len - wire::kSegHdrLen, std::memory_order_relaxed);
    }
    txq_.Consume(moved);
    if (moved) {
      peer->NotifyApp(kReadable);
      NotifyApp(kWritable);
    }
    pub_.tx_queued_bytes.store(0, std::memory_order_relaxed);
    for (uint32_t i = moved; i < n; ++i)
      pub_.tx_queued_bytes.fetch_add(b[i].len, std::memory_order_relaxed);
    return worked || moved > 0;
  }

  // A second ring the copying side consumes: our free receive slots.
  SpscRing<uint64_t> rx_slots_;

 private:
  const uint32_t peer_ip_;
  std::vector<uint8_t> slab_;
  std::mutex mu_;
  std::shared_ptr<LoopChannel> peer_;
};

class LoopDriver;
std::mutex g_mu;
std::map<uint32_t, LoopDriver*> g_drivers;  // guarded by g_mu

class LoopDriver final : public Driver {
 public:
  explicit LoopDriver(const DriverOptions& o) : opts_(o) {}
  ~LoopDriver() override {
    {
      std::lock_guard g(g_mu);
      g_drivers.erase(opts_.loopback_ipv4);
    }
    std::vector<std::shared_ptr<LoopChannel>> chans;
    {
      std::lock_guard g(mu_);
      chans = channels_;
    }
    for (auto& c : chans) Teardown(*c, ChannelState::kFailed);
    for (auto& e : engines_) e->Stop();
  }
  absl::Status Init() {
    if (opts_.loopback_ipv4 == 0)
      return absl::InvalidArgumentError("the loopback driver needs DriverOptions::loopback_ipv4");
    auto e = StartEngines(opts_);
    if (!e.ok()) return e.status();
    engines_ = std::move(*e);
    std::lock_guard g(g_mu);
    if (!g_drivers.emplace(opts_.loopback_ipv4, this).second)
      return absl::AlreadyExistsError("another loopback driver has this address");
    return absl::OkStatus();
  }

  std::string_view name() const override { return "loopback"; }

  absl::StatusOr<std::shared_ptr<Channel>> Connect(const ChannelParams& p) override {
    auto mine = Make(p.peer_ipv4, p.engine);
    std::lock_guard g(g_mu);  // the peer cannot go away while we link to it
    auto it = g_drivers.find(p.peer_ipv4);
    if (it == g_drivers.end() || !it->second->opts_.accept) {
      mine->SetState(ChannelState::kFailed);  // nobody there: as a handshake that times out
      return std::shared_ptr<Channel>(mine);
    }
    auto theirs = it->second->Make(opts_.loopback_ipv4, -1);
    mine->Link(theirs);
    theirs->Link(mine);
    mine->SetState(ChannelState::kUp);
    theirs->SetState(ChannelState::kUp);
    it->second->PushAccepted(theirs);
    return std::shared_ptr<Channel>(mine);
  }

  std::shared_ptr<Channel> Accept() override { return accept_q_.Pop(); }
  int accept_fd() const override { return accept_q_.fd(); }

  absl::Status Destroy(Channel& base) override {
    auto ch = FindChannel(mu_, channels_, [&](const Channel& c) { return &c == &base; });
    if (!ch) return absl::NotFoundError(absl::StrFormat("channel %u is not ours", base.id()));
    ch->Linger(opts_.close_linger);
    Teardown(*ch, ChannelState::kClosed);
    std::lock_guard g(mu_);
    channels_.erase(std::remove(channels_.begin(), channels_.end(), ch), channels_.end());
    return absl::OkStatus();
  }

  absl::Status MoveChannel(uint32_t id, int engine) override {
    if (auto st = CheckEngineIndex(engine, engines_.size()); !st.ok()) return st;
    auto ch = FindChannel(mu_, channels_, [&](const Channel& c) { return c.id() == id; });
    if (!ch) return absl::NotFoundError(absl::StrFormat("no channel %u", id));
    engines_[ch->pub_.engine.load()]->Remove(ch.get());
    engines_[engine]->Add(ch.get());
    ch->pub_.engine = engine;
    return absl::OkStatus();
  }
  std::vector<EngineInfo> Engines() const override { return DescribeEngines(engines_); }
  DriverStats Stats() const override { return {}; }
  std::vector<std::shared_ptr<Channel>> Channels() const override {
    std::lock_guard g(mu_);
    return {channels_.begin(), channels_.end()};
  }

 private:
  std::shared_ptr<LoopChannel> Make(uint32_t peer_ip, int engine) {
    std::shared_ptr<LoopChannel> c;
    {
      std::lock_guard g(mu_);
      c = std::make_shared<LoopChannel>(next_id_++, peer_ip);
      if (engine < 0 || engine >= static_cast<int>(engines_.size()))
        engine = static_cast<int>(c->id() % engines_.size());
      channels_.push_back(c);
    }
    c->pub_.engine = engine;
    engines_[engine]->Add(c.get());
    return c;
  }
  void PushAccepted(const std::shared_ptr<LoopChannel>& c) { accept_q_.Push(c); }
  // Stops our end and tells the peer's end.
  void Teardown(LoopChannel& ch, ChannelState peer_state) {
    engines_[ch.pub_.engine.load()]->Remove(&ch);
    std::shared_ptr<LoopChannel> peer = ch.peer();
    ch.Unlink(ChannelState::kClosed);
    if (ch.state() != ChannelState::kFailed) ch.SetState(ChannelState::kClosed);
    if (peer) peer->Unlink(peer_state);
  }

  DriverOptions opts_;
  std::vector<std::unique_ptr<Engine>> engines_;
  mutable std::mutex mu_;
  uint32_t next_id_ = 1;
  std::vector<std::shared_ptr<LoopChannel>> channels_;
  AcceptQueue accept_q_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Driver>> CreateLoopbackDriver(const DriverOptions& opts) {
  return MakeDriver<LoopDriver>(opts);
}

}  // namespace netch::chan
