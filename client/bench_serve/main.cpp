// defkv-bench-serve: the serving load generator. It sends GenerateStream requests to a running
// defkv-server, closed loop (N in flight) or open loop (gamma/Poisson arrivals at a rate), with
// presses, ratios, context lengths and output lengths drawn from the command line's
// distributions, and reports throughput, concurrency and TTFT / TPOT / ITL / E2E percentiles,
// overall and per (press, ratio) group. gRPC only; it never links core/.
//
// Each request runs on its own thread with the synchronous streaming API, so a delta's arrival is
// timed on the thread that reads it. Closed loop: --concurrency threads, each sending its next
// request as soon as the previous one ends. Open loop: the main thread sleeps until each arrival
// and hands the request to an idle thread, starting a new one when none is idle (at most
// --max-concurrency; beyond that arrivals wait, and the wait shows as send lag).
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <fstream>
#include <iostream>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "client/bench_serve/report.h"
#include "client/bench_serve/stats.h"
#include "client/bench_serve/workload.h"
#include "client/common.h"
#include "defkv/v1/defkv.grpc.pb.h"

namespace {

namespace pb = defkv::v1;
namespace bs = defkv::bench_serve;
using defkv::client::Args;
using defkv::client::Has;
using defkv::client::Last;
using Clock = std::chrono::steady_clock;
constexpr int kUsageError = 64;

constexpr const char* kUsage = R"(usage: defkv-bench-serve [--addr HOST:PORT] [options]

Sends GenerateStream requests to a running defkv-server and reports requests/s, output tokens/s,
concurrency, and TTFT / TPOT / ITL / E2E latency percentiles, overall and per (press, ratio).

load:
  --mode closed|open      closed (default): --concurrency requests always in flight
                          open: arrivals at --rate per second, whatever the server's pace
  --concurrency N         closed loop: requests in flight (default 1)
  --rate R                open loop: mean arrivals per second (inf: all at once)
  --burstiness B          open loop: shape of the gamma-distributed gaps (default 1: Poisson)
  --max-concurrency N     open loop: at most N in flight; later arrivals wait (default: no cap)
  --requests N            requests to send (default 100, or no limit with --duration)
  --duration S            stop sending after S seconds; requests in flight still finish
  --warmup K              K requests before the measured run, not counted (default 1); sent
                          --concurrency at a time (closed loop) or one at a time (open loop)
  --channels K            spread requests over K connections (default 1)

workload (request i is a function of --seed and i, in either mode):
  --mix SPEC              PRESS[:RATIO][=WEIGHT],... (default none); e.g. snapkv:0.8=3,none=1
  --context-tokens D      context length in tokens (default 1024)
  --max-new-tokens D      tokens to generate at most (default 128); the API has no ignore-eos, so
                          a request that meets the end-of-sequence token stops early
                          D is N, A,B,C (A=w,B=w: weighted) or uniform:LO:HI
  --option [PRESS/]K=V    press option for every press, or for PRESS only; repeatable
  --question Q            asked after each context (default: a one-sentence summary request)
  --temperature T         default 0 (greedy); each request samples with its own seed
  --no-chat-template      send use_chat_template=false
  --seed S                default 0
  --chars-per-token C     size contexts with C characters per token instead of calibrating:
                          by default two prefill-only requests (max_new_tokens 0) fit the
                          served tokenizer's characters per token and fixed overhead

report (times from the first measured send; latencies of completed requests; docs/PERFORMANCE.md):
  TTFT      first delta carrying token ids     TPOT  (last delta - first delta) / later ids
  ITL       gap between deltas / ids in the later delta, counted per id     E2E  until the status
  in flight requests sent and not answered: time-weighted mean and max
  in engine the server's Timings.total - Timings.queue, summed, over the run time
  output tokens/s while sending: ids received up to the last send, over that span
  errors    by gRPC status name; a failed request never ends the run

output:
  --json                  print one JSON object on stdout (config, totals, latency, groups,
                          errors) instead of the text report
  --save-requests FILE    one JSON line per measured request
  --no-progress           no progress line on stderr (default: once a second on a terminal,
                          every 10 seconds otherwise)

global: --addr (default 127.0.0.1:50051, or $DEFKV_ADDR), --timeout seconds per request
        (default 600; 0: none), --token T (or $DEFKV_TOKEN), --tls_ca F, --tls_cert F
        --tls_key F: as for the defkv CLI
Ctrl-C stops sending: the requests in flight finish and the report is printed (a second Ctrl-C
quits at once).
exit code: 0 when at least one request succeeded; 1 when every request failed; the gRPC status
code when the server cannot be reached at start; 64 on a bad command line
)";

