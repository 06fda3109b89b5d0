#!/usr/bin/env bash
# Fuzzes every parser of outside bytes (the cargo-fuzz targets in fuzz/), one target after the other, each for a
# bounded time. Builds all targets first, so each target's time is fuzzing time. Installs cargo-fuzz when missing.
# cargo-fuzz needs nightly flags: the nightly toolchain is used when installed, else the machine's own toolchain
# with RUSTC_BOOTSTRAP=1 (a new machine has only the one toolchain rustup installed, and its rust-std ships the
# sanitizer runtimes).
#
#   scripts/fuzz.sh                  every target, FUZZ_SECONDS each (default 60)
#   scripts/fuzz.sh frame_tracker    one target
#   FUZZ_SECONDS=5 FUZZ_PROFILE=dev scripts/fuzz.sh   a short pass (CI): an unoptimized build, 2-3 times
#                                    faster to build, slower to run (FUZZ_PROFILE=release, the default, is -O -a)
#
# Seeds are read from fuzz/corpus/TARGET (committed, never written); what libFuzzer learns goes to
# fuzz/target/corpus/TARGET and is reused by the next run. A crash leaves its input in fuzz/artifacts/TARGET/ and the
# whole log in fuzz/target/logs/TARGET.log; reproduce it with
#   cargo +nightly fuzz run -O -a TARGET fuzz/artifacts/TARGET/crash-...   (or RUSTC_BOOTSTRAP=1 cargo fuzz run ...)
# Prints one line per target (executions, crashed or not) and ends with "fuzz: N passed, N failed"; exits 1 when
# any target failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

seconds=${FUZZ_SECONDS:-60}
targets=(request_head frame_tracker mqtt_connect mqtt_stream proxy_protocol jwt jwks oidc_discovery url path cert_validity revocation_message tls_stream)
# Optimized, with debug assertions and overflow checks: an arithmetic overflow on outside bytes is a finding.
# `dev` keeps both (it is a debug build) and builds faster. Build and run must use the same flags, or `run` rebuilds.
case "${FUZZ_PROFILE:-release}" in
  release) flags=(-O -a); profile_dir=release ;;
  dev) flags=(--dev); profile_dir=debug ;;
  *) echo "fuzz.sh: FUZZ_PROFILE must be release or dev, not '${FUZZ_PROFILE}'" >&2; exit 2 ;;
esac
if cargo +nightly --version >/dev/null 2>&1; then
  toolchain=(+nightly)
else
  toolchain=()
  export RUSTC_BOOTSTRAP=1
fi

if ! [[ "$seconds" =~ ^[1-9][0-9]*$ ]]; then
  echo "fuzz.sh: FUZZ_SECONDS must be a positive number of seconds, not '$seconds'" >&2
  exit 2
fi
if [ $# -gt 1 ]; then
  echo "usage: scripts/fuzz.sh [TARGET]" >&2
  exit 2
fi
if [ $# -eq 1 ]; then
  if ! printf '%s\n' "${targets[@]}" | grep -qx -- "$1"; then
    echo "fuzz.sh: unknown target '$1' (targets: ${targets[*]})" >&2
    exit 2
  fi
  targets=("$1")
fi

if ! cargo "${toolchain[@]}" fuzz --version >/dev/null 2>&1; then
  echo "fuzz.sh: installing cargo-fuzz"
  cargo install cargo-fuzz --locked || exit 1
fi

build_target=()
[ ${#targets[@]} -eq 1 ] && build_target=("${targets[0]}")
start=$(date +%s)
echo "fuzz.sh: toolchain $(rustc "${toolchain[@]}" --version)${RUSTC_BOOTSTRAP:+ with RUSTC_BOOTSTRAP=1}, profile ${FUZZ_PROFILE:-release}"
if ! cargo "${toolchain[@]}" fuzz build "${flags[@]}" "${build_target[@]}"; then
  echo "fuzz: build failed"
  echo "fuzz: 0 passed, ${#targets[@]} failed"
  exit 1
fi
echo "fuzz.sh: built in $(($(date +%s) - start))s; ${seconds}s per target"
# The binaries just built run directly (what `cargo fuzz run` does after its own build step): a source edit during
# the pass then cannot trigger a rebuild inside a target's time, and every target runs the same library build.
bin_dir=fuzz/target/$(rustc "${toolchain[@]}" -vV | sed -n 's/^host: //p')/$profile_dir

mkdir -p fuzz/target/logs
passed=0
failed=0
summary=()
for t in "${targets[@]}"; do
  log=fuzz/target/logs/$t.log
  mkdir -p "fuzz/target/corpus/$t" "fuzz/artifacts/$t"
  ASAN_OPTIONS=${ASAN_OPTIONS:-detect_odr_violation=0} "$bin_dir/$t" -artifact_prefix="fuzz/artifacts/$t/" \
    -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
    "fuzz/target/corpus/$t" "fuzz/corpus/$t" >"$log" 2>&1
  rc=$?
  # libFuzzer's final counters; a crash may end the run before "Done", so fall back to the last status line.
  execs=$(grep -Eo 'stat::number_of_executed_units: [0-9]+' "$log" | tail -1 | awk '{print $2}')
  [ -n "$execs" ] || execs=$(grep -Eo '^Done [0-9]+ runs' "$log" | tail -1 | awk '{print $2}')
  [ -n "$execs" ] || execs=$(grep -Eo '^#[0-9]+' "$log" | tail -1 | tr -d '#')
  [ -n "$execs" ] || execs="?"
  if [ "$rc" -eq 0 ] && grep -Eq '^Done [0-9]+ runs' "$log"; then
    passed=$((passed + 1))
    line=$(printf '%-15s %12s execs  ok' "$t" "$execs")
  else
    failed=$((failed + 1))
    if grep -q 'ERROR: libFuzzer: timeout' "$log"; then
      kind="timeout (>10s on one input)"
    elif grep -q 'out-of-memory' "$log"; then
      kind="out of memory (>2048 MB)"
    elif grep -q 'panicked at' "$log"; then
      kind="panic: $(grep -A1 -m1 'panicked at' "$log" | tail -1 | cut -c1-200)"
    elif grep -q 'ERROR: AddressSanitizer' "$log"; then
      kind="$(grep -m1 'ERROR: AddressSanitizer' "$log" | cut -c1-200)"
    else
      kind="exit $rc, see $log"
    fi
    line=$(printf '%-15s %12s execs  CRASHED: %s' "$t" "$execs" "$kind")
    artifact=$(grep -Eo 'Test unit written to [^ ]+' "$log" | tail -1 | awk '{print $5}')
    [ -n "$artifact" ] && line="$line"$'\n'"                reproducer: $artifact ($(head -c 64 "$artifact" | od -An -tx1 | tr -d ' \n')$([ "$(wc -c <"$artifact")" -gt 64 ] && echo ...))"
  fi
  echo "$line"
  summary+=("$line")
done

echo
echo "fuzz.sh: ${seconds}s per target, $(($(date +%s) - start))s in all"
printf '%s\n' "${summary[@]}"
echo "fuzz: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
