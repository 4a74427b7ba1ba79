#include "server/engine_loop.h"

#include <exception>
#include <utility>

#include "absl/strings/str_cat.h"
#include "server/device_memory.h"
#include "server/logging.h"

namespace defkv::server {
namespace {

int64_t DtypeBytes(const std::string& dtype) {
  if (dtype == "bfloat16" || dtype == "float16") return 2;
  return 4;
}

}  // namespace

EngineLoop::EngineLoop(engine::EngineOptions options, EngineLimits limits, Metrics& metrics)
    : options_(std::move(options)), limits_(limits), metrics_(metrics) {}

EngineLoop::~EngineLoop() { Stop(); }

absl::Status EngineLoop::Start() {
  {
    std::lock_guard lock(mu_);
    state_ = State::kLoading;
  }
  thread_ = std::thread([this] { ThreadMain(); });
  std::unique_lock lock(mu_);
  idle_cv_.wait(lock, [&] { return state_ != State::kLoading; });
  return load_status_;
}

bool EngineLoop::ready() const {
  std::lock_guard lock(mu_);
  return state_ == State::kServing;
}

absl::Status EngineLoop::Submit(std::shared_ptr<Job> job) {
  {
    std::lock_guard lock(mu_);
    switch (state_) {
      case State::kServing: break;
      case State::kIdle:
      case State::kLoading: return absl::UnavailableError("the model is still loading; retry shortly");
      default: return absl::UnavailableError("the server is shutting down");
    }
    if (static_cast<int>(queue_.size()) >= limits_.max_queue)
      return absl::ResourceExhaustedError(absl::StrCat("the request queue is full (", limits_.max_queue,
                                                       " waiting, --max_queue); retry later"));
    queue_.push_back(std::move(job));
    metrics_.waiting().Set(static_cast<double>(queue_.size()));
  }
  cv_.notify_one();
  return absl::OkStatus();
}

void EngineLoop::StopAccepting() {
  std::lock_guard lock(mu_);
  if (state_ == State::kServing) state_ = State::kDraining;
}

bool EngineLoop::WaitIdle(Clock::time_point deadline) {
  std::unique_lock lock(mu_);
  return idle_cv_.wait_until(lock, deadline, [&] { return queue_.empty() && !running_job_; });
}

void EngineLoop::Stop() {
  std::deque<std::shared_ptr<Job>> dropped;
  {
    std::lock_guard lock(mu_);
    if (state_ == State::kStopped && !thread_.joinable()) return;
    state_ = State::kStopped;
    dropped.swap(queue_);
    metrics_.waiting().Set(0);
  }
  cv_.notify_all();
  for (auto& job : dropped) {
    JobOutcome out;
    out.status = absl::UnavailableError("the server shut down before this request ran");
    out.queue_seconds = out.total_seconds = SecondsBetween(job->arrival, Clock::now());
    job->on_done(out);
  }
  if (thread_.joinable()) thread_.join();
}

void EngineLoop::ThreadMain() {
  auto generator = engine::Generator::Create(options_);
  {
    std::lock_guard lock(mu_);
    if (generator.ok()) {
      generator_ = std::move(*generator);
      info_ = generator_->info();
      kv_entries_per_token_ = info_.num_layers * info_.num_kv_heads;
      kv_bytes_per_token_ = 2 * kv_entries_per_token_ * info_.head_dim * DtypeBytes(info_.dtype);
      if (limits_.max_context_tokens <= 0 || limits_.max_context_tokens > info_.max_context)
        limits_.max_context_tokens = info_.max_context;
      if (state_ == State::kLoading) state_ = State::kServing;
    } else {
      load_status_ = generator.status();
      state_ = State::kStopped;
    }
  }
  idle_cv_.notify_all();
  if (!generator_) return;
  SampleDeviceMemory();

  for (;;) {
    std::shared_ptr<Job> job;
    {
      std::unique_lock lock(mu_);
      // Wake at least once a second to refresh the device-memory gauge while idle.
      cv_.wait_for(lock, std::chrono::seconds(1), [&] { return !queue_.empty() || state_ == State::kStopped; });
      if (state_ == State::kStopped) break;
      if (queue_.empty()) {
        lock.unlock();
        SampleDeviceMemory();
        continue;
      }
      job = std::move(queue_.front());
      queue_.pop_front();
      running_job_ = true;
      metrics_.waiting().Set(static_cast<double>(queue_.size()));
      metrics_.running().Set(1);
    }
    Run(*job);
    job.reset();  // the job's reactor may be released now
    SampleDeviceMemory();
    {
      std::lock_guard lock(mu_);
      running_job_ = false;
      metrics_.running().Set(0);
    }
    idle_cv_.notify_all();
  }
  generator_.reset();
}

void EngineLoop::Run(Job& job) {
  const auto start = Clock::now();
  JobOutcome out;
  out.queue_seconds = SecondsBetween(job.arrival, start);
  metrics_.QueueTime(out.queue_seconds);

  // Why the request stopped early, when it did: the client (CANCELLED), its deadline, or shutdown.
  absl::Status stop_reason;
  auto should_stop = [&] {
    bool stopping;
    {
      std::lock_guard lock(mu_);
      stopping = state_ == State::kStopped;
    }
    if (stopping) stop_reason = absl::UnavailableError("the server shut down while this request ran");
    else stop_reason = job.check();
    return !stop_reason.ok();
  };

  auto last_text = start;
  bool seen_text = false;
  auto on_text = [&](std::string_view text, std::span<const int32_t> ids) {
    const auto now = Clock::now();
    if (seen_text) metrics_.InterTokenLatency(SecondsBetween(last_text, now));
    seen_text = true;
    last_text = now;
    if (job.on_text(text, ids)) return true;
    stop_reason = absl::CancelledError("the client went away mid-stream");
    return false;
  };

  try {
    if (should_stop()) {
      out.status = stop_reason;
    } else if (auto prompt = generator_->Tokenize(job.request); !prompt.ok()) {
      out.status = prompt.status();
    } else if (const int64_t n = static_cast<int64_t>(prompt->context.size() + prompt->question.size());
               n > limits_.max_context_tokens) {
      out.status = absl::OutOfRangeError(absl::StrCat(
          "the prompt has ", n, " tokens (context ", prompt->context.size(), ", question ", prompt->question.size(),
          "), over this server's limit of ", limits_.max_context_tokens, " tokens (--max_context_tokens)"));
    } else {
      metrics_.kv_bytes_in_use().Set(static_cast<double>(n * kv_bytes_per_token_));
      const auto generate_start = Clock::now();
      auto result = generator_->Generate(job.request, on_text, should_stop);
      if (!result.ok()) {
        out.status = result.status();
      } else if (result->finish_reason == engine::FinishReason::kCancelled) {
        out.status = stop_reason.ok() ? absl::CancelledError("the request was cancelled") : stop_reason;
        out.result = *std::move(result);
      } else {
        out.ttft_seconds = SecondsBetween(job.arrival, generate_start) + result->timings.first_token;
        out.result = *std::move(result);
      }
    }
  } catch (const std::exception& e) {
    // The Generator turns its own exceptions into statuses; this guards the callbacks.
    out.status = absl::InternalError(absl::StrCat("generation failed: ", e.what()));
  }
  metrics_.kv_bytes_in_use().Set(0);
  out.total_seconds = SecondsBetween(job.arrival, Clock::now());
  if (out.status.ok())
    metrics_.RequestCompleted(job.press, out.result, out.ttft_seconds, out.total_seconds, kv_entries_per_token_);
  job.on_done(out);
}

void EngineLoop::SampleDeviceMemory() {
  if (auto bytes = DeviceMemoryUsedBytes(options_.device)) metrics_.device_memory().Set(static_cast<double>(*bytes));
}

}  // namespace defkv::server