// Set by the first SIGINT: no new request is sent, the run ends when the ones in flight do.
std::atomic<bool> g_stop{false};
static_assert(std::atomic<bool>::is_always_lock_free, "g_stop is written from a signal handler");

void OnInterrupt(int) { g_stop.store(true); }

// SA_RESETHAND: the second SIGINT gets the default action and ends the process.
void CatchInterrupt() {
  struct sigaction sa = {};
  sa.sa_handler = OnInterrupt;
  sa.sa_flags = SA_RESETHAND;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, nullptr);
}

const std::vector<std::string> kSwitches = {"json", "no-chat-template", "no-progress", "help"};
const std::set<std::string> kOptions = {
    "addr",     "timeout",     "token",       "tls_ca",     "tls_cert",        "tls_key",
    "mode",     "concurrency", "rate",        "burstiness", "max-concurrency", "requests",
    "duration", "warmup",      "channels",    "mix",        "context-tokens",  "max-new-tokens",
    "option",   "question",    "temperature", "seed",       "chars-per-token", "save-requests"};

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

double ToDouble(const std::string& s, const std::string& what) {
  if (s == "inf") return INFINITY;
  try {
    size_t used = 0;
    const double v = std::stod(s, &used);
    if (used == s.size() && std::isfinite(v)) return v;
  } catch (const std::exception&) {
  }
  throw UsageError("bad number for " + what + ": '" + s + "'");
}

long long ToInt(const std::string& s, const std::string& what, long long min) {
  const double v = ToDouble(s, what);
  if (v != std::floor(v) || v < static_cast<double>(min))
    throw UsageError(absl::StrCat(what, " wants an integer >= ", min, ", got '", s, "'"));
  return static_cast<long long>(v);
}

bs::IntDistribution Distribution(const Args& a, const std::string& name, const std::string& fallback) {
  auto d = bs::IntDistribution::Parse(Last(a, name, fallback));
  if (!d.ok()) throw UsageError(absl::StrCat("--", name, ": ", d.status().message()));
  return *std::move(d);
}

std::string HoursMinutesSeconds(double s) {
  if (!std::isfinite(s) || s < 0) return "--:--";
  const long t = std::lround(s);
  return t >= 3600 ? absl::StrFormat("%d:%02d:%02d", t / 3600, t / 60 % 60, t % 60)
                   : absl::StrFormat("%02d:%02d", t / 60, t % 60);
}

struct Config {
  std::string addr;
  double timeout_s = 600;
  std::string token;
  bool open_loop = false;
  int concurrency = 1;
  double rate = 0, burstiness = 1;
  int max_concurrency = 0;   // open loop; 0: no cap
  long long requests = 100;  // -1: no limit (with --duration)
  double duration_s = 0;     // 0: no limit
  int warmup = 1;
  int channels = 1;
  bs::Workload workload;
  uint64_t seed = 0;
  std::map<std::string, std::string> options;                               // every press
  std::map<std::string, std::map<std::string, std::string>> press_options;  // PRESS/K=V
  std::string question = "Summarize the text above in one sentence.";
  double temperature = 0;
  bool chat_template = true;
  std::optional<double> chars_per_token;
  bool json = false, progress = true;
  std::string save_requests;
};

