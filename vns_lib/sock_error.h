// sock_error.h - the errno-carrying status VNS returns (VNS-internal; users read it with Errno()).
#pragma once

#include <string_view>

#include "absl/status/status.h"
#include "afxdp_channels/channel.h"

namespace netch::vns {

absl::Status SockError(int err, std::string_view what);
// The same, "what (why)" when a channel's failure says why (kNone: `what` alone).
absl::Status SockError(int err, std::string_view what, chan::FailCause why);

}  // namespace netch::vns
