// reassembly.h - in-order delivery of one virtual socket's stream from segments that arrive on
// several channels in any interleaving (internal to VNS; unit-tested on its own).
//
// Each channel is in order, so segments arrive nearly sorted: insertion is almost always an
// append. Held segments stay in the channel's buffers (UMEM frames) until the application has
// copied them out; Take() says which bytes to copy where and which buffers are done.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "afxdp_channels/channel.h"

namespace netch::vns {

// 48 bytes: a socket's inbound queue (Conn::inq) holds up to 4096 of them. (With the whole
// RxSegment inside, as it once had, 88.)
struct HeldSeg {
  uint64_t seq = 0;  // stream offset of data[0]
  const uint8_t* data = nullptr;
  chan::Channel* ch = nullptr;  // Release() goes here; nullptr: `data` is a private copy
                                // (new[]) made under channel pressure, freed by ReleaseHeld
  uint64_t token = 0;           // the buffer, as Channel::Release wants it back
  uint32_t len = 0;
  uint32_t consumed = 0;  // bytes already copied out
  uint32_t charge = 0;

  // A received DATA segment, held in its channel's buffer.
  static HeldSeg Of(chan::Channel* ch, const chan::RxSegment& seg) {
    HeldSeg h;
    h.seq = seg.hdr.seq;
    h.data = seg.payload.data();
    h.len = static_cast<uint32_t>(seg.payload.size());
    h.ch = ch;
    h.token = seg.token;
    h.charge = seg.charge;
    return h;
  }
};
static_assert(sizeof(HeldSeg) == 48);

// One memcpy the reader must do.
struct CopyPiece {
  const uint8_t* src;
  size_t len;
  size_t dst_off;
};

class Reassembler {
 public:
  explicit Reassembler(size_t reserve = 1024) { segs_.reserve(reserve); }

  uint64_t next() const { return next_; }  // stream offset of the next byte to deliver
  bool empty() const { return head_ == segs_.size(); }

  // Takes a segment. False when it overlaps bytes already delivered or held (a duplicate or a
  // broken sender): the caller releases it.
  bool Insert(const HeldSeg& s) {
    if (s.len == 0) return false;
    if (s.seq < next_) return false;
    if (empty() || s.seq >= segs_.back().seq + segs_.back().len) {
      segs_.push_back(s);
      return true;
    }
    auto it = std::lower_bound(segs_.begin() + head_, segs_.end(), s.seq,
                               [](const HeldSeg& h, uint64_t q) { return h.seq < q; });
    if (it != segs_.end() && it->seq < s.seq + s.len) return false;  // overlaps the next one
    if (it != segs_.begin() + head_) {
      const HeldSeg& prev = *(it - 1);
      if (prev.seq + prev.len > s.seq) return false;  // overlaps the previous one
    }
    segs_.insert(it, s);
    return true;
  }

  // Contiguous bytes available from next().
  size_t Readable() const {
    size_t n = 0;
    uint64_t at = next_;
    for (size_t i = head_; i < segs_.size() && segs_[i].seq + segs_[i].consumed == at; ++i) {
      n += segs_[i].len - segs_[i].consumed;
      at = segs_[i].seq + segs_[i].len;
    }
    return n;
  }

  // Plans the copy of up to `want` in-order bytes: appends pieces and the segments now fully
  // consumed (to release), advances next(). Returns the bytes planned.
  size_t Take(size_t want, std::vector<CopyPiece>* pieces, std::vector<HeldSeg>* done) {
    size_t got = 0;
    while (got < want && head_ < segs_.size()) {
      HeldSeg& s = segs_[head_];
      if (s.seq + s.consumed != next_) break;  // a hole: the rest is still on its way
      const size_t n = std::min<size_t>(want - got, s.len - s.consumed);
      pieces->push_back({s.data + s.consumed, n, got});
      s.consumed += static_cast<uint32_t>(n);
      next_ += n;
      got += n;
      if (s.consumed == s.len) {
        done->push_back(s);
        head_++;
      }
    }
    if (head_ > 64 && head_ * 2 > segs_.size()) {
      segs_.erase(segs_.begin(), segs_.begin() + head_);
      head_ = 0;
    }
    return got;
  }

  // Everything still held (for release at close).
  template <typename F>
  void ForEachHeld(F f) {
    for (size_t i = head_; i < segs_.size(); ++i) f(segs_[i]);
    segs_.clear();
    head_ = 0;
  }

 private:
  std::vector<HeldSeg> segs_;  // sorted by seq; [head_, end) held
  size_t head_ = 0;
  uint64_t next_ = 0;
};

}  // namespace netch::vns
