#include "afxdp_channels/engine.h"

#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>

#include "absl/strings/str_format.h"
#include "common/affinity.h"
#include "common/errno_status.h"
#include "common/netns.h"

namespace netch::chan {

uint64_t NowUs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1'000'000 + static_cast<uint64_t>(ts.tv_nsec) / 1000;
}

static uint64_t NowNs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1'000'000'000 + static_cast<uint64_t>(ts.tv_nsec);
}

namespace {
// epoll_ctl for an fd registered under its own number.
int EpollCtl(int ep, int op, int fd, uint32_t events) {
  epoll_event ev{};
  ev.events = events;
  ev.data.fd = fd;
  return epoll_ctl(ep, op, fd, &ev);
}

thread_local int t_transmit_inline = 0;  // TransmitInlineScopes open on this thread
thread_local int t_transmit_awake = 0;   // those of them even_if_awake
// Deferred transmit: DeferTransmitScopes open on this thread, whether it flushes (it called
// FlushDeferredTransmit once), and the engines whose rounds wait for its next flush.
thread_local int t_defer = 0;
thread_local bool t_flushes = false;
constexpr int kMaxDeferred = 8;
thread_local Engine* t_deferred[kMaxDeferred];
thread_local int t_ndeferred = 0;
// Engines whose channels hold a segment this thread left open (NoteOpenSegment), until its flush.
thread_local Engine* t_opened[kMaxDeferred];
thread_local int t_nopened = 0;
// Both lists hold raw engine pointers until the thread's next flush: an engine destroyed
// meanwhile (a stack torn down and made again in one process, as tests do) would be dangling
// there. Destroying one bumps the generation; lists from an older one are dropped unread — what
// they owed is covered, the deferred rounds by the engine's timer, open segments by kCorkIdleUs.
std::atomic<uint64_t> g_engines_destroyed{0};
thread_local uint64_t t_lists_generation = 0;
void DropStaleLists() {
  const uint64_t g = g_engines_destroyed.load(std::memory_order_acquire);
  if (g == t_lists_generation) return;
  t_lists_generation = g;
  t_ndeferred = t_nopened = 0;
}
thread_local bool t_round_flushes_open = false;  // the round on this thread commits open segments
thread_local uint64_t t_round_now_us = 0;        // the round running on this thread (RoundNowUs)
thread_local bool t_poller_round = false;        // ... run by a poller (PollerRound)
// The engine whose round this thread runs for a producer or a poller, and whether that round
// queued work for the engine itself. No round runs inside another: a DeliveryHook holds locks
// another engine's round would try_lock again on the same thread.
thread_local Engine* t_round_engine = nullptr;
thread_local bool t_rewake = false;
// A producer's inline rounds until nothing is left: the round that transmits, the one that reaps
// the completions copy mode posted during the send, an idle one. Work beyond that (a stream of
// arrivals) goes to the engine thread.
constexpr int kMaxInlineRounds = 4;
// The longest an engine sleeps without a timer: a lost wakeup costs at most this.
constexpr uint64_t kMaxSleepUs = 100'000;

struct RoundOnThisThread {
  explicit RoundOnThisThread(Engine* e) : prev(t_round_engine) { t_round_engine = e; }
  ~RoundOnThisThread() { t_round_engine = prev; }
  Engine* prev;
};
}  // namespace

uint64_t RoundNowUs() { return t_round_now_us != 0 ? t_round_now_us : NowUs(); }
bool PollerRound() { return t_poller_round; }

TransmitInlineScope::TransmitInlineScope(bool even_if_awake) : awake_(even_if_awake) {
  ++t_transmit_inline;
  t_transmit_awake += awake_;
}
TransmitInlineScope::~TransmitInlineScope() {
  --t_transmit_inline;
  t_transmit_awake -= awake_;
}
DeferTransmitScope::DeferTransmitScope() { t_defer += t_flushes; }
DeferTransmitScope::~DeferTransmitScope() { t_defer -= t_defer > 0; }

