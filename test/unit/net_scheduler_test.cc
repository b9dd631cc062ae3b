// NetScheduler policies: each decision, deterministically, from channel loads.
#include "policies/net_scheduler.h"

#include <algorithm>
#include <vector>

#include "gtest/gtest.h"

namespace netch::sched {
namespace {

constexpr size_t kWait = NetScheduler::kWait;
constexpr uint8_t NC_L = 1, NC_T = 2;  // nc_app_class: latency, throughput

std::unique_ptr<NetScheduler> Make(const std::string& name, const Knobs& k = {}) {
  auto p = CreatePolicy(name, k);
  EXPECT_TRUE(p.ok()) << p.status();
  return p.ok() ? std::move(*p) : nullptr;
}

// The channels a policy picks for `n` consecutive batches (loads unchanged between them).
std::vector<size_t> Picks(const NetScheduler& p, std::vector<ChannelLoad> loads, int n,
                          uint64_t socket = 1) {
  std::vector<size_t> out;
  uint64_t cursor = 0;
  for (int i = 0; i < n; ++i) out.push_back(p.PickChannel({socket, 0}, loads, &cursor));
  return out;
}

TEST(RoundRobinTest, TakesTurnsAndPassesOverAChannelHoldingMoreThanTheMark) {
  auto p = Make("round-robin", {{"skip_queued_bytes", "1000"}});
  EXPECT_EQ(Picks(*p, {{1, 0}, {2, 0}, {3, 0}}, 6), (std::vector<size_t>{0, 1, 2, 0, 1, 2}));
  // Channel 1 (index 1) holds 5000 > 1000 queued: skipped while the others have room.
  EXPECT_EQ(Picks(*p, {{1, 0}, {2, 5000}, {3, 999}}, 4), (std::vector<size_t>{0, 2, 0, 2}));
  EXPECT_GT(p->skips(), 0u);
  // All over the mark: plain turns, not a stall.
  EXPECT_EQ(Picks(*p, {{1, 9000}, {2, 5000}}, 3), (std::vector<size_t>{0, 1, 0}));
  // One channel: the mark does not apply.
  EXPECT_EQ(Picks(*p, {{1, 1 << 30}}, 2), (std::vector<size_t>{0, 0}));
}

TEST(RoundRobinTest, NeverPicksAFullChannelAndWaitsWhenAllAreFull) {
  auto p = Make("round-robin");
  EXPECT_EQ(Picks(*p, {{1, 0, true}, {2, 0}, {3, 0, true}}, 3), (std::vector<size_t>{1, 1, 1}));
  EXPECT_EQ(Picks(*p, {{1, 0, true}, {2, 0, true}}, 1), (std::vector<size_t>{kWait}));
  // Over the mark and the only one not full: used.
  EXPECT_EQ(Picks(*p, {{1, 0, true}, {2, 100 << 20}}, 1), (std::vector<size_t>{1}));
}

TEST(ShortestQueueTest, PicksTheLeastQueuedAndRotatesAmongEquals) {
  auto p = Make("shortest-queue");
  EXPECT_EQ(Picks(*p, {{1, 300}, {2, 100}, {3, 200}}, 2), (std::vector<size_t>{1, 1}));
  EXPECT_EQ(Picks(*p, {{1, 0}, {2, 0}, {3, 0}}, 4), (std::vector<size_t>{0, 1, 2, 0}));
  EXPECT_EQ(Picks(*p, {{1, 300}, {2, 100, true}, {3, 200}}, 1), (std::vector<size_t>{2}));
  EXPECT_EQ(Picks(*p, {{1, 0, true}}, 1), (std::vector<size_t>{kWait}));
}

TEST(ReplyAffinityTest, AnAnswerGoesBackOnItsRequestsChannelWhileThatOneCanTakeIt) {
  // Socket 1 answers data that came on channel index 2 of four.
  const SocketRef reply{1, NC_T, 2};
  const std::vector<ChannelLoad> idle = {{1, 0}, {2, 0}, {3, 0}, {4, 0}};
  auto rr = Make("round-robin", {{"skip_queued_bytes", "1000"}});
  uint64_t cursor = 0;
  EXPECT_EQ(rr->PickChannel(reply, idle, &cursor), 2u);
  EXPECT_EQ(cursor, 0u) << "an answer does not move the turns of the socket's other batches";
  EXPECT_EQ(rr->PickChannel({1, NC_T}, idle, &cursor), 0u);  // not an answer: its turn
  EXPECT_EQ(rr->replies(), 1u);
  // That channel full, or holding more than the mark: the answer takes its turn like any batch.
  cursor = 0;
  const std::vector<ChannelLoad> full = {{1, 0}, {2, 0}, {3, 0, true}, {4, 0}};
  const std::vector<ChannelLoad> over = {{1, 0}, {2, 0}, {3, 5000}, {4, 0}};
  EXPECT_EQ(rr->PickChannel(reply, full, &cursor), 0u);
  EXPECT_EQ(rr->PickChannel(reply, over, &cursor), 1u);
  // Shortest-queue: the request's channel while it holds at most the shortest queue and 64 KiB.
  auto sq = Make("shortest-queue");
  cursor = 0;
  const std::vector<ChannelLoad> near = {{1, 100}, {2, 0}, {3, 60000}, {4, 0}};
  const std::vector<ChannelLoad> far = {{1, 100}, {2, 0}, {3, 70000}, {4, 0}};
  EXPECT_EQ(sq->PickChannel(reply, near, &cursor), 2u);
  EXPECT_EQ(sq->PickChannel(reply, far, &cursor), 1u);
  // Isolation first: a throughput socket's answer never goes on the L-app channel (index 0).
  auto iso = Make("isolate-classes");  // latency_channels = 1
  cursor = 0;
  EXPECT_EQ(iso->PickChannel({1, NC_T, 0}, idle, &cursor), 1u);
  EXPECT_EQ(iso->PickChannel({1, NC_T, 3}, idle, &cursor), 3u);
  // The knob: off, an answer is a batch like any other (the paper's plain turns).
  auto plain = Make("round-robin", {{"reply_affinity", "off"}});
  EXPECT_EQ(Picks(*plain, idle, 1), (std::vector<size_t>{0}));
  cursor = 0;
  EXPECT_EQ(plain->PickChannel(reply, idle, &cursor), 0u);
  EXPECT_FALSE(CreatePolicy("round-robin", {{"reply_affinity", "yes"}}).ok());
  const Knobs k = plain->AllKnobs();
  EXPECT_NE(
      std::find(k.begin(), k.end(), std::pair<std::string, std::string>{"reply_affinity", "off"}),
      k.end());
}

TEST(OnePerSocketTest, ASocketKeepsOneChannelAndWaitsForIt) {
  auto p = Make("one-per-socket");
  const std::vector<ChannelLoad> four = {{1, 0}, {2, 0}, {3, 0}, {4, 0}};
  EXPECT_EQ(Picks(*p, four, 3, /*socket=*/5), (std::vector<size_t>{1, 1, 1}));
  EXPECT_EQ(Picks(*p, four, 1, /*socket=*/6), (std::vector<size_t>{2}));
  // Its channel is full: it waits rather than use another (a static pipe, like the kernel).
  EXPECT_EQ(Picks(*p, {{1, 0}, {2, 0, true}, {3, 0}, {4, 0}}, 1, 5), (std::vector<size_t>{kWait}));
}

TEST(IsolateClassesTest, LatencySocketsGetTheReservedChannelsAndTheRestTheOthers) {
  auto p = Make("isolate-classes", {{"latency_channels", "1"}});
  const std::vector<ChannelLoad> four = {{1, 0}, {2, 0}, {3, 0}, {4, 0}};
  uint64_t cur = 0;
  std::vector<size_t> l, t;
  for (int i = 0; i < 3; ++i) l.push_back(p->PickChannel({7, NC_L}, four, &cur));
  cur = 0;
  for (int i = 0; i < 4; ++i) t.push_back(p->PickChannel({8, NC_T}, four, &cur));
  EXPECT_EQ(l, (std::vector<size_t>{0, 0, 0}));
  EXPECT_EQ(t, (std::vector<size_t>{1, 2, 3, 1})) << "bulk never lands on the L-app channel";
  // Unspecified class counts as throughput.
  cur = 0;
  EXPECT_EQ(p->PickChannel({9, 0}, four, &cur), 1u);
  // Its reserved channel full: an L-app socket waits rather than queue behind bulk.
  std::vector<ChannelLoad> full0 = four;
  full0[0].full = true;
  cur = 0;
  EXPECT_EQ(p->PickChannel({7, NC_L}, full0, &cur), kWait);
  // Two reserved channels; one channel in all: shared.
  auto p2 = Make("isolate-classes", {{"latency_channels", "2"}});
  cur = 0;
  EXPECT_EQ(p2->PickChannel({8, NC_T}, four, &cur), 2u);
  cur = 0;
  EXPECT_EQ(p->PickChannel({8, NC_T}, std::vector<ChannelLoad>{{1, 0}}, &cur), 0u);
  EXPECT_FALSE(CreatePolicy("isolate-classes", {{"latency_channels", "x"}}).ok());
}

TEST(PolicyRegistryTest, NamesKnobsAndErrors) {
  const auto names = PolicyNames();
  for (const char* n : {"round-robin", "shortest-queue", "one-per-socket", "isolate-classes"})
    EXPECT_NE(std::find(names.begin(), names.end(), n), names.end()) << n;
  auto bad = CreatePolicy("lottery");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("round-robin"), std::string::npos) << bad.status();
  EXPECT_FALSE(CreatePolicy("round-robin", {{"bogus", "1"}}).ok());
  EXPECT_FALSE(CreatePolicy("round-robin", {{"skip_queued_bytes", "0"}}).ok());
  EXPECT_FALSE(CreatePolicy("round-robin", {{"skip_queued_bytes", "-5"}}).ok());
  EXPECT_FALSE(CreatePolicy("shortest-queue", {{"skip_queued_bytes", "5"}}).ok());
  auto rr = Make("round-robin", {{"skip_queued_bytes", "4096"}});
  EXPECT_EQ(rr->GetKnobs(), (Knobs{{"skip_queued_bytes", "4096"}}));
  EXPECT_EQ(Make("round-robin")->GetKnobs(), (Knobs{{"skip_queued_bytes", "2097152"}}));
  // A new policy is one registration.
  ASSERT_TRUE(RegisterPolicy("first-channel", [] {
                struct First final : NetScheduler {
                  std::string_view name() const override { return "first-channel"; }
                  std::string Explain() const override { return "always the first"; }
                  size_t PickChannel(const SocketRef&, std::span<const ChannelLoad> c,
                                     uint64_t*) const override {
                    return c[0].full ? kWait : 0;
                  }
                  Knobs GetKnobs() const override { return {}; }
                  absl::Status SetKnob(std::string_view, std::string_view) override {
                    return absl::InvalidArgumentError("none");
                  }
                };
                return std::make_unique<First>();
              }).ok());
  EXPECT_TRUE(CreatePolicy("first-channel").ok());
  EXPECT_FALSE(RegisterPolicy("round-robin", nullptr).ok());
}

TEST(CopyPlanTest, ThePapersRulesDecideWhoCopies) {
  for (const std::string& name : PolicyNames()) {
    auto p = Make(name);
    // Small copies, or no workers: on the caller's thread.
    EXPECT_FALSE(p->PlanCopy(64 << 10, 4, 0).parallel) << name;
    EXPECT_FALSE(p->PlanCopy(4 << 20, 0, 0).parallel) << name;
    // Large ones: chunks shared with the workers...
    const CopyPlan big = p->PlanCopy(4 << 20, 4, 0);
    EXPECT_TRUE(big.parallel) << name;
    EXPECT_EQ(big.chunk_bytes, 256u << 10) << name;
    EXPECT_TRUE(p->PlanCopy(4 << 20, 4, 640 << 10).parallel) << "at the mark: still queued";
    // ...unless the workers already hold more than 640 KiB: then the caller copies alone.
    EXPECT_FALSE(p->PlanCopy(4 << 20, 4, (640 << 10) + 1).parallel) << name;
  }
}

TEST(CopyPlanTest, CopyKnobsBelongToEveryPolicyAndAreValidated) {
  auto p = Make("shortest-queue", {{"copy_chunk_bytes", "65536"},
                                   {"inline_copy_bytes", "1000"},
                                   {"skip_worker_queued_bytes", "0"}});
  EXPECT_EQ(p->PlanCopy(1000, 2, 0).chunk_bytes, 65536u);
  EXPECT_FALSE(p->PlanCopy(999, 2, 0).parallel);
  EXPECT_FALSE(p->PlanCopy(1 << 20, 2, 1).parallel) << "any queued byte skips the workers";
  const Knobs all = p->AllKnobs();
  EXPECT_EQ(Knobs(all.begin(), all.begin() + 3), (Knobs{{"inline_copy_bytes", "1000"},
                                                        {"copy_chunk_bytes", "65536"},
                                                        {"skip_worker_queued_bytes", "0"}}));
  EXPECT_EQ(Make("round-robin")->AllKnobs().size(), Make("shortest-queue")->AllKnobs().size() + 1)
      << "its own knob and the common ones";
  EXPECT_FALSE(CreatePolicy("round-robin", {{"copy_chunk_bytes", "100"}}).ok()) << "too small";
  EXPECT_FALSE(CreatePolicy("round-robin", {{"inline_copy_bytes", "lots"}}).ok());
  auto bad = CreatePolicy("one-per-socket", {{"chunk", "1"}});
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("copy_chunk_bytes"), std::string::npos)
      << "the error lists the copy knobs too: " << bad.status();
}

