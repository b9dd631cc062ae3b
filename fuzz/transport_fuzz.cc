// libFuzzer harness: the channel transport's receive path against a model. A sender and a
// receiver transport talk through a network the input controls: it drops, duplicates, reorders
// and delays packets, moves the clock, and injects forged ACKs (with SACK blocks) at the sender.
// Safety, whatever the input: the receiver delivers exactly the sender's payloads, in order,
// none twice; no buffer is handed back twice or unknown; the receive window accounting never
// goes negative. (Liveness is the unit and veth tests' job.)
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <memory>
#include <set>
#include <vector>

#include "afxdp_channels/transport.h"

using namespace netch;
using afxdp::Transport;
using afxdp::TxPacket;

namespace {

struct Owner final : Transport::BufferOwner {
  std::set<uint64_t> live;  // handles the transport holds
  void ReleaseTx(uint64_t h) override { Take(h); }
  void ReleaseRx(uint64_t h) override { Take(h); }
  void Take(uint64_t h) {
    if (live.erase(h) != 1) abort();  // released twice, or never given
  }
};

struct Input {
  const uint8_t* d;
  size_t n, i = 0;
  bool more() const { return i < n; }
  uint32_t u8() { return i < n ? d[i++] : 0; }
  uint32_t u16() { return u8() << 8 | u8(); }
  uint32_t u32() { return u16() << 16 | u16(); }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* d, size_t n) {
  Input in{d, n};
  afxdp::TransportConfig cfg;
  cfg.window_packets = 64;
  cfg.rcv_buf_bytes = 64 * 1024;
  cfg.charge_unit_bytes = 1024;
  cfg.isn_send = cfg.isn_recv = in.u32();
  cfg.local_chan = 1;
  cfg.peer_chan = 2;
  uint64_t now = 1'000'000;
  Owner tx_owner, rx_owner;
  Transport a(cfg, afxdp::MakeNewReno(cfg.initial_cwnd, cfg.window_packets), &tx_owner, now);
  Transport b(cfg, afxdp::MakeNewReno(cfg.initial_cwnd, cfg.window_packets), &rx_owner, now);
  // Payload identity: tx handle i carries payload i (length from the input); the receiver's
  // handle for a copy maps back to it.
  uint64_t next_tx = 1, next_rx = 1ull << 40, expect = 1;
  std::vector<uint32_t> tx_len(1, 0);
  struct InFlight {
    TxPacket p;
    bool to_b;
  };
  std::deque<InFlight> net;
  std::vector<uint64_t> rx_identity;  // rx handle - 2^40 -> tx handle
  TxPacket out[64];
  while (in.more()) {
    switch (in.u8() % 8) {
      case 0: {  // the application sends a payload
        const uint32_t len = 1 + in.u16() % 3000;
        if (a.Send(next_tx, len)) {
          tx_owner.live.insert(next_tx);
          tx_len.push_back(len);
          next_tx++;
        }
        break;
      }
      case 1:  // each side transmits what it has
        for (Transport* t : {&a, &b}) {
          const size_t m = t->Poll(now, out);
          for (size_t k = 0; k < m; ++k) net.push_back({out[k], t == &a});
        }
        break;
      case 2: {  // the network delivers, drops or duplicates the next packet
        if (net.empty()) break;
        const uint32_t what = in.u8() % 4;
        const size_t pick = what == 3 ? in.u8() % net.size() : 0;  // 3: reordered
        InFlight f = net[pick];
        if (what != 1) net.erase(net.begin() + static_cast<long>(pick));  // 1: duplicated
        if (what == 0 && in.u8() % 4 == 0) break;                         // dropped
        if (f.to_b) {
          uint64_t h = 0;
          uint32_t len = 0;
          if (f.p.hdr.type == NC_CT_DATA) {
            h = next_rx++;
            len = f.p.len;
            rx_identity.push_back(f.p.handle);
            rx_owner.live.insert(h);
          }
          b.OnPacket(f.p.hdr, h, len, now, in.u8() % 16 == 0);
        } else {
          a.OnPacket(f.p.hdr, 0, 0, now);
        }
        break;
      }
      case 3:  // time passes
        now += 1 + in.u16() * 8;
        break;
      case 4: {  // the consumer reads in order
        uint64_t h;
        uint32_t len;
        while (b.PopDelivered(&h, &len)) {
          if (h < (1ull << 40) || h - (1ull << 40) >= rx_identity.size()) abort();
          const uint64_t id = rx_identity[h - (1ull << 40)];
          if (id != expect || len != tx_len[id]) abort();  // out of order, repeated or lost
          expect++;
          if (rx_owner.live.erase(h) != 1) abort();
          b.Consumed(len);
        }
        break;
      }
      case 5: {  // a forged ACK (SACKs included) at the sender
        wire::ChanHeader h;
        h.type = NC_CT_ACK;
        h.dst_chan = 1;
        h.src_chan = 2;
        h.ack = cfg.isn_send + in.u16() - 0x8000;
        h.wnd = in.u32();
        h.ts_ecr = static_cast<uint32_t>(now - in.u16());
        h.nsacks = static_cast<uint8_t>(in.u8() % (wire::kMaxSacks + 1));
        for (uint8_t k = 0; k < h.nsacks; ++k) {
          h.sacks[k].start = cfg.isn_send + in.u16() - 0x100;
          h.sacks[k].end = h.sacks[k].start + in.u8();
        }
        a.OnPacket(h, 0, 0, now);
        break;
      }
      case 6: {  // a stale or forged DATA at the receiver with an already-delivered payload
        // number: only ever below rcv_nxt, so the model stays exact.
        if (expect <= 1) break;
        wire::ChanHeader h;
        h.type = NC_CT_DATA;
        h.dst_chan = 2;
        h.src_chan = 1;
        h.seq = cfg.isn_send + static_cast<uint32_t>(expect - 2 - in.u8() % (expect - 1));
        const uint64_t rh = next_rx++;
        rx_identity.push_back(0);  // never deliverable
        rx_owner.live.insert(rh);
        b.OnPacket(h, rh, 100, now);
        break;
      }
      default:
        break;
    }
    if (a.advertised_window() > cfg.rcv_buf_bytes || b.advertised_window() > cfg.rcv_buf_bytes)
      abort();
  }
  // Teardown returns every buffer exactly once.
  a.ReleaseAll();
  uint64_t h;
  uint32_t len;
  while (b.PopDelivered(&h, &len)) rx_owner.live.erase(h);
  b.ReleaseAll();
  if (!tx_owner.live.empty() || !rx_owner.live.empty()) abort();
  return 0;
}
