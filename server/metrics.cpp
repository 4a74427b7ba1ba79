#include "server/metrics.h"

#include <algorithm>

#include "absl/status/status.h"

namespace defkv::server {
namespace {

using prometheus::Histogram;

// Latency buckets from 1 ms (a decode step of a small model on a GPU) to 10+ minutes (long
// contexts on a CPU), roughly 1-2.5-5 per decade.
Histogram::BucketBoundaries LatencyBuckets() {
  return {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640};
}

// Inter-token latency: fine steps through the millisecond range where decode steps live
// (SGLang-style), then vLLM's coarser tail.
Histogram::BucketBoundaries InterTokenBuckets() {
  return {0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.008, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
          0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80};
}

// 1-2-5 steps over [lo, hi].
Histogram::BucketBoundaries OneTwoFive(double lo, double hi) {
  Histogram::BucketBoundaries b;
  for (double decade = lo; decade <= hi; decade *= 10)
    for (double m : {1.0, 2.0, 5.0})
      if (decade * m <= hi) b.push_back(decade * m);
  return b;
}

Histogram::BucketBoundaries RatioBuckets() {
  return {0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99};
}

}  // namespace

std::string CodeName(absl::StatusCode code) {
  std::string name = absl::StatusCodeToString(code);  // "INVALID_ARGUMENT", "OK", ...
  return name.empty() ? "UNKNOWN" : name;
}

Metrics::Metrics(const BuildInfo& build)
    : registry_(std::make_shared<prometheus::Registry>()),
      requests_(prometheus::BuildCounter()
                    .Name("defkv_requests_total")
                    .Help("Generate and GenerateStream RPCs finished, by press and gRPC status code")
                    .Register(*registry_)),
      ttft_(prometheus::BuildHistogram()
                .Name("defkv_time_to_first_token_seconds")
                .Help("Time from a request's arrival to its first generated token, queue included")
                .Register(*registry_)),
      compression_time_(prometheus::BuildHistogram()
                            .Name("defkv_compression_time_seconds")
                            .Help("Time spent scoring and compacting the context's KV cache")
                            .Register(*registry_)),
      compression_ratio_(prometheus::BuildHistogram()
                             .Name("defkv_compression_ratio")
                             .Help("Achieved fraction of context KV entries removed (1 - after/before)")
                             .Register(*registry_)),
      kv_tokens_(prometheus::BuildHistogram()
                     .Name("defkv_kv_cache_tokens")
                     .Help("Context KV cache size in tokens (entries per layer and kv head), before and "
                           "after compression")
                     .Register(*registry_)),
      kv_bytes_(prometheus::BuildHistogram()
                    .Name("defkv_kv_cache_bytes")
                    .Help("Context KV cache size in bytes (K and V), before and after compression")
                    .Register(*registry_)) {
  auto gauge = [&](const char* name, const char* help) {
    return &prometheus::BuildGauge().Name(name).Help(help).Register(*registry_).Add({});
  };
  auto histogram = [&](const char* name, const char* help, Histogram::BucketBoundaries buckets) {
    return &prometheus::BuildHistogram().Name(name).Help(help).Register(*registry_).Add({}, std::move(buckets));
  };
  auto counter = [&](const char* name, const char* help) {
    return &prometheus::BuildCounter().Name(name).Help(help).Register(*registry_).Add({});
  };
  running_ = gauge("defkv_num_requests_running", "Requests in the running batch (decoding or being prefilled)");
  waiting_ = gauge("defkv_num_requests_waiting", "Requests accepted and waiting for admission to the batch");
  kv_in_use_ = gauge("defkv_kv_cache_bytes_in_use",
                     "KV cache bytes reserved by running requests (full size while a context is prefilled, "
                     "compressed size after)");
  kv_free_ = gauge("defkv_kv_cache_bytes_free", "KV budget bytes not reserved by running requests");
  kv_budget_ = gauge("defkv_kv_cache_budget_bytes", "KV memory budget that admission counts against (--kv_cache_bytes)");
  decode_batch_ = histogram("defkv_decode_batch_size", "Sequences decoded together in one decode step",
                            Histogram::BucketBoundaries{1, 2, 4, 8, 16, 32, 64, 128, 256, 512});
  device_memory_ = gauge("defkv_device_memory_used_bytes",
                         "Memory in use on the serving device (process resident set size on CPU)");
  inter_token_ = histogram("defkv_inter_token_latency_seconds",
                           "Time between successive pieces of streamed text (one or more tokens)",
                           InterTokenBuckets());
  e2e_ = histogram("defkv_e2e_request_latency_seconds", "Time from a request's arrival to its last byte",
                   LatencyBuckets());
  queue_time_ = histogram("defkv_request_queue_time_seconds", "Time a request waited for the engine thread",
                          LatencyBuckets());
  prefill_ = histogram("defkv_request_prefill_time_seconds",
                       "Time prefilling context and question (compression excluded)", LatencyBuckets());
  decode_ = histogram("defkv_request_decode_time_seconds", "Time generating tokens after the prefill",
                      LatencyBuckets());
  prompt_tokens_ = counter("defkv_prompt_tokens_total", "Prompt tokens prefilled (context and question)");
  generation_tokens_ = counter("defkv_generation_tokens_total", "Tokens generated");
  prometheus::BuildGauge()
      .Name("defkv_build_info")
      .Help("Always 1; the labels say what is running")
      .Register(*registry_)
      .Add({{"version", build.version},
            {"grpc", build.grpc_version},
            {"model", build.model},
            {"device", build.device},
            {"dtype", build.dtype}})
      .Set(1);
}

void Metrics::RequestFinished(const std::string& press, absl::StatusCode code) {
  requests_.Add({{"press", press}, {"code", CodeName(code)}}).Increment();
}

void Metrics::RequestCompleted(const std::string& press, const engine::GenerateResult& result, double ttft_seconds,
                              double e2e_seconds, int64_t kv_entries_per_token) {
  const auto& u = result.usage;
  const auto& t = result.timings;
  ttft_.Add({{"press", press}}, LatencyBuckets()).Observe(ttft_seconds);
  compression_time_.Add({{"press", press}}, LatencyBuckets()).Observe(t.compression);
  if (u.kv_entries_before > 0)
    compression_ratio_.Add({{"press", press}}, RatioBuckets())
        .Observe(1.0 - static_cast<double>(u.kv_entries_after) / static_cast<double>(u.kv_entries_before));
  const double per_token = static_cast<double>(std::max<int64_t>(kv_entries_per_token, 1));
  kv_tokens_.Add({{"stage", "before"}}, OneTwoFive(1, 1e7)).Observe(u.kv_entries_before / per_token);
  kv_tokens_.Add({{"stage", "after"}}, OneTwoFive(1, 1e7)).Observe(u.kv_entries_after / per_token);
  kv_bytes_.Add({{"stage", "before"}}, OneTwoFive(1024, 1e11)).Observe(static_cast<double>(u.kv_bytes_before));
  kv_bytes_.Add({{"stage", "after"}}, OneTwoFive(1024, 1e11)).Observe(static_cast<double>(u.kv_bytes_after));
  e2e_->Observe(e2e_seconds);
  prefill_->Observe(t.prefill);
  decode_->Observe(t.decode);
  prompt_tokens_->Increment(static_cast<double>(u.context_tokens + u.question_tokens));
  generation_tokens_->Increment(static_cast<double>(u.generated_tokens));
}

}  // namespace defkv::server