TEST(PlacementTest, IsolateClassesGivesLatencyChannelsTheirOwnQueueAndEngine) {
  auto p = Make("isolate-classes");  // latency_channels = 1
  for (size_t i = 0; i < 4; ++i) {
    const Placement pl = p->PlaceChannel(i, 4, /*queues=*/4, /*engines=*/2);
    if (i == 0) {
      EXPECT_EQ(pl.queue, 0);
      EXPECT_EQ(pl.engine, 0);
    } else {
      EXPECT_GE(pl.queue, 1) << i;
      EXPECT_EQ(pl.engine, 1) << "bulk channels never on the L-app engine";
    }
  }
  EXPECT_EQ(p->PlaceChannel(1, 6, 4, 3).engine, 1);
  EXPECT_EQ(p->PlaceChannel(2, 6, 4, 3).engine, 2) << "bulk spread over the other engines";
  // Nothing to isolate with one queue or one engine: the driver decides.
  EXPECT_EQ(p->PlaceChannel(0, 4, 1, 2).queue, -1);
  EXPECT_EQ(p->PlaceChannel(0, 4, 4, 1).engine, -1);
  EXPECT_EQ(Make("round-robin")->PlaceChannel(0, 4, 4, 2).queue, -1) << "others: the driver's";
  // Copy workers stay off the L-app engine's core (engine 0 pinned to core 1 of 4).
  for (int i = 0; i < 6; ++i) {
    const int core = p->PlaceCopyWorker(i, {1, 0}, 4);
    EXPECT_GE(core, 0) << i;
    EXPECT_LT(core, 4) << i;
    EXPECT_NE(core, 1) << "worker " << i << " on the L-app engine's core";
  }
  EXPECT_EQ(p->PlaceCopyWorker(0, {1, 0}, 4), 0);
  EXPECT_EQ(p->PlaceCopyWorker(1, {1, 0}, 4), 2) << "the other cores in turn";
  EXPECT_EQ(p->PlaceCopyWorker(0, {-1, -1}, 4), -1) << "engine 0 not pinned: the OS decides";
  EXPECT_EQ(p->PlaceCopyWorker(0, {0}, 1), -1) << "one core: nothing to keep apart";
  EXPECT_EQ(Make("round-robin")->PlaceCopyWorker(0, {1, 0}, 4), -1);
  // The accepting host: the queue a peer's L-app channel arrives on runs on engine 0 alone.
  EXPECT_EQ(p->EngineForQueue(0, 4, 2), 0);
  for (int q = 1; q < 4; ++q) EXPECT_EQ(p->EngineForQueue(q, 4, 2), 1) << q;
  EXPECT_EQ(p->EngineForQueue(2, 4, 3), 2);
  EXPECT_EQ(p->EngineForQueue(0, 1, 2), -1);
  EXPECT_EQ(Make("round-robin")->EngineForQueue(2, 4, 2), -1);
  // The queues it reserves transmit through AF_XDP (the driver clamps to its queues).
  EXPECT_EQ(p->LatencyQueues(2), 1u);
  EXPECT_EQ(p->LatencyQueues(1), 0u) << "one engine: L-app channels are not placed apart";
  EXPECT_EQ(Make("isolate-classes", {{"latency_channels", "2"}})->LatencyQueues(3), 2u);
  EXPECT_EQ(Make("round-robin")->LatencyQueues(2), 0u);
}

