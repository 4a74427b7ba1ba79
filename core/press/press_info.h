// The catalogue of presses as plain data: names, aliases and typed options with defaults.
// server/ (ListPresses) and the CLIs read it; core/press/registry builds presses from it.
#pragma once

#include <string>
#include <vector>

namespace defkv::press {

struct PressOptionInfo {
  std::string name;
  std::string type;           // "int", "float", "bool" or "string"
  std::string default_value;  // as text
  std::string description;
};

struct PressInfo {
  std::string name;                  // canonical
  std::vector<std::string> aliases;  // accepted too (the seed repository's names)
  std::string description;
  std::vector<PressOptionInfo> options;
};

// Every press, "none" first.
const std::vector<PressInfo>& ListPresses();

}  // namespace defkv::press