Config ParseConfig(const Args& a) {
  for (const auto& [name, values] : a.values)
    if (!kOptions.count(name)) throw UsageError("unknown option --" + name);
  Config c;
  const char* env_addr = std::getenv("DEFKV_ADDR");
  c.addr = Last(a, "addr", env_addr ? env_addr : "127.0.0.1:50051");
  c.timeout_s = ToDouble(Last(a, "timeout", "600"), "--timeout");
  c.token = defkv::client::BearerToken(a);
  const std::string mode = Last(a, "mode", "closed");
  if (mode != "closed" && mode != "open") throw UsageError("--mode is closed or open, got '" + mode + "'");
  c.open_loop = mode == "open";
  if (c.open_loop) {
    if (!Has(a, "rate")) throw UsageError("--mode open needs --rate");
    if (Has(a, "concurrency")) throw UsageError("--concurrency is for --mode closed (open loop: --max-concurrency)");
    c.rate = ToDouble(Last(a, "rate"), "--rate");
    if (!(c.rate > 0)) throw UsageError("--rate must be > 0");
    c.burstiness = ToDouble(Last(a, "burstiness", "1"), "--burstiness");
    if (!(c.burstiness > 0) || std::isinf(c.burstiness)) throw UsageError("--burstiness must be > 0");
    c.max_concurrency = static_cast<int>(ToInt(Last(a, "max-concurrency", "0"), "--max-concurrency", 0));
  } else {
    for (const char* f : {"rate", "burstiness", "max-concurrency"})
      if (Has(a, f)) throw UsageError(absl::StrCat("--", f, " is for --mode open"));
    c.concurrency = static_cast<int>(ToInt(Last(a, "concurrency", "1"), "--concurrency", 1));
  }
  if (Has(a, "duration")) {
    c.duration_s = ToDouble(Last(a, "duration"), "--duration");
    if (!(c.duration_s > 0) || std::isinf(c.duration_s)) throw UsageError("--duration must be > 0 seconds");
  }
  c.requests = Has(a, "requests") ? ToInt(Last(a, "requests"), "--requests", 1) : (c.duration_s > 0 ? -1 : 100);
  if (c.open_loop && std::isinf(c.rate) && c.requests < 0) throw UsageError("--rate inf needs --requests");
  c.warmup = static_cast<int>(ToInt(Last(a, "warmup", "1"), "--warmup", 0));
  c.channels = static_cast<int>(ToInt(Last(a, "channels", "1"), "--channels", 1));

  auto mix = bs::ParseMix(Last(a, "mix", "none"));
  if (!mix.ok()) throw UsageError(absl::StrCat("--mix: ", mix.status().message()));
  c.workload.mix = *std::move(mix);
  c.workload.context_tokens = Distribution(a, "context-tokens", "1024");
  c.workload.max_new_tokens = Distribution(a, "max-new-tokens", "128");
  if (c.workload.max_new_tokens.Max() > INT32_MAX) throw UsageError("--max-new-tokens is too large");
  c.seed = static_cast<uint64_t>(ToInt(Last(a, "seed", "0"), "--seed", 0));
  if (auto it = a.values.find("option"); it != a.values.end())
    for (const auto& kv : it->second) {
      const auto eq = kv.find('=');
      if (eq == std::string::npos || eq == 0) throw UsageError("--option wants [PRESS/]NAME=VALUE, got '" + kv + "'");
      const std::string key = kv.substr(0, eq), value = kv.substr(eq + 1);
      if (const auto slash = key.find('/'); slash != std::string::npos)
        c.press_options[key.substr(0, slash)][key.substr(slash + 1)] = value;
      else
        c.options[key] = value;
    }
  c.question = Last(a, "question", c.question);
  if (c.question.empty()) throw UsageError("--question must not be empty");
  c.temperature = ToDouble(Last(a, "temperature", "0"), "--temperature");
  c.chat_template = !a.switches.count("no-chat-template");
  if (Has(a, "chars-per-token")) {
    c.chars_per_token = ToDouble(Last(a, "chars-per-token"), "--chars-per-token");
    if (!(*c.chars_per_token > 0)) throw UsageError("--chars-per-token must be > 0");
  }
  c.json = a.switches.count("json") > 0;
  c.progress = !a.switches.count("no-progress");
  c.save_requests = Last(a, "save-requests");
  return c;
}

// The requests, their sending and their timing. Thread-safe: RunOne is called from many threads.
class Bench {
 public:
  // `no_press` holds "none" and its aliases: press options never go to those groups.
  Bench(const Config& c, const std::vector<std::shared_ptr<grpc::Channel>>& channels, bs::TokenEstimate estimate,
        std::set<std::string> no_press)
      : c_(c), estimate_(estimate), no_press_(std::move(no_press)) {
    for (const auto& ch : channels) stubs_.push_back(pb::DefKV::NewStub(ch));
  }

