#include "common/affinity.h"

#include <sched.h>
#include <unistd.h>

#include "absl/strings/str_format.h"
#include "common/errno_status.h"

namespace netch {

absl::Status PinThread(pthread_t thread, int core) {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (core >= 0) {
    CPU_SET(core, &set);
  } else if (sched_getaffinity(getpid(), sizeof(set), &set) != 0) {
    for (int c = 0; c < CPU_SETSIZE; ++c) CPU_SET(c, &set);
  }
  if (int err = pthread_setaffinity_np(thread, sizeof(set), &set))
    return ErrnoStatus(err, absl::StrFormat("pin a thread to core %d", core));
  return absl::OkStatus();
}

}  // namespace netch
