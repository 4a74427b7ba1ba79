// defkv: command-line client of defkv-server (gRPC only; it never links core/).
//   defkv [--addr HOST:PORT] [--timeout SECONDS] generate --question Q [--context-file F] [--press P]
//         [--ratio R] [--stream] [--json] ...
//   defkv presses | info | health
// The exit code is the gRPC status code of the call (0 OK, 3 INVALID_ARGUMENT, 14 UNAVAILABLE, ...);
// 64 means the command line itself was wrong.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <google/protobuf/util/json_util.h>
#include <grpcpp/grpcpp.h>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "client/common.h"
#include "defkv/v1/defkv.grpc.pb.h"
#include "grpc/health/v1/health.grpc.pb.h"

namespace {

namespace pb = defkv::v1;
using defkv::client::Args;
using defkv::client::Has;
using defkv::client::Last;
constexpr int kUsageError = 64;  // EX_USAGE: above every gRPC status code

constexpr const char* kUsage = R"(usage: defkv [--addr HOST:PORT] [--timeout SECONDS] COMMAND [options]

commands:
  generate   ask a question about a context; the answer goes to stdout
      --question Q          required
      --context-file F      the context (F = '-' or no flag with piped stdin: read stdin)
      --press P             press name or alias (defkv presses lists them; default none)
      --ratio R             compression ratio in [0, 1): fraction of context KV entries removed
      --option NAME=VALUE   press option, repeatable
      --max-new-tokens N    --temperature T  --top-k K  --top-p P  --seed S
      --stop S              stop string, repeatable
      --answer-prefix A     --no-chat-template  --request-id ID
      --stream              print text as it is generated
      --json                print the response (or each stream message) as JSON
  presses    list presses with aliases and options   [--json]
  info       describe the served model              [--json]
  health     grpc.health.v1 check: prints SERVING or NOT_SERVING (exit 14 when not serving)

global: --addr (default 127.0.0.1:50051, or $DEFKV_ADDR), --timeout seconds (default 600; 0: none)
        --token T (or $DEFKV_TOKEN): bearer token for servers started with --auth_token_file
        --tls_ca F: PEM CA that signed the server certificate (switches to TLS)
        --tls_cert F --tls_key F: client certificate and key, for servers that require them (mTLS)
exit code: the gRPC status code (0 OK, 3 INVALID_ARGUMENT, 4 DEADLINE_EXCEEDED, 8 RESOURCE_EXHAUSTED,
11 OUT_OF_RANGE, 14 UNAVAILABLE, ...); 64: bad command line
)";

const std::vector<std::string> kSwitches = {"stream", "json", "no-chat-template", "help"};

int Fail(const grpc::Status& s) {
  std::cerr << "defkv: " << defkv::client::StatusCodeName(s.error_code()) << ": " << s.error_message() << "\n";
  return static_cast<int>(s.error_code());
}

int UsageError(const std::string& msg) {
  std::cerr << "defkv: " << msg << "\n(defkv --help for usage)\n";
  return kUsageError;
}

std::string ToJson(const google::protobuf::Message& m) {
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  options.always_print_primitive_fields = true;
  std::string out;
  (void)google::protobuf::util::MessageToJsonString(m, &out, options);
  return out;
}

class Client {
 public:
  Client(const std::string& addr, double timeout_s, std::shared_ptr<grpc::ChannelCredentials> creds, std::string token)
      : timeout_s_(timeout_s), token_(std::move(token)), channel_(defkv::client::MakeChannel(addr, std::move(creds))) {}
  std::unique_ptr<grpc::ClientContext> Context() const {
    auto ctx = std::make_unique<grpc::ClientContext>();
    defkv::client::PrepareContext(*ctx, token_, timeout_s_);
    return ctx;
  }
  std::shared_ptr<grpc::Channel> channel() const { return channel_; }

 private:
  double timeout_s_;
  std::string token_;
  std::shared_ptr<grpc::Channel> channel_;
};

