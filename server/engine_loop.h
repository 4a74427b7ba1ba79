// The engine thread, its scheduler and the bounded queue in front of it. gRPC threads validate
// requests and Submit them; one thread owns the Generator (it is not thread-safe) and runs a
// continuous batch: requests join and leave it between steps; each iteration runs one prefill
// chunk of the request being admitted, then one decode step of every running request together.
// Admission is first come, first served against a KV memory budget that counts what each
// running request holds now (compressed sizes once its context is compressed) plus the full
// reservation of the one being prefilled; the head of the queue waits until it fits, so nothing
// behind it overtakes it. Past --max_queue waiting requests, Submit refuses with
// RESOURCE_EXHAUSTED; a request that could never fit in the budget is refused the same way.
// Nothing is preempted: a request admitted keeps its memory until it ends.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <optional>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "core/engine/generator.h"
#include "server/metrics.h"

namespace defkv::server {

using Clock = std::chrono::steady_clock;

inline double SecondsBetween(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// What became of a job; handed to Job::on_done on the engine thread.
struct JobOutcome {
  absl::Status status;
  engine::GenerateResult result;  // meaningful when status is OK
  double queue_seconds = 0, ttft_seconds = 0, total_seconds = 0;
};

// One request on its way from a gRPC thread to the engine thread. The callbacks run on the
// engine thread and must not block (they hand data to gRPC reactors).
struct Job {
  std::string id;
  std::string press;  // canonical name, the metrics label
  engine::GenerateRequest request;
  Clock::time_point arrival;
  // Text as it completes; returning false stops the request (the client is gone).
  std::function<bool(std::string_view, std::span<const int32_t>)> on_text;  // text and its new token ids
  // Polled between prefill chunks and decode steps: a non-OK status (CANCELLED,
  // DEADLINE_EXCEEDED) stops the request and becomes its final status.
  std::function<absl::Status()> check;
  // Called exactly once, also for jobs dropped at shutdown.
  std::function<void(const JobOutcome&)> on_done;
};

struct EngineLimits {
  int max_queue = 64;             // waiting jobs, the running ones not counted
  int64_t max_context_tokens = 0; // prompt (context + question) tokens; 0: the model's context length
  int max_batch = 64;             // requests running at once (decoding or being prefilled)
  // KV memory budget in bytes; 0: kv_cache_fraction of the memory free once the model is loaded
  // (the GPU's free memory, or MemAvailable on the host).
  int64_t kv_cache_bytes = 0;
  double kv_cache_fraction = 0.9;
  // While requests run, an "engine stats" log line this often: iterations, decode steps and
  // their mean time (alone and with a prefill chunk), decode and prefill tokens/s. 0: never.
  double stats_interval_seconds = 10;
};

class EngineLoop {
 public:
  EngineLoop(engine::EngineOptions options, EngineLimits limits, Metrics& metrics);
  ~EngineLoop();
  EngineLoop(const EngineLoop&) = delete;
  EngineLoop& operator=(const EngineLoop&) = delete;

  // Starts the engine thread, which loads the model; returns when loading has finished.
  absl::Status Start();
  bool ready() const;
  // Valid once Start() succeeded.
  const engine::ModelInfo& info() const { return info_; }
  int64_t max_context_tokens() const { return limits_.max_context_tokens; }
  // Valid once Start() succeeded.
  int64_t kv_budget_bytes() const { return limits_.kv_cache_bytes; }
  int64_t kv_pool_bytes() const { return pool_bytes_; }  // 0: no pool (CPU)
  // Whether batched decode steps replay as CUDA graphs (a pool on CUDA, --cuda_graph_max_batch > 0).
  bool cuda_graphs() const { return cuda_graphs_; }

  // Queues a job: UNAVAILABLE while loading or draining, RESOURCE_EXHAUSTED when the queue is full.
  // On error the job's callbacks are never called.
  absl::Status Submit(std::shared_ptr<Job> job);

  // Draining: refuse new jobs, then wait (up to deadline) for the queued and running ones.
  void StopAccepting();
  bool WaitIdle(Clock::time_point deadline);
  // Stops the running job between steps, fails the queued ones with UNAVAILABLE, joins the thread.
  void Stop();

 private:
  // One request in the running batch.
  struct Active {
    std::shared_ptr<Job> job;
    std::unique_ptr<engine::Sequence> seq;
    Clock::time_point admitted, last_text;
    bool seen_text = false;
    absl::Status stop_reason;  // why it stopped early, when it did
  };

  void ThreadMain();
  // Moves the head of the queue into the batch when it fits; returns false when it must wait.
  bool AdmitOne();
  void Finish(Active& a, absl::Status status);
  void Fail(const std::shared_ptr<Job>& job, absl::Status status, Clock::time_point start);
  void Iterate();
  void UpdateGauges();
  void SampleDeviceMemory();

  engine::EngineOptions options_;
  EngineLimits limits_;
  Metrics& metrics_;
  std::unique_ptr<engine::Generator> generator_;  // touched by the engine thread only
  bool cuda_graphs_ = false;                       // set with pool_bytes_ while loading
  // Engine-thread counters behind the "engine stats" line, reset each time it is written.
  struct StepStats {
    Clock::time_point since = Clock::now();
    int64_t iterations = 0, decode_steps = 0, decode_tokens = 0, prefill_tokens = 0;
    int64_t mixed_steps = 0;            // decode steps of iterations that also ran a prefill chunk
    double decode_s = 0, mixed_s = 0;   // time in decode-only iterations / in those with a chunk
    double model_s = 0, accept_s = 0;   // decode steps: the model, and accepting the tokens
    int64_t max_batch = 0;
  } stats_;
  void LogStats(bool force);
  engine::ModelInfo info_;
  int64_t kv_bytes_per_token_ = 0;  // K+V bytes of one token across layers and kv heads
  int64_t pool_bytes_ = 0;
  std::shared_ptr<Job> head_;       // taken from the queue, waiting for KV memory
  std::optional<engine::PromptTokens> head_prompt_;
  int64_t kv_entries_per_token_ = 0;

  mutable std::mutex mu_;
  std::condition_variable cv_;       // wakes the engine thread
  std::condition_variable idle_cv_;  // wakes WaitIdle and Start
  std::deque<std::shared_ptr<Job>> queue_;
  enum class State { kIdle, kLoading, kServing, kDraining, kStopped } state_ = State::kIdle;
  absl::Status load_status_;
  std::vector<std::unique_ptr<Active>> running_;  // the batch; engine thread only
  int running_count_ = 0;                          // running_.size(), read under mu_
  std::thread thread_;
};

}  // namespace defkv::server
