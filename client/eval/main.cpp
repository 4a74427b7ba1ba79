// defkv-eval: accuracy of presses x compression ratios on RULER-style tasks built offline, or on
// LongBench-format jsonl files, measured against a running defkv-server over gRPC only.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
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

#include "client/common.h"
#include "defkv/v1/defkv.grpc.pb.h"
#include "longbench.h"
#include "metrics.h"
#include "report.h"
#include "ruler.h"

namespace {

namespace pb = defkv::v1;
namespace ev = defkv::eval;
namespace fs = std::filesystem;
using defkv::client::Args;
using defkv::client::Last;
constexpr int kUsageError = 64;

constexpr const char* kUsage = R"(usage: defkv-eval [--addr HOST:PORT] [--timeout SECONDS] COMMAND [options]

commands:
  ruler      RULER-style tasks built offline, run against the server
      --length L[,L...]     target lengths in tokens of the served tokenizer (default 4096)
      --samples N           samples per task (default 50)   --seed S (default 42)
      --tasks a,b,...       default: all (cwe fwe niah_* vt; qa_1/qa_2 are absent)
      --chars-per-token C   size haystacks by characters instead of asking the server (offline guess)
  longbench  LongBench-format jsonl files: --data FILE[,FILE...] [--samples N: first N rows per dataset]
  tasks      print the RULER samples as jsonl (no server needed with --chars-per-token)
  table      rewrite OUT/table.md from OUT/results.csv

run options (ruler, longbench):
  --presses P[,P...]    press names (default none)      --ratios R[,R...]  (default 0.5)
  --option NAME=VALUE   press option, repeatable        --max-new-tokens N (overrides the task's)
  --concurrency K       requests in flight (default 4)  --no-chat-template
  --out DIR             results.csv, table.md, sizes.json (default eval-out); an existing
                        results.csv is resumed: finished samples are skipped

global: --addr (default 127.0.0.1:50051, or $DEFKV_ADDR), --timeout seconds per request (default 600)
        --token T (or $DEFKV_TOKEN), --tls_ca F, --tls_cert F --tls_key F: as for the defkv CLI
exit code: 0 when every request succeeded, 1 when some failed, 64 on a bad command line
)";

const std::vector<std::string> kSwitches = {"no-chat-template", "help"};

std::vector<std::string> List(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

double ToDouble(const std::string& s, const std::string& what) {
  try {
    size_t used = 0;
    const double v = std::stod(s, &used);
    if (used == s.size()) return v;
  } catch (const std::exception&) {
  }
  throw UsageError("bad number for " + what + ": '" + s + "'");
}

long long ToInt(const std::string& s, const std::string& what) {
  const double v = ToDouble(s, what);
  if (v != std::floor(v)) throw UsageError("bad integer for " + what + ": '" + s + "'");
  return static_cast<long long>(v);
}

std::string Clock(double s) {
  if (!std::isfinite(s) || s < 0) return "--:--";
  const long t = std::lround(s);
  char buf[32];
  if (t >= 3600) std::snprintf(buf, sizeof(buf), "%ld:%02ld:%02ld", t / 3600, t / 60 % 60, t % 60);
  else std::snprintf(buf, sizeof(buf), "%02ld:%02ld", t / 60, t % 60);
  return buf;
}

// The connection, with the defkv CLI's conventions: --token adds a bearer token, --tls_* switch to TLS.
class Server {
 public:
  Server(const std::string& addr, double timeout_s, std::shared_ptr<grpc::ChannelCredentials> creds, std::string token)
      : timeout_s_(timeout_s),
        token_(std::move(token)),
        stub_(pb::DefKV::NewStub(defkv::client::MakeChannel(addr, std::move(creds)))) {}

  grpc::Status Generate(const pb::GenerateRequest& req, pb::GenerateResponse* resp) const {
    grpc::ClientContext ctx;
    defkv::client::PrepareContext(ctx, token_, timeout_s_);
    return stub_->Generate(&ctx, req, resp);
  }

  grpc::Status Info(pb::ModelInfo* info) const {
    grpc::ClientContext ctx;
    defkv::client::PrepareContext(ctx, token_, 30);
    return stub_->GetModelInfo(&ctx, pb::GetModelInfoRequest(), info);
  }

 private:
  double timeout_s_;
  std::string token_;
  std::unique_ptr<pb::DefKV::Stub> stub_;
};

struct RunOptions {
  std::vector<std::string> presses;
  std::vector<double> ratios;
  std::map<std::string, std::string> press_options;
  std::optional<int> max_new_tokens;
  int concurrency = 4;
  bool chat_template = true;
  fs::path out;
};

pb::GenerateRequest Request(const ev::Sample& s, const RunOptions& o, const std::string& press, double ratio) {
  pb::GenerateRequest req;
  req.set_context(s.context);
  req.set_question(s.question);
  req.set_answer_prefix(s.answer_prefix);
  req.set_press(press);
  req.set_compression_ratio(ratio);
  for (const auto& [k, v] : o.press_options) (*req.mutable_press_options())[k] = v;
  req.set_max_new_tokens(o.max_new_tokens.value_or(s.max_new_tokens));
  req.set_temperature(0);  // greedy, as RULER and LongBench evaluate
  req.set_use_chat_template(o.chat_template && s.use_chat_template);
  for (const auto& stop : s.stop) req.add_stop(stop);
  return req;
}

// One unit of work: a sample under a press and ratio.
struct Job {
  const ev::Sample* sample;
  std::string suite;
  long long length;
  unsigned long long seed;
  std::string press;
  double ratio;
};

// Runs the jobs not already in OUT/results.csv with `concurrency` requests in flight, appending a
// row per finished job (so an interrupted run resumes where it stopped), then writes table.md.
int Run(const Server& server, const std::vector<Job>& all_jobs, const RunOptions& o,
        const std::vector<std::string>& columns, const std::string& title) {
  fs::create_directories(o.out);
  const fs::path csv = o.out / "results.csv";
  std::vector<ev::Result> results = ev::ReadResults(csv.string());
  std::map<std::string, bool> done;
  for (const auto& r : results) done[ev::ResultKey(r)] = r.ok;
  std::vector<const Job*> jobs;
  for (const auto& j : all_jobs)
    if (!done[ev::ResultKey(j.suite, j.sample->task, j.sample->index, j.length, j.seed, j.press, j.ratio)])
      jobs.push_back(&j);
  std::fprintf(stderr, "defkv-eval: %zu requests, %zu already done in %s\n", all_jobs.size(),
               all_jobs.size() - jobs.size(), csv.c_str());

  // The file is rewritten from the rows that parsed, so a row cut by an interrupted run (maybe
  // inside a quoted field) cannot swallow the rows appended after it.
  {
    const fs::path tmp = csv.string() + ".tmp";
    std::ofstream clean(tmp, std::ios::binary | std::ios::trunc);
    clean << ev::CsvHeader();
    for (const auto& r : results) clean << ev::ToCsvRow(r);
    clean.close();
    fs::rename(tmp, csv);
  }
  std::ofstream out(csv, std::ios::app | std::ios::binary);

  std::mutex mu;
  std::atomic<size_t> next{0};
  size_t finished = 0, failed = 0;
  const auto start = std::chrono::steady_clock::now();
  auto last_print = start - std::chrono::hours(1);
  const bool tty = isatty(STDERR_FILENO);
  auto progress = [&](bool final) {  // called with mu held
    const auto now = std::chrono::steady_clock::now();
    if (!final && now - last_print < std::chrono::milliseconds(tty ? 200 : 10000)) return;
    last_print = now;
    const double elapsed = std::chrono::duration<double>(now - start).count();
    const double eta = finished ? elapsed / finished * (jobs.size() - finished) : NAN;
    std::fprintf(stderr, "%s[%zu/%zu] %.1f%%  %.2f req/s  elapsed %s  ETA %s  failed %zu%s", tty ? "\r" : "",
                 finished, jobs.size(), jobs.empty() ? 100.0 : 100.0 * finished / jobs.size(),
                 elapsed > 0 ? finished / elapsed : 0.0, Clock(elapsed).c_str(), Clock(eta).c_str(), failed,
                 tty && !final ? "   " : "\n");
  };

  auto worker = [&] {
    for (size_t i = next++; i < jobs.size(); i = next++) {
      const Job& j = *jobs[i];
      const auto req = Request(*j.sample, o, j.press, j.ratio);
      pb::GenerateResponse resp;
      grpc::Status st;
      const auto t0 = std::chrono::steady_clock::now();
      // The server sheds load with RESOURCE_EXHAUSTED (queue full) and UNAVAILABLE (loading):
      // back off and retry those; anything else is the sample's result.
      for (int attempt = 0; attempt < 6; ++attempt) {
        resp.Clear();
        st = server.Generate(req, &resp);
        if (st.error_code() != grpc::StatusCode::RESOURCE_EXHAUSTED && st.error_code() != grpc::StatusCode::UNAVAILABLE)
          break;
        std::this_thread::sleep_for(std::chrono::milliseconds(250 << attempt));
      }
      ev::Result r;
      r.suite = j.suite, r.task = j.sample->task, r.index = j.sample->index, r.length = j.length, r.seed = j.seed;
      r.press = j.press, r.ratio = j.ratio, r.answers = j.sample->answers;
      r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (st.ok()) {
        r.ok = true;
        r.prediction = resp.text();
        r.score = j.suite == "ruler" ? ev::RulerScore(r.task, r.prediction, r.answers)
                                     : ev::LongBenchScore(r.task, r.prediction, r.answers, j.sample->all_classes);
        const auto& u = resp.usage();
        r.context_tokens = u.context_tokens(), r.question_tokens = u.question_tokens();
        r.generated_tokens = u.generated_tokens(), r.kv_entries_before = u.kv_entries_before();
        r.kv_entries_after = u.kv_entries_after();
      } else {
        r.error = "code " + std::to_string(static_cast<int>(st.error_code())) + ": " + st.error_message();
      }
      std::lock_guard<std::mutex> lock(mu);
      out << ev::ToCsvRow(r);
      out.flush();
      results.push_back(r);
      ++finished;
      if (!r.ok) {
        if (failed++ < 5) std::fprintf(stderr, "%sdefkv-eval: %s #%d (%s @ %g): %s\n", tty ? "\n" : "",
                                       r.task.c_str(), r.index, r.press.c_str(), r.ratio, r.error.c_str());
      }
      progress(false);
    }
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < std::max(1, o.concurrency); ++t) threads.emplace_back(worker);
  for (auto& t : threads) t.join();
  {
    std::lock_guard<std::mutex> lock(mu);
    progress(true);
  }
  out.close();

  // The table is rebuilt from the whole file (earlier runs included; later rows win).
  const auto all = ev::ReadResults(csv.string());
  std::ofstream table(o.out / "table.md");
  table << ev::MarkdownTable(all, columns, title);
  std::fprintf(stderr, "defkv-eval: wrote %s and %s\n", csv.c_str(), (o.out / "table.md").c_str());
  return failed ? 1 : 0;
}

RunOptions ParseRunOptions(const Args& a) {
  RunOptions o;
  o.presses = List(Last(a, "presses", "none"));
  for (const auto& r : List(Last(a, "ratios", "0.5"))) o.ratios.push_back(ToDouble(r, "--ratios"));
  if (auto it = a.values.find("option"); it != a.values.end())
    for (const auto& kv : it->second) {
      const auto eq = kv.find('=');
      if (eq == std::string::npos) throw UsageError("--option needs NAME=VALUE, got '" + kv + "'");
      o.press_options[kv.substr(0, eq)] = kv.substr(eq + 1);
    }
  if (a.values.count("max-new-tokens")) o.max_new_tokens = static_cast<int>(ToInt(Last(a, "max-new-tokens"), "--max-new-tokens"));
  o.concurrency = static_cast<int>(ToInt(Last(a, "concurrency", "4"), "--concurrency"));
  o.chat_template = !a.switches.count("no-chat-template");
  o.out = Last(a, "out", "eval-out");
  return o;
}

// press x ratio pairs; `none` ignores the ratio, so it runs once at 0.
std::vector<std::pair<std::string, double>> Methods(const RunOptions& o) {
  std::vector<std::pair<std::string, double>> m;
  for (const auto& p : o.presses) {
    std::string lower = p;
    std::transform(lower.begin(), lower.end(), lower.begin(), ::tolower);
    if (lower == "none" || lower == "full" || lower == "no_press") {
      m.emplace_back(p, 0.0);
      continue;
    }
    for (double r : o.ratios) m.emplace_back(p, r);
  }
  return m;
}

struct RulerSetup {
  std::vector<std::string> tasks;
  std::vector<long long> lengths;
  int samples = 50;
  unsigned long long seed = 42;
  std::optional<double> chars_per_token;
};

RulerSetup ParseRulerSetup(const Args& a) {
  RulerSetup s;
  s.tasks = Last(a, "tasks", "all") == "all" ? ev::RulerTasks() : List(Last(a, "tasks"));
  for (const auto& t : s.tasks) {
    if (t == "qa_1" || t == "qa_2") throw UsageError(t + " is absent: SQuAD/HotpotQA cannot be had offline");
    if (!ev::IsRulerTask(t)) throw UsageError("unknown task '" + t + "'");
  }
  for (const auto& l : List(Last(a, "length", "4096"))) s.lengths.push_back(ToInt(l, "--length"));
  s.samples = static_cast<int>(ToInt(Last(a, "samples", "50"), "--samples"));
  s.seed = static_cast<unsigned long long>(ToInt(Last(a, "seed", "42"), "--seed"));
  if (a.values.count("chars-per-token")) s.chars_per_token = ToDouble(Last(a, "chars-per-token"), "--chars-per-token");
  return s;
}

// Haystack sizes per task and length. With --chars-per-token they are a guess from characters;
// otherwise the server counts: a max_new_tokens=0 request only prefills (no press) and reports
// usage.context_tokens + question_tokens in the served tokenizer, chat template included. Sizes
// are kept in OUT/sizes.json so a resumed run builds the very same samples.
std::map<std::string, int> RulerSizes(const Server* server, const RulerSetup& s, const RunOptions& o,
                                      const fs::path& cache_path) {
  nlohmann::json cache = nlohmann::json::object();
  if (std::ifstream in(cache_path); in) {
    try {
      in >> cache;
    } catch (const std::exception&) {
      cache = nlohmann::json::object();
    }
  }
  std::map<std::string, int> sizes;
  for (long long length : s.lengths)
    for (const auto& task : s.tasks) {
      const int max_new = o.max_new_tokens.value_or(ev::RulerMaxNewTokens(task));
      std::ostringstream key;
      key << task << "@" << length << "@seed" << s.seed << "@new" << max_new << (o.chat_template ? "" : "@plain");
      if (s.chars_per_token) key << "@cpt" << *s.chars_per_token;
      if (cache.contains(key.str())) {
        sizes[task + "@" + std::to_string(length)] = cache[key.str()].get<int>();
        continue;
      }
      ev::TokenCounter count;
      if (s.chars_per_token) {
        const double cpt = *s.chars_per_token;
        count = [cpt](const ev::Sample& x) {
          return static_cast<int64_t>(std::ceil((x.context.size() + x.question.size() + x.answer_prefix.size()) / cpt));
        };
      } else {
        count = [&](const ev::Sample& x) -> int64_t {
          auto req = Request(x, o, "none", 0.0);
          req.set_max_new_tokens(0);
          pb::GenerateResponse resp;
          const auto st = server->Generate(req, &resp);
          if (st.error_code() == grpc::StatusCode::OUT_OF_RANGE) return INT64_MAX / 4;  // over the server's limit
          if (!st.ok()) throw std::runtime_error("sizing " + task + ": code " + std::to_string(st.error_code()) + ": " + st.error_message());
          return resp.usage().context_tokens() + resp.usage().question_tokens();
        };
      }
      int probes = 0;
      const int n = ev::FindRulerSize(task, length, max_new, s.seed, count, &probes);
      if (n == 0)
        std::fprintf(stderr, "defkv-eval: %s does not fit in %lld tokens even with the smallest haystack: skipped\n",
                     task.c_str(), length);
      else
        std::fprintf(stderr, "defkv-eval: %s at %lld tokens: haystack size %d (%d counts)\n", task.c_str(), length, n, probes);
      sizes[task + "@" + std::to_string(length)] = n;
      cache[key.str()] = n;
      if (!cache_path.empty()) {
        fs::create_directories(cache_path.parent_path());
        std::ofstream(cache_path) << cache.dump(1) << "\n";
      }
    }
  return sizes;
}

int Main(int argc, char** argv) {
  std::string error;
  auto parsed = defkv::client::ParseArgs(argc, argv, kSwitches, &error);
  if (!parsed) throw UsageError(error);
  const Args& a = *parsed;
  if (a.switches.count("help") || a.command.empty()) {
    std::cout << kUsage;
    return a.command.empty() && !a.switches.count("help") ? kUsageError : 0;
  }
  const char* env_addr = std::getenv("DEFKV_ADDR");
  const std::string addr = Last(a, "addr", env_addr ? env_addr : "127.0.0.1:50051");
  const double timeout = ToDouble(Last(a, "timeout", "600"), "--timeout");
  const RunOptions o = ParseRunOptions(a);

  if (a.command == "table") {
    const auto all = ev::ReadResults((o.out / "results.csv").string());
    std::set<std::string> seen;
    std::vector<std::string> cols;
    bool ruler = false;
    for (const auto& r : all) ruler |= r.suite == "ruler";
    if (ruler) cols = ev::RulerTasks(), cols.insert(cols.begin() + 10, {"qa_1", "qa_2"});
    for (const auto& r : all)
      if (std::find(cols.begin(), cols.end(), r.task) == cols.end()) cols.push_back(r.task);
    std::ofstream(o.out / "table.md") << ev::MarkdownTable(all, cols, "defkv-eval results");
    std::cout << ev::MarkdownTable(all, cols, "defkv-eval results");
    return 0;
  }

  std::string cred_error;
  auto creds = defkv::client::Credentials(a, &cred_error);
  if (!creds) throw UsageError(cred_error);
  Server server(addr, timeout, creds, defkv::client::BearerToken(a));
  if (a.command == "tasks") {
    const RulerSetup s = ParseRulerSetup(a);
    const auto sizes = RulerSizes(s.chars_per_token ? nullptr : &server, s, o, {});
    for (long long length : s.lengths)
      for (const auto& task : s.tasks)
        for (int i = 0; i < s.samples && sizes.at(task + "@" + std::to_string(length)) > 0; ++i) {
          const auto x = ev::BuildRuler(task, sizes.at(task + "@" + std::to_string(length)), s.seed, i, length);
          nlohmann::json j = {{"task", x.task}, {"index", x.index}, {"length", length}, {"context", x.context},
                              {"question", x.question}, {"answer_prefix", x.answer_prefix}, {"answers", x.answers},
                              {"max_new_tokens", x.max_new_tokens}};
          std::cout << j.dump() << "\n";
        }
    return 0;
  }

  if (a.command != "ruler" && a.command != "longbench") throw UsageError("unknown command '" + a.command + "'");
  if (o.concurrency < 1) throw UsageError("--concurrency must be at least 1");
  for (double r : o.ratios)
    if (!(r >= 0 && r < 1)) throw UsageError("ratios must be in [0, 1)");

  pb::ModelInfo info;
  if (const auto st = server.Info(&info); !st.ok()) {
    std::fprintf(stderr, "defkv-eval: cannot reach %s: code %d: %s\n", addr.c_str(), st.error_code(), st.error_message().c_str());
    return static_cast<int>(st.error_code());
  }
  std::fprintf(stderr, "defkv-eval: %s serves %s (%s, max %lld prompt tokens)\n", addr.c_str(), info.model_dir().c_str(),
               info.model_type().c_str(), static_cast<long long>(info.max_context_tokens()));

  std::vector<ev::Sample> samples;
  std::vector<Job> jobs;
  std::vector<std::string> columns;
  std::vector<std::pair<long long, unsigned long long>> sample_keys;  // (length, seed) per sample
  std::string title;
  if (a.command == "ruler") {
    const RulerSetup s = ParseRulerSetup(a);
    for (long long length : s.lengths)
      if (length > info.max_context_tokens() && info.max_context_tokens() > 0)
        throw UsageError("--length " + std::to_string(length) + " is over the server's prompt limit of " +
                         std::to_string(info.max_context_tokens()) + " tokens");
    const auto sizes = RulerSizes(s.chars_per_token ? nullptr : &server, s, o, o.out / "sizes.json");
    samples.reserve(s.lengths.size() * s.tasks.size() * s.samples);
    for (long long length : s.lengths)
      for (const auto& task : s.tasks)
        for (int i = 0; i < s.samples && sizes.at(task + "@" + std::to_string(length)) > 0; ++i) {
          samples.push_back(ev::BuildRuler(task, sizes.at(task + "@" + std::to_string(length)), s.seed, i, length));
          sample_keys.emplace_back(length, s.seed);
        }
    columns = ev::RulerTasks();
    columns.insert(columns.begin() + 10, {"qa_1", "qa_2"});  // the seed's 13 columns; qa_* stay empty
    std::ostringstream t;
    t << "RULER-style, " << Last(a, "length", "4096") << " tokens, " << s.samples << " samples/task, seed " << s.seed
      << ", model " << info.model_dir();
    title = t.str();
  } else {
    const auto files = List(Last(a, "data"));
    if (files.empty()) throw UsageError("longbench needs --data FILE[,FILE...]");
    const int limit = static_cast<int>(ToInt(Last(a, "samples", "0"), "--samples"));
    for (const auto& f : files) {
      int n = 0;
      for (const auto& row : ev::LoadLongBench(f)) {
        if (!ev::LongBenchSupported(row.dataset)) {
          std::fprintf(stderr, "defkv-eval: skipping dataset %s (no English metric here)\n", row.dataset.c_str());
          break;
        }
        if (limit > 0 && n >= limit) break;
        samples.push_back(ev::BuildLongBench(row, n++));
        sample_keys.emplace_back(0, 0);
        if (std::find(columns.begin(), columns.end(), row.dataset) == columns.end()) columns.push_back(row.dataset);
      }
    }
    title = "LongBench-format, model " + info.model_dir();
  }
  for (size_t i = 0; i < samples.size(); ++i)
    for (const auto& [press, ratio] : Methods(o))
      jobs.push_back({&samples[i], a.command, sample_keys[i].first, sample_keys[i].second, press, ratio});
  return Run(server, jobs, o, columns, title);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Main(argc, argv);
  } catch (const UsageError& e) {
    std::cerr << "defkv-eval: " << e.what() << "\n(defkv-eval --help for usage)\n";
    return kUsageError;
  } catch (const std::exception& e) {
    std::cerr << "defkv-eval: " << e.what() << "\n";
    return 1;
  }
}
