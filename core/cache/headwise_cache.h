// HeadwiseCache: per (layer, kv-head) variable-length K/V segments in one flattened buffer per
// layer (DESIGN.md §3, spec/presses.md §6).
//
// Layout, per layer:  k_buf, v_buf: [rows, D]
//   segment h occupies rows [offset[h], offset[h] + capacity[h]); the first length[h] hold
//   entries, in the order they were appended (after compaction: kept context entries in
//   position order, then the question and generated tokens).
// Before compression every head has the same capacity and length (offset[h] = h * capacity):
// the buffer is then a dense [H, capacity, D] tensor and attention runs batched over heads.
// Compact() gives each head its own length and sizes its segment kept + extra, so the question
// and the decode steps append in place: no per-step copy of the cache.
#pragma once

#include <cstdint>
#include <map>
#include <vector>

#include "core/cache/kv_cache.h"
#include "core/cache/kv_pool.h"

namespace defkv::cache {

class HeadwiseCache final : public KvCache {
 public:
  // With a pool, every layer's rows come from it (the pool must outlive the cache); without,
  // each layer allocates its own tensors.
  HeadwiseCache(int64_t num_layers, int64_t num_kv_heads, int64_t head_dim, at::ScalarType dtype,
                at::Device device, KvPool* pool = nullptr);
  ~HeadwiseCache() override;
  HeadwiseCache(const HeadwiseCache&) = delete;
  HeadwiseCache& operator=(const HeadwiseCache&) = delete;

  // A decode step of B caches sharing one pool, planned for every layer before it runs: a full
  // segment grows, each segment takes the pool row of its new entry and its length after the
  // append, and all of it lands in one int64 host buffer (pinned), so the step uploads its
  // metadata with one asynchronous copy and then runs without a host synchronisation (and can
  // be a CUDA graph). Layout of `host`:
  //   [0, B) token ids, [B, 2B) positions, then per layer l at 2B + l * (3n + 1), n = B * H_kv:
  //   rows[n] (pool row of segment j's new entry), cu_k[n + 1] (segment starts, then the pool's
  //   row count), used[n] (segment lengths after the append).
  struct BatchPlan {
    at::Tensor host;
    int64_t batch = 0, segments = 0, max_k = 0;  // max_k: longest segment of any layer
  };
  static BatchPlan PlanBatch(const std::vector<HeadwiseCache*>& caches, const at::Tensor& ids,
                             const at::Tensor& positions);
  // The device side of a plan: its `host` buffer uploaded (`uploaded`, int64 on the device) and
  // sliced per layer, with int32 copies of cu_k and used (one conversion for all layers) and
  // cu_q = 0..n for the flash call.
  struct DevicePlan {
    at::Tensor ids, positions;  // [B] int64
    at::Tensor rows;            // [layers, n] int64
    at::Tensor cu_k, used;      // [layers, n + 1], [layers, n] int32
    at::Tensor cu_q;            // [n + 1] int32
    int64_t batch = 0, segments = 0, max_k = 0;
  };
  static DevicePlan SliceUploaded(const at::Tensor& uploaded, int64_t batch, int64_t segments, int64_t max_k,
                                  int64_t layers);
  // One layer of a planned step on the device: writes k, v ([B, H_kv, D]: the new token of each
  // sequence) to the plan's rows and attends q ([B, H_q, D]) over the segments. q, k, v may be
  // views of the qkv projection (rows of D contiguous, any token stride). max_k may exceed the
  // longest segment. Output [B, H_q, D] contiguous.
  static at::Tensor AttendPlanned(const KvPool& pool, const DevicePlan& plan, int64_t layer, const at::Tensor& q,
                                  const at::Tensor& k, const at::Tensor& v, double scale);
  // AttendPlanned for q and k not yet rotated: RoPE (cos, sin [B, D]) and the append in one
  // kernel (model::FusedRopeAppend; q is rotated in place), then the attention. q, k, v must be
  // the heads of one qkv projection row. Undefined, with nothing written, when that kernel does
  // not take them: the caller rotates and calls AttendPlanned.
  static at::Tensor AttendPlannedUnrotated(const KvPool& pool, const DevicePlan& plan, int64_t layer,
                                           const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& cos, const at::Tensor& sin, double scale);
  // True when PlanBatch takes this cache (pooled, CUDA, half precision).
  bool batchable() const;
  KvPool* pool() const { return pool_; }

  // Gives every head of every layer room for `tokens` entries (uniform layout), lazily: a
  // layer's storage is allocated when the layer is first written (Append, AppendAndAttend, a
  // decode step), so a layer-major prefill holds one full-size layer at a time (the layers
  // before it compacted, the ones after it not allocated). Compact drops a pending reservation.
  void Reserve(int64_t tokens);

