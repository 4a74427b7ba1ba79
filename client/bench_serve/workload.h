// defkv-bench-serve's workload: which requests are sent, and when. Everything here is a pure
// function of the command line and the seed (no gRPC), so tests/bench_serve checks it alone.
//
// Request i of a run is fully determined by (seed, i): its (press, ratio) group, its context
// length in tokens, its max_new_tokens and its synthetic context text. Closed and open loop runs
// with the same seed therefore send the same requests; only the timing differs.
#pragma once

#include <cstddef>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace defkv::bench_serve {

// A distribution over positive integers, spelled
//   "N"                 always N
//   "A,B,C"             one of the values, equally likely; "A=3,B=1" weights them
//   "uniform:LO:HI"     uniform over LO..HI, both included
class IntDistribution {
 public:
  static absl::StatusOr<IntDistribution> Parse(const std::string& spec);
  int64_t Sample(std::mt19937_64& rng) const;
  int64_t Min() const;
  int64_t Max() const;
  double Mean() const;
  const std::string& spec() const { return spec_; }

 private:
  std::string spec_;
  bool uniform_ = false;
  int64_t lo_ = 0, hi_ = 0;      // uniform_
  std::vector<int64_t> values_;  // !uniform_, with weights_ (same length, sum > 0)
  std::vector<double> weights_;
};

// One (press, ratio) pair of the mix and its share of the requests.
struct Group {
  std::string press;          // as written on the command line (a name or an alias)
  double ratio = 0;           // compression_ratio, in [0, 1)
  double weight = 1;          // > 0; shares are weight / total weight
  std::string Label() const;  // "press:ratio", e.g. "snapkv:0.8"
};

// "snapkv:0.8=3,none=1": comma-separated PRESS[:RATIO][=WEIGHT], ratio 0 and weight 1 by default.
// A pair written twice is an error (its weights would silently add up otherwise).
absl::StatusOr<std::vector<Group>> ParseMix(const std::string& spec);
// Index of a group drawn with probability weight / total weight.
size_t PickGroup(const std::vector<Group>& mix, std::mt19937_64& rng);

struct Workload {
  std::vector<Group> mix;
  IntDistribution context_tokens;
  IntDistribution max_new_tokens;
};

// What request `index` asks for. `seed` also seeds its text and its sampling.
struct RequestSpec {
  int64_t index = 0;
  size_t group = 0;
  int64_t context_tokens = 0;  // target; the server's count is in usage.context_tokens
  int32_t max_new_tokens = 0;
  uint64_t seed = 0;
};
RequestSpec MakeSpec(const Workload& w, uint64_t seed, int64_t index);

// Arrival times (seconds from the start) of an open-loop run: gaps drawn from a gamma
// distribution with mean 1 / rate and shape `burstiness` (1: exponential gaps, i.e. a Poisson
// process; below 1 burstier, above 1 more regular), as vLLM's benchmark_serving draws them.
class ArrivalSchedule {
 public:
  ArrivalSchedule(double rate, double burstiness, uint64_t seed);
  double Next();  // the next arrival time; strictly increasing in expectation, never decreasing

 private:
  std::mt19937_64 rng_;
  std::gamma_distribution<double> gap_;
  double t_ = 0;
};

// English-looking filler of exactly `chars` bytes, ASCII only, a pure function of `seed`:
// numbered sentences of 6 to 17 words drawn from a list of 110 common ones. Two seeds share no
// prefix longer than a few words, so nothing a server might cache is reused across requests.
std::string SyntheticText(uint64_t seed, size_t chars);

// Characters of SyntheticText per token of the served tokenizer, fitted from two probes
// (chars, tokens) so the fixed overhead (BOS, chat-template prefix) is not spread over the rate.
struct TokenEstimate {
  double chars_per_token = 4.0;
  double overhead_tokens = 0;          // tokens the server counts for an empty context
  size_t Chars(int64_t tokens) const;  // characters for about `tokens` context tokens
};
// InvalidArgument when the second probe does not count more tokens than the first.
absl::StatusOr<TokenEstimate> FitTokens(size_t chars1, int64_t tokens1, size_t chars2, int64_t tokens2);

// A 64-bit mix of (seed, stream, index): independent-looking seeds for the per-request RNGs.
uint64_t MixSeed(uint64_t seed, uint64_t stream, uint64_t index);

}  // namespace defkv::bench_serve
