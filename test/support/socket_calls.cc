// socket_calls - an ordinary socket program (libc only, nothing of ours linked) that the preload
// tests run under netchrun. Each check prints "ok NAME" or "FAIL NAME: why"; the exit status is
// the number of failures.
//
//   socket_calls server IP PORT CLIENTS   epoll server: echoes each client's bytes (readv/writev),
//                                         with a kernel loopback listener in the same epoll set;
//                                         exits after CLIENTS clients ended cleanly
//   socket_calls client IP PORT BYTES     non-blocking connect, poll/select/ppoll, writev/readv,
//                                         dup, fcntl, ioctl, getsockname/peername, TCP_INFO,
//                                         fork, shutdown
//   socket_calls hang IP PORT             connects, sends half a message, then sleeps (to be
//                                         killed)
//   socket_calls refused IP PORT          a connect nobody accepts: SO_ERROR = ECONNREFUSED
//   socket_calls timeout IP PORT          connects to a host that never answers: a non-blocking
//                                         connect returns at once and reports ETIMEDOUT, a
//                                         blocking one fails with it
//   socket_calls unreachable IP PORT      the same to an address no host answers ARP for:
//                                         EHOSTUNREACH
//   socket_calls sink IP PORT CLIENTS     accepts CLIENTS connections one after another and checks
//                                         each sends BYTES of the pattern (its first 8 bytes say
//                                         how many) before its end of stream
//   socket_calls burst IP PORT BYTES      sends BYTES in two bursts 100 ms apart, closes and exits
//                                         at once: what it wrote must still arrive (the stack's
//                                         linger at exit)
//   socket_calls pingpong IP PORT ROUNDS  ROUNDS 64-byte messages to an echo server, each reply
//                                         awaited in poll() on a non-blocking socket (the way
//                                         libmemcached's clients wait), checked, then the next
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/select.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <thread>
#include <vector>

namespace {

int g_failures = 0;

// The kernel's struct tcp_info (linux/tcp.h) up to tcpi_bytes_received: glibc's declares only
// the fields up to tcpi_total_retrans; the ABI only ever grows at the end.
struct TcpInfo {
  tcp_info base;
  uint64_t pacing_rate, max_pacing_rate, bytes_acked, bytes_received;
};
static_assert(offsetof(TcpInfo, bytes_received) == 128);

void Check(bool ok, const char* name, const std::string& why = "") {
  if (ok) {
    std::printf("ok %s\n", name);
  } else {
    std::printf("FAIL %s: %s (errno %s)\n", name, why.c_str(), std::strerror(errno));
    ++g_failures;
  }
  std::fflush(stdout);
}

sockaddr_in Addr(const char* ip, int port) {
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  inet_pton(AF_INET, ip, &a.sin_addr);
  return a;
}

uint8_t Pattern(uint64_t i) { return static_cast<uint8_t>((i * 131) ^ (i >> 9)); }

// epoll_wait returns 0 only when its timeout has passed. Two threads wait on one set holding an
// edge-triggered kernel eventfd another thread signals every few ms: each signal wakes both and
// only one gets the edge — the other's wakeup brought nothing and must wait again, not end the
// call early (a program that takes a 0 at its word thinks its timeout passed: this server used
// to stop serving so).
void EpollKeepsItsTimeout(int ep) {
  const int tg = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  epoll_event ev{EPOLLIN | EPOLLET, {.fd = tg}};
  epoll_ctl(ep, EPOLL_CTL_ADD, tg, &ev);
  const auto start = std::chrono::steady_clock::now();
  const auto since = [](std::chrono::steady_clock::time_point t) {
    return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() -
                                                                 t)
        .count();
  };
  std::atomic<int> early{0}, waits{0};
  std::atomic<long> worst{50};
  const auto waiter = [&] {
    while (since(start) < 800) {
      epoll_event evs[4];
      const auto t0 = std::chrono::steady_clock::now();
      const int n = epoll_wait(ep, evs, 4, 50);
      const long ms = since(t0);
      if (n != 0) continue;
      ++waits;
      if (ms < 49) {
        ++early;
        for (long w = worst.load(); ms < w && !worst.compare_exchange_weak(w, ms);) {
        }
      }
    }
  };
  std::thread signaler([&] {
    const uint64_t v = 1;
    while (since(start) < 800) {
      (void)!write(tg, &v, sizeof(v));
      usleep(2000);
    }
  });
  std::thread second(waiter);
  waiter();
  second.join();
  signaler.join();
  epoll_ctl(ep, EPOLL_CTL_DEL, tg, nullptr);
  close(tg);
  Check(early == 0, "epoll_wait_keeps_its_timeout",
        std::to_string(early) + " of " + std::to_string(waits) +
            " empty waits ended early (one after " + std::to_string(worst) + " ms of 50)");
}

