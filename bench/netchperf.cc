// netchperf - an iperf-like tool that runs the same workload over the NetChannel stack (VNS
// sockets) or over plain kernel TCP sockets, so the two can be compared on the same hosts.
//
//   netchperf server --dev IF [--stack netch|kernel] [--port P] [--once] [netch options] [--json]
//   netchperf client --dev IF --peer ADDR [--stack netch|kernel] [--mode stream|rpc]
//                    [--bytes N | --seconds S] [--size BYTES] [--concurrency N] [--no-verify]
//                    [netch options] [--json]
//   netch options: [--driver afxdp|tcp] [--channels N] [--copy-workers N] [--engines N]
//
// stream: one application thread sends --bytes (or for --seconds) in writes of --size; the server
//   checks every byte against the pattern (unless --no-verify) and reports what it received.
// rpc: --concurrency connections, each a thread doing request/response ping-pong of --size bytes
//   for --seconds; latency percentiles over every request.
// mixed: one stream (T-app) and --concurrency rpc connections (L-app) at once: rpc latency beside
//   bulk traffic, the paper's isolation experiment (bench/run-isolation).
// CPU cost is each process's own accounting (getrusage: user + system of all its threads); the
// kernel stack's softirq work is charged to whichever process it interrupts, so it is a lower
// bound for kernel TCP.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "afxdp_channels/engine.h"
#include "afxdp_channels/netdev.h"
#include "common/affinity.h"
#include "ctl/controller.h"
#include "vns_lib/vns.h"

namespace {

using netch::chan::NowUs;

constexpr char kUsage[] =
    "usage:\n"
    "  netchperf server --dev IF [--stack netch|kernel] [--port P] [--once] [--json]\n"
    "                   [--driver afxdp|tcp] [--channels N] [--copy-workers N] [--engines N]\n"
    "                   [--instance NAME] [--metrics ADDR|off] [--replace-xdp]\n"
    "                   [--engine-cores C0,C1,...] [--app-cores L,T]\n"
    "                   [--busy-poll-us N] [--deliver-inline true|false]\n"
    "                   [--transmit-inline true|false] [--receive-inline true|false]\n"
    "  netchperf client --dev IF --peer ADDR [--stack netch|kernel] [--port P]\n"
    "                   [--mode stream|rpc|mixed] [--bytes N | --seconds S] [--size BYTES]\n"
    "                   [--concurrency N] [--no-verify] [--json]\n"
    "                   [--driver afxdp|tcp] [--channels N] [--copy-workers N] [--engines N]\n"
    "                   [--instance NAME] [--metrics ADDR|off] [--replace-xdp] [--spin-us N]\n"
    "                   [--engine-cores C0,C1,...] [--policy NAME[:key=value,...]]\n"
    "                   [--app-cores L,T] [--busy-poll-us N] [--deliver-inline true|false]\n"
    "                   [--transmit-inline true|false] [--receive-inline true|false]\n"
    "Runs the same workload over the NetChannel stack (--stack netch, default) or kernel TCP.\n"
    "stream: one thread sends --bytes (default 1 GiB) in --size writes (default 131072); every\n"
    "byte is checked by the server. rpc: --concurrency (default 1) connections ping-pong --size\n"
    "(default 4096) bytes for --seconds (default 3). mixed: a stream of 128 KiB writes (T-app)\n"
    "and --concurrency rpc connections (L-app) at once, for --seconds: the isolation benchmark.\n"
    "--policy picks the NetScheduler policy (netchctl policy list). --app-cores L,T pins the\n"
    "rpc threads to core L and the stream threads to core T (both sides). --json: one object.\n"
    "The netch stack serves netchctl (instance --instance, default 'default') and Prometheus\n"
    "metrics on --metrics (default 127.0.0.1:9464, 'off' to disable; a busy port is a warning).\n";

constexpr uint32_t kMagic = 0x4e435046;  // "NCPF"
constexpr size_t kPatternLen = (4u << 20) + 13;
constexpr size_t kMaxSize = 16u << 20;

struct Options {
  std::string role, dev, stack = "netch", mode = "stream", driver = "afxdp";
  uint32_t peer = 0;
  uint16_t port = 5201;
  uint64_t bytes = 0;
  double seconds = 0;
  uint64_t size = 0;
  uint32_t concurrency = 1, channels = 1, copy_workers = 0, engines = 2;
  std::string instance = "default", metrics = "127.0.0.1:9464";
  bool replace_xdp = false;
  uint64_t spin_us = netch::vns::StackOptions{}.recv_spin_us;  // netch: adaptive-polling spin of
                                                               // Recv, dispatcher and engines
  std::string tx = "auto";             // netch, AF_XDP driver: transmit path
  bool nodelay = false;                // netch: small writes are never coalesced
  bool deliver_inline = true;          // netch: StackOptions::deliver_inline
  bool transmit_inline = true;         // netch: StackOptions::transmit_inline
  bool receive_inline = true;          // netch: StackOptions::receive_inline
  std::vector<int> engine_cores;       // netch: pin engine i to engine_cores[i]
  std::vector<int> app_cores;          // mixed/rpc: pin rpc threads to [0], stream threads to [1]
  std::string policy = "round-robin";  // netch: NetScheduler policy
  std::vector<std::pair<std::string, std::string>> policy_knobs;
  uint32_t busy_poll_us = 0;  // rpc sockets spin this long in a receive before sleeping
  bool once = false, json = false, verify = true;
};

// The request a client sends first on every connection.
struct Hello {
  uint32_t magic;
  uint32_t mode;  // 0 stream, 1 rpc, 2 mixed: a stream now, then `concurrency` rpc connections
  uint64_t size;
  uint64_t bytes;  // stream: bytes to expect (0: until end of stream)
  uint32_t verify;
  uint32_t concurrency;
};
// What the server answers at the end of a stream.
struct StreamResult {
  uint64_t bytes;
  uint64_t bad;
  double cpu_seconds;
};

const std::vector<uint8_t>& Pattern() {
  static const std::vector<uint8_t>* p = [] {
    auto* v = new std::vector<uint8_t>(kPatternLen + kMaxSize);
    uint64_t x = 0x9E3779B97F4A7C15ull;
    for (size_t i = 0; i < kPatternLen; ++i) {
      x ^= x << 13, x ^= x >> 7, x ^= x << 17;
      (*v)[i] = static_cast<uint8_t>(x);
    }
    for (size_t i = 0; i < kMaxSize; ++i) (*v)[kPatternLen + i] = (*v)[i % kPatternLen];
    return v;
  }();
  return *p;
}
const uint8_t* PatternAt(uint64_t off) { return Pattern().data() + off % kPatternLen; }

double CpuSeconds() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
         ru.ru_stime.tv_usec / 1e6;
}

