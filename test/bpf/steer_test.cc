// Kernel-run tests of bpf/steer.bpf.c: the real program, loaded into the kernel, fed crafted
// frames through BPF_PROG_TEST_RUN with a real ingress device and rx queue, and real AF_XDP
// sockets in its XSKMAP. Each frame's verdict (XDP action + exactly one counter + per-channel
// stats) is checked against an explicit table, and for truncations and garbage against the C++
// parser (bpf/wire.h), which encodes the same rules independently.
#include <arpa/inet.h>
#include <bpf/bpf.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>

#include <cstddef>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <vector>

#include "afxdp_channels/xsk.h"
#include "bpf/steer_program.h"
#include "bpf/wire.h"
#include "common/netns.h"
#include "gtest/gtest.h"
#include "test/support/privilege.h"
#include "test/support/testhosts.h"

namespace netch {
namespace {

using Frame = std::vector<uint8_t>;
using netch::NetnsScope;
using testing::TestHosts;

constexpr uint16_t kPort = 9909;

// Offsets into a frame we build (IPv4 without options).
constexpr size_t kIp = wire::kEthLen;
constexpr size_t kUdp = kIp + wire::kIpv4Len;
constexpr size_t kCh = kUdp + wire::kUdpLen;
constexpr size_t kSeg = kCh + wire::kChanHdrLen;  // when no SACK blocks
constexpr size_t kChOff(size_t field) { return kCh + field; }
constexpr size_t kSegOff(size_t field) { return kSeg + field; }

// The steering table the fixture installs: channel -> (queue, slot, drop_ppm, token).
struct ChanRow {
  uint32_t id, queue, slot, drop_ppm;
  uint64_t token = 0;
};
constexpr uint64_t kToken = 0x8877665544332211ull;
constexpr ChanRow kChannels[] = {
    {5, 0, 0, 0},           // on queue 0, the per-queue socket of queue 0
    {6, 1, 7, 0},           // on queue 1, its own socket in slot 7
    {9, 0, 9, 0},           // slot 9 has no socket
    {10, 0, 0, NC_PPM},     // every packet dropped by fault injection
    {1023, 1, 1, 0},        // the highest valid id
    {12, 0, 0, 0, kToken},  // packets must carry its token
};
constexpr uint32_t kSlotsWithXsk[] = {0, 1, 7};

struct Verdict {
  int action;
  nc_counter counter;
  int chan_stat = -1;  // channel whose rx stats must grow (REDIRECT only)
};

class SteerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (geteuid() != 0) return;
    hosts_ = new TestHosts();
    auto s = hosts_->Up({.queues = 2});
    ASSERT_TRUE(s.ok()) << s;
    in_b_ = new NetnsScope(hosts_->ns_b());
    ASSERT_TRUE(in_b_->ok()) << in_b_->status();
    auto prog = bpf::SteerProgram::Load(kPort);
    ASSERT_TRUE(prog.ok()) << prog.status();
    prog_ = prog->release();
    for (uint32_t q = 0; q < 2; ++q) {
      auto umem = afxdp::Umem::Create({.frame_count = 256});
      ASSERT_TRUE(umem.ok()) << umem.status();
      auto xsk = afxdp::XskSocket::Create(umem->get(), {.ifname = TestHosts::kDevB, .queue = q});
      ASSERT_TRUE(xsk.ok()) << xsk.status();
      umems_[q] = umem->release();
      xsks_[q] = xsk->release();
    }
    ASSERT_TRUE(prog_->SetXsk(0, xsks_[0]->fd()).ok());
    ASSERT_TRUE(prog_->SetXsk(1, xsks_[1]->fd()).ok());
    ASSERT_TRUE(prog_->SetXsk(7, xsks_[1]->fd()).ok());
    for (const auto& c : kChannels)
      ASSERT_TRUE(prog_->SetChannel(c.id, c.queue, c.slot, c.token, c.drop_ppm).ok());
  }

