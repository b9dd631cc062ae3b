// Unit tests of the C++ side of the wire format (no kernel involved).
#include "bpf/wire.h"

#include <arpa/inet.h>

#include <set>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace netch::wire {
namespace {

FrameAddrs Addrs() {
  FrameAddrs a;
  a.src_mac = {2, 0, 0, 0, 0, 1};
  a.dst_mac = {2, 0, 0, 0, 0, 2};
  a.src_ip = 0xC6120001;
  a.dst_ip = 0xC6120002;
  a.src_port = 41000;
  a.dst_port = 9909;
  return a;
}

TEST(WireTest, InternetSumMatchesRfc1071Example) {
  // RFC 1071 section 3 example: 0001 f203 f4f5 f6f7 -> sum ddf2.
  const uint8_t b[] = {0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7};
  EXPECT_EQ(InternetSum(b), 0xddf2);
  const uint8_t odd[] = {0x01};
  EXPECT_EQ(InternetSum(odd), 0x0100);
}

TEST(WireTest, DataFrameRoundTrips) {
  ChanHeader ch;
  ch.type = NC_CT_DATA;
  ch.flags = NC_CF_ECE;
  ch.dst_chan = 12;
  ch.src_chan = 34;
  ch.seq = 0xfffffff0;
  ch.ack = 7;
  ch.wnd = 1 << 20;
  ch.ts_val = 123456;
  ch.ts_ecr = 654321;
  ch.nsacks = 2;
  ch.sacks[0] = {10, 20};
  ch.sacks[1] = {30, 40};
  SegHeader seg;
  seg.type = NC_DATA;
  seg.app_class = NC_CLASS_THROUGHPUT;
  seg.src_port = 5000;
  seg.dst_port = 6000;
  seg.conn_id = 0xdeadbeef;
  seg.seq = 0x0123456789abcdefull;
  std::vector<uint8_t> payload(1000);
  for (size_t i = 0; i < payload.size(); ++i) payload[i] = static_cast<uint8_t>(i);
  std::vector<uint8_t> f(2000);
  size_t n = BuildFrame(f, Addrs(), ch, &seg, payload);
  ASSERT_EQ(n, HeadersLen(ch, true) + payload.size());
  f.resize(n);

  ParsedFrame p = ParseFrame(f, 9909);
  ASSERT_TRUE(p.valid()) << CounterName(p.verdict);
  EXPECT_EQ(p.src_ip, 0xC6120001u);
  EXPECT_EQ(p.dst_ip, 0xC6120002u);
  EXPECT_EQ(p.src_port, 41000);
  EXPECT_EQ(p.ch.type, NC_CT_DATA);
  EXPECT_EQ(p.ch.flags, NC_CF_ECE);
  EXPECT_EQ(p.ch.dst_chan, 12);
  EXPECT_EQ(p.ch.src_chan, 34);
  EXPECT_EQ(p.ch.seq, 0xfffffff0u);
  EXPECT_EQ(p.ch.ack, 7u);
  EXPECT_EQ(p.ch.wnd, 1u << 20);
  EXPECT_EQ(p.ch.ts_val, 123456u);
  EXPECT_EQ(p.ch.ts_ecr, 654321u);
  ASSERT_EQ(p.ch.nsacks, 2);
  EXPECT_EQ(p.ch.sacks[1].start, 30u);
  EXPECT_EQ(p.ch.sacks[1].end, 40u);
  ASSERT_TRUE(p.has_seg);
  EXPECT_EQ(p.seg.app_class, NC_CLASS_THROUGHPUT);
  EXPECT_EQ(p.seg.src_port, 5000);
  EXPECT_EQ(p.seg.dst_port, 6000);
  EXPECT_EQ(p.seg.conn_id, 0xdeadbeefu);
  EXPECT_EQ(p.seg.seq, 0x0123456789abcdefull);
  ASSERT_EQ(p.seg_payload_len, payload.size());
  EXPECT_EQ(std::vector<uint8_t>(f.begin() + static_cast<long>(p.seg_payload_off), f.end()),
            payload);
  // Byte order on the wire is big-endian: spot-check the raw bytes of dst_chan and the UDP port.
  EXPECT_EQ(f[kOuterLen + 4], 0);
  EXPECT_EQ(f[kOuterLen + 5], 12);
  EXPECT_EQ(f[kEthLen + kIpv4Len + 2], 9909 >> 8);
  // The IPv4 header checksum verifies.
  EXPECT_EQ(InternetSum({&f[kEthLen], kIpv4Len}), 0xffff);
  EXPECT_EQ(f[kEthLen + 6] & 0x40, 0x40) << "DF set";
}

TEST(WireTest, ParseRejectsOtherPortAndShortFrames) {
  ChanHeader ch;
  ch.type = NC_CT_ACK;
  ch.dst_chan = 3;
  std::vector<uint8_t> f(HeadersLen(ch, false));
  ASSERT_EQ(BuildFrame(f, Addrs(), ch, nullptr, {}), f.size());
  EXPECT_TRUE(ParseFrame(f, 9909).valid());
  EXPECT_EQ(ParseFrame(f, 9910).verdict, NC_CNT_PASS_OTHER_PORT);
  EXPECT_EQ(ParseFrame(std::span(f).first(13), 9909).verdict, NC_CNT_PASS_UNPARSED);
  EXPECT_EQ(ParseFrame(std::span(f).first(50), 9909).verdict, NC_CNT_DROP_TRUNCATED);
  EXPECT_EQ(ParseFrame({}, 9909).verdict, NC_CNT_PASS_UNPARSED);
}

TEST(WireTest, BuildFrameRefusesWhatDoesNotFit) {
  ChanHeader ch;
  SegHeader seg;
  std::vector<uint8_t> payload(100);
  std::vector<uint8_t> small(HeadersLen(ch, true) + 99);
  EXPECT_EQ(BuildFrame(small, Addrs(), ch, &seg, payload), 0u);
  std::vector<uint8_t> huge_payload(70000);
  std::vector<uint8_t> big(80000);
  EXPECT_EQ(BuildFrame(big, Addrs(), ch, &seg, huge_payload), 0u) << "exceeds IPv4 total length";
  ch.nsacks = kMaxSacks + 1;
  EXPECT_EQ(BuildFrame(big, Addrs(), ch, &seg, payload), 0u);
}

TEST(WireTest, CounterNamesAreUniqueAndPrometheusSafe) {
  std::set<std::string> names;
  for (int i = 0; i < NC_CNT_MAX; ++i) {
    std::string n(CounterName(static_cast<nc_counter>(i)));
    EXPECT_NE(n, "unknown");
    EXPECT_TRUE(names.insert(n).second) << n;
    for (char c : n) EXPECT_TRUE((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_') << n;
  }
  EXPECT_TRUE(IsPassVerdict(NC_CNT_PASS_OTHER_PORT));
  EXPECT_FALSE(IsPassVerdict(NC_CNT_REDIRECT));
  EXPECT_FALSE(IsPassVerdict(NC_CNT_DROP_FAULT));
}

}  // namespace
}  // namespace netch::wire
