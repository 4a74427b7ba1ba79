#include "core/engine/generator.h"

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <thread>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/engine/compressor.h"
#include "core/engine/prompt.h"
#include "core/engine/sampler.h"
#include "core/model/transformer.h"
#include "core/press/registry.h"
#include "core/tokenizer/chat_template.h"
#include "core/tokenizer/tokenizer.h"
#include "kernels/device_info.h"

namespace defkv::engine {
namespace {

using Clock = std::chrono::steady_clock;
double Seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

// Bytes a new allocation can take on `device` now: MemAvailable on the host, the CUDA free
// memory on a GPU; -1 when unknown.
int64_t AvailableMemory(const at::Device& device) {
  if (device.is_cuda()) return kernels::FreeDeviceMemory(device.index() < 0 ? 0 : device.index());
  std::ifstream in("/proc/meminfo");
  std::string key, unit;
  int64_t kib = 0;
  while (in >> key >> kib >> unit)
    if (key == "MemAvailable:") return kib * 1024;
  return -1;
}

absl::StatusOr<at::Device> ParseDevice(const std::string& s) {
  try {
    at::Device d(s);
    if (d.is_cuda() && !at::hasCUDA()) return absl::FailedPreconditionError(absl::StrCat("device \"", s, "\": this build or machine has no CUDA"));
    if (!d.is_cpu() && !d.is_cuda()) return absl::InvalidArgumentError(absl::StrCat("device \"", s, "\" is not cpu or cuda[:N]"));
    return d;
  } catch (const std::exception&) {
    return absl::InvalidArgumentError(absl::StrCat("device \"", s, "\" is not cpu or cuda[:N]"));
  }
}

absl::StatusOr<at::ScalarType> ParseDtype(const std::string& s) {
  if (s == "auto") return at::ScalarType::Undefined;
  if (s == "float32") return at::kFloat;
  if (s == "bfloat16") return at::kBFloat16;
  if (s == "float16") return at::kHalf;
  return absl::InvalidArgumentError(absl::StrCat("dtype \"", s, "\" is not auto, float32, bfloat16 or float16"));
}

// Length of the longest suffix of `text` that is a proper prefix of some stop string: that much
// must be held back from the stream until the next token decides it.
size_t StopHoldback(std::string_view text, const std::vector<std::string>& stops) {
  size_t hold = 0;
  for (const auto& s : stops)
    for (size_t n = std::min(s.size() - 1, text.size()); n > hold; --n)
      if (text.substr(text.size() - n) == std::string_view(s).substr(0, n)) {
        hold = n;
        break;
      }
  return hold;
}

}  // namespace

const char* FinishReasonName(FinishReason r) {
  switch (r) {
    case FinishReason::kEos: return "stop";
    case FinishReason::kStopString: return "stop_string";
    case FinishReason::kLength: return "length";
    case FinishReason::kCancelled: return "cancelled";
  }
  return "?";
}

struct Generator::Impl {
  EngineOptions options;
  std::unique_ptr<model::Transformer> model;
  std::unique_ptr<tok::Tokenizer> tokenizer;
  tok::ChatTemplate chat = tok::ChatTemplate::Plain();
  std::optional<int32_t> raw_bos;
  ModelInfo info;
  bool graphs = false;
  Generator::StepTiming last_step;
  std::unique_ptr<cache::KvPool> pool;  // declared after `model`: destroyed before it, after every cache
};

Generator::Generator(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Generator::~Generator() = default;

absl::StatusOr<std::unique_ptr<Generator>> Generator::Create(const EngineOptions& options) {
  const auto start = Clock::now();
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  auto device = ParseDevice(options.device);
  if (!device.ok()) return device.status();
  auto dtype = ParseDtype(options.dtype);
  if (!dtype.ok()) return dtype.status();
  if (options.prefill_chunk <= 0) return absl::InvalidArgumentError("prefill_chunk must be positive");
  if (options.prefill_step_tokens < 0)
    return absl::InvalidArgumentError("prefill_step_tokens must be 0 (one chunk through every layer) or positive");
  if (!std::filesystem::is_directory(options.model_dir))
    return absl::NotFoundError(absl::StrCat(options.model_dir, ": model directory does not exist"));
  if (options.threads > 0) at::set_num_threads(options.threads);
  else at::set_num_threads(static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));

  auto tokenizer = tok::Tokenizer::Load(options.model_dir);
  if (!tokenizer.ok()) return tokenizer.status();
  impl->tokenizer = std::move(*tokenizer);
  auto chat = tok::ChatTemplate::FromModelDir(options.model_dir);
  if (!chat.ok()) return chat.status();
  impl->chat = *chat;
  impl->raw_bos = RawPromptBos(options.model_dir, *impl->tokenizer);

  model::LoadOptions lo;
  lo.device = *device;
  lo.dtype = *dtype;
  lo.progress = options.load_progress;
  absl::StatusOr<std::unique_ptr<model::Transformer>> m;
  try {
    if (options.random_weights) {
      auto cfg = model::LoadModelConfig(options.model_dir);
      if (!cfg.ok()) return cfg.status();
      if (lo.dtype == at::ScalarType::Undefined) lo.dtype = device->is_cuda() ? at::kBFloat16 : at::kFloat;
      m = model::Transformer::Random(*cfg, lo, /*seed=*/0);
    } else {
      m = model::Transformer::Load(options.model_dir, lo);
    }
  } catch (const std::exception& e) {  // c10::Error (e.g. out of device memory) ends here
    return absl::InternalError(absl::StrCat(options.model_dir, ": loading the weights failed: ", e.what()));
  }
  if (!m.ok()) return m.status();
  impl->model = std::move(*m);
  if (options.cuda_graph_max_batch > 0) impl->graphs = impl->model->EnableDecodeGraphs(options.cuda_graph_max_batch);
  const auto& c = impl->model->config();
  if (impl->tokenizer->vocab_size() > c.vocab_size)
    return absl::InvalidArgumentError(absl::StrCat(options.model_dir, ": the tokenizer has ", impl->tokenizer->vocab_size(),
                                                   " tokens but config.json's vocab_size is ", c.vocab_size));

  ModelInfo& info = impl->info;
  info.model_dir = options.model_dir;
  info.model_type = c.model_type;
  info.dtype = std::string(c10::toString(impl->model->dtype()));
  info.device = impl->model->device().str();
  if (impl->model->device().is_cuda()) {
    // e.g. "cuda:0 (NVIDIA H200, sm_90, 140 GiB)"
    for (const auto& d : kernels::ListCudaDevices())
      if (d.index == impl->model->device().index() || (impl->model->device().index() < 0 && d.index == 0))
        info.device += absl::StrCat(" (", d.name, ", sm_", d.sm_major, d.sm_minor, ", ", d.total_memory >> 30, " GiB)");
  }
  info.tokenizer = impl->tokenizer->Describe();
  info.chat_template = impl->chat.name();
  info.num_layers = c.num_layers;
  info.num_heads = c.num_heads;
  info.num_kv_heads = c.num_kv_heads;
  info.head_dim = c.head_dim;
  info.hidden_size = c.hidden_size;
  info.vocab_size = c.vocab_size;
  info.max_context = c.max_position_embeddings;
  info.weight_bytes = impl->model->weight_bytes();
  info.load_seconds = Seconds(start, Clock::now());
  return std::unique_ptr<Generator>(new Generator(std::move(impl)));
}

const ModelInfo& Generator::info() const { return impl_->info; }

absl::StatusOr<PromptTokens> Generator::Tokenize(const GenerateRequest& request) const {
  PromptTokens out;
  const auto& tk = *impl_->tokenizer;
  if (request.raw_prompt) {
    if (impl_->raw_bos) out.context.push_back(*impl_->raw_bos);
    auto ids = tk.Encode(*request.raw_prompt);
    out.context.insert(out.context.end(), ids.begin(), ids.end());
  } else {
    PromptText text = RenderPrompt(request, impl_->chat, tk);
    out.context = tk.Encode(text.context);
    out.question = tk.Encode(text.question);
  }
  if (out.context.empty() && out.question.empty())
    return absl::InvalidArgumentError("the prompt is empty: give a context, a question or a raw prompt");
  return out;
}

struct Sequence::State {
  GenerateRequest request;
  TextCallback on_text;
  PromptTokens prompt;
  int64_t n_ctx = 0, n_q = 0;
  std::unique_ptr<press::Press> press;
  std::unique_ptr<cache::HeadwiseCache> cache;
  std::unique_ptr<Compressor> compressor;
  // The context's prefill, layer by layer, across PrefillSteps (holds its hidden states).
  std::unique_ptr<model::LayerMajorPrefill> ctx_prefill;
  std::optional<Sampler> sampler;
  std::optional<tok::IncrementalDecoder> decoder;
  GenerateResult result;
  Clock::time_point t0, t_tok, t_prefill;
  int64_t ctx_done = 0, q_done = 0;  // prompt tokens prefilled so far (the context: 0 or all of it)
  int64_t pos = 0;                   // position of the next token fed
  int64_t peak_bytes = 0;
  std::string text;          // everything decoded so far
  size_t streamed = 0;       // bytes of `text` handed to on_text
  size_t ids_streamed = 0;   // ids handed to on_text
  bool prefilled = false, done = false;
};

Sequence::Sequence(std::unique_ptr<State> state) : s_(std::move(state)) {}
Sequence::~Sequence() = default;
bool Sequence::prefilling() const { return !s_->done && !s_->prefilled; }
bool Sequence::done() const { return s_->done; }
int64_t Sequence::kv_bytes_reserved() const {
  const int64_t bytes = s_->cache ? s_->cache->bytes_reserved() : 0;
  // The cache allocates a layer when it is first written: until the prompt is in, count the
  // full-size peak promised at Start, so that admission never overcommits.
  return prefilling() ? std::max(bytes, s_->peak_bytes) : bytes;
}
int64_t Sequence::kv_bytes_peak() const { return s_->peak_bytes; }
int64_t Sequence::prompt_tokens() const { return s_->n_ctx + s_->n_q; }
int64_t Sequence::tokens_fed() const { return s_->pos; }
const GenerateResult& Sequence::result() const { return s_->result; }
GenerateResult Sequence::TakeResult() { return std::move(s_->result); }

namespace {

// Closes a sequence: final text, usage and timings; frees its cache.
void Finalize(Sequence::State& s, FinishReason reason) {
  if (s.done) return;
  GenerateResult& r = s.result;
  r.finish_reason = reason;
  if (reason == FinishReason::kEos && s.decoder) s.text += s.decoder->Flush();
  if (s.on_text && reason != FinishReason::kCancelled &&
      (s.text.size() > s.streamed || s.ids_streamed < r.token_ids.size())) {
    std::span<const int32_t> ids(r.token_ids.data() + s.ids_streamed, r.token_ids.size() - s.ids_streamed);
    s.on_text(std::string_view(s.text).substr(s.streamed), ids);
    s.streamed = s.text.size();
    s.ids_streamed = r.token_ids.size();
  }
  r.text = std::move(s.text);
  r.usage.generated_tokens = static_cast<int64_t>(r.token_ids.size());
  if (s.cache) {
    int64_t entries = 0;
    for (int64_t l = 0; l < static_cast<int64_t>(r.compression.kept.size()); ++l) entries += s.cache->entries(l);
    r.usage.kv_entries = entries;
    r.usage.kv_bytes = s.cache->bytes_used();
  }
  const auto t_end = Clock::now();
  if (s.prefilled) r.timings.decode = Seconds(s.t_prefill, t_end);
  r.timings.total = Seconds(s.t0, t_end);
  s.ctx_prefill.reset();
  s.compressor.reset();
  s.cache.reset();
  s.done = true;
}

// Samples the next token of `s` from `logits` ([vocab] fp32, any device), streams what is
// complete and closes the sequence when it ends (EOS, stop string, length, client gone).
void AcceptToken(Sequence::State& s, int32_t next, const std::vector<int64_t>& eos);

void SampleNext(Sequence::State& s, const at::Tensor& logits, const std::vector<int64_t>& eos) {
  at::Tensor row = logits.to(at::kCPU).contiguous();  // the sampler reads host memory
  AcceptToken(s, s.sampler->Next(row.data_ptr<float>(), row.numel()), eos);
}

// Appends the chosen token `next` to `s` (or ends it on EOS).
void AcceptToken(Sequence::State& s, int32_t next, const std::vector<int64_t>& eos) {
  GenerateResult& r = s.result;
  const GenerateRequest& req = s.request;
  if (r.token_ids.empty()) r.timings.first_token = Seconds(s.t0, Clock::now());
  if (std::find(eos.begin(), eos.end(), next) != eos.end()) return Finalize(s, FinishReason::kEos);
  r.token_ids.push_back(next);
  s.text += s.decoder->Push(next);
  const bool last = static_cast<int>(r.token_ids.size()) == req.max_new_tokens;
  if (last) s.text += s.decoder->Flush();
  size_t cut = std::string::npos;
  for (const auto& stop : req.stop) cut = std::min(cut, s.text.find(stop));
  const bool stopped = cut != std::string::npos;
  if (stopped) s.text.resize(cut);
  if (s.on_text) {
    const size_t ready = stopped ? s.text.size() : s.text.size() - StopHoldback(s.text, req.stop);
    if (ready > s.streamed) {
      std::span<const int32_t> ids(r.token_ids.data() + s.ids_streamed, r.token_ids.size() - s.ids_streamed);
      s.ids_streamed = r.token_ids.size();
      const bool go_on = s.on_text(std::string_view(s.text).substr(s.streamed, ready - s.streamed), ids);
      s.streamed = ready;
      if (!go_on) return Finalize(s, FinishReason::kCancelled);
    }
  }
  if (stopped) return Finalize(s, FinishReason::kStopString);
  if (last) return Finalize(s, FinishReason::kLength);
}

}  // namespace

void Sequence::Cancel() { Finalize(*s_, FinishReason::kCancelled); }

int64_t Generator::kv_bytes_per_token() const {
  const auto& c = impl_->model->config();
  return 2 * c.head_dim * static_cast<int64_t>(c10::elementSize(impl_->model->dtype())) * c.num_kv_heads *
         c.num_layers;
}

int64_t Generator::FreeMemoryBytes() const { return AvailableMemory(impl_->model->device()); }

absl::StatusOr<int64_t> Generator::CreateKvPool(int64_t bytes) {
  const auto& model = *impl_->model;
  const bool half = model.dtype() == at::kBFloat16 || model.dtype() == at::kHalf;
  if (!model.device().is_cuda() || !half) return 0;
  const auto& c = model.config();
  const int64_t row_bytes = 2 * c.head_dim * static_cast<int64_t>(c10::elementSize(model.dtype()));  // K and V
  const int64_t rows = std::min<int64_t>(bytes / row_bytes, std::numeric_limits<int32_t>::max() - 1);
  if (rows <= 0) return absl::InvalidArgumentError("the KV pool must hold at least one row");
  try {
    impl_->pool.reset();
    impl_->pool = std::make_unique<cache::KvPool>(rows, c.head_dim, model.dtype(), model.device());
  } catch (const std::exception& e) {
    return absl::ResourceExhaustedError(absl::StrCat("cannot allocate a KV pool of ", bytes, " bytes: ", e.what()));
  }
  return impl_->pool->bytes();
}

Generator::StepTiming Generator::last_decode_timing() const { return impl_->last_step; }
bool Generator::decode_graphs_enabled() const { return impl_->graphs; }
int64_t Generator::decode_graphs() const { return impl_->model->decode_graphs(); }

absl::StatusOr<std::unique_ptr<Sequence>> Generator::Start(const GenerateRequest& request, TextCallback on_text,
                                                           const PromptTokens* given) {
  if (request.max_new_tokens < 0) return absl::InvalidArgumentError("max_new_tokens must be >= 0");
  if (request.sampling.top_p <= 0.0 || request.sampling.top_p > 1.0)
    return absl::InvalidArgumentError("top_p must be in (0, 1]");
  if (request.sampling.top_k < 0) return absl::InvalidArgumentError("top_k must be >= 0");
  for (const auto& stop : request.stop)
    if (stop.empty()) return absl::InvalidArgumentError("stop strings must not be empty");
  if (auto st = press::CheckRatio(request.compression_ratio); !st.ok()) return st;
  auto press = press::MakePress(request.press, request.press_options);
  if (!press.ok()) return press.status();

  auto state = std::make_unique<Sequence::State>();
  Sequence::State& s = *state;
  s.t0 = Clock::now();
  s.request = request;
  s.on_text = std::move(on_text);
  // Ratio 0 takes the full-cache path whatever the press: nothing is scored or moved.
  if (*press != nullptr && request.compression_ratio > 0.0) s.press = std::move(*press);
  if (given != nullptr) {
    s.prompt = *given;
  } else {
    auto prompt = Tokenize(request);
    if (!prompt.ok()) return prompt.status();
    s.prompt = *std::move(prompt);
  }
  s.t_tok = Clock::now();
  GenerateResult& r = s.result;
  r.timings.tokenize = Seconds(s.t0, s.t_tok);

  const auto& model = *impl_->model;
  const auto& cfg = model.config();
  s.n_ctx = static_cast<int64_t>(s.prompt.context.size());
  s.n_q = static_cast<int64_t>(s.prompt.question.size());
  r.usage.context_tokens = s.n_ctx;
  r.usage.question_tokens = s.n_q;
  if (s.n_ctx + s.n_q + request.max_new_tokens > cfg.max_position_embeddings)
    return absl::OutOfRangeError(absl::StrCat("prompt (", s.n_ctx + s.n_q, " tokens) + max_new_tokens (",
                                              request.max_new_tokens, ") exceeds the model's context of ",
                                              cfg.max_position_embeddings, " tokens"));
  for (const auto* ids : {&s.prompt.context, &s.prompt.question})
    for (int32_t id : *ids)
      if (id < 0 || id >= cfg.vocab_size) return absl::InternalError("tokenizer produced an id outside the vocabulary");
  if (s.press)
    if (auto st = s.press->CheckContext(s.n_ctx); !st.ok()) return st;
  // Without compression the cache reaches full size (its layers are allocated as the prefill
  // first writes them): refuse up front what cannot fit, rather than failing mid-prefill (and
  // possibly starving the process).
  const int64_t tokens = s.n_ctx + s.n_q + request.max_new_tokens;
  s.peak_bytes = tokens * kv_bytes_per_token();
  if (impl_->options.check_free_memory)
    if (const int64_t avail = AvailableMemory(model.device()); avail >= 0 && s.peak_bytes > avail)
      return absl::ResourceExhaustedError(absl::StrCat("the KV cache of this request (", tokens, " tokens) needs ",
                                                       s.peak_bytes, " bytes; ", model.device().str(), " has ", avail,
                                                       " bytes free"));
  r.compression.press = (*press::FindPress(request.press))->name;
  r.compression.compression_ratio = request.compression_ratio;
  r.compression.context_tokens = s.n_ctx;
  r.compression.kept.assign(cfg.num_layers, std::vector<int64_t>(cfg.num_kv_heads, s.n_ctx));
  s.sampler.emplace(request.sampling);
  s.decoder.emplace(*impl_->tokenizer, /*skip_special=*/true);
  try {
    at::InferenceMode inference;
    s.cache = model.NewCache(impl_->pool.get());
    s.cache->Reserve(tokens);
    if (s.press)
      s.compressor = std::make_unique<Compressor>(model, *s.cache, *s.press, request.compression_ratio, s.n_ctx,
                                                  s.n_q + request.max_new_tokens, request.report_kept_positions);
  } catch (const c10::OutOfMemoryError& e) {
    return absl::ResourceExhaustedError(absl::StrCat("out of memory reserving the KV cache: ", e.what()));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("reserving the KV cache failed: ", e.what()));
  }
  return std::unique_ptr<Sequence>(new Sequence(std::move(state)));
}

