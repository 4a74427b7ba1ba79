// The KV-cache interface the transformer writes to and attends through. A cache owns both the
// storage and the attention over it, because the layout decides how attention runs.
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

  // Entries held for `layer`, summed over kv heads.
  virtual int64_t entries(int64_t layer) const = 0;
  // Bytes of K and V held for all layers (entries, not reserved capacity).
  virtual int64_t bytes_used() const = 0;
};

// Causal attention of q over k/v where the T queries are the last T of the S keys.
// q: [H_q, T, D]; k, v: [H_kv, S, D] with H_q a multiple of H_kv. Output [H_q, T, D].
at::Tensor CausalAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale);

}  // namespace defkv::cache
