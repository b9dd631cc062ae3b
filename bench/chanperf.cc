// chanperf: channel-level throughput between the two test hosts (scripts/testhosts), over the
// AF_XDP or the kernel-TCP driver. Every byte is checked (tools/chan_transfer.h).
//
//   chanperf [--driver afxdp|tcp] [--tx auto|afxdp|udp] [--channels N] [--bytes N]
//            [--segment BYTES] [--engines N] [--drop-ppm PPM] [--ns-a NS] [--ns-b NS] [--json]
#include <cstdio>
#include <cstdlib>
#include <string>

#include "CLI/CLI.hpp"
#include "absl/strings/str_format.h"
#include "tools/chan_transfer.h"

int main(int argc, char** argv) {
  std::string driver = "afxdp", tx = "auto", ns_a = "netch-a", ns_b = "netch-b";
  uint64_t bytes = 1ull << 30;
  uint32_t channels = 1, segment = 0, engines = 2, drop_ppm = 0, timeout_s = 120;
  bool json = false, no_verify = false;
  CLI::App app{
      "chanperf: moves --bytes from test host A (198.18.0.1) to B (198.18.0.2) over --channels "
      "channels and reports Gbit/s, Mpps and integrity (every byte hashed on both sides unless "
      "--no-verify; stream offsets are always checked). Needs `scripts/testhosts up`.",
      "chanperf"};
  app.add_option("--driver", driver, "afxdp or tcp")->check(CLI::IsMember({"afxdp", "tcp"}));
  app.add_option("--tx", tx, "AF_XDP transmit path: auto, afxdp or udp")
      ->check(CLI::IsMember({"auto", "afxdp", "udp"}));
  app.add_option("--channels", channels, "channels")->check(CLI::Range(1, 64));
  app.add_option("--bytes", bytes, "bytes to move")->check(CLI::PositiveNumber);
  app.add_option("--segment", segment, "segment payload bytes (default: the largest)")
      ->check(CLI::PositiveNumber);
  app.add_option("--engines", engines, "engine threads per host")->check(CLI::Range(1, 64));
  app.add_option("--drop-ppm", drop_ppm, "injected loss each way, per million packets")
      ->check(CLI::Range(0, 999'999));
  app.add_option("--timeout", timeout_s, "give up after S seconds")->check(CLI::PositiveNumber);
  app.add_option("--ns-a", ns_a, "sender namespace");
  app.add_option("--ns-b", ns_b, "receiver namespace");
  app.add_flag("--no-verify", no_verify, "do not hash the bytes");
  app.add_flag("--json", json, "one JSON object");
  CLI11_PARSE(app, argc, argv);
  const bool verify = !no_verify;
  netch::chan::DriverOptions oa;
  oa.netns = ns_a;
  oa.ifname = "nc-a";
  oa.engines = static_cast<int>(engines);
  oa.tx = tx;
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
  uint64_t retx = 0, timeouts = 0, spurious = 0;
  for (const auto& c : r->channels) {
    retx += c.tx_stats.retransmits;
    timeouts += c.tx_stats.timeouts;
    spurious += c.tx_stats.spurious_timeouts;
  }
  const auto sa = (*a)->driver->Stats(), sb = (*b)->driver->Stats();
  if (json) {
    std::printf(
        "{\"driver\":\"%s\",\"channels\":%u,\"bytes\":%llu,\"seconds\":%.4f,\"gbps\":%.3f,"
        "\"mpps\":%.4f,\"segments\":%llu,\"retransmits\":%llu,\"timeouts\":%llu,\"spurious_"
        "timeouts\":%llu,"
        "\"intact\":%s,"
        "\"rx_xsk_dropped\":%llu,\"rx_fill_empty\":%llu,\"tx_udp\":%s,\"udp_packets\":%llu,"
        "\"udp_gso_trains\":%llu,\"rx_multi_buffer\":%llu}\n",
        driver.c_str(), channels, (unsigned long long)r->bytes, r->seconds, r->gbps(), r->mpps(),
        (unsigned long long)r->segments, (unsigned long long)retx, (unsigned long long)timeouts,
        (unsigned long long)spurious, r->intact ? "true" : "false",
        (unsigned long long)sb.xsk_rx_dropped, (unsigned long long)sb.fill_ring_empty,
        sa.tx_udp ? "true" : "false", (unsigned long long)sa.udp_tx_packets,
        (unsigned long long)sa.udp_gso_trains, (unsigned long long)sb.rx_multi_buffer);
  } else {
    std::printf(
        "%s, %u channel(s): %llu bytes in %.3f s = %.2f Gbit/s, %.3f Mpps; %s; "
        "retransmits %llu (timeouts %llu, %llu of them spurious and undone)\n",
        driver.c_str(), channels, (unsigned long long)r->bytes, r->seconds, r->gbps(), r->mpps(),
        r->intact ? "every byte intact" : "INTEGRITY FAILURE", (unsigned long long)retx,
        (unsigned long long)timeouts, (unsigned long long)spurious);
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
