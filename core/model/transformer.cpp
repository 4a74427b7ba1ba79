#include "core/model/transformer.h"

#include <cmath>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/model/decode_graphs.h"
#include "core/model/fused_ops.h"
#include "core/model/safetensors.h"

namespace defkv::model {
namespace {

absl::StatusOr<at::ScalarType> ToTorch(DType d, const TensorView& v) {
  switch (d) {
    case DType::kF32: return at::kFloat;
    case DType::kF16: return at::kHalf;
    case DType::kBF16: return at::kBFloat16;
    case DType::kF64: return at::kDouble;
    default:
      return absl::InvalidArgumentError(absl::StrCat(v.file, ": tensor \"", v.name, "\" has dtype ",
                                                     DTypeName(d), ", expected F32, F16 or BF16"));
  }
}

std::string ShapeStr(const std::vector<int64_t>& s) { return absl::StrCat("[", absl::StrJoin(s, ", "), "]"); }

// at::linear(x, w, b). A batch-1 decode step's row goes through the GEMV kernel on CUDA for
// weights up to 512 MiB: defkv-bench --gemv-sweep measured it 1.02-1.36x faster than cuBLAS on
// an H200 for the qkv, o, gate_up and down projections of 7-8B models (one Qwen2.5 qkv shape
// 0.96x) and 0.97-0.98x for the lm_head, which cuBLAS keeps (docs/PERFORMANCE.md). The whole
// batch-1 step gains 1-2%; batched steps of 2, 4 and 8 rows were as fast or 0.5% slower with
// the kernel, so they stay with cuBLAS.
constexpr int64_t kGemvMaxWeightBytes = int64_t{512} << 20;
at::Tensor Linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b = {}) {
  const int64_t k = x.dim() > 0 ? x.size(-1) : 0, rows = k > 0 ? x.numel() / k : 0;
  if (rows == 1 && static_cast<int64_t>(w.nbytes()) <= kGemvMaxWeightBytes)
    if (at::Tensor y = FusedLinear(x, w, b); y.defined()) return y;
  return at::linear(x, w, b);
}

// Turns checkpoint tensors into device tensors of the model dtype, checking names and shapes.
class WeightLoader {
 public:
  WeightLoader(const WeightStore& store, const LoadOptions& opts, at::ScalarType dtype)
      : store_(store), opts_(opts), dtype_(dtype), total_(store.total_bytes()) {}

  absl::StatusOr<at::Tensor> Get(const std::string& name, std::vector<int64_t> shape) {
    const TensorView* v = store_.Find(name);
    if (v == nullptr) return absl::NotFoundError(absl::StrCat("model weights: tensor \"", name, "\" is missing"));
    if (v->shape != shape)
      return absl::InvalidArgumentError(absl::StrCat(v->file, ": tensor \"", name, "\" has shape ",
                                                     ShapeStr(v->shape), ", config.json implies ", ShapeStr(shape)));
    auto src = ToTorch(v->dtype, *v);
    if (!src.ok()) return src.status();
    auto view = at::from_blob(const_cast<uint8_t*>(v->data), v->shape, at::TensorOptions().dtype(*src));
    // Always copy: the mapping may go away, and from_blob memory must not be written.
    at::Tensor t = view.to(opts_.device, dtype_, /*non_blocking=*/false, /*copy=*/true);
    done_ += v->nbytes;
    if (opts_.progress) opts_.progress(done_, total_);
    return t;
  }
  absl::StatusOr<at::Tensor> GetIf(bool present, const std::string& name, std::vector<int64_t> shape) {
    if (!present) return at::Tensor();
    return Get(name, std::move(shape));
  }

 private:
  const WeightStore& store_;
  const LoadOptions& opts_;
  at::ScalarType dtype_;
  size_t total_, done_ = 0;
};

#define DEFKV_TRY(lhs, expr)            \
  do {                                  \
    auto _r = (expr);                   \
    if (!_r.ok()) return _r.status();   \
    lhs = std::move(*_r);               \
  } while (0)

at::ScalarType DtypeFromName(const std::string& s) {
  if (s == "bfloat16") return at::kBFloat16;
  if (s == "float16") return at::kHalf;
  return at::kFloat;
}

}  // namespace

Transformer::~Transformer() = default;

bool Transformer::EnableDecodeGraphs(int64_t max_batch) {
  if (!device_.is_cuda() || max_batch < 1) return false;
  graphs_ = DecodeGraphs::Create(max_batch);
  return graphs_ != nullptr;
}

int64_t Transformer::decode_graphs() const { return graphs_ == nullptr ? 0 : graphs_->size(); }

