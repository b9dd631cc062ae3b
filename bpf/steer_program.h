// steer_program.h - owns one loaded instance of the XDP steering program and its maps.
//
// The BPF object is embedded through the bpftool skeleton: nothing is looked up on disk at run
// time. One SteerProgram is attached to at most one interface; the controller (ctl/) owns it in a
// running stack, tests own it directly.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "bpf/netch_wire.h"

struct steer_bpf;  // generated skeleton

namespace netch::bpf {

enum class AttachMode {
  kNative,   // driver mode: what veth and real NICs support; the fast path
  kGeneric,  // skb mode: works everywhere, slow; used only as an explicit fallback
};

using Counters = std::array<uint64_t, NC_CNT_MAX>;

class SteerProgram {
 public:
  // Opens and loads the embedded object and writes the initial config (udp_port host order).
  static absl::StatusOr<std::unique_ptr<SteerProgram>> Load(
      uint16_t udp_port = NC_DEFAULT_UDP_PORT);
  ~SteerProgram();
  SteerProgram(const SteerProgram&) = delete;
  SteerProgram& operator=(const SteerProgram&) = delete;

  // Attaches to `ifindex` in the calling thread's network namespace. Fails with
  // FailedPrecondition if another XDP program is attached and replace is false. Also installs
  // nc_txq at tc egress (a clsact filter of our own), which pins datagrams of the kernel-UDP
  // transmit path to their channel's queue; where that fails the XDP program still works and
  // tx_queue_steering() says so.
  absl::Status Attach(int ifindex, AttachMode mode, bool replace = false);
  // Detaches if attached (idempotent); only removes our own programs.
  absl::Status Detach();
  int attached_ifindex() const { return ifindex_; }
  // Whether nc_txq is attached: the kernel-UDP transmit path needs it on a multi-queue device.
  bool tx_queue_steering() const { return tc_attached_; }

  int prog_fd() const;
  int config_fd() const;
  int channels_fd() const;
  int xsks_fd() const;
  int counters_fd() const;
  int chan_stats_fd() const;

  absl::Status SetUdpPort(uint16_t port);
  absl::Status SetGlobalDropPpm(uint32_t ppm);
  // Tests: mark CE on `ppm` per million ECN-capable NetChannel packets (drives DCTCP).
  absl::Status SetCeMarkPpm(uint32_t ppm);
  // Tests: the global drop rate also applies to TCP segments to/from `port` (0 = off).
  absl::Status SetTcpFaultPort(uint16_t port);
  absl::StatusOr<nc_config> ReadConfig() const;
  // Steers channel `id` (1..NC_MAX_CHANNELS-1) to XSKMAP slot `xsk_slot`, expecting its frames on
  // rx queue `queue` and carrying `token` (host order) in their channel header.
  absl::Status SetChannel(uint32_t id, uint32_t queue, uint32_t xsk_slot, uint64_t token = 0,
                          uint32_t drop_ppm = 0);
  absl::Status ClearChannel(uint32_t id);
  // The steering entry of channel `id` (flags 0 when inactive); token in network order.
  absl::StatusOr<nc_chan_steer> ReadChannel(uint32_t id) const;
  // Fault injection for one active channel (netchctl fault drop PPM --channel ID).
  absl::Status SetChannelDropPpm(uint32_t id, uint32_t ppm);
  // Pins every map and the program under `dir` (an existing bpffs directory), named as in the
  // object: nc_config, nc_channels, nc_xsks, nc_counters, nc_chan_stats, nc_steer.
  absl::Status Pin(const std::string& dir);
  absl::Status SetXsk(uint32_t slot, int xsk_fd);
  absl::Status ClearXsk(uint32_t slot);

  // Per-CPU values summed over all possible CPUs.
  absl::StatusOr<Counters> ReadCounters() const;
  absl::StatusOr<nc_chan_stats> ReadChanStats(uint32_t id) const;

 private:
  SteerProgram() = default;
  absl::Status UpdateConfig(const nc_config& c);
  void AttachTc();
  void DetachTc();
  static constexpr uint32_t kTcHandle = 0x4e43;  // "NC"
  static constexpr uint32_t kTcPriority = 1;

  steer_bpf* skel_ = nullptr;
  int ifindex_ = 0;
  uint32_t attach_flags_ = 0;
  bool tc_attached_ = false;
};

// Human-readable one-line-per-counter dump of the non-zero counters.
std::string FormatCounters(const Counters& c);

}  // namespace netch::bpf
