#include "afxdp_channels/tcp_driver.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/epoll.h>
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
#include "common/random.h"

namespace netch::chan {
namespace {

constexpr uint32_t kRing = 256;    // slots per direction
constexpr uint32_t kSlot = 16384;  // bytes per slot
constexpr uint32_t kPrefix = 8;    // headroom: the record's length prefix (4) + padding
constexpr size_t kMaxPayload = kSlot - kPrefix - wire::kSegHdrLen;
constexpr size_t kStage = 256 * 1024;  // socket read staging buffer
// Slots are allocated in chunks as a channel needs them (an idle channel holds one chunk per
// direction, 512 KB, not the 8 MB of a full ring each way).
constexpr uint32_t kChunkSlots = 16;
constexpr uint32_t kChunks = 2 * kRing / kChunkSlots;
// Accepted connections whose hello has not arrived: they hold an fd and 48 bytes, no buffers,
// and are closed beyond these caps or after DriverOptions::dead_peer_timeout.
constexpr size_t kMaxPending = 256;
constexpr size_t kMaxPendingPerPeer = 16;

class TcpDriver;

class TcpChannel final : public ChannelCore, public EngineTask {
 public:
  // `peer_hello` is the initiator's hello when we accepted the connection (our hello answers
  // it), nullptr when we initiate.
  TcpChannel(TcpDriver* d, int fd, uint32_t peer_ip, const wire::TcpHello* peer_hello);
  ~TcpChannel() override {
    if (fd_ >= 0) close(fd_);
  }

  uint8_t* BufAddr(uint64_t token) override {
    const uint32_t slot = static_cast<uint32_t>(token / kSlot);
    return chunks_[slot / kChunkSlots].get() + (slot % kChunkSlots) * kSlot + token % kSlot;
  }
  uint32_t peer_ipv4() const override { return peer_ip_; }
  bool Run(uint64_t now, uint64_t* deadline) override;
  int wait_fd() const override { return dead_ ? -1 : fd_; }
  short wait_events() const override {
    return static_cast<short>(POLLIN | (want_write_ ? POLLOUT : 0));
  }

  void Shutdown() {
    // Goodbye record (length 0) unless a record is half written; then the peer sees a bare
    // end of stream and fails the channel, which is the truth.
    if (!dead_ && fd_ >= 0 && write_off_ == 0 && hello_off_ == sizeof(hello_out_)) {
      static constexpr uint8_t kBye[4] = {0, 0, 0, 0};
      if (writing_.empty()) (void)!send(fd_, kBye, sizeof(kBye), MSG_NOSIGNAL | MSG_DONTWAIT);
    }
    dead_ = true;
    if (fd_ >= 0) shutdown(fd_, SHUT_RDWR);
  }
  // The peer's stack restarted (a hello with a new incarnation came from its address): this
  // channel's far end is gone. Any thread; the engine fails the channel on its next round.
  void Retire() {
    retire_.store(true, std::memory_order_release);
    Wake();
  }

  uint64_t connect_deadline_us = 0;
  std::atomic<uint64_t> peer_incarnation{0};  // 0 until the peer's hello arrived
  std::atomic<uint64_t> rx_malformed{0}, rx_records{0}, hello_bad{0};

 private:
  static uint64_t Token(uint32_t slot) { return uint64_t{slot} * kSlot + kPrefix; }
  // Allocates the next chunk of slots for tx (the producer's free_ ring) or rx (rx_free_).
  bool Grow(bool tx);
  bool DoConnectOrHello(uint64_t now);
  bool DoWrite();
  bool DoRead();
  bool ReadHello();
  void Fail(FailCause c);
  void Close() {
    dead_ = true;
    SetState(ChannelState::kClosed);
  }