int Server(const char* ip, int port, int clients) {
  const int l = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
  int one = 1;
  Check(setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) == 0, "setsockopt_reuseaddr");
  sockaddr_in a = Addr(ip, port);
  Check(bind(l, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0, "bind");
  Check(listen(l, 64) == 0, "listen");
  sockaddr_in got{};
  socklen_t gl = sizeof(got);
  Check(getsockname(l, reinterpret_cast<sockaddr*>(&got), &gl) == 0 && ntohs(got.sin_port) == port,
        "getsockname_listener");
  // A kernel listener on loopback in the same epoll set: it must keep working beside ours.
  const int kl = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in lo = Addr("127.0.0.1", 0);
  bind(kl, reinterpret_cast<sockaddr*>(&lo), sizeof(lo));
  listen(kl, 4);
  socklen_t ll = sizeof(lo);
  getsockname(kl, reinterpret_cast<sockaddr*>(&lo), &ll);
  const int ep = epoll_create1(EPOLL_CLOEXEC);
  epoll_event ev{EPOLLIN, {.fd = l}};
  Check(epoll_ctl(ep, EPOLL_CTL_ADD, l, &ev) == 0, "epoll_add_listener");
  ev.data.fd = kl;
  epoll_ctl(ep, EPOLL_CTL_ADD, kl, &ev);
  std::thread loop([port = ntohs(lo.sin_port)] {
    const int c = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a = Addr("127.0.0.1", port);
    connect(c, reinterpret_cast<sockaddr*>(&a), sizeof(a));
    (void)!write(c, "k", 1);
    usleep(200000);
    close(c);
  });
  std::printf("ready\n");
  std::fflush(stdout);
  std::map<int, uint64_t> echoed;
  bool kernel_seen = false;
  int done = 0;
  std::vector<uint8_t> buf(256 << 10);
  while (done < clients) {
    epoll_event evs[32];
    const auto t0 = std::chrono::steady_clock::now();
    const int n = epoll_wait(ep, evs, 32, 30000);
    if (n <= 0) {
      const int err = errno;
      const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                          std::chrono::steady_clock::now() - t0)
                          .count();
      errno = err;
      // A wait that ends early without an event breaks every program that trusts its timeout.
      Check(false, "epoll_wait",
            "returned " + std::to_string(n) + " after " + std::to_string(ms) + " ms of 30000");
      break;
    }
    for (int i = 0; i < n; ++i) {
      const int fd = evs[i].data.fd;
      if (fd == kl) {
        const int c = accept(kl, nullptr, nullptr);
        char k = 0;
        kernel_seen = c >= 0 && read(c, &k, 1) == 1 && k == 'k';
        close(c);
        continue;
      }
      if (fd == l) {
        for (;;) {
          sockaddr_in peer{};
          socklen_t pl = sizeof(peer);
          const int c = accept4(l, reinterpret_cast<sockaddr*>(&peer), &pl, SOCK_NONBLOCK);
          if (c < 0) {
            if (errno != EAGAIN) Check(false, "accept4");
            break;
          }
          setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
          epoll_event ce{EPOLLIN | EPOLLRDHUP, {.fd = c}};
          epoll_ctl(ep, EPOLL_CTL_ADD, c, &ce);
          echoed[c] = 0;
        }
        continue;
      }
      // Echo: readv what there is, writev it back (blocking briefly for room if needed).
      for (;;) {
        iovec iv[2] = {{buf.data(), 1000}, {buf.data() + 1000, buf.size() - 1000}};
        const ssize_t r = readv(fd, iv, 2);
        if (r == 0 || (r < 0 && errno != EAGAIN)) {
          epoll_ctl(ep, EPOLL_CTL_DEL, fd, nullptr);
          close(fd);
          if (r == 0) ++done;  // an orderly end; a killed client ends with an error
          // Once, while the first client's channels are still live (NetChannel's input is then
          // there to be lent to a waiting thread: the wait path the check is about).
          if (r == 0 && done == 1) EpollKeepsItsTimeout(ep);
          echoed.erase(fd);
          break;
        }
        if (r < 0) break;
        size_t off = 0;
        while (off < static_cast<size_t>(r)) {
          iovec ov[1] = {{buf.data() + off, static_cast<size_t>(r) - off}};
          const ssize_t w = writev(fd, ov, 1);
          if (w > 0) {
            off += w;
          } else if (w < 0 && errno == EAGAIN) {
            pollfd p{fd, POLLOUT, 0};
            poll(&p, 1, 1000);
          } else {
            break;
          }
        }
        echoed[fd] += r;
      }
    }
  }
  loop.join();
  Check(kernel_seen, "kernel_fd_in_same_epoll");
  close(ep);
  close(l);
  close(kl);
  std::printf("server done: %d clients\n", done);
  return g_failures;
}

