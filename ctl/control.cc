#include "ctl/control.h"

#include <arpa/inet.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "afxdp_channels/channel.h"
#include "afxdp_channels/engine.h"
#include "common/errno_status.h"
#include "common/ipv4.h"
#include "ctl/controller.h"
#include "ctl/metrics.h"
#include "policies/net_scheduler.h"
#include "vns_lib/vns.h"

namespace netch::ctl {
namespace {

using json = nlohmann::json;

sockaddr_un Address(const std::string& name, socklen_t* len) {
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  a.sun_path[0] = '\0';  // abstract: scoped to the network namespace, no file to clean up
  std::memcpy(a.sun_path + 1, name.data(), std::min(name.size(), sizeof(a.sun_path) - 2));
  *len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name.size());
  return a;
}

std::string Err(const std::string& msg) { return json{{"ok", false}, {"error", msg}}.dump(); }
std::string Ok(const json& data) { return json{{"ok", true}, {"data", data}}.dump(); }

bool ParseU64(const std::string& s, uint64_t* v) { return absl::SimpleAtoi(s, v); }
// Parsed as 64 bits, then range-checked before anything narrows it.
bool ParseU32(const std::string& s, uint32_t* v, uint64_t max = UINT32_MAX) {
  uint64_t x;
  if (!absl::SimpleAtoi(s, &x) || x > max) return false;
  *v = static_cast<uint32_t>(x);
  return true;
}

}  // namespace

absl::StatusOr<std::unique_ptr<ControlServer>> ControlServer::Start(const std::string& name,
                                                                    vns::Stack* stack,
                                                                    Controller* c) {
  std::unique_ptr<ControlServer> s(new ControlServer(stack, c));
  s->fd_ = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (s->fd_ < 0) return ErrnoStatus(errno, "control socket");
  socklen_t len;
  sockaddr_un a = Address(name, &len);
  if (bind(s->fd_, reinterpret_cast<sockaddr*>(&a), len) != 0)
    return ErrnoStatus(errno, "bind control socket @" + name +
                                  " (another stack with this "
                                  "instance name in this network namespace?)");
  if (listen(s->fd_, 16) != 0) return ErrnoStatus(errno, "listen on the control socket");
  s->wake_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  s->thread_ = std::thread([p = s.get()] { p->Loop(); });
  return s;
}

ControlServer::~ControlServer() {
  stop_ = true;
  uint64_t one = 1;
  if (wake_fd_ >= 0) (void)!write(wake_fd_, &one, sizeof(one));
  if (thread_.joinable()) thread_.join();
  if (fd_ >= 0) close(fd_);
  if (wake_fd_ >= 0) close(wake_fd_);
}

void ControlServer::Loop() {
  while (!stop_) {
    pollfd p[2] = {{fd_, POLLIN, 0}, {wake_fd_, POLLIN, 0}};
    if (poll(p, 2, 1000) <= 0 || !(p[0].revents & POLLIN)) continue;
    const int c = accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (c < 0) continue;
    std::string answer;
    ucred cred{};
    socklen_t clen = sizeof(cred);
    if (getsockopt(c, SOL_SOCKET, SO_PEERCRED, &cred, &clen) != 0 ||
        (cred.uid != 0 && cred.uid != getuid())) {
      answer = Err("permission denied: only root or the stack's user may control it");
    } else {
      // One request line, bounded in size and in time: one deadline for the whole request, not
      // per read (a client trickling a byte a second must not hold this single-threaded loop).
      const uint64_t deadline = chan::NowUs() + 2'000'000;
      std::string line;
      char buf[4096];
      while (line.find('\n') == std::string::npos && line.size() < 65536) {
        const uint64_t now = chan::NowUs();
        if (now >= deadline) break;
        pollfd rp{c, POLLIN, 0};
        if (poll(&rp, 1, static_cast<int>((deadline - now) / 1000) + 1) <= 0) break;
        const ssize_t n = recv(c, buf, sizeof(buf), MSG_DONTWAIT);
        if (n <= 0 && !(n < 0 && errno == EAGAIN)) break;
        if (n > 0) line.append(buf, static_cast<size_t>(n));
      }
      if (line.find('\n') == std::string::npos) {
        answer = Err("malformed request: expected one tab-separated line");
      } else {
        line.resize(line.find('\n'));
        answer = Handle(absl::StrSplit(line, '\t', absl::SkipEmpty()));
      }
    }
    answer += '\n';
    // A client that does not read its answer must not stall the loop either.
    timeval send_tv{2, 0};
    setsockopt(c, SOL_SOCKET, SO_SNDTIMEO, &send_tv, sizeof(send_tv));
    (void)!send(c, answer.data(), answer.size(), MSG_NOSIGNAL);
    close(c);
  }
}

