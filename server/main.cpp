// defkv-server: loads one model and serves defkv.v1.DefKV over gRPC, with grpc.health.v1,
// server reflection and Prometheus metrics. Lifecycle: listen (health NOT_SERVING) -> load the
// model -> SERVING -> on SIGTERM/SIGINT drain (NOT_SERVING, refuse new work, let admitted work
// finish within --drain_grace_seconds) -> exit 0.
#include <csignal>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "prometheus/exposer.h"
#include "server/auth.h"
#include "server/engine_loop.h"
#include "server/logging.h"
#include "server/metrics.h"
#include "server/parse_error_interceptor.h"
#include "server/service.h"

ABSL_FLAG(std::string, model, "models/stories260K", "model directory (config.json, *.safetensors, tokenizer files)");
ABSL_FLAG(std::string, host, "127.0.0.1", "address to listen on for gRPC and /metrics (0.0.0.0: all interfaces)");
ABSL_FLAG(int, port, 50051, "gRPC port (0: any free port, logged at startup)");
ABSL_FLAG(int, metrics_port, 9464, "Prometheus /metrics port (0: any free port; -1: no metrics endpoint)");
ABSL_FLAG(std::string, device, "cpu", "device: cpu, cuda or cuda:N");
ABSL_FLAG(std::string, dtype, "auto", "auto (float32 on CPU, the checkpoint's dtype on CUDA), float32, bfloat16, float16");
ABSL_FLAG(int, threads, 0, "CPU intra-op threads (0: all cores)");
ABSL_FLAG(int, prefill_chunk, 512,
          "context tokens per prefill chunk (the context goes through the model layer by layer, a "
          "chunk at a time; one engine step does the work of one chunk through every layer)");
ABSL_FLAG(int, prefill_step_tokens, 0,
          "prefill work per engine step, in context tokens through every layer (at least one chunk through one "
          "layer); between two steps every running request decodes a token. Smaller: lower inter-token latency "
          "while contexts prefill, slower prefill. 0: --prefill_chunk");
ABSL_FLAG(int, max_queue, 64, "requests allowed to wait for admission; more get RESOURCE_EXHAUSTED");
ABSL_FLAG(bool, random_weights, false,
          "benchmarking: random weights of --model's config.json shape (no safetensors needed; tokenizer still read)");
ABSL_FLAG(int, max_batch, 64, "requests running at once in the continuous batch (decoding or being prefilled)");
ABSL_FLAG(double, stats_interval_s, 10,
          "while requests run, log an \"engine stats\" line (decode step times, batch, tokens/s) this often; 0: never");
ABSL_FLAG(int, cuda_graph_max_batch, 64,
          "on CUDA, decode steps of up to this many requests replay as CUDA graphs (0: off)");
ABSL_FLAG(int64_t, kv_cache_bytes, 0,
          "KV memory budget of the running batch in bytes (0: --kv_cache_fraction of the memory free after loading)");
ABSL_FLAG(double, kv_cache_fraction, 0.9,
          "with --kv_cache_bytes=0, the fraction of free device memory (host MemAvailable on CPU) given to KV caches");
ABSL_FLAG(int64_t, max_context_tokens, 0,
          "largest prompt (context + question tokens) accepted; 0: the model's context length");
ABSL_FLAG(int, max_new_tokens_limit, 1024, "largest max_new_tokens a request may ask for");
ABSL_FLAG(int, default_max_new_tokens, 128, "max_new_tokens of requests that leave it unset");
ABSL_FLAG(int, max_receive_message_bytes, 16 << 20,
          "largest request message accepted; larger ones get RESOURCE_EXHAUSTED");
ABSL_FLAG(double, drain_grace_seconds, 30, "on SIGTERM, how long admitted requests may run before they are cancelled");
ABSL_FLAG(std::string, log_format, "text", "text or json (one JSON object per line)");
ABSL_FLAG(std::string, metrics_host, "",
          "address for /metrics (empty: the same as --host; 127.0.0.1 keeps metrics local while gRPC is public)");
ABSL_FLAG(std::string, tls_cert, "", "PEM server certificate chain: serve gRPC over TLS (with --tls_key)");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert");
ABSL_FLAG(std::string, tls_client_ca, "",
          "PEM CA bundle: require and verify client certificates signed by it (mutual TLS; needs --tls_cert)");
ABSL_FLAG(std::string, auth_token_file, "",
          "file of accepted bearer tokens, one per line: calls to defkv.v1.DefKV must send "
          "'authorization: Bearer <token>' (health checks are exempt)");
ABSL_FLAG(std::string, log_level, "info", "trace, debug, info, warn, error, critical or off");

#ifndef DEFKV_VERSION
#define DEFKV_VERSION "unknown"
#endif