int Connect(const char* ip, int port, bool* inprogress) {
  const int s = socket(AF_INET, SOCK_STREAM, 0);
  const int fl = fcntl(s, F_GETFL);
  fcntl(s, F_SETFL, fl | O_NONBLOCK);
  sockaddr_in a = Addr(ip, port);
  const int r = connect(s, reinterpret_cast<sockaddr*>(&a), sizeof(a));
  *inprogress = r < 0 && errno == EINPROGRESS;
  if (r < 0 && errno != EINPROGRESS) return -1;
  pollfd p{s, POLLOUT, 0};
  poll(&p, 1, 3000);
  return s;
}

// A blocking connect; on failure one line saying why, and -1.
int ConnectBlocking(const char* ip, int port) {
  const int s = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a = Addr(ip, port);
  if (connect(s, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0) return s;
  std::printf("FAIL connect: %s\n", std::strerror(errno));
  close(s);
  return -1;
}

int Client(const char* ip, int port, uint64_t bytes) {
  bool inprogress = false;
  const int s = Connect(ip, port, &inprogress);
  Check(s >= 0 && inprogress, "nonblocking_connect_einprogress");
  if (s < 0) return g_failures;  // no socket: every check below would only repeat EBADF
  int err = -1;
  socklen_t el = sizeof(err);
  Check(getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &el) == 0 && err == 0, "so_error_zero");
  Check(fcntl(s, F_GETFL) & O_NONBLOCK, "fcntl_getfl_nonblock");
  int zero = 0;
  Check(ioctl(s, FIONBIO, &zero) == 0 && !(fcntl(s, F_GETFL) & O_NONBLOCK), "ioctl_fionbio");
  sockaddr_in me{}, peer{};
  socklen_t ml = sizeof(me), pl = sizeof(peer);
  Check(getsockname(s, reinterpret_cast<sockaddr*>(&me), &ml) == 0 && ntohs(me.sin_port) != 0,
        "getsockname");
  Check(
      getpeername(s, reinterpret_cast<sockaddr*>(&peer), &pl) == 0 && ntohs(peer.sin_port) == port,
      "getpeername");
  int one = 1;
  Check(setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) == 0, "setsockopt_nodelay");
  int v = 0;
  socklen_t vl = sizeof(v);
  Check(getsockopt(s, IPPROTO_TCP, TCP_NODELAY, &v, &vl) == 0 && v == 1, "getsockopt_nodelay");
  {
    TcpInfo ti{};
    socklen_t tl = sizeof(ti);
    // (Called first: the message below reads what it filled in.)
    const int rc = getsockopt(s, IPPROTO_TCP, TCP_INFO, &ti, &tl);
    Check(rc == 0 && tl == sizeof(ti) && ti.base.tcpi_state == TCP_ESTABLISHED &&
              ti.base.tcpi_snd_mss > 0,
          "getsockopt_tcp_info_established",
          "rc " + std::to_string(rc) + ", state " + std::to_string(ti.base.tcpi_state) + ", len " +
              std::to_string(tl));
  }

  // epoll interest changes as event loops make them: write interest toggled per request, and
  // one-shot and edge-triggered registrations re-armed by a MOD with the same events. (Nothing
  // was sent yet: the socket is writable, not readable.)
  {
    const int ep = epoll_create1(EPOLL_CLOEXEC);
    auto ready = [ep] {
      epoll_event e[4];
      return epoll_wait(ep, e, 4, 0) > 0 ? e[0].events & (EPOLLIN | EPOLLOUT) : 0u;
    };
    epoll_event ev{EPOLLIN, {.fd = s}};
    Check(epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev) == 0 && ready() == 0, "epoll_in_idle");
    ev.events = EPOLLIN | EPOLLOUT;
    Check(epoll_ctl(ep, EPOLL_CTL_MOD, s, &ev) == 0 && ready() == EPOLLOUT, "epoll_mod_adds_out");
    ev.events = EPOLLIN;
    Check(epoll_ctl(ep, EPOLL_CTL_MOD, s, &ev) == 0 && ready() == 0, "epoll_mod_drops_out");
    ev.events = EPOLLOUT | EPOLLONESHOT;
    Check(epoll_ctl(ep, EPOLL_CTL_MOD, s, &ev) == 0 && ready() == EPOLLOUT && ready() == 0,
          "epoll_oneshot_fires_once");
    Check(epoll_ctl(ep, EPOLL_CTL_MOD, s, &ev) == 0 && ready() == EPOLLOUT,
          "epoll_oneshot_rearmed_by_mod");
    ev.events = EPOLLOUT | EPOLLET;
    Check(epoll_ctl(ep, EPOLL_CTL_MOD, s, &ev) == 0 && ready() == EPOLLOUT && ready() == 0,
          "epoll_et_reports_an_edge_once");
    Check(epoll_ctl(ep, EPOLL_CTL_MOD, s, &ev) == 0 && ready() == EPOLLOUT,
          "epoll_et_mod_reports_again");
    Check(epoll_ctl(ep, EPOLL_CTL_DEL, s, nullptr) == 0 && ready() == 0, "epoll_del");
    Check(epoll_ctl(ep, EPOLL_CTL_MOD, s, &ev) < 0 && errno == ENOENT, "epoll_mod_unknown_enoent");
    // The same with waits that sleep, between which a loop removes and re-adds the socket (as
    // redis-benchmark does per request): the library tells the kernel of such changes only when
    // a thread is about to sleep on the set, and nothing removed or no longer wanted may wake it.
    auto slept = [ep] {
      epoll_event e[4];
      const int n = epoll_wait(ep, e, 4, 100);
      return n > 0 ? e[0].events & (EPOLLIN | EPOLLOUT) : 0u;
    };
    ev.events = EPOLLIN;
    Check(epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev) == 0 && slept() == 0, "epoll_sleep_in_idle");
    ev.events = EPOLLOUT;
    Check(epoll_ctl(ep, EPOLL_CTL_DEL, s, nullptr) == 0 &&
              epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev) == 0 && slept() == EPOLLOUT,
          "epoll_del_add_out_then_sleep");
    ev.events = EPOLLIN;
    Check(epoll_ctl(ep, EPOLL_CTL_DEL, s, nullptr) == 0 &&
              epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev) == 0 && slept() == 0 && slept() == 0,
          "epoll_del_add_in_then_sleep_sees_no_out");
    Check(epoll_ctl(ep, EPOLL_CTL_DEL, s, nullptr) == 0 && slept() == 0,
          "epoll_sleep_after_del_sees_nothing");
    Check(epoll_ctl(ep, EPOLL_CTL_DEL, s, nullptr) < 0 && errno == ENOENT,
          "epoll_del_twice_enoent");
    close(ep);
  }

  // A fork child inherits the socket: it may only close it, and the parent's stays whole.
  const pid_t child = fork();
  if (child == 0) {
    close(s);
    _exit(0);
  }
  int st = 0;
  waitpid(child, &st, 0);
  Check(WIFEXITED(st) && WEXITSTATUS(st) == 0, "fork_child_closes");

  // dup: the copy is the same socket; the original number closes without ending it.
  const int d = dup(s);
  Check(d >= 0 && d != s, "dup");
  close(s);

  // Stream BYTES with writev from one thread, read the echo with readv/recv here, checked.
  // The first 200 KB leave by sendfile(2) from a file holding the pattern's start.
  uint64_t from_file = std::min<uint64_t>(bytes, 200000);
  char path[] = "/tmp/socket_calls-XXXXXX";
  const int file = mkstemp(path);
  unlink(path);
  {
    std::vector<uint8_t> head(from_file);
    for (uint64_t i = 0; i < from_file; ++i) head[i] = Pattern(i);
    (void)!write(file, head.data(), head.size());
  }
  // Waiting on a virtual socket from outside its epoll set: the set nested in another one and
  // in poll(), and a thread already asleep on a set when the socket is added to it (an acceptor
  // handing a connection to a sleeping worker). Nothing reads d until these saw the echo.
  const int inner = epoll_create1(EPOLL_CLOEXEC), outer = epoll_create1(EPOLL_CLOEXEC);
  const int late = epoll_create1(EPOLL_CLOEXEC);
  epoll_event in_ev{EPOLLIN, {.fd = d}}, nest_ev{EPOLLIN, {.fd = inner}};
  epoll_ctl(outer, EPOLL_CTL_ADD, inner, &nest_ev);
  epoll_ctl(inner, EPOLL_CTL_ADD, d, &in_ev);
  int late_events = -1;
  std::string late_why;
  std::thread sleeper([late, &late_events, &late_why] {
    epoll_event e{};
    const int rc = epoll_wait(late, &e, 1, 10000);
    late_events = rc == 1 ? static_cast<int>(e.events) : 0;
    late_why = "rc " + std::to_string(rc) + " errno " + std::to_string(errno) + " events " +
               std::to_string(e.events);
  });
  usleep(100000);  // the sleeper is in epoll_wait, on a set with no virtual socket
  epoll_ctl(late, EPOLL_CTL_ADD, d, &in_ev);
  std::thread writer([d, bytes, file, from_file] {
    off_t off = 0;
    while (static_cast<uint64_t>(off) < from_file)
      if (sendfile(d, file, &off, from_file - off) <= 0) break;
    Check(static_cast<uint64_t>(off) == from_file, "sendfile");
    close(file);
    std::vector<uint8_t> b(64 << 10);
    uint64_t sent = off;
    while (sent < bytes) {
      const size_t n = std::min<uint64_t>(b.size(), bytes - sent);
      for (size_t i = 0; i < n; ++i) b[i] = Pattern(sent + i);
      iovec iv[2] = {{b.data(), n / 2}, {b.data() + n / 2, n - n / 2}};
      const ssize_t w = writev(d, iv, 2);
      if (w <= 0) break;
      sent += w;  // a partial write: the pattern resumes from `sent`
    }
    shutdown(d, SHUT_WR);
  });
  sleeper.join();
  // (EPOLLHUP too when the whole echo is over before the sleeper runs: the kernel's does that.)
  Check(late_events & EPOLLIN, "epoll_wakes_a_thread_asleep_before_the_socket_was_added", late_why);
  {
    epoll_event e;
    Check(epoll_wait(outer, &e, 1, 5000) == 1 && e.data.fd == inner, "epoll_nested_set");
    pollfd p{inner, POLLIN, 0};
    Check(poll(&p, 1, 5000) == 1 && (p.revents & POLLIN), "poll_on_an_epoll_fd");
    epoll_event evs[4];
    Check(epoll_wait(inner, evs, 4, 5000) == 1 && evs[0].data.fd == d,
          "epoll_eager_set_reports_a_socket_once");
  }
  close(late);
  close(outer);
  close(inner);
  std::vector<uint8_t> buf(100 << 10);
  uint64_t got = 0;
  bool same = true, used_select = false, used_ppoll = false;
  while (got < bytes) {
    if (!used_select) {
      fd_set r;
      FD_ZERO(&r);
      FD_SET(d, &r);
      timeval tv{5, 0};
      used_select = select(d + 1, &r, nullptr, nullptr, &tv) == 1 && FD_ISSET(d, &r);
      Check(used_select, "select_readable");
    } else if (!used_ppoll) {
      pollfd p{d, POLLIN, 0};
      timespec ts{5, 0};
      used_ppoll = ppoll(&p, 1, &ts, nullptr) == 1 && (p.revents & POLLIN);
      Check(used_ppoll, "ppoll_readable");
      int avail = -1;
      Check(ioctl(d, FIONREAD, &avail) == 0 && avail > 0, "ioctl_fionread");
    }
    iovec iv[2] = {{buf.data(), 777}, {buf.data() + 777, buf.size() - 777}};
    const ssize_t r = got % 2 ? readv(d, iv, 2) : recv(d, buf.data(), buf.size(), 0);
    if (r <= 0) break;
    for (ssize_t i = 0; i < r && same; ++i) same = buf[i] == Pattern(got + i);
    got += r;
  }
  writer.join();
  Check(got == bytes && same, "echo_every_byte_in_order",
        std::to_string(got) + " of " + std::to_string(bytes));
  {
    // What a program reading TCP_INFO sees after the exchange (iperf3 prints it): the bytes it
    // read, a round-trip time; a short buffer gets the head of the structure, as the kernel's.
    TcpInfo ti{};
    socklen_t tl = sizeof(ti);
    const int rc = getsockopt(d, IPPROTO_TCP, TCP_INFO, &ti, &tl);
    // (The kernel's count includes the peer's FIN: one more.)
    Check(rc == 0 && ti.bytes_received >= bytes && ti.bytes_received <= bytes + 1 &&
              ti.base.tcpi_rtt > 0,
          "getsockopt_tcp_info_counts",
          "rc " + std::to_string(rc) + ", " + std::to_string(ti.bytes_received) +
              " B received, rtt " + std::to_string(ti.base.tcpi_rtt) + " us");
    uint8_t head[8];
    socklen_t hl = sizeof(head);
    Check(getsockopt(d, IPPROTO_TCP, TCP_INFO, head, &hl) == 0 && hl == sizeof(head),
          "getsockopt_tcp_info_short_buffer");
  }
  char c;
  Check(read(d, &c, 1) == 0, "end_of_stream_after_shutdown");
  Check(close(d) == 0, "close");
  char b2[4];
  Check(read(d, b2, 1) < 0 && errno == EBADF, "closed_fd_is_ebadf");
  return g_failures;
}

