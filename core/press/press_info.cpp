#include "core/press/press_info.h"

namespace defkv::press {
namespace {

// Options shared by the presses that score with the observation-window attention.
PressOptionInfo Window() {
  return {"window_size", "int", "32",
          "observation window: the last window_size context tokens score the rest and are always kept "
          "(32 as in the DefensiveKV paper; kvpress upstream uses 64 for SnapKV/PyramidKV)"};
}
PressOptionInfo Kernel() {
  return {"kernel_size", "int", "5", "odd width of the average pooling along the key axis"};
}
PressOptionInfo Alpha() {
  return {"alpha_safeguard", "float", "0.2",
          "AdaKV floor: every head keeps at least int(alpha * per-head budget) of its best entries"};
}
PressOptionInfo Epsilon() { return {"epsilon", "float", "0.0001", "added to the base score before the value-norm weighting"}; }
PressOptionInfo FirstStage() {
  return {"first_stage_ratio", "float", "0.5", "share of each head's budget chosen by attention alone (stage 1)"};
}
PressOptionInfo Tau() {
  return {"tau", "float", "0.9", "stage-1 attention-mass threshold: protect the fewest tokens covering tau - beta of the mass"};
}

std::vector<PressInfo> Build() {
  return {
      {"none", {"full", "no_press"}, "full cache: nothing is evicted", {}},
      {"snapkv", {}, "mean attention of the observation window, pooled, mean over the GQA group (SnapKV)", {Window(), Kernel()}},
      {"pyramidkv", {}, "SnapKV scores with a per-layer budget decreasing linearly with depth (PyramidKV)",
       {Window(), Kernel(), {"beta", "int", "20", "ratio of the largest to the smallest layer budget"}}},
      {"streaming_llm", {"streamingllm"}, "keeps the first n_sink tokens and the most recent ones (StreamingLLM)",
       {{"n_sink", "int", "4", "attention-sink tokens kept at the start"}}},
      {"knorm", {}, "keeps the keys of lowest L2 norm", {}},
      {"random", {}, "uniformly random scores (a baseline)", {{"seed", "int", "0", "random seed"}}},
      {"tova", {}, "attention of the last context token, mean over all heads; same set for every head (TOVA)", {}},
      {"observed_attention", {"h2o"}, "average attention each token received during the prefill (H2O-like)", {}},
      {"expected_attention", {}, "attention expected from future queries modelled as a Gaussian, times the value norm",
       {{"n_future_positions", "int", "512", "future positions the RoPE rotation is averaged over"},
        {"n_sink", "int", "4", "first tokens always kept"},
        {"use_covariance", "bool", "true", "include the query covariance term"},
        {"use_vnorm", "bool", "true", "multiply by the value norm"},
        {"epsilon", "float", "0", "added to the score before the value norm"}}},
      {"keydiff", {}, "keeps keys least similar to the mean normalised key (KeyDiff)", {}},
      {"adakv", {"adasnapkv", "ada_snapkv", "efficient_ada_snapkv"},
       "SnapKV scores with head-wise budgets across the heads of a layer and a per-head floor (Ada-SnapKV)",
       {Window(), Kernel(), Alpha()}},
      {"criticalkv", {"criti_snapkv"},
       "SnapKV, then half the budget by attention and half by attention x projected value norm (CriticalKV)",
       {Window(), Kernel(), Epsilon(), FirstStage()}},
      {"critical_adakv", {"criti_adasnapkv", "ada_criticalkv"},
       "CriticalKV selection inside AdaKV head-wise budgets (AdaCriticalKV)",
       {Window(), Kernel(), Alpha(), Epsilon(), FirstStage()}},
      {"defensivekv", {"efficient_defensivekv"},
       "defensive aggregation: max over window queries and GQA heads, clamped to the head mean, times the "
       "value-norm share, head-wise budgets with attention-mass protection (DefensiveKV)",
       {Window(), Kernel(), Tau()}},
      {"layer_defensivekv", {"efficient_layer_defensivekv"},
       "DefensiveKV scores with one budget shared by all layers and heads (Layer-DefensiveKV)",
       {Window(), Kernel(), Tau()}},
  };
}

}  // namespace

const std::vector<PressInfo>& ListPresses() {
  static const std::vector<PressInfo> kPresses = Build();
  return kPresses;
}

}  // namespace defkv::press
