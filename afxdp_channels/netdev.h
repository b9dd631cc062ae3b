// netdev.h - what the AF_XDP driver learns from the kernel about an interface and its neighbours.
//
// Nothing about addresses is configured by hand: our MAC, MTU, IPv4 address and queue count come
// from the interface, the peer's MAC from the kernel's neighbour table (ARP resolution is
// triggered when the entry is missing). Calls act in the calling thread's network namespace.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "bpf/wire.h"

namespace netch::afxdp {

struct InterfaceInfo {
  std::string name;
  int ifindex = 0;
  wire::MacAddr mac{};
  uint32_t mtu = 0;
  uint32_t ipv4 = 0;  // host order; 0 if the interface has none
  uint32_t rx_queues = 0;
  uint32_t tx_queues = 0;
};

absl::StatusOr<InterfaceInfo> GetInterfaceInfo(const std::string& ifname);

// The MAC of `ip` (host order) on `ifname`, from the neighbour table. If there is no complete
// entry, provokes resolution with one empty UDP datagram to the discard port and waits up to
// `timeout` for the entry to become complete.
absl::StatusOr<wire::MacAddr> ResolveNeighbor(const std::string& ifname, uint32_t ip,
                                              absl::Duration timeout = absl::Seconds(1));

// One look, without waiting: the MAC of `ip` if its entry is complete, nullopt if not (yet).
// `fd` is a datagram socket, which names the namespace (any thread may call this). With
// `provoke`, a missing or incomplete entry gets the empty datagram that makes the kernel resolve
// it. For a caller that must not block, e.g. an engine opening a channel.
absl::StatusOr<std::optional<wire::MacAddr>> LookupNeighbor(int fd, const std::string& ifname,
                                                            uint32_t ip, bool provoke);

}  // namespace netch::afxdp