std::string ControlServer::Handle(const std::vector<std::string>& a) {
  if (a.empty()) return Err("empty request");
  const std::string& cmd = a[0];
  chan::Driver& d = stack_->driver();
  if (cmd == "status") {
    const ControllerStatus s = ctl_->status();
    json engines = json::array();
    for (const auto& e : d.Engines())
      engines.push_back({{"index", e.index},
                         {"core", e.core},
                         {"tid", e.tid},
                         {"busy_ns", e.busy_ns},
                         {"wakeups", e.wakeups},
                         {"inline_rounds", e.inline_rounds},
                         {"loan_rounds", e.loan_rounds}});
    return Ok({{"instance", s.instance},
               {"pid", s.pid},
               {"ifname", s.ifname},
               {"driver", std::string(d.name())},
               {"attach_mode", s.attach_mode},
               {"pin_dir", s.pin_dir},
               {"metrics_address", s.metrics_address},
               {"recovered", s.recovered},
               {"warnings", s.warnings},
               {"channels", d.Channels().size()},
               {"sockets", stack_->Sockets().size()},
               {"copy_workers", stack_->copy_workers()},
               {"policy", stack_->Policy().name},
               {"engines", engines}});
  }
  if (cmd == "channels") {
    json out = json::array();
    for (const auto& ch : d.Channels()) {
      const chan::ChannelStats st = ch->stats();
      int core = -1;
      for (const auto& e : d.Engines())
        if (e.index == st.engine) core = e.core;
      out.push_back({{"id", ch->id()},
                     {"peer", Ipv4String(ch->peer_ipv4())},
                     {"state", std::string(chan::StateName(st.state))},
                     {"engine", st.engine},
                     {"core", core},
                     {"queue", st.queue},
                     {"tx_bytes", st.tx_bytes},
                     {"rx_bytes", st.rx_bytes},
                     {"tx_queued_bytes", st.tx_queued_bytes},
                     {"rx_queued_bytes", st.rx_queued_bytes},
                     {"send_window_bytes", st.send_window_bytes},
                     {"cwnd_packets", st.cwnd_packets},
                     {"srtt_us", st.srtt_us},
                     {"retransmits", st.retransmits},
                     {"timeouts", st.timeouts},
                     {"spurious_timeouts", st.spurious_timeouts}});
    }
    return Ok(out);
  }
  if (cmd == "sockets") {
    json out = json::array();
    for (const auto& s : stack_->Sockets()) {
      out.push_back({{"id", s.id},
                     {"listening", s.listening},
                     {"local_port", s.local_port},
                     {"remote", s.listening ? "" : Ipv4String(s.remote_ipv4)},
                     {"remote_port", s.remote_port},
                     {"class", vns::AppClassName(s.app_class)},
                     {"tx_bytes", s.tx_bytes},
                     {"rx_bytes", s.rx_bytes},
                     {"channels", s.channels}});
    }
    return Ok(out);
  }
  if (cmd == "socket-explain") {  // socket-explain ID: one socket and why its bytes go where
    uint64_t id;
    if (a.size() != 2 || !ParseU64(a[1], &id)) return Err("usage: sockets --explain ID");
    std::optional<vns::SocketInfo> si;
    for (auto& s : stack_->Sockets())
      if (s.id == id) si = s;
    if (!si) return Err(absl::StrFormat("no socket %u (netchctl sockets lists them)", id));
    if (si->listening) return Err(absl::StrFormat("socket %u listens: it sends nothing", id));
    const vns::PolicyInfo pol = stack_->Policy();
    json knobs = json::object();
    for (const auto& [k, v] : pol.knobs) knobs[k] = v;
    json chans = json::array();
    const auto engines = d.Engines();
    for (const auto& ch : d.Channels()) {
      if (ch->peer_ipv4() != si->remote_ipv4) continue;
      const chan::ChannelStats st = ch->stats();
      int core = -1;
      for (const auto& e : engines)
        if (e.index == st.engine) core = e.core;
      uint64_t batches = 0;
      for (const auto& [cid, n] : si->batches_by_channel)
        if (cid == ch->id()) batches = n;
      const bool mapped =
          si->channels.empty() ||
          std::find(si->channels.begin(), si->channels.end(), ch->id()) != si->channels.end();
      chans.push_back({{"id", ch->id()},
                       {"state", std::string(chan::StateName(st.state))},
                       {"usable", mapped && (st.state == chan::ChannelState::kUp)},
                       {"engine", st.engine},
                       {"core", core},
                       {"queue", st.queue},
                       {"tx_queued_bytes", st.tx_queued_bytes},
                       {"srtt_us", st.srtt_us},
                       {"batches", batches}});
    }
    std::string why =
        absl::StrFormat("a %s socket; policy %s sends each batch of up to 32 segments on %s; ",
                        vns::AppClassName(si->app_class), pol.name, pol.explain);
    why += si->channels.empty()
               ? "it may use every live channel to its peer"
               : "netchctl map restricts it to channels " + absl::StrJoin(si->channels, ",");
    return Ok({{"socket", id},
               {"class", vns::AppClassName(si->app_class)},
               {"remote", Ipv4String(si->remote_ipv4)},
               {"remote_port", si->remote_port},
               {"tx_bytes", si->tx_bytes},
               {"policy", {{"name", pol.name}, {"knobs", knobs}}},
               {"channels", chans},
               {"batches_on_other_channels", si->batches_other},
               {"why", why}});
  }
  if (cmd == "map-socket") {  // map-socket ID A,B,...
    uint64_t id;
    if (a.size() != 3 || !ParseU64(a[1], &id)) return Err("usage: map socket ID --channels A,B");
    std::vector<uint32_t> ids;
    for (absl::string_view p : absl::StrSplit(a[2], ',', absl::SkipEmpty())) {
      uint32_t v;
      if (!absl::SimpleAtoi(p, &v)) return Err("bad channel id '" + std::string(p) + "'");
      ids.push_back(v);
    }
    if (ids.empty()) return Err("--channels needs at least one channel id");
    if (auto st = stack_->MapSocket(id, ids); !st.ok()) return Err(std::string(st.message()));
    return Ok({{"socket", id}, {"channels", ids}});
  }
  if (cmd == "scale-peer") {  // scale-peer IPV4 N
    in_addr ip{};
    uint32_t n;
    if (a.size() != 3 || inet_pton(AF_INET, a[1].c_str(), &ip) != 1 || !ParseU32(a[2], &n, 64))
      return Err("usage: scale peer IPV4 --channels N (1..64)");
    if (auto st = stack_->SetPeerChannels(ntohl(ip.s_addr), static_cast<int>(n)); !st.ok())
      return Err(std::string(st.message()));
    return Ok({{"peer", a[1]}, {"channels", n}});
  }
  if (cmd == "pin-channel") {  // pin-channel ID CORE
    uint32_t id, core;
    if (a.size() != 3 || !ParseU32(a[1], &id) || !ParseU32(a[2], &core, INT32_MAX))
      return Err("usage: pin channel ID --core N (ID < 2^32, N a core number)");
    int engine = -1;
    std::vector<int> cores;
    for (const auto& e : d.Engines()) {
      cores.push_back(e.core);
      if (e.core == static_cast<int>(core)) engine = e.index;
    }
    if (engine < 0) {
      std::string list;
      for (int c : cores) list += (list.empty() ? "" : ",") + std::to_string(c);
      return Err(absl::StrFormat("no engine runs on core %u (engine cores: %s)", core, list));
    }
    if (auto st = d.MoveChannel(id, engine); !st.ok()) return Err(std::string(st.message()));
    return Ok({{"channel", id}, {"core", core}, {"engine", engine}});
  }
  if (cmd == "policy-show") {
    const vns::PolicyInfo p = stack_->Policy();
    json knobs = json::object();
    for (const auto& [k, v] : p.knobs) knobs[k] = v;
    return Ok({{"name", p.name}, {"knobs", knobs}});
  }
  if (cmd == "policy-list") {  // every registered policy: knobs (the active one's values)
    const vns::PolicyInfo active = stack_->Policy();
    json out = json::array();
    for (const std::string& name : sched::PolicyNames()) {
      json knobs = json::object();
      if (name == active.name) {
        for (const auto& [k, v] : active.knobs) knobs[k] = v;
      } else if (auto p = sched::CreatePolicy(name); p.ok()) {
        for (const auto& [k, v] : (*p)->GetKnobs()) knobs[k] = v;
      }
      std::string explain = active.explain;
      if (name != active.name)
        if (auto p = sched::CreatePolicy(name); p.ok()) explain = (*p)->Explain();
      out.push_back({{"name", name},
                     {"active", name == active.name},
                     {"knobs", knobs},
                     {"explain", explain}});
    }
    return Ok(out);
  }
  if (cmd == "policy-set") {  // policy-set NAME k=v...
    if (a.size() < 2) return Err("usage: policy set NAME [key=value...]");
    std::vector<std::pair<std::string, std::string>> knobs;
    for (size_t i = 2; i < a.size(); ++i) {
      const auto eq = a[i].find('=');
      if (eq == std::string::npos || eq == 0) return Err("knob '" + a[i] + "' is not key=value");
      knobs.emplace_back(a[i].substr(0, eq), a[i].substr(eq + 1));
    }
    if (auto st = stack_->SetPolicy(a[1], knobs); !st.ok()) return Err(std::string(st.message()));
    return Handle({"policy-show"});
  }
  if (cmd == "copy-workers") {
    uint64_t n;
    if (a.size() != 2 || !ParseU64(a[1], &n)) return Err("usage: copy-workers N");
    if (auto st = stack_->SetCopyWorkers(static_cast<int>(std::min<uint64_t>(n, 1000))); !st.ok())
      return Err(std::string(st.message()));
    return Ok({{"copy_workers", stack_->copy_workers()}});
  }
  if (cmd == "fault-drop") {  // fault-drop PPM [CHANNEL]
    uint32_t ppm, id = 0;
    if (a.size() < 2 || a.size() > 3 || !ParseU32(a[1], &ppm, NC_PPM) ||
        (a.size() == 3 && !ParseU32(a[2], &id)))
      return Err("usage: fault drop PPM [--channel ID]: ppm is 0..1000000, ID < 2^32");
    bpf::SteerProgram* steer = ctl_->steer();
    absl::Status st =
        a.size() == 3 ? steer->SetChannelDropPpm(id, ppm) : steer->SetGlobalDropPpm(ppm);
    if (!st.ok()) return Err(std::string(st.message()));
    return Ok({{"drop_ppm", ppm}, {"channel", a.size() == 3 ? json(id) : json("all")}});
  }
  if (cmd == "metrics") return Ok(MetricsText(*stack_, *ctl_));
  return Err("unknown command '" + cmd + "'");
}

