// xsk.h - UMEM and AF_XDP socket ownership for the AF_XDP NetDriver.
//
// Umem owns the packet memory, its fill/completion rings and a free-frame pool. The pool is a
// fixed array used as a stack: no allocation after Create(), and it is not thread-safe by design —
// one engine thread owns a Umem and everything bound to it (a fill or completion ring shared by
// two threads would need a lock on every batch).
//
// XskSocket is one AF_XDP socket bound to (interface, queue). We never let libxdp load its own
// XDP program: steering belongs to bpf/steer.bpf.c, and the controller inserts the socket's fd
// into nc_xsks itself.
#pragma once

#include <linux/if_xdp.h>
#include <xdp/xsk.h>

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

// Multi-buffer AF_XDP (kernel >= 6.6); Debian 12's uapi headers predate it.
#ifndef XDP_USE_SG
#define XDP_USE_SG (1 << 4)
#endif
#ifndef XDP_PKT_CONTD
#define XDP_PKT_CONTD (1 << 0)
#endif

namespace netch::afxdp {

inline constexpr uint64_t kNoFrame = ~0ull;

struct UmemConfig {
  uint32_t frame_count = 4096;  // frames in the pool (RX, control packets, small TX buffers)
  // TX slots after the pool: `slot_frames` contiguous frames each, for segments larger than a
  // frame sent by AF_XDP TX as descriptor chains (XDP_USE_SG). 0: none.
  uint32_t slot_count = 0;
  uint32_t slot_frames = 16;
  uint32_t frame_size = XSK_UMEM__DEFAULT_FRAME_SIZE;  // 4096: a 3520 B frame plus headroom fits
  uint32_t fill_size = XSK_RING_PROD__DEFAULT_NUM_DESCS * 2;
  uint32_t comp_size = XSK_RING_CONS__DEFAULT_NUM_DESCS * 2;
};

class Umem {
 public:
  static absl::StatusOr<std::unique_ptr<Umem>> Create(const UmemConfig& cfg);
  ~Umem();
  Umem(const Umem&) = delete;
  Umem& operator=(const Umem&) = delete;

  // Frame pool with reference counts. A frame can be referenced by its owner (the transport
  // holding unacknowledged data) and by every descriptor of it sitting in the TX ring: a
  // retransmission may be queued while the first transmission is not yet completed, and an ACK may
  // arrive before the completion. The frame returns to the pool when the last reference goes.
  // AllocFrame returns kNoFrame when empty; the new frame has one reference.
  uint64_t AllocFrame() {
    if (!free_count_) return kNoFrame;
    uint64_t a = free_[--free_count_];
    refs_[a / cfg_.frame_size] = 1;
    return a;
  }
  // A TX slot works the same at slot granularity: one reference for its owner, one per
  // descriptor of it in the TX ring (whichever of its frames the descriptor covers).
  uint64_t AllocSlot() {
    if (slot_free_.empty()) return kNoFrame;
    const uint32_t s = slot_free_.back();
    slot_free_.pop_back();
    slot_refs_[s] = 1;
    return slot_base_ + static_cast<uint64_t>(s) * slot_bytes();
  }
  void Ref(uint64_t addr) {
    if (addr >= slot_base_) {
      slot_refs_[(addr - slot_base_) / slot_bytes()]++;
    } else {
      refs_[addr / cfg_.frame_size]++;
    }
  }
  // Drops one reference (any address inside the frame or slot).
  void FreeFrame(uint64_t addr) {
    if (addr >= slot_base_) {
      const uint32_t s = static_cast<uint32_t>((addr - slot_base_) / slot_bytes());
      if (--slot_refs_[s] == 0) slot_free_.push_back(s);
      return;
    }
    if (--refs_[addr / cfg_.frame_size] == 0) free_[free_count_++] = FrameBase(addr);
  }
  uint32_t free_slots() const { return static_cast<uint32_t>(slot_free_.size()); }
  uint32_t slot_count() const { return cfg_.slot_count; }
  uint32_t slot_bytes() const { return cfg_.slot_frames * cfg_.frame_size; }
  uint32_t free_frames() const { return free_count_; }
  uint32_t frame_count() const { return cfg_.frame_count; }
  uint32_t frame_size() const { return cfg_.frame_size; }
  uint64_t FrameBase(uint64_t addr) const { return addr - addr % cfg_.frame_size; }

  uint8_t* Data(uint64_t addr) { return static_cast<uint8_t*>(xsk_umem__get_data(area_, addr)); }

  // Moves up to `max` free frames into the fill ring (one batch reservation). Returns how many.
  uint32_t Refill(uint32_t max);
  // Returns completed TX frames to the pool. Returns how many.
  uint32_t ReapCompletions();
  // Frames currently in the fill ring (handed to the kernel for RX).
  uint32_t fill_ring_level() const;

  xsk_umem* raw() { return umem_; }
  xsk_ring_prod* fill() { return &fill_; }
  xsk_ring_cons* comp() { return &comp_; }

 private:
  explicit Umem(const UmemConfig& cfg) : cfg_(cfg) {}

