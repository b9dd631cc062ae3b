// transport.h - the AF_XDP driver's reliable transport for one channel, without I/O.
//
// The transport never touches packet bytes or clocks: the driver hands it received headers and
// opaque buffer handles (UMEM frame addresses in the AF_XDP driver), asks it what to transmit, and
// passes the time in. That keeps it deterministic under test (a simulated link with a fixed seed)
// and allocation-free after construction: every ring is sized from TransportConfig up front.
//
// What it does: packet sequence numbers (32-bit, wrapping), cumulative + selective ACKs,
// retransmission timeout (RFC 6298 estimator, exponential backoff), fast retransmit after
// `dupack_threshold` duplicate ACKs or SACK evidence, receive-window flow control in bytes (a
// consumer that stops releasing buffers closes the window and stops the sender; nothing is
// dropped), zero-window probes, keepalive and dead-peer detection, pluggable congestion control.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "bpf/wire.h"

namespace netch::afxdp {

// Congestion control works in packets (every DATA packet carries at most one MSS).
class CongestionControl {
 public:
  virtual ~CongestionControl() = default;
  virtual const char* name() const = 0;
  // `acked` packets newly acknowledged; `ece` if the ACK echoed congestion marks.
  virtual void OnAck(uint32_t acked, uint64_t rtt_us, bool ece) = 0;
  // Loss detected by duplicate ACKs or SACK: called once per recovery episode.
  virtual void OnLoss() = 0;
  // Retransmission timeout.
  virtual void OnRto() = 0;
  // The timeouts since the last OnAck were spurious (the data arrived, its ACKs were late):
  // back to the window before the first of them.
  virtual void UndoRto() = 0;
  // The peer echoed congestion marks; called at most once per window of data. Loss-based
  // algorithms treat it like a loss; DCTCP reacts in OnAck in proportion to the marks instead.
  virtual void OnEce() { OnLoss(); }
  // Whether the sender marks its packets ECN-capable (ECT(0)).
  virtual bool wants_ecn() const { return false; }
  // The sender was idle longer than an RTO (RFC 7661's restart): the window it had says nothing
  // about the path now, so it restarts at most at `restart` packets and slow-starts back to
  // where it was.
  virtual void OnIdle(uint32_t restart) = 0;
  virtual uint32_t cwnd() const = 0;
};

// NewReno-style AIMD: slow start to ssthresh, +1 packet per window after, halve on loss,
// collapse to the initial window on timeout. ECN echoes are treated like loss (once per RTT).
std::unique_ptr<CongestionControl> MakeNewReno(uint32_t initial_cwnd, uint32_t max_cwnd);

// DCTCP (RFC 8257): AIMD growth as NewReno, but on congestion marks the window shrinks by
// alpha/2, where alpha is a moving average (gain 1/16) of the fraction of packets marked per
// window — a little marking costs a little window. Losses and timeouts as NewReno.
std::unique_ptr<CongestionControl> MakeDctcp(uint32_t initial_cwnd, uint32_t max_cwnd);
// By name: "newreno" or "dctcp"; nullptr for an unknown name.
std::unique_ptr<CongestionControl> MakeCongestionControl(const std::string& name,
                                                         uint32_t initial_cwnd, uint32_t max_cwnd);

struct TransportConfig {
  uint32_t window_packets = 1024;    // max packets in flight / held out of order (power of 2)
  uint32_t rcv_buf_bytes = 4 << 20;  // receive buffer advertised as the window
  uint32_t initial_cwnd = 16;
  uint64_t initial_rto_us = 20'000;
  uint64_t min_rto_us = 2'000;
  uint64_t max_rto_us = 1'000'000;
  uint32_t dupack_threshold = 3;
  uint32_t ack_every = 2;         // ACK every n-th in-order packet...
  uint64_t delayed_ack_us = 500;  // ...or after this long
  // Request/response (Linux's "pingpong" ACK mode): having sent new data within the last
  // pingpong_window_us, fewer than pingpong_max_pending in-order packets wait for the reply,
  // which carries the ACK, or for pingpong_ack_us — not for a pure ACK that would sit on the
  // request's critical path, or wake the peer between requests a few milliseconds apart. The
  // peer's tail-loss probe and RTO allow for the hold on a flight that small (both ends run this
  // transport with these defaults). Linux holds such an ACK 40 ms or more.
  uint64_t pingpong_window_us = 1'000;
  uint32_t pingpong_max_pending = 4;
  uint64_t pingpong_ack_us = 5'000;
  uint64_t keepalive_idle_us = 200'000;  // probe an idle peer after this long
  uint64_t dead_peer_us = 2'000'000;     // nothing heard for this long: kFailed
  // Receive-buffer accounting unit: a packet is charged at least this many bytes against both
  // windows (the UMEM frame it pins), so tiny segments cannot pin more frames than the window
  // allows. 0: charge the payload length (simulations).
  uint32_t charge_unit_bytes = 0;
  uint32_t isn_send = 0;  // first sequence number we send (agreed in the channel handshake)
  uint32_t isn_recv = 0;  // first sequence number we expect
  uint16_t local_chan = 0;
  uint16_t peer_chan = 0;
};

enum class TransportState { kUp, kFailed };

struct TransportStats {
  uint64_t data_sent = 0;    // DATA packets transmitted, first time
  uint64_t retransmits = 0;  // DATA packets transmitted again
  uint64_t rto_events = 0;
  uint64_t spurious_rtos = 0;  // timeouts undone: a later ACK showed the data had arrived
  uint64_t fast_retransmits = 0;
  uint64_t rack_losses = 0;    // packets found lost by RACK's time rule
  uint64_t tail_probes = 0;    // tail-loss probes sent
  uint64_t idle_restarts = 0;  // windows restarted after an idle longer than an RTO
  uint64_t ce_received = 0;    // DATA packets that arrived marked CE
  uint64_t ece_received = 0;   // ACKs from the peer echoing congestion marks
  uint64_t acks_sent = 0;
  uint64_t data_received = 0;  // DATA packets accepted (in order or buffered)
  uint64_t dup_received = 0;   // DATA already received: dropped, re-ACKed
  uint64_t out_of_window = 0;  // DATA beyond the window: dropped
  uint64_t bad_acks = 0;       // ACKs for data never sent: ignored
  uint64_t zero_window_probes = 0;
  uint64_t keepalives_sent = 0;
};

// One packet the driver must put on the wire. For DATA, `handle`/`len` name the payload the driver
// gave to Send(); for control packets they are unused. The header's ack/wnd/sacks/timestamps are
// filled in.
struct TxPacket {
  wire::ChanHeader hdr;
  uint64_t handle = 0;
  uint32_t len = 0;
};

class Transport {
 public:
  // Invoked when a buffer is no longer needed by the transport: a sent payload once acknowledged,
  // a received payload that duplicates data already held.
  class BufferOwner {
   public:
    virtual ~BufferOwner() = default;
    virtual void ReleaseTx(uint64_t handle) = 0;
    virtual void ReleaseRx(uint64_t handle) = 0;
  };

