// KvPool: one preallocated K buffer and one V buffer ([rows, D] each) from which every request's
// head-wise cache takes its per-layer row ranges, so that the caches of all running requests live
// in the same two tensors. A decode step of many requests then appends with one scatter and
// attends with one flash-attention varlen call per layer over every (request, kv head) segment
// (HeadwiseCache::PlanBatch and AttendPlanned). Its fixed address is also what lets a CUDA graph
// replay the step (core/model/decode_graphs.h). The server sizes the pool to its KV budget up front, as
// serving systems reserve their KV memory at start.
//
// Rows are handed out first fit from a free list that merges neighbours on release; the engine
// thread is the only user (no locking).
#pragma once

#include <cstdint>
#include <map>
#include <optional>

#include <ATen/ATen.h>

namespace defkv::cache {

class KvPool {
 public:
  KvPool(int64_t rows, int64_t head_dim, at::ScalarType dtype, at::Device device);
  KvPool(const KvPool&) = delete;
  KvPool& operator=(const KvPool&) = delete;

  // First row of a free range of `rows` rows, or nullopt when no free range is that long.
  std::optional<int64_t> Allocate(int64_t rows);
  void Free(int64_t start, int64_t rows);

  const at::Tensor& k() const { return k_; }  // [rows, D]
  const at::Tensor& v() const { return v_; }
  int64_t rows() const { return rows_; }
  int64_t free_rows() const { return free_rows_; }
  int64_t largest_free_range() const;
  int64_t bytes() const { return 2 * rows_ * k_.size(1) * static_cast<int64_t>(k_.element_size()); }
  // Unique to this pool in the process (never reused, unlike the tensors' addresses): what a
  // captured CUDA graph, which holds the K and V addresses, checks that it was captured for.
  uint64_t id() const { return id_; }

 private:
  uint64_t id_;
  int64_t rows_, free_rows_;
  at::Tensor k_, v_;
  std::map<int64_t, int64_t> free_;  // start -> length, no two adjacent
};

}  // namespace defkv::cache
