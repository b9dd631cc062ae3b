// netch-demo: the foundation demo (see tools/steer_demo.h). Expects the test hosts to exist
// (scripts/demo creates them); prints what arrived through XDP/AF_XDP and what the kernel kept.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "absl/strings/numbers.h"
#include "tools/steer_demo.h"

namespace {

void Usage(FILE* f) {
  std::fprintf(f,
               "usage: netch-demo [--ns-tx NS] [--ns-rx NS] [--dev-tx IF] [--dev-rx IF]\n"
               "                  [--frames N] [--malformed N] [--payload BYTES] [--port P]\n"
               "                  [--no-kernel-traffic] [--json]\n"
               "Sends NetChannel frames from the tx host to the rx host, where the XDP program\n"
               "steers them into an AF_XDP socket; ping and kernel TCP run alongside.\n"
               "Defaults: netch-a/nc-a -> netch-b/nc-b, 2000 frames of 1200 B, 200 malformed.\n");
}

bool ParseU32(const char* s, uint32_t max, uint32_t* out) {
  uint32_t v;
  if (!absl::SimpleAtoi(s, &v) || v > max) return false;
  *out = v;
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  netch::tools::SteerDemoOptions o;
  bool json = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "netch-demo: %s needs a value\n", a.c_str());
        Usage(stderr);
        std::exit(2);
      }
      return argv[++i];
    };
    uint32_t v = 0;
    if (a == "--ns-tx")
      o.ns_tx = value();
    else if (a == "--ns-rx")
      o.ns_rx = value();
    else if (a == "--dev-tx")
      o.dev_tx = value();
    else if (a == "--dev-rx")
      o.dev_rx = value();
    else if (a == "--frames" && ParseU32(value(), 1000000, &v) && v > 0)
      o.frames = v;
    else if (a == "--malformed" && ParseU32(value(), 1000000, &v))
      o.malformed = v;
    else if (a == "--payload" && ParseU32(value(), 1400, &v))
      o.payload = v;
    else if (a == "--port" && ParseU32(value(), 65535, &v) && v > 0)
      o.port = static_cast<uint16_t>(v);
    else if (a == "--no-kernel-traffic")
      o.kernel_traffic = false;
    else if (a == "--json")
      json = true;
    else if (a == "-h" || a == "--help") {
      Usage(stdout);
      return 0;
    } else {
      std::fprintf(stderr, "netch-demo: bad argument '%s'%s\n", a.c_str(),
                   a.rfind("--", 0) == 0 && i < argc ? " (or bad value)" : "");
      Usage(stderr);
      return 2;
    }
  }
  auto r = netch::tools::RunSteerDemo(o);
  if (!r.ok()) {
    std::fprintf(stderr, "netch-demo: %s\n", r.status().ToString().c_str());
    return 1;
  }
  std::fputs(json ? (netch::tools::SteerDemoJson(*r) + "\n").c_str()
                  : netch::tools::FormatSteerDemo(o, *r).c_str(),
             stdout);
  const bool ok = r->received_intact == o.frames && r->received_duplicate == 0 &&
                  r->counters[NC_CNT_DROP_BAD_VERSION] == o.malformed &&
                  (!o.kernel_traffic || (r->ping_ok && r->tcp_intact));
  return ok ? 0 : 1;
}