namespace defkv::server {
namespace {

using spdlog::level::err;
using spdlog::level::info;

absl::StatusOr<std::string> ReadFile(const std::string& path, const char* flag) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("--", flag, ": cannot read ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Insecure, TLS (--tls_cert/--tls_key) or mutual TLS (--tls_client_ca as well).
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCredentials() {
  const std::string cert = absl::GetFlag(FLAGS_tls_cert), key = absl::GetFlag(FLAGS_tls_key);
  const std::string client_ca = absl::GetFlag(FLAGS_tls_client_ca);
  if (cert.empty() && key.empty() && client_ca.empty()) return grpc::InsecureServerCredentials();
  if (cert.empty() || key.empty()) return absl::InvalidArgumentError("--tls_cert and --tls_key go together");
  auto cert_pem = ReadFile(cert, "tls_cert");
  if (!cert_pem.ok()) return cert_pem.status();
  auto key_pem = ReadFile(key, "tls_key");
  if (!key_pem.ok()) return key_pem.status();
  grpc::SslServerCredentialsOptions opts(client_ca.empty() ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                                                           : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  if (!client_ca.empty()) {
    auto ca_pem = ReadFile(client_ca, "tls_client_ca");
    if (!ca_pem.ok()) return ca_pem.status();
    opts.pem_root_certs = *ca_pem;
  }
  opts.pem_key_cert_pairs.push_back({*key_pem, *cert_pem});
  return grpc::SslServerCredentials(opts);
}

void SetHealth(grpc::Server& server, bool serving) {
  auto* health = server.GetHealthCheckService();
  if (!health) return;
  // The overall status ("") and our service's own name, which readiness probes may ask for.
  health->SetServingStatus(serving);
  health->SetServingStatus(defkv::v1::DefKV::service_full_name(), serving);
}

int Run() {
  // Signals are taken synchronously by sigwait below; block them before any thread starts so
  // every thread inherits the mask.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  const auto started = Clock::now();
  engine::EngineOptions engine_options;
  engine_options.model_dir = absl::GetFlag(FLAGS_model);
  engine_options.device = absl::GetFlag(FLAGS_device);
  engine_options.dtype = absl::GetFlag(FLAGS_dtype);
  engine_options.threads = absl::GetFlag(FLAGS_threads);
  engine_options.prefill_chunk = absl::GetFlag(FLAGS_prefill_chunk);
  engine_options.prefill_step_tokens = absl::GetFlag(FLAGS_prefill_step_tokens);
  engine_options.random_weights = absl::GetFlag(FLAGS_random_weights);
  engine_options.cuda_graph_max_batch = absl::GetFlag(FLAGS_cuda_graph_max_batch);
  const std::string host = absl::GetFlag(FLAGS_host);
  const std::string metrics_host = absl::GetFlag(FLAGS_metrics_host).empty() ? host : absl::GetFlag(FLAGS_metrics_host);
  auto credentials = ServerCredentials();
  if (!credentials.ok()) {
    LogEvent(err, "bad TLS configuration", {{"error", std::string(credentials.status().message())}});
    return 2;
  }
  auto auth = TokenAuth::FromFile(absl::GetFlag(FLAGS_auth_token_file));
  if (!auth.ok()) {
    LogEvent(err, "bad --auth_token_file", {{"error", std::string(auth.status().message())}});
    return 2;
  }

  Metrics metrics(BuildInfo{DEFKV_VERSION, grpc::Version(), engine_options.model_dir, engine_options.device,
                            engine_options.dtype});
  std::unique_ptr<prometheus::Exposer> exposer;
  if (const int mp = absl::GetFlag(FLAGS_metrics_port); mp >= 0) {
    try {
      exposer = std::make_unique<prometheus::Exposer>(absl::StrCat(metrics_host, ":", mp));
    } catch (const std::exception& e) {
      LogEvent(err, "cannot serve /metrics", {{"address", absl::StrCat(metrics_host, ":", mp)}, {"error", e.what()}});
      return 1;
    }
    exposer->RegisterCollectable(metrics.registry());
    const auto ports = exposer->GetListeningPorts();
    LogEvent(info, "metrics listening", {{"url", absl::StrCat("http://", metrics_host, ":", ports.empty() ? mp : ports[0], "/metrics")}});
  }

  EngineLimits limits;
  limits.max_queue = absl::GetFlag(FLAGS_max_queue);
  limits.max_context_tokens = absl::GetFlag(FLAGS_max_context_tokens);
  limits.max_batch = absl::GetFlag(FLAGS_max_batch);
  limits.kv_cache_bytes = absl::GetFlag(FLAGS_kv_cache_bytes);
  limits.kv_cache_fraction = absl::GetFlag(FLAGS_kv_cache_fraction);
  limits.stats_interval_seconds = absl::GetFlag(FLAGS_stats_interval_s);
  if (limits.max_batch < 1 || limits.kv_cache_bytes < 0 || !(limits.kv_cache_fraction > 0 && limits.kv_cache_fraction <= 1) ||
      !(limits.stats_interval_seconds >= 0) || engine_options.cuda_graph_max_batch < 0) {
    LogEvent(err, "bad flags", {{"error", "--max_batch must be >= 1, --kv_cache_bytes >= 0, --kv_cache_fraction in (0, 1], "
                                          "--stats_interval_s >= 0, --cuda_graph_max_batch >= 0"}});
    return 2;
  }
  EngineLoop engine(engine_options, limits, metrics);
  ServiceOptions service_options;
  service_options.max_new_tokens_limit = absl::GetFlag(FLAGS_max_new_tokens_limit);
  service_options.default_max_new_tokens = absl::GetFlag(FLAGS_default_max_new_tokens);
  service_options.version = DEFKV_VERSION;
  service_options.auth = *std::move(auth);
  DefKVService service(engine, metrics, service_options);

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  const std::string address = absl::StrCat(host, ":", absl::GetFlag(FLAGS_port));
  builder.AddListeningPort(address, *credentials, &port);
  builder.SetMaxReceiveMessageSize(absl::GetFlag(FLAGS_max_receive_message_bytes));
  builder.RegisterService(&service);
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> interceptors;
  interceptors.push_back(MakeParseErrorInterceptorFactory(metrics));
  builder.experimental().SetInterceptorCreators(std::move(interceptors));
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port == 0) {
    LogEvent(err, "cannot listen", {{"address", address}});
    return 1;
  }
  SetHealth(*server, false);  // reachable while the model loads, but not ready
  LogEvent(info, "grpc listening",
           {{"address", absl::StrCat(host, ":", port)}, {"version", DEFKV_VERSION},
            {"tls", absl::GetFlag(FLAGS_tls_cert).empty() ? "off" : absl::GetFlag(FLAGS_tls_client_ca).empty() ? "on" : "mutual"},
            {"auth", service_options.auth.enabled() ? "bearer token" : "off"}});

  LogEvent(info, "loading model", {{"model", engine_options.model_dir}, {"device", engine_options.device},
                                   {"dtype", engine_options.dtype}});
  if (auto s = engine.Start(); !s.ok()) {
    LogEvent(err, "model failed to load", {{"model", engine_options.model_dir}, {"error", std::string(s.message())}});
    server->Shutdown();
    return 1;
  }
  const auto& mi = engine.info();
  LogEvent(info, "model loaded",
           {{"model", mi.model_dir}, {"type", mi.model_type}, {"layers", mi.num_layers}, {"kv_heads", mi.num_kv_heads},
            {"device", mi.device}, {"dtype", mi.dtype}, {"weight_bytes", mi.weight_bytes},
            {"load_s", mi.load_seconds}, {"max_context_tokens", engine.max_context_tokens()},
            {"kv_budget_bytes", engine.kv_budget_bytes()}, {"kv_pool_bytes", engine.kv_pool_bytes()},
            {"max_batch", limits.max_batch}, {"cuda_graphs", engine.cuda_graphs()}});
  SetHealth(*server, true);
  LogEvent(info, "serving", {{"address", absl::StrCat(host, ":", port)},
                             {"startup_s", SecondsBetween(started, Clock::now())}});

  int signal = 0;
  sigwait(&stop_signals, &signal);
  const double grace = absl::GetFlag(FLAGS_drain_grace_seconds);
  LogEvent(info, "draining", {{"signal", signal == SIGTERM ? "SIGTERM" : "SIGINT"}, {"grace_s", grace}});
  SetHealth(*server, false);
  engine.StopAccepting();
  const bool drained = engine.WaitIdle(Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                                          std::chrono::duration<double>(grace)));
  if (!drained) LogEvent(spdlog::level::warn, "grace period over; cancelling the requests still admitted");
  engine.Stop();  // fails what is left, so every reactor gets its Finish before the server stops
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  server->Wait();
  LogEvent(info, "stopped", {{"drained", drained}});
  return 0;
}

}  // namespace
}  // namespace defkv::server

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "serves one model over gRPC (defkv.v1.DefKV) with KV-cache compression.\n"
      "  defkv-server --model models/stories260K --port 50051 --metrics_port 9464");
  // --help lists the flags of this file (absl's default only matches files named after the binary).
  absl::FlagsUsageConfig usage;
  usage.contains_help_flags = [](absl::string_view file) { return absl::EndsWith(file, "server/main.cpp"); };
  usage.contains_helpshort_flags = usage.contains_help_flags;
  usage.version_string = [] { return std::string("defkv-server " DEFKV_VERSION "\n"); };
  absl::SetFlagsUsageConfig(usage);
  absl::ParseCommandLine(argc, argv);
  if (auto s = defkv::server::SetupLogging(absl::GetFlag(FLAGS_log_format), absl::GetFlag(FLAGS_log_level)); !s.ok()) {
    std::fprintf(stderr, "defkv-server: %s\n", std::string(s.message()).c_str());
    return 2;
  }
  return defkv::server::Run();
}
