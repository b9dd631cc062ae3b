// netch-flood: hostile traffic for a NetChannel host, to test what it survives. Run inside the
// attacking test host's namespace; it sends from that host's interface, with forged IPv4 sources
// inside the test subnet, to one peer:
//
//   --syn N     channel SYNs from random 198.18.0.x sources, random channel ids and tokens
//               (a SYN flood: no handshake is ever completed)
//   --echo N    COOKIE_ECHOs with made-up cookies (what a forger without the SYN_ACK can send)
//   --forged N  RST, FIN and DATA packets to random channel ids (including live ones) with
//               random tokens and sequence numbers
//
// Bounded by count and by --seconds; it stops by itself. Prints what it sent as JSON.
#include <arpa/inet.h>
#include <linux/if_packet.h>
#include <net/if.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_format.h"
#include "afxdp_channels/netdev.h"
#include "bpf/wire.h"
#include "common/unique_fd.h"

ABSL_FLAG(std::string, dev, "", "interface to send from (required)");
ABSL_FLAG(std::string, peer, "198.18.0.2", "the victim's IPv4 address (198.18.0.0/15 only)");
ABSL_FLAG(uint64_t, syn, 0, "spoofed channel SYNs to send");
ABSL_FLAG(uint64_t, echo, 0, "forged COOKIE_ECHOs to send");
ABSL_FLAG(uint64_t, forged, 0, "forged RST/FIN/DATA packets to send");
ABSL_FLAG(double, seconds, 30, "stop after this long whatever is left");
ABSL_FLAG(uint32_t, port, NC_DEFAULT_UDP_PORT, "NetChannel UDP port");
ABSL_FLAG(uint64_t, seed, 1, "random seed (the forgeries need no secrecy, only variety)");

