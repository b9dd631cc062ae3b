#include "bpf/steer_program.h"

#include <arpa/inet.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <endian.h>
#include <linux/if_link.h>

#include <cerrno>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "bpf/steer.skel.h"
#include "bpf/wire.h"
#include "common/errno_status.h"

namespace netch::bpf {
namespace {

int QuietLibbpf(libbpf_print_level level, const char* fmt, va_list args) {
  // Warnings and the verifier log matter; libbpf's debug chatter does not.
  if (level == LIBBPF_DEBUG) return 0;
  return vfprintf(stderr, fmt, args);
}

}  // namespace

absl::StatusOr<std::unique_ptr<SteerProgram>> SteerProgram::Load(uint16_t udp_port) {
  libbpf_set_print(QuietLibbpf);
  std::unique_ptr<SteerProgram> p(new SteerProgram());
  p->skel_ = steer_bpf__open();
  if (!p->skel_) return ErrnoStatus(errno, "open embedded steer.bpf.o");
  if (int err = steer_bpf__load(p->skel_))
    return ErrnoStatus(err, "load steer.bpf.o into the kernel");
  nc_config c{};
  c.udp_port = htons(udp_port);
  c.generation = 1;
  if (auto s = p->UpdateConfig(c); !s.ok()) return s;
  return p;
}

SteerProgram::~SteerProgram() {
  (void)Detach();
  if (skel_) steer_bpf__destroy(skel_);
}

int SteerProgram::prog_fd() const { return bpf_program__fd(skel_->progs.nc_steer); }
int SteerProgram::config_fd() const { return bpf_map__fd(skel_->maps.nc_config); }
int SteerProgram::channels_fd() const { return bpf_map__fd(skel_->maps.nc_channels); }
int SteerProgram::xsks_fd() const { return bpf_map__fd(skel_->maps.nc_xsks); }
int SteerProgram::counters_fd() const { return bpf_map__fd(skel_->maps.nc_counters); }
int SteerProgram::chan_stats_fd() const { return bpf_map__fd(skel_->maps.nc_chan_stats); }

absl::Status SteerProgram::Attach(int ifindex, AttachMode mode, bool replace) {
  if (ifindex_ != 0) return absl::FailedPreconditionError("already attached");
  uint32_t flags = mode == AttachMode::kNative ? XDP_FLAGS_DRV_MODE : XDP_FLAGS_SKB_MODE;
  if (!replace) flags |= XDP_FLAGS_UPDATE_IF_NOEXIST;
  int err = bpf_xdp_attach(ifindex, prog_fd(), flags, nullptr);
  if (err == -EBUSY || err == -EEXIST)
    return absl::FailedPreconditionError(absl::StrFormat(
        "another XDP program is attached to ifindex %d (pass replace to take it over)", ifindex));
  if (err) return ErrnoStatus(err, absl::StrFormat("attach XDP to ifindex %d", ifindex));
  ifindex_ = ifindex;
  attach_flags_ = flags & (XDP_FLAGS_DRV_MODE | XDP_FLAGS_SKB_MODE);
  AttachTc();
  return absl::OkStatus();
}

void SteerProgram::AttachTc() {
  bpf_tc_hook hook{};
  hook.sz = sizeof(hook);
  hook.ifindex = ifindex_;
  hook.attach_point = BPF_TC_EGRESS;
  // An existing clsact qdisc is fine (EEXIST); libbpf would print the kernel's complaint.
  libbpf_set_print(nullptr);
  int err = bpf_tc_hook_create(&hook);
  libbpf_set_print(QuietLibbpf);
  if (err && err != -EEXIST) {
    std::fprintf(stderr, "netch: tc egress hook on ifindex %d: %s (kernel-UDP transmit off)\n",
                 ifindex_, std::strerror(-err));
    return;
  }
  bpf_tc_opts o{};
  o.sz = sizeof(o);
  o.prog_fd = bpf_program__fd(skel_->progs.nc_txq);
  o.handle = kTcHandle;
  o.priority = kTcPriority;
  o.flags = BPF_TC_F_REPLACE;
  err = bpf_tc_attach(&hook, &o);
  if (err) {
    std::fprintf(stderr, "netch: tc egress attach on ifindex %d: %s (kernel-UDP transmit off)\n",
                 ifindex_, std::strerror(-err));
    return;
  }
  tc_attached_ = true;
}

void SteerProgram::DetachTc() {
  if (!tc_attached_) return;
  tc_attached_ = false;
  bpf_tc_hook hook{};
  hook.sz = sizeof(hook);
  hook.ifindex = ifindex_;
  hook.attach_point = BPF_TC_EGRESS;
  bpf_tc_opts o{};
  o.sz = sizeof(o);
  o.handle = kTcHandle;
  o.priority = kTcPriority;
  // Only our filter goes; an empty clsact qdisc is harmless and may be someone else's.
  (void)bpf_tc_detach(&hook, &o);  // the interface may already be gone
}

absl::Status SteerProgram::Detach() {
  if (ifindex_ == 0) return absl::OkStatus();
  DetachTc();
  // XDP_FLAGS_REPLACE with old_prog_fd: detach only if the program there is still ours.
  bpf_xdp_attach_opts opts{};
  opts.sz = sizeof(opts);
  opts.old_prog_fd = prog_fd();
  int err = bpf_xdp_detach(ifindex_, attach_flags_ | XDP_FLAGS_REPLACE, &opts);
  int ifindex = ifindex_;
  ifindex_ = 0;
  // ENODEV: the interface (or its namespace) is already gone, which detached us too.
  if (err && err != -ENODEV && err != -EEXIST)
    return ErrnoStatus(err, absl::StrFormat("detach XDP from ifindex %d", ifindex));
  return absl::OkStatus();
}

absl::Status SteerProgram::UpdateConfig(const nc_config& c) {
  uint32_t key = 0;
  if (bpf_map_update_elem(config_fd(), &key, &c, BPF_ANY))
    return ErrnoStatus(errno, "update nc_config");
  return absl::OkStatus();
}

absl::StatusOr<nc_config> SteerProgram::ReadConfig() const {
  uint32_t key = 0;
  nc_config c{};
  if (bpf_map_lookup_elem(config_fd(), &key, &c)) return ErrnoStatus(errno, "read nc_config");
  return c;
}

absl::Status SteerProgram::SetUdpPort(uint16_t port) {
  auto c = ReadConfig();
  if (!c.ok()) return c.status();
  c->udp_port = htons(port);
  c->generation++;
  return UpdateConfig(*c);
}

absl::Status SteerProgram::SetCeMarkPpm(uint32_t ppm) {
  if (ppm > NC_PPM) return absl::InvalidArgumentError("ce ppm must be <= 1000000");
  auto c = ReadConfig();
  if (!c.ok()) return c.status();
  c->ce_ppm = ppm;
  c->generation++;
  return UpdateConfig(*c);
}

absl::Status SteerProgram::SetTcpFaultPort(uint16_t port) {
  auto c = ReadConfig();
  if (!c.ok()) return c.status();
  c->tcp_fault_port = htons(port);
  c->generation++;
  return UpdateConfig(*c);
}

absl::Status SteerProgram::SetGlobalDropPpm(uint32_t ppm) {
  if (ppm > NC_PPM) return absl::InvalidArgumentError("drop ppm must be <= 1000000");
  auto c = ReadConfig();
  if (!c.ok()) return c.status();
  c->drop_ppm = ppm;
  c->generation++;
  return UpdateConfig(*c);
}

absl::Status SteerProgram::SetChannel(uint32_t id, uint32_t queue, uint32_t xsk_slot,
                                      uint64_t token, uint32_t drop_ppm) {
  if (id == NC_CHAN_UNASSIGNED || id >= NC_MAX_CHANNELS)
    return absl::InvalidArgumentError(
        absl::StrFormat("channel id %u out of range 1..%u", id, NC_MAX_CHANNELS - 1));
  if (xsk_slot >= NC_MAX_XSKS) return absl::InvalidArgumentError("xsk slot out of range");
  if (drop_ppm > NC_PPM) return absl::InvalidArgumentError("drop ppm must be <= 1000000");
  nc_chan_steer v{NC_STEER_ACTIVE, queue, xsk_slot, drop_ppm, htobe64(token)};
  if (bpf_map_update_elem(channels_fd(), &id, &v, BPF_ANY))
    return ErrnoStatus(errno, "update nc_channels");
  return absl::OkStatus();
}

absl::Status SteerProgram::SetChannelDropPpm(uint32_t id, uint32_t ppm) {
  if (id == NC_CHAN_UNASSIGNED || id >= NC_MAX_CHANNELS)
    return absl::InvalidArgumentError(absl::StrFormat("no channel %u", id));
  if (ppm > NC_PPM) return absl::InvalidArgumentError("drop ppm must be <= 1000000");
  nc_chan_steer v{};
  if (bpf_map_lookup_elem(channels_fd(), &id, &v)) return ErrnoStatus(errno, "read nc_channels");
  if (!(v.flags & NC_STEER_ACTIVE))
    return absl::NotFoundError(absl::StrFormat("channel %u is not active on this host", id));
  v.drop_ppm = ppm;
  if (bpf_map_update_elem(channels_fd(), &id, &v, BPF_EXIST))
    return ErrnoStatus(errno, "update nc_channels");
  return absl::OkStatus();
}

absl::Status SteerProgram::Pin(const std::string& dir) {
  struct {
    bpf_map* map;
    const char* name;
  } maps[] = {{skel_->maps.nc_config, "nc_config"},
              {skel_->maps.nc_channels, "nc_channels"},
              {skel_->maps.nc_xsks, "nc_xsks"},
              {skel_->maps.nc_counters, "nc_counters"},
              {skel_->maps.nc_chan_stats, "nc_chan_stats"}};
  for (const auto& m : maps) {
    const std::string path = dir + "/" + m.name;
    if (int err = bpf_map__pin(m.map, path.c_str())) return ErrnoStatus(err, "pin " + path);
  }
  const std::string prog = dir + "/nc_steer";
  if (int err = bpf_program__pin(skel_->progs.nc_steer, prog.c_str()))
    return ErrnoStatus(err, "pin " + prog);
  return absl::OkStatus();
}

absl::Status SteerProgram::ClearChannel(uint32_t id) {
  if (id >= NC_MAX_CHANNELS) return absl::InvalidArgumentError("channel id out of range");
  nc_chan_steer v{};
  if (bpf_map_update_elem(channels_fd(), &id, &v, BPF_ANY))
    return ErrnoStatus(errno, "clear nc_channels");
  return absl::OkStatus();
}

absl::StatusOr<nc_chan_steer> SteerProgram::ReadChannel(uint32_t id) const {
  if (id >= NC_MAX_CHANNELS) return absl::InvalidArgumentError("channel id out of range");
  nc_chan_steer v{};
  if (bpf_map_lookup_elem(channels_fd(), &id, &v)) return ErrnoStatus(errno, "read nc_channels");
  return v;
}

absl::Status SteerProgram::SetXsk(uint32_t slot, int xsk_fd) {
  if (bpf_map_update_elem(xsks_fd(), &slot, &xsk_fd, BPF_ANY))
    return ErrnoStatus(errno, "update nc_xsks");
  return absl::OkStatus();
}

absl::Status SteerProgram::ClearXsk(uint32_t slot) {
  if (bpf_map_delete_elem(xsks_fd(), &slot) && errno != ENOENT)
    return ErrnoStatus(errno, "clear nc_xsks");
  return absl::OkStatus();
}

absl::StatusOr<Counters> SteerProgram::ReadCounters() const {
  const int ncpu = libbpf_num_possible_cpus();
  if (ncpu <= 0) return ErrnoStatus(ncpu, "count possible cpus");
  std::vector<uint64_t> percpu(ncpu);
  Counters out{};
  for (uint32_t i = 0; i < NC_CNT_MAX; ++i) {
    if (bpf_map_lookup_elem(counters_fd(), &i, percpu.data()))
      return ErrnoStatus(errno, "read nc_counters");
    for (uint64_t v : percpu) out[i] += v;
  }
  return out;
}

absl::StatusOr<nc_chan_stats> SteerProgram::ReadChanStats(uint32_t id) const {
  const int ncpu = libbpf_num_possible_cpus();
  if (ncpu <= 0) return ErrnoStatus(ncpu, "count possible cpus");
  std::vector<nc_chan_stats> percpu(ncpu);
  if (bpf_map_lookup_elem(chan_stats_fd(), &id, percpu.data()))
    return ErrnoStatus(errno, "read nc_chan_stats");
  nc_chan_stats out{};
  for (const auto& s : percpu) {
    out.rx_packets += s.rx_packets;
    out.rx_bytes += s.rx_bytes;
    out.fault_drops += s.fault_drops;
    out.ce_marked += s.ce_marked;
    out.wrong_queue += s.wrong_queue;
  }
  return out;
}

std::string FormatCounters(const Counters& c) {
  std::string out;
  for (int i = 0; i < NC_CNT_MAX; ++i) {
    if (c[i] == 0) continue;
    absl::StrAppendFormat(&out, "  %-22s %llu\n", wire::CounterName(static_cast<nc_counter>(i)),
                          static_cast<unsigned long long>(c[i]));
  }
  return out.empty() ? "  (no packets seen)\n" : out;
}

}  // namespace netch::bpf
