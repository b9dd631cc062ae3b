#include "afxdp_channels/afxdp_driver.h"

#include <arpa/inet.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <bitset>
#include <condition_variable>
#include <mutex>

#include "absl/strings/str_format.h"
#include "afxdp_channels/channel_core.h"
#include "afxdp_channels/engine.h"
#include "afxdp_channels/netdev.h"
#include "afxdp_channels/transport.h"
#include "afxdp_channels/xsk.h"
#include "bpf/steer_program.h"
#include "common/errno_status.h"
#include "common/ipv4.h"
#include "common/netns.h"
#include "common/random.h"
#include "common/unique_fd.h"

namespace netch::chan {
namespace {

using afxdp::kNoFrame;
using afxdp::SendPool;
using afxdp::Transport;
using afxdp::TransportConfig;
using afxdp::TxPacket;

constexpr uint32_t kBatch = 64;
constexpr uint32_t kTxBatchesPerRound = 4;  // packets a channel sends per engine round, in kBatch
constexpr uint32_t kChanRing = 512;         // per-channel SPSC rings (a 64 KB segment
                                            // is delivered as up to kMaxFrags pieces)
constexpr uint32_t kFreeMin = 16;           // empty send buffers an idle channel holds
constexpr uint32_t kCtlReserve = 64;        // frames kept for ACKs and handshakes
// The fill ring is shallow (kFillShallow frames) until a burst takes from it (AdaptFillDepth),
// deep from then on, and shallow again after kFillQuietUs without one. Why shallow: the kernel
// fills the frames in ring order, so a frame comes back only after every other frame in the ring
// has been used once; a ring 4,096 deep cycles 16 MB, and after a pause each arriving packet lands
// in a frame no cache and no TLB still holds (the kernel writes it through 4 KB mappings of its
// own). 512 frames hold a new channel's first flight (initial window 16 segments of up to 18
// frames).
constexpr uint32_t kFillShallow = 512;
constexpr uint64_t kFillQuietUs = 1'000'000;
// A poller's round that took at most this many descriptors prefetches their whole payload (Run).
constexpr uint32_t kPrefetchPayloadFrames = 2;
constexpr uint16_t kSrcPortBase = 49152;        // channel id -> UDP source port (RSS/ECMP entropy)
constexpr uint64_t kCookieTickUs = 16'000'000;  // a cookie is valid for one to two ticks
// How long an initiator waits for its peer's address to resolve (ARP) before the channel fails
// as unreachable, and how often, at most, its engine looks.
constexpr uint64_t kNeighborTimeoutUs = 1'000'000;
constexpr uint64_t kNeighborPollMaxUs = 20'000;
// A multi-buffer frame longer than this many UMEM frames is malformed: a 64 KB IPv4 packet
// takes 18 frames of 3,840 bytes in copy mode; the rest is margin for smaller NIC buffers.
constexpr uint32_t kMaxFrags = 24;
// One kernel-UDP segment (header and payload), rounded up: its largest is the IPv4 maximum; at
// MTU 1500 a 64 KB slot per 1.4 KB segment capped a channel at ~100 segments in flight, fewer
// than an event loop's sockets had to send (Redis MSET -P 16 over 50 connections).
constexpr uint32_t PoolSlotBytes(size_t max_payload) {
  return static_cast<uint32_t>((max_payload + wire::kSegHdrLen + 2047) & ~size_t{2047});
}
constexpr size_t kSlotBytes = 64 << 10;     // one AF_XDP TX slot: 16 UMEM frames
constexpr uint32_t kTxSlotsPerQueue = 256;  // 16 MB of UMEM per queue, for AF_XDP TX only
// An idle channel's share of send slots (send pool, UMEM TX slots); a busy one's grows
// up to pool_cap_ slots carrying at most pool_cap_bytes_ (twice its window and some), so a
// stalled channel cannot empty the queue's buffers.
constexpr uint32_t kPoolFreeMin = 4;
// How long a channel's producer takes no empty buffer before the engine takes back what its
// share grew to, when another channel of the queue finds the pool empty: idle channels holding
// grown shares once left none for a busy one on the same queue, for good (four channels on one
// queue, the last two stalled: FillDepthTest).
constexpr uint64_t kFreeIdleUs = 10'000;

class AfxdpDriver;
class XskQueue;

// Handshake progress, engine-side. An initiator goes kSynSent -> kCookieEchoed -> kEstablished;
// a responder's channel is born kEstablished (the cookie proved the initiator).
enum class Hs : uint8_t { kSynSent, kCookieEchoed, kEstablished, kDead };

class AfxdpChannel final : public ChannelCore {
 public:
  AfxdpChannel(uint32_t id, size_t max_payload, afxdp::Umem* umem, SendPool* pool)
      : ChannelCore(id, kChanRing, max_payload), umem_(umem), pool_(pool) {}
  uint8_t* BufAddr(uint64_t token) override {
    return SendPool::Owns(token) ? pool_->Data(token) : umem_->Data(token);
  }
  uint32_t peer_ipv4() const override { return peer_ip; }

  // Engine-side state: touched only by the engine running the channel's queue (and by the
  // creating thread before the channel is handed to that engine).
  afxdp::Umem* umem_;
  SendPool* pool_;        // send buffers of the kernel-UDP path; nullptr with tx "afxdp"
  sockaddr_in peer_sa{};  // the peer's NetChannel UDP address, for sendmmsg
  XskQueue* queue = nullptr;
  wire::FrameAddrs addrs;
  uint32_t peer_ip = 0;  // set before the channel is published
  uint16_t peer_chan = 0;
  uint64_t local_token = 0;  // what the peer's packets must carry (also in the steering map)
  uint64_t peer_token = 0;   // what ours carry
  wire::Handshake hs_rec;    // the handshake as agreed so far (the initiator echoes it)
  bool active = false;       // we initiated
  bool send_cookie_ack = false;
  bool keep_delivered = false;  // dead, but what was delivered stays readable
  Hs hs = Hs::kSynSent;
  uint64_t syn_next_us = 0, syn_rto_us = 0, connect_deadline_us = 0;
  // The steering program's wrong-queue count for this id when the handshake began: more at its
  // timeout means the peer answered on a queue we do not listen on (kWrongQueue).
  uint64_t wrong_queue_at_start = 0;
  // An initiator whose next hop's MAC (the peer's, or its gateway's) was not in the neighbour
  // table: the engine looks again after neigh_poll_us (doubling up to kNeighborPollMaxUs) and
  // sends the SYN once it resolves; kUnreachable at neigh_deadline_us.
  uint32_t next_hop = 0;
  bool neigh_pending = false;
  uint64_t neigh_deadline_us = 0, neigh_poll_us = 0;
  uint64_t rx_held = 0;  // delivered to rxq_, not yet returned
  uint32_t free_target = kFreeMin;
  // free_'s size after the engine's last top-up, and when the producer last took from it: a
  // share grown for a burst goes back after kFreeIdleUs without a take.
  uint32_t free_topped = 0;
  uint64_t free_taken_us = 0;
  std::unique_ptr<Transport> transport;
  // The peer stack's incarnation once known (0 before): read by other engines when a peer
  // restarts, hence atomic.
  std::atomic<uint64_t> peer_incarnation{0};
};

struct QueueCounters {
  std::atomic<uint64_t> rx_frames{0}, rx_malformed{0}, rx_unknown_chan{0}, handshakes_rx{0},
      handshakes_bad{0}, rx_bad_token{0}, reaped{0}, fill_ring_empty{0}, tx_ring_full{0},
      frames_free{0}, frames_in_fill{0}, tx_slots_free{0}, rx_multi_buffer{0}, udp_tx_packets{0},
      udp_tx_errors{0}, udp_gso_trains{0}, handshakes_refused{0}, fill_target{0}, fill_deepened{0};
  std::array<std::atomic<uint64_t>, kFailCauses> failed{};  // channels failed, by FailCause
};

class XskQueue final : public EngineTask, public Transport::BufferOwner {
 public:
  XskQueue(AfxdpDriver* d, uint32_t q) : driver_(d), queue_(q), by_id_(NC_MAX_CHANNELS, nullptr) {}

  // tx_slots: 64 KB TX slots in the UMEM for AF_XDP TX of large segments (0: none).
  // udp_tx: the kernel-UDP transmit path, with send slots of pool_slot bytes.
  absl::Status Open(const std::string& ifname, uint32_t frames, bool udp_tx, uint32_t pool_slot,
                    uint32_t tx_slots);
  // Once the driver knows the queue's segment size and window: whether large AF_XDP TX segments
  // are on (the socket bound multi-buffer), and how many send slots one channel may hold.
  void SetSendLimits(bool slots, size_t max_payload, uint32_t rcv_buf);
  // The largest segment payload a channel on this queue sends (its transmit path's and the
  // MTU's limit).
  size_t max_payload() const { return max_payload_; }
  ~XskQueue() override;

  bool Run(uint64_t now_us, uint64_t* deadline_us) override;
  int wait_fd() const override { return xsk_->fd(); }

  void ReleaseTx(uint64_t handle) override { FreeTx(handle); }
  void ReleaseRx(uint64_t handle) override { FreeChain(handle); }

  // Control operations, applied by the engine running the queue. Add and Remove return once
  // applied; Retire (another engine found the channel's peer restarted) does not wait.
  void AddChannel(std::shared_ptr<AfxdpChannel> ch);
  void RemoveChannel(std::shared_ptr<AfxdpChannel> ch);
  void RetireChannel(std::shared_ptr<AfxdpChannel> ch);

  uint32_t queue() const { return queue_; }
  afxdp::Umem* umem() { return umem_.get(); }
  SendPool* pool() { return pool_.get(); }
  // Send buffers are 64 KB (send pool or UMEM TX slots): a channel holds few of them idle.
  bool large_send_buffers() const { return pool_ || slots_; }
  afxdp::XskSocket* xsk() { return xsk_.get(); }
  size_t channel_count() const { return nchans_.load(std::memory_order_relaxed); }
  QueueCounters counters;

