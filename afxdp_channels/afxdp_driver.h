// afxdp_driver.h - the AF_XDP NetDriver: channels over UDP in AF_XDP sockets, each with the
// reliable transport of transport.h. Users go through channel.h (CreateDriver("afxdp", opts));
// this header exists for the registry and for tests that need the driver's internals.
//
// Layout: one XskQueue per interface queue (a UMEM of its own, one XSK bound to the queue, the
// channels bound to that queue); engines run queues. A channel lives on one queue for its life;
// moving a channel between engines moves its queue (docs/ARCHITECTURE.md says why).
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "afxdp_channels/channel.h"

namespace netch::chan {

absl::StatusOr<std::unique_ptr<Driver>> CreateAfxdpDriver(const DriverOptions& opts);

// Layout of a TX buffer: the driver's headers (Ethernet, IPv4, UDP, channel header with up to
// four SACK blocks: at most 106 bytes) end where the NetChannel header starts.
inline constexpr uint32_t kAfxdpHeadroom = 128;

}  // namespace netch::chan
