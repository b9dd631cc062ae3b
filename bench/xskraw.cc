// xskraw: the raw limit of one queue of the test hosts' veth pair into an AF_XDP socket — a
// minimal sender on host A and an rxdrop loop on host B (frames go straight back to the fill
// ring), with the same steering program the AF_XDP driver uses. No transport, no VNS: what any
// NetChannel data path on this pair can at most reach.
//
//   xskraw [--seconds S] [--frame BYTES] [--sender afxdp|udp] [--copy] [--queue Q]
//          [--ns-a NS] [--ns-b NS] [--json]
//   xskraw --pingpong [--payload BYTES] [--frame BYTES] [--seconds S] ...
//
// --sender afxdp: AF_XDP TX in copy mode; frames over 4 KB as descriptor chains (XDP_USE_SG).
// --sender udp:   the kernel's UDP socket (sendmmsg, 32 per call), frames up to 65549 B (a 64 KB
//                 IPv4 datagram); received as multi-buffer chains (XDP_USE_SG).
// --copy:         one user-space copy per side: the sender copies each payload into its send
//                 buffer first, the receiver copies it out of the UMEM (udp only).
// --zerocopy:     the UDP sender passes MSG_ZEROCOPY: the kernel pins the send buffers instead of
//                 copying them into the skb, and a buffer is reused only after its completion
//                 arrives on the socket's error queue (udp only).
// --pingpong:     the raw round trip instead of the rate: host A sends a --payload byte message
//                 (in frames of at most --frame bytes, AF_XDP TX), host B sends it back, both
//                 spinning on their rings (no poll()); each side copies the message into its
//                 UMEM, as a sender must. The floor for a busy-polled rpc over this pair.
//                 With --copy each side also copies every received frame out of the UMEM into
//                 a buffer of its own, as a receiver that uses the data must (the frames were
//                 written by the other CPU a moment before; without it they are never read).
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <time.h>
// After <time.h>: linux/errqueue.h uses struct timespec without including it.
#include <linux/errqueue.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/str_format.h"
#include "afxdp_channels/engine.h"
#include "afxdp_channels/netdev.h"
#include "afxdp_channels/xsk.h"
#include "bpf/steer_program.h"
#include "bpf/wire.h"
#include "common/netns.h"
#include "common/unique_fd.h"

