// defkv-bench: in-process benchmark of prefill, compression and decode on random-weight models
// of real shapes (no checkpoint, no tokenizer, no gRPC). Prints one row per run; --json for
// machines. The decode roofline ratio is the measured step time over the time to read the
// weights and the KV cache once at the copy bandwidth measured in the same run.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#ifdef DEFKV_WITH_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <ATen/ops/_flash_attention_forward.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "core/engine/compressor.h"
#include "core/model/config.h"
#include "core/model/fused_ops.h"
#include "core/model/transformer.h"
#include "core/press/defensivekv.h"
#include "core/press/press.h"
#include "core/press/registry.h"
#include "kernels/device_info.h"

namespace {

using Clock = std::chrono::steady_clock;
using defkv::model::ModelConfig;

constexpr const char* kUsage = R"(defkv-bench: prefill / compression / decode timings on random-weight models.

usage: defkv-bench [options]
  --shapes LIST        model shapes: llama3.1-8b, qwen2.5-7b, tiny (default llama3.1-8b)
  --contexts LIST      context lengths in tokens (default 4096,16384,32768,131072)
  --ratios LIST        compression ratios (default 0,0.5,0.8); ratio 0 runs press none only
  --presses LIST       presses for ratios > 0 (default snapkv,adakv,defensivekv,layer_defensivekv)
  --decode-steps N     timed decode steps at batch 1 (default 32)
  --prefill-chunk N    context tokens per prefill chunk, run layer by layer (default 8192)
  --device D           cuda (default) or cpu
  --dtype T            bfloat16 (default), float16, float32
  --batch-decode LIST  after the batch-1 table, batched decode steps over synthetic caches (random
                       K/V, every head holding TOKENS entries) of B sequences sharing one KV pool,
                       as the server's continuous batch runs them: LIST of TOKENSxB, e.g.
                       6618x114,32832x26 (default none); attn_ms is the step's attention alone
  --graphs on|off      on (default): the cache takes its rows from a KV pool sized for the run and
                       decode steps replay as CUDA graphs, as in the server (CUDA, half precision);
                       off: a cache of its own and eager decode steps
  --attn-sweep LIST    instead of the tables: the decode step's attention alone (one layer, the
                       shape's head layout), varlen flash against the split-KV kernel under each
                       tuning, over SEGMENTSxTOKENS items (segment lengths drawn from
                       [TOKENS/2, TOKENS]); "default" is a grid of 8..1024 segments x 512..32768
  --attn-tunings LIST  the kernel's chunking for --attn-sweep, MIN_CHUNK:BLOCKS_PER_SM items
                       (default 128:64,256:16)
  --gemv-sweep         instead of the tables: a decode step's weight GEMVs alone (qkv, o, gate_up,
                       down and lm_head of each --shapes, over --gemv-rows rows of x), at::linear
                       (cuBLAS) against the GEMV kernel, each a CUDA graph of 20 calls cycling over
                       copies of the weight (no L2 reuse between calls): ms per call, GB/s of weight
  --gemv-rows LIST     rows of x for --gemv-sweep, 1 to 8 each (default 1,4)
  --compress-profile   instead of the tables: the parts of compressing one layer, timed alone on a
                       layer of random keys and values of each --contexts length (window 32,
                       pooling 5, ratio 0.8, the presses' defaults)
  --json               one JSON object per run instead of the table
LISTs are comma-separated.
)";

std::vector<std::string> Split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

ModelConfig Shape(const std::string& name) {
  ModelConfig c;
  c.model_type = "llama";
  if (name == "llama3.1-8b") {
    c.vocab_size = 128256, c.hidden_size = 4096, c.intermediate_size = 14336, c.num_layers = 32;
    c.num_heads = 32, c.num_kv_heads = 8, c.head_dim = 128, c.max_position_embeddings = 131072;
    c.rope = {defkv::model::RopeType::kLlama3, 500000.0, 8.0, 1.0, 4.0, 8192};
  } else if (name == "qwen2.5-7b") {
    c.model_type = "qwen2";
    c.vocab_size = 152064, c.hidden_size = 3584, c.intermediate_size = 18944, c.num_layers = 28;
    c.num_heads = 28, c.num_kv_heads = 4, c.head_dim = 128, c.max_position_embeddings = 131072;
    c.rope.theta = 1000000.0;
    c.qkv_bias = true;
  } else if (name == "tiny") {
    c.vocab_size = 512, c.hidden_size = 128, c.intermediate_size = 256, c.num_layers = 2;
    c.num_heads = 8, c.num_kv_heads = 2, c.head_dim = 16, c.max_position_embeddings = 1 << 20;
  } else {
    std::fprintf(stderr, "defkv-bench: unknown shape %s\n", name.c_str());
    std::exit(2);
  }
  c.rms_norm_eps = 1e-5;
  return c;
}

void Sync(const at::Device& d) {
  if (d.is_cuda()) defkv::kernels::SynchronizeDevice();
}

