// defkv-bench-serve's measurements: what one request saw (RequestRecord), and what a run adds up
// to (Report). No gRPC here; tests/bench_serve feeds it hand-made records.
//
// Times are seconds on the client's steady clock, from the start of the measured run (after the
// warmup). Definitions, as vLLM's benchmark_serving uses them unless noted:
//   TTFT   first delta carrying token ids - send
//   ITL    gap between consecutive id-carrying deltas, divided by the ids in the later delta and
//          counted once per id (so percentiles are per token; vLLM counts one gap per chunk)
//   TPOT   per request: (last delta - first delta) / (ids after the first delta)
//   E2E    status received - send
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "client/bench_serve/workload.h"

namespace defkv::bench_serve {

struct Delta {
  double t = 0;        // arrival
  int32_t tokens = 0;  // ids it carried (> 0; deltas without ids are not recorded)
};

struct RequestRecord {
  int64_t index = 0;
  size_t group = 0;                   // into the mix
  int64_t target_context_tokens = 0;  // what the workload asked for
  int32_t max_new_tokens = 0;
  double scheduled = -1;  // open loop: the planned send time; -1 in closed loop
  double start = 0;       // the RPC was started
  double end = 0;         // its status arrived
  std::vector<Delta> deltas;
  std::string error_code;  // gRPC status name ("UNAVAILABLE"); empty when the request succeeded
  std::string error;       // its message
  // From the final message; zero / -1 when the request failed.
  int64_t context_tokens = 0, question_tokens = 0, output_tokens = 0;
  double server_queue = -1, server_total = -1;  // Timings.queue and Timings.total
  bool ok() const { return error_code.empty(); }
};

// Linear interpolation between closest ranks (numpy's default); p in [0, 100]. `sorted` must be
// sorted ascending and non-empty.
double Percentile(const std::vector<double>& sorted, double p);

// NaN fields when there are no values.
struct Summary {
  static constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
  size_t count = 0;
  double mean = kNaN, p50 = kNaN, p90 = kNaN, p95 = kNaN, p99 = kNaN, max = kNaN;
};
Summary Summarize(std::vector<double> values);

struct Latencies {
  Summary ttft, tpot, itl, e2e;
  Summary queue;  // the server's Timings.queue: time waiting for the engine
};

struct GroupStats {
  std::string label;  // "press:ratio"
  std::string press;
  double ratio = 0;
  double share = 0;  // of the mix's weight
  size_t sent = 0, completed = 0, failed = 0;
  int64_t output_tokens = 0;
  double mean_context_tokens = 0, mean_output_tokens = 0;
  double requests_per_s = 0, output_tokens_per_s = 0;
  Latencies latency;
};

struct ErrorStats {
  size_t count = 0;
  std::string example;  // the first message seen
};

struct Report {
  double duration_s = 0;  // run start to the last status
  size_t sent = 0, completed = 0, failed = 0;
  int64_t output_tokens = 0, input_tokens = 0;  // completed requests; input = context + question
  double requests_per_s = 0, output_tokens_per_s = 0, input_tokens_per_s = 0;
  // Ids received between the run start and the last send, over that span: the rate while the
  // load is held, before the in-flight requests drain. NaN when the last send is at time 0.
  double sending_s = 0;
  double output_tokens_per_s_while_sending = 0;
  // Requests in flight on the client (sent, status not yet in): time-weighted mean and maximum.
  double mean_in_flight = 0;
  int max_in_flight = 0;
  // Requests in the server's engine (Timings.total - Timings.queue of completed requests),
  // time-weighted over the run: with continuous batching, the sequences decoded together.
  double mean_in_engine = 0;
  double mean_context_tokens = 0, mean_target_context_tokens = 0, mean_output_tokens = 0;
  double max_send_lag_s = 0;  // open loop: latest send behind its schedule; NaN in closed loop
  Latencies latency;
  std::vector<GroupStats> groups;            // in mix order, all of them (sent or not)
  std::map<std::string, ErrorStats> errors;  // by gRPC status name
};

Report Aggregate(const std::vector<RequestRecord>& records, const std::vector<Group>& mix);

}  // namespace defkv::bench_serve
