// netch_preload.cc - libnetch_preload.so: the socket calls of an unmodified program, served by
// an embedded NetChannel stack for the sockets preload.h routes over it and by libc for every
// other fd.
//
// Fast path first: every interposed call on a kernel fd costs one relaxed byte load (g_kind)
// before it goes to libc. Per-fd state lives in fixed arrays indexed by the fd number; the
// global mutex is taken only to set sockets up, tear them down, and for epoll bookkeeping.
#include <dlfcn.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/select.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdarg>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_format.h"
#include "afxdp_channels/engine.h"
#include "afxdp_channels/netdev.h"
#include "bpf/wire.h"
#include "ctl/controller.h"
#include "preload/preload.h"
#include "vns_lib/vns.h"

namespace {

using netch::preload::Config;
using netch::vns::VirtualSocket;

// ---- libc ---------------------------------------------------------------------------------
// Resolved on first use: another library's constructor may call us before ours ran.
#define REAL(fn)                                                                    \
  ([]() {                                                                           \
    static const auto p = reinterpret_cast<decltype(&::fn)>(dlsym(RTLD_NEXT, #fn)); \
    return p;                                                                       \
  }())

void Log(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void Log(const char* fmt, ...) {
  char line[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(line, sizeof(line), fmt, ap);
  va_end(ap);
  char out[600];
  const int n = snprintf(out, sizeof(out), "netch-preload[%d]: %s\n", getpid(), line);
  if (n > 0) (void)!REAL(write)(2, out, std::min<size_t>(n, sizeof(out) - 1));
}

// One log line per distinct message (unsupported calls, unknown options).
void LogOnce(const std::string& what) {
  static std::mutex mu;
  static auto* seen = new absl::flat_hash_set<std::string>();
  std::lock_guard g(mu);
  if (seen->insert(what).second) Log("%s", what.c_str());
}

int Fail(int err) {
  errno = err;
  return -1;
}

// ---- per-fd state ---------------------------------------------------------------------------
constexpr int kMaxFd = 1 << 16;  // fds above this stay on the kernel (logged once)
// kEpoll: an epoll set holding virtual sockets (g_ep); kEpollFd: any epoll fd the program made.
enum : uint8_t { kVirtual = 1, kCandidate = 2, kEpoll = 4, kEpollFd = 8 };

struct Entry {
  std::unique_ptr<VirtualSocket> vs;
  std::atomic<bool> nonblocking{false}, shut_rd{false};
  bool listening = false;
  uint32_t bound_ip = 0;  // listeners: what bind() asked for (host order)
  std::mutex opt_mu;
  absl::flat_hash_map<uint64_t, std::string> opts;  // (level << 32 | name) -> value, for getsockopt
  std::vector<int> epolls;                          // epoll fds it is registered in (g_mu)
  ~Entry();
};

// A kernel TCP/IPv4 socket the program made: it may still become virtual at connect/listen.
struct Candidate {
  uint32_t bind_ip = 0;
  uint16_t bind_port = 0;
  bool routed_bind = false;  // bind() matched RoutesListen: not bound in the kernel
  bool nodelay = false;
  int rcvbuf = 0;
};

struct EpollReg {
  uint32_t events;
  epoll_data_t data;
  // The socket's two eventfds in the real set (0 read, 1 write): present, and with which events
  // (0: present but disabled — an event loop toggles write interest per request, and a MOD is
  // cheaper than a DEL and an ADD).
  bool present[2] = {false, false};
  uint32_t kev[2] = {0, 0};
  // The real registrations lag `events`: a level-triggered change in a lazy set nobody sleeps
  // on is applied when a thread is about to sleep on the set (SyncDirty), not per epoll_ctl — an
  // event loop toggling write interest per request then makes no syscall for it.
  bool dirty = false;
  // The socket registered: an epoll_wait looks at every level-triggered socket of its set on
  // each call, and a reference kept here spares it a lookup of the fd table per socket (an
  // atomic shared_ptr load: a lock, a count up and a count down). Closing the fd unregisters it
  // from every set (Forget), so this never outlives the fd's socket.
  std::shared_ptr<Entry> entry;
  // Set while the registration holds a wait on the socket (VirtualSocket::BeginWait), which keeps
  // its eventfds in step with its state: edge-triggered and one-shot registrations always (the
  // kernel sees their edges), level-triggered ones while a thread sleeps on the set or the set
  // is eager (EpollSet).
  std::shared_ptr<Entry> armed;
};

std::atomic<uint8_t> g_kind[kMaxFd];
std::atomic<std::shared_ptr<Entry>> g_slot[kMaxFd];
// An epoll set holding virtual sockets: their registrations, under a lock of its own (the
// thread waiting on the set takes it once per wakeup; no lock shared between epoll sets).
//
// Level-triggered readiness is read from the sockets themselves (`level`, scanned by each
// epoll_wait) while the set's waiters are awake: an event loop that never sleeps then costs no
// eventfd write or read per request. A thread about to sleep arms every socket of the set
// (their eventfds follow their state until it wakes). A set is eager — every registration armed
// for good, readiness only through the eventfds, as the kernel would see it — once it is waited
// on from outside (inside another epoll set, or in poll/select) or holds more sockets than a scan
// should visit.
struct EpollSet {
  std::mutex mu;
  absl::flat_hash_map<int, EpollReg> regs;  // virtual fd -> what the program registered
  std::vector<int> level;                   // fds of level-triggered registrations
  size_t cursor = 0;                        // where the next scan starts (fairness)
  int sleepers = 0;                         // threads asleep in epoll_wait on this set
  bool eager = false;
  // Real registrations of level-triggered sockets the program removed while nobody slept on
  // the set: left in the kernel until someone is about to (SyncDirty), because event loops
  // remove and re-add a socket per request (redis-benchmark: DEL then ADD, read interest to
  // write interest and back) and a re-add of the same socket takes them over, no syscall.
  struct Ghost {
    std::weak_ptr<Entry> e;  // expired: its eventfds are closed, the kernel dropped them
    bool present[2] = {false, false};
    uint32_t kev[2] = {0, 0};
  };
  absl::flat_hash_map<int, Ghost> ghosts;
  ~EpollSet();
};
constexpr size_t kScanLimit = 256;  // level-triggered sockets a lazy set scans per epoll_wait
constexpr size_t kMaxLoans = 8;     // engines whose input one epoll_wait borrows
constexpr int kLoanWakeupsWithoutEvents = 3;

std::mutex g_mu;  // g_cands, creating g_ep entries, Entry::epolls (then EpollSet::mu)
absl::flat_hash_map<int, Candidate>* g_cands = new absl::flat_hash_map<int, Candidate>();
std::atomic<std::shared_ptr<EpollSet>> g_ep[kMaxFd];
std::atomic<bool> g_child{false};  // this process is a fork child: the stack is not here
uint32_t g_nonce = 0;              // tags our epoll registrations

thread_local bool t_internal = false;  // inside the library: sockets made now are the stack's

uint8_t Kind(int fd) {
  return fd >= 0 && fd < kMaxFd ? g_kind[fd].load(std::memory_order_acquire) : 0;
}

std::shared_ptr<Entry> Virt(int fd) {
  if (!(Kind(fd) & kVirtual)) return nullptr;
  return g_slot[fd].load(std::memory_order_acquire);
}

Entry::~Entry() {
  if (vs && !g_child.load()) (void)vs->Close();
  if (g_child.load()) (void)vs.release();  // the parent's: never touched here
}

// ---- configuration and the stack ---------------------------------------------------------
const char* Getenv(const char* k) { return getenv(k); }

// Config::route_oif: one rtnetlink lookup, on a socket of its own (a socket kept open would be
// shared with forked children, whose lookups could read the parent's answers).
int RouteOif(uint32_t ip) {
  auto table = netch::afxdp::RouteTable::Open();
  if (!table.ok()) return 0;
  auto hop = (*table)->Get(ip);
  return hop.ok() ? hop->oif : 0;
}

const Config* Cfg() {
  static const Config* cfg = []() -> const Config* {
    auto c = Config::FromEnv(&Getenv);
    if (!c.ok()) {
      Log("not routing anything over NetChannel: %s", std::string(c.status().message()).c_str());
      return nullptr;
    }
    c->route_oif = &RouteOif;
    return new Config(std::move(*c));
  }();
  return cfg;
}

struct Global {
  std::unique_ptr<netch::ctl::Controller> ctl;
  std::unique_ptr<netch::vns::Stack> stack;
  pid_t owner = 0;
};
std::mutex g_init_mu;
Global* g = nullptr;  // leaked on purpose: threads may still run while the process exits
bool g_failed = false;

void AtExit();

// The process's stack if it has been made (nullptr otherwise): never makes one.
netch::vns::Stack* MadeStack() {
  std::lock_guard l(g_init_mu);
  return g ? g->stack.get() : nullptr;
}

// The process's stack, created on first use. nullptr (errno set) if it cannot be.
netch::vns::Stack* GetStack() {
  std::lock_guard l(g_init_mu);
  if (g) return g->stack.get();
  if (g_failed || g_child.load()) {
    errno = ENETDOWN;
    return nullptr;
  }
  const Config* c = Cfg();
  if (!c) {
    errno = ENETDOWN;
    return nullptr;
  }
  // The stack's threads must not take the program's signals: they start with all blocked.
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  t_internal = true;
  auto fail = [&](const absl::Status& st) {
    t_internal = false;
    pthread_sigmask(SIG_SETMASK, &old, nullptr);
    Log("NetChannel stack on %s failed: %s", c->dev.c_str(), std::string(st.message()).c_str());
    g_failed = true;
    errno = ENETDOWN;
    return nullptr;
  };
  netch::ctl::ControllerOptions co;
  co.instance = c->instance;
  co.ifname = c->dev;
  co.replace = c->replace_xdp;
  co.metrics_address = c->metrics == "off" ? "" : c->metrics;
  // A predecessor of the same instance (a server restarted at once) keeps the name until it is
  // gone, which may take its exit linger: wait that long and then some before giving up.
  co.name_wait = absl::Milliseconds(c->linger_ms) + absl::Seconds(5);
  auto ctl = netch::ctl::Controller::Start(co);
  if (!ctl.ok()) return fail(ctl.status());
  netch::vns::StackOptions so;
  so.driver = c->driver;
  so.driver_opts.ifname = c->dev;
  so.driver_opts.steer = (*ctl)->steer();
  so.driver_opts.engines = c->engines;
  so.driver_opts.tx = c->tx;
  so.driver_opts.cores = c->engine_cores;
  so.channels_per_peer = c->channels;
  so.copy_workers = c->copy_workers;
  so.policy = c->policy;
  so.policy_knobs = c->policy_knobs;
  so.deliver_inline = c->deliver_inline;
  so.transmit_inline = c->transmit_inline;
  so.receive_inline = c->receive_inline;
  // An event loop's writes and reads that find the engine asleep leave with its next wait (or
  // the engine's timer, chan::kDeferTransmitUs) instead of waking it — a polling loop's too, for
  // a pass that outlasts its lease: an engine woken beside the loop waited ~0.7 ms for a core the
  // two Redis programs were using, and cost them 7% of LRANGE_100 -P 16 (docs/ARCHITECTURE.md
  // "Event loops run to completion").
  so.defer_transmit = c->defer_transmit;
  if (c->spin_us >= 0) {
    so.recv_spin_us = so.dispatcher_spin_us = static_cast<uint64_t>(c->spin_us);
    so.driver_opts.spin = absl::Microseconds(c->spin_us);
  }
  auto stack = netch::vns::Stack::Create(so);
  if (!stack.ok()) return fail(stack.status());
  if (auto st = (*ctl)->Serve(stack->get()); !st.ok()) return fail(st);
  t_internal = false;
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
  g = new Global{std::move(*ctl), std::move(*stack), getpid()};
  atexit(AtExit);
  if (c->verbose)
    Log("NetChannel stack up on %s (instance %s, driver %s)", c->dev.c_str(), c->instance.c_str(),
        c->driver.c_str());
  return g->stack.get();
}

// Sockets still open get a FIN after their last byte; their data is given time to be
// acknowledged; then the XDP program is detached (the stack itself, and the instance's name,
// are left to the exit).
void AtExit() {
  if (g == nullptr || g_child.load() || getpid() != g->owner) return;
  for (int fd = 0; fd < kMaxFd; ++fd) {
    if (!(Kind(fd) & kVirtual)) continue;
    if (auto e = g_slot[fd].load(); e && !e->listening) (void)e->vs->Shutdown();
  }
  // Everything sent must be acknowledged before the stack dies with the process: data and FINs
  // still queued for an engine or held for coalescing, unacknowledged segments, control
  // segments waiting for room (counting only what the transport had taken let a FIN queued
  // behind the last data die here: the peer saw its channel fail instead of an end of stream).
  // Seen idle twice, a millisecond apart. A segment's every move is published before it leaves
  // where it was (Channel::tx_idle), so one look would do for data; the dispatcher publishes its
  // backlog of control segments only at the end of its round.
  const Config* c = Cfg();
  const int linger_ms = c ? c->linger_ms : 0;
  const uint64_t linger_start = netch::chan::NowUs();
  int idle = 0;
  for (int waited = 0; waited < linger_ms && idle < 2; ++waited) {
    bool quiet = g->stack->Stats().ctl_backlog == 0;
    for (const auto& ch : g->stack->driver().Channels())
      if (ch->state() == netch::chan::ChannelState::kUp && !ch->tx_idle()) quiet = false;
    idle = quiet ? idle + 1 : 0;
    if (idle < 2) usleep(1000);
  }
  if (c && c->verbose) {
    const auto ss = g->stack->Stats();
    Log("NetChannel stack down after %s %.1f ms for unacknowledged data: %llu segments through "
        "the dispatcher (%llu of its rounds run inline by busy-polling threads), %llu taken "
        "inline by busy-polling sockets",
        idle >= 2 ? "waiting" : "giving up after",
        static_cast<double>(netch::chan::NowUs() - linger_start) / 1000.0,
        static_cast<unsigned long long>(ss.segments_in),
        static_cast<unsigned long long>(ss.dispatch_inline),
        static_cast<unsigned long long>(ss.segments_inline));
    // Each channel's account at the end: what a peer that lost bytes compares with its own.
    for (const auto& ch : g->stack->driver().Channels()) {
      const netch::chan::ChannelStats cs = ch->stats();
      Log("  channel %u (queue %d): %s, %llu B in %llu segments sent, %llu B unacknowledged, "
          "%llu B in %llu segments received, %llu retransmits, %llu stale dropped",
          ch->id(), cs.queue, std::string(netch::chan::StateName(ch->state())).c_str(),
          static_cast<unsigned long long>(cs.tx_bytes),
          static_cast<unsigned long long>(cs.tx_segments),
          static_cast<unsigned long long>(cs.tx_queued_bytes),
          static_cast<unsigned long long>(cs.rx_bytes),
          static_cast<unsigned long long>(cs.rx_segments),
          static_cast<unsigned long long>(cs.retransmits),
          static_cast<unsigned long long>(cs.rx_dropped_stale));
    }
  }
  // Detached and unpinned, but the instance's name stays ours until the process is gone with
  // its AF_XDP sockets (Controller::DetachForExit): a server restarted at once under the same
  // instance waits for that instead of finding the queues still bound (EBUSY).
  g->ctl->DetachForExit();
}

// ---- installing and removing virtual sockets ------------------------------------------------
// The fd number `fd` now names `e`: an eventfd placeholder takes the number (atomically
// replacing whatever was there), so no kernel fd can collide with it.
bool Install(int fd, std::shared_ptr<Entry> e) {
  const int ph = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (ph < 0) return false;
  if (ph != fd) {
    if (REAL(dup3)(ph, fd, O_CLOEXEC) < 0) {
      REAL(close)(ph);
      return false;
    }
    REAL(close)(ph);
  }
  e->vs->SetLazyReadiness();  // every wait on it goes through this library (PollImpl, epoll)
  g_slot[fd].store(std::move(e), std::memory_order_release);
  g_kind[fd].store(kVirtual, std::memory_order_release);
  return true;
}

// A new fd number for `e` (accept).
int InstallNew(std::shared_ptr<Entry> e) {
  const int fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (fd < 0) return -1;
  if (fd >= kMaxFd) {
    REAL(close)(fd);
    LogOnce("fd numbers above 65535 cannot hold virtual sockets");
    return Fail(EMFILE);
  }
  Install(fd, std::move(e));
  return fd;
}

// `nfd`, a number the kernel just duplicated from a virtual socket's, names the same socket.
int Alias(int nfd, std::shared_ptr<Entry> e) {
  if (nfd < 0) return nfd;
  if (nfd >= kMaxFd) {
    REAL(close)(nfd);
    LogOnce("fd numbers above 65535 cannot hold virtual sockets");
    return Fail(EMFILE);
  }
  g_slot[nfd].store(std::move(e), std::memory_order_release);
  g_kind[nfd].store(kVirtual, std::memory_order_release);
  return nfd;
}

uint64_t Tag(int fd, int dir) {
  return (uint64_t{0x4e43} << 48) | (uint64_t{g_nonce & 0xffff} << 32) |
         (static_cast<uint64_t>(fd) << 1) | static_cast<uint64_t>(dir);
}
bool Untag(uint64_t u, int* fd, int* dir) {
  if ((u >> 32) != ((uint64_t{0x4e43} << 16) | (g_nonce & 0xffff))) return false;
  *fd = static_cast<int>((u & 0xffffffffu) >> 1);
  *dir = static_cast<int>(u & 1);
  return true;
}

// Takes a registration's eventfds out of the real epoll set.
void DropReal(int epfd, const Entry& e, const EpollReg& reg) {
  if (reg.present[0]) REAL(epoll_ctl)(epfd, EPOLL_CTL_DEL, e.vs->fd(), nullptr);
  if (reg.present[1]) REAL(epoll_ctl)(epfd, EPOLL_CTL_DEL, e.vs->write_fd(), nullptr);
}

// ---- lazy epoll sets (EpollSet), each with set->mu held -------------------------------------
short VRevents(Entry& e, short events);
void SyncDirty(EpollSet& s, int epfd);
void DropGhost(EpollSet& s, int epfd, int fd);
bool IsLevel(const EpollReg& r) { return !(r.events & (EPOLLET | EPOLLONESHOT)); }

// The registration's socket while fd still names a virtual socket (one load, no count).
Entry* RegEntry(int fd, const EpollReg& r) {
  return (Kind(fd) & kVirtual) ? r.entry.get() : nullptr;
}

void Arm(EpollReg& r, bool on, int fd) {
  if (on && !r.armed) {
    if (RegEntry(fd, r)) {
      r.entry->vs->BeginWait();
      r.armed = r.entry;
    }
  } else if (!on && r.armed) {
    r.armed->vs->EndWait();
    r.armed.reset();
  }
}

EpollSet::~EpollSet() {
  if (g_child.load()) return;
  for (auto& [fd, reg] : regs) Arm(reg, false, fd);
}

void MakeEager(EpollSet& s, int epfd) {
  if (s.eager) return;
  s.eager = true;
  s.level.clear();  // nothing scans an eager set
  SyncDirty(s, epfd);
  for (auto& [fd, reg] : s.regs) Arm(reg, true, fd);
}

// An epoll fd waited on from outside (poll, select, another epoll set) sees virtual sockets
// only through their eventfds: its set turns eager, now or when it gets its first socket.
void EpollWaitedFromOutside(int epfd) {
  if (epfd < 0 || epfd >= kMaxFd || g_child.load()) return;
  std::lock_guard l(g_mu);
  auto set = g_ep[epfd].load();
  if (!set) {
    set = std::make_shared<EpollSet>();
    g_ep[epfd].store(set);
    g_kind[epfd].fetch_or(kEpoll, std::memory_order_release);
  }
  std::lock_guard sl(set->mu);
  MakeEager(*set, epfd);
}

// The ready level-triggered sockets of a lazy set, read from their state, into out[0..max).
int ScanLevel(EpollSet& s, epoll_event* out, int max) {
  int n = 0;
  const size_t len = s.level.size();
  if (len == 0) return 0;
  s.cursor %= len;
  for (size_t i = 0; i < len && n < max; ++i) {
    const int fd = s.level[(s.cursor + i) % len];
    auto it = s.regs.find(fd);
    if (it == s.regs.end()) continue;
    Entry* e = RegEntry(fd, it->second);
    if (!e) continue;
    const uint32_t r =
        static_cast<uint16_t>(VRevents(*e, static_cast<short>(it->second.events & 0xffff)));
    if (r != 0) out[n++] = epoll_event{r, it->second.data};
  }
  ++s.cursor;  // a set with more ready sockets than `max` serves them all in turn
  return n;
}

// Threads asleep in the kernel's epoll_wait on an epoll fd that was not ours when they went
// (no virtual socket in it yet): a socket added meanwhile is armed for them (Settle).
std::atomic<int32_t> g_outside_sleepers[kMaxFd];

// A thread will sleep on the set (+1) or woke (-1): the level-triggered sockets are armed
// while anyone sleeps.
void Sleepers(EpollSet& s, int epfd, int delta) {
  s.sleepers += delta;
  const bool first = delta > 0 && s.sleepers == 1, last = delta < 0 && s.sleepers == 0;
  if (s.eager || !(first || last)) return;
  if (first) SyncDirty(s, epfd);
  if (last && g_outside_sleepers[epfd].load(std::memory_order_seq_cst) > 0) return;
  for (int fd : s.level)
    if (auto it = s.regs.find(fd); it != s.regs.end()) Arm(it->second, first, fd);
}

// After a change to fd's registration in epfd's set (level-triggered before: `was_level`): its
// place in a lazy set's `level`, touched only when that changes — not on every MOD, which event
// loops make per request — and its wait. (The set is marked kEpoll before: a thread about to
// sleep outside it either sees the mark or is counted in g_outside_sleepers here.)
void Settle(EpollSet& s, int epfd, int fd, EpollReg& r, bool was_level) {
  if (!s.eager && IsLevel(r) != was_level) {
    if (IsLevel(r))
      s.level.push_back(fd);
    else
      std::erase(s.level, fd);
  }
  Arm(r,
      !IsLevel(r) || s.eager || s.sleepers > 0 ||
          g_outside_sleepers[epfd].load(std::memory_order_seq_cst) > 0,
      fd);
  if (s.level.size() > kScanLimit) MakeEager(s, epfd);
}

// g_mu held. Removes fd's eventfds from one epoll set.
void EpollUnregisterLocked(int epfd, int fd, Entry& e) {
  EpollReg reg;
  if (auto set = g_ep[epfd].load()) {
    std::lock_guard l(set->mu);
    DropGhost(*set, epfd, fd);
    if (auto it = set->regs.find(fd); it != set->regs.end()) {
      reg = std::move(it->second);
      set->regs.erase(it);
      std::erase(set->level, fd);
    }
  }
  Arm(reg, false, fd);
  DropReal(epfd, e, reg);
}

// Brings one of a socket's eventfds in the real set to `want` (0: disabled) with as few calls
// as the kernel allows: none when a level-triggered registration stays as it is (a MOD with the
// same events changes nothing then); a MOD when edge-triggered or one-shot, where a MOD re-arms
// and the program may rely on it. -1 with errno on failure.
int SyncReal(int epfd, int kfd, uint64_t tag, uint32_t want, bool* present, uint32_t* kev) {
  if (*present && *kev == want && !(want & (EPOLLET | EPOLLONESHOT))) return 0;
  if (!*present && want == 0) return 0;
  epoll_event k{want, {.u64 = tag}};
  if (REAL(epoll_ctl)(epfd, *present ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, kfd, &k) < 0) return -1;
  *present = true;
  *kev = want;
  return 0;
}

// Brings fd's real registrations in epfd up to date with reg.events.
int SyncRegReal(int epfd, int fd, Entry& e, EpollReg& reg) {
  const uint32_t flags = reg.events & (EPOLLET | EPOLLONESHOT);
  const bool want_r = reg.events & (EPOLLIN | EPOLLRDHUP | EPOLLPRI | EPOLLRDNORM);
  const bool want_w = reg.events & (EPOLLOUT | EPOLLWRNORM);
  if (SyncReal(epfd, e.vs->fd(), Tag(fd, 0), want_r ? EPOLLIN | flags : 0, &reg.present[0],
               &reg.kev[0]) < 0 ||
      SyncReal(epfd, e.vs->write_fd(), Tag(fd, 1), want_w ? EPOLLIN | flags : 0, &reg.present[1],
               &reg.kev[1]) < 0)
    return -1;
  reg.dirty = false;
  return 0;
}

// set.mu held: ends a removal the kernel has not seen (EpollSet::ghosts), if its socket lives.
void DropGhost(EpollSet& s, int epfd, int fd) {
  auto it = s.ghosts.find(fd);
  if (it == s.ghosts.end()) return;
  if (auto e = it->second.e.lock()) {
    if (it->second.present[0]) REAL(epoll_ctl)(epfd, EPOLL_CTL_DEL, e->vs->fd(), nullptr);
    if (it->second.present[1]) REAL(epoll_ctl)(epfd, EPOLL_CTL_DEL, e->vs->write_fd(), nullptr);
  }
  s.ghosts.erase(it);
}

// set.mu held: a socket added at fd takes over the kernel registrations its removal left there
// (the same socket back), or ends the removal of another socket that had the number.
void TakeGhost(EpollSet& s, int epfd, int fd, const std::shared_ptr<Entry>& e, EpollReg* r) {
  auto g = s.ghosts.find(fd);
  if (g == s.ghosts.end()) return;
  if (g->second.e.lock() != e) {
    DropGhost(s, epfd, fd);
    return;
  }
  for (int d = 0; d < 2; ++d) r->present[d] = g->second.present[d], r->kev[d] = g->second.kev[d];
  s.ghosts.erase(g);
}

// set.mu held: the deferred changes (EpollSet::ghosts, EpollReg::dirty) reach the kernel before
// anyone sleeps on the set or it turns eager. A failure here has no caller to tell: it is
// logged, and the registration stays dirty (tried again before the next sleep).
void SyncDirty(EpollSet& s, int epfd) {
  while (!s.ghosts.empty()) DropGhost(s, epfd, s.ghosts.begin()->first);
  for (auto& [fd, reg] : s.regs) {
    if (!reg.dirty) continue;
    if (Entry* e = RegEntry(fd, reg); e && SyncRegReal(epfd, fd, *e, reg) < 0)
      Log("epoll_ctl on the eventfds of virtual socket %d: %s", fd, strerror(errno));
  }
}

// What `close` does to our state for fd (without closing the number itself).
void Forget(int fd) {
  const uint8_t k = Kind(fd);
  if (k == 0) return;
  g_kind[fd].store(0, std::memory_order_release);
  std::shared_ptr<Entry> e;
  if (k & kVirtual) e = g_slot[fd].exchange(nullptr);
  std::lock_guard l(g_mu);
  if (k & kCandidate) g_cands->erase(fd);
  if (k & kEpoll) g_ep[fd].store(nullptr);
  // (e->epolls stays: another fd number duplicated from this one may still be registered.)
  if (e && !g_child.load())
    for (int epfd : e->epolls) EpollUnregisterLocked(epfd, fd, *e);
  if (e && g_child.load()) new std::shared_ptr<Entry>(std::move(e));  // the parent's: leak
}

// ---- readiness ----------------------------------------------------------------------------
short VRevents(Entry& e, short events) {
  short r = e.vs->Poll();
  if (e.shut_rd.load(std::memory_order_relaxed)) r |= POLLIN | POLLRDHUP;
  if (r & POLLIN) r |= POLLRDNORM;
  if (r & POLLOUT) r |= POLLWRNORM;
  return static_cast<short>(r & (events | POLLERR | POLLHUP | POLLNVAL));
}

int64_t NowNs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1000000000ll + ts.tv_nsec;
}

// Write watches of a loop that polls the stack when it waits (Stack::SetLoopPollsOnWait): the
// mark holds from one epoll_wait that will poll again to the next wait, which takes it back
// (TakeLoopMark) and, unless it polls, hands what is still watched to the dispatcher.
thread_local bool t_loop_marked = false;

void MarkLoopPollsOnWait(bool polls) {
  t_loop_marked = polls;
  netch::vns::Stack::SetLoopPollsOnWait(polls);
}

bool TakeLoopMark() {
  if (!t_loop_marked) return false;
  MarkLoopPollsOnWait(false);
  return true;
}

void HandOverWatches() {
  std::lock_guard l(g_init_mu);
  if (g) g->stack->HandOverWatches();
}

// The window an event loop's wait polls the stack before it sleeps (NextLoopPollWindow): one
// per thread, shared by its poll/select and epoll_wait calls (a thread waits in one at a time).
thread_local uint32_t t_loop_window_us = UINT32_MAX;  // (first wait: the whole window)
// The thread's recent pass between two waits (NextLoopAwayUs), and when its last wait that could
// sleep returned (0: none yet).
thread_local uint32_t t_loop_away_us = 0;
thread_local int64_t t_wait_returned_ns = 0;

// How long this thread's next wait polls the stack before it sleeps (0: it does not):
// NETCH_BUSY_POLL_US when set, else its loop window, at most NETCH_LOOP_POLL_US.
int64_t LoopWindowUs(const Config& cfg) {
  return cfg.busy_poll_us > 0
             ? cfg.busy_poll_us
             : std::min<uint32_t>(t_loop_window_us, static_cast<uint32_t>(cfg.loop_poll_us));
}

// Threads of this process polling the stack in a wait right now (LoopPoll): at most one. On
// these 2-core hosts eight memcslap client threads all polling in poll() took 5.6 s for what
// they did in 3.1-3.5 s sleeping — each spun its window on a core the others needed. The one
// that polls delivers for all: the others sleep on their sockets' eventfds.
std::atomic<int> g_loop_pollers{0};
// A thread asleep without loans while another polls relies on the poller's rounds to raise its
// sockets. The poller may leave (its wait returns) with the engines still stood down for the rest
// of its lease, and they look again only kStandDownRecheckUs after it: such a sleep is capped at
// this, then the thread looks again — and, with no poller left, borrows the input or sleeps as
// usual. (Handing the engines back at each return of the poller instead, when someone slept,
// cost eight memcslap threads a third of their rate: an engine wakeup per request.)
constexpr int64_t kDependentSleepNs = 500'000;

// A wait's polling of the stack before it sleeps: up to `us` (NETCH_BUSY_POLL_US when set, else
// the thread's loop window, NETCH_LOOP_POLL_US), only while no other thread of the process polls.
class LoopPoll {
 public:
  LoopPoll(const Config* cfg, bool may_sleep, int64_t start_ns) {
    if (!cfg || !may_sleep || g_child.load()) return;
    if (t_wait_returned_ns != 0)  // (a look without waiting is part of the pass)
      t_loop_away_us = netch::preload::NextLoopAwayUs(
          t_loop_away_us,
          static_cast<uint64_t>(std::max<int64_t>(0, start_ns - t_wait_returned_ns)) / 1000);
    us_ = LoopWindowUs(*cfg);
    if (us_ <= 0) return;
    lease_us_ = netch::preload::LoopLeaseUs(static_cast<uint32_t>(us_), t_loop_away_us);
    if (g_loop_pollers.fetch_add(1, std::memory_order_acq_rel) != 0) {
      g_loop_pollers.fetch_sub(1, std::memory_order_relaxed);
      return;
    }
    stack_ = MadeStack();
    if (!stack_) g_loop_pollers.fetch_sub(1, std::memory_order_relaxed);
    end_ns_ = start_ns + us_ * 1000ll;
  }
  ~LoopPoll() { Release(); }
  LoopPoll(const LoopPoll&) = delete;
  LoopPoll& operator=(const LoopPoll&) = delete;
  bool polling() const { return stack_ != nullptr; }
  // One round of the stack on this thread while the window is open (true); at its end, the
  // stack's threads take the work over (and this thread may sleep): false from then on. A wait
  // that returns while polling leaves the engines stood down for the lease (LoopLeaseUs): the
  // loop's pass, until it is back, is the loop's own.
  bool Round(int64_t deadline_ns) {
    if (!stack_) return false;
    const int64_t now = NowNs();
    if (now < end_ns_ && (deadline_ns < 0 || now < deadline_ns)) {
      stack_->PollInline(lease_us_);
      t_round_ns = now;
      t_lease_ns = static_cast<int64_t>(lease_us_) * 1000;
      if (g_lease_holder.load(std::memory_order_relaxed) != &t_round_ns) {
        g_lease_holder.store(&t_round_ns, std::memory_order_relaxed);
        g_lease_moved_ns.store(now, std::memory_order_relaxed);
      }
      return true;
    }
    t_round_ns = 0;  // (the stack's threads have the work back)
    stack_->EndPollInline();
    stack_->HandOverWatches();
    Release();
    return false;
  }

 private:
  void Release() {
    if (stack_) g_loop_pollers.fetch_sub(1, std::memory_order_release);
    stack_ = nullptr;
  }
  netch::vns::Stack* stack_ = nullptr;
  int64_t us_ = 0, end_ns_ = 0;
  uint64_t lease_us_ = 0;

 public:
  // This thread's last polling round, while the stack's threads stand down for it (0: none
  // since it handed the work back), and the lease that round gave (LoopSendRound).
  static inline thread_local int64_t t_round_ns = 0;
  static inline thread_local int64_t t_lease_ns = 0;
  // Whose rounds gave the stack's current lease (that thread's t_round_ns; a thread whose wait
  // returned while polling keeps its own), and when it last passed to another thread
  // (LoopSendRoundDue). Only compared, never followed: a thread that exited leaves an address a
  // new thread may reuse, whose t_round_ns starts at 0 (no send round until its own round).
  static inline std::atomic<const int64_t*> g_lease_holder{nullptr};
  static inline std::atomic<int64_t> g_lease_moved_ns{0};
};

// A polling loop's write, in a pass the stack's threads leave to it (its lease): what the loop
// writes waits for its next wait (deferred, no engine woken) — unless a round is due here
// (LoopSendRoundDue). A pass of redis-benchmark at -P 1 writes a request per connection and the
// server waited for the whole pass: 108k -> 67k req/s, p50 0.32 -> 0.62 ms with deferral alone;
// with this round 84-125k, p50 0.29-0.47.
void LoopSendRound() {
  if (LoopPoll::t_round_ns == 0) return;
  const int64_t now = NowNs();
  if (!netch::preload::LoopSendRoundDue(
          now, LoopPoll::t_round_ns, LoopPoll::t_lease_ns,
          LoopPoll::g_lease_holder.load(std::memory_order_relaxed) == &LoopPoll::t_round_ns,
          LoopPoll::g_lease_moved_ns.load(std::memory_order_relaxed)))
    return;
  netch::vns::Stack* st = MadeStack();
  if (!st) return;
  st->PollInline(static_cast<uint64_t>(LoopPoll::t_lease_ns / 1000));
  LoopPoll::t_round_ns = now;
}

// A wait that returns events: its loop window follows what polling caught, and the thread's
// next wait polls (unless its timeout is 0: then it hands the watches over).
void EndLoopWait(const Config* cfg, int timeout_sign, int64_t call_start, bool got,
                 bool ever_slept) {
  if (!cfg || g_child.load()) return;
  if (timeout_sign != 0 && cfg->loop_poll_us > 0) {  // (a look without waiting tells nothing)
    t_wait_returned_ns = NowNs();
    t_loop_window_us = netch::preload::NextLoopPollWindow(
        t_loop_window_us, static_cast<uint32_t>(cfg->loop_poll_us),
        static_cast<uint64_t>(t_wait_returned_ns - call_start) / 1000, got, ever_slept);
  }
  MarkLoopPollsOnWait(LoopWindowUs(*cfg) > 0);
}

// Between the rounds of a wait that polls (since `start_ns`): a spinner sharing this core may run.
void SpinPause(int64_t start_ns) {
  thread_local netch::chan::PollYielder yielder;
  const int64_t now = NowNs();
  yielder.MaybeYield(static_cast<uint64_t>(now / 1000),
                     static_cast<uint64_t>((now - start_ns) / 1000));
}

// The input of the stack's engines borrowed by a thread about to sleep in a wait (see
// epoll_pwait), returned before the wait returns.
struct WaitLoans {
  netch::chan::InputLoan l[kMaxLoans];
  size_t n = 0;
  int idle_left = kLoanWakeupsWithoutEvents;
  void Borrow(const Config* cfg) {
    if (n > 0 || idle_left <= 0 || !cfg || !cfg->receive_inline || g_child.load()) return;
    // Another thread polls the stack, taking every arrival: borrowed, its input would wake this
    // one for each of them too.
    if (g_loop_pollers.load(std::memory_order_acquire) > 0) return;
    std::lock_guard gl(g_init_mu);
    if (g) n = g->stack->BorrowInputs(l);
    if (n == 0) idle_left = 0;  // nothing to borrow: sleep as usual
  }
  // After a wakeup that brought the waiter nothing: too many, and the loans go back.
  void Idle() {
    if (--idle_left > 0) return;
    ReturnAll();
  }
  void ReturnAll() {
    for (size_t i = 0; i < n; ++i) l[i].Return();
    n = 0;
  }
  ~WaitLoans() { ReturnAll(); }
};

// poll over kernel fds and virtual sockets. Like epoll_wait: an event loop's wait first polls
// the stack on this thread (its engines' and dispatcher's rounds) for its loop window, looking
// at the virtual sockets' state (and the kernel fds without sleeping); then it sleeps on each
// virtual socket's eventfds (read side for POLLIN, write side for POLLOUT), armed only for the
// sleep, beside the borrowed input of the engines — an arrival wakes this thread, which runs
// the round itself, instead of an engine thread that then wakes it (libmemcached's clients wait
// for each reply in poll()). What it reports comes from the sockets themselves.
int PollImpl(pollfd* fds, nfds_t n, const timespec* tmo, const sigset_t* mask) {
  // The loop is back to wait: what its last pass wrote leaves now (DeferTransmitScope), and
  // nothing polls on its behalf while it waits here unless this wait does.
  netch::chan::FlushDeferredTransmit();
  const bool marked = TakeLoopMark();
  bool any = false;
  for (nfds_t i = 0; i < n; ++i) {
    const uint8_t k = Kind(fds[i].fd);
    any |= k & kVirtual;
    if (k & kEpollFd) EpollWaitedFromOutside(fds[i].fd);
  }
  if (!any) {
    if (marked) HandOverWatches();
    return REAL(ppoll)(fds, n, tmo, mask);
  }
  if (g_child.load()) {
    for (nfds_t i = 0; i < n; ++i)
      if (Kind(fds[i].fd) & kVirtual) fds[i].revents = POLLNVAL;
  }
  thread_local std::vector<pollfd> k;
  thread_local std::vector<std::shared_ptr<Entry>> ents;
  k.clear();
  ents.assign(n, nullptr);
  size_t kernel_fds = 0;
  // The references go when poll returns: a socket the program closes next must close then, not
  // at this thread's next poll.
  struct Release {
    bool armed = false;
    void Arm(bool on) {
      if (on == armed) return;
      armed = on;
      for (auto& e : ents)
        if (e) on ? e->vs->BeginWait() : e->vs->EndWait();
    }
    ~Release() {
      Arm(false);
      ents.clear();
    }
  } release;
  for (nfds_t i = 0; i < n; ++i) {
    if (!g_child.load() && (ents[i] = Virt(fds[i].fd))) {
      const Entry& e = *ents[i];
      if (fds[i].events & (POLLIN | POLLRDNORM | POLLRDHUP | POLLPRI))
        k.push_back({e.vs->fd(), POLLIN, 0});
      if (fds[i].events & (POLLOUT | POLLWRNORM)) k.push_back({e.vs->write_fd(), POLLIN, 0});
    } else if (!(Kind(fds[i].fd) & kVirtual)) {
      k.push_back(fds[i]);
      ++kernel_fds;
    }
  }
  const int64_t call_start = NowNs();
  const int64_t deadline = tmo ? call_start + tmo->tv_sec * 1000000000ll + tmo->tv_nsec : -1;
  const bool may_sleep = !tmo || tmo->tv_sec > 0 || tmo->tv_nsec > 0;
  const Config* cfg = Cfg();
  LoopPoll poll(cfg, may_sleep, call_start);
  if (marked && !poll.polling()) HandOverWatches();  // (a polling wait checks them in its rounds)
  bool ever_slept = false;
  WaitLoans loans;
  for (;;) {
    const bool spinning = poll.Round(deadline);
    int ready = 0;
    for (nfds_t i = 0; i < n; ++i)
      if (ents[i] && VRevents(*ents[i], fds[i].events)) ++ready;
    timespec left{0, 0};
    // (A fork child's virtual sockets are POLLNVAL: reported at once.)
    bool sleep = may_sleep && !spinning && ready == 0 && !g_child.load();
    if (sleep && deadline >= 0) {
      const int64_t ns = std::max<int64_t>(0, deadline - NowNs());
      left = {static_cast<time_t>(ns / 1000000000), static_cast<long>(ns % 1000000000)};
      sleep = ns > 0;  // (at the deadline: one last look)
    }
    // Announced, then looked at again, then slept on: an arrival between the look and the sleep
    // raises the eventfd.
    if (sleep) {
      release.Arm(true);
      for (nfds_t i = 0; i < n; ++i)
        if (ents[i] && VRevents(*ents[i], fds[i].events)) ++ready;
    }
    const bool sleeping = sleep && ready == 0;
    if (!sleeping) left = {0, 0};
    int rc = 0;
    bool loan_woke = false;
    if (sleeping) {
      ever_slept = true;
      loans.Borrow(cfg);
      const size_t nk = k.size();
      for (size_t i = 0; i < loans.n; ++i) k.push_back({loans.l[i].fd(), POLLIN, 0});
      const bool dependent = loans.n == 0 && g_loop_pollers.load(std::memory_order_acquire) > 0;
      if (dependent && (deadline < 0 || left.tv_sec > 0 || left.tv_nsec > kDependentSleepNs))
        left = {0, kDependentSleepNs};
      rc = REAL(ppoll)(k.data(), k.size(), deadline >= 0 || dependent ? &left : nullptr, mask);
      const int err = errno;
      for (size_t i = 0; i < loans.n; ++i) {
        if (!k[nk + i].revents) continue;
        loan_woke = true;
        if (rc > 0) --rc;
      }
      if (loan_woke) {
        // Awake before the rounds run: the sockets they fill are this thread's to read
        // (armed, each delivery would write its eventfd for a thread that is already up).
        release.Arm(false);
        for (size_t i = 0; i < loans.n; ++i)
          if (k[nk + i].revents) (void)loans.l[i].Run();
      }
      k.resize(nk);
      errno = err;
    } else if (kernel_fds > 0) {
      rc = REAL(ppoll)(k.data(), k.size(), &left, mask);  // a look, no sleep
    } else {
      for (pollfd& p : k) p.revents = 0;
    }
    if (rc < 0) return -1;
    release.Arm(false);
    int count = 0;
    size_t j = 0;
    for (nfds_t i = 0; i < n; ++i) {
      if (ents[i]) {
        if (fds[i].events & (POLLIN | POLLRDNORM | POLLRDHUP | POLLPRI)) ++j;
        if (fds[i].events & (POLLOUT | POLLWRNORM)) ++j;
        fds[i].revents = VRevents(*ents[i], fds[i].events);
      } else if (!(Kind(fds[i].fd) & kVirtual) || !g_child.load()) {
        fds[i].revents = k[j++].revents;
      }
      if (fds[i].revents) ++count;
    }
    const bool timed_out = deadline >= 0 && NowNs() >= deadline;
    if (count > 0 || timed_out || (!may_sleep && !spinning)) {
      EndLoopWait(cfg, may_sleep ? 1 : 0, call_start, count > 0, ever_slept);
      return count;
    }
    // Woken by an eventfd whose socket has nothing for these events after all, or by a loan
    // whose round brought this wait nothing: wait again.
    if (loan_woke) loans.Idle();
    if (spinning) SpinPause(call_start);
  }
}

int SelectImpl(int nfds, fd_set* r, fd_set* w, fd_set* x, const timespec* tmo,
               const sigset_t* mask) {
  std::vector<pollfd> p;
  for (int fd = 0; fd < nfds && fd < FD_SETSIZE; ++fd) {
    short ev = 0;
    if (r && FD_ISSET(fd, r)) ev |= POLLIN;
    if (w && FD_ISSET(fd, w)) ev |= POLLOUT;
    if (x && FD_ISSET(fd, x)) ev |= POLLPRI;
    if (ev) p.push_back({fd, ev, 0});
  }
  const int rc = PollImpl(p.data(), p.size(), tmo, mask);
  if (rc < 0) return -1;
  for (const pollfd& q : p)
    if (q.revents & POLLNVAL) return Fail(EBADF);
  if (r) FD_ZERO(r);
  if (w) FD_ZERO(w);
  if (x) FD_ZERO(x);
  int count = 0;
  for (const pollfd& q : p) {
    if (r && (q.events & POLLIN) && (q.revents & (POLLIN | POLLHUP | POLLERR))) {
      FD_SET(q.fd, r);
      ++count;
    }
    if (w && (q.events & POLLOUT) && (q.revents & (POLLOUT | POLLERR))) {
      FD_SET(q.fd, w);
      ++count;
    }
    if (x && (q.events & POLLPRI) && (q.revents & POLLPRI)) {
      FD_SET(q.fd, x);
      ++count;
    }
  }
  return count;
}

bool AnyVirtual(int nfds, fd_set* r, fd_set* w, fd_set* x) {
  for (int fd = 0; fd < nfds && fd < FD_SETSIZE; ++fd)
    if ((Kind(fd) & kVirtual) &&
        ((r && FD_ISSET(fd, r)) || (w && FD_ISSET(fd, w)) || (x && FD_ISSET(fd, x))))
      return true;
  return false;
}

// ---- data ---------------------------------------------------------------------------------
ssize_t StatusErr(const absl::Status& st) {
  const int err = netch::vns::Errno(st);
  // -v: why a call failed (the errno alone does not say which of several causes it was).
  if (const Config* c = Cfg(); c && c->verbose && err != EAGAIN && err != EINPROGRESS)
    Log("%s", std::string(st.message()).c_str());
  return Fail(err);
}

ssize_t VRecv(Entry& e, void* buf, size_t len, int flags) {
  if (e.listening) return Fail(ENOTCONN);
  if (flags & (MSG_PEEK | MSG_OOB | MSG_ERRQUEUE)) {
    LogOnce("recv flags MSG_PEEK/MSG_OOB/MSG_ERRQUEUE are not supported on NetChannel sockets");
    return Fail(EOPNOTSUPP);
  }
  if (e.shut_rd.load(std::memory_order_relaxed) || len == 0) return 0;
  if ((flags & MSG_DONTWAIT) && !e.nonblocking.load() && !(e.vs->Poll() & POLLIN))
    return Fail(EAGAIN);
  size_t got = 0;
  do {
    auto n = e.vs->Recv({static_cast<uint8_t*>(buf) + got, len - got});
    if (!n.ok()) return got > 0 ? static_cast<ssize_t>(got) : StatusErr(n.status());
    if (*n == 0) break;
    got += *n;
  } while ((flags & MSG_WAITALL) && got < len);
  return static_cast<ssize_t>(got);
}

ssize_t VSend(Entry& e, const void* buf, size_t len, int flags) {
  if (e.listening) return Fail(ENOTCONN);
  if (flags & MSG_OOB) {
    LogOnce("send flag MSG_OOB is not supported on NetChannel sockets");
    return Fail(EOPNOTSUPP);
  }
  if ((flags & MSG_DONTWAIT) && !e.nonblocking.load() && !(e.vs->Poll() & POLLOUT))
    return Fail(EAGAIN);
  auto n = e.vs->Send({static_cast<const uint8_t*>(buf), len});
  if (!n.ok()) {
    const int err = netch::vns::Errno(n.status());
    if (err == EPIPE && !(flags & MSG_NOSIGNAL)) pthread_kill(pthread_self(), SIGPIPE);
    return Fail(err);
  }
  LoopSendRound();
  return static_cast<ssize_t>(*n);
}

ssize_t VSendV(Entry& e, const iovec* iov, int cnt, int flags) {
  ssize_t total = 0;
  for (int i = 0; i < cnt; ++i) {
    if (iov[i].iov_len == 0) continue;
    const ssize_t n = VSend(e, iov[i].iov_base, iov[i].iov_len, flags);
    if (n < 0) return total > 0 ? total : -1;
    total += n;
    if (static_cast<size_t>(n) < iov[i].iov_len) break;
  }
  return total;
}

// Fills the first buffer (waiting if the socket blocks), then the next ones with what is
// already there.
ssize_t VRecvV(Entry& e, const iovec* iov, int cnt, int flags) {
  ssize_t total = 0;
  for (int i = 0; i < cnt; ++i) {
    if (iov[i].iov_len == 0) continue;
    if (total > 0 && e.vs->Available() == 0) break;
    const ssize_t n = VRecv(e, iov[i].iov_base, iov[i].iov_len, flags);
    if (n < 0) return total > 0 ? total : -1;
    total += n;
    if (n == 0 || static_cast<size_t>(n) < iov[i].iov_len) break;
  }
  return total;
}

void FillAddr(uint32_t ip, uint16_t port, sockaddr* addr, socklen_t* len) {
  if (addr == nullptr || len == nullptr) return;
  sockaddr_in sin{};
  sin.sin_family = AF_INET;
  sin.sin_addr.s_addr = htonl(ip);
  sin.sin_port = htons(port);
  std::memcpy(addr, &sin, std::min<size_t>(*len, sizeof(sin)));
  *len = sizeof(sin);
}

uint64_t OptKey(int level, int name) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(level)) << 32) | static_cast<uint32_t>(name);
}

bool IsTcp4(int domain, int type, int proto) {
  return domain == AF_INET && (type & 0xf) == SOCK_STREAM && (proto == 0 || proto == IPPROTO_TCP);
}

void AtForkPrepare() {
  g_init_mu.lock();
  g_mu.lock();
}
void AtForkParent() {
  g_mu.unlock();
  g_init_mu.unlock();
}
void AtForkChild() {
  g_child.store(true);
  g_mu.unlock();
  g_init_mu.unlock();
}

__attribute__((constructor)) void Init() {
  g_nonce = static_cast<uint32_t>(getpid() * 2654435761u) ^ static_cast<uint32_t>(NowNs());
  pthread_atfork(AtForkPrepare, AtForkParent, AtForkChild);
}

// Shared by connect() and listen(): the candidate's recorded state, removed from the table.
bool TakeCandidate(int fd, Candidate* out) {
  std::lock_guard l(g_mu);
  auto it = g_cands->find(fd);
  if (it == g_cands->end()) return false;
  *out = it->second;
  return true;
}

}  // namespace