Transformer::Transformer(ModelConfig cfg, at::Device device, at::ScalarType dtype)
    : config_(std::move(cfg)), device_(device), dtype_(dtype), rope_(config_.rope, config_.head_dim, device) {}

absl::StatusOr<std::unique_ptr<Transformer>> Transformer::Load(const std::string& dir, const LoadOptions& opts) {
  auto cfg = LoadModelConfig(dir);
  if (!cfg.ok()) return cfg.status();
  auto store = WeightStore::OpenDir(dir);
  if (!store.ok()) return store.status();

  at::ScalarType dtype = opts.dtype;
  if (dtype == at::ScalarType::Undefined)
    dtype = opts.device.is_cuda() ? DtypeFromName(cfg->dtype) : at::kFloat;
  if (dtype != at::kFloat && dtype != at::kBFloat16 && dtype != at::kHalf)
    return absl::InvalidArgumentError("dtype must be float32, bfloat16 or float16");
  if (dtype == at::kHalf && opts.device.is_cpu())
    return absl::InvalidArgumentError("float16 is not supported on CPU (use float32 or bfloat16)");

  std::unique_ptr<Transformer> m(new Transformer(*cfg, opts.device, dtype));
  WeightLoader w(*store, opts, dtype);
  auto s = m->Build([&](const std::string& name, std::vector<int64_t> shape, bool present) {
    return w.GetIf(present, name, std::move(shape));
  });
  if (!s.ok()) return s;
  return m;
}

absl::StatusOr<std::unique_ptr<Transformer>> Transformer::Random(const ModelConfig& cfg, const LoadOptions& opts,
                                                                 uint64_t seed) {
  const at::ScalarType dtype = opts.dtype == at::ScalarType::Undefined ? at::kBFloat16 : opts.dtype;
  std::unique_ptr<Transformer> m(new Transformer(cfg, opts.device, dtype));
  at::manual_seed(seed);
  auto to = at::TensorOptions().dtype(dtype).device(opts.device);
  auto s = m->Build([&](const std::string& name, std::vector<int64_t> shape, bool present) -> absl::StatusOr<at::Tensor> {
    if (!present) return at::Tensor();
    if (name.find("norm") != std::string::npos) return at::ones(shape, to);
    return at::randn(shape, to) * 0.02;
  });
  if (!s.ok()) return s;
  return m;
}

absl::Status Transformer::Build(const WeightSource& get) {
  const ModelConfig& c = config_;
  const int64_t hd = c.hidden_size, d = c.head_dim, hq = c.num_heads, hkv = c.num_kv_heads;
  const int64_t inter = c.intermediate_size;
  DEFKV_TRY(embed_, get("model.embed_tokens.weight", {c.vocab_size, hd}, true));
  DEFKV_TRY(final_norm_, get("model.norm.weight", {hd}, true));
  if (c.tie_word_embeddings) {
    lm_head_ = embed_;
  } else {
    DEFKV_TRY(lm_head_, get("lm_head.weight", {c.vocab_size, hd}, true));
  }
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    LayerWeights L;
    at::Tensor q, k, v, bq, bk, bv, gate, up, bgate, bup;
    DEFKV_TRY(L.input_norm, get(p + "input_layernorm.weight", {hd}, true));
    DEFKV_TRY(L.post_norm, get(p + "post_attention_layernorm.weight", {hd}, true));
    DEFKV_TRY(q, get(p + "self_attn.q_proj.weight", {hq * d, hd}, true));
    DEFKV_TRY(k, get(p + "self_attn.k_proj.weight", {hkv * d, hd}, true));
    DEFKV_TRY(v, get(p + "self_attn.v_proj.weight", {hkv * d, hd}, true));
    DEFKV_TRY(bq, get(p + "self_attn.q_proj.bias", {hq * d}, c.qkv_bias));
    DEFKV_TRY(bk, get(p + "self_attn.k_proj.bias", {hkv * d}, c.qkv_bias));
    DEFKV_TRY(bv, get(p + "self_attn.v_proj.bias", {hkv * d}, c.qkv_bias));
    DEFKV_TRY(L.q_norm, get(p + "self_attn.q_norm.weight", {d}, c.qk_norm));
    DEFKV_TRY(L.k_norm, get(p + "self_attn.k_norm.weight", {d}, c.qk_norm));
    DEFKV_TRY(L.w_o, get(p + "self_attn.o_proj.weight", {hd, hq * d}, true));
    DEFKV_TRY(L.b_o, get(p + "self_attn.o_proj.bias", {hd}, c.o_bias));
    DEFKV_TRY(gate, get(p + "mlp.gate_proj.weight", {inter, hd}, true));
    DEFKV_TRY(up, get(p + "mlp.up_proj.weight", {inter, hd}, true));
    DEFKV_TRY(L.w_down, get(p + "mlp.down_proj.weight", {hd, inter}, true));
    DEFKV_TRY(bgate, get(p + "mlp.gate_proj.bias", {inter}, c.mlp_bias));
    DEFKV_TRY(bup, get(p + "mlp.up_proj.bias", {inter}, c.mlp_bias));
    DEFKV_TRY(L.b_down, get(p + "mlp.down_proj.bias", {hd}, c.mlp_bias));
    // Fused projections: one GEMM for q/k/v and one for gate/up per layer.
    L.w_qkv = at::cat({q, k, v}, 0);
    if (c.qkv_bias) L.b_qkv = at::cat({bq, bk, bv}, 0);
    L.w_gate_up = at::cat({gate, up}, 0);
    if (c.mlp_bias) L.b_gate_up = at::cat({bgate, bup}, 0);
    layers_.push_back(std::move(L));
  }
  weight_bytes_ = 0;
  auto count = [&](const at::Tensor& t) {
    if (t.defined()) weight_bytes_ += t.numel() * t.element_size();
  };
  count(embed_);
  count(final_norm_);
  if (!c.tie_word_embeddings) count(lm_head_);
  for (const auto& L : layers_)
    for (const auto* t : {&L.input_norm, &L.post_norm, &L.w_qkv, &L.b_qkv, &L.q_norm, &L.k_norm, &L.w_o, &L.b_o,
                          &L.w_gate_up, &L.b_gate_up, &L.w_down, &L.b_down})
      count(*t);
  return absl::OkStatus();
}

