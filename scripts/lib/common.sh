# Shared by scripts/*: paths, logging, and the one definition of what the project installs.
# Sourced, not run.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VENV=${DEFKV_VENV:-$ROOT/.venv}
DEPS=${DEFKV_DEPS:-$ROOT/.deps}
BUILD_DIR=${DEFKV_BUILD_DIR:-$ROOT/build}
PCPP_PREFIX=$DEPS/prometheus-cpp
JOBS=${DEFKV_JOBS:-$(nproc)}

log() { printf '\033[1m[defkv]\033[0m %s\n' "$*" >&2; }
die() { printf '[defkv] error: %s\n' "$*" >&2; exit 1; }

# Debian 12 packages the build, the tests and the tools need.
APT_PACKAGES=(
  build-essential cmake ninja-build pkg-config ccache git ca-certificates python3-venv
  libgrpc++-dev libgrpc-dev protobuf-compiler-grpc protobuf-compiler libprotobuf-dev
  libabsl-dev libspdlog-dev libfmt-dev libgtest-dev libgmock-dev libbenchmark-dev
  nlohmann-json3-dev libpcre2-dev libsentencepiece-dev libicu-dev libopenblas0-pthread
  libcivetweb-dev civetweb zlib1g-dev libcurl4-openssl-dev
  prometheus yamllint openssl clang libclang-rt-14-dev
)
