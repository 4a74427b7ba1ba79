# Configures (once) and builds the CPU tree in build/. Sourced.
build_all() {
  if [ ! -f "$BUILD_DIR/build.ninja" ]; then
    log "configuring $BUILD_DIR"
    cmake --preset default -B "$BUILD_DIR" -DCMAKE_PREFIX_PATH="$PCPP_PREFIX" \
      -DPython3_EXECUTABLE="$VENV/bin/python" >/dev/null
  fi
  log "building ($JOBS jobs)"
  cmake --build "$BUILD_DIR" -j"$JOBS"
}