std::unique_ptr<cache::HeadwiseCache> Transformer::NewCache(cache::KvPool* pool) const {
  return std::make_unique<cache::HeadwiseCache>(config_.num_layers, config_.num_kv_heads, config_.head_dim,
                                                dtype_, device_, pool);
}

at::Tensor Transformer::PreRopeQueries(int64_t l, const at::Tensor& x_norm) const {
  const LayerWeights& L = layers_[l];
  const int64_t t = x_norm.size(0), hq = config_.num_heads, d = config_.head_dim;
  at::Tensor w = L.w_qkv.narrow(0, 0, hq * d);
  at::Tensor b = L.b_qkv.defined() ? L.b_qkv.narrow(0, 0, hq * d) : at::Tensor();
  at::Tensor q = at::linear(x_norm, w, b).view({t, hq, d});
  if (config_.qk_norm) q = RmsNorm(q, L.q_norm);
  return q.transpose(0, 1);
}

at::Tensor Transformer::RmsNorm(const at::Tensor& x, const at::Tensor& w) const {
  if (at::Tensor y = FusedRmsNorm(x, w, config_.rms_norm_eps); y.defined()) return y;
  auto xf = x.to(at::kFloat);
  auto var = xf.pow(2).mean(-1, /*keepdim=*/true);
  xf = xf * at::rsqrt(var + config_.rms_norm_eps);
  return w * xf.to(x.scalar_type());
}

at::Tensor Transformer::Forward(const at::Tensor& ids, const at::Tensor& positions, cache::KvCache& cache,
                                bool all_logits, LayerHook* hook) const {
  return Run(ids, positions, all_logits, hook, CacheAttend(cache));
}

Transformer::Attend Transformer::CacheAttend(cache::KvCache& cache) const {
  const double scale = 1.0 / std::sqrt(static_cast<double>(config_.head_dim));
  return [&cache, scale](int64_t l, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
    return cache.AppendAndAttend(l, q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), scale).transpose(0, 1);
  };
}

