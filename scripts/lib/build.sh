# Configures (once) and builds the CMake trees: build/ (preset default) and the sanitizer trees.
# Sourced.

# configure_preset PRESET DIR: configures DIR with CMakePresets.json's PRESET unless already done.
configure_preset() {
  local preset=$1 dir=$2
  if [ ! -f "$dir/build.ninja" ]; then
    log "configuring $dir (preset $preset)"
    cmake --preset "$preset" -B "$dir" -DCMAKE_PREFIX_PATH="$PCPP_PREFIX" \
      -DPython3_EXECUTABLE="$VENV/bin/python" >/dev/null
  fi
}

build_all() {
  configure_preset default "$BUILD_DIR"
  log "building ($JOBS jobs)"
  cmake --build "$BUILD_DIR" -j"$JOBS"
}