 private:
  enum class OpKind : uint8_t { kAdd, kRemove, kRetire };
  struct Op {
    std::shared_ptr<AfxdpChannel> ch;
    OpKind kind;
  };
  void PostOp(Op op, bool wait);
  void ApplyOps(uint64_t now);
  // One received frame: n descriptors, all but the last marked XDP_PKT_CONTD.
  void HandleFrame(const xdp_desc* d, uint32_t n, uint64_t now);
  // A multi-buffer DATA frame becomes pieces the consumer reads as ordinary segments: each
  // fragment after the first gets a NetChannel header (seq advanced) written into its frame's
  // headroom, the first's payload_len is cut to its own bytes, and links_ chains them so the
  // transport holds the frame as one handle. False if the fragments cannot be made pieces.
  bool LinkPieces(const xdp_desc* d, uint32_t n, const wire::ParsedFrame& pf, uint64_t head,
                  const Transport& t);
  void DropFrames(const xdp_desc* d, uint32_t n) {
    for (uint32_t i = 0; i < n; ++i) umem_->FreeFrame(d[i].addr);
  }
  // Moves the transport's next in-order frame, all its pieces, to the consumer's ring; false
  // when there is none or the ring lacks room for all of them.
  bool DeliverNext(AfxdpChannel& ch);
  void FreeTx(uint64_t t) {
    if (SendPool::Owns(t)) {
      pool_->Free(t);
    } else {
      umem_->FreeFrame(t);
    }
  }
  void FreeChain(uint64_t handle);
  // What the transport wants on the wire, through the kernel's UDP socket (one sendmmsg).
  void SendUdp(AfxdpChannel& ch, const TxPacket* pk, size_t n);
  // RunChannel's batch of packets to send: engine-side scratch, not a local, whose headers'
  // initializers zeroed 6 KB on every round of every channel (8% of a busy-polling thread).
  TxPacket tx_pk_[kBatch];
  // Handshake packets addressed to no channel yet: SYN (answered with a cookie, no state kept)
  // and COOKIE_ECHO (the cookie checked, the channel created).
  void HandleSyn(const wire::ParsedFrame& pf, const wire::MacAddr& peer_mac, uint64_t now);
  void HandleCookieEcho(const wire::ParsedFrame& pf, const wire::MacAddr& peer_mac, uint64_t now);
  // A proven initiator is refused a channel: counted, and logged at most once a second (a peer
  // that hits a cap retries, and an operator needs the reason, not a line per attempt).
  void NoteRefused(uint32_t peer_ip, const absl::Status& why, uint64_t now);
  // An initiator's channel hears back from the responder.
  void HandleSynAck(AfxdpChannel& ch, const wire::ParsedFrame& pf, uint64_t now);
  void HandleCookieAck(AfxdpChannel& ch, const wire::ParsedFrame& pf, uint64_t now);
  bool RunChannel(AfxdpChannel& ch, uint64_t now, uint64_t* deadline);
  void Establish(AfxdpChannel& ch, uint16_t peer_chan, uint64_t now);
  // Closes (kClosed; FIN first if send_fin) or fails (kFailed, counted by cause) the channel;
  // its resources are reclaimed by Reap() at the end of the round.
  void Kill(AfxdpChannel& ch, ChannelState st, bool send_fin = false,
            FailCause cause = FailCause::kNone);
  void Fail(AfxdpChannel& ch, FailCause cause) { Kill(ch, ChannelState::kFailed, false, cause); }
  // An initiator waiting for its peer's MAC: looks it up when due (syn_next_us); true once known.
  bool ResolvePeer(AfxdpChannel& ch, uint64_t now);
  void Reap();
  void RunZombies();
  // Sends one packet with no data (handshake, FIN, RST, ...) and the given channel payload;
  // false when no frame or TX slot is free.
  bool SendControl(const wire::FrameAddrs& a, const wire::ChanHeader& h,
                   const wire::Handshake* hs = nullptr);
  wire::ChanHeader ControlHeader(const AfxdpChannel& ch, uint8_t type, uint64_t now) const;
  void Publish(AfxdpChannel& ch);

  AfxdpDriver* driver_;
  const uint32_t queue_;
  size_t max_payload_ = 0;  // SetSendLimits
  uint32_t rcv_buf_ = 0;    // SetSendLimits: the receive window this queue's channels advertise
  std::unique_ptr<afxdp::Umem> umem_;
  std::unique_ptr<afxdp::XskSocket> xsk_;
  // The fill ring's depth: fill_target_ is what each round refills it to, fill_deep_ the most
  // (AdaptFillDepth), fill_after_ its level after the last refill, fill_burst_us_ when a round
  // last found a burst taken from it.
  uint32_t fill_target_ = 0;
  uint32_t fill_deep_ = 0;
  uint32_t fill_after_ = 0;
  uint64_t fill_burst_us_ = 0;
  uint64_t fill_ms_ = 0;  // the millisecond the rate is counted in, and what it took
  uint32_t fill_ms_taken_ = 0;
  uint32_t fill_prev_ms_taken_ = 0;  // ... and in the millisecond before it
  // When a channel last wanted send slots the pool did not have (RunChannel gives back idle
  // channels' grown shares then).
  uint64_t starved_us_ = 0;
  void AdaptFillDepth(uint32_t level, uint64_t now);

  // Per UMEM frame, engine-side: how a received frame's pieces chain and what each holds
  // against the receive window (the pieces' charges add up to the frame's Transport::Charge).
  struct Link {
    uint64_t next = kNoFrame;  // the next piece's token
    uint32_t len = 0;          // the piece: NetChannel header + payload bytes
    uint32_t charge = 0;
    uint32_t pieces = 1;  // on the first piece: how many
  };
  std::vector<Link> links_;
  Link& link(uint64_t token) { return links_[token / umem_->frame_size()]; }
  // A frame whose descriptors straddle two Receive batches.
  xdp_desc chain_[kMaxFrags];
  uint32_t chain_len_ = 0;
  bool chain_overflow_ = false;  // more than kMaxFrags: dropped up to its last descriptor

  // Kernel-UDP transmit (tx "udp"): one socket per queue, datagrams pinned to the queue by the
  // steering program's tc egress hook.
  std::unique_ptr<SendPool> pool_;
  // AF_XDP TX of segments larger than a frame: 64 KB slots in the UMEM, sent as chains.
  bool slots_ = false;
  static constexpr uint32_t kSlotDescs = 17;  // (128 B headroom + 64 KB) / 4 KB frames, rounded up
  // What one channel may hold of the send slots (pool or UMEM): at most half of them, and slots
  // whose bytes — queued and unacknowledged segments at their length, empty and not yet sent
  // ones as full — stay within twice its window and some.
  uint32_t pool_cap_ = 0;
  uint64_t pool_cap_bytes_ = 0;
  uint32_t slot_bytes_ = 0;  // one send slot
  UniqueFd udp_fd_;
  struct UdpBatch {
    mmsghdr msgs[kBatch];
    iovec iov[kBatch][2];
    uint8_t hdr[kBatch][wire::kChanHdrLen + wire::kMaxSacks * sizeof(nc_sack_block)];
    alignas(cmsghdr) uint8_t cmsg[kBatch][CMSG_SPACE(sizeof(uint16_t))];
  };
  std::unique_ptr<UdpBatch> udp_batch_;
  uint32_t refusals_unlogged_ = 0;  // refusals since the last log line (NoteRefused)
  uint64_t refusal_logged_us_ = 0;
  bool gso_ = true;  // UDP_SEGMENT trains; off for good once the kernel refuses one
  static constexpr size_t kGsoMaxPackets = 64;       // the kernel's UDP_MAX_SEGMENTS (older ones)
  static constexpr size_t kGsoMaxBytes = 65507 - 7;  // one UDP datagram's payload

  std::vector<AfxdpChannel*> chans_;  // engine-side
  std::vector<AfxdpChannel*> by_id_;  // engine-side, indexed by local channel id
  std::vector<AfxdpChannel*> dying_;  // engine-side: killed this round, reaped at its end
  // Engine-side: reaped channels whose application side may still return buffers (dequeued,
  // not yet released) or finish a copy. Dropped once nothing can come back.
  std::vector<std::shared_ptr<AfxdpChannel>> zombies_;
  std::atomic<size_t> nchans_{0};

  std::mutex ops_mu_;
  std::condition_variable ops_cv_;
  std::vector<Op> ops_;
  uint64_t ops_posted_ = 0, ops_done_ = 0;
  std::atomic<bool> ops_pending_{false};
};

class AfxdpDriver final : public Driver {
 public:
  explicit AfxdpDriver(const DriverOptions& o)
      : opts_(o), cookie_key_(RandomSipKey()), incarnation_(RandomNonZeroU64()) {}
  ~AfxdpDriver() override;
  absl::Status Init();

  std::string_view name() const override { return "afxdp"; }
  absl::StatusOr<std::shared_ptr<Channel>> Connect(const ChannelParams& params) override;
  std::shared_ptr<Channel> Accept() override;
  int accept_fd() const override { return accept_q_.fd(); }
  absl::Status Destroy(Channel& ch) override;
  absl::Status MoveChannel(uint32_t id, int engine) override;
  std::vector<EngineInfo> Engines() const override;
  int queue_count() const override { return static_cast<int>(queues_.size()); }
  DriverStats Stats() const override;
  std::vector<std::shared_ptr<Channel>> Channels() const override;

  // ---- for XskQueue ---------------------------------------------------------------------------
  const afxdp::InterfaceInfo& ifinfo() const { return ifi_; }
  const DriverOptions& opts() const { return opts_; }
  uint64_t incarnation() const { return incarnation_; }
  int neigh_fd() const { return neigh_fd_.get(); }  // for LookupNeighbor, in the driver's netns
  // Frames for `ch` dropped on another rx queue since its handshake began.
  bool WrongQueueSince(const AfxdpChannel& ch) const {
    auto st = opts_.steer->ReadChanStats(ch.id());
    return st.ok() && st->wrong_queue > ch.wrong_queue_at_start;
  }
  // The host on our link that takes packets for `peer_ip`: the peer itself or its gateway. Fails
  // (ENETUNREACH) when the kernel routes the peer through another interface.
  absl::StatusOr<uint32_t> NextHopTo(uint32_t peer_ip);
  TransportConfig TransportFor(uint16_t local, uint16_t peer, uint32_t isn_send, uint32_t isn_recv,
                               uint32_t rcv_buf) const;
  // The cookie a responder mints for a SYN: the responder's token and ISN, a keyed hash of what
  // the SYN said and of the coarse time. Only this driver can compute it.
  struct Cookie {
    uint64_t token;
    uint32_t isn;
  };
  Cookie MintCookie(uint32_t peer_ip, uint16_t peer_chan, uint32_t queue, const wire::Handshake& hs,
                    uint32_t cookie_time) const;
  static uint32_t CookieTime(uint64_t now_us) {
    return static_cast<uint32_t>(now_us / kCookieTickUs);
  }
  // A channel the initiator proved (valid cookie): registers it (id, steering with its token) and
  // queues it for Accept(); an error says why it was refused (not accepting, out of ids, peer
  // over its cap).
  absl::StatusOr<std::shared_ptr<AfxdpChannel>> NewPassive(XskQueue* q, uint32_t peer_ip,
                                                           const wire::MacAddr& peer_mac,
                                                           uint64_t local_token);
  // A channel to `peer_ip` was established with the peer's stack incarnation `inc`: channels to
  // the same address from an earlier incarnation belong to a stack that is gone (the peer
  // restarted); they are failed, so their sockets reset and their resources return.
  void RetireOldIncarnations(uint32_t peer_ip, uint64_t inc);
  wire::FrameAddrs AddrsFor(uint32_t id, uint32_t peer_ip, const wire::MacAddr& peer_mac) const;
  int EngineOf(XskQueue* q) const;
  // Releases a dead channel's id and steering entry; returns the driver's reference to it.
  std::shared_ptr<AfxdpChannel> Unregister(uint32_t id, const AfxdpChannel* ch);

 private:
  absl::StatusOr<std::shared_ptr<AfxdpChannel>> Register(XskQueue* q, uint32_t peer_ip,
                                                         const wire::MacAddr& peer_mac,
                                                         uint64_t local_token);
  absl::Status MoveQueueLocked(XskQueue* q, int engine);  // move_mu_ held

  DriverOptions opts_;
  const SipKey cookie_key_;
  const uint64_t incarnation_;
  afxdp::InterfaceInfo ifi_;
  UniqueFd neigh_fd_;
  std::unique_ptr<afxdp::RouteTable> routes_;  // opened in the driver's netns
  bool udp_tx_ = false;           // some queue transmits through the kernel's UDP socket
  uint32_t afxdp_tx_queues_ = 0;  // with udp_tx_: queues [0, n) transmit through AF_XDP anyway
  std::vector<std::unique_ptr<XskQueue>> queues_;
  std::vector<std::unique_ptr<Engine>> engines_;