void PrintSummary(const pb::GenerateResponse& r) {
  const auto& u = r.usage();
  const auto& t = r.timings();
  std::fprintf(stderr,
               "[%s] press=%s ratio=%g finish=%s tokens: context=%lld question=%lld generated=%lld | "
               "kv bytes %lld -> %lld | ttft %.3fs total %.3fs\n",
               r.request_id().c_str(), r.press().c_str(), r.compression_ratio(),
               pb::FinishReason_Name(r.finish_reason()).c_str(), static_cast<long long>(u.context_tokens()),
               static_cast<long long>(u.question_tokens()), static_cast<long long>(u.generated_tokens()),
               static_cast<long long>(u.kv_bytes_before()), static_cast<long long>(u.kv_bytes_after()),
               t.time_to_first_token(), t.total());
}

std::optional<std::string> ReadContext(const Args& a, std::string* error) {
  const std::string file = Last(a, "context-file");
  if (file == "-" || (file.empty() && !isatty(STDIN_FILENO))) {
    return std::string(std::istreambuf_iterator<char>(std::cin), {});
  }
  if (file.empty()) return std::string();
  std::ifstream in(file, std::ios::binary);
  if (!in) {
    *error = "cannot read --context-file " + file;
    return std::nullopt;
  }
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

int Generate(const Client& client, const Args& a) {
  pb::GenerateRequest req;
  std::string error;
  auto context = ReadContext(a, &error);
  if (!context) return UsageError(error);
  req.set_context(*context);
  req.set_question(Last(a, "question"));
  req.set_answer_prefix(Last(a, "answer-prefix"));
  req.set_press(Last(a, "press", "none"));
  req.set_request_id(Last(a, "request-id"));
  if (a.switches.count("no-chat-template")) req.set_use_chat_template(false);
  auto number = [&](const char* name, auto set) -> bool {
    if (!Has(a, name)) return true;
    double v;
    if (!absl::SimpleAtod(Last(a, name), &v)) return false;
    set(v);
    return true;
  };
  if (!number("ratio", [&](double v) { req.set_compression_ratio(v); }) ||
      !number("max-new-tokens", [&](double v) { req.set_max_new_tokens(static_cast<int32_t>(v)); }) ||
      !number("temperature", [&](double v) { req.set_temperature(v); }) ||
      !number("top-k", [&](double v) { req.set_top_k(static_cast<int32_t>(v)); }) ||
      !number("top-p", [&](double v) { req.set_top_p(v); }) ||
      !number("seed", [&](double v) { req.set_seed(static_cast<uint64_t>(v)); }))
    return UsageError("a numeric option (--ratio, --max-new-tokens, --temperature, --top-k, --top-p, --seed) is not a number");
  if (Has(a, "option"))
    for (const auto& kv : a.values.at("option")) {
      const auto eq = kv.find('=');
      if (eq == std::string::npos) return UsageError("--option wants NAME=VALUE, got '" + kv + "'");
      (*req.mutable_press_options())[kv.substr(0, eq)] = kv.substr(eq + 1);
    }
  if (Has(a, "stop"))
    for (const auto& s : a.values.at("stop")) req.add_stop(s);

  auto stub = pb::DefKV::NewStub(client.channel());
  auto ctx = client.Context();
  const bool json = a.switches.count("json") > 0;
  if (!a.switches.count("stream")) {
    pb::GenerateResponse resp;
    grpc::Status s = stub->Generate(ctx.get(), req, &resp);
    if (!s.ok()) return Fail(s);
    if (json) {
      std::cout << ToJson(resp) << "\n";
    } else {
      std::cout << resp.text() << "\n";
      PrintSummary(resp);
    }
    return 0;
  }
  auto reader = stub->GenerateStream(ctx.get(), req);
  pb::GenerateStreamResponse msg;
  std::optional<pb::GenerateResponse> final_msg;
  while (reader->Read(&msg)) {
    if (json) {
      std::cout << ToJson(msg) << std::endl;
    } else if (msg.has_delta()) {
      std::cout << msg.delta().text() << std::flush;  // text shows up as it is generated
    }
    if (msg.has_final()) final_msg = msg.final();
  }
  grpc::Status s = reader->Finish();
  if (!json) std::cout << "\n";
  if (!s.ok()) return Fail(s);
  if (final_msg && !json) PrintSummary(*final_msg);
  return 0;
}

int Presses(const Client& client, const Args& a) {
  auto stub = pb::DefKV::NewStub(client.channel());
  auto ctx = client.Context();
  pb::ListPressesResponse resp;
  if (auto s = stub->ListPresses(ctx.get(), {}, &resp); !s.ok()) return Fail(s);
  if (a.switches.count("json")) {
    std::cout << ToJson(resp) << "\n";
    return 0;
  }
  for (const auto& p : resp.presses()) {
    std::cout << p.name();
    if (p.aliases_size()) std::cout << " (aliases: " << absl::StrJoin(p.aliases(), ", ") << ")";
    std::cout << "\n    " << p.description() << "\n";
    for (const auto& o : p.options())
      std::cout << "    --option " << o.name() << "=<" << o.type() << "> default " << o.default_value() << ": "
                << o.description() << "\n";
  }
  return 0;
}

int Info(const Client& client, const Args& a) {
  auto stub = pb::DefKV::NewStub(client.channel());
  auto ctx = client.Context();
  pb::ModelInfo info;
  if (auto s = stub->GetModelInfo(ctx.get(), {}, &info); !s.ok()) return Fail(s);
  if (a.switches.count("json")) {
    std::cout << ToJson(info) << "\n";
    return 0;
  }
  std::cout << "model          " << info.model_dir() << " (" << info.model_type() << ")\n"
            << "layers         " << info.num_layers() << ", heads " << info.num_heads() << ", kv heads "
            << info.num_kv_heads() << ", head dim " << info.head_dim() << "\n"
            << "context        " << info.max_context() << " tokens (server accepts prompts up to "
            << info.max_context_tokens() << "), max_new_tokens up to " << info.max_new_tokens_limit() << "\n"
            << "device         " << info.device() << ", dtype " << info.dtype() << "\n"
            << "tokenizer      " << info.tokenizer() << "\n"
            << "chat template  " << (info.chat_template().empty() ? "(none)" : info.chat_template()) << "\n"
            << "server         " << info.server_version() << "\n";
  return 0;
}

int Health(const Client& client, const Args& a) {
  auto stub = grpc::health::v1::Health::NewStub(client.channel());
  auto ctx = client.Context();
  grpc::health::v1::HealthCheckRequest req;
  req.set_service(Last(a, "service"));
  grpc::health::v1::HealthCheckResponse resp;
  if (auto s = stub->Check(ctx.get(), req, &resp); !s.ok()) return Fail(s);
  std::cout << grpc::health::v1::HealthCheckResponse::ServingStatus_Name(resp.status()) << "\n";
  return resp.status() == grpc::health::v1::HealthCheckResponse::SERVING ? 0
                                                                         : static_cast<int>(grpc::StatusCode::UNAVAILABLE);
}

}  // namespace