void FlushDeferredTransmit() {
  t_flushes = true;
  DropStaleLists();
  // Open segments first: the deferred rounds below (or a poller's, or the engine's own next
  // round) commit them. An engine with nothing deferred gets a round here too when it sleeps.
  for (int i = 0, n = std::exchange(t_nopened, 0); i < n; ++i) {
    Engine* e = t_opened[i];
    e->RequestOpenFlush();
    bool deferred = false;
    for (int j = 0; j < t_ndeferred && !deferred; ++j) deferred = t_deferred[j] == e;
    if (!deferred && t_ndeferred < kMaxDeferred)
      t_deferred[t_ndeferred++] = e;
    else if (!deferred)
      e->Wake();
  }
  // (Taken first: a flush's round may defer again — it does not, it runs with t_round_engine.)
  const int n = std::exchange(t_ndeferred, 0);
  for (int i = 0; i < n; ++i) t_deferred[i]->TransmitInline(/*reaim=*/true);
}

void NoteOpenSegment(Engine* e) {
  if (!t_flushes || e == nullptr) return;
  DropStaleLists();
  for (int i = 0; i < t_nopened; ++i)
    if (t_opened[i] == e) return;
  if (t_nopened < kMaxDeferred) t_opened[t_nopened++] = e;  // (else: kCorkIdleUs as ever)
}

bool RoundFlushesOpen() { return t_round_flushes_open; }

void EngineTask::Wake() {
  Engine* e = engine.load(std::memory_order_acquire);
  if (!e) return;
  if (t_round_engine != nullptr) {
    if (e == t_round_engine)
      t_rewake = true;  // the round's own engine: the next inline round takes it
    else
      e->Wake();
  } else if (t_transmit_inline > 0) {
    e->TransmitInline(/*reaim=*/false, /*even_if_awake=*/t_transmit_awake > 0);
  } else if (t_defer > 0) {
    (void)e->DeferWake();
  } else {
    e->Wake();
  }
}

Engine::Engine(int index, int core, std::string netns, absl::Duration spin)
    : index_(index),
      core_(core),
      netns_(std::move(netns)),
      spin_us_(static_cast<uint64_t>(absl::ToInt64Microseconds(spin))) {}

Engine::~Engine() {
  Stop();
  g_engines_destroyed.fetch_add(1, std::memory_order_release);
}

absl::Status Engine::Start() {
  wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (wake_fd_ < 0) return ErrnoStatus(errno, "eventfd");
  timer_fd_ = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
  if (timer_fd_ < 0) return ErrnoStatus(errno, "timerfd_create");
  if (!standby_.ok()) return ErrnoStatus(standby_.error(), "timerfd_create (standby timer)");
  sleep_ep_ = epoll_create1(EPOLL_CLOEXEC);
  input_ep_ = epoll_create1(EPOLL_CLOEXEC);
  if (sleep_ep_ < 0 || input_ep_ < 0) return ErrnoStatus(errno, "epoll_create1");
  for (int fd : {wake_fd_, timer_fd_, input_ep_})
    if (EpollCtl(sleep_ep_, EPOLL_CTL_ADD, fd, EPOLLIN) != 0)
      return ErrnoStatus(errno, "epoll_ctl");
  std::unique_lock lk(mu_);
  bool started = false;
  thread_ = std::thread([this, &started] {
    absl::Status st;
    // The thread stays in the namespace for its whole life: the scope is never left.
    std::unique_ptr<NetnsScope> ns;
    if (!netns_.empty()) {
      ns = std::make_unique<NetnsScope>(netns_);
      st = ns->status();
    }
    if (st.ok() && core_ >= 0) {
      if (auto pin = PinThread(pthread_self(), core_); !pin.ok())
        st = absl::Status(pin.code(), absl::StrFormat("engine %d: %s", index_, pin.message()));
    }
    pthread_setname_np(pthread_self(), absl::StrFormat("netch-eng%d", index_).c_str());
    tid_ = static_cast<pid_t>(syscall(SYS_gettid));
    {
      std::lock_guard g(mu_);
      start_status_ = st;
      started = true;
    }
    cv_.notify_all();
    if (st.ok()) Loop();
  });
  cv_.wait(lk, [&] { return started; });
  if (!start_status_.ok()) {
    lk.unlock();
    thread_.join();
    return start_status_;
  }
  return absl::OkStatus();
}

