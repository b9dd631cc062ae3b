// netchctl - the operator's CLI for a running NetChannel stack, in the style of ip/bpftool.
// Talks to the stack's control socket (@netch/<instance>, this network namespace).
#include <unistd.h>

#include <cstdio>
#include <ctime>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/status/statusor.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "ctl/control.h"

namespace {

using json = nlohmann::json;

constexpr char kUsage[] =
    "Commands:\n"
    "  status                              the stack: interface, XDP mode, pins, metrics address\n"
    "  channels                            channels with state, engine/core, bytes, RTT, window\n"
    "  sockets [--explain ID]              virtual sockets with their class and channels; or one\n"
    "                                      socket: policy, channels, cores, decisions, why\n"
    "  map socket ID --channels A,B        restrict a socket's traffic to these channels\n"
    "  pin channel ID --core N             run a channel on the engine pinned to core N\n"
    "  scale peer IPV4 --channels N        open or drain channels to a peer (no byte lost)\n"
    "  policy list | policy show | policy set NAME [key=value...]\n"
    "  copy-workers N                      set the number of copy workers\n"
    "  fault drop PPM [--channel ID]       drop PPM per million packets (all or one channel)\n"
    "  metrics                             the Prometheus exposition text\n"
    "  top [--count N] [--interval S]      live channels (throughput, queue, core) and engines\n"
    "With one stack running in this network namespace, --instance is not needed.\n"
    "Every command takes --help; --json prints the stack's answer as JSON.\n";

std::string Str(const json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_array()) {
    std::vector<std::string> parts;
    for (const auto& x : v) parts.push_back(Str(x));
    return parts.empty() ? "all" : absl::StrJoin(parts, ",");
  }
  return v.dump();
}

void Table(const json& rows, const std::vector<std::pair<std::string, std::string>>& cols) {
  std::vector<size_t> w;
  for (const auto& [key, title] : cols) w.push_back(title.size());
  std::vector<std::vector<std::string>> cells;
  for (const auto& r : rows) {
    std::vector<std::string> line;
    for (size_t i = 0; i < cols.size(); ++i) {
      line.push_back(r.contains(cols[i].first) ? Str(r[cols[i].first]) : "-");
      w[i] = std::max(w[i], line.back().size());
    }
    cells.push_back(line);
  }
  for (size_t i = 0; i < cols.size(); ++i) std::printf("%-*s  ", int(w[i]), cols[i].second.c_str());
  std::printf("\n");
  for (const auto& line : cells) {
    for (size_t i = 0; i < line.size(); ++i) std::printf("%-*s  ", int(w[i]), line[i].c_str());
    std::printf("\n");
  }
}

