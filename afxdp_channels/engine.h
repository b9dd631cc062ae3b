// engine.h - the per-core engine threads that run channels (internal to the drivers).
//
// An engine runs a set of tasks (an AF_XDP queue with its channels, a kernel-TCP channel) in a
// loop: Run() every task, and when a whole round did nothing for `spin`, sleep in epoll on the
// tasks' fds (a nested set a blocked receiver may borrow: InputLoan), the engine's eventfd and
// its timerfd until the earliest task timer. The machines this runs on
// have two cores shared by both test hosts, so an idle engine must sleep, and a producer that
// queues work for a sleeping engine wakes it (one eventfd write, only when it sleeps).
//
// Busy polling: an application thread may run an engine's round itself (RunInline) while the
// engine thread stands down; a round — on whichever thread — holds the engine's round lock, so
// tasks never run on two threads at once. So does a producer (TransmitInline) or a blocked
// receiver (InputLoan) that runs the round of a sleeping engine.
//
// Tasks move between engines with Remove() + Add(): Remove returns only once the old engine has
// finished its current round and will never touch the task again; the mutex of the mailbox orders
// everything the old thread wrote before everything the new one reads.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "afxdp_channels/channel.h"

namespace netch::chan {

class Engine;

class EngineTask {
 public:
  virtual ~EngineTask() = default;
  // One round of work. Returns true if it did anything; lowers *deadline_us (monotonic µs) to
  // when it next needs to run even without input.
  virtual bool Run(uint64_t now_us, uint64_t* deadline_us) = 0;
  // An fd that becomes readable when the task has input (e.g. an XSK), or -1.
  virtual int wait_fd() const = 0;
  // poll() events to wait for on wait_fd() (a blocked writer adds POLLOUT).
  virtual short wait_events() const { return 0x001; /* POLLIN */ }
  // The engine running the task now (for wakeups by producers); set by Engine.
  std::atomic<Engine*> engine{nullptr};
  // Wakes the task's engine if it sleeps. Producers call this after queuing work.
  void Wake();
};

uint64_t NowUs();  // CLOCK_MONOTONIC in µs
// The time of the engine round running on this thread (its tasks' `now_us`), else NowUs(): what
// a delivery hook called from the round compares against without another clock read (~50 ns
// here, of the ~1.3 µs a busy-polled reader's turn takes from the frame to its Recv).
uint64_t RoundNowUs();
// Whether the round running on this thread is a poller's (PollInline): a busy-polling reader or
// an event loop's wait, which reads what the round delivers right after it, on this core.
bool PollerRound();

class Engine {
 public:
  Engine(int index, int core, std::string netns, absl::Duration spin);
  ~Engine();  // stops the thread
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  absl::Status Start();
  void Stop();

  // Both return after the engine has applied the change (synchronous hand-off), except when
  // called from the engine's own thread or from a round another thread runs for it (busy
  // polling, TransmitInline: it holds the round lock), where they take effect at the start of
  // the engine thread's next round.
  void Add(EngineTask* t);
  void Remove(EngineTask* t);
  void Wake();

  // Busy polling (run to completion): runs one round of this engine's tasks on the calling
  // thread, unless the engine thread (or another poller) is in a round right now. Returns true if
  // a task did anything. For `stand_down_us` after the call the engine thread leaves the work to
  // the poller: arriving packets do not wake it (it sleeps on its eventfd only), nor do
  // producers' Wake() calls (the poller's next round takes their work; at worst it waits for the
  // stand-down to end). A poller about to sleep itself calls Resume() to hand the work back at
  // once.
  bool RunInline(uint64_t now_us, uint64_t stand_down_us);
  void Resume();
  // Run to completion on the sending side (TransmitInlineScope): a producer that queued work
  // runs the round itself if the engine sleeps (or, `even_if_awake`, runs on the caller's core
  // and is not in a round), else wakes it as Wake() would. The engine's
  // timers the round set earlier than the engine's own wakeup go to its timerfd; anything the
  // round could not finish goes to the engine thread (an eventfd wakeup). With `reaim` (the
  // flush of deferred work, DeferTransmitScope), the timer is also re-aimed from the
  // deferral's deadline at what the tasks need next.
  void TransmitInline(bool reaim = false, bool even_if_awake = false);
  // Deferred transmit (DeferTransmitScope): a producer's work for a sleeping engine waits for
  // the producer's flush (TransmitInline with reaim), or the engine's timer kDeferTransmitUs
  // from now. False: the engine was awake, in a round another thread runs, or stood down — the
  // work is its own (woken as Wake() would) and needs no flush.
  bool DeferWake();
  // Run to completion on the receive side (InputLoan): the engine's sleep stops watching its
  // tasks' fds while loans are out (no wakeup); the borrowers poll input_fd_, an epoll set of
  // those fds, and run the rounds. The sleep's registration is masked by whoever finds the
  // other side ready for it — a borrower that finds the engine asleep, or the engine going to
  // sleep with loans out — and unmasked by the last return: borrowing from an awake engine
  // (a busy stream's reader that found its ring empty for a moment) costs no system call.
  InputLoan BorrowInput();
  // An event loop left a small write open (coalescing) on one of this engine's channels and is
  // about to wait, likely for the answer: the engine's next round, on whatever thread runs it,
  // commits its channels' open segments at once (ChannelCore::FlushOpen's `now`), as a blocking
  // reader's Channel::Flush does, instead of after kCorkIdleUs (NoteOpenSegment).
  void RequestOpenFlush() { flush_open_.store(true, std::memory_order_release); }

