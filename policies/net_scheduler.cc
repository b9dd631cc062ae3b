#include "policies/net_scheduler.h"

#include <algorithm>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/registry.h"

namespace netch::sched {
namespace {

absl::Status NoSuchKnob(std::string_view policy, std::string_view key, std::string_view known) {
  return absl::InvalidArgumentError(absl::StrFormat("%s has no knob '%s' (knobs: %s)", policy, key,
                                                    known.empty() ? "none" : known));
}

// The paper's default: channels in turn, passing over one that holds more than the mark while
// another holds less; when every channel is over the mark, plain round-robin (a full pipe is
// still a pipe).
class RoundRobin final : public NetScheduler {
 public:
  std::string_view name() const override { return "round-robin"; }
  std::string Explain() const override {
    return absl::StrFormat(
        "channels in turn, passing over one with more than %u bytes unacknowledged while another "
        "has less",
        mark_.load(std::memory_order_relaxed));
  }
  size_t PickChannel(const SocketRef& s, std::span<const ChannelLoad> chans,
                     uint64_t* cursor) const override {
    const size_t n = chans.size();
    const uint64_t mark = mark_.load(std::memory_order_relaxed);
    if (const size_t r = ReplyChannel(s, chans, mark); r != kWait) return r;
    size_t fallback = kWait;
    for (size_t k = 0; k < n; ++k) {
      const size_t i = (*cursor + k) % n;
      if (chans[i].full) continue;
      if (n > 1 && chans[i].tx_queued_bytes > mark) {
        if (fallback == kWait) fallback = i;
        skips_.fetch_add(1, std::memory_order_relaxed);
        continue;
      }
      *cursor = i + 1;
      return i;
    }
    if (fallback != kWait) *cursor = fallback + 1;
    return fallback;
  }
  Knobs GetKnobs() const override {
    return {{"skip_queued_bytes", std::to_string(mark_.load(std::memory_order_relaxed))}};
  }
  absl::Status SetKnob(std::string_view key, std::string_view value) override {
    if (key != "skip_queued_bytes") return NoSuchKnob(name(), key, "skip_queued_bytes");
    uint64_t v;
    if (!absl::SimpleAtoi(absl::string_view(value.data(), value.size()), &v) || v == 0)
      return absl::InvalidArgumentError(
          absl::StrFormat("skip_queued_bytes must be a positive integer, not '%s'", value));
    mark_.store(v, std::memory_order_relaxed);
    return absl::OkStatus();
  }

 private:
  std::atomic<uint64_t> mark_{2 << 20};
};

// The channel with the fewest bytes queued (ties: the first in the socket's order after the
// cursor, so equal channels still take turns). An answer goes back on its request's channel
// while that one holds no more than the shortest queue and a message (kReplySlackBytes).
class ShortestQueue final : public NetScheduler {
 public:
  std::string_view name() const override { return "shortest-queue"; }
  std::string Explain() const override {
    return "the channel with the fewest unacknowledged bytes, equals in turn";
  }
  size_t PickChannel(const SocketRef& s, std::span<const ChannelLoad> chans,
                     uint64_t* cursor) const override {
    const size_t n = chans.size();
    size_t best = kWait;
    for (size_t k = 0; k < n; ++k) {
      const size_t i = (*cursor + k) % n;
      if (chans[i].full) continue;
      if (best == kWait || chans[i].tx_queued_bytes < chans[best].tx_queued_bytes) best = i;
    }
    if (best == kWait) return kWait;
    if (const size_t r = ReplyChannel(s, chans, chans[best].tx_queued_bytes + kReplySlackBytes);
        r != kWait)
      return r;
    *cursor = best + 1;
    return best;
  }
  Knobs GetKnobs() const override { return {}; }
  absl::Status SetKnob(std::string_view key, std::string_view) override {
    return NoSuchKnob(name(), key, "");
  }

