// The in-process generator: context + question (+ answer prefix) -> tokens -> answer.
// This header is the boundary of core/: plain C++ types only (no LibTorch, no protobuf), so
// server/ and the CLIs can include it next to generated gRPC code.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace defkv::engine {

struct SamplingParams {
  double temperature = 0.0;  // <= 0: greedy (argmax, lowest id on ties)
  int top_k = 0;             // 0: off
  double top_p = 1.0;        // 1: off
  uint64_t seed = 0;         // same seed, same request -> same output
};

struct GenerateRequest {
  // Rendered the way kvpress renders them (spec/presses.md §1.1): the chat template applied to
  // the context alone, split off before the generation prompt; the question carries the
  // template's suffix and the answer prefix.
  std::string context;
  std::string question;
  std::string answer_prefix;
  bool use_chat_template = true;
  // When set, context/question are ignored: this text is tokenized as is (BOS added when the
  // tokenizer adds one) and continued, with no template.
  std::optional<std::string> raw_prompt;
  int max_new_tokens = 128;
  // KV-cache compression of the context (core/press/press_info.h lists the presses).
  // compression_ratio is the fraction of context entries removed, in [0, 1).
  std::string press = "none";
  double compression_ratio = 0.0;
  std::map<std::string, std::string> press_options;  // typed per press; parsed and checked
  bool report_kept_positions = false;  // fill CompressionReport::positions (tests, debugging)
  SamplingParams sampling;
  std::vector<std::string> stop;  // generation ends before the first occurrence of any of them
};

enum class FinishReason { kEos, kStopString, kLength, kCancelled };
const char* FinishReasonName(FinishReason r);

// Seconds spent in each stage of one request.
struct StageTimings {
  double tokenize = 0, prefill = 0, compression = 0, decode = 0, first_token = 0, total = 0;
};

struct Usage {
  int64_t context_tokens = 0, question_tokens = 0, generated_tokens = 0;
  // (layer, kv-head, token) entries of the context's cache before and after compression,
  // and their K+V bytes. Equal when nothing was compressed.
  int64_t kv_entries_before = 0, kv_entries_after = 0;
  int64_t kv_bytes_before = 0, kv_bytes_after = 0;
  int64_t kv_entries = 0;  // entries held at the end (context + question + generated)
  int64_t kv_bytes = 0;    // their K and V bytes
};

// What compression did to one request (defkv-generate --report prints it).
struct CompressionReport {
  std::string press;            // canonical name
  double compression_ratio = 0;
  std::vector<std::vector<int64_t>> kept;  // [layer][kv_head] context entries kept
  // [layer][kv_head] kept context positions, ascending; only with report_kept_positions.
  std::vector<std::vector<std::vector<int32_t>>> positions;
  int64_t context_tokens = 0;
  double scoring_seconds = 0, compaction_seconds = 0;
};

struct GenerateResult {
  std::string text;
  std::vector<int32_t> token_ids;  // generated ids, EOS excluded
  FinishReason finish_reason = FinishReason::kLength;
  Usage usage;
  StageTimings timings;
  CompressionReport compression;
};

// Receives text as it is completed (never half a UTF-8 character, never part of a stop string)
// with the ids generated since the previous call (their concatenation over all calls is
// GenerateResult::token_ids); return false to cancel the request.
using TextCallback = std::function<bool(std::string_view text, std::span<const int32_t> ids)>;
// Polled between prefill chunks and between decode steps; true stops the request with
// FinishReason::kCancelled (its memory is freed when Generate returns).
using CancelCheck = std::function<bool()>;

struct EngineOptions {
  std::string model_dir;
  std::string device = "cpu";  // "cpu", "cuda", "cuda:N"
  std::string dtype = "auto";  // "auto" (float32 on CPU, the checkpoint's on CUDA), "float32", "bfloat16", "float16"
  int threads = 0;             // CPU intra-op threads; 0 = all cores
  int prefill_chunk = 512;     // context tokens per prefill chunk
  // The prefill work of one PrefillStep, in context tokens through every layer: a step runs
  // chunks through layers (layer-major) until prefill_step_tokens x num_layers token-layers are
  // done, at least one chunk through one layer. 0: prefill_chunk (one chunk through every layer).
  // Smaller steps let a batching server interleave decode steps more often (lower inter-token
  // latency for the running requests, more steps per prefill).
  int prefill_step_tokens = 0;
  // Refuse a request whose full-size cache exceeds the device's (or host's) free memory now.
  // The server turns it off: it admits requests against a KV budget of its own.
  bool check_free_memory = true;
  // Benchmarks of real shapes without checkpoints: weights drawn at random (N(0, 0.02), seed 0)
  // for model_dir's config.json; the tokenizer files are still read from model_dir.
  bool random_weights = false;
  // Decode steps of up to this many sequences over the KV pool (CreateKvPool; CUDA, bf16/fp16)
  // replay as CUDA graphs, one captured per batch size and segment-length bucket the first time
  // it is seen. 0: off. No effect without a pool or without CUDA.
  int cuda_graph_max_batch = 0;
  std::function<void(size_t done_bytes, size_t total_bytes)> load_progress;
};