  static void TearDownTestSuite() {
    delete prog_;
    for (auto*& x : xsks_) delete x, x = nullptr;
    for (auto*& u : umems_) delete u, u = nullptr;
    delete in_b_;
    delete hosts_;
    prog_ = nullptr, in_b_ = nullptr, hosts_ = nullptr;
  }

  void SetUp() override {
    NETCH_REQUIRE_ROOT();
    ASSERT_NE(prog_, nullptr) << "suite set-up failed";
  }

  static wire::FrameAddrs Addrs() {
    wire::FrameAddrs a;
    a.src_mac = hosts_->mac_a();
    a.dst_mac = hosts_->mac_b();
    a.src_ip = TestHosts::kIpA;
    a.dst_ip = TestHosts::kIpB;
    a.src_port = 40000;
    a.dst_port = kPort;
    return a;
  }

  static Frame Data(uint16_t chan, size_t payload = 100, uint8_t nsacks = 0, uint64_t token = 0) {
    wire::ChanHeader ch;
    ch.type = NC_CT_DATA;
    ch.dst_chan = chan;
    ch.token = token;
    ch.src_chan = 3;
    ch.seq = 17;
    ch.nsacks = nsacks;
    for (uint8_t i = 0; i < nsacks; ++i) ch.sacks[i] = {100u + i * 10, 105u + i * 10};
    wire::SegHeader seg;
    seg.src_port = 1111;
    seg.dst_port = 2222;
    seg.conn_id = 0xabcdef;
    seg.seq = 1ull << 40;
    Frame f(wire::HeadersLen(ch, true) + payload);
    Frame body(payload);
    for (size_t i = 0; i < payload; ++i) body[i] = static_cast<uint8_t>(i * 7);
    EXPECT_EQ(wire::BuildFrame(f, Addrs(), ch, &seg, body), f.size());
    return f;
  }

  static Frame Control(uint8_t type, uint16_t chan, size_t payload = 0) {
    wire::ChanHeader ch;
    ch.type = type;
    ch.dst_chan = chan;
    ch.src_chan = 3;
    Frame f(wire::HeadersLen(ch, false) + payload);
    Frame body(payload, 0x5a);
    EXPECT_EQ(wire::BuildFrame(f, Addrs(), ch, nullptr, body), f.size());
    return f;
  }

  static void FixIpCsum(Frame& f) {
    const size_t ihl = (f[kIp] & 0xf) * 4;
    f[kIp + 10] = f[kIp + 11] = 0;
    uint16_t c = static_cast<uint16_t>(~wire::InternetSum({&f[kIp], ihl}));
    f[kIp + 10] = static_cast<uint8_t>(c >> 8);
    f[kIp + 11] = static_cast<uint8_t>(c);
  }
  static void Put16(Frame& f, size_t off, uint16_t v) {
    f[off] = static_cast<uint8_t>(v >> 8);
    f[off + 1] = static_cast<uint8_t>(v);
  }
  static void Put32(Frame& f, size_t off, uint32_t v) {
    for (int i = 0; i < 4; ++i) f[off + i] = static_cast<uint8_t>(v >> (24 - 8 * i));
  }

  // Runs one frame through the program on nc-b's rx queue `queue`; returns the XDP action (and
  // the frame as the program left it in *out_frame).
  static int Run(const Frame& f, uint32_t queue, Frame* out_frame = nullptr) {
    xdp_md ctx{};
    ctx.ingress_ifindex = static_cast<uint32_t>(hosts_->ifindex_b());
    ctx.rx_queue_index = queue;
    ctx.data_end = static_cast<uint32_t>(f.size());  // the kernel requires data_end == size
    Frame out(f.size() + 256);
    bpf_test_run_opts opts{};
    opts.sz = sizeof(opts);
    opts.data_in = f.data();
    opts.data_size_in = static_cast<uint32_t>(f.size());
    opts.data_out = out.data();
    opts.data_size_out = static_cast<uint32_t>(out.size());
    opts.ctx_in = &ctx;
    opts.ctx_size_in = sizeof(ctx);
    opts.repeat = 1;
    int err = bpf_prog_test_run_opts(prog_->prog_fd(), &opts);
    EXPECT_EQ(err, 0) << "BPF_PROG_TEST_RUN failed: " << std::strerror(errno);
    if (out_frame) out_frame->assign(out.begin(), out.begin() + opts.data_size_out);
    return err ? -1 : static_cast<int>(opts.retval);
  }

