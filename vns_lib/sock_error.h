// sock_error.h - the errno-carrying status VNS returns (VNS-internal; users read it with Errno()).
#pragma once

#include <string_view>

#include "absl/status/status.h"

namespace netch::vns {

absl::Status SockError(int err, std::string_view what);

}  // namespace netch::vns