namespace {

using namespace netch;

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

double CpuSeconds() {
  timespec t{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

int Fail(const std::string& what) {
  std::fprintf(stderr, "xskraw: %s\n", what.c_str());
  return 1;
}

// One message as the frames that carry it: `payload` bytes split into frames of at most `frame`
// bytes, each a valid DATA frame from `fa`.
std::vector<std::vector<uint8_t>> MessageFrames(const wire::FrameAddrs& fa, uint32_t chan,
                                                uint32_t payload, uint32_t frame) {
  wire::ChanHeader ch;
  ch.dst_chan = chan;
  ch.src_chan = chan;
  const size_t hl = wire::HeadersLen(ch, true);
  std::vector<std::vector<uint8_t>> out;
  for (uint32_t left = payload; left > 0;) {
    const uint32_t take = std::min<uint32_t>(left, frame - static_cast<uint32_t>(hl));
    left -= take;
    std::vector<uint8_t> body(take, 0x5a), f(hl + take);
    wire::SegHeader seg;
    if (wire::BuildFrame(f, fa, ch, &seg, body) != f.size()) return {};
    out.push_back(std::move(f));
  }
  return out;
}

// Copies one message into UMEM frames and transmits it (a frame over one UMEM frame as a chain).
bool SendMessage(Side& s, const std::vector<std::vector<uint8_t>>& frames) {
  s.umem->ReapCompletions();
  xdp_desc d[64];
  uint32_t k = 0;
  const uint32_t fsz = s.umem->frame_size();
  bool ok = true;
  for (const auto& f : frames) {
    for (size_t off = 0; off < f.size() && ok; off += fsz) {
      const uint64_t addr = k < 64 ? s.umem->AllocFrame() : afxdp::kNoFrame;
      if (addr == afxdp::kNoFrame) {
        ok = false;
        break;
      }
      const uint32_t len = static_cast<uint32_t>(std::min<size_t>(fsz, f.size() - off));
      std::memcpy(s.umem->Data(addr), f.data() + off, len);
      d[k++] = {addr, len, off + len < f.size() ? XDP_PKT_CONTD : 0u};
    }
  }
  if (ok) ok = s.xsk->Transmit({d, k}) == k;
  for (uint32_t i = 0; i < k; ++i) s.umem->FreeFrame(d[i].addr);  // the completion drops the rest
  return ok;
}

constexpr size_t kCopyBufBytes = 1 << 17;

// Spins until `nframes` whole frames arrived on side `s`; false at `deadline_us` if none of the
// message came (a lost frame). A message that started arriving is waited for to its end: giving
// up halfway (the echo thread descheduled past its deadline on a busy machine) would take the
// rest for the next message and put both ends out of step for good.
// With `copy_to`, every frame's bytes are copied there first (as a reader of the data would).
bool RecvMessage(Side& s, size_t nframes, uint64_t deadline_us, uint8_t* copy_to) {
  xdp_desc d[64];
  bool started = false;
  size_t off = 0;
  for (size_t got = 0; got < nframes;) {
    const uint32_t n = s.xsk->Receive(d);
    for (uint32_t i = 0; i < n; ++i) {
      if (copy_to && off + d[i].len <= kCopyBufBytes) {
        std::memcpy(copy_to + off, s.umem->Data(d[i].addr), d[i].len);
        off += d[i].len;
      }
      s.umem->FreeFrame(d[i].addr);
      got += !(d[i].options & XDP_PKT_CONTD);
    }
    if (n) {
      started = true;
      s.umem->Refill(n);
    } else if (!started && chan::NowUs() >= deadline_us) {
      return false;
    }
  }
  return true;
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  const size_t k = std::min(v.size() - 1, static_cast<size_t>(p / 100.0 * v.size()));
  std::nth_element(v.begin(), v.begin() + static_cast<ptrdiff_t>(k), v.end());
  return v[k];
}

int RunPingPong(Side& a, Side& b, uint32_t chan, uint32_t payload, uint32_t frame, uint32_t seconds,
                bool copy, bool json) {
  wire::FrameAddrs ab;
  ab.src_mac = a.ifi.mac;
  ab.dst_mac = b.ifi.mac;
  ab.src_ip = a.ifi.ipv4;
  ab.dst_ip = b.ifi.ipv4;
  ab.src_port = 49153;
  wire::FrameAddrs ba = ab;
  std::swap(ba.src_mac, ba.dst_mac);
  std::swap(ba.src_ip, ba.dst_ip);
  const auto fwd = MessageFrames(ab, chan, payload, frame);
  const auto back = MessageFrames(ba, chan, payload, frame);
  if (fwd.empty() || back.empty()) return Fail("--frame too small for the headers");
  a.umem->Refill(4096);
  b.umem->Refill(4096);
  std::atomic<bool> stop{false};
  const uint64_t end = chan::NowUs() + seconds * 1'000'000ull;
  std::vector<uint8_t> buf_a(copy ? kCopyBufBytes : 0), buf_b(copy ? kCopyBufBytes : 0);
  uint8_t* const to_a = copy ? buf_a.data() : nullptr;
  uint8_t* const to_b = copy ? buf_b.data() : nullptr;
  std::thread echo([&] {
    while (!stop.load(std::memory_order_relaxed))
      if (RecvMessage(b, fwd.size(), chan::NowUs() + 10'000, to_b)) SendMessage(b, back);
  });
  auto now_ns = [] {
    timespec t{};
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1'000'000'000ull + static_cast<uint64_t>(t.tv_nsec);
  };
  std::vector<double> rtt;
  rtt.reserve(1 << 20);
  uint64_t lost = 0;
  while (chan::NowUs() < end) {
    const uint64_t t0 = now_ns();
    if (!SendMessage(a, fwd)) return stop = true, echo.join(), Fail("host A's UMEM ran dry");
    if (!RecvMessage(a, back.size(), chan::NowUs() + 100'000, to_a)) {
      ++lost;
      continue;
    }
    rtt.push_back((now_ns() - t0) / 1e3);
  }
  stop = true;
  echo.join();
  const double p50 = Percentile(rtt, 50), p99 = Percentile(rtt, 99), p999 = Percentile(rtt, 99.9);
  if (json) {
    std::printf(
        "{\"sender\":\"afxdp\",\"mode\":\"pingpong\",\"payload\":%u,\"frame\":%u,"
        "\"copy\":%s,\"frames_per_message\":%zu,\"round_trips\":%zu,\"lost\":%llu,\"p50_us\":%.2f,"
        "\"p99_us\":%.2f,\"p999_us\":%.2f}\n",
        payload, frame, copy ? "true" : "false", fwd.size(), rtt.size(), (unsigned long long)lost,
        p50, p99, p999);
  } else {
    std::printf(
        "raw AF_XDP ping-pong, %u B messages in %zu frame(s) of <= %u B, spinning%s: %zu round "
        "trips, p50 %.1f us, p99 %.1f us, p99.9 %.1f us (lost %llu)\n",
        payload, fwd.size(), frame, copy ? ", received frames copied out" : "", rtt.size(), p50,
        p99, p999, (unsigned long long)lost);
  }
  return lost == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  std::string ns_a = "netch-a", ns_b = "netch-b", sender = "afxdp";
  uint32_t seconds = 3, frame = 3520, queue = 0;
  uint32_t message = 4096;
  bool json = false, copy = false, pingpong = false, zerocopy = false;
  CLI::App app{"xskraw: raw rate of one veth queue into an AF_XDP socket", "xskraw"};
  app.add_option("--seconds", seconds, "how long to send")->check(CLI::Range(1, 60));
  app.add_option("--frame", frame, "Ethernet frame bytes (up to 65549: a 64 KB IPv4 packet)")
      ->check(CLI::Range(128, 65549));
  app.add_option("--sender", sender, "afxdp or udp")->check(CLI::IsMember({"afxdp", "udp"}));
  app.add_flag("--copy", copy,
               "one user-space copy per side (udp sender; --pingpong: received frames copied out)");
  app.add_flag("--zerocopy", zerocopy, "MSG_ZEROCOPY sends (udp sender)");
  app.add_option("--queue", queue, "queue")->check(CLI::Range(0, NC_MAX_QUEUES - 1));
  app.add_option("--ns-a", ns_a, "sender namespace");
  app.add_option("--ns-b", ns_b, "receiver namespace");
  app.add_flag("--json", json, "one JSON object");
  app.add_flag("--pingpong", pingpong, "round trips of one message instead of the rate (afxdp)");
  app.add_option("--payload", message, "--pingpong: message bytes")->check(CLI::Range(1, 65536));
  app.footer("Needs `scripts/testhosts up --queues N --mtu M` with M >= frame - 14.");
  CLI11_PARSE(app, argc, argv);
  const bool udp = sender == "udp";
  if (!udp && copy && !pingpong) return Fail("--copy needs --sender udp or --pingpong");
  if (!udp && zerocopy) return Fail("--zerocopy needs --sender udp");
  if (pingpong && udp) return Fail("--pingpong measures the AF_XDP TX path only");

  auto a = Open(ns_a, "nc-a", queue);
  if (!a.ok())
    return std::fprintf(stderr, "xskraw: host A: %s\n", a.status().ToString().c_str()), 1;
  auto b = Open(ns_b, "nc-b", queue);
  if (!b.ok())
    return std::fprintf(stderr, "xskraw: host B: %s\n", b.status().ToString().c_str()), 1;
  constexpr uint32_t kChan = 1;
  if (auto st = b->steer->SetChannel(kChan, queue, queue); !st.ok())
    return std::fprintf(stderr, "xskraw: %s\n", st.ToString().c_str()), 1;
  if (pingpong) {
    int rc = 1;
    if (auto st = a->steer->SetChannel(kChan, queue, queue); !st.ok())
      std::fprintf(stderr, "xskraw: %s\n", st.ToString().c_str());
    else
      rc = RunPingPong(*a, *b, kChan, message, frame, seconds, copy, json);
    for (auto [ns, side] : {std::pair{ns_a, &*a}, std::pair{ns_b, &*b}}) {
      NetnsScope scope(ns);
      (void)side->steer->Detach();
    }
    return rc;
  }

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
  if (frame < hl) return Fail(absl::StrFormat("--frame must be at least %u (the headers)", hl));
  std::vector<uint8_t> payload(frame - hl, 0x5a);
  std::vector<uint8_t> tmpl(frame);
  if (wire::BuildFrame(tmpl, fa, ch, &seg, payload) != frame) return Fail("frame does not fit");
  std::vector<uint64_t> tx_frames;
  // AF_XDP TX: a frame longer than one UMEM frame goes as a chain of descriptors (XDP_USE_SG,
  // XDP_PKT_CONTD on all but the last). Every UMEM frame holds the frame's first 4 KB: the
  // receiver's XDP program reads only the headers, and lengths come from the descriptors.
  const uint32_t fsz = a->umem->frame_size();
  const uint32_t pieces = (frame + fsz - 1) / fsz;
  if (!udp && pieces > 1 && !a->xsk->multi_buffer())
    return Fail("--sender afxdp with frames over 4 KB needs XDP_USE_SG (kernel >= 6.6)");
  for (uint64_t f; !udp && (f = a->umem->AllocFrame()) != afxdp::kNoFrame;) {
    std::memcpy(a->umem->Data(f), tmpl.data(), std::min(frame, fsz));
    tx_frames.push_back(f);
  }
  for (uint64_t f : tx_frames) a->umem->FreeFrame(f);
  b->umem->Refill(4096);

  std::atomic<bool> stop{false};
  std::atomic<uint64_t> rx_pkts{0}, tx_pkts{0};
  uint64_t zc_copied = 0;  // completions the kernel marked "copied anyway"
  const uint64_t end = chan::NowUs() + seconds * 1'000'000ull;
  std::thread rx([&] {
    xdp_desc d[64];
    uint64_t n = 0;
    std::vector<uint8_t> sink(64 << 10);  // --copy: where the receiver copies payloads to
    size_t at = 0;
    while (!stop.load(std::memory_order_relaxed)) {
      const uint32_t got = b->xsk->Receive(d);
      if (got == 0) {
        pollfd p{b->xsk->fd(), POLLIN, 0};
        poll(&p, 1, 10);
        continue;
      }
      for (uint32_t i = 0; i < got; ++i) {
        if (copy) {
          if (at + d[i].len > sink.size()) at = 0;
          std::memcpy(sink.data() + at, b->umem->Data(d[i].addr), d[i].len);
          at += d[i].len;
        }
        b->umem->FreeFrame(d[i].addr);
        n += !(d[i].options & XDP_PKT_CONTD);  // a multi-buffer frame counts once
      }
      b->umem->Refill(got);
      rx_pkts.store(n, std::memory_order_relaxed);
    }
  });
  UniqueFd udp_fd;
  if (udp) {
    NetnsScope scope(ns_a);
    udp_fd.reset(socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
    const int pmtu = IP_PMTUDISC_DO, one = 1, sndbuf = 8 << 20;
    if (!udp_fd.valid() ||
        setsockopt(udp_fd.get(), IPPROTO_IP, IP_MTU_DISCOVER, &pmtu, sizeof(pmtu)) ||
        setsockopt(udp_fd.get(), SOL_SOCKET, SO_NO_CHECK, &one, sizeof(one)) ||
        setsockopt(udp_fd.get(), SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf)))
      return Fail("UDP socket");
    if (zerocopy && setsockopt(udp_fd.get(), SOL_SOCKET, SO_ZEROCOPY, &one, sizeof(one)))
      return Fail("SO_ZEROCOPY");
    // Pin the datagrams to the receiver's queue, as the driver does (nc_txq reads nc_channels of
    // the sender's program by the source channel id).
    if (auto st = a->steer->SetChannel(kChan, queue, queue); !st.ok()) return Fail(st.ToString());
  }
  const double cpu0 = CpuSeconds();
  std::thread tx([&] {
    if (udp) {
      // The datagram is the frame minus Ethernet/IPv4/UDP; every datagram of a batch points at
      // its own buffer, which --copy refills from the "application" buffer before each send.
      // With --zerocopy a buffer belongs to the kernel from its send until its completion (ids
      // count sends from 0, completions come as ranges), so the buffers form a ring far larger
      // than one batch and the sender waits for completions when the ring is all in flight.
      constexpr int kBatch = 32;
      const size_t nbufs = zerocopy ? 1024 : kBatch;
      const size_t dlen = frame - wire::kOuterLen;
      std::vector<uint8_t> app(tmpl.begin() + wire::kOuterLen, tmpl.end());
      std::vector<std::vector<uint8_t>> bufs(nbufs, app);
      sockaddr_in to{};
      to.sin_family = AF_INET;
      to.sin_addr.s_addr = htonl(b->ifi.ipv4);
      to.sin_port = htons(NC_DEFAULT_UDP_PORT);
      mmsghdr msgs[kBatch];
      iovec iov[kBatch];
      uint64_t n = 0, sent = 0, completed = 0;
      auto reap = [&] {
        for (;;) {
          char ctl[128];
          msghdr m{};
          m.msg_control = ctl;
          m.msg_controllen = sizeof(ctl);
          if (recvmsg(udp_fd.get(), &m, MSG_ERRQUEUE | MSG_DONTWAIT) < 0) return;
          for (cmsghdr* c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
            const auto* e = reinterpret_cast<const sock_extended_err*>(CMSG_DATA(c));
            if (e->ee_origin != SO_EE_ORIGIN_ZEROCOPY) continue;
            completed = std::max<uint64_t>(completed, uint64_t{e->ee_data} + 1);
            zc_copied += (e->ee_code & SO_EE_CODE_ZEROCOPY_COPIED) != 0;
          }
        }
      };
      while (chan::NowUs() < end) {
        if (zerocopy) {
          reap();
          if (sent - completed + kBatch > nbufs) {
            pollfd p{udp_fd.get(), 0, 0};  // POLLERR is always reported
            poll(&p, 1, 1);
            continue;
          }
        }
        for (int i = 0; i < kBatch; ++i) {
          auto& buf = bufs[(sent + i) % nbufs];
          if (copy) std::memcpy(buf.data(), app.data(), dlen);
          iov[i] = {buf.data(), dlen};
          msgs[i].msg_hdr = msghdr{};
          msgs[i].msg_hdr.msg_name = &to;
          msgs[i].msg_hdr.msg_namelen = sizeof(to);
          msgs[i].msg_hdr.msg_iov = &iov[i];
          msgs[i].msg_hdr.msg_iovlen = 1;
        }
        const int r = sendmmsg(udp_fd.get(), msgs, kBatch, zerocopy ? MSG_ZEROCOPY : 0);
        if (r > 0) n += static_cast<uint64_t>(r), sent += static_cast<uint64_t>(r);
      }
      tx_pkts = n;
      return;
    }
    xdp_desc d[64];
    uint64_t n = 0;
    while (chan::NowUs() < end) {
      a->umem->ReapCompletions();
      // Whole chains only: a packet cut between two batches would run into the next one.
      const uint32_t room = std::min<uint32_t>(64, a->xsk->tx_free()) / pieces * pieces;
      uint32_t k = 0;
      // Every frame is re-sent once its completion arrived (the pool holds it again).
      while (k + pieces <= room && a->umem->free_frames() >= pieces) {
        for (uint32_t p = 0; p < pieces; ++p) {
          const uint32_t len = p + 1 < pieces ? fsz : frame - p * fsz;
          d[k++] = {a->umem->AllocFrame(), len, p + 1 < pieces ? XDP_PKT_CONTD : 0u};
        }
      }
      n += a->xsk->Transmit({d, k}) / pieces;
      for (uint32_t i = 0; i < k; ++i) a->umem->FreeFrame(d[i].addr);
      if (a->xsk->tx_pending()) a->xsk->KickTx();
    }
    tx_pkts = n;
  });
  tx.join();
  usleep(100'000);
  stop = true;
  rx.join();
  const double cpu = CpuSeconds() - cpu0;
  const double s = seconds;
  const double mpps = rx_pkts.load() / s / 1e6;
  const double gbps = rx_pkts.load() * frame * 8.0 / s / 1e9;
  const double cpu_per_gb = rx_pkts.load() ? cpu / (rx_pkts.load() * frame / 1e9) : 0;
  auto xs = b->xsk->Stats();
  if (json) {
    std::printf(
        "{\"sender\":\"%s\",\"copy\":%s,\"frame\":%u,\"seconds\":%u,\"tx_packets\":%llu,"
        "\"rx_packets\":%llu,\"rx_mpps\":%.4f,\"rx_gbps\":%.3f,\"cpu_seconds_per_gb\":%.3f,"
        "\"rx_dropped\":%llu,\"zerocopy\":%s,\"zerocopy_copied\":%llu}\n",
        sender.c_str(), copy ? "true" : "false", frame, seconds, (unsigned long long)tx_pkts.load(),
        (unsigned long long)rx_pkts.load(), mpps, gbps, cpu_per_gb,
        xs.ok() ? (unsigned long long)xs->rx_dropped : 0ull, zerocopy ? "true" : "false",
        (unsigned long long)zc_copied);
  } else {
    std::printf(
        "raw %s sender%s -> AF_XDP rx, queue %u, %u B frames: received %.3f Mpps = %.2f Gbit/s, "
        "%.2f CPU-s/GB (sent %llu, received %llu, rx_dropped %llu%s)\n",
        sender.c_str(), copy ? " (one copy per side)" : "", queue, frame, mpps, gbps, cpu_per_gb,
        (unsigned long long)tx_pkts.load(), (unsigned long long)rx_pkts.load(),
        xs.ok() ? (unsigned long long)xs->rx_dropped : 0ull,
        zerocopy
            ? absl::StrFormat(", MSG_ZEROCOPY, %u completions copied anyway", zc_copied).c_str()
            : "");
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
