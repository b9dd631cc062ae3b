// A program linking the installed NetChannel library: two stacks in one process over the
// in-process "loopback" driver (no privileges), one virtual socket each way, a message echoed.
#include <cstdio>
#include <cstring>
#include <string>

#include "vns_lib/vns.h"

int main() {
  using netch::vns::Stack;
  Stack* stacks[2] = {};
  std::unique_ptr<Stack> owned[2];
  for (int i = 0; i < 2; ++i) {
    netch::vns::StackOptions o;
    o.driver = "loopback";
    o.driver_opts.loopback_ipv4 = 0x7f000101u + i;
    auto s = Stack::Create(o);
    if (!s.ok()) {
      std::fprintf(stderr, "stack: %s\n", s.status().ToString().c_str());
      return 1;
    }
    owned[i] = std::move(*s);
    stacks[i] = owned[i].get();
  }
  auto l = stacks[1]->Listen(7);
  auto c = stacks[0]->Connect(0x7f000102u, 7);
  if (!l.ok() || !c.ok()) return 1;
  auto s = (*l)->Accept();
  if (!s.ok()) return 1;
  const std::string msg = "hello over NetChannel";
  (void)(*c)->Send({reinterpret_cast<const uint8_t*>(msg.data()), msg.size()});
  uint8_t buf[64];
  auto n = (*s)->Recv(buf);
  if (!n.ok()) return 1;
  (void)(*s)->Send({buf, *n});
  auto m = (*c)->Recv(buf);
  if (!m.ok()) return 1;
  std::printf("%.*s\n", static_cast<int>(*m), reinterpret_cast<char*>(buf));
  return std::string(reinterpret_cast<char*>(buf), *m) == msg ? 0 : 1;
}