void ResetPeak(const at::Device& d) {
#ifdef DEFKV_WITH_CUDA
  if (d.is_cuda()) c10::cuda::CUDACachingAllocator::resetPeakStats(d.index() < 0 ? 0 : d.index());
#endif
}

int64_t PeakBytes(const at::Device& d) {
#ifdef DEFKV_WITH_CUDA
  if (d.is_cuda()) {
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(d.index() < 0 ? 0 : d.index());
    return stats.allocated_bytes[0].peak;  // aggregate pool
  }
#endif
  return -1;
}

// Returns cached, unused device memory (a batched run's pool is large; the next one needs room).
void EmptyCache(const at::Device& d) {
#ifdef DEFKV_WITH_CUDA
  if (d.is_cuda()) c10::cuda::CUDACachingAllocator::emptyCache();
#endif
}

double Seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

// Bytes read + written per second by a device-to-device copy of 2 GiB (best of 5).
double CopyBandwidth(const at::Device& d) {
  auto src = at::empty({int64_t{1} << 30}, at::TensorOptions().dtype(at::kShort).device(d));
  auto dst = at::empty_like(src);
  double best = 1e30;
  for (int i = 0; i < 6; ++i) {
    Sync(d);
    auto t = Clock::now();
    dst.copy_(src);
    Sync(d);
    if (i > 0) best = std::min(best, Seconds(t, Clock::now()));
  }
  return 2.0 * src.numel() * 2 / best;
}

struct Row {
  std::string shape, press;
  int64_t context = 0;
  double ratio = 0, prefill_s = 0, compression_s = 0, ttft_s = 0, decode_ms = 0;
  int64_t kv_bytes = 0, peak_bytes = 0;
  double roofline = 0;
};

Row RunOne(const defkv::model::Transformer& m, const std::string& shape, int64_t ctx, const std::string& press_name,
           double ratio, int steps, int64_t chunk, double bw, bool graphs) {
  Row r{shape, press_name, ctx, ratio};
  const at::Device dev = m.device();
  const auto& cfg = m.config();
  at::InferenceMode guard;
  ResetPeak(dev);
  // With graphs: a pool with room for the full-size cache (prefill holds it before compaction).
  std::unique_ptr<defkv::cache::KvPool> pool;
  if (graphs)
    pool = std::make_unique<defkv::cache::KvPool>(cfg.num_layers * cfg.num_kv_heads * (ctx + steps + 1), cfg.head_dim,
                                                  m.dtype(), dev);
  auto cache = m.NewCache(pool.get());
  cache->Reserve(ctx + steps + 1);
  auto press = defkv::press::MakePress(press_name, {});
  if (!press.ok()) {
    std::fprintf(stderr, "defkv-bench: %s\n", std::string(press.status().message()).c_str());
    std::exit(2);
  }
  std::unique_ptr<defkv::engine::Compressor> comp;
  if (*press && ratio > 0) comp = std::make_unique<defkv::engine::Compressor>(m, *cache, **press, ratio, ctx, steps + 1);
  auto lopts = at::TensorOptions().dtype(at::kLong).device(dev);
  at::Tensor ids = at::randint(0, cfg.vocab_size, {ctx}, lopts);

  Sync(dev);
  const auto t0 = Clock::now();
  // Layer-major, as the generator prefills: a layer is compacted before the next is written.
  defkv::model::LayerMajorPrefill prefill(m, ids, 0, chunk, *cache, comp.get());
  prefill.Step(std::numeric_limits<int64_t>::max());
  at::Tensor logits = prefill.Logits();
  if (comp) comp->Finish();
  at::Tensor next = logits[0].argmax().view({1});
  Sync(dev);
  const auto t1 = Clock::now();
  r.compression_s = comp ? comp->scoring_seconds() + comp->compaction_seconds() : 0;
  r.prefill_s = Seconds(t0, t1) - r.compression_s;
  r.ttft_s = Seconds(t0, t1);
  r.kv_bytes = cache->bytes_used();

  // One untimed step (allocator warm-up; with graphs, the capture), then the timed ones.
  int64_t pos = ctx;
  std::function<void()> step;
  if (graphs) {
    // As the server steps: the token comes to the host after each step (it is streamed).
    const std::vector<defkv::cache::KvCache*> caches = {cache.get()};
    int64_t token = next.item<int64_t>();
    step = [&, caches] {
      logits = m.ForwardBatch(at::full({1}, token, at::kLong), at::full({1}, pos++, at::kLong), caches);
      token = logits[0].argmax().item<int64_t>();
    };
  } else {
    step = [&] {
      logits = m.Forward(next, at::full({1}, pos++, lopts), *cache);
      next = logits[0].argmax().view({1});
    };
  }
  step();
  Sync(dev);
  const auto t2 = Clock::now();
  for (int i = 0; i < steps; ++i) step();
  Sync(dev);
  r.decode_ms = 1e3 * Seconds(t2, Clock::now()) / steps;
  r.peak_bytes = PeakBytes(dev);
  const double bytes_read = static_cast<double>(m.weight_bytes()) + static_cast<double>(cache->bytes_used());
  r.roofline = bw > 0 ? (r.decode_ms / 1e3) / (bytes_read / bw) : 0;
  return r;
}