  TcpDriver* const driver_;
  int fd_;
  const uint32_t peer_ip_;
  const uint64_t token_ = RandomNonZeroU64();
  bool connected_ = false;  // TCP connection established
  bool hello_seen_ = false;
  bool dead_ = false;
  bool goodbye_ = false;
  bool want_write_ = false;
  std::atomic<bool> retire_{false};
  // Slot chunks: written by the engine before their tokens are published through free_ (release),
  // read by the producer after taking a token (acquire), so the pointer is visible.
  std::unique_ptr<uint8_t[]> chunks_[kChunks];
  uint32_t tx_chunks_ = 0, rx_chunks_ = 0;  // allocated so far, each up to kChunks / 2
  std::vector<uint64_t> rx_free_;           // engine-side pool of receive slots

  // Write side: our hello first, then buffers taken from txq_, the first partially written.
  uint8_t hello_out_[wire::kTcpHelloLen];
  size_t hello_off_ = 0;
  std::deque<BufRef> writing_;
  size_t write_off_ = 0;  // bytes of writing_.front() already written, prefix included
  // Read side.
  uint8_t hello_in_[wire::kTcpHelloLen];
  size_t hello_got_ = 0;
  std::vector<uint8_t> stage_;
  size_t stage_len_ = 0;
  uint64_t held_ = 0;
};

class TcpDriver final : public Driver {
 public:
  explicit TcpDriver(const DriverOptions& o) : opts_(o), incarnation_(RandomNonZeroU64()) {}
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
  uint64_t incarnation() const { return incarnation_; }
  // A hello from `peer_ip` carried stack incarnation `inc`: channels to that address from another
  // incarnation belong to a stack that is gone (the peer restarted) and fail.
  void RetireOldIncarnations(uint32_t peer_ip, uint64_t inc);

  // Channels failed, by FailCause; kept here because a failed channel is reaped with its own
  // counters.
  std::array<std::atomic<uint64_t>, kFailCauses> failed{};

 private:
  // Accepts TCP connections and holds each, without buffers, until its hello arrives (then it
  // becomes a channel) or the caps or the deadline close it. Runs on engine 0; its wait fd is an
  // epoll set of the listening socket and the pending connections.
  class Listener final : public EngineTask {
   public:
    explicit Listener(TcpDriver* d) : d_(d) {}
    ~Listener() override;
    absl::Status Init(int listen_fd);
    bool Run(uint64_t now, uint64_t* deadline) override;
    int wait_fd() const override { return ep_fd_; }
    std::atomic<uint64_t> hellos{0}, hellos_bad{0}, refused{0}, timed_out{0};
    std::atomic<size_t> pending_count{0};

   private:
    struct Pending {
      int fd;
      uint32_t ip;
      uint64_t deadline_us;
      size_t got = 0;
      uint8_t buf[wire::kTcpHelloLen];
    };
    void Drop(size_t i);
    TcpDriver* d_;
    int listen_fd_ = -1, ep_fd_ = -1;
    std::vector<Pending> pending_;
  };
  void AdoptAccepted(int fd, uint32_t peer_ip, const wire::TcpHello& hello);
  // Registers a channel: id, engine (the least loaded unless given) and the channel list, all
  // under mu_ so no reader sees it half set up.
  void Register(const std::shared_ptr<TcpChannel>& ch, int engine);
  int PickEngineLocked() const;

