#include "afxdp_channels/netdev.h"

#include <arpa/inet.h>
#include <libmnl/libmnl.h>
#include <linux/ethtool.h>
#include <linux/rtnetlink.h>
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
#include "common/ipv4.h"
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

struct RouteReply {
  uint8_t type = RTN_UNSPEC;
  int oif = 0;
  uint32_t gateway = 0;  // network order
};

int OnRouteAttr(const nlattr* a, void* data) {
  auto* r = static_cast<RouteReply*>(data);
  switch (mnl_attr_get_type(a)) {
    case RTA_OIF:
      if (mnl_attr_validate(a, MNL_TYPE_U32) >= 0) r->oif = static_cast<int>(mnl_attr_get_u32(a));
      break;
    case RTA_GATEWAY:
      if (mnl_attr_validate(a, MNL_TYPE_U32) >= 0) r->gateway = mnl_attr_get_u32(a);
      break;
    default:
      break;
  }
  return MNL_CB_OK;
}

int OnRoute(const nlmsghdr* nlh, void* data) {
  if (nlh->nlmsg_type != RTM_NEWROUTE || mnl_nlmsg_get_payload_len(nlh) < sizeof(rtmsg))
    return MNL_CB_OK;
  const auto* rtm = static_cast<const rtmsg*>(mnl_nlmsg_get_payload(nlh));
  static_cast<RouteReply*>(data)->type = rtm->rtm_type;
  return mnl_attr_parse(nlh, sizeof(rtmsg), OnRouteAttr, data);
}

}  // namespace

absl::StatusOr<std::unique_ptr<RouteTable>> RouteTable::Open() {
  mnl_socket* nl = mnl_socket_open2(NETLINK_ROUTE, SOCK_CLOEXEC);
  if (!nl) return ErrnoStatus(errno, "rtnetlink socket");
  if (mnl_socket_bind(nl, 0, MNL_SOCKET_AUTOPID) < 0) {
    const int err = errno;
    mnl_socket_close(nl);
    return ErrnoStatus(err, "rtnetlink bind");
  }
  return std::unique_ptr<RouteTable>(new RouteTable(nl));
}

RouteTable::~RouteTable() { mnl_socket_close(nl_); }

absl::StatusOr<NextHop> RouteTable::Get(uint32_t ip) {
  alignas(nlmsghdr) char buf[8192];
  std::lock_guard l(mu_);
  nlmsghdr* nlh = mnl_nlmsg_put_header(buf);
  nlh->nlmsg_type = RTM_GETROUTE;
  nlh->nlmsg_flags = NLM_F_REQUEST;
  nlh->nlmsg_seq = ++seq_;
  auto* rtm = static_cast<rtmsg*>(mnl_nlmsg_put_extra_header(nlh, sizeof(rtmsg)));
  rtm->rtm_family = AF_INET;
  rtm->rtm_dst_len = 32;
  mnl_attr_put_u32(nlh, RTA_DST, htonl(ip));
  if (mnl_socket_sendto(nl_, nlh, nlh->nlmsg_len) < 0) return ErrnoStatus(errno, "RTM_GETROUTE");
  RouteReply r;
  const unsigned portid = mnl_socket_get_portid(nl_);
  for (;;) {
    const ssize_t n = mnl_socket_recvfrom(nl_, buf, sizeof(buf));
    if (n < 0) return ErrnoStatus(errno, "RTM_GETROUTE reply");
    // An error reply (no route) comes back as MNL_CB_ERROR with errno set; replies to an older
    // request (a lookup that failed before reading its answer) fail the sequence check: skip.
    // Anything else answered this request: a reply without a route falls to ENETUNREACH below
    // rather than waiting for a message that will not come.
    const int rc = mnl_cb_run(buf, static_cast<size_t>(n), seq_, portid, OnRoute, &r);
    if (rc == MNL_CB_ERROR && errno == EPROTO) continue;
    if (rc == MNL_CB_ERROR) return ErrnoStatus(errno, absl::StrCat("route to ", Ipv4String(ip)));
    break;
  }
  switch (r.type) {
    case RTN_UNICAST:
      return NextHop{r.oif, ntohl(r.gateway)};
    case RTN_LOCAL:
    case RTN_BROADCAST:
    case RTN_MULTICAST:
      return ErrnoStatus(EADDRNOTAVAIL,
                         absl::StrCat(Ipv4String(ip), " is no peer's unicast address"));
    case RTN_UNREACHABLE:
    case RTN_PROHIBIT:
    case RTN_BLACKHOLE:
      return ErrnoStatus(EHOSTUNREACH, absl::StrCat("route to ", Ipv4String(ip)));
    default:
      return ErrnoStatus(ENETUNREACH, absl::StrCat("route to ", Ipv4String(ip)));
  }
}

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
          absl::StrFormat("no neighbour entry for %s on %s", Ipv4String(ip), ifname));
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

}  // namespace netch::afxdp
