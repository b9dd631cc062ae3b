// vns.h - VNS, what applications touch: virtual sockets over NetChannel channels.
//
// A Stack is the whole NetChannel stack embedded in the process: a NetDriver (AF_XDP or kernel
// TCP, with its XDP steering program for AF_XDP), the channels to each peer, a dispatcher that
// demultiplexes received segments to sockets, and the copy workers. A VirtualSocket has stream
// semantics: reliable, in order, with the socket calls a socket user knows.
//
//   auto stack = Stack::Create(opts);                    // one per process and interface
//   auto l = stack->Listen(port);   auto s = l->Accept();
//   auto c = stack->Connect(peer_ip, port);  c->Send(bytes);  c->Recv(buf);  c->Close();
//
// What a socket promises:
// * One socket's bytes may travel on several channels (segments round-robin over the peer's
//   channels); the receiver delivers them in order by the segment's 64-bit stream offset.
//   Several sockets share a channel; the NetChannel header's ports and conn id demultiplex.
// * Copies: Send copies the application's bytes straight into channel buffers (UMEM frames for
//   AF_XDP); Recv copies out of them. A large Send/Recv is cut into chunks copied in parallel by
//   the copy workers (count settable at run time); small ones are copied on the caller's thread.
// * Backpressure: a socket whose receive buffer is full stops the dispatcher draining the channel,
//   the channel's window closes, the sender's Send blocks (or returns would-block). Nothing is
//   dropped.
// * Errors are absl::Status values that carry the errno a socket user expects — Errno(status):
//   ECONNREFUSED (nobody listens), ECONNRESET (peer reset or died), ETIMEDOUT (connect timeout),
//   EAGAIN (non-blocking and nothing to do), EPIPE (send after shutdown), EBADF (closed socket),
//   EINVAL (bad argument).
// * fd() is an eventfd usable with poll/epoll: readable while Recv (or Accept) would not block —
//   data, end of stream, an error, or a pending connection. write_fd() is its write side:
//   readable while Send would not block (the peer's window and a channel have room) or an error
//   is pending. Poll() gives the same as poll(2) bits, with POLLRDHUP/POLLERR/POLLHUP.
//   Keeping an eventfd in step costs a write() and a read() per transition; a caller that does
//   all its waiting itself (the preload's poll and epoll) can make them lazy: SetLazyReadiness()
//   — then fd() and write_fd() follow Poll() only while a wait is announced (BeginWait ..
//   EndWait; announce, look at Poll(), then sleep), and a socket that an event loop reads and
//   writes without ever sleeping costs no readiness syscall. Poll() is exact either way.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "afxdp_channels/channel.h"