void Engine::Stop() {
  if (thread_.joinable()) {
    stop_ = true;
    Kick();
    thread_.join();
  }
  if (wake_fd_ >= 0) close(wake_fd_), wake_fd_ = -1;
  if (timer_fd_ >= 0) close(timer_fd_), timer_fd_ = -1;
  if (sleep_ep_ >= 0) close(sleep_ep_), sleep_ep_ = -1;
  if (input_ep_ >= 0) close(input_ep_), input_ep_ = -1;
  input_regs_.clear();
  for (EngineTask* t : tasks_) t->engine.store(nullptr);
  tasks_.clear();
}

void Engine::Kick() {
  uint64_t one = 1;
  (void)!write(wake_fd_, &one, sizeof(one));
}

void Engine::Add(EngineTask* t) { Post({t, true}); }
void Engine::Remove(EngineTask* t) { Post({t, false}); }

void Engine::Post(const Op& op) {
  std::unique_lock lk(mu_);
  ops_.push_back(op);
  const uint64_t ticket = ++ops_posted_;
  ops_pending_.store(true, std::memory_order_release);
  // From the engine's own thread (a task adding another): applied at the top of the next round.
  if (std::this_thread::get_id() == thread_.get_id()) return;
  // From a round another thread runs for this engine (a kernel-TCP listener adopting a
  // connection during a producer's or a poller's round): that thread holds the round lock the
  // engine needs to apply it, so it must not wait; the engine applies it when it wakes.
  if (t_round_engine == this) {
    Kick();
    return;
  }
  if (!thread_.joinable() || stop_) {  // not running: apply inline
    lk.unlock();
    ApplyOps();
    return;
  }
  Kick();
  cv_.wait(lk, [&] { return ops_applied_ >= ticket; });
}

void Engine::Wake() {
  // Only a sleeping engine needs the syscall. The seq_cst pair (our load here after the
  // producer's ring store, the engine's store of sleeping_ before its last check) makes sure one
  // of the two sides sees the other.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (sleeping_.load(std::memory_order_relaxed) &&
      stand_down_until_us_.load(std::memory_order_relaxed) <= NowUs()) {
    Kick();
  }
}

bool Engine::RunInline(uint64_t now_us, uint64_t stand_down_us) {
  // Published first: the engine thread that finishes its round now sees it before sleeping.
  if (const uint64_t until = now_us + stand_down_us;
      stand_down_until_us_.load(std::memory_order_relaxed) < until) {
    stand_down_until_us_.store(until, std::memory_order_relaxed);
    standby_.Cover(until + kStandDownRecheckUs);
  }
  std::unique_lock rl(round_mu_, std::try_to_lock);
  if (!rl.owns_lock() || ops_pending_.load(std::memory_order_acquire)) return false;
  // The caller read the clock before the lock: a round that ran meanwhile may have used a later
  // time, and a task must never see time go back.
  uint64_t deadline = UINT64_MAX;
  RoundOnThisThread on(this);
  const bool outer = std::exchange(t_poller_round, true);
  const bool worked = RunTasks(std::max(now_us, last_round_us_), &deadline);
  t_poller_round = outer;
  return worked;
}

void Engine::TransmitInline(bool reaim, bool even_if_awake) {
  // The same handshake as Wake(): an engine that is awake sees the work before it sleeps.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  // An awake engine is run only from its own core: there it cannot run while we do, and the
  // work would wait for its turn; on another core it takes the work within microseconds.
  if ((!sleeping_.load(std::memory_order_relaxed) &&
       (!even_if_awake || core_ < 0 || sched_getcpu() != core_)) ||
      stand_down_until_us_.load(std::memory_order_relaxed) > NowUs())
    return;
  std::unique_lock rl(round_mu_, std::try_to_lock);
  // Not ours to run: the engine is in its last look before sleeping (it may have missed the
  // work), a poller runs a round, or tasks are being added or removed.
  if (!rl.owns_lock() || ops_pending_.load(std::memory_order_acquire)) {
    if (rl.owns_lock()) rl.unlock();
    Wake();
    return;
  }
  const bool more = RunForeignRoundsLocked(kMaxInlineRounds, reaim);
  inline_rounds_.fetch_add(1, std::memory_order_relaxed);
  rl.unlock();
  if (more) Wake();
}

