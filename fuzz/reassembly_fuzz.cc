// libFuzzer harness: VNS reassembly against a model. Segments of one stream (a known byte
// pattern) arrive in the order, sizes, overlaps and duplicates the input chooses; reads of sizes
// the input chooses must return exactly the stream, in order, with nothing lost or repeated, and
// every segment must be handed back exactly once.
#include <cstdint>
#include <cstdlib>
#include <set>
#include <vector>

#include "vns_lib/reassembly.h"

using namespace netch;
using vns::CopyPiece;
using vns::HeldSeg;

namespace {
constexpr size_t kStream = 1 << 16;
uint8_t Pattern(uint64_t i) { return static_cast<uint8_t>(i * 131 + (i >> 8)); }
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* d, size_t n) {
  static std::vector<uint8_t> stream = [] {
    std::vector<uint8_t> s(kStream);
    for (size_t i = 0; i < kStream; ++i) s[i] = Pattern(i);
    return s;
  }();
  vns::Reassembler r(16);
  std::vector<CopyPiece> pieces;
  std::vector<HeldSeg> done;
  std::multiset<uint64_t> held;  // ids of segments inside the reassembler
  uint64_t read = 0, next_id = 1;
  std::vector<uint8_t> out(kStream);
  size_t i = 0;
  auto byte = [&]() -> uint32_t { return i < n ? d[i++] : 0; };
  while (i + 4 <= n) {
    const uint32_t op = byte();
    if (op & 1) {
      // Insert [seq, seq + len): seq anywhere near the read point, len 1..1024.
      const uint64_t seq = read + ((byte() << 8 | byte()) % 8192);
      const uint32_t len = 1 + (byte() << 2) % 1024;
      if (seq + len > kStream) continue;
      HeldSeg h;
      h.seq = seq;
      h.data = stream.data() + seq;
      h.len = len;
      h.token = next_id++;
      if (r.Insert(h)) held.insert(h.token);
    } else {
      const size_t want = 1 + (byte() << 4);
      pieces.clear();
      done.clear();
      const size_t avail = r.Readable();
      const size_t got = r.Take(want, &pieces, &done);
      if (got > want || got != std::min(want, avail)) abort();
      size_t sum = 0;
      for (const CopyPiece& p : pieces) {
        if (p.dst_off != sum || p.dst_off + p.len > got) abort();
        std::copy(p.src, p.src + p.len, out.data() + p.dst_off);
        sum += p.len;
      }
      if (sum != got) abort();
      for (size_t k = 0; k < got; ++k)
        if (out[k] != Pattern(read + k)) abort();  // wrong byte, lost or repeated data
      read += got;
      if (r.next() != read) abort();
      for (const HeldSeg& h : done) {
        auto it = held.find(h.token);
        if (it == held.end()) abort();  // handed back twice, or never held
        held.erase(it);
      }
    }
  }
  // Close: everything still held comes back once.
  r.ForEachHeld([&](const HeldSeg& h) {
    auto it = held.find(h.token);
    if (it == held.end()) abort();
    held.erase(it);
  });
  if (!held.empty()) abort();
  return 0;
}
