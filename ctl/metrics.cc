#include "ctl/metrics.h"

#include <arpa/inet.h>
#include <prometheus/collectable.h>
#include <prometheus/exposer.h>
#include <prometheus/metric_family.h>
#include <prometheus/text_serializer.h>

#include <exception>

#include "absl/strings/str_format.h"
#include "afxdp_channels/channel.h"
#include "bpf/wire.h"
#include "common/ipv4.h"
#include "ctl/controller.h"
#include "vns_lib/vns.h"

namespace netch::ctl {
namespace {

using prometheus::ClientMetric;
using prometheus::MetricFamily;
using prometheus::MetricType;

using Labels = std::vector<ClientMetric::Label>;

struct Builder {
  std::vector<MetricFamily> fams;
  MetricFamily& Family(const std::string& name, const std::string& help, MetricType t) {
    for (auto& f : fams)
      if (f.name == name) return f;
    fams.push_back({name, help, t, {}});
    return fams.back();
  }
  void Counter(const std::string& name, const std::string& help, double v, Labels l = {}) {
    ClientMetric m;
    m.label = std::move(l);
    m.counter.value = v;
    Family(name, help, MetricType::Counter).metric.push_back(m);
  }
  void Gauge(const std::string& name, const std::string& help, double v, Labels l = {}) {
    ClientMetric m;
    m.label = std::move(l);
    m.gauge.value = v;
    Family(name, help, MetricType::Gauge).metric.push_back(m);
  }
};

class Collector final : public prometheus::Collectable {
 public:
  Collector(vns::Stack* s, Controller* c) : stack_(s), ctl_(c) {}
  std::vector<MetricFamily> Collect() const override { return CollectMetrics(*stack_, *ctl_); }

