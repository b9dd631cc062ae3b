// Virtual sockets end to end between two veth test hosts (AF_XDP driver unless stated).
#include "vns_lib/vns.h"

#include <net/if.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "afxdp_channels/engine.h"
#include "bpf/steer_program.h"
#include "common/netns.h"
#include "gtest/gtest.h"
#include "test/support/peer_process.h"
#include "test/support/privilege.h"
#include "test/support/testhosts.h"
#include "test/support/vns_traffic.h"
#include "tools/chan_transfer.h"
#include "vns_lib/stack_impl.h"

#if defined(__SANITIZE_THREAD__)
// TSan resets the shadow of a mapping below this size by writing it (resident memory several
// times the mapping's), larger ones by remapping it (nothing resident): with its default,
// IdleConnectionsCostLittleMemory measures TSan's shadow (102 MB for 400 sockets, 27 MB with
// this). The option changes how shadow is cleared, not what TSan checks.
extern "C" const char* __tsan_default_options() { return "clear_shadow_mmap_threshold=16384"; }
#endif

namespace netch::vns {
namespace {

using testing::TestHosts;

// Byte i of stream `id`: cheap to generate and to check, different for every stream and offset.
uint8_t PatternByte(uint32_t id, uint64_t i) {
  return static_cast<uint8_t>((i * 2654435761u) >> 13 ^ id * 97 ^ i);
}

class VnsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    NETCH_REQUIRE_ROOT();
    ASSERT_TRUE(hosts_.Up(testing::StackHostsOptions()).ok());
  }

  static StackOptions Opts(const std::string& ns, const char* dev, const std::string& driver,
                           int channels) {
    StackOptions o;
    o.driver = driver;
    o.driver_opts.netns = ns;
    o.driver_opts.ifname = dev;
    o.driver_opts.engines = 2;
    o.driver_opts.dead_peer_timeout = absl::Seconds(1);
    o.channels_per_peer = channels;
    return o;
  }

  // Both stacks, with Opts changed by `tweak` (the same for both hosts).
  void OpenWith(const std::string& driver, int channels,
                const std::function<void(StackOptions&)>& tweak) {
    StackOptions oa = Opts(hosts_.ns_a(), TestHosts::kDevA, driver, channels);
    StackOptions ob = Opts(hosts_.ns_b(), TestHosts::kDevB, driver, channels);
    tweak(oa);
    tweak(ob);
    auto a = Stack::Create(oa);
    ASSERT_TRUE(a.ok()) << a.status();
    a_ = std::move(*a);
    auto b = Stack::Create(ob);
    ASSERT_TRUE(b.ok()) << b.status();
    b_ = std::move(*b);
  }

  void Open(const std::string& driver = "afxdp", int channels = 2, int copy_workers = 0) {
    OpenWith(driver, channels, [](StackOptions&) {});
    if (HasFatalFailure()) return;
    ASSERT_TRUE(a_->SetCopyWorkers(copy_workers).ok());
    ASSERT_TRUE(b_->SetCopyWorkers(copy_workers).ok());
  }

  // Host B runs a stack; host A only a bare driver with one channel to B, over which a test
  // speaks the virtual-socket protocol by hand (a peer that may misbehave).
  void OpenStackBesideBarePeer() {
    auto b = Stack::Create(Opts(hosts_.ns_b(), TestHosts::kDevB, "afxdp", 1));
    ASSERT_TRUE(b.ok()) << b.status();
    b_ = std::move(*b);
    chan::DriverOptions ao = Opts(hosts_.ns_a(), TestHosts::kDevA, "afxdp", 1).driver_opts;
    ao.accept = false;
    auto a = tools::OpenChanHost("afxdp", ao);
    ASSERT_TRUE(a.ok()) << a.status();
    bare_ = std::move(*a);
    chan::ChannelParams cp;
    cp.peer_ipv4 = TestHosts::kIpB;
    auto ch = bare_->driver->Connect(cp);
    ASSERT_TRUE(ch.ok()) << ch.status();
    bare_chan_ = std::move(*ch);
  }

  // Both hosts with a steering program of the test's own (fault injection through
  // SetChannelDropPpm) and a stack of `channels` channels per peer: a_, b_, steer_.
  void OpenSteered(int channels, const std::string& policy = "") {
    const std::string ns[2] = {hosts_.ns_a(), hosts_.ns_b()};
    const char* dev[2] = {TestHosts::kDevA, TestHosts::kDevB};
    std::unique_ptr<Stack>* stack[2] = {&a_, &b_};
    for (int h = 0; h < 2; ++h) {
      {
        NetnsScope scope(ns[h]);
        auto p = bpf::SteerProgram::Load();
        ASSERT_TRUE(p.ok()) << p.status();
        ASSERT_TRUE((*p)->Attach(if_nametoindex(dev[h]), bpf::AttachMode::kNative).ok());
        steer_[h] = std::move(*p);
      }
      StackOptions o = Opts(ns[h], dev[h], "afxdp", channels);
      o.driver_opts.steer = steer_[h].get();
      if (!policy.empty()) o.policy = policy;
      auto st = Stack::Create(o);
      ASSERT_TRUE(st.ok()) << st.status();
      *stack[h] = std::move(*st);
    }
  }

  void TearDown() override {
    if (bare_chan_) (void)bare_->driver->Destroy(*bare_chan_);
    bare_chan_.reset();
    bare_.reset();
    a_.reset();
    b_.reset();
  }

  // A connection from host A to `l`, listening on `port` of host B: {client, accepted end}, or
  // nulls (and a test failure) if either end fails.
  std::pair<std::unique_ptr<VirtualSocket>, std::unique_ptr<VirtualSocket>> Pair(VirtualSocket& l,
                                                                                 uint16_t port) {
    auto c = a_->Connect(TestHosts::kIpB, port);
    if (!c.ok()) {
      ADD_FAILURE() << "connect: " << c.status();
      return {};
    }
    auto s = l.Accept();
    if (!s.ok()) {
      ADD_FAILURE() << "accept: " << s.status();
      return {};
    }
    return {std::move(*c), std::move(*s)};
  }

  // Sends `bytes` of stream `id` in writes of `chunk`, then shuts down.
  static void SendStream(VirtualSocket& s, uint32_t id, uint64_t bytes, size_t chunk,
                         absl::Status* result) {
    std::vector<uint8_t> buf(chunk);
    for (uint64_t off = 0; off < bytes;) {
      const size_t n = std::min<uint64_t>(chunk, bytes - off);
      for (size_t i = 0; i < n; ++i) buf[i] = PatternByte(id, off + i);
      auto r = s.Send({buf.data(), n});
      if (!r.ok()) {
        *result = r.status();
        return;
      }
      off += *r;
    }
    *result = s.Shutdown();
  }

  // Reads stream `id` to its end; returns bytes read, counts mismatches.
  static uint64_t RecvStream(VirtualSocket& s, uint32_t id, size_t chunk, uint64_t* bad,
                             absl::Status* err) {
    std::vector<uint8_t> buf(chunk);
    uint64_t off = 0;
    for (;;) {
      auto r = s.Recv(buf);
      if (!r.ok()) {
        *err = r.status();
        return off;
      }
      if (*r == 0) return off;
      for (size_t i = 0; i < *r; ++i) *bad += buf[i] != PatternByte(id, off + i);
      off += *r;
    }
  }

  // Checked streams both ways at once over one connection: c → s (stream 1) and s → c (stream
  // 2), each `bytes` long in 256 KB writes. done() once c has read all of stream 2.
  class BothWays {
   public:
    BothWays(VirtualSocket& c, VirtualSocket& s, uint64_t bytes) : bytes_(bytes) {
      // (The sockets outlive this object; `bytes` does not: the threads read bytes_.)
      threads_.emplace_back([this, &c] { SendStream(c, 1, bytes_, kChunk, &sent_ab_); });
      threads_.emplace_back([this, &s] { SendStream(s, 2, bytes_, kChunk, &sent_ba_); });
      threads_.emplace_back([this, &s] { got_ab_ = RecvStream(s, 1, kChunk, &bad_ab_, &err_ab_); });
      threads_.emplace_back([this, &c] {
        got_ba_ = RecvStream(c, 2, kChunk, &bad_ba_, &err_ba_);
        done_ = true;
      });
    }
    bool done() const { return done_.load(); }
    // Joins, then expects every byte sent, received and intact, both ways.
    void ExpectIntact() {
      for (auto& t : threads_) t.join();
      threads_.clear();
      EXPECT_TRUE(sent_ab_.ok() && sent_ba_.ok()) << sent_ab_ << " " << sent_ba_;
      EXPECT_TRUE(err_ab_.ok() && err_ba_.ok()) << err_ab_ << " " << err_ba_;
      EXPECT_EQ(got_ab_, bytes_);
      EXPECT_EQ(got_ba_, bytes_);
      EXPECT_EQ(bad_ab_ + bad_ba_, 0u);
    }
    ~BothWays() {
      for (auto& t : threads_) t.join();
    }

   private:
    static constexpr size_t kChunk = 256 << 10;
    const uint64_t bytes_;
    absl::Status sent_ab_, sent_ba_, err_ab_, err_ba_;
    uint64_t bad_ab_ = 0, bad_ba_ = 0, got_ab_ = 0, got_ba_ = 0;
    std::atomic<bool> done_{false};
    std::vector<std::thread> threads_;
  };

  TestHosts hosts_;
  std::unique_ptr<bpf::SteerProgram> steer_[2];  // declared first: outlives the stacks
  std::unique_ptr<Stack> a_, b_;
  std::unique_ptr<tools::ChanHost> bare_;
  std::shared_ptr<chan::Channel> bare_chan_;
};

TEST_F(VnsTest, StreamOverFourChannelsArrivesInOrderAndUsesEveryChannel) {
  Open("afxdp", 4, 2);
  auto l = b_->Listen(5001);
  ASSERT_TRUE(l.ok()) << l.status();
  auto c = a_->Connect(TestHosts::kIpB, 5001);
  ASSERT_TRUE(c.ok()) << c.status();
  auto s = (*l)->Accept();
  ASSERT_TRUE(s.ok()) << s.status();
  constexpr uint64_t kBytes = 256ull << 20;
  absl::Status sent;
  std::thread tx([&] { SendStream(**c, 1, kBytes, 1 << 20, &sent); });
  uint64_t bad = 0;
  absl::Status err;
  const uint64_t got = RecvStream(**s, 1, 1 << 20, &bad, &err);
  tx.join();
  EXPECT_TRUE(sent.ok()) << sent;
  EXPECT_TRUE(err.ok()) << err;
  EXPECT_EQ(got, kBytes);
  EXPECT_EQ(bad, 0u);
  const auto chans = a_->driver().Channels();
  ASSERT_EQ(chans.size(), 4u);
  for (const auto& ch : chans)
    EXPECT_GT(ch->stats().tx_bytes, kBytes / 8) << "channel " << ch->id() << " carried little";
  EXPECT_GT(a_->Stats().copy_chunks + b_->Stats().copy_chunks, 0u) << "copy workers took part";
  EXPECT_GT(b_->Stats().deliveries_inline, 0u) << "the receiver's engines delivered themselves";
}

