#include "server/engine_loop.h"

#include <algorithm>
#include <exception>
#include <utility>

#include "absl/strings/str_cat.h"
#include "server/device_memory.h"
#include "server/logging.h"

namespace defkv::server {
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
  return idle_cv_.wait_until(lock, deadline, [&] { return queue_.empty() && running_count_ == 0; });
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
  engine::EngineOptions options = options_;
  options.check_free_memory = false;  // the KV budget below decides admission
  auto generator = engine::Generator::Create(options);
  {
    std::lock_guard lock(mu_);
    if (generator.ok()) {
      generator_ = std::move(*generator);
      info_ = generator_->info();
      kv_entries_per_token_ = info_.num_layers * info_.num_kv_heads;
      kv_bytes_per_token_ = generator_->kv_bytes_per_token();
      if (limits_.max_context_tokens <= 0 || limits_.max_context_tokens > info_.max_context)
        limits_.max_context_tokens = info_.max_context;
      if (limits_.kv_cache_bytes <= 0) {
        const int64_t free = generator_->FreeMemoryBytes();
        limits_.kv_cache_bytes = free > 0 ? static_cast<int64_t>(static_cast<double>(free) * limits_.kv_cache_fraction)
                                          : int64_t{8} << 30;  // unknown: 8 GiB
      }
      // On a GPU the budget is allocated up front as one pool that every cache takes its rows
      // from (one attention kernel per layer for the whole batch). 5% of it is kept back from
      // admission as slack for fragmentation of the pool's free ranges.
      if (auto pool = generator_->CreateKvPool(limits_.kv_cache_bytes); !pool.ok()) {
        load_status_ = pool.status();
      } else if (*pool > 0) {
        pool_bytes_ = *pool;
        cuda_graphs_ = generator_->decode_graphs_enabled();
        limits_.kv_cache_bytes = static_cast<int64_t>(0.95 * static_cast<double>(*pool));
      }
      metrics_.kv_budget().Set(static_cast<double>(limits_.kv_cache_bytes));
      if (!load_status_.ok()) {
        generator_.reset();
        state_ = State::kStopped;
      } else if (state_ == State::kLoading) {
        state_ = State::kServing;
      }
    } else {
      load_status_ = generator.status();
      state_ = State::kStopped;
    }
  }
  idle_cv_.notify_all();
  if (!generator_) return;
  SampleDeviceMemory();
  UpdateGauges();

  for (;;) {
    {
      std::unique_lock lock(mu_);
      if (running_.empty()) {
        // Wake at least once a second to refresh the device-memory gauge while idle.
        cv_.wait_for(lock, std::chrono::seconds(1), [&] { return !queue_.empty() || state_ == State::kStopped; });
      }
      if (state_ == State::kStopped) break;
      if (queue_.empty() && running_.empty()) {
        lock.unlock();
        SampleDeviceMemory();
        continue;
      }
    }
    Iterate();
  }
  // Shutdown: the running requests end with UNAVAILABLE (Stop() already failed the queued ones).
  for (auto& a : running_) {
    a->stop_reason = absl::UnavailableError("the server shut down while this request ran");
    a->seq->Cancel();
    Finish(*a, absl::OkStatus());
  }
  running_.clear();
  UpdateGauges();
  idle_cv_.notify_all();
  generator_.reset();
}

void EngineLoop::Fail(const std::shared_ptr<Job>& job, absl::Status status, Clock::time_point start) {
  JobOutcome out;
  out.status = std::move(status);
  out.queue_seconds = SecondsBetween(job->arrival, start);
  metrics_.QueueTime(out.queue_seconds);
  out.total_seconds = SecondsBetween(job->arrival, Clock::now());
  job->on_done(out);
}

