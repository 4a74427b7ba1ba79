// The KV-cache interface the transformer writes to and attends through. A cache owns both the
// storage and the attention over it, because the layout decides how attention runs: the dense
// cache here keeps [H_kv, S, D] per layer; the head-wise cache keeps a variable-length segment
// per (layer, kv-head) and attends with variable-length kernels.
#pragma once

#include <cstdint>

#include <ATen/ATen.h>

namespace defkv::cache {

class KvCache {
 public:
  virtual ~KvCache() = default;

  // Stores one chunk's keys and values for `layer` (k, v: [H_kv, T, D], RoPE applied) and
  // returns the attention of q ([H_q, T, D], RoPE applied) over every entry the layer holds,
  // the new ones included, causal inside the chunk: query i sees all earlier entries and the
  // chunk's entries 0..i. Query head h reads kv head h / (H_q / H_kv). Output: [H_q, T, D].
  virtual at::Tensor AppendAndAttend(int64_t layer, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, double scale) = 0;

  // Entries held for `layer` (the longest head's for caches whose heads differ).
  virtual int64_t length(int64_t layer) const = 0;
  // Bytes of K and V held for all layers (entries, not reserved capacity).
  virtual int64_t bytes_used() const = 0;
};

// One dense buffer per layer, [H_kv, capacity, D] for K and for V. Reserve() sizes it once for
// prompt + max_new_tokens, so decode appends in place; growing past it doubles the capacity.
class DenseKvCache final : public KvCache {
 public:
  DenseKvCache(int64_t num_layers, int64_t num_kv_heads, int64_t head_dim, at::ScalarType dtype,
               at::Device device);
  void Reserve(int64_t tokens);

  at::Tensor AppendAndAttend(int64_t layer, const at::Tensor& q, const at::Tensor& k,
                             const at::Tensor& v, double scale) override;
  int64_t length(int64_t layer) const override { return lengths_.at(layer); }
  int64_t bytes_used() const override;

  // The layer's cached keys / values, [H_kv, length, D] views (tests and presses read them).
  at::Tensor keys(int64_t layer) const;
  at::Tensor values(int64_t layer) const;

 private:
  void Grow(int64_t layer, int64_t needed);

  int64_t num_kv_heads_, head_dim_;
  at::ScalarType dtype_;
  at::Device device_;
  std::vector<at::Tensor> k_, v_;
  std::vector<int64_t> lengths_;
};

// Causal attention of q over k/v where the T queries are the last T of the S keys.
// q: [H_q, T, D]; k, v: [H_kv, S, D]. Shared by the caches' CPU paths.
at::Tensor CausalAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale);

}  // namespace defkv::cache