// ---- one interface for both stacks ---------------------------------------------------------

class Sock {
 public:
  virtual ~Sock() = default;
  // Blocking; false on error (message in err).
  virtual bool SendAll(const uint8_t* p, size_t n) = 0;
  // Up to n bytes; 0 at end of stream; -1 on error.
  virtual long RecvSome(uint8_t* p, size_t n) = 0;
  virtual void Shutdown() = 0;
  bool RecvAll(uint8_t* p, size_t n) {
    for (size_t got = 0; got < n;) {
      const long r = RecvSome(p + got, n - got);
      if (r <= 0) return false;
      got += static_cast<size_t>(r);
    }
    return true;
  }
  std::string err;
};

class KernelSock final : public Sock {
 public:
  // busy_poll_us: a receive spins on non-blocking recv() this long before it blocks (the
  // application-level busy polling to compare with NetChannel's busy-polled sockets).
  KernelSock(int fd, uint32_t busy_poll_us) : fd_(fd), busy_poll_us_(busy_poll_us) {
    int one = 1;
    setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  }
  ~KernelSock() override { close(fd_); }
  bool SendAll(const uint8_t* p, size_t n) override {
    while (n > 0) {
      const ssize_t w = send(fd_, p, n, MSG_NOSIGNAL);
      if (w < 0) {
        if (errno == EINTR) continue;
        err = strerrordesc_np(errno);
        return false;
      }
      p += w, n -= static_cast<size_t>(w);
    }
    return true;
  }
  long RecvSome(uint8_t* p, size_t n) override {
    if (busy_poll_us_ > 0) {
      const auto end = std::chrono::steady_clock::now() + std::chrono::microseconds(busy_poll_us_);
      do {
        const ssize_t r = recv(fd_, p, n, MSG_DONTWAIT);
        if (r >= 0 || (errno != EAGAIN && errno != EINTR)) {
          if (r < 0) err = strerrordesc_np(errno);
          return r;
        }
      } while (std::chrono::steady_clock::now() < end);
    }
    for (;;) {
      const ssize_t r = recv(fd_, p, n, 0);
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) err = strerrordesc_np(errno);
      return r;
    }
  }
  void Shutdown() override { shutdown(fd_, SHUT_WR); }

 private:
  int fd_;
  const uint32_t busy_poll_us_;
};

class VnsSock final : public Sock {
 public:
  explicit VnsSock(std::unique_ptr<netch::vns::VirtualSocket> s) : s_(std::move(s)) {}
  bool SendAll(const uint8_t* p, size_t n) override {
    while (n > 0) {
      auto r = s_->Send({p, n});
      if (!r.ok()) {
        err = std::string(r.status().message());
        return false;
      }
      p += *r, n -= *r;
    }
    return true;
  }
  long RecvSome(uint8_t* p, size_t n) override {
    auto r = s_->Recv({p, n});
    if (!r.ok()) {
      err = std::string(r.status().message());
      return -1;
    }
    return static_cast<long>(*r);
  }
  void Shutdown() override { (void)s_->Shutdown(); }

 private:
  std::unique_ptr<netch::vns::VirtualSocket> s_;
};

