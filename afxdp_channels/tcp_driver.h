// tcp_driver.h - the kernel-TCP NetDriver: one channel = one kernel TCP connection carrying
// NetChannel segments, as the paper's implementation did. It is the fallback where AF_XDP is not
// available and the proof that the Channel API does not leak AF_XDP. Use it through channel.h:
// CreateDriver("tcp", opts).
//
// Stream format: an 8-byte hello ("NCTCP", version, 2 zero bytes) from each side, then records
// of [be32 length][NetChannel header + payload]. A record that does not parse resets the
// connection: the channel fails rather than deliver a corrupt stream.
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "afxdp_channels/channel.h"

namespace netch::chan {

absl::StatusOr<std::unique_ptr<Driver>> CreateTcpDriver(const DriverOptions& opts);

}  // namespace netch::chan