int Hang(const char* ip, int port) {
  const int s = ConnectBlocking(ip, port);
  if (s < 0) return 1;
  std::vector<uint8_t> b(300000, 1);
  (void)!write(s, b.data(), b.size());
  std::printf("hanging\n");
  std::fflush(stdout);
  sleep(60);
  return 0;
}

int Sink(const char* ip, int port, int clients) {
  const int l = socket(AF_INET, SOCK_STREAM, 0);
  int one = 1;
  setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in a = Addr(ip, port);
  Check(bind(l, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0 && listen(l, 8) == 0, "listen");
  std::printf("ready\n");
  std::fflush(stdout);
  std::vector<uint8_t> buf(256 << 10);
  for (int i = 0; i < clients; ++i) {
    const int c = accept(l, nullptr, nullptr);
    uint64_t want = UINT64_MAX, got = 0;
    bool same = true;
    for (ssize_t r; (r = read(c, buf.data(), buf.size())) > 0;) {
      for (ssize_t k = 0; k < r; ++k, ++got) {
        if (got < 8) {
          want = (got == 0 ? 0 : want) | uint64_t{buf[k]} << (8 * got);
        } else {
          same &= buf[k] == Pattern(got);
        }
      }
    }
    close(c);
    Check(got == want && same, ("burst_" + std::to_string(i) + "_arrived_whole").c_str(),
          std::to_string(got) + " of " + std::to_string(want) + " bytes");
  }
  close(l);
  return g_failures;
}

int Burst(const char* ip, int port, uint64_t bytes) {
  const int s = ConnectBlocking(ip, port);
  if (s < 0) return 1;
  std::vector<uint8_t> b(bytes);
  for (uint64_t i = 0; i < bytes; ++i)
    b[i] = i < 8 ? static_cast<uint8_t>(bytes >> (8 * i)) : Pattern(i);
  // The first burst is acknowledged during the pause: the second then goes into idle channels,
  // and the process exits while it is still on its way.
  for (uint64_t off = 0, half = bytes / 2; off < bytes;) {
    const uint64_t end = off < half ? half : bytes;
    while (off < end) {
      const ssize_t w = write(s, b.data() + off, end - off);
      if (w <= 0) {
        std::printf("FAIL write: %s\n", std::strerror(errno));
        return 1;
      }
      off += static_cast<uint64_t>(w);
    }
    if (off < bytes) usleep(100000);
  }
  close(s);
  std::printf("burst sent %llu\n", static_cast<unsigned long long>(bytes));
  return 0;
}

int64_t NowMs();

int Pingpong(const char* ip, int port, int rounds) {
  const int s = ConnectBlocking(ip, port);
  if (s < 0) return 1;
  // (No TCP_NODELAY, like memcslap's: each request is a small write held open for coalescing
  // until the wait that follows it lets it go.)
  fcntl(s, F_SETFL, fcntl(s, F_GETFL) | O_NONBLOCK);
  uint8_t msg[64], got[64];
  const int64_t t0 = NowMs();
  bool ok = true;
  int r = 0;
  for (; r < rounds && ok; ++r) {
    for (size_t i = 0; i < sizeof(msg); ++i) msg[i] = static_cast<uint8_t>(r * 7 + i);
    ok = write(s, msg, sizeof(msg)) == static_cast<ssize_t>(sizeof(msg));
    size_t have = 0;
    while (ok && have < sizeof(got)) {
      pollfd p{s, POLLIN, 0};
      ok = poll(&p, 1, 5000) == 1 && (p.revents & POLLIN);
      const ssize_t n = ok ? read(s, got + have, sizeof(got) - have) : -1;
      if (n > 0) have += static_cast<size_t>(n);
      ok = ok && (n > 0 || (n < 0 && errno == EAGAIN));
    }
    ok = ok && std::memcmp(msg, got, sizeof(msg)) == 0;
  }
  Check(ok, "pingpong_replies_awaited_in_poll",
        "round " + std::to_string(r) + " of " + std::to_string(rounds));
  close(s);
  std::printf("pingpong %d rounds in %lld ms\n", r, static_cast<long long>(NowMs() - t0));
  return g_failures;
}

int Refused(const char* ip, int port) {
  bool inprogress = false;
  const int s = Connect(ip, port, &inprogress);
  int err = 0;
  socklen_t el = sizeof(err);
  if (s >= 0) getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &el);
  Check((s >= 0 && err == ECONNREFUSED) || (s < 0 && errno == ECONNREFUSED), "refused",
        "SO_ERROR " + std::to_string(err));
  if (s >= 0) close(s);
  return g_failures;
}

