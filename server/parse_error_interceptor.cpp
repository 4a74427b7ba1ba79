#include "server/parse_error_interceptor.h"

#include <string>

#include <google/protobuf/descriptor.h>

#include "defkv/v1/defkv.grpc.pb.h"
#include "server/logging.h"

namespace defkv::server {
namespace {

using grpc::experimental::InterceptionHookPoints;

constexpr char kServicePrefix[] = "/defkv.v1.DefKV/";  // method paths are /package.Service/Method

class ParseErrorInterceptor final : public grpc::experimental::Interceptor {
 public:
  ParseErrorInterceptor(std::string method, Metrics& metrics) : method_(std::move(method)), metrics_(metrics) {}

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::PRE_SEND_STATUS)) {
      const grpc::Status status = methods->GetSendStatus();
      if (status.error_code() == grpc::StatusCode::UNIMPLEMENTED && status.error_message().empty()) {
        const std::string message =
            "the request message could not be parsed (string fields must be valid UTF-8; send raw bytes "
            "as UTF-8 text)";
        methods->ModifySendStatus(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, message));
        metrics_.RequestFinished("unknown", absl::StatusCode::kInvalidArgument);
        LogEvent(spdlog::level::warn, "request", {{"rpc", method_}, {"code", "INVALID_ARGUMENT"}, {"error", message}});
      }
    }
    methods->Proceed();
  }

 private:
  std::string method_;
  Metrics& metrics_;
};

class Factory final : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit Factory(Metrics& metrics) : metrics_(metrics) {}

  grpc::experimental::Interceptor* CreateServerInterceptor(grpc::experimental::ServerRpcInfo* info) override {
    // Only defkv's own methods: health, reflection and methods that do not exist keep their statuses.
    const std::string method = info->method();
    if (method.rfind(kServicePrefix, 0) != 0) return nullptr;
    const std::string name = method.substr(sizeof(kServicePrefix) - 1);
    const auto* service = google::protobuf::DescriptorPool::generated_pool()->FindServiceByName(
        defkv::v1::DefKV::service_full_name());
    if (!service || !service->FindMethodByName(name)) return nullptr;
    return new ParseErrorInterceptor(name, metrics_);
  }

 private:
  Metrics& metrics_;
};

}  // namespace

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> MakeParseErrorInterceptorFactory(
    Metrics& metrics) {
  return std::make_unique<Factory>(metrics);
}

}  // namespace defkv::server
