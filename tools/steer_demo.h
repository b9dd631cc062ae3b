// steer_demo.h - the foundation demo: NetChannel frames from one test host are steered by the XDP
// program into an AF_XDP socket on the other, while ping and a kernel TCP connection between the
// same hosts keep working (the hybrid promise). The veth smoke test runs this very function.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "afxdp_channels/xsk.h"
#include "bpf/steer_program.h"

namespace netch::tools {

struct SteerDemoOptions {
  std::string ns_tx = "netch-a";
  std::string ns_rx = "netch-b";
  std::string dev_tx = "nc-a";
  std::string dev_rx = "nc-b";
  uint32_t frames = 2000;    // valid frames; half via a kernel UDP socket, half via AF_PACKET
  uint32_t malformed = 200;  // frames with a bad version: must be dropped and counted
  uint32_t payload = 1200;   // segment payload bytes per frame
  uint16_t port = NC_DEFAULT_UDP_PORT;
  bool kernel_traffic = true;  // run ping and a kernel TCP transfer alongside
  absl::Duration timeout = absl::Seconds(10);
};

struct SteerDemoResult {
  std::string attach_mode;  // "native" or "generic"
  uint64_t sent_udp = 0;
  uint64_t sent_raw = 0;
  uint64_t sent_malformed = 0;
  uint64_t received = 0;         // frames read from the AF_XDP socket
  uint64_t received_intact = 0;  // ... whose headers parse and payload matches what was sent
  uint64_t received_duplicate = 0;
  bpf::Counters counters{};  // XDP counter deltas over the run
  afxdp::XskStats xsk{};
  // Packets the veth pair itself dropped over the run (tx_dropped and rx_dropped of both ends):
  // a peer's ring that overflows while its NAPI cannot run (both hosts share 2 cores, and kernel
  // TCP shares the ring) drops frames before any XDP program sees them.
  uint64_t link_drops = 0;
  bool ping_ok = false;
  uint64_t tcp_bytes = 0;
  bool tcp_intact = false;
  double seconds = 0;
};

absl::StatusOr<SteerDemoResult> RunSteerDemo(const SteerDemoOptions& opts);
std::string FormatSteerDemo(const SteerDemoOptions& opts, const SteerDemoResult& r);
std::string SteerDemoJson(const SteerDemoResult& r);

}  // namespace netch::tools
