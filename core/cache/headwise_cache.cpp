#include "core/cache/headwise_cache.h"

#include <algorithm>
#include <numeric>
#include <utility>

#include <ATen/ops/_flash_attention_forward.h>

#include "core/model/fused_ops.h"

namespace defkv::cache {

at::Tensor CausalAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  const int64_t t = q.size(1), s = k.size(1);
  std::optional<at::Tensor> mask;
  bool is_causal = false;
  if (t > 1) {
    if (t == s) {
      is_causal = true;
    } else {
      // Query i (absolute row s - t + i) may see keys 0 .. s - t + i.
      auto opts = at::TensorOptions().dtype(at::kLong).device(q.device());
      mask = at::arange(0, s, opts).unsqueeze(0) <= at::arange(s - t, s, opts).unsqueeze(1);
    }
  }
  auto out = at::scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), mask,
                                              /*dropout_p=*/0.0, is_causal, scale,
                                              /*enable_gqa=*/q.size(0) != k.size(0));
  return out.squeeze(0);
}

namespace {

// Capacities that let every segment take `t` more entries: a segment out of reserved room
// doubles (or grows to fit). Empty when every segment already has the room.
std::vector<int64_t> GrownCapacities(const std::vector<int64_t>& length, const std::vector<int64_t>& capacity,
                                     int64_t t) {
  bool full = false;
  for (size_t h = 0; h < length.size(); ++h) full |= length[h] + t > capacity[h];
  if (!full) return {};
  std::vector<int64_t> cap = capacity;
  for (size_t h = 0; h < length.size(); ++h)
    if (length[h] + t > cap[h]) cap[h] = std::max(length[h] + t, 2 * cap[h]);
  return cap;
}

}  // namespace

HeadwiseCache::HeadwiseCache(int64_t num_layers, int64_t num_kv_heads, int64_t head_dim, at::ScalarType dtype,
                             at::Device device, KvPool* pool)
    : num_kv_heads_(num_kv_heads), head_dim_(head_dim), dtype_(dtype), device_(device), pool_(pool),
      layers_(num_layers) {
  for (auto& L : layers_) {
    L.offset.assign(num_kv_heads, 0);
    L.length.assign(num_kv_heads, 0);
    L.capacity.assign(num_kv_heads, 0);
  }
}

HeadwiseCache::~HeadwiseCache() {
  for (auto& L : layers_) ReleaseStorage(L);
}

std::pair<at::Tensor, at::Tensor> HeadwiseCache::NewStorage(int64_t rows, int64_t* start) {
  *start = -1;
  if (pool_ == nullptr || rows == 0) {
    auto opts = at::TensorOptions().dtype(dtype_).device(device_);
    return {at::empty({rows, head_dim_}, opts), at::empty({rows, head_dim_}, opts)};
  }
  auto at_row = pool_->Allocate(rows);
  TORCH_CHECK_WITH(OutOfMemoryError, at_row.has_value(), "the KV pool has no free range of ", rows, " rows (",
                   pool_->free_rows(), " of ", pool_->rows(), " rows free, largest range ",
                   pool_->largest_free_range(), ")");
  *start = *at_row;
  return {pool_->k().narrow(0, *at_row, rows), pool_->v().narrow(0, *at_row, rows)};
}

void HeadwiseCache::ReleaseStorage(Layer& L) {
  if (L.pool_start >= 0) pool_->Free(L.pool_start, L.k.size(0));
  L.pool_start = -1;
  L.k = at::Tensor();
  L.v = at::Tensor();
}

bool HeadwiseCache::batchable() const {
  return pool_ != nullptr && device_.is_cuda() && (dtype_ == at::kBFloat16 || dtype_ == at::kHalf);
}

void HeadwiseCache::Reserve(int64_t tokens) {
  for (auto& L : layers_) L.reserve = tokens;
}

void HeadwiseCache::AllocateReserved(int64_t layer) {
  Layer& L = layers_[layer];
  if (L.reserve == 0) return;
  std::vector<int64_t> cap(num_kv_heads_);
  for (int64_t h = 0; h < num_kv_heads_; ++h) cap[h] = std::max(L.reserve, L.length[h]);
  L.reserve = 0;
  Relayout(layer, cap);
}

