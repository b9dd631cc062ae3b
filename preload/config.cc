// config.cc - NETCH_* variables and the routing decision (preload.h).
#include <arpa/inet.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netinet/in.h>

#include <algorithm>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "preload/preload.h"

namespace netch::preload {
namespace {

absl::Status Bad(const char* var, const std::string& v, const char* want) {
  return absl::InvalidArgumentError(absl::StrFormat("%s=\"%s\": %s", var, v, want));
}

absl::Status ReadInt(const char* (*env)(const char*), const char* var, int lo, int hi, int* out) {
  const char* v = env(var);
  if (v == nullptr || *v == '\0') return absl::OkStatus();
  int n = 0;
  if (!absl::SimpleAtoi(v, &n) || n < lo || n > hi)
    return Bad(var, v, absl::StrFormat("want an integer in [%d, %d]", lo, hi).c_str());
  *out = n;
  return absl::OkStatus();
}

// A 0/1 variable; *out (the default) stays when it is unset.
absl::Status ReadFlag(const char* (*env)(const char*), const char* var, bool* out) {
  int n = *out ? 1 : 0;
  if (auto st = ReadInt(env, var, 0, 1, &n); !st.ok()) return st;
  *out = n == 1;
  return absl::OkStatus();
}

// A comma-separated list of integers in [lo, hi]; *out stays empty when the variable is unset.
absl::Status ReadIntList(const char* (*env)(const char*), const char* var, int lo, int hi,
                         const char* want, std::vector<int>* out) {
  const char* v = env(var);
  if (v == nullptr || *v == '\0') return absl::OkStatus();
  for (absl::string_view p : absl::StrSplit(v, ',', absl::SkipEmpty())) {
    int n = 0;
    if (!absl::SimpleAtoi(p, &n) || n < lo || n > hi) return Bad(var, v, want);
    out->push_back(n);
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<Config> Config::FromEnv(const char* (*env)(const char*)) {
  Config c;
  auto str = [&](const char* var, std::string* out) {
    if (const char* v = env(var); v != nullptr && *v != '\0') *out = v;
  };
  str("NETCH_DEV", &c.dev);
  str("NETCH_INSTANCE", &c.instance);
  str("NETCH_DRIVER", &c.driver);
  str("NETCH_TX", &c.tx);
  str("NETCH_POLICY", &c.policy);
  if (const auto colon = c.policy.find(':'); colon != std::string::npos) {
    const std::string all = c.policy;
    c.policy = all.substr(0, colon);
    for (absl::string_view kv : absl::StrSplit(all.substr(colon + 1), ',', absl::SkipEmpty())) {
      const auto eq = kv.find('=');
      if (eq == absl::string_view::npos || eq == 0)
        return Bad("NETCH_POLICY", all, "want NAME[:key=value,...]");
      c.policy_knobs.emplace_back(std::string(kv.substr(0, eq)), std::string(kv.substr(eq + 1)));
    }
  }
  if (const char* v = env("NETCH_CLASS"); v != nullptr && *v != '\0') {
    const std::string k = v;
    if (k == "latency")
      c.app_class = 1;
    else if (k == "throughput")
      c.app_class = 2;
    else
      return Bad("NETCH_CLASS", k, "want latency or throughput");
  }
  str("NETCH_METRICS", &c.metrics);
  if (const char* v = env("NETCH_ROUTE"); v != nullptr && *v != '\0') {
    const std::string r = v;
    if (r == "iface")
      c.route = Route::kIface;
    else if (r == "all")
      c.route = Route::kAll;
    else if (r == "none")
      c.route = Route::kNone;
    else
      return Bad("NETCH_ROUTE", r, "want iface, all or none");
  }
  std::vector<int> ports;
  if (auto st =
          ReadIntList(env, "NETCH_PORTS", 1, 65535, "want comma-separated ports 1..65535", &ports);
      !st.ok())
    return st;
  c.ports.assign(ports.begin(), ports.end());
  if (auto st =
          ReadIntList(env, "NETCH_ENGINE_CORES", 0, 1023,
                      "want comma-separated core numbers 0..1023, one per engine", &c.engine_cores);
      !st.ok())
    return st;
  if (c.engine_cores.size() > 64)
    return absl::InvalidArgumentError("NETCH_ENGINE_CORES: at most 64 engines");
  if (auto st = ReadInt(env, "NETCH_ENGINES", 1, 64, &c.engines); !st.ok()) return st;
  if (auto st = ReadInt(env, "NETCH_CHANNELS", 1, 64, &c.channels); !st.ok()) return st;
  if (auto st = ReadInt(env, "NETCH_COPY_WORKERS", 0, 64, &c.copy_workers); !st.ok()) return st;
  if (auto st = ReadInt(env, "NETCH_LINGER_MS", 0, 600000, &c.linger_ms); !st.ok()) return st;
  if (auto st = ReadInt(env, "NETCH_CONNECT_TIMEOUT_MS", 1, 600000, &c.connect_timeout_ms);
      !st.ok())
    return st;
  if (auto st = ReadInt(env, "NETCH_SPIN_US", 0, 100000, &c.spin_us); !st.ok()) return st;
  if (auto st = ReadInt(env, "NETCH_LOOP_POLL_US", 0, 1000000, &c.loop_poll_us); !st.ok())
    return st;
  if (auto st = ReadInt(env, "NETCH_BUSY_POLL_US", 0, 1000000, &c.busy_poll_us); !st.ok())
    return st;
  for (auto [var, out] : {std::pair{"NETCH_DELIVER_INLINE", &c.deliver_inline},
                          {"NETCH_TRANSMIT_INLINE", &c.transmit_inline},
                          {"NETCH_RECEIVE_INLINE", &c.receive_inline},
                          {"NETCH_DEFER_TRANSMIT", &c.defer_transmit},
                          {"NETCH_REPLACE_XDP", &c.replace_xdp},
                          {"NETCH_VERBOSE", &c.verbose}})
    if (auto st = ReadFlag(env, var, out); !st.ok()) return st;
  if (c.driver != "afxdp" && c.driver != "tcp") return Bad("NETCH_DRIVER", c.driver, "afxdp|tcp");
  if (c.tx != "auto" && c.tx != "afxdp" && c.tx != "udp")
    return Bad("NETCH_TX", c.tx, "auto|afxdp|udp");
  if (c.route == Route::kNone) return c;

  // The interface: named, or the only non-loopback one with an IPv4 address.
  ifaddrs* ifa = nullptr;
  if (getifaddrs(&ifa) != 0) return absl::InternalError("getifaddrs failed");
  std::vector<std::string> seen;
  for (ifaddrs* i = ifa; i != nullptr; i = i->ifa_next) {
    if (i->ifa_addr == nullptr || i->ifa_addr->sa_family != AF_INET) continue;
    if (i->ifa_flags & IFF_LOOPBACK) continue;
    if (!c.dev.empty() && c.dev != i->ifa_name) continue;
    if (c.local_ip == 0) {
      c.local_ip = ntohl(reinterpret_cast<sockaddr_in*>(i->ifa_addr)->sin_addr.s_addr);
      c.netmask = i->ifa_netmask
                      ? ntohl(reinterpret_cast<sockaddr_in*>(i->ifa_netmask)->sin_addr.s_addr)
                      : 0xffffffffu;
      if (c.dev.empty()) c.dev = i->ifa_name;
    }
    if (std::find(seen.begin(), seen.end(), i->ifa_name) == seen.end()) seen.push_back(i->ifa_name);
  }
  freeifaddrs(ifa);
  if (c.local_ip == 0)
    return c.dev.empty()
               ? absl::FailedPreconditionError("no interface with an IPv4 address: set NETCH_DEV")
               : absl::FailedPreconditionError(
                     absl::StrFormat("NETCH_DEV=%s has no IPv4 address", c.dev));
  if (env("NETCH_DEV") == nullptr && seen.size() > 1)
    return absl::FailedPreconditionError(absl::StrFormat(
        "%d interfaces have IPv4 addresses: set NETCH_DEV (netchrun --dev)", seen.size()));
  c.ifindex = static_cast<int>(if_nametoindex(c.dev.c_str()));
  return c;
}

bool Config::RoutesPeer(uint32_t ip, uint16_t port) const {
  if (route == Route::kNone || (ip >> 24) == 127 || ip == 0) return false;
  if (!ports.empty() && std::find(ports.begin(), ports.end(), port) == ports.end()) return false;
  if (route == Route::kAll) return true;
  if ((ip & netmask) == (local_ip & netmask)) return ip != local_ip;
  // Another subnet: ours when its route leaves through the interface (a gateway on our link,
  // which the driver resolves); a route through another interface stays on the kernel.
  return route_oif != nullptr && ifindex != 0 && route_oif(ip) == ifindex;
}

bool Config::RoutesListen(uint32_t ip, uint16_t port) const {
  if (route == Route::kNone || port == 0) return false;
  if (!ports.empty() && std::find(ports.begin(), ports.end(), port) == ports.end()) return false;
  return ip == 0 || ip == local_ip;
}

uint32_t NextLoopPollWindow(uint32_t window_us, uint32_t max_us, uint64_t waited_us, bool got,
                            bool slept) {
  window_us = std::min(window_us, max_us);
  if (got && !slept) return window_us;
  if (got && waited_us <= max_us)
    return std::min(max_us, std::max(2 * window_us, kLoopPollGrowStartUs));
  return window_us / 2 < kLoopPollGrowStartUs ? 0 : window_us / 2;
}

uint32_t NextLoopAwayUs(uint32_t away_us, uint64_t last_us) {
  return static_cast<uint32_t>(
      std::max<uint64_t>(std::min<uint64_t>(last_us, UINT32_MAX), away_us - away_us / 8));
}

}  // namespace netch::preload
