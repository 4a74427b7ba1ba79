// RULER-style synthetic tasks, rebuilt offline (see ../shared/spec/ruler.md for what RULER does).
// Everything here is pure string work: no gRPC, so the unit tests link it alone.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace defkv::eval {

// A small deterministic generator (splitmix64). std:: distributions are not specified bit for
// bit across standard libraries, and a seed must give the same tasks everywhere.
class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  uint64_t Next();
  // Uniform in [lo, hi] (inclusive); rejection sampling keeps it unbiased.
  int64_t Uniform(int64_t lo, int64_t hi);
  template <typename T>
  void Shuffle(std::vector<T>& v) {  // Fisher-Yates
    for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[static_cast<size_t>(Uniform(0, i - 1))]);
  }
  // k distinct indices of [0, n), in the order drawn.
  std::vector<size_t> Sample(size_t n, size_t k);

 private:
  uint64_t state_;
};

// Mixes a run seed with a task name and a sample index into the seed of one sample, so samples
// are independent of each other and of which tasks are selected.
uint64_t SampleSeed(uint64_t seed, const std::string& task, int index);

// One sample as the server gets it: `context` is compressed, `question` never is.
struct Sample {
  std::string task;
  int index = 0;
  std::string context;
  std::string question;
  std::string answer_prefix;
  std::vector<std::string> answers;
  int max_new_tokens = 0;  // RULER's tokens_to_generate for the task (LongBench: its maxlen)
  // LongBench only: raw-completion datasets turn the chat template off, samsum stops at a
  // newline, trec scores against its class list.
  bool use_chat_template = true;
  std::vector<std::string> stop;
  std::vector<std::string> all_classes;
};

// The RULER tasks this harness builds, in the order of the seed paper's table (qa_1/qa_2 absent).
const std::vector<std::string>& RulerTasks();
bool IsRulerTask(const std::string& task);
int RulerMaxNewTokens(const std::string& task);

// Builds sample `index` of `task` with haystack size `size` (its unit depends on the task:
// noise lines, essay words, distractor needles, distinct words ... what RULER searches over).
// `length` is the target length in tokens: cwe and fwe change shape with it, as in RULER.
Sample BuildRuler(const std::string& task, int size, uint64_t seed, int index, int64_t length);

// Counts the tokens of a prompt (context + question + answer prefix, as the server would render it).
using TokenCounter = std::function<int64_t(const Sample&)>;

// The largest haystack size whose prompt plus the task's max_new_tokens fits in `length` tokens,
// judged on sample 0 (RULER sizes a task once the same way). `max_new_tokens` is the budget kept
// for the answer. Returns 0 when even size 1 does not fit; `probes` (if given) receives how many
// counts were made.
int FindRulerSize(const std::string& task, int64_t length, int max_new_tokens, uint64_t seed,
                  const TokenCounter& count, int* probes = nullptr);

// Word lists and haystack text (exposed for tests).
const std::vector<std::string>& Adjectives();
const std::vector<std::string>& Nouns();
const std::vector<std::string>& Verbs();
extern const char* const kNoiseSentence;
// The first `words` words of the project's generated essay text (always the same text).
std::string EssayWords(int words);
// Splits text into sentences after '.', '!' or '?' followed by whitespace (RULER uses punkt).
std::vector<std::string> SplitSentences(const std::string& text);
// Occurrences of `needle` in `text` (non-overlapping).
int CountOccurrences(const std::string& text, const std::string& needle);

}  // namespace defkv::eval