namespace {

using netch::wire::ChanHeader;
using netch::wire::FrameAddrs;

int Fail(const std::string& msg) {
  std::fprintf(stderr, "netch-flood: %s\n", msg.c_str());
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "hostile NetChannel traffic for tests: netch-flood --dev IF [--peer IP] [--syn N] "
      "[--echo N] [--forged N] [--seconds S]");
  absl::ParseCommandLine(argc, argv);
  const std::string dev = absl::GetFlag(FLAGS_dev);
  if (dev.empty()) return Fail("--dev is required (see --help)");
  in_addr peer{};
  if (inet_pton(AF_INET, absl::GetFlag(FLAGS_peer).c_str(), &peer) != 1)
    return Fail("--peer must be an IPv4 address");
  const uint32_t peer_ip = ntohl(peer.s_addr);
  if ((peer_ip >> 17) != (0xC6120000u >> 17))
    return Fail("--peer must be inside 198.18.0.0/15 (test hosts only)");
  auto ifi = netch::afxdp::GetInterfaceInfo(dev);
  if (!ifi.ok()) return Fail(ifi.status().ToString());
  auto mac = netch::afxdp::ResolveNeighbor(dev, peer_ip);
  if (!mac.ok()) return Fail(mac.status().ToString());
  netch::UniqueFd fd(socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return Fail(std::string("AF_PACKET socket: ") + std::strerror(errno));
  sockaddr_ll ll{};
  ll.sll_family = AF_PACKET;
  ll.sll_ifindex = ifi->ifindex;
  ll.sll_halen = 6;
  std::memcpy(ll.sll_addr, mac->data(), 6);

  std::mt19937_64 rng(absl::GetFlag(FLAGS_seed));
  FrameAddrs a;
  a.src_mac = ifi->mac;
  a.dst_mac = *mac;
  a.dst_ip = peer_ip;
  a.dst_port = static_cast<uint16_t>(absl::GetFlag(FLAGS_port));
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::duration<double>(absl::GetFlag(FLAGS_seconds));
  std::vector<uint8_t> buf(2048);
  uint64_t sent[3] = {0, 0, 0}, failed = 0;
  const uint64_t want[3] = {absl::GetFlag(FLAGS_syn), absl::GetFlag(FLAGS_echo),
                            absl::GetFlag(FLAGS_forged)};
  auto random_source = [&] {
    // Any 198.18.0.x except the victim: the addresses a spoofer on the subnet would use.
    uint32_t ip;
    do ip = 0xC6120000u | static_cast<uint32_t>(rng() % 254 + 1);
    while (ip == peer_ip);
    return ip;
  };
  for (uint64_t i = 0; i < want[0] + want[1] + want[2]; ++i) {
    if ((i & 255) == 0 && std::chrono::steady_clock::now() >= deadline) break;
    const int kind = i < want[0] ? 0 : i < want[0] + want[1] ? 1 : 2;
    ChanHeader h;
    h.src_chan = static_cast<uint16_t>(rng() % (NC_MAX_CHANNELS - 1) + 1);
    h.seq = static_cast<uint32_t>(rng());
    h.ts_val = static_cast<uint32_t>(rng()) | 1;
    a.src_port = static_cast<uint16_t>(49152 + h.src_chan);
    netch::wire::Handshake hs;
    std::vector<uint8_t> payload;
    netch::wire::SegHeader seg;
    const netch::wire::SegHeader* segp = nullptr;
    if (kind < 2) {
      a.src_ip = random_source();
      h.type = kind == 0 ? NC_CT_SYN : NC_CT_COOKIE_ECHO;
      h.dst_chan = NC_CHAN_UNASSIGNED;
      hs.init_token = rng() | 1;
      hs.init_isn = h.seq;
      hs.incarnation = rng() | 1;
      if (kind == 1) {
        hs.resp_token = rng();
        hs.resp_isn = static_cast<uint32_t>(rng());
        hs.cookie_time = static_cast<uint32_t>(rng());
        h.token = hs.resp_token;
      }
      payload.resize(netch::wire::kHandshakeLen);
      netch::wire::WriteHandshake(payload.data(), hs);
    } else {
      // Forged as if from the real peer host (the address it would trust most).
      a.src_ip = ifi->ipv4;
      static constexpr uint8_t kTypes[] = {NC_CT_RST, NC_CT_FIN, NC_CT_DATA};
      h.type = kTypes[i % 3];
      h.dst_chan = static_cast<uint16_t>(rng() % (NC_MAX_CHANNELS - 1) + 1);
      h.token = rng();
      h.ack = static_cast<uint32_t>(rng());
      if (h.type == NC_CT_DATA) {
        seg.src_port = static_cast<uint16_t>(rng());
        seg.dst_port = static_cast<uint16_t>(rng());
        seg.conn_id = static_cast<uint32_t>(rng());
        seg.seq = rng() >> 20;
        segp = &seg;
        payload.assign(64, 0xee);
      }
    }
    const size_t len = netch::wire::BuildFrame(buf, a, h, segp, payload);
    // A full qdisc (ENOBUFS) is back-pressure on a busy machine, not a failure: the same frame
    // goes again after a pause (bounded: 200 tries, never a spin), so the count sent is the
    // count asked.
    bool ok = false;
    for (int tries = 0; len && !ok && tries < 200; ++tries) {
      ok = sendto(fd.get(), buf.data(), len, 0, reinterpret_cast<sockaddr*>(&ll), sizeof(ll)) ==
           static_cast<ssize_t>(len);
      if (!ok && errno != ENOBUFS && errno != EAGAIN) break;
      if (!ok) usleep(100);
    }
    if (ok) {
      sent[kind]++;
    } else {
      failed++;
    }
  }
  std::printf("{\"syn\":%llu,\"echo\":%llu,\"forged\":%llu,\"send_failures\":%llu}\n",
              (unsigned long long)sent[0], (unsigned long long)sent[1], (unsigned long long)sent[2],
              (unsigned long long)failed);
  return 0;
}