void Human(const std::string& cmd, const json& d) {
  if (cmd == "status") {
    for (const auto& k : {"instance", "pid", "ifname", "driver", "attach_mode", "pin_dir",
                          "metrics_address", "channels", "sockets", "copy_workers", "policy"})
      std::printf("%-16s %s\n", k, Str(d[k]).c_str());
    std::printf("%-16s", "engines");
    for (const auto& e : d["engines"])
      std::printf(" %s(core %s, tid %s)", Str(e["index"]).c_str(), Str(e["core"]).c_str(),
                  Str(e["tid"]).c_str());
    std::printf("\n");
    if (!Str(d["recovered"]).empty())
      std::printf("%-16s %s\n", "recovered", Str(d["recovered"]).c_str());
    for (const auto& w : d["warnings"]) std::printf("%-16s %s\n", "warning", Str(w).c_str());
  } else if (cmd == "channels") {
    Table(d, {{"id", "ID"},
              {"peer", "PEER"},
              {"state", "STATE"},
              {"engine", "ENGINE"},
              {"core", "CORE"},
              {"queue", "QUEUE"},
              {"tx_bytes", "TX_BYTES"},
              {"rx_bytes", "RX_BYTES"},
              {"srtt_us", "RTT_US"},
              {"cwnd_packets", "CWND"},
              {"tx_queued_bytes", "TXQ"},
              {"retransmits", "RETX"}});
  } else if (cmd == "sockets") {
    Table(d, {{"id", "ID"},
              {"local_port", "LPORT"},
              {"remote", "REMOTE"},
              {"remote_port", "RPORT"},
              {"class", "CLASS"},
              {"tx_bytes", "TX_BYTES"},
              {"rx_bytes", "RX_BYTES"},
              {"channels", "CHANNELS"}});
  } else if (cmd == "metrics") {
    std::fputs(d.get<std::string>().c_str(), stdout);
  } else if (cmd == "policy-list") {
    for (const auto& p : d) {
      std::printf("%s %s", p["active"].get<bool>() ? "*" : " ", Str(p["name"]).c_str());
      for (const auto& [k, v] : p["knobs"].items())
        std::printf(" %s=%s", k.c_str(), Str(v).c_str());
      std::printf("\n      %s\n", Str(p["explain"]).c_str());
    }
  } else if (cmd == "socket-explain") {
    std::printf("socket %s -> %s:%s  class %s  sent %s bytes\npolicy %s", Str(d["socket"]).c_str(),
                Str(d["remote"]).c_str(), Str(d["remote_port"]).c_str(), Str(d["class"]).c_str(),
                Str(d["tx_bytes"]).c_str(), Str(d["policy"]["name"]).c_str());
    for (const auto& [k, v] : d["policy"]["knobs"].items())
      std::printf(" %s=%s", k.c_str(), Str(v).c_str());
    std::printf("\n");
    Table(d["channels"], {{"id", "CHANNEL"},
                          {"state", "STATE"},
                          {"usable", "USABLE"},
                          {"engine", "ENGINE"},
                          {"core", "CORE"},
                          {"queue", "QUEUE"},
                          {"tx_queued_bytes", "QUEUED"},
                          {"srtt_us", "SRTT_US"},
                          {"batches", "BATCHES"}});
    std::printf("why: %s\n", Str(d["why"]).c_str());
  } else if (cmd == "policy-show" || cmd == "policy-set") {
    std::printf("policy %s", Str(d["name"]).c_str());
    for (const auto& [k, v] : d["knobs"].items()) std::printf(" %s=%s", k.c_str(), Str(v).c_str());
    std::printf("\n");
  } else {
    std::printf("ok");
    for (const auto& [k, v] : d.items()) std::printf(" %s=%s", k.c_str(), Str(v).c_str());
    std::printf("\n");
  }
}

// One request to the stack: its "data", or the error it gave.
absl::StatusOr<json> Ask(const std::string& instance, const std::vector<std::string>& req) {
  auto answer = netch::ctl::Request(instance, req);
  if (!answer.ok()) return answer.status();
  json j = json::parse(*answer, nullptr, false);
  if (j.is_discarded() || !j.contains("ok"))
    return absl::InternalError("malformed answer from the stack");
  if (!j["ok"].get<bool>()) return absl::FailedPreconditionError(Str(j["error"]));
  return j["data"];
}

