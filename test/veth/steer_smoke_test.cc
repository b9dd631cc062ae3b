// End to end on veth: the XDP program attached in native mode on test host B steers NetChannel
// frames sent from host A into an AF_XDP socket, intact, while ping and kernel TCP between the
// same hosts keep working and malformed NetChannel frames are dropped and counted.
#include "gtest/gtest.h"
#include "test/support/privilege.h"
#include "test/support/testhosts.h"
#include "tools/steer_demo.h"

namespace netch {
namespace {

TEST(SteerSmokeTest, NetChannelFramesReachAfXdpWhileKernelTrafficFlows) {
  NETCH_REQUIRE_ROOT();
  testing::TestHosts hosts;
  ASSERT_TRUE(hosts.Up().ok());
  tools::SteerDemoOptions o;
  o.ns_tx = hosts.ns_a();
  o.ns_rx = hosts.ns_b();
  o.frames = 2000;
  o.malformed = 100;
  o.payload = 1200;
  auto r = tools::RunSteerDemo(o);
  ASSERT_TRUE(r.ok()) << r.status();
  SCOPED_TRACE(tools::FormatSteerDemo(o, *r));
  EXPECT_EQ(r->attach_mode, "native");
  EXPECT_EQ(r->sent_udp + r->sent_raw, o.frames);
  EXPECT_GT(r->sent_raw, 0u);
  // Every valid frame arrives once, byte for byte — except what the veth pair dropped before
  // any XDP program ran: its ring overflows when both cores are taken for a while (seen in CI:
  // 3 of 2000 frames while the test took 10 s instead of 1; the demo paces its frames and the
  // TCP beside them, and no drop is the rule). Those are counted, never hidden: with none the
  // count is exact, and XDP must have redirected exactly what the socket received.
  if (r->link_drops == 0) {
    EXPECT_EQ(r->received_intact, o.frames) << "every valid frame arrives once, byte for byte";
  } else {
    EXPECT_GE(r->received_intact + r->link_drops, o.frames) << "lost beyond the link's drops";
  }
  EXPECT_EQ(r->received_duplicate, 0u);
  EXPECT_EQ(r->received, r->received_intact) << "nothing malformed reached the socket";
  EXPECT_EQ(r->counters[NC_CNT_REDIRECT], r->received);
  EXPECT_EQ(r->counters[NC_CNT_DROP_BAD_VERSION], o.malformed);
  EXPECT_TRUE(r->ping_ok);
  EXPECT_TRUE(r->tcp_intact) << r->tcp_bytes << " TCP bytes";
  EXPECT_GT(r->counters[NC_CNT_PASS_NOT_UDP], 0u) << "ICMP and TCP passed through XDP";
  EXPECT_EQ(r->xsk.rx_dropped, 0u);
}

}  // namespace
}  // namespace netch
