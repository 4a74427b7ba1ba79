// defkv-generate: runs the Generator in-process (no server), for development and benchmarks.
//   defkv-generate --model DIR --context-file F --question Q [options]
//   defkv-generate --model DIR --prompt TEXT [options]
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/engine/generator.h"

namespace {

constexpr const char* kUsage = R"(defkv-generate: answer a question about a context with the in-process engine.

usage:
  defkv-generate --model DIR --context-file F --question Q [options]
  defkv-generate --model DIR --prompt TEXT [options]

input:
  --model DIR              HuggingFace model directory (config.json, *.safetensors, tokenizer)
  --context-file F         context text; "-" reads standard input
  --question Q             question asked after the context
  --answer-prefix S        text the answer starts with (default: none)
  --prompt TEXT            raw prompt: no chat template, no context/question split
  --no-chat-template       render context and question as plain text even if the model has a template

compression (presses: core/press/press_info.cpp, docs/PRESSES.md):
  --press NAME             none (default), snapkv, adakv, defensivekv, layer_defensivekv, ...
  --compression-ratio R    fraction of the context's KV entries removed, 0 <= R < 1 (default 0)
  --press-option K=V       press option, e.g. window_size=32 (repeatable)
  --report                 print the compression report (kept entries per layer and head, bytes,
                           scoring and compaction time) on stderr
  --kept-json FILE         write the kept context positions of every layer and kv head as JSON

generation:
  --max-new-tokens N       at most N generated tokens (default 128)
  --temperature T          0 = greedy (default 0)
  --top-k K                sample among the K most likely tokens (default 0 = off)
  --top-p P                nucleus sampling mass (default 1 = off)
  --seed S                 sampling seed; the same seed gives the same output (default 0)
  --stop S                 stop before this string (repeatable)

engine:
  --device D               cpu, cuda or cuda:N (default cpu)
  --dtype T                auto, float32, bfloat16, float16 (default auto: float32 on CPU)
  --threads N              CPU threads (default: all cores)
  --prefill-chunk N        context tokens per prefill chunk, run layer by layer (default 512)

output:
  --quiet                  print only the answer (no load and timing lines on stderr)
  --ids                    also print the prompt and generated token ids on stderr
  -h, --help               this text

The answer streams to standard output as it is generated. Exit status: 0 on success, 1 on a
generation error, 2 on bad arguments or a model that cannot be loaded.
)";

[[noreturn]] void Usage(const std::string& error) {
  std::fprintf(stderr, "defkv-generate: %s\n(see defkv-generate --help)\n", error.c_str());
  std::exit(2);
}

struct Args {
  std::map<std::string, std::string> values;
  std::vector<std::string> stops;
  std::map<std::string, std::string> press_options;
  bool quiet = false, ids = false, no_template = false, report = false;
};

Args Parse(int argc, char** argv) {
  static const std::vector<std::string> kValued = {
      "--model", "--context-file", "--question", "--answer-prefix", "--prompt", "--max-new-tokens",
      "--temperature", "--top-k", "--top-p", "--seed", "--device", "--dtype", "--threads", "--prefill-chunk",
      "--press", "--compression-ratio", "--kept-json"};
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    std::string value;
    bool has_value = false;
    if (auto eq = arg.find('='); arg.rfind("--", 0) == 0 && eq != std::string::npos) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
      has_value = true;
    }
    if (arg == "-h" || arg == "--help") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    }
    if (arg == "--quiet") { a.quiet = true; continue; }
    if (arg == "--ids") { a.ids = true; continue; }
    if (arg == "--no-chat-template") { a.no_template = true; continue; }
    if (arg == "--report") { a.report = true; continue; }
    const bool repeated = arg == "--stop" || arg == "--press-option";
    const bool valued = std::find(kValued.begin(), kValued.end(), arg) != kValued.end() || repeated;
    if (!valued) Usage("unknown option " + arg);
    if (!has_value) {
      if (i + 1 >= argc) Usage(arg + " needs a value");
      value = argv[++i];
    }
    if (arg == "--stop") {
      a.stops.push_back(value);
    } else if (arg == "--press-option") {
      const auto eq = value.find('=');
      if (eq == std::string::npos || eq == 0) Usage("--press-option expects KEY=VALUE, got \"" + value + "\"");
      a.press_options[value.substr(0, eq)] = value.substr(eq + 1);
    } else {
      a.values[arg] = value;
    }
  }
  return a;
}

