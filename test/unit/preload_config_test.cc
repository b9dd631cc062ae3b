// Which sockets netchrun routes over NetChannel, and how bad NETCH_* values are reported.
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "preload/preload.h"

namespace netch::preload {
namespace {

std::map<std::string, std::string> g_env;
const char* FakeEnv(const char* k) {
  auto it = g_env.find(k);
  return it == g_env.end() ? nullptr : it->second.c_str();
}

Config Iface() {
  Config c;
  c.local_ip = 0xC6120002;  // 198.18.0.2/24
  c.netmask = 0xFFFFFF00;
  return c;
}

TEST(PreloadConfigTest, ConnectsToTheInterfaceSubnetOnlyAndNeverLoopback) {
  Config c = Iface();
  EXPECT_TRUE(c.RoutesPeer(0xC6120001, 6379));
  EXPECT_FALSE(c.RoutesPeer(0xC6120002, 6379)) << "ourselves: the kernel's loopback path";
  EXPECT_FALSE(c.RoutesPeer(0xC6130001, 6379)) << "another subnet";
  EXPECT_FALSE(c.RoutesPeer(0x7F000001, 6379));
  c.route = Route::kAll;
  EXPECT_TRUE(c.RoutesPeer(0xC6130001, 6379));
  EXPECT_FALSE(c.RoutesPeer(0x7F000001, 6379)) << "loopback never, even with route=all";
  c.route = Route::kNone;
  EXPECT_FALSE(c.RoutesPeer(0xC6120001, 6379));
}

// Another subnet goes over NetChannel when the kernel routes it through the interface (a gateway
// on its link), and stays on the kernel when it leaves through another interface.
TEST(PreloadConfigTest, AnotherSubnetRoutedThroughTheInterfaceGoesOverNetChannel) {
  Config c = Iface();
  c.ifindex = 7;
  c.route_oif = [](uint32_t ip) { return ip == 0xC6130001 ? 7 : ip == 0xC6130002 ? 3 : 0; };
  EXPECT_TRUE(c.RoutesPeer(0xC6130001, 6379)) << "through a gateway on our link";
  EXPECT_FALSE(c.RoutesPeer(0xC6130002, 6379)) << "through another interface";
  EXPECT_FALSE(c.RoutesPeer(0xC6130003, 6379)) << "no route";
  EXPECT_TRUE(c.RoutesPeer(0xC6120001, 6379)) << "the subnet, without asking";
  c.ports = {80};
  EXPECT_FALSE(c.RoutesPeer(0xC6130001, 6379)) << "NETCH_PORTS narrows it too";
}

TEST(PreloadConfigTest, ListensOnTheInterfaceAddressOrAnyAndPortsNarrowBoth) {
  Config c = Iface();
  EXPECT_TRUE(c.RoutesListen(0xC6120002, 80));
  EXPECT_TRUE(c.RoutesListen(0, 80)) << "0.0.0.0 listens on NetChannel";
  EXPECT_FALSE(c.RoutesListen(0x7F000001, 80));
  EXPECT_FALSE(c.RoutesListen(0xC6120002, 0)) << "an ephemeral bind is no listener";
  c.ports = {6379};
  EXPECT_TRUE(c.RoutesListen(0xC6120002, 6379));
  EXPECT_FALSE(c.RoutesListen(0xC6120002, 80));
  EXPECT_TRUE(c.RoutesPeer(0xC6120001, 6379));
  EXPECT_FALSE(c.RoutesPeer(0xC6120001, 80));
}

TEST(PreloadConfigTest, BadVariablesNameThemselves) {
  for (const auto& [k, v] :
       std::vector<std::pair<std::string, std::string>>{{"NETCH_PORTS", "6379,x"},
                                                        {"NETCH_PORTS", "70000"},
                                                        {"NETCH_ROUTE", "some"},
                                                        {"NETCH_ENGINES", "0"},
                                                        {"NETCH_DRIVER", "dpdk"},
                                                        {"NETCH_TX", "rdma"},
                                                        {"NETCH_LINGER_MS", "-1"},
                                                        {"NETCH_CONNECT_TIMEOUT_MS", "0"},
                                                        {"NETCH_CLASS", "bulk"},
                                                        {"NETCH_BUSY_POLL_US", "2000000"},
                                                        {"NETCH_DELIVER_INLINE", "2"},
                                                        {"NETCH_TRANSMIT_INLINE", "-1"},
                                                        {"NETCH_RECEIVE_INLINE", "yes"},
                                                        {"NETCH_DEFER_TRANSMIT", "on"},
                                                        {"NETCH_LOOP_POLL_US", "-5"},
                                                        {"NETCH_LOOP_POLL_US", "2000000"},
                                                        {"NETCH_POLICY", "isolate-classes:x"},
                                                        {"NETCH_ENGINE_CORES", "1,x"},
                                                        {"NETCH_ENGINE_CORES", "-1"},
                                                        {"NETCH_ENGINE_CORES", "1024"}}) {
    g_env = {{"NETCH_ROUTE", "none"}};
    g_env[k] = v;
    auto c = Config::FromEnv(&FakeEnv);
    ASSERT_FALSE(c.ok()) << k << "=" << v;
    EXPECT_NE(c.status().message().find(k), std::string::npos) << c.status();
  }
  g_env = {{"NETCH_ROUTE", "none"}, {"NETCH_PORTS", "6379,8080"}, {"NETCH_CHANNELS", "4"}};
  auto c = Config::FromEnv(&FakeEnv);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->ports, (std::vector<uint16_t>{6379, 8080}));
  EXPECT_EQ(c->channels, 4);
  EXPECT_EQ(c->app_class, 0) << "unspecified unless asked";
  EXPECT_EQ(c->busy_poll_us, -1) << "the policy decides unless asked";
  EXPECT_TRUE(c->deliver_inline);
  EXPECT_TRUE(c->transmit_inline);
  EXPECT_TRUE(c->receive_inline);
  EXPECT_TRUE(c->defer_transmit);
  EXPECT_EQ(c->loop_poll_us, 300) << "an active event loop polls up to 300 us unless asked";
  EXPECT_TRUE(c->engine_cores.empty()) << "engines float unless asked";
  g_env = {{"NETCH_ROUTE", "none"},        {"NETCH_DELIVER_INLINE", "0"},
           {"NETCH_TRANSMIT_INLINE", "0"}, {"NETCH_RECEIVE_INLINE", "0"},
           {"NETCH_DEFER_TRANSMIT", "0"},  {"NETCH_LOOP_POLL_US", "0"}};
  c = Config::FromEnv(&FakeEnv);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_FALSE(c->deliver_inline);
  EXPECT_FALSE(c->transmit_inline);
  EXPECT_FALSE(c->receive_inline);
  EXPECT_FALSE(c->defer_transmit);
  EXPECT_EQ(c->loop_poll_us, 0);
  g_env = {{"NETCH_ROUTE", "none"},
           {"NETCH_POLICY", "isolate-classes:busy_poll_us=200,latency_channels=2"},
           {"NETCH_CLASS", "latency"},
           {"NETCH_BUSY_POLL_US", "50"},
           {"NETCH_ENGINE_CORES", "1,0"}};
  c = Config::FromEnv(&FakeEnv);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->policy, "isolate-classes");
  EXPECT_EQ(c->policy_knobs, (std::vector<std::pair<std::string, std::string>>{
                                 {"busy_poll_us", "200"}, {"latency_channels", "2"}}));
  EXPECT_EQ(c->app_class, 1);
  EXPECT_EQ(c->busy_poll_us, 50);
  EXPECT_EQ(c->engine_cores, (std::vector<int>{1, 0}));
}

