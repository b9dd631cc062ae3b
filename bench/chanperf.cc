// chanperf: channel-level throughput between the two test hosts (scripts/testhosts), over the
// AF_XDP or the kernel-TCP driver. Every byte is checked (tools/chan_transfer.h).
//
//   chanperf [--driver afxdp|tcp] [--channels N] [--bytes N] [--segment BYTES] [--engines N]
//            [--drop-ppm PPM] [--ns-a NS] [--ns-b NS] [--json]
#include <cstdio>
#include <cstdlib>
#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "tools/chan_transfer.h"

namespace {

constexpr char kUsage[] =
    "usage: chanperf [--driver afxdp|tcp] [--channels N] [--bytes N] [--segment BYTES]\n"
    "                [--engines N] [--drop-ppm PPM] [--timeout S] [--ns-a NS] [--ns-b NS]\n"
    "                [--no-verify] [--json]\n"
    "Moves --bytes (default 1 GiB) from test host A (198.18.0.1) to B (198.18.0.2) over\n"
    "--channels channels and reports Gbit/s, Mpps and integrity (every byte hashed on both\n"
    "sides unless --no-verify; stream offsets are always checked). Needs `scripts/testhosts up`.\n";

int Usage(const char* err) {
  if (err) std::fprintf(stderr, "chanperf: %s\n", err);
  std::fputs(kUsage, stderr);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string driver = "afxdp", ns_a = "netch-a", ns_b = "netch-b";
  uint64_t bytes = 1ull << 30;
  uint32_t channels = 1, segment = 0, engines = 2, drop_ppm = 0, timeout_s = 120;
  bool json = false, verify = true;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--json") {
      json = true;
      continue;
    }
    if (a == "--no-verify") {
      verify = false;
      continue;
    }
    if (a == "-h" || a == "--help") {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (i + 1 >= argc) return Usage(absl::StrFormat("%s needs a value", a).c_str());
    const char* v = argv[++i];
    bool ok = true;
    if (a == "--driver") {
      driver = v;
    } else if (a == "--ns-a") {
      ns_a = v;
    } else if (a == "--ns-b") {
      ns_b = v;
    } else if (a == "--bytes") {
      ok = absl::SimpleAtoi(v, &bytes) && bytes > 0;
    } else if (a == "--channels") {
      ok = absl::SimpleAtoi(v, &channels) && channels >= 1 && channels <= 64;
    } else if (a == "--segment") {
      ok = absl::SimpleAtoi(v, &segment) && segment >= 1;
    } else if (a == "--engines") {
      ok = absl::SimpleAtoi(v, &engines) && engines >= 1 && engines <= 64;
    } else if (a == "--timeout") {
      ok = absl::SimpleAtoi(v, &timeout_s) && timeout_s >= 1;
    } else if (a == "--drop-ppm") {
      ok = absl::SimpleAtoi(v, &drop_ppm) && drop_ppm < 1'000'000;
    } else {
      return Usage(absl::StrFormat("unknown argument '%s'", a).c_str());
    }
    if (!ok) return Usage(absl::StrFormat("bad value '%s' for %s", v, a).c_str());
  }
  netch::chan::DriverOptions oa;
  oa.netns = ns_a;
  oa.ifname = "nc-a";
  oa.engines = static_cast<int>(engines);
  netch::chan::DriverOptions ob = oa;
  ob.netns = ns_b;
  ob.ifname = "nc-b";
  auto a = netch::tools::OpenChanHost(driver, oa);
  if (!a.ok())
    return std::fprintf(stderr, "chanperf: host A: %s\n", a.status().ToString().c_str()), 1;
  auto b = netch::tools::OpenChanHost(driver, ob);
  if (!b.ok())
    return std::fprintf(stderr, "chanperf: host B: %s\n", b.status().ToString().c_str()), 1;
  if (drop_ppm) {
    for (auto* h : {a->get(), b->get()})
      if (h->steer) (void)h->steer->SetGlobalDropPpm(drop_ppm);
  }
  netch::tools::TransferOptions t;
  t.peer_ipv4 = 0xC6120002;
  t.channels = static_cast<int>(channels);
  t.bytes = bytes;
  t.segment_bytes = segment;
  t.verify = verify;
  t.deadline = absl::Seconds(timeout_s);
  auto r = netch::tools::RunTransfer(*(*a)->driver, *(*b)->driver, t);
  if (!r.ok()) return std::fprintf(stderr, "chanperf: %s\n", r.status().ToString().c_str()), 1;
  uint64_t retx = 0, timeouts = 0;
  for (const auto& c : r->channels) retx += c.tx_stats.retransmits, timeouts += c.tx_stats.timeouts;
  const auto sa = (*a)->driver->Stats(), sb = (*b)->driver->Stats();
  if (json) {
    std::printf(
        "{\"driver\":\"%s\",\"channels\":%u,\"bytes\":%llu,\"seconds\":%.4f,\"gbps\":%.3f,"
        "\"mpps\":%.4f,\"segments\":%llu,\"retransmits\":%llu,\"timeouts\":%llu,\"intact\":%s,"
        "\"rx_xsk_dropped\":%llu,\"rx_fill_empty\":%llu}\n",
        driver.c_str(), channels, (unsigned long long)r->bytes, r->seconds, r->gbps(), r->mpps(),
        (unsigned long long)r->segments, (unsigned long long)retx, (unsigned long long)timeouts,
        r->intact ? "true" : "false", (unsigned long long)sb.xsk_rx_dropped,
        (unsigned long long)sb.fill_ring_empty);
  } else {
    std::printf(
        "%s, %u channel(s): %llu bytes in %.3f s = %.2f Gbit/s, %.3f Mpps; %s; "
        "retransmits %llu (timeouts %llu)\n",
        driver.c_str(), channels, (unsigned long long)r->bytes, r->seconds, r->gbps(), r->mpps(),
        r->intact ? "every byte intact" : "INTEGRITY FAILURE", (unsigned long long)retx,
        (unsigned long long)timeouts);
    std::printf(
        "  A: rx frames %llu malformed %llu unknown %llu tx-ring-full %llu | B: rx frames "
        "%llu xsk rx_dropped %llu rx_ring_full %llu fill-empty %llu engine wakeups",
        (unsigned long long)sa.rx_frames, (unsigned long long)sa.rx_malformed,
        (unsigned long long)sa.rx_unknown_chan, (unsigned long long)sa.tx_ring_full,
        (unsigned long long)sb.rx_frames, (unsigned long long)sb.xsk_rx_dropped,
        (unsigned long long)sb.xsk_rx_ring_full, (unsigned long long)sb.fill_ring_empty);
    for (const auto& e : (*a)->driver->Engines())
      std::printf(" A%d:%llu", e.index, (unsigned long long)e.wakeups);
    for (const auto& e : (*b)->driver->Engines())
      std::printf(" B%d:%llu", e.index, (unsigned long long)e.wakeups);
    std::printf("\n");
    for (size_t c = 0; c < r->channels.size(); ++c) {
      const auto& ch = r->channels[c];
      std::printf(
          "  ch%zu sent %llu recv %llu in_order %d hash %s srtt %llu us cwnd %u "
          "state %s tx-queued %llu send-window %llu rx-queued(peer) %llu\n",
          c, (unsigned long long)ch.bytes_sent, (unsigned long long)ch.bytes_received, ch.in_order,
          ch.tx_hash == ch.rx_hash ? "ok" : "DIFFER", (unsigned long long)ch.tx_stats.srtt_us,
          ch.tx_stats.cwnd_packets, std::string(netch::chan::StateName(ch.tx_stats.state)).c_str(),
          (unsigned long long)ch.tx_stats.tx_queued_bytes,
          (unsigned long long)ch.tx_stats.send_window_bytes,
          (unsigned long long)ch.rx_stats.rx_queued_bytes);
    }
  }
  return r->intact ? 0 : 1;
}