void HeadwiseCache::Relayout(int64_t layer, const std::vector<int64_t>& cap) {
  Layer& L = layers_[layer];
  std::vector<int64_t> offset(num_kv_heads_);
  int64_t rows = 0;
  for (int64_t h = 0; h < num_kv_heads_; ++h) {
    offset[h] = rows;
    rows += cap[h];
  }
  int64_t start = -1;
  auto [k, v] = NewStorage(rows, &start);
  for (int64_t h = 0; h < num_kv_heads_; ++h) {
    if (L.length[h] == 0) continue;
    k.narrow(0, offset[h], L.length[h]).copy_(L.k.narrow(0, L.offset[h], L.length[h]));
    v.narrow(0, offset[h], L.length[h]).copy_(L.v.narrow(0, L.offset[h], L.length[h]));
  }
  ReleaseStorage(L);
  L.k = k;
  L.v = v;
  L.pool_start = start;
  SetLayout(L, offset, L.length, cap);
}

void HeadwiseCache::SetLayout(Layer& L, std::vector<int64_t> offset, std::vector<int64_t> length,
                              std::vector<int64_t> capacity) {
  L.uniform = std::all_of(capacity.begin(), capacity.end(), [&](int64_t c) { return c == capacity[0]; }) &&
              std::all_of(length.begin(), length.end(), [&](int64_t n) { return n == length[0]; });
  L.offset = std::move(offset);
  L.length = std::move(length);
  L.capacity = std::move(capacity);
  L.meta_stale = true;
}

void HeadwiseCache::ReplaceStorage(Layer& L, const at::Tensor& src_rows, const at::Tensor& dst_rows, int64_t rows) {
  at::Tensor k_kept = L.k.index_select(0, src_rows), v_kept = L.v.index_select(0, src_rows);
  ReleaseStorage(L);
  std::tie(L.k, L.v) = NewStorage(rows, &L.pool_start);
  if (src_rows.numel() > 0) {
    L.k.index_copy_(0, dst_rows, k_kept);
    L.v.index_copy_(0, dst_rows, v_kept);
  }
}

void HeadwiseCache::Append(int64_t layer, const at::Tensor& k, const at::Tensor& v) {
  Write(layer, k, v);
  layers_[layer].meta_stale = true;  // no attention follows to bring the device lengths along
}

void HeadwiseCache::Write(int64_t layer, const at::Tensor& k, const at::Tensor& v) {
  AllocateReserved(layer);
  Layer& L = layers_[layer];
  const int64_t t = k.size(1);
  if (auto cap = GrownCapacities(L.length, L.capacity, t); !cap.empty()) Relayout(layer, cap);
  if (L.uniform) {
    const int64_t cap = L.capacity[0], len = L.length[0];
    L.k.view({num_kv_heads_, cap, head_dim_}).narrow(1, len, t).copy_(k);
    L.v.view({num_kv_heads_, cap, head_dim_}).narrow(1, len, t).copy_(v);
    for (auto& n : L.length) n += t;
    return;
  }
  for (int64_t h = 0; h < num_kv_heads_; ++h) {
    L.k.narrow(0, L.offset[h] + L.length[h], t).copy_(k[h]);
    L.v.narrow(0, L.offset[h] + L.length[h], t).copy_(v[h]);
    L.length[h] += t;
  }
}

at::Tensor HeadwiseCache::AppendAndAttend(int64_t layer, const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& v, double scale) {
  Write(layer, k, v);
  Layer& L = layers_[layer];
  const int64_t t = k.size(1);
  if (device_.is_cuda() && (dtype_ == at::kBFloat16 || dtype_ == at::kHalf)) return AttendFlash(L, q, t, scale);
  return L.uniform ? CausalAttention(q, keys(layer), values(layer), scale) : AttendSegments(L, q, t, scale);
}

