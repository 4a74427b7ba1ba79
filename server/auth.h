// Bearer-token authentication for defkv.v1.DefKV. Tokens come from a file (one per line; blank
// lines and lines starting with '#' are ignored); a call must carry the metadata
// "authorization: Bearer <token>". The health service is not behind it (probes carry no
// secrets), and neither is reflection (it only describes the public API).
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/status/statusor.h"

namespace defkv::server {

// Equal strings in time that depends only on the candidate's length, not on where they differ.
bool ConstantTimeEquals(std::string_view a, std::string_view b);

class TokenAuth {
 public:
  TokenAuth() = default;  // disabled: every call passes
  // Empty path: disabled. A file with no token is an error (it would lock everyone out).
  static absl::StatusOr<TokenAuth> FromFile(const std::string& path);

  bool enabled() const { return !tokens_.empty(); }
  // UNAUTHENTICATED when the token is missing or matches none.
  absl::Status Check(const grpc::CallbackServerContext& ctx) const;

 private:
  std::vector<std::string> tokens_;
};

}  // namespace defkv::server