class Endpoint {
 public:
  virtual ~Endpoint() = default;
  // The class the next Connect announces (NCSYN): stream is the paper's T-app, rpc the L-app.
  netch::vns::AppClass next_class = netch::vns::AppClass::kUnspecified;
  uint32_t busy_poll_us = 0;  // kernel: spin in recv (rpc connections and every accepted one)
  virtual std::unique_ptr<Sock> Accept(std::string* err) = 0;
  virtual std::unique_ptr<Sock> Connect(uint32_t ip, uint16_t port, std::string* err) = 0;
};

class KernelEndpoint final : public Endpoint {
 public:
  bool Listen(uint16_t port, std::string* err) {
    lfd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(lfd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    if (bind(lfd_, reinterpret_cast<sockaddr*>(&a), sizeof(a)) || listen(lfd_, 128)) {
      *err = absl::StrFormat("listen on TCP port %u: %s", port, strerrordesc_np(errno));
      return false;
    }
    return true;
  }
  ~KernelEndpoint() override {
    if (lfd_ >= 0) close(lfd_);
  }
  std::unique_ptr<Sock> Accept(std::string* err) override {
    const int fd = accept4(lfd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) {
      *err = strerrordesc_np(errno);
      return nullptr;
    }
    return std::make_unique<KernelSock>(fd, busy_poll_us);
  }
  std::unique_ptr<Sock> Connect(uint32_t ip, uint16_t port, std::string* err) override {
    const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(ip);
    if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a))) {
      *err = absl::StrFormat("connect: %s", strerrordesc_np(errno));
      close(fd);
      return nullptr;
    }
    return std::make_unique<KernelSock>(
        fd, next_class == netch::vns::AppClass::kLatency ? busy_poll_us : 0);
  }

 private:
  int lfd_ = -1;
};

class NetchEndpoint final : public Endpoint {
 public:
  bool Open(const Options& o, std::string* err) {
    nodelay_ = o.nodelay;
    // The control plane first: it owns the XDP program the stack's driver steers with, and
    // serves netchctl and /metrics for the stack's whole life.
    netch::ctl::ControllerOptions co;
    co.instance = o.instance;
    co.ifname = o.dev;
    co.replace = o.replace_xdp;
    co.metrics_address = o.metrics == "off" ? "" : o.metrics;
    co.exit_on_signal = true;  // a killed server must not leave its XDP program behind
    auto ctl = netch::ctl::Controller::Start(co);
    if (!ctl.ok()) {
      *err = ctl.status().ToString();
      return false;
    }
    ctl_ = std::move(*ctl);
    netch::vns::StackOptions so;
    so.driver = o.driver;
    so.driver_opts.ifname = o.dev;
    so.driver_opts.steer = ctl_->steer();
    so.driver_opts.engines = static_cast<int>(o.engines);
    so.driver_opts.tx = o.tx;
    // Engines float unless --engine-cores pins them (then `netchctl pin channel ID --core N`
    // can move a channel between them). Pinning both test hosts' busy engines to the same core
    // halves what they get, so the default leaves placement to the kernel.
    so.driver_opts.cores = o.engine_cores;
    so.channels_per_peer = static_cast<int>(o.channels);
    so.policy = o.policy;
    so.policy_knobs = o.policy_knobs;
    if (o.busy_poll_us > 0)
      so.policy_knobs.emplace_back("busy_poll_us", std::to_string(o.busy_poll_us));
    so.copy_workers = static_cast<int>(o.copy_workers);
    so.recv_spin_us = o.spin_us;
    so.deliver_inline = o.deliver_inline;
    so.transmit_inline = o.transmit_inline;
    so.receive_inline = o.receive_inline;
    so.dispatcher_spin_us = std::max<uint64_t>(50, o.spin_us);
    so.driver_opts.spin = absl::Microseconds(std::max<uint64_t>(50, o.spin_us));
    auto s = netch::vns::Stack::Create(so);
    if (!s.ok()) {
      *err = s.status().ToString();
      return false;
    }
    stack_ = std::move(*s);
    if (auto st = ctl_->Serve(stack_.get()); !st.ok()) {
      *err = st.ToString();
      return false;
    }
    return true;
  }
  bool Listen(uint16_t port, std::string* err) {
    auto l = stack_->Listen(port);
    if (!l.ok()) {
      *err = l.status().ToString();
      return false;
    }
    listener_ = std::move(*l);
    return true;
  }
  ~NetchEndpoint() override { listener_.reset(); }
  std::unique_ptr<Sock> Accept(std::string* err) override {
    auto s = listener_->Accept();
    if (!s.ok()) {
      *err = s.status().ToString();
      return nullptr;
    }
    (*s)->SetNoDelay(nodelay_);
    return std::make_unique<VnsSock>(std::move(*s));
  }
  std::unique_ptr<Sock> Connect(uint32_t ip, uint16_t port, std::string* err) override {
    netch::vns::SocketOptions so;
    so.connect_timeout = absl::Seconds(5);
    so.app_class = next_class;
    so.nodelay = nodelay_;
    auto s = stack_->Connect(ip, port, so);
    if (!s.ok()) {
      *err = s.status().ToString();
      return nullptr;
    }
    return std::make_unique<VnsSock>(std::move(*s));
  }
  bool nodelay_ = false;
  // Sockets must go before the stack.
  void Reset() {
    listener_.reset();
    if (ctl_) ctl_->Stop();  // no control request may reach a stack being torn down
    stack_.reset();
    ctl_.reset();  // last: detaches and unpins after the driver released its sockets
  }

