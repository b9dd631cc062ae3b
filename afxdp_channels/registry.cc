#include <map>
#include <mutex>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "afxdp_channels/afxdp_driver.h"
#include "afxdp_channels/channel.h"
#include "afxdp_channels/loopback_driver.h"
#include "afxdp_channels/tcp_driver.h"

namespace netch::chan {
namespace {

struct Registry {
  std::mutex mu;
  std::map<std::string, DriverFactory> factories;
};

Registry& Get() {
  // Built-in drivers are registered here rather than by static initializers in their own files:
  // a static library drops object files nobody references, and their registrations with them.
  static Registry* r = [] {
    auto* reg = new Registry;
    reg->factories["afxdp"] = CreateAfxdpDriver;
    reg->factories["tcp"] = CreateTcpDriver;
    reg->factories["loopback"] = CreateLoopbackDriver;
    return reg;
  }();
  return *r;
}

}  // namespace

absl::Status RegisterDriver(const std::string& name, DriverFactory factory) {
  Registry& r = Get();
  std::lock_guard g(r.mu);
  if (name.empty() || !factory)
    return absl::InvalidArgumentError("driver needs a name and a factory");
  if (!r.factories.emplace(name, std::move(factory)).second)
    return absl::AlreadyExistsError(absl::StrFormat("driver '%s' is already registered", name));
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Driver>> CreateDriver(const std::string& name,
                                                     const DriverOptions& opts) {
  DriverFactory f;
  {
    Registry& r = Get();
    std::lock_guard g(r.mu);
    auto it = r.factories.find(name);
    if (it == r.factories.end()) {
      std::vector<std::string> names;
      for (const auto& [n, _] : r.factories) names.push_back(n);
      return absl::NotFoundError(
          absl::StrFormat("no driver '%s' (have: %s)", name, absl::StrJoin(names, ", ")));
    }
    f = it->second;
  }
  return f(opts);
}

std::vector<std::string> DriverNames() {
  Registry& r = Get();
  std::lock_guard g(r.mu);
  std::vector<std::string> names;
  for (const auto& [n, _] : r.factories) names.push_back(n);
  return names;
}

}  // namespace netch::chan