  mutable std::mutex mu_;  // short critical sections only; never held while waiting on an engine
  std::bitset<NC_MAX_CHANNELS> used_ids_;
  uint32_t next_id_ = 1;
  std::vector<std::shared_ptr<AfxdpChannel>> channels_;
  AcceptQueue accept_q_;
  std::vector<int> queue_engine_;  // queue -> engine index
  std::mutex move_mu_;  // serializes moves and destroys (both hand tasks between threads)
};

// ---------------------------------------------------------------------------------------------
// XskQueue

absl::Status XskQueue::Open(const std::string& ifname, uint32_t frames, bool udp_tx,
                            uint32_t pool_slot, uint32_t tx_slots) {
  afxdp::UmemConfig uc;
  uc.frame_count = frames;
  uc.slot_count = tx_slots;
  uc.frame_size = 4096;
  uc.fill_size = 4096;
  uc.comp_size = 4096;
  auto umem = afxdp::Umem::Create(uc);
  if (!umem.ok()) return umem.status();
  umem_ = std::move(*umem);
  afxdp::XskConfig xc;
  xc.ifname = ifname;
  xc.queue = queue_;
  xc.rx_size = 4096;
  xc.tx_size = 2048;
  absl::StatusOr<std::unique_ptr<afxdp::XskSocket>> xsk;
  // Re-binding a queue right after another socket on it was closed can fail with EBUSY for a
  // moment: the kernel releases the old binding from a work item (xp_release_deferred). A
  // server restarted the moment its predecessor exited hit it in about one start of three
  // (PreloadTest.AServerRestartedAtOnceUnderTheSameInstanceServesAgain; one 20 ms retry was
  // always enough). Matched by the errno: absl files EBUSY under FailedPrecondition, and this
  // loop, which looked for Unavailable, never retried until that test found it.
  for (int attempt = 0; attempt < 50; ++attempt) {
    xsk = afxdp::XskSocket::Create(umem_.get(), xc);
    if (xsk.ok() || StatusErrno(xsk.status()) != EBUSY) break;
    usleep(20'000);
  }
  if (!xsk.ok()) return xsk.status();
  xsk_ = std::move(*xsk);
  // The fill and rx rings must take a whole window's burst: with 64 KB segments an 8 MB window
  // is ~2,300 frames of 3,840 B (a stalled reader's test saw drops at a 2,048-frame fill ring,
  // and so did 64 KB AF_XDP TX chains: ~60 frames dropped by the receiving socket, each a
  // retransmit, per 2 GiB). Either 64 KB path sends data from memory of its own (the UDP send
  // pool, the TX slots), so the frames are the receiver's; 3.5 KB AF_XDP TX sends from them too.
  fill_target_ = udp_tx || tx_slots > 0 ? std::min<uint32_t>(4096, frames / 2)
                                        : std::min<uint32_t>(2048, frames / 4);
  fill_deep_ = fill_target_;
  fill_target_ = std::min(fill_deep_, kFillShallow);
  fill_after_ = umem_->Refill(fill_target_);
  counters.fill_target = fill_target_;
  counters.frames_free = umem_->free_frames();
  links_.resize(frames);
  counters.tx_slots_free = umem_->free_slots();
  if (!udp_tx) return absl::OkStatus();

  auto pool = SendPool::Create(std::max<uint32_t>(driver_->opts().send_pool_bytes / pool_slot, 64),
                               pool_slot);
  if (!pool.ok()) return pool.status();
  pool_ = std::move(*pool);
  udp_fd_.reset(socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!udp_fd_.valid()) return ErrnoStatus(errno, "UDP socket for the transmit path");
  // Never fragment: the MTU bounds every segment, and the peer's XDP program passes fragments
  // to its kernel instead of a channel.
  const int pmtu = IP_PMTUDISC_DO;
  const int sndbuf = 8 << 20;
  const int rcvbuf = 0;  // nothing is ever received here: the kernel clamps to its minimum
  if (setsockopt(udp_fd_.get(), IPPROTO_IP, IP_MTU_DISCOVER, &pmtu, sizeof(pmtu)) ||
      setsockopt(udp_fd_.get(), SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf)) ||
      setsockopt(udp_fd_.get(), SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(rcvbuf)))
    return ErrnoStatus(errno, "UDP transmit socket options");
  if (afxdp::MakeCongestionControl(driver_->opts().congestion, 16, 64)->wants_ecn()) {
    const int tos = 0x02;  // ECT(0), as the AF_XDP path marks its frames
    if (setsockopt(udp_fd_.get(), IPPROTO_IP, IP_TOS, &tos, sizeof(tos)))
      return ErrnoStatus(errno, "IP_TOS on the UDP transmit socket");
  }
  udp_batch_ = std::make_unique<UdpBatch>();
  return absl::OkStatus();
}

void XskQueue::SetSendLimits(bool slots, size_t max_payload, uint32_t rcv_buf) {
  max_payload_ = max_payload;
  rcv_buf_ = rcv_buf;
  slots_ = slots && umem_->slot_count() > 0;
  const uint32_t n = pool_ ? pool_->slots() : umem_->slot_count();
  slot_bytes_ = pool_ ? pool_->slot_size() : static_cast<uint32_t>(kSlotBytes);
  // Small segments (many sockets' short writes) need more slots than their bytes suggest; a
  // quarter of the queue's slots leaves room for three stalled channels more.
  pool_cap_ = std::min(n / 2, std::max(n / 4, 2 * rcv_buf / slot_bytes_ + 16));
  pool_cap_bytes_ = 2 * uint64_t{rcv_buf} + 16 * uint64_t{slot_bytes_};
}

void XskQueue::FreeChain(uint64_t handle) {
  for (uint64_t t = handle; t != kNoFrame;) {
    const uint64_t next = link(t).next;
    umem_->FreeFrame(t);
    t = next;
  }
}

bool XskQueue::LinkPieces(const xdp_desc* d, uint32_t n, const wire::ParsedFrame& pf, uint64_t head,
                          const Transport& t) {
  const uint32_t fsz = umem_->frame_size();
  if (n > 1 &&
      (pf.seg.type != NC_DATA || pf.seg_payload_off - pf.chan_payload_off != wire::kSegHdrLen))
    return false;  // only plain DATA segments can be cut into pieces
  Link& h = link(head);
  h.len = static_cast<uint32_t>(n == 1 ? pf.chan_payload_len : d[0].len - pf.chan_payload_off);
  h.next = n > 1 ? d[1].addr - wire::kSegHdrLen : kNoFrame;
  h.pieces = n;
  uint64_t charge = t.Charge(static_cast<uint32_t>(pf.chan_payload_len));
  if (n == 1) {
    h.charge = static_cast<uint32_t>(charge);
    return true;
  }
  wire::SegHeader seg = pf.seg;
  const uint32_t head_payload = h.len - static_cast<uint32_t>(wire::kSegHdrLen);
  wire::WriteSegHeader(umem_->Data(head), seg, head_payload);
  seg.seq += head_payload;
  for (uint32_t i = 1; i < n; ++i) {
    // The kernel wrote the fragment after XDP_PACKET_HEADROOM: room for our header in front.
    if (d[i].len == 0 || d[i].addr % fsz < wire::kSegHdrLen || d[i].addr % fsz + d[i].len > fsz)
      return false;
    const uint64_t tok = d[i].addr - wire::kSegHdrLen;
    wire::WriteSegHeader(umem_->Data(tok), seg, d[i].len);
    seg.seq += d[i].len;
    Link& l = link(tok);
    l.len = d[i].len + static_cast<uint32_t>(wire::kSegHdrLen);
    l.next = i + 1 < n ? d[i + 1].addr - wire::kSegHdrLen : kNoFrame;
    l.pieces = 1;
    l.charge = d[i].len;
    charge -= d[i].len;
  }
  h.charge = static_cast<uint32_t>(charge);
  return true;
}

bool XskQueue::DeliverNext(AfxdpChannel& ch) {
  uint64_t handle;
  uint32_t len;
  if (!ch.transport->PeekDelivered(&handle, &len)) return false;
  if (ch.rxq_.Room() < link(handle).pieces) return false;
  ch.transport->PopDelivered(&handle, &len);
  for (uint64_t t = handle; t != kNoFrame; t = link(t).next) {
    const BufRef b{t, link(t).len};
    ch.rx_held += b.len;
    ch.rxq_.PushOne(b);
  }
  return true;
}

void XskQueue::SendUdp(AfxdpChannel& ch, const TxPacket* pk, size_t n) {
  UdpBatch& u = *udp_batch_;
  uint32_t len[kBatch];  // each packet on the wire: channel header + segment
  for (size_t i = 0; i < n; ++i) {
    const bool data = pk[i].hdr.type == NC_CT_DATA;
    const size_t hl = wire::WriteChanHeader(u.hdr[i], pk[i].hdr, data ? pk[i].len : 0);
    u.iov[i][0] = {u.hdr[i], hl};
    u.iov[i][1] = {data ? pool_->Data(pk[i].handle) : nullptr, data ? pk[i].len : 0};
    len[i] = static_cast<uint32_t>(hl + u.iov[i][1].iov_len);
  }
  // One message per packet, or per train of DATA packets of one size (the last may be shorter):
  // the kernel cuts a UDP_SEGMENT train every `size` bytes, so each cut is one of our packets
  // (iov[][2] is contiguous, a train's iovecs are one array). Where the MTU lets a segment be
  // 64 KB every train is one packet long; it pays off on small-MTU links.
  size_t nm = 0;
  uint32_t count[kBatch];  // packets in each message
  for (size_t i = 0; i < n;) {
    size_t j = i + 1;
    if (gso_ && pk[i].hdr.type == NC_CT_DATA) {
      size_t total = len[i];
      while (j < n && j - i < kGsoMaxPackets && pk[j].hdr.type == NC_CT_DATA && len[j] <= len[i] &&
             total + len[j] <= kGsoMaxBytes) {
        total += len[j];
        if (len[j++] < len[i]) break;  // a shorter packet can only end a train
      }
    }
    msghdr& m = u.msgs[nm].msg_hdr;
    m = msghdr{};
    m.msg_name = &ch.peer_sa;
    m.msg_namelen = sizeof(ch.peer_sa);
    m.msg_iov = u.iov[i];
    m.msg_iovlen = 2 * (j - i);
    if (j - i > 1) {
      m.msg_control = u.cmsg[nm];
      m.msg_controllen = sizeof(u.cmsg[nm]);
      cmsghdr* c = CMSG_FIRSTHDR(&m);
      c->cmsg_level = SOL_UDP;
      c->cmsg_type = UDP_SEGMENT;
      c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
      const uint16_t size = static_cast<uint16_t>(len[i]);
      std::memcpy(CMSG_DATA(c), &size, sizeof(size));
    }
    count[nm++] = static_cast<uint32_t>(j - i);
    i = j;
  }
  size_t sent_msgs = 0;
  // A full socket buffer (or any refusal) loses the rest of the batch: the transport finds the
  // packets lost and sends them again, as it would after a drop on the wire.
  for (int tries = 0; sent_msgs < nm && tries < 2; ++tries) {
    const int r =
        sendmmsg(udp_fd_.get(), u.msgs + sent_msgs, static_cast<unsigned>(nm - sent_msgs), 0);
    if (r <= 0) {
      // A kernel without UDP GSO (or a device that refuses it): never again on this queue; the
      // train is resent packet by packet once the transport finds it lost.
      if (count[sent_msgs] > 1 && (errno == EINVAL || errno == EOPNOTSUPP || errno == EIO))
        gso_ = false;
      break;
    }
    sent_msgs += static_cast<size_t>(r);
  }
  size_t sent = 0, trains = 0;
  for (size_t k = 0; k < sent_msgs; ++k) {
    sent += count[k];
    trains += count[k] > 1;
  }
  counters.udp_tx_packets.fetch_add(sent, std::memory_order_relaxed);
  counters.udp_gso_trains.fetch_add(trains, std::memory_order_relaxed);
  if (sent < n) counters.udp_tx_errors.fetch_add(n - sent, std::memory_order_relaxed);
}

XskQueue::~XskQueue() {
  zombies_.clear();
  xsk_.reset();
  umem_.reset();
}

void XskQueue::PostOp(Op op, bool wait) {
  std::unique_lock lk(ops_mu_);
  ops_.push_back(std::move(op));
  const uint64_t ticket = ++ops_posted_;
  ops_pending_.store(true, std::memory_order_release);
  if (engine.load(std::memory_order_acquire) == nullptr) {
    // No engine runs the queue (driver shutting down): apply on this thread.
    lk.unlock();
    ApplyOps(NowUs());
    return;
  }
  Wake();
  if (wait) ops_cv_.wait(lk, [&] { return ops_done_ >= ticket; });
}

void XskQueue::AddChannel(std::shared_ptr<AfxdpChannel> ch) {
  PostOp({std::move(ch), OpKind::kAdd}, true);
}
void XskQueue::RemoveChannel(std::shared_ptr<AfxdpChannel> ch) {
  PostOp({std::move(ch), OpKind::kRemove}, true);
}
void XskQueue::RetireChannel(std::shared_ptr<AfxdpChannel> ch) {
  PostOp({std::move(ch), OpKind::kRetire}, false);
}

void XskQueue::ApplyOps(uint64_t now) {
  std::vector<Op> ops;
  {
    std::lock_guard g(ops_mu_);
    ops.swap(ops_);
    ops_pending_.store(false, std::memory_order_relaxed);
  }
  for (const Op& op : ops) {
    AfxdpChannel* ch = op.ch.get();
    switch (op.kind) {
      case OpKind::kAdd:
        chans_.push_back(ch);
        by_id_[ch->id()] = ch;
        ch->set_task(this);
        ch->pub_.queue = static_cast<int>(queue_);
        ch->syn_next_us = now;  // first SYN on the next round
        break;
      case OpKind::kRemove:
        Kill(*ch, ChannelState::kClosed, /*send_fin=*/true);
        break;
      case OpKind::kRetire:
        Fail(*ch, FailCause::kPeerRestarted);
        break;
    }
  }
  Reap();
  nchans_.store(chans_.size(), std::memory_order_relaxed);
  std::lock_guard g(ops_mu_);
  ops_done_ += ops.size();
  ops_cv_.notify_all();
}

bool XskQueue::SendControl(const wire::FrameAddrs& a, const wire::ChanHeader& h,
                           const wire::Handshake* hs) {
  if (xsk_->tx_free() == 0) {
    counters.tx_ring_full.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  const uint64_t f = umem_->AllocFrame();
  if (f == kNoFrame) return false;
  uint8_t* p = umem_->Data(f);
  size_t len = wire::WriteHeaders(p, a, h, nullptr, hs ? wire::kHandshakeLen : 0);
  if (hs) {
    wire::WriteHandshake(p + len, *hs);
    len += wire::kHandshakeLen;
  }
  xdp_desc d{f, static_cast<uint32_t>(len), 0};
  const bool ok = xsk_->Transmit({&d, 1}) == 1;
  umem_->FreeFrame(f);  // the TX ring holds its own reference until completion
  return ok;
}

wire::ChanHeader XskQueue::ControlHeader(const AfxdpChannel& ch, uint8_t type, uint64_t now) const {
  wire::ChanHeader h;
  h.type = type;
  h.dst_chan = (type == NC_CT_SYN || type == NC_CT_COOKIE_ECHO) ? NC_CHAN_UNASSIGNED : ch.peer_chan;
  h.src_chan = static_cast<uint16_t>(ch.id());
  h.seq = ch.transport ? ch.transport->next_seq()
                       : (ch.active ? ch.hs_rec.init_isn : ch.hs_rec.resp_isn);
  h.wnd = rcv_buf_;
  h.ts_val = static_cast<uint32_t>(now) | 1;
  h.token = type == NC_CT_SYN ? 0 : ch.peer_token;
  return h;
}

bool XskQueue::Run(uint64_t now, uint64_t* deadline) {
  bool worked = false;
  if (ops_pending_.load(std::memory_order_acquire)) {
    ApplyOps(now);
    worked = true;
  }
  worked |= umem_->ReapCompletions() > 0;

  xdp_desc descs[2 * kBatch];
  const uint32_t n = xsk_->Receive(descs);
  // What arrived was just written by another CPU (on veth the sender's, which runs our XDP
  // program and the copy into the UMEM): its header lines are in that CPU's cache. Asked for
  // all at once here, their misses overlap instead of stalling the parser one after another
  // (~0.2 µs less per frame at the head of a busy-polled round trip, docs/DATAPATH.md).
  // A poller's round (a busy-polled reader, an event loop's wait) that took one or two frames
  // most likely took a request or a reply its reader copies out right after the round, on this
  // core: the rest of the frame is asked for too, so that copy finds it in cache instead of
  // missing line after line (docs/DATAPATH.md). Not in the engine's own rounds, whose reader is
  // another thread (a 128 KiB stream lost 4-14% of its rate to it), nor for batches, whose frames
  // would push each other out before their reader came.
  const bool whole = n <= kPrefetchPayloadFrames && PollerRound();
  for (uint32_t i = 0; i < n; ++i) {
    const uint8_t* p = umem_->Data(descs[i].addr);
    __builtin_prefetch(p);
    __builtin_prefetch(p + 64);
    if (whole)
      for (uint32_t o = 128; o < descs[i].len; o += 64) __builtin_prefetch(p + o);
  }
  for (uint32_t i = 0; i < n; ++i) {
    const bool more = descs[i].options & XDP_PKT_CONTD;
    if (chain_len_ == 0 && !more) {
      HandleFrame(&descs[i], 1, now);  // the common case: one buffer, no copy of the descriptor
      continue;
    }
    if (chain_len_ < kMaxFrags) {
      chain_[chain_len_++] = descs[i];
    } else {
      chain_overflow_ = true;
      umem_->FreeFrame(descs[i].addr);
    }
    if (more) continue;
    if (chain_overflow_) {
      counters.rx_frames.fetch_add(1, std::memory_order_relaxed);
      counters.rx_malformed.fetch_add(1, std::memory_order_relaxed);
      DropFrames(chain_, chain_len_);
    } else {
      counters.rx_multi_buffer.fetch_add(1, std::memory_order_relaxed);
      HandleFrame(chain_, chain_len_, now);
    }
    chain_len_ = 0;
    chain_overflow_ = false;
  }
  worked |= n > 0;

  for (AfxdpChannel* ch : chans_) worked |= RunChannel(*ch, now, deadline);
  if (!dying_.empty()) {
    Reap();
    worked = true;
  }
  if (!zombies_.empty()) RunZombies();

  if (xsk_->tx_pending()) {
    // Copy mode sends at most 32 descriptors per sendto(): a round of 64 KB chains (17 each)
    // needs several kicks, or the ring drains at two segments per engine round.
    for (int i = 0; i < (slots_ ? 64 : 1) && xsk_->tx_pending(); ++i) xsk_->KickTx();
    worked = true;
  }
  // Keep the fill ring deep enough that a burst never finds it empty (AdaptFillDepth). The
  // last kCtlReserve frames stay for ACKs, which is what frees TX frames; starving them would
  // deadlock the channel.
  const uint32_t level = umem_->fill_ring_level();
  AdaptFillDepth(level, now);
  fill_after_ = level;
  if (level < fill_target_) {
    if (level == 0) counters.fill_ring_empty.fetch_add(1, std::memory_order_relaxed);
    const uint32_t spare =
        umem_->free_frames() > kCtlReserve ? umem_->free_frames() - kCtlReserve : 0;
    fill_after_ += umem_->Refill(std::min(fill_target_ - level, spare));
  }
  counters.fill_target.store(fill_target_, std::memory_order_relaxed);
  counters.frames_free.store(umem_->free_frames(), std::memory_order_relaxed);
  // (The level after the refill, as counted above: not the kernel's consumer index read again.)
  counters.frames_in_fill.store(fill_after_, std::memory_order_relaxed);
  counters.tx_slots_free.store(umem_->free_slots(), std::memory_order_relaxed);
  return worked;
}

void XskQueue::AdaptFillDepth(uint32_t level, uint64_t now) {
  const uint32_t taken = fill_after_ > level ? fill_after_ - level : 0;
  if (const uint64_t ms = now / 1000; ms != fill_ms_) {
    fill_prev_ms_taken_ = ms == fill_ms_ + 1 ? fill_ms_taken_ : 0;
    fill_ms_ = ms;
    fill_ms_taken_ = 0;
  }
  fill_ms_taken_ += taken;
  // A burst: half the shallow ring taken in one round, the ring found empty, or a quarter of it
  // within this millisecond and the last — a stream whose rounds each take a little (a new
  // channel's first flight, then twice that), which an engine kept off its core for a few ms
  // would find with the shallow ring drained.
  if (taken > kFillShallow / 2 || level == 0 ||
      fill_ms_taken_ + fill_prev_ms_taken_ > kFillShallow / 4) {
    fill_burst_us_ = now;
    if (fill_target_ < fill_deep_) {
      fill_target_ = fill_deep_;
      counters.fill_deepened.fetch_add(1, std::memory_order_relaxed);
    }
  } else if (fill_target_ > kFillShallow && now - fill_burst_us_ > kFillQuietUs) {
    // (The frames already in the ring stay there: it gets shallow as traffic uses them.)
    fill_target_ = kFillShallow;
  }
}

// Why a stack with DriverOptions::accept off refuses every channel.
absl::Status NotAccepting() {
  return absl::FailedPreconditionError("this stack does not accept channels");
}

void XskQueue::HandleFrame(const xdp_desc* frags, uint32_t n, uint64_t now) {
  counters.rx_frames.fetch_add(1, std::memory_order_relaxed);
  const xdp_desc& d = frags[0];
  const uint8_t* p = umem_->Data(d.addr);
  size_t frame_len = 0;
  for (uint32_t i = 0; i < n; ++i) frame_len += frags[i].len;
  // The XDP program validated the frame; the driver checks again because a frame in its socket
  // is the input of a reliable transport and must not be trusted blindly (and the oracle is
  // the same parser, so this costs a few dozen nanoseconds).
  const wire::ParsedFrame pf = wire::ParseFrame({p, d.len}, frame_len, driver_->opts().udp_port);
  // Only DATA is ever longer than one buffer; anything else that is came from a broken peer.
  if (!pf.valid() || pf.dst_ip != driver_->ifinfo().ipv4 || (n > 1 && pf.ch.type != NC_CT_DATA)) {
    counters.rx_malformed.fetch_add(1, std::memory_order_relaxed);
    DropFrames(frags, n);
    return;
  }
  if (pf.ch.dst_chan == NC_CHAN_UNASSIGNED) {
    wire::MacAddr peer_mac;
    std::memcpy(peer_mac.data(), p + 6, 6);  // Ethernet source
    if (pf.ch.type == NC_CT_SYN) HandleSyn(pf, peer_mac, now);
    if (pf.ch.type == NC_CT_COOKIE_ECHO) HandleCookieEcho(pf, peer_mac, now);
    umem_->FreeFrame(d.addr);
    return;
  }
  AfxdpChannel* ch = by_id_[pf.ch.dst_chan % NC_MAX_CHANNELS];
  const bool handshaking = ch && (ch->hs == Hs::kSynSent || ch->hs == Hs::kCookieEchoed);
  if (!ch || ch->hs == Hs::kDead || pf.src_ip != ch->peer_ip ||
      (!handshaking && pf.ch.src_chan != ch->peer_chan)) {
    counters.rx_unknown_chan.fetch_add(1, std::memory_order_relaxed);
    DropFrames(frags, n);
    return;
  }
  // The token proves the sender saw our handshake; RST and FIN must also be in the window, so
  // that a sender who learned the token still needs the live sequence number to tear us down.
  const bool bad = pf.ch.token != ch->local_token ||
                   ((pf.ch.type == NC_CT_RST || pf.ch.type == NC_CT_FIN) && ch->transport &&
                    !ch->transport->InReceiveWindow(pf.ch.seq));
  if (bad) {
    counters.rx_bad_token.fetch_add(1, std::memory_order_relaxed);
    DropFrames(frags, n);
    return;
  }
  switch (pf.ch.type) {
    case NC_CT_SYN_ACK:
      if (ch->hs == Hs::kSynSent) HandleSynAck(*ch, pf, now);
      umem_->FreeFrame(d.addr);
      return;
    case NC_CT_COOKIE_ACK:
      if (ch->hs == Hs::kCookieEchoed) HandleCookieAck(*ch, pf, now);
      umem_->FreeFrame(d.addr);
      return;
    case NC_CT_RST:
      // During our handshake a reset is the peer's refusal (not accepting, over its caps).
      Fail(*ch, handshaking ? FailCause::kRefused : FailCause::kReset);
      umem_->FreeFrame(d.addr);
      return;
    case NC_CT_FIN:
      if (ch->hs == Hs::kEstablished) Kill(*ch, ChannelState::kClosed);
      umem_->FreeFrame(d.addr);
      return;
    default:
      break;
  }
  if (ch->hs != Hs::kEstablished) {
    DropFrames(frags, n);
    return;
  }
  if (pf.ch.type == NC_CT_DATA) {
    const uint64_t head = d.addr + pf.chan_payload_off;
    if (!LinkPieces(frags, n, pf, head, *ch->transport)) {
      counters.rx_malformed.fetch_add(1, std::memory_order_relaxed);
      DropFrames(frags, n);
      return;
    }
    ch->transport->OnPacket(pf.ch, head, static_cast<uint32_t>(pf.chan_payload_len), now,
                            (pf.tos & 3) == 3 /* CE */);
  } else {
    ch->transport->OnPacket(pf.ch, 0, 0, now);
    umem_->FreeFrame(d.addr);
  }
}

void XskQueue::HandleSyn(const wire::ParsedFrame& pf, const wire::MacAddr& peer_mac, uint64_t now) {
  counters.handshakes_rx.fetch_add(1, std::memory_order_relaxed);
  const wire::Handshake& in = pf.hs;
  if (in.init_token == 0 || pf.ch.src_chan == NC_CHAN_UNASSIGNED) {
    counters.handshakes_bad.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  wire::FrameAddrs a = driver_->AddrsFor(0, pf.src_ip, peer_mac);
  wire::ChanHeader h;
  h.dst_chan = pf.ch.src_chan;
  h.token = in.init_token;
  h.ts_val = static_cast<uint32_t>(now) | 1;
  h.ts_ecr = pf.ch.ts_val;
  if (!driver_->opts().accept) {
    // Not accepting: tell the initiator now rather than let it time out. Costs no state.
    NoteRefused(pf.src_ip, NotAccepting(), now);
    h.type = NC_CT_RST;
    SendControl(a, h);
    return;
  }
  // Stateless: everything the responder needs later comes back in the COOKIE_ECHO, and the
  // cookie proves it came back from someone who received this SYN_ACK at the source address.
  wire::Handshake out = in;
  out.cookie_time = AfxdpDriver::CookieTime(now);
  const auto c = driver_->MintCookie(pf.src_ip, pf.ch.src_chan, queue_, in, out.cookie_time);
  out.resp_token = c.token;
  out.resp_isn = c.isn;
  out.incarnation = driver_->incarnation();
  h.type = NC_CT_SYN_ACK;
  h.seq = c.isn;
  h.ack = in.init_isn;
  h.wnd = rcv_buf_;
  SendControl(a, h, &out);
}

void XskQueue::HandleCookieEcho(const wire::ParsedFrame& pf, const wire::MacAddr& peer_mac,
                                uint64_t now) {
  const wire::Handshake& in = pf.hs;
  // The cookie must be ours, fresh, and match every field the initiator echoes.
  const uint32_t t = AfxdpDriver::CookieTime(now);
  bool valid = false;
  if (in.cookie_time == t || in.cookie_time + 1 == t) {
    const auto c = driver_->MintCookie(pf.src_ip, pf.ch.src_chan, queue_, in, in.cookie_time);
    valid = c.token == in.resp_token && c.isn == in.resp_isn && pf.ch.token == c.token;
  }
  if (!valid) {
    counters.handshakes_bad.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  // A retransmitted COOKIE_ECHO (our COOKIE_ACK was lost): answer again, create nothing.
  for (AfxdpChannel* ch : chans_) {
    if (!ch->active && ch->peer_ip == pf.src_ip && ch->peer_chan == pf.ch.src_chan &&
        ch->peer_token == in.init_token) {
      ch->send_cookie_ack = true;
      return;
    }
  }
  // Same peer channel id with another token: the peer's stack restarted and reuses its ids.
  for (AfxdpChannel* ch : chans_) {
    if (ch->peer_ip == pf.src_ip && ch->peer_chan == pf.ch.src_chan)
      Fail(*ch, FailCause::kPeerRestarted);
  }
  driver_->RetireOldIncarnations(pf.src_ip, in.incarnation);
  auto sp = driver_->NewPassive(this, pf.src_ip, peer_mac, in.resp_token);
  if (!sp.ok()) {
    NoteRefused(pf.src_ip, sp.status(), now);
    wire::ChanHeader h;
    h.type = NC_CT_RST;
    h.dst_chan = pf.ch.src_chan;
    h.token = in.init_token;
    h.seq = in.resp_isn;
    h.ts_val = static_cast<uint32_t>(now) | 1;
    SendControl(driver_->AddrsFor(0, pf.src_ip, peer_mac), h);
    return;
  }
  AfxdpChannel* ch = sp->get();
  ch->peer_token = in.init_token;
  ch->hs_rec = in;
  ch->hs_rec.incarnation = driver_->incarnation();  // what our COOKIE_ACK tells the initiator
  ch->peer_incarnation.store(in.incarnation, std::memory_order_release);
  chans_.push_back(ch);
  by_id_[ch->id()] = ch;
  nchans_.store(chans_.size(), std::memory_order_relaxed);
  ch->set_task(this);
  ch->pub_.queue = static_cast<int>(queue_);
  ch->pub_.engine = engine.load()->index();
  Establish(*ch, pf.ch.src_chan, now);
  ch->send_cookie_ack = true;
}

void XskQueue::NoteRefused(uint32_t peer_ip, const absl::Status& why, uint64_t now) {
  counters.handshakes_refused.fetch_add(1, std::memory_order_relaxed);
  ++refusals_unlogged_;
  if (refusal_logged_us_ != 0 && now < refusal_logged_us_ + 1'000'000) return;
  absl::FPrintF(stderr, "netch: refused %u channel(s) from %s: %s\n", refusals_unlogged_,
                Ipv4String(peer_ip), why.message());
  refusals_unlogged_ = 0;
  refusal_logged_us_ = now;
}

void XskQueue::HandleSynAck(AfxdpChannel& ch, const wire::ParsedFrame& pf, uint64_t now) {
  const wire::Handshake& in = pf.hs;
  // It must answer the SYN we sent: our token and ISN echoed (the token was already checked
  // against the header, this checks the payload agrees).
  if (in.init_token != ch.local_token || in.init_isn != ch.hs_rec.init_isn || in.resp_token == 0) {
    counters.handshakes_bad.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  ch.hs_rec = in;
  ch.peer_token = in.resp_token;
  ch.hs = Hs::kCookieEchoed;
  ch.syn_rto_us = 20'000;
  ch.syn_next_us = now;  // the COOKIE_ECHO goes out this round
}

void XskQueue::HandleCookieAck(AfxdpChannel& ch, const wire::ParsedFrame& pf, uint64_t now) {
  const wire::Handshake& in = pf.hs;
  if (in.init_token != ch.local_token || in.resp_token != ch.peer_token ||
      in.init_isn != ch.hs_rec.init_isn || in.resp_isn != ch.hs_rec.resp_isn ||
      pf.ch.src_chan == NC_CHAN_UNASSIGNED) {
    counters.handshakes_bad.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  ch.peer_incarnation.store(in.incarnation, std::memory_order_release);
  Establish(ch, pf.ch.src_chan, now);
  driver_->RetireOldIncarnations(ch.peer_ip, in.incarnation);
}

void XskQueue::Establish(AfxdpChannel& ch, uint16_t peer_chan, uint64_t now) {
  ch.peer_chan = peer_chan;
  const uint32_t isn_send = ch.active ? ch.hs_rec.init_isn : ch.hs_rec.resp_isn;
  const uint32_t isn_recv = ch.active ? ch.hs_rec.resp_isn : ch.hs_rec.init_isn;
  ch.transport = std::make_unique<Transport>(
      driver_->TransportFor(static_cast<uint16_t>(ch.id()), peer_chan, isn_send, isn_recv,
                            rcv_buf_),
      afxdp::MakeCongestionControl(driver_->opts().congestion, 16, driver_->opts().window_packets),
      this, now);
  if (ch.transport->wants_ecn()) ch.addrs.tos = 0x02;  // ECT(0)
  ch.hs = Hs::kEstablished;
  ch.SetState(ChannelState::kUp);
}

void XskQueue::Kill(AfxdpChannel& ch, ChannelState st, bool send_fin, FailCause cause) {
  if (ch.hs == Hs::kDead) return;
  if (send_fin && ch.hs == Hs::kEstablished)
    SendControl(ch.addrs, ControlHeader(ch, NC_CT_FIN, NowUs()));
  // Our own Destroy discards everything; otherwise in-order data the transport still holds goes
  // to the consumer as far as the ring takes it, and stays readable.
  ch.keep_delivered = !send_fin;
  if (ch.transport && ch.keep_delivered) {
    while (DeliverNext(ch)) {
    }
  }
  if (ch.transport) ch.transport->ReleaseAll();
  ch.hs = Hs::kDead;
  Publish(ch);
  // Before the rings are emptied: a producer that sees it stops.
  if (st == ChannelState::kFailed) {
    counters.failed[static_cast<size_t>(cause)].fetch_add(1, std::memory_order_relaxed);
    ch.Fail(cause);
  } else {
    ch.SetState(st);
  }
  dying_.push_back(&ch);
}

void XskQueue::Reap() {
  for (AfxdpChannel* ch : dying_) {
    chans_.erase(std::remove(chans_.begin(), chans_.end(), ch), chans_.end());
    if (by_id_[ch->id()] == ch) by_id_[ch->id()] = nullptr;
    ch->Reclaim([&](uint64_t t) { FreeTx(t); },
                [&](uint64_t t, uint32_t len) {
                  umem_->FreeFrame(t);
                  ch->rx_held -= len;
                },
                ch->keep_delivered);
    ch->pub_.rx_queued_bytes.store(ch->rx_held, std::memory_order_relaxed);
    ch->NotifyApp(Channel::kBoth);
    // The id and steering entry go back now; the object lingers as a zombie while the
    // application may still hand buffers back.
    if (auto sp = driver_->Unregister(ch->id(), ch)) zombies_.push_back(std::move(sp));
    counters.reaped.fetch_add(1, std::memory_order_relaxed);
  }
  dying_.clear();
  nchans_.store(chans_.size(), std::memory_order_relaxed);
}

void XskQueue::RunZombies() {
  std::erase_if(zombies_, [&](const std::shared_ptr<AfxdpChannel>& z) {
    BufRef b[kBatch];
    for (uint32_t m; (m = z->ret_.Pop(b)) > 0;) {
      for (uint32_t i = 0; i < m; ++i) {
        umem_->FreeFrame(b[i].token);
        z->rx_held -= b[i].len;
      }
    }
    for (uint32_t m; (m = z->txq_.Pop(b)) > 0;)
      for (uint32_t i = 0; i < m; ++i) FreeTx(b[i].token);
    z->pub_.rx_queued_bytes.store(z->rx_held, std::memory_order_relaxed);
    // Done when nothing can come back: no delivered buffer outstanding, no copy in flight. Once
    // the application dropped its last reference nobody else can consume rxq_: empty it here.
    if (z.use_count() == 1) {
      z->DropDelivered([&](uint64_t t) { umem_->FreeFrame(t); });
      return true;
    }
    return z->rx_held == 0 && z->ProducersIdle();
  });
}

bool XskQueue::ResolvePeer(AfxdpChannel& ch, uint64_t now) {
  if (now < ch.syn_next_us) return false;
  // (Connect provoked the resolution; the kernel probes for longer than kNeighborTimeoutUs.)
  auto mac = afxdp::LookupNeighbor(driver_->neigh_fd(), driver_->opts().ifname, ch.next_hop,
                                   /*provoke=*/false);
  if (mac.ok() && mac->has_value()) {
    ch.addrs.dst_mac = **mac;
    ch.neigh_pending = false;
    return true;
  }
  ch.syn_next_us = mac.ok() ? now + ch.neigh_poll_us : ch.neigh_deadline_us;
  ch.neigh_poll_us = std::min(ch.neigh_poll_us * 2, kNeighborPollMaxUs);
  return false;
}

bool XskQueue::RunChannel(AfxdpChannel& ch, uint64_t now, uint64_t* deadline) {
  if (ch.hs == Hs::kDead) return false;
  bool worked = false;
  if (ch.hs == Hs::kSynSent || ch.hs == Hs::kCookieEchoed) {
    if (ch.neigh_pending && !ResolvePeer(ch, now)) {
      if (now >= ch.neigh_deadline_us) {
        Fail(ch, FailCause::kUnreachable);
        return true;
      }
      *deadline = std::min({*deadline, ch.syn_next_us, ch.neigh_deadline_us});
      return false;
    }
    if (now >= ch.connect_deadline_us) {
      Fail(ch,
           driver_->WrongQueueSince(ch) ? FailCause::kWrongQueue : FailCause::kHandshakeTimeout);
      return true;
    }
    if (now >= ch.syn_next_us) {
      const uint8_t type = ch.hs == Hs::kSynSent ? NC_CT_SYN : NC_CT_COOKIE_ECHO;
      wire::Handshake hs = ch.hs_rec;
      hs.incarnation = driver_->incarnation();
      SendControl(ch.addrs, ControlHeader(ch, type, now), &hs);
      ch.syn_next_us = now + ch.syn_rto_us;
      ch.syn_rto_us = std::min<uint64_t>(ch.syn_rto_us * 2, 500'000);
      worked = true;
    }
    *deadline = std::min({*deadline, ch.syn_next_us, ch.connect_deadline_us});
    return worked;
  }
  Transport& t = *ch.transport;
  if (ch.send_cookie_ack) {
    ch.send_cookie_ack =
        !SendControl(ch.addrs, ControlHeader(ch, NC_CT_COOKIE_ACK, now), &ch.hs_rec);
    worked = true;
  }
  BufRef b[kBatch];
  int notify = 0;  // Interest bits to signal
  // Buffers the consumer is done with: reopen the receive window.
  for (uint32_t m; (m = ch.ret_.Pop(b)) > 0;) {
    for (uint32_t i = 0; i < m; ++i) {
      t.ConsumedCharge(link(b[i].token).charge);
      ch.rx_held -= b[i].len;
      umem_->FreeFrame(b[i].token);
    }
    worked = true;
  }
  // A small write held open (autocork): out once the channel has nothing unacknowledged, or
  // at once when the event loop that wrote it has come back to wait (RoundFlushesOpen).
  if (ch.has_open())
    worked |= ch.FlushOpen(now, t.send_queue_packets() == 0 && ch.txq_.EmptyApprox(),
                           RoundFlushesOpen(), deadline);
  // New segments from the producer, as far as the transport's window has slots — all of them,
  // not a batch per round: an event loop's pass queues a segment for each of its sockets, and
  // what stays in txq_ holds send slots counted as full (the refill below).
  for (uint32_t m; (m = ch.txq_.Peek({b, std::min(kBatch, driver_->opts().window_packets -
                                                              t.send_queue_packets())})) > 0;) {
    uint64_t bytes = 0;
    uint32_t taken = 0;
    for (; taken < m && t.Send(b[taken].token, b[taken].len); ++taken) bytes += b[taken].len;
    // Counted as unacknowledged before they leave txq_ (Consume's release store publishes it):
    // whoever sees txq_ empty also sees them here, never neither (Channel::tx_idle). Published
    // only at the end of the round, they were in neither place for as long as the round's
    // sendmmsg took — a process exiting once its channels looked idle lost them (the stack's
    // linger at exit, preload/netch_preload.cc).
    if (taken > 0) ch.pub_.tx_queued_bytes.store(t.send_queue_bytes(), std::memory_order_relaxed);
    ch.txq_.Consume(taken);
    if (taken > 0) notify |= Channel::kWritable;  // room for the producer again
    ch.pub_.tx_segments.fetch_add(taken, std::memory_order_relaxed);
    ch.pub_.tx_bytes.fetch_add(bytes - taken * wire::kSegHdrLen, std::memory_order_relaxed);
    worked |= taken > 0;
    if (taken < m) break;  // the transport's send ring is full
  }
  // What the transport wants on the wire, never more than the TX ring takes now (a slot-sized
  // segment is a chain of up to kSlotDescs descriptors); up to kTxBatchesPerRound batches, so a
  // pass of an event loop over its sockets leaves in one round.
  for (uint32_t pass = 0; pass < kTxBatchesPerRound; ++pass) {
    const uint32_t room =
        pool_ ? kBatch : std::min(kBatch, xsk_->tx_free() / (slots_ ? kSlotDescs : 1));
    if (room == 0) {
      if (pass == 0) counters.tx_ring_full.fetch_add(1, std::memory_order_relaxed);
      break;
    }
    TxPacket* const pk = tx_pk_;
    const size_t k = t.Poll(now, {pk, room});
    if (k && pool_) {
      for (size_t i = 0; i < k; ++i) pk[i].hdr.token = ch.peer_token;
      SendUdp(ch, pk, k);
      worked = true;
    } else if (k) {
      xdp_desc d[kBatch * kSlotDescs];
      uint64_t ctl[kBatch];
      uint32_t nd = 0, nctl = 0;
      const uint32_t fsz = umem_->frame_size();
      for (size_t i = 0; i < k; ++i) {
        pk[i].hdr.token = ch.peer_token;
        const size_t hl = wire::HeadersLen(pk[i].hdr, false);
        if (pk[i].hdr.type == NC_CT_DATA) {
          uint64_t addr = pk[i].handle - hl;  // headers go in the headroom
          wire::WriteHeaders(umem_->Data(addr), ch.addrs, pk[i].hdr, nullptr, pk[i].len);
          // One descriptor per UMEM frame the packet covers: a frame buffer takes one, a TX slot
          // a chain (XDP_PKT_CONTD on all but the last).
          for (size_t left = hl + pk[i].len; left > 0;) {
            const size_t take = std::min<size_t>(left, fsz - addr % fsz);
            left -= take;
            d[nd++] = {addr, static_cast<uint32_t>(take), left ? XDP_PKT_CONTD : 0u};
            addr += take;
          }
        } else {
          const uint64_t f = umem_->AllocFrame();
          if (f == kNoFrame) continue;  // the transport's timers will ask again
          wire::WriteHeaders(umem_->Data(f), ch.addrs, pk[i].hdr, nullptr, 0);
          d[nd++] = {f, static_cast<uint32_t>(hl), 0};
          ctl[nctl++] = f;
        }
      }
      xsk_->Transmit({d, nd});
      for (uint32_t i = 0; i < nctl; ++i) umem_->FreeFrame(ctl[i]);
      worked = true;
    }
    if (k < room) break;
  }
  // In-order data for the consumer.
  {
    uint32_t m = 0;
    while (m < kBatch && DeliverNext(ch)) ++m;
    if (m) {
      notify |= Channel::kReadable;
      worked = true;
    }
  }
  // Empty buffers for the producer, while the pool keeps enough for the fill ring and ACKs.
  // Taken lazily: an idle channel holds kFreeMin; a producer that keeps draining them doubles
  // its share up to the ring, so a thousand idle channels pin no more than a few frames each.
  // The kernel-UDP path's slots are 64 KB: a channel holds at most pool_cap_ of them in all
  // (free, queued, unacknowledged) and pool_cap_bytes_ of what they carry, so a stalled one
  // cannot empty the queue's pool.
  uint32_t have = ch.free_.SizeApprox();
  const uint32_t max_target = pool_ || slots_ ? pool_cap_ : kChanRing;
  const uint32_t min_target = pool_ || slots_ ? kPoolFreeMin : kFreeMin;
  // (Only an idle producer's: one blocked on a full channel takes nothing either, and its share
  // taken back and handed out again would make it writable while the channel is full.)
  if (have < ch.free_topped || ch.txq_.SizeApprox() > 0 || t.send_queue_packets() > 0)
    ch.free_taken_us = now;
  // Taken back only while another channel of the queue wants buffers the pool no longer has:
  // a share taken back for nothing regrows by doubling, and a channel a scheduler left alone for
  // a while would carry less for it (four channels of one socket on slow sanitizer builds).
  if (ch.free_target > min_target && now - starved_us_ < kFreeIdleUs &&
      now - ch.free_taken_us >= kFreeIdleUs &&
      (ch.TakeBackFree(min_target, [this](uint64_t t) { FreeTx(t); }) > 0 || have <= min_target)) {
    ch.free_target = min_target;
    have = ch.free_.SizeApprox();
    worked = true;
  }
  if (have < ch.free_target / 4 && ch.free_target < max_target)
    ch.free_target = std::min(ch.free_target * 2, max_target);
  // In batches up to the target, not one batch per round: an event loop's pass writes to
  // every one of its sockets before the next round (Redis -P 16: 50 connections, ~100 segments).
  uint32_t space = std::min(ch.free_.Room(), ch.free_target > have ? ch.free_target - have : 0);
  const uint32_t keep = fill_target_ + kCtlReserve;
  // Slots (pool_, slots_) are counted by what they carry, not as 64 KB each: an event loop's
  // replies to many sockets are many small segments, and a count of slots stopped them at a
  // tenth of their window (Redis MSET -P 16 over 50 connections, docs/BENCHMARKS.md).
  const uint32_t unsent = have + ch.txq_.SizeApprox();
  uint32_t held = unsent + t.send_queue_packets();
  uint64_t held_bytes = uint64_t{unsent} * slot_bytes_ + t.send_queue_bytes();
  while (space > 0) {
    uint32_t m = 0;
    uint64_t tok[kBatch];
    if (pool_ || slots_) {
      while (m < std::min(space, kBatch) && held + m < pool_cap_ && held_bytes < pool_cap_bytes_ &&
             (pool_ ? pool_->free_slots() : umem_->free_slots()) > 0) {
        tok[m++] = pool_ ? pool_->Alloc() : umem_->AllocSlot() + kAfxdpHeadroom;
        held_bytes += slot_bytes_;
      }
    } else {
      while (m < std::min(space, kBatch) && umem_->free_frames() > keep)
        tok[m++] = umem_->AllocFrame() + kAfxdpHeadroom;
    }
    if (m == 0) {
      // The pool ran dry under a channel below its own cap: idle channels' shares come back
      // (above); look again every millisecond until they have.
      if ((pool_ || slots_) && held < pool_cap_ && held_bytes < pool_cap_bytes_) {
        starved_us_ = now;
        *deadline = std::min(*deadline, now + 1000);
      }
      break;
    }
    ch.free_.Push({tok, m});
    notify |= Channel::kWritable;
    held += m;
    space -= m;
  }
  ch.free_topped = ch.free_.SizeApprox();
  if (t.state() == afxdp::TransportState::kFailed) {
    Fail(ch, FailCause::kPeerSilent);  // the transport fails only when the peer went silent
    return true;
  }
  Publish(ch);
  if (notify & Channel::kWritable) ch.NotifyApp(Channel::kWritable);
  if (notify & Channel::kReadable) ch.NotifyDelivered();
  *deadline = std::min(*deadline, t.next_timer_us());
  return worked;
}

void XskQueue::Publish(AfxdpChannel& ch) {
  auto& p = ch.pub_;
  p.rx_queued_bytes.store(ch.rx_held, std::memory_order_relaxed);
  if (!ch.transport) return;
  const Transport& t = *ch.transport;
  p.rx_pressure.store(t.advertised_window() < t.rcv_buf_bytes() / 2, std::memory_order_relaxed);
  p.tx_queued_bytes.store(t.send_queue_bytes(), std::memory_order_relaxed);
  p.cwnd_packets.store(t.cwnd(), std::memory_order_relaxed);
  p.srtt_us.store(t.srtt_us(), std::memory_order_relaxed);
  p.retransmits.store(t.stats().retransmits, std::memory_order_relaxed);
  p.rx_dropped_stale.store(t.stats().dup_received + t.stats().out_of_window,
                           std::memory_order_relaxed);
  p.timeouts.store(t.stats().rto_events, std::memory_order_relaxed);
  p.spurious_timeouts.store(t.stats().spurious_rtos, std::memory_order_relaxed);
  p.tail_probes.store(t.stats().tail_probes, std::memory_order_relaxed);
  p.ecn_echoes.store(t.stats().ece_received, std::memory_order_relaxed);
  p.rx_ignored_acks.store(t.stats().bad_acks, std::memory_order_relaxed);
  const uint64_t cwnd_bytes = static_cast<uint64_t>(t.cwnd()) * max_payload_;
  const uint64_t limit = std::min<uint64_t>(cwnd_bytes, t.peer_window());
  const uint64_t in_flight = static_cast<uint64_t>(t.in_flight_packets()) * max_payload_;
  p.send_window_bytes.store(limit > in_flight ? limit - in_flight : 0, std::memory_order_relaxed);
}

// ---------------------------------------------------------------------------------------------
// AfxdpDriver

absl::Status AfxdpDriver::Init() {
  std::unique_ptr<NetnsScope> ns;
  if (!opts_.netns.empty()) {
    ns = std::make_unique<NetnsScope>(opts_.netns);
    if (!ns->ok()) return ns->status();
  }
  if (!opts_.steer)
    return absl::FailedPreconditionError(
        "the AF_XDP driver needs the steering program (DriverOptions::steer) loaded and attached");
  if (!afxdp::MakeCongestionControl(opts_.congestion, 16, 64))
    return absl::InvalidArgumentError(
        absl::StrFormat("unknown congestion control '%s' (newreno, dctcp)", opts_.congestion));
  if (opts_.window_packets == 0 || (opts_.window_packets & (opts_.window_packets - 1)))
    return absl::InvalidArgumentError("window_packets must be a power of two");
  auto ifi = afxdp::GetInterfaceInfo(opts_.ifname);
  if (!ifi.ok()) return ifi.status();
  ifi_ = *ifi;
  neigh_fd_ = UniqueFd(socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (neigh_fd_.get() < 0) return ErrnoStatus(errno, "socket");
  auto routes = afxdp::RouteTable::Open();
  if (!routes.ok()) return routes.status();
  routes_ = std::move(*routes);
  if (ifi_.ipv4 == 0)
    return absl::FailedPreconditionError(absl::StrFormat("%s has no IPv4 address", opts_.ifname));
  if (opts_.steer->attached_ifindex() != ifi_.ifindex)
    return absl::FailedPreconditionError(
        absl::StrFormat("the steering program is not attached to %s", opts_.ifname));
  // Segment size from the MTU: IPv4 + UDP + channel header with SACK blocks + NetChannel header.
  const size_t overhead = wire::kIpv4Len + wire::kUdpLen + wire::kChanHdrLen +
                          wire::kMaxSacks * sizeof(nc_sack_block) + wire::kSegHdrLen;
  const size_t by_frame = 4096 - kAfxdpHeadroom - wire::kSegHdrLen;
  if (ifi_.mtu <= overhead + 64)
    return absl::FailedPreconditionError(
        absl::StrFormat("MTU %u of %s is too small", ifi_.mtu, opts_.ifname));
  uint32_t nq = opts_.queues ? std::min(opts_.queues, ifi_.rx_queues) : ifi_.rx_queues;
  nq = std::clamp<uint32_t>(nq, 1, NC_MAX_QUEUES);
  // The transmit path. A datagram the kernel sends leaves on a queue of its own choosing unless
  // the steering program's tc hook pins it; without the hook only a one-queue device works.
  if (opts_.tx != "auto" && opts_.tx != "afxdp" && opts_.tx != "udp")
    return absl::InvalidArgumentError(
        absl::StrFormat("tx '%s': expected auto, afxdp or udp", opts_.tx));
  const bool pinned = opts_.steer->tx_queue_steering() || nq == 1;
  if (opts_.tx == "udp" && !pinned)
    return absl::FailedPreconditionError(
        "tx udp on a multi-queue device needs the steering program's tc egress hook (nc_txq), "
        "which failed to attach");
  udp_tx_ = opts_.tx == "udp" || (opts_.tx == "auto" && pinned);
  // Latency queues (DriverOptions::afxdp_tx_queues): AF_XDP TX beside the UDP path, only where
  // auto chose udp, and never every queue (bulk keeps at least one UDP queue).
  afxdp_tx_queues_ =
      udp_tx_ && opts_.tx == "auto" && nq >= 2 ? std::min(opts_.afxdp_tx_queues, nq - 1) : 0;
  const auto udp_queue = [&](uint32_t q) { return udp_tx_ && q >= afxdp_tx_queues_; };
  // Up to the IPv4 maximum where the MTU allows; the receiver takes it as a multi-buffer
  // frame. Both ends' MTU bounds it: the link does.
  const size_t udp_overhead = wire::kIpv4Len + wire::kUdpLen + wire::kChanHdrLen +
                              wire::kMaxSacks * sizeof(nc_sack_block) + wire::kSegHdrLen;
  const size_t udp_max = std::min<size_t>(ifi_.mtu, 0xffff) - udp_overhead;
  // AF_XDP TX from a frame. Without multi-buffer, XDP on veth takes frames up to 3520 bytes.
  const size_t frame_max = std::min({ifi_.mtu - overhead, by_frame, size_t{3506} - overhead});
  // AF_XDP TX of segments up to 64 KB where the MTU allows more than a frame: TX slots in the
  // UMEM sent as descriptor chains, if the queue's socket binds multi-buffer (known after binding).
  const size_t slot_max =
      std::min<size_t>({ifi_.mtu - overhead, kSlotBytes - kAfxdpHeadroom - wire::kSegHdrLen,
                        size_t{0xffff} - overhead});
  const bool want_slots = ifi_.mtu > 3506;
  for (uint32_t q = 0; q < nq; ++q) {
    const bool udp = udp_queue(q);
    auto xq = std::make_unique<XskQueue>(this, q);
    if (auto st = xq->Open(opts_.ifname, opts_.frames_per_queue, udp, PoolSlotBytes(udp_max),
                           !udp && want_slots ? kTxSlotsPerQueue : 0);
        !st.ok())
      return st;
    if (auto st = opts_.steer->SetXsk(q, xq->xsk()->fd()); !st.ok()) return st;
    queues_.push_back(std::move(xq));
  }
  for (auto& q : queues_) {
    const bool udp = udp_queue(q->queue());
    const bool slots = !udp && want_slots && q->xsk()->multi_buffer();
    const size_t max_payload = udp ? udp_max : slots ? slot_max : frame_max;
    // 64 KB segments need a deeper window than 3.5 KB ones: at 2 MB (32 segments) a reader that
    // falls a little behind pushes the channel into pressure copies (measured: 2 MB 10.8, 8 MB
    // 12.4 Gbit/s, one stream on jumbo test hosts). Both ends derive it the same way.
    uint32_t rcv_buf = opts_.rcv_buf_bytes;
    if (max_payload >= 16384) rcv_buf = std::max<uint32_t>(rcv_buf, 8u << 20);
    q->SetSendLimits(slots, max_payload, rcv_buf);
  }
  auto engines = StartEngines(opts_);
  if (!engines.ok()) return engines.status();
  engines_ = std::move(*engines);
  queue_engine_.resize(nq);
  for (uint32_t q = 0; q < nq; ++q) {
    queue_engine_[q] = static_cast<int>(q % engines_.size());
    engines_[queue_engine_[q]]->Add(queues_[q].get());
  }
  return absl::OkStatus();
}

AfxdpDriver::~AfxdpDriver() {
  std::vector<std::shared_ptr<AfxdpChannel>> chans;
  {
    std::lock_guard g(mu_);
    chans = channels_;
  }
  for (auto& c : chans) (void)Destroy(*c);
  for (auto& e : engines_) e->Stop();
  for (auto& q : queues_) (void)opts_.steer->ClearXsk(q->queue());
  queues_.clear();
}

TransportConfig AfxdpDriver::TransportFor(uint16_t local, uint16_t peer, uint32_t isn_send,
                                          uint32_t isn_recv, uint32_t rcv_buf) const {
  TransportConfig c;
  c.window_packets = opts_.window_packets;
  c.rcv_buf_bytes = rcv_buf;
  c.dead_peer_us = static_cast<uint64_t>(absl::ToInt64Microseconds(opts_.dead_peer_timeout));
  c.keepalive_idle_us = std::max<uint64_t>(c.dead_peer_us / 4, 1000);
  c.min_rto_us = 5'000;
  c.local_chan = local;
  c.peer_chan = peer;
  c.isn_send = isn_send;
  c.isn_recv = isn_recv;
  c.charge_unit_bytes = 4096;  // one UMEM frame per packet: the window counts frames pinned
  return c;
}

AfxdpDriver::Cookie AfxdpDriver::MintCookie(uint32_t peer_ip, uint16_t peer_chan, uint32_t queue,
                                            const wire::Handshake& hs, uint32_t cookie_time) const {
  // Everything the SYN said that the channel will be built from, and where it came from.
  struct {
    uint32_t peer_ip, local_ip, queue, init_isn, cookie_time, which;
    uint64_t init_token, incarnation;
    uint16_t peer_chan, pad[3];
  } in{};
  in.peer_ip = peer_ip;
  in.local_ip = ifi_.ipv4;
  in.queue = queue;
  in.init_isn = hs.init_isn;
  in.cookie_time = cookie_time;
  in.init_token = hs.init_token;
  in.incarnation = hs.incarnation;
  in.peer_chan = peer_chan;
  auto bytes = [&] {
    return std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(&in), sizeof(in));
  };
  in.which = 0;
  const uint64_t token = SipHash24(cookie_key_, bytes());
  in.which = 1;
  const uint32_t isn = static_cast<uint32_t>(SipHash24(cookie_key_, bytes()));
  return {token ? token : 1, isn};
}

void AfxdpDriver::RetireOldIncarnations(uint32_t peer_ip, uint64_t inc) {
  std::vector<std::shared_ptr<AfxdpChannel>> old;
  {
    std::lock_guard g(mu_);
    for (const auto& c : channels_) {
      const uint64_t ci = c->peer_incarnation.load(std::memory_order_acquire);
      if (c->peer_ip == peer_ip && ci != 0 && ci != inc) old.push_back(c);
    }
  }
  // Posted without waiting: this runs on an engine, which must never wait for another.
  for (auto& c : old) c->queue->RetireChannel(c);
}

wire::FrameAddrs AfxdpDriver::AddrsFor(uint32_t id, uint32_t peer_ip,
                                       const wire::MacAddr& peer_mac) const {
  wire::FrameAddrs a;
  a.src_mac = ifi_.mac;
  a.dst_mac = peer_mac;
  a.src_ip = ifi_.ipv4;
  a.dst_ip = peer_ip;
  a.src_port = static_cast<uint16_t>(kSrcPortBase + id);
  a.dst_port = opts_.udp_port;
  return a;
}

absl::StatusOr<std::shared_ptr<AfxdpChannel>> AfxdpDriver::Register(XskQueue* q, uint32_t peer_ip,
                                                                    const wire::MacAddr& peer_mac,
                                                                    uint64_t local_token) {
  uint32_t id = 0;
  {
    std::lock_guard g(mu_);
    uint32_t to_peer = 0;
    for (const auto& c : channels_) to_peer += c->peer_ip == peer_ip;
    if (to_peer >= opts_.max_channels_per_peer)
      return absl::ResourceExhaustedError(
          absl::StrFormat("peer already holds %u channels (max_channels_per_peer)", to_peer));
    for (uint32_t i = 0; i < NC_MAX_CHANNELS - 1; ++i) {
      const uint32_t c = (next_id_ - 1 + i) % (NC_MAX_CHANNELS - 1) + 1;
      if (!used_ids_[c]) {
        id = c;
        break;
      }
    }
    if (id == 0) return absl::ResourceExhaustedError("all channel ids are in use");
    used_ids_[id] = true;
    next_id_ = id % (NC_MAX_CHANNELS - 1) + 1;
  }
  auto ch = std::make_shared<AfxdpChannel>(id, q->max_payload(), q->umem(), q->pool());
  ch->queue = q;
  ch->EnableCoalescing();
  if (q->large_send_buffers()) ch->free_target = kPoolFreeMin;
  ch->peer_sa.sin_family = AF_INET;
  ch->peer_sa.sin_addr.s_addr = htonl(peer_ip);
  ch->peer_sa.sin_port = htons(opts_.udp_port);
  ch->peer_ip = peer_ip;
  ch->local_token = local_token;
  ch->addrs = AddrsFor(id, peer_ip, peer_mac);
  if (auto st = opts_.steer->SetChannel(id, q->queue(), q->queue(), local_token); !st.ok()) {
    std::lock_guard g(mu_);
    used_ids_[id] = false;
    return st;
  }
  ch->pub_.engine = EngineOf(q);
  std::lock_guard g(mu_);
  channels_.push_back(ch);
  return ch;
}

std::shared_ptr<AfxdpChannel> AfxdpDriver::Unregister(uint32_t id, const AfxdpChannel* ch) {
  std::shared_ptr<AfxdpChannel> out;
  std::lock_guard g(mu_);
  auto it = std::find_if(channels_.begin(), channels_.end(),
                         [&](const auto& c) { return c.get() == ch; });
  if (it == channels_.end()) return nullptr;
  out = std::move(*it);
  channels_.erase(it);
  (void)opts_.steer->ClearChannel(id);
  used_ids_[id] = false;
  return out;
}

int AfxdpDriver::EngineOf(XskQueue* q) const {
  Engine* e = q->engine.load(std::memory_order_acquire);
  return e ? e->index() : -1;
}

absl::StatusOr<uint32_t> AfxdpDriver::NextHopTo(uint32_t peer_ip) {
  auto hop = routes_->Get(peer_ip);
  if (!hop.ok()) return hop.status();
  if (hop->oif != ifi_.ifindex) {
    ifreq ifr{};  // the name in the driver's namespace: ask through a socket that lives there
    ifr.ifr_ifindex = hop->oif;
    const std::string other =
        ioctl(neigh_fd_.get(), SIOCGIFNAME, &ifr) == 0 ? ifr.ifr_name : absl::StrCat("#", hop->oif);
    return ErrnoStatus(ENETUNREACH,
                       absl::StrFormat("the route to %s leaves through %s, not %s (the AF_XDP "
                                       "driver reaches only peers routed over its interface)",
                                       Ipv4String(peer_ip), other, opts_.ifname));
  }
  return hop->via(peer_ip);
}

absl::StatusOr<std::shared_ptr<Channel>> AfxdpDriver::Connect(const ChannelParams& p) {
  if (p.peer_ipv4 == 0) return absl::InvalidArgumentError("no peer address");
  XskQueue* q = nullptr;
  if (p.queue >= 0) {
    if (p.queue >= static_cast<int>(queues_.size()))
      return absl::InvalidArgumentError(
          absl::StrFormat("queue %d: the driver serves queues 0..%u", p.queue, queues_.size() - 1));
    q = queues_[p.queue].get();
  } else {
    for (auto& c : queues_)
      if (!q || c->channel_count() < q->channel_count()) q = c.get();
  }
  // Frames go to the next hop's MAC (a peer behind a router gets the router's).
  auto hop = NextHopTo(p.peer_ipv4);
  if (!hop.ok()) return hop.status();
  // Never waits for ARP: a connect must not block an event loop (a host that does not answer
  // took the whole resolution timeout inside the call). Unresolved, the channel starts without
  // the MAC and its engine finishes the resolution before it sends the SYN.
  auto mac = afxdp::LookupNeighbor(neigh_fd_.get(), opts_.ifname, *hop, /*provoke=*/true);
  if (!mac.ok()) return mac.status();
  auto ch = Register(q, p.peer_ipv4, mac->value_or(wire::MacAddr{}), RandomNonZeroU64());
  if (!ch.ok()) return ch.status();
  AfxdpChannel& c = **ch;
  c.active = true;
  c.hs_rec.init_token = c.local_token;
  c.hs_rec.init_isn = RandomU32();
  const uint64_t now = NowUs();
  c.syn_rto_us = 20'000;
  c.connect_deadline_us = now + static_cast<uint64_t>(absl::ToInt64Microseconds(p.connect_timeout));
  c.next_hop = *hop;
  if (auto st = opts_.steer->ReadChanStats(c.id()); st.ok())
    c.wrong_queue_at_start = st->wrong_queue;
  c.neigh_pending = !mac->has_value();
  c.neigh_deadline_us = std::min(c.connect_deadline_us, now + kNeighborTimeoutUs);
  c.neigh_poll_us = 200;  // an answering host on the link replies within microseconds
  {
    std::lock_guard mv(move_mu_);  // the queue must not change engines while the op is posted
    if (p.engine >= 0) {
      if (auto st = MoveQueueLocked(q, p.engine); !st.ok()) {
        Unregister(c.id(), &c);
        return st;
      }
    }
    q->AddChannel(*ch);
  }
  return std::shared_ptr<Channel>(*ch);
}

absl::StatusOr<std::shared_ptr<AfxdpChannel>> AfxdpDriver::NewPassive(XskQueue* q, uint32_t peer_ip,
                                                                      const wire::MacAddr& peer_mac,
                                                                      uint64_t local_token) {
  if (!opts_.accept) return NotAccepting();
  auto ch = Register(q, peer_ip, peer_mac, local_token);
  if (ch.ok()) accept_q_.Push(*ch);
  return ch;
}

// A channel is handed out once its handshake state is visible (kUp is set by the engine).
std::shared_ptr<Channel> AfxdpDriver::Accept() { return accept_q_.Pop(/*only_up=*/true); }

absl::Status AfxdpDriver::Destroy(Channel& base) {
  std::lock_guard mv(move_mu_);
  auto ch = FindChannel(mu_, channels_, [&](const Channel& c) { return &c == &base; });
  if (!ch) {
    // Already reaped (it failed or the peer closed it): nothing is left to release.
    if (base.state() != ChannelState::kFailed && base.state() != ChannelState::kClosed)
      return absl::NotFoundError(absl::StrFormat("channel %u is not ours", base.id()));
    return absl::OkStatus();
  }
  ch->Linger(opts_.close_linger);
  ch->queue->RemoveChannel(ch);  // FIN, then the engine reclaims ids and buffers
  return absl::OkStatus();
}

absl::Status AfxdpDriver::MoveChannel(uint32_t id, int engine) {
  if (auto st = CheckEngineIndex(engine, engines_.size()); !st.ok()) return st;
  std::lock_guard mv(move_mu_);
  auto ch = FindChannel(mu_, channels_, [&](const Channel& c) { return c.id() == id; });
  if (!ch) return absl::NotFoundError(absl::StrFormat("no channel %u", id));
  return MoveQueueLocked(ch->queue, engine);
}

absl::Status AfxdpDriver::MoveQueueLocked(XskQueue* q, int engine) {
  if (auto st = CheckEngineIndex(engine, engines_.size()); !st.ok()) return st;
  const int from = queue_engine_[q->queue()];
  if (from == engine) return absl::OkStatus();
  // The whole queue moves: its XSK, fill and completion rings belong to one thread at a time.
  engines_[from]->Remove(q);
  engines_[engine]->Add(q);
  queue_engine_[q->queue()] = engine;
  std::lock_guard g(mu_);
  for (auto& c : channels_)
    if (c->queue == q) c->pub_.engine = engine;
  return absl::OkStatus();
}

std::vector<EngineInfo> AfxdpDriver::Engines() const { return DescribeEngines(engines_); }

DriverStats AfxdpDriver::Stats() const {
  DriverStats s;
  s.tx_udp = udp_tx_;
  s.afxdp_tx_queues = afxdp_tx_queues_;
  for (const auto& q : queues_) {
    const QueueCounters& c = q->counters;
    s.rx_frames += c.rx_frames.load(std::memory_order_relaxed);
    s.rx_malformed += c.rx_malformed.load(std::memory_order_relaxed);
    s.rx_unknown_chan += c.rx_unknown_chan.load(std::memory_order_relaxed);
    s.handshakes_rx += c.handshakes_rx.load(std::memory_order_relaxed);
    s.handshakes_bad += c.handshakes_bad.load(std::memory_order_relaxed);
    s.handshakes_dropped += c.handshakes_refused.load(std::memory_order_relaxed);
    s.rx_bad_token += c.rx_bad_token.load(std::memory_order_relaxed);
    s.channels_reaped += c.reaped.load(std::memory_order_relaxed);
    for (size_t i = 0; i < kFailCauses; ++i)
      s.channels_failed[i] += c.failed[i].load(std::memory_order_relaxed);
    s.fill_ring_empty += c.fill_ring_empty.load(std::memory_order_relaxed);
    s.fill_target += c.fill_target.load(std::memory_order_relaxed);
    s.fill_deepened += c.fill_deepened.load(std::memory_order_relaxed);
    s.tx_ring_full += c.tx_ring_full.load(std::memory_order_relaxed);
    s.frames_total += opts_.frames_per_queue;
    s.frames_free += c.frames_free.load(std::memory_order_relaxed);
    s.frames_in_fill += c.frames_in_fill.load(std::memory_order_relaxed);
    s.tx_slots_total += q->umem()->slot_count();
    s.tx_slots_free += c.tx_slots_free.load(std::memory_order_relaxed);
    s.rx_multi_buffer += c.rx_multi_buffer.load(std::memory_order_relaxed);
    s.udp_tx_packets += c.udp_tx_packets.load(std::memory_order_relaxed);
    s.udp_tx_errors += c.udp_tx_errors.load(std::memory_order_relaxed);
    s.udp_gso_trains += c.udp_gso_trains.load(std::memory_order_relaxed);
    if (auto x = q->xsk()->Stats(); x.ok()) {
      s.xsk_rx_dropped += x->rx_dropped;
      s.xsk_rx_ring_full += x->rx_ring_full;
      s.xsk_fill_ring_empty += x->rx_fill_ring_empty_descs;
      s.xsk_tx_ring_empty += x->tx_ring_empty_descs;
    }
  }
  return s;
}

std::vector<std::shared_ptr<Channel>> AfxdpDriver::Channels() const {
  std::lock_guard g(mu_);
  return {channels_.begin(), channels_.end()};
}

}  // namespace

absl::StatusOr<std::unique_ptr<Driver>> CreateAfxdpDriver(const DriverOptions& opts) {
  return MakeDriver<AfxdpDriver>(opts);
}

}  // namespace netch::chan
