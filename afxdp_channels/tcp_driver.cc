#include "afxdp_channels/tcp_driver.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <deque>
#include <mutex>

#include "absl/strings/str_format.h"
#include "afxdp_channels/channel_core.h"
#include "afxdp_channels/engine.h"
#include "common/errno_status.h"
#include "common/netns.h"

namespace netch::chan {
namespace {

constexpr uint32_t kRing = 256;    // slots per direction
constexpr uint32_t kSlot = 16384;  // bytes per slot
constexpr uint32_t kPrefix = 8;    // headroom: the record's length prefix (4) + padding
constexpr size_t kMaxPayload = kSlot - kPrefix - wire::kSegHdrLen;
constexpr size_t kStage = 256 * 1024;  // socket read staging buffer
constexpr uint8_t kHello[8] = {'N', 'C', 'T', 'C', 'P', 1, 0, 0};

class TcpDriver;

class TcpChannel final : public ChannelCore, public EngineTask {
 public:
  TcpChannel(uint32_t id, int fd)
      : ChannelCore(id, kRing, kMaxPayload),
        fd_(fd),
        slab_(static_cast<size_t>(2 * kRing) * kSlot),
        stage_(kStage) {
    for (uint32_t i = 0; i < kRing; ++i) free_.PushOne(Token(i));
    for (uint32_t i = kRing; i < 2 * kRing; ++i) rx_free_.push_back(Token(i));
    set_task(this);
  }
  ~TcpChannel() override {
    if (fd_ >= 0) close(fd_);
  }

  uint8_t* BufAddr(uint64_t token) override { return slab_.data() + token; }
  uint32_t peer_ipv4() const override { return peer_ip_; }
  void set_peer_ipv4(uint32_t ip) { peer_ip_ = ip; }
  bool Run(uint64_t now, uint64_t* deadline) override;
  int wait_fd() const override { return dead_ ? -1 : fd_; }
  short wait_events() const override {
    return static_cast<short>(POLLIN | (want_write_ ? POLLOUT : 0));
  }

  void Shutdown() {
    // Goodbye record (length 0) unless a record is half written; then the peer sees a bare
    // end of stream and fails the channel, which is the truth.
    if (!dead_ && fd_ >= 0 && write_off_ == 0 && hello_sent_) {
      static constexpr uint8_t kBye[4] = {0, 0, 0, 0};
      if (writing_.empty()) (void)!send(fd_, kBye, sizeof(kBye), MSG_NOSIGNAL | MSG_DONTWAIT);
    }
    dead_ = true;
    if (fd_ >= 0) shutdown(fd_, SHUT_RDWR);
  }
  uint64_t connect_deadline_us = 0;
  std::atomic<uint64_t> rx_malformed{0}, rx_records{0};

 private:
  static uint64_t Token(uint32_t slot) { return uint64_t{slot} * kSlot + kPrefix; }
  bool DoConnectOrHello(uint64_t now);
  bool DoWrite();
  bool DoRead();
  void Fail(ChannelState st) {
    dead_ = true;
    SetState(st);
  }

  int fd_;
  uint32_t peer_ip_ = 0;
  bool connected_ = false;  // TCP connection established
  bool hello_sent_ = false, hello_seen_ = false;
  bool dead_ = false;
  bool goodbye_ = false;
  bool want_write_ = false;
  std::vector<uint8_t> slab_;
  std::vector<uint64_t> rx_free_;  // engine-side pool of receive slots

  // Write side: buffers taken from txq_, the first partially written.
  std::deque<BufRef> writing_;
  size_t write_off_ = 0;  // bytes of writing_.front() already written, prefix included
  size_t hello_off_ = 0;
  // Read side.
  std::vector<uint8_t> stage_;
  size_t stage_len_ = 0;
  size_t hello_got_ = 0;
  uint64_t held_ = 0;
};

class TcpDriver final : public Driver {
 public:
  explicit TcpDriver(const DriverOptions& o) : opts_(o) {}
  ~TcpDriver() override;
  absl::Status Init();

