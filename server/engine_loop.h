// The engine thread and the bounded queue in front of it. gRPC threads validate requests and
// Submit them; one thread owns the Generator (it is not thread-safe) and runs them in arrival
// order. Admission control is the queue bound: past --max_queue waiting requests, Submit refuses
// with RESOURCE_EXHAUSTED instead of letting latency grow without limit.
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
#include <thread>

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
  int max_queue = 64;             // waiting jobs, the running one not counted
  int64_t max_context_tokens = 0; // prompt (context + question) tokens; 0: the model's context length
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

  // Queues a job: UNAVAILABLE while loading or draining, RESOURCE_EXHAUSTED when the queue is full.
  // On error the job's callbacks are never called.
  absl::Status Submit(std::shared_ptr<Job> job);

  // Draining: refuse new jobs, then wait (up to deadline) for the queued and running ones.
  void StopAccepting();
  bool WaitIdle(Clock::time_point deadline);
  // Stops the running job between steps, fails the queued ones with UNAVAILABLE, joins the thread.
  void Stop();

 private:
  void ThreadMain();
  void Run(Job& job);
  void SampleDeviceMemory();

  engine::EngineOptions options_;
  EngineLimits limits_;
  Metrics& metrics_;
  std::unique_ptr<engine::Generator> generator_;  // touched by the engine thread only
  engine::ModelInfo info_;
  int64_t kv_bytes_per_token_ = 0;  // K+V bytes of one token across layers and kv heads
  int64_t kv_entries_per_token_ = 0;

  mutable std::mutex mu_;
  std::condition_variable cv_;       // wakes the engine thread
  std::condition_variable idle_cv_;  // wakes WaitIdle and Start
  std::deque<std::shared_ptr<Job>> queue_;
  enum class State { kIdle, kLoading, kServing, kDraining, kStopped } state_ = State::kIdle;
  absl::Status load_status_;
  bool running_job_ = false;
  std::thread thread_;
};

}  // namespace defkv::server
