#!/usr/bin/env bash
# Side-by-side benchmark: ws-gateway, HAProxy 2.6 (JWT verified by HAProxy) and nginx 1.22 (no auth), each in front
# of the same `ws-loadgen echo` upstream, plus "direct" (the load generator straight to the echo upstream, plain ws).
#
#   scripts/bench.sh              full run (~7-8 minutes after the build)
#   QUICK=1 scripts/bench.sh      smoke run with tiny numbers (~1 minute after the build)
#   SAVE=1 scripts/bench.sh       also copy the table and chart to bench/results.md and bench/chart.svg
#
# Results go to $CARGO_TARGET_DIR/bench/ (default target/bench/): results.jsonl (one RESULT per run, tagged),
# results.md, chart.svg, and logs/ + conf/; the binaries come from $CARGO_TARGET_DIR/release/ too.
# Exits non-zero when any run did not produce its RESULT line. Loopback only; every process started is killed on
# exit. Knobs (env): BENCH_PORT_BASE (18400), GW_LOG (RUST_LOG for ws-gateway, default info as shipped),
# IDLE_GW ("1000 5000"), IDLE_OTHERS (1000), HS_CONCURRENCY, HS_SECONDS, LAT_SESSIONS, LAT_RATE, LAT_SECONDS, LAT_RUNS,
# LAT_NICE (0; e.g. -10 runs the latency client at a higher priority), BULK_BYTES, BULK_RUNS, IDLE_SETTLE, IDLE_HOLD.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=$TARGET_DIR/bench
CONF=$OUT/conf
LOGS=$OUT/logs
QUICK=${QUICK:-0}
SAVE=${SAVE:-0}
BASE=${BENCH_PORT_BASE:-18400}
ECHO_ADDR=127.0.0.1:$((BASE + 1))
JWKS_PORT=$((BASE + 2))
GW_PORT=$((BASE + 43))
GW_ADMIN=127.0.0.1:$((BASE + 90))
HAP_PORT=$((BASE + 44))
NGX_PORT=$((BASE + 45))

if [[ $QUICK == 1 ]]; then
  HS_CONCURRENCY=${HS_CONCURRENCY:-4}; HS_SECONDS=${HS_SECONDS:-2}
  LAT_SESSIONS=${LAT_SESSIONS:-20}; LAT_RATE=${LAT_RATE:-500}; LAT_SECONDS=${LAT_SECONDS:-2}; LAT_WARMUP=0.5; LAT_RUNS=${LAT_RUNS:-1}
  BULK_BYTES=${BULK_BYTES:-$((64 << 20))}; BULK_RUNS=${BULK_RUNS:-1}
  IDLE_GW=${IDLE_GW:-"50 100"}; IDLE_OTHERS=${IDLE_OTHERS:-50}; IDLE_SETTLE=${IDLE_SETTLE:-1}; IDLE_HOLD=${IDLE_HOLD:-1}
else
  HS_CONCURRENCY=${HS_CONCURRENCY:-32}; HS_SECONDS=${HS_SECONDS:-15}
  LAT_SESSIONS=${LAT_SESSIONS:-1000}; LAT_RATE=${LAT_RATE:-10000}; LAT_SECONDS=${LAT_SECONDS:-15}; LAT_WARMUP=2; LAT_RUNS=${LAT_RUNS:-3}
  BULK_BYTES=${BULK_BYTES:-$((1 << 30))}; BULK_RUNS=${BULK_RUNS:-3}
  IDLE_GW=${IDLE_GW:-"1000 5000"}; IDLE_OTHERS=${IDLE_OTHERS:-1000}; IDLE_SETTLE=${IDLE_SETTLE:-5}; IDLE_HOLD=${IDLE_HOLD:-8}
fi
GW_LOG=${GW_LOG:-info}
LAT_NICE=${LAT_NICE:-0}

