// xskraw: the raw AF_XDP limit of one queue of the test hosts' veth pair — a minimal txonly loop
// on host A and an rxdrop loop on host B (frames go straight back to the fill ring), with the
// same steering program, frame size and copy mode the AF_XDP driver uses. chanperf's figures are
// reported as a ratio of this.
//
//   xskraw [--seconds S] [--frame BYTES] [--queue Q] [--ns-a NS] [--ns-b NS] [--json]
#include <poll.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "afxdp_channels/engine.h"
#include "afxdp_channels/netdev.h"
#include "afxdp_channels/xsk.h"
#include "bpf/steer_program.h"
#include "bpf/wire.h"
#include "common/netns.h"

namespace {

using namespace netch;

constexpr char kUsage[] =
    "usage: xskraw [--seconds S] [--frame BYTES] [--queue Q] [--ns-a NS] [--ns-b NS] [--json]\n"
    "Blasts NetChannel frames of --frame bytes (default 3520) from an AF_XDP socket on nc-a\n"
    "queue Q to an AF_XDP socket on nc-b queue Q (XDP steering attached) and reports the rate\n"
    "received. Needs `scripts/testhosts up --queues N --mtu 3506`.\n";

int Usage(const std::string& err) {
  std::fprintf(stderr, "xskraw: %s\n%s", err.c_str(), kUsage);
  return 2;
}

struct Side {
  std::unique_ptr<bpf::SteerProgram> steer;
  std::unique_ptr<afxdp::Umem> umem;
  std::unique_ptr<afxdp::XskSocket> xsk;
  afxdp::InterfaceInfo ifi;
};

absl::StatusOr<Side> Open(const std::string& ns, const std::string& dev, uint32_t queue) {
  NetnsScope scope(ns);
  if (!scope.ok()) return scope.status();
  Side s;
  auto ifi = afxdp::GetInterfaceInfo(dev);
  if (!ifi.ok()) return ifi.status();
  s.ifi = *ifi;
  auto steer = bpf::SteerProgram::Load();
  if (!steer.ok()) return steer.status();
  s.steer = std::move(*steer);
  if (auto st = s.steer->Attach(s.ifi.ifindex, bpf::AttachMode::kNative); !st.ok()) return st;
  afxdp::UmemConfig uc;
  uc.frame_count = 8192;
  uc.fill_size = 4096;
  uc.comp_size = 4096;
  auto umem = afxdp::Umem::Create(uc);
  if (!umem.ok()) return umem.status();
  s.umem = std::move(*umem);
  afxdp::XskConfig xc;
  xc.ifname = dev;
  xc.queue = queue;
  xc.rx_size = 2048;
  xc.tx_size = 2048;
  auto xsk = afxdp::XskSocket::Create(s.umem.get(), xc);
  if (!xsk.ok()) return xsk.status();
  s.xsk = std::move(*xsk);
  if (auto st = s.steer->SetXsk(queue, s.xsk->fd()); !st.ok()) return st;
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  std::string ns_a = "netch-a", ns_b = "netch-b";
  uint32_t seconds = 3, frame = 3520, queue = 0;
  bool json = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--json") {
      json = true;
      continue;
    }
    if (a == "-h" || a == "--help") return std::fputs(kUsage, stdout), 0;
    if (i + 1 >= argc) return Usage(a + " needs a value");
    const char* v = argv[++i];
    bool ok = true;
    if (a == "--seconds") {
      ok = absl::SimpleAtoi(v, &seconds) && seconds >= 1 && seconds <= 60;
    } else if (a == "--frame") {
      ok = absl::SimpleAtoi(v, &frame) && frame <= 3520;
    } else if (a == "--queue") {
      ok = absl::SimpleAtoi(v, &queue) && queue < NC_MAX_QUEUES;
    } else if (a == "--ns-a") {
      ns_a = v;
    } else if (a == "--ns-b") {
      ns_b = v;
    } else {
      return Usage("unknown argument '" + a + "'");
    }
    if (!ok) return Usage(absl::StrFormat("bad value '%s' for %s", v, a));
  }
  auto a = Open(ns_a, "nc-a", queue);
  if (!a.ok())
    return std::fprintf(stderr, "xskraw: host A: %s\n", a.status().ToString().c_str()), 1;
  auto b = Open(ns_b, "nc-b", queue);
  if (!b.ok())
    return std::fprintf(stderr, "xskraw: host B: %s\n", b.status().ToString().c_str()), 1;
  constexpr uint32_t kChan = 1;
  if (auto st = b->steer->SetChannel(kChan, queue, queue); !st.ok())
    return std::fprintf(stderr, "xskraw: %s\n", st.ToString().c_str()), 1;

  // One valid DATA frame, copied into every TX frame once: the loop never touches data.
  wire::FrameAddrs fa;
  fa.src_mac = a->ifi.mac;
  fa.dst_mac = b->ifi.mac;
  fa.src_ip = a->ifi.ipv4;
  fa.dst_ip = b->ifi.ipv4;
  fa.src_port = 49153;
  wire::ChanHeader ch;
  ch.dst_chan = kChan;
  ch.src_chan = kChan;
  wire::SegHeader seg;
  const size_t hl = wire::HeadersLen(ch, true);
  if (frame < hl) return Usage(absl::StrFormat("--frame must be at least %u (the headers)", hl));
  std::vector<uint8_t> payload(frame - hl, 0x5a);
  std::vector<uint8_t> tmpl(frame);
  if (wire::BuildFrame(tmpl, fa, ch, &seg, payload) != frame)
    return std::fprintf(stderr, "xskraw: frame does not fit\n"), 1;
  std::vector<uint64_t> tx_frames;
  for (uint64_t f; (f = a->umem->AllocFrame()) != afxdp::kNoFrame;) {
    std::memcpy(a->umem->Data(f), tmpl.data(), frame);
    tx_frames.push_back(f);
  }
  for (uint64_t f : tx_frames) a->umem->FreeFrame(f);
  b->umem->Refill(4096);

  std::atomic<bool> stop{false};
  std::atomic<uint64_t> rx_pkts{0}, tx_pkts{0};
  const uint64_t end = chan::NowUs() + seconds * 1'000'000ull;
  std::thread rx([&] {
    xdp_desc d[64];
    uint64_t n = 0;
    while (!stop.load(std::memory_order_relaxed)) {
      const uint32_t got = b->xsk->Receive(d);
      if (got == 0) {
        pollfd p{b->xsk->fd(), POLLIN, 0};
        poll(&p, 1, 10);
        continue;
      }
      for (uint32_t i = 0; i < got; ++i) b->umem->FreeFrame(d[i].addr);
      b->umem->Refill(got);
      n += got;
      rx_pkts.store(n, std::memory_order_relaxed);
    }
  });
  std::thread tx([&] {
    xdp_desc d[64];
    uint64_t n = 0;
    while (chan::NowUs() < end) {
      a->umem->ReapCompletions();
      const uint32_t room = std::min<uint32_t>(64, a->xsk->tx_free());
      uint32_t k = 0;
      // Every frame is re-sent once its completion arrived (the pool holds it again).
      for (; k < room; ++k) {
        const uint64_t f = a->umem->AllocFrame();
        if (f == afxdp::kNoFrame) break;
        d[k] = {f, frame, 0};
      }
      n += a->xsk->Transmit({d, k});
      for (uint32_t i = 0; i < k; ++i) a->umem->FreeFrame(d[i].addr);
      if (a->xsk->tx_pending()) a->xsk->KickTx();
    }
    tx_pkts = n;
  });
  tx.join();
  usleep(100'000);
  stop = true;
  rx.join();
  const double s = seconds;
  const double mpps = rx_pkts.load() / s / 1e6;
  const double gbps = rx_pkts.load() * frame * 8.0 / s / 1e9;
  auto xs = b->xsk->Stats();
  if (json) {
    std::printf(
        "{\"frame\":%u,\"seconds\":%u,\"tx_packets\":%llu,\"rx_packets\":%llu,"
        "\"rx_mpps\":%.4f,\"rx_gbps\":%.3f,\"rx_dropped\":%llu}\n",
        frame, seconds, (unsigned long long)tx_pkts.load(), (unsigned long long)rx_pkts.load(),
        mpps, gbps, xs.ok() ? (unsigned long long)xs->rx_dropped : 0ull);
  } else {
    std::printf(
        "raw AF_XDP, queue %u, %u B frames: received %.3f Mpps = %.2f Gbit/s (sent %llu, "
        "received %llu, rx_dropped %llu)\n",
        queue, frame, mpps, gbps, (unsigned long long)tx_pkts.load(),
        (unsigned long long)rx_pkts.load(), xs.ok() ? (unsigned long long)xs->rx_dropped : 0ull);
  }
  {
    NetnsScope sa(ns_a);
    (void)a->steer->Detach();
  }
  {
    NetnsScope sb(ns_b);
    (void)b->steer->Detach();
  }
  return 0;
}
