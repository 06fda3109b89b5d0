#!/usr/bin/env bash
# Where ws-gateway spends its CPU under one benchmark load: `perf record` (the cpu-clock software event, which works
# where hardware counters do not) on a gateway built with symbols (cargo profile `profiling`), then the top of
# `perf report`.
#
#   scripts/profile.sh                   1,000 sessions x 10,000 msg/s echoed for 12 s (bench.sh's latency run)
#   MODE=handshakes scripts/profile.sh   32 closed loops of full TLS handshakes + upgrade + one echo for 12 s
#   MODE=idle scripts/profile.sh         5,000 idle sessions held for 30 s (what an idle box spends)
#
# Output: target/profile/perf.data, report.txt (flat, by symbol) and callers.txt (call graph, folded by caller).
# Knobs (env): SESSIONS, RATE, SECONDS_, PORT_BASE (18600), PERF_FREQ (999), SKIP_BUILD=1, GW_BIN (another
# ws-gateway binary, e.g. target/release/ws-gateway to read the idle RSS of the shipped build), GW_WRAP (a command
# prefix for the gateway, e.g. "valgrind --tool=massif --massif-out-file=target/profile/massif.out"; with MODE=idle
# the heap snapshot at the peak shows what an idle session holds).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=$TARGET_DIR/profile
MODE=${MODE:-latency}
BASE=${PORT_BASE:-18600}
SECONDS_=${SECONDS_:-12}
FREQ=${PERF_FREQ:-999}
ECHO_ADDR=127.0.0.1:$((BASE + 1))
JWKS_PORT=$((BASE + 2))
GW_PORT=$((BASE + 3))
GW_ADMIN=127.0.0.1:$((BASE + 4))

log() { printf '[profile %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }
# shellcheck source=scripts/procs.sh
source "$ROOT/scripts/procs.sh"
trap kill_all EXIT
trap 'exit 130' INT TERM

command -v perf >/dev/null || {
  log "installing linux-perf"
  apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends linux-perf >&2
}
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
  log "building ws-gateway (profile: profiling) and ws-loadgen (release)"
  (cd "$ROOT" && cargo build --quiet --profile profiling -p ws-gateway --bin ws-gateway &&
    cargo build --quiet --release -p ws-loadgen --bin ws-loadgen) || die "cargo build failed"
fi
GW=${GW_BIN:-$TARGET_DIR/profiling/ws-gateway}
LG=$TARGET_DIR/release/ws-loadgen

rm -rf "$OUT"
mkdir -p "$OUT/conf/jwks"
"$LG" pki --out "$OUT/conf" --san 127.0.0.1,localhost --jwt rs256 --kid bench --token-sub bench-user \
  --token-ttl 86400 >/dev/null || die "ws-loadgen pki failed"
TOKEN=$(cat "$OUT/conf/token")
python3 -m http.server "$JWKS_PORT" --bind 127.0.0.1 --directory "$OUT/conf/jwks" >"$OUT/jwks.log" 2>&1 &
PIDS+=($!)
"$LG" echo --listen "$ECHO_ADDR" --exit-after 3600 >"$OUT/echo.log" 2>&1 &
PIDS+=($!)
wait_tcp 127.0.0.1 "$JWKS_PORT" || die "the JWKS server did not start"
wait_tcp 127.0.0.1 "${ECHO_ADDR##*:}" || die "the echo upstream did not start"

# shellcheck disable=SC2086 # GW_WRAP is words: a command prefix such as valgrind and its flags
RUST_LOG=info ${GW_WRAP:-} "$GW" --listen "127.0.0.1:$GW_PORT" --admin-listen "$GW_ADMIN" \
  --tls-cert "$OUT/conf/server.pem" --tls-key "$OUT/conf/server.key" \
  --jwks-url "http://127.0.0.1:$JWKS_PORT/jwks.json" --upstream-ws-url "ws://$ECHO_ADDR/" \
  --ws-idle-timeout-seconds 600 --max-connections 20000 >"$OUT/ws-gateway.log" 2>&1 &
GW_PID=$!
PIDS+=("$GW_PID")
for _ in $(seq 600); do
  [[ $(curl -s -o /dev/null -w '%{http_code}' "http://$GW_ADMIN/readyz" || true) == 200 ]] && break
  sleep 0.1
done

client=(--url "wss://127.0.0.1:$GW_PORT/" --ca "$OUT/conf/ca.pem" --token "$TOKEN" --pid "$GW_PID")
case $MODE in
  latency)
    load=(latency --sessions "${SESSIONS:-1000}" --rate "${RATE:-10000}" --duration "$SECONDS_" --warmup 2)
    delay=3 ;;
  handshakes)
    load=(handshakes --concurrency "${SESSIONS:-32}" --duration "$SECONDS_")
    delay=1 ;;
  idle)
    load=(idle --sessions "${SESSIONS:-5000}" --settle 5 --hold "${SECONDS_}")
    delay=$((${SESSIONS:-5000} / 800 + 6)) ;;
  *) die "MODE is latency, handshakes or idle" ;;
esac
log "load: ${load[*]}"
"$LG" "${load[@]}" "${client[@]}" >"$OUT/loadgen.out" 2>"$OUT/loadgen.log" &
LOAD_PID=$!
sleep "$delay"
log "perf record -F $FREQ on pid $GW_PID for $((SECONDS_ - 1)) s"
perf record -q -F "$FREQ" -e cpu-clock -g -p "$GW_PID" -o "$OUT/perf.data" -- sleep "$((SECONDS_ - 1))" 2>>"$OUT/perf.log" || true
wait "$LOAD_PID" || log "the load generator failed: see $OUT/loadgen.log"
grep '^RESULT ' "$OUT/loadgen.out" | tail -1 || true
perf report -i "$OUT/perf.data" --stdio --no-children --sort symbol -g none --percent-limit 0.4 2>/dev/null \
  | grep -v '^#' | grep -v '^$' >"$OUT/report.txt" || true
perf report -i "$OUT/perf.data" --stdio --children --sort symbol -g caller,0.5,callee --percent-limit 3 2>/dev/null \
  >"$OUT/callers.txt" || true
head -45 "$OUT/report.txt"
log "full reports: $OUT/report.txt, $OUT/callers.txt"