int main(int argc, char** argv) {
  std::string error;
  auto args = defkv::client::ParseArgs(argc, argv, kSwitches, &error);
  if (!args) return UsageError(error);
  if (args->switches.count("help") || args->command.empty() || args->command == "help") {
    std::cout << kUsage;
    return args->command.empty() && !args->switches.count("help") ? kUsageError : 0;
  }
  const char* env_addr = std::getenv("DEFKV_ADDR");
  const std::string addr = Last(*args, "addr", env_addr ? env_addr : "127.0.0.1:50051");
  double timeout = 600;
  if (Has(*args, "timeout") && !absl::SimpleAtod(Last(*args, "timeout"), &timeout))
    return UsageError("--timeout wants seconds");
  std::string cred_error;
  auto creds = defkv::client::Credentials(*args, &cred_error);
  if (!creds) return UsageError(cred_error);
  Client client(addr, timeout, creds, defkv::client::BearerToken(*args));
  const std::string& cmd = args->command;
  if (cmd == "generate") {
    if (!Has(*args, "question")) return UsageError("generate needs --question");
    return Generate(client, *args);
  }
  if (cmd == "presses") return Presses(client, *args);
  if (cmd == "info") return Info(client, *args);
  if (cmd == "health") return Health(client, *args);
  return UsageError("unknown command '" + cmd + "'");
}