// Channel scaling over AF_XDP: 100 scale-up/down cycles (1 -> 3 -> 1 channels) while checked
// streams run both ways; every scale-down drains (NC_DRAIN on both sides) so nothing is lost,
// and both hosts end with one channel.
TEST_F(VnsTest, HundredScaleCyclesDuringCheckedStreamsLoseNothing) {
  Open("afxdp", 1);
  auto l = b_->Listen(5010);
  ASSERT_TRUE(l.ok()) << l.status();
  auto c = a_->Connect(TestHosts::kIpB, 5010);
  ASSERT_TRUE(c.ok()) << c.status();
  auto s = (*l)->Accept();
  ASSERT_TRUE(s.ok()) << s.status();
  constexpr uint64_t kBytes = 512ull << 20;
  BothWays streams(**c, **s, kBytes);
  // Counted are cycles whose scale-up opened channels: one that comes before the dispatcher has
  // begun the last scale-down finds three live channels and opens none (9 of 100 did under TSan
  // in CI), and does not count as a cycle.
  int cycles = 0;
  for (int tries = 0; cycles < 100 && tries < 300 && !streams.done(); ++tries) {
    const uint64_t opened = a_->Stats().channels_scaled_up;
    ASSERT_TRUE(a_->SetPeerChannels(TestHosts::kIpB, 3).ok());
    cycles += a_->Stats().channels_scaled_up > opened;
    std::this_thread::sleep_for(std::chrono::milliseconds(3));
    ASSERT_TRUE(a_->SetPeerChannels(TestHosts::kIpB, 1).ok());
    std::this_thread::sleep_for(std::chrono::milliseconds(3));
  }
  streams.ExpectIntact();
  EXPECT_GE(cycles, 20) << "the streams ended before the scaling could run";
  auto count = [](Stack& st) { return st.driver().Channels().size(); };
  for (int i = 0; i < 300 && (count(*a_) != 1 || count(*b_) != 1); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_EQ(count(*a_), 1u);
  EXPECT_EQ(count(*b_), 1u);
  EXPECT_EQ(a_->Stats().conns_broken + b_->Stats().conns_broken, 0u);
}

// isolate-classes places the L-app channel on a queue and an engine of its own (4 queues, 2
// engines): bulk channels are never run by the L-app channel's engine on this host.
TEST_F(VnsTest, IsolateClassesRunsTheLatencyChannelOnItsOwnQueueAndEngine) {
  StackOptions oa = Opts(hosts_.ns_a(), TestHosts::kDevA, "afxdp", 4);
  oa.policy = "isolate-classes";
  auto a = Stack::Create(oa);
  ASSERT_TRUE(a.ok()) << a.status();
  a_ = std::move(*a);
  StackOptions ob = Opts(hosts_.ns_b(), TestHosts::kDevB, "afxdp", 4);
  ob.policy = "isolate-classes";
  auto b = Stack::Create(ob);
  ASSERT_TRUE(b.ok()) << b.status();
  b_ = std::move(*b);
  auto l = b_->Listen(5011);
  ASSERT_TRUE(l.ok());
  auto c = a_->Connect(TestHosts::kIpB, 5011);
  ASSERT_TRUE(c.ok()) << c.status();
  auto chans = a_->driver().Channels();
  ASSERT_EQ(chans.size(), 4u);
  std::sort(chans.begin(), chans.end(),
            [](const auto& x, const auto& y) { return x->id() < y->id(); });
  const auto first = chans[0]->stats();
  EXPECT_EQ(first.queue, 0);
  EXPECT_EQ(first.engine, 0);
  for (size_t i = 1; i < chans.size(); ++i) {
    const auto st = chans[i]->stats();
    EXPECT_NE(st.queue, 0) << "channel " << chans[i]->id();
    EXPECT_EQ(st.engine, 1) << "channel " << chans[i]->id();
  }
  // The accepting host places them the same way: queue 0 (the L-app channel's) alone on engine
  // 0, the bulk queues on engine 1 (the driver alone would put queue 2 on engine 0 as well).
  const uint64_t t0 = chan::NowUs();
  auto placed = [&] {
    auto bc = b_->driver().Channels();
    if (bc.size() != 4u) return false;
    for (const auto& ch : bc) {
      const auto st = ch->stats();
      if (st.engine != (st.queue == 0 ? 0 : 1)) return false;
    }
    return true;
  };
  while (!placed() && chan::NowUs() - t0 < 3'000'000) usleep(10'000);
  for (const auto& ch : b_->driver().Channels()) {
    const auto st = ch->stats();
    EXPECT_EQ(st.engine, st.queue == 0 ? 0 : 1) << "accepted channel on queue " << st.queue;
  }
}

// Busy-polled L-app sockets over AF_XDP (run to completion): with isolate-classes the rpc's
// channel has its own queue and engine, and each side's application thread runs that engine's
// rounds and takes its own segments; a T-app stream runs on the other channels meanwhile. Both
// intact, and the rpc's segments were taken on the application threads.
TEST_F(VnsTest, BusyPolledLatencyRpcRunsToCompletionBesideAStream) {
  OpenWith("afxdp", 4, [](StackOptions& o) {
    o.policy = "isolate-classes";
    o.policy_knobs = {{"busy_poll_us", "200"}};
  });
  ASSERT_FALSE(HasFatalFailure());
  const RpcBesideStream r = RunRpcBesideStream(*a_, *b_, TestHosts::kIpB, 5012, 3000, 64 << 20);
  EXPECT_TRUE(r.ok) << r.error;
  EXPECT_EQ(r.rpc_wrong_bytes, 0u);
  EXPECT_EQ(r.stream_bad_bytes, 0u);
  EXPECT_GT(a_->Stats().segments_inline, 0u) << "the client took responses on its own thread";
  EXPECT_GT(b_->Stats().segments_inline, 0u) << "the server took requests on its own thread";
}

uint64_t LoanRounds(Stack& s) {
  uint64_t n = 0;
  for (const auto& e : s.driver().Engines()) n += e.loan_rounds;
  return n;
}

TEST_F(VnsTest, BlockedReceiversRunTheirEnginesRoundsBesideAStreamAndLoseNothing) {
  // Blocking sockets only (no busy polling): every Recv that waits borrows its engines' input
  // and runs their rounds when the reply arrives — beside a stream whose traffic shares those
  // engines and wakes the borrowers for segments that are not theirs.
  Open("afxdp", 2);
  const RpcBesideStream r = RunRpcBesideStream(*a_, *b_, TestHosts::kIpB, 5013, 2000, 64 << 20);
  EXPECT_TRUE(r.ok) << r.error;
  EXPECT_EQ(r.rpc_wrong_bytes, 0u);
  EXPECT_EQ(r.stream_bad_bytes, 0u);
  EXPECT_GT(LoanRounds(*a_), 0u) << "the client never took a reply on its own thread";
  EXPECT_GT(LoanRounds(*b_), 0u) << "the server never took a request on its own thread";
  EXPECT_EQ(a_->Stats().segments_inline, 0u) << "nothing busy-polls here";
}

// `rounds` request/response exchanges of `size` bytes from `client` to `server` (a thread that
// answers each request with every byte xor 0x5a): "" or the first thing that went wrong.
std::string RpcExchanges(VirtualSocket& client, VirtualSocket& server, int rounds, size_t size) {
  std::thread srv([&] {
    std::vector<uint8_t> m(size);
    for (int i = 0; i < rounds; ++i) {
      // (A failure ends the client's wait too: it reads the end of the stream.)
      if (!ReadFull(server, m).empty()) return (void)server.Shutdown();
      for (auto& x : m) x ^= 0x5a;
      if (!server.Send(m).ok()) return (void)server.Shutdown();
    }
  });
  std::string err;
  std::vector<uint8_t> req(size), resp(size);
  for (int i = 0; i < rounds && err.empty(); ++i) {
    for (size_t k = 0; k < size; ++k) req[k] = PatternByte(i, k);
    if (auto r = client.Send(req); !r.ok() || *r != size) {
      err = absl::StrFormat("request %d not taken whole", i);
    } else if (err = ReadFull(client, resp); err.empty()) {
      for (size_t k = 0; k < size && err.empty(); ++k)
        if (resp[k] != (req[k] ^ 0x5a)) err = absl::StrFormat("reply %d byte %u wrong", i, k);
    }
  }
  if (!err.empty()) (void)client.Shutdown();  // the server's next read ends
  srv.join();
  return err;
}

uint64_t InlineRounds(Stack& s) {
  uint64_t n = 0;
  for (const auto& e : s.driver().Engines()) n += e.inline_rounds;
  return n;
}

TEST_F(VnsTest, ARequestsCorkedTailLeavesOnTheWaitingReadersOwnThread) {
  // A blocking request of a segment and a half: the full segment leaves in the writer's own
  // round (the engine sleeps: spin 0, its input loaned to the reader), the half is held open for
  // coalescing until the writer waits for the reply. That flush must leave the same way — in a
  // round on the waiting reader's thread — not on an engine wakeup after the first segment has
  // already woken the peer (the peer then sleeps again on half a request).
  OpenWith("afxdp", 1, [](StackOptions& o) {
    o.driver_opts.engines = 1;
    o.driver_opts.spin = absl::ZeroDuration();
  });
  ASSERT_FALSE(HasFatalFailure());
  auto l = b_->Listen(5019);
  ASSERT_TRUE(l.ok()) << l.status();
  auto [c, s] = Pair(**l, 5019);
  ASSERT_TRUE(c && s);
  constexpr int kRounds = 200;
  constexpr size_t kMsg = 5000;  // MTU 3506: one full segment and a corked tail
  const uint64_t before = InlineRounds(*a_);
  ASSERT_EQ(RpcExchanges(*c, *s, kRounds, kMsg), "");
  // Two rounds per request on the client's thread (the write's, the flush's); with the flush on
  // an engine wakeup it is one (measured: 188-200 for 200 requests). Timers wake the engine now
  // and then and some flushes leave there: 274-400 measured with the flush in place, so the
  // line sits between the two at 1.25 per request (1.5 failed about half the runs).
  EXPECT_GE(InlineRounds(*a_) - before, kRounds * 5 / 4);
}

// The largest share of a socket's batches that went on one channel (-1: no such socket).
double TopChannelShare(Stack& s, uint16_t local_port, uint16_t remote_port) {
  for (const SocketInfo& i : s.Sockets()) {
    if (i.listening || i.local_port != local_port || i.remote_port != remote_port) continue;
    uint64_t all = i.batches_other, top = 0;
    for (const auto& [ch, n] : i.batches_by_channel) all += n, top = std::max(top, n);
    return all ? static_cast<double>(top) / static_cast<double>(all) : 0;
  }
  return -1;
}

TEST_F(VnsTest, AnRpcSpreadOverFourChannelsAnswersOnTheRequestsChannel) {
  // Round-robin over four channels: with reply affinity the server answers each request on the
  // channel it came on, and the client's next request follows the answer, so the pair settles
  // on one channel whose data carries its ACKs; without it, both ends take turns over all four.
  Open("afxdp", 4);
  auto l = b_->Listen(5020);
  ASSERT_TRUE(l.ok()) << l.status();
  for (const char* affinity : {"on", "off"}) {
    ASSERT_TRUE(a_->SetPolicy("round-robin", {{"reply_affinity", affinity}}).ok());
    ASSERT_TRUE(b_->SetPolicy("round-robin", {{"reply_affinity", affinity}}).ok());
    auto [c, s] = Pair(**l, 5020);
    ASSERT_TRUE(c && s);
    ASSERT_EQ(RpcExchanges(*c, *s, 200, 4096), "");
    const double client = TopChannelShare(*a_, c->local_port(), 5020);
    const double answers = TopChannelShare(*b_, 5020, c->local_port());
    if (std::string(affinity) == "on") {
      EXPECT_GE(client, 0.9) << "the client's requests kept to the answers' channel";
      EXPECT_GE(answers, 0.9) << "the server's answers went back on the requests' channel";
    } else {
      EXPECT_LE(client, 0.5) << "plain round-robin takes turns";
      EXPECT_LE(answers, 0.5);
    }
  }
}

TEST_F(VnsTest, EnginesDeliverDataWhileTheDispatcherIsInALongRound) {
  // The dispatcher's rounds serve every channel — a bulk stream's too, on a busy core. Engines
  // that handed it their segments whenever it was in a round made an RPC wait for that round
  // (isolate-classes' L-app p99.9 was milliseconds, docs/BENCHMARKS.md). Engines deliver data
  // themselves: with both dispatchers held for 3 s, as a long round holds them, 200 exchanges
  // finish long before the hold ends.
  OpenWith("afxdp", 2, [](StackOptions& o) {
    o.receive_inline = false;  // every delivery is an engine's (or the dispatcher's)
  });
  ASSERT_FALSE(HasFatalFailure());
  auto l = b_->Listen(5021);
  ASSERT_TRUE(l.ok()) << l.status();
  auto [c, s] = Pair(**l, 5021);
  ASSERT_TRUE(c && s);
  ASSERT_EQ(RpcExchanges(*c, *s, 20, 4096), "");  // the stacks have seen each channel deliver
  std::atomic<bool> held{false}, done{false};
  std::thread holder([&] {
    auto ha = static_cast<StackImpl&>(*a_).HoldDispatcherForTest();
    auto hb = static_cast<StackImpl&>(*b_).HoldDispatcherForTest();
    held = true;
    for (int i = 0; i < 300 && !done; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    held = false;
  });
  while (!held) std::this_thread::yield();
  const auto t0 = std::chrono::steady_clock::now();
  const std::string err = RpcExchanges(*c, *s, 200, 4096);
  const auto took = std::chrono::steady_clock::now() - t0;
  const bool still_held = held;
  done = true;
  holder.join();
  ASSERT_EQ(err, "");
  EXPECT_TRUE(still_held) << "the exchanges waited for the dispatchers";
  EXPECT_LT(took, std::chrono::milliseconds(2500));
}

TEST_F(VnsTest, WithoutReceiveInlineTheEnginesDeliverEverything) {
  OpenWith("afxdp", 2, [](StackOptions& o) { o.receive_inline = false; });
  ASSERT_FALSE(HasFatalFailure());
  const RpcBesideStream r = RunRpcBesideStream(*a_, *b_, TestHosts::kIpB, 5014, 500, 8 << 20);
  EXPECT_TRUE(r.ok) << r.error;
  EXPECT_EQ(r.rpc_wrong_bytes, 0u);
  EXPECT_EQ(LoanRounds(*a_) + LoanRounds(*b_), 0u);
}

TEST_F(VnsTest, HundredConcurrentSocketsWithMixedMessageSizes) {
  Open("afxdp", 2);
  auto l = b_->Listen(5002, 128);
  ASSERT_TRUE(l.ok());
  constexpr int kSockets = 100, kThreads = 10;
  constexpr uint64_t kPerSocket = 1 << 20;
  std::vector<std::unique_ptr<VirtualSocket>> clients(kSockets), servers;
  for (int i = 0; i < kSockets; ++i) {
    auto c = a_->Connect(TestHosts::kIpB, 5002);
    ASSERT_TRUE(c.ok()) << i << ": " << c.status();
    clients[i] = std::move(*c);
  }
  for (int i = 0; i < kSockets; ++i) {
    auto s = (*l)->Accept();
    ASSERT_TRUE(s.ok());
    servers.push_back(std::move(*s));
  }
  // Clients: each thread writes to its 10 sockets in turn, messages of 1 B .. 64 KB. The stream
  // id is the client's local port, which the server learns as the remote port.
  std::atomic<int> send_errors{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      std::vector<uint64_t> off(kSockets, 0);
      std::vector<uint8_t> buf(64 << 10);
      for (bool more = true; more;) {
        more = false;
        for (int i = t; i < kSockets; i += kThreads) {
          if (off[i] >= kPerSocket) continue;
          more = true;
          const size_t n = std::min<uint64_t>(1 + rng() % buf.size(), kPerSocket - off[i]);
          const uint32_t id = clients[i]->local_port();
          for (size_t k = 0; k < n; ++k) buf[k] = PatternByte(id, off[i] + k);
          auto r = clients[i]->Send({buf.data(), n});
          if (!r.ok()) {
            send_errors++;
            return;
          }
          off[i] += *r;
          if (off[i] == kPerSocket && !clients[i]->Shutdown().ok()) send_errors++;
        }
      }
    });
  }
  // Servers: each thread polls its 10 sockets with non-blocking reads of random sizes.
  std::atomic<uint64_t> total{0}, bad{0};
  std::atomic<int> recv_errors{0};
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(100 + t);
      std::vector<uint64_t> off(kSockets, 0);
      std::vector<bool> eof(kSockets, false);
      std::vector<uint8_t> buf(64 << 10);
      const uint64_t end = chan::NowUs() + 60'000'000;
      for (int open = kSockets / kThreads; open > 0 && chan::NowUs() < end;) {
        bool progress = false;
        for (int i = t; i < kSockets; i += kThreads) {
          if (eof[i]) continue;
          servers[i]->SetNonBlocking(true);
          auto r = servers[i]->Recv({buf.data(), 1 + rng() % buf.size()});
          if (!r.ok()) {
            if (Errno(r.status()) == EAGAIN) continue;
            recv_errors++;
            eof[i] = true;
            open--;
            continue;
          }
          progress = true;
          if (*r == 0) {
            eof[i] = true;
            open--;
            continue;
          }
          const uint32_t id = servers[i]->remote_port();
          for (size_t k = 0; k < *r; ++k) bad += buf[k] != PatternByte(id, off[i] + k);
          off[i] += *r;
          total += *r;
        }
        if (!progress) usleep(200);
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(send_errors.load(), 0);
  EXPECT_EQ(recv_errors.load(), 0);
  EXPECT_EQ(total.load(), kSockets * kPerSocket);
  EXPECT_EQ(bad.load(), 0u);
  for (auto& c : clients) EXPECT_TRUE(c->Close().ok());
  for (auto& s : servers) EXPECT_TRUE(s->Close().ok());
}

TEST_F(VnsTest, StoppedReaderBlocksTheWriterAndNothingIsLost) {
  Open("afxdp", 1);
  SocketOptions so;
  so.rcvbuf = 1 << 20;
  auto l = b_->Listen(5003, 8, so);
  ASSERT_TRUE(l.ok());
  auto [c, s] = Pair(**l, 5003);
  ASSERT_TRUE(c && s);
  // Nobody reads: non-blocking sends stop with EAGAIN once the socket's receive window (1 MiB,
  // advertised by the receiver) is full, before the channel is involved.
  c->SetNonBlocking(true);
  std::vector<uint8_t> buf(64 << 10);
  uint64_t off = 0;
  int eagain = 0;
  const uint64_t end = chan::NowUs() + 10'000'000;
  while (eagain < 50 && chan::NowUs() < end) {
    for (size_t i = 0; i < buf.size(); ++i) buf[i] = PatternByte(3, off + i);
    auto r = c->Send(buf);
    if (!r.ok()) {
      ASSERT_EQ(Errno(r.status()), EAGAIN) << r.status();
      eagain++;
      usleep(10'000);
      continue;
    }
    eagain = 0;
    off += *r;  // a partial write: the next buffer starts at the new offset
  }
  ASSERT_GE(eagain, 50) << "the writer was never stopped";
  EXPECT_EQ(off, 1u << 20) << "the writer stops exactly at the receiver's window";
  // Resume: the reader drains, the writer finishes with a blocking tail.
  const uint64_t kTotal = off + (8 << 20);
  absl::Status sent;
  std::thread tx([&] {
    c->SetNonBlocking(false);
    std::vector<uint8_t> b2(1 << 20);
    for (uint64_t o = off; o < kTotal;) {
      const size_t n = std::min<uint64_t>(b2.size(), kTotal - o);
      for (size_t i = 0; i < n; ++i) b2[i] = PatternByte(3, o + i);
      auto r = c->Send({b2.data(), n});
      if (!r.ok()) {
        sent = r.status();
        return;
      }
      o += *r;
    }
    sent = c->Shutdown();
  });
  uint64_t bad = 0;
  absl::Status err;
  const uint64_t got = RecvStream(*s, 3, 1 << 16, &bad, &err);
  tx.join();
  EXPECT_TRUE(sent.ok()) << sent;
  EXPECT_TRUE(err.ok()) << err;
  EXPECT_EQ(got, kTotal);
  EXPECT_EQ(bad, 0u);
  EXPECT_EQ(b_->Stats().dispatcher_blocked, 0u) << "a full socket held its channel back";
  EXPECT_GT(b_->Stats().window_updates, 0u);
}

TEST_F(VnsTest, AStoppedReaderDoesNotSlowAnotherSocketOnTheSameChannel) {
  Open("afxdp", 1);
  SocketOptions so;
  so.rcvbuf = 1 << 20;
  auto l = b_->Listen(5004, 8, so);
  ASSERT_TRUE(l.ok());
  auto [slow_tx, slow_rx] = Pair(**l, 5004);
  ASSERT_TRUE(slow_tx && slow_rx);
  // The slow socket's writer fills its window; its reader never reads.
  std::thread stuck([&] {
    std::vector<uint8_t> buf(256 << 10, 1);
    slow_tx->SetNonBlocking(true);
    for (int i = 0; i < 40; ++i) {
      (void)slow_tx->Send(buf);
      usleep(5000);
    }
  });
  usleep(50'000);
  // Another socket on the same (only) channel moves 64 MiB while the slow one sits full.
  auto [fast_tx, fast_rx] = Pair(**l, 5004);
  ASSERT_TRUE(fast_tx && fast_rx);
  absl::Status sent, err;
  uint64_t bad = 0;
  const uint64_t t0 = chan::NowUs();
  std::thread tx([&] { SendStream(*fast_tx, 9, 64 << 20, 1 << 20, &sent); });
  const uint64_t got = RecvStream(*fast_rx, 9, 1 << 20, &bad, &err);
  tx.join();
  stuck.join();
  const double secs = (chan::NowUs() - t0) / 1e6;
  EXPECT_TRUE(sent.ok()) << sent;
  EXPECT_TRUE(err.ok()) << err;
  EXPECT_EQ(got, 64u << 20);
  EXPECT_EQ(bad, 0u);
  EXPECT_LT(secs, 10) << "the other socket crawled behind the stopped one";
  EXPECT_EQ(b_->Stats().dispatcher_blocked, 0u);
  // The slow socket still has exactly its window's worth, intact, to read.
  std::vector<uint8_t> buf(1 << 20);
  uint64_t slow_got = 0;
  slow_rx->SetNonBlocking(true);
  for (;;) {
    auto r = slow_rx->Recv(buf);
    if (!r.ok()) break;
    slow_got += *r;
  }
  EXPECT_GE(slow_got, 1u << 20);
  std::printf("64 MiB beside a stopped reader on one channel: %.2f s\n", secs);
}

// Head-of-line blocking (the paper's Fig. 3.5 case): two streams share the only channel, and one
// reader stops in the middle. Its socket's window (rcvbuf, advertised end to end) stops its own
// writer once that much is buffered, and the dispatcher copies what the stopped socket holds out
// of the channel's buffers under pressure, so the channel keeps draining and the other stream
// returns to its rate; when the reader resumes, every byte is there. Recovery time is printed;
// the bound only checks that it recovers (speed is bench/run-isolation's question).
TEST_F(VnsTest, AReaderStoppingMidStreamLetsTheOtherStreamOnItsChannelRecover) {
  Open("afxdp", 1);
  SocketOptions so;
  so.rcvbuf = 2 << 20;
  auto l = b_->Listen(5013, 8, so);
  ASSERT_TRUE(l.ok());
  auto [slow_tx, slow_rx] = Pair(**l, 5013);
  ASSERT_TRUE(slow_tx && slow_rx);
  auto [fast_tx, fast_rx] = Pair(**l, 5013);
  ASSERT_TRUE(fast_tx && fast_rx);
  constexpr uint64_t kSlowBytes = 256 << 20;
  std::atomic<bool> stop_fast{false}, slow_paused{false};
  std::atomic<uint64_t> fast_got{0};
  absl::Status slow_sent, fast_sent, slow_err, fast_err;
  uint64_t slow_bad = 0, fast_bad = 0, slow_got = 0;
  std::thread slow_writer([&] { SendStream(*slow_tx, 21, kSlowBytes, 128 << 10, &slow_sent); });
  std::thread fast_writer([&] {
    std::vector<uint8_t> buf(128 << 10);
    for (uint64_t off = 0; !stop_fast.load();) {
      for (size_t i = 0; i < buf.size(); ++i) buf[i] = PatternByte(22, off + i);
      auto r = fast_tx->Send(buf);
      if (!r.ok()) return void(fast_sent = r.status());
      off += *r;
    }
    fast_sent = fast_tx->Shutdown();
  });
  std::thread fast_reader([&] {
    std::vector<uint8_t> buf(1 << 20);
    for (uint64_t off = 0;;) {
      auto r = fast_rx->Recv(buf);
      if (!r.ok()) return void(fast_err = r.status());
      if (*r == 0) return;
      for (size_t i = 0; i < *r; ++i) fast_bad += buf[i] != PatternByte(22, off + i);
      off += *r;
      fast_got.store(off, std::memory_order_relaxed);
    }
  });
  std::thread slow_reader([&] {
    std::vector<uint8_t> buf(1 << 20);
    for (;;) {
      while (slow_paused.load()) usleep(1000);
      auto r = slow_rx->Recv(buf);
      if (!r.ok()) return void(slow_err = r.status());
      if (*r == 0) return;
      for (size_t i = 0; i < *r; ++i) slow_bad += buf[i] != PatternByte(21, slow_got + i);
      slow_got += *r;
    }
  });
  // The fast stream's bytes per 50 ms: 1 s shared, then the slow reader stops for 2 s.
  std::vector<uint64_t> samples;
  auto sample_for = [&](int n) {
    for (int i = 0; i < n; ++i) {
      usleep(50'000);
      samples.push_back(fast_got.load(std::memory_order_relaxed));
    }
  };
  sample_for(20);
  const size_t stop_at = samples.size();
  slow_paused = true;
  sample_for(40);
  slow_paused = false;
  stop_fast = true;
  fast_writer.join();
  fast_reader.join();
  slow_writer.join();
  slow_reader.join();
  EXPECT_TRUE(slow_sent.ok() && fast_sent.ok()) << slow_sent << " / " << fast_sent;
  EXPECT_TRUE(slow_err.ok() && fast_err.ok()) << slow_err << " / " << fast_err;
  EXPECT_EQ(slow_got, kSlowBytes) << "the stopped reader's stream is whole when it resumes";
  EXPECT_EQ(slow_bad + fast_bad, 0u);
  // Rate while shared (its last half second) and the first 50 ms window after the stop in which
  // the fast stream runs at least that fast again.
  const double shared = (samples[stop_at - 1] - samples[stop_at - 11]) / 10.0;
  double recovered_s = -1;
  for (size_t i = stop_at + 1; i < samples.size(); ++i)
    if (samples[i] - samples[i - 1] >= shared) {
      recovered_s = (i + 1 - stop_at) * 0.05;
      break;
    }
  const double after = (samples.back() - samples[samples.size() - 11]) / 10.0;
  std::printf(
      "HoL: fast stream %.0f MB/s shared, %.0f MB/s with the other reader stopped; back "
      "to the shared rate after %.2f s\n",
      shared * 20 / 1e6, after * 20 / 1e6, recovered_s);
  EXPECT_GE(recovered_s, 0) << "the other stream never got back to its shared rate";
  EXPECT_LT(recovered_s, 2.0);
  EXPECT_EQ(b_->Stats().dispatcher_blocked, 0u) << "the stopped socket held the channel back";
}

// A peer that ignores the window this side advertised: only its socket is reset, and the
// channel it shares keeps carrying another connection. Host A runs a bare driver and speaks the
// virtual-socket protocol by hand.
TEST_F(VnsTest, DataBeyondTheAdvertisedWindowResetsOnlyThatSocket) {
  ASSERT_NO_FATAL_FAILURE(OpenStackBesideBarePeer());
  chan::Channel& c = *bare_chan_;
  SocketOptions so;
  so.rcvbuf = 64 << 10;
  auto l = b_->Listen(5020, 8, so);
  ASSERT_TRUE(l.ok());
  auto send = [&](uint8_t type, uint16_t port, uint32_t conn, uint64_t seq,
                  std::span<const uint8_t> payload = {}) {
    chan::TxSegment seg;
    seg.hdr = {type, NC_CLASS_UNSPEC, port, 5020, conn, seq};
    seg.payload = payload;
    for (int i = 0; i < 1000; ++i) {
      auto n = c.Enqueue({&seg, 1});
      ASSERT_TRUE(n.ok()) << n.status();
      if (*n == 1) return;
      c.Wait(absl::Milliseconds(5), chan::Channel::kWritable);
    }
    FAIL() << "channel never took the segment";
  };
  // The next control segment for `conn`, skipping window updates.
  auto expect = [&](uint8_t type, uint32_t conn) -> uint64_t {
    chan::RxSegment seg[16];
    const uint64_t end = chan::NowUs() + 2'000'000;
    while (chan::NowUs() < end) {
      c.Wait(absl::Milliseconds(5), chan::Channel::kReadable);
      const size_t n = c.Dequeue(SIZE_MAX, seg);
      for (size_t i = 0; i < n; ++i) {
        const auto h = seg[i].hdr;
        c.Release({&seg[i], 1});
        if (h.type == type && h.conn_id == conn) return h.seq;
      }
    }
    ADD_FAILURE() << "no segment of type " << int{type} << " for conn " << conn;
    return 0;
  };
  std::vector<uint8_t> data(1000, 0x42);
  // Connection 1: window 64 KiB, 1000 bytes in window, then bytes beyond it.
  send(NC_SYN, 777, 0x1111, 1 << 20);
  EXPECT_EQ(expect(NC_SYN_ACK, 0x1111), 64u << 10) << "NCSYN_ACK carries the receiver's window";
  auto s1 = (*l)->Accept();
  ASSERT_TRUE(s1.ok());
  send(NC_DATA, 777, 0x1111, 0, data);
  send(NC_DATA, 777, 0x1111, (64 << 10) - 500, data);  // ends 500 bytes past the edge
  expect(NC_RST, 0x1111);
  // Reads without blocking for at most 2 s: a socket left waiting must fail the test, not hang.
  std::vector<uint8_t> buf(4096);
  auto recv = [&](VirtualSocket& s) -> absl::StatusOr<size_t> {
    s.SetNonBlocking(true);
    const uint64_t end = chan::NowUs() + 2'000'000;
    for (;;) {
      auto r = s.Recv(buf);
      if (r.ok() || Errno(r.status()) != EAGAIN || chan::NowUs() > end) return r;
      pollfd p{s.fd(), POLLIN, 0};
      poll(&p, 1, 10);
    }
  };
  auto r = recv(**s1);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, 1000u);
  r = recv(**s1);
  EXPECT_EQ(Errno(r.status()), ECONNRESET) << r.status();
  EXPECT_EQ(b_->Stats().rx_beyond_window, 1u);
  // Connection 2 on the same channel: its bytes flow.
  send(NC_SYN, 778, 0x2222, 1 << 20);
  expect(NC_SYN_ACK, 0x2222);
  auto s2 = (*l)->Accept();
  ASSERT_TRUE(s2.ok());
  send(NC_DATA, 778, 0x2222, 0, data);
  r = recv(**s2);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, 1000u);
}

// One of four channels fails mid-stream (every packet to it dropped in XDP on both hosts): the
// sockets whose bytes it carried fail within the channel timeout, a socket on other channels
// finishes intact, and a new connection works.
TEST_F(VnsTest, OneOfFourChannelsFailingBreaksOnlyTheSocketsItCarried) {
  OpenSteered(4);
  Stack& a = *a_;
  Stack& b = *b_;
  auto l = b.Listen(5030, 16);
  ASSERT_TRUE(l.ok());
  // X on the channel that will fail, Y on two others, Z on all four.
  std::unique_ptr<VirtualSocket> tx[3], rx[3];
  for (int i = 0; i < 3; ++i) {
    auto c = a.Connect(TestHosts::kIpB, 5030);
    ASSERT_TRUE(c.ok()) << c.status();
    tx[i] = std::move(*c);
    auto s = (*l)->Accept();
    ASSERT_TRUE(s.ok());
    rx[i] = std::move(*s);
  }
  auto chans = a.driver().Channels();
  ASSERT_EQ(chans.size(), 4u);
  // In the order VNS lists them (queue, then id): the first carries control segments (NCSYN,
  // FIN, RST, window updates) of every socket; fail the last, which carries only data.
  std::sort(chans.begin(), chans.end(), [](auto& x, auto& y) {
    return std::pair(x->stats().queue, x->id()) < std::pair(y->stats().queue, y->id());
  });
  chan::Channel& doomed = *chans[3];
  auto id_of = [&](const VirtualSocket& s) {
    for (const SocketInfo& si : a.Sockets())
      if (si.local_port == s.local_port()) return si.id;
    return uint64_t{0};
  };
  ASSERT_TRUE(a.MapSocket(id_of(*tx[0]), {doomed.id()}).ok());
  ASSERT_TRUE(a.MapSocket(id_of(*tx[1]), {chans[1]->id(), chans[2]->id()}).ok());
  // Streams run until stopped (X, Z) or for 256 MiB (Y).
  constexpr uint64_t kY = 256ull << 20;
  absl::Status sent[3], err[3];
  uint64_t got[3] = {}, bad[3] = {};
  uint64_t failed_at_us[3] = {};
  std::vector<std::thread> threads;
  for (int i = 0; i < 3; ++i) {
    threads.emplace_back([&, i] {
      SendStream(*tx[i], 20 + i, i == 1 ? kY : (64ull << 30), 1 << 20, &sent[i]);
      if (!sent[i].ok()) failed_at_us[i] = chan::NowUs();
    });
    threads.emplace_back(
        [&, i] { got[i] = RecvStream(*rx[i], 20 + i, 1 << 20, &bad[i], &err[i]); });
  }
  absl::SleepFor(absl::Milliseconds(300));
  // Cut the channel: its packets are dropped on arrival at both hosts (the peer's end of the
  // channel is the one bound to the same queue).
  const int queue = doomed.stats().queue;
  ASSERT_TRUE(steer_[0]->SetChannelDropPpm(doomed.id(), NC_PPM).ok());
  bool cut_b = false;
  for (const auto& ch : b.driver().Channels())
    if (ch->stats().queue == queue && ch->state() == chan::ChannelState::kUp)
      cut_b = steer_[1]->SetChannelDropPpm(ch->id(), NC_PPM).ok();
  EXPECT_TRUE(cut_b);
  const uint64_t cut_us = chan::NowUs();
  for (auto& t : threads) t.join();
  for (int i : {0, 2}) {
    EXPECT_EQ(Errno(sent[i]), ECONNRESET) << i << ": " << sent[i];
    EXPECT_EQ(Errno(err[i]), ECONNRESET) << i << ": " << err[i];
    EXPECT_EQ(bad[i], 0u) << "bytes that did arrive are intact";
    EXPECT_LT((failed_at_us[i] - cut_us) / 1e6, 3.0) << "socket " << i << " failed too late";
  }
  EXPECT_TRUE(sent[1].ok()) << sent[1];
  EXPECT_TRUE(err[1].ok()) << err[1];
  EXPECT_EQ(got[1], kY);
  EXPECT_EQ(bad[1], 0u);
  // Whichever host saw the channel fail first broke the two sockets (the other's learn it from
  // its RST, on a healthy channel).
  EXPECT_GE(a.Stats().conns_broken + b.Stats().conns_broken, 2u);
  // A new connection uses the healthy channels (and whatever the peer set reopened) — once this
  // host too has found the cut channel dead: when the peer found it first, its RSTs broke our two
  // sockets a moment before our own dead-peer timer fired, and a connection made in between still
  // spread over the cut channel (one run of 45 in parallel).
  for (int i = 0; i < 300 && doomed.state() == chan::ChannelState::kUp; ++i)
    absl::SleepFor(absl::Milliseconds(10));
  ASSERT_NE(doomed.state(), chan::ChannelState::kUp) << "the cut channel never failed here";
  auto c = a.Connect(TestHosts::kIpB, 5030);
  ASSERT_TRUE(c.ok()) << c.status();
  auto s = (*l)->Accept();
  ASSERT_TRUE(s.ok());
  absl::Status st;
  std::thread t([&] { SendStream(**c, 30, 8 << 20, 1 << 20, &st); });
  uint64_t b2 = 0;
  absl::Status e2;
  EXPECT_EQ(RecvStream(**s, 30, 1 << 20, &b2, &e2), 8u << 20);
  t.join();
  EXPECT_TRUE(st.ok()) << st;
  EXPECT_TRUE(e2.ok()) << e2;
  EXPECT_EQ(b2, 0u);
  std::printf("sockets on the cut channel failed %.2f s / %.2f s after the cut\n",
              (failed_at_us[0] - cut_us) / 1e6, (failed_at_us[2] - cut_us) / 1e6);
}

// A bulk socket whose channels are full waits for *them*: isolate-classes never gives it the
// L-app channel, which has room all along — waking for that channel made a blocked Send spin a
// core and a non-blocking one's write readiness flap. The bulk channel is cut for a moment (its
// packets dropped on arrival at B, so nothing is acknowledged and A's end fills): the blocked
// writer must sleep, the non-blocking one must not look writable; both go on intact when the
// cut heals.
TEST_F(VnsTest, AWriterBlockedOnFullChannelsSleepsWhileAnotherClassesChannelHasRoom) {
  OpenSteered(2, "isolate-classes");
  Stack& a = *a_;
  Stack& b = *b_;
  SocketOptions big;
  big.rcvbuf = 64 << 20;  // the channel, not the peer's window, is what fills
  auto l = b.Listen(5040, 16, big);
  ASSERT_TRUE(l.ok());
  SocketOptions bulk;
  bulk.app_class = AppClass::kThroughput;
  auto connect = [&] {
    auto c = a.Connect(TestHosts::kIpB, 5040, bulk);
    EXPECT_TRUE(c.ok()) << c.status();
    auto s = (*l)->Accept();
    EXPECT_TRUE(s.ok()) << s.status();
    return std::pair{std::move(*c), std::move(*s)};
  };
  auto [tx, rx] = connect();
  auto chans = a.driver().Channels();
  ASSERT_EQ(chans.size(), 2u);
  std::sort(chans.begin(), chans.end(), [](auto& x, auto& y) { return x->id() < y->id(); });
  const int bulk_queue = chans[1]->stats().queue;  // the first channel is the L-app one
  auto cut = [&](uint32_t ppm) {
    bool done = false;
    for (const auto& ch : b.driver().Channels())
      if (ch->stats().queue == bulk_queue) done = steer_[1]->SetChannelDropPpm(ch->id(), ppm).ok();
    EXPECT_TRUE(done);
  };
  auto cpu_ms = [](std::thread& t) {
    clockid_t id;
    timespec ts{};
    if (pthread_getcpuclockid(t.native_handle(), &id) != 0 || clock_gettime(id, &ts) != 0)
      return -1.0;
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
  };

  // Blocking.
  constexpr uint64_t kBytes = 32 << 20;
  cut(NC_PPM);
  absl::Status sent, err;
  uint64_t bad = 0, got = 0;
  std::thread writer([&] { SendStream(*tx, 41, kBytes, 1 << 20, &sent); });
  std::thread reader([&] { got = RecvStream(*rx, 41, 1 << 20, &bad, &err); });
  absl::SleepFor(absl::Milliseconds(150));  // the channel fills within this
  const double cpu0 = cpu_ms(writer);
  absl::SleepFor(absl::Milliseconds(500));
  const double spent = cpu_ms(writer) - cpu0;
  cut(0);
  writer.join();
  reader.join();
  EXPECT_GE(cpu0, 0);
  EXPECT_LT(spent, 100) << "ms of CPU the blocked writer used in 500 ms";
  EXPECT_TRUE(sent.ok()) << sent;
  EXPECT_TRUE(err.ok()) << err;
  EXPECT_EQ(got, kBytes);
  EXPECT_EQ(bad, 0u);

  // Non-blocking: cut short by the full channel, it stays unwritable until the channel drains.
  auto [tx2, rx2] = connect();
  cut(NC_PPM);
  tx2->SetNonBlocking(true);
  std::vector<uint8_t> chunk(1 << 20);
  uint64_t off = 0;
  auto write_until_blocked = [&] {
    for (int i = 0; i < 256; ++i) {
      for (size_t j = 0; j < chunk.size(); ++j) chunk[j] = PatternByte(42, off + j);
      auto n = tx2->Send(chunk);
      if (!n.ok()) {
        EXPECT_EQ(Errno(n.status()), EAGAIN) << n.status();
        return true;
      }
      off += *n;
      if (*n < chunk.size()) return true;
    }
    return false;
  };
  // Blocked, it becomes writable while the channel takes more send buffers (it holds up to its
  // share of the queue's slots, counted by what they carry), then no longer: the channel is full.
  pollfd p{tx2->write_fd(), POLLIN, 0};
  int rounds = 0;
  do {
    ASSERT_TRUE(write_until_blocked()) << "256 MiB went into a cut channel";
  } while (poll(&p, 1, 300) == 1 && ++rounds < 20);
  EXPECT_LT(rounds, 20) << "writable while the only channel it may use is full";
  cut(0);
  EXPECT_EQ(poll(&p, 1, 5000), 1) << "not writable after the channel drained";
  tx2->SetNonBlocking(false);
  ASSERT_TRUE(tx2->Shutdown().ok());
  bad = 0;
  err = absl::OkStatus();
  EXPECT_EQ(RecvStream(*rx2, 42, 1 << 20, &bad, &err), off);
  EXPECT_TRUE(err.ok()) << err;
  EXPECT_EQ(bad, 0u);
}

// An event loop that polls the stack on its next wait (Stack::SetLoopPollsOnWait, as the
// preload's epoll_wait marks it) leaves its write watch to its own PollInline rounds — nobody
// else is told — and hands it to the dispatcher before it sleeps (HandOverWatches): then its
// write readiness comes back once the channel has room — no watch is lost between the two — and
// every byte arrives. The dispatcher also runs the watch when it wakes for other work, so this
// does not tell who raised it; the loop's own rounds are exercised end to end by the Redis test
// (redis-benchmark -P 16 fills the channels under netchrun's default loop polling). A second
// cut of the one channel in the same test failed the channel (not investigated): one cut here.
TEST_F(VnsTest, ALoopThatHandsOverItsWriteWatchGetsWriteReadinessBack) {
  OpenSteered(1);
  SocketOptions big;
  big.rcvbuf = 64 << 20;  // the channel, not the peer's window, is what fills
  auto l = b_->Listen(5041, 16, big);
  ASSERT_TRUE(l.ok());
  auto c = a_->Connect(TestHosts::kIpB, 5041);
  ASSERT_TRUE(c.ok()) << c.status();
  auto s = (*l)->Accept();
  ASSERT_TRUE(s.ok()) << s.status();
  auto& tx = **c;
  auto cut = [&](uint32_t ppm) {
    for (const auto& ch : b_->driver().Channels())
      ASSERT_TRUE(steer_[1]->SetChannelDropPpm(ch->id(), ppm).ok());
  };
  tx.SetNonBlocking(true);
  std::vector<uint8_t> chunk(1 << 20);
  uint64_t off = 0;
  auto fill = [&] {  // writes until the cut channel takes no more
    pollfd p{tx.write_fd(), POLLIN, 0};
    for (int round = 0; round < 20; ++round) {
      for (int i = 0; i < 256; ++i) {
        for (size_t j = 0; j < chunk.size(); ++j) chunk[j] = PatternByte(43, off + j);
        auto n = tx.Send(chunk);
        if (!n.ok()) {
          EXPECT_EQ(Errno(n.status()), EAGAIN) << n.status();
          break;
        }
        off += *n;
        if (*n < chunk.size()) break;
      }
      if (poll(&p, 1, 100) == 0) return true;  // (short: the cut must not outlast the peer)
    }
    return false;
  };
  auto readable_within = [&](int ms, bool poll_inline) {
    pollfd p{tx.write_fd(), POLLIN, 0};
    for (int waited = 0; waited < ms; ++waited) {
      if (poll_inline) a_->PollInline(100);
      if (poll(&p, 1, poll_inline ? 0 : 1) == 1) return true;
      if (poll_inline) absl::SleepFor(absl::Milliseconds(1));
    }
    return false;
  };
  uint64_t got = 0, bad = 0;
  absl::Status err;
  std::vector<uint8_t> rbuf(1 << 20);
  auto drain = [&](uint64_t until) {  // the reader takes everything sent so far
    while (got < until) {
      auto n = (*s)->Recv(rbuf);
      ASSERT_TRUE(n.ok()) << n.status();
      for (size_t j = 0; j < *n; ++j) bad += rbuf[j] != PatternByte(43, got + j);
      got += *n;
    }
  };

  // Blocked while marked, nobody is told; handed over before the loop sleeps, the dispatcher
  // raises it once the cut heals.
  cut(NC_PPM);
  Stack::SetLoopPollsOnWait(true);
  const uint64_t t0 = chan::NowUs();
  ASSERT_TRUE(fill()) << "the cut channel kept taking data";
  std::printf("filled %.1f MiB in %.2f s\n", off / 1048576.0, (chan::NowUs() - t0) / 1e6);
  Stack::SetLoopPollsOnWait(false);
  a_->HandOverWatches();
  cut(0);
  std::thread reader([&] { drain(off); });
  EXPECT_TRUE(readable_within(3000, /*poll_inline=*/false))
      << "the dispatcher did not take over the watch";
  reader.join();
  tx.SetNonBlocking(false);
  ASSERT_TRUE(tx.Shutdown().ok());
  drain(off);
  EXPECT_EQ(bad, 0u);
}

// A flood of NCSYNs (virtual-connection opens) from a peer that never completes anything: the
// listener's backlog bounds what is kept, the rest are refused, and once the application accepts
// a legitimate open is served again.
TEST_F(VnsTest, AFloodOfNcsynsIsBoundedByTheBacklog) {
  ASSERT_NO_FATAL_FAILURE(OpenStackBesideBarePeer());
  chan::Channel& c = *bare_chan_;
  constexpr int kBacklog = 8, kFlood = 20000;
  auto l = b_->Listen(5040, kBacklog);
  ASSERT_TRUE(l.ok());
  // Answers are drained as we go (the flood's replies must not back up our own channel).
  uint64_t synacks = 0, rsts = 0;
  auto drain = [&] {
    chan::RxSegment seg[64];
    for (size_t n; (n = c.Dequeue(SIZE_MAX, seg)) > 0;) {
      for (size_t i = 0; i < n; ++i) {
        synacks += seg[i].hdr.type == NC_SYN_ACK;
        rsts += seg[i].hdr.type == NC_RST;
      }
      c.Release({seg, n});
    }
  };
  for (int i = 0; i < kFlood; ++i) {
    chan::TxSegment seg;
    seg.hdr = {NC_SYN,
               NC_CLASS_UNSPEC,
               static_cast<uint16_t>(1000 + i % 60000),
               5040,
               static_cast<uint32_t>(0x10000 + i),
               1 << 20};
    for (;;) {
      auto n = c.Enqueue({&seg, 1});
      ASSERT_TRUE(n.ok()) << n.status();
      if (*n == 1) break;
      drain();
      c.Wait(absl::Milliseconds(1), chan::Channel::kBoth);
    }
    if (i % 256 == 0) drain();
  }
  // Until the stack has taken every NCSYN (slow under sanitizers).
  const uint64_t end = chan::NowUs() + 30'000'000;
  while (b_->Stats().segments_in < static_cast<uint64_t>(kFlood) && chan::NowUs() < end) {
    c.Wait(absl::Milliseconds(5), chan::Channel::kReadable);
    drain();
  }
  ASSERT_GE(b_->Stats().segments_in, static_cast<uint64_t>(kFlood));
  absl::SleepFor(absl::Milliseconds(100));
  drain();
  EXPECT_EQ(synacks, static_cast<uint64_t>(kBacklog));
  // Refusals are best effort (an RST that finds the channel full is not queued without bound).
  EXPECT_LE(rsts, static_cast<uint64_t>(kFlood - kBacklog));
  EXPECT_GT(rsts, 0u);
  // What the stack keeps: the listener and the backlog, nothing for the refused ones.
  EXPECT_EQ(b_->Sockets().size(), static_cast<size_t>(kBacklog + 1));
  // The application accepts; a new open is served.
  for (int i = 0; i < kBacklog; ++i) ASSERT_TRUE((*l)->Accept().ok());
  chan::TxSegment seg;
  seg.hdr = {NC_SYN, NC_CLASS_UNSPEC, 65001, 5040, 0x7777, 1 << 20};
  ASSERT_EQ(*c.Enqueue({&seg, 1}), 1u);
  const uint64_t before = synacks;
  const uint64_t end2 = chan::NowUs() + 2'000'000;
  while (synacks == before && chan::NowUs() < end2) {
    c.Wait(absl::Milliseconds(5), chan::Channel::kReadable);
    drain();
  }
  EXPECT_EQ(synacks, before + 1) << "a legitimate open after the flood was not answered";
}

TEST_F(VnsTest, ConnectToAPortNobodyListensOnIsRefusedFast) {
  Open("afxdp", 1);
  const uint64_t t0 = chan::NowUs();
  auto c = a_->Connect(TestHosts::kIpB, 5999);
  const double ms = (chan::NowUs() - t0) / 1e3;
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(Errno(c.status()), ECONNREFUSED) << c.status();
  EXPECT_LT(ms, 500) << "the first connect also opens the channel; refusal itself is one RTT";
  const uint64_t t1 = chan::NowUs();
  auto c2 = a_->Connect(TestHosts::kIpB, 5998);
  EXPECT_EQ(Errno(c2.status()), ECONNREFUSED);
  EXPECT_LT((chan::NowUs() - t1) / 1e3, 50);
}

// Resident memory of this process, in KiB.
static long RssKb() {
  FILE* f = fopen("/proc/self/status", "r");
  if (!f) return -1;
  char line[256];
  long kb = -1;
  while (fgets(line, sizeof line, f))
    if (sscanf(line, "VmRSS: %ld kB", &kb) == 1) break;
  fclose(f);
  return kb;
}

// A server holds many mostly idle connections for days: each virtual connection must cost memory
// in proportion to what it holds, not its worst case. (Each socket's inbound ring, sized for 4096
// segments, was filled at creation: 375 KB per socket, 75 MB for 200 idle Redis clients.)
TEST_F(VnsTest, IdleConnectionsCostLittleMemory) {
  Open("afxdp", 1);
  auto l = b_->Listen(5020, /*backlog=*/256);
  ASSERT_TRUE(l.ok()) << l.status();
  std::vector<std::unique_ptr<VirtualSocket>> socks;
  auto pair = [&] {
    auto c = a_->Connect(TestHosts::kIpB, 5020);
    ASSERT_TRUE(c.ok()) << c.status();
    auto s = (*l)->Accept();
    ASSERT_TRUE(s.ok()) << s.status();
    const uint8_t ping = 7;
    ASSERT_TRUE((*c)->Send({&ping, 1}).ok());
    uint8_t got = 0;
    auto r = (*s)->Recv({&got, 1});
    ASSERT_TRUE(r.ok()) << r.status();
    ASSERT_EQ(got, ping);
    socks.push_back(std::move(*c));
    socks.push_back(std::move(*s));
  };
  for (int i = 0; i < 8 && !HasFatalFailure(); ++i) pair();  // warm: pools, maps, threads
  const long before = RssKb();
  constexpr int kPairs = 200;
  for (int i = 0; i < kPairs && !HasFatalFailure(); ++i) pair();
  const long grew = RssKb() - before;
  std::printf("%ld KiB for %d sockets\n", grew, 2 * kPairs);
  // Both ends live in this process: 400 sockets. Kernel TCP's idle socket costs a few KiB;
  // allow 64 KiB each (tables, queues' first chunks, allocator slack; ~4 MB in all here). Under
  // TSan every heap block also has resident shadow, written when it is allocated (~27 MB in
  // all, with the option at the top of this file): 3x the bound still catches a per-socket
  // worst-case buffer (145 MB).
#if defined(__SANITIZE_THREAD__)
  constexpr long kShadow = 3;
#else
  constexpr long kShadow = 1;
#endif
  EXPECT_LT(grew, kShadow * 2 * kPairs * 64) << grew << " KiB for " << 2 * kPairs << " sockets";
}

// A host with no stack never answers the channel handshake: connect says it timed out (the
// driver's handshake deadline is the connect timeout), not that it was refused.
// A non-blocking connect ended (write_fd() readable) within `ms`.
bool WriteReady(VirtualSocket& s, int ms) {
  pollfd p{s.write_fd(), POLLIN, 0};
  return poll(&p, 1, ms) == 1;
}

// The connection `c` made works: `listener` accepts it and three bytes cross.
void ExpectAcceptedAndBytesFlow(VirtualSocket& listener, VirtualSocket& c) {
  auto s = listener.Accept();
  ASSERT_TRUE(s.ok()) << s.status();
  const uint8_t msg[3] = {1, 2, 3};
  auto n = c.Send(msg);
  ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_EQ(*n, 3u);
  uint8_t buf[8];
  auto r = (*s)->Recv(buf);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, 3u);
}

TEST_F(VnsTest, ConnectToAHostWithoutAStackTimesOut) {
  auto a = Stack::Create(Opts(hosts_.ns_a(), TestHosts::kDevA, "afxdp", 1));
  ASSERT_TRUE(a.ok()) << a.status();
  a_ = std::move(*a);
  SocketOptions so;
  so.connect_timeout = absl::Milliseconds(300);
  auto c = a_->Connect(TestHosts::kIpB, 80, so);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(Errno(c.status()), ETIMEDOUT) << c.status();
  EXPECT_NE(c.status().message().find("handshake in time"), std::string::npos) << c.status();
}

// An event loop's non-blocking connect never waits for the channel handshake to a new peer: it
// returns at once, and write readiness with Error() reports the outcome — a working connection,
// or ETIMEDOUT from a host without a stack (the kernel's non-blocking connect behaves the same).
TEST_F(VnsTest, NonBlockingConnectToANewPeerReturnsAtOnce) {
  auto a = Stack::Create(Opts(hosts_.ns_a(), TestHosts::kDevA, "afxdp", 2));
  ASSERT_TRUE(a.ok()) << a.status();
  a_ = std::move(*a);
  SocketOptions nb;
  nb.nonblocking = true;
  nb.connect_timeout = absl::Milliseconds(400);
  // No stack on B yet: two connections wait for the same channel opening, then time out.
  uint64_t t0 = chan::NowUs();
  auto dead1 = a_->Connect(TestHosts::kIpB, 80, nb);
  auto dead2 = a_->Connect(TestHosts::kIpB, 81, nb);
  EXPECT_LT(chan::NowUs() - t0, 100'000u) << "the connects waited for the channel handshake";
  ASSERT_TRUE(dead1.ok()) << dead1.status();
  ASSERT_TRUE(dead2.ok()) << dead2.status();
  EXPECT_FALSE(WriteReady(**dead1, 0)) << "still connecting";
  EXPECT_TRUE(WriteReady(**dead1, 3000));
  EXPECT_TRUE(WriteReady(**dead2, 3000));
  EXPECT_EQ((*dead1)->Error(), ETIMEDOUT);
  EXPECT_EQ((*dead2)->Error(), ETIMEDOUT);
  EXPECT_EQ(a_->driver().Channels().size(), 0u) << "the failed opening left channels behind";

  // B comes up: the next non-blocking connect opens the channels without waiting for them
  // and completes through write readiness.
  auto b = Stack::Create(Opts(hosts_.ns_b(), TestHosts::kDevB, "afxdp", 2));
  ASSERT_TRUE(b.ok()) << b.status();
  b_ = std::move(*b);
  auto l = b_->Listen(80);
  ASSERT_TRUE(l.ok()) << l.status();
  nb.connect_timeout = absl::Seconds(5);
  t0 = chan::NowUs();
  auto c = a_->Connect(TestHosts::kIpB, 80, nb);
  const uint64_t took = chan::NowUs() - t0;
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_LT(took, 100'000u);
  EXPECT_TRUE(WriteReady(**c, 5000));
  EXPECT_EQ((*c)->Error(), 0);
  ExpectAcceptedAndBytesFlow(**l, **c);
  EXPECT_EQ(a_->driver().Channels().size(), 2u) << "channels_per_peer, opened once";
}

// Connections that join a channel opening already under way are bound by their own connect
// timeout, not by the earlier one of the connect that started it: a peer that becomes reachable
// after the first connect gave up still gets the second. (B's stack and listener are up all
// along; B's steering program drops every packet until the first connect has failed.)
TEST_F(VnsTest, AConnectThatJoinedAnOpeningKeepsItsOwnTimeout) {
  {
    NetnsScope scope(hosts_.ns_b());
    auto p = bpf::SteerProgram::Load();
    ASSERT_TRUE(p.ok()) << p.status();
    ASSERT_TRUE((*p)->Attach(if_nametoindex(TestHosts::kDevB), bpf::AttachMode::kNative).ok());
    steer_[1] = std::move(*p);
  }
  ASSERT_TRUE(steer_[1]->SetGlobalDropPpm(1'000'000).ok());
  StackOptions bo = Opts(hosts_.ns_b(), TestHosts::kDevB, "afxdp", 1);
  bo.driver_opts.steer = steer_[1].get();
  auto b = Stack::Create(bo);
  ASSERT_TRUE(b.ok()) << b.status();
  b_ = std::move(*b);
  auto l = b_->Listen(80);
  ASSERT_TRUE(l.ok()) << l.status();
  auto a = Stack::Create(Opts(hosts_.ns_a(), TestHosts::kDevA, "afxdp", 1));
  ASSERT_TRUE(a.ok()) << a.status();
  a_ = std::move(*a);
  SocketOptions early;
  early.nonblocking = true;
  early.connect_timeout = absl::Milliseconds(300);
  auto first = a_->Connect(TestHosts::kIpB, 80, early);
  ASSERT_TRUE(first.ok()) << first.status();
  absl::SleepFor(absl::Milliseconds(100));
  SocketOptions late = early;
  late.connect_timeout = absl::Seconds(5);
  auto second = a_->Connect(TestHosts::kIpB, 80, late);  // joins the opening under way
  ASSERT_TRUE(second.ok()) << second.status();
  ASSERT_TRUE(WriteReady(**first, 3000));
  EXPECT_EQ((*first)->Error(), ETIMEDOUT);
  EXPECT_FALSE(WriteReady(**second, 0))
      << "failed with the first connect's deadline: " << (*second)->Error();
  ASSERT_TRUE(steer_[1]->SetGlobalDropPpm(0).ok());  // B reachable, well within 5 s
  ASSERT_TRUE(WriteReady(**second, 5000));
  EXPECT_EQ((*second)->Error(), 0);
  ExpectAcceptedAndBytesFlow(**l, **second);
}

// A connect to an address where no host answers ARP: the call never waits for the resolution
// (an event loop would freeze for its whole timeout), the connection fails EHOSTUNREACH as the
// kernel's does, and no channel is left behind; the live peer on the same link still works.
TEST_F(VnsTest, AConnectToAnAddressNobodyAnswersFailsHostUnreachableWithoutBlocking) {
  Open("afxdp", 1);
  constexpr uint32_t kNobody = 0xC6120063;  // 198.18.0.99: on the test link, no host
  SocketOptions nb;
  nb.nonblocking = true;
  nb.connect_timeout = absl::Seconds(5);
  uint64_t t0 = chan::NowUs();
  auto c = a_->Connect(kNobody, 80, nb);
  EXPECT_LT(chan::NowUs() - t0, 100'000u) << "the connect waited for ARP";
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_FALSE(WriteReady(**c, 0)) << "still resolving";
  ASSERT_TRUE(WriteReady(**c, 4000));
  EXPECT_EQ((*c)->Error(), EHOSTUNREACH);
  EXPECT_LT(chan::NowUs() - t0, 3'000'000u) << "it waited for the connect timeout, not for ARP";

  SocketOptions blocking;
  blocking.connect_timeout = absl::Seconds(5);
  auto d = a_->Connect(kNobody, 81, blocking);
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(Errno(d.status()), EHOSTUNREACH) << d.status();
  EXPECT_NE(d.status().message().find("neighbour resolution"), std::string::npos) << d.status();
  for (const auto& ch : a_->driver().Channels())
    EXPECT_NE(ch->peer_ipv4(), kNobody) << "the failed opening left a channel behind";

  auto l = b_->Listen(82);
  ASSERT_TRUE(l.ok()) << l.status();
  auto live = a_->Connect(TestHosts::kIpB, 82);
  ASSERT_TRUE(live.ok()) << live.status();
}

// B in another subnet behind a forwarding router (scripts/testhosts --routed): frames go to the
// gateway's MAC, which the kernel's routing table names and ARP resolves (no static neighbours).
// One queue per link: the router, not our tx queue, picks the queue a forwarded frame arrives on
// (docs/ARCHITECTURE.md, "Channel ↔ queue").
class VnsRoutedTest : public VnsTest {
 protected:
  void SetUp() override {
    NETCH_REQUIRE_ROOT();
    testing::TestHostsOptions o = testing::StackHostsOptions();
    o.queues = 1;
    o.routed = true;
    ASSERT_TRUE(hosts_.Up(o).ok());
  }
};

TEST_F(VnsRoutedTest, APeerBehindARouterIsReachedThroughItsGateway) {
  Open("afxdp", 2);
  auto l = b_->Listen(5020);
  ASSERT_TRUE(l.ok()) << l.status();
  auto c = a_->Connect(hosts_.ip_b(), 5020);
  ASSERT_TRUE(c.ok()) << c.status();
  auto s = (*l)->Accept();
  ASSERT_TRUE(s.ok()) << s.status();
  // Checked streams both ways at once: data one way, ACKs and the other stream's data the other.
  BothWays(**c, **s, 16ull << 20).ExpectIntact();
  // The router took them: the frames were addressed to A's gateway, which A resolved by ARP.
  EXPECT_EQ(hosts_.RunIn(hosts_.ns_a(), "ip neigh show 198.18.0.254 | grep -q lladdr"), 0);

  // The other way round: B opens channels to A through its own gateway.
  auto l2 = a_->Listen(5021);
  ASSERT_TRUE(l2.ok()) << l2.status();
  auto c2 = b_->Connect(TestHosts::kIpA, 5021);
  ASSERT_TRUE(c2.ok()) << c2.status();
  ExpectAcceptedAndBytesFlow(**l2, **c2);
}

// What the routing table rules out fails at once, with the kernel's errno, and sends nothing; a
// gateway that never answers ARP fails as an unanswered peer on the link does.
TEST_F(VnsRoutedTest, AConnectTheRoutingTableRulesOutFailsAtOnceWithItsErrno) {
  Open("afxdp", 1);
  ASSERT_EQ(hosts_.RunIn(hosts_.ns_a(),
                         "ip route add unreachable 198.19.1.0/24 && "
                         "ip link add nc-x type veth peer name nc-y && "
                         "ip addr add 198.19.2.1/24 dev nc-x && ip link set nc-x up"),
            0);
  SocketOptions nb;
  nb.nonblocking = true;
  const uint64_t t0 = chan::NowUs();
  auto unreachable = a_->Connect(0xC6130101, 80, nb);  // 198.19.1.1: an unreachable route
  ASSERT_FALSE(unreachable.ok());
  EXPECT_EQ(Errno(unreachable.status()), EHOSTUNREACH) << unreachable.status();
  auto elsewhere = a_->Connect(0xC6130202, 80, nb);  // 198.19.2.2: routed through nc-x
  ASSERT_FALSE(elsewhere.ok());
  EXPECT_EQ(Errno(elsewhere.status()), ENETUNREACH) << elsewhere.status();
  EXPECT_TRUE(absl::StrContains(elsewhere.status().message(), "leaves through nc-x"))
      << elsewhere.status();
  auto self = a_->Connect(TestHosts::kIpA, 80, nb);  // our own address: no peer there
  ASSERT_FALSE(self.ok());
  EXPECT_EQ(Errno(self.status()), EADDRNOTAVAIL) << self.status();
  EXPECT_LT(chan::NowUs() - t0, 100'000u) << "a ruled-out connect waited";
  EXPECT_TRUE(a_->driver().Channels().empty()) << "a failed lookup left a channel behind";
  // A route through a gateway nobody answers for: the gateway's ARP fails, as the peer's own
  // does on the link (EHOSTUNREACH after the 1 s resolution, not the 5 s connect timeout).
  ASSERT_EQ(hosts_.RunIn(hosts_.ns_a(), "ip route add 198.19.3.0/24 via 198.18.0.99"), 0);
  SocketOptions blocking;
  blocking.connect_timeout = absl::Seconds(5);
  const uint64_t t1 = chan::NowUs();
  auto dead_gw = a_->Connect(0xC6130301, 80, blocking);  // 198.19.3.1
  ASSERT_FALSE(dead_gw.ok());
  EXPECT_EQ(Errno(dead_gw.status()), EHOSTUNREACH) << dead_gw.status();
  EXPECT_LT(chan::NowUs() - t1, 3'000'000u) << "it waited for the connect timeout, not for ARP";
  // The stack is unharmed: the routed peer is reachable.
  auto l = b_->Listen(5022);
  ASSERT_TRUE(l.ok()) << l.status();
  auto c = a_->Connect(hosts_.ip_b(), 5022);
  ASSERT_TRUE(c.ok()) << c.status();
  ExpectAcceptedAndBytesFlow(**l, **c);
}

// Through a router, the router picks the rx queue a forwarded frame arrives on (by its own hash
// of the flow), not our tx queue. Channels opened on each of A's 4 queues: each comes up if the
// router's choice for its flow happens to be its queue, and otherwise fails saying why
// (kWrongQueue, with the steering program's count), never as a bare handshake timeout. With 8
// channels, all of them matching has odds of 4^-8.
TEST(RoutedChannelTest, AHandshakeAnsweredOnAnotherRxQueueFailsSayingSo) {
  NETCH_REQUIRE_ROOT();
  TestHosts hosts;
  testing::TestHostsOptions o = testing::StackHostsOptions();
  o.routed = true;
  ASSERT_TRUE(hosts.Up(o).ok());
  chan::DriverOptions ao, bo;
  ao.netns = hosts.ns_a();
  ao.ifname = TestHosts::kDevA;
  ao.accept = false;
  bo.netns = hosts.ns_b();
  bo.ifname = TestHosts::kDevB;
  auto a = tools::OpenChanHost("afxdp", ao);
  ASSERT_TRUE(a.ok()) << a.status();
  auto b = tools::OpenChanHost("afxdp", bo);
  ASSERT_TRUE(b.ok()) << b.status();
  std::vector<std::shared_ptr<chan::Channel>> chans;
  for (int i = 0; i < 8; ++i) {
    chan::ChannelParams cp;
    cp.peer_ipv4 = hosts.ip_b();
    cp.queue = i % 4;
    cp.connect_timeout = absl::Milliseconds(500);
    auto ch = (*a)->driver->Connect(cp);
    ASSERT_TRUE(ch.ok()) << ch.status();
    chans.push_back(std::move(*ch));
  }
  int wrong = 0;
  for (auto& ch : chans) {
    while (ch->state() == chan::ChannelState::kConnecting)
      ch->Wait(absl::Milliseconds(20), chan::Channel::kReadable);
    auto st = (*a)->steer->ReadChanStats(ch->id());
    ASSERT_TRUE(st.ok()) << st.status();
    if (ch->state() == chan::ChannelState::kUp) continue;
    ++wrong;
    EXPECT_EQ(ch->fail_cause(), chan::FailCause::kWrongQueue)
        << chan::FailCauseText(ch->fail_cause());
    EXPECT_GT(st->wrong_queue, 0u) << "channel " << ch->id();
  }
  EXPECT_GT(wrong, 0) << "the router delivered all 8 flows on their own queues (odds 4^-8)";
  for (auto& ch : chans) (void)(*a)->driver->Destroy(*ch);
}

TEST_F(VnsTest, AForgedConnIdCannotInjectAByteIntoAnotherSocket) {
  Open("afxdp", 1);
  auto l = b_->Listen(5010);
  ASSERT_TRUE(l.ok());
  auto victim = a_->Connect(TestHosts::kIpB, 5010);
  ASSERT_TRUE(victim.ok()) << victim.status();
  auto rx = (*l)->Accept();
  ASSERT_TRUE(rx.ok());
  // Another sender on host A shares the channel (as another socket or process would) and
  // forges segments for the victim's port pair, at the offsets the victim's bytes will use,
  // with connection ids that are not the victim's.
  auto chans = a_->driver().Channels();
  ASSERT_EQ(chans.size(), 1u);
  std::vector<uint8_t> evil(1000, 0xee);
  constexpr int kForged = 64;
  for (int i = 0; i < kForged; ++i) {
    chan::TxSegment seg;
    seg.hdr = {NC_DATA,
               NC_CLASS_UNSPEC,
               (*victim)->local_port(),
               5010,
               static_cast<uint32_t>(0x1000 + i),
               static_cast<uint64_t>(i % 4) * 1000};
    seg.payload = evil;
    while (true) {
      auto n = chans[0]->Enqueue({&seg, 1});
      ASSERT_TRUE(n.ok());
      if (*n == 1) break;
      chans[0]->Wait(absl::Milliseconds(5), chan::Channel::kWritable);
    }
  }
  std::vector<uint8_t> good(4000);
  for (size_t i = 0; i < good.size(); ++i) good[i] = PatternByte(7, i);
  ASSERT_TRUE((*victim)->Send(good).ok());
  ASSERT_TRUE((*victim)->Shutdown().ok());
  std::vector<uint8_t> got;
  std::vector<uint8_t> buf(65536);
  for (;;) {
    auto n = (*rx)->Recv(buf);
    ASSERT_TRUE(n.ok()) << n.status();
    if (*n == 0) break;
    got.insert(got.end(), buf.begin(), buf.begin() + *n);
  }
  EXPECT_EQ(got, good) << "bytes of a forged connection id reached the socket";
  EXPECT_GE(b_->Stats().rx_bad_conn, static_cast<uint64_t>(kForged));
}

TEST_F(VnsTest, CloseInTheMiddleOfATransferResetsTheWriter) {
  Open("afxdp", 1);
  auto l = b_->Listen(5004);
  ASSERT_TRUE(l.ok());
  auto c = a_->Connect(TestHosts::kIpB, 5004);
  ASSERT_TRUE(c.ok());
  auto s = (*l)->Accept();
  ASSERT_TRUE(s.ok());
  absl::Status sent;
  std::thread tx([&] { SendStream(**c, 4, 1ull << 30, 1 << 20, &sent); });
  std::vector<uint8_t> buf(1 << 20);
  uint64_t got = 0;
  while (got < (4 << 20)) {
    auto r = (*s)->Recv(buf);
    ASSERT_TRUE(r.ok());
    got += *r;
  }
  EXPECT_TRUE((*s)->Close().ok());
  const uint64_t t0 = chan::NowUs();
  tx.join();
  EXPECT_EQ(Errno(sent), ECONNRESET) << sent;
  EXPECT_LT((chan::NowUs() - t0) / 1e6, 2.0) << "the writer learnt of the close quickly";
}

TEST_F(VnsTest, ApiMisuseReturnsErrorsNeverCrashes) {
  Open("afxdp", 1);
  auto l = b_->Listen(5005);
  ASSERT_TRUE(l.ok());
  EXPECT_EQ(Errno(b_->Listen(5005).status()), EADDRINUSE);
  EXPECT_EQ(Errno(b_->Listen(0).status()), EINVAL);
  EXPECT_EQ(Errno(a_->Connect(TestHosts::kIpB, 0).status()), EINVAL);
  std::vector<uint8_t> buf(16);
  EXPECT_EQ(Errno((*l)->Send(buf).status()), EINVAL) << "send on a listening socket";
  EXPECT_EQ(Errno((*l)->Recv(buf).status()), EINVAL) << "recv on a listening socket";
  auto c = a_->Connect(TestHosts::kIpB, 5005);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(Errno((*c)->Accept().status()), EINVAL) << "accept on a connected socket";
  EXPECT_EQ(Errno((*c)->Recv({static_cast<uint8_t*>(nullptr), 10}).status()), EINVAL);
  (*c)->SetNonBlocking(true);
  EXPECT_EQ(Errno((*c)->Recv(buf).status()), EAGAIN);
  EXPECT_TRUE((*c)->Shutdown().ok());
  EXPECT_EQ(Errno((*c)->Send(buf).status()), EPIPE) << "send after shutdown";
  EXPECT_TRUE((*c)->Close().ok());
  EXPECT_EQ(Errno((*c)->Close()), EBADF) << "double close";
  EXPECT_EQ(Errno((*c)->Send(buf).status()), EBADF) << "send on a closed socket";
  EXPECT_EQ(Errno((*c)->Recv(buf).status()), EBADF);
  EXPECT_EQ((*c)->fd(), -1);
  EXPECT_FALSE(a_->SetCopyWorkers(-1).ok());
  EXPECT_FALSE(a_->SetCopyWorkers(1000).ok());
}

TEST_F(VnsTest, KilledPeerProcessGivesAnErrorWithinTheTimeout) {
  const pid_t child = testing::ForkPeer([&](const std::function<void()>& ready) {
    auto b = Stack::Create(Opts(hosts_.ns_b(), TestHosts::kDevB, "afxdp", 1));
    if (!b.ok()) return;
    auto l = (*b)->Listen(5006);
    if (!l.ok()) return;
    ready();
    auto s = (*l)->Accept();
    std::vector<uint8_t> buf(1 << 16);
    for (int i = 0; i < 600'000 && s.ok(); ++i) {  // bounded: reads until killed
      if (!(*s)->Recv(buf).ok()) break;
    }
  });
  ASSERT_GT(child, 0) << "peer failed to start";
  auto a = Stack::Create(Opts(hosts_.ns_a(), TestHosts::kDevA, "afxdp", 1));
  ASSERT_TRUE(a.ok()) << a.status();
  a_ = std::move(*a);
  auto c = a_->Connect(TestHosts::kIpB, 5006);
  ASSERT_TRUE(c.ok()) << c.status();
  std::vector<uint8_t> buf(1 << 20, 1);
  ASSERT_TRUE((*c)->Send(buf).ok());
  testing::KillPeer(child);
  const uint64_t t0 = chan::NowUs();
  absl::Status st;
  while (chan::NowUs() - t0 < 10'000'000) {  // blocking sends until the error
    auto r = (*c)->Send(buf);
    if (!r.ok()) {
      st = r.status();
      break;
    }
  }
  const double s = (chan::NowUs() - t0) / 1e6;
  EXPECT_EQ(Errno(st), ECONNRESET) << st;
  // The error says why: the dead peer's channel heard nothing for the dead-peer timeout.
  EXPECT_TRUE(absl::StrContains(st.message(), "nothing heard from the peer")) << st;
  EXPECT_LT(s, 2.0) << "dead-peer timeout is 1 s";
  std::vector<uint8_t> rbuf(16);
  EXPECT_EQ(Errno((*c)->Recv(rbuf).status()), ECONNRESET) << "recv reports it too, no hang";
}

TEST_F(VnsTest, KernelTcpDriverCarriesTheSameSockets) {
  Open("tcp", 2, 1);
  auto l = b_->Listen(5007);
  ASSERT_TRUE(l.ok());
  auto c = a_->Connect(TestHosts::kIpB, 5007);
  ASSERT_TRUE(c.ok()) << c.status();
  auto s = (*l)->Accept();
  ASSERT_TRUE(s.ok());
  absl::Status sent;
  std::thread tx([&] { SendStream(**c, 7, 64ull << 20, 1 << 20, &sent); });
  uint64_t bad = 0;
  absl::Status err;
  const uint64_t got = RecvStream(**s, 7, 1 << 20, &bad, &err);
  tx.join();
  EXPECT_TRUE(sent.ok()) << sent;
  EXPECT_EQ(got, 64ull << 20);
  EXPECT_EQ(bad, 0u);
}

}  // namespace
}  // namespace netch::vns
