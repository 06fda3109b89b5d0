#!/usr/bin/env bash
# Churn and soak: `ws-loadgen churn` against a release ws-gateway on loopback. 100,000 sessions opened and ended,
# 5,000 held at a time, ending in a mix of clean closes, client resets, token expiries (Close 1008), upstream resets,
# single sessions revoked through the admin API (Close 1008) and idle timeouts (Close 1001); then the gateway's open
# file count must be back at its baseline and its RSS within 5% of it.
#
#   scripts/churn.sh            full run (about 3 minutes after the build)
#   QUICK=1 scripts/churn.sh    2,000 sessions, 200 held (about 30 s after the build), for CI
#
# Prints the loadgen's `RESULT {json}` and exits with its status: 0 when the fd count and the RSS came back, 1 when
# not (or when anything failed to start). Loopback only; every process started here is stopped on exit.
# Knobs (env): CHURN_PORT_BASE (18500), TOTAL, HELD, HOLD_MIN, HOLD_MAX, EXPIRY, IDLE (the gateway's idle timeout),
# MIX, WARMUP, DURATION_MAX, SETTLE_MAX (seconds for the fd count and RSS to come back), RSS_TOLERANCE (percent, 5),
# DISTINCT_TOKENS (0: a token per session), ROUNDS (1; N churns N times over against one baseline, with a reading
# after each), GW_LOG (RUST_LOG for the gateway, default info as shipped), GW_ENV (extra NAME=VALUE words for the
# gateway's environment only, e.g. an LD_PRELOAD allocator), BUILD (1; 0 uses the binaries already built),
# CARGO_TARGET_DIR. Files go to $CARGO_TARGET_DIR/churn/ (default target/churn/).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=$TARGET_DIR/churn
QUICK=${QUICK:-0}
BASE=${CHURN_PORT_BASE:-18500}
ECHO_ADDR=127.0.0.1:$((BASE + 1))
JWKS_PORT=$((BASE + 2))
GW_PORT=$((BASE + 43))
GW_ADMIN=127.0.0.1:$((BASE + 90))
ISSUER=ws-gateway-churn
AUDIENCE=ws-gateway

if [[ $QUICK == 1 ]]; then
  TOTAL=${TOTAL:-2000}; HELD=${HELD:-200}; HOLD_MIN=${HOLD_MIN:-0.5}; HOLD_MAX=${HOLD_MAX:-1.5}
  EXPIRY=${EXPIRY:-2}; IDLE=${IDLE:-5}; WARMUP=${WARMUP:-200}; DURATION_MAX=${DURATION_MAX:-60}
  SETTLE_MAX=${SETTLE_MAX:-90}
else
  TOTAL=${TOTAL:-100000}; HELD=${HELD:-5000}; HOLD_MIN=${HOLD_MIN:-3}; HOLD_MAX=${HOLD_MAX:-7}
  EXPIRY=${EXPIRY:-5}; IDLE=${IDLE:-10}; WARMUP=${WARMUP:-1000}; DURATION_MAX=${DURATION_MAX:-600}
  SETTLE_MAX=${SETTLE_MAX:-90}
fi
RSS_TOLERANCE=${RSS_TOLERANCE:-5}
MIX=${MIX:-clean=35,client_reset=15,expiry=15,upstream_reset=15,revoke=10,idle=10}
DISTINCT_TOKENS=${DISTINCT_TOKENS:-0}
ROUNDS=${ROUNDS:-1}
BUILD=${BUILD:-1}
GW_LOG=${GW_LOG:-info}
GW_ENV=${GW_ENV:-}

