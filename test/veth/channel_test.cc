// Channels end to end between two veth test hosts, over both drivers: bulk transfers with byte
// checks, fault injection, UMEM accounting, migration between engines, a killed peer.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <set>
#include <string>

#include "absl/strings/str_format.h"
#include "afxdp_channels/engine.h"
#include "gtest/gtest.h"
#include "test/support/privilege.h"
#include "test/support/testhosts.h"
#include "tools/chan_transfer.h"

namespace netch {
namespace {

using testing::TestHosts;

constexpr uint64_t kBulk = 512ull << 20;

class ChannelTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    NETCH_REQUIRE_ROOT();
    testing::TestHostsOptions ho;
    ho.queues = 4;
    ho.mtu = 3506;  // the largest a veth peer takes with XDP attached and no multi-buffer
    ASSERT_TRUE(hosts_.Up(ho).ok());
  }

  chan::DriverOptions Opts(const std::string& ns, const char* dev) {
    chan::DriverOptions o;
    o.netns = ns;
    o.ifname = dev;
    o.engines = 2;
    o.dead_peer_timeout = absl::Seconds(1);
    return o;
  }

  void Open() {
    auto a = tools::OpenChanHost(GetParam(), Opts(hosts_.ns_a(), TestHosts::kDevA));
    ASSERT_TRUE(a.ok()) << a.status();
    a_ = std::move(*a);
    auto b = tools::OpenChanHost(GetParam(), Opts(hosts_.ns_b(), TestHosts::kDevB));
    ASSERT_TRUE(b.ok()) << b.status();
    b_ = std::move(*b);
  }

  void SetDrop(uint32_t ppm) {
    for (auto* h : {a_.get(), b_.get()}) {
      if (h->steer) {
        ASSERT_TRUE(h->steer->SetGlobalDropPpm(ppm).ok());
      }
    }
  }

  static std::string Describe(const tools::TransferResult& r) {
    std::string s = absl::StrFormat("%.2f s, %.2f Gbit/s, %.3f Mpps, error '%s'\n", r.seconds,
                                    r.gbps(), r.mpps(), r.error);
    for (size_t c = 0; c < r.channels.size(); ++c) {
      const auto& ch = r.channels[c];
      s += absl::StrFormat("  ch%u sent %u recv %u in_order %d hash %s retransmits %u\n", c,
                           ch.bytes_sent, ch.bytes_received, ch.in_order,
                           ch.tx_hash == ch.rx_hash ? "match" : "DIFFER", ch.tx_stats.retransmits);
    }
    return s;
  }

  void ExpectFramesReturned() {
    for (auto* h : {a_.get(), b_.get()}) {
      if (GetParam() != "afxdp") continue;
      EXPECT_TRUE(tools::WaitFramesReturned(*h->driver, absl::Seconds(3)))
          << "frames total " << h->driver->Stats().frames_total << " free "
          << h->driver->Stats().frames_free << " in fill " << h->driver->Stats().frames_in_fill;
    }
  }

  // Moves kBulk bytes over `channels` channels; checks integrity and the UMEM afterwards.
  tools::TransferResult Bulk(int channels, absl::Duration deadline = absl::Seconds(60)) {
    tools::TransferOptions o;
    o.peer_ipv4 = TestHosts::kIpB;
    o.channels = channels;
    o.bytes = kBulk;
    o.deadline = deadline;
    auto r = tools::RunTransfer(*a_->driver, *b_->driver, o);
    EXPECT_TRUE(r.ok()) << r.status();
    if (!r.ok()) return {};
    EXPECT_TRUE(r->intact) << channels << " channels: " << Describe(*r);
    ExpectFramesReturned();
    return *r;
  }

  TestHosts hosts_;
  std::unique_ptr<tools::ChanHost> a_, b_;
};

TEST_P(ChannelTest, OneChannelMoves512MiBIntact) {
  Open();
  Bulk(1);
}

TEST_P(ChannelTest, FourChannelsMove512MiBIntact) {
  Open();
  const tools::TransferResult r = Bulk(4);
  if (GetParam() == "afxdp") {
    // Four channels on four queues: each channel's frames arrived on its own queue.
    std::set<int> queues;
    for (const auto& c : r.channels) queues.insert(c.tx_stats.queue);
    EXPECT_EQ(queues.size(), 4u);
  }
}