at::Tensor Transformer::ForwardBatch(const at::Tensor& ids, const at::Tensor& positions,
                                     const std::vector<cache::KvCache*>& caches) const {
  const int64_t b = ids.size(0);
  TORCH_CHECK(static_cast<int64_t>(caches.size()) == b && positions.size(0) == b, "ForwardBatch: ", b, " ids, ",
              positions.size(0), " positions, ", caches.size(), " caches");
  const double scale = 1.0 / std::sqrt(static_cast<double>(config_.head_dim));
  // Caches sharing one pool on the GPU: the step is planned on the host for all layers, its
  // metadata uploaded once, then one scatter and one flash call per layer for all of them.
  std::vector<cache::HeadwiseCache*> pooled;
  for (auto* c : caches) {
    auto* hc = dynamic_cast<cache::HeadwiseCache*>(c);
    if (hc == nullptr || !hc->batchable() || hc->pool() != dynamic_cast<cache::HeadwiseCache*>(caches[0])->pool()) {
      pooled.clear();
      break;
    }
    pooled.push_back(hc);
  }
  if (!pooled.empty()) {
    auto plan = cache::HeadwiseCache::PlanBatch(pooled, ids, positions);
    const cache::KvPool& pool = *pooled[0]->pool();
    if (graphs_ != nullptr)
      if (at::Tensor logits = graphs_->Run(*this, plan, pool); logits.defined()) return logits;
    return DecodePlanned(plan.host.to(device_, /*non_blocking=*/true), plan.batch, plan.segments, plan.max_k, pool);
  }
  return Run(ids, positions, /*all_logits=*/true, nullptr,
             [&](int64_t l, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
               // Each sequence alone: [1, H, D] -> [H, 1, D] for its cache, and back.
               std::vector<at::Tensor> outs;
               outs.reserve(b);
               const auto one = [](const at::Tensor& x, int64_t i) { return x.narrow(0, i, 1).transpose(0, 1).contiguous(); };
               for (int64_t i = 0; i < b; ++i)
                 outs.push_back(caches[i]->AppendAndAttend(l, one(q, i), one(k, i), one(v, i), scale).transpose(0, 1));
               return b == 1 ? outs[0] : at::cat(outs, 0);
             });
}

at::Tensor Transformer::DecodePlanned(const at::Tensor& plan, int64_t batch, int64_t segments, int64_t max_k,
                                      const cache::KvPool& pool) const {
  const double scale = 1.0 / std::sqrt(static_cast<double>(config_.head_dim));
  const auto p = cache::HeadwiseCache::SliceUploaded(plan, batch, segments, max_k, config_.num_layers);
  const RotatingAttend rotating = [&](int64_t l, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& cos, const at::Tensor& sin) {
    return cache::HeadwiseCache::AttendPlannedUnrotated(pool, p, l, q, k, v, cos, sin, scale);
  };
  return Run(
      p.ids, p.positions, /*all_logits=*/true, nullptr,
      [&](int64_t l, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
        return cache::HeadwiseCache::AttendPlanned(pool, p, l, q, k, v, scale);
      },
      &rotating);
}

at::Tensor Transformer::Run(const at::Tensor& ids, const at::Tensor& positions, bool all_logits, LayerHook* hook,
                            const Attend& attend, const RotatingAttend* rotating) const {
  // Not a structured binding: RunLayer's RoPE lambda captures them (clang refuses bindings there).
  const auto tables = rope_.Tables(positions.to(device_), dtype_);
  at::Tensor x = Embed(ids);  // [T, hidden]
  at::Tensor pending;         // each layer's MLP output, added by the next piece with its norm
  for (int64_t l = 0; l < config_.num_layers; ++l)
    x = RunLayer(l, std::move(x), tables.first, tables.second, hook, attend, &pending, rotating);
  return Head(std::move(x), all_logits, pending);
}

at::Tensor Transformer::AddRmsNorm(at::Tensor& x, const at::Tensor& delta, const at::Tensor& w) const {
  if (at::Tensor y; FusedAddRmsNormInPlace(x, delta, w, config_.rms_norm_eps, y)) return y;
  x = x + delta;
  return RmsNorm(x, w);
}

at::Tensor Transformer::Embed(const at::Tensor& ids) const { return at::embedding(embed_, ids.to(device_)); }