struct BatchRow {
  int64_t tokens = 0, batch = 0;
  double step_ms = 0, kv_bytes = 0, roofline = 0;
  double attention_ms = 0;  // the step's attention alone (append + flash, every layer)
};

// Decode steps of `batch` sequences whose caches hold `tokens` random entries per (layer, head),
// from one pool, through ForwardBatch as the server calls it (tokens to the host after each step).
BatchRow RunBatched(const defkv::model::Transformer& m, int64_t tokens, int64_t batch, int steps, double bw) {
  const auto& cfg = m.config();
  at::InferenceMode guard;
  BatchRow r{tokens, batch};
  const int64_t room = tokens + steps + 4;
  defkv::cache::KvPool pool(batch * cfg.num_layers * cfg.num_kv_heads * room, cfg.head_dim, m.dtype(), m.device());
  auto opts = at::TensorOptions().dtype(m.dtype()).device(m.device());
  const at::Tensor k = at::randn({cfg.num_kv_heads, tokens, cfg.head_dim}, opts), v = at::randn_like(k);
  std::vector<std::unique_ptr<defkv::cache::HeadwiseCache>> caches;
  std::vector<defkv::cache::KvCache*> ptrs;
  for (int64_t b = 0; b < batch; ++b) {
    caches.push_back(m.NewCache(&pool));
    caches.back()->Reserve(room);
    for (int64_t l = 0; l < cfg.num_layers; ++l) caches.back()->Append(l, k, v);
    ptrs.push_back(caches.back().get());
  }
  at::Tensor ids = at::randint(0, cfg.vocab_size, {batch}, at::kLong), pos = at::full({batch}, tokens, at::kLong);
  auto step = [&] {
    ids = m.ForwardBatch(ids, pos, ptrs).argmax(-1).to(at::kCPU);
    pos += 1;
  };
  step();  // warm-up (and the graph capture)
  step();
  Sync(m.device());
  const auto t0 = Clock::now();
  for (int i = 0; i < steps; ++i) step();
  r.step_ms = 1e3 * Seconds(t0, Clock::now()) / steps;
  for (auto& c : caches) r.kv_bytes += static_cast<double>(c->bytes_used());
  // The attention part of one more step, alone: append + flash for every layer, repeated
  // (CUDA, half precision: the pooled path).
  if (!caches[0]->batchable()) return r;
  std::vector<defkv::cache::HeadwiseCache*> hc;
  for (auto& c : caches) hc.push_back(c.get());
  auto plan = defkv::cache::HeadwiseCache::PlanBatch(hc, ids, pos);
  const auto dev = defkv::cache::HeadwiseCache::SliceUploaded(plan.host.to(m.device()), batch, plan.segments,
                                                              plan.max_k, cfg.num_layers);
  at::Tensor q = at::randn({batch, cfg.num_heads, cfg.head_dim}, opts);
  at::Tensor kn = at::randn({batch, cfg.num_kv_heads, cfg.head_dim}, opts), vn = at::randn_like(kn);
  const double scale = 1.0 / std::sqrt(static_cast<double>(cfg.head_dim));
  auto attend_all = [&] {
    for (int64_t l = 0; l < cfg.num_layers; ++l)
      defkv::cache::HeadwiseCache::AttendPlanned(pool, dev, l, q, kn, vn, scale);
  };
  attend_all();
  Sync(m.device());
  const auto t1 = Clock::now();
  for (int i = 0; i < 10; ++i) attend_all();
  Sync(m.device());
  r.attention_ms = 1e3 * Seconds(t1, Clock::now()) / 10;
  r.roofline = bw > 0 ? (r.step_ms / 1e3) / ((static_cast<double>(m.weight_bytes()) + r.kv_bytes) / bw) : 0;
  return r;
}


// The attention of one decode step over `segments` segments of one pool (lengths drawn from
// [tokens / 2, tokens], bound `tokens`), through the varlen flash call and through the split-KV
// kernel under each tuning. Each variant is captured as a CUDA graph of 20 calls and replayed,
// so launch gaps count as they do in the server's decode graphs. Milliseconds per call.
struct SweepRow {
  int64_t segments = 0, tokens = 0;
  double kv_bytes = 0, flash_ms = 0;
  std::vector<double> kernel_ms;
};

