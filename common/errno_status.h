// errno_status.h - turn a failed system or libbpf call into an absl::Status that says what failed.
#pragma once

#include <cstring>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace netch {

// `err` may be an errno value or a negative libbpf return code.
inline absl::Status ErrnoStatus(int err, const std::string& what) {
  err = err < 0 ? -err : err;
  return absl::ErrnoToStatus(err, absl::StrCat(what, ": ", std::strerror(err)));
}

}  // namespace netch