  Transport(const TransportConfig& cfg, std::unique_ptr<CongestionControl> cc, BufferOwner* owner,
            uint64_t now_us);

  // ---- sending --------------------------------------------------------------------------------
  // Queues one DATA payload. False when the send ring is full (the caller keeps the buffer).
  bool Send(uint64_t handle, uint32_t len);
  // Packets queued but not yet acknowledged (a scheduler's "queued bytes" view is below).
  uint32_t send_queue_packets() const { return snd_end_ - snd_una_; }
  uint64_t send_queue_bytes() const { return snd_queued_bytes_; }

  // ---- receiving ------------------------------------------------------------------------------
  // A validated channel packet from the peer. For DATA, the transport takes `handle` (payload of
  // `len` bytes): it is later returned by PopDelivered() or released through ReleaseRx().
  // `ce`: the packet arrived with the IP ECN field set to CE; echoed to the sender as ECE.
  void OnPacket(const wire::ChanHeader& h, uint64_t handle, uint32_t len, uint64_t now_us,
                bool ce = false);
  // Next in-order payload for the consumer. The window stays charged until Consumed(len).
  bool PopDelivered(uint64_t* handle, uint32_t* len);
  // The next in-order payload without taking it (a driver that must know whether the consumer's
  // ring has room for all of its pieces first).
  bool PeekDelivered(uint64_t* handle, uint32_t* len) const;
  // The consumer is done with a popped payload of `len` bytes: reopens the receive window.
  void Consumed(uint32_t len) { ConsumedCharge(Charge(len)); }
  // The same in raw window bytes, for a payload returned in pieces: the pieces' charges add up
  // to Charge(len) of the whole.
  void ConsumedCharge(uint64_t charge);
  // What a payload of `len` bytes costs in either window.
  uint32_t Charge(uint32_t len) const {
    return len > cfg_.charge_unit_bytes ? len : cfg_.charge_unit_bytes;
  }
  // Whether `seq` from the peer lies where its next sequence number can be: from what we expect
  // next to a window beyond it. FIN and RST must carry such a number (RFC 5961's rule for RST):
  // an off-path forger who knows the token still has to hit the window.
  bool InReceiveWindow(uint32_t seq) const {
    return !Before(seq, rcv_nxt_) && !Before(rcv_nxt_ + cfg_.window_packets, seq);
  }
  // The sequence number our next new packet will use (FIN and RST carry it).
  uint32_t next_seq() const { return snd_nxt_; }