absl::StatusOr<std::string> Request(const std::string& instance,
                                    const std::vector<std::string>& args) {
  const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return ErrnoStatus(errno, "socket");
  socklen_t len;
  sockaddr_un a = Address(Controller::SocketName(instance), &len);
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), len) != 0) {
    const int err = errno;
    close(fd);
    if (err == ECONNREFUSED || err == ENOENT)
      return absl::NotFoundError(
          absl::StrFormat("no netch instance '%s' in this network namespace", instance));
    return ErrnoStatus(err, "connect to instance " + instance);
  }
  // Anyone in the namespace can bind an abstract socket name: trust the answer only from root or
  // our own user (the stack's side checks us the same way).
  ucred cred{};
  socklen_t clen = sizeof(cred);
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &clen) != 0 ||
      (cred.uid != 0 && cred.uid != geteuid())) {
    close(fd);
    return absl::PermissionDeniedError(absl::StrFormat(
        "the control socket of '%s' is served by uid %u, neither root nor us: not trusting it",
        instance, cred.uid));
  }
  timeval tv{5, 0};  // a stack that never answers must not hang netchctl
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  std::string line;
  for (size_t i = 0; i < args.size(); ++i) line += (i ? "\t" : "") + args[i];
  line += '\n';
  // MSG_NOSIGNAL: a stack that closes early must give an error, not kill netchctl by SIGPIPE.
  (void)!send(fd, line.data(), line.size(), MSG_NOSIGNAL);
  std::string out;
  char buf[65536];
  for (ssize_t n; (n = read(fd, buf, sizeof(buf))) > 0;) out.append(buf, static_cast<size_t>(n));
  close(fd);
  if (out.empty()) return absl::UnavailableError("the stack closed the control socket");
  return out;
}

std::vector<std::string> ListInstances() {
  std::vector<std::string> out;
  std::ifstream f("/proc/net/unix");
  std::string line;
  const std::string prefix = "@netch/";
  while (std::getline(f, line)) {
    const auto pos = line.find(prefix);
    if (pos == std::string::npos) continue;
    // Listening sockets only (state 01 = unconnected, flags 00010000 = __SO_ACCEPTCON).
    if (line.find(" 00010000 ") == std::string::npos) continue;
    std::string name = line.substr(pos + prefix.size());
    while (!name.empty() && isspace(static_cast<unsigned char>(name.back()))) name.pop_back();
    if (std::find(out.begin(), out.end(), name) == out.end()) out.push_back(name);
  }
  return out;
}

}  // namespace netch::ctl
