// Building blocks shared by the presses: kept-count rounding, top-k selections, the
// observation-window attention, pooling and the projected value norm.
#include <algorithm>
#include <cmath>
#include <limits>

#include "core/model/fused_ops.h"
#include "core/press/press.h"

namespace defkv::press {

int64_t NKept(int64_t context_len, double ratio) {
  const auto n = static_cast<int64_t>(static_cast<double>(context_len) * (1.0 - ratio));
  return std::max<int64_t>(1, n);
}

namespace {

// One int64 key per score that orders as (score, -position) does: the float's bits made
// order-preserving (negative floats get their magnitude bits flipped), then 2^32 - 1 - position
// in the low 32 bits. -0 and +0 get the same key bits, as they compare equal.
at::Tensor RankKeys(const at::Tensor& scores) {
  const int64_t len = scores.size(-1);
  TORCH_CHECK(len < (int64_t{1} << 32), "RankKeys: rows longer than 2^32 entries");
  at::Tensor bits = (scores.to(at::kFloat) + 0.0).contiguous().view(at::kInt).to(at::kLong);
  at::Tensor ordered = at::where(bits < 0, bits.bitwise_xor(0x7FFFFFFF), bits);
  at::Tensor positions = at::arange(len, scores.options().dtype(at::kLong));
  return ordered * (int64_t{1} << 32) + ((int64_t{1} << 32) - 1 - positions);
}

}  // namespace

at::Tensor TopKIndices(const at::Tensor& scores, int64_t k) {
  return std::get<1>(RankKeys(scores).topk(std::min<int64_t>(k, scores.size(-1)), -1));
}

at::Tensor SortDescendingIndices(const at::Tensor& scores) {
  return std::get<1>(RankKeys(scores).sort(/*dim=*/-1, /*descending=*/true));
}

HeadSelection TopKPerHead(const at::Tensor& scores, int64_t n) {
  // One top-k over every head's row.
  at::Tensor idx = TopKIndices(scores, n);
  HeadSelection out;
  for (int64_t h = 0; h < scores.size(0); ++h) out.push_back(idx[h]);
  return out;
}

HeadSelection TopKPerHead(const at::Tensor& scores, const std::vector<int64_t>& counts) {
  HeadSelection out;
  for (int64_t h = 0; h < scores.size(0); ++h) {
    const int64_t n = std::min<int64_t>(counts[h], scores.size(1));
    out.push_back(TopKIndices(scores[h], n));
  }
  return out;
}

std::vector<int64_t> CountPerHead(const at::Tensor& flat_indices, int64_t num_heads, int64_t len) {
  at::Tensor heads = at::floor_divide(flat_indices, len).to(at::kCPU);
  at::Tensor counts = at::bincount(heads, {}, num_heads);
  std::vector<int64_t> out(num_heads);
  for (int64_t h = 0; h < num_heads; ++h) out[h] = counts[h].item<int64_t>();
  return out;
}

at::Tensor TopKFlatSorted(const at::Tensor& flat, int64_t n) {
  return std::get<0>(TopKIndices(flat, n).sort());
}

HeadSelection SplitByRow(const at::Tensor& sorted_flat, int64_t rows, int64_t len) {
  // One transfer for the counts of all rows (a single host synchronisation).
  at::Tensor counts = at::bincount(at::floor_divide(sorted_flat, len), {}, rows).to(at::kCPU);
  const auto c = counts.accessor<int64_t, 1>();
  HeadSelection out;
  int64_t at = 0;
  for (int64_t r = 0; r < rows; ++r) {
    out.push_back(sorted_flat.narrow(0, at, c[r]) - r * len);
    at += c[r];
  }
  return out;
}

HeadSelection FlatTopK(const at::Tensor& scores, int64_t n) {
  return SplitByRow(TopKFlatSorted(scores.reshape({-1}), n), scores.size(0), scores.size(1));
}

std::optional<HeadSelection> ScorerPress::CompressLayer(const LayerInputs& in) {
  return TopKPerHead(Score(in), NKept(in.context_len(), in.compression_ratio));
}

int64_t KvHeadsPerScoringPass(const LayerInputs& in, int64_t w) {
  constexpr int64_t kPassBytes = int64_t{192} << 20;
  const int64_t heads = in.num_kv_heads(), group = in.model->config().num_heads / heads;
  const int64_t per_head = std::max<int64_t>(1, group * w * in.context_len() * 4);
  return std::clamp<int64_t>(kPassBytes / per_head, 1, heads);
}

at::Tensor WindowAttention(const LayerInputs& in, int64_t w, int64_t first_kv_head, int64_t kv_heads) {
  const model::Transformer& m = *in.model;
  const int64_t len = in.context_len(), hq = m.config().num_heads, d = m.config().head_dim;
  at::Tensor x = in.hidden.narrow(0, in.hidden.size(0) - w, w);
  at::Tensor q = m.PreRopeQueries(in.layer, x);  // [H_q, w, D]
  auto positions = at::arange(len - w, len, at::TensorOptions().dtype(at::kLong).device(q.device()));
  auto [cos, sin] = m.rope().Tables(positions, q.scalar_type());
  q = model::Rope::Apply(q, cos, sin);
  // The G query heads of a kv head as one [G * w, D] block against its keys: no copy of K per
  // query head ([H_q, L, D] would be 4x the layer's keys at GQA 4).
  const int64_t group = hq / in.num_kv_heads();
  at::Tensor keys = in.keys;
  if (first_kv_head >= 0) {
    q = q.narrow(0, first_kv_head * group, kv_heads * group);
    keys = keys.narrow(0, first_kv_head, kv_heads);
  }
  const int64_t heads = keys.size(0), rows = heads * group;
  at::Tensor logits = at::matmul(q.reshape({heads, group * w, d}), keys.transpose(1, 2)).view({rows, w, len}) /
                      std::sqrt(static_cast<double>(d));
  // Window query j sits at position L - w + j and sees keys 0 .. L - w + j.
  auto opts = at::TensorOptions().dtype(at::kLong).device(q.device());
  at::Tensor future = at::arange(0, len, opts).unsqueeze(0) > at::arange(len - w, len, opts).unsqueeze(1);
  logits = logits.to(at::kFloat);
  logits.masked_fill_(future, -std::numeric_limits<float>::infinity());
  return at::softmax(logits, -1).narrow(-1, 0, len - w);
}

at::Tensor AvgPool(const at::Tensor& x, int64_t k) {
  // avg_pool1d wants [N, C, L]; count_include_pad divides every window by k.
  auto shape = x.sizes().vec();
  at::Tensor flat = x.reshape({-1, 1, shape.back()});
  at::Tensor pooled = at::avg_pool1d(flat, {k}, {1}, {k / 2}, /*ceil_mode=*/false, /*count_include_pad=*/true);
  return pooled.reshape(shape);
}

at::Tensor GroupMean(const at::Tensor& x, int64_t num_kv_heads) {
  auto shape = x.sizes().vec();
  std::vector<int64_t> grouped = {num_kv_heads, shape[0] / num_kv_heads};
  grouped.insert(grouped.end(), shape.begin() + 1, shape.end());
  return x.reshape(grouped).mean(1);
}

at::Tensor ProjectedValueNorm(const LayerInputs& in, int64_t n) {
  const model::Transformer& m = *in.model;
  const int64_t hq = m.config().num_heads, d = m.config().head_dim, hidden = m.config().hidden_size;
  // The fused kernel on CUDA (kernels/value_norm.h); this blocked ATen product is its fallback
  // and the CPU reference.
  if (at::Tensor fused = model::FusedValueNorm(in.values.narrow(1, 0, n), m.layer(in.layer).w_o, hq); fused.defined())
    return fused;
  const int64_t group = hq / in.num_kv_heads();
  // W_o^(h) = o_proj.weight[:, hD:(h+1)D]^T, as [H_q, D, hidden].
  at::Tensor wo = m.layer(in.layer).w_o.view({hidden, hq, d}).permute({1, 2, 0});
  at::Tensor out = at::empty({hq, n}, in.values.options().dtype(at::kFloat));
  constexpr int64_t kBlock = 1024;  // bounds the [H_q, block, hidden] product
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t rows = std::min(kBlock, n - b);
    at::Tensor v = in.values.narrow(1, b, rows).repeat_interleave(group, 0);  // [H_q, rows, D]
    out.narrow(1, b, rows).copy_(at::bmm(v, wo).abs().sum(-1));
  }
  return out;
}

at::Tensor PadScores(const at::Tensor& scores, int64_t n, double value, bool at_start) {
  at::Tensor pad = at::full({scores.size(0), n}, value, scores.options());
  return at_start ? at::cat({pad, scores}, 1) : at::cat({scores, pad}, 1);
}

}  // namespace defkv::press