template <typename T>
T Number(const Args& a, const std::string& key, T dflt) {
  auto it = a.values.find(key);
  if (it == a.values.end()) return dflt;
  std::istringstream in(it->second);
  T v{};
  if (!(in >> v) || !in.eof()) Usage(key + " expects a number, got \"" + it->second + "\"");
  return v;
}

std::string ReadAll(const std::string& path) {
  std::stringstream ss;
  if (path == "-") {
    ss << std::cin.rdbuf();
  } else {
    std::ifstream in(path, std::ios::binary);
    if (!in) Usage("cannot read context file " + path);
    ss << in.rdbuf();
  }
  return ss.str();
}

void PrintReport(const defkv::engine::GenerateResult& r) {
  const auto& c = r.compression;
  const auto& u = r.usage;
  std::fprintf(stderr, "compression report: press=%s ratio=%g context=%lld tokens\n", c.press.c_str(),
               c.compression_ratio, static_cast<long long>(c.context_tokens));
  for (size_t l = 0; l < c.kept.size(); ++l) {
    int64_t sum = 0;
    std::string heads;
    for (int64_t n : c.kept[l]) {
      sum += n;
      heads += " " + std::to_string(n);
    }
    std::fprintf(stderr, "  layer %2zu: kept %lld | per head:%s\n", l, static_cast<long long>(sum), heads.c_str());
  }
  const double achieved = u.kv_entries_before ? 1.0 - static_cast<double>(u.kv_entries_after) / u.kv_entries_before : 0;
  std::fprintf(stderr,
               "  entries %lld -> %lld, bytes %lld -> %lld (%.1f%% removed); scoring %.4f s, compaction %.4f s\n",
               static_cast<long long>(u.kv_entries_before), static_cast<long long>(u.kv_entries_after),
               static_cast<long long>(u.kv_bytes_before), static_cast<long long>(u.kv_bytes_after), 100 * achieved,
               c.scoring_seconds, c.compaction_seconds);
}

}  // namespace

