// registry.h - factories by name (drivers, NetScheduler policies): built-ins given at
// construction — not by static initializers, which a static library drops with the object files
// nobody references — plus whatever the program registers later. Thread-safe.
#pragma once

#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace netch {

template <typename Factory>
class NamedRegistry {
 public:
  // `kind` names the entries in errors ("driver", "policy").
  NamedRegistry(std::string kind, std::map<std::string, Factory> builtin)
      : kind_(std::move(kind)), factories_(std::move(builtin)) {}

  absl::Status Register(const std::string& name, Factory f) {
    if (name.empty() || !f)
      return absl::InvalidArgumentError(kind_ + " needs a name and a factory");
    std::lock_guard g(mu_);
    if (!factories_.emplace(name, std::move(f)).second)
      return absl::AlreadyExistsError(
          absl::StrFormat("%s '%s' is already registered", kind_, name));
    return absl::OkStatus();
  }
  // The factory for `name`; an unknown name is NotFound, listing the known ones.
  absl::StatusOr<Factory> Find(const std::string& name) const {
    std::lock_guard g(mu_);
    auto it = factories_.find(name);
    if (it == factories_.end())
      return absl::NotFoundError(absl::StrFormat("unknown %s '%s' (known: %s)", kind_, name,
                                                 absl::StrJoin(NamesLocked(), ", ")));
    return it->second;
  }
  std::vector<std::string> Names() const {
    std::lock_guard g(mu_);
    return NamesLocked();
  }

 private:
  std::vector<std::string> NamesLocked() const {
    std::vector<std::string> out;
    for (const auto& [n, f] : factories_) out.push_back(n);
    return out;
  }
  const std::string kind_;
  mutable std::mutex mu_;
  std::map<std::string, Factory> factories_;  // guarded by mu_
};

}  // namespace netch