// ---- the interposed calls -----------------------------------------------------------------
extern "C" {

int socket(int domain, int type, int proto) noexcept {
  const int fd = REAL(socket)(domain, type, proto);
  if (fd < 0 || t_internal || g_child.load() || !IsTcp4(domain, type, proto)) return fd;
  if (fd >= kMaxFd) {
    LogOnce("fd numbers above 65535 stay on the kernel");
    return fd;
  }
  std::lock_guard l(g_mu);
  (*g_cands)[fd] = Candidate{};
  g_kind[fd].store(kCandidate, std::memory_order_release);
  return fd;
}

int bind(int fd, const sockaddr* addr, socklen_t len) noexcept {
  if (!(Kind(fd) & kCandidate) || addr == nullptr || len < sizeof(sockaddr_in) ||
      addr->sa_family != AF_INET)
    return REAL(bind)(fd, addr, len);
  if (Kind(fd) & kVirtual) return Fail(EINVAL);
  const auto* sin = reinterpret_cast<const sockaddr_in*>(addr);
  const uint32_t ip = ntohl(sin->sin_addr.s_addr);
  const uint16_t port = ntohs(sin->sin_port);
  const Config* c = Cfg();
  if (!c || !c->RoutesListen(ip, port) || port == NC_DEFAULT_UDP_PORT)
    return REAL(bind)(fd, addr, len);
  // Not bound in the kernel: listen() will make it a NetChannel listener.
  std::lock_guard l(g_mu);
  auto& cand = (*g_cands)[fd];
  cand.bind_ip = ip;
  cand.bind_port = port;
  cand.routed_bind = true;
  return 0;
}

int listen(int fd, int backlog) noexcept {
  if (auto e = Virt(fd)) return e->listening ? 0 : Fail(EINVAL);
  Candidate cand;
  if (!(Kind(fd) & kCandidate) || !TakeCandidate(fd, &cand) || !cand.routed_bind)
    return REAL(listen)(fd, backlog);
  auto* stack = GetStack();
  if (!stack) return -1;
  netch::vns::SocketOptions so;
  so.nodelay = cand.nodelay;
  if (cand.rcvbuf > 0) so.rcvbuf = std::max(4096, cand.rcvbuf);
  t_internal = true;
  auto vs = stack->Listen(cand.bind_port, std::clamp(backlog, 1, 4096), so);
  t_internal = false;
  if (!vs.ok()) return static_cast<int>(StatusErr(vs.status()));
  auto e = std::make_shared<Entry>();
  e->vs = std::move(*vs);
  e->listening = true;
  e->bound_ip = cand.bind_ip;
  const bool nb = REAL(fcntl)(fd, F_GETFL) & O_NONBLOCK;
  e->nonblocking = nb;
  e->vs->SetNonBlocking(nb);
  {
    std::lock_guard l(g_mu);
    g_cands->erase(fd);
  }
  if (!Install(fd, e)) return -1;
  if (const Config* c = Cfg(); c && c->verbose)
    Log("fd %d listens on NetChannel port %u", fd, cand.bind_port);
  return 0;
}

int connect(int fd, const sockaddr* addr, socklen_t len) {
  if (auto e = Virt(fd)) return Fail(e->listening ? EINVAL : EISCONN);
  if (!(Kind(fd) & kCandidate) || addr == nullptr || len < sizeof(sockaddr_in) ||
      addr->sa_family != AF_INET)
    return REAL(connect)(fd, addr, len);
  const auto* sin = reinterpret_cast<const sockaddr_in*>(addr);
  const uint32_t ip = ntohl(sin->sin_addr.s_addr);
  const uint16_t port = ntohs(sin->sin_port);
  const Config* c = Cfg();
  Candidate cand;
  if (!c || !c->RoutesPeer(ip, port) || port == NC_DEFAULT_UDP_PORT || !TakeCandidate(fd, &cand))
    return REAL(connect)(fd, addr, len);
  auto* stack = GetStack();
  if (!stack) return -1;
  const bool nb = REAL(fcntl)(fd, F_GETFL) & O_NONBLOCK;
  netch::vns::SocketOptions so;
  so.nonblocking = nb;
  so.nodelay = cand.nodelay;
  so.app_class = static_cast<netch::vns::AppClass>(c->app_class);
  so.busy_poll_us = c->busy_poll_us;
  so.connect_timeout = absl::Milliseconds(c->connect_timeout_ms);
  if (cand.rcvbuf > 0) so.rcvbuf = std::max(4096, cand.rcvbuf);
  t_internal = true;
  auto vs = stack->Connect(ip, port, so);
  t_internal = false;
  if (!vs.ok()) return static_cast<int>(StatusErr(vs.status()));
  auto e = std::make_shared<Entry>();
  e->vs = std::move(*vs);
  e->nonblocking = nb;
  {
    std::lock_guard l(g_mu);
    g_cands->erase(fd);
  }
  if (!Install(fd, e)) return -1;
  if (c->verbose) Log("fd %d connects over NetChannel to port %u", fd, port);
  return nb ? Fail(EINPROGRESS) : 0;
}

int accept4(int fd, sockaddr* addr, socklen_t* len, int flags) {
  auto e = Virt(fd);
  if (!e) return REAL(accept4)(fd, addr, len, flags);
  if (g_child.load()) return Fail(EBADF);
  if (!e->listening) return Fail(EINVAL);
  auto s = e->vs->Accept();
  if (!s.ok()) return static_cast<int>(StatusErr(s.status()));
  auto ne = std::make_shared<Entry>();
  ne->vs = std::move(*s);
  ne->nonblocking = flags & SOCK_NONBLOCK;
  ne->vs->SetNonBlocking(flags & SOCK_NONBLOCK);
  if (const Config* c = Cfg(); c && c->busy_poll_us >= 0) ne->vs->SetBusyPoll(c->busy_poll_us);
  FillAddr(ne->vs->remote_ipv4(), ne->vs->remote_port(), addr, len);
  return InstallNew(std::move(ne));
}

int accept(int fd, sockaddr* addr, socklen_t* len) {
  if (!(Kind(fd) & kVirtual)) return REAL(accept)(fd, addr, len);
  return accept4(fd, addr, len, 0);
}

int close(int fd) {
  if (Kind(fd) == 0) return REAL(close)(fd);
  Forget(fd);
  return REAL(close)(fd);
}

// close_range(2) closes numbers behind our back: forget the virtual ones in the range first.
int close_range(unsigned first, unsigned last, int flags) noexcept {
  if (!(flags & CLOSE_RANGE_CLOEXEC))
    for (unsigned fd = first; fd <= last && fd < static_cast<unsigned>(kMaxFd); ++fd)
      if (Kind(static_cast<int>(fd)) != 0) Forget(static_cast<int>(fd));
  return REAL(close_range)(first, last, flags);
}

// sendfile to a virtual socket: read the file in 64 KiB pieces and send them (one copy more
// than the kernel's zero-copy path; correct, not fast).
static ssize_t SendFileImpl(int out, int in, off64_t* offset, size_t count) {
  auto e = Virt(out);
  if (!e || g_child.load()) return Fail(EBADF);
  thread_local std::vector<uint8_t> buf(64 << 10);
  size_t total = 0;
  while (total < count) {
    const size_t want = std::min(buf.size(), count - total);
    const ssize_t r =
        offset ? pread64(in, buf.data(), want, *offset) : REAL(read)(in, buf.data(), want);
    if (r < 0) return total > 0 ? static_cast<ssize_t>(total) : -1;
    if (r == 0) break;
    const ssize_t w = VSend(*e, buf.data(), static_cast<size_t>(r), 0);
    if (w < 0) return total > 0 ? static_cast<ssize_t>(total) : -1;
    total += static_cast<size_t>(w);
    if (offset)
      *offset += w;
    else if (w < r)
      lseek64(in, w - r, SEEK_CUR);  // give back what the socket did not take
    if (w < r) break;
  }
  return static_cast<ssize_t>(total);
}

ssize_t sendfile(int out, int in, off_t* offset, size_t count) noexcept {
  if (!(Kind(out) & kVirtual)) return REAL(sendfile)(out, in, offset, count);
  off64_t o = offset ? *offset : 0;
  const ssize_t r = SendFileImpl(out, in, offset ? &o : nullptr, count);
  if (offset) *offset = static_cast<off_t>(o);
  return r;
}

ssize_t sendfile64(int out, int in, off64_t* offset, size_t count) noexcept {
  if (!(Kind(out) & kVirtual)) return REAL(sendfile64)(out, in, offset, count);
  return SendFileImpl(out, in, offset, count);
}

int shutdown(int fd, int how) noexcept {
  auto e = Virt(fd);
  if (!e) return REAL(shutdown)(fd, how);
  if (g_child.load()) return Fail(EBADF);
  if (e->listening) return Fail(ENOTCONN);
  if (how != SHUT_RD && how != SHUT_WR && how != SHUT_RDWR) return Fail(EINVAL);
  if (how != SHUT_WR) e->shut_rd = true;
  if (how != SHUT_RD)
    if (auto st = e->vs->Shutdown(); !st.ok()) return static_cast<int>(StatusErr(st));
  return 0;
}

ssize_t read(int fd, void* buf, size_t n) {
  if (!(Kind(fd) & kVirtual)) return REAL(read)(fd, buf, n);
  auto e = Virt(fd);
  if (!e || g_child.load()) return Fail(EBADF);
  return VRecv(*e, buf, n, 0);
}

ssize_t write(int fd, const void* buf, size_t n) {
  if (!(Kind(fd) & kVirtual)) return REAL(write)(fd, buf, n);
  auto e = Virt(fd);
  if (!e || g_child.load()) return Fail(EBADF);
  return VSend(*e, buf, n, 0);
}

ssize_t recv(int fd, void* buf, size_t n, int flags) {
  auto e = Virt(fd);
  if (!e) return REAL(recv)(fd, buf, n, flags);
  if (g_child.load()) return Fail(EBADF);
  return VRecv(*e, buf, n, flags);
}

ssize_t send(int fd, const void* buf, size_t n, int flags) {
  auto e = Virt(fd);
  if (!e) return REAL(send)(fd, buf, n, flags);
  if (g_child.load()) return Fail(EBADF);
  return VSend(*e, buf, n, flags);
}

ssize_t recvfrom(int fd, void* buf, size_t n, int flags, sockaddr* addr, socklen_t* len) {
  auto e = Virt(fd);
  if (!e) return REAL(recvfrom)(fd, buf, n, flags, addr, len);
  if (g_child.load()) return Fail(EBADF);
  const ssize_t r = VRecv(*e, buf, n, flags);
  if (r >= 0) FillAddr(e->vs->remote_ipv4(), e->vs->remote_port(), addr, len);
  return r;
}

ssize_t sendto(int fd, const void* buf, size_t n, int flags, const sockaddr* addr, socklen_t len) {
  auto e = Virt(fd);
  if (!e) return REAL(sendto)(fd, buf, n, flags, addr, len);
  if (g_child.load()) return Fail(EBADF);
  if (addr != nullptr) return Fail(EISCONN);
  return VSend(*e, buf, n, flags);
}

ssize_t readv(int fd, const iovec* iov, int cnt) {
  auto e = Virt(fd);
  if (!e) return REAL(readv)(fd, iov, cnt);
  if (g_child.load()) return Fail(EBADF);
  return VRecvV(*e, iov, cnt, 0);
}

ssize_t writev(int fd, const iovec* iov, int cnt) {
  auto e = Virt(fd);
  if (!e) return REAL(writev)(fd, iov, cnt);
  if (g_child.load()) return Fail(EBADF);
  return VSendV(*e, iov, cnt, 0);
}

ssize_t recvmsg(int fd, msghdr* m, int flags) {
  auto e = Virt(fd);
  if (!e) return REAL(recvmsg)(fd, m, flags);
  if (g_child.load()) return Fail(EBADF);
  const ssize_t r = VRecvV(*e, m->msg_iov, static_cast<int>(m->msg_iovlen), flags);
  if (r >= 0) {
    m->msg_flags = 0;
    m->msg_controllen = 0;
    if (m->msg_name)
      FillAddr(e->vs->remote_ipv4(), e->vs->remote_port(), static_cast<sockaddr*>(m->msg_name),
               &m->msg_namelen);
  }
  return r;
}

ssize_t sendmsg(int fd, const msghdr* m, int flags) {
  auto e = Virt(fd);
  if (!e) return REAL(sendmsg)(fd, m, flags);
  if (g_child.load()) return Fail(EBADF);
  if (m->msg_controllen > 0) {
    LogOnce("sendmsg with ancillary data is not supported on NetChannel sockets");
    return Fail(EOPNOTSUPP);
  }
  return VSendV(*e, m->msg_iov, static_cast<int>(m->msg_iovlen), flags);
}

// Fortified variants (_FORTIFY_SOURCE): the same calls with a buffer-size check.
ssize_t __read_chk(int fd, void* buf, size_t n, size_t buflen) {
  if (n > buflen) abort();
  return read(fd, buf, n);
}
ssize_t __recv_chk(int fd, void* buf, size_t n, size_t buflen, int flags) {
  if (n > buflen) abort();
  return recv(fd, buf, n, flags);
}
ssize_t __recvfrom_chk(int fd, void* buf, size_t n, size_t buflen, int flags, sockaddr* a,
                       socklen_t* l) {
  if (n > buflen) abort();
  return recvfrom(fd, buf, n, flags, a, l);
}

int getsockname(int fd, sockaddr* addr, socklen_t* len) noexcept {
  auto e = Virt(fd);
  if (!e) {
    // A candidate bound for a NetChannel listen() was not bound in the kernel.
    Candidate cand;
    if ((Kind(fd) & kCandidate) && TakeCandidate(fd, &cand) && cand.routed_bind) {
      FillAddr(cand.bind_ip, cand.bind_port, addr, len);
      return 0;
    }
    return REAL(getsockname)(fd, addr, len);
  }
  if (g_child.load()) return Fail(EBADF);
  const Config* c = Cfg();
  FillAddr(e->listening ? e->bound_ip : (c ? c->local_ip : 0), e->vs->local_port(), addr, len);
  return 0;
}

int getpeername(int fd, sockaddr* addr, socklen_t* len) noexcept {
  auto e = Virt(fd);
  if (!e) return REAL(getpeername)(fd, addr, len);
  if (g_child.load()) return Fail(EBADF);
  if (e->listening || e->vs->remote_port() == 0) return Fail(ENOTCONN);
  FillAddr(e->vs->remote_ipv4(), e->vs->remote_port(), addr, len);
  return 0;
}

int setsockopt(int fd, int level, int name, const void* val, socklen_t len) noexcept {
  const uint8_t k = Kind(fd);
  if (!(k & kVirtual)) {
    if ((k & kCandidate) && val != nullptr && len >= sizeof(int)) {
      // Remembered for the virtual socket it may become.
      std::lock_guard l(g_mu);
      if (auto it = g_cands->find(fd); it != g_cands->end()) {
        const int v = *static_cast<const int*>(val);
        if (level == IPPROTO_TCP && name == TCP_NODELAY) it->second.nodelay = v != 0;
        if (level == SOL_SOCKET && name == SO_RCVBUF) it->second.rcvbuf = v;
      }
    }
    return REAL(setsockopt)(fd, level, name, val, len);
  }
  auto e = Virt(fd);
  if (!e || g_child.load()) return Fail(EBADF);
  if (val == nullptr && len > 0) return Fail(EFAULT);
  const int v = val != nullptr && len >= sizeof(int) ? *static_cast<const int*>(val) : 0;
  if (level == IPPROTO_TCP && name == TCP_NODELAY) {
    e->vs->SetNoDelay(v != 0);
  } else if (level == SOL_SOCKET &&
             (name == SO_REUSEADDR || name == SO_REUSEPORT || name == SO_KEEPALIVE ||
              name == SO_RCVBUF || name == SO_SNDBUF || name == SO_LINGER)) {
    // Meaningless or already true for a NetChannel socket (no TIME_WAIT; channel liveness is the
    // keepalive; buffers are set at connect/listen; close always flushes): kept for getsockopt.
  } else if (level == IPPROTO_TCP &&
             (name == TCP_KEEPIDLE || name == TCP_KEEPINTVL || name == TCP_KEEPCNT ||
              name == TCP_QUICKACK || name == TCP_CORK || name == TCP_USER_TIMEOUT)) {
  } else {
    LogOnce(
        absl::StrFormat("setsockopt(level %d, option %d) kept but not applied on a NetChannel "
                        "socket",
                        level, name));
  }
  std::lock_guard l(e->opt_mu);
  e->opts[OptKey(level, name)] = std::string(static_cast<const char*>(val), len);
  return 0;
}

// The kernel's struct tcp_info (linux/tcp.h) up to tcpi_bytes_received: glibc declares only the
// fields up to tcpi_total_retrans, and programs built against the kernel's header ask for more.
// The ABI only grows at the end; a caller gets min(its length, ours), as from the kernel.
struct KernelTcpInfo {
  tcp_info base;
  uint64_t pacing_rate, max_pacing_rate, bytes_acked, bytes_received;
};
static_assert(offsetof(KernelTcpInfo, bytes_received) == 128);

// TCP_INFO for a virtual socket (iperf3, nginx's $tcpinfo_rtt, ... read it): its state and byte
// counts, and its channels' transport figures (VirtualSocket::Info: shared channels, so RTT,
// window and retransmissions are theirs). What has no counterpart stays 0 (rttvar, pacing).
int PutTcpInfo(const netch::vns::TransportInfo& t, void* val, socklen_t* len) {
  using S = netch::vns::TransportInfo::State;
  KernelTcpInfo k{};
  tcp_info& b = k.base;
  switch (t.state) {
    case S::kListening:
      b.tcpi_state = TCP_LISTEN;
      break;
    case S::kConnecting:
      b.tcpi_state = TCP_SYN_SENT;
      break;
    case S::kEstablished:
      b.tcpi_state = t.shut_down && t.peer_finished ? TCP_CLOSE
                     : t.shut_down                  ? TCP_FIN_WAIT2
                     : t.peer_finished              ? TCP_CLOSE_WAIT
                                                    : TCP_ESTABLISHED;
      break;
    case S::kClosed:
      b.tcpi_state = TCP_CLOSE;
      break;
  }
  b.tcpi_snd_mss = b.tcpi_rcv_mss = b.tcpi_advmss = t.mss;
  b.tcpi_rtt = static_cast<uint32_t>(std::min<uint64_t>(t.srtt_us, UINT32_MAX));
  b.tcpi_snd_cwnd = t.cwnd_packets;
  b.tcpi_total_retrans = static_cast<uint32_t>(std::min<uint64_t>(t.retransmits, UINT32_MAX));
  if (t.mss > 0)
    b.tcpi_unacked = static_cast<uint32_t>(
        std::min<uint64_t>((t.unacked_bytes + t.mss - 1) / t.mss, UINT32_MAX));
  k.bytes_acked = t.bytes_sent - std::min(t.unacked_bytes, t.bytes_sent);
  k.bytes_received = t.bytes_received;
  const socklen_t n = std::min<socklen_t>(*len, sizeof(k));
  std::memcpy(val, &k, n);
  *len = n;
  return 0;
}

int getsockopt(int fd, int level, int name, void* val, socklen_t* len) noexcept {
  auto e = Virt(fd);
  if (!e) return REAL(getsockopt)(fd, level, name, val, len);
  if (g_child.load()) return Fail(EBADF);
  if (val == nullptr || len == nullptr) return Fail(EFAULT);
  auto put_int = [&](int v) {
    if (*len < sizeof(int)) return Fail(EINVAL);
    std::memcpy(val, &v, sizeof(int));
    *len = sizeof(int);
    return 0;
  };
  if (level == SOL_SOCKET) {
    switch (name) {
      case SO_ERROR:
        return put_int(e->vs->Error());
      case SO_TYPE:
        return put_int(SOCK_STREAM);
      case SO_DOMAIN:
        return put_int(AF_INET);
      case SO_PROTOCOL:
        return put_int(IPPROTO_TCP);
      case SO_ACCEPTCONN:
        return put_int(e->listening ? 1 : 0);
      default:
        break;
    }
  }
  // Answered from the socket now, never from a value a setsockopt left.
  if (level == IPPROTO_TCP && name == TCP_INFO) return PutTcpInfo(e->vs->Info(), val, len);
  {
    std::lock_guard l(e->opt_mu);
    if (auto it = e->opts.find(OptKey(level, name)); it != e->opts.end()) {
      const socklen_t n = std::min<socklen_t>(*len, it->second.size());
      std::memcpy(val, it->second.data(), n);
      *len = n;
      return 0;
    }
  }
  if (level == SOL_SOCKET && (name == SO_RCVBUF || name == SO_SNDBUF)) return put_int(4 << 20);
  if ((level == SOL_SOCKET && (name == SO_REUSEADDR || name == SO_KEEPALIVE)) ||
      (level == IPPROTO_TCP && name == TCP_NODELAY))
    return put_int(0);
  LogOnce(absl::StrFormat("getsockopt(level %d, option %d) is not known on NetChannel sockets",
                          level, name));
  return Fail(ENOPROTOOPT);
}

static int FcntlImpl(int fd, int cmd, long arg) {
  auto e = Virt(fd);
  if (!e) return REAL(fcntl)(fd, cmd, arg);
  if (g_child.load() && cmd != F_GETFD && cmd != F_SETFD) return Fail(EBADF);
  switch (cmd) {
    case F_GETFL:
      return O_RDWR | (e->nonblocking.load() ? O_NONBLOCK : 0);
    case F_SETFL: {
      const bool nb = arg & O_NONBLOCK;
      e->nonblocking = nb;
      e->vs->SetNonBlocking(nb);
      return 0;
    }
    case F_GETFD:
    case F_SETFD:
      return REAL(fcntl)(fd, cmd, arg);
    case F_DUPFD:
    case F_DUPFD_CLOEXEC:
      return Alias(REAL(fcntl)(fd, cmd, arg), std::move(e));
    default:
      LogOnce(absl::StrFormat("fcntl command %d is not supported on NetChannel sockets", cmd));
      return Fail(EINVAL);
  }
}

int fcntl(int fd, int cmd, ...) {
  va_list ap;
  va_start(ap, cmd);
  const long arg = va_arg(ap, long);
  va_end(ap);
  return FcntlImpl(fd, cmd, arg);
}

int fcntl64(int fd, int cmd, ...) {
  va_list ap;
  va_start(ap, cmd);
  const long arg = va_arg(ap, long);
  va_end(ap);
  return FcntlImpl(fd, cmd, arg);
}

int ioctl(int fd, unsigned long req, ...) noexcept {
  va_list ap;
  va_start(ap, req);
  void* arg = va_arg(ap, void*);
  va_end(ap);
  auto e = Virt(fd);
  if (!e) return REAL(ioctl)(fd, req, arg);
  if (g_child.load()) return Fail(EBADF);
  if (req == FIONBIO) {
    const bool nb = *static_cast<int*>(arg) != 0;
    e->nonblocking = nb;
    e->vs->SetNonBlocking(nb);
    return 0;
  }
  if (req == FIONREAD) {
    *static_cast<int*>(arg) =
        e->listening ? 0 : static_cast<int>(std::min<size_t>(e->vs->Available(), INT32_MAX));
    return 0;
  }
  LogOnce(absl::StrFormat("ioctl 0x%x is not supported on NetChannel sockets", req));
  return Fail(ENOTTY);
}

int dup(int fd) noexcept {
  auto e = Virt(fd);
  const int nfd = REAL(dup)(fd);
  return e ? Alias(nfd, std::move(e)) : nfd;
}

int dup3(int fd, int nfd, int flags) noexcept {
  auto e = Virt(fd);
  if (fd == nfd) return REAL(dup3)(fd, nfd, flags);  // EINVAL, as libc says
  if (nfd >= 0 && nfd < kMaxFd) Forget(nfd);         // dup3 closes what nfd named
  const int r = REAL(dup3)(fd, nfd, flags);
  return e ? Alias(r, std::move(e)) : r;
}

int dup2(int fd, int nfd) noexcept {
  if (fd == nfd) return REAL(dup2)(fd, nfd);
  return dup3(fd, nfd, 0);
}

int poll(pollfd* fds, nfds_t n, int timeout) {
  if (timeout < 0) return PollImpl(fds, n, nullptr, nullptr);
  const timespec ts{timeout / 1000, (timeout % 1000) * 1000000l};
  return PollImpl(fds, n, &ts, nullptr);
}

int ppoll(pollfd* fds, nfds_t n, const timespec* tmo, const sigset_t* mask) {
  return PollImpl(fds, n, tmo, mask);
}

int __poll_chk(pollfd* fds, nfds_t n, int timeout, size_t fdslen) {
  if (fdslen / sizeof(pollfd) < n) abort();
  return poll(fds, n, timeout);
}

int select(int nfds, fd_set* r, fd_set* w, fd_set* x, timeval* tv) {
  if (!AnyVirtual(nfds, r, w, x)) return REAL(select)(nfds, r, w, x, tv);
  if (tv == nullptr) return SelectImpl(nfds, r, w, x, nullptr, nullptr);
  const timespec ts{tv->tv_sec, tv->tv_usec * 1000};
  return SelectImpl(nfds, r, w, x, &ts, nullptr);
}

int pselect(int nfds, fd_set* r, fd_set* w, fd_set* x, const timespec* tmo, const sigset_t* mask) {
  if (!AnyVirtual(nfds, r, w, x)) return REAL(pselect)(nfds, r, w, x, tmo, mask);
  return SelectImpl(nfds, r, w, x, tmo, mask);
}

// Epoll fds are marked so that one waited on from outside (PollImpl, a nested set) is found.
int epoll_create1(int flags) noexcept {
  const int fd = REAL(epoll_create1)(flags);
  if (fd >= 0 && fd < kMaxFd) g_kind[fd].fetch_or(kEpollFd, std::memory_order_release);
  return fd;
}

int epoll_create(int size) noexcept {
  if (size <= 0) return Fail(EINVAL);
  return epoll_create1(0);
}

int epoll_ctl(int epfd, int op, int fd, epoll_event* ev) noexcept {
  auto e = Virt(fd);
  if (!e) {
    if (op == EPOLL_CTL_ADD && (Kind(fd) & kEpollFd)) EpollWaitedFromOutside(fd);  // nested
    return REAL(epoll_ctl)(epfd, op, fd, ev);
  }
  if (g_child.load()) return Fail(EBADF);
  if (epfd < 0 || epfd >= kMaxFd) return Fail(EINVAL);
  std::lock_guard l(g_mu);
  auto set = g_ep[epfd].load();
  if (!set) {
    set = std::make_shared<EpollSet>();
    g_ep[epfd].store(set);
  }
  bool have;
  EpollReg reg;
  {
    std::lock_guard sl(set->mu);
    auto it = set->regs.find(fd);
    have = it != set->regs.end();
    if (have) reg = it->second;
  }
  const bool was_level = have && IsLevel(reg);
  // Level-triggered changes in a lazy set nobody sleeps on reach the kernel only when someone is
  // about to (EpollReg::dirty, EpollSet::ghosts): until then only the scan reads them.
  const auto deferrable = [&](const EpollSet& st) {
    return !st.eager && st.sleepers == 0 &&
           g_outside_sleepers[epfd].load(std::memory_order_seq_cst) == 0;
  };
  if (op == EPOLL_CTL_DEL && was_level) {
    std::lock_guard sl(set->mu);
    auto it = set->regs.find(fd);
    if (it != set->regs.end() && deferrable(*set)) {
      DropGhost(*set, epfd, fd);  // (an older one of another socket at this number)
      EpollSet::Ghost& g = set->ghosts[fd];
      g.e = e;
      for (int d = 0; d < 2; ++d)
        g.present[d] = it->second.present[d], g.kev[d] = it->second.kev[d];
      Arm(it->second, false, fd);
      set->regs.erase(it);
      std::erase(set->level, fd);
      std::erase(e->epolls, epfd);
      return 0;
    }
  }
  if (op == EPOLL_CTL_ADD && !have && ev && !(ev->events & (EPOLLET | EPOLLONESHOT))) {
    std::lock_guard sl(set->mu);
    if (deferrable(*set)) {
      EpollReg r;
      r.events = ev->events;
      r.data = ev->data;
      r.dirty = true;
      r.entry = e;
      TakeGhost(*set, epfd, fd, e, &r);
      g_kind[epfd].fetch_or(kEpoll, std::memory_order_seq_cst);
      EpollReg& placed = set->regs[fd] = std::move(r);
      Settle(*set, epfd, fd, placed, /*was_level=*/false);
      if (std::find(e->epolls.begin(), e->epolls.end(), epfd) == e->epolls.end())
        e->epolls.push_back(epfd);
      return 0;
    }
  }
  if (op == EPOLL_CTL_DEL) {
    if (!have) return Fail(ENOENT);
    EpollUnregisterLocked(epfd, fd, *e);
    std::erase(e->epolls, epfd);
    return 0;
  }
  if (ev == nullptr) return Fail(EFAULT);
  if (op == EPOLL_CTL_ADD && have) return Fail(EEXIST);
  if (op == EPOLL_CTL_MOD && !have) return Fail(ENOENT);
  if (op != EPOLL_CTL_ADD && op != EPOLL_CTL_MOD) return Fail(EINVAL);
  if (op == EPOLL_CTL_MOD && was_level && !(ev->events & (EPOLLET | EPOLLONESHOT))) {
    std::lock_guard sl(set->mu);
    auto it = set->regs.find(fd);
    if (it != set->regs.end() && deferrable(*set)) {
      it->second.events = ev->events;
      it->second.data = ev->data;
      it->second.dirty = true;
      return 0;
    }
  }
  if (op == EPOLL_CTL_ADD) {  // a removal the kernel has not seen yet: take it over, or end it
    reg.entry = e;
    std::lock_guard sl(set->mu);
    TakeGhost(*set, epfd, fd, e, &reg);
  }
  // Each direction's eventfd signals with EPOLLIN; the program's ET/ONESHOT apply to both.
  const uint32_t old_events = reg.events;
  reg.events = ev->events;
  const bool failed = SyncRegReal(epfd, fd, *e, reg) < 0;
  if (failed) reg.events = old_events;
  if (failed && !have) {  // a failed ADD leaves nothing behind
    const int err = errno;
    DropReal(epfd, *e, reg);
    return Fail(err);
  }
  if (!failed) reg.data = ev->data;
  {
    std::lock_guard sl(set->mu);
    g_kind[epfd].fetch_or(kEpoll, std::memory_order_seq_cst);
    EpollReg& r = set->regs[fd] = reg;  // (after a failed MOD: the old one, as far as it is left)
    Settle(*set, epfd, fd, r, was_level);
  }
  if (failed) return -1;
  if (std::find(e->epolls.begin(), e->epolls.end(), epfd) == e->epolls.end())
    e->epolls.push_back(epfd);
  return 0;
}

int epoll_pwait(int epfd, epoll_event* out, int max, int timeout, const sigset_t* mask) {
  // The loop is back to wait: what its last pass wrote leaves now, in one round per engine on
  // this thread (DeferTransmitScope), before it sleeps or looks at the set.
  netch::chan::FlushDeferredTransmit();
  const bool marked = TakeLoopMark();
  if (const uint8_t k = Kind(epfd); !(k & kEpoll)) {
    if (marked) HandOverWatches();
    if (timeout == 0 || !(k & kEpollFd)) return REAL(epoll_pwait)(epfd, out, max, timeout, mask);
    // Counted, then checked again: a virtual socket registered from now on is armed for us.
    g_outside_sleepers[epfd].fetch_add(1, std::memory_order_seq_cst);
    if (!(Kind(epfd) & kEpoll)) {
      const int rc = REAL(epoll_pwait)(epfd, out, max, timeout, mask);
      const int err = errno;
      g_outside_sleepers[epfd].fetch_sub(1, std::memory_order_relaxed);
      errno = err;
      return rc;
    }
    g_outside_sleepers[epfd].fetch_sub(1, std::memory_order_relaxed);
  }
  if (max <= 0) return Fail(EINVAL);
  thread_local std::vector<epoll_event> buf;
  thread_local std::vector<std::pair<int, int>> seen;  // (virtual fd, index in out)
  buf.resize(max);
  const int64_t deadline = timeout >= 0 ? NowNs() + timeout * 1000000ll : -1;
  // Busy polling: before blocking, this thread runs the stack's engine and dispatcher rounds
  // itself and looks at the set without sleeping, for up to that long — an event loop's
  // requests then never wait for a stack thread to be scheduled (one wakeup costs ~50 µs in
  // these guests), and the engines stand down instead of spinning beside the loop. Always with
  // NETCH_BUSY_POLL_US; by default (NETCH_LOOP_POLL_US) for as long as polling has been
  // catching this loop's events (NextLoopPollWindow), so a loop whose events come far apart,
  // or none, sleeps at once and costs nothing; and only while no other thread polls (LoopPoll).
  const Config* cfg = Cfg();
  const int64_t call_start = NowNs();
  bool ever_slept = false;
  LoopPoll poll(cfg, timeout != 0, call_start);
  if (marked && !poll.polling()) HandOverWatches();  // (a polling wait checks them in its rounds)
  // Run to completion without busy polling (NETCH_RECEIVE_INLINE): a thread about to sleep
  // borrows the input of the stack's engines and sleeps on it beside the set; an arrival wakes
  // this thread, which runs the engine's round itself — the round hands the segments to their
  // sockets, which raise the set — instead of waking the engine, whose round then wakes us. The
  // loans go back before we return. Wakeups that keep bringing nothing for this set (another
  // thread's sockets, a round the engine was running) end the loans for the rest of the call.
  WaitLoans loans;
  for (;;) {
    int left = -1;
    // Rounded up: a kernel wait that times out has reached the deadline (the check below).
    if (deadline >= 0)
      left = static_cast<int>((std::max<int64_t>(0, deadline - NowNs()) + 999999) / 1000000);
    bool loan_woke = false;
    const bool spinning = poll.Round(deadline);
    if (spinning) left = 0;
    const auto set = g_ep[epfd].load();
    if (!set) return REAL(epoll_pwait)(epfd, out, max, timeout, mask);  // closed meanwhile
    // A lazy set's level-triggered sockets first, from their own state (EpollSet); a thread
    // that finds none and will sleep arms them and looks once more before it does.
    int n = 0;
    bool slept = false;
    {
      std::lock_guard l(set->mu);
      if (!set->eager) n = ScanLevel(*set, out, max);
      if (n == 0 && left != 0) {
        Sleepers(*set, epfd, +1);
        if (!set->eager) n = ScanLevel(*set, out, max);
        if (n > 0)
          Sleepers(*set, epfd, -1);
        else
          slept = ever_slept = true;
      }
    }
    int rc = 0;
    if (slept) loans.Borrow(cfg);
    if (slept && loans.n > 0) {
      pollfd p[1 + kMaxLoans];
      p[0] = {epfd, POLLIN, 0};
      for (size_t i = 0; i < loans.n; ++i) p[1 + i] = {loans.l[i].fd(), POLLIN, 0};
      timespec ts{left / 1000, (left % 1000) * 1000000l};
      rc = REAL(ppoll)(p, 1 + loans.n, left < 0 ? nullptr : &ts, mask);
      if (rc >= 0) {
        for (size_t i = 0; i < loans.n; ++i) loan_woke |= p[1 + i].revents != 0;
        bool only_level = false;  // no registration the rounds can raise through its eventfd
        if (loan_woke) {
          // Awake before the rounds run: the sockets they fill are this thread's to read, so
          // they are disarmed first — armed, each delivery would write its eventfd and the
          // read after it read the eventfd back, two syscalls per socket and wakeup for a
          // thread that is already up (the scan below finds them).
          std::lock_guard l(set->mu);
          Sleepers(*set, epfd, -1);
          slept = false;
          only_level = !set->eager && set->level.size() == set->regs.size();
        }
        for (size_t i = 0; i < loans.n; ++i)
          if (p[1 + i].revents)
            (void)loans.l[i].Run();  // (false: the engine is in a round, which takes the input)
        // The kernel's side of the set only if it has something (or may have, from the rounds
        // just run: edge-triggered sockets stay armed): no syscall otherwise.
        rc = p[0].revents || !only_level ? REAL(epoll_pwait)(epfd, buf.data(), max - n, 0, nullptr)
                                         : 0;
      }
    } else if (n < max) {
      int wait_ms = n > 0 ? 0 : left;
      // A dependent sleep (kDependentSleepNs), in whole milliseconds here.
      if (wait_ms != 0 && g_loop_pollers.load(std::memory_order_acquire) > 0 &&
          (wait_ms < 0 || wait_ms > 1))
        wait_ms = 1;
      rc = REAL(epoll_pwait)(epfd, buf.data(), max - n, wait_ms, mask);
    }
    std::lock_guard l(set->mu);
    if (slept) Sleepers(*set, epfd, -1);
    if ((slept || loan_woke) && !set->eager)
      n = ScanLevel(*set, out, max);  // (an eager set's come as events)
    if (rc < 0 && n == 0) return -1;
    seen.clear();
    for (int i = 0; i < rc && n < max; ++i) {
      int fd, dir;
      if (!Untag(buf[i].data.u64, &fd, &dir)) {
        out[n++] = buf[i];
        continue;
      }
      auto reg = set->regs.find(fd);
      if (reg == set->regs.end()) continue;               // stale: unregistered meanwhile
      if (!set->eager && IsLevel(reg->second)) continue;  // the scan speaks for it
      Entry* e = RegEntry(fd, reg->second);
      if (!e) continue;
      const uint32_t r =
          static_cast<uint16_t>(VRevents(*e, static_cast<short>(reg->second.events & 0xffff)));
      if (r == 0) continue;
      bool merged = false;
      for (auto& [sfd, idx] : seen)
        if (sfd == fd) {
          out[idx].events |= r;
          merged = true;
        }
      if (merged) continue;
      seen.emplace_back(fd, n);
      out[n++] = epoll_event{r, reg->second.data};
    }
    // Nothing to report ends the call only at the deadline: a wakeup that brought nothing (the
    // epoll fd was readable for an eventfd another thread cleared before our look, a loan's
    // round for another set) waits again — returning 0 early is a timeout the program never
    // asked for (a server that takes it at its word stops serving).
    if (n > 0 || (deadline >= 0 && NowNs() >= deadline)) {
      EndLoopWait(cfg, timeout, call_start, n > 0, ever_slept);
      return n;
    }
    if (loan_woke) loans.Idle();
    if (spinning) SpinPause(call_start);
  }
}

int epoll_wait(int epfd, epoll_event* out, int max, int timeout) {
  return epoll_pwait(epfd, out, max, timeout, nullptr);
}

}  // extern "C"
