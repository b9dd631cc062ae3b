// netchrun - runs an unmodified program with its TCP sockets over NetChannel:
//   netchrun [--dev IF] [--instance NAME] [options] -- CMD ARGS
// Sets the NETCH_* variables preload.h documents and LD_PRELOAD=libnetch_preload.so, then
// execs CMD. The library is looked up next to this binary first (a build tree), then where
// `cmake --install` put it.
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"

namespace {

std::string FindLibrary(const std::string& given) {
  if (!given.empty()) return given;
  std::error_code ec;
  const auto self = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    for (const auto& cand : {self.parent_path() / "libnetch_preload.so",
                             self.parent_path() / ".." / NETCH_LIBDIR / "libnetch_preload.so"}) {
      if (std::filesystem::exists(cand)) return std::filesystem::weakly_canonical(cand).string();
    }
  }
  return NETCH_PRELOAD_INSTALLED;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "Runs CMD with its IPv4 TCP sockets over NetChannel (an LD_PRELOAD library and an embedded "
      "stack). Sockets connected to peers routed through the interface (its subnet, or a gateway "
      "on its link), or listening on its address or "
      "0.0.0.0, go over NetChannel; everything else stays on the kernel. See netchrun(1).",
      "netchrun"};
  std::string dev, instance, route, ports, driver, tx, metrics, policy, lib, app_class;
  int engines = 0, channels = 0, copy_workers = 0, linger_ms = -1, spin_us = -1, busy_poll_us = -1,
      loop_poll_us = -1, connect_timeout_ms = -1;
  bool replace_xdp = false, verbose = false;
  std::vector<int> engine_cores;
  std::vector<std::string> cmd;
  app.add_option("--dev", dev, "NetChannel interface (default: the only one with IPv4)");
  app.add_option("--instance", instance, "control-plane instance name (netchctl --instance)")
      ->default_str("netchrun");
  app.add_option("--route", route, "which peers: iface (routed through it), all, none")
      ->check(CLI::IsMember({"iface", "all", "none"}));
  app.add_option("--ports", ports, "only these ports, comma-separated (default: all)");
  app.add_option("--driver", driver, "channel driver")->check(CLI::IsMember({"afxdp", "tcp"}));
  app.add_option("--tx", tx, "AF_XDP transmit path")
      ->check(CLI::IsMember({"auto", "afxdp", "udp"}));
  app.add_option("--engines", engines, "engine threads")->check(CLI::Range(1, 64));
  app.add_option("--engine-cores", engine_cores,
                 "pin engine i to core C_i (isolate-classes: engine 0 runs the L-app channels)")
      ->delimiter(',')
      ->check(CLI::Range(0, 1023));
  app.add_option("--channels", channels, "channels per peer")->check(CLI::Range(1, 64));
  app.add_option("--copy-workers", copy_workers, "copy worker threads")->check(CLI::Range(0, 64));
  app.add_option("--policy", policy,
                 "NetScheduler policy NAME[:key=value,...] (netchctl policy list)");
  app.add_option("--class", app_class, "the class the program's connections announce")
      ->check(CLI::IsMember({"latency", "throughput"}));
  app.add_option("--busy-poll-us", busy_poll_us,
                 "blocking receives run the channels on the calling thread this long first")
      ->check(CLI::Range(0, 1000000));
  app.add_option(
         "--loop-poll-us", loop_poll_us,
         "an event loop's epoll_wait/poll/select runs the stack up to this long before sleeping, "
         "while that catches its events (default 300, 0: never)")
      ->check(CLI::Range(0, 1000000));
  app.add_option("--metrics", metrics, "Prometheus exposer address, or off")->default_str("off");
  app.add_option("--linger-ms", linger_ms, "at exit, wait this long for unacknowledged data")
      ->check(CLI::Range(0, 600000));
  app.add_option("--connect-timeout-ms", connect_timeout_ms,
                 "a connect() gives up after this long, channel handshake included (default 2000)")
      ->check(CLI::Range(1, 600000));
  app.add_option("--spin-us", spin_us, "idle stack threads spin this long before sleeping")
      ->check(CLI::Range(0, 100000));
  app.add_flag("--replace-xdp", replace_xdp, "take over an interface with another XDP program");
  app.add_flag("-v,--verbose", verbose, "log each socket that goes over NetChannel");
  app.add_option("--lib", lib, "path of libnetch_preload.so");
  app.add_option("cmd", cmd, "the program and its arguments (after --)")->required();
  app.footer(
      "Example:\n  ip netns exec B netchrun --dev veth-b -- redis-server --bind 198.18.0.2\n"
      "  ip netns exec A netchrun --dev veth-a -- redis-benchmark -h 198.18.0.2 -q");
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    // Exit 2, as netchrun(1) says (CLI11's own codes are 100 and up).
    std::fprintf(stderr, "netchrun: %s\nRun 'netchrun --help' for usage.\n", e.what());
    return 2;
  }

  auto set = [](const char* k, const std::string& v) {
    if (!v.empty()) setenv(k, v.c_str(), 1);
  };
  auto set_int = [&](const char* k, int v, int unset) {
    if (v != unset) set(k, std::to_string(v));
  };
  set("NETCH_DEV", dev);
  set("NETCH_INSTANCE", instance);
  set("NETCH_ROUTE", route);
  set("NETCH_PORTS", ports);
  set("NETCH_DRIVER", driver);
  set("NETCH_TX", tx);
  set("NETCH_POLICY", policy);
  set("NETCH_METRICS", metrics);
  set_int("NETCH_ENGINES", engines, 0);
  set_int("NETCH_CHANNELS", channels, 0);
  set_int("NETCH_COPY_WORKERS", copy_workers, 0);
  set_int("NETCH_LINGER_MS", linger_ms, -1);
  set_int("NETCH_CONNECT_TIMEOUT_MS", connect_timeout_ms, -1);
  set_int("NETCH_SPIN_US", spin_us, -1);
  set("NETCH_CLASS", app_class);
  set_int("NETCH_BUSY_POLL_US", busy_poll_us, -1);
  set_int("NETCH_LOOP_POLL_US", loop_poll_us, -1);
  if (!engine_cores.empty()) {
    std::string v;
    for (int core : engine_cores) v += (v.empty() ? "" : ",") + std::to_string(core);
    set("NETCH_ENGINE_CORES", v);
  }
  if (replace_xdp) set("NETCH_REPLACE_XDP", "1");
  if (verbose) set("NETCH_VERBOSE", "1");

  const std::string path = FindLibrary(lib);
  if (access(path.c_str(), R_OK) != 0) {
    std::fprintf(stderr, "netchrun: %s: not found (build it, or pass --lib)\n", path.c_str());
    return 2;
  }
  // Ours first, so that our socket calls win; a sanitizer runtime already there stays in front
  // (it must be the first library loaded).
  std::string preload = path;
  if (const char* old = getenv("LD_PRELOAD"); old != nullptr && *old != '\0') {
    const std::string o = old;
    const bool runtime =
        o.find("libasan") != std::string::npos || o.find("libtsan") != std::string::npos;
    preload = runtime ? o + ":" + path : path + ":" + o;
  }
  setenv("LD_PRELOAD", preload.c_str(), 1);

  std::vector<char*> args;
  for (auto& a : cmd) args.push_back(a.data());
  args.push_back(nullptr);
  execvp(args[0], args.data());
  std::fprintf(stderr, "netchrun: %s: %s\n", args[0], std::strerror(errno));
  return 127;
}