  pb::GenerateRequest Request(const bs::RequestSpec& spec, const std::string& id) const {
    const bs::Group& g = c_.workload.mix.at(spec.group);
    pb::GenerateRequest req;
    req.set_context(bs::SyntheticText(spec.seed, estimate_.Chars(spec.context_tokens)));
    req.set_question(c_.question);
    req.set_press(g.press);
    req.set_compression_ratio(g.ratio);
    if (!no_press_.count(g.press)) {
      for (const auto& [k, v] : c_.options) (*req.mutable_press_options())[k] = v;
      if (auto it = c_.press_options.find(g.press); it != c_.press_options.end())
        for (const auto& [k, v] : it->second) (*req.mutable_press_options())[k] = v;
    }
    req.set_max_new_tokens(spec.max_new_tokens);
    req.set_temperature(c_.temperature);
    req.set_seed(spec.seed);
    req.set_use_chat_template(c_.chat_template);
    req.set_request_id(id);
    return req;
  }

  // Sends request `index` of the workload seeded by `seed`, timing it from `t0`.
  bs::RequestRecord RunOne(uint64_t seed, int64_t index, Clock::time_point t0, double scheduled,
                           const std::string& id_prefix) {
    const bs::RequestSpec spec = bs::MakeSpec(c_.workload, seed, index);
    const pb::GenerateRequest req = Request(spec, absl::StrCat(id_prefix, index));
    bs::RequestRecord rec;
    rec.index = index, rec.group = spec.group, rec.target_context_tokens = spec.context_tokens;
    rec.max_new_tokens = spec.max_new_tokens, rec.scheduled = scheduled;
    auto since = [t0] { return std::chrono::duration<double>(Clock::now() - t0).count(); };

    grpc::ClientContext ctx;
    defkv::client::PrepareContext(ctx, c_.token, c_.timeout_s);
    in_flight_.fetch_add(1);
    rec.start = since();
    auto reader = stubs_[static_cast<size_t>(index) % stubs_.size()]->GenerateStream(&ctx, req);
    pb::GenerateStreamResponse msg;
    bool final_seen = false;
    while (reader->Read(&msg)) {
      const double now = since();
      if (msg.has_delta() && msg.delta().token_ids_size() > 0)
        rec.deltas.push_back({now, msg.delta().token_ids_size()});
      if (msg.has_final()) {
        final_seen = true;
        const auto& u = msg.final().usage();
        rec.context_tokens = u.context_tokens(), rec.question_tokens = u.question_tokens();
        rec.output_tokens = u.generated_tokens();
        rec.server_queue = msg.final().timings().queue(), rec.server_total = msg.final().timings().total();
      }
    }
    const grpc::Status status = reader->Finish();
    rec.end = since();
    in_flight_.fetch_sub(1);
    if (!status.ok()) {
      rec.error_code = defkv::client::StatusCodeName(status.error_code());
      rec.error = status.error_message();
    } else if (!final_seen) {
      rec.error_code = "NO_FINAL_MESSAGE";
      rec.error = "the stream ended OK without its final message";
    }
    done_.fetch_add(1);
    if (!rec.ok()) failed_.fetch_add(1);
    return rec;
  }

  int in_flight() const { return in_flight_.load(); }
  int64_t done() const { return done_.load(); }
  int64_t failed() const { return failed_.load(); }
  void ResetCounters() { done_ = 0, failed_ = 0; }

 private:
  const Config& c_;
  bs::TokenEstimate estimate_;
  std::set<std::string> no_press_;
  std::vector<std::unique_ptr<pb::DefKV::Stub>> stubs_;
  std::atomic<int> in_flight_{0};
  std::atomic<int64_t> done_{0}, failed_{0};
};

// Collects records from many threads.
class Records {
 public:
  void Add(bs::RequestRecord r) {
    std::lock_guard lock(mu_);
    records_.push_back(std::move(r));
  }
  std::vector<bs::RequestRecord> Take() {
    std::lock_guard lock(mu_);
    std::sort(records_.begin(), records_.end(), [](const auto& x, const auto& y) { return x.index < y.index; });
    return std::move(records_);
  }

 private:
  std::mutex mu_;
  std::vector<bs::RequestRecord> records_;
};