bool EngineLoop::AdmitOne() {
  std::shared_ptr<Job> job;
  {
    std::lock_guard lock(mu_);
    if (queue_.empty() || state_ == State::kStopped) return false;
    job = queue_.front();
  }
  // Pops `job` if it is still the head (Stop() may have failed it meanwhile); true when popped.
  auto pop = [&](bool running) {
    std::lock_guard lock(mu_);
    if (queue_.empty() || queue_.front() != job) return false;
    queue_.pop_front();
    if (running) ++running_count_;
    metrics_.waiting().Set(static_cast<double>(queue_.size()));
    return true;
  };
  const auto now = Clock::now();
  if (static_cast<int>(running_.size()) >= limits_.max_batch) return false;
  // One request is prefilled at a time: its full-size reservation is the only one counted at
  // full size, and chunks interleave with the decode steps of the others.
  for (const auto& a : running_)
    if (a->seq->prefilling()) return false;
  if (auto st = job->check(); !st.ok()) {  // cancelled or past its deadline while waiting
    if (pop(false)) Fail(job, st, now);
    return true;
  }
  if (head_ != job) {
    head_ = job;
    head_prompt_.reset();
    auto prompt = generator_->Tokenize(job->request);
    if (!prompt.ok()) {
      if (pop(false)) Fail(job, prompt.status(), now);
      return true;
    }
    const int64_t n = static_cast<int64_t>(prompt->context.size() + prompt->question.size());
    if (n > limits_.max_context_tokens) {
      if (pop(false))
        Fail(job,
             absl::OutOfRangeError(absl::StrCat("the prompt has ", n, " tokens (context ", prompt->context.size(),
                                                ", question ", prompt->question.size(), "), over this server's limit of ",
                                                limits_.max_context_tokens, " tokens (--max_context_tokens)")),
             now);
      return true;
    }
    head_prompt_ = *std::move(prompt);
  }
  const int64_t tokens = static_cast<int64_t>(head_prompt_->context.size() + head_prompt_->question.size()) +
                         std::max(0, job->request.max_new_tokens);
  const int64_t peak = tokens * kv_bytes_per_token_;
  if (peak > limits_.kv_cache_bytes) {
    if (pop(false))
      Fail(job,
           absl::ResourceExhaustedError(absl::StrCat("the KV cache of this request (", tokens, " tokens) needs ", peak,
                                                     " bytes, more than this server's KV budget of ",
                                                     limits_.kv_cache_bytes, " bytes (--kv_cache_bytes)")),
           now);
    return true;
  }
  int64_t reserved = 0;
  for (const auto& a : running_) reserved += a->seq->kv_bytes_reserved();
  if (reserved + peak > limits_.kv_cache_bytes) return false;  // waits at the head: first come, first served

  if (!pop(true)) return true;
  auto active = std::make_unique<Active>();
  Active* a = active.get();
  a->job = job;
  a->admitted = now;
  metrics_.QueueTime(SecondsBetween(job->arrival, now));
  auto on_text = [this, a](std::string_view text, std::span<const int32_t> ids) {
    const auto t = Clock::now();
    if (a->seen_text) metrics_.InterTokenLatency(SecondsBetween(a->last_text, t));
    a->seen_text = true;
    a->last_text = t;
    if (a->job->on_text(text, ids)) return true;
    a->stop_reason = absl::CancelledError("the client went away mid-stream");
    return false;
  };
  auto seq = generator_->Start(job->request, on_text, &*head_prompt_);
  head_.reset();
  head_prompt_.reset();
  if (!seq.ok()) {
    {
      std::lock_guard lock(mu_);
      --running_count_;
    }
    Fail(job, seq.status(), now);
    idle_cv_.notify_all();
    return true;
  }
  a->seq = *std::move(seq);
  running_.push_back(std::move(active));
  return true;
}

void EngineLoop::Finish(Active& a, absl::Status status) {
  JobOutcome out;
  out.queue_seconds = SecondsBetween(a.job->arrival, a.admitted);
  engine::GenerateResult result = a.seq->TakeResult();
  if (!status.ok()) {
    out.status = std::move(status);
  } else if (result.finish_reason == engine::FinishReason::kCancelled) {
    out.status = a.stop_reason.ok() ? absl::CancelledError("the request was cancelled") : a.stop_reason;
    out.result = std::move(result);
  } else {
    out.ttft_seconds = out.queue_seconds + result.timings.first_token;
    out.result = std::move(result);
  }
  out.total_seconds = SecondsBetween(a.job->arrival, Clock::now());
  if (out.status.ok())
    metrics_.RequestCompleted(a.job->press, out.result, out.ttft_seconds, out.total_seconds, kv_entries_per_token_);
  a.job->on_done(out);
}

