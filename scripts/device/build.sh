#!/usr/bin/env bash
# Sourced by the GPU machine's scripts (gpu-run, serve-bench): unpacks the carried .deb files,
# builds prometheus-cpp, and builds defkv with -DDEFKV_CUDA=ON for sm_90 into build-cuda/.
# Sets PY (python3 with torch) and OUT (where results go; $OUT of the device tool).
SYS=/tmp/defkv-sys
JOBS=$(nproc)
OUT=${OUT:-/tmp/defkv-out}
mkdir -p "$OUT" "$SYS"
for f in .device/debs/*.deb; do dpkg -x "$f" "$SYS"; done
export LD_LIBRARY_PATH=$SYS/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export LIBRARY_PATH=$SYS/usr/lib/x86_64-linux-gnu   # gRPC's CMake config links -lre2 by name
export PKG_CONFIG_LIBDIR=$SYS/usr/lib/x86_64-linux-gnu/pkgconfig:$SYS/usr/share/pkgconfig
export PKG_CONFIG_SYSROOT_DIR=$SYS
PY=$(command -v python3)

if [ ! -f /tmp/pcpp/lib/cmake/prometheus-cpp/prometheus-cpp-config.cmake ]; then
  tar -xzf .device/prometheus-cpp_1.0.2.orig.tar.gz -C /tmp
  cmake -S /tmp/prometheus-cpp-1.0.2 -B /tmp/pcb -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX=/tmp/pcpp \
    -DCMAKE_INSTALL_LIBDIR=lib -DBUILD_SHARED_LIBS=ON -DUSE_THIRDPARTY_LIBRARIES=OFF -DENABLE_PUSH=OFF \
    -DENABLE_TESTING=OFF -DCMAKE_PREFIX_PATH="$SYS/usr" >/dev/null
  cmake --build /tmp/pcb >/dev/null && cmake --install /tmp/pcb >/dev/null
fi
export LD_LIBRARY_PATH=/tmp/pcpp/lib:$LD_LIBRARY_PATH

echo "== configure + build (CUDA, sm_90)"
t0=$(date +%s)
cmake --preset cuda -B build-cuda -DCMAKE_PREFIX_PATH="$SYS/usr;/tmp/pcpp" -DPython3_EXECUTABLE="$PY" \
  -DPKG_CONFIG_USE_CMAKE_PREFIX_PATH=OFF > "$OUT/configure.log" 2>&1 || { tail -40 "$OUT/configure.log"; exit 1; }
cmake --build build-cuda -j"$JOBS" > "$OUT/build.log" 2>&1 || { grep -E "error|Error" -A3 "$OUT/build.log" | head -60; exit 1; }
echo "built in $(( $(date +%s) - t0 )) s"

