# Installs what is missing: Debian packages, prometheus-cpp 1.0.2 (built from Debian's source
# tarball into .deps/), and the Python venv (.venv/). Each step checks first, so a second run
# takes seconds. Sourced by scripts/setup, scripts/test and scripts/serve.

install_apt() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if ((${#missing[@]} == 0)); then log "Debian packages: all present"; return; fi
  log "Debian packages: installing ${missing[*]}"
  local sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# prometheus-cpp is not packaged for Debian 12; Debian sid carries 1.0.2. Only the orig tarball
# is fetched (through a private apt configuration, the machine's sources stay untouched) and its
# sha256 is checked before building.
PCPP_SHA256=65838fed64c4667140a574b78eb9f5c995bab80d575b082c9c677c6795c3c607
install_prometheus_cpp() {
  if [ -f "$PCPP_PREFIX/lib/cmake/prometheus-cpp/prometheus-cpp-config.cmake" ]; then
    log "prometheus-cpp 1.0.2: present in $PCPP_PREFIX"; return
  fi
  log "prometheus-cpp 1.0.2: building into $PCPP_PREFIX"
  local src=$DEPS/src aptx=$DEPS/apt
  mkdir -p "$src" "$aptx/lists/partial"
  local tarball=$src/prometheus-cpp_1.0.2.orig.tar.gz
  if [ ! -f "$tarball" ]; then
    local mirror
    mirror=$(grep -m1 '^URIs:' /etc/apt/sources.list.d/debian.sources 2>/dev/null | awk '{print $2}')
    [ -n "$mirror" ] || mirror=$(grep -m1 -oE 'https?://[^ ]+debian/?' /etc/apt/sources.list 2>/dev/null || true)
    [ -n "$mirror" ] || die "cannot find the Debian mirror in /etc/apt/sources.list.d/debian.sources"
    echo "deb-src $mirror sid main" > "$aptx/sources.list"
    local opts=(-o "Dir::Etc::sourcelist=$aptx/sources.list" -o Dir::Etc::sourceparts=/nonexistent
                -o "Dir::State::Lists=$aptx/lists" -o Debug::NoLocking=1)
    apt-get "${opts[@]}" update -qq
    # The mirror may lack the .dsc and debian.tar.xz; the orig tarball is all we need and it is
    # checked against the signed index by apt and against the known sha256 below.
    (cd "$src" && apt-get "${opts[@]}" source --download-only prometheus-cpp >/dev/null 2>&1 || true)
    [ -f "$tarball" ] || die "could not download prometheus-cpp_1.0.2.orig.tar.gz from $mirror (sid)"
  fi
  echo "$PCPP_SHA256  $tarball" | sha256sum -c --quiet - || die "prometheus-cpp tarball checksum mismatch"
  rm -rf "$src/prometheus-cpp-1.0.2"
  tar -xzf "$tarball" -C "$src"
  cmake -S "$src/prometheus-cpp-1.0.2" -B "$src/prometheus-cpp-1.0.2/build" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX="$PCPP_PREFIX" -DCMAKE_INSTALL_LIBDIR=lib \
    -DBUILD_SHARED_LIBS=ON -DUSE_THIRDPARTY_LIBRARIES=OFF -DENABLE_PULL=ON -DENABLE_PUSH=OFF \
    -DENABLE_COMPRESSION=ON -DENABLE_TESTING=OFF -DGENERATE_PKGCONFIG=ON >/dev/null
  cmake --build "$src/prometheus-cpp-1.0.2/build" -j"$JOBS" >/dev/null
  cmake --install "$src/prometheus-cpp-1.0.2/build" >/dev/null
  rm -rf "$src/prometheus-cpp-1.0.2"
}

# The venv holds the project's LibTorch (the torch wheel) and the Python tools and tests.
install_venv() {
  local req=$ROOT/tools/requirements.txt stamp=$VENV/.defkv-requirements
  if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && cmp -s "$req" "$stamp"; then
    log "Python venv: up to date ($VENV)"; return
  fi
  log "Python venv: installing tools/requirements.txt into $VENV (torch is large: minutes)"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q --progress-bar off -r "$req"
  cp "$req" "$stamp"
}

install_all() {
  install_apt
  install_prometheus_cpp
  install_venv
}