at::Tensor HeadwiseCache::AttendFlash(Layer& L, const at::Tensor& q, int64_t t, double scale) {
  const int64_t heads = num_kv_heads_, group = q.size(0) / heads, d = head_dim_;
  // [H_q, T, D] -> [H * T, G, D]: sequence h holds its T queries, each with G heads.
  at::Tensor qp = q.view({heads, group, t, d}).permute({0, 2, 1, 3}).reshape({heads * t, group, d});
  auto i32 = at::TensorOptions().dtype(at::kInt);
  if (L.meta_stale) {
    std::vector<int32_t> cu_k(heads + 1), used(heads);
    for (int64_t h = 0; h < heads; ++h) {
      cu_k[h] = static_cast<int32_t>(L.offset[h]);
      used[h] = static_cast<int32_t>(L.length[h]);
    }
    cu_k[heads] = static_cast<int32_t>(L.k.size(0));
    L.cu_k = at::tensor(cu_k, i32).to(device_);
    L.used = at::tensor(used, i32).to(device_);
    L.meta_stale = false;
  } else {
    L.used.add_(t);  // the chunk was just appended to every segment
  }
  auto cu_q = cu_q_.find(t);
  if (cu_q == cu_q_.end()) cu_q = cu_q_.emplace(t, (at::arange(0, heads + 1, i32) * t).to(device_)).first;
  const int64_t max_k = *std::max_element(L.length.begin(), L.length.end());
  // Causal masks align bottom-right: query i of a chunk sees everything before the chunk.
  auto out = at::_flash_attention_forward(qp, L.k.view({-1, 1, d}), L.v.view({-1, 1, d}), cu_q->second, L.cu_k, t,
                                          max_k, /*dropout_p=*/0.0, /*is_causal=*/t > 1,
                                          /*return_debug_mask=*/false, scale, std::nullopt, std::nullopt, L.used);
  return std::get<0>(out).view({heads, t, group, d}).permute({0, 2, 1, 3}).reshape({heads * group, t, d});
}

HeadwiseCache::BatchPlan HeadwiseCache::PlanBatch(const std::vector<HeadwiseCache*>& caches, const at::Tensor& ids,
                                                  const at::Tensor& positions) {
  TORCH_CHECK(!caches.empty(), "PlanBatch: no caches");
  KvPool* pool = caches[0]->pool_;
  const int64_t b = static_cast<int64_t>(caches.size()), heads = caches[0]->num_kv_heads_;
  const int64_t layers = static_cast<int64_t>(caches[0]->layers_.size()), n = b * heads, stride = 3 * n + 1;
  TORCH_CHECK(ids.numel() == b && positions.numel() == b, "PlanBatch: ", b, " caches, ", ids.numel(), " ids, ",
              positions.numel(), " positions");
  for (auto* c : caches)
    TORCH_CHECK(c->pool_ == pool && c->batchable() && c->num_kv_heads_ == heads &&
                    static_cast<int64_t>(c->layers_.size()) == layers,
                "PlanBatch: every cache must come from the same pool on a CUDA device");
  BatchPlan plan;
  plan.batch = b;
  plan.segments = n;
  // Pinned memory: the upload is asynchronous, and the host allocator keeps the block until it is done.
  plan.host = at::empty({2 * b + layers * stride}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* p = plan.host.data_ptr<int64_t>();
  const at::Tensor ids64 = ids.to(at::kCPU, at::kLong).contiguous(), pos64 = positions.to(at::kCPU, at::kLong).contiguous();
  std::copy_n(ids64.data_ptr<int64_t>(), b, p);
  std::copy_n(pos64.data_ptr<int64_t>(), b, p + b);
  for (int64_t l = 0; l < layers; ++l) {
    int64_t* rows = p + 2 * b + l * stride;
    int64_t *cu_k = rows + n, *used = cu_k + n + 1;
    for (int64_t i = 0; i < b; ++i) {
      HeadwiseCache& c = *caches[i];
      c.AllocateReserved(l);
      Layer& L = c.layers_[l];
      if (auto cap = GrownCapacities(L.length, L.capacity, 1); !cap.empty()) c.Relayout(l, cap);
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t first = L.pool_start + L.offset[h], j = i * heads + h;
        rows[j] = first + L.length[h];
        cu_k[j] = first;
        used[j] = ++L.length[h];
        plan.max_k = std::max(plan.max_k, L.length[h]);
      }
      L.meta_stale = true;  // the single-cache path rebuilds its device metadata
    }
    cu_k[n] = pool->rows();
  }
  return plan;
}

