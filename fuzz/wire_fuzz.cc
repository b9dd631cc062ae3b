// libFuzzer harness: the C++ wire parsers (the same rules as the XDP program, and the kernel-TCP
// driver's record framing) on arbitrary bytes.
// Besides "no crash, no out-of-bounds read" (ASan), every frame the parser accepts must describe
// itself consistently: offsets and lengths inside the frame, a header that round-trips.
#include <arpa/inet.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <span>
#include <vector>

#include "bpf/wire.h"

using namespace netch;

namespace {

// Inputs whose first byte is odd get a valid Ethernet/IPv4/UDP envelope around the rest, so the
// fuzzer spends its time in the channel and NetChannel headers rather than rediscovering the
// outer ones; even ones are parsed raw.
std::vector<uint8_t> Envelope(const uint8_t* d, size_t n) {
  std::vector<uint8_t> f(wire::kOuterLen + n);
  wire::FrameAddrs a;
  a.src_ip = 0xC6120001;
  a.dst_ip = 0xC6120002;
  a.src_port = 40000;
  wire::ChanHeader ch;
  std::vector<uint8_t> tmp(wire::kOuterLen + wire::kChanHdrLen);
  wire::WriteHeaders(tmp.data(), a, ch, nullptr, 0);
  std::copy(tmp.begin(), tmp.begin() + wire::kOuterLen, f.begin());
  std::copy(d, d + n, f.begin() + wire::kOuterLen);
  const size_t ip = wire::kOuterLen - 28;  // IPv4 (no options) then UDP
  const uint16_t tot = htons(static_cast<uint16_t>(28 + n)),
                 udp = htons(static_cast<uint16_t>(8 + n));
  std::memcpy(&f[ip + 2], &tot, 2);
  std::memcpy(&f[ip + 24], &udp, 2);
  return f;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* raw, size_t raw_n) {
  if (raw_n == 0 || raw_n > 60000) return 0;
  std::vector<uint8_t> buf =
      raw[0] & 1 ? Envelope(raw + 1, raw_n - 1) : std::vector<uint8_t>(raw + 1, raw + raw_n);
  const uint8_t* d = buf.data();
  const size_t n = buf.size();
  const std::span<const uint8_t> in(d, n);
  const wire::ParsedFrame pf = wire::ParseFrame(in, NC_DEFAULT_UDP_PORT);
  if (pf.valid()) {
    if (pf.chan_payload_off > n || pf.chan_payload_len > n - pf.chan_payload_off) abort();
    if (pf.has_hs && pf.chan_payload_len != wire::kHandshakeLen) abort();
    if (pf.has_seg) {
      if (pf.seg_payload_off < pf.chan_payload_off) abort();
      if (pf.seg_payload_off + pf.seg_payload_len != pf.chan_payload_off + pf.chan_payload_len)
        abort();
      // The segment header re-parses alone to the same view.
      wire::SegHeader h;
      size_t off = 0;
      if (wire::ParseSegment(in.subspan(pf.chan_payload_off, pf.chan_payload_len), &h, &off) !=
          NC_CNT_REDIRECT)
        abort();
      if (h.seq != pf.seg.seq || h.conn_id != pf.seg.conn_id || h.type != pf.seg.type) abort();
    }
    if (pf.ch.dst_chan >= NC_MAX_CHANNELS) abort();
  }
  // A channel payload on its own (the kernel-TCP driver's records are exactly this).
  wire::SegHeader h;
  size_t off = 0;
  if (wire::ParseSegment(in, &h, &off) == NC_CNT_REDIRECT) {
    if (off > n || off < wire::kSegHdrLen) abort();
    // What was parsed writes back to a header that parses to the same fields.
    std::vector<uint8_t> again(wire::kSegHdrLen + (n - off));
    wire::WriteSegHeader(again.data(), h, n - off);
    std::copy(d + off, d + n, again.begin() + wire::kSegHdrLen);
    wire::SegHeader h2;
    size_t off2 = 0;
    if (wire::ParseSegment(again, &h2, &off2) != NC_CNT_REDIRECT || off2 != wire::kSegHdrLen ||
        h2.seq != h.seq || h2.type != h.type || h2.conn_id != h.conn_id ||
        h2.src_port != h.src_port || h2.dst_port != h.dst_port || h2.app_class != h.app_class)
      abort();
  }
  // Kernel-TCP framing: walk the records of a byte stream as the driver does.
  for (size_t pos = 0; pos < n;) {
    size_t len = 0;
    const wire::TcpRecord rec = wire::ParseTcpRecord(in.subspan(pos), 16376, &len);
    if (rec == wire::TcpRecord::kNeedMore || rec == wire::TcpRecord::kMalformed) break;
    if (rec == wire::TcpRecord::kGoodbye) {
      pos += 4;
      continue;
    }
    if (len < wire::kSegHdrLen || len > 16376 || pos + 4 + len > n) abort();
    pos += 4 + len;
  }
  if (n >= wire::kTcpHelloLen) {
    wire::TcpHello th;
    if (wire::ReadTcpHello(d, &th)) {
      uint8_t out[wire::kTcpHelloLen];
      wire::WriteTcpHello(out, th);
      wire::TcpHello th2;
      if (!wire::ReadTcpHello(out, &th2) || th2.token != th.token ||
          th2.echo_token != th.echo_token || th2.incarnation != th.incarnation)
        abort();
    }
  }
  if (n >= wire::kHandshakeLen) {
    const wire::Handshake hs = wire::ReadHandshake(d);
    uint8_t out[wire::kHandshakeLen];
    wire::WriteHandshake(out, hs);
    const wire::Handshake hs2 = wire::ReadHandshake(out);
    if (hs2.init_token != hs.init_token || hs2.resp_isn != hs.resp_isn) abort();
  }
  return 0;
}