// Closed loop: `threads` senders, each starting its next request when the previous one ends, until
// `requests` are sent (-1: no limit) or `duration_s` has passed (0: no limit).
void RunClosed(Bench& bench, uint64_t seed, int threads, long long requests, double duration_s, Clock::time_point t0,
               const std::string& id_prefix, Records& out) {
  std::atomic<long long> next{0};
  auto sender = [&] {
    for (;;) {
      if (g_stop.load()) return;
      if (duration_s > 0 && Clock::now() - t0 >= std::chrono::duration<double>(duration_s)) return;
      const long long i = next++;
      if (requests >= 0 && i >= requests) return;
      out.Add(bench.RunOne(seed, i, t0, -1, id_prefix));
    }
  };
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) pool.emplace_back(sender);
  for (auto& t : pool) t.join();
}

// Open loop: arrivals from the schedule, each handed to an idle sender thread (a new one when none
// is idle, up to `max_threads`; 0: no cap).
void RunOpen(Bench& bench, const Config& c, Clock::time_point t0, Records& out) {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::pair<long long, double>> queue;  // (index, scheduled time)
  int idle = 0;
  bool closed = false;
  std::vector<std::thread> pool;
  auto sender = [&] {
    std::unique_lock lock(mu);
    for (;;) {
      ++idle;
      cv.wait(lock, [&] { return !queue.empty() || closed; });
      --idle;
      if (queue.empty()) return;
      const auto [index, scheduled] = queue.front();
      queue.pop_front();
      if (g_stop.load()) continue;  // held back by --max-concurrency and never sent: dropped
      lock.unlock();
      out.Add(bench.RunOne(c.seed, index, t0, scheduled, "bench-"));
      lock.lock();
    }
  };
  bs::ArrivalSchedule schedule(std::isinf(c.rate) ? 1.0 : c.rate, c.burstiness, c.seed);
  for (long long i = 0; c.requests < 0 || i < c.requests; ++i) {
    const double at = std::isinf(c.rate) ? 0.0 : schedule.Next();
    if (c.duration_s > 0 && at >= c.duration_s) break;
    const auto due = t0 + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(at));
    while (!g_stop.load() && Clock::now() < due)  // short naps, so that Ctrl-C is seen soon
      std::this_thread::sleep_until(std::min(due, Clock::now() + std::chrono::milliseconds(100)));
    if (g_stop.load()) break;
    std::lock_guard lock(mu);
    queue.emplace_back(i, at);
    if (static_cast<int>(queue.size()) > idle &&
        (c.max_concurrency == 0 || static_cast<int>(pool.size()) < c.max_concurrency))
      pool.emplace_back(sender);
    else
      cv.notify_one();
  }
  {
    std::lock_guard lock(mu);
    closed = true;
  }
  cv.notify_all();
  for (auto& t : pool) t.join();
}

// A progress line on stderr while a run is going: at most once a second on a terminal, every ten
// seconds otherwise.
class Progress {
 public:
  Progress(const Bench& bench, const Config& c, Clock::time_point t0) : bench_(bench), c_(c), t0_(t0) {
    if (!c.progress) return;
    thread_ = std::thread([this] { Loop(); });
  }
  ~Progress() {
    if (!thread_.joinable()) return;
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
    Print(true);
  }

 private:
  void Loop() {
    const auto every = std::chrono::seconds(tty_ ? 1 : 10);
    std::unique_lock lock(mu_);
    while (!cv_.wait_for(lock, every, [this] { return stop_; })) Print(false);
  }

  void Print(bool final) const {
    const double elapsed = std::chrono::duration<double>(Clock::now() - t0_).count();
    const int64_t done = bench_.done();
    double eta = NAN;
    if (c_.requests >= 0 && done > 0)
      eta = elapsed / static_cast<double>(done) * static_cast<double>(c_.requests - done);
    if (c_.duration_s > 0) eta = std::isfinite(eta) ? std::min(eta, c_.duration_s - elapsed) : c_.duration_s - elapsed;
    const std::string total = c_.requests >= 0 ? std::to_string(c_.requests) : "?";
    std::fprintf(stderr, "%s[%lld/%s] %.2f req/s  in flight %d  failed %lld  elapsed %s  ETA %s%s", tty_ ? "\r" : "",
                 static_cast<long long>(done), total.c_str(), elapsed > 0 ? done / elapsed : 0.0, bench_.in_flight(),
                 static_cast<long long>(bench_.failed()), HoursMinutesSeconds(elapsed).c_str(),
                 HoursMinutesSeconds(final ? 0 : eta).c_str(), tty_ && !final ? "   " : "\n");
  }