  int index() const { return index_; }
  int core() const { return core_; }
  pid_t tid() const { return tid_.load(); }
  uint64_t busy_ns() const { return busy_ns_.load(std::memory_order_relaxed); }
  uint64_t wakeups() const { return wakeups_.load(std::memory_order_relaxed); }
  bool sleeping() const { return sleeping_.load(std::memory_order_relaxed); }
  uint64_t inline_rounds() const { return inline_rounds_.load(std::memory_order_relaxed); }
  uint64_t loan_rounds() const { return loan_rounds_.load(std::memory_order_relaxed); }

 private:
  struct Op {
    EngineTask* task;
    bool add;
  };
  void Post(const Op& op);
  void Kick();  // wakes the engine thread through its eventfd, asleep or not
  void Loop();
  void ApplyOps();
  friend class InputLoan;
  void ReturnInput();
  bool RunLoaned();
  // Up to kMaxInlineRounds rounds on a thread other than the engine's (round_mu_ held), then
  // hands the engine what they left: timers earlier than its own wakeup go to timer_fd_. True if
  // the engine thread must be woken (work left, or a task now waits for more than input).
  // With `reaim`, the timer is set to the tasks' next deadline even when that is later than
  // what it was armed for (a deferral's), or disarmed when the engine wakes by itself sooner.
  bool RunForeignRoundsLocked(int max_rounds, bool reaim = false);
  // Arms timer_fd_ for `at_us` (NowUs clock), or disarms it for UINT64_MAX (round_mu_ held).
  bool SetTimerLocked(uint64_t at_us);
  // The engine's input epoll set matches its tasks' fds and events (round_mu_ held).
  void SyncInputsLocked();
  void Sleep(uint64_t deadline_us, bool wake_fd_only);
  // The engine thread is awake (round_mu_ held): producers' timers are its own again.
  void AwakeLocked();
  // Runs every task once; round_mu_ held.
  bool RunTasks(uint64_t now_us, uint64_t* deadline_us);

  const int index_, core_;
  const std::string netns_;
  const uint64_t spin_us_;
  int wake_fd_ = -1;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> sleeping_{false};
  std::atomic<pid_t> tid_{0};
  std::atomic<uint64_t> busy_ns_{0}, wakeups_{0}, inline_rounds_{0}, loan_rounds_{0};
  // Timers set by producers' rounds while the engine sleeps (it sleeps with its own
  // deadline as timeout, which another thread cannot shorten).
  int timer_fd_ = -1;
  // The engine sleeps in epoll on sleep_ep_: wake_fd_, timer_fd_ and input_ep_, the epoll set of
  // its tasks' fds — the one fd borrowers poll, and the one registration a loan switches off.
  int sleep_ep_ = -1, input_ep_ = -1;
  struct InputReg {
    EngineTask* task;
    int fd;
    uint32_t events;
  };
  std::vector<InputReg> input_regs_;  // guarded by round_mu_
  std::mutex lend_mu_;
  int loans_ = 0;              // guarded by lend_mu_
  bool input_masked_ = false;  // guarded by lend_mu_: sleep_ep_ does not watch input_ep_
  void MaskInputIfLent();      // the engine, about to sleep
  bool MaskInputLocked();      // lend_mu_ held: sleep_ep_ stops watching input_ep_

  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Op> ops_;       // guarded by mu_
  uint64_t ops_applied_ = 0;  // guarded by mu_
  uint64_t ops_posted_ = 0;   // guarded by mu_
  std::atomic<bool> ops_pending_{false};
  absl::Status start_status_;

  // A round (tasks_ and the tasks' state) runs under round_mu_: the engine thread locks it per
  // round (uncontended unless a poller is running one), pollers only try_lock it.
  std::mutex round_mu_;
  std::vector<EngineTask*> tasks_;  // guarded by round_mu_ (changed by the engine thread only)
  std::atomic<uint64_t> stand_down_until_us_{0};
  StandbyTimer standby_;  // wakes the stood-down engine once its pollers stopped renewing
  std::atomic<bool> flush_open_{false};  // RequestOpenFlush, taken by the next round
  uint64_t last_round_us_ = 0;           // guarded by round_mu_: the clock a round last ran with
  // guarded by round_mu_: when the sleeping engine wakes by itself (sleep timeout or timer_fd_);
  // UINT64_MAX while it is awake.
  uint64_t wake_at_us_ = UINT64_MAX;
  uint64_t own_wake_at_us_ = UINT64_MAX;  // guarded by round_mu_: the sleep's own timeout
  bool timer_armed_ = false;              // guarded by round_mu_
};

// A producer left a segment open for coalescing on a channel `e` runs: on a thread that
// flushes (an event loop), its next FlushDeferredTransmit asks the engine to commit it at once —
// the loop is about to wait, most likely for the answer to what it wrote, and holding it for
// kCorkIdleUs more would only delay that answer. A no-op on other threads.
void NoteOpenSegment(Engine* e);
// Whether the round running on this thread commits open segments now (Engine::RequestOpenFlush).
bool RoundFlushesOpen();

// A driver's engines: opts.engines threads, engine i pinned to opts.cores[i] when given.
absl::StatusOr<std::vector<std::unique_ptr<Engine>>> StartEngines(const DriverOptions& opts);
std::vector<EngineInfo> DescribeEngines(const std::vector<std::unique_ptr<Engine>>& engines);

// The factory every driver class with an Init() shares.
template <typename D>
absl::StatusOr<std::unique_ptr<Driver>> MakeDriver(const DriverOptions& opts) {
  auto d = std::make_unique<D>(opts);
  if (auto st = d->Init(); !st.ok()) return st;
  return std::unique_ptr<Driver>(std::move(d));
}

}  // namespace netch::chan
