// errno_status.h - turn a failed system or libbpf call into an absl::Status that says what failed.
#pragma once

#include <cerrno>
#include <cstring>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/cord.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace netch {

// Where the errno travels inside a status: a status code alone cannot tell ENETUNREACH from
// EHOSTUNREACH, and a socket call must return the exact one.
inline constexpr char kErrnoPayload[] = "netch.errno";

// `err` may be an errno value or a negative libbpf return code.
inline absl::Status ErrnoStatus(int err, const std::string& what) {
  err = err < 0 ? -err : err;
  // strerror() may share a buffer between threads (and absl::ErrnoToStatus calls it):
  // strerrordesc_np returns a constant string.
  const char* desc = strerrordesc_np(err);
  absl::Status s(absl::ErrnoToStatusCode(err),
                 absl::StrCat(what, ": ", desc ? desc : "unknown error"));
  s.SetPayload(kErrnoPayload, absl::Cord(std::to_string(err)));
  return s;
}

// The errno an ErrnoStatus carries: 0 for OK, `otherwise` for a status without one (validation
// errors and the like).
inline int StatusErrno(const absl::Status& s, int otherwise = EIO) {
  if (s.ok()) return 0;
  if (auto p = s.GetPayload(kErrnoPayload)) {
    int e = 0;
    if (absl::SimpleAtoi(std::string(*p), &e)) return e;
  }
  return otherwise;
}

}  // namespace netch
