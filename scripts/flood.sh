#!/usr/bin/env bash
# What the per-address handshake budget saves under a flood of full TLS handshakes from one address.
#
#   scripts/flood.sh               three runs of FLOOD_SECONDS (15) each, about a minute after the release build
#
# A release ws-gateway (TLS, RS256 token, `ws-loadgen echo` upstream) is started three times:
#   baseline  no flood: the well-behaved client alone;
#   off       HANDSHAKE_BURST_PER_IP=0: the flood gets every handshake it asks for;
#   on        HANDSHAKE_RATE_PER_IP=$RATE, HANDSHAKE_BURST_PER_IP=$BURST: the flood is closed before TLS.
# The flood is `ws-loadgen handshakes` from 127.0.2.1 (FLOOD_CONCURRENCY closed loops of connect + TLS + upgrade +
# echo + close, 10 ms pause after a failure); the well-behaved client is `ws-loadgen handshakes` from 127.0.2.2,
# GOOD_CONCURRENCY loops paced to one cycle per GOOD_INTERVAL_MS each (10 handshakes/s, within the budget). The
# gateway's CPU seconds are read from /proc over the good client's window. Prints one table; the RESULT lines and
# logs stay in $CARGO_TARGET_DIR/flood/ (default target/flood/). Loopback only; every process started is stopped on
# exit. Knobs (env): FLOOD_PORT_BASE (18600), FLOOD_SECONDS, FLOOD_CONCURRENCY (64), GOOD_CONCURRENCY (2),
# GOOD_INTERVAL_MS (200), RATE (20), BURST (40).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=$TARGET_DIR/flood
BASE=${FLOOD_PORT_BASE:-18600}
ECHO_ADDR=127.0.0.1:$((BASE + 1))
JWKS_PORT=$((BASE + 2))
GW_PORT=$((BASE + 3))
GW_ADMIN=127.0.0.1:$((BASE + 4))
SECS=${FLOOD_SECONDS:-15}
FLOOD_CONCURRENCY=${FLOOD_CONCURRENCY:-64}
GOOD_CONCURRENCY=${GOOD_CONCURRENCY:-2}
GOOD_INTERVAL_MS=${GOOD_INTERVAL_MS:-200}
RATE=${RATE:-20}
BURST=${BURST:-40}

log() { printf '[flood %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }

# shellcheck source=scripts/procs.sh
source "$ROOT/scripts/procs.sh"
trap kill_all EXIT
trap 'exit 130' INT TERM

for tool in openssl python3 curl; do command -v "$tool" >/dev/null || die "$tool is needed"; done

log "building ws-gateway and ws-loadgen (release)"
(cd "$ROOT" && cargo build --release --quiet -p ws-gateway -p ws-loadgen --bin ws-gateway --bin ws-loadgen) || die "cargo build failed"
GW=$TARGET_DIR/release/ws-gateway
LG=$TARGET_DIR/release/ws-loadgen

rm -rf "$OUT"
mkdir -p "$OUT/jwks"
cd "$OUT"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout server.key -out server.pem -days 1 \
  -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1,DNS:localhost -addext basicConstraints=critical,CA:FALSE \
  -addext keyUsage=critical,digitalSignature -addext extendedKeyUsage=serverAuth 2>/dev/null
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out jwt.key 2>/dev/null
openssl rsa -in jwt.key -noout -modulus | sed 's/^Modulus=//' >jwt.modulus
b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }
now=$(date +%s)
header=$(printf '{"alg":"RS256","typ":"JWT","kid":"flood"}' | b64url)
claims=$(printf '{"sub":"flood-user","iat":%d,"exp":%d}' "$now" $((now + 3600)) | b64url)
TOKEN="$header.$claims.$(printf '%s.%s' "$header" "$claims" | openssl dgst -sha256 -sign jwt.key | b64url)"
python3 - jwt.modulus jwks/jwks.json <<'PY'
import base64, json, sys
n = bytes.fromhex(open(sys.argv[1]).read().strip())
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
json.dump({"keys": [{"kty": "RSA", "use": "sig", "alg": "RS256", "kid": "flood", "n": b64(n), "e": b64((65537).to_bytes(3, "big"))}]}, open(sys.argv[2], "w"))
PY