bool Engine::DeferWake() {
  DropStaleLists();  // (before this thread's list is read or grown)
  // The same handshake as Wake(): an engine that is awake sees the work before it sleeps.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (!sleeping_.load(std::memory_order_relaxed) ||
      stand_down_until_us_.load(std::memory_order_relaxed) > NowUs())
    return false;
  // (Even when this thread owes the engine a flush already: the engine may have woken on the
  // timer since, run the earlier work and gone back to sleep with no timer for this.)
  std::unique_lock rl(round_mu_, std::try_to_lock);
  // Not ours to time: the engine is in its last look before sleeping, a poller runs a round,
  // tasks change, or this thread owes too many flushes already.
  if (!rl.owns_lock() || ops_pending_.load(std::memory_order_acquire) ||
      t_ndeferred == kMaxDeferred) {
    if (rl.owns_lock()) rl.unlock();
    Wake();
    return false;
  }
  // Woken meanwhile (it ran a round between our look and the lock): it looks again before it
  // sleeps, and sees the work.
  if (!sleeping_.load(std::memory_order_relaxed)) return false;
  // The sleeping engine's timer covers a loop that does not come back.
  if (const uint64_t at = NowUs() + kDeferTransmitUs; at < wake_at_us_) {
    if (!SetTimerLocked(at)) {
      rl.unlock();
      Wake();
      return false;
    }
    wake_at_us_ = at;
  }
  for (int i = 0; i < t_ndeferred; ++i)
    if (t_deferred[i] == this) return true;
  t_deferred[t_ndeferred++] = this;
  return true;
}

bool Engine::RunForeignRoundsLocked(int max_rounds, bool reaim) {
  bool more = true;
  uint64_t deadline = UINT64_MAX;
  {
    RoundOnThisThread on(this);
    for (int i = 0; i < max_rounds && more; ++i) {
      t_rewake = false;
      deadline = UINT64_MAX;
      more = RunTasks(std::max(NowUs(), last_round_us_), &deadline) || t_rewake;
    }
  }
  // A task that now waits for more than input (a kernel-TCP channel's full socket) needs the
  // engine to register that before it sleeps again.
  for (size_t i = 0; i < tasks_.size(); ++i)
    more |= i >= input_regs_.size() || input_regs_[i].task != tasks_[i] ||
            input_regs_[i].events != static_cast<uint32_t>(tasks_[i]->wait_events());
  // wake_at_us_ is set only by a sleeping engine (awake, it computes its deadline itself).
  if (!more && reaim && timer_armed_ && deadline > wake_at_us_ &&
      sleeping_.load(std::memory_order_relaxed)) {
    // A deferral armed the timer and its work has left: the timer serves the tasks again, or
    // nothing when the sleep's own timeout comes first.
    const bool arm = deadline < own_wake_at_us_;
    if (SetTimerLocked(arm ? deadline : UINT64_MAX)) wake_at_us_ = arm ? deadline : own_wake_at_us_;
  } else if (!more && deadline < wake_at_us_ && sleeping_.load(std::memory_order_relaxed)) {
    if (SetTimerLocked(deadline))
      wake_at_us_ = deadline;
    else
      more = true;
  }
  return more;
}

InputLoan Engine::BorrowInput() {
  if (input_ep_ < 0) return {};
  std::lock_guard g(lend_mu_);
  // No events: the sleeping engine no longer wakes for input. An awake one masks it itself
  // before it sleeps (MaskInputIfLent); either way one side sees the other (both under lend_mu_,
  // the engine's sleeping_ stored before it takes it). A registration left watching costs a
  // wakeup the borrower's round makes useless, never a lost one.
  if (!input_masked_ && sleeping_.load(std::memory_order_seq_cst) && !MaskInputLocked()) return {};
  ++loans_;
  return InputLoan(this);
}

