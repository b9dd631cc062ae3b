// Channel and connection lifecycles as a host stack lives them: a long-running server outlives
// many client processes, clients are killed and restarted, and forgers flood it. Real binaries
// (netchperf, netch-flood, netchctl) in the test hosts' namespaces.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "gtest/gtest.h"
#include "test/support/privilege.h"
#include "test/support/testhosts.h"

namespace netch {
namespace {

// Built with AddressSanitizer (build-san): 2-3x slower, and freed memory stays resident in its
// quarantine. Checks of rates and resident memory are meaningful only without it; the
// sanitized run checks memory safety under the same floods.
#if defined(__SANITIZE_ADDRESS__)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif

using testing::TestHosts;

const std::string kBin = NETCH_BINARY_DIR;

// Runs a command to completion; returns its exit status and stdout.
int Shell(const std::string& cmd, std::string* out) {
  out->clear();
  FILE* p = popen((cmd + " 2>/tmp/netch-lifecycle.err").c_str(), "r");
  if (!p) return -1;
  char buf[4096];
  while (size_t n = fread(buf, 1, sizeof(buf), p)) out->append(buf, n);
  const int st = pclose(p);
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

// Starts a command in the background (exec'd through `ip netns exec`, which keeps the pid).
pid_t Spawn(const std::vector<std::string>& argv) {
  const pid_t pid = fork();
  if (pid == 0) {
    std::vector<char*> a;
    for (const auto& s : argv) a.push_back(const_cast<char*>(s.c_str()));
    a.push_back(nullptr);
    freopen("/dev/null", "w", stdout);
    execvp(a[0], a.data());
    _exit(127);
  }
  return pid;
}

// A number field of netchperf's one-line JSON.
double JsonNumber(const std::string& json, const std::string& key) {
  const auto at = json.find("\"" + key + "\":");
  if (at == std::string::npos) return -1;
  double v = -1;
  std::string rest = json.substr(at + key.size() + 3);
  (void)absl::SimpleAtod(rest.substr(0, rest.find_first_of(",}")), &v);
  return v;
}

class LifecycleTest : public ::testing::Test {
 protected:
  void SetUp() override {
    NETCH_REQUIRE_ROOT();
    ASSERT_TRUE(hosts_.Up(testing::StackHostsOptions()).ok());
  }
  void TearDown() override {
    if (server_ > 0) {
      kill(server_, SIGKILL);
      waitpid(server_, nullptr, 0);
    }
  }

  std::string In(const std::string& ns) const { return "ip netns exec " + ns + " "; }

  static double RssKb(pid_t pid) {
    std::string out;
    Shell(absl::StrFormat("grep VmRSS /proc/%d/status", pid), &out);
    double kb = 0;
    for (absl::string_view w : absl::StrSplit(out, absl::ByAnyChar(" \t\n"), absl::SkipEmpty()))
      if (absl::SimpleAtod(w, &kb)) break;
    return kb;
  }

  // Resident kB of a process's mappings by name ([heap], a file, [anon] for all anonymous ones:
  // adjacent anonymous mappings merge and split, so their address ranges do not compare across
  // time). Where a growth check fails, the failure names what grew.
  static std::map<std::string, double> RssByMapping(pid_t pid) {
    std::map<std::string, double> rss;
    std::string out;
    Shell(absl::StrFormat("cat /proc/%d/smaps", pid), &out);
    std::string current;
    for (absl::string_view line : absl::StrSplit(out, '\n')) {
      std::vector<absl::string_view> w = absl::StrSplit(line, ' ', absl::SkipEmpty());
      if (w.empty()) continue;
      if (absl::StartsWith(w[0], "Rss:") && w.size() > 1) {
        double kb = 0;
        if (absl::SimpleAtod(w[1], &kb)) rss[current] += kb;
      } else if (!absl::EndsWith(w[0], ":") && absl::StrContains(w[0], "-")) {
        current = w.size() > 5 ? std::string(w[5]) : "[anon]";
      }
    }
    return rss;
  }
  static std::string Growth(const std::map<std::string, double>& before,
                            const std::map<std::string, double>& after) {
    std::vector<std::pair<double, std::string>> grew;
    for (const auto& [k, kb] : after) {
      const auto it = before.find(k);
      const double d = kb - (it == before.end() ? 0 : it->second);
      if (d > 0) grew.push_back({d, k});
    }
    std::sort(grew.rbegin(), grew.rend());
    std::string s;
    for (size_t i = 0; i < grew.size() && i < 6; ++i)
      s += absl::StrFormat("\n  +%.0f kB %s", grew[i].first, grew[i].second);
    return s;
  }

  // Packets the veth pair dropped (its ring full): the sender counts them as tx drops.
  double VethDrops() {
    double sum = 0;
    for (const auto& [ns, dev, which] :
         {std::tuple{hosts_.ns_a(), TestHosts::kDevA, "tx_dropped"},
          std::tuple{hosts_.ns_b(), TestHosts::kDevB, "rx_dropped"}}) {
      std::string out;
      Shell(In(ns) + "cat /sys/class/net/" + dev + "/statistics/" + which, &out);
      double v = 0;
      (void)absl::SimpleAtod(absl::StripAsciiWhitespace(out), &v);
      sum += v;
    }
    return sum;
  }

  void StartServer(std::vector<std::string> extra = {}) {
    std::vector<std::string> argv = {
        "ip",     "netns", "exec",           hosts_.ns_b(), kBin + "/bench/netchperf",
        "server", "--dev", TestHosts::kDevB, "--metrics",   "off"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    server_ = Spawn(argv);
    ASSERT_GT(server_, 0);
  }

  // One client process; returns its JSON line (empty on failure).
  std::string Client(const std::string& args, int* status) {
    std::string out;
    *status = Shell(In(hosts_.ns_a()) + kBin + "/bench/netchperf client --dev " + TestHosts::kDevA +
                        " --peer 198.18.0.2 --metrics off --json " + args,
                    &out);
    return out;
  }

  size_t ServerChannels() {
    std::string out;
    if (Shell(In(hosts_.ns_b()) + kBin + "/ctl/netchctl channels --json", &out) != 0) return 9999;
    size_t n = 0;
    for (size_t at = 0; (at = out.find("\"id\"", at)) != std::string::npos; ++at) n++;
    return n;
  }

  TestHosts hosts_;
  pid_t server_ = -1;
};

TEST_F(LifecycleTest, ALongRunningServerServesSuccessiveKilledAndRestartedClients) {
  StartServer();
  // Twenty client processes one after another, each opening fresh channels from the same host
  // (the same channel ids, new tokens and incarnation each time).
  for (int i = 0; i < 20; ++i) {
    int st = 0;
    const std::string j = Client("--bytes 8388608", &st);
    ASSERT_EQ(st, 0) << "client " << i << ": " << j;
    EXPECT_NE(j.find("\"integrity_ok\":true"), std::string::npos) << "client " << i << ": " << j;
  }
  // A client killed mid-transfer, then restarted at once: it must be connected within 1 s of
  // its start (recovering its predecessor's XDP program and retiring the server's stale
  // channels on the way), and every byte of its stream checked.
  const pid_t victim =
      Spawn({"ip", "netns", "exec", hosts_.ns_a(), kBin + "/bench/netchperf", "client", "--dev",
             TestHosts::kDevA, "--peer", "198.18.0.2", "--metrics", "off", "--seconds", "30"});
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  kill(victim, SIGKILL);
  waitpid(victim, nullptr, 0);
  int st = 0;
  const std::string j = Client("--bytes 67108864", &st);
  ASSERT_EQ(st, 0) << j;
  EXPECT_NE(j.find("\"integrity_ok\":true"), std::string::npos) << j;
  const double connect_ms = JsonNumber(j, "connect_ms");
  std::printf("restarted client connected %.1f ms after its start\n", connect_ms);
  EXPECT_GT(connect_ms, 0);
  EXPECT_LT(connect_ms, 1000) << "reconnect after SIGKILL took " << connect_ms << " ms";
  // And the server goes on serving.
  EXPECT_NE(Client("--bytes 8388608", &st).find("\"integrity_ok\":true"), std::string::npos);
  EXPECT_EQ(kill(server_, 0), 0) << "the server died";
  // Nothing accumulates: the clients' channels are reaped once they are gone.
  size_t chans = 9999;
  for (int i = 0; i < 40 && chans > 0; ++i) {
    chans = ServerChannels();
    if (chans > 0) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_EQ(chans, 0u) << "channels of departed clients are kept";
  // SIGTERM: the server detaches its program and exits.
  kill(server_, SIGTERM);
  int ws = 0;
  waitpid(server_, &ws, 0);
  server_ = -1;
  std::string link;
  Shell("ip -n " + hosts_.ns_b() + " link show " + TestHosts::kDevB, &link);
  EXPECT_EQ(link.find("xdp"), std::string::npos) << "XDP program left attached: " << link;
}

TEST_F(LifecycleTest, FloodsOfSpoofedSynsAndForgedPacketsLeaveStreamsAndConnectsWorking) {
  StartServer();
  // The resident-memory baseline is the server's once it is whole: netchctl is served only after
  // its stack, driver and packet memory are. (Taken while it was still starting, the baseline
  // missed part of the packet memory; under CPU contention, a slower start, the "growth" was
  // 50-90 MB.)
  size_t chans = 9999;
  for (int i = 0; i < 200 && chans == 9999; ++i) {
    chans = ServerChannels();
    if (chans == 9999) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ASSERT_NE(chans, 9999u) << "the server did not answer netchctl within 10 s";
  // A checked stream runs while the floods hit the server.
  std::string stream_out;
  int stream_st = -1;
  std::thread stream([&] { stream_out = Client("--bytes 1073741824", &stream_st); });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  const double veth_drops_before = VethDrops();
  const double rss_before = RssKb(server_);
  const auto maps_before = RssByMapping(server_);
  std::string flood;
  ASSERT_EQ(Shell(In(hosts_.ns_a()) + kBin +
                      "/tools/netch-flood --dev nc-a --syn 100000 --echo 10000 --forged 100000 "
                      "--seconds 60",
                  &flood),
            0);
  stream.join();
  EXPECT_EQ(stream_st, 0) << stream_out;
  EXPECT_NE(stream_out.find("\"integrity_ok\":true"), std::string::npos) << stream_out;
  EXPECT_EQ(JsonNumber(flood, "syn"), 100000) << flood;
  EXPECT_EQ(JsonNumber(flood, "forged"), 100000) << flood;
  // After the flood: a new connection, and the server's channel table holds only real ones.
  int st = 0;
  EXPECT_NE(Client("--bytes 8388608", &st).find("\"integrity_ok\":true"), std::string::npos);
  EXPECT_LE(ServerChannels(), 1u) << "the flood left channels behind";
  // The drops are counted where they happened.
  std::string m;
  ASSERT_EQ(Shell(In(hosts_.ns_b()) + kBin + "/ctl/netchctl metrics", &m), 0);
  auto metric = [&](const std::string& name) {
    for (absl::string_view line : absl::StrSplit(m, '\n')) {
      if (absl::StartsWith(line, name + " ")) {
        double v = 0;
        (void)absl::SimpleAtod(line.substr(name.size() + 1), &v);
        return v;
      }
    }
    return -1.0;
  };
  // Every SYN is accounted for: answered by the driver, dropped at the full socket or for want
  // of a free frame in the fill ring, or (when the flood outruns the receiving veth, as under a
  // sanitizer) dropped by the veth pair itself before XDP saw it. Only the stream's own packets
  // share those veth counters: hence 99% (half under a sanitizer, whose slowed driver loses SYNs
  // where no counter sees them).
  const double veth_drops = VethDrops() - veth_drops_before;
  EXPECT_GE(metric("netch_driver_handshakes_total{result=\"syn_answered\"}") +
                metric("netch_xsk_rx_dropped_total") + metric("netch_xsk_rx_ring_full_total") +
                metric("netch_xsk_fill_ring_empty_total") + veth_drops,
            kSanitized ? 50000 : 99000)
      << "veth drops " << veth_drops;
  EXPECT_GT(metric("netch_driver_handshakes_total{result=\"bad_cookie_or_mismatch\"}"), 0);
  EXPECT_GE(metric("netch_xdp_packets_total{verdict=\"drop_unknown_channel\"}") +
                metric("netch_xdp_packets_total{verdict=\"drop_bad_token\"}"),
            100000 * 0.99);
  // Memory stays bounded: the floods cost the server no state, so its resident set grows by
  // little more than the new client's channel (buffers are taken lazily, 16 per idle channel):
  // 2.5-6.6 MB measured, also beside a CPU hog. 16 MB catches state of 200 bytes per SYN (a
  // planted leak of that size grew it 31 MB).
  const double rss_after = RssKb(server_);
  std::printf("server RSS before the floods %.0f kB, after %.0f kB\n", rss_before, rss_after);
  // (Not under AddressSanitizer: its quarantine keeps freed memory resident by design.)
  if (!kSanitized) {
    EXPECT_LT(rss_after - rss_before, 16 * 1024)
        << "the floods grew the server by " << (rss_after - rss_before) / 1024
        << " MB; the mappings that grew most:" << Growth(maps_before, RssByMapping(server_));
  }
}

// The isolation benchmark's workload as a test of the real path: a T-app stream and L-app rpc
// connections in one client process, the server serving them at once, under the class-isolation
// policy on both ends, every byte checked. (Latency is measured in bench/run-isolation.)
TEST_F(LifecycleTest, AStreamAndRpcsShareAStackUnderClassIsolation) {
  StartServer({"--channels", "4", "--policy", "isolate-classes:latency_channels=1"});
  int st = -1;
  const std::string out =
      Client("--mode mixed --seconds 1 --concurrency 2 --channels 4 --policy isolate-classes", &st);
  EXPECT_EQ(st, 0) << out;
  EXPECT_NE(out.find("\"integrity_ok\":true"), std::string::npos) << out;
  EXPECT_NE(out.find("\"policy\":\"isolate-classes\""), std::string::npos) << out;
  EXPECT_GT(JsonNumber(out, "requests"), 0) << out;
  EXPECT_GT(JsonNumber(out, "stream_gbps"), 0) << out;
}

}  // namespace
}  // namespace netch
