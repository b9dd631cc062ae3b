// netch-demo: the foundation demo (see tools/steer_demo.h). Expects the test hosts to exist
// (scripts/testhosts up); prints what arrived through XDP/AF_XDP and what the kernel kept.
#include <cstdio>
#include <string>

#include "CLI/CLI.hpp"
#include "tools/steer_demo.h"

int main(int argc, char** argv) {
  netch::tools::SteerDemoOptions o;
  bool json = false, no_kernel_traffic = false;
  CLI::App app{
      "netch-demo: sends NetChannel frames from the tx host to the rx host, where the XDP program "
      "steers them into an AF_XDP socket; ping and kernel TCP run alongside. Defaults: "
      "netch-a/nc-a -> netch-b/nc-b, 2000 frames of 1200 B, 200 malformed.",
      "netch-demo"};
  app.add_option("--ns-tx", o.ns_tx, "sending namespace");
  app.add_option("--ns-rx", o.ns_rx, "receiving namespace");
  app.add_option("--dev-tx", o.dev_tx, "sending interface");
  app.add_option("--dev-rx", o.dev_rx, "receiving interface");
  app.add_option("--frames", o.frames, "valid frames to send")->check(CLI::Range(1, 1'000'000));
  app.add_option("--malformed", o.malformed, "frames with a bad version (dropped and counted)")
      ->check(CLI::Range(0, 1'000'000));
  app.add_option("--payload", o.payload, "segment payload bytes")->check(CLI::Range(0, 1400));
  app.add_option("--port", o.port, "NetChannel UDP port")->check(CLI::Range(1, 65535));
  app.add_flag("--no-kernel-traffic", no_kernel_traffic, "no ping and TCP alongside");
  app.add_flag("--json", json, "one JSON object");
  CLI11_PARSE(app, argc, argv);
  o.kernel_traffic = !no_kernel_traffic;
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
