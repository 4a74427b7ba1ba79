#include "client/bench_serve/workload.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <set>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"

namespace defkv::bench_serve {
namespace {

absl::StatusOr<int64_t> PositiveInt(const std::string& s, const std::string& spec) {
  int64_t v = 0;
  if (!absl::SimpleAtoi(s, &v) || v < 1)
    return absl::InvalidArgumentError(absl::StrCat("'", s, "' in '", spec, "' is not a positive integer"));
  return v;
}

absl::StatusOr<double> Number(const std::string& s, const std::string& what) {
  double v = 0;
  if (!absl::SimpleAtod(s, &v) || !std::isfinite(v))
    return absl::InvalidArgumentError(absl::StrCat("'", s, "' is not a number (", what, ")"));
  return v;
}

}  // namespace

absl::StatusOr<IntDistribution> IntDistribution::Parse(const std::string& spec) {
  IntDistribution d;
  d.spec_ = spec;
  if (spec.empty()) return absl::InvalidArgumentError("empty distribution");
  if (spec.rfind("uniform:", 0) == 0) {
    const std::vector<std::string> parts = absl::StrSplit(spec.substr(8), ':');
    if (parts.size() != 2) return absl::InvalidArgumentError(absl::StrCat("'", d.spec_, "': want uniform:LO:HI"));
    auto lo = PositiveInt(parts[0], d.spec_);
    if (!lo.ok()) return lo.status();
    auto hi = PositiveInt(parts[1], d.spec_);
    if (!hi.ok()) return hi.status();
    if (*hi < *lo) return absl::InvalidArgumentError(absl::StrCat("'", d.spec_, "': HI is below LO"));
    d.uniform_ = true, d.lo_ = *lo, d.hi_ = *hi;
    return d;
  }
  for (std::string item : std::vector<std::string>(absl::StrSplit(spec, ','))) {
    double weight = 1;
    if (const auto eq = item.find('='); eq != std::string::npos) {
      auto w = Number(item.substr(eq + 1), "a weight");
      if (!w.ok()) return w.status();
      if (!(*w > 0)) return absl::InvalidArgumentError(absl::StrCat("'", d.spec_, "': weights must be > 0"));
      weight = *w;
      item = item.substr(0, eq);
    }
    auto v = PositiveInt(item, d.spec_);
    if (!v.ok()) return v.status();
    d.values_.push_back(*v);
    d.weights_.push_back(weight);
  }
  return d;
}

int64_t IntDistribution::Sample(std::mt19937_64& rng) const {
  if (uniform_) return std::uniform_int_distribution<int64_t>(lo_, hi_)(rng);
  if (values_.size() == 1) return values_[0];
  std::discrete_distribution<size_t> pick(weights_.begin(), weights_.end());
  return values_[pick(rng)];
}

int64_t IntDistribution::Min() const { return uniform_ ? lo_ : *std::min_element(values_.begin(), values_.end()); }

int64_t IntDistribution::Max() const { return uniform_ ? hi_ : *std::max_element(values_.begin(), values_.end()); }

double IntDistribution::Mean() const {
  if (uniform_) return (static_cast<double>(lo_) + static_cast<double>(hi_)) / 2;
  double sum = 0, total = 0;
  for (size_t i = 0; i < values_.size(); ++i)
    sum += weights_[i] * static_cast<double>(values_[i]), total += weights_[i];
  return sum / total;
}

std::string Group::Label() const { return absl::StrFormat("%s:%g", press, ratio); }

absl::StatusOr<std::vector<Group>> ParseMix(const std::string& spec) {
  std::vector<Group> mix;
  std::set<std::string> seen;
  if (spec.empty()) return absl::InvalidArgumentError("empty mix");
  for (std::string item : std::vector<std::string>(absl::StrSplit(spec, ','))) {
    Group g;
    if (const auto eq = item.find('='); eq != std::string::npos) {
      auto w = Number(item.substr(eq + 1), "a weight");
      if (!w.ok()) return w.status();
      if (!(*w > 0)) return absl::InvalidArgumentError(absl::StrCat("mix '", item, "': the weight must be > 0"));
      g.weight = *w;
      item = item.substr(0, eq);
    }
    if (const auto colon = item.find(':'); colon != std::string::npos) {
      auto r = Number(item.substr(colon + 1), "a compression ratio");
      if (!r.ok()) return r.status();
      if (!(*r >= 0 && *r < 1))
        return absl::InvalidArgumentError(absl::StrCat("mix '", item, "': the ratio must be in [0, 1)"));
      g.ratio = *r;
      item = item.substr(0, colon);
    }
    if (item.empty()) return absl::InvalidArgumentError(absl::StrCat("mix '", spec, "': a press name is empty"));
    g.press = item;
    if (!seen.insert(g.Label()).second)
      return absl::InvalidArgumentError(absl::StrCat("mix '", spec, "': ", g.Label(), " is listed twice"));
    mix.push_back(std::move(g));
  }
  return mix;
}

size_t PickGroup(const std::vector<Group>& mix, std::mt19937_64& rng) {
  if (mix.size() == 1) return 0;
  std::vector<double> w;
  for (const auto& g : mix) w.push_back(g.weight);
  return std::discrete_distribution<size_t>(w.begin(), w.end())(rng);
}

uint64_t MixSeed(uint64_t seed, uint64_t stream, uint64_t index) {
  // splitmix64 steps over the three inputs.
  uint64_t x = seed;
  for (uint64_t v : {stream, index}) {
    x += 0x9e3779b97f4a7c15ULL + v;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    x ^= x >> 31;
  }
  return x;
}

RequestSpec MakeSpec(const Workload& w, uint64_t seed, int64_t index) {
  RequestSpec s;
  s.index = index;
  s.seed = MixSeed(seed, 1, static_cast<uint64_t>(index));
  std::mt19937_64 rng(s.seed);
  s.group = PickGroup(w.mix, rng);
  s.context_tokens = w.context_tokens.Sample(rng);
  s.max_new_tokens = static_cast<int32_t>(w.max_new_tokens.Sample(rng));
  return s;
}

ArrivalSchedule::ArrivalSchedule(double rate, double burstiness, uint64_t seed)
    : rng_(MixSeed(seed, 2, 0)), gap_(burstiness, 1.0 / (rate * burstiness)) {}

double ArrivalSchedule::Next() {
  t_ += gap_(rng_);
  return t_;
}

std::string SyntheticText(uint64_t seed, size_t chars) {
  static constexpr const char* kWords[] = {
      "the",     "of",     "and",     "to",      "in",       "a",        "is",       "that",    "for",     "it",
      "as",      "was",    "with",    "be",      "by",       "on",       "not",      "he",      "this",    "are",
      "or",      "his",    "from",    "at",      "which",    "but",      "have",     "an",      "had",     "they",
      "you",     "were",   "their",   "one",     "all",      "we",       "can",      "her",     "has",     "there",
      "been",    "if",     "more",    "when",    "will",     "would",    "who",      "so",      "no",      "time",
      "river",   "market", "village", "morning", "letter",   "garden",   "engine",   "window",  "winter",  "harbor",
      "doctor",  "bridge", "station", "country", "evening",  "history",  "machine",  "teacher", "factory", "company",
      "report",  "number", "system",  "island",  "mountain", "question", "problem",  "water",   "family",  "school",
      "walked",  "opened", "carried", "noticed", "returned", "measured", "followed", "painted", "counted", "answered",
      "quickly", "slowly", "quietly", "early",   "later",    "again",    "together", "almost",  "already", "perhaps",
      "small",   "large",  "old",     "new",     "bright",   "heavy",    "narrow",   "careful", "distant", "simple"};
  constexpr size_t kCount = sizeof(kWords) / sizeof(kWords[0]);
  std::mt19937_64 rng(MixSeed(seed, 3, 0));
  std::uniform_int_distribution<size_t> word(0, kCount - 1), length(6, 17);
  std::string out;
  out.reserve(chars + 32);
  for (int sentence = 1; out.size() < chars; ++sentence) {
    std::string s = absl::StrCat(sentence, ".");
    const size_t n = length(rng);
    for (size_t i = 0; i < n; ++i) s.append(" ").append(kWords[word(rng)]);
    s += ". ";
    out += s;
  }
  out.resize(chars);
  return out;
}

size_t TokenEstimate::Chars(int64_t tokens) const {
  const double body = std::max(0.0, static_cast<double>(tokens) - overhead_tokens);
  return static_cast<size_t>(std::llround(body * chars_per_token));
}

absl::StatusOr<TokenEstimate> FitTokens(size_t chars1, int64_t tokens1, size_t chars2, int64_t tokens2) {
  if (chars2 <= chars1 || tokens2 <= tokens1)
    return absl::InvalidArgumentError(
        absl::StrFormat("token counts do not grow with the text (%d chars: %d tokens, %d chars: %d tokens)", chars1,
                        tokens1, chars2, tokens2));
  TokenEstimate e;
  e.chars_per_token = static_cast<double>(chars2 - chars1) / static_cast<double>(tokens2 - tokens1);
  e.overhead_tokens = std::max(0.0, static_cast<double>(tokens1) - static_cast<double>(chars1) / e.chars_per_token);
  return e;
}

}  // namespace defkv::bench_serve