at::Tensor Transformer::RunLayer(int64_t l, at::Tensor x, const at::Tensor& cos, const at::Tensor& sin,
                                 LayerHook* hook, const Attend& attend, at::Tensor* pending,
                                 const RotatingAttend* rotating) const {
  const ModelConfig& c = config_;
  const int64_t t = x.size(0), d = c.head_dim, hq = c.num_heads, hkv = c.num_kv_heads;
  const LayerWeights& L = layers_[l];
  at::Tensor x_norm = pending != nullptr && pending->defined() ? AddRmsNorm(x, *pending, L.input_norm)
                                                                : RmsNorm(x, L.input_norm);
  at::Tensor qkv = Linear(x_norm, L.w_qkv, L.b_qkv);
  auto parts = qkv.split_with_sizes({hq * d, hkv * d, hkv * d}, -1);
  // Token-major views [T, H, D] of the projection, handed to `attend` as they are.
  at::Tensor q = parts[0].view({t, hq, d});
  at::Tensor k = parts[1].view({t, hkv, d});
  at::Tensor v = parts[2].view({t, hkv, d});
  if (c.qk_norm) {
    q = RmsNorm(q, L.q_norm);
    k = RmsNorm(k, L.k_norm);
  }
  // The fused kernel may rotate q and k in place: they are columns of the fresh qkv, or fresh
  // norm outputs, and nothing else reads them. Without q/k norms one launch covers both, as
  // they sit side by side in qkv. Rope::Apply works on [H, T, D].
  const auto rope = [&](const at::Tensor& y) {
    return FusedRopeInPlace(y, cos, sin) ? y : Rope::Apply(y.transpose(0, 1), cos, sin).transpose(0, 1);
  };
  // A decode step over the pool rotates q and k in its append kernel where it can.
  at::Tensor attn = rotating != nullptr && !c.qk_norm ? (*rotating)(l, q, k, v, cos, sin) : at::Tensor();
  if (!attn.defined()) {
    if (c.qk_norm || !FusedRopeInPlace(qkv.narrow(-1, 0, (hq + hkv) * d).view({t, hq + hkv, d}), cos, sin)) {
      q = rope(q);
      k = rope(k);
    }
    attn = attend(l, q, k, v);  // [T, H_q, D]
  }
  if (hook != nullptr) hook->AfterAttention(l, x_norm);
  const at::Tensor h = AddRmsNorm(x, Linear(attn.reshape({t, hq * d}), L.w_o, L.b_o), L.post_norm);

  // A batch-1 decode step: the gate/up GEMV and the SiLU gate are one kernel (the same bits as
  // the two; Linear's rule for when the GEMV kernel runs).
  at::Tensor act;
  if (t == 1 && static_cast<int64_t>(L.w_gate_up.nbytes()) <= kGemvMaxWeightBytes)
    act = FusedLinearSiluGate(h, L.w_gate_up, L.b_gate_up);
  if (!act.defined()) {
    const at::Tensor gu = Linear(h, L.w_gate_up, L.b_gate_up);  // [T, 2 * inter]: gate | up
    act = FusedSiluMul(gu);
    if (!act.defined()) {
      auto g = gu.chunk(2, -1);
      act = at::silu(g[0]) * g[1];
    }
  }
  at::Tensor down = Linear(act, L.w_down, L.b_down);
  if (pending == nullptr) return x + down;
  *pending = std::move(down);
  return x;
}

at::Tensor Transformer::Head(at::Tensor x, bool all_logits, const at::Tensor& pending) const {
  const int64_t t = x.size(0);
  if (!all_logits) {
    // Only the last row goes on: its residual add and norm alone.
    x = x.narrow(0, t - 1, 1);
    if (pending.defined()) x = x + pending.narrow(0, t - 1, 1);
    return Linear(RmsNorm(x, final_norm_), lm_head_).to(at::kFloat);
  }
  const at::Tensor y = pending.defined() ? AddRmsNorm(x, pending, final_norm_) : RmsNorm(x, final_norm_);
  return Linear(y, lm_head_).to(at::kFloat);
}

LayerMajorPrefill::LayerMajorPrefill(const Transformer& model, at::Tensor ids, int64_t first_position, int64_t chunk,
                                     cache::KvCache& cache, LayerHook* hook)
    : model_(model), ids_(std::move(ids)), first_(first_position), chunk_(chunk), n_(ids_.size(0)), cache_(cache),
      hook_(hook), attend_(model.CacheAttend(cache)), x_((n_ + chunk - 1) / chunk) {
  TORCH_CHECK(chunk > 0, "LayerMajorPrefill: chunk must be positive");
}

bool LayerMajorPrefill::Step(int64_t budget) {
  const int64_t chunks = static_cast<int64_t>(x_.size());
  for (int64_t spent = 0; !done() && (spent == 0 || spent < budget);) {
    const int64_t begin = next_chunk_ * chunk_, count = std::min(chunk_, n_ - begin);
    at::Tensor& x = x_[next_chunk_];
    if (layer_ == 0) x = model_.Embed(ids_.narrow(0, begin, count));
    auto positions = at::arange(first_ + begin, first_ + begin + count, at::TensorOptions().dtype(at::kLong));
    const auto tables = model_.rope_.Tables(positions.to(model_.device_), model_.dtype_);
    if (hook_ != nullptr) hook_->BeginChunk(next_chunk_ == chunks - 1);
    x = model_.RunLayer(layer_, std::move(x), tables.first, tables.second, hook_, attend_);
    spent += count;
    if (++next_chunk_ == chunks) {
      next_chunk_ = 0;
      ++layer_;
    }
  }
  return done();
}

at::Tensor LayerMajorPrefill::Logits() const {
  TORCH_CHECK(done() && n_ > 0, "LayerMajorPrefill::Logits: the context has not been through every layer");
  return model_.Head(x_.back(), /*all_logits=*/false);
}

}  // namespace defkv::model