  std::string_view name() const override { return "tcp"; }
  absl::StatusOr<std::shared_ptr<Channel>> Connect(const ChannelParams& p) override;
  std::shared_ptr<Channel> Accept() override;
  int accept_fd() const override { return accept_q_.fd(); }
  absl::Status Destroy(Channel& ch) override;
  absl::Status MoveChannel(uint32_t id, int engine) override;
  std::vector<EngineInfo> Engines() const override;
  DriverStats Stats() const override;
  std::vector<std::shared_ptr<Channel>> Channels() const override;

  const DriverOptions& opts() const { return opts_; }

 private:
  class Listener final : public EngineTask {
   public:
    explicit Listener(TcpDriver* d) : d_(d) {}
    bool Run(uint64_t, uint64_t*) override { return d_->AcceptPending(); }
    int wait_fd() const override { return d_->listen_fd_; }

   private:
    TcpDriver* d_;
  };
  bool AcceptPending();
  std::shared_ptr<TcpChannel> Adopt(int fd, int engine);
  int PickEngine() const;

  DriverOptions opts_;
  std::vector<std::unique_ptr<Engine>> engines_;
  std::unique_ptr<Listener> listener_;
  int listen_fd_ = -1;
  mutable std::mutex mu_;
  uint32_t next_id_ = 1;
  std::vector<std::shared_ptr<TcpChannel>> channels_;
  AcceptQueue accept_q_;
  std::mutex move_mu_;
};

// ---------------------------------------------------------------------------------------------

bool TcpChannel::DoConnectOrHello(uint64_t now) {
  if (!connected_) {
    pollfd p{fd_, POLLOUT, 0};
    if (poll(&p, 1, 0) <= 0) {
      if (now >= connect_deadline_us) Fail(ChannelState::kFailed);
      want_write_ = true;
      return false;
    }
    int err = 0;
    socklen_t len = sizeof(err);
    getsockopt(fd_, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) {
      Fail(ChannelState::kFailed);
      return true;
    }
    connected_ = true;
  }
  if (!hello_sent_) {
    ssize_t n = send(fd_, kHello + hello_off_, sizeof(kHello) - hello_off_, MSG_NOSIGNAL);
    if (n > 0) hello_off_ += static_cast<size_t>(n);
    if (n < 0 && errno != EAGAIN) {
      Fail(ChannelState::kFailed);
      return true;
    }
    hello_sent_ = hello_off_ == sizeof(kHello);
  }
  return true;
}

bool TcpChannel::DoWrite() {
  // Take what the producer queued.
  BufRef b[64];
  bool worked = false;
  for (uint32_t m; writing_.size() < kRing && (m = txq_.Pop(b)) > 0;) {
    for (uint32_t i = 0; i < m; ++i) {
      const uint32_t be = htonl(b[i].len);
      std::memcpy(BufAddr(b[i].token) - 4, &be, 4);
      writing_.push_back(b[i]);
      pub_.tx_segments.fetch_add(1, std::memory_order_relaxed);
      pub_.tx_bytes.fetch_add(b[i].len - wire::kSegHdrLen, std::memory_order_relaxed);
    }
    worked = true;
  }
  want_write_ = false;
  while (!writing_.empty()) {
    iovec iov[64];
    int n = 0;
    size_t off = write_off_;
    for (const BufRef& r : writing_) {
      if (n == 64) break;
      iov[n].iov_base = BufAddr(r.token) - 4 + off;
      iov[n].iov_len = 4 + r.len - off;
      off = 0;
      n++;
    }
    const ssize_t w = writev(fd_, iov, n);
    if (w < 0) {
      if (errno == EAGAIN) {
        want_write_ = true;
        break;
      }
      Fail(ChannelState::kFailed);  // EPIPE, ECONNRESET, ...: the connection is gone
      return true;
    }
    worked = true;
    size_t left = static_cast<size_t>(w);
    uint64_t freed[64];
    uint32_t nf = 0;
    while (left > 0) {
      const BufRef& r = writing_.front();
      const size_t rem = 4 + r.len - write_off_;
      if (left < rem) {
        write_off_ += left;
        left = 0;
        break;
      }
      left -= rem;
      write_off_ = 0;
      freed[nf++] = r.token;
      writing_.pop_front();
    }
    // A written record's slot goes straight back to the producer: TCP owns the bytes now.
    free_.Push({freed, nf});
    NotifyApp(kWritable);
  }
  uint64_t queued = 0;
  for (const BufRef& r : writing_) queued += r.len;
  pub_.tx_queued_bytes.store(queued, std::memory_order_relaxed);
  return worked;
}

bool TcpChannel::DoRead() {
  bool worked = false;
  // Slots the consumer gave back.
  BufRef b[64];
  for (uint32_t m; (m = ret_.Pop(b)) > 0;) {
    for (uint32_t i = 0; i < m; ++i) rx_free_.push_back(b[i].token), held_ -= b[i].len;
    worked = true;
  }
  for (;;) {
    // Parse whole records out of the staging buffer into receive slots.
    size_t pos = 0;
    uint32_t delivered = 0;
    while (!hello_seen_ && pos < stage_len_) {
      if (stage_[pos] != kHello[hello_got_]) {
        rx_malformed.fetch_add(1, std::memory_order_relaxed);
        Fail(ChannelState::kFailed);
        return true;
      }
      pos++;
      if (++hello_got_ == sizeof(kHello)) {
        hello_seen_ = true;
        if (state() == ChannelState::kConnecting) SetState(ChannelState::kUp);
      }
    }
    while (hello_seen_ && stage_len_ - pos >= 4 && !rx_free_.empty() && rxq_.Room() > 0) {
      uint32_t be;
      std::memcpy(&be, &stage_[pos], 4);
      const uint32_t len = ntohl(be);
      wire::SegHeader h;
      size_t off;
      if (len == 0) {  // goodbye: the peer destroyed the channel
        goodbye_ = true;
        pos += 4;
        continue;
      }
      if (len < wire::kSegHdrLen || len > kSlot - kPrefix) {
        rx_malformed.fetch_add(1, std::memory_order_relaxed);
        Fail(ChannelState::kFailed);
        return true;
      }
      if (stage_len_ - pos - 4 < len) break;
      if (wire::ParseSegment({&stage_[pos + 4], len}, &h, &off) != NC_CNT_REDIRECT) {
        rx_malformed.fetch_add(1, std::memory_order_relaxed);
        Fail(ChannelState::kFailed);
        return true;
      }
      const uint64_t tok = rx_free_.back();
      rx_free_.pop_back();
      std::memcpy(BufAddr(tok), &stage_[pos + 4], len);
      rxq_.PushOne(BufRef{tok, len});
      held_ += len;
      pos += 4 + len;
      delivered++;
    }
    if (pos) {
      std::memmove(stage_.data(), stage_.data() + pos, stage_len_ - pos);
      stage_len_ -= pos;
      worked = true;
    }
    if (delivered) {
      rx_records.fetch_add(delivered, std::memory_order_relaxed);
      NotifyApp(kReadable);
    }
    // No receive slot free: stop reading; the kernel's TCP window closes and the peer stops.
    if (hello_seen_ && (rx_free_.empty() || rxq_.Room() == 0)) break;
    if (stage_len_ == stage_.size()) break;
    const ssize_t r = read(fd_, stage_.data() + stage_len_, stage_.size() - stage_len_);
    if (r == 0) {
      // End of stream. After a goodbye it is an orderly close; without one the peer process or
      // host went away (the kernel closed its socket). What was delivered stays readable.
      Fail(goodbye_ && stage_len_ == 0 ? ChannelState::kClosed : ChannelState::kFailed);
      return true;
    }
    if (r < 0) {
      if (errno != EAGAIN) Fail(ChannelState::kFailed);
      break;
    }
    stage_len_ += static_cast<size_t>(r);
    worked = true;
  }
  pub_.rx_queued_bytes.store(held_, std::memory_order_relaxed);
  return worked;
}

bool TcpChannel::Run(uint64_t now, uint64_t* deadline) {
  if (dead_) {
    // Keep recycling what the consumer returns so a failed channel's slots are accounted for.
    BufRef b[64];
    bool any = false;
    for (uint32_t m; (m = ret_.Pop(b)) > 0;) {
      for (uint32_t i = 0; i < m; ++i) rx_free_.push_back(b[i].token), held_ -= b[i].len;
      any = true;
    }
    pub_.rx_queued_bytes.store(held_, std::memory_order_relaxed);
    return any;
  }
  bool worked = false;
  if (!connected_ || !hello_sent_) {
    worked |= DoConnectOrHello(now);
    if (!connected_) {
      *deadline = std::min(*deadline, connect_deadline_us);
      return worked;
    }
  }
  if (!dead_ && hello_sent_) worked |= DoWrite();
  if (!dead_) worked |= DoRead();
  if (state() == ChannelState::kConnecting && !hello_seen_)
    *deadline = std::min(*deadline, connect_deadline_us);
  if (state() == ChannelState::kConnecting && !hello_seen_ && now >= connect_deadline_us)
    Fail(ChannelState::kFailed);
  return worked;
}

// ---------------------------------------------------------------------------------------------

absl::Status TcpDriver::Init() {
  std::unique_ptr<NetnsScope> ns;
  if (!opts_.netns.empty()) {
    ns = std::make_unique<NetnsScope>(opts_.netns);
    if (!ns->ok()) return ns->status();
  }
  auto engines = StartEngines(opts_);
  if (!engines.ok()) return engines.status();
  engines_ = std::move(*engines);
  if (opts_.accept) {
    listen_fd_ = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (listen_fd_ < 0) return ErrnoStatus(errno, "socket");
    int one = 1;
    setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(opts_.tcp_port);
    a.sin_addr.s_addr = htonl(INADDR_ANY);
    if (bind(listen_fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a)))
      return ErrnoStatus(errno, absl::StrFormat("bind TCP port %u", opts_.tcp_port));
    if (listen(listen_fd_, 128)) return ErrnoStatus(errno, "listen");
    listener_ = std::make_unique<Listener>(this);
    engines_[0]->Add(listener_.get());
  }
  return absl::OkStatus();
}

TcpDriver::~TcpDriver() {
  if (listener_ && listener_->engine.load()) engines_[0]->Remove(listener_.get());
  std::vector<std::shared_ptr<TcpChannel>> chans;
  {
    std::lock_guard g(mu_);
    chans = channels_;
  }
  for (auto& c : chans) (void)Destroy(*c);
  for (auto& e : engines_) e->Stop();
  if (listen_fd_ >= 0) close(listen_fd_);
}

int TcpDriver::PickEngine() const {
  std::vector<int> load(engines_.size(), 0);
  for (const auto& c : channels_) load[c->pub_.engine.load()]++;
  return static_cast<int>(std::min_element(load.begin(), load.end()) - load.begin());
}

static void TuneSocket(int fd, const DriverOptions& o) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  // Dead-peer detection: unacknowledged data for longer than the timeout fails the connection,
  // and an idle connection is probed.
  const unsigned timeout_ms = static_cast<unsigned>(absl::ToInt64Milliseconds(o.dead_peer_timeout));
  setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &timeout_ms, sizeof(timeout_ms));
  setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
  int idle = std::max(1, static_cast<int>(timeout_ms / 4000));
  int cnt = 3;
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle));
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &idle, sizeof(idle));
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof(cnt));
}