TEST(ScalingTest, GrowsAndShrinksOneAtATimeWithHysteresisWithinBounds) {
  auto p = Make("round-robin", {{"scale", "on"},
                                {"scale_min", "1"},
                                {"scale_max", "3"},
                                {"scale_grow_queued_bytes", "1000"},
                                {"scale_shrink_queued_bytes", "100"},
                                {"scale_hold_ms", "500"}});
  ScaleState st;
  auto at = [&](uint64_t ms, int ch, uint64_t queued, double busy = 0.5) {
    return p->WantChannels({ms * 1000, ch, queued, busy}, &st);
  };
  EXPECT_EQ(at(1000, 1, 5000), 1) << "busy, but not yet for 500 ms";
  EXPECT_EQ(at(1400, 1, 5000), 1);
  EXPECT_EQ(at(1500, 1, 5000), 2) << "busy for 500 ms: one more";
  EXPECT_EQ(at(1600, 2, 9000), 2) << "right after a change: nothing for 500 ms";
  EXPECT_EQ(at(2000, 2, 9000), 2) << "still quiet (and busy for only 400 ms)";
  EXPECT_EQ(at(2100, 2, 9000), 3) << "busy for 500 ms, the quiet period over";
  EXPECT_EQ(at(3200, 3, 90000), 3);
  EXPECT_EQ(at(3800, 3, 90000), 3) << "never above scale_max";
  // Between the marks nothing happens (hysteresis); below both, one fewer after 500 ms.
  EXPECT_EQ(at(4000, 3, 3 * 500), 3);
  EXPECT_EQ(at(5000, 3, 3 * 500), 3);
  EXPECT_EQ(at(5100, 3, 0, 0.9), 3) << "idle queues but busy engines: no shrink";
  EXPECT_EQ(at(5200, 3, 0, 0.1), 3);
  EXPECT_EQ(at(5600, 3, 0, 0.1), 3);
  EXPECT_EQ(at(5700, 3, 0, 0.1), 2);
  EXPECT_EQ(at(6300, 2, 0, 0.1), 2);
  EXPECT_EQ(at(6800, 2, 0, 0.1), 1);
  EXPECT_EQ(at(8000, 1, 0, 0.1), 1) << "never below scale_min";
  // Off: the count stays whatever it is.
  ASSERT_TRUE(p->SetAnyKnob("scale", "off").ok());
  EXPECT_EQ(at(9000, 2, 1 << 30), 2);
  EXPECT_FALSE(p->SetAnyKnob("scale", "yes").ok());
  EXPECT_FALSE(p->SetAnyKnob("scale_max", "0").ok());
  EXPECT_FALSE(p->SetAnyKnob("scale_grow_busy", "1.5").ok());
}

}  // namespace
}  // namespace netch::sched
