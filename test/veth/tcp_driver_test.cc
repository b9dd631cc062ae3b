// The kernel-TCP driver against hostile and restarting peers, on veth test hosts: connections
// that never say hello, hellos that are not ours, answers that do not echo our token, and a peer
// stack that restarts while its old channels are still open.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "afxdp_channels/channel.h"
#include "afxdp_channels/engine.h"
#include "bpf/wire.h"
#include "common/netns.h"
#include "common/unique_fd.h"
#include "gtest/gtest.h"
#include "test/support/privilege.h"
#include "test/support/testhosts.h"

namespace netch {
namespace {

using testing::TestHosts;

constexpr uint32_t kIpA2 = 0xC6120003;  // 198.18.0.3: a second address on host A
constexpr uint16_t kPort = 9910;

class TcpDriverTest : public ::testing::Test {
 protected:
  void SetUp() override {
    NETCH_REQUIRE_ROOT();
    ASSERT_TRUE(hosts_.Up().ok());
    ASSERT_EQ(hosts_.RunIn(hosts_.ns_a(), "ip addr add 198.18.0.3/24 dev nc-a"), 0);
  }

  chan::DriverOptions Opts(const std::string& ns, const char* dev, bool accept) {
    chan::DriverOptions o;
    o.netns = ns;
    o.ifname = dev;
    o.engines = 1;
    o.accept = accept;
    o.dead_peer_timeout = absl::Milliseconds(800);
    o.tcp_port = kPort;
    return o;
  }
  std::unique_ptr<chan::Driver> Driver(const chan::DriverOptions& o) {
    auto d = chan::CreateDriver("tcp", o);
    EXPECT_TRUE(d.ok()) << d.status();
    return d.ok() ? std::move(*d) : nullptr;
  }