HeadwiseCache::DevicePlan HeadwiseCache::SliceUploaded(const at::Tensor& uploaded, int64_t batch, int64_t segments,
                                                       int64_t max_k, int64_t layers) {
  const int64_t b = batch, n = segments, stride = 3 * n + 1;
  DevicePlan p;
  p.batch = b;
  p.segments = n;
  p.max_k = max_k;
  p.ids = uploaded.narrow(0, 0, b);
  p.positions = uploaded.narrow(0, b, b);
  at::Tensor meta = uploaded.narrow(0, 2 * b, layers * stride).view({layers, stride});
  p.rows = meta.narrow(1, 0, n);
  at::Tensor meta32 = meta.narrow(1, n, 2 * n + 1).to(at::kInt);  // [layers, cu_k (n + 1) | used (n)]
  p.cu_k = meta32.narrow(1, 0, n + 1);
  p.used = meta32.narrow(1, n + 1, n);
  p.cu_q = at::arange(0, n + 1, at::TensorOptions().dtype(at::kInt).device(uploaded.device()));
  return p;
}

at::Tensor HeadwiseCache::AttendPlanned(const KvPool& pool, const DevicePlan& plan, int64_t layer, const at::Tensor& q,
                                        const at::Tensor& k, const at::Tensor& v, double scale) {
  const int64_t n = k.size(0) * k.size(1), d = k.size(2);
  const at::Tensor rows = plan.rows[layer];
  // The append: one kernel for K and V where it applies, else [B, H, D] rows in segment order.
  if (!model::FusedAppendRows(k, v, rows, pool.k(), pool.v())) {
    pool.k().index_copy_(0, rows, k.reshape({n, d}));
    pool.v().index_copy_(0, rows, v.reshape({n, d}));
  }
  return AttendAppended(pool, plan, layer, q, k.size(1), scale);
}

at::Tensor HeadwiseCache::AttendPlannedUnrotated(const KvPool& pool, const DevicePlan& plan, int64_t layer,
                                                 const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const at::Tensor& cos, const at::Tensor& sin, double scale) {
  if (!model::FusedRopeAppend(q, k, v, cos, sin, plan.rows[layer], pool.k(), pool.v())) return {};
  return AttendAppended(pool, plan, layer, q, k.size(1), scale);
}

at::Tensor HeadwiseCache::AttendAppended(const KvPool& pool, const DevicePlan& plan, int64_t layer, const at::Tensor& q,
                                         int64_t kv_heads, double scale) {
  const int64_t b = q.size(0), hq = q.size(1), d = q.size(2), group = hq / kv_heads, n = b * kv_heads;
  const at::Tensor used = plan.used[layer], cu_k = plan.cu_k[layer];
  // The split-KV decode kernel reads q in place; the varlen flash call (DEFKV_DECODE_KERNEL=0, or
  // a case the kernel does not take) needs q as [n, G, D] (segment t * H + h holds the G query
  // heads of token t reading kv head h). Both give [B, H_q, D].
  at::Tensor o = model::FusedDecodeAttention(q, kv_heads, pool.k(), pool.v(), cu_k.narrow(0, 0, n), used, plan.max_k,
                                             scale);
  if (o.defined()) return o;
  o = std::get<0>(at::_flash_attention_forward(q.reshape({n, group, d}), pool.k().view({-1, 1, d}),
                                               pool.v().view({-1, 1, d}), plan.cu_q, cu_k, /*max_q=*/1, plan.max_k,
                                               /*dropout_p=*/0.0, /*is_causal=*/false, /*return_debug_mask=*/false,
                                               scale, std::nullopt, std::nullopt, used));
  return o.view({b, hq, d});
}

