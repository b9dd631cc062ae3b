// Test helper for code that runs on chan::Engine threads.
#pragma once

#include <chrono>
#include <thread>

#include "afxdp_channels/engine.h"

namespace netch::chan {

// Waits until the engine has gone to sleep (it does at once with nothing to do and no spin).
inline void AwaitSleep(const Engine& e) {
  for (int i = 0; i < 10000 && !e.sleeping(); ++i)
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  std::this_thread::sleep_for(std::chrono::milliseconds(1));  // and is inside its epoll_pwait2()
}

}  // namespace netch::chan
