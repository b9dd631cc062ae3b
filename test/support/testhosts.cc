#include "test/support/testhosts.h"

#include <net/if.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/netns.h"

#ifndef NETCH_SOURCE_DIR
#error "NETCH_SOURCE_DIR must point at the source tree (for scripts/testhosts)"
#endif

namespace netch::testing {
using ::netch::NetnsScope;
namespace {

std::atomic<int> g_instance{0};

absl::Status ReadLink(const std::string& ns, const char* dev, int* ifindex, wire::MacAddr* mac) {
  NetnsScope in(ns);
  if (!in.ok()) return in.status();
  *ifindex = static_cast<int>(if_nametoindex(dev));
  if (*ifindex == 0) return absl::NotFoundError(absl::StrCat(dev, " not found in ", ns));
  int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return absl::ErrnoToStatus(errno, "socket");
  ifreq ifr{};
  std::strncpy(ifr.ifr_name, dev, IFNAMSIZ - 1);
  int rc = ioctl(fd, SIOCGIFHWADDR, &ifr);
  close(fd);
  if (rc != 0) return absl::ErrnoToStatus(errno, "SIOCGIFHWADDR");
  std::memcpy(mac->data(), ifr.ifr_hwaddr.sa_data, 6);
  return absl::OkStatus();
}

}  // namespace

TestHosts::~TestHosts() { Down(); }

absl::Status TestHosts::Up(const TestHostsOptions& opts) {
  prefix_ = absl::StrCat("nct", getpid(), "-", g_instance.fetch_add(1));
  ns_a_ = prefix_ + "-a";
  ns_b_ = prefix_ + "-b";
  std::string gc = absl::StrCat(NETCH_SOURCE_DIR, "/scripts/testhosts gc >&2");
  (void)std::system(gc.c_str());  // leftovers of crashed runs; failure here is not ours to report
  std::string cmd =
      absl::StrCat(NETCH_SOURCE_DIR, "/scripts/testhosts up --prefix ", prefix_, " --queues ",
                   opts.queues, " --mtu ", opts.mtu, opts.routed ? " --routed" : "", " >/dev/null");
  routed_ = opts.routed;
  if (std::system(cmd.c_str()) != 0) return absl::InternalError("failed: " + cmd);
  up_ = true;
  if (auto s = ReadLink(ns_a_, kDevA, &ifindex_a_, &mac_a_); !s.ok()) return s;
  return ReadLink(ns_b_, kDevB, &ifindex_b_, &mac_b_);
}

void TestHosts::Down() {
  if (!up_) return;
  up_ = false;
  std::string cmd =
      absl::StrCat(NETCH_SOURCE_DIR, "/scripts/testhosts down --prefix ", prefix_, " >/dev/null");
  (void)std::system(cmd.c_str());
}

int TestHosts::RunIn(const std::string& ns, const std::string& cmd) const {
  std::string full = absl::StrCat("ip netns exec ", ns, " sh -c '", cmd, "'");
  int rc = std::system(full.c_str());
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

}  // namespace netch::testing