  DriverOptions opts_;
  const uint64_t incarnation_;
  std::vector<std::unique_ptr<Engine>> engines_;
  std::unique_ptr<Listener> listener_;
  int listen_fd_ = -1;
  mutable std::mutex mu_;
  uint32_t next_id_ = 1;
  std::vector<std::shared_ptr<TcpChannel>> channels_;
  AcceptQueue accept_q_;
  std::mutex move_mu_;
  std::atomic<uint64_t> refused_over_cap_{0};
};

// ---------------------------------------------------------------------------------------------

TcpChannel::TcpChannel(TcpDriver* d, int fd, uint32_t peer_ip, const wire::TcpHello* peer_hello)
    : ChannelCore(0, kRing, kMaxPayload), driver_(d), fd_(fd), peer_ip_(peer_ip), stage_(kStage) {
  wire::TcpHello mine{token_, 0, d->incarnation()};
  if (peer_hello) {
    // Accepted: TCP is connected and the initiator's hello checked; ours echoes its token.
    mine.echo_token = peer_hello->token;
    connected_ = hello_seen_ = true;
    hello_got_ = sizeof(hello_in_);
    peer_incarnation.store(peer_hello->incarnation, std::memory_order_relaxed);
    SetState(ChannelState::kUp);
  }
  wire::WriteTcpHello(hello_out_, mine);
  Grow(/*tx=*/true);
  Grow(/*tx=*/false);
  set_task(this);
}

bool TcpChannel::Grow(bool tx) {
  uint32_t& n = tx ? tx_chunks_ : rx_chunks_;
  if (n == kChunks / 2) return false;
  const uint32_t chunk = (tx ? 0 : kChunks / 2) + n++;
  chunks_[chunk] = std::make_unique<uint8_t[]>(size_t{kChunkSlots} * kSlot);
  uint64_t toks[kChunkSlots];
  for (uint32_t i = 0; i < kChunkSlots; ++i) toks[i] = Token(chunk * kChunkSlots + i);
  if (tx) {
    free_.Push({toks, kChunkSlots});  // release: the chunk pointer is visible with the tokens
    NotifyApp(kWritable);
  } else {
    rx_free_.insert(rx_free_.end(), toks, toks + kChunkSlots);
  }
  return true;
}

// ---------------------------------------------------------------------------------------------

bool TcpChannel::DoConnectOrHello(uint64_t now) {
  if (!connected_) {
    pollfd p{fd_, POLLOUT, 0};
    if (poll(&p, 1, 0) <= 0) {
      if (now >= connect_deadline_us) Fail(FailCause::kHandshakeTimeout);
      want_write_ = true;
      return false;
    }
    int err = 0;
    socklen_t len = sizeof(err);
    getsockopt(fd_, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) {
      Fail(FailCause::kRefused);
      return true;
    }
    connected_ = true;
  }
  if (hello_off_ < sizeof(hello_out_)) {
    ssize_t n = send(fd_, hello_out_ + hello_off_, sizeof(hello_out_) - hello_off_, MSG_NOSIGNAL);
    if (n > 0) hello_off_ += static_cast<size_t>(n);
    if (n < 0 && errno != EAGAIN) {
      Fail(FailCause::kBroken);
      return true;
    }
  }
  return true;
}

void TcpChannel::Fail(FailCause c) {
  if (!dead_) driver_->failed[static_cast<size_t>(c)].fetch_add(1, std::memory_order_relaxed);
  dead_ = true;
  ChannelCore::Fail(c);
}

// The responder's hello, on a channel we initiated: it must echo our token.
bool TcpChannel::ReadHello() {
  while (hello_got_ < sizeof(hello_in_)) {
    const ssize_t r = read(fd_, hello_in_ + hello_got_, sizeof(hello_in_) - hello_got_);
    if (r == 0 || (r < 0 && errno != EAGAIN)) {
      Fail(FailCause::kRefused);  // refused after TCP connected: over the peer's caps
      return true;
    }
    if (r < 0) return false;
    hello_got_ += static_cast<size_t>(r);
  }
  wire::TcpHello h;
  if (!wire::ReadTcpHello(hello_in_, &h) || h.echo_token != token_ || h.token == 0) {
    hello_bad.fetch_add(1, std::memory_order_relaxed);
    Fail(FailCause::kRefused);
    return true;
  }
  hello_seen_ = true;
  peer_incarnation.store(h.incarnation, std::memory_order_release);
  SetState(ChannelState::kUp);
  driver_->RetireOldIncarnations(peer_ip_, h.incarnation);
  return true;
}

bool TcpChannel::DoWrite() {
  // A producer that drained every free slot gets another chunk (up to a full ring), but only
  // while the kernel takes what we write: with the socket full, more slots would only let a
  // sender whose peer stopped reading queue more.
  if (free_.SizeApprox() == 0 && txq_.SizeApprox() > 0 && writing_.empty()) Grow(/*tx=*/true);
  // Take what the producer queued.
  BufRef b[64];
  bool worked = false;
  for (uint32_t m; writing_.size() < kRing && (m = txq_.Peek(b)) > 0;) {
    uint64_t added = 0;
    for (uint32_t i = 0; i < m; ++i) {
      const uint32_t be = htonl(b[i].len);
      std::memcpy(BufAddr(b[i].token) - 4, &be, 4);
      writing_.push_back(b[i]);
      added += b[i].len;
      pub_.tx_segments.fetch_add(1, std::memory_order_relaxed);
      pub_.tx_bytes.fetch_add(b[i].len - wire::kSegHdrLen, std::memory_order_relaxed);
    }
    // Counted as queued before they leave txq_ (Consume publishes it): never in neither place
    // for tx_idle (the AF_XDP driver's RunChannel says why).
    pub_.tx_queued_bytes.fetch_add(added, std::memory_order_relaxed);
    txq_.Consume(m);
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
      Fail(FailCause::kBroken);  // EPIPE, ECONNRESET, ...: the connection is gone
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
  if (!hello_seen_) {
    worked |= ReadHello();
    if (!hello_seen_) return worked;
  }
  for (;;) {
    // Parse whole records out of the staging buffer into receive slots.
    size_t pos = 0;
    uint32_t delivered = 0;
    if (rx_free_.empty() && stage_len_ > 0) Grow(/*tx=*/false);
    while (!rx_free_.empty() && rxq_.Room() > 0) {
      size_t len = 0;
      const auto rec =
          wire::ParseTcpRecord({&stage_[pos], stage_len_ - pos}, kSlot - kPrefix, &len);
      if (rec == wire::TcpRecord::kNeedMore) break;
      if (rec == wire::TcpRecord::kGoodbye) {  // the peer destroyed the channel
        goodbye_ = true;
        pos += 4;
        continue;
      }
      if (rec == wire::TcpRecord::kMalformed) {
        rx_malformed.fetch_add(1, std::memory_order_relaxed);
        Fail(FailCause::kProtocolError);
        return true;
      }
      const uint64_t tok = rx_free_.back();
      rx_free_.pop_back();
      std::memcpy(BufAddr(tok), &stage_[pos + 4], len);
      rxq_.PushOne(BufRef{tok, static_cast<uint32_t>(len)});
      held_ += len;
      pos += 4 + len;
      delivered++;
      if (rx_free_.empty()) Grow(/*tx=*/false);
    }
    if (pos) {
      std::memmove(stage_.data(), stage_.data() + pos, stage_len_ - pos);
      stage_len_ -= pos;
      worked = true;
    }
    if (delivered) {
      rx_records.fetch_add(delivered, std::memory_order_relaxed);
      NotifyDelivered();
    }
    // No receive slot free: stop reading; the kernel's TCP window closes and the peer stops.
    if (rx_free_.empty() || rxq_.Room() == 0) break;
    if (stage_len_ == stage_.size()) break;
    const ssize_t r = read(fd_, stage_.data() + stage_len_, stage_.size() - stage_len_);
    if (r == 0) {
      // End of stream. After a goodbye it is an orderly close; without one the peer process or
      // host went away (the kernel closed its socket). What was delivered stays readable.
      if (goodbye_ && stage_len_ == 0)
        Close();
      else
        Fail(FailCause::kBroken);
      return true;
    }
    if (r < 0) {
      if (errno != EAGAIN) Fail(FailCause::kBroken);
      break;
    }
    stage_len_ += static_cast<size_t>(r);
    worked = true;
  }
  pub_.rx_queued_bytes.store(held_, std::memory_order_relaxed);
  pub_.rx_pressure.store(rx_chunks_ * kChunkSlots - rx_free_.size() > kRing / 2,
                         std::memory_order_relaxed);
  return worked;
}

bool TcpChannel::Run(uint64_t now, uint64_t* deadline) {
  if (!dead_ && retire_.load(std::memory_order_acquire)) {
    Fail(FailCause::kPeerRestarted);
    shutdown(fd_, SHUT_RDWR);
  }
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
  if (!connected_ || hello_off_ < sizeof(hello_out_)) {
    worked |= DoConnectOrHello(now);
    if (!connected_) {
      *deadline = std::min(*deadline, connect_deadline_us);
      return worked;
    }
  }
  // Records only after our hello: the peer parses exactly one hello first.
  if (!dead_ && hello_off_ == sizeof(hello_out_)) worked |= DoWrite();
  if (!dead_) worked |= DoRead();
  if (!dead_ && !hello_seen_) {
    if (now >= connect_deadline_us) Fail(FailCause::kHandshakeTimeout);
    *deadline = std::min(*deadline, connect_deadline_us);
  }
  return worked;
}

// ---------------------------------------------------------------------------------------------

TcpDriver::Listener::~Listener() {
  for (const Pending& p : pending_) close(p.fd);
  if (ep_fd_ >= 0) close(ep_fd_);
}

absl::Status TcpDriver::Listener::Init(int listen_fd) {
  listen_fd_ = listen_fd;
  ep_fd_ = epoll_create1(EPOLL_CLOEXEC);
  if (ep_fd_ < 0) return ErrnoStatus(errno, "epoll_create1");
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.fd = listen_fd;
  if (epoll_ctl(ep_fd_, EPOLL_CTL_ADD, listen_fd, &ev)) return ErrnoStatus(errno, "epoll_ctl");
  pending_.reserve(kMaxPending);
  return absl::OkStatus();
}

void TcpDriver::Listener::Drop(size_t i) {
  epoll_ctl(ep_fd_, EPOLL_CTL_DEL, pending_[i].fd, nullptr);
  close(pending_[i].fd);
  pending_[i] = pending_.back();
  pending_.pop_back();
}

bool TcpDriver::Listener::Run(uint64_t now, uint64_t* deadline) {
  bool worked = false;
  for (;;) {
    sockaddr_in peer{};
    socklen_t plen = sizeof(peer);
    const int fd = accept4(listen_fd_, reinterpret_cast<sockaddr*>(&peer), &plen,
                           SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) break;
    worked = true;
    const uint32_t ip = ntohl(peer.sin_addr.s_addr);
    size_t from_ip = 0;
    for (const Pending& p : pending_) from_ip += p.ip == ip;
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = fd;
    if (pending_.size() >= kMaxPending || from_ip >= kMaxPendingPerPeer ||
        epoll_ctl(ep_fd_, EPOLL_CTL_ADD, fd, &ev)) {
      close(fd);
      refused.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    const auto wait = absl::ToInt64Microseconds(d_->opts().dead_peer_timeout);
    pending_.push_back({fd, ip, now + static_cast<uint64_t>(wait), 0, {}});
  }
  // Hellos: read exactly their length (records may follow at once; the channel reads those).
  epoll_event evs[64];
  const int n = pending_.empty() ? 0 : epoll_wait(ep_fd_, evs, 64, 0);
  for (int e = 0; e < n; ++e) {
    if (evs[e].data.fd == listen_fd_) continue;
    size_t i = 0;
    while (i < pending_.size() && pending_[i].fd != evs[e].data.fd) ++i;
    if (i == pending_.size()) continue;
    Pending& p = pending_[i];
    worked = true;
    const ssize_t r = read(p.fd, p.buf + p.got, sizeof(p.buf) - p.got);
    if (r < 0 && errno == EAGAIN) continue;
    if (r <= 0) {
      Drop(i);
      continue;
    }
    p.got += static_cast<size_t>(r);
    if (p.got < sizeof(p.buf)) continue;
    wire::TcpHello h;
    if (!wire::ReadTcpHello(p.buf, &h) || h.token == 0 || h.echo_token != 0) {
      hellos_bad.fetch_add(1, std::memory_order_relaxed);
      Drop(i);
      continue;
    }
    hellos.fetch_add(1, std::memory_order_relaxed);
    const int fd = p.fd;
    const uint32_t ip = p.ip;
    epoll_ctl(ep_fd_, EPOLL_CTL_DEL, fd, nullptr);
    pending_[i] = pending_.back();
    pending_.pop_back();
    d_->AdoptAccepted(fd, ip, h);
  }
  for (size_t i = 0; i < pending_.size();) {
    if (now >= pending_[i].deadline_us) {
      timed_out.fetch_add(1, std::memory_order_relaxed);
      Drop(i);
      worked = true;
      continue;
    }
    *deadline = std::min(*deadline, pending_[i].deadline_us);
    ++i;
  }
  pending_count.store(pending_.size(), std::memory_order_relaxed);
  return worked;
}

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
    if (auto st = listener_->Init(listen_fd_); !st.ok()) return st;
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

int TcpDriver::PickEngineLocked() const {
  std::vector<int> load(engines_.size(), 0);
  for (const auto& c : channels_) {
    const int e = c->pub_.engine.load();
    if (e >= 0 && e < static_cast<int>(load.size())) load[e]++;
  }
  return static_cast<int>(std::min_element(load.begin(), load.end()) - load.begin());
}

void TcpDriver::Register(const std::shared_ptr<TcpChannel>& ch, int engine) {
  std::lock_guard g(mu_);
  ch->set_id(next_id_++);
  ch->pub_.engine = engine >= 0 ? engine : PickEngineLocked();
  channels_.push_back(ch);
}

void TcpDriver::RetireOldIncarnations(uint32_t peer_ip, uint64_t inc) {
  std::lock_guard g(mu_);
  for (const auto& c : channels_) {
    const uint64_t known = c->peer_incarnation.load(std::memory_order_acquire);
    if (c->peer_ipv4() == peer_ip && known != 0 && known != inc) c->Retire();
  }
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
  auto ch = std::make_shared<TcpChannel>(this, fd, p.peer_ipv4, nullptr);
  ch->connect_deadline_us =
      NowUs() + static_cast<uint64_t>(absl::ToInt64Microseconds(p.connect_timeout));
  Register(ch, p.engine);
  std::lock_guard mv(move_mu_);
  engines_[ch->pub_.engine]->Add(ch.get());
  return std::shared_ptr<Channel>(ch);
}

void TcpDriver::AdoptAccepted(int fd, uint32_t peer_ip, const wire::TcpHello& hello) {
  size_t from_peer = 0;
  {
    std::lock_guard g(mu_);
    for (const auto& c : channels_) from_peer += c->peer_ipv4() == peer_ip;
  }
  if (from_peer >= opts_.max_channels_per_peer) {
    close(fd);
    refused_over_cap_.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  TuneSocket(fd, opts_);
  RetireOldIncarnations(peer_ip, hello.incarnation);
  auto ch = std::make_shared<TcpChannel>(this, fd, peer_ip, &hello);
  Register(ch, -1);
  // On the engine running us this only posts the add (it cannot wait for itself).
  engines_[ch->pub_.engine.load()]->Add(ch.get());
  accept_q_.Push(ch);
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
    s.handshakes_bad += c->hello_bad.load(std::memory_order_relaxed);
  }
  if (listener_) {
    s.handshakes_rx = listener_->hellos.load(std::memory_order_relaxed);
    s.handshakes_bad += listener_->hellos_bad.load(std::memory_order_relaxed);
    s.handshakes_dropped = listener_->refused.load(std::memory_order_relaxed) +
                           listener_->timed_out.load(std::memory_order_relaxed);
    s.handshakes_pending = listener_->pending_count.load(std::memory_order_relaxed);
  }
  s.handshakes_dropped += refused_over_cap_.load(std::memory_order_relaxed);
  for (size_t i = 0; i < kFailCauses; ++i)
    s.channels_failed[i] = failed[i].load(std::memory_order_relaxed);
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