log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------------------------
# Processes: every one started is recorded here and killed on exit.
# shellcheck source=scripts/procs.sh
source "$ROOT/scripts/procs.sh"
trap kill_all EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------------------------------
# Tools
need=()
command -v haproxy >/dev/null || [[ -x /usr/sbin/haproxy ]] || need+=(haproxy)
command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || need+=(nginx)
command -v python3 >/dev/null || need+=(python3)
command -v curl >/dev/null || need+=(curl)
command -v ss >/dev/null || need+=(iproute2)
command -v pgrep >/dev/null || need+=(procps)
if ((${#need[@]})); then
  log "installing ${need[*]}"
  apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >&2
fi
export PATH=$PATH:/usr/sbin
haproxy -vv 2>/dev/null | grep -q 'OPENSSL' || die "haproxy was built without OpenSSL (jwt_verify needs it)"
log "$(haproxy -v | head -1 | cut -c1-40); $(nginx -v 2>&1)"

log "building ws-gateway and ws-loadgen (release)"
(cd "$ROOT" && cargo build --release --quiet -p ws-gateway -p ws-loadgen --bin ws-gateway --bin ws-loadgen) || die "cargo build failed"
GW=$TARGET_DIR/release/ws-gateway
LG=$TARGET_DIR/release/ws-loadgen

rm -rf "$CONF" "$LOGS"
mkdir -p "$CONF/jwks" "$LOGS" "$CONF/nginx-temp"
: >"$OUT/results.jsonl"
: >"$OUT/failures.txt"

# ---------------------------------------------------------------------------------------------------------------
# Keys, certificates, the token and the JWKS
# The RSA-2048 signing key is the checked-in test key (tests/keys/); HAProxy reads its public key, jwt.pub.pem.
log "making a CA, a server certificate (ECDSA P-256), an RSA-2048 signing key, a token and its JWKS (ws-loadgen pki)"
"$LG" pki --out "$CONF" --san 127.0.0.1,localhost --jwt rs256 --kid bench --token-sub bench-user --token-ttl 86400 \
  >/dev/null || die "ws-loadgen pki failed"
cat "$CONF/server.pem" "$CONF/server.key" >"$CONF/haproxy.pem"
TOKEN=$(cat "$CONF/token")

# ---------------------------------------------------------------------------------------------------------------
# The shared upstream and the JWKS server
python3 -m http.server "$JWKS_PORT" --bind 127.0.0.1 --directory "$CONF/jwks" >"$LOGS/jwks.log" 2>&1 &
PIDS+=($!)
"$LG" echo --listen "$ECHO_ADDR" --exit-after 3600 >"$LOGS/echo.log" 2>&1 &
PIDS+=($!)
ECHO_PID=$!
wait_tcp 127.0.0.1 "$JWKS_PORT" || die "the JWKS server did not start"
wait_tcp 127.0.0.1 "${ECHO_ADDR##*:}" || die "the echo upstream did not start"
curl -fsS "http://127.0.0.1:$JWKS_PORT/jwks.json" >/dev/null || die "the JWKS is not served"

cat >"$CONF/haproxy.cfg" <<EOF
global
    maxconn 9500
    tune.ssl.default-dh-param 2048
defaults
    mode http
    timeout connect 5s
    timeout client 600s
    timeout server 600s
    timeout tunnel 600s
    timeout http-request 10s
frontend ws
    bind 127.0.0.1:$HAP_PORT ssl crt $CONF/haproxy.pem
    http-request set-var(txn.bearer) http_auth_bearer
    http-request set-var(txn.jwt_alg) var(txn.bearer),jwt_header_query('\$.alg')
    http-request deny deny_status 401 unless { var(txn.jwt_alg) -m str RS256 }
    http-request deny deny_status 401 unless { var(txn.bearer),jwt_verify(txn.jwt_alg,"$CONF/jwt.pub.pem") -m int 1 }
    http-request set-var(txn.exp) var(txn.bearer),jwt_payload_query('\$.exp','int')
    http-request set-var(txn.now) date()
    http-request deny deny_status 401 unless { var(txn.exp),sub(txn.now) -m int gt 0 }
    default_backend echo
backend echo
    server echo $ECHO_ADDR
EOF

cat >"$CONF/nginx.conf" <<EOF
user root;
worker_processes auto;
worker_rlimit_nofile 20000;
pid $CONF/nginx.pid;
error_log $LOGS/nginx-error.log warn;
events { worker_connections 10000; }
http {
    access_log off;
    client_body_temp_path $CONF/nginx-temp/body;
    proxy_temp_path $CONF/nginx-temp/proxy;
    fastcgi_temp_path $CONF/nginx-temp/fastcgi;
    uwsgi_temp_path $CONF/nginx-temp/uwsgi;
    scgi_temp_path $CONF/nginx-temp/scgi;
    map \$http_upgrade \$connection_upgrade { default upgrade; '' close; }
    server {
        listen 127.0.0.1:$NGX_PORT ssl;
        ssl_certificate $CONF/server.pem;
        ssl_certificate_key $CONF/server.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {
            proxy_pass http://$ECHO_ADDR;
            proxy_http_version 1.1;
            proxy_set_header Upgrade \$http_upgrade;
            proxy_set_header Connection \$connection_upgrade;
            proxy_read_timeout 600s;
            proxy_send_timeout 600s;
        }
    }
}
EOF
haproxy -c -q -f "$CONF/haproxy.cfg" || die "haproxy rejects $CONF/haproxy.cfg"
nginx -t -q -c "$CONF/nginx.conf" || die "nginx rejects $CONF/nginx.conf"

# ---------------------------------------------------------------------------------------------------------------
# Starting and stopping each target. start_TARGET sets TARGET_PIDS (comma list, for CPU and RSS) and TARGET_URL.
TARGET_PIDS=""
TARGET_URL=""
MAIN_PID=""

start_direct() {
  TARGET_PIDS=$ECHO_PID
  TARGET_URL="ws://$ECHO_ADDR/"
  MAIN_PID=""
}

start_ws_gateway() {
  RUST_LOG=$GW_LOG "$GW" --listen "127.0.0.1:$GW_PORT" --admin-listen "$GW_ADMIN" \
    --tls-cert "$CONF/server.pem" --tls-key "$CONF/server.key" \
    --jwks-url "http://127.0.0.1:$JWKS_PORT/jwks.json" --upstream-ws-url "ws://$ECHO_ADDR/" \
    --ws-idle-timeout-seconds 600 --max-connections 20000 >>"$LOGS/ws-gateway.log" 2>&1 &
  MAIN_PID=$!
  PIDS+=("$MAIN_PID")
  local code=""
  for _ in $(seq 100); do
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://$GW_ADMIN/readyz" || true)
    [[ $code == 200 ]] && break
    kill -0 "$MAIN_PID" 2>/dev/null || break
    sleep 0.1
  done
  [[ $code == 200 ]] || { log "ws-gateway not ready (readyz $code); see $LOGS/ws-gateway.log"; return 1; }
  TARGET_PIDS=$MAIN_PID
  TARGET_URL="wss://127.0.0.1:$GW_PORT/"
}

start_haproxy() {
  haproxy -db -f "$CONF/haproxy.cfg" >>"$LOGS/haproxy.log" 2>&1 &
  MAIN_PID=$!
  PIDS+=("$MAIN_PID")
  wait_tcp 127.0.0.1 "$HAP_PORT" || { log "haproxy did not start; see $LOGS/haproxy.log"; return 1; }
  TARGET_PIDS=$MAIN_PID
  TARGET_URL="wss://127.0.0.1:$HAP_PORT/"
}

start_nginx() {
  nginx -c "$CONF/nginx.conf" -g 'daemon off;' >>"$LOGS/nginx.log" 2>&1 &
  MAIN_PID=$!
  PIDS+=("$MAIN_PID")
  wait_tcp 127.0.0.1 "$NGX_PORT" || { log "nginx did not start; see $LOGS/nginx-error.log"; return 1; }
  # The master and its workers: CPU and RSS are summed over all of them.
  local workers=""
  for _ in $(seq 50); do
    workers=$(pgrep -P "$MAIN_PID" | paste -sd, -)
    [[ -n $workers ]] && break
    sleep 0.1
  done
  TARGET_PIDS=$MAIN_PID${workers:+,$workers}
  TARGET_URL="wss://127.0.0.1:$NGX_PORT/"
}

stop_target() {
  if [[ -n $MAIN_PID ]]; then stop "$MAIN_PID"; fi
  MAIN_PID=""
}

# run TARGET LABEL MODE ARGS...: one loadgen run; its RESULT line is tagged and appended to results.jsonl.
run() {
  local target=$1 label=$2 mode=$3
  shift 3
  local tls=()
  [[ $target == direct ]] || tls=(--ca "$CONF/ca.pem" --token "$TOKEN")
  log "$target: $label ($(ss -tan state time-wait 2>/dev/null | tail -n +2 | wc -l) sockets in TIME_WAIT)"
  local out rc=0 prio=()
  # The latency client runs at a higher priority (as root), so its schedule is not late because the proxy under
  # test took the CPU: on a 2-core box the client stands in for another machine.
  if [[ $mode == latency && $EUID == 0 && $LAT_NICE != 0 ]]; then prio=(nice -n "$LAT_NICE"); fi
  out=$("${prio[@]}" "$LG" "$mode" --url "$TARGET_URL" "${tls[@]}" --pid "$TARGET_PIDS" "$@" 2>>"$LOGS/loadgen-$target.log") || rc=$?
  local line
  line=$(grep '^RESULT ' <<<"$out" | tail -1 | cut -d' ' -f2- || true)
  if [[ $rc != 0 || -z $line ]]; then
    log "FAILED: $target $label (exit $rc, no RESULT); see $LOGS/loadgen-$target.log"
    echo "$target $label" >>"$OUT/failures.txt"
    return 0
  fi
  printf '%s\n' "$line" | python3 -c 'import json,sys; r=json.load(sys.stdin); r.update(target=sys.argv[1], label=sys.argv[2]); print(json.dumps(r))' \
    "$target" "$label" >>"$OUT/results.jsonl"
  printf 'RESULT %s\n' "$line" >>"$OUT/raw-results.txt"
}

: >"$OUT/raw-results.txt"
TARGETS=(direct ws_gateway haproxy nginx)

# One mode at a time over every target, latency first: a handshake run leaves tens of thousands of sockets in
# TIME_WAIT, and the kernel reaping them for the next 60 s disturbs a latency run that follows.
with_each_target() {
  local t
  for t in "${TARGETS[@]}"; do
    if ! "start_$t"; then echo "$t start" >>"$OUT/failures.txt"; stop_target; continue; fi
    "$@" "$t"
    stop_target
  done
}
mode_latency() {
  run "$1" "latency$LAT_RUN" latency --sessions "$LAT_SESSIONS" --rate "$LAT_RATE" --duration "$LAT_SECONDS" --warmup "$LAT_WARMUP"
}
mode_bulk() {
  local i
  for i in $(seq "$BULK_RUNS"); do run "$1" "bulk$i" bulk --bytes "$BULK_BYTES"; done
}
mode_handshakes() {
  run "$1" handshakes handshakes --concurrency "$HS_CONCURRENCY" --duration "$HS_SECONDS"
}
# Tail latency on 2 shared cores is noisy from run to run: repeat, interleaved, and report the median.
for LAT_RUN in $(seq "$LAT_RUNS"); do with_each_target mode_latency; done
with_each_target mode_bulk
# direct last: at ~15,000 connections/s it leaves the most TIME_WAIT sockets behind.
TARGETS=(ws_gateway haproxy nginx direct)
with_each_target mode_handshakes

# Idle memory: a fresh process per run, so allocator pools left by earlier runs do not hide the cost.
idle_run() {
  local t=$1 n=$2
  if ! "start_$t"; then echo "$t start" >>"$OUT/failures.txt"; stop_target; return 0; fi
  run "$t" "idle$n" idle --sessions "$n" --settle "$IDLE_SETTLE" --hold "$IDLE_HOLD"
  stop_target
}
for n in $IDLE_GW; do idle_run ws_gateway "$n"; done
for n in $IDLE_OTHERS; do idle_run haproxy "$n"; idle_run nginx "$n"; done

# ---------------------------------------------------------------------------------------------------------------
# Table and chart
python3 "$ROOT/scripts/bench_report.py" "$OUT/results.jsonl" "$OUT/results.md" "$OUT/chart.svg" \
  "$(haproxy -v | head -1 | awk '{print $3}')" "$(nginx -v 2>&1 | sed 's/.*nginx\///')" "$QUICK" || die "report failed"
cat "$OUT/results.md"
if [[ $SAVE == 1 ]]; then
  mkdir -p "$ROOT/bench"
  cp "$OUT/results.md" "$ROOT/bench/results.md"
  cp "$OUT/chart.svg" "$ROOT/bench/chart.svg"
  log "saved bench/results.md and bench/chart.svg"
fi
if [[ -s $OUT/failures.txt ]]; then
  log "runs without a RESULT: $(paste -sd';' "$OUT/failures.txt")"
  exit 1
fi
log "all runs produced a RESULT; raw lines in $OUT/raw-results.txt"
