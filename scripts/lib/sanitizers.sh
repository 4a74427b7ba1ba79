# The sanitizer trees (CMakePresets.json: asan, tsan) and the options their test runs use. Sourced.
ASAN_DIR=${DEFKV_ASAN_DIR:-$ROOT/build-asan}
TSAN_DIR=${DEFKV_TSAN_DIR:-$ROOT/build-tsan}

# sanitizer_env REPORT_DIR: every sanitized process of the run (test binaries, servers the Python
# tests start, tools they call) writes its reports to REPORT_DIR/report.<pid>, so a report counts
# even where nobody checks the exit code (a server stopped at the end of a test session). Reports
# also end the process: ASan always, UBSan by -fno-sanitize-recover, TSan by halt_on_error.
# LeakSanitizer and TSan read the committed suppressions of tests/sanitizers (one comment each).
# allocator_may_return_null: an allocation too large for memory fails as it does in production
# (the engine answers RESOURCE_EXHAUSTED, tests/python/integration/test_faults.py checks it)
# instead of ASan aborting on it.
sanitizer_env() {
  local reports=$1 supp=$ROOT/tests/sanitizers
  mkdir -p "$reports"
  export ASAN_OPTIONS="detect_leaks=1:allocator_may_return_null=1:check_initialization_order=1:strict_init_order=1:log_path=$reports/report"
  export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$reports/report"
  export LSAN_OPTIONS="suppressions=$supp/lsan.supp:print_suppressions=0"
  export TSAN_OPTIONS="suppressions=$supp/tsan.supp:halt_on_error=1:second_deadlock_stack=1:log_path=$reports/report"
}