struct ModelInfo {
  std::string model_dir, model_type, dtype, device, tokenizer, chat_template;
  int64_t num_layers = 0, num_heads = 0, num_kv_heads = 0, head_dim = 0, hidden_size = 0, vocab_size = 0;
  int64_t max_context = 0;
  size_t weight_bytes = 0;
  double load_seconds = 0;
};

// Prompt tokens as the engine feeds them: context prefilled first, then the question at
// positions continuing from the context length.
struct PromptTokens {
  std::vector<int32_t> context;
  std::vector<int32_t> question;
};

class Generator;

// One request generated step by step, so that many can share each decode step (continuous
// batching): Generator::Start makes it, PrefillStep runs its prompt one chunk at a time and
// DecodeStep advances a whole batch of them by one token. Not thread-safe, like the Generator.
class Sequence {
 public:
  ~Sequence();
  Sequence(const Sequence&) = delete;
  Sequence& operator=(const Sequence&) = delete;

  bool prefilling() const;  // prompt chunks remain
  bool done() const;        // finished: result() is final and the cache is freed
  // K/V storage it holds now, and the most it can hold: the full size of the prompt +
  // max_new_tokens. The cache allocates each layer when the prefill first writes it, and a
  // press compacts a layer (to kept + question + max_new_tokens) before the next is written,
  // but while prefilling kv_bytes_reserved() counts at least the full-size peak (admission
  // sums it); afterwards it is the storage the cache holds.
  int64_t kv_bytes_reserved() const;
  int64_t kv_bytes_peak() const;
  int64_t prompt_tokens() const;  // context + question
  int64_t tokens_fed() const;     // prompt and generated tokens run through the model so far
  // Ends the request now with FinishReason::kCancelled and frees its cache.
  void Cancel();
  const GenerateResult& result() const;
  GenerateResult TakeResult();

  struct State;  // opaque outside generator.cpp

 private:
  friend class Generator;
  explicit Sequence(std::unique_ptr<State> state);
  std::unique_ptr<State> s_;
};

class Generator {
 public:
  static absl::StatusOr<std::unique_ptr<Generator>> Create(const EngineOptions& options);
  ~Generator();

  absl::StatusOr<PromptTokens> Tokenize(const GenerateRequest& request) const;
  // Not thread-safe: one engine thread owns a Generator.
  absl::StatusOr<GenerateResult> Generate(const GenerateRequest& request, const TextCallback& on_text = {},
                                          const CancelCheck& cancelled = {});

  // Step-wise generation (what Generate does, one step at a time). Start validates and
  // tokenizes the request and reserves its cache; errors here are the request's own.
  // `prompt`, when given, is Tokenize(request) done earlier (the server sizes requests first).
  absl::StatusOr<std::unique_ptr<Sequence>> Start(const GenerateRequest& request, TextCallback on_text = {},
                                                  const PromptTokens* prompt = nullptr);
  // Runs the next prompt step of `seq`: the context layer by layer (model::LayerMajorPrefill,
  // prefill_step_tokens x num_layers token-layers per step; each layer compressed once its last
  // chunk has run), then the question in prefill_chunk pieces; after the last one the first
  // token is sampled.
  absl::Status PrefillStep(Sequence& seq);
  // Decodes one token for every sequence of `batch` (each done prefilling and not done) in one
  // forward pass. An error fails the step, not a particular sequence: the caller ends them all.
  absl::Status DecodeStep(const std::vector<Sequence*>& batch);
  // K and V bytes one token takes across all layers and kv heads.
  int64_t kv_bytes_per_token() const;
  // Bytes a new allocation can take on the model's device now (CUDA free memory, or the host's
  // MemAvailable); -1 when unknown.
  int64_t FreeMemoryBytes() const;
  // On a CUDA device in half precision: allocates a KV pool of about `bytes` (K and V) that the
  // caches of later Start()s take their rows from, so that DecodeStep attends over the whole
  // batch with one kernel per layer. Returns the pool's bytes, or 0 when no pool applies (CPU,
  // fp32: each cache allocates its own tensors).
  absl::StatusOr<int64_t> CreateKvPool(int64_t bytes);
  // Where the last DecodeStep spent its time: the model (planning, the forward pass, choosing
  // the tokens, until they are on the host) and accepting the tokens (detokenizing, stop
  // strings, the streaming callbacks).
  struct StepTiming {
    double model_seconds = 0, accept_seconds = 0;
  };
  StepTiming last_decode_timing() const;
  // Whether decode steps over the pool replay as CUDA graphs, and how many were captured.
  bool decode_graphs_enabled() const;
  int64_t decode_graphs() const;
  const ModelInfo& info() const;

 private:
  struct Impl;
  explicit Generator(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace defkv::engine
