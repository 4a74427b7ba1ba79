#include "client/common.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <sstream>

namespace defkv::client {

std::optional<Args> ParseArgs(int argc, char** argv, const std::vector<std::string>& switches, std::string* error) {
  Args args;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--", 0) != 0 || a.size() == 2) {
      if (!args.command.empty()) {
        *error = "unexpected argument '" + a + "'";
        return std::nullopt;
      }
      args.command = a;
      continue;
    }
    std::string name = a.substr(2), value;
    if (std::find(switches.begin(), switches.end(), name) != switches.end()) {
      args.switches[name] = true;
      continue;
    }
    if (const auto eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name.resize(eq);
    } else if (i + 1 < argc) {
      value = argv[++i];
    } else {
      *error = "--" + name + " needs a value";
      return std::nullopt;
    }
    args.values[name].push_back(value);
  }
  return args;
}

std::string Last(const Args& a, const std::string& name, const std::string& fallback) {
  auto it = a.values.find(name);
  return it == a.values.end() ? fallback : it->second.back();
}

bool Has(const Args& a, const std::string& name) { return a.values.count(name) > 0; }

std::shared_ptr<grpc::ChannelCredentials> Credentials(const Args& a, std::string* error) {
  if (!Has(a, "tls_ca") && !Has(a, "tls_cert") && !Has(a, "tls_key")) return grpc::InsecureChannelCredentials();
  grpc::SslCredentialsOptions ssl;
  for (auto [flag, field] : {std::pair{"tls_ca", &ssl.pem_root_certs}, std::pair{"tls_cert", &ssl.pem_cert_chain},
                             std::pair{"tls_key", &ssl.pem_private_key}}) {
    if (!Has(a, flag)) continue;
    std::ifstream in(Last(a, flag), std::ios::binary);
    if (!in) {
      *error = std::string("--") + flag + ": cannot read " + Last(a, flag);
      return nullptr;
    }
    std::stringstream pem;
    pem << in.rdbuf();
    *field = pem.str();
  }
  return grpc::SslCredentials(ssl);
}

std::string BearerToken(const Args& a) {
  const char* env = std::getenv("DEFKV_TOKEN");
  return Last(a, "token", env ? env : "");
}

std::shared_ptr<grpc::Channel> MakeChannel(const std::string& addr, std::shared_ptr<grpc::ChannelCredentials> creds,
                                           grpc::ChannelArguments args) {
  args.SetMaxReceiveMessageSize(64 << 20);
  args.SetMaxSendMessageSize(64 << 20);
  return grpc::CreateCustomChannel(addr, std::move(creds), args);
}

void PrepareContext(grpc::ClientContext& ctx, const std::string& token, double timeout_s) {
  if (!token.empty()) ctx.AddMetadata("authorization", "Bearer " + token);
  if (timeout_s > 0)
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::duration_cast<std::chrono::system_clock::duration>(
                                                            std::chrono::duration<double>(timeout_s)));
}

const char* StatusCodeName(grpc::StatusCode code) {
  static constexpr const char* kNames[] = {
      "OK",        "CANCELLED",         "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
      "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
      "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"};
  const int i = static_cast<int>(code);
  return i >= 0 && i <= 16 ? kNames[i] : "UNKNOWN";
}

}  // namespace defkv::client
