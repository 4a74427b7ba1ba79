#include "client/bench_serve/report.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace defkv::bench_serve {
namespace {

using json = nlohmann::ordered_json;

json Number(double v) { return std::isfinite(v) ? json(v) : json(nullptr); }

json Ms(const Summary& s) {
  return {{"count", s.count},           {"mean", Number(s.mean * 1e3)}, {"p50", Number(s.p50 * 1e3)},
          {"p90", Number(s.p90 * 1e3)}, {"p95", Number(s.p95 * 1e3)},   {"p99", Number(s.p99 * 1e3)},
          {"max", Number(s.max * 1e3)}};
}

json LatencyJson(const Latencies& l) {
  return {{"ttft_ms", Ms(l.ttft)},
          {"tpot_ms", Ms(l.tpot)},
          {"itl_ms", Ms(l.itl)},
          {"e2e_ms", Ms(l.e2e)},
          {"queue_ms", Ms(l.queue)}};
}

// A number for the text tables; "-" when there is none.
std::string F(double v, int decimals = 1) {
  return std::isfinite(v) ? absl::StrFormat("%.*f", decimals, v) : std::string("-");
}

std::string LatencyRow(const char* name, const Summary& s) {
  return absl::StrFormat("%-16s %7d %10s %10s %10s %10s %10s %10s\n", name, s.count, F(s.mean * 1e3, 2),
                         F(s.p50 * 1e3, 2), F(s.p90 * 1e3, 2), F(s.p95 * 1e3, 2), F(s.p99 * 1e3, 2), F(s.max * 1e3, 2));
}

std::string Triple(const Summary& s) { return absl::StrCat(F(s.p50 * 1e3), "/", F(s.p95 * 1e3), "/", F(s.p99 * 1e3)); }

}  // namespace

json ToJson(const Report& r) {
  json totals = {{"duration_s", Number(r.duration_s)},
                 {"sent", r.sent},
                 {"completed", r.completed},
                 {"failed", r.failed},
                 {"requests_per_s", Number(r.requests_per_s)},
                 {"output_tokens", r.output_tokens},
                 {"output_tokens_per_s", Number(r.output_tokens_per_s)},
                 {"sending_s", Number(r.sending_s)},
                 {"output_tokens_per_s_while_sending", Number(r.output_tokens_per_s_while_sending)},
                 {"input_tokens", r.input_tokens},
                 {"input_tokens_per_s", Number(r.input_tokens_per_s)},
                 {"mean_in_flight", Number(r.mean_in_flight)},
                 {"max_in_flight", r.max_in_flight},
                 {"mean_in_engine", Number(r.mean_in_engine)},
                 {"mean_context_tokens", Number(r.mean_context_tokens)},
                 {"mean_target_context_tokens", Number(r.mean_target_context_tokens)},
                 {"mean_output_tokens", Number(r.mean_output_tokens)},
                 {"max_send_lag_s", Number(r.max_send_lag_s)}};
  json groups = json::array();
  for (const auto& g : r.groups)
    groups.push_back({{"label", g.label},
                      {"press", g.press},
                      {"ratio", g.ratio},
                      {"share", g.share},
                      {"sent", g.sent},
                      {"completed", g.completed},
                      {"failed", g.failed},
                      {"output_tokens", g.output_tokens},
                      {"mean_context_tokens", Number(g.mean_context_tokens)},
                      {"mean_output_tokens", Number(g.mean_output_tokens)},
                      {"requests_per_s", Number(g.requests_per_s)},
                      {"output_tokens_per_s", Number(g.output_tokens_per_s)},
                      {"latency", LatencyJson(g.latency)}});
  json errors = json::object();
  for (const auto& [code, e] : r.errors) errors[code] = {{"count", e.count}, {"example", e.example}};
  return {{"totals", totals}, {"latency", LatencyJson(r.latency)}, {"groups", groups}, {"errors", errors}};
}

std::string TextReport(const Report& r, const std::string& title) {
  std::string out = absl::StrCat("== ", title, " ==\n");
  absl::StrAppendFormat(&out, "duration        %s s (sending %s s)\n", F(r.duration_s, 2), F(r.sending_s, 2));
  absl::StrAppendFormat(&out, "requests        %d sent, %d completed, %d failed; %s req/s\n", r.sent, r.completed,
                        r.failed, F(r.requests_per_s, 3));
  absl::StrAppendFormat(&out, "output tokens   %d; %s tok/s (%s while sending); %s per request\n", r.output_tokens,
                        F(r.output_tokens_per_s), F(r.output_tokens_per_s_while_sending), F(r.mean_output_tokens));
  absl::StrAppendFormat(&out, "input tokens    %d; %s tok/s; context %s per request (target %s)\n", r.input_tokens,
                        F(r.input_tokens_per_s), F(r.mean_context_tokens), F(r.mean_target_context_tokens));
  absl::StrAppendFormat(&out, "concurrency     in flight: mean %s, max %d; in the server's engine: mean %s\n",
                        F(r.mean_in_flight, 2), r.max_in_flight, F(r.mean_in_engine, 2));
  if (std::isfinite(r.max_send_lag_s))
    absl::StrAppendFormat(&out, "send lag        at most %s ms behind the arrival schedule\n",
                          F(r.max_send_lag_s * 1e3));

  absl::StrAppendFormat(&out, "\n%-16s %7s %10s %10s %10s %10s %10s %10s\n", "latency (ms)", "count", "mean", "p50",
                        "p90", "p95", "p99", "max");
  out += LatencyRow("TTFT", r.latency.ttft);
  out += LatencyRow("TPOT", r.latency.tpot);
  out += LatencyRow("ITL", r.latency.itl);
  out += LatencyRow("E2E", r.latency.e2e);
  out += LatencyRow("queue (server)", r.latency.queue);

  absl::StrAppendFormat(&out, "\n%-22s %6s %6s %6s %5s %9s %8s %9s %22s %22s\n", "group", "share", "sent", "ok", "fail",
                        "context", "output", "out tok/s", "TTFT p50/p95/p99 ms", "ITL p50/p95/p99 ms");
  for (const auto& g : r.groups)
    absl::StrAppendFormat(&out, "%-22s %6s %6d %6d %5d %9s %8s %9s %22s %22s\n", g.label, F(g.share, 3), g.sent,
                          g.completed, g.failed, F(g.mean_context_tokens), F(g.mean_output_tokens),
                          F(g.output_tokens_per_s), Triple(g.latency.ttft), Triple(g.latency.itl));

  if (!r.errors.empty()) {
    out += "\nerrors\n";
    for (const auto& [code, e] : r.errors) absl::StrAppendFormat(&out, "  %-20s %6d  %s\n", code, e.count, e.example);
  }
  return out;
}

}  // namespace defkv::bench_serve
