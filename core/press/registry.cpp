#include "core/press/registry.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <functional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/press/presses.h"

namespace defkv::press {
namespace {

// Option values of one request, parsed against the catalogue's types.
class Options {
 public:
  absl::Status Parse(const PressInfo& info, const std::map<std::string, std::string>& given) {
    for (const auto& o : info.options) text_[o.name] = o.default_value;
    for (const auto& [k, v] : given) {
      // The name is captured by an init-capture: clang 14 (the sanitizer builds) cannot capture a
      // structured binding.
      auto it = std::find_if(info.options.begin(), info.options.end(),
                             [&name = k](const auto& o) { return o.name == name; });
      if (it == info.options.end()) {
        std::vector<std::string> names;
        for (const auto& o : info.options) names.push_back(o.name);
        return absl::InvalidArgumentError(absl::StrCat("press ", info.name, " has no option \"", k, "\" (",
                                                       names.empty() ? "it takes none" : "options: " + absl::StrJoin(names, ", "),
                                                       ")"));
      }
      text_[k] = v;
    }
    for (const auto& o : info.options) {
      const std::string& v = text_[o.name];
      auto bad = [&] {
        return absl::InvalidArgumentError(
            absl::StrCat("press option ", o.name, " expects ", o.type == "int" ? "an int" : "a " + o.type, ", got \"", v, "\""));
      };
      if (o.type == "int") {
        char* end = nullptr;
        errno = 0;
        long long x = std::strtoll(v.c_str(), &end, 10);
        if (v.empty() || *end != '\0' || errno == ERANGE) return bad();
        ints_[o.name] = x;
      } else if (o.type == "float") {
        char* end = nullptr;
        double x = std::strtod(v.c_str(), &end);
        if (v.empty() || *end != '\0' || !std::isfinite(x)) return bad();
        floats_[o.name] = x;
      } else if (o.type == "bool") {
        if (v == "true" || v == "1") bools_[o.name] = true;
        else if (v == "false" || v == "0") bools_[o.name] = false;
        else return bad();
      }
    }
    return absl::OkStatus();
  }
  int64_t Int(const std::string& k) const { return ints_.at(k); }
  double Float(const std::string& k) const { return floats_.at(k); }
  bool Bool(const std::string& k) const { return bools_.at(k); }

 private:
  std::map<std::string, std::string> text_;
  std::map<std::string, int64_t> ints_;
  std::map<std::string, double> floats_;
  std::map<std::string, bool> bools_;
};

absl::Status Range(bool ok, const std::string& what) {
  return ok ? absl::OkStatus() : absl::InvalidArgumentError(absl::StrCat("press option ", what));
}

absl::Status CheckCommon(const Options& o, const PressInfo& info) {
  for (const auto& opt : info.options) {
    const std::string& n = opt.name;
    absl::Status s;
    if (n == "window_size") s = Range(o.Int(n) >= 1, "window_size must be >= 1");
    if (n == "kernel_size") s = Range(o.Int(n) >= 1 && o.Int(n) % 2 == 1, "kernel_size must be odd and >= 1");
    if (n == "beta") s = Range(o.Int(n) >= 1, "beta must be >= 1");
    if (n == "n_sink") s = Range(o.Int(n) >= 0, "n_sink must be >= 0");
    if (n == "n_future_positions") s = Range(o.Int(n) >= 1, "n_future_positions must be >= 1");
    if (n == "alpha_safeguard") s = Range(o.Float(n) >= 0 && o.Float(n) <= 1, "alpha_safeguard must be in [0, 1]");
    if (n == "first_stage_ratio") s = Range(o.Float(n) >= 0 && o.Float(n) <= 1, "first_stage_ratio must be in [0, 1]");
    if (n == "tau") s = Range(o.Float(n) > 0 && o.Float(n) <= 1, "tau must be in (0, 1]");
    if (n == "epsilon") s = Range(o.Float(n) >= 0, "epsilon must be >= 0");
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

using Factory = std::function<std::unique_ptr<Press>(const Options&)>;

const std::map<std::string, Factory>& Factories() {
  static const std::map<std::string, Factory> kFactories = {
      {"none", [](const Options&) { return nullptr; }},
      {"snapkv", [](const Options& o) { return MakeSnapKV(o.Int("window_size"), o.Int("kernel_size")); }},
      {"pyramidkv", [](const Options& o) { return MakePyramidKV(o.Int("window_size"), o.Int("kernel_size"), o.Int("beta")); }},
      {"streaming_llm", [](const Options& o) { return MakeStreamingLLM(o.Int("n_sink")); }},
      {"knorm", [](const Options&) { return MakeKnorm(); }},
      {"random", [](const Options& o) { return MakeRandom(o.Int("seed")); }},
      {"tova", [](const Options&) { return MakeTova(); }},
      {"observed_attention", [](const Options&) { return MakeObservedAttention(); }},
      {"expected_attention",
       [](const Options& o) {
         return MakeExpectedAttention({o.Int("n_future_positions"), o.Int("n_sink"), o.Bool("use_covariance"),
                                       o.Bool("use_vnorm"), o.Float("epsilon")});
       }},
      {"keydiff", [](const Options&) { return MakeKeyDiff(); }},
      {"adakv", [](const Options& o) { return MakeAdaKV(o.Int("window_size"), o.Int("kernel_size"), o.Float("alpha_safeguard")); }},
      {"criticalkv",
       [](const Options& o) {
         return MakeCriticalKV(o.Int("window_size"), o.Int("kernel_size"), o.Float("epsilon"), o.Float("first_stage_ratio"));
       }},
      {"critical_adakv",
       [](const Options& o) {
         return MakeCriticalAdaKV(o.Int("window_size"), o.Int("kernel_size"), o.Float("alpha_safeguard"),
                                  o.Float("epsilon"), o.Float("first_stage_ratio"));
       }},
      {"defensivekv",
       [](const Options& o) { return MakeDefensiveKV(o.Int("window_size"), o.Int("kernel_size"), o.Float("tau"), false); }},
      {"layer_defensivekv",
       [](const Options& o) { return MakeDefensiveKV(o.Int("window_size"), o.Int("kernel_size"), o.Float("tau"), true); }},
  };
  return kFactories;
}

}  // namespace

absl::StatusOr<const PressInfo*> FindPress(const std::string& name) {
  std::vector<std::string> names;
  for (const auto& p : ListPresses()) {
    if (p.name == name || std::find(p.aliases.begin(), p.aliases.end(), name) != p.aliases.end()) return &p;
    names.push_back(p.name);
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown press \"", name, "\"; valid presses: ", absl::StrJoin(names, ", ")));
}

absl::Status CheckRatio(double ratio) {
  if (!(ratio >= 0.0 && ratio < 1.0))
    return absl::InvalidArgumentError(absl::StrCat("compression_ratio must be in [0, 1) (the fraction of the "
                                                   "context's KV entries removed), got ", ratio));
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Press>> MakePress(const std::string& name,
                                                 const std::map<std::string, std::string>& options) {
  auto info = FindPress(name);
  if (!info.ok()) return info.status();
  Options o;
  if (auto s = o.Parse(**info, options); !s.ok()) return s;
  if (auto s = CheckCommon(o, **info); !s.ok()) return s;
  return Factories().at((*info)->name)(o);
}

}  // namespace defkv::press