bool Engine::MaskInputLocked() {
  if (EpollCtl(sleep_ep_, EPOLL_CTL_MOD, input_ep_, 0) != 0) return false;
  input_masked_ = true;
  return true;
}

void Engine::MaskInputIfLent() {
  if (input_ep_ < 0) return;
  std::lock_guard g(lend_mu_);
  if (loans_ > 0 && !input_masked_) (void)MaskInputLocked();
}

void Engine::ReturnInput() {
  std::lock_guard g(lend_mu_);
  if (--loans_ > 0 || !input_masked_) return;
  // Watching again: input that arrived meanwhile wakes the engine at once (epoll checks the
  // readiness of a modified registration).
  (void)EpollCtl(sleep_ep_, EPOLL_CTL_MOD, input_ep_, EPOLLIN);  // (registered: cannot fail)
  input_masked_ = false;
}

bool Engine::RunLoaned() {
  std::unique_lock rl(round_mu_, std::try_to_lock);
  // The engine (or a poller) runs a round now and takes the input, or tasks are being added or
  // removed: the engine's turn.
  if (!rl.owns_lock() || ops_pending_.load(std::memory_order_acquire)) return false;
  const bool more = RunForeignRoundsLocked(kMaxInlineRounds);
  loan_rounds_.fetch_add(1, std::memory_order_relaxed);
  rl.unlock();
  if (more) Wake();
  return true;
}

void Engine::SyncInputsLocked() {
  if (input_ep_ < 0) return;
  // Registrations in tasks_ order; rebuilt from the first difference (tasks change rarely).
  size_t i = 0;
  while (i < tasks_.size() && i < input_regs_.size() && input_regs_[i].task == tasks_[i] &&
         input_regs_[i].fd == tasks_[i]->wait_fd()) {
    InputReg& r = input_regs_[i];
    if (const auto ev = static_cast<uint32_t>(tasks_[i]->wait_events()); ev != r.events) {
      if (r.fd >= 0) (void)EpollCtl(input_ep_, EPOLL_CTL_MOD, r.fd, ev);
      r.events = ev;
    }
    ++i;
  }
  // (A closed fd left the set by itself; DEL of it fails harmlessly.)
  for (size_t j = i; j < input_regs_.size(); ++j)
    if (input_regs_[j].fd >= 0) (void)EpollCtl(input_ep_, EPOLL_CTL_DEL, input_regs_[j].fd, 0);
  input_regs_.resize(i);
  for (; i < tasks_.size(); ++i) {
    InputReg r{tasks_[i], tasks_[i]->wait_fd(), static_cast<uint32_t>(tasks_[i]->wait_events())};
    if (r.fd >= 0) (void)EpollCtl(input_ep_, EPOLL_CTL_ADD, r.fd, r.events);
    input_regs_.push_back(r);
  }
}

InputLoan& InputLoan::operator=(InputLoan&& o) noexcept {
  if (this != &o) {
    Return();
    engine_ = std::exchange(o.engine_, nullptr);
  }
  return *this;
}
int InputLoan::fd() const { return engine_ ? engine_->input_ep_ : -1; }
bool InputLoan::Run() { return engine_ && engine_->RunLoaned(); }
void InputLoan::Return() {
  if (engine_) std::exchange(engine_, nullptr)->ReturnInput();
}

bool Engine::SetTimerLocked(uint64_t at_us) {
  // (Disarming also clears an expiry not read yet.)
  const itimerspec its = at_us == UINT64_MAX
                             ? itimerspec{}
                             : itimerspec{{0, 0},
                                          {static_cast<time_t>(at_us / 1'000'000),
                                           static_cast<long>(at_us % 1'000'000) * 1000}};
  if (timerfd_settime(timer_fd_, TFD_TIMER_ABSTIME, &its, nullptr) != 0) return false;
  timer_armed_ = at_us != UINT64_MAX;
  return true;
}

void Engine::AwakeLocked() {
  own_wake_at_us_ = wake_at_us_ = UINT64_MAX;
  if (timer_armed_) (void)SetTimerLocked(UINT64_MAX);
}