  const Bench& bench_;
  const Config& c_;
  const Clock::time_point t0_;
  const bool tty_ = isatty(STDERR_FILENO);
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;
};

grpc::Status Call(const Config& c, double timeout_s, auto&& rpc) {
  grpc::ClientContext ctx;
  defkv::client::PrepareContext(ctx, c.token, timeout_s);
  return rpc(&ctx);
}

std::string Describe(const grpc::Status& s) {
  return absl::StrCat(defkv::client::StatusCodeName(s.error_code()), ": ", s.error_message());
}

// Fits the served tokenizer's characters per token on SyntheticText with two prefill-only
// requests, sized well inside the server's prompt limit.
bs::TokenEstimate Calibrate(const Config& c, pb::DefKV::Stub& stub, int64_t prompt_limit) {
  if (c.chars_per_token) return bs::TokenEstimate{*c.chars_per_token, 0};
  const int64_t budget = std::clamp<int64_t>(prompt_limit / 2, 64, 8192);
  const size_t chars2 = static_cast<size_t>(budget), chars1 = chars2 / 2;  // at least 1 char per token
  int64_t tokens[2];
  for (int i = 0; i < 2; ++i) {
    pb::GenerateRequest req;
    req.set_context(bs::SyntheticText(bs::MixSeed(c.seed, 5, i), i == 0 ? chars1 : chars2));
    req.set_question(c.question);
    req.set_press("none");
    req.set_max_new_tokens(0);
    req.set_use_chat_template(c.chat_template);
    req.set_request_id(absl::StrCat("bench-calibrate-", i));
    pb::GenerateResponse resp;
    const auto st =
        Call(c, std::max(c.timeout_s, 0.0), [&](grpc::ClientContext* ctx) { return stub.Generate(ctx, req, &resp); });
    if (!st.ok()) throw std::runtime_error("calibrating characters per token: " + Describe(st));
    tokens[i] = resp.usage().context_tokens();
  }
  auto fit = bs::FitTokens(chars1, tokens[0], chars2, tokens[1]);
  if (!fit.ok()) throw std::runtime_error(absl::StrCat("calibrating characters per token: ", fit.status().message()));
  return *fit;
}

std::string Title(const Config& c, const pb::ModelInfo& info) {
  std::string load =
      c.open_loop
          ? absl::StrFormat("open loop, %g req/s%s%s", c.rate,
                            c.burstiness != 1 ? absl::StrFormat(" (burstiness %g)", c.burstiness) : "",
                            c.max_concurrency ? absl::StrFormat(", at most %d in flight", c.max_concurrency) : "")
          : absl::StrFormat("closed loop, %d in flight", c.concurrency);
  std::vector<std::string> mix;
  for (const auto& g : c.workload.mix) mix.push_back(absl::StrFormat("%s=%g", g.Label(), g.weight));
  return absl::StrFormat("defkv-bench-serve: %s; mix %s; context %s tokens; max_new_tokens %s; %s (%s, %s) at %s", load,
                         absl::StrJoin(mix, ","), c.workload.context_tokens.spec(), c.workload.max_new_tokens.spec(),
                         info.model_dir(), info.device(), info.dtype(), c.addr);
}