 private:
  static constexpr uint64_t kReplySlackBytes = 64 << 10;
};

// The kernel-like baseline: each socket is a static pipe on one channel (chosen from its id,
// so sockets spread over the peer's channels); when that channel is full, the socket waits.
class OnePerSocket final : public NetScheduler {
 public:
  std::string_view name() const override { return "one-per-socket"; }
  std::string Explain() const override {
    return "one channel per socket (socket id modulo its channels), waiting for it when full";
  }
  size_t PickChannel(const SocketRef& s, std::span<const ChannelLoad> chans,
                     uint64_t*) const override {
    const size_t i = static_cast<size_t>(s.id % chans.size());
    return chans[i].full ? kWait : i;
  }
  Knobs GetKnobs() const override { return {}; }
  absl::Status SetKnob(std::string_view key, std::string_view) override {
    return NoSuchKnob(name(), key, "");
  }
};

// L-app/T-app isolation (thesis §3.3.3): the first `latency_channels` of a socket's channels
// carry only latency-sensitive sockets (NCSYN class L-app), the rest everything else, so a bulk
// stream's segments never queue in front of an RPC's on a channel. Within its set a socket takes
// turns. With no more channels than the reserve, everyone shares.
class IsolateClasses final : public NetScheduler {
 public:
  std::string_view name() const override { return "isolate-classes"; }
  std::string Explain() const override {
    return absl::StrFormat(
        "L-app sockets on the first %u of their channels, all others on the rest, in turn",
        reserve_.load(std::memory_order_relaxed));
  }
  size_t PickChannel(const SocketRef& s, std::span<const ChannelLoad> chans,
                     uint64_t* cursor) const override {
    const size_t n = chans.size();
    const size_t k = std::min<size_t>(reserve_.load(std::memory_order_relaxed), n);
    size_t lo = 0, hi = n;
    if (k < n) {
      if (s.app_class == kLatencyClass) {
        hi = k;
      } else {
        lo = k;
      }
    }
    if (const size_t r = ReplyChannel(s, chans, kIsolateReplyMark, lo, hi); r != kWait) return r;
    const size_t span = hi - lo;
    for (size_t j = 0; j < span; ++j) {
      const size_t i = lo + (*cursor + j) % span;
      if (chans[i].full) continue;
      *cursor = i - lo + 1;
      return i;
    }
    return kWait;
  }
  // L-app channels get queues and an engine of their own: with at least two of each, the first
  // `latency_channels` channels go on queues [0, k) run by engine 0, the others on the other
  // queues run by the other engines, so no bulk segment waits in an L-app channel's TX ring or
  // engine loop (on this host; the receiver places the queues it serves as its driver does).
  Placement PlaceChannel(size_t index, size_t, int queues, int engines) const override {
    const int k = static_cast<int>(std::min<uint32_t>(reserve_.load(std::memory_order_relaxed),
                                                      static_cast<uint32_t>(queues - 1)));
    if (queues < 2 || engines < 2 || k < 1) return {};
    const int i = static_cast<int>(index);
    if (i < k) return {i, 0};
    return {k + (i - k) % (queues - k), 1 + (i - k) % (engines - 1)};
  }
  // Bulk copies stay off the L-app engine's core: with engine 0 pinned, worker i takes the i-th
  // of the other cores in turn (unpinned engine 0, or one core: the OS decides).
  int PlaceCopyWorker(int index, const std::vector<int>& engine_cores, int cpus) const override {
    if (engine_cores.empty() || engine_cores[0] < 0 || cpus < 2 || index < 0) return -1;
    const int l_core = engine_cores[0];
    const int pick = index % (cpus - 1);
    return pick < l_core ? pick : pick + 1;
  }
  // A peer using this policy puts L-app channels on queues [0, k): those run on engine 0 here
  // too, every other queue on the other engines, so the receiving host keeps bulk off the L-app
  // engine as well.
  int EngineForQueue(int queue, int queues, int engines) const override {
    const int k = static_cast<int>(std::min<uint32_t>(reserve_.load(std::memory_order_relaxed),
                                                      static_cast<uint32_t>(queues - 1)));
    if (queues < 2 || engines < 2 || k < 1 || queue < 0) return -1;
    return queue < k ? 0 : 1 + (queue - k) % (engines - 1);
  }
  // Queues [0, k) carry only L-app channels (PlaceChannel), when there are two engines or more.
  uint32_t LatencyQueues(int engines) const override {
    return engines < 2 ? 0 : reserve_.load(std::memory_order_relaxed);
  }
  Knobs GetKnobs() const override {
    return {{"latency_channels", std::to_string(reserve_.load(std::memory_order_relaxed))}};
  }
  absl::Status SetKnob(std::string_view key, std::string_view value) override {
    if (key != "latency_channels") return NoSuchKnob(name(), key, "latency_channels");
    uint32_t v;
    if (!absl::SimpleAtoi(absl::string_view(value.data(), value.size()), &v) || v > 64)
      return absl::InvalidArgumentError(
          absl::StrFormat("latency_channels must be 0..64, not '%s'", value));
    reserve_.store(v, std::memory_order_relaxed);
    return absl::OkStatus();
  }