std::shared_ptr<TcpChannel> TcpDriver::Adopt(int fd, int engine) {
  std::shared_ptr<TcpChannel> ch;
  {
    std::lock_guard g(mu_);
    ch = std::make_shared<TcpChannel>(next_id_++, fd);
    if (engine < 0) engine = PickEngine();
    channels_.push_back(ch);
  }
  ch->pub_.engine = engine;
  return ch;
}

absl::StatusOr<std::shared_ptr<Channel>> TcpDriver::Connect(const ChannelParams& p) {
  if (p.peer_ipv4 == 0) return absl::InvalidArgumentError("no peer address");
  if (p.engine >= static_cast<int>(engines_.size()))
    return absl::InvalidArgumentError(absl::StrFormat("no engine %d", p.engine));
  int fd;
  {
    std::unique_ptr<NetnsScope> ns;
    if (!opts_.netns.empty()) ns = std::make_unique<NetnsScope>(opts_.netns);
    fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  }
  if (fd < 0) return ErrnoStatus(errno, "socket");
  TuneSocket(fd, opts_);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(opts_.tcp_port);
  a.sin_addr.s_addr = htonl(p.peer_ipv4);
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) && errno != EINPROGRESS) {
    const int err = errno;
    close(fd);
    return ErrnoStatus(err, "connect");
  }
  auto ch = Adopt(fd, p.engine);
  ch->set_peer_ipv4(p.peer_ipv4);
  ch->connect_deadline_us =
      NowUs() + static_cast<uint64_t>(absl::ToInt64Microseconds(p.connect_timeout));
  std::lock_guard mv(move_mu_);
  engines_[ch->pub_.engine]->Add(ch.get());
  return std::shared_ptr<Channel>(ch);
}

