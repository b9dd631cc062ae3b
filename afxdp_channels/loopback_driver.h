// loopback_driver.h - in-process channels between drivers of one process ("loopback"): no
// network, no privileges. For unit tests of the layers above the Channel API, and the smallest
// example of a driver. Use through channel.h: CreateDriver("loopback", {.loopback_ipv4 = ...}).
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "afxdp_channels/channel.h"

namespace netch::chan {

absl::StatusOr<std::unique_ptr<Driver>> CreateLoopbackDriver(const DriverOptions& opts);

}  // namespace netch::chan
