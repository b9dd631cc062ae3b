// affinity.h - place a thread on a core: engines, copy workers and the benchmarks' own threads.
#pragma once

#include <pthread.h>

#include "absl/status/status.h"

namespace netch {

// Pins `thread` to `core`; with core < 0, lets it run on every core this process may use again.
absl::Status PinThread(pthread_t thread, int core);

}  // namespace netch