  at::Tensor AppendAndAttend(int64_t layer, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             double scale) override;
  // Appends k, v ([H_kv, T, D]) to every head of `layer` without attending (benchmarks fill
  // caches of a given length with it).
  void Append(int64_t layer, const at::Tensor& k, const at::Tensor& v);
  int64_t entries(int64_t layer) const override;
  int64_t bytes_used() const override;
  // Bytes of K and V storage allocated (entries plus room for appends): reserved layers not
  // written yet count nothing.
  int64_t bytes_reserved() const;

  // Keeps in `layer` only the entries kept[h] (int64 positions into head h's segment, any
  // order; stored in ascending order) and sizes each segment to its kept count + extra.
  void Compact(int64_t layer, const std::vector<at::Tensor>& kept, int64_t extra_capacity);
  // Compact's device-side form for a layer narrowed again and again: `entries` (int64, on the
  // layer's device, strictly ascending) index the layer's entries taken head after head (head
  // h's j-th entry is sum of the earlier heads' lengths + j); per_head[h] of them fall in head
  // h. No index comes to the host: the checks (in range, ascending, counts that match) cost one
  // synchronisation.
  void Narrow(int64_t layer, const at::Tensor& entries, const std::vector<int64_t>& per_head, int64_t extra_capacity);

  bool uniform(int64_t layer) const { return layers_[layer].uniform; }
  const std::vector<int64_t>& head_lengths(int64_t layer) const { return layers_[layer].length; }
  // [H, length, D] views of a uniform layer (all heads the same length; [H, 0, D] before the
  // layer is written).
  at::Tensor keys(int64_t layer) const;
  at::Tensor values(int64_t layer) const;
  // One head's entries, [length[h], D].
  at::Tensor head_keys(int64_t layer, int64_t head) const;
  at::Tensor head_values(int64_t layer, int64_t head) const;
  int64_t entry_bytes() const { return 2 * head_dim_ * static_cast<int64_t>(c10::elementSize(dtype_)); }

 private:
  struct Layer {
    at::Tensor k, v;  // [rows, D]
    std::vector<int64_t> offset, length, capacity;
    bool uniform = true;
    // Flash metadata on the device: segment starts (cu_seqlens_k) and lengths (seqused_k).
    // Rebuilt from the host after a re-layout; otherwise lengths grow on the device, so a
    // decode step copies nothing from the host.
    at::Tensor cu_k, used;
    bool meta_stale = true;
    int64_t pool_start = -1;  // first pool row of k/v, when they come from the pool
    int64_t reserve = 0;      // Reserve()d room per head, allocated at the first write (0: none pending)
  };
  // Storage for `rows` rows of K and V (from the pool when there is one); `start` receives the
  // pool row (-1 otherwise). ReleaseStorage gives a layer's rows back.
  std::pair<at::Tensor, at::Tensor> NewStorage(int64_t rows, int64_t* start);
  void ReleaseStorage(Layer& L);
  // Compact's and Narrow's move: gathers the rows src_rows of L's storage, gives the storage
  // back (the pool never holds both ranges), takes `rows` new rows and writes the gathered ones
  // to dst_rows of it.
  void ReplaceStorage(Layer& L, const at::Tensor& src_rows, const at::Tensor& dst_rows, int64_t rows);
  // Sets L's per-head layout and what follows from it (device metadata stale, uniform or not).
  static void SetLayout(Layer& L, std::vector<int64_t> offset, std::vector<int64_t> length,
                        std::vector<int64_t> capacity);
  // Allocates `layer`'s pending reservation (a Relayout to max(reserve, length) per head).
  void AllocateReserved(int64_t layer);
  // Appends k, v to every head of `layer` (growing full segments); lengths on the host only.
  void Write(int64_t layer, const at::Tensor& k, const at::Tensor& v);
  // Re-lays `layer` out with capacities `cap` (each >= its length), copying the entries.
  void Relayout(int64_t layer, const std::vector<int64_t>& cap);
  at::Tensor AttendSegments(const Layer& L, const at::Tensor& q, int64_t t, double scale) const;
  // CUDA, fp16/bf16: one flash-attention varlen call over all segments (each kv head is a
  // "sequence" whose G query heads attend to it; seqused_k skips the unused capacity).
  // The attention half of AttendPlanned, once the step's rows are in the pool.
  static at::Tensor AttendAppended(const KvPool& pool, const DevicePlan& plan, int64_t layer, const at::Tensor& q,
                                   int64_t kv_heads, double scale);
  at::Tensor AttendFlash(Layer& L, const at::Tensor& q, int64_t t, double scale);

  int64_t num_kv_heads_, head_dim_;
  at::ScalarType dtype_;
  at::Device device_;
  KvPool* pool_;
  std::vector<Layer> layers_;
  std::map<int64_t, at::Tensor> cu_q_;  // device cu_seqlens_q for chunks of t queries per head
};

}  // namespace defkv::cache