TEST(PreloadConfigTest, ANamedInterfaceWithoutAnAddressIsAnError) {
  g_env = {{"NETCH_DEV", "no-such-if0"}};
  auto c = Config::FromEnv(&FakeEnv);
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("no-such-if0"), std::string::npos) << c.status();
}

TEST(LoopPollWindowTest, GrowsWhilePollingWouldHaveCaughtTheEventsAndStopsForIdleLoops) {
  constexpr uint32_t kMax = 300;
  // Caught while polling, or there at once: the window stays.
  EXPECT_EQ(NextLoopPollWindow(100, kMax, 40, /*got=*/true, /*slept=*/false), 100u);
  // Slept, and the events came within what a longer window would have covered: it doubles,
  // from the grow start, up to the maximum.
  EXPECT_EQ(NextLoopPollWindow(0, kMax, 120, true, true), kLoopPollGrowStartUs);
  EXPECT_EQ(NextLoopPollWindow(100, kMax, 250, true, true), 200u);
  EXPECT_EQ(NextLoopPollWindow(200, kMax, 300, true, true), kMax);
  // Events further apart than the maximum, or none before the timeout: it halves, then stops.
  EXPECT_EQ(NextLoopPollWindow(kMax, kMax, 5000, true, true), 150u);
  EXPECT_EQ(NextLoopPollWindow(40, kMax, 5000, true, true), 0u);
  EXPECT_EQ(NextLoopPollWindow(200, kMax, 100000, false, true), 100u);
  // A window above the maximum (its first value, or a lowered knob) is the maximum.
  EXPECT_EQ(NextLoopPollWindow(UINT32_MAX, kMax, 10, true, false), kMax);
  // A loop whose requests come every 2 ms stops polling within a few waits; one whose requests
  // come every 50 us (250 us) grows its window just past that within a few.
  uint32_t w = kMax;
  for (int i = 0; i < 5; ++i) w = NextLoopPollWindow(w, kMax, 2000, true, w < 2000);
  EXPECT_EQ(w, 0u);
  for (int i = 0; i < 5; ++i) w = NextLoopPollWindow(w, kMax, 50, true, w < 50);
  EXPECT_EQ(w, 50u);
  for (int i = 0; i < 5; ++i) w = NextLoopPollWindow(w, kMax, 250, true, w < 250);
  EXPECT_EQ(w, kMax);
}

