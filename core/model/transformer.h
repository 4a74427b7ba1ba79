// One decoder-only transformer for the Llama family. llama, qwen2, qwen3 and mistral differ
// only by flags in ModelConfig (qkv bias, q/k norms, rope scaling, tied embeddings):
//   x = embed(ids)
//   per layer: h = x + o_proj(attn(rope(q_norm?(W_q n1(x))), rope(k_norm?(W_k n1(x))), W_v n1(x)))
//              x = h + W_down(silu(W_gate n2(h)) * W_up n2(h))
//   logits = lm_head(norm(x))
// Norms are RMSNorm computed in fp32. The KV cache is passed in; see core/cache/kv_cache.h.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "absl/status/statusor.h"
#include "core/cache/headwise_cache.h"
#include "core/model/config.h"
#include "core/model/rope.h"

namespace defkv::model {

class DecodeGraphs;

struct LoadOptions {
  at::Device device = at::kCPU;
  // Weights and activations; kUndefined means the checkpoint's dtype on CUDA, float32 on CPU.
  at::ScalarType dtype = at::ScalarType::Undefined;
  // Called as weights are converted: (bytes done, bytes total).
  std::function<void(size_t, size_t)> progress;
};

struct LayerWeights {
  at::Tensor input_norm, post_norm;      // [hidden]
  at::Tensor w_qkv, b_qkv;               // [(H_q + 2 H_kv) D, hidden], bias or undefined
  at::Tensor q_norm, k_norm;             // [D] (qwen3) or undefined
  at::Tensor w_o, b_o;                   // [hidden, H_q D]
  at::Tensor w_gate_up, b_gate_up;       // [2 I, hidden]
  at::Tensor w_down, b_down;             // [hidden, I]
};

// Sees each layer's attention input during a forward pass (the press pipeline uses it to
// score the context after the layer's prefill attention, as kvpress's forward hook does).
class LayerHook {
 public:
  virtual ~LayerHook() = default;
  // Called before a chunk runs: whether it is the last context chunk the following
  // AfterAttention calls will see for their layer (LayerMajorPrefill calls it before each
  // (layer, chunk) piece; callers of Forward call it before each chunk).
  virtual void BeginChunk(bool last_chunk_of_layer) {}
  // x_norm: [T, hidden], the attention input (after input_layernorm) of this chunk; called
  // after the layer's attention has written the chunk's K/V into the cache.
  virtual void AfterAttention(int64_t layer, const at::Tensor& x_norm) = 0;
};

class LayerMajorPrefill;

class Transformer {
 public:
  static absl::StatusOr<std::unique_ptr<Transformer>> Load(const std::string& dir, const LoadOptions& opts);
  // Random weights (N(0, 0.02), norms 1) of the shapes `cfg` describes, made on the device:
  // benchmarks of real model shapes without checkpoints.
  ~Transformer();
  static absl::StatusOr<std::unique_ptr<Transformer>> Random(const ModelConfig& cfg, const LoadOptions& opts,
                                                             uint64_t seed);

  // Runs ids [T] (int64) at absolute positions [T] through every layer, writing K/V into
  // `cache`. Returns fp32 logits [T, vocab] when all_logits, else [1, vocab] for the last token.
  at::Tensor Forward(const at::Tensor& ids, const at::Tensor& positions, cache::KvCache& cache,
                     bool all_logits = false, LayerHook* hook = nullptr) const;
  // One decode step of B independent sequences: token ids[b] (int64) at positions[b] extends
  // caches[b]. The projections and MLPs run batched over the B tokens (the weights are read
  // once per step); attention runs per sequence over its own cache. Returns fp32 logits [B, vocab].
  at::Tensor ForwardBatch(const at::Tensor& ids, const at::Tensor& positions,
                          const std::vector<cache::KvCache*>& caches) const;

  // The device side of a decode step planned by HeadwiseCache::PlanBatch over pooled caches:
  // `plan` is the plan's buffer on the device (ids, positions, per-layer metadata), `max_k` a
  // bound on the longest segment. No host synchronisation inside: a CUDA graph can capture it.
  // Returns fp32 logits [batch, vocab].
  at::Tensor DecodePlanned(const at::Tensor& plan, int64_t batch, int64_t segments, int64_t max_k,
                           const cache::KvPool& pool) const;
  // Replays batched decode steps as CUDA graphs (one per batch size and bound on the longest
  // segment, captured the first time it is seen) up to `max_batch` sequences. False
  // (and nothing changes) when this build or device cannot.
  bool EnableDecodeGraphs(int64_t max_batch);
  // Graphs captured so far (0 when disabled).
  int64_t decode_graphs() const;

  // Queries before RoPE for attention inputs x_norm [T, hidden]: [H_q, T, D] (bias and q_norm
  // applied), as the layer computes them.
  at::Tensor PreRopeQueries(int64_t layer, const at::Tensor& x_norm) const;
  const LayerWeights& layer(int64_t l) const { return layers_[l]; }
  const Rope& rope() const { return rope_; }

  const ModelConfig& config() const { return config_; }
  at::ScalarType dtype() const { return dtype_; }
  at::Device device() const { return device_; }
  size_t weight_bytes() const { return weight_bytes_; }
  std::unique_ptr<cache::HeadwiseCache> NewCache(cache::KvPool* pool = nullptr) const;

