// CUDA graphs of the batched decode step over pooled head-wise caches. A decode step launches
// some forty kernels per layer; at small batches the host cannot launch them as fast as the GPU
// runs them, so the step is launch-bound. A graph replays the whole step with one launch.
//
// One graph per (batch size, bound on the longest segment: max_k rounded up by at most 1/16),
// at most 192 of them (least recently used go), captured the first
// time that shape is seen: that step runs eagerly on the capture stream (the warm-up PyTorch
// asks for), then the same computation is captured over a static input buffer. Later steps of
// the shape copy their plan (HeadwiseCache::PlanBatch) into that buffer and replay. The KV pool,
// the weights and the plan buffer have fixed addresses, which is what makes the step capturable;
// growing a segment only changes the metadata. All graphs share one memory pool: they never run
// at the same time, and each step's logits are read before the next step replays.
#pragma once

#include <cstdint>
#include <memory>

#include <ATen/ATen.h>

#include "core/cache/headwise_cache.h"

namespace defkv::model {

class Transformer;

class DecodeGraphs {
 public:
  // nullptr when this build has no CUDA.
  static std::unique_ptr<DecodeGraphs> Create(int64_t max_batch);
  virtual ~DecodeGraphs() = default;
  // Logits [batch, vocab] of the planned step (the plan's lengths already count the new
  // entries), valid until the next call; undefined when this step must run eagerly (batch above
  // the limit, or capture failed once, which turns graphs off for good and logs why).
  virtual at::Tensor Run(const Transformer& model, const cache::HeadwiseCache::BatchPlan& plan,
                         const cache::KvPool& pool) = 0;
  virtual int64_t size() const = 0;
};

}  // namespace defkv::model
