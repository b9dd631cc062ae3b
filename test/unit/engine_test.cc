// Engine threads: run to completion on the sending side (TransmitInlineScope) and on the
// receiving side (InputLoan).
#include "afxdp_channels/engine.h"

#include <gtest/gtest.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <thread>

#include "common/affinity.h"
#include "test/support/engine_sleep.h"

namespace netch::chan {
namespace {

// A task with work handed to it by tests: Run takes it and records the thread that did.
class WorkTask : public EngineTask {
 public:
  std::atomic<int> work{0}, done{0};
  std::atomic<std::thread::id> ran_on{};
  // Called by the round that takes the work (on whichever thread), before it returns.
  std::function<void(uint64_t now_us, uint64_t* deadline_us)> on_take;
  // The first round at or after this time (µs) records when it ran and on which thread.
  std::atomic<uint64_t> timer_at{UINT64_MAX}, timer_ran_at{0};
  std::atomic<std::thread::id> timer_ran_on{};

  bool Run(uint64_t now_us, uint64_t* deadline_us) override {
    if (const uint64_t t = timer_at.load(); t != UINT64_MAX) {
      if (now_us >= t) {
        timer_ran_at = now_us;
        timer_ran_on = std::this_thread::get_id();
        timer_at = UINT64_MAX;
      } else {
        *deadline_us = std::min(*deadline_us, t);
      }
    }
    if (work.exchange(0) == 0) return false;
    ran_on = std::this_thread::get_id();
    if (on_take) on_take(now_us, deadline_us);
    done++;
    return true;
  }
  int wait_fd() const override { return -1; }
};

// Hands `t` work as a producer would (queue, then Wake) and waits until a round took it.
void Produce(WorkTask& t) {
  const int before = t.done.load();
  t.work = 1;
  t.Wake();
  for (int i = 0; i < 5000 && t.done.load() == before; ++i)
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  ASSERT_GT(t.done.load(), before) << "nobody ran the task's work within 1 s";
}

TEST(EngineTest, AProducerInATransmitInlineScopeRunsASleepingEnginesRoundItself) {
  Engine e(0, -1, "", absl::ZeroDuration());
  ASSERT_TRUE(e.Start().ok());
  WorkTask t;
  e.Add(&t);
  int here = 0;
  for (int i = 0; i < 20; ++i) {
    AwaitSleep(e);
    TransmitInlineScope scope;
    Produce(t);
    here += t.ran_on.load() == std::this_thread::get_id();
  }
  // (A 100 ms lost-wakeup timeout of the engine may coincide with one of them.)
  EXPECT_GE(here, 18);
  EXPECT_GE(e.inline_rounds(), 18u);
  e.Remove(&t);
}

TEST(EngineTest, AnEvenIfAwakeScopeRunsASpinningEnginesRoundFromTheEnginesOwnCore) {
  // A latency-sensitive sender (VNS: an L-app socket's Send) on the core of a spinning engine
  // does not wait for the engine's turn on that core; a plain scope leaves the work to it, and
  // so does any scope for an engine spinning on another core (it takes the work at once).
  const int here = sched_getcpu();
  ASSERT_GE(here, 0);
  ASSERT_TRUE(PinThread(pthread_self(), here).ok());
  const int cores = static_cast<int>(std::thread::hardware_concurrency());
  struct Case {
    int core;
    int plain = 0, awake = 0;
  } same{here}, other{cores > 1 ? (here + 1) % cores : -1};
  for (Case* c : {&same, &other}) {
    if (c->core < 0) continue;
    Engine e(0, c->core, "", absl::Seconds(60));  // spins between rounds for the whole test
    ASSERT_TRUE(e.Start().ok());
    WorkTask t;
    e.Add(&t);
    for (int i = 0; i < 20; ++i) {
      {
        TransmitInlineScope scope;
        Produce(t);
        c->plain += t.ran_on.load() == std::this_thread::get_id();
      }
      {
        TransmitInlineScope scope(/*even_if_awake=*/true);
        Produce(t);
        c->awake += t.ran_on.load() == std::this_thread::get_id();
      }
    }
    EXPECT_FALSE(e.sleeping());
    e.Remove(&t);
  }
  ASSERT_TRUE(PinThread(pthread_self(), -1).ok());
  EXPECT_EQ(same.plain, 0);
  // (The engine may have been pre-empted inside a round of its own — under TSan a third of the
  // time: then the work is its own. Without the scope reaching it, none would run here.)
  EXPECT_GE(same.awake, 5);
  EXPECT_EQ(other.plain, 0);
  EXPECT_EQ(other.awake, 0);
}

TEST(EngineTest, WithoutAScopeTheEngineThreadRunsTheWork) {
  Engine e(0, -1, "", absl::ZeroDuration());
  ASSERT_TRUE(e.Start().ok());
  WorkTask t;
  e.Add(&t);
  for (int i = 0; i < 5; ++i) {
    AwaitSleep(e);
    Produce(t);
    EXPECT_NE(t.ran_on.load(), std::this_thread::get_id());
  }
  EXPECT_EQ(e.inline_rounds(), 0u);
  e.Remove(&t);
}

// What a task learns of the round it runs in: a poller's round (PollInline) is marked as one and
// gives its time to RoundNowUs; the engine's own round is not a poller's; outside any round
// RoundNowUs reads the clock.
TEST(EngineTest, ATaskSeesWhetherAPollerRunsItsRoundAndTheRoundsTime) {
  Engine e(0, -1, "", absl::ZeroDuration());
  ASSERT_TRUE(e.Start().ok());
  WorkTask t;
  std::atomic<int> poller_rounds{0}, own_rounds{0}, stale{0};
  t.on_take = [&](uint64_t now_us, uint64_t*) {
    (PollerRound() ? poller_rounds : own_rounds)++;
    stale += RoundNowUs() != now_us;
  };
  e.Add(&t);
  // The poller's round runs at a time half a second ahead, which no clock read inside it could
  // give. (Not ours to run while the engine is in a round of its own: tried again.)
  AwaitSleep(e);
  for (int i = 0; i < 100 && poller_rounds.load() == 0; ++i) {
    t.work = 1;
    e.RunInline(NowUs() + 500'000, 0);
  }
  EXPECT_EQ(poller_rounds.load(), 1);
  e.Resume();  // (the stand-down that round set, half a second ahead, ends)
  const int own_before = own_rounds.load();
  AwaitSleep(e);
  Produce(t);  // no scope: the engine thread runs it
  EXPECT_GT(own_rounds.load(), own_before);
  EXPECT_EQ(stale.load(), 0) << "RoundNowUs inside a round must be the round's own time";
  EXPECT_FALSE(PollerRound()) << "outside any round";
  const uint64_t before = NowUs();
  EXPECT_GE(RoundNowUs(), before) << "outside any round it reads the clock";
  e.Remove(&t);
}

// A busy poller renews the engine's stand-down with every round: the engine sleeps through it
// (each wakeup would pre-empt a spinner), and takes over by itself once the poller stops without
// saying so — work queued during the lease, whose Wake() the stand-down swallowed, still runs.
TEST(EngineTest, AStoodDownEngineSleepsWhileItsPollerRenewsAndTakesOverWhenItStops) {
  Engine e(0, -1, "", absl::ZeroDuration());
  ASSERT_TRUE(e.Start().ok());
  WorkTask t;
  e.Add(&t);
  AwaitSleep(e);
  const uint64_t wakeups_before = e.wakeups();
  // 100 ms of a poller's rounds, 200 µs leases (what a busy-polled Recv gives).
  const uint64_t end = NowUs() + 100'000;
  while (NowUs() < end) {
    e.RunInline(NowUs(), 200);
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
  // Slept each lease plus kStandDownRecheckUs: ~45 wakeups; on the standby timer: one or two
  // (the first stand-down, and a push the timer may have fired ahead of).
  EXPECT_LE(e.wakeups() - wakeups_before, 5u) << "the stood-down engine kept waking";
  // The poller's last round, then work whose Wake() the lease swallows; nobody ends the poll.
  std::atomic<uint64_t> ran_at{0};
  t.on_take = [&](uint64_t now_us, uint64_t*) { ran_at = now_us; };
  e.RunInline(NowUs(), 200);
  const uint64_t stopped = NowUs();
  t.work = 1;
  t.Wake();
  for (int i = 0; i < 1000 && t.done.load() == 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  ASSERT_EQ(t.done.load(), 1) << "the engine never took over";
  EXPECT_NE(t.ran_on.load(), std::this_thread::get_id());
  // Not before its lease and the recheck (it leaves the poller alone meanwhile).
  EXPECT_GE(ran_at.load(), stopped + 200 + kStandDownRecheckUs);
  // And by the standby timer (at most kStandbySlackUs later), not the sleep's 100 ms backstop:
  // 50 ms of margin for a slow scheduler.
  EXPECT_LE(ran_at.load(), stopped + 200 + kStandDownRecheckUs + kStandbySlackUs + 50'000);
  e.Remove(&t);
}

TEST(EngineTest, ATimerAProducersRoundSetWakesTheSleepingEngine) {
  Engine e(0, -1, "", absl::ZeroDuration());
  ASSERT_TRUE(e.Start().ok());
  WorkTask t;
  e.Add(&t);
  // The round that takes the work (on this thread) sets a timer 3 ms out, as a transport arms
  // its tail-loss probe after sending. The engine sleeps with no timer of its own: without the
  // producer's timer reaching it, it would look again only after its 100 ms lost-wakeup bound.
  t.on_take = [&](uint64_t now_us, uint64_t* deadline_us) {
    t.timer_at = now_us + 3000;
    *deadline_us = std::min(*deadline_us, now_us + 3000);
  };
  for (int i = 0; i < 5; ++i) {
    AwaitSleep(e);
    TransmitInlineScope scope;
    Produce(t);
    ASSERT_EQ(t.ran_on.load(), std::this_thread::get_id());
    const uint64_t due = t.timer_at.load();
    for (int k = 0; k < 1000 && t.timer_at.load() != UINT64_MAX; ++k)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    ASSERT_EQ(t.timer_at.load(), UINT64_MAX) << "the timer never ran";
    EXPECT_NE(t.timer_ran_on.load(), std::this_thread::get_id());
    // Generous for loaded CI machines, far below the 100 ms the engine would otherwise sleep.
    EXPECT_LT(t.timer_ran_at.load() - due, 50'000u) << "round " << i;
  }
  e.Remove(&t);
}

TEST(EngineTest, ARoundRunForAProducerWakesAnotherEngineInsteadOfRunningItsRound) {
  // A round may hold locks (a DeliveryHook's) that another engine's round would take again on
  // the same thread: work it queues elsewhere goes to that engine's own thread.
  Engine e1(0, -1, "", absl::ZeroDuration()), e2(1, -1, "", absl::ZeroDuration());
  ASSERT_TRUE(e1.Start().ok());
  ASSERT_TRUE(e2.Start().ok());
  WorkTask a, b;
  e1.Add(&a);
  e2.Add(&b);
  a.on_take = [&](uint64_t, uint64_t*) {
    b.work = 1;
    b.Wake();
  };
  AwaitSleep(e1);
  AwaitSleep(e2);
  {
    TransmitInlineScope scope;
    Produce(a);
  }
  EXPECT_EQ(a.ran_on.load(), std::this_thread::get_id());
  for (int i = 0; i < 5000 && b.done.load() == 0; ++i)
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  ASSERT_EQ(b.done.load(), 1);
  EXPECT_NE(b.ran_on.load(), std::this_thread::get_id());
  EXPECT_EQ(e2.inline_rounds(), 0u);
  e1.Remove(&a);
  e2.Remove(&b);
}

TEST(EngineTest, ATaskAddedDuringAProducersRoundIsAddedWithoutWaitingForTheEngine) {
  // As a kernel-TCP listener adopts a connection in its round: the producer running the round
  // holds the round lock the engine needs to apply the add, so waiting for it would deadlock.
  Engine e(0, -1, "", absl::ZeroDuration());
  ASSERT_TRUE(e.Start().ok());
  WorkTask a, b;
  e.Add(&a);
  a.on_take = [&](uint64_t, uint64_t*) { e.Add(&b); };
  AwaitSleep(e);
  {
    TransmitInlineScope scope;
    Produce(a);
    EXPECT_EQ(a.ran_on.load(), std::this_thread::get_id());
  }
  Produce(b);  // the engine took b on
  e.Remove(&a);
  e.Remove(&b);
}

TEST(EngineTest, AnEventLoopsDeferredWriteLeavesWithItsFlushOnItsOwnThread) {
  // As the preload's epoll_wait: the loop flushes each time it comes back to wait; a write in a
  // DeferTransmitScope between two waits leaves with the second, not by waking the engine.
  Engine e(0, -1, "", absl::ZeroDuration());
  ASSERT_TRUE(e.Start().ok());
  WorkTask t;
  e.Add(&t);
  FlushDeferredTransmit();  // this thread is a loop's
  int deferred = 0, here = 0;
  for (int i = 0; i < 20; ++i) {
    AwaitSleep(e);
    const int before = t.done.load();
    {
      DeferTransmitScope scope;
      t.work = 1;
      t.Wake();
    }
    deferred += t.done.load() == before;  // nobody ran it yet: it waits for the flush
    FlushDeferredTransmit();
    for (int k = 0; k < 5000 && t.done.load() == before; ++k)
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    ASSERT_GT(t.done.load(), before);
    here += t.ran_on.load() == std::this_thread::get_id();
  }
  // (A 100 ms lost-wakeup timeout of the engine may coincide with one of them.)
  EXPECT_GE(deferred, 18);
  EXPECT_GE(here, 18);
  e.Remove(&t);
}

TEST(EngineTest, ADeferredWriteWhoseLoopDoesNotComeBackLeavesOnTheEnginesTimer) {
  Engine e(0, -1, "", absl::ZeroDuration());
  ASSERT_TRUE(e.Start().ok());
  WorkTask t;
  e.Add(&t);
  FlushDeferredTransmit();
  for (int i = 0; i < 5; ++i) {
    AwaitSleep(e);
    const auto start = std::chrono::steady_clock::now();
    {
      DeferTransmitScope scope;
      Produce(t);  // waits without flushing: the engine's timer runs it
    }
    const auto took = std::chrono::steady_clock::now() - start;
    EXPECT_NE(t.ran_on.load(), std::this_thread::get_id());
    // kDeferTransmitUs, generous for loaded CI machines, far below the engine's 100 ms bound.
    EXPECT_LT(took, std::chrono::milliseconds(50)) << "round " << i;
  }
  FlushDeferredTransmit();  // owes nothing now: the engine ran it
  e.Remove(&t);
}

// A task that records whether each round asked it to commit open segments (RoundFlushesOpen).
class OpenTask : public EngineTask {
 public:
  std::atomic<int> rounds{0}, flushing_rounds{0};
  std::atomic<std::thread::id> flushed_on{};
  bool Run(uint64_t, uint64_t*) override {
    rounds++;
    if (RoundFlushesOpen()) {
      flushing_rounds++;
      flushed_on = std::this_thread::get_id();
    }
    return false;
  }
  int wait_fd() const override { return -1; }
};

TEST(EngineTest, AnEventLoopsOpenSegmentIsCommittedByTheRoundItsWaitRuns) {
  // A loop's small write left a segment open (coalescing) on a channel of this engine: its next
  // wait asks for it to leave at once — one round, on the loop's own thread when the engine
  // sleeps — instead of after kCorkIdleUs.
  Engine e(0, -1, "", absl::ZeroDuration());
  ASSERT_TRUE(e.Start().ok());
  OpenTask t;
  e.Add(&t);
  FlushDeferredTransmit();  // this thread is a loop's
  for (int i = 0; i < 5; ++i) {
    AwaitSleep(e);
    const int before = t.flushing_rounds.load();
    NoteOpenSegment(&e);
    FlushDeferredTransmit();
    for (int k = 0; k < 5000 && t.flushing_rounds.load() == before; ++k)
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    EXPECT_EQ(t.flushing_rounds.load(), before + 1) << "round " << i;
    EXPECT_EQ(t.flushed_on.load(), std::this_thread::get_id()) << "round " << i;
  }
  // Asked once, committed once: the engine's own rounds after it hold segments as usual.
  const int flushed = t.flushing_rounds.load();
  e.Wake();
  for (int k = 0; k < 50; ++k) std::this_thread::sleep_for(std::chrono::microseconds(200));
  EXPECT_EQ(t.flushing_rounds.load(), flushed);
  // Not a loop's thread: nothing is asked.
  std::thread([&] {
    NoteOpenSegment(&e);
    FlushDeferredTransmit();  // (its first: it did not flush when the segment opened)
  }).join();
  FlushDeferredTransmit();
  e.Wake();
  for (int k = 0; k < 50; ++k) std::this_thread::sleep_for(std::chrono::microseconds(200));
  EXPECT_EQ(t.flushing_rounds.load(), flushed);
  e.Remove(&t);
}

TEST(EngineTest, AThreadsListsNamingADestroyedEngineAreDroppedUnread) {
  // A stack torn down and made again in one process: this thread's flush must not touch the
  // engine its list named (in the sanitized build, a heap-use-after-free), and the lists work
  // for the new engine.
  FlushDeferredTransmit();
  {
    auto gone = std::make_unique<Engine>(0, -1, "", absl::ZeroDuration());
    ASSERT_TRUE(gone->Start().ok());
    NoteOpenSegment(gone.get());
  }
  Engine e(1, -1, "", absl::ZeroDuration());
  ASSERT_TRUE(e.Start().ok());
  OpenTask t;
  e.Add(&t);
  AwaitSleep(e);
  FlushDeferredTransmit();
  NoteOpenSegment(&e);
  FlushDeferredTransmit();
  for (int k = 0; k < 5000 && t.flushing_rounds.load() == 0; ++k)
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  EXPECT_EQ(t.flushing_rounds.load(), 1);
  e.Remove(&t);
}

TEST(EngineTest, AThreadThatNeverFlushesDoesNotDefer) {
  Engine e(0, -1, "", absl::ZeroDuration());
  ASSERT_TRUE(e.Start().ok());
  WorkTask t;
  e.Add(&t);
  std::thread([&] {
    for (int i = 0; i < 5; ++i) {
      AwaitSleep(e);
      DeferTransmitScope scope;
      Produce(t);
      EXPECT_NE(t.ran_on.load(), std::this_thread::get_id());
    }
  }).join();
  e.Remove(&t);
}

// A task whose input is an eventfd, as an AF_XDP queue's is its XSK: Run takes what is there.
class InputTask : public EngineTask {
 public:
  InputTask() : fd_(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) {}
  ~InputTask() override { close(fd_); }
  std::atomic<int> taken{0};
  std::atomic<std::thread::id> ran_on{};
  bool Run(uint64_t, uint64_t*) override {
    uint64_t v;
    if (read(fd_, &v, sizeof(v)) != sizeof(v)) return false;
    ran_on = std::this_thread::get_id();
    taken++;
    return true;
  }
  int wait_fd() const override { return fd_; }
  void Arrive() {
    uint64_t one = 1;
    ASSERT_EQ(write(fd_, &one, sizeof(one)), 8);
  }
  // Waits up to `ms` for a round to take the input.
  bool AwaitTaken(int before, int ms) {
    for (int i = 0; i < ms * 5 && taken.load() == before; ++i)
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    return taken.load() > before;
  }

 private:
  const int fd_;
};

bool Readable(int fd, int ms) {
  pollfd p{fd, POLLIN, 0};
  return poll(&p, 1, ms) == 1 && (p.revents & POLLIN);
}

TEST(EngineTest, WhileItsInputIsOnLoanAnArrivalWakesTheBorrowerNotTheEngine) {
  Engine e(0, -1, "", absl::ZeroDuration());
  ASSERT_TRUE(e.Start().ok());
  InputTask t;
  e.Add(&t);
  for (int i = 0; i < 10; ++i) {
    AwaitSleep(e);
    InputLoan loan = e.BorrowInput();
    ASSERT_TRUE(loan);
    const uint64_t wakeups = e.wakeups();
    const int before = t.taken.load();
    t.Arrive();
    ASSERT_TRUE(Readable(loan.fd(), 1000)) << "the loan's fd never saw the arrival";
    // Had the engine still watched its input it would have woken and taken it by now.
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
    EXPECT_EQ(t.taken.load(), before) << "round " << i;
    EXPECT_EQ(e.wakeups(), wakeups) << "round " << i;
    EXPECT_TRUE(loan.Run());
    EXPECT_EQ(t.taken.load(), before + 1);
    EXPECT_EQ(t.ran_on.load(), std::this_thread::get_id());
  }
  e.Remove(&t);
}

TEST(EngineTest, TheEngineWatchesItsInputAgainWhenTheLastLoanEnds) {
  Engine e(0, -1, "", absl::ZeroDuration());
  ASSERT_TRUE(e.Start().ok());
  InputTask t;
  e.Add(&t);
  AwaitSleep(e);
  InputLoan a = e.BorrowInput(), b = e.BorrowInput();
  ASSERT_TRUE(a && b && a.same_engine(b));
  int before = t.taken.load();
  t.Arrive();
  a.Return();
  // b still holds the input: the engine sleeps on (it would look only after its 100 ms bound).
  EXPECT_FALSE(t.AwaitTaken(before, 20));
  // Input that arrived during the loan goes to the engine the moment the loan ends.
  b.Return();
  EXPECT_TRUE(t.AwaitTaken(before, 50)) << "the engine did not take the input the loan left";
  EXPECT_NE(t.ran_on.load(), std::this_thread::get_id());
  // And later arrivals wake it as before.
  for (int i = 0; i < 5; ++i) {
    AwaitSleep(e);
    before = t.taken.load();
    t.Arrive();
    EXPECT_TRUE(t.AwaitTaken(before, 50)) << "round " << i;
  }
  e.Remove(&t);
}

}  // namespace
}  // namespace netch::chan
