// The application-facing half of a channel (ChannelCore + SpscRing) against a fake driver: the
// engine side is driven by hand from the test.
#include "afxdp_channels/channel_core.h"

#include <poll.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <random>
#include <thread>
#include <vector>

#include "afxdp_channels/afxdp_driver.h"
#include "afxdp_channels/channel.h"
#include "common/spsc_ring.h"
#include "gtest/gtest.h"
#include "test/support/engine_sleep.h"

namespace netch::chan {
namespace {

constexpr uint32_t kSlot = 2048;

class FakeChannel final : public ChannelCore {
 public:
  explicit FakeChannel(uint32_t ring) : ChannelCore(7, ring, 1000), slab_(4 * ring * kSlot) {}
  uint8_t* BufAddr(uint64_t token) override { return slab_.data() + token; }
  uint32_t peer_ipv4() const override { return 0x01020304; }
  void GiveBuffers(uint32_t n) {
    for (uint32_t i = 0; i < n; ++i) free_.PushOne(next_++ * kSlot);
  }
  // Consumer and engine in one: releases a received buffer and, as the engine would, takes it
  // back and offers it again as a send buffer. False if it did not come back.
  bool Recycle(const RxSegment& r) {
    Release({&r, 1});
    BufRef back;
    if (!ret_.PopOne(&back)) return false;
    free_.PushOne(back.token);
    return true;
  }
  // Engine: takes one released buffer back and offers it as a send buffer.
  bool TakeBackOne() {
    BufRef back;
    if (!ret_.PopOne(&back)) return false;
    free_.PushOne(back.token);
    return true;
  }
  // What the engine's last round published about the receive window (rx_under_pressure).
  void SetPressure(bool p) { pub_.rx_pressure.store(p); }
  // Engine: moves everything from txq_ to rxq_ ("the wire"), as a loopback.
  uint32_t Loop() {
    BufRef b[64];
    uint32_t moved = 0;
    for (uint32_t n; (n = txq_.Pop(b)) > 0;) moved += rxq_.Push({b, n});
    NotifyApp();
    return moved;
  }

