#include <algorithm>

#include "core/cache/kv_cache.h"

namespace defkv::cache {

at::Tensor CausalAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  const int64_t t = q.size(1), s = k.size(1);
  std::optional<at::Tensor> mask;
  bool is_causal = false;
  if (t > 1) {
    if (t == s) {
      is_causal = true;
    } else {
      // Query i (absolute row s - t + i) may see keys 0 .. s - t + i.
      auto rows = at::arange(s - t, s, at::TensorOptions().dtype(at::kLong).device(q.device())).unsqueeze(1);
      auto cols = at::arange(0, s, at::TensorOptions().dtype(at::kLong).device(q.device())).unsqueeze(0);
      mask = cols <= rows;
    }
  }
  auto out = at::scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), mask,
                                              /*dropout_p=*/0.0, is_causal, scale,
                                              /*enable_gqa=*/q.size(0) != k.size(0));
  return out.squeeze(0);
}

DenseKvCache::DenseKvCache(int64_t num_layers, int64_t num_kv_heads, int64_t head_dim,
                           at::ScalarType dtype, at::Device device)
    : num_kv_heads_(num_kv_heads), head_dim_(head_dim), dtype_(dtype), device_(device),
      k_(num_layers), v_(num_layers), lengths_(num_layers, 0) {}

void DenseKvCache::Reserve(int64_t tokens) {
  for (size_t l = 0; l < k_.size(); ++l) Grow(static_cast<int64_t>(l), tokens);
}

void DenseKvCache::Grow(int64_t layer, int64_t needed) {
  auto& k = k_[layer];
  auto& v = v_[layer];
  const int64_t cap = k.defined() ? k.size(1) : 0;
  if (needed <= cap) return;
  const int64_t new_cap = std::max(needed, cap * 2);
  auto opts = at::TensorOptions().dtype(dtype_).device(device_);
  auto nk = at::empty({num_kv_heads_, new_cap, head_dim_}, opts);
  auto nv = at::empty({num_kv_heads_, new_cap, head_dim_}, opts);
  const int64_t len = lengths_[layer];
  if (len > 0) {
    nk.narrow(1, 0, len).copy_(k.narrow(1, 0, len));
    nv.narrow(1, 0, len).copy_(v.narrow(1, 0, len));
  }
  k = nk;
  v = nv;
}

at::Tensor DenseKvCache::AppendAndAttend(int64_t layer, const at::Tensor& q, const at::Tensor& k,
                                         const at::Tensor& v, double scale) {
  const int64_t t = k.size(1);
  const int64_t len = lengths_[layer];
  Grow(layer, len + t);
  k_[layer].narrow(1, len, t).copy_(k);
  v_[layer].narrow(1, len, t).copy_(v);
  lengths_[layer] = len + t;
  return CausalAttention(q, keys(layer), values(layer), scale);
}

at::Tensor DenseKvCache::keys(int64_t layer) const { return k_[layer].narrow(1, 0, lengths_[layer]); }
at::Tensor DenseKvCache::values(int64_t layer) const { return v_[layer].narrow(1, 0, lengths_[layer]); }

int64_t DenseKvCache::bytes_used() const {
  int64_t entries = 0;
  for (int64_t len : lengths_) entries += len;
  return entries * num_kv_heads_ * head_dim_ * 2 * static_cast<int64_t>(c10::elementSize(dtype_));
}

}  // namespace defkv::cache