absl::Status Generator::PrefillStep(Sequence& seq) {
  Sequence::State& s = *seq.s_;
  if (!seq.prefilling()) return absl::FailedPreconditionError("PrefillStep: the sequence is not prefilling");
  const auto& model = *impl_->model;
  const auto& cfg = model.config();
  const int64_t chunk = impl_->options.prefill_chunk;
  GenerateResult& r = s.result;
  try {
    at::InferenceMode inference;
    auto long_opts = at::TensorOptions().dtype(at::kLong);
    auto run = [&](const std::vector<int32_t>& ids, int64_t begin, int64_t count, int64_t pos) {
      auto t = at::empty({count}, long_opts);
      auto* p = t.data_ptr<int64_t>();
      for (int64_t i = 0; i < count; ++i) p[i] = ids[begin + i];
      return model.Forward(t, at::arange(pos, pos + count, long_opts), *s.cache, /*all_logits=*/false);
    };
    at::Tensor logits;
    if (s.ctx_done < s.n_ctx) {
      // Context, layer-major: every chunk through a layer (compressed as its last chunk leaves
      // it), then the next layer; prefill_step_tokens (default prefill_chunk) x num_layers
      // token-layers per step.
      if (!s.ctx_prefill) {
        auto ids = at::empty({s.n_ctx}, long_opts);
        std::copy(s.prompt.context.begin(), s.prompt.context.end(), ids.data_ptr<int64_t>());
        s.ctx_prefill = std::make_unique<model::LayerMajorPrefill>(model, ids, /*first_position=*/0, chunk, *s.cache,
                                                                   s.compressor.get());
      }
      const int64_t step_tokens = impl_->options.prefill_step_tokens > 0 ? impl_->options.prefill_step_tokens : chunk;
      if (s.ctx_prefill->Step(step_tokens * cfg.num_layers)) {
        s.ctx_done = s.n_ctx;
        if (s.n_q == 0) logits = s.ctx_prefill->Logits();
        s.ctx_prefill.reset();
      }
      if (s.ctx_done == s.n_ctx) {
        if (s.compressor) {
          s.compressor->Finish();
          r.compression.kept = s.compressor->kept();
          r.compression.positions = s.compressor->positions();
          r.compression.scoring_seconds = s.compressor->scoring_seconds();
          r.compression.compaction_seconds = s.compressor->compaction_seconds();
          r.timings.compression = s.compressor->scoring_seconds() + s.compressor->compaction_seconds();
          s.compressor.reset();
        }
        const int64_t before = s.n_ctx * cfg.num_kv_heads * cfg.num_layers;
        int64_t after = 0;
        for (const auto& layer : r.compression.kept)
          for (int64_t n : layer) after += n;
        r.usage.kv_entries_before = before;
        r.usage.kv_entries_after = after;
        r.usage.kv_bytes_before = before * s.cache->entry_bytes();
        r.usage.kv_bytes_after = after * s.cache->entry_bytes();
      }
    } else {
      // The question, at positions continuing from the original context length.
      const int64_t count = std::min(chunk, s.n_q - s.q_done);
      logits = run(s.prompt.question, s.q_done, count, s.n_ctx + s.q_done);
      s.q_done += count;
    }
    if (s.ctx_done == s.n_ctx && s.q_done == s.n_q) {
      s.prefilled = true;
      s.t_prefill = Clock::now();
      r.timings.prefill = Seconds(s.t_tok, s.t_prefill) - r.timings.compression;
      s.pos = s.n_ctx + s.n_q;
      if (s.request.max_new_tokens == 0) Finalize(s, FinishReason::kLength);
      else SampleNext(s, logits[0], cfg.eos_token_ids);
    }
  } catch (const c10::OutOfMemoryError& e) {
    return absl::ResourceExhaustedError(absl::StrCat("out of memory during prefill: ", e.what()));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("prefill failed: ", e.what()));
  }
  return absl::OkStatus();
}

