// libFuzzer target: request validation through the real service. Each input is sent, as raw bytes,
// as the request message of Generate and then of GenerateStream to an in-process gRPC server that
// runs DefKVService over a started EngineLoop, the way server/main.cpp assembles them (the parse
// error interceptor included). The engine runs models/stories260K with small limits (prompt 64
// tokens, max_new_tokens 8), so any input the validator lets through is cheap to generate.
//
// Beyond "no crash", every input must keep these invariants (a violation aborts with a message):
//  1. each call ends with a status of its own before its 10 s deadline, and the status is one a
//     request can earn (docs/API.md): OK, INVALID_ARGUMENT, OUT_OF_RANGE or RESOURCE_EXHAUSTED,
//     never INTERNAL, UNKNOWN or UNIMPLEMENTED;
//  2. bytes that do not parse as a GenerateRequest get INVALID_ARGUMENT; requests the validator
//     must refuse (unknown press, ratio outside [0, 1), blank question, max_new_tokens < 0 or over
//     the limit) get INVALID_ARGUMENT;
//  3. an OK answer obeys its request: the request id echoed (or made up), a canonical press name,
//     at most max_new_tokens tokens, a prompt within the context limit;
//  4. a stream is deltas and then, on success only, one final message, last; the deltas' text and
//     ids concatenated equal the final text and ids;
//  5. Generate and GenerateStream validate alike: both calls end with the same code;
//  6. defkv_requests_total grows by exactly one per call, and the server still answers
//     GetModelInfo afterwards.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include <google/protobuf/stubs/logging.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/impl/codegen/client_unary_call.h>
#include <grpcpp/impl/codegen/sync_stream.h>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "defkv/v1/defkv.grpc.pb.h"
#include "server/engine_loop.h"
#include "server/logging.h"
#include "server/metrics.h"
#include "server/parse_error_interceptor.h"
#include "server/service.h"
#include "spdlog/sinks/null_sink.h"

