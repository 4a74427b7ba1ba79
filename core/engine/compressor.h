// Runs a press during the context prefill: as kvpress's forward hook, after each layer's
// attention over the last context chunk, the press scores the layer's full context cache and
// the HeadwiseCache keeps the chosen entries, with room for the question and the answer. The
// generator prefills layer-major (model::LayerMajorPrefill), so a layer is compacted before
// the next one is written.
#pragma once

#include <vector>

#include "core/cache/headwise_cache.h"
#include "core/engine/generator.h"
#include "core/model/transformer.h"
#include "core/press/press.h"

namespace defkv::engine {

class Compressor final : public model::LayerHook {
 public:
  // extra_capacity: entries each head must be able to append after compression (question
  // length + max_new_tokens).
  Compressor(const model::Transformer& model, cache::HeadwiseCache& cache, press::Press& press, double ratio,
             int64_t context_len, int64_t extra_capacity, bool keep_positions = false);

  // Whether the next chunk is the last context chunk of its layer: its AfterAttention scores.
  void BeginChunk(bool last_chunk_of_layer) override { last_chunk_ = last_chunk_of_layer; }
  void AfterAttention(int64_t layer, const at::Tensor& x_norm) override;
  // Applies the selections of presses that decide across layers; call after the context.
  void Finish();

  // Kept context entries per layer and kv head, and time spent scoring and compacting.
  const std::vector<std::vector<int64_t>>& kept() const { return kept_; }
  // Kept positions per layer and head (ascending), when asked for at construction.
  const std::vector<std::vector<std::vector<int32_t>>>& positions() const { return positions_; }
  double scoring_seconds() const { return scoring_s_; }
  double compaction_seconds() const { return compaction_s_; }

 private:
  // Compacts `layer` to `sel`; `final`: the layer's last selection, recorded in kept() and
  // positions() (a narrowing press's earlier candidate sets are not).
  // `timed`: add the time it takes to compaction_seconds() (the caller times it otherwise).
  void Apply(int64_t layer, const press::HeadSelection& sel, bool final, bool timed = true);

  const model::Transformer& model_;
  cache::HeadwiseCache& cache_;
  press::Press& press_;
  double ratio_;
  int64_t context_len_, extra_, rows_needed_;
  bool last_chunk_ = false;
  std::vector<at::Tensor> hidden_;  // per layer: trailing attention inputs of the context
  std::vector<std::vector<int64_t>> kept_;
  bool keep_positions_;
  std::vector<std::vector<std::vector<int32_t>>> positions_;
  // For a press that narrows layers (Press::narrows_layers): per layer, what its storage holds
  // after a first narrowing, as flat indices h * context_len + position, ascending (undefined:
  // not narrowed yet, every position of every head).
  std::vector<at::Tensor> stored_;
  double scoring_s_ = 0, compaction_s_ = 0;
};

}  // namespace defkv::engine