python3 -m http.server "$JWKS_PORT" --bind 127.0.0.1 --directory jwks >jwks.log 2>&1 &
PIDS+=($!)
"$LG" echo --listen "$ECHO_ADDR" --exit-after 900 >echo.log 2>&1 &
PIDS+=($!)
wait_tcp 127.0.0.1 "$JWKS_PORT" || die "the JWKS server did not start"
wait_tcp 127.0.0.1 "${ECHO_ADDR##*:}" || die "the echo upstream did not start"

# run NAME FLOOD(0|1) GATEWAY-FLAGS...: one gateway, optionally flooded, with the good client measuring.
run() {
  local name=$1 flood=$2
  shift 2
  RUST_LOG=info "$GW" --listen "127.0.0.1:$GW_PORT" --admin-listen "$GW_ADMIN" \
    --tls-cert server.pem --tls-key server.key --jwks-url "http://127.0.0.1:$JWKS_PORT/jwks.json" \
    --upstream-ws-url "ws://$ECHO_ADDR/" "$@" >"gateway-$name.log" 2>&1 &
  local gw=$!
  PIDS+=("$gw")
  for _ in $(seq 100); do
    [[ $(curl -s -o /dev/null -w '%{http_code}' "http://$GW_ADMIN/readyz" || true) == 200 ]] && break
    kill -0 "$gw" 2>/dev/null || die "the gateway exited: $(tail -3 "gateway-$name.log")"
    sleep 0.1
  done
  local target=(--url "wss://127.0.0.1:$GW_PORT/" --ca server.pem --token "$TOKEN")
  local flood_pid=""
  if [[ $flood == 1 ]]; then
    log "$name: flood from 127.0.2.1 ($FLOOD_CONCURRENCY loops) for $((SECS + 2)) s"
    "$LG" handshakes "${target[@]}" --source 127.0.2.1 --concurrency "$FLOOD_CONCURRENCY" \
      --duration $((SECS + 2)) >"flood-$name.out" 2>"flood-$name.err" &
    flood_pid=$!
    PIDS+=("$flood_pid")
    sleep 1
  fi
  log "$name: good client from 127.0.2.2 for $SECS s"
  "$LG" handshakes "${target[@]}" --source 127.0.2.2 --concurrency "$GOOD_CONCURRENCY" \
    --interval-ms "$GOOD_INTERVAL_MS" --duration "$SECS" --pid "$gw" >"good-$name.out" 2>"good-$name.err" ||
    log "$name: the good client completed no handshake ($(tail -2 "good-$name.err" | tr '\n' ' '))"
  if [[ -n $flood_pid ]]; then
    wait "$flood_pid" || log "$name: the flood completed no handshake"
  fi
  curl -s "http://$GW_ADMIN/metrics" >"metrics-$name.txt" || true
  stop "$gw"
}

run baseline 0
run off 1
run on 1 --handshake-rate-per-ip "$RATE" --handshake-burst-per-ip "$BURST"

python3 - "$SECS" "$RATE" "$BURST" <<'PY'
import json, re, sys
secs, rate, burst = sys.argv[1:4]
def result(path):
    try:
        for line in open(path):
            if line.startswith("RESULT "):
                return json.loads(line[7:])
    except FileNotFoundError:
        pass
    return {}
def violations(name):
    try:
        text = open(f"metrics-{name}.txt").read()
    except FileNotFoundError:
        return 0
    m = re.search(r'^ws_rate_limit_violations_total\{kind="handshake_ip"\} (\S+)', text, re.M)
    return int(float(m.group(1))) if m else 0
print(f"\nHandshake flood from one address, {secs} s windows (budget: {rate}/s, burst {burst})\n")
print("| run | gateway CPU s | good client handshakes/s | good p50 ms | good p99 ms | good errors | flood handshakes/s | flood refused before TLS |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for name, label in [("baseline", "no flood"), ("off", "flood, budget off"), ("on", "flood, budget on")]:
    g, f = result(f"good-{name}.out"), result(f"flood-{name}.out")
    flood_rate = f"{f['rate']:,.0f}" if f else "–"
    print(f"| {label} | {g.get('proxy_cpu_s', '–')} | {g.get('rate', 0):.1f} | {g.get('hs_p50_ms', '–')} | "
          f"{g.get('hs_p99_ms', '–')} | {g.get('errors', '–')} | {flood_rate} | {violations(name):,} |")
PY
