# Sanitizer builds (CMakePresets.json: asan, tsan). DEFKV_SANITIZE is passed to -fsanitize= for
# everything built here: "address,undefined" or "thread". The prebuilt libraries (LibTorch, gRPC,
# protobuf, absl, OpenMP) stay uninstrumented: ASan still sees their heap through its malloc, TSan
# sees their locks but not their atomics (docs/RELIABILITY.md says what that costs).
set(DEFKV_SANITIZE "" CACHE STRING "sanitizers to build with: address,undefined or thread (empty: none)")
if(DEFKV_SANITIZE)
  if(NOT CMAKE_CXX_COMPILER_ID MATCHES "Clang")
    message(FATAL_ERROR "DEFKV_SANITIZE needs clang (the presets set CMAKE_CXX_COMPILER=clang++); "
                        "the request fuzzer shares this tree and libFuzzer is clang's")
  endif()
  # Frame pointers keep the stacks in reports complete and cheap to unwind.
  add_compile_options(-fsanitize=${DEFKV_SANITIZE} -fno-omit-frame-pointer)
  add_link_options(-fsanitize=${DEFKV_SANITIZE})
  # Debian's GCC links with --as-needed by default, clang does not. Without it every library of
  # sentencepiece's pkg-config comes in, libsentencepiece_train too, whose flags turn
  # `defkv-server --help` into absl's XML listing.
  add_link_options(LINKER:--as-needed)
  if(DEFKV_SANITIZE MATCHES "undefined")
    # UBSan reports would otherwise be printed and the test would pass.
    add_compile_options(-fno-sanitize-recover=undefined)
  endif()
endif()