namespace {

namespace pb = defkv::v1;
using defkv::server::DefKVService;
using defkv::server::EngineLimits;
using defkv::server::EngineLoop;
using defkv::server::Metrics;
using defkv::server::ServiceOptions;

constexpr int64_t kMaxContextTokens = 64;
constexpr int kMaxNewTokensLimit = 8;
constexpr int kDefaultMaxNewTokens = 4;

#define CHECK_OR_DIE(cond, ...)                                                  \
  do {                                                                           \
    if (!(cond)) {                                                               \
      std::fprintf(stderr, "request_fuzz: invariant broken: %s\n  ", #cond);    \
      std::fprintf(stderr, __VA_ARGS__);                                         \
      std::fprintf(stderr, "\n");                                                \
      std::abort();                                                              \
    }                                                                            \
  } while (0)

// The server under test. Built once and never destroyed: libFuzzer ends the process with exit(),
// and tearing a serving gRPC server down from static destructors would test the harness instead.
struct Harness {
  std::unique_ptr<Metrics> metrics;
  std::unique_ptr<EngineLoop> engine;
  std::unique_ptr<DefKVService> service;
  std::unique_ptr<grpc::Server> server;
  std::shared_ptr<grpc::Channel> channel;
  std::set<std::string> canonical_presses;
  std::set<std::string> press_names;  // canonical names and aliases
};

Harness* Start() {
  // Protobuf logs every string field that is not UTF-8; those inputs are expected here.
  google::protobuf::SetLogHandler([](google::protobuf::LogLevel, const char*, int, const std::string&) {});
  // Request log lines are still formatted (LogEvent's escaping is under test too), then dropped.
  if (auto s = defkv::server::SetupLogging("json", "info"); !s.ok()) std::abort();
  spdlog::default_logger()->sinks().assign({std::make_shared<spdlog::sinks::null_sink_mt>()});

  auto* h = new Harness;
  h->metrics = std::make_unique<Metrics>(defkv::server::BuildInfo{"fuzz", grpc::Version(), DEFKV_FUZZ_STORIES, "cpu", "auto"});
  defkv::engine::EngineOptions options;
  options.model_dir = DEFKV_FUZZ_STORIES;
  options.threads = 1;
  EngineLimits limits;
  limits.max_queue = 4;
  limits.max_context_tokens = kMaxContextTokens;
  h->engine = std::make_unique<EngineLoop>(options, limits, *h->metrics);
  if (auto s = h->engine->Start(); !s.ok()) {
    std::fprintf(stderr, "request_fuzz: the engine did not start: %s\n", std::string(s.message()).c_str());
    std::abort();
  }
  ServiceOptions service_options;
  service_options.max_new_tokens_limit = kMaxNewTokensLimit;
  service_options.default_max_new_tokens = kDefaultMaxNewTokens;
  service_options.version = "fuzz";
  h->service = std::make_unique<DefKVService>(*h->engine, *h->metrics, service_options);

  grpc::ServerBuilder builder;
  builder.SetMaxReceiveMessageSize(1 << 20);
  builder.RegisterService(h->service.get());
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> interceptors;
  interceptors.push_back(defkv::server::MakeParseErrorInterceptorFactory(*h->metrics));
  builder.experimental().SetInterceptorCreators(std::move(interceptors));
  h->server = builder.BuildAndStart();
  if (!h->server) std::abort();
  h->channel = h->server->InProcessChannel(grpc::ChannelArguments());

  auto stub = pb::DefKV::NewStub(h->channel);
  grpc::ClientContext ctx;
  pb::ListPressesResponse presses;
  if (!stub->ListPresses(&ctx, pb::ListPressesRequest(), &presses).ok()) std::abort();
  for (const auto& p : presses.presses()) {
    h->canonical_presses.insert(p.name());
    h->press_names.insert(p.name());
    h->press_names.insert(p.aliases().begin(), p.aliases().end());
  }
  return h;
}

double RequestsTotal(const Metrics& metrics) {
  double total = 0;
  for (const auto& family : metrics.registry()->Collect())
    if (family.name == "defkv_requests_total")
      for (const auto& m : family.metric) total += m.counter.value;
  return total;
}

void SetDeadline(grpc::ClientContext& ctx) {
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
}

std::string ByteBufferString(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  if (!buffer.Dump(&slices).ok()) std::abort();
  std::string out;
  for (const auto& s : slices) out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return out;
}

// What the validator must answer without looking at the engine; OK when the request may pass.
grpc::StatusCode ExpectedRefusal(const Harness& h, const pb::GenerateRequest& req) {
  const std::string press = req.press().empty() ? "none" : absl::AsciiStrToLower(req.press());
  if (h.press_names.count(press) == 0) return grpc::StatusCode::INVALID_ARGUMENT;
  const double ratio = req.compression_ratio();
  if (!(ratio >= 0.0 && ratio < 1.0)) return grpc::StatusCode::INVALID_ARGUMENT;
  if (absl::StripAsciiWhitespace(req.question()).empty()) return grpc::StatusCode::INVALID_ARGUMENT;
  if (req.has_max_new_tokens() && (req.max_new_tokens() < 0 || req.max_new_tokens() > kMaxNewTokensLimit))
    return grpc::StatusCode::INVALID_ARGUMENT;
  return grpc::StatusCode::OK;
}

bool AllowedCode(grpc::StatusCode code) {
  return code == grpc::StatusCode::OK || code == grpc::StatusCode::INVALID_ARGUMENT ||
         code == grpc::StatusCode::OUT_OF_RANGE || code == grpc::StatusCode::RESOURCE_EXHAUSTED;
}

void CheckAnswer(const Harness& h, const pb::GenerateRequest& req, const pb::GenerateResponse& resp, const char* rpc) {
  if (!req.request_id().empty())
    CHECK_OR_DIE(resp.request_id() == req.request_id(), "%s: id '%s' answered as '%s'", rpc, req.request_id().c_str(),
                 resp.request_id().c_str());
  CHECK_OR_DIE(!resp.request_id().empty(), "%s: the answer has no request id", rpc);
  CHECK_OR_DIE(h.canonical_presses.count(resp.press()) == 1, "%s: press '%s' is not a canonical name", rpc,
               resp.press().c_str());
  const int64_t max_new = req.has_max_new_tokens() ? req.max_new_tokens() : kDefaultMaxNewTokens;
  CHECK_OR_DIE(resp.usage().generated_tokens() <= max_new && resp.token_ids_size() <= max_new,
               "%s: %lld tokens generated, %d ids, max_new_tokens %lld", rpc,
               static_cast<long long>(resp.usage().generated_tokens()), resp.token_ids_size(),
               static_cast<long long>(max_new));
  const int64_t prompt = resp.usage().context_tokens() + resp.usage().question_tokens();
  CHECK_OR_DIE(prompt <= kMaxContextTokens, "%s: a prompt of %lld tokens passed the limit of %lld", rpc,
               static_cast<long long>(prompt), static_cast<long long>(kMaxContextTokens));
}

grpc::StatusCode CallGenerate(const Harness& h, const grpc::ByteBuffer& request, const pb::GenerateRequest* parsed) {
  grpc::ClientContext ctx;
  SetDeadline(ctx);
  grpc::ByteBuffer response;
  const grpc::internal::RpcMethod method("/defkv.v1.DefKV/Generate", grpc::internal::RpcMethod::NORMAL_RPC);
  // Raw bytes on the wire, so the server's own parsing is under test; the generated stubs use
  // the same call with their message types.
  const grpc::Status status =
      grpc::internal::BlockingUnaryCall<grpc::ByteBuffer, grpc::ByteBuffer>(h.channel.get(), method, &ctx, request, &response);
  CHECK_OR_DIE(status.error_code() != grpc::StatusCode::DEADLINE_EXCEEDED, "Generate got no status within 10 s");
  CHECK_OR_DIE(AllowedCode(status.error_code()), "Generate ended with code %d: %s", status.error_code(),
               status.error_message().c_str());
  if (status.ok()) {
    pb::GenerateResponse resp;
    CHECK_OR_DIE(resp.ParseFromString(ByteBufferString(response)), "Generate's answer does not parse");
    CHECK_OR_DIE(parsed != nullptr, "Generate accepted bytes that do not parse as a GenerateRequest");
    CheckAnswer(h, *parsed, resp, "Generate");
  }
  return status.error_code();
}

grpc::StatusCode CallGenerateStream(const Harness& h, const grpc::ByteBuffer& request, const pb::GenerateRequest* parsed) {
  grpc::ClientContext ctx;
  SetDeadline(ctx);
  const grpc::internal::RpcMethod method("/defkv.v1.DefKV/GenerateStream", grpc::internal::RpcMethod::SERVER_STREAMING);
  std::unique_ptr<grpc::ClientReader<grpc::ByteBuffer>> reader(
      grpc::internal::ClientReaderFactory<grpc::ByteBuffer>::Create(h.channel.get(), method, &ctx, request));
  std::vector<pb::GenerateStreamResponse> messages;
  for (grpc::ByteBuffer buffer; reader->Read(&buffer);) {
    CHECK_OR_DIE(messages.empty() || !messages.back().has_final(), "GenerateStream wrote after its final message");
    CHECK_OR_DIE(messages.emplace_back().ParseFromString(ByteBufferString(buffer)), "a stream message does not parse");
  }
  const grpc::Status status = reader->Finish();
  CHECK_OR_DIE(status.error_code() != grpc::StatusCode::DEADLINE_EXCEEDED, "GenerateStream got no status within 10 s");
  CHECK_OR_DIE(AllowedCode(status.error_code()), "GenerateStream ended with code %d: %s", status.error_code(),
               status.error_message().c_str());
  const bool has_final = !messages.empty() && messages.back().has_final();
  CHECK_OR_DIE(status.ok() == has_final, "GenerateStream ended with code %d after %zu messages, final: %d",
               status.error_code(), messages.size(), has_final);
  if (status.ok()) {
    CHECK_OR_DIE(parsed != nullptr, "GenerateStream accepted bytes that do not parse as a GenerateRequest");
    std::string text;
    std::vector<int32_t> ids;
    for (size_t i = 0; i + 1 < messages.size(); ++i) {
      CHECK_OR_DIE(messages[i].has_delta(), "stream message %zu is neither a delta nor the last", i);
      text += messages[i].delta().text();
      ids.insert(ids.end(), messages[i].delta().token_ids().begin(), messages[i].delta().token_ids().end());
    }
    const pb::GenerateResponse& final = messages.back().final();
    CHECK_OR_DIE(text == final.text(), "the deltas add up to '%s', the final text is '%s'", text.c_str(),
                 final.text().c_str());
    CHECK_OR_DIE(ids == std::vector<int32_t>(final.token_ids().begin(), final.token_ids().end()),
                 "the deltas' %zu ids differ from the final %d ids", ids.size(), final.token_ids_size());
    CheckAnswer(h, *parsed, final, "GenerateStream");
  }
  return status.error_code();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static Harness* h = Start();
  grpc::Slice slice(data, size);
  const grpc::ByteBuffer request(&slice, 1);
  pb::GenerateRequest req;
  const bool parses = req.ParseFromArray(data, static_cast<int>(size));
  const pb::GenerateRequest* parsed = parses ? &req : nullptr;
  const grpc::StatusCode expected = parses ? ExpectedRefusal(*h, req) : grpc::StatusCode::INVALID_ARGUMENT;

  const double before = RequestsTotal(*h->metrics);
  const grpc::StatusCode unary = CallGenerate(*h, request, parsed);
  CHECK_OR_DIE(RequestsTotal(*h->metrics) == before + 1, "Generate counted %g times in defkv_requests_total",
               RequestsTotal(*h->metrics) - before);
  const grpc::StatusCode stream = CallGenerateStream(*h, request, parsed);
  CHECK_OR_DIE(RequestsTotal(*h->metrics) == before + 2, "GenerateStream counted %g times in defkv_requests_total",
               RequestsTotal(*h->metrics) - before - 1);

  if (expected != grpc::StatusCode::OK)
    CHECK_OR_DIE(unary == expected && stream == expected, "expected code %d, Generate got %d, GenerateStream %d",
                 expected, unary, stream);
  // The engine's memory check may refuse one call and admit the next; validation may not differ.
  if (unary != grpc::StatusCode::RESOURCE_EXHAUSTED && stream != grpc::StatusCode::RESOURCE_EXHAUSTED)
    CHECK_OR_DIE(unary == stream, "Generate ended with %d, GenerateStream with %d", unary, stream);

  grpc::ClientContext ctx;
  SetDeadline(ctx);
  pb::ModelInfo info;
  const grpc::Status alive = pb::DefKV::NewStub(h->channel)->GetModelInfo(&ctx, pb::GetModelInfoRequest(), &info);
  CHECK_OR_DIE(alive.ok(), "GetModelInfo failed after the request: %d %s", alive.error_code(),
               alive.error_message().c_str());
  return 0;
}
