// ruler-dump: writes RULER-style samples as jsonl, one per line, from the very generators that
// defkv-eval scores with (client/eval/ruler.cpp), so training data and evaluation share one code
// path. Needs nothing beyond the C++ standard library: on the GPU machine it is compiled with
//   g++ -O2 -std=c++20 -Iclient/eval tools/train/ruler_dump.cpp client/eval/ruler.cpp -o ruler-dump
//
// Haystacks are sized the way `defkv-eval --chars-per-token` sizes them (FindRulerSize with a
// character count), here with one chars-per-token figure per task, since digits, uuids and coded
// words tokenize far denser than prose. Each sample draws its target length uniformly from
// [--min-length, --max-length] in steps of 64 tokens; the haystack size of each (task, length) is
// searched once and reused.
//
// Output fields: task, index, length (the target), context, question, answer_prefix, answers,
// max_new_tokens. The pseudo-task "text" is a slice of the essay haystack with empty question
// fields and no answers (plain text for the language-model loss).
//
// --count 0 writes forever (the trainer reads as far as it needs; a closed pipe ends the tool).
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "ruler.h"

namespace {

namespace ev = defkv::eval;

constexpr char kUsage[] =
    "usage: ruler-dump [--seed S] [--start I] [--count N] [--tasks a,b|all] [--length L |\n"
    "                  --min-length A --max-length B] [--chars-per-token C] [--cpt TASK=C ...]\n"
    "  --seed S            generator seed (default 1000; defkv-eval's default 42 is for evaluation)\n"
    "  --start I           index of the first sample (default 0)\n"
    "  --count N           samples to write; 0 = until the reader closes the pipe (default 10)\n"
    "  --tasks LIST        comma-separated RULER tasks and 'text'; 'all' = every RULER task (default)\n"
    "  --length L          target length in tokens (same as --min-length L --max-length L)\n"
    "  --chars-per-token C characters per token for every task (default 3.5)\n"
    "  --cpt TASK=C        characters per token for one task (repeatable)\n"
    "  --list-tasks        print the RULER task names and exit\n";

std::string JsonString(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out + "\"";
}

std::vector<std::string> SplitComma(const std::string& s) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= s.size()) {
    size_t end = s.find(',', start);
    if (end == std::string::npos) end = s.size();
    if (end > start) out.push_back(s.substr(start, end - start));
    start = end + 1;
  }
  return out;
}

double ToDouble(const std::string& s, const char* what) {
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(s.c_str(), &end);
  if (errno || end == s.c_str() || *end || !(v > 0)) throw std::invalid_argument(std::string(what) + ": bad number '" + s + "'");
  return v;
}

long long ToInt(const std::string& s, const char* what) {
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(s.c_str(), &end, 10);
  if (errno || end == s.c_str() || *end || v < 0) throw std::invalid_argument(std::string(what) + ": bad integer '" + s + "'");
  return v;
}

struct Options {
  uint64_t seed = 1000;
  long long start = 0, count = 10;
  std::vector<std::string> tasks = ev::RulerTasks();
  long long min_length = 4096, max_length = 4096;
  double chars_per_token = 3.5;
  std::map<std::string, double> cpt;
};