void PollYielder::MaybeYield(uint64_t now_us, uint64_t spun_us) {
  if (spun_us < kPollYieldAfterUs || now_us < paused_until_us_) return;
  sched_yield();
  if (const uint64_t back = NowUs(); back - now_us > kPollYieldSlowUs)
    paused_until_us_ = back + kPollYieldPauseUs;
}

StandbyTimer::StandbyTimer() : fd_(timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)) {
  if (fd_ < 0) error_ = errno;
}

StandbyTimer::~StandbyTimer() {
  if (fd_ >= 0) close(fd_);
}

void StandbyTimer::Arm(uint64_t at_us) {
  itimerspec its{};
  its.it_value = {static_cast<time_t>(at_us / 1'000'000),
                  static_cast<long>((at_us % 1'000'000) * 1000)};
  (void)timerfd_settime(fd_, TFD_TIMER_ABSTIME, &its, nullptr);
}

void StandbyTimer::Fired() {
  armed_us_.store(0, std::memory_order_relaxed);
  uint64_t v;
  (void)!read(fd_, &v, sizeof(v));
}

void Engine::Resume() {
  if (stand_down_until_us_.exchange(0, std::memory_order_relaxed) != 0) {
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (sleeping_.load(std::memory_order_relaxed)) {
      Kick();
    }
  }
}

bool Engine::RunTasks(uint64_t now_us, uint64_t* deadline_us) {
  last_round_us_ = now_us;
  bool worked = false;
  const bool flush_open = flush_open_.load(std::memory_order_relaxed) &&
                          flush_open_.exchange(false, std::memory_order_acquire);
  const bool outer = std::exchange(t_round_flushes_open, flush_open);
  const uint64_t outer_now = std::exchange(t_round_now_us, now_us);
  for (EngineTask* t : tasks_) worked |= t->Run(now_us, deadline_us);
  t_round_now_us = outer_now;
  t_round_flushes_open = outer;
  return worked;
}

void Engine::ApplyOps() {
  std::lock_guard r(round_mu_);
  std::lock_guard g(mu_);
  for (const Op& op : ops_) {
    if (op.add) {
      tasks_.push_back(op.task);
      op.task->engine.store(this, std::memory_order_release);
    } else {
      tasks_.erase(std::remove(tasks_.begin(), tasks_.end(), op.task), tasks_.end());
      op.task->engine.store(nullptr, std::memory_order_release);
    }
    ops_applied_++;
  }
  ops_.clear();
  SyncInputsLocked();  // before a removed task's owner may close its fd
  ops_pending_.store(false, std::memory_order_relaxed);
  cv_.notify_all();
}

void Engine::Loop() {
  uint64_t idle_since_us = NowUs();
  while (!stop_.load(std::memory_order_relaxed)) {
    if (ops_pending_.load(std::memory_order_acquire)) ApplyOps();
    const uint64_t t0 = NowNs();
    const uint64_t now = t0 / 1000;
    uint64_t deadline = UINT64_MAX;
    bool worked = false;
    // A busy poller runs the rounds for now: stay out of its way (and off its core), sleeping
    // on the eventfd until it stops polling (Resume) or on the standby timer until, checked
    // kStandDownRecheckUs after its lease ran out, it has stopped renewing it.
    if (const uint64_t until = stand_down_until_us_.load(std::memory_order_relaxed); until > now) {
      standby_.Cover(until + kStandDownRecheckUs);
      sleeping_.store(true, std::memory_order_seq_cst);
      if (!ops_pending_.load(std::memory_order_acquire)) Sleep(UINT64_MAX, /*wake_fd_only=*/true);
      sleeping_.store(false, std::memory_order_relaxed);
      // (idle_since_us is left as it was: the poller ran the rounds meanwhile, and an engine it
      // hands back to that finds nothing to do sleeps at once rather than spinning beside it.)
      continue;
    }
    {
      // The clock is read under the lock: a poller's round may have run while we waited for it,
      // and a task must never see time go back (timers compare with what that round stored).
      std::lock_guard rl(round_mu_);
      AwakeLocked();
      worked = RunTasks(NowUs(), &deadline);
    }
    if (worked) {
      busy_ns_.fetch_add(NowNs() - t0, std::memory_order_relaxed);
      idle_since_us = now;
      continue;
    }
    if (now - idle_since_us < spin_us_ && deadline > now) {
      sched_yield();  // the other test host may need this core
      continue;
    }
    // About to sleep: announce it, then look once more so a producer that queued work just
    // before seeing sleeping_ == true is not missed.
    sleeping_.store(true, std::memory_order_seq_cst);
    deadline = UINT64_MAX;
    {
      std::lock_guard rl(round_mu_);
      const uint64_t now2 = NowUs();
      worked |= RunTasks(now2, &deadline);
      // From here producers' rounds (TransmitInline) compare their timers with this.
      if (!worked) own_wake_at_us_ = wake_at_us_ = std::min(deadline, now2 + kMaxSleepUs);
      SyncInputsLocked();
    }
    if (!worked && !ops_pending_.load(std::memory_order_acquire)) {
      MaskInputIfLent();
      Sleep(deadline, /*wake_fd_only=*/false);
    }
    sleeping_.store(false, std::memory_order_relaxed);
    idle_since_us = NowUs();
  }
  if (ops_pending_.load()) ApplyOps();
}