bool TcpDriver::AcceptPending() {
  bool any = false;
  for (;;) {
    sockaddr_in peer{};
    socklen_t plen = sizeof(peer);
    const int fd = accept4(listen_fd_, reinterpret_cast<sockaddr*>(&peer), &plen,
                           SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) break;
    any = true;
    TuneSocket(fd, opts_);
    auto ch = std::make_shared<TcpChannel>(0, fd);
    ch->set_peer_ipv4(ntohl(peer.sin_addr.s_addr));
    ch->connect_deadline_us = NowUs() + 2'000'000;  // the peer's hello must come by then
    int target;
    {
      std::lock_guard g(mu_);
      target = PickEngine();
    }
    ch->pub_.engine = target;
    // On the engine running us this only posts the add (it cannot wait for itself).
    engines_[target]->Add(ch.get());
    {
      std::lock_guard g(mu_);
      ch->set_id(next_id_++);
      channels_.push_back(ch);
    }
    accept_q_.Push(ch);
  }
  return any;
}

std::shared_ptr<Channel> TcpDriver::Accept() { return accept_q_.Pop(); }

absl::Status TcpDriver::Destroy(Channel& base) {
  std::lock_guard mv(move_mu_);
  auto ch = FindChannel(mu_, channels_, [&](const Channel& c) { return &c == &base; });
  if (!ch) return absl::NotFoundError(absl::StrFormat("channel %u is not ours", base.id()));
  ch->Linger(opts_.close_linger);  // until every record is in the kernel's socket buffer
  engines_[ch->pub_.engine.load()]->Remove(ch.get());
  ch->Shutdown();
  {
    std::lock_guard g(mu_);
    channels_.erase(std::remove(channels_.begin(), channels_.end(), ch), channels_.end());
  }
  if (ch->state() != ChannelState::kFailed) ch->SetState(ChannelState::kClosed);
  return absl::OkStatus();
}

