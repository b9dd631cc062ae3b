// netchctl - the operator's CLI for a running NetChannel stack, in the style of ip/bpftool.
// Talks to the stack's control socket (@netch/<instance>, this network namespace).
#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "ctl/control.h"

namespace {

using json = nlohmann::json;

constexpr char kUsage[] =
    "usage: netchctl [--instance NAME] [--json] COMMAND\n"
    "commands:\n"
    "  status                              the stack: interface, XDP mode, pins, metrics address\n"
    "  channels                            channels with state, engine/core, bytes, RTT, window\n"
    "  sockets                             virtual sockets with their class and channels\n"
    "  map socket ID --channels A,B        restrict a socket's traffic to these channels\n"
    "  pin channel ID --core N             run a channel on the engine pinned to core N\n"
    "  policy list | policy show | policy set NAME [key=value...]\n"
    "  copy-workers N                      set the number of copy workers\n"
    "  fault drop PPM [--channel ID]       drop PPM per million packets (all or one channel)\n"
    "  metrics                             the Prometheus exposition text\n"
    "With one stack running in this network namespace, --instance is not needed.\n"
    "Every command takes --help; --json prints the stack's answer as JSON.\n";

int Usage(const std::string& err) {
  std::fprintf(stderr, "netchctl: %s\n%s", err.c_str(), kUsage);
  return 2;
}

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
      std::printf("\n");
    }
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

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> a(argv + 1, argv + argc);
  std::string instance;
  bool json_out = false;
  std::vector<std::string> rest;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i] == "--instance") {
      if (i + 1 >= a.size()) return Usage("--instance needs a name");
      instance = a[++i];
    } else if (a[i] == "--json") {
      json_out = true;
    } else if (a[i] == "-h" || a[i] == "--help") {
      std::fputs(kUsage, stdout);
      return 0;
    } else {
      rest.push_back(a[i]);
    }
  }
  if (rest.empty()) return Usage("no command");
  // Translate the command line into one control request.
  std::vector<std::string> req;
  const std::string& c = rest[0];
  auto value_of = [&](const std::string& flag, std::string* out) {
    for (size_t i = 0; i + 1 < rest.size(); ++i)
      if (rest[i] == flag) {
        *out = rest[i + 1];
        return true;
      }
    return false;
  };
  auto is_uint = [](const std::string& s) {
    uint64_t v;
    return absl::SimpleAtoi(s, &v);
  };
  if ((c == "status" || c == "channels" || c == "sockets" || c == "metrics") && rest.size() == 1) {
    req = {c};
  } else if (c == "map" && rest.size() == 5 && rest[1] == "socket") {
    std::string chans;
    if (!is_uint(rest[2]) || !value_of("--channels", &chans))
      return Usage("usage: map socket ID --channels A,B");
    req = {"map-socket", rest[2], chans};
  } else if (c == "pin" && rest.size() == 5 && rest[1] == "channel") {
    std::string core;
    if (!is_uint(rest[2]) || !value_of("--core", &core) || !is_uint(core))
      return Usage("usage: pin channel ID --core N");
    req = {"pin-channel", rest[2], core};
  } else if (c == "policy" && rest.size() == 2 && rest[1] == "show") {
    req = {"policy-show"};
  } else if (c == "policy" && rest.size() == 2 && rest[1] == "list") {
    req = {"policy-list"};
  } else if (c == "policy" && rest.size() >= 3 && rest[1] == "set") {
    req = {"policy-set"};
    req.insert(req.end(), rest.begin() + 2, rest.end());
  } else if (c == "copy-workers" && rest.size() == 2) {
    if (!is_uint(rest[1])) return Usage("copy-workers takes a number, not '" + rest[1] + "'");
    req = {"copy-workers", rest[1]};
  } else if (c == "fault" && rest.size() >= 3 && rest[1] == "drop") {
    if (!is_uint(rest[2]))
      return Usage("fault drop takes parts per million, not '" + rest[2] + "'");
    req = {"fault-drop", rest[2]};
    std::string ch;
    if (rest.size() == 5 && value_of("--channel", &ch) && is_uint(ch)) {
      req.push_back(ch);
    } else if (rest.size() != 3) {
      return Usage("usage: fault drop PPM [--channel ID]");
    }
  } else {
    return Usage("unknown or malformed command: " + absl::StrJoin(rest, " "));
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
  auto answer = netch::ctl::Request(instance, req);
  if (!answer.ok()) {
    std::fprintf(stderr, "netchctl: %s\n", std::string(answer.status().message()).c_str());
    return 1;
  }
  json j = json::parse(*answer, nullptr, false);
  if (j.is_discarded() || !j.contains("ok")) {
    std::fprintf(stderr, "netchctl: malformed answer from the stack\n");
    return 1;
  }
  if (!j["ok"].get<bool>()) {
    std::fprintf(stderr, "netchctl: %s\n", Str(j["error"]).c_str());
    return 1;
  }
  if (json_out) {
    std::printf("%s\n", j["data"].dump().c_str());
  } else {
    Human(req[0], j["data"]);
  }
  return 0;
}
