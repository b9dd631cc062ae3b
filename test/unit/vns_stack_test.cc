// VNS connection and close state machines over the in-process "loopback" driver: no network, no
// privileges, deterministic. (The same sockets run over AF_XDP and kernel TCP in
// test/veth/vns_test.cc.)
#include <poll.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "afxdp_channels/engine.h"
#include "gtest/gtest.h"
#include "test/support/vns_traffic.h"
#include "vns_lib/vns.h"

namespace netch::vns {
namespace {

constexpr uint32_t kA = 0x0A000001, kB = 0x0A000002;

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif

std::unique_ptr<Stack> MakeStack(uint32_t ip, int channels = 2) {
  StackOptions o;
  o.driver = "loopback";
  o.driver_opts.loopback_ipv4 = ip;
  o.driver_opts.engines = 1;
  o.channels_per_peer = channels;
  auto s = Stack::Create(o);
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? std::move(*s) : nullptr;
}

// A connected pair of sockets between two stacks (client on `a`, server on `b`); null on failure.
std::pair<std::unique_ptr<VirtualSocket>, std::unique_ptr<VirtualSocket>> Connected(Stack& a,
                                                                                    Stack& b,
                                                                                    uint16_t port) {
  auto l = b.Listen(port);
  EXPECT_TRUE(l.ok()) << l.status();
  if (!l.ok()) return {};
  auto c = a.Connect(kB, port);
  EXPECT_TRUE(c.ok()) << c.status();
  if (!c.ok()) return {};
  auto s = (*l)->Accept();
  EXPECT_TRUE(s.ok()) << s.status();
  if (!s.ok()) return {};
  return {std::move(*c), std::move(*s)};
}

bool Readable(int fd, int ms) {
  pollfd p{fd, POLLIN, 0};
  return poll(&p, 1, ms) == 1;
}

class VnsStackTest : public ::testing::Test {
 protected:
  void SetUp() override {
    a_ = MakeStack(kA);
    b_ = MakeStack(kB);
    ASSERT_TRUE(a_ && b_);
  }
  std::unique_ptr<Stack> a_, b_;
};

TEST_F(VnsStackTest, HandshakeConnectsBothEndsWithPortsAddressesAndClass) {
  auto l = b_->Listen(80);
  ASSERT_TRUE(l.ok());
  (*l)->SetNonBlocking(true);
  EXPECT_EQ(Errno((*l)->Accept().status()), EAGAIN) << "nothing pending yet";
  EXPECT_FALSE(Readable((*l)->fd(), 0));
  SocketOptions so;
  so.app_class = AppClass::kLatency;
  auto c = a_->Connect(kB, 80, so);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(Readable((*l)->fd(), 1000)) << "the listener's fd signals the pending connection";
  auto s = (*l)->Accept();
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ((*c)->remote_port(), 80);
  EXPECT_EQ((*c)->remote_ipv4(), kB);
  EXPECT_EQ((*s)->remote_ipv4(), kA);
  EXPECT_EQ((*s)->remote_port(), (*c)->local_port());
  EXPECT_GE((*c)->local_port(), 40000);
  EXPECT_EQ((*s)->app_class(), AppClass::kLatency) << "the class travels in NCSYN";
  EXPECT_FALSE(Readable((*l)->fd(), 0)) << "accepted: no longer pending";
}

TEST_F(VnsStackTest, NoListenerIsRefusedAndNoHostIsAnError) {
  auto c = a_->Connect(kB, 81);
  EXPECT_EQ(Errno(c.status()), ECONNREFUSED) << c.status();
  SocketOptions so;
  so.connect_timeout = absl::Milliseconds(200);
  auto d = a_->Connect(0x0A0000FE, 80, so);  // no stack has this address
  EXPECT_FALSE(d.ok());
  EXPECT_TRUE(Errno(d.status()) == ECONNREFUSED || Errno(d.status()) == ETIMEDOUT) << d.status();
}

TEST_F(VnsStackTest, AFullBacklogRefusesTheNextConnection) {
  auto l = b_->Listen(82, /*backlog=*/1);
  ASSERT_TRUE(l.ok());
  auto c1 = a_->Connect(kB, 82);
  ASSERT_TRUE(c1.ok());
  auto c2 = a_->Connect(kB, 82);
  EXPECT_EQ(Errno(c2.status()), ECONNREFUSED) << "backlog of one, nobody accepted";
  ASSERT_TRUE((*l)->Accept().ok());
  EXPECT_TRUE(a_->Connect(kB, 82).ok()) << "room again after accept";
}

TEST_F(VnsStackTest, HalfCloseDeliversEverythingThenEndOfStreamBothWays) {
  auto l = b_->Listen(83);
  auto c = a_->Connect(kB, 83);
  ASSERT_TRUE(c.ok());
  auto s = (*l)->Accept();
  ASSERT_TRUE(s.ok());
  std::vector<uint8_t> msg(100'000);
  for (size_t i = 0; i < msg.size(); ++i) msg[i] = static_cast<uint8_t>(i * 7);
  ASSERT_EQ(*(*c)->Send(msg), msg.size());
  ASSERT_TRUE((*c)->Shutdown().ok());
  EXPECT_EQ(Errno((*c)->Send(msg).status()), EPIPE);
  std::vector<uint8_t> got, buf(7000);
  for (;;) {
    auto r = (*s)->Recv(buf);
    ASSERT_TRUE(r.ok()) << r.status();
    if (*r == 0) break;
    got.insert(got.end(), buf.begin(), buf.begin() + *r);
  }
  EXPECT_EQ(got, msg) << "every byte before the FIN, in order";
  EXPECT_EQ(*(*s)->Recv(buf), 0u) << "end of stream stays end of stream";
  EXPECT_TRUE(Readable((*s)->fd(), 0)) << "an ended stream is readable (recv returns 0)";
  // The other direction is still open after the client's shutdown.
  ASSERT_EQ(*(*s)->Send({msg.data(), 10}), 10u);
  ASSERT_TRUE((*s)->Shutdown().ok());
  EXPECT_EQ(*(*c)->Recv(buf), 10u);
  EXPECT_EQ(*(*c)->Recv(buf), 0u);
  EXPECT_TRUE((*c)->Close().ok());
  EXPECT_TRUE((*s)->Close().ok());
}

TEST_F(VnsStackTest, DataForAClosedSocketResetsTheWriter) {
  auto l = b_->Listen(84);
  auto c = a_->Connect(kB, 84);
  ASSERT_TRUE(c.ok());
  auto s = (*l)->Accept();
  ASSERT_TRUE(s.ok());
  ASSERT_TRUE((*s)->Close().ok());
  std::vector<uint8_t> buf(4096, 1);
  absl::Status st;
  for (int i = 0; i < 2000 && st.ok(); ++i) {
    auto r = (*c)->Send(buf);
    if (!r.ok()) st = r.status();
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_EQ(Errno(st), ECONNRESET) << st;
  std::vector<uint8_t> rb(16);
  EXPECT_EQ(Errno((*c)->Recv(rb).status()), ECONNRESET);
}

TEST_F(VnsStackTest, NonBlockingRecvAndReadinessFollowTheData) {
  auto l = b_->Listen(85);
  auto c = a_->Connect(kB, 85);
  ASSERT_TRUE(c.ok());
  auto s = (*l)->Accept();
  ASSERT_TRUE(s.ok());
  (*s)->SetNonBlocking(true);
  std::vector<uint8_t> buf(64);
  EXPECT_EQ(Errno((*s)->Recv(buf).status()), EAGAIN);
  EXPECT_FALSE(Readable((*s)->fd(), 0));
  ASSERT_TRUE((*c)->Send({buf.data(), 10}).ok());
  EXPECT_TRUE(Readable((*s)->fd(), 1000));
  EXPECT_EQ(*(*s)->Recv(buf), 10u);
  EXPECT_FALSE(Readable((*s)->fd(), 0)) << "drained: not readable any more";
}

// Voluntary context switches of one thread of this process (its sleeps ended by a wakeup).
uint64_t Wakeups(pid_t tid) {
  std::ifstream f("/proc/self/task/" + std::to_string(tid) + "/status");
  for (std::string line; std::getline(f, line);)
    if (line.rfind("voluntary_ctxt_switches:", 0) == 0) return std::stoull(line.substr(24));
  return 0;
}
// ... summed over the threads named `name`.
uint64_t WakeupsOf(const std::string& name) {
  uint64_t n = 0;
  for (const auto& t : std::filesystem::directory_iterator("/proc/self/task")) {
    std::ifstream comm(t.path() / "comm");
    std::string c;
    std::getline(comm, c);
    if (c == name) n += Wakeups(std::stoi(t.path().filename()));
  }
  return n;
}

// A host stack holds idle connections for days: a reader blocked on one, and the dispatchers of
// both stacks, sleep between looks for far longer than the 10 ms they used to (100 wakeups a
// second each, for nothing). Data still wakes the reader at once.
TEST_F(VnsStackTest, AnIdleConnectionLetsItsBlockedReaderAndTheDispatchersSleep) {
  auto l = b_->Listen(90);
  ASSERT_TRUE(l.ok());
  auto c = a_->Connect(kB, 90);
  ASSERT_TRUE(c.ok());
  auto s = (*l)->Accept();
  ASSERT_TRUE(s.ok());
  std::atomic<pid_t> reader_tid{0};
  absl::StatusOr<size_t> got;
  std::vector<uint8_t> buf(16);
  std::thread reader([&] {
    reader_tid = static_cast<pid_t>(syscall(SYS_gettid));
    got = (*s)->Recv(buf);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // past every spin: asleep
  const uint64_t r0 = Wakeups(reader_tid), d0 = WakeupsOf("netch-disp");
  std::this_thread::sleep_for(std::chrono::seconds(1));
  const uint64_t r1 = Wakeups(reader_tid), d1 = WakeupsOf("netch-disp");
  const uint64_t t0 = chan::NowUs();
  ASSERT_TRUE((*c)->Send({buf.data(), 5}).ok());
  reader.join();
  EXPECT_LT(chan::NowUs() - t0, 200'000u) << "data must wake the sleeping reader at once";
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got, 5u);
  EXPECT_LE(r1 - r0, 10u) << "wakeups of the blocked reader in 1 s";
  EXPECT_LE(d1 - d0, 30u) << "wakeups of both stacks' dispatchers in 1 s";
}

TEST_F(VnsStackTest, NonBlockingConnectCompletesThroughWriteReadiness) {
  auto l = b_->Listen(81);
  ASSERT_TRUE(l.ok());
  SocketOptions nb;
  nb.nonblocking = true;
  auto c = a_->Connect(kB, 81, nb);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(Readable((*c)->write_fd(), 2000)) << "write_fd() reports the handshake's end";
  EXPECT_EQ((*c)->Error(), 0);
  EXPECT_TRUE((*c)->Poll() & POLLOUT);
  EXPECT_FALSE((*c)->Poll() & POLLIN) << "nothing to read: a completed connect is not data";
  auto s = (*l)->Accept();
  ASSERT_TRUE(s.ok());
  const uint8_t msg[3] = {1, 2, 3};
  ASSERT_EQ(*(*c)->Send(msg), 3u);
  uint8_t buf[8];
  ASSERT_EQ(*(*s)->Recv(buf), 3u);

  // Nobody listens on 82: the RST ends the handshake with ECONNREFUSED, reported as writable
  // with an error, as a kernel socket's non-blocking connect is.
  auto r = a_->Connect(kB, 82, nb);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(Readable((*r)->write_fd(), 2000));
  EXPECT_EQ((*r)->Error(), ECONNREFUSED);
  EXPECT_TRUE((*r)->Poll() & POLLERR);
}

TEST_F(VnsStackTest, WriteReadinessClearsOnAFullWindowAndReturnsWhenTheReaderReads) {
  auto l = b_->Listen(83);
  ASSERT_TRUE(l.ok());
  SocketOptions small;
  small.rcvbuf = 64 << 10;  // the listener's buffer is what the connecting side may send
  auto l2 = b_->Listen(84, 128, small);
  ASSERT_TRUE(l2.ok());
  auto c = a_->Connect(kB, 84);
  ASSERT_TRUE(c.ok()) << c.status();
  auto s = (*l2)->Accept();
  ASSERT_TRUE(s.ok());
  (*c)->SetNonBlocking(true);
  EXPECT_TRUE(Readable((*c)->write_fd(), 0)) << "an idle connected socket takes data";
  std::vector<uint8_t> chunk(16 << 10, 7);
  size_t sent = 0;
  for (int i = 0; i < 1000; ++i) {
    auto n = (*c)->Send(chunk);
    if (!n.ok()) {
      ASSERT_EQ(Errno(n.status()), EAGAIN);
      break;
    }
    sent += *n;
  }
  EXPECT_GE(sent, 64u << 10);
  EXPECT_FALSE(Readable((*c)->write_fd(), 0)) << "Send would block: not writable";
  EXPECT_FALSE((*c)->Poll() & POLLOUT);
  std::vector<uint8_t> buf(1 << 20);
  size_t got = 0;
  while (got < sent) {
    auto n = (*s)->Recv(buf);
    ASSERT_TRUE(n.ok()) << n.status();
    got += *n;
  }
  EXPECT_TRUE(Readable((*c)->write_fd(), 2000)) << "the reader's window update makes it writable";
  EXPECT_TRUE((*c)->Send(chunk).ok());
}

TEST_F(VnsStackTest, AReaderStillReadingAfterThePeerClosedGetsEndOfStreamNotAReset) {
  // The reader's window updates reach a peer that has closed: they must not be answered with
  // RST (its reads would end in ECONNRESET instead of end of stream).
  auto l = b_->Listen(85);
  ASSERT_TRUE(l.ok());
  SocketOptions small;
  small.rcvbuf = 64 << 10;
  auto c = a_->Connect(kB, 85, small);
  ASSERT_TRUE(c.ok()) << c.status();
  auto s = (*l)->Accept();
  ASSERT_TRUE(s.ok());
  std::thread writer([&] {
    std::vector<uint8_t> data(512 << 10, 9);
    EXPECT_TRUE((*s)->Send(data).ok());
    EXPECT_TRUE((*s)->Close().ok());
  });
  std::vector<uint8_t> buf(8 << 10);
  size_t got = 0;
  absl::StatusOr<size_t> n;
  while ((n = (*c)->Recv(buf)).ok() && *n > 0) {
    got += *n;
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  writer.join();
  EXPECT_TRUE(n.ok()) << n.status();
  EXPECT_EQ(got, 512u << 10);
}

TEST_F(VnsStackTest, APeerThatClosesGivesEndOfStreamNotAnError) {
  auto l = b_->Listen(86);
  auto c = a_->Connect(kB, 86);
  ASSERT_TRUE(c.ok());
  auto s = (*l)->Accept();
  ASSERT_TRUE(s.ok());
  ASSERT_TRUE((*s)->Send({reinterpret_cast<const uint8_t*>("bye"), 3}).ok());
  s->reset();  // Close: FIN after the last byte
  std::vector<uint8_t> buf(16);
  EXPECT_EQ(*(*c)->Recv(buf), 3u);
  EXPECT_EQ(*(*c)->Recv(buf), 0u);
}

TEST_F(VnsStackTest, ManySocketsShareTheChannelsAndStayApart) {
  auto l = b_->Listen(87, 64);
  std::vector<std::unique_ptr<VirtualSocket>> cs, ss;
  for (int i = 0; i < 20; ++i) {
    auto c = a_->Connect(kB, 87);
    ASSERT_TRUE(c.ok());
    cs.push_back(std::move(*c));
    auto s = (*l)->Accept();
    ASSERT_TRUE(s.ok());
    ss.push_back(std::move(*s));
  }
  EXPECT_EQ(a_->driver().Channels().size(), 2u) << "20 sockets, 2 channels";
  for (int i = 0; i < 20; ++i) {
    std::vector<uint8_t> m(1000 + i, static_cast<uint8_t>(i));
    ASSERT_TRUE(cs[i]->Send(m).ok());
  }
  for (int i = 0; i < 20; ++i) {
    // Accept order matches connect order here; each socket gets only its own bytes.
    std::vector<uint8_t> buf(4096);
    size_t got = 0;
    while (got < 1000u + i) {
      auto r = ss[i]->Recv({buf.data() + got, buf.size() - got});
      ASSERT_TRUE(r.ok());
      got += *r;
    }
    EXPECT_EQ(got, 1000u + i);
    for (size_t k = 0; k < got; ++k) ASSERT_EQ(buf[k], i) << "socket " << i << " byte " << k;
  }
}

// Scale-up and scale-down of a peer's channels, 100 cycles, while streams run both ways: the
// drain handshake (NC_DRAIN after the last segment on both sides, destroy when everything is
// acknowledged and read) must lose and reorder nothing.
TEST(VnsScalingTest, HundredScaleCyclesDuringStreamsBothWaysLoseNothing) {
  auto a = MakeStack(kA, 1), b = MakeStack(kB, 1);
  ASSERT_TRUE(a && b);
  auto [c, s] = Connected(*a, *b, 90);
  ASSERT_TRUE(c && s);
  constexpr uint64_t kBytes = 96ull << 20;
  auto pattern = [](uint64_t i) { return static_cast<uint8_t>((i * 7) ^ (i >> 11)); };
  std::atomic<bool> done{false};
  auto writer = [&](VirtualSocket* w) {
    std::vector<uint8_t> buf(48 << 10);
    for (uint64_t off = 0; off < kBytes;) {
      const size_t n = std::min<uint64_t>(buf.size(), kBytes - off);
      for (size_t i = 0; i < n; ++i) buf[i] = pattern(off + i);
      auto r = w->Send({buf.data(), n});
      ASSERT_TRUE(r.ok()) << r.status();
      off += *r;
    }
  };
  auto reader = [&](VirtualSocket* r, uint64_t* got, bool* intact) {
    std::vector<uint8_t> buf(64 << 10);
    *intact = true;
    while (*got < kBytes) {
      auto n = r->Recv(buf);
      ASSERT_TRUE(n.ok()) << n.status();
      ASSERT_GT(*n, 0u);
      for (size_t i = 0; i < *n && *intact; ++i) *intact = buf[i] == pattern(*got + i);
      *got += *n;
    }
  };
  uint64_t got_b = 0, got_a = 0;
  bool intact_b = false, intact_a = false;
  std::thread wa([&] { writer(c.get()); }), wb([&] { writer(s.get()); });
  std::thread rb([&] { reader(s.get(), &got_b, &intact_b); });
  std::thread ra([&] { reader(c.get(), &got_a, &intact_a); });
  int cycles = 0;
  std::thread scaler([&] {
    for (; cycles < 100 && !done.load(); ++cycles) {
      EXPECT_TRUE(a->SetPeerChannels(kB, 3).ok());
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
      EXPECT_TRUE(a->SetPeerChannels(kB, 1).ok());
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  });
  wa.join();
  wb.join();
  rb.join();
  ra.join();
  done = true;
  scaler.join();
  EXPECT_EQ(got_b, kBytes);
  EXPECT_EQ(got_a, kBytes);
  EXPECT_TRUE(intact_a && intact_b) << "a byte was lost, duplicated or reordered";
  EXPECT_GE(cycles, 20) << "the streams ended before the scaling could run";
  // Every scale-down finished: both sides are back to one channel, nothing half-drained.
  auto channels = [](Stack& st) { return st.driver().Channels().size(); };
  for (int i = 0; i < 300 && (channels(*a) != 1 || channels(*b) != 1); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_EQ(channels(*a), 1u);
  EXPECT_EQ(channels(*b), 1u);
  EXPECT_GE(a->Stats().channels_scaled_up, static_cast<uint64_t>(cycles));
  EXPECT_GT(a->Stats().channels_drained + b->Stats().channels_drained, 0u);
  EXPECT_EQ(a->Stats().conns_broken, 0u);
  EXPECT_EQ(b->Stats().conns_broken, 0u);
}

// Dynamic scaling: with scale=on, a busy peer gets more channels within a second, an idle one
// goes back to scale_min; every change drains, so the checked stream loses nothing.
TEST(VnsScalingTest, ChannelsFollowTheLoadWithinASecond) {
  StackOptions o;
  o.driver = "loopback";
  o.driver_opts.loopback_ipv4 = kA;
  o.driver_opts.engines = 1;
  o.policy_knobs = {{"scale", "on"},
                    {"scale_max", "3"},
                    {"scale_hold_ms", "200"},
                    {"scale_grow_queued_bytes", "4096"},
                    {"scale_grow_busy", "0.05"},
                    {"scale_shrink_busy", "0.05"}};
  auto sa = Stack::Create(o);
  ASSERT_TRUE(sa.ok()) << sa.status();
  auto& a = *sa;
  auto b = MakeStack(kB, 1);
  ASSERT_TRUE(b);
  auto [c, s] = Connected(*a, *b, 91);
  ASSERT_TRUE(c && s);
  auto live = [&] { return a->driver().Channels().size(); };
  EXPECT_EQ(live(), 1u);
  std::atomic<bool> stop{false};
  uint64_t sent = 0, got = 0;
  bool intact = true;
  std::thread writer([&] {
    std::vector<uint8_t> buf(64 << 10);
    while (!stop.load()) {
      for (size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<uint8_t>((sent + i) % 251);
      auto r = c->Send(buf);
      ASSERT_TRUE(r.ok()) << r.status();
      sent += *r;
    }
    ASSERT_TRUE(c->Shutdown().ok());
  });
  std::thread reader([&] {
    std::vector<uint8_t> buf(64 << 10);
    for (;;) {
      auto n = s->Recv(buf);
      ASSERT_TRUE(n.ok()) << n.status();
      if (*n == 0) break;
      for (size_t i = 0; i < *n && intact; ++i) intact = buf[i] == (got + i) % 251;
      got += *n;
    }
  });
  // The control loop reacts in about 0.3 s here (hold 200 ms, 100 ms ticks, a channel
  // handshake). How fast is a benchmark's question (bench/run-scaling); this bound only says it
  // reacts at all, with room for a loaded CI machine and sanitizers (a 1 s bound failed once at
  // 1.09 s with two tests at once on two cores; under TSan beside the hundred-cycles test the
  // wait gave up at 3 s while the bound it checked was 6).
  const double bound_s = kSanitized ? 10.0 : 3.0;
  const uint64_t start = chan::NowUs();
  while (live() < 2 && chan::NowUs() - start < bound_s * 1e6)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  const double grew_s = (chan::NowUs() - start) / 1e6;
  EXPECT_GE(live(), 2u) << "scaling up took longer than " << bound_s << " s";
  std::printf("scaling up took %.3f s\n", grew_s);
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  stop = true;
  writer.join();
  reader.join();
  EXPECT_EQ(got, sent);
  EXPECT_TRUE(intact);
  const uint64_t idle = chan::NowUs();
  while (live() > 1 && chan::NowUs() - idle < 5'000'000)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_EQ(live(), 1u) << "back to scale_min once idle";
  EXPECT_GE(a->Stats().channels_scaled_up, 1u);
}

// The NetScheduler policy swapped again and again while a stream runs over four channels: VNS
// orders by its own offsets, so no byte is lost or reordered, and each policy made decisions.
TEST(VnsPolicyTest, SwappingThePolicyMidStreamLosesAndReordersNothing) {
  auto a = MakeStack(kA, 4), b = MakeStack(kB, 4);
  ASSERT_TRUE(a && b);
  auto l = b->Listen(90);
  ASSERT_TRUE(l.ok());
  auto c = a->Connect(kB, 90);
  ASSERT_TRUE(c.ok()) << c.status();
  auto s = (*l)->Accept();
  ASSERT_TRUE(s.ok());
  constexpr uint64_t kBytes = 64 << 20;
  auto byte = [](uint64_t i) { return static_cast<uint8_t>(i * 7 + (i >> 11)); };
  std::atomic<bool> done{false};
  std::thread tx([&] {
    std::vector<uint8_t> buf(96 << 10);
    for (uint64_t off = 0; off < kBytes;) {
      const size_t n = std::min<uint64_t>(buf.size(), kBytes - off);
      for (size_t i = 0; i < n; ++i) buf[i] = byte(off + i);
      auto r = (*c)->Send({buf.data(), n});
      ASSERT_TRUE(r.ok()) << r.status();
      off += *r;
    }
    ASSERT_TRUE((*c)->Shutdown().ok());
  });
  std::thread flip([&] {
    const char* names[] = {"shortest-queue", "one-per-socket", "round-robin"};
    for (int i = 0; !done.load(); ++i) {
      std::vector<std::pair<std::string, std::string>> k;
      if (i % 3 == 2) k = {{"skip_queued_bytes", std::to_string(4096 << (i % 7))}};
      EXPECT_TRUE(a->SetPolicy(names[i % 3], k).ok());
      std::this_thread::sleep_for(std::chrono::microseconds(300));
    }
  });
  std::vector<uint8_t> buf(1 << 20);
  uint64_t got = 0, bad = 0;
  for (;;) {
    auto r = (*s)->Recv(buf);
    ASSERT_TRUE(r.ok()) << r.status();
    if (*r == 0) break;
    for (size_t i = 0; i < *r; ++i) bad += buf[i] != byte(got + i);
    got += *r;
  }
  done = true;
  tx.join();
  flip.join();
  EXPECT_EQ(got, kBytes);
  EXPECT_EQ(bad, 0u);
  EXPECT_GT(a->Stats().sched_batches, 0u);
}

// Busy-polled L-app sockets (run to completion) beside a T-app stream on the same channels: the
// rpc's segments are taken on the application's own thread (segments_inline), the stream's
// segments that a polling socket dequeues are handed to the dispatcher in order, and both arrive
// byte-exact; the same channels keep serving a socket that does not poll after the pollers stop.
TEST(VnsBusyPollTest, PolledRpcBesideAStreamOnSharedChannelsLosesNothing) {
  auto a = MakeStack(kA, 2), b = MakeStack(kB, 2);
  ASSERT_TRUE(a && b);
  for (Stack* s : {a.get(), b.get()})
    ASSERT_TRUE(s->SetPolicy("round-robin", {{"busy_poll_us", "300"}}).ok());
  const RpcBesideStream r = RunRpcBesideStream(*a, *b, kB, 91, 3000, 32 << 20);
  EXPECT_TRUE(r.ok) << r.error;
  EXPECT_EQ(r.rpc_wrong_bytes, 0u);
  EXPECT_EQ(r.stream_bad_bytes, 0u);
  EXPECT_GT(a->Stats().segments_inline, 0u) << "the client took responses on its own thread";
  EXPECT_GT(b->Stats().segments_inline, 0u) << "the server took requests on its own thread";
}

// A busy-polled reader renews its lease on its lanes with every spin: the dispatcher, which leaves
// those lanes to it, sleeps until the reader stops (chan::StandbyTimer) instead of looking again
// every lease plus kStandDownRecheckUs — each such wakeup pre-empted a spinner on a shared core.
TEST(VnsBusyPollTest, TheDispatcherSleepsWhileABusyPolledReaderSpins) {
  auto a = MakeStack(kA, 1), b = MakeStack(kB, 1);
  ASSERT_TRUE(a && b);
  auto [c, s] = Connected(*a, *b, 94);
  ASSERT_TRUE(c && s);
  // A 10 ms budget: a reader pre-empted for longer ends its spin and wakes the dispatcher (as it
  // should), which on a loaded machine (a sanitizer, a parallel test run) a 2 ms one did dozens
  // of times here.
  s->SetBusyPoll(10'000);
  constexpr int kMessages = 1500;
  std::atomic<int> got{0};
  std::atomic<uint64_t> wakeups_at_100{0}, wakeups_at_1400{0};
  std::thread reader([&] {
    std::vector<uint8_t> buf(64);
    for (size_t have = 0; have < kMessages * buf.size();) {
      auto r = s->Recv(buf);
      if (!r.ok() || *r == 0) return;
      have += *r;
      got = static_cast<int>(have / buf.size());
    }
  });
  // A message every 100-400 µs: the reader's spin always outlasts the gap.
  const std::vector<uint8_t> msg(64, 0x42);
  for (int i = 0; i < kMessages; ++i) {
    ASSERT_EQ(*c->Send(msg), msg.size());
    if (i == 100) wakeups_at_100 = b->Stats().dispatcher_wakeups;
    if (i == 1400) wakeups_at_1400 = b->Stats().dispatcher_wakeups;
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
  reader.join();
  EXPECT_EQ(got.load(), kMessages);
  // 1,300 messages, 130-500 ms: a sleep per lease (10 ms) plus the recheck (2 ms) was 11-40.
  EXPECT_LE(wakeups_at_1400 - wakeups_at_100, 8u) << "the dispatcher kept waking beside the poller";
}

// The cores a thread may run on, from the kernel.
std::vector<int> Affinity(pid_t tid) {
  cpu_set_t set;
  CPU_ZERO(&set);
  std::vector<int> out;
  if (sched_getaffinity(tid, sizeof(set), &set) != 0) return out;
  for (int c = 0; c < CPU_SETSIZE; ++c)
    if (CPU_ISSET(c, &set)) out.push_back(c);
  return out;
}

// Thread ids of this process's threads with a name starting with `prefix`.
std::vector<pid_t> ThreadsNamed(const std::string& prefix) {
  std::vector<pid_t> out;
  for (const auto& e : std::filesystem::directory_iterator("/proc/self/task")) {
    std::ifstream f(e.path() / "comm");
    std::string name;
    std::getline(f, name);
    if (name.rfind(prefix, 0) == 0) out.push_back(std::stoi(e.path().filename().string()));
  }
  return out;
}

// isolate-classes pins copy workers off the core of the L-app engine (engine 0); another policy
// unpins them again, and so does a resize under it.
TEST(VnsPlacementTest, CopyWorkersStayOffTheLatencyEnginesCore) {
  const int cpus = static_cast<int>(sysconf(_SC_NPROCESSORS_ONLN));
  if (cpus < 2) GTEST_SKIP() << "one core: nothing to keep apart";
  StackOptions o;
  o.driver = "loopback";
  o.driver_opts.loopback_ipv4 = kA;
  o.driver_opts.engines = 1;
  o.driver_opts.cores = {1};
  o.copy_workers = 3;
  o.policy = "isolate-classes";
  auto s = Stack::Create(o);
  ASSERT_TRUE(s.ok()) << s.status();
  const std::vector<int> cores = (*s)->copy_worker_cores();
  ASSERT_EQ(cores.size(), 3u);
  for (int c : cores) {
    EXPECT_GE(c, 0);
    EXPECT_NE(c, 1) << "a copy worker on the L-app engine's core";
  }
  const auto workers = ThreadsNamed("netch-copy");
  ASSERT_EQ(workers.size(), 3u);
  for (pid_t t : workers) {
    const auto a = Affinity(t);
    ASSERT_EQ(a.size(), 1u) << "pinned to one core";
    EXPECT_NE(a[0], 1);
  }
  ASSERT_TRUE((*s)->SetPolicy("round-robin", {}).ok());
  for (int c : (*s)->copy_worker_cores()) EXPECT_EQ(c, -1);
  for (pid_t t : ThreadsNamed("netch-copy")) EXPECT_GT(Affinity(t).size(), 1u) << "unpinned";
  ASSERT_TRUE((*s)->SetPolicy("isolate-classes", {}).ok());
  ASSERT_TRUE((*s)->SetCopyWorkers(4).ok());
  for (int c : (*s)->copy_worker_cores()) EXPECT_NE(c, 1);
  EXPECT_EQ((*s)->copy_worker_cores().size(), 4u);
}

// An event loop that busy-polls the stack (Stack::PollInline, what `netchrun --busy-poll-us`
// does in epoll_wait): a server thread serving eight non-blocking sockets with poll(…, 0) and
// inline engine and dispatcher rounds, never sleeping, echoes every byte; the dispatcher rounds
// ran on its thread; afterwards the stack's own threads serve the same sockets again.
// Reads exactly b.size() bytes from a nonblocking socket, waiting at most `seconds` in all.
std::string ReadWithin(VirtualSocket& s, std::span<uint8_t> b, int seconds) {
  const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(seconds);
  for (size_t got = 0; got < b.size();) {
    if (std::chrono::steady_clock::now() > end)
      return "only " + std::to_string(got) + " bytes within the bound";
    auto r = s.Recv(b.subspan(got));
    if (r.ok() && *r == 0) return "end of stream";
    if (r.ok()) {
      got += *r;
      continue;
    }
    if (s.Error() != 0 || r.status().message().find("no data") == std::string::npos)
      return r.status().ToString();
    pollfd p{s.fd(), POLLIN, 0};
    poll(&p, 1, 10);
  }
  return "";
}

// A nonblocking busy-polled socket belongs to an event loop: its writes leave in the loop's next
// stack poll (one round for the whole pass), not in a round of their own — and still leave when
// the loop stops polling without saying so.
TEST(VnsBusyPollTest, ANonblockingBusyPolledSocketsWritesLeaveWithTheLoopsNextPoll) {
  auto a = MakeStack(kA, 1), b = MakeStack(kB, 1);
  ASSERT_TRUE(a && b);
  auto [c, s] = Connected(*a, *b, 93);
  ASSERT_TRUE(c && s);
  c->SetNonBlocking(true);
  s->SetNonBlocking(true);
  s->SetBusyPoll(200);
  std::vector<uint8_t> req(300), resp(300);
  for (int i = 0; i < 200; ++i) {
    for (size_t k = 0; k < req.size(); ++k) req[k] = static_cast<uint8_t>(i * 7 + k);
    ASSERT_EQ(*c->Send(req), req.size());
    // The loop: poll the stack until the request is in, answer, poll again (the answer leaves).
    std::vector<uint8_t> got(req.size());
    size_t have = 0;
    for (int spins = 0; have < got.size(); ++spins) {
      ASSERT_LT(spins, 2'000'000) << "request " << i << " never arrived";
      b->PollInline(200);
      if (auto r = s->Recv(std::span(got).subspan(have)); r.ok()) have += *r;
    }
    ASSERT_EQ(got, req);
    for (auto& x : got) x ^= 0x5a;
    ASSERT_EQ(*s->Send(got), got.size());
    b->PollInline(200);
    ASSERT_EQ(ReadWithin(*c, resp, 10), "") << "response " << i;
    ASSERT_EQ(resp, got);
  }
  // The loop polls, writes, and then never polls again nor ends its poll (the engine is stood
  // down and the write did not wake it): the engine takes over once the loop's lease is over.
  std::vector<uint8_t> last(5000, 0x33), in(5000);
  b->PollInline(200);
  ASSERT_EQ(*s->Send(last), last.size());
  EXPECT_EQ(ReadWithin(*c, in, 10), "");
  EXPECT_EQ(in, last);
  b->EndPollInline();
}

TEST(VnsBusyPollTest, AnEventLoopPollingTheStackInlineServesManySockets) {
  auto a = MakeStack(kA, 2), b = MakeStack(kB, 2);
  ASSERT_TRUE(a && b);
  auto l = b->Listen(92, 16);
  ASSERT_TRUE(l.ok());
  constexpr int kSocks = 8;
  std::vector<std::unique_ptr<VirtualSocket>> cs, ss;
  for (int i = 0; i < kSocks; ++i) {
    auto c = a->Connect(kB, 92);
    ASSERT_TRUE(c.ok()) << c.status();
    cs.push_back(std::move(*c));
    auto s = (*l)->Accept();
    ASSERT_TRUE(s.ok());
    (*s)->SetNonBlocking(true);
    ss.push_back(std::move(*s));
  }
  constexpr size_t kPerSock = 2 << 20;
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> echoed{0};
  std::thread loop([&] {
    std::vector<uint8_t> buf(64 << 10);
    std::vector<pollfd> fds(kSocks);
    while (!stop.load()) {
      b->PollInline(200);
      for (int i = 0; i < kSocks; ++i) fds[i] = {ss[i]->fd(), POLLIN, 0};
      if (poll(fds.data(), fds.size(), 0) <= 0) continue;
      for (int i = 0; i < kSocks; ++i) {
        if (!(fds[i].revents & POLLIN)) continue;
        auto r = ss[i]->Recv(buf);
        if (!r.ok() || *r == 0) continue;
        for (size_t off = 0; off < *r;) {  // echo back (blocking sends are fine here)
          ss[i]->SetNonBlocking(false);
          auto w = ss[i]->Send({buf.data() + off, *r - off});
          ss[i]->SetNonBlocking(true);
          if (!w.ok()) return;
          off += *w;
        }
        echoed += *r;
      }
    }
    b->EndPollInline();
  });
  std::vector<std::thread> clients;
  std::atomic<int> bad{0};
  for (int i = 0; i < kSocks; ++i) {
    clients.emplace_back([&, i] {
      std::vector<uint8_t> out(kPerSock), in(kPerSock);
      for (size_t k = 0; k < kPerSock; ++k) out[k] = static_cast<uint8_t>(k * (i + 3));
      std::thread w([&] {
        for (size_t off = 0; off < kPerSock;) {
          auto r = cs[i]->Send({out.data() + off, std::min<size_t>(32 << 10, kPerSock - off)});
          if (!r.ok()) return;
          off += *r;
        }
      });
      const std::string e = ReadFull(*cs[i], in);
      w.join();
      if (!e.empty() || in != out) bad++;
    });
  }
  for (auto& t : clients) t.join();
  stop = true;
  loop.join();
  EXPECT_EQ(bad.load(), 0);
  EXPECT_EQ(echoed.load(), kSocks * kPerSock);
  EXPECT_GT(b->Stats().dispatch_inline, 0u) << "the event loop ran dispatcher rounds itself";
  // The loop stopped polling: the stack's threads deliver again.
  std::vector<uint8_t> m(1000, 9), got(1000);
  ss[0]->SetNonBlocking(false);
  ASSERT_EQ(*cs[0]->Send(m), m.size());
  EXPECT_EQ(ReadFull(*ss[0], got), "");
  EXPECT_EQ(got, m);
}

}  // namespace
}  // namespace netch::vns
