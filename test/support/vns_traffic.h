// vns_traffic.h - traffic the VNS tests share: a latency-class request/response connection next
// to a throughput-class stream between two stacks, every byte checked.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "vns_lib/vns.h"

namespace netch::vns {

struct RpcBesideStream {
  bool ok = false;
  std::string error;  // the first thing that failed
  uint64_t rpc_wrong_bytes = 0, stream_bytes = 0, stream_bad_bytes = 0;
};

// Reads exactly b.size() bytes; "" or what went wrong (an error, an early end of stream).
inline std::string ReadFull(VirtualSocket& s, std::span<uint8_t> b) {
  for (size_t got = 0; got < b.size();) {
    auto r = s.Recv(b.subspan(got));
    if (!r.ok()) return r.status().ToString();
    if (*r == 0) return "end of stream after " + std::to_string(got) + " bytes";
    got += *r;
  }
  return "";
}

// On stack `a`: an L-app client doing `rpcs` 4 KiB requests (the server on `b` echoes each with
// every byte incremented) while a T-app socket streams `stream_bytes` to `b`; then, the rpc done,
// 100 kB more on the stream (the channels serve a socket that does not poll once pollers stop).
inline RpcBesideStream RunRpcBesideStream(Stack& a, Stack& b, uint32_t ip_b, uint16_t port,
                                          int rpcs, uint64_t stream_bytes) {
  RpcBesideStream out;
  auto fail = [&](std::string what) {
    if (out.error.empty()) out.error = std::move(what);
  };
  auto l = b.Listen(port, 8);
  if (!l.ok()) return fail("listen: " + l.status().ToString()), out;
  SocketOptions lat, bulk;
  lat.app_class = AppClass::kLatency;
  bulk.app_class = AppClass::kThroughput;
  auto rc = a.Connect(ip_b, port, lat);
  if (!rc.ok()) return fail("connect rpc: " + rc.status().ToString()), out;
  auto rs = (*l)->Accept();
  auto tc = a.Connect(ip_b, port, bulk);
  if (!rs.ok() || !tc.ok()) return fail("accept/connect stream"), out;
  auto ts = (*l)->Accept();
  if (!ts.ok()) return fail("accept stream"), out;

  auto byte = [](uint64_t i) { return static_cast<uint8_t>(i * 13 + (i >> 9)); };
  std::thread stream_tx([&] {
    std::vector<uint8_t> buf(64 << 10);
    for (uint64_t off = 0; off < stream_bytes;) {
      const size_t n = std::min<uint64_t>(buf.size(), stream_bytes - off);
      for (size_t i = 0; i < n; ++i) buf[i] = byte(off + i);
      auto r = (*tc)->Send({buf.data(), n});
      if (!r.ok()) return fail("stream send: " + r.status().ToString());
      off += *r;
    }
  });
  std::thread stream_rx([&] {
    std::vector<uint8_t> buf(256 << 10);
    while (out.stream_bytes < stream_bytes) {
      auto r = (*ts)->Recv(buf);
      if (!r.ok() || *r == 0) return fail("stream recv ended early");
      for (size_t i = 0; i < *r; ++i) out.stream_bad_bytes += buf[i] != byte(out.stream_bytes + i);
      out.stream_bytes += *r;
    }
  });
  constexpr size_t kMsg = 4096;
  std::thread server([&] {
    std::vector<uint8_t> m(kMsg);
    for (int i = 0; i < rpcs; ++i) {
      if (auto e = ReadFull(**rs, m); !e.empty())
        return fail("server recv " + std::to_string(i) + ": " + e);
      for (auto& x : m) ++x;
      auto r = (*rs)->Send(m);
      if (!r.ok() || *r != kMsg) return fail("server send " + std::to_string(i));
    }
  });
  std::vector<uint8_t> req(kMsg), resp(kMsg);
  for (int i = 0; i < rpcs; ++i) {
    for (size_t k = 0; k < kMsg; ++k) req[k] = static_cast<uint8_t>(i + k * 3);
    auto r = (*rc)->Send(req);
    if (!r.ok() || *r != kMsg) {
      fail("client send " + std::to_string(i));
      break;
    }
    if (auto e = ReadFull(**rc, resp); !e.empty()) {
      fail("client recv " + std::to_string(i) + ": " + e);
      break;
    }
    for (size_t k = 0; k < kMsg; ++k)
      out.rpc_wrong_bytes += resp[k] != static_cast<uint8_t>(req[k] + 1);
  }
  server.join();
  stream_tx.join();
  stream_rx.join();
  if (!out.error.empty()) return out;
  std::vector<uint8_t> tail(100'000, 7), got(100'000);
  auto r = (*tc)->Send(tail);
  if (!r.ok() || *r != tail.size() || !ReadFull(**ts, got).empty() || got != tail)
    return fail("the stream after the rpc"), out;
  out.ok = out.stream_bytes == stream_bytes;
  if (!out.ok) fail("stream short");
  return out;
}

}  // namespace netch::vns
