#include "vns_lib/conn.h"

namespace netch::vns {

void ReleaseHeld(std::vector<HeldSeg>& segs) {
  // Group per channel: one Release call (one lock) per channel. The batch keeps its capacity per
  // thread: no allocation per Recv.
  thread_local std::vector<chan::RxSegment> batch;
  std::erase_if(segs, [](const HeldSeg& h) {
    if (h.ch != nullptr) return false;
    delete[] h.data;
    return true;
  });
  while (!segs.empty()) {
    chan::Channel* ch = segs.front().ch;
    batch.clear();
    auto keep = std::remove_if(segs.begin(), segs.end(), [&](const HeldSeg& h) {
      if (h.ch != ch) return false;
      chan::RxSegment r;  // Release reads only the buffer's token and charge
      r.token = h.token;
      r.charge = h.charge;
      batch.push_back(r);
      return true;
    });
    segs.erase(keep, segs.end());
    ch->Release(batch);
  }
}

Conn::~Conn() {
  std::vector<HeldSeg> left;
  for (HeldSeg h; inq.PopOne(&h);) left.push_back(h);
  ReleaseHeld(left);
  if (efd >= 0) close(efd);
  if (wefd >= 0) close(wefd);
}

}  // namespace netch::vns
