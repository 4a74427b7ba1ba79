// Finds ../shared/testdata for C++ tests: DEFKV_TESTDATA, else the path baked in at configure
// time. Absent data skips the test with a message, except under CI=true where it fails.
#pragma once

#include <cstdlib>
#include <filesystem>
#include <string>

#include <gtest/gtest.h>

namespace defkv::testing {

inline std::string TestdataDir() {
  if (const char* env = std::getenv("DEFKV_TESTDATA"); env && *env) return env;
  return DEFKV_DEFAULT_TESTDATA;
}

inline bool InCi() {
  const char* ci = std::getenv("CI");
  if (!ci) return false;
  std::string v = ci;
  return v == "1" || v == "true" || v == "TRUE" || v == "yes";
}

}  // namespace defkv::testing

// Use at the top of a test body: skips (or fails in CI) when the data folder is missing.
#define DEFKV_REQUIRE_TESTDATA()                                                         \
  do {                                                                                   \
    if (!std::filesystem::is_directory(::defkv::testing::TestdataDir())) {               \
      if (::defkv::testing::InCi())                                                      \
        FAIL() << "test data " << ::defkv::testing::TestdataDir()                        \
               << " is missing and CI=true requires it";                                 \
      GTEST_SKIP() << "test data " << ::defkv::testing::TestdataDir()                    \
                   << " is missing (set DEFKV_TESTDATA)";                                \
    }                                                                                    \
  } while (0)