void EngineLoop::Iterate() {
  if (stats_.iterations == 0) stats_.since = Clock::now();  // a busy period starts
  try {
    while (AdmitOne()) {
    }
    bool stopping;
    {
      std::lock_guard lock(mu_);
      stopping = state_ == State::kStopped;
    }
    // Cancellations and deadlines, polled between steps.
    for (auto& a : running_) {
      if (a->seq->done()) continue;
      if (stopping) a->stop_reason = absl::UnavailableError("the server shut down while this request ran");
      else if (auto st = a->job->check(); !st.ok()) a->stop_reason = st;
      if (!a->stop_reason.ok()) a->seq->Cancel();
    }
    // One prefill chunk (of the one request being prefilled), then one decode step for all.
    const auto t_start = Clock::now();
    bool chunk = false;
    for (auto& a : running_) {
      if (!a->seq->prefilling()) continue;
      chunk = true;
      const int64_t fed = a->seq->tokens_fed();
      if (auto st = generator_->PrefillStep(*a->seq); !st.ok()) {
        a->seq->Cancel();
        Finish(*a, st);
        a->job.reset();
      } else {
        stats_.prefill_tokens += a->seq->tokens_fed() - fed;
      }
      break;
    }
    std::vector<engine::Sequence*> batch;
    std::vector<Active*> in_batch;
    for (auto& a : running_)
      if (a->job && !a->seq->done() && !a->seq->prefilling()) {
        batch.push_back(a->seq.get());
        in_batch.push_back(a.get());
      }
    if (!batch.empty()) {
      metrics_.DecodeBatch(static_cast<double>(batch.size()));
      const auto st = generator_->DecodeStep(batch);
      const double took = SecondsBetween(t_start, Clock::now());
      ++stats_.decode_steps;
      stats_.model_s += generator_->last_decode_timing().model_seconds;
      stats_.accept_s += generator_->last_decode_timing().accept_seconds;
      stats_.decode_tokens += static_cast<int64_t>(batch.size());
      stats_.max_batch = std::max<int64_t>(stats_.max_batch, static_cast<int64_t>(batch.size()));
      if (chunk) {
        ++stats_.mixed_steps;
        stats_.mixed_s += took;
      } else {
        stats_.decode_s += took;
      }
      if (!st.ok()) {
        // A failed step cannot be pinned on one request: every request in it ends with the error.
        for (Active* a : in_batch) {
          a->seq->Cancel();
          Finish(*a, st);
          a->job.reset();
        }
      }
    }
  } catch (const std::exception& e) {
    // The Generator turns its own exceptions into statuses; this guards the callbacks.
    for (auto& a : running_)
      if (a->job) {
        a->seq->Cancel();
        Finish(*a, absl::InternalError(absl::StrCat("generation failed: ", e.what())));
        a->job.reset();
      }
  }
  // Requests that ended leave the batch now; their memory is already freed.
  for (auto& a : running_)
    if (a->job && a->seq->done()) {
      Finish(*a, absl::OkStatus());
      a->job.reset();
    }
  const size_t before = running_.size();
  std::erase_if(running_, [](const std::unique_ptr<Active>& a) { return a->job == nullptr; });
  if (running_.size() != before) SampleDeviceMemory();
  UpdateGauges();
  ++stats_.iterations;
  LogStats(running_.empty());
}

void EngineLoop::LogStats(bool force) {
  const double interval = limits_.stats_interval_seconds;
  const auto now = Clock::now();
  const double span = SecondsBetween(stats_.since, now);
  if (interval <= 0 || stats_.iterations == 0) return;
  if (span < interval) {
    if (!force) return;
    if (span < std::min(1.0, interval)) {  // going idle after a short burst: not worth a line
      stats_ = StepStats{};
      return;
    }
  }
  const int64_t alone = stats_.decode_steps - stats_.mixed_steps;
  int waiting;
  {
    std::lock_guard lock(mu_);
    waiting = static_cast<int>(queue_.size());
  }
  LogEvent(spdlog::level::info, "engine stats",
           {{"interval_s", span},
            {"iterations", stats_.iterations},
            {"running", running_.size()},
            {"waiting", waiting},
            {"decode_steps", stats_.decode_steps},
            {"max_batch", stats_.max_batch},
            {"mean_batch", stats_.decode_steps > 0 ? static_cast<double>(stats_.decode_tokens) / stats_.decode_steps : 0.0},
            {"decode_step_ms", alone > 0 ? 1e3 * stats_.decode_s / alone : 0.0},
            {"step_with_prefill_ms", stats_.mixed_steps > 0 ? 1e3 * stats_.mixed_s / stats_.mixed_steps : 0.0},
            {"steps_with_prefill", stats_.mixed_steps},
            {"decode_model_ms", stats_.decode_steps > 0 ? 1e3 * stats_.model_s / stats_.decode_steps : 0.0},
            {"decode_accept_ms", stats_.decode_steps > 0 ? 1e3 * stats_.accept_s / stats_.decode_steps : 0.0},
            {"decode_tokens_per_s", stats_.decode_tokens / span},
            {"prefill_tokens_per_s", stats_.prefill_tokens / span}});
  stats_ = StepStats{};
}

void EngineLoop::UpdateGauges() {
  int64_t reserved = 0;
  for (const auto& a : running_) reserved += a->seq->kv_bytes_reserved();
  metrics_.kv_bytes_in_use().Set(static_cast<double>(reserved));
  metrics_.kv_bytes_free().Set(static_cast<double>(std::max<int64_t>(0, limits_.kv_cache_bytes - reserved)));
  metrics_.running().Set(static_cast<double>(running_.size()));
  bool idle;
  {
    std::lock_guard lock(mu_);
    running_count_ = static_cast<int>(running_.size());
    idle = running_count_ == 0 && queue_.empty();
  }
  if (idle) idle_cv_.notify_all();
}

void EngineLoop::SampleDeviceMemory() {
  if (auto bytes = DeviceMemoryUsedBytes(options_.device)) metrics_.device_memory().Set(static_cast<double>(*bytes));
}

}  // namespace defkv::server