absl::Status Generator::DecodeStep(const std::vector<Sequence*>& batch) {
  if (batch.empty()) return absl::OkStatus();
  const auto& model = *impl_->model;
  const int64_t b = static_cast<int64_t>(batch.size());
  const auto t_start = Clock::now();
  std::vector<cache::KvCache*> caches;
  caches.reserve(b);
  try {
    at::InferenceMode inference;
    auto ids = at::empty({b}, at::kLong), positions = at::empty({b}, at::kLong);
    for (int64_t i = 0; i < b; ++i) {
      Sequence::State& s = *batch[i]->s_;
      if (s.done || !s.prefilled || s.result.token_ids.empty())
        return absl::FailedPreconditionError("DecodeStep: a sequence is not ready to decode");
      ids.data_ptr<int64_t>()[i] = s.result.token_ids.back();
      positions.data_ptr<int64_t>()[i] = s.pos++;
      caches.push_back(s.cache.get());
    }
    at::Tensor logits = model.ForwardBatch(ids, positions, caches);  // [B, vocab]
    // Greedy rows take their argmax where the logits are (torch's argmax returns the lowest
    // index among equal maxima, as the sampler does); only sampled rows come to the host.
    std::vector<int64_t> sampled;
    for (int64_t i = 0; i < b; ++i)
      if (batch[i]->s_->request.sampling.temperature > 0.0) sampled.push_back(i);
    at::Tensor greedy;
    if (static_cast<int64_t>(sampled.size()) < b) greedy = logits.argmax(-1).to(at::kCPU);
    at::Tensor rows;
    if (!sampled.empty()) {
      auto idx = at::tensor(sampled, at::kLong).to(logits.device());
      rows = logits.index_select(0, idx).to(at::kCPU);  // one copy for the sampled rows
    }
    const auto& eos = model.config().eos_token_ids;
    const auto t_tokens = Clock::now();
    impl_->last_step.model_seconds = Seconds(t_start, t_tokens);
    for (int64_t i = 0, k = 0; i < b; ++i) {
      Sequence::State& s = *batch[i]->s_;
      if (k < static_cast<int64_t>(sampled.size()) && sampled[k] == i)
        SampleNext(s, rows[k++], eos);
      else
        AcceptToken(s, static_cast<int32_t>(greedy.data_ptr<int64_t>()[i]), eos);
    }
    impl_->last_step.accept_seconds = Seconds(t_tokens, Clock::now());
  } catch (const c10::OutOfMemoryError& e) {
    return absl::ResourceExhaustedError(absl::StrCat("out of memory during decode: ", e.what()));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("decode failed: ", e.what()));
  }
  return absl::OkStatus();
}

absl::StatusOr<GenerateResult> Generator::Generate(const GenerateRequest& request, const TextCallback& on_text,
                                                   const CancelCheck& cancelled) {
  auto seq = Start(request, on_text);
  if (!seq.ok()) return seq.status();
  Sequence& s = **seq;
  auto stop_requested = [&] { return cancelled && cancelled(); };
  while (s.prefilling()) {
    if (stop_requested()) {
      s.Cancel();
      break;
    }
    if (auto st = PrefillStep(s); !st.ok()) return st;
  }
  while (!s.done()) {
    if (stop_requested()) {
      s.Cancel();
      break;
    }
    if (auto st = DecodeStep({&s}); !st.ok()) return st;
  }
  return s.TakeResult();
}

}  // namespace defkv::engine
