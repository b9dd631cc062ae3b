// ipv4.h - dotted-quad text of a host-order IPv4 address (for logs, tables and metric labels).
#pragma once

#include <cstdint>
#include <string>

#include "absl/strings/str_cat.h"

namespace netch {

inline std::string Ipv4String(uint32_t host_order) {
  return absl::StrCat(host_order >> 24, ".", (host_order >> 16) & 255, ".", (host_order >> 8) & 255,
                      ".", host_order & 255);
}

}  // namespace netch