  // A plain TCP connection from host A (from `src`, host order) to B's driver port.
  UniqueFd RawConnect(uint32_t src, uint16_t port = kPort) {
    NetnsScope ns(hosts_.ns_a());
    UniqueFd fd(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(src);
    EXPECT_EQ(bind(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(TestHosts::kIpB);
    EXPECT_EQ(connect(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0) << errno;
    return fd;
  }

  // True when the peer closed `fd` (end of stream or reset) within `timeout_ms`.
  static bool ClosedWithin(int fd, int timeout_ms) {
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, timeout_ms) != 1) return false;
    char c;
    return read(fd, &c, 1) <= 0;
  }

  static bool WaitState(chan::Channel& c, chan::ChannelState s, absl::Duration timeout) {
    const absl::Time end = absl::Now() + timeout;
    while (c.state() != s && absl::Now() < end) absl::SleepFor(absl::Milliseconds(5));
    return c.state() == s;
  }

  static std::shared_ptr<chan::Channel> AcceptWithin(chan::Driver& d, absl::Duration timeout) {
    const absl::Time end = absl::Now() + timeout;
    for (;;) {
      if (auto c = d.Accept()) return c;
      if (absl::Now() >= end) return nullptr;
      absl::SleepFor(absl::Milliseconds(5));
    }
  }

  TestHosts hosts_;
};

TEST_F(TcpDriverTest, IdleConnectionsAreCappedPerPeerAndTimedOutWhileChannelsStillOpen) {
  auto b = Driver(Opts(hosts_.ns_b(), TestHosts::kDevB, true));
  auto a = Driver(Opts(hosts_.ns_a(), TestHosts::kDevA, false));
  ASSERT_TRUE(a && b);
  // 40 connections from one address that never say hello: 16 wait (no buffers), the rest are
  // closed at once.
  std::vector<UniqueFd> idle;
  for (int i = 0; i < 40; ++i) idle.push_back(RawConnect(kIpA2));
  const absl::Time end = absl::Now() + absl::Seconds(2);
  while (b->Stats().handshakes_dropped < 24 && absl::Now() < end)
    absl::SleepFor(absl::Milliseconds(5));
  EXPECT_EQ(b->Stats().handshakes_pending, 16u);
  EXPECT_GE(b->Stats().handshakes_dropped, 24u);
  // Meanwhile a real channel from host A's other address opens and is handed out.
  chan::ChannelParams p;
  p.peer_ipv4 = TestHosts::kIpB;
  auto c = a->Connect(p);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(WaitState(**c, chan::ChannelState::kUp, absl::Seconds(1)));
  auto accepted = AcceptWithin(*b, absl::Seconds(1));
  ASSERT_NE(accepted, nullptr);
  EXPECT_EQ(accepted->peer_ipv4(), TestHosts::kIpA);
  // The silent ones time out (800 ms) and are closed; none became a channel.
  int closed = 0;
  for (auto& fd : idle) closed += ClosedWithin(fd.get(), 2000);
  EXPECT_EQ(closed, 40);
  // (The gauge is published after the listener's round that closed them.)
  const absl::Time until = absl::Now() + absl::Seconds(1);
  while (b->Stats().handshakes_pending != 0 && absl::Now() < until)
    absl::SleepFor(absl::Milliseconds(5));
  EXPECT_EQ(b->Stats().handshakes_pending, 0u);
  EXPECT_EQ(b->Stats().handshakes_dropped, 40u);
  EXPECT_EQ(b->Channels().size(), 1u);
  EXPECT_EQ(b->Accept(), nullptr);
}

TEST_F(TcpDriverTest, AHelloThatIsNotOursClosesTheConnectionWithoutAChannel) {
  auto b = Driver(Opts(hosts_.ns_b(), TestHosts::kDevB, true));
  ASSERT_TRUE(b);
  // Garbage, then a well-formed hello that pretends to be an answer (echo set), then one of
  // the wrong version.
  uint8_t bad[3][wire::kTcpHelloLen];
  std::memset(bad[0], 0x5a, sizeof(bad[0]));
  wire::WriteTcpHello(bad[1], {.token = 7, .echo_token = 9, .incarnation = 1});
  wire::WriteTcpHello(bad[2], {.token = 7, .echo_token = 0, .incarnation = 1});
  bad[2][4] = NC_WIRE_VERSION + 1;
  for (auto& h : bad) {
    UniqueFd fd = RawConnect(TestHosts::kIpA);
    ASSERT_EQ(write(fd.get(), h, sizeof(h)), static_cast<ssize_t>(sizeof(h)));
    EXPECT_TRUE(ClosedWithin(fd.get(), 1000));
  }
  EXPECT_EQ(b->Stats().handshakes_bad, 3u);
  EXPECT_EQ(b->Channels().size(), 0u);
  // The same bytes with a correct hello become a channel: the refusals above were the hello's.
  UniqueFd fd = RawConnect(TestHosts::kIpA);
  uint8_t good[wire::kTcpHelloLen];
  wire::WriteTcpHello(good, {.token = 7, .echo_token = 0, .incarnation = 1});
  ASSERT_EQ(write(fd.get(), good, sizeof(good)), static_cast<ssize_t>(sizeof(good)));
  ASSERT_NE(AcceptWithin(*b, absl::Seconds(1)), nullptr);
  uint8_t answer[wire::kTcpHelloLen];
  ASSERT_EQ(read(fd.get(), answer, sizeof(answer)), static_cast<ssize_t>(sizeof(answer)));
  wire::TcpHello h;
  ASSERT_TRUE(wire::ReadTcpHello(answer, &h));
  EXPECT_EQ(h.echo_token, 7u);
  EXPECT_NE(h.token, 0u);
}

// A responder (not a driver) that answers each hello with `echo(token)` as its echo token.
void FakeResponder(int listen_fd, uint64_t (*echo)(uint64_t)) {
  UniqueFd c(accept(listen_fd, nullptr, nullptr));
  uint8_t in[wire::kTcpHelloLen];
  size_t got = 0;
  while (got < sizeof(in)) {
    const ssize_t r = read(c.get(), in + got, sizeof(in) - got);
    if (r <= 0) return;
    got += static_cast<size_t>(r);
  }
  wire::TcpHello h;
  if (!wire::ReadTcpHello(in, &h)) return;
  uint8_t out[wire::kTcpHelloLen];
  wire::WriteTcpHello(out, {.token = 5, .echo_token = echo(h.token), .incarnation = 3});
  (void)!write(c.get(), out, sizeof(out));
  // Hold the connection until the initiator gives up on it.
  pollfd p{c.get(), POLLIN, 0};
  poll(&p, 1, 3000);
}

TEST_F(TcpDriverTest, AnAnswerThatDoesNotEchoOurTokenFailsTheChannel) {
  auto a = Driver(Opts(hosts_.ns_a(), TestHosts::kDevA, false));
  ASSERT_TRUE(a);
  UniqueFd lfd;
  {
    NetnsScope ns(hosts_.ns_b());
    lfd = UniqueFd(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    int one = 1;
    setsockopt(lfd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    sa.sin_port = htons(kPort);
    ASSERT_EQ(bind(lfd.get(), reinterpret_cast<sockaddr*>(&sa), sizeof(sa)), 0);
    ASSERT_EQ(listen(lfd.get(), 4), 0);
  }
  chan::ChannelParams p;
  p.peer_ipv4 = TestHosts::kIpB;
  p.connect_timeout = absl::Seconds(2);
  // The right echo: the channel comes up (the fake speaks the protocol).
  {
    std::thread fake(
        FakeResponder, lfd.get(), +[](uint64_t t) { return t; });
    auto c = a->Connect(p);
    ASSERT_TRUE(c.ok()) << c.status();
    EXPECT_TRUE(WaitState(**c, chan::ChannelState::kUp, absl::Seconds(1)));
    (void)a->Destroy(**c);
    fake.join();
  }
  // Any other echo: refused, counted.
  std::thread fake(
      FakeResponder, lfd.get(), +[](uint64_t t) { return t ^ 1; });
  auto c = a->Connect(p);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(WaitState(**c, chan::ChannelState::kFailed, absl::Seconds(1)));
  EXPECT_EQ(a->Stats().handshakes_bad, 1u);
  (void)a->Destroy(**c);
  fake.join();
}

TEST_F(TcpDriverTest, ARestartedPeerStackFailsItsOldChannels) {
  auto b = Driver(Opts(hosts_.ns_b(), TestHosts::kDevB, true));
  auto a1 = Driver(Opts(hosts_.ns_a(), TestHosts::kDevA, false));
  ASSERT_TRUE(b && a1);
  chan::ChannelParams p;
  p.peer_ipv4 = TestHosts::kIpB;
  auto c1 = a1->Connect(p);
  ASSERT_TRUE(c1.ok()) << c1.status();
  ASSERT_TRUE(WaitState(**c1, chan::ChannelState::kUp, absl::Seconds(1)));
  auto b1 = AcceptWithin(*b, absl::Seconds(1));
  ASSERT_NE(b1, nullptr);
  // A second channel from the same stack instance leaves the first alone.
  auto c1b = a1->Connect(p);
  ASSERT_TRUE(c1b.ok());
  ASSERT_TRUE(WaitState(**c1b, chan::ChannelState::kUp, absl::Seconds(1)));
  ASSERT_NE(AcceptWithin(*b, absl::Seconds(1)), nullptr);
  absl::SleepFor(absl::Milliseconds(100));
  EXPECT_EQ(b1->state(), chan::ChannelState::kUp);
  // The "restarted" stack at the same address (a new driver: a new incarnation) opens a channel:
  // B fails the old instance's channels, whose far end it takes for gone.
  auto a2 = Driver(Opts(hosts_.ns_a(), TestHosts::kDevA, false));
  ASSERT_TRUE(a2);
  auto c2 = a2->Connect(p);
  ASSERT_TRUE(c2.ok()) << c2.status();
  ASSERT_TRUE(WaitState(**c2, chan::ChannelState::kUp, absl::Seconds(1)));
  auto b2 = AcceptWithin(*b, absl::Seconds(1));
  ASSERT_NE(b2, nullptr);
  EXPECT_TRUE(WaitState(*b1, chan::ChannelState::kFailed, absl::Seconds(1)));
  EXPECT_TRUE(WaitState(**c1, chan::ChannelState::kFailed, absl::Seconds(2)));
  // Each side says why: B retired the old incarnation's two channels; A saw B close them.
  EXPECT_EQ(b1->fail_cause(), chan::FailCause::kPeerRestarted);
  EXPECT_EQ(b->Stats().channels_failed[static_cast<size_t>(chan::FailCause::kPeerRestarted)], 2u);
  EXPECT_EQ((*c1)->fail_cause(), chan::FailCause::kBroken);
  EXPECT_EQ(b2->state(), chan::ChannelState::kUp);
  EXPECT_EQ((*c2)->state(), chan::ChannelState::kUp);
}

}  // namespace
}  // namespace netch