 private:
  std::unique_ptr<netch::ctl::Controller> ctl_;
  std::unique_ptr<netch::vns::Stack> stack_;
  std::unique_ptr<netch::vns::VirtualSocket> listener_;
};

uint64_t g_start_us = 0;  // process start, for connect_ms

// ---- server ------------------------------------------------------------------------------------

// --app-cores L,T: the benchmark's own threads placed like an operator would place an L-app and
// a T-app (taskset), beside --engine-cores for the stack's engines.
const Options* g_opts = nullptr;
void PinSelf(size_t which) {
  if (!g_opts || g_opts->app_cores.size() <= which) return;
  if (auto st = netch::PinThread(pthread_self(), g_opts->app_cores[which]); !st.ok())
    std::fprintf(stderr, "netchperf: %s\n", std::string(st.message()).c_str());
}

void ServeStream(Sock& s, const Hello& h) {
  const double cpu0 = CpuSeconds();
  std::vector<uint8_t> buf(std::max<uint64_t>(h.size, 1 << 20));
  StreamResult r{};
  for (;;) {
    const long n = s.RecvSome(buf.data(), buf.size());
    if (n <= 0) break;
    if (h.verify && std::memcmp(buf.data(), PatternAt(r.bytes), static_cast<size_t>(n)) != 0) {
      for (long i = 0; i < n; ++i) r.bad += buf[i] != PatternAt(r.bytes)[i];
    }
    r.bytes += static_cast<uint64_t>(n);
  }
  r.cpu_seconds = CpuSeconds() - cpu0;
  s.SendAll(reinterpret_cast<const uint8_t*>(&r), sizeof(r));
  s.Shutdown();
  uint8_t b;
  while (s.RecvSome(&b, 1) > 0) {
  }
}

void ServeRpc(Sock& s, const Hello& h) {
  std::vector<uint8_t> buf(h.size);
  while (s.RecvAll(buf.data(), buf.size())) {
    if (!s.SendAll(buf.data(), buf.size())) break;
  }
}

int RunServer(const Options& o, Endpoint& ep) {
  do {
    std::string err;
    auto first = ep.Accept(&err);
    if (!first) return std::fprintf(stderr, "netchperf: accept: %s\n", err.c_str()), 1;
    Hello h{};
    if (!first->RecvAll(reinterpret_cast<uint8_t*>(&h), sizeof(h)) || h.magic != kMagic ||
        h.size == 0 || h.size > kMaxSize || h.concurrency == 0 || h.concurrency > 1024) {
      std::fprintf(stderr, "netchperf: bad hello from a client, ignored\n");
      continue;
    }
    if (h.mode == 0) {
      PinSelf(1);  // this (main) thread: later runs' rpc threads pin themselves
      ServeStream(*first, h);
    } else if (h.mode == 2) {
      // Mixed: this stream and `concurrency` rpc connections, all served at once.
      std::vector<std::pair<std::unique_ptr<Sock>, Hello>> rpcs;
      for (uint32_t i = 0; i < h.concurrency; ++i) {
        auto s = ep.Accept(&err);
        if (!s) break;
        Hello h2{};
        if (!s->RecvAll(reinterpret_cast<uint8_t*>(&h2), sizeof(h2)) || h2.magic != kMagic ||
            h2.size == 0 || h2.size > kMaxSize)
          break;
        rpcs.emplace_back(std::move(s), h2);
      }
      std::vector<std::thread> t;
      t.emplace_back([&] {
        PinSelf(1);
        ServeStream(*first, h);
      });
      for (auto& [s, h2] : rpcs)
        t.emplace_back([&s, &h2] {
          PinSelf(0);
          ServeRpc(*s, h2);
        });
      for (auto& th : t) th.join();
    } else {
      std::vector<std::unique_ptr<Sock>> socks;
      socks.push_back(std::move(first));
      for (uint32_t i = 1; i < h.concurrency; ++i) {
        auto s = ep.Accept(&err);
        if (!s) break;
        Hello h2{};
        if (!s->RecvAll(reinterpret_cast<uint8_t*>(&h2), sizeof(h2))) break;
        socks.push_back(std::move(s));
      }
      std::vector<std::thread> t;
      for (auto& s : socks)
        t.emplace_back([&s, &h] {
          PinSelf(0);
          ServeRpc(*s, h);
        });
      for (auto& th : t) th.join();
    }
    if (!o.json)
      std::fprintf(stderr, "netchperf: served one %s run\n",
                   h.mode == 0   ? "stream"
                   : h.mode == 1 ? "rpc"
                                 : "mixed");
  } while (!o.once);
  return 0;
}

// ---- client ------------------------------------------------------------------------------------

