#include "client/common.h"

#include <algorithm>
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

}  // namespace defkv::client
