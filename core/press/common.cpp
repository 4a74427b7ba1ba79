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
  // In place after the first copy: at 128K Layer-DefensiveKV ranks 7M entries at once.
  at::Tensor key = (scores.to(at::kFloat) + 0.0).contiguous().view(at::kInt).to(at::kLong);
  key.bitwise_xor_(key.__rshift__(31).bitwise_and_(0x7FFFFFFF));  // negative: low 31 bits flipped
  constexpr int64_t kLow = int64_t{1} << 32;
  key.mul_(kLow).add_(at::arange(kLow - 1, kLow - 1 - len, -1, key.options()));
  return key;
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

at::Tensor TopKFlatAscending(const at::Tensor& flat, int64_t n) {
  const int64_t len = flat.numel();
  const auto longs = flat.options().dtype(at::kLong);
  if (n <= 0) return at::empty({0}, longs);
  if (n >= len) return at::arange(len, longs);
  const at::Tensor key = RankKeys(flat.reshape({-1}));  // unique, so exactly n keys are >= the answer
  const at::Tensor ends = at::stack({key.min(), key.max()}).to(at::kCPU);
  // The keys as unsigned 128-bit numbers in the same order (int64 with the sign bit flipped), so
  // that steps between them never overflow.
  using U = unsigned __int128;
  constexpr uint64_t kFlip = uint64_t{1} << 63;
  const auto to_u = [](int64_t v) { return static_cast<U>(static_cast<uint64_t>(v) ^ kFlip); };
  const auto to_key = [](U v) { return static_cast<int64_t>(static_cast<uint64_t>(v) ^ kFlip); };
  // Invariant: count(key >= base) >= n > count(key >= hi). Each round splits [base, hi) into up
  // to 256 steps and counts the keys at or above every step at once (bucketize, then a
  // histogram): at most 8 rounds for 64-bit keys, one host synchronisation each.
  U base = to_u(ends[0].item<int64_t>()), hi = to_u(ends[1].item<int64_t>()) + 1;
  while (hi - base > 1) {
    const U span = hi - base;
    const int64_t steps = span < 256 ? static_cast<int64_t>(span) : 256;
    const auto bound = [&](int64_t i) { return base + span * static_cast<U>(i) / static_cast<U>(steps); };
    std::vector<int64_t> bounds(steps - 1);  // strictly increasing: span >= steps
    for (int64_t i = 1; i < steps; ++i) bounds[i - 1] = to_key(bound(i));
    // bucket = how many bounds are <= the key, so count(key >= bound(i)) = keys in buckets >= i.
    const at::Tensor bucket = at::bucketize(key, at::tensor(bounds, longs), /*out_int32=*/true, /*right=*/true);
    const at::Tensor hist = at::bincount(bucket, {}, steps).to(at::kCPU);
    const auto h = hist.accessor<int64_t, 1>();
    int64_t step = 0, at_or_above = 0;  // the largest i >= 1 with count(key >= bound(i)) >= n, else 0
    for (int64_t i = steps - 1; i >= 1; --i) {
      at_or_above += h[i];
      if (at_or_above >= n) {
        step = i;
        break;
      }
    }
    const U next_hi = step + 1 < steps ? bound(step + 1) : hi;
    base = bound(step);
    hi = next_hi;
  }
  at::Tensor out = at::ge(key, to_key(base)).nonzero().squeeze(1);
  TORCH_CHECK(out.numel() == n, "TopKFlatAscending: ", out.numel(), " keys at or above the threshold, not ", n);
  return out;
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
