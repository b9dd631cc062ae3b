#include "common/spsc_chain.h"

#include <cstdint>
#include <random>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace netch {
namespace {

TEST(SpscChainTest, KeepsOrderAcrossChunksAndStopsAtCapacity) {
  SpscChain<uint64_t> q(1024, 16);
  EXPECT_TRUE(q.EmptyApprox());
  EXPECT_EQ(q.Room(), 1024u);
  for (uint64_t i = 0; i < 1024; ++i) ASSERT_TRUE(q.PushOne(i)) << i;
  EXPECT_FALSE(q.PushOne(9999)) << "over capacity";
  EXPECT_EQ(q.Room(), 0u);
  EXPECT_GE(q.allocated_slots(), 1024u);
  uint64_t out[100];
  uint64_t next = 0;
  for (uint32_t n; (n = q.Pop(out)) > 0;)
    for (uint32_t i = 0; i < n; ++i) ASSERT_EQ(out[i], next++);
  EXPECT_EQ(next, 1024u);
  EXPECT_TRUE(q.EmptyApprox());
  EXPECT_EQ(q.Room(), 1024u);
}

// A burst makes the chain deep; a quiet stretch afterwards gives the memory back, down to the
// smallest chunk — what a virtual socket's inbound queue must do between a bulk transfer and
// days of idle keepalives.
TEST(SpscChainTest, MemoryFollowsOccupancy) {
  SpscChain<uint64_t> q(4096, 64);
  EXPECT_EQ(q.allocated_slots(), 64u);
  uint64_t v = 0, got = 0, out[64];
  for (int i = 0; i < 4000; ++i) ASSERT_TRUE(q.PushOne(v++));
  EXPECT_GE(q.allocated_slots(), 4000u);
  for (uint32_t n; (n = q.Pop(out)) > 0;)
    for (uint32_t i = 0; i < n; ++i) ASSERT_EQ(out[i], got++);
  // Light traffic: at most two items held at a time.
  for (int i = 0; i < 40000; ++i) {
    ASSERT_TRUE(q.PushOne(v++));
    if (i % 2 == 0) continue;
    for (uint32_t n; (n = q.Pop(out)) > 0;)
      for (uint32_t k = 0; k < n; ++k) ASSERT_EQ(out[k], got++);
  }
  EXPECT_EQ(got, v);
  EXPECT_LE(q.allocated_slots(), 128u) << "the burst's chunks were not given back";
  // And it grows again for the next burst.
  for (int i = 0; i < 3000; ++i) ASSERT_TRUE(q.PushOne(v++));
  for (uint32_t n; (n = q.Pop(out)) > 0;)
    for (uint32_t k = 0; k < n; ++k) ASSERT_EQ(out[k], got++);
  EXPECT_EQ(got, v);
}

// One producer, one consumer, bursts of random depth (growing and shrinking the chain the whole
// time): every item arrives once, in order. Run under TSan in CI.
TEST(SpscChainTest, TwoThreadsBurstsInOrder) {
  SpscChain<uint64_t> q(2048, 16);
  constexpr uint64_t kItems = 400'000;
  std::thread producer([&] {
    std::mt19937 rng(1);
    uint64_t v = 0;
    while (v < kItems) {
      const uint64_t burst = std::min<uint64_t>(kItems - v, 1 + rng() % 1500);
      for (uint64_t i = 0; i < burst;) {
        if (q.PushOne(v)) {
          ++v;
          ++i;
        } else {
          std::this_thread::yield();  // full: the consumer makes room
        }
      }
      if (rng() % 4 == 0) std::this_thread::yield();
    }
  });
  std::mt19937 rng(2);
  uint64_t next = 0;
  uint64_t out[256];
  while (next < kItems) {
    const uint32_t n = q.Pop(std::span<uint64_t>(out, 1 + rng() % 256));
    for (uint32_t i = 0; i < n; ++i) ASSERT_EQ(out[i], next++);
    if (n == 0) std::this_thread::yield();
  }
  producer.join();
  EXPECT_TRUE(q.EmptyApprox());
}

}  // namespace
}  // namespace netch