 private:
  std::vector<uint8_t> slab_;
  uint64_t next_ = 0;
};

TxSegment Seg(uint64_t seq, const std::vector<uint8_t>& payload) {
  TxSegment s;
  s.hdr.src_port = 1;
  s.hdr.dst_port = 2;
  s.hdr.seq = seq;
  s.payload = payload;
  return s;
}

TEST(SpscRingTest, KeepsOrderAcrossThreadsInBatches) {
  SpscRing<uint64_t> ring(256);
  constexpr uint64_t kItems = 1'000'000;
  std::thread producer([&] {
    uint64_t next = 0, batch[37];
    while (next < kItems) {
      uint32_t n = 0;
      for (; n < 37 && next + n < kItems; ++n) batch[n] = next + n;
      next += ring.Push({batch, n});
    }
  });
  uint64_t expect = 0, got[64];
  bool ordered = true;
  while (expect < kItems) {
    const uint32_t n = ring.Pop(got);
    for (uint32_t i = 0; i < n; ++i) ordered &= got[i] == expect++;
  }
  producer.join();
  EXPECT_TRUE(ordered);
  EXPECT_TRUE(ring.EmptyApprox());
}

TEST(SpscRingTest, NeverHoldsMoreThanItsCapacity) {
  SpscRing<int> ring(8);
  std::vector<int> v(20, 1);
  EXPECT_EQ(ring.Push(std::span<const int>(v)), 8u);
  EXPECT_EQ(ring.Room(), 0u);
  int out[3];
  EXPECT_EQ(ring.Pop(out), 3u);
  EXPECT_EQ(ring.Room(), 3u);
}

TEST(ChannelCoreTest, EnqueueCopiesHeaderAndPayloadAndDequeueReturnsThemInOrder) {
  FakeChannel ch(16);
  ch.GiveBuffers(16);
  std::vector<uint8_t> a(100, 0xA1), b(1000, 0xB2), c(0);
  const TxSegment segs[] = {Seg(0, a), Seg(100, b), Seg(1100, c)};
  auto n = ch.Enqueue(segs);
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 3u);
  EXPECT_EQ(ch.Loop(), 3u);
  RxSegment out[8];
  ASSERT_EQ(ch.Dequeue(SIZE_MAX, out), 3u);
  EXPECT_EQ(out[0].hdr.seq, 0u);
  EXPECT_EQ(out[1].hdr.seq, 100u);
  EXPECT_EQ(out[2].hdr.seq, 1100u);
  EXPECT_EQ(std::vector<uint8_t>(out[1].payload.begin(), out[1].payload.end()), b);
  EXPECT_EQ(out[2].payload.size(), 0u);
  ch.Release({out, 3});
  EXPECT_EQ(ch.ret_.SizeApprox(), 3u);
  EXPECT_EQ(ch.stats().rx_segments, 3u);
  EXPECT_EQ(ch.stats().rx_bytes, 1100u);
}

// Counts the rounds of the engine the channel's returned buffers would wake.
class CountingTask : public EngineTask {
 public:
  std::atomic<int> rounds{0};
  bool Run(uint64_t, uint64_t*) override {
    rounds++;
    return false;
  }
  int wait_fd() const override { return -1; }
};

TEST(ChannelCoreTest, ReturnedBuffersWakeTheEngineOnlyWhenTheWindowNeedsThem) {
  // An event loop's read returns buffers on every pass; an engine with a window to spare takes
  // them in its next round rather than being woken for each (Redis: thousands of wakeups a
  // second). A window below half (rx_under_pressure) may have stopped the sender: then it is.
  Engine e(0, -1, "", absl::ZeroDuration());
  ASSERT_TRUE(e.Start().ok());
  CountingTask t;
  e.Add(&t);
  FakeChannel ch(16);
  ch.set_task(&t);
  ch.GiveBuffers(16);
  const std::vector<uint8_t> p(100, 'x');
  auto one = [&] {
    const TxSegment s = Seg(0, p);
    EXPECT_EQ(*ch.Enqueue({&s, 1}), 1u);
    ch.Loop();
    RxSegment r;
    EXPECT_EQ(ch.Dequeue(SIZE_MAX, {&r, 1}), 1u);
    return r;
  };
  // Whether a Release woke the sleeping engine within 20 ms. (The engine also wakes by itself
  // every 100 ms: a trial may see that, hence several.)
  auto woke = [&] {
    const RxSegment r = one();
    AwaitSleep(e);
    const int before = t.rounds.load();
    ch.Release({&r, 1});
    for (int k = 0; k < 100 && t.rounds.load() == before; ++k)
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    ch.TakeBackOne();
    return t.rounds.load() != before;
  };
  int woken = 0;
  for (int i = 0; i < 5; ++i) woken += woke();
  EXPECT_LE(woken, 2) << "returns woke an engine with the window to spare";
  ch.SetPressure(true);
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(woke()) << "the window is below half: trial " << i;
  e.Remove(&t);
}

// An engine delivering inline (Channel::DeliveryHook) dequeues on its own thread while an
// application thread may be inside Release, waiting for that engine to drain ret_: the Dequeue
// must not wait behind it (with one consumer lock for both, the engine hung there and every
// channel of it died: netchperf 4 KiB streams, 2 of 8 runs).
TEST(ChannelCoreTest, DequeueNeverWaitsBehindAReleaseWaitingForTheEngine) {
  constexpr uint32_t kRing = 8;
  FakeChannel ch(kRing);
  std::vector<uint8_t> p(10, 1);
  auto deliver = [&](uint32_t n, RxSegment* out) {
    ch.GiveBuffers(n);
    for (uint32_t i = 0; i < n; ++i) {
      const TxSegment s = Seg(i * 10, p);
      ASSERT_TRUE(ch.Enqueue({&s, 1}).ok());
    }
    ASSERT_EQ(ch.Loop(), n);
    ASSERT_EQ(ch.Dequeue(SIZE_MAX, {out, n}), n);
  };
  RxSegment first[kRing], second[kRing], third[1];
  deliver(kRing, first);
  deliver(kRing, second);
  ch.Release({first, kRing});  // ret_ is full now; the "engine" (this thread) has not drained it
  std::atomic<bool> released{false};
  std::thread releaser([&] {
    ch.Release({second, kRing});  // waits for room
    released = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  std::atomic<bool> dequeued{false};
  std::thread engine([&] {
    deliver(1, third);
    dequeued = true;
  });
  for (int i = 0; i < 200 && !dequeued.load(); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_TRUE(dequeued.load()) << "Dequeue waited for a Release that waits for the engine";
  while (!released.load()) {  // the engine drains: the releaser (and a stuck Dequeue) finish
    BufRef b;
    if (!ch.ret_.PopOne(&b)) std::this_thread::yield();
  }
  releaser.join();
  engine.join();
  for (BufRef b; ch.ret_.PopOne(&b);) {
  }
  ch.Release({third, 1});
}

// What a process about to exit waits for: a segment queued for the engine (a FIN behind the
// last data) keeps the channel busy although the transport has nothing unacknowledged yet.
TEST(ChannelCoreTest, ASegmentQueuedForTheEngineKeepsTheChannelFromTxIdle) {
  FakeChannel ch(16);
  ch.GiveBuffers(4);
  EXPECT_TRUE(ch.tx_idle());
  const std::vector<uint8_t> fin;
  const TxSegment s = Seg(0, fin);
  ASSERT_EQ(*ch.Enqueue({&s, 1}), 1u);
  EXPECT_EQ(ch.tx_queued_bytes(), 0u) << "the transport has not taken it";
  EXPECT_FALSE(ch.tx_idle());
  EXPECT_EQ(ch.Loop(), 1u);  // the engine takes it
  EXPECT_TRUE(ch.tx_idle());
}

TEST(ChannelCoreTest, OversizedPayloadIsRejectedAndNothingIsQueued) {
  FakeChannel ch(16);
  ch.GiveBuffers(16);
  std::vector<uint8_t> ok(1000), big(1001);
  const TxSegment segs[] = {Seg(0, ok), Seg(1000, big)};
  auto n = ch.Enqueue(segs);
  EXPECT_EQ(n.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(ch.txq_.EmptyApprox()) << "the whole call is refused, not half of it";
}

TEST(ChannelCoreTest, EnqueueTakesNoMoreThanFreeBuffersAndTxSlots) {
  FakeChannel ch(8);
  ch.GiveBuffers(5);
  std::vector<uint8_t> p(10);
  std::vector<TxSegment> segs(20, Seg(0, p));
  EXPECT_EQ(*ch.Enqueue(segs), 5u) << "only five empty buffers";
  ch.GiveBuffers(8);
  EXPECT_EQ(*ch.Enqueue(segs), 3u) << "txq_ (8 slots) holds five already";
  ch.Loop();
  EXPECT_EQ(*ch.Enqueue(segs), 5u);
}

TEST(ChannelCoreTest, DequeueStopsAtMaxBytesButAlwaysReturnsOneSegment) {
  FakeChannel ch(16);
  ch.GiveBuffers(16);
  std::vector<uint8_t> p(400);
  std::vector<TxSegment> segs(4, Seg(0, p));
  ASSERT_EQ(*ch.Enqueue(segs), 4u);
  ch.Loop();
  RxSegment out[8];
  EXPECT_EQ(ch.Dequeue(100, out), 1u) << "one segment even if larger than max_bytes";
  EXPECT_EQ(ch.Dequeue(800, out), 2u);
  EXPECT_EQ(ch.Dequeue(SIZE_MAX, out), 1u);
  EXPECT_EQ(ch.Dequeue(SIZE_MAX, out), 0u);
}

TEST(ChannelCoreTest, WaitTimesOutWhenNothingCanHappenAndWakesOnDelivery) {
  FakeChannel ch(8);  // no free buffers, nothing received
  EXPECT_FALSE(ch.Wait(absl::Milliseconds(20)));
  ch.GiveBuffers(1);
  std::vector<uint8_t> p(10);
  const TxSegment s = Seg(0, p);
  ASSERT_EQ(*ch.Enqueue({&s, 1}), 1u);  // uses the only buffer: still nothing to wait for
  EXPECT_FALSE(ch.Wait(absl::Milliseconds(20)));
  std::thread engine([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
    ch.Loop();
  });
  EXPECT_TRUE(ch.Wait(absl::Seconds(5)));
  engine.join();
  RxSegment out[1];
  EXPECT_EQ(ch.Dequeue(SIZE_MAX, out), 1u);
}

TEST(ChannelCoreTest, AReceiveOnlyWaiterSleepsThroughFreeSendBuffers) {
  FakeChannel ch(8);
  ch.GiveBuffers(8);  // Enqueue could make progress: a kBoth waiter returns at once
  EXPECT_TRUE(ch.Wait(absl::Seconds(5), Channel::kBoth));
  const uint64_t t0 = NowUs();
  EXPECT_FALSE(ch.Wait(absl::Milliseconds(30), Channel::kReadable));
  EXPECT_GE(NowUs() - t0, 25'000u) << "woken by send-side readiness it did not ask for";
  ch.ArmNotify(Channel::kReadable);
  pollfd p{ch.notify_fd(Channel::kReadable), POLLIN, 0};
  EXPECT_EQ(poll(&p, 1, 0), 0) << "notify fd signalled for an interest nobody armed";
}

TEST(ChannelCoreTest, SendAndReceiveWaitersNeverConsumeEachOthersWakeups) {
  FakeChannel ch(8);
  // A dispatcher waits for data, an application for room; the engine frees room only.
  ch.ArmNotify(Channel::kReadable);
  ch.ArmNotify(Channel::kWritable);
  ch.GiveBuffers(2);
  ch.NotifyApp(Channel::kWritable);
  pollfd rx{ch.notify_fd(Channel::kReadable), POLLIN, 0};
  pollfd tx{ch.notify_fd(Channel::kWritable), POLLIN, 0};
  EXPECT_EQ(poll(&rx, 1, 0), 0) << "the receive waiter was woken for send-side room";
  EXPECT_EQ(poll(&tx, 1, 0), 1) << "the send waiter was not woken";
  EXPECT_NE(ch.notify_fd(Channel::kReadable), ch.notify_fd(Channel::kWritable));
}

// writable() is what a watcher of a socket's write readiness asks (the stack's CheckWatched):
// room, not "something happened since a notification was last armed" — a state change that no
// write-side notification consumed (the channel coming up) made it true for good, and an event
// loop retried its full channels without end (Redis MSET -P 16 under netchrun).
TEST(ChannelCoreTest, WritableMeansRoomWhateverTheStateDidBefore) {
  FakeChannel ch(8);
  ch.SetState(ChannelState::kUp);
  EXPECT_FALSE(ch.writable()) << "no empty send buffer";
  ch.GiveBuffers(2);
  EXPECT_TRUE(ch.writable());
  std::vector<uint8_t> p(10);
  std::vector<TxSegment> segs(2, Seg(0, p));
  ASSERT_EQ(*ch.Enqueue(segs), 2u);
  EXPECT_FALSE(ch.writable()) << "both buffers taken";
  ch.SetState(ChannelState::kFailed);
  EXPECT_TRUE(ch.writable()) << "a dead channel refuses at once: the writer learns why";
}

TEST(ChannelCoreTest, AStateChangeFiresOneNotificationNotEveryLaterOne) {
  FakeChannel ch(8);
  ch.SetState(ChannelState::kUp);
  ch.ArmNotify(Channel::kReadable);
  pollfd p{ch.notify_fd(Channel::kReadable), POLLIN, 0};
  ASSERT_EQ(poll(&p, 1, 0), 1) << "the change to kUp is news to this waiter";
  uint64_t v;
  ASSERT_EQ(read(ch.notify_fd(Channel::kReadable), &v, sizeof(v)), 8);
  ch.ArmNotify(Channel::kReadable);
  EXPECT_EQ(poll(&p, 1, 0), 0) << "the same change reported again: a busy loop for pollers";
}

TEST(ChannelCoreTest, StateChangesWakeWaitersAndStopEnqueue) {
  FakeChannel ch(8);
  ch.GiveBuffers(8);
  std::thread engine([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    ch.SetState(ChannelState::kFailed);
  });
  // Free buffers make Wait() return at once; drain the notion by waiting on state only.
  while (ch.state() != ChannelState::kFailed) ch.Wait(absl::Milliseconds(50));
  engine.join();
  std::vector<uint8_t> p(10);
  const TxSegment s = Seg(0, p);
  EXPECT_EQ(*ch.Enqueue({&s, 1}), 0u);
  EXPECT_EQ(StateName(ch.state()), "failed");
}

TxSegment Small(uint16_t port, uint64_t seq, const std::vector<uint8_t>& payload) {
  TxSegment s = Seg(seq, payload);
  s.hdr.src_port = port;
  s.coalesce = true;
  return s;
}

// The bytes of every segment the "wire" carries, in order, with their headers.
std::vector<RxSegment> Drain(FakeChannel& ch) {
  ch.Loop();
  std::vector<RxSegment> out(64);
  out.resize(ch.Dequeue(SIZE_MAX, out));
  return out;
}

TEST(ChannelCoreTest, TryReleaseGivesTheBufferBackOrDoesNothingWhenItWouldWait) {
  // What a delivery hook may call on the engine's own thread: Release would wait there for the
  // engine to drain the return ring, forever.
  FakeChannel ch(4);
  ch.GiveBuffers(4);
  const std::vector<uint8_t> p(10, 1);
  std::vector<RxSegment> held;
  for (uint64_t round = 0; round < 2; ++round) {
    std::vector<TxSegment> segs;
    for (uint64_t i = 0; i < (round == 0 ? 4u : 1u); ++i) segs.push_back(Seg(i * 10, p));
    auto n = ch.Enqueue(segs);
    ASSERT_TRUE(n.ok());
    ASSERT_EQ(*n, segs.size());
    for (const RxSegment& r : Drain(ch)) held.push_back(r);
    if (round == 0) ch.GiveBuffers(1);  // a fifth buffer: the return ring holds only four
  }
  ASSERT_EQ(held.size(), 5u);
  EXPECT_EQ(ch.rx_outstanding(), 5u);
  for (size_t i = 0; i < 4; ++i) EXPECT_TRUE(ch.TryRelease(held[i]));
  EXPECT_EQ(ch.rx_outstanding(), 1u);
  EXPECT_FALSE(ch.TryRelease(held[4])) << "the return ring is full: it would have to wait";
  EXPECT_EQ(ch.rx_outstanding(), 1u);
  ASSERT_TRUE(ch.TakeBackOne());
  EXPECT_TRUE(ch.TryRelease(held[4]));
  EXPECT_EQ(ch.rx_outstanding(), 0u);
}

TEST(ChannelCoreTest, SmallWritesOfOneSocketBecomeOneSegmentUntilItIsFull) {
  FakeChannel ch(16);
  ch.EnableCoalescing();
  ch.GiveBuffers(16);
  const std::vector<uint8_t> a(250, 'a'), b(250, 'b'), c(250, 'c'), d(300, 'd');
  for (const auto& [seq, p] : {std::pair{0, &a}, {250, &b}, {500, &c}}) {
    const TxSegment s = Small(1, seq, *p);
    ASSERT_EQ(*ch.Enqueue({&s, 1}), 1u);
  }
  EXPECT_TRUE(ch.has_open());
  EXPECT_TRUE(Drain(ch).empty()) << "held open: the channel is busy and it is not full";
  // The fourth does not fit (max_payload 1000): it fills this segment, which leaves full, and
  // its last 50 bytes open the next one.
  const TxSegment s4 = Small(1, 750, d);
  ASSERT_EQ(*ch.Enqueue({&s4, 1}), 1u);
  auto got = Drain(ch);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].hdr.seq, 0u);
  ASSERT_EQ(got[0].payload.size(), 1000u);
  EXPECT_EQ(got[0].payload[0], 'a');
  EXPECT_EQ(got[0].payload[250], 'b');
  EXPECT_EQ(got[0].payload[749], 'c');
  EXPECT_EQ(got[0].payload[999], 'd');
  ch.Release(got);
  EXPECT_TRUE(ch.has_open()) << "the rest of the fourth write";
  ch.Flush();
  got = Drain(ch);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].hdr.seq, 1000u);
  EXPECT_EQ(got[0].payload.size(), 50u);
  ch.Release(got);
}

TEST(ChannelCoreTest, OnlyContiguousBytesOfTheSameSocketAreMerged) {
  FakeChannel ch(16);
  ch.EnableCoalescing();
  ch.GiveBuffers(16);
  const std::vector<uint8_t> p(100, 'x');
  // Socket 2's bytes start where socket 1's end: contiguous numbers, yet another stream.
  const TxSegment segs[] = {Small(1, 0, p), Small(2, 100, p), Small(2, 500, p), Small(2, 600, p)};
  ASSERT_EQ(*ch.Enqueue(segs), 4u);
  uint64_t deadline = UINT64_MAX;
  EXPECT_TRUE(ch.FlushOpen(NowUs() + kCorkIdleUs, /*idle=*/true, /*now=*/false, &deadline));
  auto got = Drain(ch);
  ASSERT_EQ(got.size(), 3u);  // socket 1; socket 2 at 100; socket 2 at 500..700 merged
  EXPECT_EQ(got[0].hdr.src_port, 1);
  EXPECT_EQ(got[0].payload.size(), 100u);
  EXPECT_EQ(got[1].hdr.src_port, 2);
  EXPECT_EQ(got[1].payload.size(), 100u);
  EXPECT_EQ(got[2].hdr.seq, 500u);
  EXPECT_EQ(got[2].payload.size(), 200u);
  ch.Release(got);
}

TEST(ChannelCoreTest, AHeldWriteLeavesWhenTheChannelIdlesOrAfterTheHoldTime) {
  FakeChannel ch(16);
  ch.EnableCoalescing();
  ch.GiveBuffers(16);
  const std::vector<uint8_t> p(100, 'x');
  const TxSegment s = Small(1, 0, p);
  // The segment opens between t0 and t1 (its own clock read): asking at t0 it is young whatever
  // the thread's scheduling between the reads (a sanitized build preempted for over 20 µs once).
  const uint64_t t0 = NowUs();
  ASSERT_EQ(*ch.Enqueue({&s, 1}), 1u);
  const uint64_t t1 = NowUs();
  uint64_t deadline = UINT64_MAX;
  EXPECT_FALSE(ch.FlushOpen(t0, /*idle=*/false, /*now=*/false, &deadline))
      << "busy and young: held";
  EXPECT_LE(deadline, t1 + kCorkHoldUs);
  EXPECT_FALSE(ch.FlushOpen(t0, /*idle=*/true, /*now=*/false, &deadline))
      << "idle, but a writer may add more";
  EXPECT_LE(deadline, t1 + kCorkIdleUs);
  EXPECT_TRUE(Drain(ch).empty());
  EXPECT_TRUE(ch.FlushOpen(t1 + kCorkHoldUs + 1, /*idle=*/false, /*now=*/false, &deadline))
      << "held long enough";
  auto got = Drain(ch);
  ASSERT_EQ(got.size(), 1u);
  ch.Release(got);
  // An event loop about to wait asked the engine's round to commit it (RoundFlushesOpen): at
  // once, busy or idle.
  const TxSegment next = Small(1, 100, p);
  const uint64_t t2 = NowUs();
  ASSERT_EQ(*ch.Enqueue({&next, 1}), 1u);
  EXPECT_TRUE(ch.FlushOpen(t2, /*idle=*/false, /*now=*/true, &deadline)) << "the loop waits";
  got = Drain(ch);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].hdr.seq, 100u);
  ch.Release(got);
  // A writer about to wait for a reply flushes.
  const TxSegment rpc = Small(1, 100, p);
  ASSERT_EQ(*ch.Enqueue({&rpc, 1}), 1u);
  ch.Flush();
  got = Drain(ch);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].hdr.seq, 100u);
  ch.Release(got);
  // A write that is not coalescable goes out at once, after what was held.
  const TxSegment held = Small(1, 200, p);
  TxSegment now_seg = Seg(300, p);
  now_seg.hdr.src_port = 1;
  const TxSegment both[] = {held, now_seg};
  ASSERT_EQ(*ch.Enqueue(both), 2u);
  got = Drain(ch);
  ASSERT_EQ(got.size(), 2u);
  EXPECT_EQ(got[0].hdr.seq, 200u);
  EXPECT_EQ(got[1].hdr.seq, 300u);
  ch.Release(got);
}