  // Independent model of the map-dependent steps, on top of the C++ parser's header rules.
  static Verdict Oracle(const Frame& f, uint32_t queue) {
    auto p = wire::ParseFrame(f, kPort);
    if (!p.valid()) return {wire::IsPassVerdict(p.verdict) ? XDP_PASS : XDP_DROP, p.verdict};
    uint32_t chan = p.ch.dst_chan;
    uint32_t slot = queue;
    uint32_t ppm = 0;
    if (chan != 0) {
      const ChanRow* row = nullptr;
      for (const auto& c : kChannels)
        if (c.id == chan) row = &c;
      if (!row) return {XDP_DROP, NC_CNT_DROP_UNKNOWN_CHANNEL};
      if (row->queue != queue) return {XDP_DROP, NC_CNT_DROP_WRONG_QUEUE};
      if (row->token != p.ch.token) return {XDP_DROP, NC_CNT_DROP_BAD_TOKEN};
      slot = row->slot;
      ppm = row->drop_ppm;
    }
    if (ppm == NC_PPM) return {XDP_DROP, NC_CNT_DROP_FAULT};
    for (uint32_t s : kSlotsWithXsk)
      if (s == slot) return {XDP_REDIRECT, NC_CNT_REDIRECT, static_cast<int>(chan)};
    return {XDP_DROP, NC_CNT_DROP_NO_XSK};
  }

  // Runs a frame and checks action, the one counter that moved, and the channel stats.
  static void Expect(const Frame& f, uint32_t queue, const Verdict& want, const char* what) {
    SCOPED_TRACE(what);
    auto before = prog_->ReadCounters();
    ASSERT_TRUE(before.ok());
    nc_chan_stats cs_before{};
    if (want.chan_stat >= 0) cs_before = *prog_->ReadChanStats(want.chan_stat);
    EXPECT_EQ(Run(f, queue), want.action);
    auto after = prog_->ReadCounters();
    ASSERT_TRUE(after.ok());
    for (int i = 0; i < NC_CNT_MAX; ++i) {
      uint64_t delta = (*after)[i] - (*before)[i];
      EXPECT_EQ(delta, i == want.counter ? 1u : 0u)
          << "counter " << wire::CounterName(static_cast<nc_counter>(i));
    }
    if (want.chan_stat >= 0) {
      auto cs = *prog_->ReadChanStats(want.chan_stat);
      EXPECT_EQ(cs.rx_packets - cs_before.rx_packets, 1u);
      EXPECT_EQ(cs.rx_bytes - cs_before.rx_bytes, f.size());
    }
  }

  static inline TestHosts* hosts_ = nullptr;
  static inline NetnsScope* in_b_ = nullptr;
  static inline bpf::SteerProgram* prog_ = nullptr;
  static inline afxdp::Umem* umems_[2] = {};
  static inline afxdp::XskSocket* xsks_[2] = {};
};

Frame Raw(std::initializer_list<uint8_t> head, size_t pad_to = 60) {
  Frame f(head);
  if (f.size() < pad_to) f.resize(pad_to, 0);
  return f;
}

