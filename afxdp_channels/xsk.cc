#include "afxdp_channels/xsk.h"

#include <sys/mman.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_format.h"
#include "common/errno_status.h"

namespace netch::afxdp {
namespace {

// Packet memory asks for transparent huge pages (this kernel aligns large anonymous mappings to
// 2 MB). Frames rotate through the fill ring thousands apart, so with 4 KB pages nearly every
// received frame, and every send buffer, is a page the TLB no longer maps: a page walk on its
// first touch, which in these guests costs more than the frame's headers. Advisory: where THP
// is off or no huge page is free the area keeps 4 KB pages.
void* MapPacketMemory(size_t len) {
  void* a = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (a != MAP_FAILED) (void)madvise(a, len, MADV_HUGEPAGE);
  return a;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Umem>> Umem::Create(const UmemConfig& cfg) {
  if (cfg.frame_count == 0 || (cfg.frame_size != 2048 && cfg.frame_size != 4096))
    return absl::InvalidArgumentError("UMEM frame_size must be 2048 or 4096, frame_count > 0");
  std::unique_ptr<Umem> u(new Umem(cfg));
  u->area_len_ = (static_cast<size_t>(cfg.frame_count) +
                  static_cast<size_t>(cfg.slot_count) * cfg.slot_frames) *
                 cfg.frame_size;
  u->area_ = MapPacketMemory(u->area_len_);
  if (u->area_ == MAP_FAILED) {
    u->area_ = nullptr;
    return ErrnoStatus(errno, "mmap UMEM area");
  }
  xsk_umem_config ucfg{};
  ucfg.fill_size = cfg.fill_size;
  ucfg.comp_size = cfg.comp_size;
  ucfg.frame_size = cfg.frame_size;
  ucfg.frame_headroom = 0;
  ucfg.flags = 0;
  if (int err = xsk_umem__create(&u->umem_, u->area_, u->area_len_, &u->fill_, &u->comp_, &ucfg))
    return ErrnoStatus(err, "xsk_umem__create");
  u->free_.resize(cfg.frame_count);
  u->refs_.assign(cfg.frame_count, 0);
  for (uint32_t i = 0; i < cfg.frame_count; ++i)
    u->free_[i] = static_cast<uint64_t>(cfg.frame_count - 1 - i) * cfg.frame_size;
  u->free_count_ = cfg.frame_count;
  if (cfg.slot_count) {
    u->slot_base_ = static_cast<uint64_t>(cfg.frame_count) * cfg.frame_size;
    u->slot_refs_.assign(cfg.slot_count, 0);
    u->slot_free_.reserve(cfg.slot_count);
    for (uint32_t i = 0; i < cfg.slot_count; ++i) u->slot_free_.push_back(cfg.slot_count - 1 - i);
  }
  return u;
}

absl::StatusOr<std::unique_ptr<SendPool>> SendPool::Create(uint32_t slots, uint32_t slot_size) {
  if (slots == 0 || slot_size == 0) return absl::InvalidArgumentError("empty send pool");
  std::unique_ptr<SendPool> p(new SendPool(slots, slot_size));
  p->area_len_ = static_cast<size_t>(slots) * slot_size;
  void* a = MapPacketMemory(p->area_len_);
  if (a == MAP_FAILED) return ErrnoStatus(errno, "mmap send pool");
  p->area_ = static_cast<uint8_t*>(a);
  p->free_.resize(slots);
  for (uint32_t i = 0; i < slots; ++i)
    p->free_[i] = kTag | static_cast<uint64_t>(slots - 1 - i) * slot_size;
  p->free_count_ = slots;
  return p;
}

SendPool::~SendPool() {
  if (area_) munmap(area_, area_len_);
}

Umem::~Umem() {
  if (umem_) xsk_umem__delete(umem_);
  if (area_) munmap(area_, area_len_);
}

uint32_t Umem::Refill(uint32_t max) {
  uint32_t n = std::min({max, free_count_, xsk_prod_nb_free(&fill_, max)});
  if (n == 0) return 0;
  uint32_t idx = 0;
  if (xsk_ring_prod__reserve(&fill_, n, &idx) != n) return 0;
  for (uint32_t i = 0; i < n; ++i) *xsk_ring_prod__fill_addr(&fill_, idx + i) = AllocFrame();
  xsk_ring_prod__submit(&fill_, n);
  return n;
}

uint32_t Umem::ReapCompletions() {
  uint32_t idx = 0;
  uint32_t n = xsk_ring_cons__peek(&comp_, cfg_.comp_size, &idx);
  for (uint32_t i = 0; i < n; ++i) FreeFrame(*xsk_ring_cons__comp_addr(&comp_, idx + i));
  if (n) xsk_ring_cons__release(&comp_, n);
  return n;
}

uint32_t Umem::fill_ring_level() const {
  // Producer-side view: what we submitted minus what the kernel consumed.
  return cfg_.fill_size - xsk_prod_nb_free(const_cast<xsk_ring_prod*>(&fill_), cfg_.fill_size);
}

absl::StatusOr<std::unique_ptr<XskSocket>> XskSocket::Create(Umem* umem, const XskConfig& cfg) {
  std::unique_ptr<XskSocket> s(new XskSocket(umem, cfg));
  xsk_socket_config xcfg{};
  xcfg.rx_size = cfg.rx_size;
  xcfg.tx_size = cfg.tx_size;
  xcfg.libxdp_flags = XSK_LIBXDP_FLAGS__INHIBIT_PROG_LOAD;
  xcfg.xdp_flags = 0;
  const uint16_t base = XDP_USE_NEED_WAKEUP | (cfg.zero_copy ? XDP_ZEROCOPY : XDP_COPY);
  xcfg.bind_flags = base | (cfg.multi_buffer ? XDP_USE_SG : 0);
  int err = xsk_socket__create(&s->xsk_, cfg.ifname.c_str(), cfg.queue, umem->raw(), &s->rx_,
                               &s->tx_, &xcfg);
  if (err == -EINVAL && cfg.multi_buffer) {
    // A kernel before 6.6 rejects the flag: single-buffer frames only (MTU-bound segments).
    xcfg.bind_flags = base;
    err = xsk_socket__create(&s->xsk_, cfg.ifname.c_str(), cfg.queue, umem->raw(), &s->rx_, &s->tx_,
                             &xcfg);
  } else if (!err) {
    s->multi_buffer_ = cfg.multi_buffer;
  }
  if (err)
    return ErrnoStatus(
        err, absl::StrFormat("create AF_XDP socket on %s queue %u", cfg.ifname, cfg.queue));
  return s;
}

XskSocket::~XskSocket() {
  if (xsk_) xsk_socket__delete(xsk_);
}

uint32_t XskSocket::Receive(std::span<xdp_desc> out) {
  uint32_t idx = 0;
  uint32_t n = xsk_ring_cons__peek(&rx_, static_cast<uint32_t>(out.size()), &idx);
  for (uint32_t i = 0; i < n; ++i) out[i] = *xsk_ring_cons__rx_desc(&rx_, idx + i);
  if (n) xsk_ring_cons__release(&rx_, n);
  return n;
}

uint32_t XskSocket::Transmit(std::span<const xdp_desc> descs) {
  uint32_t idx = 0;
  uint32_t n = xsk_ring_prod__reserve(&tx_, static_cast<uint32_t>(descs.size()), &idx);
  for (uint32_t i = 0; i < n; ++i) {
    *xsk_ring_prod__tx_desc(&tx_, idx + i) = descs[i];
    umem_->Ref(descs[i].addr);
  }
  if (n) {
    xsk_ring_prod__submit(&tx_, n);
    KickTx();
  }
  return n;
}

void XskSocket::KickTx() {
  // In copy mode the kernel transmits only inside sendto(); with need_wakeup it tells us when.
  if (!xsk_ring_prod__needs_wakeup(&tx_)) return;
  sendto(fd(), nullptr, 0, MSG_DONTWAIT, nullptr, 0);
}

absl::StatusOr<XskStats> XskSocket::Stats() const {
  xdp_statistics st{};
  socklen_t len = sizeof(st);
  if (getsockopt(fd(), SOL_XDP, XDP_STATISTICS, &st, &len))
    return ErrnoStatus(errno, "XDP_STATISTICS");
  return st;
}

}  // namespace netch::afxdp