 private:
  friend class LayerMajorPrefill;
  Transformer(ModelConfig cfg, at::Device device, at::ScalarType dtype);
  // Fills the weights from `get(name, shape)` (an undefined tensor for absent optional ones).
  using WeightSource = std::function<absl::StatusOr<at::Tensor>(const std::string&, std::vector<int64_t>, bool)>;
  absl::Status Build(const WeightSource& get);
  at::Tensor RmsNorm(const at::Tensor& x, const at::Tensor& w) const;
  // The layer stack over tokens ids [T] at positions [T]; `attend(layer, q, k, v)` stores k/v
  // ([T, H_kv, D]) and returns the attention of q ([T, H_q, D]) as [T, H_q, D]. q, k, v are
  // token-major views of the qkv projection (rows of D contiguous, strided tokens) or of the
  // q/k norm outputs.
  using Attend = std::function<at::Tensor(int64_t, const at::Tensor&, const at::Tensor&, const at::Tensor&)>;
  // An `attend` that also rotates: (layer, q, k, v, cos, sin) with q and k not yet rotated;
  // undefined, with nothing done, when it declines (RunLayer then rotates and calls `attend`).
  // Tried only for models without q/k norms.
  using RotatingAttend = std::function<at::Tensor(int64_t, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                  const at::Tensor&, const at::Tensor&)>;
  at::Tensor Run(const at::Tensor& ids, const at::Tensor& positions, bool all_logits, LayerHook* hook,
                 const Attend& attend, const RotatingAttend* rotating = nullptr) const;
  // The pieces of Run. Embed: ids [T] -> x [T, hidden]. RunLayer: layer l over x [T, hidden]
  // with the RoPE tables (cos, sin) of its T positions; returns the layer's output [T, hidden].
  // With `pending`, the residual adds that straddle layers are left to the next piece, which
  // fuses each with the RMSNorm that follows it: on entry x + *pending (when defined) is the
  // layer's input, and on return x + *pending is its output. Head: fp32 logits of the rows of
  // x (+ pending) ([T, vocab]), or of its last row ([1, vocab]). x is updated in place: callers
  // pass tensors nothing else reads.
  at::Tensor Embed(const at::Tensor& ids) const;
  at::Tensor RunLayer(int64_t l, at::Tensor x, const at::Tensor& cos, const at::Tensor& sin, LayerHook* hook,
                      const Attend& attend, at::Tensor* pending = nullptr,
                      const RotatingAttend* rotating = nullptr) const;
  at::Tensor Head(at::Tensor x, bool all_logits, const at::Tensor& pending = {}) const;
  // x += delta (in place when fused; x rebinds otherwise) and RMSNorm(x, w): one launch on CUDA.
  at::Tensor AddRmsNorm(at::Tensor& x, const at::Tensor& delta, const at::Tensor& w) const;
  // `attend` for prefill into `cache`: AppendAndAttend with the [H, T, D] layout it takes.
  Attend CacheAttend(cache::KvCache& cache) const;

  ModelConfig config_;
  at::Device device_;
  at::ScalarType dtype_;
  Rope rope_;
  at::Tensor embed_, final_norm_, lm_head_;
  std::vector<LayerWeights> layers_;
  size_t weight_bytes_ = 0;
  std::unique_ptr<DecodeGraphs> graphs_;  // set by EnableDecodeGraphs
};

// Prefills a context layer by layer: every chunk of the context through layer 0, then every
// chunk through layer 1, and so on, keeping the hidden states of the whole context
// ([n, hidden], one tensor per chunk) between layers. Each layer sees the inputs, chunk
// boundaries and kernels it sees in Forward chunk by chunk, so the cache, the hook's calls per
// layer and the logits are the same; the difference is that a layer's K/V are complete (and a
// press can compact them) before the next layer starts, so a lazily reserved HeadwiseCache
// holds one full-size layer at a time instead of all of them.
class LayerMajorPrefill {
 public:
  // ids: [n] int64 (any device), at positions first_position .. first_position + n - 1, in
  // chunks of `chunk` tokens. `model`, `cache` and `hook` (may be null) must outlive it.
  LayerMajorPrefill(const Transformer& model, at::Tensor ids, int64_t first_position, int64_t chunk,
                    cache::KvCache& cache, LayerHook* hook = nullptr);

  // Runs (layer, chunk) pieces (one chunk through one layer, counting its tokens against
  // `budget`) until at least `budget` token-layers ran or the context has been through every
  // layer; at least one piece when any remain. Returns done().
  bool Step(int64_t budget);
  bool done() const { return layer_ == model_.config().num_layers || n_ == 0; }
  // Once done: fp32 logits [1, vocab] of the last context token, as Forward(all_logits=false)
  // returns for the last chunk.
  at::Tensor Logits() const;
  int64_t layer() const { return layer_; }  // the layer the next piece runs

 private:
  const Transformer& model_;
  at::Tensor ids_;
  int64_t first_, chunk_, n_;
  cache::KvCache& cache_;
  LayerHook* hook_;
  Transformer::Attend attend_;
  // Per chunk: its hidden states, the output of the layers it has been through (undefined
  // before layer 0 embeds it).
  std::vector<at::Tensor> x_;
  int64_t layer_ = 0, next_chunk_ = 0;
};

}  // namespace defkv::model
