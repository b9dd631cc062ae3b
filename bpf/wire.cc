#include "bpf/wire.h"

#include <arpa/inet.h>
#include <endian.h>

#include <cstring>

namespace netch::wire {
namespace {

static_assert(NC_CNT_PASS_OTHER_PORT + 1 == NC_CNT_REDIRECT,
              "IsPassVerdict relies on every PASS_* counter preceding REDIRECT");

constexpr uint16_t kEthPIp = 0x0800;
constexpr uint8_t kIpProtoUdp = 17;

template <typename T>
T Load(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
void Store(uint8_t* p, const T& v) {
  std::memcpy(p, &v, sizeof(v));
}

uint16_t Be16(const uint8_t* p) { return static_cast<uint16_t>(p[0] << 8 | p[1]); }
uint32_t Be32(const uint8_t* p) { return uint32_t{Be16(p)} << 16 | Be16(p + 2); }

}  // namespace

uint16_t InternetSum(std::span<const uint8_t> data) {
  uint32_t sum = 0;
  size_t i = 0;
  for (; i + 1 < data.size(); i += 2) sum += Be16(&data[i]);
  if (i < data.size()) sum += static_cast<uint32_t>(data[i]) << 8;
  while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
  return static_cast<uint16_t>(sum);
}

size_t WriteSegHeader(uint8_t* out, const SegHeader& seg, size_t payload_len) {
  nc_hdr s{};
  s.type = seg.type;
  s.app_class = seg.app_class;
  s.hdr_len = kSegHdrLen;
  s.src_port = htons(seg.src_port);
  s.dst_port = htons(seg.dst_port);
  s.conn_id = htonl(seg.conn_id);
  s.payload_len = htonl(static_cast<uint32_t>(payload_len));
  s.seq = htobe64(seg.seq);
  Store(out, s);
  return kSegHdrLen;
}

nc_counter ParseSegment(std::span<const uint8_t> b, SegHeader* seg, size_t* payload_off) {
  return ParseSegment(b, b.size(), seg, payload_off);
}

nc_counter ParseSegment(std::span<const uint8_t> head, size_t total, SegHeader* seg,
                        size_t* payload_off) {
  if (total < kSegHdrLen) return NC_CNT_DROP_BAD_NC_HDR;
  if (head.size() < kSegHdrLen) return NC_CNT_DROP_TRUNCATED;
  const auto s = Load<nc_hdr>(head.data());
  if (s.type < NC_DATA || s.type > NC_TYPE_MAX) return NC_CNT_DROP_BAD_NC_HDR;
  const size_t shlen = s.hdr_len;
  if (shlen < kSegHdrLen || shlen > total) return NC_CNT_DROP_BAD_NC_HDR;
  if (shlen + static_cast<size_t>(ntohl(s.payload_len)) != total) return NC_CNT_DROP_BAD_NC_HDR;
  seg->type = s.type;
  seg->app_class = s.app_class;
  seg->src_port = ntohs(s.src_port);
  seg->dst_port = ntohs(s.dst_port);
  seg->conn_id = ntohl(s.conn_id);
  seg->seq = be64toh(s.seq);
  *payload_off = shlen;
  return NC_CNT_REDIRECT;
}

size_t WriteChanHeader(uint8_t* out, const ChanHeader& ch, size_t chan_payload_len) {
  const size_t chan_hlen = kChanHdrLen + ch.nsacks * sizeof(nc_sack_block);
  nc_chan_hdr h{};
  h.version = NC_WIRE_VERSION;
  h.type = ch.type;
  h.flags = ch.flags;
  h.hdr_len = static_cast<uint8_t>(chan_hlen);
  h.dst_chan = htons(ch.dst_chan);
  h.src_chan = htons(ch.src_chan);
  h.seq = htonl(ch.seq);
  h.ack = htonl(ch.ack);
  h.wnd = htonl(ch.wnd);
  h.ts_val = htonl(ch.ts_val);
  h.ts_ecr = htonl(ch.ts_ecr);
  h.payload_len = htons(static_cast<uint16_t>(chan_payload_len));
  h.token = htobe64(ch.token);
  Store(out, h);
  uint8_t* p = out + kChanHdrLen;
  for (uint8_t i = 0; i < ch.nsacks; ++i) {
    nc_sack_block b{htonl(ch.sacks[i].start), htonl(ch.sacks[i].end)};
    Store(p, b);
    p += sizeof(b);
  }
  return chan_hlen;
}

size_t WriteHeaders(uint8_t* out, const FrameAddrs& a, const ChanHeader& ch, const SegHeader* seg,
                    size_t payload_len) {
  const size_t chan_hlen = kChanHdrLen + ch.nsacks * sizeof(nc_sack_block);
  const size_t seg_hlen = seg ? kSegHdrLen : 0;
  const size_t chan_payload = seg_hlen + payload_len;
  const size_t udp_len = kUdpLen + chan_hlen + chan_payload;

  // Ethernet
  std::memcpy(out, a.dst_mac.data(), 6);
  std::memcpy(out + 6, a.src_mac.data(), 6);
  Store<uint16_t>(out + 12, htons(kEthPIp));

  // IPv4, no options, DF: NetChannel never fragments (the MTU bounds every segment).
  uint8_t* ip = out + kEthLen;
  ip[0] = 0x45;
  ip[1] = a.tos;
  Store<uint16_t>(ip + 2, htons(static_cast<uint16_t>(kIpv4Len + udp_len)));
  Store<uint16_t>(ip + 4, 0);              // id: irrelevant with DF
  Store<uint16_t>(ip + 6, htons(0x4000));  // DF
  ip[8] = a.ttl;
  ip[9] = kIpProtoUdp;
  Store<uint16_t>(ip + 10, 0);
  Store<uint32_t>(ip + 12, htonl(a.src_ip));
  Store<uint32_t>(ip + 16, htonl(a.dst_ip));
  Store<uint16_t>(ip + 10, htons(static_cast<uint16_t>(~InternetSum({ip, kIpv4Len}))));

  // UDP. Checksum 0 (legal for IPv4): the payload is covered by the link CRC, and computing it
  // in software would cost a full pass over every byte; see docs/WIRE.md.
  uint8_t* udp = ip + kIpv4Len;
  Store<uint16_t>(udp, htons(a.src_port));
  Store<uint16_t>(udp + 2, htons(a.dst_port));
  Store<uint16_t>(udp + 4, htons(static_cast<uint16_t>(udp_len)));
  Store<uint16_t>(udp + 6, 0);

  uint8_t* p = udp + kUdpLen;
  p += WriteChanHeader(p, ch, chan_payload);
  if (seg) p += WriteSegHeader(p, *seg, payload_len);
  return static_cast<size_t>(p - out);
}

size_t BuildFrame(std::span<uint8_t> out, const FrameAddrs& addrs, const ChanHeader& ch,
                  const SegHeader* seg, std::span<const uint8_t> payload) {
  if (ch.nsacks > kMaxSacks) return 0;
  const size_t hlen = HeadersLen(ch, seg != nullptr);
  if (hlen + payload.size() > out.size()) return 0;
  if (hlen - kEthLen + payload.size() > 0xffff) return 0;  // IPv4 total length
  WriteHeaders(out.data(), addrs, ch, seg, payload.size());
  if (!payload.empty()) std::memcpy(out.data() + hlen, payload.data(), payload.size());
  return hlen + payload.size();
}

ParsedFrame ParseFrame(std::span<const uint8_t> f, uint16_t udp_port) {
  return ParseFrame(f, f.size(), udp_port);
}

ParsedFrame ParseFrame(std::span<const uint8_t> f, size_t frame_len, uint16_t udp_port) {
  ParsedFrame r;
  auto verdict = [&r](nc_counter c) {
    r.verdict = c;
    return r;
  };
  if (f.size() < kEthLen) return verdict(NC_CNT_PASS_UNPARSED);
  if (Be16(&f[12]) != kEthPIp) return verdict(NC_CNT_PASS_NOT_IPV4);
  if (f.size() < kEthLen + kIpv4Len) return verdict(NC_CNT_PASS_UNPARSED);
  const uint8_t* ip = &f[kEthLen];
  const size_t ihl = ip[0] & 0x0f;
  if ((ip[0] >> 4) != 4 || ihl < 5) return verdict(NC_CNT_PASS_UNPARSED);
  if (ip[9] != kIpProtoUdp) return verdict(NC_CNT_PASS_NOT_UDP);
  if (Be16(ip + 6) & 0x3fff) return verdict(NC_CNT_PASS_FRAGMENT);
  const size_t l4 = kEthLen + ihl * 4;
  if (f.size() < l4 + kUdpLen) return verdict(NC_CNT_PASS_UNPARSED);
  const uint8_t* udp = &f[l4];
  if (Be16(udp + 2) != udp_port) return verdict(NC_CNT_PASS_OTHER_PORT);

  if (InternetSum({ip, ihl * 4}) != 0xffff) return verdict(NC_CNT_DROP_BAD_IP_CSUM);
  const size_t tot_len = Be16(ip + 2);
  if (tot_len < ihl * 4 + kUdpLen) return verdict(NC_CNT_DROP_BAD_IP_LEN);
  if (frame_len < f.size() || tot_len > frame_len - kEthLen) return verdict(NC_CNT_DROP_TRUNCATED);
  const size_t udp_len = Be16(udp + 4);
  if (udp_len != tot_len - ihl * 4) return verdict(NC_CNT_DROP_BAD_UDP_LEN);
  r.src_ip = ntohl(Load<uint32_t>(ip + 12));
  r.dst_ip = ntohl(Load<uint32_t>(ip + 16));
  r.src_port = Be16(udp);
  r.tos = ip[1];

  const size_t chan_len = udp_len - kUdpLen;
  const size_t choff = l4 + kUdpLen;
  if (chan_len < kChanHdrLen) return verdict(NC_CNT_DROP_TRUNCATED);
  // Headers must sit in the first buffer (the program's data_end check); payload may not.
  if (f.size() < choff + kChanHdrLen) return verdict(NC_CNT_DROP_TRUNCATED);
  const auto h = Load<nc_chan_hdr>(&f[choff]);
  if (h.version != NC_WIRE_VERSION) return verdict(NC_CNT_DROP_BAD_VERSION);
  const size_t hlen = h.hdr_len;
  if (hlen < kChanHdrLen || (hlen - kChanHdrLen) % sizeof(nc_sack_block) != 0 || hlen > chan_len)
    return verdict(NC_CNT_DROP_BAD_HDR_LEN);
  const size_t plen = ntohs(h.payload_len);
  if (hlen + plen != chan_len) return verdict(NC_CNT_DROP_BAD_PAYLOAD_LEN);
  if (h.type < NC_CT_DATA || h.type > NC_CT_MAX) return verdict(NC_CNT_DROP_BAD_TYPE);

  r.ch.type = h.type;
  r.ch.flags = h.flags;
  r.ch.dst_chan = ntohs(h.dst_chan);
  r.ch.src_chan = ntohs(h.src_chan);
  r.ch.seq = ntohl(h.seq);
  r.ch.ack = ntohl(h.ack);
  r.ch.wnd = ntohl(h.wnd);
  r.ch.ts_val = ntohl(h.ts_val);
  r.ch.ts_ecr = ntohl(h.ts_ecr);
  r.ch.token = be64toh(h.token);
  // Blocks beyond what we send are legal on the wire and ignored.
  if (f.size() < choff + hlen) return verdict(NC_CNT_DROP_TRUNCATED);
  const size_t nsacks = (hlen - kChanHdrLen) / sizeof(nc_sack_block);
  r.ch.nsacks = static_cast<uint8_t>(nsacks < kMaxSacks ? nsacks : kMaxSacks);
  for (size_t i = 0; i < r.ch.nsacks; ++i) {
    const auto b = Load<nc_sack_block>(&f[choff + kChanHdrLen + i * sizeof(nc_sack_block)]);
    r.ch.sacks[i] = {ntohl(b.start), ntohl(b.end)};
  }
  r.chan_payload_off = choff + hlen;
  r.chan_payload_len = plen;

  if (h.type == NC_CT_DATA) {
    size_t shlen = 0;
    const nc_counter v = ParseSegment(f.subspan(r.chan_payload_off), plen, &r.seg, &shlen);
    if (v != NC_CNT_REDIRECT) return verdict(v);
    r.has_seg = true;
    r.seg_payload_off = r.chan_payload_off + shlen;
    r.seg_payload_len = plen - shlen;
  } else if (IsHandshakeType(h.type)) {
    if (plen != kHandshakeLen) return verdict(NC_CNT_DROP_BAD_PAYLOAD_LEN);
    if (f.size() < r.chan_payload_off + plen) return verdict(NC_CNT_DROP_TRUNCATED);
    r.has_hs = true;
    r.hs = ReadHandshake(&f[r.chan_payload_off]);
  } else if (plen != 0) {
    return verdict(NC_CNT_DROP_BAD_PAYLOAD_LEN);  // ACK, FIN, RST, KEEPALIVE: header only
  }
  if (r.ch.dst_chan == NC_CHAN_UNASSIGNED && h.type != NC_CT_SYN && h.type != NC_CT_COOKIE_ECHO)
    return verdict(NC_CNT_DROP_UNKNOWN_CHANNEL);
  if (r.ch.dst_chan >= NC_MAX_CHANNELS) return verdict(NC_CNT_DROP_UNKNOWN_CHANNEL);
  return verdict(NC_CNT_REDIRECT);
}

void WriteHandshake(uint8_t* out, const Handshake& hs) {
  nc_chan_hs w{};
  w.init_token = htobe64(hs.init_token);
  w.resp_token = htobe64(hs.resp_token);
  w.incarnation = htobe64(hs.incarnation);
  w.init_isn = htonl(hs.init_isn);
  w.resp_isn = htonl(hs.resp_isn);
  w.cookie_time = htonl(hs.cookie_time);
  Store(out, w);
}

Handshake ReadHandshake(const uint8_t* in) {
  const auto w = Load<nc_chan_hs>(in);
  return {be64toh(w.init_token), be64toh(w.resp_token), be64toh(w.incarnation),
          ntohl(w.init_isn),     ntohl(w.resp_isn),     ntohl(w.cookie_time)};
}

TcpRecord ParseTcpRecord(std::span<const uint8_t> buf, size_t max_seg, size_t* seg_len) {
  if (buf.size() < 4) return TcpRecord::kNeedMore;
  const uint32_t len = Be32(buf.data());
  if (len == 0) return TcpRecord::kGoodbye;
  if (len < kSegHdrLen || len > max_seg) return TcpRecord::kMalformed;
  if (buf.size() - 4 < len) return TcpRecord::kNeedMore;
  SegHeader h;
  size_t off;
  if (ParseSegment(buf.subspan(4, len), &h, &off) != NC_CNT_REDIRECT) return TcpRecord::kMalformed;
  *seg_len = len;
  return TcpRecord::kSegment;
}

void WriteTcpHello(uint8_t* out, const TcpHello& h) {
  nc_tcp_hello w{};
  w.magic = htonl(NC_TCP_HELLO_MAGIC);
  w.version = NC_WIRE_VERSION;
  w.token = htobe64(h.token);
  w.echo_token = htobe64(h.echo_token);
  w.incarnation = htobe64(h.incarnation);
  Store(out, w);
}

bool ReadTcpHello(const uint8_t* in, TcpHello* h) {
  const auto w = Load<nc_tcp_hello>(in);
  if (ntohl(w.magic) != NC_TCP_HELLO_MAGIC || w.version != NC_WIRE_VERSION) return false;
  *h = {be64toh(w.token), be64toh(w.echo_token), be64toh(w.incarnation)};
  return true;
}

std::string_view CounterName(nc_counter c) {
  switch (c) {
#define NC_X_NAME(name, label) \
  case NC_CNT_##name:          \
    return label;
    NC_COUNTER_LIST(NC_X_NAME)
#undef NC_X_NAME
    case NC_CNT_MAX:
      break;
  }
  return "unknown";
}

}  // namespace netch::wire