TEST(PreloadConfigTest, ALoopsLeaseCoversItsRecentPasses) {
  // The lease is the window, or the loop's recent pass between waits if longer, up to the cap.
  EXPECT_EQ(LoopLeaseUs(300, 40), 300u);
  EXPECT_EQ(LoopLeaseUs(300, 1500), 1500u);
  EXPECT_EQ(LoopLeaseUs(300, 100000), kMaxLoopLeaseUs);
  EXPECT_EQ(LoopLeaseUs(0, 1500), 0u) << "a loop that does not poll gives no lease";
  // The recent pass: the longest, decaying by 1/8 per wait.
  uint32_t a = 0;
  a = NextLoopAwayUs(a, 1600);
  EXPECT_EQ(a, 1600u);
  a = NextLoopAwayUs(a, 10);
  EXPECT_EQ(a, 1400u);
  a = NextLoopAwayUs(a, 2000);
  EXPECT_EQ(a, 2000u);
  // A loop whose passes shortened to 10 µs is back at its window within ~20 waits.
  for (int i = 0; i < 20; ++i) a = NextLoopAwayUs(a, 10);
  EXPECT_EQ(LoopLeaseUs(300, a), 300u);
  EXPECT_EQ(NextLoopAwayUs(0, uint64_t{1} << 40), UINT32_MAX) << "clamped, not wrapped";
}

TEST(PreloadConfigTest, ASendRoundRunsOnlyOnASoleLoopsThreadWithinItsLease) {
  constexpr int64_t kUs = 1000, kLease = 1500 * kUs;
  const int64_t round = 1'000'000 * kUs, moved = round - 30'000 * kUs;  // sole for 30 ms
  auto due = [&](int64_t after_us, bool holder, int64_t moved_ns) {
    return LoopSendRoundDue(round + after_us * kUs, round, kLease, holder, moved_ns);
  };
  EXPECT_FALSE(due(kLoopSendRoundUs - 1, true, moved)) << "the last round is recent: it waits";
  EXPECT_TRUE(due(kLoopSendRoundUs, true, moved));
  EXPECT_TRUE(due(1500, true, moved));
  EXPECT_FALSE(due(1501, true, moved)) << "past the lease the engines have the work back";
  EXPECT_FALSE(due(100, /*holder=*/false, moved)) << "another thread polls now";
  EXPECT_FALSE(due(100, true, round - (kLoopSoleUs - 200) * kUs))
      << "polling passed between threads within kLoopSoleUs";
  EXPECT_TRUE(due(100, true, round - (kLoopSoleUs - 100) * kUs));
  EXPECT_FALSE(LoopSendRoundDue(round, 0, kLease, true, 0)) << "no round since the hand-back";
}

}  // namespace
}  // namespace netch::preload
