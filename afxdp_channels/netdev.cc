#include "afxdp_channels/netdev.h"

#include <arpa/inet.h>
#include <linux/ethtool.h>
#include <linux/sockios.h>
#include <net/if.h>
#include <net/if_arp.h>
#include <netinet/in.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/errno_status.h"
#include "common/unique_fd.h"

namespace netch::afxdp {
namespace {

// Queue counts through ethtool: /sys/class/net would show the namespace sysfs was mounted in,
// not the one this thread is in.
void ReadQueueCounts(int sock, const std::string& ifname, InterfaceInfo* info) {
  ethtool_channels ch{};
  ch.cmd = ETHTOOL_GCHANNELS;
  ifreq ifr{};
  std::strncpy(ifr.ifr_name, ifname.c_str(), IFNAMSIZ - 1);
  ifr.ifr_data = reinterpret_cast<char*>(&ch);
  if (ioctl(sock, SIOCETHTOOL, &ifr) == 0) {
    info->rx_queues = ch.rx_count + ch.combined_count;
    info->tx_queues = ch.tx_count + ch.combined_count;
  } else {
    info->rx_queues = info->tx_queues = 1;  // no ethtool channels: a single-queue device
  }
}

}  // namespace

absl::StatusOr<InterfaceInfo> GetInterfaceInfo(const std::string& ifname) {
  if (ifname.empty() || ifname.size() >= IFNAMSIZ)
    return absl::InvalidArgumentError(absl::StrCat("bad interface name '", ifname, "'"));
  InterfaceInfo info;
  info.name = ifname;
  info.ifindex = static_cast<int>(if_nametoindex(ifname.c_str()));
  if (info.ifindex == 0) return ErrnoStatus(errno, absl::StrCat("interface ", ifname));
  UniqueFd s(socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  if (s.get() < 0) return ErrnoStatus(errno, "socket");
  ifreq ifr{};
  std::strncpy(ifr.ifr_name, ifname.c_str(), IFNAMSIZ - 1);
  if (ioctl(s.get(), SIOCGIFHWADDR, &ifr)) return ErrnoStatus(errno, "SIOCGIFHWADDR " + ifname);
  std::memcpy(info.mac.data(), ifr.ifr_hwaddr.sa_data, 6);
  if (ioctl(s.get(), SIOCGIFMTU, &ifr)) return ErrnoStatus(errno, "SIOCGIFMTU " + ifname);
  info.mtu = static_cast<uint32_t>(ifr.ifr_mtu);
  if (ioctl(s.get(), SIOCGIFADDR, &ifr) == 0) {
    sockaddr_in sin;
    std::memcpy(&sin, &ifr.ifr_addr, sizeof(sin));
    info.ipv4 = ntohl(sin.sin_addr.s_addr);
  }
  ReadQueueCounts(s.get(), ifname, &info);
  return info;
}

absl::StatusOr<std::optional<wire::MacAddr>> LookupNeighbor(int fd, const std::string& ifname,
                                                            uint32_t ip, bool provoke) {
  arpreq r{};
  sockaddr_in pa{};
  pa.sin_family = AF_INET;
  pa.sin_addr.s_addr = htonl(ip);
  std::memcpy(&r.arp_pa, &pa, sizeof(pa));
  std::strncpy(r.arp_dev, ifname.c_str(), sizeof(r.arp_dev) - 1);
  if (ioctl(fd, SIOCGARP, &r) == 0) {
    if (r.arp_flags & ATF_COM) {
      wire::MacAddr mac;
      std::memcpy(mac.data(), r.arp_ha.sa_data, 6);
      return mac;
    }
    // An incomplete (or failed) entry: resolution is under way, or needs provoking again.
  } else if (errno != ENXIO) {
    return ErrnoStatus(errno, "SIOCGARP");  // ENXIO = no entry yet; anything else is real
  }
  if (provoke) {
    // An empty datagram to the discard port makes the kernel resolve the address.
    sockaddr_in dst = pa;
    dst.sin_port = htons(9);
    (void)sendto(fd, "", 0, MSG_DONTWAIT, reinterpret_cast<sockaddr*>(&dst), sizeof(dst));
  }
  return std::nullopt;
}

absl::StatusOr<wire::MacAddr> ResolveNeighbor(const std::string& ifname, uint32_t ip,
                                              absl::Duration timeout) {
  UniqueFd s(socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  if (s.get() < 0) return ErrnoStatus(errno, "socket");
  const absl::Time deadline = absl::Now() + timeout;
  for (bool first = true;; first = false) {
    auto mac = LookupNeighbor(s.get(), ifname, ip, /*provoke=*/first);
    if (!mac.ok()) return mac.status();
    if (mac->has_value()) return **mac;
    if (absl::Now() >= deadline)
      return absl::DeadlineExceededError(
          absl::StrFormat("no neighbour entry for %s on %s",
                          absl::StrCat((ip >> 24) & 255, ".", (ip >> 16) & 255, ".",
                                       (ip >> 8) & 255, ".", ip & 255),
                          ifname));
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

}  // namespace netch::afxdp
