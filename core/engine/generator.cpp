#include "core/engine/generator.h"

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
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
    m = model::Transformer::Load(options.model_dir, lo);
  } catch (const std::exception& e) {  // c10::Error (e.g. out of device memory) ends here
    return absl::InternalError(absl::StrCat(options.model_dir, ": loading the weights failed: ", e.what()));
  }
  if (!m.ok()) return m.status();
  impl->model = std::move(*m);
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

absl::StatusOr<GenerateResult> Generator::Generate(const GenerateRequest& request, const TextCallback& on_text,
                                                   const CancelCheck& cancelled) {
  if (request.max_new_tokens < 0) return absl::InvalidArgumentError("max_new_tokens must be >= 0");
  if (request.sampling.top_p <= 0.0 || request.sampling.top_p > 1.0)
    return absl::InvalidArgumentError("top_p must be in (0, 1]");
  if (request.sampling.top_k < 0) return absl::InvalidArgumentError("top_k must be >= 0");
  for (const auto& s : request.stop)
    if (s.empty()) return absl::InvalidArgumentError("stop strings must not be empty");
  if (auto s = press::CheckRatio(request.compression_ratio); !s.ok()) return s;
  auto press = press::MakePress(request.press, request.press_options);
  if (!press.ok()) return press.status();
  // Ratio 0 takes the full-cache path whatever the press: nothing is scored or moved.
  const bool compress = *press != nullptr && request.compression_ratio > 0.0;

  const auto t0 = Clock::now();
  GenerateResult result;
  auto prompt = Tokenize(request);
  if (!prompt.ok()) return prompt.status();
  const auto t_tok = Clock::now();
  result.timings.tokenize = Seconds(t0, t_tok);

  const auto& model = *impl_->model;
  const auto& cfg = model.config();
  const int64_t n_ctx = static_cast<int64_t>(prompt->context.size());
  const int64_t n_q = static_cast<int64_t>(prompt->question.size());
  result.usage.context_tokens = n_ctx;
  result.usage.question_tokens = n_q;
  if (n_ctx + n_q + request.max_new_tokens > cfg.max_position_embeddings)
    return absl::OutOfRangeError(absl::StrCat("prompt (", n_ctx + n_q, " tokens) + max_new_tokens (", request.max_new_tokens,
                                              ") exceeds the model's context of ", cfg.max_position_embeddings, " tokens"));
  for (int32_t id : prompt->context)
    if (id < 0 || id >= cfg.vocab_size) return absl::InternalError("tokenizer produced an id outside the vocabulary");
  if (compress)
    if (auto s = (*press)->CheckContext(n_ctx); !s.ok()) return s;
  // The cache is reserved at full size for the whole request: refuse up front what cannot fit,
  // rather than failing mid-prefill (and possibly starving the process).
  const int64_t tokens = n_ctx + n_q + request.max_new_tokens;
  const int64_t entry_bytes = 2 * cfg.head_dim * static_cast<int64_t>(c10::elementSize(model.dtype()));
  const int64_t needed = tokens * cfg.num_kv_heads * cfg.num_layers * entry_bytes;
  if (const int64_t avail = AvailableMemory(model.device()); avail >= 0 && needed > avail)
    return absl::ResourceExhaustedError(absl::StrCat("the KV cache of this request (", tokens, " tokens) needs ", needed,
                                                     " bytes; ", model.device().str(), " has ", avail, " bytes free"));
  result.compression.press = (*press::FindPress(request.press))->name;
  result.compression.compression_ratio = request.compression_ratio;
  result.compression.context_tokens = n_ctx;

  try {
    at::InferenceMode inference;
    auto cache = model.NewCache();
    cache->Reserve(n_ctx + n_q + request.max_new_tokens);
    auto long_opts = at::TensorOptions().dtype(at::kLong);
    std::unique_ptr<Compressor> compressor;
    if (compress)
      compressor = std::make_unique<Compressor>(model, *cache, **press, request.compression_ratio, n_ctx,
                                                n_q + request.max_new_tokens, request.report_kept_positions);
    auto run = [&](const std::vector<int32_t>& ids, int64_t begin, int64_t count, int64_t pos,
                   model::LayerHook* hook = nullptr) {
      auto t = at::empty({count}, long_opts);
      auto* p = t.data_ptr<int64_t>();
      for (int64_t i = 0; i < count; ++i) p[i] = ids[begin + i];
      return model.Forward(t, at::arange(pos, pos + count, long_opts), *cache, /*all_logits=*/false, hook);
    };

    // Context prefill in chunks (compressed as its last chunk leaves each layer), then the
    // question at positions continuing from the original context length n_ctx.
    at::Tensor logits;
    const int64_t chunk = impl_->options.prefill_chunk;
    auto stop_requested = [&] { return cancelled && cancelled(); };
    bool stopped = false;
    for (int64_t b = 0; b < n_ctx && !(stopped = stop_requested()); b += chunk) {
      const int64_t count = std::min(chunk, n_ctx - b);
      if (compressor) compressor->set_last_chunk(b + count == n_ctx);
      logits = run(prompt->context, b, count, b, compressor.get());
    }
    const int64_t entries_before = n_ctx * cfg.num_kv_heads * cfg.num_layers;
    if (compressor && !stopped) {
      compressor->Finish();
      result.compression.kept = compressor->kept();
      result.compression.positions = compressor->positions();
      result.compression.scoring_seconds = compressor->scoring_seconds();
      result.compression.compaction_seconds = compressor->compaction_seconds();
      result.timings.compression = compressor->scoring_seconds() + compressor->compaction_seconds();
    } else {
      result.compression.kept.assign(cfg.num_layers, std::vector<int64_t>(cfg.num_kv_heads, n_ctx));
    }
    int64_t entries_after = 0;
    for (const auto& layer : result.compression.kept)
      for (int64_t n : layer) entries_after += n;
    result.usage.kv_entries_before = entries_before;
    result.usage.kv_entries_after = entries_after;
    result.usage.kv_bytes_before = entries_before * cache->entry_bytes();
    result.usage.kv_bytes_after = entries_after * cache->entry_bytes();

    for (int64_t b = 0; b < n_q && !stopped && !(stopped = stop_requested()); b += chunk)
      logits = run(prompt->question, b, std::min(chunk, n_q - b), n_ctx + b);
    const auto t_prefill = Clock::now();
    result.timings.prefill = Seconds(t_tok, t_prefill) - result.timings.compression;

    Sampler sampler(request.sampling);
    const auto& eos = cfg.eos_token_ids;
    tok::IncrementalDecoder decoder(*impl_->tokenizer, /*skip_special=*/true);
    std::string text;       // everything decoded so far
    size_t streamed = 0;    // bytes of `text` handed to on_text
    size_t ids_streamed = 0;  // ids handed to on_text
    auto emit = [&](size_t upto) {
      std::span<const int32_t> ids(result.token_ids.data() + ids_streamed, result.token_ids.size() - ids_streamed);
      ids_streamed = result.token_ids.size();
      const bool go_on = on_text(std::string_view(text).substr(streamed, upto - streamed), ids);
      streamed = upto;
      return go_on;
    };
    int64_t pos = n_ctx + n_q;
    result.finish_reason = stopped ? FinishReason::kCancelled : FinishReason::kLength;
    for (int step = 0; step < request.max_new_tokens && !stopped; ++step) {
      if (step > 0 && stop_requested()) {
        result.finish_reason = FinishReason::kCancelled;
        break;
      }
      if (step > 0) {
        logits = run(result.token_ids, static_cast<int64_t>(result.token_ids.size()) - 1, 1, pos++);
      }
      at::Tensor row = logits[0].to(at::kCPU).contiguous();  // the sampler reads host memory
      const int32_t next = sampler.Next(row.data_ptr<float>(), row.numel());
      if (step == 0) result.timings.first_token = Seconds(t0, Clock::now());
      if (std::find(eos.begin(), eos.end(), next) != eos.end()) {
        result.finish_reason = FinishReason::kEos;
        break;
      }
      result.token_ids.push_back(next);
      text += decoder.Push(next);
      if (step + 1 == request.max_new_tokens) text += decoder.Flush();

      size_t cut = std::string::npos;
      for (const auto& s : request.stop) cut = std::min(cut, text.find(s));
      if (cut != std::string::npos) {
        text.resize(cut);
        result.finish_reason = FinishReason::kStopString;
      }
      if (on_text) {
        const size_t ready = result.finish_reason == FinishReason::kStopString
                                 ? text.size()
                                 : text.size() - StopHoldback(text, request.stop);
        if (ready > streamed && !emit(ready)) {
          result.finish_reason = FinishReason::kCancelled;
          break;
        }
      }
      if (result.finish_reason == FinishReason::kStopString) break;
    }
    if (result.finish_reason == FinishReason::kEos) text += decoder.Flush();
    if (on_text && result.finish_reason != FinishReason::kCancelled &&
        (text.size() > streamed || ids_streamed < result.token_ids.size()))
      emit(text.size());
    result.text = std::move(text);
    result.usage.generated_tokens = static_cast<int64_t>(result.token_ids.size());
    int64_t entries = 0;
    for (int64_t l = 0; l < cfg.num_layers; ++l) entries += cache->entries(l);
    result.usage.kv_entries = entries;
    result.usage.kv_bytes = cache->bytes_used();
    const auto t_end = Clock::now();
    result.timings.decode = Seconds(t_prefill, t_end);
    result.timings.total = Seconds(t0, t_end);
  } catch (const c10::OutOfMemoryError& e) {
    return absl::ResourceExhaustedError(absl::StrCat("out of memory during generation: ", e.what()));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("generation failed: ", e.what()));
  }
  return result;
}

}  // namespace defkv::engine