TEST_P(ChannelTest, TwoPercentDropStillDeliversEveryByte) {
  Open();
  SetDrop(20'000);
  for (int channels : {1, 4}) {
    const tools::TransferResult r = Bulk(channels, absl::Seconds(120));
    uint64_t retransmits = 0;
    for (const auto& c : r.channels) retransmits += c.tx_stats.retransmits;
    if (GetParam() == "afxdp") {
      EXPECT_GT(retransmits, 0u) << "2% drop must cause retransmits";
    }
  }
  if (a_->steer) {
    auto ca = b_->steer->ReadCounters();
    ASSERT_TRUE(ca.ok());
    EXPECT_GT((*ca)[NC_CNT_DROP_FAULT], 0u);
  }
  SetDrop(0);
}

TEST_P(ChannelTest, MigrationBetweenEnginesMidTransferLosesNothing) {
  Open();
  tools::TransferOptions o;
  o.peer_ipv4 = TestHosts::kIpB;
  o.channels = 1;
  o.bytes = 256ull << 20;
  int moves = 0;
  o.on_progress = [&](double progress, const std::vector<std::shared_ptr<chan::Channel>>& tx) {
    // Move the sender's channel back and forth between the two engines while data flows.
    if (progress < 0.1 * (moves + 1) || moves >= 8) return;
    const int target = 1 - tx[0]->stats().engine;
    ASSERT_TRUE(a_->driver->MoveChannel(tx[0]->id(), target).ok());
    EXPECT_EQ(tx[0]->stats().engine, target);
    // ...and every receiving channel too.
    for (const auto& rc : b_->driver->Channels())
      ASSERT_TRUE(b_->driver->MoveChannel(rc->id(), 1 - rc->stats().engine).ok());
    moves++;
  };
  auto r = tools::RunTransfer(*a_->driver, *b_->driver, o);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_GE(moves, 5);
  EXPECT_TRUE(r->intact) << Describe(*r);
  // The engines are distinct OS threads.
  const auto engines = a_->driver->Engines();
  ASSERT_EQ(engines.size(), 2u);
  EXPECT_NE(engines[0].tid, engines[1].tid);
  ExpectFramesReturned();
}

TEST_P(ChannelTest, KilledPeerFailsTheChannelWithinTheTimeout) {
  // The peer runs in a child process, forked before this process has any thread.
  int ready[2];
  ASSERT_EQ(pipe(ready), 0);
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    close(ready[0]);
    auto b = tools::OpenChanHost(GetParam(), Opts(hosts_.ns_b(), TestHosts::kDevB));
    if (!b.ok()) _exit(3);
    (void)!write(ready[1], "r", 1);
    // Accept and drain until killed.
    std::vector<std::shared_ptr<chan::Channel>> chans;
    chan::RxSegment segs[64];
    for (int i = 0; i < 60'000; ++i) {  // bounded: at most ~60 s
      if (auto c = (*b)->driver->Accept()) chans.push_back(c);
      for (auto& c : chans) {
        const size_t n = c->Dequeue(SIZE_MAX, segs);
        c->Release({segs, n});
      }
      usleep(1000);
    }
    _exit(0);
  }
  close(ready[1]);
  char c;
  ASSERT_EQ(read(ready[0], &c, 1), 1) << "peer failed to start";
  close(ready[0]);
  auto a = tools::OpenChanHost(GetParam(), Opts(hosts_.ns_a(), TestHosts::kDevA));
  ASSERT_TRUE(a.ok()) << a.status();
  a_ = std::move(*a);
  chan::ChannelParams p;
  p.peer_ipv4 = TestHosts::kIpB;
  auto ch = a_->driver->Connect(p);
  ASSERT_TRUE(ch.ok()) << ch.status();
  // Wait() also returns while the send buffer has room, so bound the loop by time.
  const uint64_t connect_end = chan::NowUs() + 2'000'000;
  while ((*ch)->state() == chan::ChannelState::kConnecting && chan::NowUs() < connect_end)
    (*ch)->Wait(absl::Milliseconds(10));
  ASSERT_EQ((*ch)->state(), chan::ChannelState::kUp);
  std::vector<uint8_t> payload(1000, 0xab);
  chan::TxSegment seg{{}, payload};
  ASSERT_TRUE((*ch)->Enqueue({&seg, 1}).ok());
  usleep(100'000);

  kill(child, SIGKILL);
  waitpid(child, nullptr, 0);
  const uint64_t killed = chan::NowUs();
  // Keep sending so there is data the dead peer never acknowledges.
  while ((*ch)->state() == chan::ChannelState::kUp && chan::NowUs() - killed < 5'000'000) {
    (void)(*ch)->Enqueue({&seg, 1});
    (*ch)->Wait(absl::Milliseconds(10));
  }
  const double took = (chan::NowUs() - killed) / 1e6;
  EXPECT_EQ((*ch)->state(), chan::ChannelState::kFailed) << chan::StateName((*ch)->state());
  // Configured timeout 1 s; allow scheduling slack on a 2-core machine.
  EXPECT_LT(took, 1.5) << "failed after " << took << " s";
}

INSTANTIATE_TEST_SUITE_P(Drivers, ChannelTest, ::testing::Values("afxdp", "tcp"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace netch
