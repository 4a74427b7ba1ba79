#include "core/engine/compressor.h"

#include <chrono>

#include "kernels/device_info.h"

namespace defkv::engine {
namespace {
using Clock = std::chrono::steady_clock;
// GPU work runs asynchronously: stages are timed between device synchronisations, so queued
// prefill work is not billed to compression.
Clock::time_point Mark(const at::Device& d) {
  if (d.is_cuda()) kernels::SynchronizeDevice();
  return Clock::now();
}
double Since(const at::Device& d, Clock::time_point t) { return std::chrono::duration<double>(Mark(d) - t).count(); }
}  // namespace

Compressor::Compressor(const model::Transformer& model, cache::HeadwiseCache& cache, press::Press& press, double ratio,
                       int64_t context_len, int64_t extra_capacity, bool keep_positions)
    : model_(model), cache_(cache), press_(press), ratio_(ratio), context_len_(context_len), extra_(extra_capacity),
      rows_needed_(press.hidden_rows(context_len)), hidden_(model.config().num_layers),
      kept_(model.config().num_layers, std::vector<int64_t>(model.config().num_kv_heads, context_len)),
      keep_positions_(keep_positions) {
  if (keep_positions_) {
    // Until a layer is compressed it keeps everything.
    std::vector<int32_t> all(context_len);
    for (int64_t i = 0; i < context_len; ++i) all[i] = static_cast<int32_t>(i);
    positions_.assign(model.config().num_layers, std::vector<std::vector<int32_t>>(model.config().num_kv_heads, all));
  }
}

void Compressor::AfterAttention(int64_t layer, const at::Tensor& x_norm) {
  if (rows_needed_ != 0) {
    at::Tensor& h = hidden_[layer];
    h = h.defined() ? at::cat({h, x_norm}, 0) : x_norm;
    if (rows_needed_ > 0 && h.size(0) > rows_needed_) h = h.narrow(0, h.size(0) - rows_needed_, rows_needed_).clone();
  }
  if (!last_chunk_) return;

  press::LayerInputs in;
  in.layer = layer;
  in.model = &model_;
  in.keys = cache_.keys(layer);
  in.values = cache_.values(layer);
  in.hidden = hidden_[layer];
  in.compression_ratio = ratio_;
  const at::Device dev = model_.device();
  const auto t = Mark(dev);
  std::optional<press::HeadSelection> sel = press_.CompressLayer(in);
  scoring_s_ += Since(dev, t);
  // Drop the views of the layer's full storage before it is compacted, so that the compaction
  // can free it: otherwise it lives on beside the kept rows' copy and their new storage (on the
  // H200 at 128K this was Layer-DefensiveKV's peak, 0.5 GB over the other presses').
  in = press::LayerInputs();
  hidden_[layer] = at::Tensor();
  if (sel) Apply(layer, *sel, /*final=*/!press_.narrows_layers());
  if (press_.narrows_layers()) {
    // Many small narrowings: timed together (each timing point synchronises the device).
    const auto t_narrow = Mark(dev);
    for (const auto& [earlier, candidates] : press_.TakeNarrowed()) Apply(earlier, candidates, /*final=*/false, false);
    compaction_s_ += Since(dev, t_narrow);
  }
}

void Compressor::Finish() {
  const at::Device dev = model_.device();
  const auto t = Mark(dev);
  std::vector<press::HeadSelection> all = press_.Finish();
  scoring_s_ += Since(dev, t);
  for (size_t l = 0; l < all.size(); ++l) Apply(static_cast<int64_t>(l), all[l], /*final=*/true);
  stored_.clear();
}

void Compressor::Apply(int64_t layer, const press::HeadSelection& sel, bool final, bool timed) {
  const at::Device dev = model_.device();
  const auto t = timed ? Mark(dev) : Clock::time_point();
  if (press_.narrows_layers()) {
    // The layer may be narrowed many times: the positions become flat indices h * context_len +
    // position (ascending), their rows in what the layer holds are found on the device, and
    // the cache narrows to them there (no index comes to the host).
    if (stored_.empty()) stored_.resize(kept_.size());
    std::vector<at::Tensor> parts;
    std::vector<int64_t> per_head;
    for (size_t h = 0; h < sel.size(); ++h) {
      parts.push_back(sel[h].to(dev, at::kLong).reshape({-1}) + static_cast<int64_t>(h) * context_len_);
      per_head.push_back(sel[h].numel());
    }
    const at::Tensor flat = std::get<0>(at::cat(parts).sort());
    at::Tensor& held = stored_[layer];
    at::Tensor entries = flat;  // a layer not narrowed yet holds every position of every head
    if (held.defined()) {
      entries = at::searchsorted(held, flat);
      // The press hands out subsets of what it handed out before; the final selection is
      // checked against what the layer holds (a synchronisation, so only once per layer).
      const bool held_all = !final || flat.numel() == 0 ||
                            (held.numel() > 0 && at::equal(held.index_select(0, entries.clamp_max(held.numel() - 1)), flat));
      TORCH_CHECK(held_all, "Compressor: layer ", layer, " selects a position it no longer holds");
    } else {
      for (int64_t n : cache_.head_lengths(layer))
        TORCH_CHECK(n == context_len_, "Compressor: layer ", layer, " holds ", n, " entries in a head, not the context's ",
                    context_len_);
    }
    cache_.Narrow(layer, entries, per_head, extra_);
    held = flat;
  } else {
    cache_.Compact(layer, sel, extra_);
  }
  if (timed) compaction_s_ += Since(dev, t);
  if (!final) return;
  for (size_t h = 0; h < sel.size(); ++h) {
    kept_[layer][h] = sel[h].numel();
    if (keep_positions_) {
      at::Tensor sorted = std::get<0>(sel[h].to(at::kCPU, at::kLong).sort()).to(at::kInt).contiguous();
      positions_[layer][h].assign(sorted.data_ptr<int32_t>(), sorted.data_ptr<int32_t>() + sorted.numel());
    }
  }
}

}  // namespace defkv::engine