#ifdef DEFKV_WITH_CUDA
double GraphMs(const std::function<void()>& call, const at::Device& dev) {
  constexpr int kCalls = 20, kReplays = 5;
  c10::cuda::CUDAStreamGuard side(c10::cuda::getStreamFromPool(false, dev.index() < 0 ? 0 : dev.index()));
  call();  // eager warm-up (allocations, flash's first-call set-up)
  Sync(dev);
  at::cuda::CUDAGraph graph;
  graph.capture_begin();
  for (int i = 0; i < kCalls; ++i) call();
  graph.capture_end();
  graph.replay();
  Sync(dev);
  const auto t = Clock::now();
  for (int i = 0; i < kReplays; ++i) graph.replay();
  Sync(dev);
  return 1e3 * Seconds(t, Clock::now()) / (kCalls * kReplays);
}

SweepRow SweepOne(const ModelConfig& cfg, at::ScalarType dtype, const at::Device& dev, int64_t segments, int64_t tokens,
                  const std::vector<std::pair<int64_t, int64_t>>& tunings) {
  at::InferenceMode guard;
  const int64_t d = cfg.head_dim, group = cfg.num_heads / cfg.num_kv_heads;
  SweepRow r{segments, tokens};
  std::mt19937_64 rng(segments * 1000003 + tokens);
  std::vector<int32_t> start(segments), len(segments), cu(segments + 1);
  int64_t rows = 0;
  for (int64_t j = 0; j < segments; ++j) {
    start[j] = cu[j] = static_cast<int32_t>(rows);
    len[j] = static_cast<int32_t>(tokens / 2 + static_cast<int64_t>(rng() % static_cast<uint64_t>(tokens / 2 + 1)));
    rows += len[j];
  }
  cu[segments] = static_cast<int32_t>(rows);
  auto opts = at::TensorOptions().dtype(dtype).device(dev);
  const auto i32 = at::TensorOptions().dtype(at::kInt);
  at::Tensor k_pool = at::randn({rows, d}, opts), v_pool = at::randn({rows, d}, opts);
  at::Tensor q = at::randn({segments, group, d}, opts);
  at::Tensor seg_start = at::from_blob(start.data(), {segments}, i32).to(dev);
  at::Tensor seg_len = at::from_blob(len.data(), {segments}, i32).to(dev);
  at::Tensor cu_k = at::from_blob(cu.data(), {segments + 1}, i32).to(dev);
  at::Tensor cu_q = at::arange(0, segments + 1, i32.device(dev));
  r.kv_bytes = 2.0 * static_cast<double>(rows * d) * static_cast<double>(k_pool.element_size());
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  r.flash_ms = GraphMs(
      [&] {
        at::_flash_attention_forward(q, k_pool.view({-1, 1, d}), v_pool.view({-1, 1, d}), cu_q, cu_k, 1, tokens, 0.0,
                                     false, false, scale, std::nullopt, std::nullopt, seg_len);
      },
      dev);
  const bool was_on = defkv::model::DecodeKernelEnabled();
  defkv::model::SetDecodeKernel(true);
  for (const auto& [min_chunk, blocks] : tunings) {
    defkv::model::SetDecodeAttentionTuning(min_chunk, blocks);
    r.kernel_ms.push_back(GraphMs(
        [&] {
          TORCH_CHECK(defkv::model::FusedDecodeAttention(q, 1, k_pool, v_pool, seg_start, seg_len, tokens, scale)
                          .defined(),
                      "the decode kernel does not cover this shape");
        },
        dev));
  }
  defkv::model::SetDecodeAttentionTuning(0, 0);
  defkv::model::SetDecodeKernel(was_on);
  return r;
}
#endif


