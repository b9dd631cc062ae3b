#include "afxdp_channels/transport.h"

#include <algorithm>
#include <cassert>

namespace netch::afxdp {
namespace {

class NewReno final : public CongestionControl {
 public:
  NewReno(uint32_t initial, uint32_t max) : cwnd_(initial), max_(max) {}
  const char* name() const override { return "newreno"; }
  void OnAck(uint32_t acked, uint64_t, bool) override {
    in_rto_ = false;
    if (cwnd_ < ssthresh_) {
      cwnd_ += acked;  // slow start
    } else {
      acc_ += acked;  // congestion avoidance: +1 packet per window of ACKs
      while (acc_ >= cwnd_) {
        acc_ -= cwnd_;
        cwnd_++;
      }
    }
    cwnd_ = std::min(cwnd_, max_);
  }
  void OnLoss() override {
    ssthresh_ = std::max(cwnd_ / 2, 2u);
    cwnd_ = ssthresh_;
    acc_ = 0;
  }
  void OnRto() override {
    if (!in_rto_) {
      in_rto_ = true;
      before_rto_cwnd_ = cwnd_;
      before_rto_ssthresh_ = ssthresh_;
    }
    ssthresh_ = std::max(cwnd_ / 2, 2u);
    cwnd_ = 1;
    acc_ = 0;
  }
  void UndoRto() override {
    if (!in_rto_) return;
    in_rto_ = false;
    cwnd_ = before_rto_cwnd_;
    ssthresh_ = before_rto_ssthresh_;
  }
  void OnIdle(uint32_t restart) override {
    if (cwnd_ <= restart) return;
    // (As Linux's tcp_cwnd_restart: slow start back to at least three quarters of the window.)
    ssthresh_ = std::max(ssthresh_, cwnd_ / 2 + cwnd_ / 4);
    cwnd_ = restart;
    acc_ = 0;
  }
  uint32_t cwnd() const override { return cwnd_; }
  // DCTCP's proportional reduction; also ends slow start like a loss would.
  void Scale(double factor) {
    cwnd_ = std::max<uint32_t>(static_cast<uint32_t>(cwnd_ * factor), 2);
    ssthresh_ = cwnd_;
    acc_ = 0;
  }

 private:
  uint32_t cwnd_;
  uint32_t max_;
  uint32_t ssthresh_ = UINT32_MAX;
  uint32_t acc_ = 0;
  bool in_rto_ = false;  // OnRto since the last OnAck: what UndoRto restores is below
  uint32_t before_rto_cwnd_ = 0, before_rto_ssthresh_ = 0;
};

class Dctcp final : public CongestionControl {
 public:
  Dctcp(uint32_t initial, uint32_t max) : reno_(initial, max) {}
  const char* name() const override { return "dctcp"; }
  void OnAck(uint32_t acked, uint64_t rtt_us, bool ece) override {
    acked_ += acked;
    if (ece) marked_ += acked;
    if (acked_ >= window_end_) {  // one observation window (about one cwnd of packets)
      const double f = acked_ ? static_cast<double>(marked_) / acked_ : 0;
      alpha_ = (1 - kG) * alpha_ + kG * f;
      if (marked_ > 0) reno_.Scale(1 - alpha_ / 2);
      acked_ = marked_ = 0;
      window_end_ = reno_.cwnd();
    }
    reno_.OnAck(acked, rtt_us, false);
  }
  void OnLoss() override { reno_.OnLoss(); }
  void OnRto() override { reno_.OnRto(); }
  void UndoRto() override { reno_.UndoRto(); }
  void OnEce() override {}  // handled per window in OnAck
  bool wants_ecn() const override { return true; }
  void OnIdle(uint32_t restart) override { reno_.OnIdle(restart); }
  uint32_t cwnd() const override { return reno_.cwnd(); }
  double alpha() const { return alpha_; }

