// netns.h - run the calling thread inside a named network namespace (/run/netns/NAME).
//
// setns(CLONE_NEWNET) affects only the calling thread, so one test process can drive both test
// hosts from two threads. Sockets, XDP attachments and interface lookups made while inside belong
// to that namespace and keep working after the thread leaves it.
#pragma once

#include <string>

#include "absl/status/status.h"

namespace netch {

class NetnsScope {
 public:
  // Enters `name`; check ok() (or status()) before relying on it.
  explicit NetnsScope(const std::string& name);
  ~NetnsScope();  // returns the thread to the namespace it came from
  NetnsScope(const NetnsScope&) = delete;
  NetnsScope& operator=(const NetnsScope&) = delete;

  bool ok() const { return status_.ok(); }
  const absl::Status& status() const { return status_; }

 private:
  int saved_fd_ = -1;
  absl::Status status_;
};

}  // namespace netch