  // ---- driving --------------------------------------------------------------------------------
  // Fills `out` with what must be transmitted now (ACKs, retransmissions, new data, probes).
  // Returns how many entries were written.
  // Sets every field of the packets it returns (`out` may hold anything: callers keep it as
  // scratch across rounds rather than initialize a batch of headers per call).
  size_t Poll(uint64_t now_us, std::span<TxPacket> out);
  // When Poll() next has timed work (RTO, delayed ACK, keepalive); UINT64_MAX if none.
  uint64_t next_timer_us() const;

  // Teardown: hands every buffer the transport still holds (unacknowledged and unsent data,
  // received data not yet delivered) back to the owner and stops the transport.
  void ReleaseAll();

  TransportState state() const { return state_; }
  const TransportStats& stats() const { return stats_; }
  uint32_t cwnd() const { return cc_->cwnd(); }
  bool wants_ecn() const { return cc_->wants_ecn(); }
  uint32_t peer_window() const { return peer_wnd_; }
  uint32_t advertised_window() const;
  uint32_t rcv_buf_bytes() const { return cfg_.rcv_buf_bytes; }
  uint64_t srtt_us() const { return srtt_us_; }
  uint64_t rto_us() const { return rto_us_; }
  uint32_t in_flight_packets() const { return snd_nxt_ - snd_una_; }

 private:
  struct TxSlot {
    uint64_t handle = 0;
    uint32_t len = 0;
    bool sacked = false;
    bool lost = false;  // needs retransmission
    bool retransmitted = false;
    uint64_t xmit_us = 0;  // last (re)transmission: RACK's clock
  };
  struct RxSlot {
    uint64_t handle = 0;
    uint32_t len = 0;
    bool present = false;
  };

  static bool Before(uint32_t a, uint32_t b) { return static_cast<int32_t>(a - b) < 0; }
  TxSlot& tx(uint32_t seq) { return tx_[seq & mask_]; }
  RxSlot& rx(uint32_t seq) { return rx_[seq & mask_]; }