 private:
  vns::Stack* stack_;
  Controller* ctl_;
};

}  // namespace

std::vector<MetricFamily> CollectMetrics(vns::Stack& stack, Controller& ctl) {
  Builder b;
  // XDP program: every packet it saw, by verdict (summed over CPUs).
  if (auto c = ctl.steer()->ReadCounters(); c.ok()) {
    for (int i = 0; i < NC_CNT_MAX; ++i) {
      b.Counter("netch_xdp_packets_total",
                "Packets seen by the XDP steering program, by verdict (pass_*, redirect, drop_*).",
                static_cast<double>((*c)[i]),
                {{"verdict", std::string(wire::CounterName(static_cast<nc_counter>(i)))}});
    }
  }
  chan::Driver& d = stack.driver();
  const chan::DriverStats ds = d.Stats();
  // The driver's plain counters: name, help, value.
  const struct {
    const char* name;
    const char* help;
    uint64_t value;
  } counters[] = {
      {"netch_driver_rx_frames_total", "Frames (AF_XDP) or records (TCP) the driver received.",
       ds.rx_frames},
      {"netch_driver_rx_malformed_total", "Received frames that failed the driver's checks.",
       ds.rx_malformed},
      {"netch_driver_rx_unknown_channel_total",
       "Received frames for no channel of ours or from the wrong peer.", ds.rx_unknown_chan},
      {"netch_driver_rx_bad_token_total",
       "Frames for a channel of ours without its token, or RST/FIN outside the window.",
       ds.rx_bad_token},
      {"netch_xsk_rx_dropped_total", "XDP_STATISTICS rx_dropped, summed over the sockets.",
       ds.xsk_rx_dropped},
      {"netch_xsk_rx_ring_full_total", "XDP_STATISTICS rx_ring_full.", ds.xsk_rx_ring_full},
      {"netch_xsk_fill_ring_empty_total", "XDP_STATISTICS rx_fill_ring_empty_descs.",
       ds.xsk_fill_ring_empty},
      {"netch_xsk_tx_ring_empty_total", "XDP_STATISTICS tx_ring_empty_descs.",
       ds.xsk_tx_ring_empty},
      {"netch_fill_ring_deepened_total",
       "Times a fill ring went from its shallow depth to its deep one (a burst arrived).",
       ds.fill_deepened},
      {"netch_udp_tx_packets_total", "Packets sent through the kernel's UDP socket.",
       ds.udp_tx_packets},
      {"netch_udp_gso_trains_total",
       "UDP_SEGMENT trains of several packets (one sendmsg, cut by the kernel).",
       ds.udp_gso_trains},
      {"netch_udp_tx_errors_total",
       "Packets the UDP socket refused (resent by the transport as lost).", ds.udp_tx_errors},
      {"netch_rx_multi_buffer_total",
       "Frames received as a chain of UMEM frames (XDP_USE_SG), e.g. 64 KB segments.",
       ds.rx_multi_buffer},
  };
  for (const auto& c : counters) b.Counter(c.name, c.help, static_cast<double>(c.value));
  b.Gauge("netch_driver_tx_udp",
          "1 when DATA leaves through the kernel's UDP socket (tx udp), 0 for AF_XDP TX.",
          ds.tx_udp ? 1.0 : 0.0);
  b.Gauge("netch_driver_afxdp_tx_queues",
          "With tx udp: queues [0, n) that transmit through AF_XDP all the same (latency queues).",
          static_cast<double>(ds.afxdp_tx_queues));
  b.Counter("netch_driver_handshakes_total", "Channel handshakes by outcome.",
            static_cast<double>(ds.handshakes_rx), {{"result", "syn_answered"}});
  b.Counter("netch_driver_handshakes_total", "Channel handshakes by outcome.",
            static_cast<double>(ds.handshakes_bad), {{"result", "bad_cookie_or_mismatch"}});
  b.Counter("netch_driver_handshakes_total", "Channel handshakes by outcome.",
            static_cast<double>(ds.handshakes_dropped),
            {{"result", "dropped_over_cap_or_timeout"}});
  b.Gauge("netch_driver_handshakes_pending",
          "Kernel-TCP connections accepted and waiting for their hello (no buffers yet).",
          static_cast<double>(ds.handshakes_pending));
  b.Counter("netch_driver_channels_reaped_total",
            "Failed or closed channels whose ids and buffers were reclaimed.",
            static_cast<double>(ds.channels_reaped));
  for (size_t i = 1; i < chan::kFailCauses; ++i) {
    b.Counter("netch_driver_channels_failed_total",
              "Channels that failed, by cause (reset, peer_silent, peer_restarted, ...).",
              static_cast<double>(ds.channels_failed[i]),
              {{"cause", std::string(chan::FailCauseName(static_cast<chan::FailCause>(i)))}});
  }
  b.Gauge("netch_driver_channels", "Channels the driver holds now (any state).",
          static_cast<double>(d.Channels().size()));
  b.Gauge("netch_umem_frames", "UMEM frames by where they are.",
          static_cast<double>(ds.frames_free), {{"state", "free"}});
  b.Gauge("netch_umem_frames", "UMEM frames by where they are.",
          static_cast<double>(ds.frames_in_fill), {{"state", "fill_ring"}});
  b.Gauge("netch_umem_frames", "UMEM frames by where they are.",
          static_cast<double>(ds.frames_total - ds.frames_free - ds.frames_in_fill),
          {{"state", "in_use"}});
  b.Gauge("netch_fill_ring_target_frames",
          "The depth the fill rings are kept at now, summed: shallow after a quiet second, deep "
          "while bursts arrive.",
          static_cast<double>(ds.fill_target));

  const auto engines = d.Engines();
  for (const auto& e : engines) {
    Labels l{{"engine", std::to_string(e.index)}, {"core", std::to_string(e.core)}};
    b.Counter("netch_engine_busy_seconds_total", "Time engine threads spent doing work.",
              static_cast<double>(e.busy_ns) / 1e9, l);
    b.Counter("netch_engine_sleeps_total", "Times an engine went to sleep (adaptive polling).",
              static_cast<double>(e.wakeups), l);
    b.Counter("netch_engine_inline_rounds_total",
              "Times a sending application thread ran a sleeping engine's round itself instead "
              "of waking it (StackOptions::transmit_inline).",
              static_cast<double>(e.inline_rounds), l);
    b.Counter("netch_engine_loan_rounds_total",
              "Times a blocked receiving application thread, woken by the engine's input it had "
              "borrowed, ran the engine's round itself (StackOptions::receive_inline).",
              static_cast<double>(e.loan_rounds), l);
  }
  for (const auto& ch : d.Channels()) {
    const chan::ChannelStats s = ch->stats();
    int core = -1;
    for (const auto& e : engines)
      if (e.index == s.engine) core = e.core;
    Labels l{{"channel", std::to_string(ch->id())}, {"peer", Ipv4String(ch->peer_ipv4())}};
    b.Counter("netch_channel_tx_bytes_total", "Payload bytes handed to the channel's transport.",
              static_cast<double>(s.tx_bytes), l);
    b.Counter("netch_channel_rx_bytes_total", "Payload bytes the channel delivered.",
              static_cast<double>(s.rx_bytes), l);
    b.Counter("netch_channel_tx_segments_total", "Segments handed to the transport.",
              static_cast<double>(s.tx_segments), l);
    b.Counter("netch_channel_rx_segments_total", "Segments delivered.",
              static_cast<double>(s.rx_segments), l);
    b.Counter("netch_channel_retransmits_total", "Packets transmitted again.",
              static_cast<double>(s.retransmits), l);
    b.Counter("netch_channel_timeouts_total", "Retransmission timeouts.",
              static_cast<double>(s.timeouts), l);
    b.Counter("netch_channel_spurious_timeouts_total",
              "Retransmission timeouts undone: the data had arrived, its ACKs were late.",
              static_cast<double>(s.spurious_timeouts), l);
    b.Counter("netch_channel_tail_probes_total", "Tail-loss probes (last packet resent).",
              static_cast<double>(s.tail_probes), l);
    b.Counter("netch_channel_ecn_echoes_total", "ACKs from the peer echoing CE marks (ECE).",
              static_cast<double>(s.ecn_echoes), l);
    b.Gauge("netch_channel_rtt_seconds", "Smoothed round-trip time estimate.",
            static_cast<double>(s.srtt_us) / 1e6, l);
    Labels tx = l, rx = l;
    tx.push_back({"direction", "tx"});
    rx.push_back({"direction", "rx"});
    b.Gauge("netch_channel_queued_bytes",
            "Bytes queued: tx = not yet acknowledged, rx = delivered, not yet released.",
            static_cast<double>(s.tx_queued_bytes), tx);
    b.Gauge("netch_channel_queued_bytes",
            "Bytes queued: tx = not yet acknowledged, rx = delivered, not yet released.",
            static_cast<double>(s.rx_queued_bytes), rx);
    b.Gauge("netch_channel_send_window_bytes", "What the transport may still put in flight.",
            static_cast<double>(s.send_window_bytes), l);
    b.Gauge("netch_channel_core", "CPU core of the engine thread running the channel (-1: none).",
            core, l);
    b.Gauge("netch_channel_up", "1 while the channel is up.",
            s.state == chan::ChannelState::kUp ? 1 : 0, l);
    if (auto xs = ctl.steer()->ReadChanStats(ch->id()); xs.ok()) {
      b.Counter("netch_channel_xdp_rx_packets_total", "Packets the XDP program steered to it.",
                static_cast<double>(xs->rx_packets), l);
      b.Counter("netch_channel_fault_drops_total", "Packets dropped by fault injection.",
                static_cast<double>(xs->fault_drops), l);
      b.Counter("netch_channel_ce_marked_total", "Packets the XDP program marked CE (tests).",
                static_cast<double>(xs->ce_marked), l);
      b.Counter("netch_channel_wrong_queue_total",
                "Packets for the channel dropped for arriving on another rx queue.",
                static_cast<double>(xs->wrong_queue), l);
    }
  }
  for (const auto& so : stack.Sockets()) {
    if (so.listening) continue;
    Labels l{{"socket", std::to_string(so.id)}, {"class", vns::AppClassName(so.app_class)}};
    b.Counter("netch_socket_tx_bytes_total", "Bytes the application sent on the socket.",
              static_cast<double>(so.tx_bytes), l);
    b.Counter("netch_socket_rx_bytes_total", "Bytes the application received on the socket.",
              static_cast<double>(so.rx_bytes), l);
  }
  const vns::StackStats ss = stack.Stats();
  b.Counter("netch_copy_chunks_total", "Chunks copied by copy workers.",
            static_cast<double>(ss.copy_chunks));
  b.Gauge("netch_copy_workers", "Copy worker threads.", stack.copy_workers());
  b.Counter("netch_copy_worker_busy_seconds_total", "Time copy worker threads spent copying.",
            static_cast<double>(ss.copy_busy_ns) / 1e9);
  b.Counter("netch_scheduler_decisions_total", "Channel choices for a batch of segments.",
            static_cast<double>(ss.sched_batches), {{"decision", "send"}});
  b.Counter("netch_scheduler_decisions_total", "Channel choices for a batch of segments.",
            static_cast<double>(ss.sched_skips), {{"decision", "skip_queued"}});
  b.Counter("netch_segments_inline_total",
            "Segments busy-polling sockets took on their own thread (no dispatcher hop).",
            static_cast<double>(ss.segments_inline));
  b.Counter("netch_dispatch_rounds_inline_total",
            "Dispatcher rounds run by busy-polling application threads (Stack::PollInline).",
            static_cast<double>(ss.dispatch_inline));
  b.Counter("netch_deliveries_inline_total",
            "Channel deliveries handed to their sockets on the engine's own thread (no "
            "dispatcher hop, StackOptions::deliver_inline).",
            static_cast<double>(ss.deliveries_inline));
  b.Counter("netch_dispatcher_holds_total", "Times a full socket held a channel back.",
            static_cast<double>(ss.dispatcher_blocked));
  b.Counter("netch_dispatcher_wakeups_total",
            "Sleeps of the stack's dispatcher thread, each ended by a wakeup (a busy poller's "
            "stack should cause few: chan::StandbyTimer).",
            static_cast<double>(ss.dispatcher_wakeups));
  b.Counter("netch_rst_sent_total", "RST segments sent (no listener, no such connection).",
            static_cast<double>(ss.rst_sent));
  b.Counter("netch_rx_bad_conn_id_total",
            "Segments for a live port pair with the wrong connection id: dropped.",
            static_cast<double>(ss.rx_bad_conn));
  b.Counter("netch_connections_broken_total",
            "Connections reset because a channel carrying their bytes failed.",
            static_cast<double>(ss.conns_broken));
  b.Counter("netch_rx_beyond_window_total",
            "Data segments beyond the window their socket advertised (that socket was reset).",
            static_cast<double>(ss.rx_beyond_window));
  b.Counter("netch_window_updates_total", "Receive-window updates (NC_WND) sent to peers.",
            static_cast<double>(ss.window_updates));
  b.Counter("netch_rx_pressure_copies_total",
            "Segments copied out of a channel whose buffers slow sockets held (then released).",
            static_cast<double>(ss.rx_pressure_copies));
  b.Counter("netch_channels_scaled_up_total",
            "Channels opened to peers by scaling (netchctl scale, or the policy with scale=on).",
            static_cast<double>(ss.channels_scaled_up));
  b.Counter("netch_channels_drained_total",
            "Channels scaled down: sealed on both sides (NC_DRAIN), emptied, then destroyed here.",
            static_cast<double>(ss.channels_drained));
  return b.fams;
}

std::string MetricsText(vns::Stack& stack, Controller& ctl) {
  return prometheus::TextSerializer().Serialize(CollectMetrics(stack, ctl));
}

absl::StatusOr<std::unique_ptr<MetricsExposer>> MetricsExposer::Start(const std::string& address,
                                                                      vns::Stack* stack,
                                                                      Controller* c) {
  std::unique_ptr<MetricsExposer> m(new MetricsExposer());
  try {
    m->exposer_ = std::make_unique<prometheus::Exposer>(address, 1);
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrFormat("cannot listen on %s: %s", address, e.what()));
  }
  auto collector = std::make_shared<Collector>(stack, c);
  m->exposer_->RegisterCollectable(collector);
  m->collector_ = collector;
  return m;
}

MetricsExposer::~MetricsExposer() { exposer_.reset(); }

}  // namespace netch::ctl
