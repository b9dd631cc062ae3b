// tcp_driver.h - the kernel-TCP NetDriver: one channel = one kernel TCP connection carrying
// NetChannel segments, as the paper's implementation did. It is the fallback where AF_XDP is not
// available and the proof that the Channel API does not leak AF_XDP. Use it through channel.h:
// CreateDriver("tcp", opts).
//
// Stream format (bpf/netch_wire.h, struct nc_tcp_hello): a 32-byte hello from each side (the
// responder's echoes the initiator's token; both carry their stack incarnation), then records of
// [be32 length][NetChannel header + payload]; length 0 is the goodbye. A record that does not
// parse resets the connection: the channel fails rather than deliver a corrupt stream.
//
// Lifecycle: an accepted connection holds no buffers until its hello arrives (at most 256 wait,
// 16 per peer address, each for DriverOptions::dead_peer_timeout); only then is it a channel and
// handed to Accept(). A hello with a new incarnation from a known address fails that address's
// older channels (the peer restarted). Slots are allocated 16 at a time as a channel needs them.
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "afxdp_channels/channel.h"

namespace netch::chan {

absl::StatusOr<std::unique_ptr<Driver>> CreateTcpDriver(const DriverOptions& opts);

}  // namespace netch::chan