TEST_F(SteerTest, GoldenTable) {
  const Verdict kRedirect5{XDP_REDIRECT, NC_CNT_REDIRECT, 5};
  auto drop = [](nc_counter c) { return Verdict{XDP_DROP, c}; };
  auto pass = [](nc_counter c) { return Verdict{XDP_PASS, c}; };

  // --- valid NetChannel packets ---
  Expect(Data(5), 0, kRedirect5, "data on channel 5");
  Expect(Data(5, 0), 0, kRedirect5, "data with empty segment payload");
  Expect(Data(5, 1400, 2), 0, kRedirect5, "data with 2 SACK blocks");
  Expect(Control(NC_CT_ACK, 5), 0, kRedirect5, "pure ack");
  Expect(Control(NC_CT_KEEPALIVE, 5), 0, kRedirect5, "keepalive");
  Expect(Control(NC_CT_FIN, 5), 0, kRedirect5, "channel fin");
  Expect(Control(NC_CT_SYN, 0, wire::kHandshakeLen), 1, {XDP_REDIRECT, NC_CNT_REDIRECT, 0},
         "syn to queue 1");
  Expect(Control(NC_CT_COOKIE_ECHO, 0, wire::kHandshakeLen), 0, {XDP_REDIRECT, NC_CNT_REDIRECT, 0},
         "cookie echo, unassigned");
  Expect(Control(NC_CT_SYN_ACK, 5, wire::kHandshakeLen), 0, kRedirect5, "syn_ack to channel 5");
  Expect(Control(NC_CT_COOKIE_ACK, 5, wire::kHandshakeLen), 0, kRedirect5, "cookie ack");
  Expect(Data(12, 100, 0, kToken), 0, {XDP_REDIRECT, NC_CNT_REDIRECT, 12}, "data with its token");
  Expect(Data(6), 1, {XDP_REDIRECT, NC_CNT_REDIRECT, 6}, "channel 6 on its queue");
  Expect(Data(1023), 1, {XDP_REDIRECT, NC_CNT_REDIRECT, 1023}, "highest channel id");
  {
    Frame f = Data(5);
    f.resize(f.size() + 12, 0);  // Ethernet padding after the IP datagram is legal
    Expect(f, 0, kRedirect5, "trailing padding");
  }
  {
    // IPv4 with 8 bytes of options (NOP NOP NOP EOL ...): still ours, still valid.
    Frame f = Data(5);
    f.insert(f.begin() + kIp + 20, {1, 1, 1, 0, 0, 0, 0, 0});
    f[kIp] = 0x47;
    Put16(f, kIp + 2, static_cast<uint16_t>(f.size() - kIp));
    FixIpCsum(f);
    Expect(f, 0, kRedirect5, "ipv4 with options");
    f[kIp + 21] ^= 0xff;  // corrupt an option byte: the checksum covers options too
    Expect(f, 0, drop(NC_CNT_DROP_BAD_IP_CSUM), "ipv4 options corrupted");
  }

  // --- steering failures ---
  Expect(Data(6), 0, drop(NC_CNT_DROP_WRONG_QUEUE), "channel 6 on the wrong queue");
  Expect(Data(9), 0, drop(NC_CNT_DROP_NO_XSK), "slot without socket");
  Expect(Data(10), 0, drop(NC_CNT_DROP_FAULT), "fault injection 100%");
  Expect(Data(77), 0, drop(NC_CNT_DROP_UNKNOWN_CHANNEL), "inactive channel");
  Expect(Data(4000), 0, drop(NC_CNT_DROP_UNKNOWN_CHANNEL), "channel id beyond the table");
  Expect(Data(0), 0, drop(NC_CNT_DROP_UNKNOWN_CHANNEL), "data to unassigned channel");
  Expect(Control(NC_CT_ACK, 0), 0, drop(NC_CNT_DROP_UNKNOWN_CHANNEL), "ack to unassigned");
  Expect(Control(NC_CT_RST, 0), 0, drop(NC_CNT_DROP_UNKNOWN_CHANNEL), "rst to unassigned");
  Expect(Control(NC_CT_SYN_ACK, 0, wire::kHandshakeLen), 0, drop(NC_CNT_DROP_UNKNOWN_CHANNEL),
         "syn_ack to unassigned");
  Expect(Data(12), 0, drop(NC_CNT_DROP_BAD_TOKEN), "data without the channel's token");
  Expect(Data(12, 100, 0, kToken ^ 1), 0, drop(NC_CNT_DROP_BAD_TOKEN), "token off by one bit");
  Expect(Data(5, 100, 0, kToken), 0, drop(NC_CNT_DROP_BAD_TOKEN), "token where none is set");
  Expect(Control(NC_CT_SYN, 0, 16), 0, drop(NC_CNT_DROP_BAD_PAYLOAD_LEN), "syn, short handshake");
  Expect(Control(NC_CT_FIN, 5, 4), 0, drop(NC_CNT_DROP_BAD_PAYLOAD_LEN), "fin with a payload");

  // --- not ours: the kernel gets it untouched ---
  Expect(Raw({0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 2, 0, 0, 0, 0,
              1,    0x08, 0x06, 0,    1,    8,    0, 6, 4, 0, 1}),
         0, pass(NC_CNT_PASS_NOT_IPV4), "arp request");
  {
    Frame f = Data(5);
    f[12] = 0x86, f[13] = 0xdd;
    Expect(f, 0, pass(NC_CNT_PASS_NOT_IPV4), "ipv6 ethertype");
    Frame v = Data(5);
    v.insert(v.begin() + 12, {0x81, 0x00, 0x00, 0x07});  // 802.1Q tag in front of a valid frame
    Expect(v, 0, pass(NC_CNT_PASS_NOT_IPV4), "vlan tagged");
  }
  {
    Frame f = Data(5);
    f[kIp + 9] = 1;  // ICMP
    FixIpCsum(f);
    Expect(f, 0, pass(NC_CNT_PASS_NOT_UDP), "icmp");
    f[kIp + 9] = 6;  // TCP
    FixIpCsum(f);
    Expect(f, 0, pass(NC_CNT_PASS_NOT_UDP), "tcp");
  }
  {
    Frame f = Data(5);
    Put16(f, kUdp + 2, 53);
    Expect(f, 0, pass(NC_CNT_PASS_OTHER_PORT), "udp to another port");
    Frame g = Data(5);
    Put16(g, kIp + 6, 0x2000);  // MF
    FixIpCsum(g);
    Expect(g, 0, pass(NC_CNT_PASS_FRAGMENT), "first fragment");
    Put16(g, kIp + 6, 0x0010);  // offset 128
    FixIpCsum(g);
    Expect(g, 0, pass(NC_CNT_PASS_FRAGMENT), "later fragment");
    Frame h = Data(5);
    h[kIp] = 0x44;  // IHL 4
    Expect(h, 0, pass(NC_CNT_PASS_UNPARSED), "ihl below 5");
    h[kIp] = 0x65;  // IP version 6 under the IPv4 ethertype
    Expect(h, 0, pass(NC_CNT_PASS_UNPARSED), "ip version 6 in ipv4 frame");
  }

  // --- ours but malformed: dropped and counted by reason ---
  {
    Frame f = Data(5);
    f[kIp + 10] ^= 1;
    Expect(f, 0, drop(NC_CNT_DROP_BAD_IP_CSUM), "bad ip checksum");
  }
  {
    Frame f = Data(5);
    Put16(f, kIp + 2, static_cast<uint16_t>(f.size() - kIp + 1));
    FixIpCsum(f);
    Expect(f, 0, drop(NC_CNT_DROP_TRUNCATED), "ip total length beyond frame");
    Put16(f, kIp + 2, 27);
    FixIpCsum(f);
    Expect(f, 0, drop(NC_CNT_DROP_BAD_IP_LEN), "ip total length below ip+udp");
  }
  {
    Frame f = Data(5);
    Put16(f, kUdp + 4, static_cast<uint16_t>(f.size() - kUdp - 1));
    Expect(f, 0, drop(NC_CNT_DROP_BAD_UDP_LEN), "udp length lies");
  }
  {
    Frame f = Data(5);
    f[kChOff(offsetof(nc_chan_hdr, version))] = NC_WIRE_VERSION + 1;
    Expect(f, 0, drop(NC_CNT_DROP_BAD_VERSION), "unknown version");
  }
  for (uint8_t hl : {0, 31, 36, 33, 255}) {
    Frame f = Data(5);
    f[kChOff(offsetof(nc_chan_hdr, hdr_len))] = hl;
    Expect(f, 0, drop(NC_CNT_DROP_BAD_HDR_LEN), "bad channel hdr_len");
  }
  {
    Frame f = Data(5);
    Put16(f, kChOff(offsetof(nc_chan_hdr, payload_len)), 99);
    Expect(f, 0, drop(NC_CNT_DROP_BAD_PAYLOAD_LEN), "channel payload_len lies");
    Frame a = Control(NC_CT_ACK, 5, 4);
    Expect(a, 0, drop(NC_CNT_DROP_BAD_PAYLOAD_LEN), "ack carrying payload");
  }
  for (uint8_t t : {0, NC_CT_MAX + 1, 255}) {
    Frame f = Data(5);
    f[kChOff(offsetof(nc_chan_hdr, type))] = t;
    Expect(f, 0, drop(NC_CNT_DROP_BAD_TYPE), "unknown channel type");
  }
  {
    Frame f = Data(5);
    f[kSegOff(offsetof(nc_hdr, type))] = 0;
    Expect(f, 0, drop(NC_CNT_DROP_BAD_NC_HDR), "segment type 0");
    Frame g = Data(5);
    g[kSegOff(offsetof(nc_hdr, hdr_len))] = 23;
    Expect(g, 0, drop(NC_CNT_DROP_BAD_NC_HDR), "segment hdr_len too small");
    Frame h = Data(5);
    Put32(h, kSegOff(offsetof(nc_hdr, payload_len)), 101);
    Expect(h, 0, drop(NC_CNT_DROP_BAD_NC_HDR), "segment payload_len lies");
    Frame d = Control(NC_CT_DATA, 5, 10);  // DATA too short for a segment header
    Expect(d, 0, drop(NC_CNT_DROP_BAD_NC_HDR), "data without segment header");
  }
}

