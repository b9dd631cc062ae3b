// peer_process.h - a test's peer in a child process, so that the test can kill it (SIGKILL) the
// way a crashed application dies. Fork before the test process starts any thread.
#pragma once

#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <functional>

namespace netch::testing {

// Forks; the child runs body(ready) and exits. The child calls ready() once it serves; ForkPeer
// returns the child's pid after that, or -1 if the child failed before calling it.
inline pid_t ForkPeer(const std::function<void(const std::function<void()>& ready)>& body) {
  int p[2];
  if (pipe(p) != 0) return -1;
  const pid_t child = fork();
  if (child < 0) return -1;
  if (child == 0) {
    close(p[0]);
    body([&] { (void)!write(p[1], "r", 1); });
    _exit(0);
  }
  close(p[1]);
  char c;
  const bool ok = read(p[0], &c, 1) == 1;
  close(p[0]);
  if (!ok) {
    waitpid(child, nullptr, 0);
    return -1;
  }
  return child;
}

inline void KillPeer(pid_t pid) {
  kill(pid, SIGKILL);
  waitpid(pid, nullptr, 0);
}

}  // namespace netch::testing
