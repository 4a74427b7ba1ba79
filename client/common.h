// What the gRPC command-line clients (defkv, defkv-eval) share: the dashed-option parser and
// the channel credentials / bearer token taken from --tls_ca, --tls_cert, --tls_key, --token.
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

namespace defkv::client {

struct Args {
  std::string command;                                      // the one bare word
  std::map<std::string, std::vector<std::string>> values;  // --name value / --name=value (repeatable)
  std::map<std::string, bool> switches;                     // --name, for names listed as switches
};

// Hand-rolled because absl flags cannot spell dashed names (--context-file). nullopt with
// *error set on a malformed command line.
std::optional<Args> ParseArgs(int argc, char** argv, const std::vector<std::string>& switches, std::string* error);
std::string Last(const Args& a, const std::string& name, const std::string& fallback = "");
bool Has(const Args& a, const std::string& name);

// Insecure, or TLS when any of --tls_ca/--tls_cert/--tls_key is given; nullptr with *error set
// when a file cannot be read.
std::shared_ptr<grpc::ChannelCredentials> Credentials(const Args& a, std::string* error);
// --token, else $DEFKV_TOKEN, else empty (no authorization metadata).
std::string BearerToken(const Args& a);

}  // namespace defkv::client
