#include "common/netns.h"

#include <fcntl.h>
#include <sched.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/errno_status.h"

namespace netch {

NetnsScope::NetnsScope(const std::string& name) {
  saved_fd_ = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
  if (saved_fd_ < 0) {
    status_ = ErrnoStatus(errno, "open /proc/thread-self/ns/net");
    return;
  }
  std::string path = "/run/netns/" + name;
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    status_ = ErrnoStatus(errno, absl::StrCat("open ", path));
    return;
  }
  if (setns(fd, CLONE_NEWNET) != 0) status_ = ErrnoStatus(errno, "setns " + name);
  close(fd);
}

NetnsScope::~NetnsScope() {
  if (saved_fd_ < 0) return;
  if (status_.ok() && setns(saved_fd_, CLONE_NEWNET) != 0) {
    // A thread stuck in a test namespace would silently poison every later test on it.
    std::fprintf(stderr, "NetnsScope: cannot return to the original namespace: %s\n",
                 strerrordesc_np(errno));
    std::abort();
  }
  close(saved_fd_);
}

}  // namespace netch
