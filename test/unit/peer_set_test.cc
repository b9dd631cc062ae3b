// The channels of a peer as VNS lists them (vns_lib/peer_set.h): the order both ends agree on.
#include "vns_lib/peer_set.h"

#include <functional>
#include <memory>
#include <vector>

#include "afxdp_channels/channel_core.h"
#include "gtest/gtest.h"

namespace netch::vns {
namespace {

class QueuedChannel final : public chan::ChannelCore {
 public:
  QueuedChannel(uint32_t id, int queue) : ChannelCore(id, 4, 1000) { pub_.queue = queue; }
  uint8_t* BufAddr(uint64_t) override { return buf_; }  // one buffer: enough for a Seal

 private:
  uint8_t buf_[2048] = {};
  uint32_t peer_ipv4() const override { return 0x01020304; }
};

std::vector<uint32_t> Ids(const std::vector<std::shared_ptr<chan::Channel>>& chans) {
  std::vector<uint32_t> ids;
  for (const auto& c : chans) ids.push_back(c->id());
  return ids;
}

TEST(PeerTest, ListsChannelsInQueueOrderWhateverOrderTheyCameUpIn) {
  // An accepting host numbers a peer's channels as their handshakes finish: here the channel
  // on queue 0 (the initiator's first, its L-app channel under isolate-classes) came up third.
  // Listed by queue, then id, it is first on both hosts, so "the first k channels" of a policy
  // are the same channels at both ends.
  std::atomic<uint64_t> set_version{0};
  Peer p(0x01020304, &set_version);
  p.Add(std::make_shared<QueuedChannel>(1, 2));
  p.Add(std::make_shared<QueuedChannel>(2, 1));
  p.Add(std::make_shared<QueuedChannel>(3, 0));
  p.Add(std::make_shared<QueuedChannel>(4, 1));
  p.Add(std::make_shared<QueuedChannel>(5, 3));
  EXPECT_EQ(Ids(p.All()), (std::vector<uint32_t>{3, 2, 4, 1, 5}));
  EXPECT_EQ(p.version(), 5u);
  EXPECT_EQ(set_version.load(), 5u);
  // A scale-down drains the channels added last, wherever their queues put them in the list.
  EXPECT_EQ(Ids(p.LiveBeyondOldest(2)), (std::vector<uint32_t>{5, 4, 3}));
  p.Remove(p.All()[0].get());
  EXPECT_EQ(Ids(p.All()), (std::vector<uint32_t>{2, 4, 1, 5}));
  EXPECT_EQ(Ids(p.LiveBeyondOldest(1)), (std::vector<uint32_t>{5, 4, 2}));
  EXPECT_EQ(Ids(p.LiveBeyondOldest(4)), (std::vector<uint32_t>{}));
}

// Every change of a peer's channels reaches its set's callback — the stack's dispatcher wakeup:
// it watches only the channels it knew when it went to sleep, and a blocking connect's new
// channels otherwise waited for its idle timeout (250 ms) before the NCSYN_ACK on them was read.
TEST(PeerTest, TellsItsSetOfEveryChangeOfItsChannels) {
  std::atomic<uint64_t> set_version{0};
  int changes = 0;
  const std::function<void()> on_change = [&] { ++changes; };
  Peer p(0x01020304, &set_version, &on_change);
  auto a = std::make_shared<QueuedChannel>(1, 0), b = std::make_shared<QueuedChannel>(2, 1);
  a->SetState(chan::ChannelState::kUp);
  p.Add(a);
  p.Add(b);
  EXPECT_EQ(changes, 2);
  a->Fail(chan::FailCause::kReset);
  p.NoteDead(a->fail_cause());
  EXPECT_EQ(changes, 3);
  p.Remove(a.get());
  EXPECT_EQ(changes, 4);
  EXPECT_EQ(set_version.load(), 4u);
}

TEST(PeerTest, IsGoneOnceTheDispatcherNotedItsLastLiveChannelDieAndSaysWhy) {
  // gone() is what every socket's readiness check reads (one load, no lock): it follows the
  // changes the dispatcher notes, and the last failure's cause is kept for error messages.
  std::atomic<uint64_t> set_version{0};
  Peer p(0x01020304, &set_version);
  EXPECT_TRUE(p.gone()) << "no channel yet";
  auto a = std::make_shared<QueuedChannel>(1, 0), b = std::make_shared<QueuedChannel>(2, 1);
  a->SetState(chan::ChannelState::kUp);
  b->SetState(chan::ChannelState::kUp);
  p.Add(a);
  p.Add(b);
  EXPECT_FALSE(p.gone());
  a->Fail(chan::FailCause::kReset);
  p.NoteDead(a->fail_cause());
  EXPECT_FALSE(p.gone()) << "b is still up";
  EXPECT_EQ(p.last_failure(), chan::FailCause::kReset);
  b->SetState(chan::ChannelState::kClosed);  // an orderly close keeps the last failure's cause
  EXPECT_FALSE(p.gone()) << "not before the dispatcher notes it";
  p.NoteDead(b->fail_cause());
  EXPECT_TRUE(p.gone());
  EXPECT_EQ(p.last_failure(), chan::FailCause::kReset);
  auto c = std::make_shared<QueuedChannel>(3, 0);  // the peer came back
  c->SetState(chan::ChannelState::kUp);
  p.Add(c);
  EXPECT_FALSE(p.gone());
  const uint64_t token = 1;
  c->free_.Push({&token, 1});
  ASSERT_TRUE(c->Seal({}));  // scale-down: a sealed channel takes no new segments
  p.NoteSealed();
  EXPECT_TRUE(p.gone());
}

}  // namespace
}  // namespace netch::vns