 private:
  static constexpr double kG = 1.0 / 16;
  NewReno reno_;
  double alpha_ = 1.0;  // RFC 8257: start pessimistic
  uint64_t acked_ = 0, marked_ = 0, window_end_ = 0;
};

uint32_t Ts(uint64_t now_us) {
  uint32_t t = static_cast<uint32_t>(now_us);
  return t ? t : 1;  // 0 means "no timestamp"
}

}  // namespace

std::unique_ptr<CongestionControl> MakeNewReno(uint32_t initial_cwnd, uint32_t max_cwnd) {
  return std::make_unique<NewReno>(initial_cwnd, max_cwnd);
}

std::unique_ptr<CongestionControl> MakeDctcp(uint32_t initial_cwnd, uint32_t max_cwnd) {
  return std::make_unique<Dctcp>(initial_cwnd, max_cwnd);
}

std::unique_ptr<CongestionControl> MakeCongestionControl(const std::string& name,
                                                         uint32_t initial_cwnd, uint32_t max_cwnd) {
  if (name == "newreno") return MakeNewReno(initial_cwnd, max_cwnd);
  if (name == "dctcp") return MakeDctcp(initial_cwnd, max_cwnd);
  return nullptr;
}

Transport::Transport(const TransportConfig& cfg, std::unique_ptr<CongestionControl> cc,
                     BufferOwner* owner, uint64_t now_us)
    : cfg_(cfg),
      cc_(std::move(cc)),
      owner_(owner),
      mask_(cfg.window_packets - 1),
      tx_(cfg.window_packets),
      snd_una_(cfg.isn_send),
      snd_nxt_(cfg.isn_send),
      snd_end_(cfg.isn_send),
      peer_wnd_(cfg.rcv_buf_bytes),  // both ends use the buffer size agreed in the handshake
      rto_us_(cfg.initial_rto_us),
      rx_(cfg.window_packets),
      rcv_nxt_(cfg.isn_recv),
      rcv_deliver_(cfg.isn_recv),
      last_rx_us_(now_us) {
  assert(cfg.window_packets && (cfg.window_packets & mask_) == 0 && "window must be a power of 2");
  rcv_highest_ = cfg.isn_recv;
  next_keepalive_us_ = now_us + cfg.keepalive_idle_us;
}

bool Transport::Send(uint64_t handle, uint32_t len) {
  if (state_ != TransportState::kUp || snd_end_ - snd_una_ >= cfg_.window_packets) return false;
  tx(snd_end_) = TxSlot{handle, len, false, false, false, 0};
  snd_end_++;
  snd_queued_bytes_ += len;
  return true;
}

uint32_t Transport::advertised_window() const {
  return rcv_held_bytes_ >= cfg_.rcv_buf_bytes
             ? 0
             : static_cast<uint32_t>(cfg_.rcv_buf_bytes - rcv_held_bytes_);
}

void Transport::OnPacket(const wire::ChanHeader& h, uint64_t handle, uint32_t len, uint64_t now_us,
                         bool ce) {
  if (state_ != TransportState::kUp) {
    if (h.type == NC_CT_DATA) owner_->ReleaseRx(handle);
    return;
  }
  last_rx_us_ = now_us;
  next_keepalive_us_ = now_us + cfg_.keepalive_idle_us;
  if (h.type == NC_CT_RST) {
    state_ = TransportState::kFailed;
    return;
  }
  if (h.ts_val) last_ts_recv_ = h.ts_val;
  OnAck(h, now_us);
  if (h.type == NC_CT_DATA) {
    if (ce) {
      stats_.ce_received++;
      ce_pending_ = true;
      ack_now_ = true;  // DCTCP wants marks echoed promptly
    }
    OnData(h, handle, len, now_us);
  } else if (h.type == NC_CT_KEEPALIVE) {
    ack_now_ = true;  // the answer carries our window: this is also the zero-window probe reply
  }
}

void Transport::MarkLost(TxSlot& s) {
  if (s.lost || s.sacked) return;
  s.lost = true;
  lost_cnt_++;
}

void Transport::MarkSacked(TxSlot& s) {
  if (s.sacked) return;
  s.sacked = true;
  sacked_cnt_++;
  if (s.lost) {
    s.lost = false;
    lost_cnt_--;
  }
}

void Transport::OnAck(const wire::ChanHeader& h, uint64_t now_us) {
  const uint32_t ack = h.ack;
  if (Before(snd_nxt_, ack)) {
    stats_.bad_acks++;  // acknowledges data never sent: spoofed or corrupt, ignore it whole
    return;
  }
  if (Before(ack, snd_una_)) return;  // stale, reordered ACK
  const uint32_t old_wnd = peer_wnd_;
  peer_wnd_ = h.wnd;
  uint64_t rtt = 0;
  if (h.ts_ecr) {
    rtt = static_cast<uint32_t>(Ts(now_us) - h.ts_ecr);
    if (rtt < 60'000'000) UpdateRtt(rtt);
  }
  const uint32_t newly = ack - snd_una_;
  // RACK's clock: the latest send time among the packets this ACK newly covers — except a
  // retransmitted packet's when the ACK echoes an older timestamp (it acknowledges the original;
  // RFC 8985), or a spurious timeout's retransmissions would mark everything sent before them lost.
  auto rack_sent = [&](const TxSlot& slot) {
    if (slot.sacked) return;
    if (slot.retransmitted && h.ts_ecr != 0 &&
        static_cast<int32_t>(h.ts_ecr - Ts(slot.xmit_us)) < 0)
      return;
    rack_xmit_us_ = std::max(rack_xmit_us_, slot.xmit_us);
  };
  for (uint8_t i = 0; i < h.nsacks; ++i) {
    uint32_t start = h.sacks[i].start, end = h.sacks[i].end;
    if (Before(start, ack)) start = ack;
    if (Before(snd_nxt_, end)) end = snd_nxt_;  // never trust SACKs for unsent data
    for (uint32_t s = start; Before(s, end); ++s) {
      TxSlot& slot = tx(s);
      rack_sent(slot);
      MarkSacked(slot);
    }
    if (Before(start, end) && (!any_sacked_ || Before(highest_sacked_, end))) {
      highest_sacked_ = end;
      any_sacked_ = true;
    }
  }
  if (newly) {
    for (uint32_t s = snd_una_; s != ack; ++s) {
      TxSlot& slot = tx(s);
      rack_sent(slot);
      if (slot.sacked) sacked_cnt_--;
      if (slot.lost) lost_cnt_--;
      in_flight_bytes_ -= Charge(slot.len);
      snd_queued_bytes_ -= slot.len;
      owner_->ReleaseTx(slot.handle);
      slot = TxSlot{};
    }
    snd_una_ = ack;
    if (rto_episode_) {
      rto_episode_ = false;
      if (h.ts_ecr != 0 && static_cast<int32_t>(h.ts_ecr - rto_ts_) < 0) {
        // Spurious: the packets were not lost, their ACKs were late (on a shared core, a peer
        // engine descheduled for a few ms). Back to the window and RTO before the timeout, and
        // what was not resent yet is not resent at all.
        stats_.spurious_rtos++;
        cc_->UndoRto();
        rto_us_ = rto_before_us_;
        for (uint32_t s = snd_una_; s != snd_nxt_; ++s) {
          TxSlot& slot = tx(s);
          if (slot.lost) {
            slot.lost = false;
            lost_cnt_--;
          }
        }
      }
    }
    dupacks_ = 0;
    tlp_outstanding_ = false;
    tlp_deadline_us_ = snd_una_ == snd_nxt_ ? UINT64_MAX : now_us + TlpTimeout();
    if (any_sacked_ && !Before(snd_una_, highest_sacked_)) any_sacked_ = false;
    cc_->OnAck(newly, rtt, h.flags & NC_CF_ECE);
    if (in_recovery_ && !Before(ack, recover_)) in_recovery_ = false;
    if (snd_una_ == snd_nxt_) {
      rto_deadline_us_ = UINT64_MAX;
    } else {
      ArmRto(now_us);
    }
  } else if (h.type != NC_CT_DATA && snd_una_ != snd_nxt_ && peer_wnd_ == old_wnd) {
    dupacks_++;
  }
  if (h.flags & NC_CF_ECE) stats_.ece_received++;
  if ((h.flags & NC_CF_ECE) && !in_recovery_ && !Before(snd_una_, ecn_react_seq_)) {
    cc_->OnEce();  // at most once per window of data
    ecn_react_seq_ = snd_nxt_;
  }
  bool loss = false;
  if (dupacks_ >= cfg_.dupack_threshold && snd_una_ != snd_nxt_ && !tx(snd_una_).retransmitted) {
    MarkLost(tx(snd_una_));
    loss = true;
  }
  if (any_sacked_) {
    // A packet with dupack_threshold SACKed packets above it is lost (RFC 6675's rule, simplified
    // to sequence distance).
    for (uint32_t s = snd_una_; Before(s + cfg_.dupack_threshold - 1, highest_sacked_); ++s) {
      TxSlot& slot = tx(s);
      if (!slot.sacked && !slot.lost && !slot.retransmitted) {
        MarkLost(slot);
        loss = true;
      }
    }
  }
  loss |= DetectRackLosses(now_us);
  if (loss && !in_recovery_) {
    in_recovery_ = true;
    recover_ = snd_nxt_;
    cc_->OnLoss();
    stats_.fast_retransmits++;
  }
}

bool Transport::DetectRackLosses(uint64_t now_us) {
  rack_timer_us_ = UINT64_MAX;
  if (rack_xmit_us_ == 0) return false;
  const uint64_t rtt = srtt_us_ ? srtt_us_ : cfg_.initial_rto_us;
  const uint64_t reo = std::max<uint64_t>(rtt / 4, 200);  // reordering tolerance
  bool any = false;
  for (uint32_t s = snd_una_; s != snd_nxt_; ++s) {
    TxSlot& slot = tx(s);
    if (slot.sacked || slot.lost || slot.xmit_us >= rack_xmit_us_) continue;
    if (now_us >= slot.xmit_us + rtt + reo) {
      MarkLost(slot);
      stats_.rack_losses++;
      any = true;
    } else {
      rack_timer_us_ = std::min(rack_timer_us_, slot.xmit_us + rtt + reo);
    }
  }
  return any;
}

void Transport::OnData(const wire::ChanHeader& h, uint64_t handle, uint32_t len, uint64_t now_us) {
  const uint32_t seq = h.seq;
  if (Before(seq, rcv_nxt_)) {
    owner_->ReleaseRx(handle);
    stats_.dup_received++;
    ack_now_ = true;  // the sender missed our ACK: tell it again
    return;
  }
  if (!Before(seq, rcv_deliver_ + cfg_.window_packets)) {
    owner_->ReleaseRx(handle);
    stats_.out_of_window++;
    ack_now_ = true;
    return;
  }
  RxSlot& slot = rx(seq);
  if (slot.present) {
    owner_->ReleaseRx(handle);
    stats_.dup_received++;
    ack_now_ = true;
    return;
  }
  // The sender honours our advertised window; a packet beyond it (plus a little slack for a
  // window update racing the data) comes from a peer that does not, and would pin frames the
  // window does not cover.
  if (rcv_held_bytes_ + Charge(len) >
      uint64_t{cfg_.rcv_buf_bytes} + 4 * uint64_t{cfg_.charge_unit_bytes}) {
    owner_->ReleaseRx(handle);
    stats_.out_of_window++;
    ack_now_ = true;
    return;
  }
  slot = RxSlot{handle, len, true};
  rcv_held_bytes_ += Charge(len);
  stats_.data_received++;
  if (!Before(seq, rcv_highest_)) rcv_highest_ = seq + 1;
  if (seq == rcv_nxt_) {
    while (rcv_nxt_ - rcv_deliver_ < cfg_.window_packets && rx(rcv_nxt_).present) rcv_nxt_++;
    if (Before(rcv_nxt_, rcv_highest_)) ack_now_ = true;  // a hole remains: report it now
    const bool pingpong = last_data_sent_us_ != 0 &&
                          now_us - last_data_sent_us_ < cfg_.pingpong_window_us &&
                          ack_pending_ + 1 < cfg_.pingpong_max_pending;
    if (++ack_pending_ >= cfg_.ack_every && !pingpong) {
      ack_now_ = true;
    } else if (ack_deadline_us_ == UINT64_MAX) {
      ack_deadline_us_ = now_us + (pingpong ? cfg_.pingpong_ack_us : cfg_.delayed_ack_us);
    }
  } else {
    ack_now_ = true;  // out of order: an immediate (duplicate) ACK with SACK blocks
  }
}

bool Transport::PopDelivered(uint64_t* handle, uint32_t* len) {
  if (rcv_deliver_ == rcv_nxt_) return false;
  RxSlot& slot = rx(rcv_deliver_);
  *handle = slot.handle;
  *len = slot.len;
  slot = RxSlot{};
  rcv_deliver_++;
  return true;
}

bool Transport::PeekDelivered(uint64_t* handle, uint32_t* len) const {
  if (rcv_deliver_ == rcv_nxt_) return false;
  const RxSlot& slot = rx_[rcv_deliver_ & mask_];
  *handle = slot.handle;
  *len = slot.len;
  return true;
}

void Transport::ConsumedCharge(uint64_t charge) {
  rcv_held_bytes_ -= std::min<uint64_t>(charge, rcv_held_bytes_);
  // Reopening a (nearly) closed window must not wait for the sender's next probe.
  if (last_adv_wnd_ < cfg_.rcv_buf_bytes / 4 && advertised_window() >= cfg_.rcv_buf_bytes / 2)
    ack_now_ = true;
}

uint64_t Transport::AckDelayAllowance() const {
  return in_flight_packets() < cfg_.pingpong_max_pending ? cfg_.pingpong_ack_us : 0;
}

uint64_t Transport::TlpTimeout() const {
  return std::max<uint64_t>(2 * (srtt_us_ ? srtt_us_ : cfg_.initial_rto_us / 2), 1000) +
         AckDelayAllowance();
}

void Transport::UpdateRtt(uint64_t r) {
  if (srtt_us_ == 0) {
    srtt_us_ = r;
    rttvar_us_ = r / 2;
  } else {
    uint64_t err = srtt_us_ > r ? srtt_us_ - r : r - srtt_us_;
    rttvar_us_ = (3 * rttvar_us_ + err) / 4;
    srtt_us_ = (7 * srtt_us_ + r) / 8;
  }
  rto_us_ = std::clamp<uint64_t>(srtt_us_ + std::max<uint64_t>(100, 4 * rttvar_us_),
                                 cfg_.min_rto_us, cfg_.max_rto_us);
}

wire::ChanHeader Transport::MakeHeader(uint8_t type, uint64_t now_us) {
  wire::ChanHeader h;
  h.type = type;
  h.dst_chan = cfg_.peer_chan;
  h.src_chan = cfg_.local_chan;
  h.seq = snd_nxt_;
  h.ack = rcv_nxt_;
  h.wnd = advertised_window();
  h.ts_val = Ts(now_us);
  h.ts_ecr = last_ts_recv_;
  if (Before(rcv_nxt_, rcv_highest_)) {
    // SACK blocks: runs of held packets above the hole, lowest first.
    for (uint32_t s = rcv_nxt_ + 1; Before(s, rcv_highest_) && h.nsacks < wire::kMaxSacks;) {
      if (!rx(s).present) {
        ++s;
        continue;
      }
      uint32_t start = s;
      while (Before(s, rcv_highest_) && rx(s).present) ++s;
      h.sacks[h.nsacks++] = {start, s};
    }
  }
  if (ce_pending_) {
    h.flags |= NC_CF_ECE;
    ce_pending_ = false;
  }
  last_adv_wnd_ = h.wnd;
  ack_pending_ = 0;
  ack_now_ = false;
  ack_deadline_us_ = UINT64_MAX;
  return h;
}

bool Transport::SendWindowAllows(uint32_t len) const {
  return in_flight_bytes_ + Charge(len) <= peer_wnd_;
}

size_t Transport::Poll(uint64_t now_us, std::span<TxPacket> out) {
  if (state_ != TransportState::kUp) return 0;
  if (now_us - last_rx_us_ >= cfg_.dead_peer_us) {
    state_ = TransportState::kFailed;  // nothing heard, not even a keepalive answer
    return 0;
  }
  size_t n = 0;
  if (snd_una_ != snd_nxt_ && now_us >= rto_deadline_us_) {
    stats_.rto_events++;
    if (!rto_episode_) {
      rto_episode_ = true;
      rto_ts_ = Ts(now_us);  // what the retransmissions below carry
      rto_before_us_ = rto_us_;
    }
    for (uint32_t s = snd_una_; s != snd_nxt_; ++s) {
      tx(s).retransmitted = false;  // eligible again
      MarkLost(tx(s));
    }
    cc_->OnRto();
    in_recovery_ = false;
    dupacks_ = 0;
    rto_us_ = std::min(rto_us_ * 2, cfg_.max_rto_us);
    ArmRto(now_us);
  }
  if (now_us >= rack_timer_us_ && DetectRackLosses(now_us) && !in_recovery_) {
    in_recovery_ = true;
    recover_ = snd_nxt_;
    cc_->OnLoss();
  }
  // Tail-loss probe: data in flight, nothing known lost, no ACK progress for ~2 RTT: resend the
  // last packet so that its ACK (with SACK blocks) reveals what the tail lost, instead of waiting
  // for the RTO.
  if (snd_una_ != snd_nxt_ && lost_cnt_ == 0 && !tlp_outstanding_ && now_us >= tlp_deadline_us_ &&
      n < out.size()) {
    TxSlot& slot = tx(snd_nxt_ - 1);
    if (!slot.sacked) {
      slot.xmit_us = now_us;
      out[n].hdr = MakeHeader(NC_CT_DATA, now_us);
      out[n].hdr.seq = snd_nxt_ - 1;
      out[n].handle = slot.handle;
      out[n].len = slot.len;
      n++;
      stats_.tail_probes++;  // a probe, not a loss repair: counted apart from retransmits
    }
    tlp_outstanding_ = true;
  }
  // Retransmissions, within the congestion window (pipe = in flight and not known lost/sacked).
  uint32_t pipe = (snd_nxt_ - snd_una_) - sacked_cnt_ - lost_cnt_;
  for (uint32_t s = snd_una_; lost_cnt_ > 0 && s != snd_nxt_ && n < out.size(); ++s) {
    TxSlot& slot = tx(s);
    if (!slot.lost) continue;
    if (pipe >= cc_->cwnd() && pipe > 0) break;
    slot.lost = false;
    lost_cnt_--;
    slot.retransmitted = true;
    slot.xmit_us = now_us;
    out[n].hdr = MakeHeader(NC_CT_DATA, now_us);
    out[n].hdr.seq = s;
    out[n].handle = slot.handle;
    out[n].len = slot.len;
    n++;
    pipe++;
    stats_.retransmits++;
  }
  // New data. After an idle longer than an RTO the window restarts (RFC 7661): a receiver's
  // fill ring is shallow after a quiet second (afxdp_driver.cc, kFillShallow) and takes the
  // initial window's burst, not a whole window of the past.
  if (snd_una_ == snd_nxt_ && snd_nxt_ != snd_end_ && last_data_sent_us_ != 0 &&
      now_us - last_data_sent_us_ > rto_us_ && cc_->cwnd() > cfg_.initial_cwnd) {
    cc_->OnIdle(cfg_.initial_cwnd);
    stats_.idle_restarts++;
  }
  while (n < out.size() && snd_nxt_ != snd_end_ && pipe < cc_->cwnd() &&
         SendWindowAllows(tx(snd_nxt_).len)) {
    TxSlot& slot = tx(snd_nxt_);
    slot.xmit_us = now_us;
    out[n].hdr = MakeHeader(NC_CT_DATA, now_us);
    out[n].handle = slot.handle;
    out[n].len = slot.len;
    n++;
    in_flight_bytes_ += Charge(slot.len);
    snd_nxt_++;
    pipe++;
    stats_.data_sent++;
    last_data_sent_us_ = now_us;
  }
  // (After the batch: whether the flight is small enough for the peer to hold its ACK.)
  if (last_data_sent_us_ == now_us && snd_una_ != snd_nxt_) {
    if (tlp_deadline_us_ == UINT64_MAX) tlp_deadline_us_ = now_us + TlpTimeout();
    if (rto_deadline_us_ == UINT64_MAX) ArmRto(now_us);
  }
  // Zero-window probe: data waits, nothing in flight, the peer's window is too small.
  if (snd_nxt_ != snd_end_ && snd_una_ == snd_nxt_ && !SendWindowAllows(tx(snd_nxt_).len)) {
    if (probe_deadline_us_ == UINT64_MAX) probe_deadline_us_ = now_us + rto_us_;
    if (now_us >= probe_deadline_us_ && n < out.size()) {
      out[n++] = {MakeHeader(NC_CT_KEEPALIVE, now_us), 0, 0};
      stats_.zero_window_probes++;
      probe_deadline_us_ = now_us + rto_us_;
    }
  } else {
    probe_deadline_us_ = UINT64_MAX;
  }
  // Keepalive: nothing heard for a while.
  if (now_us >= next_keepalive_us_ && n < out.size()) {
    out[n++] = {MakeHeader(NC_CT_KEEPALIVE, now_us), 0, 0};
    stats_.keepalives_sent++;
    next_keepalive_us_ = now_us + std::max<uint64_t>(cfg_.keepalive_idle_us / 4, 1);
  }
  if ((ack_now_ || now_us >= ack_deadline_us_) && n < out.size()) {
    out[n++] = {MakeHeader(NC_CT_ACK, now_us), 0, 0};
    stats_.acks_sent++;
  }
  return n;
}

void Transport::ReleaseAll() {
  for (uint32_t s = snd_una_; s != snd_end_; ++s) owner_->ReleaseTx(tx(s).handle), tx(s) = TxSlot{};
  snd_una_ = snd_nxt_ = snd_end_;
  snd_queued_bytes_ = in_flight_bytes_ = 0;
  sacked_cnt_ = lost_cnt_ = 0;
  for (uint32_t s = rcv_deliver_; Before(s, rcv_highest_); ++s) {
    if (rx(s).present) owner_->ReleaseRx(rx(s).handle);
    rx(s) = RxSlot{};
  }
  rcv_deliver_ = rcv_nxt_ = rcv_highest_;
  state_ = TransportState::kFailed;
}

uint64_t Transport::next_timer_us() const {
  if (state_ != TransportState::kUp) return UINT64_MAX;
  uint64_t t = std::min(
      {ack_deadline_us_, probe_deadline_us_, next_keepalive_us_, last_rx_us_ + cfg_.dead_peer_us});
  if (ack_now_) t = 0;
  if (snd_una_ != snd_nxt_) {
    t = std::min({t, rto_deadline_us_, rack_timer_us_});
    if (!tlp_outstanding_) t = std::min(t, tlp_deadline_us_);
  }
  return t;
}

}  // namespace netch::afxdp
