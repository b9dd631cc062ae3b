// controller.h - the control plane: owns the XDP steering program of one stack instance, pins
// its maps, serves netchctl over a local control socket and Prometheus metrics over HTTP.
//
//   auto ctl = Controller::Start({.instance = "default", .ifname = "nc-b"});   // before the stack
//   StackOptions so; so.driver_opts.steer = ctl->steer(); auto stack = Stack::Create(so);
//   ctl->Serve(stack.get());          // control socket + metrics; stop before the stack goes
//
// What it promises:
// * Attach in native mode; generic mode only as a fallback with a warning (and only when allowed);
//   refuse with FailedPrecondition when another program owns the interface, unless `replace`.
// * Instances are per network namespace (the namespace's inode number scopes the pin directory
//   and the pid file, the control socket is abstract).
// * Maps and program pinned under <bpffs>/netch/net<ino>/<instance>/ (bpffs mounted when absent),
// unpinned
//   and detached on exit. A crashed instance leaves its pid file, pins and program behind: the
//   next Start with the same instance detects them, detaches the stale program if it is still
//   attached, removes the pins, and says so in status() (`recovered`). A live instance with the
//   same name is an error.
// * The control socket is an abstract unix socket "@netch/<instance>": per network namespace
//   (netchctl finds the stack of its own namespace), only root or the stack's own user may talk
//   to it (SO_PEERCRED).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "bpf/steer_program.h"
#include "common/unique_fd.h"

namespace netch::vns {
class Stack;
}

namespace netch::ctl {

struct ControllerOptions {
  std::string instance = "default";  // [A-Za-z0-9_.-]{1,40}
  std::string ifname;
  bool replace = false;       // take over an interface where another XDP program is attached
  bool allow_generic = true;  // fall back to generic (skb) mode when native attach fails
  uint16_t udp_port = NC_DEFAULT_UDP_PORT;
  std::string bpffs = "/sys/fs/bpf";
  std::string run_dir = "/run/netch";              // pid files of running instances
  std::string metrics_address = "127.0.0.1:9464";  // "" = no exposer
  // Long-running programs: SIGINT, SIGTERM and SIGHUP detach the program, remove the pins and
  // the pid file, then exit (status 128 + signal). Start() must then run before any other
  // thread starts, so that every thread inherits the blocked signals.
  bool exit_on_signal = false;
  // How long Start waits for the instance's name while another process holds it: a predecessor
  // of the same name still exiting (a restarted service) lets go once it is gone; past this the
  // name is taken and Start fails with AlreadyExists.
  absl::Duration name_wait = absl::Seconds(2);
};

struct ControllerStatus {
  std::string instance, ifname, attach_mode, pin_dir, metrics_address;
  std::string recovered;              // what a crashed predecessor left and what was done about it
  std::vector<std::string> warnings;  // generic-mode fallback, busy metrics port, ...
  int pid = 0;
};

class ControlServer;
class MetricsExposer;

class Controller {
 public:
  static absl::StatusOr<std::unique_ptr<Controller>> Start(const ControllerOptions& o);
  ~Controller();  // stops serving, detaches, unpins
  Controller(const Controller&) = delete;
  Controller& operator=(const Controller&) = delete;

  bpf::SteerProgram* steer() { return steer_.get(); }
  // Starts the control socket and the metrics exposer for `stack` (which must outlive Stop()).
  absl::Status Serve(vns::Stack* stack);
  void Stop();  // stops both; idempotent
  // For a process about to exit whose stack lives on until it is gone (the preload's exit):
  // stops serving, detaches and unpins like the destructor, but keeps the instance's name
  // locked — the kernel drops the lock with the process, after its AF_XDP sockets. An instance
  // started under the same name meanwhile waits for that, instead of taking the name while
  // this process still holds the interface's queues (its sockets then failed EBUSY).
  void DetachForExit();
  ControllerStatus status() const;

  // The abstract socket name of an instance (without the leading NUL).
  static std::string SocketName(const std::string& instance);

 private:
  explicit Controller(const ControllerOptions& o);
  absl::Status Init();
  absl::Status RecoverStale();
  // Takes the instance lock (flock on <run_dir>/<instance>.lock), held for the instance's life.
  // The kernel drops it when the holder dies, even by SIGKILL, before the process is fully gone:
  // a restarted instance waits for that instead of trusting whether the old pid still exists.
  absl::Status Lock(const std::string& path);
  // What the destructor and the signal handler share: detach, unpin, unlink; with
  // `keep_name`, everything but the lock (DetachForExit).
  void Cleanup(bool keep_name = false);
  void WatchSignals();

  ControllerOptions opts_;
  std::unique_ptr<bpf::SteerProgram> steer_;
  ControllerStatus status_;
  std::string pin_dir_, pid_file_, lock_file_;
  UniqueFd lock_fd_;
  std::unique_ptr<ControlServer> server_;
  std::unique_ptr<MetricsExposer> metrics_;
};

}  // namespace netch::ctl