 private:
  static constexpr uint8_t kLatencyClass = 1;             // NC_CLASS_LATENCY
  static constexpr uint64_t kIsolateReplyMark = 2 << 20;  // round-robin's default mark
  std::atomic<uint32_t> reserve_{1};
};

NamedRegistry<PolicyFactory>& Reg() {
  static auto* r = new NamedRegistry<PolicyFactory>(
      "policy", {{"round-robin", [] { return std::make_unique<RoundRobin>(); }},
                 {"shortest-queue", [] { return std::make_unique<ShortestQueue>(); }},
                 {"one-per-socket", [] { return std::make_unique<OnePerSocket>(); }},
                 {"isolate-classes", [] { return std::make_unique<IsolateClasses>(); }}});
  return *r;
}

}  // namespace

bool NetScheduler::IsCommonKnob(std::string_view key) {
  return key == "inline_copy_bytes" || key == "copy_chunk_bytes" ||
         key == "skip_worker_queued_bytes" || key.starts_with("scale") || key == "busy_poll_us" ||
         key == "reply_affinity";
}

Knobs NetScheduler::CopyKnobs() const {
  return {{"inline_copy_bytes", std::to_string(inline_copy_bytes_.load())},
          {"copy_chunk_bytes", std::to_string(copy_chunk_bytes_.load())},
          {"skip_worker_queued_bytes", std::to_string(skip_worker_queued_bytes_.load())},
          {"busy_poll_us", std::to_string(busy_poll_us_.load())},
          {"reply_affinity", reply_affinity_.load() ? "on" : "off"},
          {"scale", scale_on_.load() ? "on" : "off"},
          {"scale_min", std::to_string(scale_min_.load())},
          {"scale_max", std::to_string(scale_max_.load())},
          {"scale_grow_queued_bytes", std::to_string(scale_grow_queued_.load())},
          {"scale_shrink_queued_bytes", std::to_string(scale_shrink_queued_.load())},
          {"scale_grow_busy", absl::StrFormat("%g", scale_grow_busy_.load())},
          {"scale_shrink_busy", absl::StrFormat("%g", scale_shrink_busy_.load())},
          {"scale_hold_ms", std::to_string(scale_hold_ms_.load())}};
}

int NetScheduler::WantChannels(const ScaleSample& s, ScaleState* st) const {
  const int lo = static_cast<int>(scale_min_.load(std::memory_order_relaxed));
  const int hi = static_cast<int>(scale_max_.load(std::memory_order_relaxed));
  if (!scaling() || s.channels <= 0) return s.channels;
  if (s.channels < lo) return lo;
  if (s.channels > hi) return hi;
  const uint64_t hold = scale_hold_ms_.load(std::memory_order_relaxed) * 1000;
  const uint64_t per = s.queued_bytes / static_cast<uint64_t>(s.channels);
  const bool grow = per > scale_grow_queued_.load(std::memory_order_relaxed) ||
                    s.engine_busy > scale_grow_busy_.load(std::memory_order_relaxed);
  const bool shrink = per < scale_shrink_queued_.load(std::memory_order_relaxed) &&
                      s.engine_busy < scale_shrink_busy_.load(std::memory_order_relaxed);
  st->grow_since_us = grow ? (st->grow_since_us ? st->grow_since_us : s.now_us) : 0;
  st->shrink_since_us = shrink ? (st->shrink_since_us ? st->shrink_since_us : s.now_us) : 0;
  if (st->last_change_us && s.now_us - st->last_change_us < hold) return s.channels;
  int want = s.channels;
  if (grow && s.now_us - st->grow_since_us >= hold && s.channels < hi) want = s.channels + 1;
  if (shrink && s.now_us - st->shrink_since_us >= hold && s.channels > lo) want = s.channels - 1;
  if (want != s.channels) {
    st->last_change_us = s.now_us;
    st->grow_since_us = st->shrink_since_us = 0;
  }
  return want;
}

Knobs NetScheduler::AllKnobs() const {
  Knobs k = GetKnobs();
  for (auto& c : CopyKnobs()) k.push_back(std::move(c));
  return k;
}

absl::Status NetScheduler::SetAnyKnob(std::string_view key, std::string_view value) {
  if (!IsCommonKnob(key)) {
    auto st = SetKnob(key, value);
    if (absl::IsInvalidArgument(st) && absl::StrContains(st.message(), "has no knob"))
      return absl::InvalidArgumentError(
          absl::StrCat(st.message(),
                       "; every policy: inline_copy_bytes, copy_chunk_bytes, "
                       "skip_worker_queued_bytes, busy_poll_us, reply_affinity, scale, "
                       "scale_min, scale_max, "
                       "scale_grow_queued_bytes, scale_shrink_queued_bytes, scale_grow_busy, "
                       "scale_shrink_busy, scale_hold_ms"));
    return st;
  }
  const absl::string_view v(value.data(), value.size());
  if (key == "scale" || key == "reply_affinity") {
    if (v != "on" && v != "off")
      return absl::InvalidArgumentError(absl::StrFormat("%s must be on or off", key));
    (key == "scale" ? scale_on_ : reply_affinity_).store(v == "on", std::memory_order_relaxed);
    return absl::OkStatus();
  }
  if (key == "scale_grow_busy" || key == "scale_shrink_busy") {
    double d;
    if (!absl::SimpleAtod(v, &d) || d < 0 || d > 1)
      return absl::InvalidArgumentError(absl::StrFormat("%s must be 0..1, not '%s'", key, v));
    (key == "scale_grow_busy" ? scale_grow_busy_ : scale_shrink_busy_).store(d);
    return absl::OkStatus();
  }
  uint64_t n;
  if (!absl::SimpleAtoi(v, &n))
    return absl::InvalidArgumentError(
        absl::StrFormat("%s must be a non-negative integer, not '%s'", key, value));
  if (key == "copy_chunk_bytes") {
    if (n < 4096 || n > (64u << 20))
      return absl::InvalidArgumentError("copy_chunk_bytes must be 4096..67108864");
    copy_chunk_bytes_.store(n, std::memory_order_relaxed);
  } else if (key == "inline_copy_bytes") {
    inline_copy_bytes_.store(n, std::memory_order_relaxed);
  } else if (key == "skip_worker_queued_bytes") {
    skip_worker_queued_bytes_.store(n, std::memory_order_relaxed);
  } else if (key == "busy_poll_us") {
    if (n > 1'000'000) return absl::InvalidArgumentError("busy_poll_us must be 0..1000000");
    busy_poll_us_.store(n, std::memory_order_relaxed);
  } else if (key == "scale_min" || key == "scale_max") {
    if (n < 1 || n > 64)
      return absl::InvalidArgumentError(absl::StrFormat("%s must be 1..64", key));
    (key == "scale_min" ? scale_min_ : scale_max_).store(n, std::memory_order_relaxed);
    if (scale_min_.load() > scale_max_.load())
      return absl::InvalidArgumentError("scale_min must not exceed scale_max");
  } else if (key == "scale_grow_queued_bytes") {
    scale_grow_queued_.store(n, std::memory_order_relaxed);
  } else if (key == "scale_shrink_queued_bytes") {
    scale_shrink_queued_.store(n, std::memory_order_relaxed);
  } else if (key == "scale_hold_ms") {
    if (n > 600000) return absl::InvalidArgumentError("scale_hold_ms must be 0..600000");
    scale_hold_ms_.store(n, std::memory_order_relaxed);
  } else {
    return absl::InvalidArgumentError(absl::StrFormat("no knob '%s'", key));
  }
  return absl::OkStatus();
}

CopyPlan NetScheduler::PlanCopy(size_t bytes, int workers, uint64_t workers_queued_bytes) const {
  if (workers <= 0 || bytes < inline_copy_bytes_.load(std::memory_order_relaxed) ||
      workers_queued_bytes > skip_worker_queued_bytes_.load(std::memory_order_relaxed))
    return {};
  return {true, static_cast<size_t>(copy_chunk_bytes_.load(std::memory_order_relaxed))};
}

absl::Status RegisterPolicy(const std::string& name, PolicyFactory factory) {
  return Reg().Register(name, std::move(factory));
}

absl::StatusOr<std::unique_ptr<NetScheduler>> CreatePolicy(const std::string& name,
                                                           const Knobs& knobs) {
  auto f = Reg().Find(name);
  if (!f.ok()) return absl::InvalidArgumentError(f.status().message());  // a user's typo
  auto p = (*f)();
  for (const auto& [k, v] : knobs)
    if (auto st = p->SetAnyKnob(k, v); !st.ok()) return st;
  return p;
}

std::vector<std::string> PolicyNames() { return Reg().Names(); }

}  // namespace netch::sched