// --compress-profile: what compressing one layer costs, part by part, on random keys, values and
// window rows of a `ctx`-token context (ms per call, the mean of 5 after one warm-up).
void CompressProfile(const defkv::model::Transformer& m, const std::string& shape, int64_t ctx, bool json) {
  namespace press = defkv::press;
  const auto& cfg = m.config();
  const at::Device dev = m.device();
  at::InferenceMode guard;
  auto opts = at::TensorOptions().dtype(m.dtype()).device(dev);
  const at::Tensor k = at::randn({cfg.num_kv_heads, ctx, cfg.head_dim}, opts), v = at::randn_like(k);
  const auto fresh_cache = [&] {
    auto c = m.NewCache();
    c->Reserve(ctx + 64);
    c->Append(0, k, v);
    return c;
  };
  auto cache = fresh_cache();
  press::LayerInputs in;
  in.layer = 0;
  in.model = &m;
  in.keys = cache->keys(0);
  in.values = cache->values(0);
  in.hidden = at::randn({32, cfg.hidden_size}, opts);
  in.compression_ratio = 0.8;
  const int64_t window = 32, kernel = 5, n = ctx - window, n_kept = press::NKept(ctx, 0.8);
  const auto time_ms = [&](const std::function<void()>& fn) {
    fn();
    Sync(dev);
    const auto t = Clock::now();
    for (int i = 0; i < 5; ++i) fn();
    Sync(dev);
    return 1e3 * Seconds(t, Clock::now()) / 5;
  };
  const at::Tensor scores = at::rand({cfg.num_kv_heads, ctx}, opts.dtype(at::kFloat));
  const at::Tensor attn = press::WindowAttention(in, window);
  std::vector<std::pair<std::string, double>> parts;
  parts.emplace_back("window attention", time_ms([&] { press::WindowAttention(in, window); }));
  parts.emplace_back("avg pool + group mean",
                     time_ms([&] { press::GroupMean(press::AvgPool(attn.mean(1), kernel), cfg.num_kv_heads); }));
  parts.emplace_back("defensive aggregate",
                     time_ms([&] { press::defensive::DefensiveAggregate(attn, cfg.num_kv_heads, kernel); }));
  parts.emplace_back("projected value norm", time_ms([&] { press::ProjectedValueNorm(in, n); }));
  const at::Tensor abar = press::GroupMean(attn.mean(1), cfg.num_kv_heads);
  parts.emplace_back("stage-1 protection", time_ms([&] { press::defensive::StageOneProtected(abar, 0.9, 0.0, n_kept); }));
  parts.emplace_back("top-k per head", time_ms([&] { press::TopKPerHead(scores, n_kept); }));
  parts.emplace_back("flat top-k", time_ms([&] { press::FlatTopK(scores, cfg.num_kv_heads * n_kept); }));
  parts.emplace_back("defensive layer scores",
                     time_ms([&] { press::defensive::LayerScores(in, window, kernel, 0.9); }));
  for (const char* name : {"snapkv", "adakv", "defensivekv"}) {
    auto p = press::MakePress(name, {});
    parts.emplace_back(std::string(name) + " CompressLayer", time_ms([&] { (*p)->CompressLayer(in); }));
  }
  const press::HeadSelection sel = press::TopKPerHead(scores, n_kept);
  double compact_ms = 0;
  for (int i = 0; i < 3; ++i) {
    auto c = fresh_cache();
    Sync(dev);
    const auto t = Clock::now();
    c->Compact(0, sel, 64);
    Sync(dev);
    compact_ms += 1e3 * Seconds(t, Clock::now()) / 3;
  }
  parts.emplace_back("compaction", compact_ms);
  for (const auto& [what, ms] : parts) {
    if (json) {
      nlohmann::json j = {{"mode", "compress_profile"}, {"shape", shape}, {"context", ctx}, {"part", what}, {"ms", ms}};
      std::printf("%s\n", j.dump().c_str());
    } else {
      std::printf("%-12s %7lld %-28s %9.3f\n", shape.c_str(), static_cast<long long>(ctx), what.c_str(), ms);
    }
  }
  std::fflush(stdout);
}

// --attn-sweep: the table of SweepOne rows for every shape.
int AttentionSweep(std::map<std::string, std::string>& a, const at::Device& dev, at::ScalarType dtype, double bw,
                   bool json) {
#ifdef DEFKV_WITH_CUDA
  if (!dev.is_cuda() || dtype == at::kFloat) {
    std::fprintf(stderr, "defkv-bench: --attn-sweep needs --device cuda and a half-precision --dtype\n");
    return 2;
  }
  const auto pairs = [](const std::string& list, char sep, const char* what) {
    std::vector<std::pair<int64_t, int64_t>> out;
    for (const auto& item : Split(list)) {
      const auto x = item.find(sep);
      if (x == std::string::npos) {
        std::fprintf(stderr, "defkv-bench: %s takes A%cB items, not %s\n", what, sep, item.c_str());
        std::exit(2);
      }
      out.emplace_back(std::stoll(item.substr(0, x)), std::stoll(item.substr(x + 1)));
    }
    return out;
  };
  std::string grid_spec = a["--attn-sweep"];
  if (grid_spec == "default") {
    grid_spec.clear();
    for (int64_t s : {8, 32, 128, 256, 512, 1024})
      for (int64_t t : {512, 2048, 6618, 16384, 32768}) grid_spec += std::to_string(s) + "x" + std::to_string(t) + ",";
  }
  const auto grid = pairs(grid_spec, 'x', "--attn-sweep");
  const auto tunings = pairs(a["--attn-tunings"], ':', "--attn-tunings");
  for (const auto& shape : Split(a["--shapes"])) {
    const ModelConfig cfg = Shape(shape);
    if (!json) {
      std::printf("\ndecode attention alone (%s: G %lld, D %lld), ms per call and GB/s of K+V read\n", shape.c_str(),
                  static_cast<long long>(cfg.num_heads / cfg.num_kv_heads), static_cast<long long>(cfg.head_dim));
      std::printf("%8s %7s %8s %15s", "segments", "tokens", "kv_GB", "flash");
      for (const auto& [c, b] : tunings) std::printf(" %15s", ("kernel " + std::to_string(c) + ":" + std::to_string(b)).c_str());
      std::printf("\n");
    }
    for (const auto& [segments, tokens] : grid) {
      // Room: the pool (at most TOKENS rows per segment) beside what is already allocated.
      if (2.0 * segments * tokens * cfg.head_dim * 2 > 40e9) continue;
      EmptyCache(dev);
      const SweepRow r = SweepOne(cfg, dtype, dev, segments, tokens, tunings);
      const auto rate = [&](double ms) { return r.kv_bytes / (ms * 1e-3) / 1e9; };
      if (json) {
        nlohmann::json j = {{"mode", "attention"}, {"shape", shape}, {"segments", r.segments}, {"tokens", r.tokens},
                            {"kv_bytes", r.kv_bytes}, {"flash_ms", r.flash_ms}, {"copy_bandwidth", bw}};
        for (size_t i = 0; i < tunings.size(); ++i)
          j["kernel_ms"][std::to_string(tunings[i].first) + ":" + std::to_string(tunings[i].second)] = r.kernel_ms[i];
        std::printf("%s\n", j.dump().c_str());
      } else {
        std::printf("%8lld %7lld %8.3f %7.3f (%5.0f)", static_cast<long long>(r.segments),
                    static_cast<long long>(r.tokens), r.kv_bytes / 1e9, r.flash_ms, rate(r.flash_ms));
        for (double ms : r.kernel_ms) std::printf(" %7.3f (%5.0f)", ms, rate(ms));
        std::printf("\n");
      }
      std::fflush(stdout);
    }
  }
  return 0;
#else
  (void)a, (void)dev, (void)dtype, (void)bw, (void)json;
  std::fprintf(stderr, "defkv-bench: --attn-sweep needs a CUDA build\n");
  return 2;
#endif
}

