// control.h - the local control socket between a running stack and netchctl (internal to ctl/).
//
// Protocol: the client sends its arguments as one line, separated by tabs; the server answers
// one JSON object and closes: {"ok":true,"data":...} or {"ok":false,"error":"..."}. The socket is
// abstract ("@netch/<instance>"), so it lives in the stack's network namespace, and only root or
// the stack's own user may use it (checked with SO_PEERCRED).
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"

namespace netch::vns {
class Stack;
}

namespace netch::ctl {

class Controller;

class ControlServer {
 public:
  static absl::StatusOr<std::unique_ptr<ControlServer>> Start(const std::string& name,
                                                              vns::Stack* stack, Controller* c);
  ~ControlServer();

  // Runs one request (exposed for tests): returns the JSON answer.
  std::string Handle(const std::vector<std::string>& args);

 private:
  ControlServer(vns::Stack* s, Controller* c) : stack_(s), ctl_(c) {}
  void Loop();

  vns::Stack* stack_;
  Controller* ctl_;
  int fd_ = -1;
  int wake_fd_ = -1;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

// Client side: sends `args` to the instance's socket; returns the JSON answer.
absl::StatusOr<std::string> Request(const std::string& instance,
                                    const std::vector<std::string>& args);
// Instances whose control sockets exist in this network namespace (from /proc/net/unix).
std::vector<std::string> ListInstances();

}  // namespace netch::ctl
