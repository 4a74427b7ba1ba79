// Names to presses: canonical names and aliases (press_info.cpp), typed options with defaults,
// validation with messages that say what is accepted.
#pragma once

#include <map>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "core/press/press.h"
#include "core/press/press_info.h"

namespace defkv::press {

// The catalogue entry for a name or alias; NOT_FOUND-like INVALID_ARGUMENT listing the valid
// names otherwise.
absl::StatusOr<const PressInfo*> FindPress(const std::string& name);

// A ratio is the fraction of context entries removed: 0 <= ratio < 1, not NaN.
absl::Status CheckRatio(double ratio);

// Builds the named press with `options` (option name -> value text) over the defaults. Unknown
// options, values of the wrong type and values out of range are INVALID_ARGUMENT. "none"
// yields nullptr.
absl::StatusOr<std::unique_ptr<Press>> MakePress(const std::string& name,
                                                 const std::map<std::string, std::string>& options);

}  // namespace defkv::press
