#include "vns_lib/peer_set.h"

#include <algorithm>
#include <cerrno>

#include "afxdp_channels/engine.h"
#include "vns_lib/sock_error.h"
#include "vns_lib/vns.h"

namespace netch::vns {
namespace {
// The errno of a failed channel opening: ETIMEDOUT if it was still connecting when the wait
// ended or the driver's own handshake deadline failed it (the same timeout; also when the
// replies went to another rx queue: the message says so), EHOSTUNREACH if no
// host answered for the address (as the kernel's connect says after failed ARP), else
// ECONNREFUSED.
int OpenFailureErrno(bool still_connecting, chan::FailCause why) {
  if (still_connecting || why == chan::FailCause::kHandshakeTimeout ||
      why == chan::FailCause::kWrongQueue)
    return ETIMEDOUT;
  return why == chan::FailCause::kUnreachable ? EHOSTUNREACH : ECONNREFUSED;
}
}  // namespace

bool IsLive(chan::ChannelState s) {
  return s == chan::ChannelState::kConnecting || s == chan::ChannelState::kUp;
}

std::vector<std::shared_ptr<chan::Channel>> Peer::Live() const {
  std::lock_guard l(mu_);
  std::vector<std::shared_ptr<chan::Channel>> out;
  for (const auto& c : chans_)
    if (IsLive(c->state()) && !c->sealed()) out.push_back(c);
  return out;
}

std::vector<std::shared_ptr<chan::Channel>> Peer::All() const {
  std::lock_guard l(mu_);
  return chans_;
}

std::shared_ptr<chan::Channel> Peer::ControlChannel() const {
  std::lock_guard l(mu_);
  for (const auto& c : chans_)
    if (c->state() == chan::ChannelState::kUp && !c->sealed()) return c;
  return nullptr;
}

size_t Peer::live_count() const {
  std::lock_guard l(mu_);
  return LiveCountLocked();
}

size_t Peer::LiveCountLocked() const {
  return std::count_if(chans_.begin(), chans_.end(),
                       [](const auto& c) { return IsLive(c->state()) && !c->sealed(); });
}

void Peer::Add(std::shared_ptr<chan::Channel> c) {
  // In queue order, then by id: a frame leaves and arrives on the same queue number, so both
  // ends list a pair of channels in the same place whatever order their handshakes finished
  // in — a policy's "first k channels" (isolate-classes' L-app set) are the same channels on
  // both hosts, on the queues and engines its placement reserved for them.
  const auto key = [](const chan::Channel& ch) { return std::pair(ch.stats().queue, ch.id()); };
  const auto k = key(*c);
  {
    std::lock_guard l(mu_);
    auto at =
        std::find_if(chans_.begin(), chans_.end(), [&](const auto& x) { return k < key(*x); });
    added_.insert(added_.begin() + (at - chans_.begin()), next_added_++);
    chans_.insert(at, std::move(c));
  }
  Bump();
}

std::vector<std::shared_ptr<chan::Channel>> Peer::LiveBeyondOldest(size_t keep) const {
  std::lock_guard l(mu_);
  std::vector<size_t> live;
  for (size_t i = 0; i < chans_.size(); ++i)
    if (IsLive(chans_[i]->state()) && !chans_[i]->sealed()) live.push_back(i);
  std::sort(live.begin(), live.end(), [&](size_t x, size_t y) { return added_[x] > added_[y]; });
  std::vector<std::shared_ptr<chan::Channel>> out;
  for (size_t i = 0; i + keep < live.size(); ++i) out.push_back(chans_[live[i]]);
  return out;
}

void Peer::Remove(const chan::Channel* c) {
  {
    std::lock_guard l(mu_);
    for (size_t i = chans_.size(); i-- > 0;) {
      if (chans_[i].get() != c) continue;
      chans_.erase(chans_.begin() + static_cast<ptrdiff_t>(i));
      added_.erase(added_.begin() + static_cast<ptrdiff_t>(i));
    }
  }
  Bump();
}

void Peer::Bump() {
  {
    // Counted and stored under the lock: two changes at once (a connecting thread's Add, the
    // dispatcher's NoteDead) must not leave the earlier count last.
    std::lock_guard l(mu_);
    live_hint_.store(LiveCountLocked(), std::memory_order_release);
  }
  version_.fetch_add(1, std::memory_order_release);
  set_version_->fetch_add(1, std::memory_order_release);
  if (on_change_ && *on_change_) (*on_change_)();
}

PeerSet::~PeerSet() {
  std::lock_guard l(mu_);
  for (auto& [ip, p] : peers_) {
    for (auto& ch : p->All()) (void)driver_->Destroy(*ch);
    for (auto& ch : p->opening) (void)driver_->Destroy(*ch);
  }
  peers_.clear();
}

Peer* PeerSet::Get(uint32_t ip) {
  std::lock_guard l(mu_);
  auto& p = peers_[ip];
  if (!p) p = std::make_unique<Peer>(ip, &version_, &on_change_);
  return p.get();
}

void PeerSet::ForEach(const std::function<void(Peer&)>& fn) {
  std::vector<Peer*> all;
  {
    std::lock_guard l(mu_);
    for (auto& [ip, p] : peers_) all.push_back(p.get());
  }
  for (Peer* p : all) fn(*p);
}

absl::Status PeerSet::Open(Peer* p, int from, int to, absl::Duration timeout,
                           const std::function<void(size_t index, chan::ChannelParams*)>& place,
                           std::vector<std::shared_ptr<chan::Channel>>* opened) {
  for (int i = from; i < to; ++i) {
    chan::ChannelParams cp;
    cp.peer_ipv4 = p->ip();
    cp.connect_timeout = timeout;
    if (place) place(static_cast<size_t>(i), &cp);
    auto ch = driver_->Connect(cp);
    if (!ch.ok()) {
      for (auto& c : *opened) (void)driver_->Destroy(*c);
      p->NoteOpenFailed(Errno(ch.status()));
      return ch.status();
    }
    opened->push_back(*ch);
  }
  return absl::OkStatus();
}

absl::StatusOr<Peer*> PeerSet::Ensure(
    uint32_t ip, int want, absl::Duration timeout,
    const std::function<void(size_t index, chan::ChannelParams*)>& place) {
  Peer* p = Get(ip);
  std::lock_guard g(p->connect_mu);
  const uint64_t end = chan::NowUs() + static_cast<uint64_t>(absl::ToInt64Microseconds(timeout));
  // Channels a non-blocking connect started are ours to wait for now (none opened twice).
  std::vector<std::shared_ptr<chan::Channel>> opened = std::move(p->opening);
  p->opening.clear();
  if (!opened.empty()) opening_peers_.fetch_sub(1, std::memory_order_acq_rel);
  if (auto st =
          Open(p, static_cast<int>(p->live_count() + opened.size()), want, timeout, place, &opened);
      !st.ok())
    return st;
  for (auto& ch : opened) {
    while (ch->state() == chan::ChannelState::kConnecting && chan::NowUs() < end)
      ch->Wait(absl::Milliseconds(5), chan::Channel::kReadable);
    if (ch->state() != chan::ChannelState::kUp) {
      // Still connecting: our wait ended before the driver's own deadline failed it; the cause
      // is the same.
      const bool still_connecting = ch->state() == chan::ChannelState::kConnecting;
      const chan::FailCause why =
          still_connecting ? chan::FailCause::kHandshakeTimeout : ch->fail_cause();
      const int err = OpenFailureErrno(still_connecting, why);
      for (auto& c : opened) (void)driver_->Destroy(*c);
      p->NoteOpenFailed(err);
      return SockError(err, "open a channel to the peer", why);
    }
  }
  for (auto& ch : opened) p->Add(ch);
  return p;
}

absl::Status PeerSet::StartOpen(
    Peer* p, int want, absl::Duration timeout, uint64_t deadline_us,
    const std::function<void(size_t index, chan::ChannelParams*)>& place, uint64_t* failures_seen) {
  // Held: another thread is opening channels here right now (or finishing them); the caller
  // waits for the outcome like any other connection to this peer.
  std::unique_lock g(p->connect_mu, std::try_to_lock);
  if (!g.owns_lock()) {
    *failures_seen = p->open_failures();
    return absl::OkStatus();
  }
  // An opening that ended (up, failed, or past its deadline) but that the dispatcher has not
  // looked at yet is settled first: a connect must not join an attempt already lost.
  const bool in_progress = !p->opening.empty() && SettleOpeningLocked(*p);
  *failures_seen = p->open_failures();
  if (in_progress || p->live_count() > 0) return absl::OkStatus();
  std::vector<std::shared_ptr<chan::Channel>> opened;
  if (auto st = Open(p, 0, want, timeout, place, &opened); !st.ok()) return st;
  p->opening = std::move(opened);
  p->opening_deadline_us = deadline_us;
  opening_peers_.fetch_add(1, std::memory_order_acq_rel);
  return absl::OkStatus();
}

bool PeerSet::SettleOpeningLocked(Peer& p) {
  bool all_up = true;
  bool failed = false;
  chan::FailCause why = chan::FailCause::kNone;
  for (const auto& ch : p.opening) {
    const chan::ChannelState st = ch->state();
    if (st == chan::ChannelState::kConnecting) {
      all_up = false;
    } else if (st != chan::ChannelState::kUp) {
      failed = true;
      why = ch->fail_cause();
    }
  }
  const bool expired = chan::NowUs() >= p.opening_deadline_us;
  if (all_up && !failed) {
    for (auto& ch : p.opening) p.Add(ch);
  } else if (failed || expired) {
    for (auto& ch : p.opening) (void)driver_->Destroy(*ch);
    p.NoteOpenFailed(OpenFailureErrno(/*still_connecting=*/!failed, why));
  } else {
    return true;
  }
  p.opening.clear();
  opening_peers_.fetch_sub(1, std::memory_order_acq_rel);
  return false;
}

bool PeerSet::FinishOpens() {
  if (!opens_pending()) return false;
  bool pending = false;
  ForEach([&](Peer& p) {
    std::unique_lock g(p.connect_mu, std::try_to_lock);
    if (!g.owns_lock()) {
      pending = true;
      return;
    }
    if (!p.opening.empty()) pending |= SettleOpeningLocked(p);
  });
  return pending;
}

}  // namespace netch::vns