nlohmann::ordered_json ConfigJson(const Config& c, const pb::ModelInfo& info, const bs::TokenEstimate& est) {
  nlohmann::ordered_json mix = nlohmann::ordered_json::array();
  for (const auto& g : c.workload.mix) mix.push_back({{"press", g.press}, {"ratio", g.ratio}, {"weight", g.weight}});
  nlohmann::ordered_json j = {
      {"addr", c.addr},
      {"mode", c.open_loop ? "open" : "closed"},
      {"requests", c.requests >= 0 ? nlohmann::ordered_json(c.requests) : nlohmann::ordered_json(nullptr)},
      {"duration_s", c.duration_s > 0 ? nlohmann::ordered_json(c.duration_s) : nlohmann::ordered_json(nullptr)},
      {"warmup", c.warmup},
      {"channels", c.channels},
      {"mix", mix},
      {"context_tokens", c.workload.context_tokens.spec()},
      {"max_new_tokens", c.workload.max_new_tokens.spec()},
      {"seed", c.seed},
      {"temperature", c.temperature},
      {"chat_template", c.chat_template},
      {"question", c.question},
      {"chars_per_token", est.chars_per_token},
      {"overhead_tokens", est.overhead_tokens},
      {"calibrated", !c.chars_per_token.has_value()},
      {"timeout_s", c.timeout_s},
      {"server",
       {{"model_dir", info.model_dir()},
        {"model_type", info.model_type()},
        {"device", info.device()},
        {"dtype", info.dtype()},
        {"max_context_tokens", info.max_context_tokens()},
        {"server_version", info.server_version()}}}};
  if (c.open_loop) {
    j["rate"] = std::isinf(c.rate) ? nlohmann::ordered_json("inf") : nlohmann::ordered_json(c.rate);
    j["burstiness"] = c.burstiness;
    j["max_concurrency"] =
        c.max_concurrency ? nlohmann::ordered_json(c.max_concurrency) : nlohmann::ordered_json(nullptr);
  } else {
    j["concurrency"] = c.concurrency;
  }
  if (!c.options.empty() || !c.press_options.empty()) {
    nlohmann::ordered_json o = c.options;
    for (const auto& [press, opts] : c.press_options)
      for (const auto& [k, v] : opts) o[press + "/" + k] = v;
    j["options"] = o;
  }
  return j;
}

void SaveRequests(const std::string& path, const std::vector<bs::RequestRecord>& records, const Config& c) {
  std::ofstream out(path);
  if (!out) throw std::runtime_error("cannot write --save-requests " + path);
  for (const auto& r : records) {
    nlohmann::json j = {
        {"index", r.index},
        {"group", c.workload.mix[r.group].Label()},
        {"target_context_tokens", r.target_context_tokens},
        {"max_new_tokens", r.max_new_tokens},
        {"start_s", r.start},
        {"end_s", r.end},
        {"ttft_s", r.deltas.empty() ? nlohmann::json(nullptr) : nlohmann::json(r.deltas[0].t - r.start)},
        {"deltas", r.deltas.size()},
        {"context_tokens", r.context_tokens},
        {"question_tokens", r.question_tokens},
        {"output_tokens", r.output_tokens}};
    if (r.scheduled >= 0) j["scheduled_s"] = r.scheduled;
    if (r.server_total >= 0) j["server_queue_s"] = r.server_queue, j["server_total_s"] = r.server_total;
    if (!r.ok()) j["error_code"] = r.error_code, j["error"] = r.error;
    out << j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
  }
}