at::Tensor HeadwiseCache::AttendSegments(const Layer& L, const at::Tensor& q, int64_t t, double scale) const {
  const int64_t group = q.size(0) / num_kv_heads_;
  std::vector<at::Tensor> outs;
  outs.reserve(num_kv_heads_);
  for (int64_t h = 0; h < num_kv_heads_; ++h) {
    auto kh = L.k.narrow(0, L.offset[h], L.length[h]).unsqueeze(0);
    auto vh = L.v.narrow(0, L.offset[h], L.length[h]).unsqueeze(0);
    outs.push_back(CausalAttention(q.narrow(0, h * group, group), kh, vh, scale));
  }
  return at::cat(outs, 0);
}

void HeadwiseCache::Compact(int64_t layer, const std::vector<at::Tensor>& kept, int64_t extra_capacity) {
  Layer& L = layers_[layer];
  TORCH_CHECK(static_cast<int64_t>(kept.size()) == num_kv_heads_, "Compact: one index set per kv head");
  L.reserve = 0;  // the kept entries + extra replace any pending reservation
  if (!L.k.defined()) Relayout(layer, std::vector<int64_t>(num_kv_heads_, 0));  // never written: empty storage
  std::vector<int64_t> cap(num_kv_heads_), new_len(num_kv_heads_), offset(num_kv_heads_);
  // Every head's indices come to the host in one transfer (one synchronisation, not one per
  // head), are sorted and checked there, and go back as one buffer: the source rows of the kept
  // entries in the old storage, then their destination rows in the new one.
  std::vector<at::Tensor> flat;
  for (const auto& k : kept) flat.push_back(k.to(kept[0].device(), at::kLong).reshape({-1}));
  const at::Tensor all = at::cat(flat).to(at::kCPU).contiguous();
  const int64_t n_kept = all.numel();
  std::vector<int64_t> rows(2 * n_kept);
  int64_t from = 0, dst = 0;
  for (int64_t h = 0; h < num_kv_heads_; ++h) {
    const int64_t n = flat[h].numel();
    int64_t* src = rows.data() + from;
    std::copy_n(all.data_ptr<int64_t>() + from, n, src);
    std::sort(src, src + n);
    TORCH_CHECK(n == 0 || (src[0] >= 0 && src[n - 1] < L.length[h]), "Compact: kept index outside head ", h, "'s ",
                L.length[h], " entries");
    for (int64_t i = 0; i < n; ++i) {
      src[i] += L.offset[h];
      rows[n_kept + from + i] = dst + i;
    }
    new_len[h] = n;
    cap[h] = n + extra_capacity;
    offset[h] = dst;
    from += n;
    dst += cap[h];
  }
  const at::Tensor both = at::from_blob(rows.data(), {2 * n_kept}, at::TensorOptions().dtype(at::kLong)).to(device_);
  const at::Tensor src_rows = both.narrow(0, 0, n_kept), dst_rows = both.narrow(0, n_kept, n_kept);
  ReplaceStorage(L, src_rows, dst_rows, dst);
  SetLayout(L, offset, new_len, cap);
}