absl::Status TcpDriver::MoveChannel(uint32_t id, int engine) {
  if (auto st = CheckEngineIndex(engine, engines_.size()); !st.ok()) return st;
  std::lock_guard mv(move_mu_);
  auto ch = FindChannel(mu_, channels_, [&](const Channel& c) { return c.id() == id; });
  if (!ch) return absl::NotFoundError(absl::StrFormat("no channel %u", id));
  const int from = ch->pub_.engine.load();
  if (from == engine) return absl::OkStatus();
  engines_[from]->Remove(ch.get());
  engines_[engine]->Add(ch.get());
  ch->pub_.engine = engine;
  return absl::OkStatus();
}

std::vector<EngineInfo> TcpDriver::Engines() const { return DescribeEngines(engines_); }

DriverStats TcpDriver::Stats() const {
  DriverStats s;
  std::lock_guard g(mu_);
  for (const auto& c : channels_) {
    s.rx_frames += c->rx_records.load(std::memory_order_relaxed);
    s.rx_malformed += c->rx_malformed.load(std::memory_order_relaxed);
  }
  return s;
}

std::vector<std::shared_ptr<Channel>> TcpDriver::Channels() const {
  std::lock_guard g(mu_);
  return {channels_.begin(), channels_.end()};
}

}  // namespace

absl::StatusOr<std::unique_ptr<Driver>> CreateTcpDriver(const DriverOptions& opts) {
  return MakeDriver<TcpDriver>(opts);
}

}  // namespace netch::chan
