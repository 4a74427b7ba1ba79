// What the gRPC command-line clients (defkv, defkv-eval, defkv-bench-serve) share: the
// dashed-option parser, the channel credentials / bearer token taken from --tls_ca, --tls_cert,
// --tls_key, --token, and the channel and per-call context set up from them.
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

// A channel to `addr` that sends and receives messages up to 64 MiB (contexts are large), with
// whatever else `args` sets.
std::shared_ptr<grpc::Channel> MakeChannel(const std::string& addr, std::shared_ptr<grpc::ChannelCredentials> creds,
                                           grpc::ChannelArguments args = {});
// Adds the bearer token (when not empty) and a deadline `timeout_s` from now (none when <= 0).
void PrepareContext(grpc::ClientContext& ctx, const std::string& token, double timeout_s);
// "OK", "INVALID_ARGUMENT", ...; "UNKNOWN" for a code outside 0..16.
const char* StatusCodeName(grpc::StatusCode code);

}  // namespace defkv::client
