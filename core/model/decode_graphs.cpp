#include "core/model/decode_graphs.h"

#include <algorithm>
#include <cstdio>
#include <map>
#include <optional>
#include <utility>

#include "core/model/transformer.h"

#ifdef DEFKV_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace defkv::model {

#ifdef DEFKV_WITH_CUDA
namespace {

// The bound on the longest segment a graph is captured with: max_k rounded up to 1/16 of its
// power of two (at most 6% more). Flash attention splits the keys by this bound, so a loose one
// costs time (a power-of-two bound made 128K decode 18% slower); a tight one means more graphs.
int64_t Bucket(int64_t max_k) {
  int64_t pow2 = 1;
  while (pow2 * 2 <= max_k) pow2 *= 2;
  const int64_t step = std::max<int64_t>(128, pow2 / 16);
  return (max_k + step - 1) / step * step;
}

// Graphs kept at most; the least recently replayed one goes first.
constexpr size_t kMaxGraphs = 192;

class CudaDecodeGraphs final : public DecodeGraphs {
 public:
  explicit CudaDecodeGraphs(int64_t max_batch) : max_batch_(max_batch) {}

  at::Tensor Run(const Transformer& model, const cache::HeadwiseCache::BatchPlan& plan,
                 const cache::KvPool& pool) override {
    if (broken_ || plan.batch > max_batch_) return {};
    // A graph holds the addresses of the pool it was captured for: a new pool (CreateKvPool
    // again, a benchmark's next run) makes every captured graph stale. The pool's id, not its K
    // address, tells: on the H200 a new pool at the old K address replayed the old graphs and
    // gave other logits. Their memory pool goes with them (PyTorch refuses a pool id whose
    // graphs are gone).
    if (pool.id() != kv_pool_id_) {
      graphs_.clear();
      pool_id_.reset();
      kv_pool_id_ = pool.id();
    }
    const std::pair<int64_t, int64_t> key{plan.batch, Bucket(plan.max_k)};
    ++clock_;
    if (auto it = graphs_.find(key); it != graphs_.end()) {
      Entry& e = *it->second;
      e.last_used = clock_;
      e.in.copy_(plan.host, /*non_blocking=*/true);
      e.graph.replay();
      return e.out;
    }
    return CaptureAndRun(model, plan, pool, key);
  }

  int64_t size() const override { return static_cast<int64_t>(graphs_.size()); }

 private:
  struct Entry {
    at::cuda::CUDAGraph graph;
    at::Tensor in, out;  // the static plan buffer on the device, and the logits the graph writes
    int64_t last_used = 0;
  };

  at::Tensor CaptureAndRun(const Transformer& model, const cache::HeadwiseCache::BatchPlan& plan,
                           const cache::KvPool& pool, std::pair<int64_t, int64_t> key) {
    const c10::DeviceIndex device = model.device().index() < 0 ? 0 : model.device().index();
    if (!stream_) stream_ = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device);
    const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream(device);
    at::cuda::CUDAEvent ready;
    ready.record(current);
    ready.block(*stream_);
    at::Tensor logits;
    {
      c10::cuda::CUDAStreamGuard guard(*stream_);
      at::Tensor in = plan.host.to(model.device(), /*non_blocking=*/true);
      // This step, eagerly: its result, and the warm-up of cuBLAS and flash on this stream.
      logits = model.DecodePlanned(in, plan.batch, plan.segments, plan.max_k, pool);
      auto e = std::make_unique<Entry>();
      e->in = in;
      try {
        e->graph.capture_begin(pool_id_.value_or(at::cuda::MempoolId_t{0, 0}), cudaStreamCaptureModeThreadLocal);
        try {
          e->out = model.DecodePlanned(e->in, plan.batch, plan.segments, key.second, pool);
        } catch (...) {
          try {
            e->graph.capture_end();
          } catch (...) {
          }
          throw;
        }
        e->graph.capture_end();
        if (!pool_id_) pool_id_ = e->graph.pool();
        e->last_used = clock_;
        // The shared memory pool lives while any graph uses it: eviction keeps the others.
        if (graphs_.size() >= kMaxGraphs) {
          auto oldest = graphs_.begin();
          for (auto it = graphs_.begin(); it != graphs_.end(); ++it)
            if (it->second->last_used < oldest->second->last_used) oldest = it;
          graphs_.erase(oldest);
        }
        graphs_.emplace(key, std::move(e));
      } catch (const std::exception& ex) {
        broken_ = true;
        (void)cudaGetLastError();
        std::fprintf(stderr, "defkv: capturing the decode step as a CUDA graph failed (%s); decode runs without graphs\n",
                     ex.what());
      }
    }
    at::cuda::CUDAEvent done;
    done.record(*stream_);
    done.block(current);
    // Made on the capture stream, read on the current one.
    c10::cuda::CUDACachingAllocator::recordStream(logits.storage().data_ptr(), current);
    return logits;
  }

  int64_t max_batch_;
  int64_t clock_ = 0;  // Run() calls, for least-recently-used eviction
  uint64_t kv_pool_id_ = 0;  // KvPool::id() of the pool the graphs were captured for
  bool broken_ = false;
  std::optional<c10::cuda::CUDAStream> stream_;
  std::optional<at::cuda::MempoolId_t> pool_id_;
  std::map<std::pair<int64_t, int64_t>, std::unique_ptr<Entry>> graphs_;
};

}  // namespace

std::unique_ptr<DecodeGraphs> DecodeGraphs::Create(int64_t max_batch) {
  return std::make_unique<CudaDecodeGraphs>(max_batch);
}
#else
std::unique_ptr<DecodeGraphs> DecodeGraphs::Create(int64_t) { return nullptr; }
#endif

}  // namespace defkv::model
