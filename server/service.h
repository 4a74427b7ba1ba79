// defkv.v1.DefKV on gRPC's callback API. Handlers validate on the gRPC thread (cheap checks with
// precise status codes), then hand a Job to the engine loop; results come back through the
// Job's callbacks and are delivered by reactors, so no gRPC thread ever waits for the model.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "defkv/v1/defkv.grpc.pb.h"
#include "server/auth.h"
#include "server/engine_loop.h"
#include "server/metrics.h"

namespace defkv::server {

struct ServiceOptions {
  TokenAuth auth;  // disabled unless --auth_token_file is given
  int max_new_tokens_limit = 1024;
  int default_max_new_tokens = 128;  // used when a request leaves max_new_tokens unset (capped by the limit)
  std::string version;
};

class DefKVService final : public defkv::v1::DefKV::CallbackService {
 public:
  DefKVService(EngineLoop& engine, Metrics& metrics, ServiceOptions options);

  grpc::ServerUnaryReactor* Generate(grpc::CallbackServerContext* ctx, const defkv::v1::GenerateRequest* request,
                                     defkv::v1::GenerateResponse* response) override;
  grpc::ServerWriteReactor<defkv::v1::GenerateStreamResponse>* GenerateStream(
      grpc::CallbackServerContext* ctx, const defkv::v1::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* ListPresses(grpc::CallbackServerContext* ctx, const defkv::v1::ListPressesRequest* request,
                                        defkv::v1::ListPressesResponse* response) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* ctx,
                                         const defkv::v1::GetModelInfoRequest* request,
                                         defkv::v1::ModelInfo* response) override;

  // Validates a request into `job` (shared by the unary handler and the stream reactor). On error
  // the job still carries what was learnt (id, press, ratio) for the log line and metrics.
  absl::Status MakeJob(const grpc::CallbackServerContext& ctx, const defkv::v1::GenerateRequest& request, Job* job);
  // UNAUTHENTICATED (logged) when a token is required and the call lacks a valid one.
  absl::Status Authorize(const grpc::CallbackServerContext& ctx, const char* rpc);
  absl::Status Submit(std::shared_ptr<Job> job) { return engine_.Submit(std::move(job)); }
  // Counts the request and writes its log line.
  void Report(const Job& job, const JobOutcome& outcome, bool stream);
  static void FillResponse(const Job& job, const JobOutcome& outcome, defkv::v1::GenerateResponse* response);

 private:
  EngineLoop& engine_;
  Metrics& metrics_;
  ServiceOptions options_;
  std::map<std::string, std::string> press_names_;  // name or alias -> canonical name
  defkv::v1::ListPressesResponse presses_;
  std::atomic<uint64_t> next_id_{1};
  std::string id_prefix_;
};

// Why a call must stop now: its deadline passed (DEADLINE_EXCEEDED) or the client cancelled.
absl::Status CallStatus(std::chrono::system_clock::time_point deadline, bool cancelled);

}  // namespace defkv::server