  void OnAck(const wire::ChanHeader& h, uint64_t now_us);
  void OnData(const wire::ChanHeader& h, uint64_t handle, uint32_t len, uint64_t now_us);
  void MarkLost(TxSlot& s);
  // RACK-style, time-based loss detection (RFC 8985, simplified): a packet sent before one that
  // was since delivered, and outstanding longer than an RTT plus a reordering window, is lost —
  // retransmissions included, which the duplicate-ACK rule cannot see. Returns true if it
  // marked any; arms rack_timer_us_ for packets not yet old enough.
  bool DetectRackLosses(uint64_t now_us);
  void MarkSacked(TxSlot& s);
  void UpdateRtt(uint64_t sample_us);
  uint64_t TlpTimeout() const;
  wire::ChanHeader MakeHeader(uint8_t type, uint64_t now_us);
  bool SendWindowAllows(uint32_t len) const;
  // A small flight's ACK may be held by the peer for its reply (pingpong_ack_us): the tail-loss
  // probe and the RTO wait that much longer for it (RFC 8985's WCDelAckT).
  uint64_t AckDelayAllowance() const;
  void ArmRto(uint64_t now_us) { rto_deadline_us_ = now_us + rto_us_ + AckDelayAllowance(); }

  TransportConfig cfg_;
  std::unique_ptr<CongestionControl> cc_;
  BufferOwner* owner_;
  uint32_t mask_;
  TransportState state_ = TransportState::kUp;
  TransportStats stats_;

  // Send side: [snd_una, snd_nxt) in flight, [snd_nxt, snd_end) queued, not yet sent.
  std::vector<TxSlot> tx_;
  uint32_t snd_una_, snd_nxt_, snd_end_;
  uint64_t snd_queued_bytes_ = 0;
  uint64_t in_flight_bytes_ = 0;
  uint32_t peer_wnd_;
  uint32_t dupacks_ = 0;
  bool in_recovery_ = false;
  uint32_t recover_ = 0;  // snd_nxt when recovery started
  uint32_t highest_sacked_ = 0;
  bool any_sacked_ = false;
  uint64_t rto_deadline_us_ = UINT64_MAX;
  // Eifel (RFC 3522): the timestamp our packets carried when the first timeout of an episode
  // fired, and the RTO before its backoff. An ACK that then advances snd_una while echoing an
  // older timestamp acknowledges an original transmission: the timeout was spurious.
  bool rto_episode_ = false;
  uint32_t rto_ts_ = 0;
  uint64_t rto_before_us_ = 0;
  uint64_t srtt_us_ = 0, rttvar_us_ = 0, rto_us_;
  uint32_t sacked_cnt_ = 0;  // packets in [snd_una, snd_nxt) known received out of order
  uint32_t lost_cnt_ = 0;    // ... and known lost, awaiting retransmission
  uint32_t ecn_react_seq_ = 0;
  uint64_t probe_deadline_us_ = UINT64_MAX;  // next zero-window probe
  uint64_t rack_xmit_us_ = 0;                // newest send time among delivered packets
  uint64_t rack_timer_us_ = UINT64_MAX;      // re-run RACK then
  uint64_t tlp_deadline_us_ = UINT64_MAX;    // tail-loss probe
  bool tlp_outstanding_ = false;
  uint64_t next_keepalive_us_;

  // Receive side.
  std::vector<RxSlot> rx_;
  uint32_t rcv_nxt_;             // next in-order seq expected
  uint32_t rcv_deliver_;         // next seq to hand to the consumer (<= rcv_nxt)
  uint32_t rcv_highest_;         // one past the highest seq held
  uint64_t rcv_held_bytes_ = 0;  // buffered out of order + delivered but not consumed
  uint32_t ack_pending_ = 0;
  uint64_t last_data_sent_us_ = 0;  // new data last sent (pingpong ACKs)
  bool ack_now_ = false;
  uint64_t ack_deadline_us_ = UINT64_MAX;
  uint32_t last_ts_recv_ = 0;
  bool ce_pending_ = false;  // a CE-marked packet arrived since our last ACK
  uint32_t last_adv_wnd_ = 0;
  uint64_t last_rx_us_;
};

}  // namespace netch::afxdp