TEST(ChannelCoreTest, CoalescedWritesOfRandomSizesKeepEveryByteInPlace) {
  FakeChannel ch(64);
  ch.EnableCoalescing();
  std::vector<uint8_t> stream(200'000);
  for (size_t i = 0; i < stream.size(); ++i) stream[i] = static_cast<uint8_t>(i * 7 + i / 251);
  std::vector<uint8_t> got;
  uint64_t expect_seq = 0;
  std::mt19937 rng(5);
  size_t off = 0;
  bool ordered = true;
  auto drain = [&] {
    for (const RxSegment& r : Drain(ch)) {
      ordered &= r.hdr.seq == expect_seq;
      expect_seq += r.payload.size();
      got.insert(got.end(), r.payload.begin(), r.payload.end());
      ASSERT_TRUE(ch.Recycle(r));
    }
  };
  ch.GiveBuffers(32);
  while (off < stream.size()) {
    // A write as VNS cuts it: segments of at most max_payload (1000), all coalescable.
    const size_t w = std::min<size_t>(1 + rng() % 3000, stream.size() - off);
    std::vector<TxSegment> segs;
    for (size_t o = 0; o < w; o += 1000) {
      TxSegment s;
      s.hdr.src_port = 1;
      s.hdr.seq = off + o;
      s.payload = {stream.data() + off + o, std::min<size_t>(1000, w - o)};
      s.coalesce = true;
      segs.push_back(s);
    }
    size_t done = 0;
    for (int spins = 0; done < segs.size(); ++spins) {
      ASSERT_LT(spins, 10'000) << "no progress at offset " << off << ": open " << ch.has_open()
                               << ", free " << ch.free_.SizeApprox() << ", txq "
                               << ch.txq_.SizeApprox();
      auto n = ch.Enqueue(std::span(segs).subspan(done));
      ASSERT_TRUE(n.ok());
      done += *n;
      if (rng() % 4 == 0) ch.Flush();
      drain();
    }
    off += w;
  }
  ch.Flush();
  drain();
  EXPECT_TRUE(ordered);
  ASSERT_EQ(got.size(), stream.size());
  EXPECT_TRUE(got == stream);
}

// A write that continues the open segment and spills into a new one needs two send slots (one
// for the full segment, one for the rest). With one, it must be refused whole: taking part of it
// and reporting it not taken made the sender send those bytes twice, the receiver drop the
// overlapping copy, and a 4 KiB stream over AF_XDP TX stall on the hole.
TEST(ChannelCoreTest, AWriteThatSpillsIsTakenWholeOrNotAtAll) {
  FakeChannel ch(4);  // four send slots
  ch.EnableCoalescing();
  ch.GiveBuffers(4);
  const std::vector<uint8_t> full(1000, 'f'), half(500, 'h');
  const TxSegment first[] = {Small(1, 0, full), Small(1, 1000, full), Small(1, 2000, full),
                             Small(1, 3000, half)};
  ASSERT_EQ(*ch.Enqueue(first), 4u);  // three full segments queued, 500 bytes held open
  ASSERT_TRUE(ch.has_open());
  ch.GiveBuffers(1);  // a buffer for the spill is there; a send slot for it is not
  const TxSegment spill = Small(1, 3500, full);  // 500 complete the open one, 500 spill over
  EXPECT_EQ(*ch.Enqueue({&spill, 1}), 0u) << "one slot left: the spill cannot be queued";
  auto got = Drain(ch);
  for (const auto& r : got) ASSERT_TRUE(ch.Recycle(r));
  ASSERT_EQ(*ch.Enqueue({&spill, 1}), 1u);
  ch.Flush();
  auto rest = Drain(ch);
  uint64_t seq = 3000;
  for (const auto& r : rest) {
    EXPECT_EQ(r.hdr.seq, seq) << "every byte once, in order";
    seq += r.payload.size();
  }
  EXPECT_EQ(seq, 4500u);
  ch.Release(rest);
}

TEST(ChannelCoreTest, ASealedChannelEndsWithItsLastSegmentAndTakesNothingAfter) {
  FakeChannel ch(16);
  ch.GiveBuffers(16);
  std::vector<uint8_t> a(100, 1);
  const TxSegment first[] = {Seg(0, a), Seg(100, a)};
  ASSERT_EQ(*ch.Enqueue(first), 2u);
  TxSegment last;
  last.hdr.type = NC_DRAIN;
  ASSERT_TRUE(ch.Seal(last));
  EXPECT_TRUE(ch.sealed());
  const TxSegment after[] = {Seg(200, a)};
  EXPECT_EQ(*ch.Enqueue(after), 0u) << "nothing after the last segment";
  ASSERT_EQ(ch.Loop(), 3u);
  RxSegment out[8];
  ASSERT_EQ(ch.Dequeue(SIZE_MAX, out), 3u);
  EXPECT_EQ(out[2].hdr.type, NC_DRAIN) << "the seal's segment comes after every earlier one";
  // The consumer side counts exactly what it holds: 0 only once everything is released.
  EXPECT_EQ(ch.rx_outstanding(), 3u);
  ch.Release({out, 2});
  EXPECT_EQ(ch.rx_outstanding(), 1u);
  ch.Release({out + 2, 1});
  EXPECT_EQ(ch.rx_outstanding(), 0u);
}

TEST(ChannelCoreTest, WithoutCoalescingTheFlagIsIgnored) {
  FakeChannel ch(16);
  ch.GiveBuffers(16);
  const std::vector<uint8_t> p(100, 'x');
  const TxSegment segs[] = {Small(1, 0, p), Small(1, 100, p)};
  ASSERT_EQ(*ch.Enqueue(segs), 2u);
  EXPECT_FALSE(ch.has_open());
  auto got = Drain(ch);
  EXPECT_EQ(got.size(), 2u);
  ch.Release(got);
}

TEST(DriverRegistryTest, KnowsTheBuiltInsAndRefusesUnknownAndDuplicateNames) {
  const auto names = DriverNames();
  EXPECT_NE(std::find(names.begin(), names.end(), "afxdp"), names.end());
  EXPECT_NE(std::find(names.begin(), names.end(), "tcp"), names.end());
  auto d = CreateDriver("carrier-pigeon", {});
  EXPECT_EQ(d.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(d.status().message().find("afxdp"), std::string::npos) << "lists what exists";
  EXPECT_EQ(RegisterDriver("tcp", CreateAfxdpDriver).code(), absl::StatusCode::kAlreadyExists);
  EXPECT_TRUE(RegisterDriver("test-only", [](const DriverOptions&) {
                return absl::StatusOr<std::unique_ptr<Driver>>(absl::UnimplementedError("x"));
              }).ok());
  EXPECT_EQ(CreateDriver("test-only", {}).status().code(), absl::StatusCode::kUnimplemented);
}

TEST(DriverRegistryTest, AfxdpDriverWithoutSteeringProgramSaysWhatIsMissing) {
  DriverOptions o;
  o.ifname = "lo";
  auto d = CreateDriver("afxdp", o);
  EXPECT_EQ(d.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(d.status().message().find("steering program"), std::string::npos) << d.status();
}

}  // namespace
}  // namespace netch::chan