// A live view: every `interval` seconds, channels (throughput since the last sample, queue,
// engine, core) and engines (busy %), `count` times. On a terminal the screen is redrawn.
int Top(const std::string& instance, int count, double interval, bool json_out) {
  const bool tty = isatty(STDOUT_FILENO) && !json_out;
  json prev_ch, prev_st;
  uint64_t prev_us = 0;
  for (int n = 0; n <= count; ++n) {
    auto ch = Ask(instance, {"channels"});
    auto st = ch.ok() ? Ask(instance, {"status"}) : ch.status();
    if (!st.ok()) {
      std::fprintf(stderr, "netchctl: %s\n", std::string(st.status().message()).c_str());
      return 1;
    }
    timespec ts{};
    clock_gettime(CLOCK_MONOTONIC, &ts);
    const uint64_t now_us = uint64_t(ts.tv_sec) * 1000000 + uint64_t(ts.tv_nsec) / 1000;
    if (n > 0) {  // the first sample is the baseline
      const double dt = (now_us - prev_us) / 1e6;
      json rows = json::array(), engines = json::array();
      for (const auto& c : *ch) {
        uint64_t tx0 = c["tx_bytes"], rx0 = c["rx_bytes"];
        for (const auto& p : prev_ch)
          if (p["id"] == c["id"]) tx0 = p["tx_bytes"], rx0 = p["rx_bytes"];
        char tx[32], rx[32];
        std::snprintf(tx, sizeof(tx), "%.3f", (c["tx_bytes"].get<uint64_t>() - tx0) * 8 / dt / 1e9);
        std::snprintf(rx, sizeof(rx), "%.3f", (c["rx_bytes"].get<uint64_t>() - rx0) * 8 / dt / 1e9);
        rows.push_back({{"id", c["id"]},
                        {"peer", c["peer"]},
                        {"state", c["state"]},
                        {"engine", c["engine"]},
                        {"core", c["core"]},
                        {"queue", c["queue"]},
                        {"tx_gbps", tx},
                        {"rx_gbps", rx},
                        {"tx_queued_bytes", c["tx_queued_bytes"]},
                        {"srtt_us", c["srtt_us"]},
                        {"retransmits", c["retransmits"]}});
      }
      for (const auto& e : (*st)["engines"]) {
        uint64_t b0 = e["busy_ns"];
        for (const auto& p : prev_st["engines"])
          if (p["index"] == e["index"]) b0 = p["busy_ns"];
        char busy[16];
        std::snprintf(busy, sizeof(busy), "%.1f", (e["busy_ns"].get<uint64_t>() - b0) / 1e7 / dt);
        engines.push_back({{"index", e["index"]}, {"core", e["core"]}, {"busy_pct", busy}});
      }
      if (json_out) {
        std::printf("%s\n",
                    json{{"seconds", dt}, {"channels", rows}, {"engines", engines}}.dump().c_str());
      } else {
        if (tty) std::printf("\033[H\033[2J");
        std::printf("netchctl top: %s, every %.1f s (sample %d of %d)\n", instance.c_str(),
                    interval, n, count);
        Table(rows, {{"id", "CHANNEL"},
                     {"peer", "PEER"},
                     {"state", "STATE"},
                     {"engine", "ENGINE"},
                     {"core", "CORE"},
                     {"queue", "QUEUE"},
                     {"tx_gbps", "TX_GBPS"},
                     {"rx_gbps", "RX_GBPS"},
                     {"tx_queued_bytes", "QUEUED"},
                     {"srtt_us", "SRTT_US"},
                     {"retransmits", "RETX"}});
        Table(engines, {{"index", "ENGINE"}, {"core", "CORE"}, {"busy_pct", "BUSY_%"}});
        std::printf("\n");
      }
      std::fflush(stdout);
    }
    prev_ch = *ch;
    prev_st = *st;
    prev_us = now_us;
    if (n < count) usleep(static_cast<useconds_t>(interval * 1e6));
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"netchctl: the operator's CLI for a running NetChannel stack", "netchctl"};
  app.footer(kUsage);
  app.require_subcommand(1);
  app.fallthrough();  // --json and --instance also after the command (`netchctl channels --json`)
  std::string instance;
  bool json_out = false;
  app.add_option("--instance", instance, "the stack's instance name (default: the only one)");
  app.add_flag("--json", json_out, "print the stack's answer as JSON");
  std::vector<std::string> req;
  // status, channels, sockets, metrics: no arguments.
  for (const char* c : {"status", "channels", "metrics"})
    app.add_subcommand(c, "")->callback([&req, c] { req = {c}; });
  uint64_t explain_id = 0;
  auto* sockets = app.add_subcommand("sockets", "virtual sockets with their class and channels");
  auto* explain_opt = sockets->add_option(
      "--explain", explain_id, "one socket: its class, policy, channels with cores and batches");
  sockets->callback([&] {
    req = explain_opt->count()
              ? std::vector<std::string>{"socket-explain", std::to_string(explain_id)}
              : std::vector<std::string>{"sockets"};
  });
  auto* map = app.add_subcommand("map", "restrict a socket's traffic to channels");
  map->require_subcommand(1);
  uint64_t sock_id = 0;
  std::string map_chans;
  auto* map_socket = map->add_subcommand("socket", "map socket ID --channels A,B");
  map_socket->add_option("ID", sock_id, "socket id (netchctl sockets)")->required();
  map_socket->add_option("--channels", map_chans, "channel ids, comma-separated")->required();
  map_socket->callback([&] { req = {"map-socket", std::to_string(sock_id), map_chans}; });
  auto* scale = app.add_subcommand("scale", "set the number of channels to a peer");
  scale->require_subcommand(1);
  std::string scale_ip;
  uint32_t scale_n = 0;
  auto* scale_peer = scale->add_subcommand("peer", "scale peer IPV4 --channels N");
  scale_peer->add_option("IPV4", scale_ip, "the peer's address")->required();
  scale_peer->add_option("--channels", scale_n, "channels wanted (1..64); extra ones are drained")
      ->required()
      ->check(CLI::Range(1, 64));
  scale_peer->callback([&] { req = {"scale-peer", scale_ip, std::to_string(scale_n)}; });
  auto* pin = app.add_subcommand("pin", "move a channel to the engine pinned to a core");
  pin->require_subcommand(1);
  uint64_t chan_id = 0, core = 0;
  auto* pin_channel = pin->add_subcommand("channel", "pin channel ID --core N");
  pin_channel->add_option("ID", chan_id, "channel id (netchctl channels)")->required();
  pin_channel->add_option("--core", core, "a core an engine is pinned to")->required();
  pin_channel->callback([&] {
    req = {"pin-channel", std::to_string(chan_id), std::to_string(core)};
  });
  auto* policy = app.add_subcommand("policy", "the NetScheduler policy");
  policy->require_subcommand(1);
  policy->add_subcommand("list", "every policy and its knobs")->callback([&] {
    req = {"policy-list"};
  });
  policy->add_subcommand("show", "the active policy")->callback([&] { req = {"policy-show"}; });
  std::string policy_name;
  std::vector<std::string> knobs;
  auto* policy_set = policy->add_subcommand("set", "policy set NAME [key=value...]");
  policy_set->add_option("NAME", policy_name, "policy name (netchctl policy list)")->required();
  policy_set->add_option("KNOBS", knobs, "key=value");
  policy_set->callback([&] {
    req = {"policy-set", policy_name};
    req.insert(req.end(), knobs.begin(), knobs.end());
  });
  int top_count = 3600;
  double top_interval = 1;
  auto* top = app.add_subcommand("top", "live channels and engines: throughput, queue, core, busy");
  top->add_option("--count", top_count, "samples to show (default 3600: an hour)")
      ->check(CLI::Range(1, 86400));
  top->add_option("--interval", top_interval, "seconds between samples")
      ->check(CLI::Range(0.1, 60.0));
  top->callback([&] { req = {"top"}; });
  uint64_t workers = 0;
  auto* cw = app.add_subcommand("copy-workers", "set the number of copy workers");
  cw->add_option("N", workers, "copy workers")->required();
  cw->callback([&] { req = {"copy-workers", std::to_string(workers)}; });
  auto* fault = app.add_subcommand("fault", "fault injection in the XDP program");
  fault->require_subcommand(1);
  uint64_t ppm = 0, fault_chan = 0;
  auto* drop = fault->add_subcommand("drop", "fault drop PPM [--channel ID]");
  drop->add_option("PPM", ppm, "parts per million dropped")->required();
  auto* fault_chan_opt = drop->add_option("--channel", fault_chan, "only this channel");
  drop->callback([&] {
    req = {"fault-drop", std::to_string(ppm)};
    if (fault_chan_opt->count()) req.push_back(std::to_string(fault_chan));
  });
  // An unknown command word gets its own message (CLI11 would only say a subcommand is missing).
  for (int i = 1; i < argc; ++i) {
    const std::string w = argv[i];
    if (w == "--instance") {
      ++i;
      continue;
    }
    if (w.rfind("-", 0) == 0) continue;
    bool known = false;
    for (const CLI::App* sub : app.get_subcommands([](CLI::App*) { return true; }))
      known |= sub->get_name() == w;
    if (!known) {
      std::fprintf(stderr,
                   "netchctl: unknown command '%s'\nRun 'netchctl --help' for the commands.\n",
                   w.c_str());
      return 2;
    }
    break;
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "netchctl: %s\nRun 'netchctl --help' for the commands.\n", e.what());
    return 2;
  }
  if (instance.empty()) {
    const auto all = netch::ctl::ListInstances();
    if (all.empty()) {
      std::fprintf(stderr, "netchctl: no netch stack is running in this network namespace\n");
      return 1;
    }
    if (all.size() > 1) {
      std::fprintf(stderr, "netchctl: %zu stacks are running (%s); pick one with --instance\n",
                   all.size(), absl::StrJoin(all, ", ").c_str());
      return 1;
    }
    instance = all[0];
  }
  if (req[0] == "top") return Top(instance, top_count, top_interval, json_out);
  auto data = Ask(instance, req);
  if (!data.ok()) {
    std::fprintf(stderr, "netchctl: %s\n", std::string(data.status().message()).c_str());
    return 1;
  }
  if (json_out) {
    std::printf("%s\n", data->dump().c_str());
  } else {
    Human(req[0], *data);
  }
  return 0;
}