double Percentile(std::vector<double>& v, double p) {
  if (v.empty()) return 0;
  const size_t k = std::min(v.size() - 1, static_cast<size_t>(p / 100.0 * v.size()));
  std::nth_element(v.begin(), v.begin() + k, v.end());
  return v[k];
}

// Every connection's request latencies (µs), merged: count and percentiles.
struct Latencies {
  size_t n = 0;
  double p50 = 0, p99 = 0, p999 = 0;
};
Latencies Summarize(const std::vector<std::vector<double>>& per_conn) {
  std::vector<double> all;
  for (const auto& v : per_conn) all.insert(all.end(), v.begin(), v.end());
  return {all.size(), Percentile(all, 50), Percentile(all, 99), Percentile(all, 99.9)};
}

// The server may still be starting: retry a refused connect for up to 5 s.
std::unique_ptr<Sock> ConnectRetry(Endpoint& ep, const Options& o, std::string* err) {
  const uint64_t end = NowUs() + 5'000'000;
  for (;;) {
    auto s = ep.Connect(o.peer, o.port, err);
    if (s || NowUs() >= end || err->find("efused") == std::string::npos) return s;
    usleep(50'000);
  }
}

// One rpc connection's ping-pong until `end`: latencies in µs appended to `lat`, timed in
// nanoseconds — busy-polled round trips are 5-15 µs here, and whole microseconds would round
// a percentile by up to 10%.
bool PingPong(Sock& s, size_t size, uint64_t end, bool verify, uint32_t seed,
              std::vector<double>* lat) {
  std::vector<uint8_t> req(PatternAt(seed), PatternAt(seed) + size), resp(size);
  lat->reserve(1 << 20);
  auto now_ns = [] {
    timespec t{};
    clock_gettime(CLOCK_MONOTONIC, &t);
    return static_cast<uint64_t>(t.tv_sec) * 1'000'000'000ull + static_cast<uint64_t>(t.tv_nsec);
  };
  while (NowUs() < end) {
    const uint64_t a = now_ns();
    if (!s.SendAll(req.data(), size) || !s.RecvAll(resp.data(), size)) return false;
    lat->push_back(static_cast<double>(now_ns() - a) / 1e3);
    if (verify && resp != req) return false;
  }
  return true;
}

// Mixed (the isolation benchmark): a T-app stream of 128 KiB writes and --concurrency L-app rpc
// connections of --size bytes on the same stack at the same time, for --seconds.
int RunMixed(const Options& o, Endpoint& ep) {
  std::string err;
  const uint64_t rpc_size = o.size ? o.size : 4096, stream_size = 131072;
  const double seconds = o.seconds > 0 ? o.seconds : 3;
  ep.next_class = netch::vns::AppClass::kThroughput;
  auto stream = ConnectRetry(ep, o, &err);
  if (!stream) return std::fprintf(stderr, "netchperf: %s\n", err.c_str()), 1;
  Hello hs{kMagic, 2, stream_size, 0, o.verify ? 1u : 0u, o.concurrency};
  if (!stream->SendAll(reinterpret_cast<const uint8_t*>(&hs), sizeof(hs)))
    return std::fprintf(stderr, "netchperf: %s\n", stream->err.c_str()), 1;
  ep.next_class = netch::vns::AppClass::kLatency;
  std::vector<std::unique_ptr<Sock>> rpcs;
  Hello hr{kMagic, 1, rpc_size, 0, o.verify ? 1u : 0u, 1};
  for (uint32_t i = 0; i < o.concurrency; ++i) {
    auto s = ConnectRetry(ep, o, &err);
    if (!s || !s->SendAll(reinterpret_cast<const uint8_t*>(&hr), sizeof(hr)))
      return std::fprintf(stderr, "netchperf: rpc connection: %s\n", err.c_str()), 1;
    rpcs.push_back(std::move(s));
  }
  const uint64_t t0 = NowUs(), end = t0 + static_cast<uint64_t>(seconds * 1e6);
  std::atomic<bool> failed{false};
  uint64_t sent = 0;
  std::thread tx([&] {
    PinSelf(1);
    while (NowUs() < end) {
      if (!stream->SendAll(PatternAt(sent), stream_size)) {
        failed = true;
        return;
      }
      sent += stream_size;
    }
  });
  std::vector<std::vector<double>> lat(o.concurrency);
  std::vector<std::thread> th;
  for (uint32_t i = 0; i < o.concurrency; ++i)
    th.emplace_back([&, i] {
      PinSelf(0);
      if (!PingPong(*rpcs[i], rpc_size, end, o.verify, i, &lat[i])) failed = true;
    });
  tx.join();
  const double secs = (NowUs() - t0) / 1e6;
  for (auto& t : th) t.join();
  stream->Shutdown();
  StreamResult r{};
  if (!stream->RecvAll(reinterpret_cast<uint8_t*>(&r), sizeof(r))) failed = true;
  for (auto& s : rpcs) s->Shutdown();
  const Latencies l = Summarize(lat);
  const bool ok = !failed && r.bytes == sent && r.bad == 0;
  const double gbps = sent * 8 / secs / 1e9, rate = l.n / secs;
  const double p50 = l.p50, p99 = l.p99, p999 = l.p999;
  if (o.json) {
    std::printf(
        "{\"stack\":\"%s\",\"mode\":\"mixed\",\"policy\":\"%s\",\"size\":%llu,"
        "\"concurrency\":%u,\"seconds\":%.4f,\"stream_gbps\":%.3f,\"requests\":%zu,"
        "\"rate_per_s\":%.1f,\"p50_us\":%.2f,\"p99_us\":%.2f,\"p999_us\":%.2f,"
        "\"integrity_ok\":%s,\"channels\":%u,\"driver\":\"%s\",\"busy_poll_us\":%u}\n",
        o.stack.c_str(), o.stack == "kernel" ? "kernel" : o.policy.c_str(),
        (unsigned long long)rpc_size, o.concurrency, secs, gbps, l.n, rate, p50, p99, p999,
        ok ? "true" : "false", o.channels, o.driver.c_str(), o.busy_poll_us);
  } else {
    std::printf(
        "%s mixed: stream %.2f Gbit/s beside rpc %llu B x %u: %.0f req/s, p50 %.1f us, p99 %.1f "
        "us, p99.9 %.1f us; %s\n",
        o.stack.c_str(), gbps, (unsigned long long)rpc_size, o.concurrency, rate, p50, p99, p999,
        ok ? "every byte checked" : "ERRORS");
  }
  return ok ? 0 : 1;
}

int RunClient(const Options& o, Endpoint& ep) {
  if (o.mode == "mixed") return RunMixed(o, ep);
  std::string err;
  const bool stream = o.mode == "stream";
  const uint64_t size = o.size ? o.size : (stream ? 131072 : 4096);
  Hello h{kMagic, stream ? 0u : 1u, size, 0, o.verify ? 1u : 0u, stream ? 1 : o.concurrency};
  if (stream) {
    PinSelf(1);
    const uint64_t bytes = o.bytes ? o.bytes : (o.seconds > 0 ? UINT64_MAX : 1ull << 30);
    const double cpu0 = CpuSeconds();
    auto s = ConnectRetry(ep, o, &err);
    if (!s) return std::fprintf(stderr, "netchperf: %s\n", err.c_str()), 1;
    // From process start to an established connection: what a restarted client waits.
    const double connect_ms = (NowUs() - g_start_us) / 1e3;
    if (!s->SendAll(reinterpret_cast<const uint8_t*>(&h), sizeof(h)))
      return std::fprintf(stderr, "netchperf: %s\n", s->err.c_str()), 1;
    const uint64_t t0 = NowUs();
    const uint64_t end = o.seconds > 0 ? t0 + static_cast<uint64_t>(o.seconds * 1e6) : UINT64_MAX;
    uint64_t sent = 0;
    while (sent < bytes && NowUs() < end) {
      const size_t n = std::min<uint64_t>(size, bytes - sent);
      if (!s->SendAll(PatternAt(sent), n))
        return std::fprintf(stderr, "netchperf: send: %s\n", s->err.c_str()), 1;
      sent += n;
    }
    s->Shutdown();
    StreamResult r{};
    if (!s->RecvAll(reinterpret_cast<uint8_t*>(&r), sizeof(r)))
      return std::fprintf(stderr, "netchperf: no result from the server: %s\n", s->err.c_str()), 1;
    const double secs = (NowUs() - t0) / 1e6;
    const double cpu = CpuSeconds() - cpu0;
    const double gb = sent / 1e9;
    const bool ok = r.bytes == sent && r.bad == 0;
    const double gbps = sent * 8 / secs / 1e9;
    if (o.json) {
      std::printf(
          "{\"stack\":\"%s\",\"mode\":\"stream\",\"size\":%llu,\"bytes\":%llu,\"seconds\":%.4f,"
          "\"throughput_gbps\":%.3f,\"cpu_seconds_per_gb\":%.4f,\"client_cpu_seconds_per_gb\":%.4f,"
          "\"server_cpu_seconds_per_gb\":%.4f,\"integrity_ok\":%s,\"verified\":%s,"
          "\"channels\":%u,\"copy_workers\":%u,\"driver\":\"%s\",\"connect_ms\":%.1f}\n",
          o.stack.c_str(), (unsigned long long)size, (unsigned long long)sent, secs, gbps,
          (cpu + r.cpu_seconds) / gb, cpu / gb, r.cpu_seconds / gb, ok ? "true" : "false",
          o.verify ? "true" : "false", o.channels, o.copy_workers, o.driver.c_str(), connect_ms);
    } else {
      std::printf(
          "%s stream, %llu B writes: %llu bytes in %.3f s = %.2f Gbit/s; CPU %.3f s/GB "
          "(client %.3f + server %.3f); %s\n",
          o.stack.c_str(), (unsigned long long)size, (unsigned long long)sent, secs, gbps,
          (cpu + r.cpu_seconds) / gb, cpu / gb, r.cpu_seconds / gb,
          !o.verify ? (r.bytes == sent ? "byte count ok (not verified)" : "BYTES MISSING")
          : ok      ? "every byte verified"
                    : "INTEGRITY FAILURE");
    }
    return ok ? 0 : 1;
  }
  // rpc
  const double seconds = o.seconds > 0 ? o.seconds : 3;
  std::vector<std::unique_ptr<Sock>> socks;
  for (uint32_t i = 0; i < o.concurrency; ++i) {
    auto s = ConnectRetry(ep, o, &err);
    if (!s) return std::fprintf(stderr, "netchperf: %s\n", err.c_str()), 1;
    if (!s->SendAll(reinterpret_cast<const uint8_t*>(&h), sizeof(h)))
      return std::fprintf(stderr, "netchperf: %s\n", s->err.c_str()), 1;
    socks.push_back(std::move(s));
  }
  std::vector<std::vector<double>> lat(o.concurrency);
  std::atomic<bool> failed{false};
  const double cpu0 = CpuSeconds();
  const uint64_t t0 = NowUs(), end = t0 + static_cast<uint64_t>(seconds * 1e6);
  std::vector<std::thread> th;
  for (uint32_t i = 0; i < o.concurrency; ++i) {
    th.emplace_back([&, i] {
      PinSelf(0);
      if (!PingPong(*socks[i], size, end, o.verify, i, &lat[i])) failed = true;
    });
  }
  for (auto& t : th) t.join();
  const double secs = (NowUs() - t0) / 1e6;
  const double cpu = CpuSeconds() - cpu0;
  for (auto& s : socks) s->Shutdown();
  const Latencies l = Summarize(lat);
  const double rate = l.n / secs;
  const double bytes = 2.0 * l.n * size;
  const double p50 = l.p50, p99 = l.p99, p999 = l.p999;
  if (o.json) {
    std::printf(
        "{\"stack\":\"%s\",\"mode\":\"rpc\",\"size\":%llu,\"concurrency\":%u,\"requests\":%zu,"
        "\"seconds\":%.4f,\"rate_per_s\":%.1f,\"p50_us\":%.2f,\"p99_us\":%.2f,\"p999_us\":%.2f,"
        "\"bytes\":%.0f,\"throughput_gbps\":%.4f,\"cpu_seconds_per_gb\":%.4f,\"integrity_ok\":%s,"
        "\"channels\":%u,\"driver\":\"%s\",\"policy\":\"%s\",\"busy_poll_us\":%u}\n",
        o.stack.c_str(), (unsigned long long)size, o.concurrency, l.n, secs, rate, p50, p99, p999,
        bytes, bytes * 8 / secs / 1e9, cpu / (bytes / 1e9), failed ? "false" : "true", o.channels,
        o.driver.c_str(), o.stack == "kernel" ? "kernel" : o.policy.c_str(), o.busy_poll_us);
  } else {
    std::printf(
        "%s rpc, %llu B x %u: %.0f req/s, latency p50 %.1f us, p99 %.1f us, p99.9 %.1f us; "
        "%s\n",
        o.stack.c_str(), (unsigned long long)size, o.concurrency, rate, p50, p99, p999,
        failed ? "ERRORS" : "every response checked");
  }
  return failed ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  g_start_us = NowUs();
  Options o;
  CLI::App app{"netchperf: the same workload over the NetChannel stack or kernel TCP", "netchperf"};
  app.footer(kUsage);
  app.require_subcommand(1);
  auto* server = app.add_subcommand("server", "serve clients (until killed, or --once)");
  auto* client = app.add_subcommand("client", "run one workload against a server");
  std::string peer;
  for (CLI::App* sub : {server, client}) {
    sub->add_option("--dev", o.dev, "the interface (in this network namespace)")->required();
    sub->add_option("--stack", o.stack, "netch or kernel")
        ->check(CLI::IsMember({"netch", "kernel"}));
    sub->add_option("--port", o.port, "port")->check(CLI::Range(1, 65535));
    sub->add_flag("--json", o.json, "one JSON object");
    sub->add_option("--driver", o.driver, "afxdp or tcp")->check(CLI::IsMember({"afxdp", "tcp"}));
    sub->add_option("--channels", o.channels, "channels per peer")->check(CLI::Range(1, 64));
    sub->add_option("--copy-workers", o.copy_workers, "copy workers")->check(CLI::Range(0, 64));
    sub->add_option("--engines", o.engines, "engine threads")->check(CLI::Range(1, 64));
    sub->add_flag("--nodelay", o.nodelay, "netch: send small writes at once (no coalescing)");
    sub->add_option("--tx", o.tx, "AF_XDP transmit path: auto, afxdp or udp")
        ->check(CLI::IsMember({"auto", "afxdp", "udp"}));
    sub->add_option(
           "--app-cores", o.app_cores,
           "pin the rpc (L-app) threads to core L and the stream (T-app) threads to core T")
        ->delimiter(',')
        ->expected(2)
        ->check(CLI::Range(0, 1023));
    sub->add_option("--engine-cores", o.engine_cores, "pin engine i to core C_i")
        ->delimiter(',')
        ->check(CLI::Range(0, 1023));
    sub->add_option("--spin-us", o.spin_us, "adaptive-polling spin")->check(CLI::Range(0, 100000));
    sub->add_option("--deliver-inline", o.deliver_inline,
                    "netch: engines hand received segments to sockets on their own thread "
                    "(true) or through the dispatcher thread (false)");
    sub->add_option("--transmit-inline", o.transmit_inline,
                    "netch: a Send that finds its engine asleep runs the engine's round on its "
                    "own thread (true) or wakes the engine (false)");
    sub->add_option("--receive-inline", o.receive_inline,
                    "netch: a blocked Recv sleeps on its engines' input and runs their round on "
                    "its own thread (true) or is woken by the engine after its round (false)");
    sub->add_option("--busy-poll-us", o.busy_poll_us,
                    "rpc (L-app) sockets spin this long in a receive before sleeping: kernel "
                    "non-blocking recv(), netch the policy's busy_poll_us (run to completion)")
        ->check(CLI::Range(0, 1000000));
    sub->add_option("--instance", o.instance, "control-plane instance name");
    sub->add_option("--metrics", o.metrics, "Prometheus address, or off");
    sub->add_flag("--replace-xdp", o.replace_xdp, "take over an attached XDP program");
    sub->add_option_function<std::string>(
           "--policy", [](const std::string&) {}, "NetScheduler policy: NAME[:key=value,...]")
        ->each([&o](const std::string& v) {
          const std::vector<std::string> parts = absl::StrSplit(v, absl::MaxSplits(':', 1));
          o.policy = parts[0];
          if (parts.size() == 2)
            for (absl::string_view kv : absl::StrSplit(parts[1], ',', absl::SkipEmpty())) {
              const auto eq = kv.find('=');
              if (eq == absl::string_view::npos || eq == 0)
                throw CLI::ValidationError("knob '" + std::string(kv) + "' is not key=value");
              o.policy_knobs.emplace_back(kv.substr(0, eq), kv.substr(eq + 1));
            }
        });
  }
  server->add_flag("--once", o.once, "exit after one run");
  client->add_option("--peer", peer, "the server's address")->required();
  client->add_option("--mode", o.mode, "stream, rpc or mixed")
      ->check(CLI::IsMember({"stream", "rpc", "mixed"}));
  auto* bytes_opt =
      client->add_option("--bytes", o.bytes, "stream: bytes to send")->check(CLI::PositiveNumber);
  client->add_option("--seconds", o.seconds, "how long")
      ->check(CLI::Range(0.001, 3600.0))
      ->excludes(bytes_opt);
  client->add_option("--size", o.size, "write / message size")
      ->check(CLI::Range(uint64_t{1}, uint64_t{kMaxSize}));
  client->add_option("--concurrency", o.concurrency, "rpc connections")->check(CLI::Range(1, 1024));
  client->add_flag("!--no-verify", o.verify, "do not check bytes");
  try {
    app.parse(argc, argv);
    g_opts = &o;
    if (client->parsed()) {
      in_addr ia{};
      if (inet_pton(AF_INET, peer.c_str(), &ia) != 1)
        throw CLI::ValidationError("--peer", "'" + peer + "' is not an IPv4 address");
      o.peer = ntohl(ia.s_addr);
      if (o.mode != "stream" && o.bytes)
        throw CLI::ValidationError("--bytes", o.mode + " runs for --seconds");
    }
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "netchperf: %s\nRun 'netchperf --help' for usage.\n", e.what());
    return 2;
  }
  o.role = server->parsed() ? "server" : "client";
  if (auto ifi = netch::afxdp::GetInterfaceInfo(o.dev); !ifi.ok())
    return std::fprintf(stderr, "netchperf: %s\n", ifi.status().ToString().c_str()), 1;
  Pattern();  // built before any timing starts
  std::string err;
  if (o.stack == "kernel") {
    KernelEndpoint ep;
    ep.busy_poll_us = o.busy_poll_us;
    ep.next_class =
        o.mode == "rpc" ? netch::vns::AppClass::kLatency : netch::vns::AppClass::kThroughput;
    if (o.role == "server" && !ep.Listen(o.port, &err))
      return std::fprintf(stderr, "netchperf: %s\n", err.c_str()), 1;
    return o.role == "server" ? RunServer(o, ep) : RunClient(o, ep);
  }
  NetchEndpoint ep;
  // Stream is the T-app of the paper, rpc the L-app: the class travels in NCSYN.
  ep.next_class =
      o.mode == "rpc" ? netch::vns::AppClass::kLatency : netch::vns::AppClass::kThroughput;
  if (!ep.Open(o, &err)) return std::fprintf(stderr, "netchperf: %s\n", err.c_str()), 1;
  if (o.role == "server" && !ep.Listen(o.port, &err))
    return std::fprintf(stderr, "netchperf: %s\n", err.c_str()), 1;
  const int rc = o.role == "server" ? RunServer(o, ep) : RunClient(o, ep);
  ep.Reset();
  return rc;
}
