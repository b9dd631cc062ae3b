// wire.h - C++ builders and parsers for the NetChannel wire format defined in netch_wire.h.
//
// ParseFrame applies exactly the validation rules of the XDP program (steer.bpf.c), in the same
// order, and reports its verdict as the nc_counter the program would bump. The BPF table tests
// use it as the oracle, and the AF_XDP driver uses it to find the headers of a received frame.
// Headers are copied out with memcpy: in a UMEM frame they are not naturally aligned.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

#include "bpf/netch_wire.h"

namespace netch::wire {

inline constexpr size_t kEthLen = 14;
inline constexpr size_t kIpv4Len = 20;  // we always send without options
inline constexpr size_t kUdpLen = 8;
inline constexpr size_t kChanHdrLen = sizeof(nc_chan_hdr);
inline constexpr size_t kSegHdrLen = sizeof(nc_hdr);
inline constexpr size_t kOuterLen = kEthLen + kIpv4Len + kUdpLen;  // Ethernet + IPv4 + UDP
inline constexpr size_t kMaxSacks = 4;  // what our transport puts on the wire

using MacAddr = std::array<uint8_t, 6>;

// Addresses of one channel's frames. IPs and ports in host byte order.
struct FrameAddrs {
  MacAddr src_mac{};
  MacAddr dst_mac{};
  uint32_t src_ip = 0;
  uint32_t dst_ip = 0;
  uint16_t src_port = 0;  // per-channel UDP source port (RSS/ECMP entropy)
  uint16_t dst_port = NC_DEFAULT_UDP_PORT;
  uint8_t ttl = 64;
  uint8_t tos = 0;  // DSCP/ECN byte; ECT(0) when the congestion controller wants ECN
};

struct SackBlock {
  uint32_t start = 0;
  uint32_t end = 0;
};

// Host-order view of nc_chan_hdr. payload_len and hdr_len are derived when writing.
struct ChanHeader {
  uint8_t type = NC_CT_DATA;
  uint8_t flags = 0;
  uint16_t dst_chan = 0;
  uint16_t src_chan = 0;
  uint32_t seq = 0;
  uint32_t ack = 0;
  uint32_t wnd = 0;
  uint32_t ts_val = 0;
  uint32_t ts_ecr = 0;
  uint64_t token = 0;  // the receiver's channel token
  uint8_t nsacks = 0;
  std::array<SackBlock, kMaxSacks> sacks{};
};

// Host-order view of nc_chan_hs, the payload of the four handshake packets.
struct Handshake {
  uint64_t init_token = 0;
  uint64_t resp_token = 0;
  uint64_t incarnation = 0;
  uint32_t init_isn = 0;
  uint32_t resp_isn = 0;
  uint32_t cookie_time = 0;
};
inline constexpr size_t kHandshakeLen = sizeof(nc_chan_hs);
constexpr bool IsHandshakeType(uint8_t t) {
  return t == NC_CT_SYN || t == NC_CT_SYN_ACK || t == NC_CT_COOKIE_ECHO || t == NC_CT_COOKIE_ACK;
}
void WriteHandshake(uint8_t* out, const Handshake& hs);
Handshake ReadHandshake(const uint8_t* in);

// Host-order view of nc_tcp_hello, the kernel-TCP driver's first bytes on a connection.
struct TcpHello {
  uint64_t token = 0;
  uint64_t echo_token = 0;
  uint64_t incarnation = 0;
};
inline constexpr size_t kTcpHelloLen = sizeof(nc_tcp_hello);
void WriteTcpHello(uint8_t* out, const TcpHello& h);
// False when the magic or the version is not ours (not a NetChannel peer: the connection closes).
bool ReadTcpHello(const uint8_t* in, TcpHello* h);

// Kernel-TCP channel framing after the hello: records of [be32 length][one NetChannel segment of
// `length` bytes]; length 0 is the goodbye of an orderly close.
enum class TcpRecord { kNeedMore, kGoodbye, kSegment, kMalformed };
// Classifies the record at the front of `buf`. kSegment: the segment is buf[4, 4 + *seg_len)
// and passed ParseSegment. kMalformed: a length outside [kSegHdrLen, max_seg] or a segment that
// does not parse (the connection is then failed: a byte stream cannot resynchronize).
TcpRecord ParseTcpRecord(std::span<const uint8_t> buf, size_t max_seg, size_t* seg_len);

// Host-order view of nc_hdr. hdr_len and payload_len are derived when writing.
struct SegHeader {
  uint8_t type = NC_DATA;
  uint8_t app_class = NC_CLASS_UNSPEC;
  uint16_t src_port = 0;
  uint16_t dst_port = 0;
  uint32_t conn_id = 0;
  uint64_t seq = 0;
};

// Bytes of all headers in front of a segment payload.
constexpr size_t HeadersLen(const ChanHeader& ch, bool with_seg) {
  return kOuterLen + kChanHdrLen + ch.nsacks * sizeof(nc_sack_block) + (with_seg ? kSegHdrLen : 0);
}

// Writes Ethernet/IPv4/UDP/channel (and, if seg != nullptr, NetChannel) headers for a payload of
// payload_len bytes that the caller places right after them. `out` must hold HeadersLen() bytes.
// Returns the header length. No allocation: this is the transmit hot path.
size_t WriteHeaders(uint8_t* out, const FrameAddrs& addrs, const ChanHeader& ch,
                    const SegHeader* seg, size_t payload_len);

// Writes only the NetChannel header (the channel payload's first bytes). Returns kSegHdrLen.
size_t WriteSegHeader(uint8_t* out, const SegHeader& seg, size_t payload_len);

// Validates a channel payload as NetChannel header + payload, exactly as ParseFrame does.
// Returns NC_CNT_REDIRECT when valid (filling *seg and the payload offset), else the drop reason.
nc_counter ParseSegment(std::span<const uint8_t> chan_payload, SegHeader* seg, size_t* payload_off);
// The same for a channel payload of `total` bytes of which only `head` is contiguous (the first
// buffer of a multi-buffer frame): the NetChannel header must lie in `head`.
nc_counter ParseSegment(std::span<const uint8_t> head, size_t total, SegHeader* seg,
                        size_t* payload_off);

// Writes the channel header (and its SACK blocks) for a channel payload of chan_payload_len
// bytes. Returns its length, kChanHdrLen + 8 * nsacks. The kernel-UDP transmit path sends it in
// front of a segment it never copies.
size_t WriteChanHeader(uint8_t* out, const ChanHeader& ch, size_t chan_payload_len);

// Convenience for tests and tools: headers + payload into `out`; returns the frame length or 0 if
// it does not fit (or the payload exceeds what the length fields can express).
size_t BuildFrame(std::span<uint8_t> out, const FrameAddrs& addrs, const ChanHeader& ch,
                  const SegHeader* seg, std::span<const uint8_t> payload);

// RFC 1071 Internet checksum of `data`, folded, not inverted.
uint16_t InternetSum(std::span<const uint8_t> data);

struct ParsedFrame {
  nc_counter verdict = NC_CNT_PASS_UNPARSED;  // NC_CNT_REDIRECT: a valid NetChannel frame
  uint32_t src_ip = 0;                        // host order
  uint32_t dst_ip = 0;
  uint16_t src_port = 0;
  uint8_t tos = 0;
  ChanHeader ch;
  size_t chan_payload_off = 0;  // offset in the frame of the channel payload
  size_t chan_payload_len = 0;
  bool has_hs = false;  // SYN, SYN_ACK, COOKIE_ECHO, COOKIE_ACK: the handshake payload
  Handshake hs;
  bool has_seg = false;  // DATA: a NetChannel segment header was parsed
  SegHeader seg;
  size_t seg_payload_off = 0;
  size_t seg_payload_len = 0;
  bool valid() const { return verdict == NC_CNT_REDIRECT; }
};

// Classifies a whole frame the way steer.bpf.c does (minus the map-dependent steps: channel
// table, queue, XSK slot and fault injection). udp_port is in host order.
ParsedFrame ParseFrame(std::span<const uint8_t> frame, uint16_t udp_port);
// A multi-buffer frame of frame_len bytes whose first buffer is `head`: lengths are checked
// against frame_len, and every header must lie in `head` (as the program's data_end checks
// demand), else NC_CNT_DROP_TRUNCATED. Offsets in the result are from the start of `head`.
ParsedFrame ParseFrame(std::span<const uint8_t> head, size_t frame_len, uint16_t udp_port);

// True for verdicts the program answers with XDP_PASS.
constexpr bool IsPassVerdict(nc_counter c) { return c <= NC_CNT_PASS_OTHER_PORT; }

// The Prometheus-style label of a counter ("drop_bad_ip_csum", ...).
std::string_view CounterName(nc_counter c);

}  // namespace netch::wire