TEST_F(SteerTest, MultiBufferFrameIsSteeredWithItsFullLength) {
  // Larger than one page: BPF_PROG_TEST_RUN builds a multi-buffer xdp_buff for xdp.frags programs.
  Frame f = Data(5, 6000);
  Expect(f, 0, {XDP_REDIRECT, NC_CNT_REDIRECT, 5}, "6 KB multi-buffer data");
  Frame g = Data(5, 6000);
  Put16(g, kIp + 2, static_cast<uint16_t>(g.size() - kIp + 4));
  FixIpCsum(g);
  Expect(g, 0, {XDP_DROP, NC_CNT_DROP_TRUNCATED}, "multi-buffer truncated");
}

TEST_F(SteerTest, TruncationAtEveryOffsetIsNeverRedirected) {
  for (const Frame& full : {Data(5, 40, 1), Control(NC_CT_SYN, 0, wire::kHandshakeLen)}) {
    // The kernel refuses test frames shorter than an Ethernet header; start there.
    for (size_t len = ETH_HLEN; len < full.size(); ++len) {
      Frame f(full.begin(), full.begin() + static_cast<long>(len));
      // Shorter than Ethernet+IPv4+UDP: cannot be told apart from anything else, so the kernel
      // gets it. Anything longer carries our port and is short of what IP says: truncated.
      Verdict want = len < wire::kOuterLen ? Verdict{XDP_PASS, NC_CNT_PASS_UNPARSED}
                                           : Verdict{XDP_DROP, NC_CNT_DROP_TRUNCATED};
      Verdict oracle = Oracle(f, 0);
      ASSERT_EQ(oracle.counter, want.counter) << "C++ parser disagrees at length " << len;
      Expect(f, 0, want, ("truncated to " + std::to_string(len)).c_str());
    }
  }
}