int Main(int argc, char** argv) {
  std::string error;
  auto parsed = defkv::client::ParseArgs(argc, argv, kSwitches, &error);
  if (!parsed) throw UsageError(error);
  const Args& a = *parsed;
  if (a.switches.count("help")) {
    std::cout << kUsage;
    return 0;
  }
  if (!a.command.empty()) throw UsageError("unexpected argument '" + a.command + "'");
  const Config c = ParseConfig(a);
  std::string cred_error;
  auto creds = defkv::client::Credentials(a, &cred_error);
  if (!creds) throw UsageError(cred_error);
  std::vector<std::shared_ptr<grpc::Channel>> channels;
  for (int k = 0; k < c.channels; ++k) {
    grpc::ChannelArguments args;
    // Channels with distinct arguments and a local subchannel pool get connections of their own.
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    args.SetInt("defkv.bench_channel", k);
    channels.push_back(defkv::client::MakeChannel(c.addr, creds, args));
  }
  auto stub = pb::DefKV::NewStub(channels[0]);

  pb::ModelInfo info;
  if (const auto st = Call(c, 10, [&](grpc::ClientContext* ctx) { return stub->GetModelInfo(ctx, {}, &info); });
      !st.ok()) {
    std::fprintf(stderr, "defkv-bench-serve: cannot reach %s: %s\n", c.addr.c_str(), Describe(st).c_str());
    return static_cast<int>(st.error_code());
  }
  pb::ListPressesResponse presses;
  if (const auto st = Call(c, 10, [&](grpc::ClientContext* ctx) { return stub->ListPresses(ctx, {}, &presses); });
      !st.ok()) {
    std::fprintf(stderr, "defkv-bench-serve: ListPresses: %s\n", Describe(st).c_str());
    return static_cast<int>(st.error_code());
  }
  std::set<std::string> known, no_press = {"none"};
  for (const auto& p : presses.presses()) {
    known.insert(p.name());
    known.insert(p.aliases().begin(), p.aliases().end());
    if (p.name() == "none") no_press.insert(p.aliases().begin(), p.aliases().end());
  }
  for (const auto& g : c.workload.mix)
    if (!known.count(g.press))
      throw UsageError(
          absl::StrCat("--mix: the server has no press '", g.press, "' (", absl::StrJoin(known, ", "), ")"));
  const int64_t prompt_limit = info.max_context_tokens() > 0 ? info.max_context_tokens() : info.max_context();
  if (prompt_limit > 0 && c.workload.context_tokens.Max() >= prompt_limit)
    throw UsageError(absl::StrCat("--context-tokens reaches ", c.workload.context_tokens.Max(),
                                  " tokens; the server accepts prompts (context + question tokens) of at most ",
                                  prompt_limit));
  if (info.max_new_tokens_limit() > 0 && c.workload.max_new_tokens.Max() > info.max_new_tokens_limit())
    throw UsageError(absl::StrCat("--max-new-tokens reaches ", c.workload.max_new_tokens.Max(),
                                  "; the server allows at most ", info.max_new_tokens_limit()));

  const bs::TokenEstimate estimate = Calibrate(c, *stub, prompt_limit);
  std::fprintf(stderr, "defkv-bench-serve: %s serves %s on %s; %.3f characters per token + %.1f tokens%s\n",
               c.addr.c_str(), info.model_dir().c_str(), info.device().c_str(), estimate.chars_per_token,
               estimate.overhead_tokens, c.chars_per_token ? " (--chars-per-token)" : " (calibrated)");

  Bench bench(c, channels, estimate, no_press);
  if (c.warmup > 0) {
    const int threads = std::min(c.warmup, c.open_loop ? 1 : c.concurrency);
    std::fprintf(stderr, "defkv-bench-serve: %d warmup request%s, %d at a time\n", c.warmup, c.warmup == 1 ? "" : "s",
                 threads);
    Records warm;
    RunClosed(bench, bs::MixSeed(c.seed, 4, 0), threads, c.warmup, 0, Clock::now(), "bench-warmup-", warm);
    size_t failed = 0;
    for (const auto& r : warm.Take())
      if (!r.ok() && failed++ == 0)
        std::fprintf(stderr, "defkv-bench-serve: a warmup request failed: %s: %s\n", r.error_code.c_str(),
                     r.error.c_str());
    bench.ResetCounters();
  }

  Records records;
  CatchInterrupt();
  const auto t0 = Clock::now();
  {
    Progress progress(bench, c, t0);
    if (c.open_loop)
      RunOpen(bench, c, t0, records);
    else
      RunClosed(bench, c.seed, c.concurrency, c.requests, c.duration_s, t0, "bench-", records);
  }
  const std::vector<bs::RequestRecord> all = records.Take();
  const bs::Report report = bs::Aggregate(all, c.workload.mix);
  if (!c.save_requests.empty()) SaveRequests(c.save_requests, all, c);
  if (c.json) {
    nlohmann::ordered_json j = {{"config", ConfigJson(c, info, estimate)}};
    j.update(bs::ToJson(report));
    std::cout << j.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) << std::endl;
  } else {
    std::cout << bs::TextReport(report, Title(c, info)) << std::flush;
  }
  return report.sent > 0 && report.completed == 0 ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Main(argc, argv);
  } catch (const UsageError& e) {
    std::cerr << "defkv-bench-serve: " << e.what() << "\n(defkv-bench-serve --help for usage)\n";
    return kUsageError;
  } catch (const std::exception& e) {
    std::cerr << "defkv-bench-serve: " << e.what() << "\n";
    return 1;
  }
}