// --gemv-sweep: for every shape, its five projections over each row count, through at::linear
// and through FusedLinear (the GEMV kernel), each captured by GraphMs. A call reads one of
// `copies` copies of the weight in turn, enough that the copies a graph cycles through (at least
// 256 MB) flush the L2 between two reads of one copy, as a decode step's layers do.
int GemvSweep(std::map<std::string, std::string>& a, const at::Device& dev, at::ScalarType dtype, double bw,
              bool json) {
#ifdef DEFKV_WITH_CUDA
  if (!dev.is_cuda() || dtype == at::kFloat) {
    std::fprintf(stderr, "defkv-bench: --gemv-sweep needs --device cuda and a half-precision --dtype\n");
    return 2;
  }
  std::vector<int64_t> row_counts;
  for (const auto& r : Split(a["--gemv-rows"])) {
    row_counts.push_back(std::stoll(r));
    if (row_counts.back() < 1 || row_counts.back() > 8) {
      std::fprintf(stderr, "defkv-bench: --gemv-rows takes 1 to 8 rows, not %s\n", r.c_str());
      return 2;
    }
  }
  at::InferenceMode guard;
  const bool fused_was = defkv::model::FusedKernelsEnabled(), gemv_was = defkv::model::GemvKernelEnabled();
  defkv::model::SetFusedKernels(true);
  defkv::model::SetGemvKernel(true);
  const auto opts = at::TensorOptions().dtype(dtype).device(dev);
  for (const auto& shape : Split(a["--shapes"])) {
    const ModelConfig c = Shape(shape);
    struct Projection {
      const char* name;
      int64_t n, k;
      bool bias;
    };
    const int64_t d = c.head_dim;
    const Projection projections[] = {{"qkv", (c.num_heads + 2 * c.num_kv_heads) * d, c.hidden_size, c.qkv_bias},
                                      {"o", c.hidden_size, c.num_heads * d, c.o_bias},
                                      {"gate_up", 2 * c.intermediate_size, c.hidden_size, c.mlp_bias},
                                      {"down", c.hidden_size, c.intermediate_size, c.mlp_bias},
                                      {"lm_head", c.vocab_size, c.hidden_size, false}};
    if (!json) {
      std::printf("\ndecode weight GEMVs alone (%s), ms per call and GB/s of weight read; kernel/copy: the kernel's "
                  "GB/s over the copy bandwidth (read + write)\n%-8s %6s %6s %4s %9s %16s %16s %7s %11s %9s\n",
                  shape.c_str(), "proj", "N", "K", "M", "weight_MB", "cublas", "kernel", "speedup", "kernel/copy",
                  "rel_err");
    }
    for (const Projection& p : projections) {
      const double bytes = static_cast<double>(p.n * p.k) * static_cast<double>(c10::elementSize(dtype));
      const int64_t copies = std::clamp<int64_t>(static_cast<int64_t>(std::ceil(256e6 / bytes)), 1, 20);
      EmptyCache(dev);
      std::vector<at::Tensor> weights;
      for (int64_t i = 0; i < copies; ++i) weights.push_back(at::randn({p.n, p.k}, opts) * 0.02);
      const at::Tensor b = p.bias ? at::randn({p.n}, opts) * 0.02 : at::Tensor();
      for (int64_t m : row_counts) {
        const at::Tensor x = at::randn({m, p.k}, opts);
        size_t next = 0;
        const double cublas_ms = GraphMs([&] { at::linear(x, weights[next++ % weights.size()], b); }, dev);
        next = 0;
        const double kernel_ms = GraphMs(
            [&] {
              TORCH_CHECK(defkv::model::FusedLinear(x, weights[next++ % weights.size()], b).defined(),
                          "the GEMV kernel does not cover this shape");
            },
            dev);
        const at::Tensor ref = at::linear(x, weights[0], b).to(at::kFloat);
        const double rel_err =
            (defkv::model::FusedLinear(x, weights[0], b).to(at::kFloat) - ref).norm().item<double>() /
            ref.norm().item<double>();
        const auto rate = [&](double ms) { return bytes / (ms * 1e-3) / 1e9; };
        if (json) {
          nlohmann::json j = {{"mode", "gemv"}, {"shape", shape}, {"proj", p.name}, {"n", p.n}, {"k", p.k},
                              {"rows", m}, {"bias", p.bias}, {"weight_bytes", bytes}, {"cublas_ms", cublas_ms},
                              {"kernel_ms", kernel_ms}, {"copy_bandwidth", bw}, {"rel_err", rel_err}};
          std::printf("%s\n", j.dump().c_str());
        } else {
          std::printf("%-8s %6lld %6lld %4lld %9.1f %7.4f (%6.0f) %7.4f (%6.0f) %6.2fx %11.2f %9.2e\n", p.name,
                      static_cast<long long>(p.n), static_cast<long long>(p.k), static_cast<long long>(m), bytes / 1e6,
                      cublas_ms, rate(cublas_ms), kernel_ms, rate(kernel_ms), cublas_ms / kernel_ms,
                      rate(kernel_ms) * 1e9 / bw, rel_err);
        }
        std::fflush(stdout);
      }
    }
  }
  defkv::model::SetFusedKernels(fused_was);
  defkv::model::SetGemvKernel(gemv_was);
  return 0;
#else
  (void)a, (void)dev, (void)dtype, (void)bw, (void)json;
  std::fprintf(stderr, "defkv-bench: --gemv-sweep needs a CUDA build\n");
  return 2;
#endif
}

}  // namespace