TEST_F(SteerTest, GarbageIsCountedAndNeverRedirectedUnlessValid) {
  std::mt19937_64 rng(0x5eed);
  auto byte = [&] { return static_cast<uint8_t>(rng()); };
  std::map<int, uint64_t> want_counts;
  auto before = *prog_->ReadCounters();
  const Frame seeds[] = {Data(5, 64), Data(6, 300, 2), Control(NC_CT_SYN, 0, wire::kHandshakeLen),
                         Control(NC_CT_ACK, 5)};
  int runs = 0;
  int redirects = 0;
  auto check = [&](const Frame& f, uint32_t queue) {
    Verdict want = Oracle(f, queue);
    int got = Run(f, queue);
    ASSERT_EQ(got, want.action) << "frame of " << f.size() << " bytes, expected "
                                << wire::CounterName(want.counter);
    want_counts[want.counter]++;
    runs++;
    redirects += got == XDP_REDIRECT;
  };
  // 1) Pure garbage of every plausible length.
  for (int i = 0; i < 3000; ++i) {
    Frame f(14 + rng() % 300);
    for (auto& b : f) b = byte();
    if (i % 3 == 0) f[12] = 0x08, f[13] = 0x00;  // claim IPv4 to reach deeper
    check(f, static_cast<uint32_t>(rng() % 2));
  }
  // 2) Valid headers followed by garbage from a random offset (headers partially intact).
  for (int i = 0; i < 3000; ++i) {
    Frame f = seeds[rng() % std::size(seeds)];
    for (size_t j = 14 + rng() % (f.size() - 14); j < f.size(); ++j) f[j] = byte();
    if (rng() % 2) FixIpCsum(f);
    check(f, static_cast<uint32_t>(rng() % 2));
  }
  // 3) Valid frames with 1-4 bytes flipped: exercises every individual check.
  for (int i = 0; i < 6000; ++i) {
    Frame f = seeds[rng() % std::size(seeds)];
    for (int k = 1 + static_cast<int>(rng() % 4); k > 0; --k) f[rng() % f.size()] = byte();
    if (rng() % 2) FixIpCsum(f);
    check(f, static_cast<uint32_t>(rng() % 2));
  }
  auto after = *prog_->ReadCounters();
  uint64_t total = 0;
  for (int i = 0; i < NC_CNT_MAX; ++i) {
    EXPECT_EQ(after[i] - before[i], want_counts[i])
        << "counter " << wire::CounterName(static_cast<nc_counter>(i));
    total += after[i] - before[i];
  }
  EXPECT_EQ(total, static_cast<uint64_t>(runs)) << "every frame lands in exactly one counter";
  // The mutations must actually reach deep checks, or this test proves little.
  EXPECT_GT(want_counts[NC_CNT_DROP_BAD_NC_HDR], 0u);
  EXPECT_GT(want_counts[NC_CNT_DROP_BAD_TYPE], 0u);
  EXPECT_GT(want_counts[NC_CNT_DROP_BAD_IP_CSUM], 0u);
  EXPECT_GT(redirects, 0);
}

