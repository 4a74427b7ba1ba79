#include "client/bench_serve/stats.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <utility>

namespace defkv::bench_serve {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

double Rate(double amount, double seconds) { return seconds > 0 ? amount / seconds : kNaN; }
double Mean(double sum, size_t n) { return n ? sum / static_cast<double>(n) : kNaN; }

// The latency samples of a set of completed requests.
struct Samples {
  std::vector<double> ttft, tpot, itl, e2e, queue;

  void Add(const RequestRecord& r) {
    e2e.push_back(r.end - r.start);
    if (r.server_queue >= 0) queue.push_back(r.server_queue);
    if (r.deltas.empty()) return;
    ttft.push_back(r.deltas.front().t - r.start);
    int64_t after_first = 0;
    for (size_t k = 1; k < r.deltas.size(); ++k) {
      const Delta& d = r.deltas[k];
      const double per_token = (d.t - r.deltas[k - 1].t) / d.tokens;
      itl.insert(itl.end(), static_cast<size_t>(d.tokens), per_token);
      after_first += d.tokens;
    }
    if (after_first > 0) tpot.push_back((r.deltas.back().t - r.deltas.front().t) / static_cast<double>(after_first));
  }

  Latencies Summarize() && {
    Latencies l;
    l.ttft = bench_serve::Summarize(std::move(ttft));
    l.tpot = bench_serve::Summarize(std::move(tpot));
    l.itl = bench_serve::Summarize(std::move(itl));
    l.e2e = bench_serve::Summarize(std::move(e2e));
    l.queue = bench_serve::Summarize(std::move(queue));
    return l;
  }
};

// Largest number of [start, end) intervals that overlap; an end at the very time of a start
// frees its slot first.
int MaxOverlap(const std::vector<RequestRecord>& records) {
  std::vector<std::pair<double, int>> events;
  events.reserve(2 * records.size());
  for (const auto& r : records) events.emplace_back(r.start, +1), events.emplace_back(r.end, -1);
  std::sort(events.begin(), events.end());  // at equal times -1 sorts before +1
  int now = 0, most = 0;
  for (const auto& [t, step] : events) most = std::max(most, now += step);
  return most;
}

}  // namespace

double Percentile(const std::vector<double>& sorted, double p) {
  const double rank = std::clamp(p, 0.0, 100.0) / 100.0 * static_cast<double>(sorted.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(rank));
  const size_t hi = std::min(lo + 1, sorted.size() - 1);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - static_cast<double>(lo));
}

Summary Summarize(std::vector<double> values) {
  Summary s;
  s.count = values.size();
  if (values.empty()) return s;
  std::sort(values.begin(), values.end());
  s.mean = std::accumulate(values.begin(), values.end(), 0.0) / static_cast<double>(values.size());
  s.p50 = Percentile(values, 50), s.p90 = Percentile(values, 90), s.p95 = Percentile(values, 95);
  s.p99 = Percentile(values, 99), s.max = values.back();
  return s;
}

Report Aggregate(const std::vector<RequestRecord>& records, const std::vector<Group>& mix) {
  Report r;
  double total_weight = 0;
  for (const auto& g : mix) total_weight += g.weight;
  for (const auto& g : mix) {
    GroupStats gs;
    gs.label = g.Label(), gs.press = g.press, gs.ratio = g.ratio, gs.share = g.weight / total_weight;
    r.groups.push_back(std::move(gs));
  }
  Samples all;
  std::vector<Samples> per_group(mix.size());
  std::vector<double> group_context(mix.size(), 0.0);
  double busy = 0, engine = 0, context = 0, target_context = 0;
  bool open_loop = false;
  r.max_send_lag_s = 0;
  for (const auto& rec : records) {
    GroupStats& g = r.groups.at(rec.group);
    ++r.sent, ++g.sent;
    r.duration_s = std::max(r.duration_s, rec.end);
    r.sending_s = std::max(r.sending_s, rec.start);
    busy += rec.end - rec.start;
    target_context += static_cast<double>(rec.target_context_tokens);
    if (rec.scheduled >= 0) open_loop = true, r.max_send_lag_s = std::max(r.max_send_lag_s, rec.start - rec.scheduled);
    if (!rec.ok()) {
      ++r.failed, ++g.failed;
      ErrorStats& e = r.errors[rec.error_code];
      if (e.count++ == 0) e.example = rec.error;
      continue;
    }
    ++r.completed, ++g.completed;
    r.output_tokens += rec.output_tokens, g.output_tokens += rec.output_tokens;
    r.input_tokens += rec.context_tokens + rec.question_tokens;
    context += static_cast<double>(rec.context_tokens);
    group_context[rec.group] += static_cast<double>(rec.context_tokens);
    if (rec.server_total >= 0 && rec.server_queue >= 0) engine += std::max(0.0, rec.server_total - rec.server_queue);
    all.Add(rec);
    per_group[rec.group].Add(rec);
  }
  if (!open_loop) r.max_send_lag_s = kNaN;

  int64_t while_sending = 0;
  for (const auto& rec : records)
    for (const auto& d : rec.deltas)
      if (d.t <= r.sending_s) while_sending += d.tokens;

  r.requests_per_s = Rate(static_cast<double>(r.completed), r.duration_s);
  r.output_tokens_per_s = Rate(static_cast<double>(r.output_tokens), r.duration_s);
  r.input_tokens_per_s = Rate(static_cast<double>(r.input_tokens), r.duration_s);
  r.output_tokens_per_s_while_sending = Rate(static_cast<double>(while_sending), r.sending_s);
  r.mean_in_flight = Rate(busy, r.duration_s);
  r.max_in_flight = MaxOverlap(records);
  r.mean_in_engine = Rate(engine, r.duration_s);
  r.mean_context_tokens = Mean(context, r.completed);
  r.mean_target_context_tokens = Mean(target_context, r.sent);
  r.mean_output_tokens = Mean(static_cast<double>(r.output_tokens), r.completed);
  r.latency = std::move(all).Summarize();
  for (size_t i = 0; i < mix.size(); ++i) {
    GroupStats& g = r.groups[i];
    g.mean_context_tokens = Mean(group_context[i], g.completed);
    g.mean_output_tokens = Mean(static_cast<double>(g.output_tokens), g.completed);
    g.requests_per_s = Rate(static_cast<double>(g.completed), r.duration_s);
    g.output_tokens_per_s = Rate(static_cast<double>(g.output_tokens), r.duration_s);
    g.latency = std::move(per_group[i]).Summarize();
  }
  return r;
}

}  // namespace defkv::bench_serve
