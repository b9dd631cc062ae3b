#include "common/registry.h"

#include "afxdp_channels/afxdp_driver.h"
#include "afxdp_channels/channel.h"
#include "afxdp_channels/loopback_driver.h"
#include "afxdp_channels/tcp_driver.h"

namespace netch::chan {
namespace {

NamedRegistry<DriverFactory>& Reg() {
  static auto* r = new NamedRegistry<DriverFactory>(
      "driver",
      {{"afxdp", CreateAfxdpDriver}, {"tcp", CreateTcpDriver}, {"loopback", CreateLoopbackDriver}});
  return *r;
}

}  // namespace

absl::Status RegisterDriver(const std::string& name, DriverFactory factory) {
  return Reg().Register(name, std::move(factory));
}

absl::StatusOr<std::unique_ptr<Driver>> CreateDriver(const std::string& name,
                                                     const DriverOptions& opts) {
  auto f = Reg().Find(name);
  if (!f.ok()) return f.status();
  return (*f)(opts);
}

std::vector<std::string> DriverNames() { return Reg().Names(); }

}  // namespace netch::chan
