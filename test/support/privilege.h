// privilege.h - privileged tests run for real in CI: a missing privilege is a failure there and a
// skip only on a developer's unprivileged machine.
#pragma once

#include <unistd.h>

#include <cstdlib>
#include <cstring>

#include "gtest/gtest.h"

namespace netch::testing {

inline bool InCi() {
  const char* ci = std::getenv("CI");
  return ci && (std::strcmp(ci, "true") == 0 || std::strcmp(ci, "1") == 0);
}

}  // namespace netch::testing

// Use at the top of a test (or SetUp) that needs root: BPF, XDP, AF_XDP, network namespaces.
#define NETCH_REQUIRE_ROOT()                                                                     \
  do {                                                                                           \
    if (geteuid() != 0) {                                                                        \
      if (::netch::testing::InCi()) FAIL() << "privileged test cannot run as non-root under CI"; \
      GTEST_SKIP() << "needs root (BPF, XDP, netns)";                                            \
    }                                                                                            \
  } while (0)
