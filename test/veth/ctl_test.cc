// The control plane end to end: a stack on each test host with its Controller, a stream running
// between them, and netchctl (the real binary, run inside the host's namespace) changing the
// running stack: pinning a channel to another core, mapping a socket to other channels, injecting
// loss; /metrics scraped and checked by promtool; every netchctl error path.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>

#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "afxdp_channels/engine.h"
#include "common/netns.h"
#include "ctl/controller.h"
#include "gtest/gtest.h"
#include "test/support/peer_process.h"
#include "test/support/privilege.h"
#include "test/support/testhosts.h"
#include "vns_lib/vns.h"

namespace netch::ctl {
namespace {

using json = nlohmann::json;
using testing::TestHosts;

// Runs a shell command, returns {exit status, stdout}.
std::pair<int, std::string> Sh(const std::string& cmd) {
  std::string out;
  FILE* p = popen((cmd + " 2>/tmp/netchctl_test.err").c_str(), "r");
  if (!p) return {-1, ""};
  char buf[4096];
  for (size_t n; (n = fread(buf, 1, sizeof(buf), p)) > 0;) out.append(buf, n);
  const int rc = pclose(p);
  return {WIFEXITED(rc) ? WEXITSTATUS(rc) : -1, out};
}
std::string LastErr() {
  std::ifstream f("/tmp/netchctl_test.err");
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

class CtlTest : public ::testing::Test {
 protected:
  void SetUp() override {
    NETCH_REQUIRE_ROOT();
    ASSERT_TRUE(hosts_.Up(testing::StackHostsOptions()).ok());
    netchctl_ = std::string(NETCH_BINARY_DIR) + "/ctl/netchctl";
  }
  void TearDown() override {
    for (auto* h : {&a_, &b_}) {
      if (h->ctl) h->ctl->Stop();
      h->sockets.clear();
      h->stack.reset();
      NetnsScope ns(h->ns);  // detach inside the namespace
      h->ctl.reset();
    }
  }

  struct Host {
    std::string ns;
    std::unique_ptr<Controller> ctl;
    std::unique_ptr<vns::Stack> stack;
    std::vector<std::unique_ptr<vns::VirtualSocket>> sockets;
  };

  void OpenHost(Host* h, const std::string& ns, const char* dev, const std::string& metrics) {
    h->ns = ns;
    NetnsScope scope(ns);
    ASSERT_TRUE(scope.ok());
    ControllerOptions co;
    co.ifname = dev;
    co.metrics_address = metrics;
    auto c = Controller::Start(co);
    ASSERT_TRUE(c.ok()) << c.status();
    h->ctl = std::move(*c);
    vns::StackOptions so;
    so.driver_opts.netns = ns;  // Connect runs on the test's thread, outside the namespace
    so.driver_opts.ifname = dev;
    so.driver_opts.steer = h->ctl->steer();
    so.driver_opts.engines = 2;
    so.driver_opts.cores = {0, 1};
    so.channels_per_peer = 2;
    auto s = vns::Stack::Create(so);
    ASSERT_TRUE(s.ok()) << s.status();
    h->stack = std::move(*s);
    ASSERT_TRUE(h->ctl->Serve(h->stack.get()).ok());
  }

  // netchctl inside host A's namespace.
  std::pair<int, std::string> Ctl(const std::string& args, const std::string& ns = "") {
    return Sh(absl::StrFormat("ip netns exec %s %s %s", ns.empty() ? hosts_.ns_a() : ns, netchctl_,
                              args));
  }
  json CtlJson(const std::string& args) {
    auto [rc, out] = Ctl("--json " + args);
    EXPECT_EQ(rc, 0) << args << ": " << LastErr();
    return json::parse(out, nullptr, false);
  }

  TestHosts hosts_;
  std::string netchctl_;
  Host a_, b_;
};

// A GET of /metrics from inside a namespace (the exposer listens on that namespace's loopback).
std::string Scrape(const std::string& ns, uint16_t port) {
  NetnsScope scope(ns);
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
    close(fd);
    return "";
  }
  const std::string req = "GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n";
  (void)!write(fd, req.data(), req.size());
  std::string out;
  char buf[65536];
  for (ssize_t n; (n = read(fd, buf, sizeof(buf))) > 0;) out.append(buf, static_cast<size_t>(n));
  close(fd);
  const auto body = out.find("\r\n\r\n");
  return body == std::string::npos ? "" : out.substr(body + 4);
}

double MetricValue(const std::string& text, const std::string& prefix) {
  std::istringstream in(text);
  std::string line;
  double sum = 0;
  while (std::getline(in, line))
    if (line.rfind(prefix, 0) == 0) sum += std::stod(line.substr(line.rfind(' ') + 1));
  return sum;
}

TEST_F(CtlTest, OperatorChangesARunningStackWithoutLosingAByte) {
  OpenHost(&a_, hosts_.ns_a(), TestHosts::kDevA, "127.0.0.1:19464");
  OpenHost(&b_, hosts_.ns_b(), TestHosts::kDevB, "127.0.0.1:19465");
  auto l = b_.stack->Listen(7000);
  ASSERT_TRUE(l.ok());
  auto c = a_.stack->Connect(TestHosts::kIpB, 7000);
  ASSERT_TRUE(c.ok()) << c.status();
  auto s = (*l)->Accept();
  ASSERT_TRUE(s.ok());

  // A stream A -> B for the whole test; B checks every byte.
  constexpr uint64_t kBytes = 768ull << 20;
  auto pattern = [](uint64_t i) { return static_cast<uint8_t>(i * 131 + (i >> 9)); };
  std::atomic<uint64_t> sent{0}, received{0}, bad{0};
  absl::Status send_err, recv_err;
  std::thread tx([&] {
    std::vector<uint8_t> buf(64 << 10);
    for (uint64_t off = 0; off < kBytes;) {
      for (size_t i = 0; i < buf.size(); ++i) buf[i] = pattern(off + i);
      auto r = (*c)->Send(buf);
      if (!r.ok()) {
        send_err = r.status();
        return;
      }
      off += *r;
      sent = off;
      usleep(200);  // keep the stream alive through the whole test, not as fast as possible
    }
    (void)(*c)->Shutdown();
  });
  std::thread rx([&] {
    std::vector<uint8_t> buf(1 << 20);
    for (uint64_t off = 0;;) {
      auto r = (*s)->Recv(buf);
      if (!r.ok()) {
        recv_err = r.status();
        return;
      }
      if (*r == 0) return;
      for (size_t i = 0; i < *r; ++i) bad += buf[i] != pattern(off + i);
      off += *r;
      received = off;
    }
  });
  while (received.load() < (16 << 20)) usleep(10'000);

  // status: found without --instance, says where the metrics are.
  json st = CtlJson("status");
  EXPECT_EQ(st["instance"], "default");
  EXPECT_EQ(st["attach_mode"], "native");
  EXPECT_EQ(st["metrics_address"], "127.0.0.1:19464");
  EXPECT_EQ(st["channels"], 2);

  // pin channel: the channel's work moves to the engine on the other core — checked from the OS.
  json chans = CtlJson("channels");
  ASSERT_EQ(chans.size(), 2u);
  const int ch = chans[0]["id"];
  const int old_core = chans[0]["core"];
  const int new_core = 1 - old_core;
  auto [rc, out] = Ctl(absl::StrFormat("pin channel %d --core %d", ch, new_core));
  EXPECT_EQ(rc, 0) << LastErr();
  json after = CtlJson("channels");
  int engine = -1;
  for (const auto& x : after)
    if (x["id"] == ch) {
      EXPECT_EQ(x["core"], new_core);
      engine = x["engine"];
    }
  int tid = 0;
  for (const auto& e : st["engines"])
    if (e["index"] == engine) tid = e["tid"];
  ASSERT_GT(tid, 0);
  std::ifstream status_file(absl::StrFormat("/proc/%d/task/%d/status", getpid(), tid));
  std::string line, allowed;
  while (std::getline(status_file, line))
    if (line.rfind("Cpus_allowed_list:", 0) == 0) allowed = line.substr(line.find(':') + 1);
  EXPECT_NE(allowed.find(std::to_string(new_core)), std::string::npos)
      << "the serving thread is pinned to core " << new_core << ": " << allowed;

  // map socket: the socket's traffic moves to one channel; per-channel counters show it.
  json socks = CtlJson("sockets");
  uint64_t sock_id = 0;
  for (const auto& x : socks)
    if (!x["listening"].get<bool>()) sock_id = x["id"];
  ASSERT_GT(sock_id, 0u);
  const int only = chans[1]["id"];
  std::tie(rc, out) = Ctl(absl::StrFormat("map socket %u --channels %d", sock_id, only));
  EXPECT_EQ(rc, 0) << LastErr();
  usleep(100'000);  // applied from the next Send on (well within 100 ms)
  auto tx_of = [&](int id) -> uint64_t {
    for (const auto& x : CtlJson("channels"))
      if (x["id"] == id) return x["tx_bytes"];
    return 0;
  };
  const uint64_t other0 = tx_of(ch), only0 = tx_of(only);
  usleep(500'000);
  EXPECT_GT(tx_of(only) - only0, 1u << 20) << "traffic flows on the mapped channel";
  EXPECT_LT(tx_of(ch) - other0, 256u << 10) << "and (almost) none on the other one";
  // sockets --explain: the same story from the socket's side — its decisions moved.
  auto batches_on = [&](const json& ex, int id) -> uint64_t {
    for (const auto& x : ex["channels"])
      if (x["id"] == id) return x["batches"];
    return 0;
  };
  const json ex0 = CtlJson(absl::StrFormat("sockets --explain %u", sock_id));
  usleep(300'000);
  const json ex = CtlJson(absl::StrFormat("sockets --explain %u", sock_id));
  EXPECT_EQ(ex["class"], "unspecified") << ex.dump();  // the test opened it without a class
  EXPECT_EQ(ex["policy"]["name"], "round-robin");
  EXPECT_GT(batches_on(ex, only) - batches_on(ex0, only), 0u) << ex.dump();
  EXPECT_EQ(batches_on(ex, ch), batches_on(ex0, ch)) << "no new decision for the unmapped one";
  EXPECT_NE(ex["why"].get<std::string>().find("restricts it to channels"), std::string::npos)
      << ex["why"];
  std::tie(rc, out) = Ctl(absl::StrFormat("sockets --explain %u", sock_id));
  EXPECT_EQ(rc, 0) << LastErr();
  EXPECT_NE(out.find("why: "), std::string::npos) << out;
  EXPECT_NE(out.find("BATCHES"), std::string::npos) << out;
  // top: samples of live throughput per channel and engine load while the stream runs.
  std::tie(rc, out) = Ctl("top --count 2 --interval 0.2 --json");
  EXPECT_EQ(rc, 0) << LastErr();
  int samples = 0;
  double moving = 0;
  for (absl::string_view line : absl::StrSplit(out, '\n', absl::SkipEmpty())) {
    const json t = json::parse(line, nullptr, false);
    ASSERT_FALSE(t.is_discarded()) << line;
    samples++;
    for (const auto& c : t["channels"]) moving += std::stod(c["tx_gbps"].get<std::string>());
    EXPECT_FALSE(t["engines"].empty());
  }
  EXPECT_EQ(samples, 2);
  EXPECT_GT(moving, 0) << "the running stream shows as throughput: " << out;
  std::tie(rc, out) = Ctl("top --count 1 --interval 0.2");
  EXPECT_EQ(rc, 0) << LastErr();
  EXPECT_NE(out.find("TX_GBPS"), std::string::npos) << out;
  EXPECT_NE(out.find("BUSY_%"), std::string::npos) << out;

  // fault drop: retransmits go up, integrity holds.
  uint64_t retx0 = 0;
  for (const auto& x : CtlJson("channels")) retx0 += x["retransmits"].get<uint64_t>();
  // (on B, the receiving host: its XDP program drops data packets, A retransmits them)
  std::tie(rc, out) = Ctl("fault drop 20000", hosts_.ns_b());
  EXPECT_EQ(rc, 0) << LastErr();
  usleep(700'000);
  std::tie(rc, out) = Ctl("fault drop 0", hosts_.ns_b());
  EXPECT_EQ(rc, 0);
  uint64_t retx1 = 0;
  for (const auto& x : CtlJson("channels")) retx1 += x["retransmits"].get<uint64_t>();
  EXPECT_GT(retx1, retx0) << "2% loss must cause retransmits";

  // copy workers and policy at run time.
  EXPECT_EQ(CtlJson("copy-workers 2")["copy_workers"], 2);
  EXPECT_EQ(a_.stack->copy_workers(), 2);
  json pol = CtlJson("policy set round-robin skip_queued_bytes=1048576");
  EXPECT_EQ(pol["knobs"]["skip_queued_bytes"], "1048576");
  // Another policy, mid-stream, then back: the stream below must not notice.
  json sq = CtlJson("policy set shortest-queue copy_chunk_bytes=131072");
  EXPECT_EQ(sq["name"], "shortest-queue");
  EXPECT_EQ(sq["knobs"]["copy_chunk_bytes"], "131072") << "the copy plan's knobs, every policy's";
  auto [lrc, list] = Ctl("policy list");
  EXPECT_EQ(lrc, 0) << LastErr();
  EXPECT_NE(list.find("* shortest-queue"), std::string::npos) << list;
  EXPECT_NE(list.find("  round-robin skip_queued_bytes=2097152"), std::string::npos) << list;
  EXPECT_NE(list.find("  one-per-socket"), std::string::npos) << list;
  EXPECT_EQ(CtlJson("policy set round-robin")["name"], "round-robin");
  // scale: two more channels to the peer, then back to its first: drained, not dropped.
  const size_t before = CtlJson("channels").size();
  EXPECT_EQ(CtlJson("scale peer 198.18.0.2 --channels " + std::to_string(before + 2))["channels"],
            before + 2);
  EXPECT_EQ(CtlJson("channels").size(), before + 2);
  usleep(200'000);
  EXPECT_EQ(CtlJson("scale peer 198.18.0.2 --channels " + std::to_string(before))["channels"],
            before);

  tx.join();
  rx.join();
  EXPECT_TRUE(send_err.ok()) << send_err;
  EXPECT_TRUE(recv_err.ok()) << recv_err;
  EXPECT_EQ(received.load(), kBytes);
  EXPECT_EQ(bad.load(), 0u) << "no byte lost or changed through pin, map, fault, resize";

  // /metrics: valid for promtool, and its counters match what moved.
  const std::string text = Scrape(hosts_.ns_a(), 19464);
  ASSERT_FALSE(text.empty());
  {
    std::ofstream f("/tmp/netch_metrics.txt");
    f << text;
  }
  auto [prc, pout] = Sh("promtool check metrics < /tmp/netch_metrics.txt");
  EXPECT_EQ(prc, 0) << pout << LastErr();
  EXPECT_EQ(MetricValue(text, "netch_socket_tx_bytes_total{socket=\"" + std::to_string(sock_id)),
            static_cast<double>(kBytes));
  EXPECT_GE(MetricValue(text, "netch_channel_tx_bytes_total"), static_cast<double>(kBytes));
  EXPECT_GT(MetricValue(text, "netch_channel_retransmits_total"), 0);
  // The stack's default transmit path on these hosts, and it carried the data.
  EXPECT_EQ(MetricValue(text, "netch_driver_tx_udp"), 1);
  EXPECT_GT(MetricValue(text, "netch_udp_tx_packets_total"), 0);
  EXPECT_GT(MetricValue(text, "netch_dispatcher_wakeups_total"), 0) << "its sleeps are counted";
  const std::string text_b = Scrape(hosts_.ns_b(), 19465);
  EXPECT_EQ(MetricValue(text_b, "netch_socket_rx_bytes_total"), static_cast<double>(kBytes));
  EXPECT_GT(MetricValue(text_b, "netch_xdp_packets_total{verdict=\"drop_fault\"}"), 0);
  s->reset();
  c->reset();
  l->reset();
}

TEST_F(CtlTest, EveryErrorPathGetsOneLineAndANonZeroExit) {
  // No stack in this namespace yet.
  auto [rc, out] = Ctl("status");
  EXPECT_EQ(rc, 1);
  EXPECT_NE(LastErr().find("no netch stack"), std::string::npos) << LastErr();
  OpenHost(&a_, hosts_.ns_a(), TestHosts::kDevA, "");
  struct Case {
    const char* args;
    int rc;
    const char* says;
  } cases[] = {
      {"", 2, "A subcommand is required"},
      {"frobnicate", 2, "unknown command 'frobnicate'"},
      {"pin channel 9999 --core 0", 1, "no channel 9999"},
      {"pin channel 1 --core 77", 1, "no engine runs on core 77"},
      {"pin channel x --core 0", 2, "Could not convert"},
      {"pin channel 1 --core", 2, "--core"},
      {"map socket 12345 --channels 1", 1, "no connected socket"},
      {"sockets --explain 12345", 1, "no socket 12345"},
      {"sockets --explain x", 2, "Could not convert"},
      {"top --count 0", 2, "--count"},
      {"map socket 1 --channels a,b", 1, "bad channel id"},
      {"copy-workers many", 2, "Could not convert"},
      {"copy-workers 1000", 1, "copy workers must be"},
      {"fault drop 2000000", 1, "ppm"},
      // 64-bit values are range-checked before anything narrows them (4294967297 = 2^32 + 1
      // would wrap to 1, a valid id).
      {"fault drop 4294967297", 1, "ppm"},
      {"fault drop 10 --channel 4294967297", 1, "ID < 2^32"},
      {"pin channel 4294967297 --core 0", 1, "ID < 2^32"},
      {"fault drop 10 --channel 999", 1, "not active"},
      {"policy set lottery", 1, "unknown policy"},
      {"policy set round-robin bogus=1", 1, "no knob"},
      {"policy set round-robin skip_queued_bytes=-5", 1, "positive integer"},
      {"scale peer 198.18.0.77 --channels 2", 1, "no channel to that peer"},
      {"scale peer not-an-ip --channels 2", 1, "usage"},
      {"--instance nope status", 1, "no netch instance 'nope'"},
      {"--instance", 2, "--instance"},
  };
  for (const Case& k : cases) {
    std::tie(rc, out) = Ctl(k.args);
    const std::string err = LastErr();
    EXPECT_EQ(rc, k.rc) << k.args << ": " << err;
    EXPECT_NE(err.find(k.says), std::string::npos) << k.args << ": " << err;
    EXPECT_TRUE(out.empty()) << k.args << " printed to stdout: " << out;
  }
  // Global options also after the command.
  std::tie(rc, out) = Ctl("channels --json");
  EXPECT_EQ(rc, 0) << LastErr();
  EXPECT_TRUE(json::parse(out, nullptr, false).is_array()) << out;
  std::tie(rc, out) = Ctl("--help");
  EXPECT_EQ(rc, 0);
  EXPECT_NE(out.find("pin channel ID --core N"), std::string::npos);
  std::tie(rc, out) = Ctl("pin channel --help");
  EXPECT_EQ(rc, 0) << "--help works after a command too";
  // Two stacks in one namespace: netchctl asks which.
  {
    NetnsScope scope(hosts_.ns_a());
    ControllerOptions co;
    co.instance = "second";
    co.ifname = "lo";
    co.metrics_address = "";
    co.allow_generic = true;
    auto c2 = Controller::Start(co);
    if (c2.ok()) {
      ASSERT_TRUE((*c2)->Serve(a_.stack.get()).ok());
      std::tie(rc, out) = Ctl("status");
      EXPECT_EQ(rc, 1);
      EXPECT_NE(LastErr().find("--instance"), std::string::npos) << LastErr();
      std::tie(rc, out) = Ctl("--instance second status");
      EXPECT_EQ(rc, 0) << LastErr();
      (*c2)->Stop();
    }
  }
  // The same instance name twice is refused while the first lives.
  NetnsScope scope(hosts_.ns_a());
  ControllerOptions dup;
  dup.ifname = TestHosts::kDevA;
  dup.metrics_address = "";
  auto d = Controller::Start(dup);
  EXPECT_EQ(d.status().code(), absl::StatusCode::kAlreadyExists) << d.status();
}

TEST_F(CtlTest, ATricklingClientCannotHoldTheControlSocket) {
  OpenHost(&a_, hosts_.ns_a(), TestHosts::kDevA, "");
  // A client that sends one byte every 300 ms and never a newline: the server gives up on it
  // after one request deadline (2 s), however long it keeps trickling.
  std::atomic<bool> done{false};
  std::thread trickle([&] {
    NetnsScope in(hosts_.ns_a());
    const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    const std::string name = Controller::SocketName("default");
    std::memcpy(a.sun_path + 1, name.data(), name.size());
    if (connect(fd, reinterpret_cast<sockaddr*>(&a),
                static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name.size())) == 0) {
      for (int i = 0; i < 30 && !done; ++i) {
        if (send(fd, "s", 1, MSG_NOSIGNAL) != 1) break;
        std::this_thread::sleep_for(std::chrono::milliseconds(300));
      }
    }
    close(fd);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  const uint64_t t0 = chan::NowUs();
  auto [rc, out] = Ctl("status");
  const double secs = (chan::NowUs() - t0) / 1e6;
  done = true;
  trickle.join();
  EXPECT_EQ(rc, 0) << out;
  EXPECT_LT(secs, 3.5) << "a trickling client held the control loop for " << secs << " s";
}

TEST_F(CtlTest, ABusyMetricsPortIsAWarningNotAFailure) {
  {
    NetnsScope scope(hosts_.ns_a());
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(19466);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
    ASSERT_EQ(listen(fd, 1), 0);
    OpenHost(&a_, hosts_.ns_a(), TestHosts::kDevA, "127.0.0.1:19466");
    close(fd);
  }
  json st = CtlJson("status");
  EXPECT_EQ(st["metrics_address"], "");
  ASSERT_FALSE(st["warnings"].empty());
  EXPECT_NE(st["warnings"][0].get<std::string>().find("19466"), std::string::npos);
}

TEST_F(CtlTest, ACrashedInstanceIsDetectedAndCleanedUpByTheNextStart) {
  const pid_t child = testing::ForkPeer([&](const std::function<void()>& ready) {
    NetnsScope scope(hosts_.ns_a());
    ControllerOptions co;
    co.ifname = TestHosts::kDevA;
    co.metrics_address = "";
    auto c = Controller::Start(co);
    if (!c.ok()) return;
    ready();
    pause();  // until killed: no destructor runs, pins and program stay behind
  });
  ASSERT_GT(child, 0);
  testing::KillPeer(child);
  ASSERT_EQ(hosts_.RunIn(hosts_.ns_a(), "ip link show nc-a | grep -q xdp"), 0)
      << "the dead instance's program is still attached";
  NetnsScope scope(hosts_.ns_a());
  ControllerOptions co;
  co.ifname = TestHosts::kDevA;
  co.metrics_address = "";
  auto c = Controller::Start(co);
  ASSERT_TRUE(c.ok()) << c.status() << " (a stale program must not block the next start)";
  const auto st = (*c)->status();
  EXPECT_NE(st.recovered.find("died"), std::string::npos) << st.recovered;
  EXPECT_NE(st.recovered.find("detached"), std::string::npos) << st.recovered;
  EXPECT_EQ(st.attach_mode, "native");
  c->reset();
  EXPECT_NE(hosts_.RunIn(hosts_.ns_a(), "ip link show nc-a | grep -q xdp"), 0)
      << "a clean exit detaches";
}

TEST_F(CtlTest, AnInstanceWaitingForItsNameStartsTheMomentTheHolderExits) {
  // A service restarted at once (systemd, a supervisor) starts its next instance while the old
  // one is still exiting: the new one waits for the instance lock, and the old one's clean exit
  // removes its files and, being the namespace's last instance, their directories — which the
  // waiter must create again rather than fail on ("open .../NAME.lock: No such file or
  // directory" took down a restarted memcached under netchrun).
  NetnsScope scope(hosts_.ns_a());
  ControllerOptions co;
  co.ifname = TestHosts::kDevA;
  co.metrics_address = "";
  co.instance = "restarted";
  for (int round = 0; round < 5; ++round) {
    auto first = Controller::Start(co);
    ASSERT_TRUE(first.ok()) << first.status();
    absl::StatusOr<std::unique_ptr<Controller>> second = absl::UnknownError("not started");
    std::thread next([&] {
      NetnsScope s(hosts_.ns_a());
      second = Controller::Start(co);  // waits for the lock the first holds
    });
    std::this_thread::sleep_for(std::chrono::milliseconds(60));
    first->reset();  // a clean exit: detaches, removes its pins, files and directories
    next.join();
    ASSERT_TRUE(second.ok()) << "round " << round << ": " << second.status();
    EXPECT_EQ(hosts_.RunIn(hosts_.ns_a(), "ip link show nc-a | grep -q xdp"), 0)
        << "the second instance attached its program";
    second->reset();
  }
}

TEST_F(CtlTest, APinDirectoryOthersCanWriteIsRefused) {
  const std::string bpffs = absl::StrFormat("/tmp/netch-ctltest-bpffs-%d", getpid());
  NetnsScope scope(hosts_.ns_a());
  auto start = [&] {
    ControllerOptions co;
    co.ifname = TestHosts::kDevA;
    co.metrics_address = "";
    co.bpffs = bpffs;  // mounted by the controller
    return Controller::Start(co);
  };
  {
    auto c = start();
    ASSERT_TRUE(c.ok()) << c.status();
  }
  // Someone loosened a level of our pin path: whoever can write there could swap our maps.
  ASSERT_EQ(chmod((bpffs + "/netch").c_str(), 0777), 0);
  {
    auto c = start();
    EXPECT_FALSE(c.ok());
    EXPECT_NE(c.status().message().find("lets others write"), std::string::npos) << c.status();
  }
  ASSERT_EQ(chmod((bpffs + "/netch").c_str(), 0700), 0);
  {
    auto c = start();
    EXPECT_TRUE(c.ok()) << c.status();
  }
  umount(bpffs.c_str());
  rmdir(bpffs.c_str());
}

// Anyone in a namespace can bind an abstract socket name. A socket squatting on an instance's
// name, served by another user, must not be believed by netchctl.
TEST_F(CtlTest, NetchctlDoesNotTrustAControlSocketServedByAnotherUser) {
  const pid_t child = testing::ForkPeer([&](const std::function<void()>& ready) {
    NetnsScope scope(hosts_.ns_a());
    const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    const std::string name = Controller::SocketName("squat");
    std::memcpy(a.sun_path + 1, name.data(), name.size());
    // SO_PEERCRED reports who called listen(): become nobody first.
    if (setgid(65534) != 0 || setuid(65534) != 0) return;
    if (bind(fd, reinterpret_cast<sockaddr*>(&a),
             static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name.size())) != 0)
      return;
    if (listen(fd, 4) != 0) return;
    ready();
    for (;;) {
      const int c = accept(fd, nullptr, nullptr);
      if (c < 0) return;
      const char* lie = "{\"ok\":true,\"data\":{\"instance\":\"squat\"}}\n";
      (void)!write(c, lie, std::strlen(lie));
      close(c);
    }
  });
  ASSERT_GT(child, 0);
  auto [rc, out] = Ctl("--instance squat status");
  testing::KillPeer(child);
  EXPECT_EQ(rc, 1);
  EXPECT_NE(LastErr().find("not trusting"), std::string::npos) << LastErr();
  EXPECT_TRUE(out.empty()) << out;
}

}  // namespace
}  // namespace netch::ctl