TEST_F(SteerTest, RuntimeMapChangesTakeEffectOnTheNextPacket) {
  Expect(Data(77), 0, {XDP_DROP, NC_CNT_DROP_UNKNOWN_CHANNEL}, "before");
  ASSERT_TRUE(prog_->SetChannel(77, 0, 0).ok());
  Expect(Data(77), 0, {XDP_REDIRECT, NC_CNT_REDIRECT, 77}, "after SetChannel");
  ASSERT_TRUE(prog_->SetGlobalDropPpm(NC_PPM).ok());
  Expect(Data(77), 0, {XDP_DROP, NC_CNT_DROP_FAULT}, "global fault injection");
  ASSERT_TRUE(prog_->SetGlobalDropPpm(0).ok());
  ASSERT_TRUE(prog_->ClearChannel(77).ok());
  Expect(Data(77), 0, {XDP_DROP, NC_CNT_DROP_UNKNOWN_CHANNEL}, "after ClearChannel");
  ASSERT_TRUE(prog_->SetUdpPort(kPort + 1).ok());
  Expect(Data(5), 0, {XDP_PASS, NC_CNT_PASS_OTHER_PORT}, "port moved");
  ASSERT_TRUE(prog_->SetUdpPort(kPort).ok());
  EXPECT_FALSE(prog_->SetChannel(0, 0, 0).ok());
  EXPECT_FALSE(prog_->SetChannel(NC_MAX_CHANNELS, 0, 0).ok());
  EXPECT_FALSE(prog_->SetGlobalDropPpm(NC_PPM + 1).ok());
}

