// KvPool: first-fit row ranges that merge on release, and head-wise caches whose rows come from a
// pool behave exactly as caches with tensors of their own (and give every row back).
#include <gtest/gtest.h>

#include "core/cache/headwise_cache.h"
#include "core/cache/kv_pool.h"

namespace defkv::cache {
namespace {

TEST(KvPool, FirstFitMergesNeighboursOnRelease) {
  KvPool pool(100, 4, at::kFloat, at::kCPU);
  EXPECT_EQ(pool.Allocate(30), 0);
  EXPECT_EQ(pool.Allocate(30), 30);
  EXPECT_EQ(pool.Allocate(30), 60);
  EXPECT_EQ(pool.free_rows(), 10);
  EXPECT_FALSE(pool.Allocate(11).has_value());
  pool.Free(30, 30);  // a hole in the middle
  EXPECT_EQ(pool.largest_free_range(), 30);
  EXPECT_EQ(pool.Allocate(20), 30);  // first fit: the hole, not the tail
  pool.Free(0, 30);
  pool.Free(30, 20);  // merges with [0, 30) and [50, 60)
  EXPECT_EQ(pool.largest_free_range(), 60);
  pool.Free(60, 30);
  EXPECT_EQ(pool.free_rows(), 100);
  EXPECT_EQ(pool.largest_free_range(), 100);
  EXPECT_EQ(pool.Allocate(100), 0);
}

TEST(KvPool, RejectsRangesOutsideOrAlreadyFree) {
  KvPool pool(10, 4, at::kFloat, at::kCPU);
  EXPECT_THROW(pool.Free(0, 5), c10::Error);  // never allocated: overlaps the free list
  EXPECT_EQ(pool.Allocate(10), 0);
  EXPECT_THROW(pool.Free(8, 5), c10::Error);
  pool.Free(0, 10);
  EXPECT_THROW(pool.Free(0, 1), c10::Error);  // double free
}

TEST(KvPool, PooledCacheEqualsOwnTensorsAndGivesRowsBack) {
  constexpr int64_t heads = 2, dim = 8, qheads = 4;
  KvPool pool(1000, dim, at::kFloat, at::kCPU);
  at::manual_seed(3);
  auto k = at::randn({heads, 40, dim}), v = at::randn({heads, 40, dim}), q = at::randn({qheads, 40, dim});
  {
    HeadwiseCache own(2, heads, dim, at::kFloat, at::kCPU), pooled(2, heads, dim, at::kFloat, at::kCPU, &pool);
    HeadwiseCache other(1, heads, dim, at::kFloat, at::kCPU, &pool);  // interleaves its ranges
    other.Reserve(50);
    other.Append(0, at::randn({heads, 1, dim}), at::randn({heads, 1, dim}));
    for (auto* c : {&own, &pooled}) c->Reserve(40 + 6);
    // Reserve is lazy: a layer takes its rows when it is first written.
    EXPECT_EQ(pool.free_rows(), 1000 - 2 * 50);
    EXPECT_EQ(pooled.bytes_reserved(), 0);
    for (int64_t l = 0; l < 2; ++l) {
      auto a = own.AppendAndAttend(l, q, k, v, 0.3), b = pooled.AppendAndAttend(l, q, k, v, 0.3);
      EXPECT_TRUE(a.equal(b));
      EXPECT_EQ(pool.free_rows(), 1000 - 2 * 50 - (l + 1) * 2 * 46);
      EXPECT_EQ(pooled.bytes_reserved(), (l + 1) * 2 * 46 * pooled.entry_bytes());
    }
    std::vector<at::Tensor> kept = {at::tensor({0, 3, 39}, at::kLong), at::tensor({5, 6, 7, 8, 20}, at::kLong)};
    for (auto* c : {&own, &pooled}) c->Compact(1, kept, 6);
    EXPECT_EQ(pooled.bytes_reserved(), own.bytes_reserved());
    for (int step = 0; step < 6; ++step) {
      auto qs = at::randn({qheads, 1, dim}), ks = at::randn({heads, 1, dim}), vs = at::randn({heads, 1, dim});
      EXPECT_TRUE(own.AppendAndAttend(1, qs, ks, vs, 0.3).equal(pooled.AppendAndAttend(1, qs, ks, vs, 0.3)));
    }
    // A segment outgrowing its room is relaid out inside the pool.
    auto qs = at::randn({qheads, 1, dim}), ks = at::randn({heads, 1, dim}), vs = at::randn({heads, 1, dim});
    EXPECT_TRUE(own.AppendAndAttend(1, qs, ks, vs, 0.3).equal(pooled.AppendAndAttend(1, qs, ks, vs, 0.3)));
    EXPECT_EQ(pooled.bytes_reserved(), own.bytes_reserved());
  }
  EXPECT_EQ(pool.free_rows(), 1000);
  EXPECT_EQ(pool.largest_free_range(), 1000);
}

TEST(KvPool, ExhaustedPoolIsAnOutOfMemoryError) {
  KvPool pool(50, 8, at::kFloat, at::kCPU);
  HeadwiseCache c(2, 2, 8, at::kFloat, at::kCPU, &pool);
  c.Reserve(20);  // lazy: layer 0 takes 2 heads x 20 rows at its first write, layer 1 does not fit
  auto kv = at::randn({2, 1, 8});
  c.Append(0, kv, kv);
  EXPECT_THROW(c.Append(1, kv, kv), c10::OutOfMemoryError);
}

}  // namespace
}  // namespace defkv::cache
