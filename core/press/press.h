// Presses: what to keep of a layer's context KV cache (spec/presses.md).
//
// A press sees one layer at a time, right after the layer's prefill attention over the whole
// context (the kvpress forward-hook semantics, DESIGN.md §1), and answers with the context
// positions each kv head keeps. Scorer presses return scores and let a budget policy choose
// (uniform per head, AdaKV across the heads of a layer, global across layers); protected
// tokens (windows, sinks) are expressed as high scores, as kvpress does.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>

#include "absl/status/status.h"
#include "core/model/transformer.h"

namespace defkv::press {

// One layer of one sequence at compression time.
struct LayerInputs {
  int64_t layer = 0;
  const model::Transformer* model = nullptr;
  at::Tensor keys;    // [H_kv, L, D] context keys (RoPE applied)
  at::Tensor values;  // [H_kv, L, D]
  // Attention inputs (after input_layernorm) of the last hidden.size(0) context tokens, as many
  // as Press::hidden_rows() asked for: [rows, hidden].
  at::Tensor hidden;
  double compression_ratio = 0;

  int64_t context_len() const { return keys.size(1); }
  int64_t num_kv_heads() const { return keys.size(0); }
};

// Context positions kept by each kv head of a layer: one int64 tensor per head.
using HeadSelection = std::vector<at::Tensor>;

class Press {
 public:
  virtual ~Press() = default;

  // Checks that a context of `context_len` tokens can be compressed (e.g. longer than the
  // window); the message says why not.
  virtual absl::Status CheckContext(int64_t context_len) const { return absl::OkStatus(); }
  // How many trailing context rows of attention input LayerInputs::hidden must hold
  // (-1: all of them).
  virtual int64_t hidden_rows(int64_t context_len) const { return 0; }
  // Per-layer presses return the layer's selection. Presses that allocate across layers give
  // every layer's selection from Finish(); from CompressLayer they return nullopt, or, when
  // narrows_layers() says so, a set of candidates that holds every entry the layer can still
  // keep (the layer is compacted to it at once, and Finish's selection is a subset of it).
  // Selections are context positions, whatever was compacted before.
  virtual std::optional<HeadSelection> CompressLayer(const LayerInputs& in) = 0;
  virtual std::vector<HeadSelection> Finish() { return {}; }
  virtual bool narrows_layers() const { return false; }
  // For a press that narrows layers: earlier layers (by LayerInputs::layer) whose candidates
  // have shrunk since they were last handed out, as context positions per head, ascending; the
  // caller compacts each to its set at once. Taking them empties the list.
  virtual std::vector<std::pair<int64_t, HeadSelection>> TakeNarrowed() { return {}; }
};

// Scores every context entry of a layer: [H_kv, L] fp32, higher = keep.
class ScorerPress : public Press {
 public:
  virtual at::Tensor Score(const LayerInputs& in) = 0;
  // Uniform budget: every head keeps its top n_kept (spec §1.2, §3.2).
  std::optional<HeadSelection> CompressLayer(const LayerInputs& in) override;
};

// ---- shared building blocks (core/press/common.cpp) ----

// kvpress's compute_n_kept: max(1, int(L * (1 - ratio))) with double arithmetic.
int64_t NKept(int64_t context_len, double ratio);
// Every selection below ranks by score, and equal scores by position: the earlier position
// first. ATen's topk and sort leave the order of equal values to the implementation, and its
// CPU and CUDA kernels choose differently, so without this a press whose scores tie (softmax
// weights that underflow to 0, say) would keep different entries on the two devices.
// The indices of the k highest entries along the last dim, highest first.
at::Tensor TopKIndices(const at::Tensor& scores, int64_t k);
// The order of all entries along the last dim, highest first.
at::Tensor SortDescendingIndices(const at::Tensor& scores);
// Per head, the positions of the n largest scores ([H, L] -> H tensors of n positions).
HeadSelection TopKPerHead(const at::Tensor& scores, int64_t n);
// Per head, top counts[h] positions.
HeadSelection TopKPerHead(const at::Tensor& scores, const std::vector<int64_t>& counts);
// The n largest entries of the flattened [H, L] scores, split by head (each head's positions
// in ascending order).
HeadSelection FlatTopK(const at::Tensor& scores, int64_t n);
// The flat indices of the n largest entries of a 1-D tensor, in ascending order.
at::Tensor TopKFlatSorted(const at::Tensor& flat, int64_t n);
// The same indices as TopKFlatSorted, found with the memory of one int64 key per entry instead of
// a sort's (several times that): the n-th largest rank key by a 256-way search (at most 8
// rounds, each a histogram and a host synchronisation), then every entry at or above it, in
// index order. For selections of most of a long vector (Layer-DefensiveKV's running budget).
at::Tensor TopKFlatAscending(const at::Tensor& flat, int64_t n);
// Ascending flat indices into `rows` rows of `len` entries, split into one tensor of positions
// per row (one host synchronisation for all rows).
HeadSelection SplitByRow(const at::Tensor& sorted_flat, int64_t rows, int64_t len);
// Number of entries of each head among `flat_indices` into an [H, L] score tensor.
std::vector<int64_t> CountPerHead(const at::Tensor& flat_indices, int64_t num_heads, int64_t len);

// Window attention (spec §1.4): the last w context queries against all L keys, causal inside
// the window, fp32 softmax over keys, window columns dropped. [H_q, w, L - w]; with
// first_kv_head >= 0 only the G query heads of each of kv heads first_kv_head ..
// first_kv_head + kv_heads - 1, [kv_heads * G, w, L - w].
at::Tensor WindowAttention(const LayerInputs& in, int64_t w, int64_t first_kv_head = -1, int64_t kv_heads = 1);
// How many kv heads a window-attention scorer takes in one pass, so that the fp32 [G, w, L]
// blocks of a pass stay under 192 MiB: the temporaries of all 32 query heads at once are
// 1.3 GB at 128K for Llama-3.1-8B (one kv head per pass there), while small contexts take every
// head in one pass (fewer launches: 6 of 8 kv heads per pass at 32K).
int64_t KvHeadsPerScoringPass(const LayerInputs& in, int64_t w);
// F.avg_pool1d(x, k, stride 1, padding k/2, count_include_pad) along the last axis.
at::Tensor AvgPool(const at::Tensor& x, int64_t k);
// ||V[g(h), t] . W_o^(h)||_1 for every query head h and token t < n: [H_q, n] (spec §3.12).
at::Tensor ProjectedValueNorm(const LayerInputs& in, int64_t n);
// Mean over the query heads of each GQA group: [H_q, ...] -> [H_kv, ...].
at::Tensor GroupMean(const at::Tensor& x, int64_t num_kv_heads);
// Appends `n` columns of `value` at the end (or start) of [H, L'] scores.
at::Tensor PadScores(const at::Tensor& scores, int64_t n, double value, bool at_start = false);

}  // namespace defkv::press