int main(int argc, char** argv) {
  std::map<std::string, std::string> a = {{"--shapes", "llama3.1-8b"},
                                          {"--contexts", "4096,16384,32768,131072"},
                                          {"--ratios", "0,0.5,0.8"},
                                          {"--presses", "snapkv,adakv,defensivekv,layer_defensivekv"},
                                          {"--decode-steps", "32"},
                                          {"--prefill-chunk", "8192"},
                                          {"--device", "cuda"},
                                          {"--dtype", "bfloat16"},
                                          {"--graphs", "on"},
                                          {"--batch-decode", ""},
                                          {"--attn-sweep", ""},
                                          {"--attn-tunings", "128:64,256:16"},
                                          {"--gemv-rows", "1,4"}};
  bool compress_profile = false, gemv_sweep = false;
  bool json = false;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    if (k == "-h" || k == "--help") {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (k == "--json") {
      json = true;
      continue;
    }
    if (k == "--compress-profile") {
      compress_profile = true;
      continue;
    }
    if (k == "--gemv-sweep") {
      gemv_sweep = true;
      continue;
    }
    if (!a.count(k) || i + 1 >= argc) {
      std::fprintf(stderr, "defkv-bench: bad option %s (see --help)\n", k.c_str());
      return 2;
    }
    a[k] = argv[++i];
  }
  at::Device dev(a["--device"]);
  const at::ScalarType dtype = a["--dtype"] == "float32" ? at::kFloat : a["--dtype"] == "float16" ? at::kHalf : at::kBFloat16;
  const int steps = std::stoi(a["--decode-steps"]);
  const int64_t chunk = std::stoll(a["--prefill-chunk"]);
  if (a["--graphs"] != "on" && a["--graphs"] != "off") {
    std::fprintf(stderr, "defkv-bench: --graphs takes on or off\n");
    return 2;
  }
  const bool graphs = a["--graphs"] == "on" && dev.is_cuda() && dtype != at::kFloat;
  const double bw = dev.is_cuda() ? CopyBandwidth(dev) : 0;
  if (!json) {
    std::printf("device %s, copy bandwidth %.0f GB/s (read + write), decode graphs %s, dependent launch %s\n",
                dev.str().c_str(), bw / 1e9, graphs ? "on" : "off",
                dev.is_cuda() && defkv::model::DependentLaunchEnabled() ? "on" : "off");
  }
  if (!json && !compress_profile && !gemv_sweep && a["--attn-sweep"].empty()) {
    std::printf("%-12s %7s %-18s %5s %10s %10s %6s %9s %10s %9s %9s %8s\n", "shape", "context", "press", "ratio",
                "prefill_s", "compress_s", "share", "ttft_s", "decode_ms", "kv_GB", "peak_GB", "roofline");
  }
  if (!a["--attn-sweep"].empty()) return AttentionSweep(a, dev, dtype, bw, json);
  if (gemv_sweep) return GemvSweep(a, dev, dtype, bw, json);
  for (const auto& shape : Split(a["--shapes"])) {
    defkv::model::LoadOptions lo;
    lo.device = dev;
    lo.dtype = dtype;
    auto m = defkv::model::Transformer::Random(Shape(shape), lo, 0);
    if (!m.ok()) {
      std::fprintf(stderr, "defkv-bench: %s\n", std::string(m.status().message()).c_str());
      return 1;
    }
    if (graphs && !(*m)->EnableDecodeGraphs(256)) {
      std::fprintf(stderr, "defkv-bench: this build cannot capture CUDA graphs (run with --graphs off)\n");
      return 1;
    }
    if (compress_profile) {
      if (!json) std::printf("\ncompressing one layer, part by part (ms per call)\n");
      for (const auto& ctx_s : Split(a["--contexts"])) CompressProfile(**m, shape, std::stoll(ctx_s), json);
      continue;
    }
    // Warm-up (cuBLAS handles, flash-attention and allocator pools), not reported.
    RunOne(**m, shape, 1024, "defensivekv", 0.5, 2, chunk, bw, graphs);
    for (const auto& ctx_s : Split(a["--contexts"])) {
      const int64_t ctx = std::stoll(ctx_s);
      for (const auto& ratio_s : Split(a["--ratios"])) {
        const double ratio = std::stod(ratio_s);
        std::vector<std::string> presses = ratio > 0 ? Split(a["--presses"]) : std::vector<std::string>{"none"};
        for (const auto& p : presses) {
          Row r = RunOne(**m, shape, ctx, p, ratio, steps, chunk, bw, graphs);
          if (json) {
            nlohmann::json j = {{"shape", r.shape}, {"context", r.context}, {"press", r.press}, {"ratio", r.ratio},
                                {"prefill_s", r.prefill_s}, {"compression_s", r.compression_s},
                                {"compression_share", r.prefill_s > 0 ? r.compression_s / r.prefill_s : 0},
                                {"ttft_s", r.ttft_s}, {"decode_ms_per_token", r.decode_ms}, {"kv_bytes", r.kv_bytes},
                                {"peak_bytes", r.peak_bytes}, {"weight_bytes", (*m)->weight_bytes()},
                                {"copy_bandwidth", bw}, {"roofline_ratio", r.roofline}, {"graphs", graphs}};
            std::printf("%s\n", j.dump().c_str());
          } else {
            std::printf("%-12s %7lld %-18s %5.2f %10.3f %10.3f %5.1f%% %9.3f %10.3f %9.3f %9.2f %8.2f\n", r.shape.c_str(),
                        static_cast<long long>(r.context), r.press.c_str(), r.ratio, r.prefill_s, r.compression_s,
                        r.prefill_s > 0 ? 100 * r.compression_s / r.prefill_s : 0.0, r.ttft_s, r.decode_ms,
                        r.kv_bytes / 1e9, r.peak_bytes < 0 ? 0.0 : r.peak_bytes / 1e9, r.roofline);
          }
          std::fflush(stdout);
        }
      }
    }
    if (a["--batch-decode"].empty()) continue;
    if (!json)
      std::printf("\nbatched decode (%s, synthetic caches, one pool)\n%-12s %8s %6s %9s %12s %9s %8s %8s\n",
                  shape.c_str(), "shape", "tokens", "batch", "step_ms", "tokens_per_s", "kv_GB", "roofline", "attn_ms");
    for (const auto& spec : Split(a["--batch-decode"])) {
      const auto x = spec.find('x');
      if (x == std::string::npos) {
        std::fprintf(stderr, "defkv-bench: --batch-decode takes TOKENSxB items, not %s\n", spec.c_str());
        return 2;
      }
      EmptyCache(dev);
      BatchRow r = RunBatched(**m, std::stoll(spec.substr(0, x)), std::stoll(spec.substr(x + 1)), steps, bw);
      const double tps = r.batch * 1e3 / r.step_ms;
      if (json) {
        nlohmann::json j = {{"mode", "batched"}, {"shape", shape}, {"tokens", r.tokens}, {"batch", r.batch},
                            {"step_ms", r.step_ms}, {"tokens_per_s", tps}, {"kv_bytes", r.kv_bytes},
                            {"weight_bytes", (*m)->weight_bytes()}, {"copy_bandwidth", bw},
                            {"roofline_ratio", r.roofline}, {"attention_ms", r.attention_ms}, {"graphs", graphs}};
        std::printf("%s\n", j.dump().c_str());
      } else {
        std::printf("%-12s %8lld %6lld %9.2f %12.0f %9.2f %8.2f %8.2f\n", shape.c_str(),
                    static_cast<long long>(r.tokens), static_cast<long long>(r.batch), r.step_ms, tps, r.kv_bytes / 1e9,
                    r.roofline, r.attention_ms);
      }
      std::fflush(stdout);
    }
  }
  return 0;
}