void HeadwiseCache::Narrow(int64_t layer, const at::Tensor& entries, const std::vector<int64_t>& per_head,
                           int64_t extra_capacity) {
  Layer& L = layers_[layer];
  const int64_t heads = num_kv_heads_, n = entries.numel();
  TORCH_CHECK(static_cast<int64_t>(per_head.size()) == heads, "Narrow: one count per kv head");
  // (Device types: the cache may say "cuda" where the tensors say "cuda:0".)
  TORCH_CHECK(entries.dim() == 1 && entries.scalar_type() == at::kLong && entries.device().type() == device_.type(),
              "Narrow: entries must be a 1-D int64 tensor on the layer's device");
  L.reserve = 0;
  if (!L.k.defined()) Relayout(layer, std::vector<int64_t>(heads, 0));
  // Per head: where its entries start in the flat order and in the old storage, and where its
  // kept ones start in both orders after the narrowing. One upload for all of it.
  std::vector<int64_t> cap(heads), offset(heads), table(5 * heads);
  int64_t start = 0, kept_start = 0, dst = 0;
  for (int64_t h = 0; h < heads; ++h) {
    TORCH_CHECK(per_head[h] >= 0 && per_head[h] <= L.length[h], "Narrow: head ", h, " keeps ", per_head[h], " of ",
                L.length[h], " entries");
    cap[h] = per_head[h] + extra_capacity;
    offset[h] = dst;
    table[h] = start;                                   // first flat entry of head h
    table[heads + h] = start + L.length[h];             // one past its last
    table[2 * heads + h] = L.offset[h] - start;         // flat entry -> old storage row
    table[3 * heads + h] = dst - kept_start;            // kept index -> new storage row
    table[4 * heads + h] = per_head[h];
    start += L.length[h];
    kept_start += per_head[h];
    dst += cap[h];
  }
  TORCH_CHECK(kept_start == n, "Narrow: the counts per head add up to ", kept_start, ", not ", n);
  if (n > 0) {
    const at::Tensor t = at::tensor(table, at::TensorOptions().dtype(at::kLong)).to(device_).view({5, heads});
    const at::Tensor head =  // the head of each kept entry
        at::arange(heads, entries.options()).repeat_interleave(t[4], /*dim=*/0, /*output_size=*/n);
    at::Tensor ok = (entries >= t[0].index_select(0, head)) & (entries < t[1].index_select(0, head));
    if (n > 1) ok = ok.all() & (entries.narrow(0, 1, n - 1) > entries.narrow(0, 0, n - 1)).all();
    TORCH_CHECK(ok.all().item<bool>(), "Narrow: layer ", layer, "'s entries are not ascending within their heads' ranges");
    const at::Tensor src = entries + t[2].index_select(0, head);
    ReplaceStorage(L, src, at::arange(n, entries.options()) + t[3].index_select(0, head), dst);
  } else {
    ReplaceStorage(L, entries, entries, dst);  // nothing kept
  }
  SetLayout(L, offset, per_head, cap);
}

at::Tensor HeadwiseCache::keys(int64_t layer) const {
  const Layer& L = layers_[layer];
  TORCH_CHECK(L.uniform, "keys(): layer ", layer, " has per-head lengths");
  if (!L.k.defined()) return at::empty({num_kv_heads_, 0, head_dim_}, at::TensorOptions().dtype(dtype_).device(device_));
  return L.k.view({num_kv_heads_, L.capacity[0], head_dim_}).narrow(1, 0, L.length[0]);
}
at::Tensor HeadwiseCache::values(int64_t layer) const {
  const Layer& L = layers_[layer];
  TORCH_CHECK(L.uniform, "values(): layer ", layer, " has per-head lengths");
  if (!L.v.defined()) return at::empty({num_kv_heads_, 0, head_dim_}, at::TensorOptions().dtype(dtype_).device(device_));
  return L.v.view({num_kv_heads_, L.capacity[0], head_dim_}).narrow(1, 0, L.length[0]);
}
at::Tensor HeadwiseCache::head_keys(int64_t layer, int64_t h) const {
  const Layer& L = layers_[layer];
  if (!L.k.defined()) return at::empty({0, head_dim_}, at::TensorOptions().dtype(dtype_).device(device_));
  return L.k.narrow(0, L.offset[h], L.length[h]);
}
at::Tensor HeadwiseCache::head_values(int64_t layer, int64_t h) const {
  const Layer& L = layers_[layer];
  if (!L.v.defined()) return at::empty({0, head_dim_}, at::TensorOptions().dtype(dtype_).device(device_));
  return L.v.narrow(0, L.offset[h], L.length[h]);
}

int64_t HeadwiseCache::entries(int64_t layer) const {
  const auto& len = layers_[layer].length;
  return std::accumulate(len.begin(), len.end(), int64_t{0});
}

int64_t HeadwiseCache::bytes_used() const {
  int64_t n = 0;
  for (size_t l = 0; l < layers_.size(); ++l) n += entries(static_cast<int64_t>(l));
  return n * entry_bytes();
}

int64_t HeadwiseCache::bytes_reserved() const {
  int64_t rows = 0;
  for (const auto& L : layers_)
    if (L.k.defined()) rows += L.k.size(0);
  return rows * entry_bytes();
}

}  // namespace defkv::cache