  UmemConfig cfg_;
  void* area_ = nullptr;
  size_t area_len_ = 0;
  xsk_umem* umem_ = nullptr;
  xsk_ring_prod fill_{};
  xsk_ring_cons comp_{};
  std::vector<uint64_t> free_;
  std::vector<uint16_t> refs_;
  uint32_t free_count_ = 0;
  uint64_t slot_base_ = ~0ull;       // first byte of the slot region (none: never matches)
  std::vector<uint32_t> slot_free_;  // reserved up front: no allocation after Create
  std::vector<uint16_t> slot_refs_;
};

// The memory the kernel-UDP transmit path sends from: fixed-size slots, one segment each, owned
// by one engine thread like a Umem (no lock). sendmmsg() copies a slot into an skb before it
// returns, so a slot has a single owner — the transport, until the peer acknowledges it — and
// no completion ring. Tokens carry kTag so they are never mistaken for UMEM addresses.
class SendPool {
 public:
  static constexpr uint64_t kTag = 1ull << 62;
  static absl::StatusOr<std::unique_ptr<SendPool>> Create(uint32_t slots, uint32_t slot_size);
  ~SendPool();
  SendPool(const SendPool&) = delete;
  SendPool& operator=(const SendPool&) = delete;

  static bool Owns(uint64_t token) { return token & kTag; }
  uint64_t Alloc() { return free_count_ ? free_[--free_count_] : kNoFrame; }
  void Free(uint64_t token) { free_[free_count_++] = token - (token & ~kTag) % slot_size_; }
  uint8_t* Data(uint64_t token) { return area_ + (token & ~kTag); }
  uint32_t free_slots() const { return free_count_; }
  uint32_t slots() const { return slots_; }
  uint32_t slot_size() const { return slot_size_; }

 private:
  SendPool(uint32_t slots, uint32_t slot_size) : slots_(slots), slot_size_(slot_size) {}
  uint32_t slots_, slot_size_;
  uint8_t* area_ = nullptr;
  size_t area_len_ = 0;
  std::vector<uint64_t> free_;
  uint32_t free_count_ = 0;
};

struct XskConfig {
  std::string ifname;
  uint32_t queue = 0;
  uint32_t rx_size = XSK_RING_CONS__DEFAULT_NUM_DESCS;
  uint32_t tx_size = XSK_RING_PROD__DEFAULT_NUM_DESCS;
  bool zero_copy = false;  // veth has no zero-copy; real NICs with ZC support set this
  // Bind with XDP_USE_SG: a frame larger than one UMEM frame arrives as a chain of descriptors
  // (XDP_PKT_CONTD on all but the last). Falls back to single-buffer where the kernel lacks it.
  bool multi_buffer = true;
};

// XDP_STATISTICS as the kernel reports it (Debian 12's uapi has every field we read).
using XskStats = xdp_statistics;

class XskSocket {
 public:
  // Creates an XSK on cfg.ifname/cfg.queue in the calling thread's network namespace.
  static absl::StatusOr<std::unique_ptr<XskSocket>> Create(Umem* umem, const XskConfig& cfg);
  ~XskSocket();
  XskSocket(const XskSocket&) = delete;
  XskSocket& operator=(const XskSocket&) = delete;

  int fd() const { return xsk_socket__fd(xsk_); }
  uint32_t queue() const { return cfg_.queue; }
  Umem* umem() { return umem_; }
  // Whether the socket was bound with XDP_USE_SG (multi-buffer frames arrive as chains).
  bool multi_buffer() const { return multi_buffer_; }

  // Takes up to out.size() received descriptors in one batch. The frames now belong to the caller
  // (return them with Umem::FreeFrame).
  uint32_t Receive(std::span<xdp_desc> out);
  // Queues up to descs.size() frames for transmit in one batch and kicks the kernel if needed.
  // Returns how many were queued; the rest stay with the caller. Each queued descriptor takes a
  // frame reference that its completion drops (Umem::ReapCompletions); the caller keeps its own.
  uint32_t Transmit(std::span<const xdp_desc> descs);
  // Copy-mode TX only moves on sendto(); this issues it when the kernel asks for a wakeup.
  void KickTx();
  // Free slots in the TX ring: the most Transmit() can take now.
  uint32_t tx_free() { return xsk_prod_nb_free(&tx_, cfg_.tx_size); }
  // Descriptors in the TX ring the kernel has not taken yet. Copy mode sends at most a small
  // batch per sendto(), so the owner must keep kicking while this is non-zero.
  uint32_t tx_pending() { return cfg_.tx_size - tx_free(); }
  // Whether the kernel wants a poll()/recvfrom() to refill (need_wakeup on the fill ring).
  bool FillNeedsWakeup() { return xsk_ring_prod__needs_wakeup(umem_->fill()); }

  absl::StatusOr<XskStats> Stats() const;

 private:
  XskSocket(Umem* umem, const XskConfig& cfg) : umem_(umem), cfg_(cfg) {}

  Umem* umem_;
  XskConfig cfg_;
  bool multi_buffer_ = false;
  xsk_socket* xsk_ = nullptr;
  xsk_ring_cons rx_{};
  xsk_ring_prod tx_{};
};

}  // namespace netch::afxdp
