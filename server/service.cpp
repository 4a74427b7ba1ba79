#include "server/service.h"

#include <chrono>
#include <cmath>
#include <mutex>
#include <optional>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "core/press/press_info.h"
#include "server/logging.h"

namespace defkv::server {
namespace {

namespace pb = defkv::v1;

constexpr size_t kMaxStopStrings = 16;
constexpr size_t kMaxRequestIdBytes = 128;

grpc::Status ToGrpc(const absl::Status& s) {
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

pb::FinishReason ToProto(engine::FinishReason r) {
  switch (r) {
    case engine::FinishReason::kEos: return pb::FINISH_REASON_EOS;
    case engine::FinishReason::kStopString: return pb::FINISH_REASON_STOP_STRING;
    case engine::FinishReason::kLength: return pb::FINISH_REASON_LENGTH;
    case engine::FinishReason::kCancelled: return pb::FINISH_REASON_CANCELLED;
  }
  return pb::FINISH_REASON_UNSPECIFIED;
}

// The outcome of a request refused before it reached the engine.
JobOutcome Refused(absl::Status status) {
  JobOutcome out;
  out.status = std::move(status);
  return out;
}

bool PrintableAscii(const std::string& s) {
  for (unsigned char c : s)
    if (c < 0x21 || c > 0x7e) return false;
  return true;
}

// Streams one request: deltas as the engine produces text, then the final message. The engine
// thread never waits on the network: text that arrives while a write is in flight is appended to
// the pending delta and goes out with the next write. The reactor is deleted when both gRPC
// (OnDone) and the engine (the job's on_done) are finished with it; the engine side never touches
// the call's context, which gRPC may free once the RPC is finished.
class StreamReactor final : public grpc::ServerWriteReactor<pb::GenerateStreamResponse> {
 public:
  StreamReactor(DefKVService& service, grpc::CallbackServerContext* ctx, const pb::GenerateRequest& request)
      : deadline_(ctx->deadline()) {
    auto job = std::make_shared<Job>();
    absl::Status rejected = service.MakeJob(*ctx, request, job.get());
    if (rejected.ok()) {
      Job& j = *job;
      j.on_text = [this](std::string_view text, std::span<const int32_t> ids) { return PushText(text, ids); };
      j.check = [this] { return CallStatus(deadline_, cancelled_.load(std::memory_order_relaxed)); };
      j.on_done = [this, &service, &j](const JobOutcome& out) {
        service.Report(j, out, /*stream=*/true);
        Complete(j, out);
        Unref();
      };
      refs_.fetch_add(1);  // the engine's reference, dropped in on_done
      rejected = service.Submit(job);
      if (rejected.ok()) return;
      refs_.fetch_sub(1);
    }
    service.Report(*job, Refused(rejected), /*stream=*/true);
    Finish(ToGrpc(rejected));
  }

  void OnWriteDone(bool ok) override {
    {
      std::lock_guard lock(mu_);
      write_in_flight_ = false;
      if (!ok) broken_ = true;  // the client is gone: stop writing, the engine stops at its next step
    }
    Pump();
  }
  void OnCancel() override { cancelled_.store(true, std::memory_order_relaxed); }
  void OnDone() override { Unref(); }

 private:
  // Engine thread. False once the stream can no longer deliver text.
  bool PushText(std::string_view text, std::span<const int32_t> ids) {
    {
      std::lock_guard lock(mu_);
      if (broken_ || finished_ || cancelled_.load(std::memory_order_relaxed)) return false;
      pending_text_.append(text);
      pending_ids_.insert(pending_ids_.end(), ids.begin(), ids.end());
    }
    Pump();
    return true;
  }

  // Engine thread: queue the final message behind the pending text, or end with the error.
  void Complete(const Job& job, const JobOutcome& out) {
    {
      std::lock_guard lock(mu_);
      if (out.status.ok()) {
        final_.emplace();
        DefKVService::FillResponse(job, out, final_->mutable_final());
      } else {
        error_ = ToGrpc(out.status);
      }
    }
    Pump();
  }

  // Starts the next write, or finishes the RPC once nothing is left to write. gRPC is called
  // outside the lock because a reaction may run inline on this thread.
  void Pump() {
    const pb::GenerateStreamResponse* write = nullptr;
    std::optional<grpc::Status> finish;
    {
      std::lock_guard lock(mu_);
      if (write_in_flight_ || finished_) return;
      if (broken_) {
        finish = grpc::Status(grpc::StatusCode::CANCELLED, "the stream was interrupted");
      } else if (error_) {
        finish = *error_;  // text not yet sent is dropped: the status says what happened
      } else if (!pending_text_.empty() || !pending_ids_.empty()) {
        in_flight_.Clear();
        in_flight_.mutable_delta()->set_text(std::move(pending_text_));
        in_flight_.mutable_delta()->mutable_token_ids()->Add(pending_ids_.begin(), pending_ids_.end());
        pending_text_.clear();
        pending_ids_.clear();
        write = &in_flight_;
      } else if (final_) {
        in_flight_ = *std::move(final_);
        final_.reset();
        final_written_ = true;
        write = &in_flight_;
      } else if (final_written_) {
        finish = grpc::Status::OK;
      }
      write_in_flight_ = write != nullptr;
      finished_ = finish.has_value();
    }
    if (write) StartWrite(write);
    if (finish) Finish(*finish);
  }

  void Unref() {
    if (refs_.fetch_sub(1) == 1) delete this;
  }

  const std::chrono::system_clock::time_point deadline_;
  std::atomic<int> refs_{1};  // gRPC's reference, dropped in OnDone
  std::atomic<bool> cancelled_{false};
  std::mutex mu_;
  bool write_in_flight_ = false, broken_ = false, finished_ = false, final_written_ = false;
  std::string pending_text_;
  std::vector<int32_t> pending_ids_;
  std::optional<pb::GenerateStreamResponse> final_;
  std::optional<grpc::Status> error_;
  pb::GenerateStreamResponse in_flight_;  // must outlive its StartWrite until OnWriteDone
};

}  // namespace

absl::Status CallStatus(std::chrono::system_clock::time_point deadline, bool cancelled) {
  if (std::chrono::system_clock::now() >= deadline)
    return absl::DeadlineExceededError("the request's deadline passed before generation finished");
  if (cancelled) return absl::CancelledError("the client cancelled the request");
  return absl::OkStatus();
}

DefKVService::DefKVService(EngineLoop& engine, Metrics& metrics, ServiceOptions options)
    : engine_(engine), metrics_(metrics), options_(std::move(options)) {
  for (const auto& p : press::ListPresses()) {
    press_names_[p.name] = p.name;
    for (const auto& a : p.aliases) press_names_[a] = p.name;
    auto* out = presses_.add_presses();
    out->set_name(p.name);
    for (const auto& a : p.aliases) out->add_aliases(a);
    out->set_description(p.description);
    for (const auto& o : p.options) {
      auto* opt = out->add_options();
      opt->set_name(o.name);
      opt->set_type(o.type);
      opt->set_default_value(o.default_value);
      opt->set_description(o.description);
    }
  }
  // Request ids made up here are unique across restarts: start time, then a counter.
  id_prefix_ = absl::StrFormat(
      "%x", std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count());
}

absl::Status DefKVService::Authorize(const grpc::CallbackServerContext& ctx, const char* rpc) {
  absl::Status s = options_.auth.Check(ctx);
  if (!s.ok()) LogEvent(spdlog::level::warn, "unauthenticated", {{"rpc", rpc}, {"peer", ctx.peer()}, {"error", std::string(s.message())}});
  return s;
}

absl::Status DefKVService::MakeJob(const grpc::CallbackServerContext& ctx, const pb::GenerateRequest& req, Job* job) {
  job->arrival = Clock::now();
  job->press = "unknown";
  job->id = absl::StrCat(id_prefix_, "-", next_id_.fetch_add(1));
  if (auto s = options_.auth.Check(ctx); !s.ok()) return s;
  if (req.request_id().size() > kMaxRequestIdBytes || !PrintableAscii(req.request_id()))
    return absl::InvalidArgumentError(
        absl::StrCat("request_id must be at most ", kMaxRequestIdBytes, " printable ASCII characters without spaces"));
  if (!req.request_id().empty()) job->id = req.request_id();

  const std::string press_name = req.press().empty() ? "none" : absl::AsciiStrToLower(req.press());
  auto it = press_names_.find(press_name);
  if (it == press_names_.end()) {
    std::vector<std::string> known;
    for (const auto& p : presses_.presses()) known.push_back(p.name());
    return absl::InvalidArgumentError(absl::StrCat("unknown press '", req.press(),
                                                   "'; known presses: ", absl::StrJoin(known, ", ")));
  }
  job->press = it->second;

  auto& r = job->request;
  const double ratio = req.compression_ratio();
  r.compression_ratio = ratio;
  if (!std::isfinite(ratio) || ratio < 0.0 || ratio >= 1.0)
    return absl::InvalidArgumentError(
        absl::StrCat("compression_ratio must be in [0, 1) (the fraction of context entries removed), got ", ratio));
  if (absl::StripAsciiWhitespace(req.question()).empty())
    return absl::InvalidArgumentError("question is empty");

  int max_new = std::min(options_.default_max_new_tokens, options_.max_new_tokens_limit);
  if (req.has_max_new_tokens()) {
    max_new = req.max_new_tokens();
    if (max_new < 0) return absl::InvalidArgumentError(absl::StrCat("max_new_tokens must be >= 0, got ", max_new));
    if (max_new > options_.max_new_tokens_limit)
      return absl::InvalidArgumentError(absl::StrCat("max_new_tokens ", max_new, " is over this server's limit of ",
                                                     options_.max_new_tokens_limit, " (--max_new_tokens_limit)"));
  }
  if (!std::isfinite(req.temperature()) || req.temperature() < 0)
    return absl::InvalidArgumentError("temperature must be a finite number >= 0 (0: greedy)");
  if (req.top_k() < 0) return absl::InvalidArgumentError("top_k must be >= 0 (0: off)");
  if (req.has_top_p() && !(req.top_p() > 0.0 && req.top_p() <= 1.0))
    return absl::InvalidArgumentError("top_p must be in (0, 1]");
  if (static_cast<size_t>(req.stop_size()) > kMaxStopStrings)
    return absl::InvalidArgumentError(absl::StrCat("at most ", kMaxStopStrings, " stop strings"));
  for (const auto& s : req.stop())
    if (s.empty()) return absl::InvalidArgumentError("stop strings must not be empty");

  r.context = req.context();
  r.question = req.question();
  r.answer_prefix = req.answer_prefix();
  r.use_chat_template = !req.has_use_chat_template() || req.use_chat_template();
  r.max_new_tokens = max_new;
  r.press = job->press;
  r.press_options.insert(req.press_options().begin(), req.press_options().end());
  r.sampling.temperature = req.temperature();
  r.sampling.top_k = req.top_k();
  r.sampling.top_p = req.has_top_p() ? req.top_p() : 1.0;
  r.sampling.seed = req.seed();
  r.stop.assign(req.stop().begin(), req.stop().end());
  return absl::OkStatus();
}

void DefKVService::FillResponse(const Job& job, const JobOutcome& out, pb::GenerateResponse* resp) {
  const auto& res = out.result;
  resp->set_request_id(job.id);
  resp->set_text(res.text);
  resp->mutable_token_ids()->Add(res.token_ids.begin(), res.token_ids.end());
  resp->set_finish_reason(ToProto(res.finish_reason));
  resp->set_press(job.press);
  resp->set_compression_ratio(job.request.compression_ratio);
  auto* u = resp->mutable_usage();
  u->set_context_tokens(res.usage.context_tokens);
  u->set_question_tokens(res.usage.question_tokens);
  u->set_generated_tokens(res.usage.generated_tokens);
  u->set_kv_entries_before(res.usage.kv_entries_before);
  u->set_kv_entries_after(res.usage.kv_entries_after);
  u->set_kv_bytes_before(res.usage.kv_bytes_before);
  u->set_kv_bytes_after(res.usage.kv_bytes_after);
  u->set_kv_entries_final(res.usage.kv_entries);
  u->set_kv_bytes_final(res.usage.kv_bytes);
  auto* t = resp->mutable_timings();
  t->set_queue(out.queue_seconds);
  t->set_tokenize(res.timings.tokenize);
  t->set_prefill(res.timings.prefill);
  t->set_compression(res.timings.compression);
  t->set_decode(res.timings.decode);
  t->set_time_to_first_token(out.ttft_seconds);
  t->set_total(out.total_seconds);
}

void DefKVService::Report(const Job& job, const JobOutcome& out, bool stream) {
  metrics_.RequestFinished(job.press.empty() ? "unknown" : job.press, out.status.code());
  nlohmann::ordered_json f;
  f["id"] = job.id;
  f["rpc"] = stream ? "GenerateStream" : "Generate";
  f["code"] = CodeName(out.status.code());
  f["press"] = job.press;
  f["ratio"] = job.request.compression_ratio;
  const auto& u = out.result.usage;
  const auto& t = out.result.timings;
  f["context_tokens"] = u.context_tokens;
  f["question_tokens"] = u.question_tokens;
  f["generated_tokens"] = u.generated_tokens;
  f["kv_bytes_before"] = u.kv_bytes_before;
  f["kv_bytes_after"] = u.kv_bytes_after;
  f["finish"] = out.status.ok() ? engine::FinishReasonName(out.result.finish_reason) : "error";
  f["queue_s"] = out.queue_seconds;
  f["prefill_s"] = t.prefill;
  f["compression_s"] = t.compression;
  f["decode_s"] = t.decode;
  f["ttft_s"] = out.ttft_seconds;
  f["total_s"] = out.total_seconds;
  if (!out.status.ok()) f["error"] = std::string(out.status.message());
  LogEvent(out.status.ok() ? spdlog::level::info : spdlog::level::warn, "request", f);
}

grpc::ServerUnaryReactor* DefKVService::Generate(grpc::CallbackServerContext* ctx, const pb::GenerateRequest* request,
                                                 pb::GenerateResponse* response) {
  auto* reactor = ctx->DefaultReactor();
  auto job = std::make_shared<Job>();
  absl::Status rejected = MakeJob(*ctx, *request, job.get());
  if (rejected.ok()) {
    Job* j = job.get();
    j->on_text = [](std::string_view, std::span<const int32_t>) { return true; };
    // The context stays valid until this reactor is finished, which only on_done does.
    j->check = [ctx, deadline = ctx->deadline()] { return CallStatus(deadline, ctx->IsCancelled()); };
    // `j` stays alive while on_done runs: the engine holds the job.
    j->on_done = [this, reactor, response, j](const JobOutcome& out) {
      if (out.status.ok()) FillResponse(*j, out, response);
      Report(*j, out, /*stream=*/false);
      reactor->Finish(ToGrpc(out.status));
    };
    rejected = engine_.Submit(job);
    if (rejected.ok()) return reactor;
  }
  Report(*job, Refused(rejected), /*stream=*/false);
  reactor->Finish(ToGrpc(rejected));
  return reactor;
}

grpc::ServerWriteReactor<pb::GenerateStreamResponse>* DefKVService::GenerateStream(grpc::CallbackServerContext* ctx,
                                                                                   const pb::GenerateRequest* request) {
  return new StreamReactor(*this, ctx, *request);
}

grpc::ServerUnaryReactor* DefKVService::ListPresses(grpc::CallbackServerContext* ctx, const pb::ListPressesRequest*,
                                                    pb::ListPressesResponse* response) {
  auto* reactor = ctx->DefaultReactor();
  if (auto s = Authorize(*ctx, "ListPresses"); !s.ok()) {
    reactor->Finish(ToGrpc(s));
    return reactor;
  }
  *response = presses_;
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* DefKVService::GetModelInfo(grpc::CallbackServerContext* ctx, const pb::GetModelInfoRequest*,
                                                     pb::ModelInfo* response) {
  auto* reactor = ctx->DefaultReactor();
  if (auto s = Authorize(*ctx, "GetModelInfo"); !s.ok()) {
    reactor->Finish(ToGrpc(s));
    return reactor;
  }
  if (!engine_.ready()) {
    reactor->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the model is not loaded (loading or shutting down)"));
    return reactor;
  }
  const auto& info = engine_.info();
  response->set_model_dir(info.model_dir);
  response->set_model_type(info.model_type);
  response->set_num_layers(info.num_layers);
  response->set_num_heads(info.num_heads);
  response->set_num_kv_heads(info.num_kv_heads);
  response->set_head_dim(info.head_dim);
  response->set_hidden_size(info.hidden_size);
  response->set_vocab_size(info.vocab_size);
  response->set_max_context(info.max_context);
  response->set_max_context_tokens(engine_.max_context_tokens());
  response->set_max_new_tokens_limit(options_.max_new_tokens_limit);
  response->set_dtype(info.dtype);
  response->set_device(info.device);
  response->set_tokenizer(info.tokenizer);
  response->set_chat_template(info.chat_template);
  response->set_weight_bytes(static_cast<int64_t>(info.weight_bytes));
  response->set_load_seconds(info.load_seconds);
  response->set_server_version(options_.version);
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace defkv::server
