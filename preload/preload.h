// preload.h - unmodified programs over NetChannel: what libnetch_preload.so promises and how it
// is configured. `netchrun [options] -- CMD ARGS` sets the variables below and LD_PRELOAD.
//
// What goes over NetChannel (everything else stays on the kernel, untouched):
// * IPv4 TCP stream sockets (socket(AF_INET, SOCK_STREAM, 0 | IPPROTO_TCP)) that the program
//   - connect() to an address routed over the NetChannel interface (NETCH_ROUTE=iface, the
//     default: inside the interface's IPv4 subnet, or elsewhere when the kernel's route to it
//     leaves through the interface, i.e. through a gateway on its link; =all: any non-loopback
//     address), or
//   - bind() to the interface's address or INADDR_ANY and then listen() on.
//   NETCH_PORTS (comma-separated) narrows this to those remote (connect) or local (listen)
//   ports. Loopback, Unix sockets, UDP, IPv6, files and pipes are never touched.
// * One NetChannel stack per process, created on the first such socket (its control plane
//   serves `netchctl --instance NAME`). Failing to create it fails that call with ENETDOWN (and
//   one log line); the program keeps running.
//
// What a virtual socket is inside the process:
// * A real fd number (an eventfd placeholder, close-on-exec), so it never collides with a kernel
//   fd. The socket calls, poll/ppoll/select/pselect and epoll (mixing kernel fds and virtual
//   sockets in one call) are served by the library; readiness is level-triggered (EPOLLET and
//   EPOLLONESHOT are honoured on the eventfds the library registers).
// * Non-blocking connect returns EINPROGRESS; POLLOUT and SO_ERROR report the outcome.
// * fork(): the child inherits the fd numbers but not the stack (threads do not survive fork).
//   In the child a virtual socket can only be closed; every other call fails with EBADF. The
//   parent's sockets are unaffected. exec() drops virtual sockets (close-on-exec).
// * exit(): sockets still open are shut down (FIN after their last byte) and the stack waits up
//   to NETCH_LINGER_MS (default 2000) for their data to be acknowledged, then detaches its XDP
//   program.
// * A call the library cannot serve on a virtual socket (MSG_PEEK, MSG_OOB, unsupported ioctl or
//   fcntl) fails with EOPNOTSUPP/EINVAL and one log line; an unknown socket option is accepted,
//   remembered for getsockopt, and logged once.
//
// Variables (netchrun's options set them):
//   NETCH_DEV        interface (default: the only non-loopback interface with an IPv4 address)
//   NETCH_INSTANCE   control-plane instance name (default "netchrun")
//   NETCH_ROUTE      iface | all | none
//   NETCH_PORTS      e.g. "6379,8080" (default: every port)
//   NETCH_DRIVER     afxdp | tcp;  NETCH_TX auto | afxdp | udp;  NETCH_ENGINES, NETCH_CHANNELS,
//   NETCH_COPY_WORKERS, NETCH_POLICY   as netchperf's options of the same names
//   NETCH_METRICS    host:port of the Prometheus exposer, or "off" (default)
//   NETCH_REPLACE_XDP=1  take over an interface where another XDP program is attached
//   NETCH_LINGER_MS  see exit() above;  NETCH_VERBOSE=1  log each socket routed over NetChannel
//   NETCH_CONNECT_TIMEOUT_MS  a connect() to a peer gives up after this long, its channels'
//                    handshake included (default 2000; a non-blocking one reports it)
//   NETCH_SPIN_US    how long idle stack threads spin before sleeping (default: the stack's 50)
//   NETCH_DELIVER_INLINE=0  received segments go to sockets through the dispatcher thread, not
//                    on the engine's thread (vns::StackOptions::deliver_inline; default 1)
//   NETCH_TRANSMIT_INLINE=0  a small write wakes the engine instead of running its round on
//                    the writing thread (vns::StackOptions::transmit_inline; default 1)
//   NETCH_RECEIVE_INLINE=0  a blocked read, or an epoll_wait/poll about to sleep, sleeps until the
//                    engine delivers instead of running the engine's round itself
//                    (vns::StackOptions::receive_inline; default 1)
//   NETCH_DEFER_TRANSMIT=0  an event loop's nonblocking write or read that finds the engine
//                    asleep wakes it instead of leaving with the loop's next epoll_wait or poll
//                    (vns::StackOptions::defer_transmit; default 1; for a polling loop this
//                    applies to a pass that outlasts its lease, LoopLeaseUs)
//   NETCH_POLICY     NAME[:key=value,...], e.g. "isolate-classes:busy_poll_us=200"
//   NETCH_CLASS      latency | throughput: the class the program's connections announce
//   NETCH_BUSY_POLL_US  a blocking receive on any of the program's sockets runs its channels
//                    on the calling thread this long before sleeping (run to completion)
//   NETCH_LOOP_POLL_US  an event loop's epoll_wait (or poll/select) runs the stack's rounds
//                    itself for up to this long before it sleeps, for as long as that catches
//                    its events (NextLoopPollWindow; default 300, 0: never), one thread of the
//                    process at a time. Idle loops sleep at once.
//   NETCH_ENGINE_CORES  C0,C1,...: pin engine i to core Ci (default: engines float). With
//                    isolate-classes, engine 0 runs the L-app channels: give it a core of its own
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace netch::preload {

enum class Route { kIface, kAll, kNone };

struct Config {
  std::string dev, instance = "netchrun", driver = "afxdp", tx = "auto", policy = "round-robin";
  std::string metrics = "off";
  Route route = Route::kIface;
  std::vector<uint16_t> ports;  // empty: all
  int engines = 1, channels = 1, copy_workers = 0;
  int linger_ms = 2000;
  int connect_timeout_ms = 2000;  // NETCH_CONNECT_TIMEOUT_MS
  int spin_us = -1;  // adaptive polling spin of engines, dispatcher and Recv (-1: stack defaults)
  // NETCH_POLICY=NAME[:key=value,...]: the policy's knobs, applied in order.
  std::vector<std::pair<std::string, std::string>> policy_knobs;
  // NETCH_CLASS: the class the program's connections announce (0 unspecified, 1 latency, 2
  // throughput: vns::AppClass values).
  int app_class = 0;
  int loop_poll_us = 300;         // NETCH_LOOP_POLL_US
  int busy_poll_us = -1;          // NETCH_BUSY_POLL_US: every socket's SocketOptions::busy_poll_us
  std::vector<int> engine_cores;  // NETCH_ENGINE_CORES: engine i pinned to engine_cores[i]
  bool replace_xdp = false, verbose = false;
  bool deliver_inline = true;   // NETCH_DELIVER_INLINE
  bool transmit_inline = true;  // NETCH_TRANSMIT_INLINE
  bool receive_inline = true;   // NETCH_RECEIVE_INLINE
  bool defer_transmit = true;   // NETCH_DEFER_TRANSMIT
  // Filled from the interface: its address and netmask (host order), and its index.
  uint32_t local_ip = 0, netmask = 0;
  int ifindex = 0;
  // The interface the kernel routes `ip` (host order) through, 0 if none: asked for addresses
  // outside the subnet with NETCH_ROUTE=iface. Set by the library (a rtnetlink lookup); unset,
  // only the subnet is routed.
  int (*route_oif)(uint32_t ip) = nullptr;

  // Reads the NETCH_* variables from `getenv` and the interface's address. InvalidArgument
  // names the variable at fault.
  static absl::StatusOr<Config> FromEnv(const char* (*getenv_fn)(const char*));
  // Would a connect to ip:port (host order) go over NetChannel?
  bool RoutesPeer(uint32_t ip, uint16_t port) const;
  // Would listen() on a socket bound to ip:port go over NetChannel?
  bool RoutesListen(uint32_t ip, uint16_t port) const;
};

// How long an event loop's next epoll_wait polls the stack before it sleeps
// (NETCH_LOOP_POLL_US, at most `max_us`), from how its last one went — the rule of the
// kernel's guest halt-polling governor (cpuidle-haltpoll): polling that caught the events
// keeps the window; a sleep that a window up to max_us would have covered (the events came
// `waited_us` after the call began) doubles it, from kLoopPollGrowStartUs; a longer sleep or a
// timeout halves it, to 0 below kLoopPollGrowStartUs. A busy loop thus polls up to max_us
// and never pays a wakeup, while one whose events come further apart than that (or an idle one)
// stops polling within a few waits and costs nothing.
inline constexpr uint32_t kLoopPollGrowStartUs = 25;
uint32_t NextLoopPollWindow(uint32_t window_us, uint32_t max_us, uint64_t waited_us, bool got,
                            bool slept);

// How long the stack's engines and dispatcher leave the work to an event loop that polls: the
// lease each of its rounds gives them (they stand down until it runs out, and look again
// chan::kStandDownRecheckUs after it unless the loop's next round renewed it). It is the loop's
// window or, if longer, the time the loop has recently spent on a pass between two waits
// (NextLoopAwayUs), up to kMaxLoopLeaseUs: a loop back within it runs the stack alone, as a loop
// over kernel TCP runs its TCP in its own syscalls. With the window alone, Redis answering fifty
// pipelined connections (passes of 0.1-3 ms) outlasted the lease in most passes, and each read
// and write after that woke an engine (4,000-5,000 wakeups a second per program) that waited
// ~0.7 ms for a core both programs were using.
inline constexpr uint32_t kMaxLoopLeaseUs = 2000;
// A loop's recent pass between two waits: a maximum that decays by 1/8 per wait, so a few long
// passes among short ones keep it and a loop whose passes shorten sheds it within ~20 waits.
// `last_us`: from the last wait's return to this wait's call.
uint32_t NextLoopAwayUs(uint32_t away_us, uint64_t last_us);
// Within its lease, a polling loop's writes leave with its next wait (no engine woken), but a
// write whose thread last ran a round this long ago runs one: a pass that writes to many
// sockets keeps feeding the peer every kLoopSendRoundUs instead of at its end.
inline constexpr uint32_t kLoopSendRoundUs = 50;
// ... only in a process whose polling has stayed with one thread this long. Where threads take
// turns (eight memcslap threads, each waiting in its own poll), a thread's round delivers to
// the others, which it wakes and which then take its core mid-round: 60-74 us a round against
// 20-31 us in Redis's one loop, and eight memcslap threads 2.6 -> 3.4 s.
inline constexpr uint32_t kLoopSoleUs = 20'000;
// Whether a polling loop's write at `now_ns` runs a round on its thread: its last round
// (`round_ns`, which gave a lease of `lease_ns`) is kLoopSendRoundUs old or more but the lease
// still runs, the current lease is this thread's (`holder`), and it has been since
// `lease_moved_ns` (when polling last passed from one thread to another) for kLoopSoleUs.
inline bool LoopSendRoundDue(int64_t now_ns, int64_t round_ns, int64_t lease_ns, bool holder,
                             int64_t lease_moved_ns) {
  const int64_t since = now_ns - round_ns;
  return round_ns != 0 && holder && since >= int64_t{kLoopSendRoundUs} * 1000 &&
         since <= lease_ns && now_ns - lease_moved_ns >= int64_t{kLoopSoleUs} * 1000;
}
inline uint32_t LoopLeaseUs(uint32_t window_us, uint32_t away_us) {
  return window_us == 0 ? 0 : std::max(window_us, std::min(kMaxLoopLeaseUs, away_us));
}

}  // namespace netch::preload
