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
  // strerror() may share a buffer between threads (and absl::ErrnoToStatus calls it):
  // strerrordesc_np returns a constant string.
  const char* desc = strerrordesc_np(err);
  return absl::Status(absl::ErrnoToStatusCode(err),
                      absl::StrCat(what, ": ", desc ? desc : "unknown error"));
}

}  // namespace netch
