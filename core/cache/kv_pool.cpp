#include "core/cache/kv_pool.h"

#include <atomic>

#include <c10/util/Exception.h>

namespace defkv::cache {

KvPool::KvPool(int64_t rows, int64_t head_dim, at::ScalarType dtype, at::Device device)
    : id_([] {
        static std::atomic<uint64_t> next{1};
        return next.fetch_add(1);
      }()),
      rows_(rows),
      free_rows_(rows) {
  TORCH_CHECK(rows > 0 && head_dim > 0, "KvPool: rows and head_dim must be positive");
  auto opts = at::TensorOptions().dtype(dtype).device(device);
  k_ = at::empty({rows, head_dim}, opts);
  v_ = at::empty({rows, head_dim}, opts);
  free_[0] = rows;
}

std::optional<int64_t> KvPool::Allocate(int64_t rows) {
  TORCH_CHECK(rows > 0, "KvPool::Allocate: rows must be positive");
  for (auto it = free_.begin(); it != free_.end(); ++it) {
    if (it->second < rows) continue;
    const int64_t start = it->first, left = it->second - rows;
    free_.erase(it);
    if (left > 0) free_[start + rows] = left;
    free_rows_ -= rows;
    return start;
  }
  return std::nullopt;
}

void KvPool::Free(int64_t start, int64_t rows) {
  TORCH_CHECK(rows > 0 && start >= 0 && start + rows <= rows_, "KvPool::Free: range outside the pool");
  auto next = free_.lower_bound(start);
  TORCH_CHECK(next == free_.end() || next->first >= start + rows, "KvPool::Free: range overlaps a free range");
  if (next != free_.begin()) {
    auto prev = std::prev(next);
    TORCH_CHECK(prev->first + prev->second <= start, "KvPool::Free: range overlaps a free range");
  }
  int64_t s = start, n = rows;
  if (next != free_.end() && next->first == start + rows) {  // merge with the range after
    n += next->second;
    next = free_.erase(next);
  }
  if (next != free_.begin()) {  // and with the one before
    auto prev = std::prev(next);
    if (prev->first + prev->second == s) {
      s = prev->first;
      n += prev->second;
      free_.erase(prev);
    }
  }
  free_[s] = n;
  free_rows_ += rows;
}

int64_t KvPool::largest_free_range() const {
  int64_t best = 0;
  for (const auto& [start, n] : free_) best = std::max(best, n);
  return best;
}

}  // namespace defkv::cache
