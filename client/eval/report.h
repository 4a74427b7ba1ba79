// Results: one CSV row per (sample, press, ratio), read back to resume, and the markdown table.
#pragma once

#include <map>
#include <string>
#include <vector>

namespace defkv::eval {

struct Result {
  std::string suite;  // "ruler" or "longbench"
  std::string task;
  int index = 0;
  long long length = 0;  // target length in tokens (RULER); 0 for LongBench
  unsigned long long seed = 0;
  std::string press;
  double ratio = 0;
  bool ok = false;     // false: the request failed (`error` says why); it is retried on resume
  double score = 0;    // in [0, 1]
  std::string prediction;
  std::vector<std::string> answers;
  long long context_tokens = 0, question_tokens = 0, generated_tokens = 0;
  long long kv_entries_before = 0, kv_entries_after = 0;
  double seconds = 0;
  std::string error;
};

// What identifies a row for resuming: the same sample under the same press and ratio.
std::string ResultKey(const Result& r);
std::string ResultKey(const std::string& suite, const std::string& task, int index, long long length,
                      unsigned long long seed, const std::string& press, double ratio);

std::string CsvHeader();
std::string ToCsvRow(const Result& r);
// Parses a CSV written by ToCsvRow (quoted fields may hold commas, quotes and newlines).
std::vector<std::vector<std::string>> ParseCsv(const std::string& text);
// The rows of an existing results file (later rows win over earlier ones with the same key).
std::vector<Result> ReadResults(const std::string& path);

// The seed paper's table: one row per press x ratio, a column per task (score x 100 over the
// successful samples) and the unweighted mean over the tasks. `columns` fixes the order; a task
// absent from the results shows "–" and is left out of the mean (said in the header).
std::string MarkdownTable(const std::vector<Result>& results, const std::vector<std::string>& columns,
                          const std::string& title);

}  // namespace defkv::eval
