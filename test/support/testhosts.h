// testhosts.h - the GoogleTest side of scripts/testhosts: two test hosts joined by a veth pair.
//
// Each TestHosts gets a prefix unique to this process and instance, so tests running concurrently
// (ctest -j) never share namespaces. The destructor tears down; `scripts/testhosts up` also cleans
// up whatever a crashed run left under the same prefix.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "bpf/wire.h"

namespace netch::testing {

struct TestHostsOptions {
  int queues = 1;
  int mtu = 1500;
  // B in another subnet behind a forwarding router namespace (scripts/testhosts --routed):
  // B's address is kIpBRouted, each host reaches the other through its gateway.
  bool routed = false;
};

// What the channel, VNS and control-plane tests run on: 4 queues (one per channel) and the
// largest MTU a veth peer takes with an XDP program attached and no multi-buffer.
inline TestHostsOptions StackHostsOptions() { return {.queues = 4, .mtu = 3506}; }

class TestHosts {
 public:
  static constexpr uint32_t kIpA = 0xC6120001;        // 198.18.0.1
  static constexpr uint32_t kIpB = 0xC6120002;        // 198.18.0.2
  static constexpr uint32_t kIpBRouted = 0xC6120102;  // 198.18.1.2, behind the router
  static constexpr uint32_t kGatewayA = 0xC61200FE;   // 198.18.0.254: A's router

  TestHosts() = default;
  ~TestHosts();
  TestHosts(const TestHosts&) = delete;
  TestHosts& operator=(const TestHosts&) = delete;

  absl::Status Up(const TestHostsOptions& opts = {});
  void Down();

  const std::string& ns_a() const { return ns_a_; }
  const std::string& ns_b() const { return ns_b_; }
  uint32_t ip_b() const { return routed_ ? kIpBRouted : kIpB; }
  static constexpr const char* kDevA = "nc-a";
  static constexpr const char* kDevB = "nc-b";
  // Valid after Up(). Interface indexes are per namespace.
  int ifindex_a() const { return ifindex_a_; }
  int ifindex_b() const { return ifindex_b_; }
  const wire::MacAddr& mac_a() const { return mac_a_; }
  const wire::MacAddr& mac_b() const { return mac_b_; }

  // Runs a shell command inside a host's namespace; returns its exit status.
  int RunIn(const std::string& ns, const std::string& cmd) const;

 private:
  std::string prefix_;
  std::string ns_a_, ns_b_;
  int ifindex_a_ = 0, ifindex_b_ = 0;
  wire::MacAddr mac_a_{}, mac_b_{};
  bool up_ = false;
  bool routed_ = false;
};

}  // namespace netch::testing
