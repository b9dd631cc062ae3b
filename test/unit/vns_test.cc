// VNS pieces without a network: reassembly across channels in every arrival order, copy-worker
// splitting and parallel runs.
#include "vns_lib/vns.h"

#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "vns_lib/conn.h"
#include "vns_lib/copy_workers.h"
#include "vns_lib/reassembly.h"

namespace netch::vns {
namespace {

// A stream of `total` bytes cut into segments of varying sizes.
std::vector<HeldSeg> Cut(const std::vector<uint8_t>& stream, std::mt19937& rng) {
  std::vector<HeldSeg> segs;
  for (size_t off = 0; off < stream.size();) {
    const size_t len = std::min<size_t>(1 + rng() % 3000, stream.size() - off);
    HeldSeg h;
    h.seq = off;
    h.data = stream.data() + off;
    h.len = static_cast<uint32_t>(len);
    segs.push_back(h);
    off += len;
  }
  return segs;
}

// Reads everything available with reads of random sizes, like an application would.
std::vector<uint8_t> ReadAll(Reassembler& r, std::mt19937& rng, size_t* released) {
  std::vector<uint8_t> out;
  std::vector<CopyPiece> pieces;
  std::vector<HeldSeg> done;
  while (size_t avail = r.Readable()) {
    const size_t want = std::min<size_t>(avail, 1 + rng() % 10000);
    std::vector<uint8_t> buf(want);
    pieces.clear();
    EXPECT_EQ(r.Take(want, &pieces, &done), want);
    for (const auto& p : pieces) std::memcpy(buf.data() + p.dst_off, p.src, p.len);
    out.insert(out.end(), buf.begin(), buf.end());
  }
  *released += done.size();
  return out;
}

TEST(ReassemblerTest, DeliversInOrderWhateverTheArrivalOrder) {
  std::mt19937 rng(7);
  std::vector<uint8_t> stream(200'000);
  for (auto& b : stream) b = static_cast<uint8_t>(rng());
  for (int round = 0; round < 50; ++round) {
    auto segs = Cut(stream, rng);
    const size_t nsegs = segs.size();
    // Round 0: in order; 1: reversed; then "k channels round robin" interleavings and shuffles.
    if (round == 1) std::reverse(segs.begin(), segs.end());
    if (round >= 2 && round < 10) {
      const size_t k = 2 + round % 4;  // channels; each delivers its own segments in order
      std::vector<std::vector<HeldSeg>> per(k);
      for (size_t i = 0; i < segs.size(); ++i) per[i % k].push_back(segs[i]);
      segs.clear();
      std::vector<size_t> pos(k, 0);
      while (segs.size() < nsegs) {
        const size_t c = rng() % k;
        if (pos[c] < per[c].size()) segs.push_back(per[c][pos[c]++]);
      }
    }
    if (round >= 10) std::shuffle(segs.begin(), segs.end(), rng);
    Reassembler r;
    std::vector<uint8_t> got;
    size_t released = 0;
    for (const auto& s : segs) {
      ASSERT_TRUE(r.Insert(s));
      if (rng() % 4 == 0) {
        auto part = ReadAll(r, rng, &released);
        got.insert(got.end(), part.begin(), part.end());
      }
    }
    auto rest = ReadAll(r, rng, &released);
    got.insert(got.end(), rest.begin(), rest.end());
    ASSERT_EQ(got.size(), stream.size()) << "round " << round;
    EXPECT_TRUE(got == stream) << "round " << round;
    EXPECT_EQ(released, nsegs) << "every segment handed back exactly once";
    EXPECT_TRUE(r.empty());
  }
}

TEST(ReassemblerTest, RefusesDuplicatesAndOverlaps) {
  std::vector<uint8_t> data(100, 1);
  Reassembler r;
  auto seg = [&](uint64_t seq, uint32_t len) {
    HeldSeg h;
    h.seq = seq;
    h.data = data.data();
    h.len = len;
    return h;
  };
  EXPECT_TRUE(r.Insert(seg(10, 10)));
  EXPECT_FALSE(r.Insert(seg(10, 10))) << "duplicate";
  EXPECT_FALSE(r.Insert(seg(15, 10))) << "overlaps the end of a held segment";
  EXPECT_FALSE(r.Insert(seg(5, 10))) << "overlaps the start of a held segment";
  EXPECT_FALSE(r.Insert(seg(0, 0))) << "empty";
  EXPECT_TRUE(r.Insert(seg(0, 10)));
  EXPECT_EQ(r.Readable(), 20u);
  std::vector<CopyPiece> p;
  std::vector<HeldSeg> d;
  EXPECT_EQ(r.Take(20, &p, &d), 20u);
  EXPECT_FALSE(r.Insert(seg(5, 5))) << "already delivered";
  EXPECT_EQ(r.Readable(), 0u);
}

TEST(CopyWorkersTest, SplitsIntoChunksThatCoverEveryByteOnce) {
  for (size_t total : {0ul, 1ul, 1000ul, 262144ul, 262145ul, 10'000'000ul}) {
    const auto chunks = SplitChunks(total, 262144);
    size_t covered = 0;
    for (const auto& [off, len] : chunks) {
      EXPECT_EQ(off, covered);
      EXPECT_GT(len, 0u);
      EXPECT_LE(len, 262144u);
      covered += len;
    }
    EXPECT_EQ(covered, total);
  }
}

TEST(CopyWorkersTest, ParallelForRunsEveryIndexOnceAndResizesAtRunTime) {
  CopyWorkers w(0);
  for (int workers : {0, 1, 3, 2, 0, 4}) {
    w.Resize(workers);
    EXPECT_EQ(w.size(), workers);
    std::vector<std::atomic<int>> hits(1000);
    w.ParallelFor(hits.size(), [&](size_t i) { hits[i]++; });
    for (auto& h : hits) ASSERT_EQ(h.load(), 1);
  }
  // Big copies split over workers produce the same bytes as one memcpy.
  w.Resize(2);
  std::vector<uint8_t> src(8 << 20), dst(8 << 20, 0);
  std::iota(src.begin(), src.end(), 0);
  const auto chunks = SplitChunks(src.size(), 256 << 10);
  // The caller's first chunk waits (bounded) for a worker to take one: on a loaded machine the
  // caller could otherwise copy everything before a worker wakes, and the workers' part would
  // go unchecked.
  const auto caller = std::this_thread::get_id();
  std::atomic<bool> worker_ran{false}, caller_waited{false};
  w.ParallelFor(chunks.size(), [&](size_t i) {
    std::memcpy(dst.data() + chunks[i].first, src.data() + chunks[i].first, chunks[i].second);
    if (std::this_thread::get_id() != caller) {
      worker_ran = true;
    } else if (!caller_waited.exchange(true)) {
      for (int k = 0; k < 5000 && !worker_ran.load(); ++k) usleep(1000);
    }
  });
  EXPECT_TRUE(src == dst);
  EXPECT_TRUE(worker_ran.load()) << "the workers took part";
  EXPECT_GT(w.chunks_run(), 0u);
}

bool FdReadable(int fd) {
  pollfd p{fd, POLLIN, 0};
  return poll(&p, 1, 0) == 1;
}

// Two threads in rounds that overlap closely: each round they meet twice (spinning, then
// yielding if the other is descheduled); the deliverer runs `deliver` between the meetings, this
// thread `before` them, `during` (between) and `after`, which returns false to stop at the first
// failure. Bounded in rounds and in time (3 s).
void RaceRounds(int rounds, const std::function<void()>& deliver,
                const std::function<void()>& before, const std::function<void()>& during,
                const std::function<bool(int)>& after) {
  std::atomic<int> arrived{0};
  std::atomic<bool> stop{false};
  auto meet = [&](int n) {
    arrived.fetch_add(1);
    for (int spins = 0; arrived.load() < 2 * (n + 1); ++spins)
      if (spins > 1000) std::this_thread::yield();
  };
  std::thread deliverer([&] {
    for (int r = 0; r < rounds; ++r) {
      meet(2 * r);
      if (stop.load()) return;
      deliver();
      meet(2 * r + 1);
    }
  });
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(3);
  for (int r = 0; r < rounds; ++r) {
    if (std::chrono::steady_clock::now() > deadline) {
      stop.store(true);
      meet(2 * r);
      break;
    }
    before();
    meet(2 * r);
    during();
    meet(2 * r + 1);
    if (!after(r)) {
      stop.store(true);
      meet(2 * (r + 1));
      break;
    }
  }
  deliverer.join();
}

// A socket's readiness eventfd must follow its flag whatever the interleaving: a deliverer raising
// while the reader lowers (then rechecks, as UpdateReadiness does) may never leave the flag set
// with a quiet fd — a poller would sleep on a readable socket (seen once in CI as an ended stream
// that poll() called unreadable).
TEST(ConnReadinessTest, RaiseAndLowerRacingLeaveTheFdMatchingTheFlag) {
  Conn c(ConnKey{1, 2, 3}, 1, AppClass::kThroughput, 4096);
  std::atomic<bool> pending{false};
  RaceRounds(
      200'000,
      [&] {
        pending.store(true);
        c.Signal();
      },
      [&] { c.Signal(); },  // earlier data, just consumed: the reader lowers a raised fd
      [&] {
        c.Unsignal();
        if (pending.load()) c.Signal();
      },
      [&](int r) {
        const bool flag = c.signaled.load(), readable = FdReadable(c.efd);
        pending.store(false);
        c.Unsignal();
        const bool still = FdReadable(c.efd);
        EXPECT_TRUE(flag) << "round " << r << ": something was delivered";
        EXPECT_TRUE(readable) << "round " << r << ": flag set, fd quiet";
        EXPECT_FALSE(still) << "round " << r << ": lowered, fd still readable";
        return flag && readable && !still;
      });
}

// Lazy readiness (VirtualSocket::SetLazyReadiness): with no waiter announced the flag moves and
// the eventfd stays quiet (no syscall); BeginWait brings the fd up to date.
TEST(ConnReadinessTest, ALazyFdFollowsTheFlagOnlyWhileAWaitIsAnnounced) {
  Conn c(ConnKey{1, 2, 3}, 1, AppClass::kThroughput, 4096);
  c.waiters.fetch_sub(1);  // what SetLazyReadiness does
  c.Signal();
  EXPECT_TRUE(c.signaled.load());
  EXPECT_FALSE(FdReadable(c.efd)) << "nobody waits: no eventfd write";
  c.BeginWait();
  EXPECT_TRUE(FdReadable(c.efd)) << "a waiter arrived: the fd catches up";
  c.EndWait();
  c.Unsignal();
  EXPECT_FALSE(FdReadable(c.efd));
  c.BeginWait();
  c.Signal();
  EXPECT_TRUE(FdReadable(c.efd)) << "raised while a waiter waits";
  c.EndWait();
  c.Unsignal();
  c.Signal();
  EXPECT_FALSE(FdReadable(c.efd));
}

// A waiter that announces itself, looks at the flag and sleeps on the fd is never left asleep
// by a delivery racing with it (the seq_cst pair between BeginWait and Raise).
TEST(ConnReadinessTest, ALazyWaiterRacingADeliveryIsAlwaysWoken) {
  Conn c(ConnKey{1, 2, 3}, 1, AppClass::kThroughput, 4096);
  c.waiters.fetch_sub(1);
  bool woke = false;
  RaceRounds(
      100'000, [&] { c.Signal(); }, [] {},
      [&] {
        c.BeginWait();
        woke = c.signaled.load();
        if (!woke) {
          pollfd p{c.efd, POLLIN, 0};
          woke = poll(&p, 1, 1000) == 1;
        }
        c.EndWait();
      },
      [&](int r) {
        EXPECT_TRUE(woke) << "round " << r << ": delivered, waiter asleep";
        c.Unsignal();
        return woke;
      });
}

TEST(VnsErrnoTest, OkIsZeroAndForeignStatusesAreEio) {
  EXPECT_EQ(Errno(absl::OkStatus()), 0);
  EXPECT_EQ(Errno(absl::InternalError("x")), EIO);
}

}  // namespace
}  // namespace netch::vns