void Engine::Sleep(uint64_t deadline_us, bool wake_fd_only) {
  // Never sleep unbounded: a lost wakeup costs at most this much.
  const uint64_t now = NowUs();
  uint64_t wait_us = deadline_us > now ? deadline_us - now : 0;
  wait_us = std::min<uint64_t>(wait_us, kMaxSleepUs);
  timespec ts{static_cast<time_t>(wait_us / 1'000'000),
              static_cast<long>((wait_us % 1'000'000) * 1000)};
  wakeups_.fetch_add(1, std::memory_order_relaxed);
  bool woken = false, timer = false;
  if (wake_fd_only) {
    pollfd fds[3] = {{wake_fd_, POLLIN, 0}, {timer_fd_, POLLIN, 0}, {standby_.fd(), POLLIN, 0}};
    ppoll(fds, 3, &ts, nullptr);
    woken = fds[0].revents & POLLIN;
    timer = fds[1].revents & POLLIN;
    if (fds[2].revents & POLLIN) standby_.Fired();
  } else {
    // wake_fd_, timer_fd_ (producers' timers, cleared by the next round) and the tasks' input
    // (unless loaned out).
    epoll_event evs[3];
    const int n = epoll_pwait2(sleep_ep_, evs, 3, &ts, nullptr);
    for (int i = 0; i < n; ++i) {
      woken |= evs[i].data.fd == wake_fd_;
      timer |= evs[i].data.fd == timer_fd_;
    }
  }
  uint64_t v;
  if (woken) (void)!read(wake_fd_, &v, sizeof(v));
  // (A stood-down engine sleeps again without a round: the expiry must not stay readable.)
  if (timer) (void)!read(timer_fd_, &v, sizeof(v));
}

absl::StatusOr<std::vector<std::unique_ptr<Engine>>> StartEngines(const DriverOptions& opts) {
  if (opts.engines < 1 || opts.engines > 64)
    return absl::InvalidArgumentError("engines must be 1..64");
  std::vector<std::unique_ptr<Engine>> out;
  for (int e = 0; e < opts.engines; ++e) {
    const int core = e < static_cast<int>(opts.cores.size()) ? opts.cores[e] : -1;
    out.push_back(std::make_unique<Engine>(e, core, opts.netns, opts.spin));
    if (auto st = out.back()->Start(); !st.ok()) return st;
  }
  return out;
}

std::vector<EngineInfo> DescribeEngines(const std::vector<std::unique_ptr<Engine>>& engines) {
  std::vector<EngineInfo> out;
  for (const auto& e : engines)
    out.push_back({e->index(), e->core(), e->tid(), e->busy_ns(), e->wakeups(), e->inline_rounds(),
                   e->loan_rounds()});
  return out;
}

}  // namespace netch::chan
