// HeadwiseCache: appends in place, compaction keeps exactly the chosen rows, and attention over
// variable-length segments equals dense attention over the same entries (spec §11, 24-26).
#include <gtest/gtest.h>

#include "core/cache/headwise_cache.h"

namespace defkv::cache {
namespace {

constexpr int64_t kHeads = 2, kDim = 8, kQHeads = 4;

TEST(HeadwiseCache, UniformPhaseMatchesDenseCausalAttention) {
  at::manual_seed(1);
  HeadwiseCache c(1, kHeads, kDim, at::kFloat, at::kCPU);
  c.Reserve(10);
  auto k = at::randn({kHeads, 10, kDim}), v = at::randn({kHeads, 10, kDim}), q = at::randn({kQHeads, 10, kDim});
  // Two chunks (6 + 4) against one pass over all 10.
  auto a = c.AppendAndAttend(0, q.narrow(1, 0, 6), k.narrow(1, 0, 6), v.narrow(1, 0, 6), 0.5);
  auto b = c.AppendAndAttend(0, q.narrow(1, 6, 4), k.narrow(1, 6, 4), v.narrow(1, 6, 4), 0.5);
  auto full = CausalAttention(q, k, v, 0.5);
  EXPECT_LT((at::cat({a, b}, 1) - full).abs().max().item<double>(), 1e-5);
  EXPECT_TRUE(c.uniform(0));
  EXPECT_EQ(c.entries(0), 2 * 10);
  EXPECT_EQ(c.bytes_used(), 2 * 10 * 2 * kDim * 4);
}

TEST(HeadwiseCache, CompactKeepsChosenRowsAndAppendsInPlace) {
  at::manual_seed(2);
  HeadwiseCache c(1, kHeads, kDim, at::kFloat, at::kCPU);
  c.Reserve(12);
  auto k = at::randn({kHeads, 12, kDim}), v = at::randn({kHeads, 12, kDim});
  c.AppendAndAttend(0, at::randn({kQHeads, 12, kDim}), k, v, 0.5);
  std::vector<at::Tensor> kept = {at::tensor({9, 0, 4}, at::kLong), at::tensor({1, 2, 3, 5, 11}, at::kLong)};
  c.Compact(0, kept, /*extra_capacity=*/2);
  EXPECT_FALSE(c.uniform(0));
  EXPECT_EQ(c.head_lengths(0), (std::vector<int64_t>{3, 5}));
  // Rows are stored in position order.
  EXPECT_TRUE(c.head_keys(0, 0).equal(k[0].index_select(0, at::tensor({0, 4, 9}, at::kLong))));
  EXPECT_TRUE(c.head_values(0, 1).equal(v[1].index_select(0, kept[1])));

  // One decode step: every head grows by one and the query sees exactly its head's entries.
  auto qd = at::randn({kQHeads, 1, kDim}), kd = at::randn({kHeads, 1, kDim}), vd = at::randn({kHeads, 1, kDim});
  auto out = c.AppendAndAttend(0, qd, kd, vd, 0.5);
  EXPECT_EQ(c.head_lengths(0), (std::vector<int64_t>{4, 6}));
  EXPECT_TRUE(c.head_keys(0, 1).narrow(0, 5, 1).equal(kd[1]));
  for (int64_t h = 0; h < kHeads; ++h) {
    auto kk = at::cat({k[h].index_select(0, std::get<0>(kept[h].sort())), kd[h]}, 0).unsqueeze(0);
    auto vv = at::cat({v[h].index_select(0, std::get<0>(kept[h].sort())), vd[h]}, 0).unsqueeze(0);
    auto ref = CausalAttention(qd.narrow(0, 2 * h, 2), kk, vv, 0.5);
    EXPECT_LT((out.narrow(0, 2 * h, 2) - ref).abs().max().item<double>(), 1e-6) << "head " << h;
  }
  EXPECT_EQ(c.entries(0), 10);
}

TEST(HeadwiseCache, KeepingEverythingEqualsFullAttention) {
  at::manual_seed(3);
  HeadwiseCache c(1, kHeads, kDim, at::kFloat, at::kCPU);
  c.Reserve(8);
  auto k = at::randn({kHeads, 8, kDim}), v = at::randn({kHeads, 8, kDim});
  c.AppendAndAttend(0, at::randn({kQHeads, 8, kDim}), k, v, 0.5);
  auto all = at::arange(8, at::kLong);
  c.Compact(0, {all, all}, 1);
  auto q = at::randn({kQHeads, 1, kDim}), k1 = at::randn({kHeads, 1, kDim}), v1 = at::randn({kHeads, 1, kDim});
  auto out = c.AppendAndAttend(0, q, k1, v1, 0.5);
  auto ref = CausalAttention(q, at::cat({k, k1}, 1), at::cat({v, v1}, 1), 0.5);
  EXPECT_LT((out - ref).abs().max().item<double>(), 1e-6);
}

TEST(HeadwiseCache, GrowsWhenAppendsExceedTheReservation) {
  HeadwiseCache c(1, kHeads, kDim, at::kFloat, at::kCPU);
  c.Reserve(2);
  auto k = at::randn({kHeads, 2, kDim});
  c.AppendAndAttend(0, at::randn({kQHeads, 2, kDim}), k, k, 0.5);
  c.Compact(0, {at::tensor({1}, at::kLong), at::tensor({0, 1}, at::kLong)}, 0);
  auto k2 = at::randn({kHeads, 3, kDim});
  c.AppendAndAttend(0, at::randn({kQHeads, 3, kDim}), k2, k2, 0.5);
  EXPECT_EQ(c.head_lengths(0), (std::vector<int64_t>{4, 5}));
  EXPECT_TRUE(c.head_keys(0, 0).narrow(0, 0, 1).equal(k[0].narrow(0, 1, 1)));
  EXPECT_TRUE(c.head_keys(0, 1).narrow(0, 2, 3).equal(k2[1]));
}

TEST(HeadwiseCache, CompactRejectsIndicesOutsideTheSegment) {
  HeadwiseCache c(1, kHeads, kDim, at::kFloat, at::kCPU);
  c.Reserve(4);
  auto k = at::randn({kHeads, 4, kDim});
  c.AppendAndAttend(0, at::randn({kQHeads, 4, kDim}), k, k, 0.5);
  EXPECT_THROW(c.Compact(0, {at::tensor({4}, at::kLong), at::tensor({0}, at::kLong)}, 0), c10::Error);
}

TEST(HeadwiseCache, NarrowEqualsCompactAndNarrowsAgain) {
  at::manual_seed(4);
  HeadwiseCache a(1, kHeads, kDim, at::kFloat, at::kCPU), b(1, kHeads, kDim, at::kFloat, at::kCPU);
  auto k = at::randn({kHeads, 12, kDim}), v = at::randn({kHeads, 12, kDim});
  for (HeadwiseCache* c : {&a, &b}) c->Append(0, k, v);
  // Head 0 keeps positions 0, 4, 9; head 1 keeps 1, 2, 3, 5, 11 (entry 12 + position).
  a.Compact(0, {at::tensor({9, 0, 4}, at::kLong), at::tensor({1, 2, 3, 5, 11}, at::kLong)}, 2);
  b.Narrow(0, at::tensor({0, 4, 9, 13, 14, 15, 17, 23}, at::kLong), {3, 5}, 2);
  EXPECT_EQ(b.head_lengths(0), a.head_lengths(0));
  EXPECT_EQ(b.bytes_reserved(), a.bytes_reserved());
  for (int64_t h = 0; h < kHeads; ++h) {
    EXPECT_TRUE(b.head_keys(0, h).equal(a.head_keys(0, h))) << "head " << h;
    EXPECT_TRUE(b.head_values(0, h).equal(a.head_values(0, h))) << "head " << h;
  }
  // Again, on the narrowed layout: entries now count 3 for head 0, then 5 for head 1. Keep
  // head 0's position 4 (entry 1) and head 1's positions 1 and 11 (entries 3 and 7).
  b.Narrow(0, at::tensor({1, 3, 7}, at::kLong), {1, 2}, 0);
  EXPECT_EQ(b.head_lengths(0), (std::vector<int64_t>{1, 2}));
  EXPECT_TRUE(b.head_keys(0, 0).equal(k[0].narrow(0, 4, 1)));
  EXPECT_TRUE(b.head_values(0, 1).equal(v[1].index_select(0, at::tensor({1, 11}, at::kLong))));
  // Appends land after the kept entries (extra 0: the segment grows).
  auto k1 = at::randn({kHeads, 1, kDim});
  b.Append(0, k1, k1);
  EXPECT_EQ(b.head_lengths(0), (std::vector<int64_t>{2, 3}));
  EXPECT_TRUE(b.head_keys(0, 1).narrow(0, 2, 1).equal(k1[1]));
  // Nothing kept is allowed; bad input is refused before anything changes.
  EXPECT_THROW(b.Narrow(0, at::tensor({0, 2}, at::kLong), {2, 0}, 0), c10::Error);   // 2 is head 1's
  EXPECT_THROW(b.Narrow(0, at::tensor({1, 0}, at::kLong), {2, 0}, 0), c10::Error);   // not ascending
  EXPECT_THROW(b.Narrow(0, at::tensor({0, 1}, at::kLong), {1, 0}, 0), c10::Error);   // counts off
  EXPECT_THROW(b.Narrow(0, at::tensor({0}, at::kInt), {1, 0}, 0), c10::Error);       // not int64
  EXPECT_EQ(b.head_lengths(0), (std::vector<int64_t>{2, 3}));
  b.Narrow(0, at::empty({0}, at::kLong), {0, 0}, 1);
  EXPECT_EQ(b.entries(0), 0);
}

TEST(HeadwiseCache, ReserveAllocatesEachLayerAtItsFirstWrite) {
  HeadwiseCache c(3, kHeads, kDim, at::kFloat, at::kCPU);
  c.Reserve(10);
  EXPECT_EQ(c.bytes_reserved(), 0);
  EXPECT_EQ(c.keys(1).sizes(), (at::IntArrayRef{kHeads, 0, kDim}));  // never written: empty
  EXPECT_EQ(c.head_values(2, 1).size(0), 0);
  auto k = at::randn({kHeads, 4, kDim});
  c.AppendAndAttend(0, at::randn({kQHeads, 4, kDim}), k, k, 0.5);
  EXPECT_EQ(c.bytes_reserved(), kHeads * 10 * c.entry_bytes());
  c.Compact(0, {at::tensor({1}, at::kLong), at::tensor({0, 3}, at::kLong)}, 2);
  EXPECT_EQ(c.bytes_reserved(), (3 + 4) * c.entry_bytes());  // the reservation is gone
  c.Compact(2, {at::empty({0}, at::kLong), at::empty({0}, at::kLong)}, 1);  // never written
  EXPECT_EQ(c.bytes_reserved(), (3 + 4 + 2) * c.entry_bytes());
  c.Append(1, k, k);
  EXPECT_EQ(c.bytes_reserved(), (3 + 4 + 2 + kHeads * 10) * c.entry_bytes());
  EXPECT_TRUE(c.keys(1).equal(k));
}

}  // namespace
}  // namespace defkv::cache