namespace netch::vns {

enum class AppClass : uint8_t {
  kUnspecified = NC_CLASS_UNSPEC,
  kLatency = NC_CLASS_LATENCY,        // L-app: small messages, tail latency matters
  kThroughput = NC_CLASS_THROUGHPUT,  // T-app: bulk
};

// "latency", "throughput" or "unspecified": for tables and metric labels.
inline const char* AppClassName(AppClass c) {
  switch (c) {
    case AppClass::kLatency:
      return "latency";
    case AppClass::kThroughput:
      return "throughput";
    default:
      return "unspecified";
  }
}

struct SocketOptions {
  AppClass app_class = AppClass::kUnspecified;
  size_t rcvbuf = 4 << 20;  // bytes held for the application before channels stop draining
  int channels = 0;         // hint: spread over at most this many of the peer's channels (0: all)
  // Send/Recv/Accept return EAGAIN instead of waiting. Connect returns as soon as the NCSYN is
  // on its way (the socket's EINPROGRESS): write_fd() turns readable when the handshake ends and
  // Error() says how. To a peer with no channel yet, Connect starts opening the channels and
  // returns at once; the NCSYN follows from the dispatcher once one is up, and a failed opening
  // fails the connection (ETIMEDOUT, ECONNREFUSED). connect_timeout bounds the whole.
  bool nonblocking = false;
  // TCP_NODELAY: a small write leaves at once instead of waiting (up to kCorkHoldUs, or until
  // the channel has nothing unacknowledged) to be coalesced with the next ones into one segment.
  // Latency-class sockets never wait.
  bool nodelay = false;
  // Busy polling (run to completion): a Recv that would wait runs the engine rounds and the
  // demultiplexing of the channels its data arrives on, on the calling thread, for this long
  // before it sleeps — no engine or dispatcher thread between the wire and the application.
  // -1: the NetScheduler policy decides (knob busy_poll_us, L-app sockets only); 0: never.
  int busy_poll_us = -1;
  absl::Duration connect_timeout = absl::Seconds(2);
};

struct StackOptions {
  std::string driver = "afxdp";     // "afxdp" | "tcp" (chan::CreateDriver names)
  chan::DriverOptions driver_opts;  // netns, ifname, engines, cores, ...
  int channels_per_peer = 1;        // channels opened to each peer on first connect
  int copy_workers = 0;             // 0: every copy on the caller's thread
  // The NetScheduler policy (policies/net_scheduler.h) and its knobs; changeable at run time.
  std::string policy = "round-robin";
  std::vector<std::pair<std::string, std::string>> policy_knobs;
  // The copy plan's starting knobs (the policy's inline_copy_bytes and copy_chunk_bytes; the
  // policy decides per call, and also skips the workers when they are busy):
  size_t inline_copy_bytes = 256 << 10;  // below this a Send/Recv copies on the caller's thread
  size_t chunk_bytes = 256 << 10;        // unit of work for a copy worker
  bool replace_xdp = false;  // AF_XDP: take over an interface where another XDP program is attached
  // Adaptive polling: how long a blocked Recv and the idle dispatcher spin (yielding) before
  // they sleep. Longer spins cut latency and cost CPU; the test machines have 2 cores. A reader
  // that sleeps after every delivery costs a wakeup per 64 KB segment: spinning 50 µs took one
  // stream from 13.6-14.0 to 17.2-18.4 Gbit/s and the receiver from 0.53-0.56 to 0.39-0.41
  // CPU-s/GB (docs/BENCHMARKS.md); an idle socket still sleeps after 50 µs.
  uint64_t recv_spin_us = 50;
  uint64_t dispatcher_spin_us = 50;
  // Run to completion on receive: the engine that delivered a channel's segments hands them to
  // their sockets on its own thread right after its round (Channel::DeliveryHook), so the
  // dispatcher thread is not woken per delivery; it still serves what an engine could not (a
  // full socket, a round it was busy with) and its housekeeping.
  bool deliver_inline = true;
  // Run to completion on the sending side: a blocking Send of up to 32 KiB that finds its
  // channel's engine asleep runs the engine's round on the application's thread
  // (chan::TransmitInlineScope) rather than waking the engine — one thread hand-off less per
  // message. Busy-polled sockets transmit in their own rounds regardless.
  bool transmit_inline = true;
  // Run to completion for event loops: a nonblocking socket's write on a thread that flushes
  // (chan::FlushDeferredTransmit, called by the preload's epoll_wait and poll each time the loop
  // comes back to wait) does not wake a sleeping engine; what the loop's pass wrote leaves in
  // one round on its own thread when it comes back (chan::DeferTransmitScope), or on the
  // engine's timer chan::kDeferTransmitUs later if it does not.
  bool defer_transmit = true;
  // Run to completion on the receive side: a blocking Recv about to sleep borrows the input of
  // the engines its data arrives from (chan::InputLoan) and sleeps on their channels' input
  // itself; an arrival wakes it, and it runs the engine's round on its own thread, instead of the
  // engine waking and then waking it — the receiving half of the hand-offs transmit_inline
  // saves. Needs deliver_inline (the round hands segments to their sockets). A Recv whose
  // wakeups keep bringing other sockets' traffic hands the input back.
  bool receive_inline = true;
};

struct StackStats {
  uint64_t segments_in = 0, segments_out_ctl = 0;
  uint64_t segments_inline = 0;     // taken by busy-polling sockets on their own thread
  uint64_t dispatch_inline = 0;     // dispatcher rounds run by Stack::PollInline callers
  uint64_t deliveries_inline = 0;   // channel deliveries served on the engine's thread
  uint64_t rst_sent = 0;            // segments for no socket, SYNs for no listener
  uint64_t dispatcher_blocked = 0;  // times a full socket stopped a channel from draining
  uint64_t dispatcher_wakeups = 0;  // sleeps of the dispatcher thread (each one ends in a wakeup)
  uint64_t copy_chunks = 0;         // chunks run by copy workers
  uint64_t copy_busy_ns = 0;        // time copy workers spent copying
  uint64_t sched_batches = 0;       // scheduler decisions: a batch of segments sent on a channel
  uint64_t sched_skips = 0;         // ... a channel skipped for holding too much unacked data
  uint64_t rx_bad_conn = 0;         // segments for a live port pair with the wrong conn_id: dropped
  uint64_t conns_broken = 0;        // connections reset because a channel carrying them failed
  uint64_t rx_beyond_window = 0;    // data beyond the window a socket advertised: socket reset
  uint64_t window_updates = 0;      // NC_WND segments sent (the receive window moved)
  uint64_t rx_pressure_copies = 0;  // segments copied out of a channel whose buffers sockets held
  uint64_t channels_scaled_up = 0;  // channels opened by SetPeerChannels
  uint64_t channels_drained = 0;    // channels drained and destroyed by scale-down
  uint64_t ctl_backlog = 0;  // control segments (RST, WND, ...) waiting for room on a channel
};

// What the control plane sees of a socket.
struct SocketInfo {
  uint64_t id = 0;
  bool listening = false;
  uint16_t local_port = 0, remote_port = 0;
  uint32_t remote_ipv4 = 0;
  AppClass app_class = AppClass::kUnspecified;
  uint64_t tx_bytes = 0, rx_bytes = 0;  // handed to channels / delivered to the application
  std::vector<uint32_t> channels;       // the channels its data may use (empty: all the peer's)
  // The scheduler's decisions: batches of segments sent per channel id (and on channels beyond
  // the first 16 a socket used).
  std::vector<std::pair<uint32_t, uint64_t>> batches_by_channel;
  uint64_t batches_other = 0;
};

// The scheduling policy VNS applies when it picks a channel for the next batch of a socket's
// segments (the NetScheduler issue makes this pluggable; today one policy with one knob).
struct PolicyInfo {
  std::string name;     // "round-robin"
  std::string explain;  // how it decides, one sentence
  std::vector<std::pair<std::string, std::string>> knobs;
};

// What a socket's transport looks like now (the preload answers getsockopt(TCP_INFO) with it).
// A socket's segments ride channels other sockets may share, so the round-trip time, window,
// segment size and retransmissions are those of the channels it may use (the largest RTT and
// segment, the sum of windows, retransmissions and unacknowledged bytes), not its own.
struct TransportInfo {
  enum class State { kListening, kConnecting, kEstablished, kClosed };
  State state = State::kClosed;
  bool peer_finished = false;  // the peer's FIN arrived: the stream ends after what it sent
  bool shut_down = false;      // this side sent its FIN (Shutdown)
  uint64_t bytes_sent = 0, bytes_received = 0;  // handed to channels / delivered to the reader
  uint64_t srtt_us = 0;
  uint32_t cwnd_packets = 0;  // 0 where the kernel owns the window (the TCP driver)
  uint32_t mss = 0;
  uint64_t retransmits = 0;
  uint64_t unacked_bytes = 0;
  uint32_t channels = 0;
};

class VirtualSocket {
 public:
  virtual ~VirtualSocket() = default;