TEST_F(SteerTest, CeMarkingSetsCeOnEcnCapablePacketsAndKeepsTheChecksumValid) {
  ASSERT_TRUE(prog_->SetChannel(78, 0, 0).ok());
  ASSERT_TRUE(prog_->SetCeMarkPpm(NC_PPM).ok());
  auto before = prog_->ReadChanStats(78);
  ASSERT_TRUE(before.ok());
  for (uint8_t ecn : {0, 1, 2, 3}) {
    SCOPED_TRACE(static_cast<int>(ecn));
    Frame f = Data(78);
    f[kIp + 1] = static_cast<uint8_t>(0xb8 | ecn);  // DSCP EF plus the ECN field
    FixIpCsum(f);
    Frame out;
    EXPECT_EQ(Run(f, 0, &out), XDP_REDIRECT);
    const auto p = wire::ParseFrame(out, kPort);
    EXPECT_TRUE(p.valid()) << "checksum must still verify: " << wire::CounterName(p.verdict);
    const uint8_t want = ecn == 1 || ecn == 2 ? 3 : ecn;  // only ECT(0)/ECT(1) become CE
    EXPECT_EQ(p.tos & 3, want);
    EXPECT_EQ(p.tos & 0xfc, 0xb8) << "DSCP untouched";
  }
  auto after = prog_->ReadChanStats(78);
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(after->ce_marked - before->ce_marked, 2u);
  ASSERT_TRUE(prog_->SetCeMarkPpm(0).ok());
  ASSERT_TRUE(prog_->ClearChannel(78).ok());
}

TEST_F(SteerTest, TcpFaultInjectionHitsOnlyTheConfiguredPort) {
  // A TCP segment (the UDP header's place now holds the TCP ports) from port 40000 to 9910.
  Frame f = Data(5);
  f[kIp + 9] = 6;
  FixIpCsum(f);
  const size_t l4 = kIp + 20;
  Put16(f, l4, 40000);
  Put16(f, l4 + 2, 9910);
  Expect(f, 0, {XDP_PASS, NC_CNT_PASS_NOT_UDP}, "no fault port: untouched");
  ASSERT_TRUE(prog_->SetTcpFaultPort(9910).ok());
  Expect(f, 0, {XDP_PASS, NC_CNT_PASS_NOT_UDP}, "fault port but no drop rate");
  ASSERT_TRUE(prog_->SetGlobalDropPpm(NC_PPM).ok());
  Expect(f, 0, {XDP_DROP, NC_CNT_DROP_FAULT}, "destination port matches");
  Put16(f, l4, 9910);
  Put16(f, l4 + 2, 40000);
  Expect(f, 0, {XDP_DROP, NC_CNT_DROP_FAULT}, "source port matches (the reverse direction)");
  Put16(f, l4, 40001);
  Expect(f, 0, {XDP_PASS, NC_CNT_PASS_NOT_UDP}, "other TCP connections pass");
  ASSERT_TRUE(prog_->SetGlobalDropPpm(0).ok());
  ASSERT_TRUE(prog_->SetTcpFaultPort(0).ok());
}

}  // namespace
}  // namespace netch
