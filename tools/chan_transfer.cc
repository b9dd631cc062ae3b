#include "tools/chan_transfer.h"

#include <poll.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <random>
#include <thread>

#include "absl/strings/str_format.h"
#include "afxdp_channels/engine.h"
#include "afxdp_channels/netdev.h"
#include "common/netns.h"

namespace netch::tools {
namespace {

constexpr uint32_t kConnId = 0xC0FFEE;
constexpr size_t kPatternLen = (1u << 20) + 7;  // odd length: a slice's content depends on offset
constexpr size_t kMaxSeg = 64 * 1024;

const std::vector<uint8_t>& Pattern() {
  static const std::vector<uint8_t>* p = [] {
    auto* v = new std::vector<uint8_t>(kPatternLen + kMaxSeg);
    std::mt19937_64 rng(42);
    for (size_t i = 0; i < kPatternLen; i += 8) {
      const uint64_t w = rng();
      std::memcpy(v->data() + i, &w, std::min<size_t>(8, kPatternLen - i));
    }
    std::memcpy(v->data() + kPatternLen, v->data(), kMaxSeg);  // slices never wrap
    return v;
  }();
  return *p;
}

// A hash of the byte stream, blind to how it was cut into segments: a channel may deliver one
// segment as several pieces (a multi-buffer frame), and the bytes must still match.
struct StreamHash {
  uint64_t h = 0x243F6A8885A308D3ull;
  uint64_t word = 0;
  unsigned have = 0;  // bytes in `word`
  void Mix(uint64_t w) {
    h = (h ^ w) * 0x9E3779B97F4A7C15ull;
    h ^= h >> 29;
  }
  void Update(const uint8_t* p, size_t n) {
    size_t i = 0;
    for (; have != 0 && i < n; ++i) {
      word |= uint64_t{p[i]} << (8 * have);
      if (++have == 8) {
        Mix(word);
        word = 0;
        have = 0;
      }
    }
    for (; i + 8 <= n; i += 8) {
      uint64_t w;
      std::memcpy(&w, p + i, 8);  // little-endian, as the byte-wise path above assembles
      Mix(w);
    }
    for (; i < n; ++i) word |= uint64_t{p[i]} << (8 * have++);
  }
  uint64_t Final() const { return (h ^ word ^ have) * 0xBF58476D1CE4E5B9ull + 1; }
};

}  // namespace

ChanHost::~ChanHost() {
  driver.reset();
  if (steer) {
    // The interface index is only meaningful inside the namespace.
    std::unique_ptr<NetnsScope> ns;
    if (!netns.empty()) ns = std::make_unique<NetnsScope>(netns);
    (void)steer->Detach();
  }
}

absl::StatusOr<std::unique_ptr<ChanHost>> OpenChanHost(const std::string& driver,
                                                       chan::DriverOptions opts) {
  auto h = std::make_unique<ChanHost>();
  h->netns = opts.netns;
  if (driver == "afxdp") {
    std::unique_ptr<NetnsScope> ns;
    if (!opts.netns.empty()) {
      ns = std::make_unique<NetnsScope>(opts.netns);
      if (!ns->ok()) return ns->status();
    }
    auto steer = bpf::SteerProgram::Load(opts.udp_port);
    if (!steer.ok()) return steer.status();
    auto ifi = afxdp::GetInterfaceInfo(opts.ifname);
    if (!ifi.ok()) return ifi.status();
    if (auto st = (*steer)->Attach(ifi->ifindex, bpf::AttachMode::kNative); !st.ok()) return st;
    h->steer = std::move(*steer);
    opts.steer = h->steer.get();
  }
  auto d = chan::CreateDriver(driver, opts);
  if (!d.ok()) return d.status();
  h->driver = std::move(*d);
  return h;
}

absl::StatusOr<TransferResult> RunTransfer(chan::Driver& tx, chan::Driver& rx,
                                           const TransferOptions& o) {
  if (o.channels < 1 || o.channels > 64) return absl::InvalidArgumentError("channels: 1..64");
  const uint64_t start_us = chan::NowUs();
  const uint64_t deadline_us =
      start_us + static_cast<uint64_t>(absl::ToInt64Microseconds(o.deadline));
  std::vector<std::shared_ptr<chan::Channel>> txc, rxc;
  for (int c = 0; c < o.channels; ++c) {
    chan::ChannelParams p;
    p.peer_ipv4 = o.peer_ipv4;
    p.queue = o.queue;
    auto ch = tx.Connect(p);
    if (!ch.ok()) return ch.status();
    txc.push_back(*ch);
  }
  while (static_cast<int>(rxc.size()) < o.channels && chan::NowUs() < deadline_us) {
    if (auto ch = rx.Accept()) {
      rxc.push_back(ch);
      continue;
    }
    pollfd p{rx.accept_fd(), POLLIN, 0};
    poll(&p, 1, 10);
  }
  for (auto& c : txc) {
    while (c->state() == chan::ChannelState::kConnecting && chan::NowUs() < deadline_us)
      c->Wait(absl::Milliseconds(10), chan::Channel::kReadable);
  }
  TransferResult r;
  r.channels.resize(o.channels);
  for (int c = 0; c < o.channels; ++c) {
    if (txc[c]->state() != chan::ChannelState::kUp) {
      return absl::DeadlineExceededError(
          absl::StrFormat("channel %d did not come up: %s", c, chan::StateName(txc[c]->state())));
    }
  }
  if (static_cast<int>(rxc.size()) != o.channels)
    return absl::DeadlineExceededError(
        absl::StrFormat("accepted %u of %d channels", rxc.size(), o.channels));

  const size_t seg = std::min<size_t>(o.segment_bytes ? o.segment_bytes : txc[0]->max_payload(),
                                      std::min(txc[0]->max_payload(), kMaxSeg));
  const uint64_t per_chan = o.bytes / o.channels;
  const auto& pat = Pattern();
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> received_total{0};

  // Sleeps until one of the channels can make progress (or 5 ms pass).
  auto wait_any = [](const std::vector<std::shared_ptr<chan::Channel>>& chans,
                     chan::Channel::Interest interest) {
    std::vector<pollfd> fds;
    for (const auto& c : chans) {
      c->ArmNotify(interest);
      fds.push_back({c->notify_fd(interest), POLLIN, 0});
    }
    if (poll(fds.data(), fds.size(), 5) > 0) {
      for (const auto& f : fds) {
        uint64_t v;
        if (f.revents & POLLIN) (void)!read(f.fd, &v, sizeof(v));
      }
    }
  };
  auto dead = [](const chan::Channel& ch) {
    const auto st = ch.state();
    return st == chan::ChannelState::kFailed || st == chan::ChannelState::kClosed;
  };

  // One thread sends on every channel, round robin, as one application thread over many
  // channels does (a thread per channel would only measure the scheduler on a 2-core machine).
  auto sender = [&] {
    struct Stream {
      uint64_t off = 0;
      StreamHash h;
    };
    std::vector<Stream> st(o.channels);
    constexpr int kBatch = 32;
    chan::TxSegment segs[kBatch];
    int active = o.channels;
    while (active > 0 && !stop.load(std::memory_order_relaxed)) {
      bool progress = false;
      active = 0;
      for (int c = 0; c < o.channels; ++c) {
        Stream& s = st[c];
        if (s.off >= per_chan || dead(*txc[c])) continue;
        active++;
        int n = 0;
        for (uint64_t o2 = s.off; n < kBatch && o2 < per_chan; ++n) {
          const size_t len = std::min<uint64_t>(seg, per_chan - o2);
          segs[n].hdr = {NC_DATA,
                         NC_CLASS_THROUGHPUT,
                         static_cast<uint16_t>(c),
                         static_cast<uint16_t>(c),
                         kConnId,
                         o2};
          segs[n].payload = {pat.data() + (o2 + 977 * c) % kPatternLen, len};
          o2 += len;
        }
        auto taken = txc[c]->Enqueue({segs, static_cast<size_t>(n)});
        if (!taken.ok()) {
          stop = true;
          break;
        }
        for (size_t i = 0; i < *taken; ++i) {
          if (o.verify) s.h.Update(segs[i].payload.data(), segs[i].payload.size());
          s.off += segs[i].payload.size();
        }
        progress |= *taken > 0;
      }
      if (!progress && active > 0) wait_any(txc, chan::Channel::kWritable);
    }
    for (int c = 0; c < o.channels; ++c) {
      r.channels[c].bytes_sent = st[c].off;
      r.channels[c].tx_hash = st[c].h.Final();
    }
  };

  // One thread receives from every channel; a channel's index is learnt from its first segment.
  auto receiver = [&] {
    struct Stream {
      uint64_t off = 0, nseg = 0;
      StreamHash h;
      int c = -1;
      bool in_order = true;
    };
    std::vector<Stream> st(rxc.size());
    constexpr int kBatch = 64;
    chan::RxSegment segs[kBatch];
    uint64_t done = 0;
    while (done < per_chan * o.channels && !stop.load(std::memory_order_relaxed)) {
      if (o.rx_hold && o.rx_hold()) {
        usleep(1000);
        continue;
      }
      bool progress = false, all_dead = true;
      for (size_t i = 0; i < rxc.size(); ++i) {
        Stream& s = st[i];
        const size_t n = rxc[i]->Dequeue(SIZE_MAX, segs);
        all_dead &= n == 0 && dead(*rxc[i]);
        if (n == 0) continue;
        uint64_t bytes = 0;
        for (size_t k = 0; k < n; ++k) {
          bytes += segs[k].payload.size();
          if (s.c < 0) s.c = segs[k].hdr.src_port;
          if (segs[k].hdr.seq != s.off || segs[k].hdr.src_port != s.c ||
              segs[k].hdr.conn_id != kConnId)
            s.in_order = false;
          if (o.verify) s.h.Update(segs[k].payload.data(), segs[k].payload.size());
          s.off += segs[k].payload.size();
        }
        s.nseg += n;
        rxc[i]->Release({segs, n});
        done += bytes;
        received_total.fetch_add(bytes, std::memory_order_relaxed);
        progress = true;
      }
      if (all_dead) break;
      if (!progress) wait_any(rxc, chan::Channel::kReadable);
    }
    for (const Stream& s : st) {
      if (s.c < 0 || s.c >= o.channels) continue;
      ChannelResult& res = r.channels[s.c];
      res.bytes_received = s.off;
      res.rx_hash = s.h.Final();
      res.segments = s.nseg;
      res.in_order = s.in_order;
    }
  };

  std::vector<std::thread> threads;
  threads.emplace_back(sender);
  threads.emplace_back(receiver);
  const uint64_t total = per_chan * o.channels;
  while (received_total.load() < total) {
    if (chan::NowUs() >= deadline_us) {
      stop = true;
      r.error = "deadline passed";
      break;
    }
    bool all_dead = true;
    for (auto& c : rxc) {
      const auto st = c->state();
      all_dead &= st == chan::ChannelState::kFailed || st == chan::ChannelState::kClosed;
    }
    if (all_dead) {
      r.error = "every channel failed or closed";
      stop = true;
      break;
    }
    if (o.on_progress) o.on_progress(static_cast<double>(received_total.load()) / total, txc);
    usleep(10'000);
  }
  for (auto& t : threads) t.join();
  r.seconds = (chan::NowUs() - start_us) / 1e6;
  r.complete = received_total.load() == total;
  r.intact = r.complete;
  for (int c = 0; c < o.channels; ++c) {
    ChannelResult& res = r.channels[c];
    res.tx_stats = txc[c]->stats();
    r.bytes += res.bytes_received;
    r.segments += res.segments;
    r.intact &= res.in_order && res.bytes_received == per_chan && res.tx_hash == res.rx_hash;
  }
  for (auto& c : rxc) {
    // Receivers are matched to channel indexes by the first segment's port.
    for (auto& res : r.channels)
      if (res.rx_stats.rx_bytes == 0 && c->stats().rx_bytes == res.bytes_received) {
        res.rx_stats = c->stats();
        break;
      }
  }
  if (o.destroy_after) {
    for (auto& c : txc) (void)tx.Destroy(*c);
    for (auto& c : rxc) (void)rx.Destroy(*c);
  }
  return r;
}

bool WaitFramesReturned(chan::Driver& d, absl::Duration timeout) {
  const uint64_t end = chan::NowUs() + static_cast<uint64_t>(absl::ToInt64Microseconds(timeout));
  for (;;) {
    const chan::DriverStats s = d.Stats();
    if (s.frames_free + s.frames_in_fill == s.frames_total && s.tx_slots_free == s.tx_slots_total)
      return true;
    if (chan::NowUs() >= end) return false;
    usleep(10'000);
  }
}

}  // namespace netch::tools
