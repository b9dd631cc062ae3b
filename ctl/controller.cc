#include "ctl/controller.h"

#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <fcntl.h>
#include <linux/magic.h>
#include <net/if.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <fstream>
#include <regex>
#include <thread>

#include "absl/strings/str_format.h"
#include "common/errno_status.h"
#include "ctl/control.h"
#include "ctl/metrics.h"

namespace netch::ctl {
namespace {

constexpr const char* kPins[] = {"nc_config",   "nc_channels",   "nc_xsks",
                                 "nc_counters", "nc_chan_stats", "nc_steer"};

// Another instance's clean exit removes the per-namespace directories it was the last user of
// (Cleanup), possibly between our mkdir of a level and of the next: ENOENT there means "created,
// then removed under us", so the whole path is made again (a few times: each exit removes once).
absl::Status MkdirP(const std::string& path, mode_t mode) {
  absl::Status st;
  for (int attempt = 0; attempt < 8; ++attempt) {
    st = absl::OkStatus();
    for (size_t i = 1; i <= path.size() && st.ok(); ++i) {
      if (i == path.size() || path[i] == '/') {
        const std::string cur = path.substr(0, i);
        if (mkdir(cur.c_str(), mode) != 0 && errno != EEXIST)
          st = ErrnoStatus(errno, "mkdir " + cur);
      }
    }
    if (st.ok() || !absl::IsNotFound(st)) return st;
  }
  return st;
}

// A pin directory someone else could write to (or a symlink planted in its place) would let them
// swap our maps for theirs: refuse one that is not a real directory owned by us or root, and not
// writable by group or others. Checked for every level under the bpffs mount.
absl::Status CheckPinDir(const std::string& bpffs, const std::string& dir) {
  for (std::string p = dir; p.size() > bpffs.size(); p = p.substr(0, p.rfind('/'))) {
    struct stat st {};
    if (lstat(p.c_str(), &st) != 0) return ErrnoStatus(errno, "stat " + p);
    if (!S_ISDIR(st.st_mode))
      return absl::FailedPreconditionError("refusing pin directory " + p + ": not a directory");
    if (st.st_uid != 0 && st.st_uid != geteuid())
      return absl::FailedPreconditionError(
          absl::StrFormat("refusing pin directory %s: owned by uid %u", p, st.st_uid));
    if (st.st_mode & (S_IWGRP | S_IWOTH))
      return absl::FailedPreconditionError(absl::StrFormat(
          "refusing pin directory %s: mode %04o lets others write to it", p, st.st_mode & 07777));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status Controller::Lock(const std::string& path) {
  // A predecessor killed a moment ago still holds the lock while the kernel closes its files;
  // one exiting cleanly holds it until it is gone (DetachForExit).
  const int64_t tries = std::max<int64_t>(1, absl::ToInt64Milliseconds(opts_.name_wait) / 20);
  for (int64_t i = 0; i < tries; ++i) {
    UniqueFd fd(open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
    if (!fd.valid() && errno == ENOENT) {
      // The holder's clean exit removed the directory with its lock file (it was the
      // namespace's last instance) after we made it: make it again and take the free name.
      if (auto st = MkdirP(path.substr(0, path.rfind('/')), 0700); !st.ok()) return st;
      continue;
    }
    if (!fd.valid()) return ErrnoStatus(errno, "open " + path);
    if (flock(fd.get(), LOCK_EX | LOCK_NB) == 0) {
      // The holder unlinks the file on a clean exit: make sure we locked the file that is there.
      struct stat a {
      }, b{};
      if (fstat(fd.get(), &a) == 0 && stat(path.c_str(), &b) == 0 && a.st_ino == b.st_ino) {
        lock_fd_ = std::move(fd);
        return absl::OkStatus();
      }
      continue;
    }
    if (errno != EWOULDBLOCK) return ErrnoStatus(errno, "lock " + path);
    usleep(20'000);
  }
  int pid = 0;
  if (FILE* f = fopen(pid_file_.c_str(), "r")) {
    if (fscanf(f, "%d", &pid) != 1) pid = 0;
    fclose(f);
  }
  return absl::AlreadyExistsError(absl::StrFormat(
      "instance '%s' is already running (pid %d); pick another --instance", opts_.instance, pid));
}

Controller::Controller(const ControllerOptions& o) : opts_(o) {}

std::string Controller::SocketName(const std::string& instance) { return "netch/" + instance; }

absl::StatusOr<std::unique_ptr<Controller>> Controller::Start(const ControllerOptions& o) {
  if (!std::regex_match(o.instance, std::regex("[A-Za-z0-9_.-]{1,40}")))
    return absl::InvalidArgumentError(
        absl::StrFormat("instance name '%s': use 1-40 of [A-Za-z0-9_.-]", o.instance));
  if (o.ifname.empty()) return absl::InvalidArgumentError("no interface given");
  std::unique_ptr<Controller> c(new Controller(o));
  if (auto st = c->Init(); !st.ok()) return st;
  if (o.exit_on_signal) c->WatchSignals();
  return c;
}

void Controller::WatchSignals() {
  sigset_t set;
  sigemptyset(&set);
  for (int sig : {SIGINT, SIGTERM, SIGHUP}) sigaddset(&set, sig);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  // Detached on purpose: it lives as long as the process and ends it.
  std::thread([this, set] {
    int sig = 0;
    if (sigwait(&set, &sig) != 0) return;
    std::fprintf(stderr, "netch: signal %d: detaching and exiting\n", sig);
    Cleanup();
    _exit(128 + sig);
  }).detach();
}

absl::Status Controller::RecoverStale() {
  // A pid file whose process is gone, or pins without a pid file: a crashed predecessor.
  int old_pid = 0;
  if (FILE* f = fopen(pid_file_.c_str(), "r")) {
    if (fscanf(f, "%d", &old_pid) != 1) old_pid = 0;
    fclose(f);
  }
  // We hold the instance lock: whoever wrote the pid file is gone. Its second line is the id of
  // the program it attached (the pins may be gone with the mount namespace they lived in).
  uint32_t old_prog_id = 0;
  if (FILE* f = fopen(pid_file_.c_str(), "r")) {
    if (fscanf(f, "%*d %u", &old_prog_id) != 1) old_prog_id = 0;
    fclose(f);
  }
  struct stat st {};
  const bool pins = stat(pin_dir_.c_str(), &st) == 0;
  if (!old_pid && !pins) return absl::OkStatus();
  std::string what = old_pid ? absl::StrFormat("instance pid %d died", old_pid)
                             : std::string("stale pins without a pid file");
  // Its program may still be attached to our interface: detach it only if it is that program.
  const std::string prog_pin = pin_dir_ + "/nc_steer";
  const int prog_fd = bpf_obj_get(prog_pin.c_str());
  const int ifindex = static_cast<int>(if_nametoindex(opts_.ifname.c_str()));
  if (prog_fd >= 0) {
    bpf_prog_info info{};
    uint32_t len = sizeof(info);
    if (bpf_obj_get_info_by_fd(prog_fd, &info, &len) == 0) old_prog_id = info.id;
  }
  uint32_t attached = 0;
  if (old_prog_id && ifindex > 0 && bpf_xdp_query_id(ifindex, 0, &attached) == 0 &&
      attached == old_prog_id) {
    bpf_xdp_detach(ifindex, 0, nullptr);
    what +=
        absl::StrFormat("; detached its XDP program (id %u) from %s", old_prog_id, opts_.ifname);
  }
  if (prog_fd >= 0) close(prog_fd);
  int removed = 0;
  for (const char* p : kPins) removed += unlink((pin_dir_ + "/" + p).c_str()) == 0;
  rmdir(pin_dir_.c_str());
  unlink(pid_file_.c_str());
  status_.recovered = what + absl::StrFormat("; removed %d pins", removed);
  std::fprintf(stderr, "netch: recovered from a crashed instance '%s': %s\n",
               opts_.instance.c_str(), status_.recovered.c_str());
  return absl::OkStatus();
}

absl::Status Controller::Init() {
  status_.instance = opts_.instance;
  status_.ifname = opts_.ifname;
  status_.pid = getpid();
  status_.metrics_address = opts_.metrics_address;
  // bpffs: mounted here if absent (a fresh `ip netns exec` mount namespace has none).
  struct statfs sfs {};
  if (statfs(opts_.bpffs.c_str(), &sfs) != 0 || sfs.f_type != BPF_FS_MAGIC) {
    if (auto st = MkdirP(opts_.bpffs, 0700); !st.ok()) return st;
    if (mount("bpf", opts_.bpffs.c_str(), "bpf", 0, "mode=0700") != 0)
      return ErrnoStatus(errno, "mount bpffs at " + opts_.bpffs);
  }
  // Instances are per network namespace (like their abstract control sockets): two test hosts
  // on one machine may both run "default". The namespace's inode number keeps them apart.
  struct stat ns {};
  if (stat("/proc/thread-self/ns/net", &ns) != 0) return ErrnoStatus(errno, "stat own netns");
  const std::string scope = absl::StrFormat("net%u", static_cast<uint64_t>(ns.st_ino));
  pin_dir_ = opts_.bpffs + "/netch/" + scope + "/" + opts_.instance;
  const std::string run_dir = opts_.run_dir + "/" + scope;
  pid_file_ = run_dir + "/" + opts_.instance + ".pid";
  lock_file_ = run_dir + "/" + opts_.instance + ".lock";
  if (auto st = MkdirP(run_dir, 0700); !st.ok()) return st;
  if (auto st = Lock(lock_file_); !st.ok()) return st;
  if (auto st = RecoverStale(); !st.ok()) return st;

  const int ifindex = static_cast<int>(if_nametoindex(opts_.ifname.c_str()));
  if (ifindex == 0) return ErrnoStatus(errno, "interface " + opts_.ifname);
  auto steer = bpf::SteerProgram::Load(opts_.udp_port);
  if (!steer.ok()) return steer.status();
  steer_ = std::move(*steer);
  absl::Status st = steer_->Attach(ifindex, bpf::AttachMode::kNative, opts_.replace);
  status_.attach_mode = "native";
  if (!st.ok() && !absl::IsFailedPrecondition(st) && opts_.allow_generic) {
    const std::string native_err(st.message());
    st = steer_->Attach(ifindex, bpf::AttachMode::kGeneric, opts_.replace);
    if (st.ok()) {
      status_.attach_mode = "generic";
      status_.warnings.push_back("native XDP attach failed (" + native_err +
                                 "); running in generic (skb) mode, which is slow");
      std::fprintf(stderr, "netch: warning: %s\n", status_.warnings.back().c_str());
    }
  }
  if (!st.ok()) return st;
  if (auto s = MkdirP(pin_dir_, 0700); !s.ok()) return s;
  if (auto s = CheckPinDir(opts_.bpffs, pin_dir_); !s.ok()) return s;
  if (auto s = steer_->Pin(pin_dir_); !s.ok()) return s;
  status_.pin_dir = pin_dir_;
  bpf_prog_info info{};
  uint32_t len = sizeof(info);
  if (bpf_obj_get_info_by_fd(steer_->prog_fd(), &info, &len) != 0) info.id = 0;
  if (FILE* f = fopen(pid_file_.c_str(), "w")) {
    std::fprintf(f, "%d\n%u\n", getpid(), info.id);
    fclose(f);
  }
  return absl::OkStatus();
}

absl::Status Controller::Serve(vns::Stack* stack) {
  if (!opts_.metrics_address.empty()) {
    auto m = MetricsExposer::Start(opts_.metrics_address, stack, this);
    if (m.ok()) {
      metrics_ = std::move(*m);
    } else {
      // A busy port must not take the stack down: report it and run without the exposer.
      status_.warnings.push_back(absl::StrFormat("metrics exposer on %s not started: %s",
                                                 opts_.metrics_address, m.status().message()));
      status_.metrics_address.clear();
      std::fprintf(stderr, "netch: warning: %s\n", status_.warnings.back().c_str());
    }
  }
  auto s = ControlServer::Start(SocketName(opts_.instance), stack, this);
  if (!s.ok()) return s.status();
  server_ = std::move(*s);
  return absl::OkStatus();
}

void Controller::Stop() {
  server_.reset();
  metrics_.reset();
}

ControllerStatus Controller::status() const { return status_; }

Controller::~Controller() {
  Stop();
  Cleanup();
  steer_.reset();
}

// Leaves steer_ loaded: on a signal the engines may still touch its maps until _exit.
void Controller::DetachForExit() {
  Stop();
  Cleanup(/*keep_name=*/true);
}

void Controller::Cleanup(bool keep_name) {
  if (steer_) (void)steer_->Detach();
  auto parent = [](const std::string& p) { return p.substr(0, p.rfind('/')); };
  for (const char* p : kPins) unlink((pin_dir_ + "/" + p).c_str());
  // The per-namespace directories go when their last instance does (rmdir fails otherwise);
  // the pins' while we still hold the name, so that the next instance of it never has its
  // pin directory's parent removed under it.
  if (!pin_dir_.empty()) rmdir(pin_dir_.c_str());
  if (!pin_dir_.empty()) rmdir(parent(pin_dir_).c_str());
  if (!pid_file_.empty()) unlink(pid_file_.c_str());
  if (keep_name) return;
  // Unlinked while still locked: a waiter that locks the old file sees its inode is stale.
  if (lock_fd_.valid()) unlink(lock_file_.c_str());
  // Its directory can only go after the lock file: a waiter that finds it gone makes it again
  // (Lock, MkdirP).
  if (!pid_file_.empty()) rmdir(parent(pid_file_).c_str());
}

}  // namespace netch::ctl
