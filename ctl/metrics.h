// metrics.h - Prometheus metrics of a running stack (internal to ctl/): a prometheus-cpp pull
// exposer whose collector reads the XDP maps, the driver, every channel and socket at scrape
// time — nothing on the data path. docs/METRICS.md lists every metric.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace prometheus {
class Exposer;
struct MetricFamily;
}  // namespace prometheus

namespace netch::vns {
class Stack;
}

namespace netch::ctl {

class Controller;

std::vector<prometheus::MetricFamily> CollectMetrics(vns::Stack& stack, Controller& ctl);
// The text exposition format (what /metrics serves).
std::string MetricsText(vns::Stack& stack, Controller& ctl);

class MetricsExposer {
 public:
  // Binds `address` ("127.0.0.1:9464"); an error (e.g. the port is busy) is returned, not thrown.
  static absl::StatusOr<std::unique_ptr<MetricsExposer>> Start(const std::string& address,
                                                               vns::Stack* stack, Controller* c);
  ~MetricsExposer();

 private:
  MetricsExposer() = default;
  std::shared_ptr<void> collector_;
  std::unique_ptr<prometheus::Exposer> exposer_;
};

}  // namespace netch::ctl