Options Parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    }
    if (a == "--list-tasks") {  // the RULER tasks, one a line
      for (const auto& t : ev::RulerTasks()) std::printf("%s\n", t.c_str());
      std::exit(0);
    }
    if (i + 1 >= argc) throw std::invalid_argument(a + " needs a value");
    const std::string v = argv[++i];
    if (a == "--seed") o.seed = static_cast<uint64_t>(ToInt(v, "--seed"));
    else if (a == "--start") o.start = ToInt(v, "--start");
    else if (a == "--count") o.count = ToInt(v, "--count");
    else if (a == "--tasks") {
      o.tasks.clear();
      for (const auto& t : SplitComma(v)) {
        if (t == "all") o.tasks.insert(o.tasks.end(), ev::RulerTasks().begin(), ev::RulerTasks().end());
        else o.tasks.push_back(t);
      }
    }
    else if (a == "--length") o.min_length = o.max_length = ToInt(v, "--length");
    else if (a == "--min-length") o.min_length = ToInt(v, "--min-length");
    else if (a == "--max-length") o.max_length = ToInt(v, "--max-length");
    else if (a == "--chars-per-token") o.chars_per_token = ToDouble(v, "--chars-per-token");
    else if (a == "--cpt") {
      const size_t eq = v.find('=');
      if (eq == std::string::npos) throw std::invalid_argument("--cpt wants TASK=C, got '" + v + "'");
      o.cpt[v.substr(0, eq)] = ToDouble(v.substr(eq + 1), "--cpt");
    } else {
      throw std::invalid_argument("unknown option '" + a + "'");
    }
  }
  if (o.tasks.empty()) throw std::invalid_argument("--tasks is empty");
  for (const auto& t : o.tasks)
    if (t != "text" && !ev::IsRulerTask(t)) throw std::invalid_argument("unknown task '" + t + "'");
  if (o.min_length < 64 || o.max_length < o.min_length)
    throw std::invalid_argument("lengths must satisfy 64 <= --min-length <= --max-length");
  return o;
}

// Plain text: `words` essay words from a random offset (the essay stream is one fixed text).
ev::Sample PlainText(ev::Rng& r, int words) {
  const int offset = static_cast<int>(r.Uniform(0, 20000));
  std::string text = ev::EssayWords(offset + words);
  size_t cut = 0;
  for (int i = 0; i < offset && cut != std::string::npos; ++i) cut = text.find(' ', cut + 1);
  ev::Sample s;
  s.task = "text";
  s.context = cut == std::string::npos ? text : text.substr(cut + 1);
  return s;
}

int Run(const Options& o) {
  std::map<std::pair<std::string, long long>, int> sizes;
  const long long steps = (o.max_length - o.min_length) / 64;
  for (long long n = 0; o.count == 0 || n < o.count; ++n) {
    const long long index = o.start + n;
    // Task and length of sample `index` depend on (seed, index) only, not on earlier samples.
    ev::Rng pick(ev::SampleSeed(o.seed, "ruler-dump", static_cast<int>(index)));
    const std::string& task = o.tasks[static_cast<size_t>(pick.Uniform(0, static_cast<int64_t>(o.tasks.size()) - 1))];
    const long long length = o.min_length + 64 * pick.Uniform(0, steps);
    auto it = o.cpt.find(task);
    const double cpt = it == o.cpt.end() ? o.chars_per_token : it->second;
    ev::Sample s;
    if (task == "text") {
      s = PlainText(pick, static_cast<int>(static_cast<double>(length) * cpt / 5.5));  // ~5.5 chars a word
      s.index = static_cast<int>(index);
    } else {
      const int max_new = ev::RulerMaxNewTokens(task);
      auto key = std::make_pair(task, length);
      auto found = sizes.find(key);
      if (found == sizes.end()) {
        const ev::TokenCounter count = [cpt](const ev::Sample& x) {
          return static_cast<int64_t>(std::ceil((x.context.size() + x.question.size() + x.answer_prefix.size()) / cpt));
        };
        found = sizes.emplace(key, ev::FindRulerSize(task, length, max_new, o.seed, count)).first;
      }
      if (found->second == 0) continue;  // does not fit at this length: skip the sample
      s = ev::BuildRuler(task, found->second, o.seed, static_cast<int>(index), length);
    }
    std::string line = "{\"task\":" + JsonString(s.task) + ",\"index\":" + std::to_string(index) +
                       ",\"length\":" + std::to_string(length) + ",\"context\":" + JsonString(s.context) +
                       ",\"question\":" + JsonString(s.question) + ",\"answer_prefix\":" + JsonString(s.answer_prefix) +
                       ",\"answers\":[";
    for (size_t i = 0; i < s.answers.size(); ++i) line += (i ? "," : "") + JsonString(s.answers[i]);
    line += "],\"max_new_tokens\":" + std::to_string(s.max_new_tokens) + "}\n";
    if (std::fwrite(line.data(), 1, line.size(), stdout) != line.size() || std::fflush(stdout) != 0) return 0;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Run(Parse(argc, argv));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ruler-dump: %s\n%s", e.what(), kUsage);
    return 64;
  }
}
