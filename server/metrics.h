// Prometheus metrics of defkv-server (docs/METRICS.md lists each one). The names follow
// spec/serving.md §2.7 with the prefix defkv_: base units, _total on counters, labels bounded to
// the press catalogue and the gRPC status codes.
#pragma once

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "core/engine/generator.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace defkv::server {

struct BuildInfo {
  std::string version, grpc_version, model, device, dtype;
};

class Metrics {
 public:
  explicit Metrics(const BuildInfo& build);

  std::shared_ptr<prometheus::Registry> registry() const { return registry_; }

  // Every finished RPC of Generate/GenerateStream, rejected ones included. `press` must be a
  // canonical name from the catalogue or "unknown" (keeps the label set bounded).
  void RequestFinished(const std::string& press, absl::StatusCode code);
  // A request the engine completed: stage times, cache sizes, token counts.
  void RequestCompleted(const std::string& press, const engine::GenerateResult& result, double ttft_seconds,
                        double e2e_seconds, int64_t kv_entries_per_token);
  void InterTokenLatency(double seconds) { inter_token_->Observe(seconds); }
  void QueueTime(double seconds) { queue_time_->Observe(seconds); }
  void DecodeBatch(double sequences) { decode_batch_->Observe(sequences); }

  prometheus::Gauge& running() { return *running_; }
  prometheus::Gauge& waiting() { return *waiting_; }
  prometheus::Gauge& kv_bytes_in_use() { return *kv_in_use_; }
  prometheus::Gauge& kv_bytes_free() { return *kv_free_; }
  prometheus::Gauge& kv_budget() { return *kv_budget_; }
  prometheus::Gauge& device_memory() { return *device_memory_; }

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Counter>& requests_;
  prometheus::Family<prometheus::Histogram>& ttft_;
  prometheus::Family<prometheus::Histogram>& compression_time_;
  prometheus::Family<prometheus::Histogram>& compression_ratio_;
  prometheus::Family<prometheus::Histogram>& kv_tokens_;
  prometheus::Family<prometheus::Histogram>& kv_bytes_;
  prometheus::Gauge* running_;
  prometheus::Gauge* waiting_;
  prometheus::Gauge* kv_in_use_;
  prometheus::Gauge* kv_free_;
  prometheus::Gauge* kv_budget_;
  prometheus::Histogram* decode_batch_;
  prometheus::Gauge* device_memory_;
  prometheus::Histogram* inter_token_;
  prometheus::Histogram* e2e_;
  prometheus::Histogram* queue_time_;
  prometheus::Histogram* prefill_;
  prometheus::Histogram* decode_;
  prometheus::Counter* prompt_tokens_;
  prometheus::Counter* generation_tokens_;
};

// Canonical upper-case name of a gRPC/absl status code ("OK", "INVALID_ARGUMENT", ...).
std::string CodeName(absl::StatusCode code);

}  // namespace defkv::server
