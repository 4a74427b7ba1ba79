#include "server/auth.h"

#include <fstream>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/ascii.h"

namespace defkv::server {

bool ConstantTimeEquals(std::string_view a, std::string_view b) {
  // Every byte of the candidate is compared against a (cycled) byte of the secret, and the
  // length difference is folded in: no early exit.
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ (b.empty() ? 0 : b[i % b.size()]));
  return diff == 0;
}

absl::StatusOr<TokenAuth> TokenAuth::FromFile(const std::string& path) {
  TokenAuth auth;
  if (path.empty()) return auth;
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot read the token file"));
  for (std::string line; std::getline(in, line);) {
    absl::string_view t = absl::StripAsciiWhitespace(line);  // Debian's absl::string_view is not std's
    if (t.empty() || t[0] == '#') continue;
    auth.tokens_.emplace_back(t.data(), t.size());
  }
  if (auth.tokens_.empty()) return absl::InvalidArgumentError(absl::StrCat(path, ": no token in the token file"));
  return auth;
}

absl::Status TokenAuth::Check(const grpc::CallbackServerContext& ctx) const {
  if (!enabled()) return absl::OkStatus();
  const auto& md = ctx.client_metadata();
  auto it = md.find("authorization");
  if (it == md.end()) return absl::UnauthenticatedError("missing \"authorization: Bearer <token>\" metadata");
  const std::string_view header(it->second.data(), it->second.size());
  constexpr std::string_view kScheme = "Bearer ";
  if (header.substr(0, kScheme.size()) != kScheme)
    return absl::UnauthenticatedError("authorization is not a Bearer token");
  const std::string_view value = header.substr(kScheme.size());
  bool ok = false;
  for (const auto& t : tokens_) ok |= ConstantTimeEquals(value, t);  // no short-circuit across tokens
  return ok ? absl::OkStatus() : absl::UnauthenticatedError("invalid token");
}

}  // namespace defkv::server
