#include "report.h"

#include <cmath>
#include <cstdio>
#include <fstream>
#include <set>
#include <sstream>
#include <tuple>

#include <nlohmann/json.hpp>

namespace defkv::eval {
namespace {

std::string Quote(const std::string& s) {
  if (s.find_first_of(",\"\n\r") == std::string::npos) return s;
  std::string out = "\"";
  for (char c : s) out += c == '"' ? std::string("\"\"") : std::string(1, c);
  return out + "\"";
}

std::string Num(double v, const char* fmt = "%.6g") {
  char buf[64];
  std::snprintf(buf, sizeof(buf), fmt, v);
  return buf;
}

const std::vector<std::string> kColumns = {
    "suite", "task", "index", "length", "seed", "press", "ratio", "score", "prediction", "answers",
    "context_tokens", "question_tokens", "generated_tokens", "kv_entries_before", "kv_entries_after", "seconds",
    "error"};

}  // namespace

std::string ResultKey(const std::string& suite, const std::string& task, int index, long long length,
                      unsigned long long seed, const std::string& press, double ratio) {
  return suite + "|" + task + "|" + std::to_string(index) + "|" + std::to_string(length) + "|" + std::to_string(seed) +
         "|" + press + "|" + Num(ratio, "%.4f");
}

std::string ResultKey(const Result& r) {
  return ResultKey(r.suite, r.task, r.index, r.length, r.seed, r.press, r.ratio);
}

std::string CsvHeader() {
  std::string h;
  for (size_t i = 0; i < kColumns.size(); ++i) h += (i ? "," : "") + kColumns[i];
  return h + "\n";
}

std::string ToCsvRow(const Result& r) {
  const std::vector<std::string> f = {
      r.suite, r.task, std::to_string(r.index), std::to_string(r.length), std::to_string(r.seed), r.press,
      Num(r.ratio, "%.4f"), r.ok ? Num(r.score) : "", r.prediction, nlohmann::json(r.answers).dump(),
      std::to_string(r.context_tokens), std::to_string(r.question_tokens), std::to_string(r.generated_tokens),
      std::to_string(r.kv_entries_before), std::to_string(r.kv_entries_after), Num(r.seconds, "%.3f"), r.error};
  std::string row;
  for (size_t i = 0; i < f.size(); ++i) row += (i ? "," : "") + Quote(f[i]);
  return row + "\n";
}

std::vector<std::vector<std::string>> ParseCsv(const std::string& text) {
  std::vector<std::vector<std::string>> rows;
  std::vector<std::string> row;
  std::string field;
  bool quoted = false, any = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (quoted) {
      if (c == '"' && i + 1 < text.size() && text[i + 1] == '"') field += '"', ++i;
      else if (c == '"') quoted = false;
      else field += c;
    } else if (c == '"') {
      quoted = any = true;
    } else if (c == ',') {
      row.push_back(field), field.clear(), any = true;
    } else if (c == '\n') {
      row.push_back(field), field.clear();
      rows.push_back(row), row.clear();
      any = false;
    } else if (c != '\r') {
      field += c, any = true;
    }
  }
  if (any || !field.empty() || !row.empty()) {  // a last line without its newline (a cut-off write)
    row.push_back(field);
    rows.push_back(row);
  }
  return rows;
}

std::vector<Result> ReadResults(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return {};
  std::stringstream ss;
  ss << in.rdbuf();
  auto rows = ParseCsv(ss.str());
  std::vector<Result> out;
  std::map<std::string, size_t> at;
  for (size_t i = 1; i < rows.size(); ++i) {
    const auto& f = rows[i];
    if (f.size() != kColumns.size()) continue;  // a truncated last row: that sample is redone
    try {
      Result r;
      r.suite = f[0], r.task = f[1], r.index = std::stoi(f[2]), r.length = std::stoll(f[3]);
      r.seed = std::stoull(f[4]), r.press = f[5], r.ratio = std::stod(f[6]);
      r.ok = !f[7].empty();
      r.score = r.ok ? std::stod(f[7]) : 0;
      r.prediction = f[8];
      for (const auto& a : nlohmann::json::parse(f[9])) r.answers.push_back(a.get<std::string>());
      r.context_tokens = std::stoll(f[10]), r.question_tokens = std::stoll(f[11]);
      r.generated_tokens = std::stoll(f[12]), r.kv_entries_before = std::stoll(f[13]);
      r.kv_entries_after = std::stoll(f[14]), r.seconds = std::stod(f[15]), r.error = f[16];
      const std::string key = ResultKey(r);
      if (auto it = at.find(key); it != at.end()) out[it->second] = r;
      else at[key] = out.size(), out.push_back(r);
    } catch (const std::exception&) {
      continue;  // a damaged row: redone
    }
  }
  return out;
}

std::string MarkdownTable(const std::vector<Result>& results, const std::vector<std::string>& columns,
                          const std::string& title) {
  // One row per (length, press, ratio), in first-seen order, with score sums per task.
  using Method = std::tuple<long long, std::string, double>;
  std::vector<Method> methods;
  std::map<Method, std::map<std::string, std::pair<double, int>>> sums;
  std::map<Method, int> errors;
  bool lengths = false;
  for (const auto& r : results) {
    const Method m{r.length, r.press, r.ratio};
    lengths |= r.length > 0;
    if (!sums.count(m)) methods.push_back(m), sums[m];
    if (!r.ok) {
      ++errors[m];
      continue;
    }
    auto& s = sums[m][r.task];
    s.first += r.score, s.second += 1;
  }
  std::ostringstream out;
  out << "### " << title << "\n\n| method |" << (lengths ? " length |" : "") << " ratio | cache |";
  for (const auto& c : columns) out << " " << c << " |";
  out << " **avg** | n | errors |\n|---|" << (lengths ? "---|" : "") << "---|---|";
  for (size_t i = 0; i < columns.size(); ++i) out << "---|";
  out << "---|---|---|\n";
  std::set<std::string> absent;
  for (const auto& m : methods) {
    const auto& [length, press, ratio] = m;
    out << "| " << press << " |";
    if (lengths) out << " " << length << " |";
    out << " " << Num(ratio, "%.2f") << " | " << Num(100 * (1 - ratio), "%.0f") << "% |";
    double total = 0;
    int tasks = 0, n = 0;
    for (const auto& c : columns) {
      auto it = sums[m].find(c);
      if (it == sums[m].end() || it->second.second == 0) {
        out << " – |";
        absent.insert(c);
        continue;
      }
      const double v = std::round(10000.0 * it->second.first / it->second.second) / 100.0;  // round(100*mean, 2)
      out << " " << Num(v, "%.2f") << " |";
      total += v, ++tasks, n += it->second.second;
    }
    out << " **" << (tasks ? Num(total / tasks, "%.2f") : std::string("–")) << "** | " << n << " | " << errors[m]
        << " |\n";
  }
  if (!absent.empty()) {
    out << "\n–: no scored sample (";
    bool first = true;
    for (const auto& a : absent) out << (first ? "" : ", ") << a, first = false;
    out << "); avg is the unweighted mean over the tasks shown with a score.\n";
  }
  return out.str();
}

}  // namespace defkv::eval