log() { printf '[churn %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }

# Every process started is recorded here and stopped on exit.
# shellcheck source=scripts/procs.sh
source "$ROOT/scripts/procs.sh"
trap kill_all EXIT
trap 'exit 130' INT TERM

for tool in python3 curl; do command -v "$tool" >/dev/null || die "$tool is needed"; done
# The gateway holds two sockets per session; the load generator holds the client's and the upstream's.
ulimit -n 20000 2>/dev/null || true
(( $(ulimit -n) >= 2 * (HELD + 64) + 200 )) || die "ulimit -n is $(ulimit -n): too low for $HELD held sessions"

if [[ $BUILD == 1 ]]; then
  log "building ws-gateway and ws-loadgen (release)"
  (cd "$ROOT" && cargo build --release --quiet -p ws-gateway -p ws-loadgen --bin ws-gateway --bin ws-loadgen) || die "cargo build failed"
fi
GW=$TARGET_DIR/release/ws-gateway
LG=$TARGET_DIR/release/ws-loadgen
[[ -x $GW && -x $LG ]] || die "no release binaries in $TARGET_DIR/release (run with BUILD=1)"

rm -rf "$OUT"
mkdir -p "$OUT"
log "making a CA, a server certificate (ECDSA P-256), an ES256 signing key with its JWKS and the admin secret"
# jwks/ holds the JWKS alone (it is served); admin-token is the secret for POST /admin/revoke.
"$LG" pki --out "$OUT" --san 127.0.0.1,localhost --jwt es256 --kid churn >/dev/null || die "ws-loadgen pki failed"

python3 -m http.server "$JWKS_PORT" --bind 127.0.0.1 --directory "$OUT/jwks" >"$OUT/jwks.log" 2>&1 &
PIDS+=($!)
wait_tcp 127.0.0.1 "$JWKS_PORT" || die "the JWKS server did not start"

# The upstream is served by the churn run itself (it resets on request); the gateway dials it per session only.
# --max-connections: 5,000 held plus the ones opening and closing, under the 20,000 open-file cap (two per session).
# shellcheck disable=SC2086 # GW_ENV is a list of NAME=VALUE words on purpose.
env $GW_ENV RUST_LOG="$GW_LOG" "$GW" --listen "127.0.0.1:$GW_PORT" --admin-listen "$GW_ADMIN" \
  --tls-cert "$OUT/server.pem" --tls-key "$OUT/server.key" \
  --jwks-url "http://127.0.0.1:$JWKS_PORT/jwks.json" --jwt-valid-algorithms ES256 \
  --jwt-expected-issuer "$ISSUER" --jwt-expected-audience "$AUDIENCE" --jwt-leeway-seconds 0 \
  --admin-token-file "$OUT/admin-token" --upstream-ws-url "ws://$ECHO_ADDR/" --ws-idle-timeout-seconds "$IDLE" --max-connections 9000 \
  >"$OUT/ws-gateway.log" 2>&1 &
GW_PID=$!
PIDS+=("$GW_PID")
code=""
for _ in $(seq 100); do
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://$GW_ADMIN/readyz" || true)
  [[ $code == 200 ]] && break
  kill -0 "$GW_PID" 2>/dev/null || break
  sleep 0.1
done
[[ $code == 200 ]] || die "ws-gateway not ready (readyz $code); see $OUT/ws-gateway.log"
# A 200 from another process on the same admin port would hide a gateway that failed to bind.
kill -0 "$GW_PID" 2>/dev/null || die "ws-gateway exited (another process on its ports?); see $OUT/ws-gateway.log"

log "churn: $ROUNDS x $TOTAL sessions, $HELD held, mix $MIX (gateway pid $GW_PID; $(nproc) cores)"
rc=0
"$LG" churn --url "wss://127.0.0.1:$GW_PORT/" --ca "$OUT/ca.pem" --pid "$GW_PID" --admin "$GW_ADMIN" \
  --admin-token-file "$OUT/admin-token" \
  --signing-key "$OUT/jwt.key" --kid churn --issuer "$ISSUER" --audience "$AUDIENCE" \
  --upstream-listen "$ECHO_ADDR" --total "$TOTAL" --held "$HELD" --hold-min "$HOLD_MIN" --hold-max "$HOLD_MAX" \
  --expiry-seconds "$EXPIRY" --idle-timeout "$IDLE" --mix "$MIX" --warmup "$WARMUP" \
  --duration-max "$DURATION_MAX" --settle-max "$SETTLE_MAX" --rss-tolerance-pct "$RSS_TOLERANCE" \
  --distinct-tokens "$DISTINCT_TOKENS" --rounds "$ROUNDS" \
  >"$OUT/result.txt" 2> >(tee "$OUT/loadgen.log" >&2) || rc=$?
grep '^RESULT ' "$OUT/result.txt" || log "no RESULT line"
if [[ $rc == 0 ]]; then
  log "passed: open files back at the baseline, RSS within $RSS_TOLERANCE%"
  echo "churn: 1 passed, 0 failed"
else
  log "FAILED (exit $rc); logs in $OUT"
  echo "churn: 0 passed, 1 failed"
fi
exit "$rc"
