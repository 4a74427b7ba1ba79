// LongBench-format input: jsonl rows with context / input / answers (+ dataset, all_classes),
// turned into requests with the official prompt templates (THUDM/LongBench config/).
#pragma once

#include <string>
#include <vector>

#include "ruler.h"

namespace defkv::eval {

struct LongBenchRow {
  std::string dataset;  // the row's "dataset" field, else the file name without .jsonl (and _e)
  std::string id;       // "_id", else the line number
  std::string context, input;
  std::vector<std::string> answers, all_classes;
};

// Reads a jsonl file; throws std::runtime_error naming the line of a row it cannot use.
std::vector<LongBenchRow> LoadLongBench(const std::string& path);

// The datasets this harness can prompt and score (English LongBench v1).
bool LongBenchSupported(const std::string& dataset);

// The request for a row: the official prompt, split after the context so the question part is
// never compressed; max_new_tokens from dataset2maxlen; raw completion (no chat template) for
// trec, triviaqa, samsum, lcc and repobench-p; samsum also stops at a newline.
Sample BuildLongBench(const LongBenchRow& row, int index);

}  // namespace defkv::eval