int main(int argc, char** argv) {
  Args args = Parse(argc, argv);
  if (!args.values.count("--model")) Usage("--model DIR is required");
  const bool raw = args.values.count("--prompt") > 0;
  if (!raw && !args.values.count("--question")) Usage("give --question (with --context-file) or --prompt");
  if (raw && (args.values.count("--question") || args.values.count("--context-file")))
    Usage("--prompt cannot be combined with --question or --context-file");

  defkv::engine::EngineOptions opts;
  opts.model_dir = args.values["--model"];
  opts.device = args.values.count("--device") ? args.values["--device"] : "cpu";
  opts.dtype = args.values.count("--dtype") ? args.values["--dtype"] : "auto";
  opts.threads = Number(args, "--threads", 0);
  opts.prefill_chunk = Number(args, "--prefill-chunk", 512);
  if (!args.quiet) {
    opts.load_progress = [last = -1](size_t done, size_t total) mutable {
      if (total < (256u << 20)) return;  // small models load in a blink
      const int pct = static_cast<int>(100.0 * done / total);
      if (pct / 10 != last / 10 || done == total) {
        std::fprintf(stderr, "\rloading weights: %3d%% (%.1f / %.1f MB)", pct, done / 1e6, total / 1e6);
        if (done == total) std::fputc('\n', stderr);
        last = pct;
      }
    };
  }
  // Every argument is checked before the (possibly long) model load.
  defkv::engine::GenerateRequest req;
  if (raw) {
    req.raw_prompt = args.values["--prompt"];
  } else {
    if (args.values.count("--context-file")) req.context = ReadAll(args.values["--context-file"]);
    req.question = args.values["--question"];
    req.answer_prefix = args.values.count("--answer-prefix") ? args.values["--answer-prefix"] : "";
  }
  req.use_chat_template = !args.no_template;
  req.max_new_tokens = Number(args, "--max-new-tokens", 128);
  req.sampling.temperature = Number(args, "--temperature", 0.0);
  req.sampling.top_k = Number(args, "--top-k", 0);
  req.sampling.top_p = Number(args, "--top-p", 1.0);
  req.sampling.seed = Number<unsigned long long>(args, "--seed", 0);
  req.stop = args.stops;
  req.press = args.values.count("--press") ? args.values["--press"] : "none";
  req.compression_ratio = Number(args, "--compression-ratio", 0.0);
  req.press_options = args.press_options;
  req.report_kept_positions = args.values.count("--kept-json") > 0;

  auto gen = defkv::engine::Generator::Create(opts);
  if (!gen.ok()) {
    std::fprintf(stderr, "defkv-generate: cannot load model: %s\n", std::string(gen.status().message()).c_str());
    return 2;
  }
  const auto& info = (*gen)->info();
  if (!args.quiet)
    std::fprintf(stderr, "loaded %s (%s, %lld layers, %lld/%lld heads, %s on %s, chat template %s) in %.2f s\n",
                 info.model_dir.c_str(), info.model_type.c_str(), static_cast<long long>(info.num_layers),
                 static_cast<long long>(info.num_heads), static_cast<long long>(info.num_kv_heads), info.dtype.c_str(),
                 info.device.c_str(), info.chat_template.c_str(), info.load_seconds);

  if (args.ids) {
    auto prompt = (*gen)->Tokenize(req);
    if (prompt.ok()) {
      std::fprintf(stderr, "context ids (%zu):", prompt->context.size());
      for (int id : prompt->context) std::fprintf(stderr, " %d", id);
      std::fprintf(stderr, "\nquestion ids (%zu):", prompt->question.size());
      for (int id : prompt->question) std::fprintf(stderr, " %d", id);
      std::fputc('\n', stderr);
    }
  }
  auto result = (*gen)->Generate(req, [](std::string_view text, std::span<const int32_t>) {
    std::fwrite(text.data(), 1, text.size(), stdout);
    std::fflush(stdout);
    return true;
  });
  std::fputc('\n', stdout);
  if (!result.ok()) {
    std::fprintf(stderr, "defkv-generate: %s\n", std::string(result.status().message()).c_str());
    return result.status().code() == absl::StatusCode::kInvalidArgument ||
                   result.status().code() == absl::StatusCode::kOutOfRange
               ? 2
               : 1;
  }
  if (args.ids) {
    std::fprintf(stderr, "generated ids (%zu):", result->token_ids.size());
    for (int id : result->token_ids) std::fprintf(stderr, " %d", id);
    std::fputc('\n', stderr);
  }
  if (args.report) PrintReport(*result);
  if (args.values.count("--kept-json")) {
    const auto& c = result->compression;
    nlohmann::json j = {{"press", c.press},
                        {"compression_ratio", c.compression_ratio},
                        {"context_tokens", c.context_tokens},
                        {"kept", c.kept},
                        {"positions", c.positions},
                        {"answer", result->text}};
    std::ofstream out(args.values["--kept-json"]);
    out << j.dump() << "\n";
    if (!out) {
      std::fprintf(stderr, "defkv-generate: cannot write %s\n", args.values["--kept-json"].c_str());
      return 1;
    }
  }
  if (!args.quiet) {
    const auto& u = result->usage;
    const auto& t = result->timings;
    std::fprintf(stderr,
                 "finish=%s context=%lld question=%lld generated=%lld kv=%.2f MB | prefill %.3f s, "
                 "compression %.3f s, first token %.3f s, decode %.3f s (%.1f tok/s), total %.3f s\n",
                 defkv::engine::FinishReasonName(result->finish_reason), static_cast<long long>(u.context_tokens),
                 static_cast<long long>(u.question_tokens), static_cast<long long>(u.generated_tokens),
                 u.kv_bytes / 1e6, t.prefill, t.compression, t.first_token, t.decode,
                 t.decode > 0 ? u.generated_tokens / t.decode : 0.0, t.total);
  }
  return 0;
}
