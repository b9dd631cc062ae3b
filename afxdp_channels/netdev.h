// netdev.h - what the AF_XDP driver learns from the kernel about an interface and its neighbours.
//
// Nothing about addresses is configured by hand: our MAC, MTU, IPv4 address and queue count come
// from the interface, the next hop towards a peer from the kernel's routing table (the peer
// itself on the link, or its gateway), the next hop's MAC from the kernel's neighbour table (ARP
// resolution is triggered when the entry is missing). Calls act in the calling thread's network
// namespace.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "bpf/wire.h"

struct mnl_socket;  // libmnl

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

// The kernel's route to one address: where its packets leave and which host on that link takes
// them.
struct NextHop {
  int oif = 0;           // output interface index
  uint32_t gateway = 0;  // host order; 0: the address is on the link itself
  uint32_t via(uint32_t dst) const { return gateway ? gateway : dst; }
};

// Route lookups as `ip route get` makes them (RTM_GETROUTE: policy rules, tables, the longest
// prefix), over one rtnetlink socket opened in the namespace of the thread that calls Open();
// Get() may then be called from any thread (lookups take a mutex: connects, not packets, ask).
class RouteTable {
 public:
  static absl::StatusOr<std::unique_ptr<RouteTable>> Open();
  ~RouteTable();
  RouteTable(const RouteTable&) = delete;
  RouteTable& operator=(const RouteTable&) = delete;

  // The next hop towards `ip` (host order). Fails with the kernel's answer as an errno status
  // (ENETUNREACH: no route; EHOSTUNREACH: an unreachable or prohibit route); an address of this
  // host (a local or broadcast route) fails EADDRNOTAVAIL: no peer is there.
  absl::StatusOr<NextHop> Get(uint32_t ip);

 private:
  explicit RouteTable(::mnl_socket* nl) : nl_(nl) {}
  std::mutex mu_;
  ::mnl_socket* nl_;
  uint32_t seq_ = 0;
};

}  // namespace netch::afxdp
