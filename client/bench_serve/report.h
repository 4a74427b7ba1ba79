// defkv-bench-serve's output: a Report as one JSON object (--json) or as text tables.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

#include "client/bench_serve/stats.h"

namespace defkv::bench_serve {

// {"totals": {...}, "latency": {"ttft_ms": {count, mean, p50, p90, p95, p99, max}, "tpot_ms",
// "itl_ms", "e2e_ms", "queue_ms"}, "groups": [...], "errors": {"CODE": {count, example}}}.
// Latencies are in milliseconds; NaN (no sample) becomes null. Keys keep this order.
nlohmann::ordered_json ToJson(const Report& r);

// The text report: `title`, the totals, a latency table, a per-group table and the errors.
std::string TextReport(const Report& r, const std::string& title);

}  // namespace defkv::bench_serve