  // Bytes taken (blocking: all of them unless an error comes first; non-blocking: what fit, or
  // EAGAIN if nothing did).
  virtual absl::StatusOr<size_t> Send(std::span<const uint8_t> data) = 0;
  // Bytes received (at most buf.size(); at least 1 unless at end of stream, which returns 0).
  virtual absl::StatusOr<size_t> Recv(std::span<uint8_t> buf) = 0;
  // Listening sockets: the next connection.
  virtual absl::StatusOr<std::unique_ptr<VirtualSocket>> Accept() = 0;
  // No more sends; the peer reads end of stream after the last byte.
  virtual absl::Status Shutdown() = 0;
  // Shutdown + release everything; later calls return EBADF. Idempotent-safe: a second Close
  // returns EBADF, never crashes.
  virtual absl::Status Close() = 0;

  virtual int fd() const = 0;
  virtual int write_fd() const = 0;
  // Lazy readiness fds (see the top of this file): from now on fd() and write_fd() are kept in
  // step with Poll() only between BeginWait and EndWait. Once per socket; it cannot be undone.
  virtual void SetLazyReadiness() = 0;
  // A thread may sleep on fd()/write_fd() until EndWait: they follow Poll() meanwhile (and
  // BeginWait brings them up to date). Nestable, any thread; no-ops on eager sockets' fds.
  virtual void BeginWait() = 0;
  virtual void EndWait() = 0;
  // Readiness now, as poll(2) revents bits (POLLIN, POLLOUT, POLLRDHUP, POLLERR, POLLHUP).
  virtual short Poll() const = 0;
  // Bytes a Recv would return now without waiting (FIONREAD).
  virtual size_t Available() = 0;
  // The error a socket user reads with SO_ERROR: ECONNREFUSED, ECONNRESET, ETIMEDOUT, or 0.
  virtual int Error() const = 0;
  virtual void SetNonBlocking(bool nonblocking) = 0;
  virtual void SetNoDelay(bool nodelay) = 0;  // SocketOptions::nodelay
  virtual void SetBusyPoll(int us) = 0;       // SocketOptions::busy_poll_us
  virtual uint16_t local_port() const = 0;
  virtual uint16_t remote_port() const = 0;
  virtual uint32_t remote_ipv4() const = 0;
  virtual AppClass app_class() const = 0;
  virtual TransportInfo Info() const = 0;
};

class Stack {
 public:
  // Creates the driver (and for AF_XDP loads and attaches the steering program on the
  // interface) and starts the dispatcher and copy workers.
  static absl::StatusOr<std::unique_ptr<Stack>> Create(const StackOptions& opts);
  virtual ~Stack() = default;  // close every socket first