int64_t NowMs() {
  timespec t{};
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

// A connect that cannot succeed: a non-blocking one returns at once and reports `want` through
// SO_ERROR, a blocking one fails with it (checks named after `want_name`).
int FailsWith(const char* ip, int port, int want, const std::string& want_name) {
  sockaddr_in a = Addr(ip, port);
  // Twice: the first connect also starts the library's stack (lazily, on the first socket that
  // goes over NetChannel); the second shows what a connect itself costs.
  for (int round = 0; round < 2; ++round) {
    const int s = socket(AF_INET, SOCK_STREAM, 0);
    fcntl(s, F_SETFL, fcntl(s, F_GETFL) | O_NONBLOCK);
    const int64_t t0 = NowMs();
    const int r = connect(s, reinterpret_cast<sockaddr*>(&a), sizeof(a));
    const bool inprogress = r < 0 && errno == EINPROGRESS;
    const int64_t returned = NowMs() - t0;
    pollfd p{s, POLLOUT, 0};
    const bool quiet = poll(&p, 1, 0) == 0;
    const bool ended = poll(&p, 1, 5000) == 1;
    int err = 0;
    socklen_t el = sizeof(err);
    getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &el);
    close(s);
    if (round == 0) continue;
    Check(inprogress && returned < 200, "nonblocking_connect_returns_at_once",
          "rc " + std::to_string(r) + " after " + std::to_string(returned) + " ms");
    Check(quiet, "not_writable_while_connecting");
    Check(ended, "writable_when_the_connect_ends");
    Check(err == want, ("so_error_" + want_name).c_str(), "SO_ERROR " + std::to_string(err));
  }
  const int b = socket(AF_INET, SOCK_STREAM, 0);
  const int64_t t0 = NowMs();
  const int rb = connect(b, reinterpret_cast<sockaddr*>(&a), sizeof(a));
  const int eb = errno;
  Check(rb < 0 && eb == want, ("blocking_connect_" + want_name).c_str(),
        "rc " + std::to_string(rb) + " errno " + std::to_string(eb) + " after " +
            std::to_string(NowMs() - t0) + " ms");
  close(b);
  return g_failures;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(
        stderr,
        "usage: socket_calls server|client|hang|refused|timeout|unreachable|sink|burst|pingpong IP "
        "PORT [N]\n");
    return 2;
  }
  const std::string mode = argv[1];
  const int port = std::atoi(argv[3]);
  if (mode == "server" && argc == 5) return Server(argv[2], port, std::atoi(argv[4]));
  if (mode == "client" && argc == 5) return Client(argv[2], port, std::strtoull(argv[4], 0, 10));
  if (mode == "hang") return Hang(argv[2], port);
  if (mode == "sink" && argc == 5) return Sink(argv[2], port, std::atoi(argv[4]));
  if (mode == "burst" && argc == 5) return Burst(argv[2], port, std::strtoull(argv[4], 0, 10));
  if (mode == "pingpong" && argc == 5) return Pingpong(argv[2], port, std::atoi(argv[4]));
  if (mode == "refused") return Refused(argv[2], port);
  if (mode == "timeout") return FailsWith(argv[2], port, ETIMEDOUT, "etimedout");
  if (mode == "unreachable") return FailsWith(argv[2], port, EHOSTUNREACH, "ehostunreach");
  std::fprintf(
      stderr,
      "usage: socket_calls server|client|hang|refused|timeout|unreachable|sink|burst|pingpong IP "
      "PORT [N]\n");
  return 2;
}
