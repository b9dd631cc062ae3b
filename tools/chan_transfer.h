// chan_transfer.h - bulk transfers over channels between two drivers, with integrity checks.
// Shared by the veth tests (test/veth/channel_test.cc) and the channel benchmark
// (bench/chanperf.cc) so that what the benchmark measures is what the tests verify.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "afxdp_channels/channel.h"
#include "bpf/steer_program.h"

namespace netch::tools {

// One side of a test: the steering program (AF_XDP driver only) and a driver, in a namespace.
struct ChanHost {
  std::string netns;
  std::unique_ptr<bpf::SteerProgram> steer;
  std::unique_ptr<chan::Driver> driver;
  ~ChanHost();  // driver first: it clears its entries in the program's maps
};

// Loads and attaches (native mode) the steering program on opts.ifname inside opts.netns when
// `driver` is "afxdp", then creates the driver.
absl::StatusOr<std::unique_ptr<ChanHost>> OpenChanHost(const std::string& driver,
                                                       chan::DriverOptions opts);

struct TransferOptions {
  uint32_t peer_ipv4 = 0;  // the receiver's address, host order
  int channels = 1;
  int queue = -1;                // AF_XDP queue for every channel (-1: the driver spreads them)
  uint64_t bytes = 64ull << 20;  // total over all channels
  uint32_t segment_bytes = 0;    // payload per segment; 0 = the channel's max_payload()
  absl::Duration deadline = absl::Seconds(60);
  // Called from the controlling thread every ~10 ms while data moves, with the fraction done.
  std::function<void(double progress, const std::vector<std::shared_ptr<chan::Channel>>& tx)>
      on_progress;
  // While this returns true the receiver stops dequeuing (backpressure tests).
  std::function<bool()> rx_hold;
  bool destroy_after = true;  // destroy both ends' channels when done
  // Hash every payload byte on both sides (on by default). Off only for benchmarks that compare
  // against loops that never touch the data; stream offsets are checked either way.
  bool verify = true;
};

struct ChannelResult {
  uint64_t bytes_sent = 0, bytes_received = 0, segments = 0;
  uint64_t tx_hash = 0, rx_hash = 0;
  bool in_order = true;  // every segment's stream offset followed the previous one
  chan::ChannelStats tx_stats, rx_stats;
};

struct TransferResult {
  std::vector<ChannelResult> channels;
  double seconds = 0;
  bool complete = false;  // every byte arrived before the deadline
  bool intact = false;    // complete, in order, and hashes equal on every channel
  uint64_t bytes = 0, segments = 0;
  double gbps() const { return seconds > 0 ? bytes * 8 / seconds / 1e9 : 0; }
  double mpps() const { return seconds > 0 ? segments / seconds / 1e6 : 0; }
  std::string error;
};

// Opens `channels` channels from `tx` to `rx`, sends `bytes` of generated data split over them
// (one sender thread and one receiver thread per channel) and checks every byte.
absl::StatusOr<TransferResult> RunTransfer(chan::Driver& tx, chan::Driver& rx,
                                           const TransferOptions& opts);

// Waits until every UMEM frame of the driver is back in its pool or fill rings (true) or the
// timeout passes (false).
bool WaitFramesReturned(chan::Driver& d, absl::Duration timeout);

}  // namespace netch::tools