  virtual absl::StatusOr<std::unique_ptr<VirtualSocket>> Listen(uint16_t port, int backlog = 128,
                                                                const SocketOptions& o = {}) = 0;
  virtual absl::StatusOr<std::unique_ptr<VirtualSocket>> Connect(uint32_t peer_ipv4, uint16_t port,
                                                                 const SocketOptions& o = {}) = 0;
  // Runtime setting: 0 means every copy on the caller's thread.
  virtual absl::Status SetCopyWorkers(int n) = 0;
  virtual int copy_workers() const = 0;
  // The core each copy worker is pinned to by the policy (PlaceCopyWorker), -1: not pinned.
  virtual std::vector<int> copy_worker_cores() const = 0;
  virtual StackStats Stats() const = 0;
  virtual chan::Driver& driver() = 0;
  // Busy polling for a thread that waits on many sockets at once (an epoll loop): one round of
  // every engine and of the dispatcher on the calling thread — readiness then shows on the
  // sockets' fds as usual. For `stand_down_us` the stack's own engine and dispatcher threads
  // leave the work to pollers; a poller about to sleep calls EndPollInline(). True if anything
  // was done. (A blocking Recv of a busy-polled socket polls its own channels by itself.)
  virtual bool PollInline(uint64_t stand_down_us) = 0;
  virtual void EndPollInline() = 0;
  // Write readiness for an event loop that polls the stack itself when it next waits: the
  // thread marks itself (true after a wait that will poll again next time, false otherwise).
  // A nonblocking Send of a marked thread that stops on full channels leaves the watch for
  // room to the thread's own next PollInline rounds instead of waking the dispatcher for it —
  // a loop whose replies fill the channels stopped ~20k times a second (Redis LRANGE_100
  // -P 16, docs/BENCHMARKS.md), each a dispatcher wakeup that pre-empted the loop. A thread
  // about to sleep calls HandOverWatches(): what is still watched goes to the dispatcher.
  static void SetLoopPollsOnWait(bool polls);
  virtual void HandOverWatches() = 0;
  // Run to completion for a thread about to sleep on many sockets at once without busy polling
  // (an event loop's epoll_wait; StackOptions::receive_inline): lends it the input of the
  // engines that carry the stack's channels (one loan per engine, at most out.size(); none with
  // receive_inline or deliver_inline off). The caller sleeps on the loans' fds beside its
  // sockets' and, when one turns readable, runs that engine's round on its own thread
  // (InputLoan::Run): the round hands segments to their sockets, whose readiness rises as
  // usual — one thread woken per arrival, not the engine and then the loop. Loans go back
  // (Return, or destruction) before the caller goes on with what it read. Returns how many.
  virtual size_t BorrowInputs(std::span<chan::InputLoan> out) = 0;

  // ---- runtime control (ctl/ drives these; every change applies to the next batch) ----------
  virtual std::vector<SocketInfo> Sockets() const = 0;
  // Restricts socket `id` to the given channels of its peer (empty: all). NotFound for an unknown
  // socket, InvalidArgument for a channel that is not the peer's.
  virtual absl::Status MapSocket(uint64_t id, const std::vector<uint32_t>& channel_ids) = 0;
  virtual PolicyInfo Policy() const = 0;
  // Scales the channels to a peer (already connected) to `n`: new ones are opened at once; extra
  // ones are drained — sealed after their last segment on both sides (NC_DRAIN), destroyed when
  // everything on them is acknowledged and read — so no byte is lost or reordered. Sockets move
  // to the remaining channels at their next Send. Later connections keep `n`.
  virtual absl::Status SetPeerChannels(uint32_t peer_ipv4, int n) = 0;
  // "round-robin" with knob skip_queued_bytes=N: a channel holding more than N bytes not yet
  // acknowledged is skipped while another has room (the paper's default: 2 MB).
  virtual absl::Status SetPolicy(const std::string& name,
                                 const std::vector<std::pair<std::string, std::string>>& knobs) = 0;
};

// The library's version ("0.1.0"); libnetchannel.so only.
const char* Version();

// The errno a socket user would see for `s` (0 for OK; EIO when the status carries none).
int Errno(const absl::Status& s);

}  // namespace netch::vns
