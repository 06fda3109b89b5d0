#!/usr/bin/env bash
# Side-by-side benchmark: ws-gateway, HAProxy 2.6 (JWT verified by HAProxy) and nginx 1.22 (no auth), each in front
# of the same `ws-loadgen echo` upstream, plus "direct" (the load generator straight to the echo upstream, plain ws);
# then two scaling curves for the three proxies, and optionally what each ws-gateway feature costs.
#
#   scripts/bench.sh                  full run (~13 minutes after the build)
#   QUICK=1 scripts/bench.sh          smoke run with tiny numbers (~1 minute after the build; CI runs it)
#   SAVE=1 scripts/bench.sh           also copy the tables and charts to bench/ (results.md, chart.svg, rss_curve.svg,
#                                     cpu_curve.svg, and features.md when the feature runs ran)
#   FEATURES=1 scripts/bench.sh       the above, then the feature runs (~6-7 minutes more; ~30 s with QUICK=1)
#   FEATURES=only scripts/bench.sh    only the feature runs (HAProxy and nginx are not started)
#   SKIP_BUILD=1 CARGO_TARGET_DIR=DIR scripts/bench.sh
#                                     no cargo build: take DIR/release/ws-gateway and DIR/release/ws-loadgen as they
#                                     are (a copy set aside, so a build in progress elsewhere cannot swap them mid-run)
#
# What runs, in order:
#   latency      LAT_RUNS x (LAT_SESSIONS sessions x LAT_RATE msg/s, LAT_SECONDS measured), every target, interleaved
#   bulk         BULK_RUNS x one session sending BULK_BYTES in 64 KiB frames
#   handshakes   HS_CONCURRENCY closed loops of full TLS handshakes + upgrade + one echo, HS_SECONDS
#   idle curve   for each N in IDLE_CURVE: N authenticated TLS sessions held idle; RSS per session (fresh process
#                per point). A proxy holds 2 sockets per session and a process may open 20,000 files here, so
#                9,000 is the largest point (HAProxy's maxconn and nginx's worker_connections allow it).
#   CPU curve    for each rate in CPU_RATES: CPU_SESSIONS sessions at that rate, one run of CPU_SECONDS; proxy CPU
#                per echoed message. The point at LAT_RATE (when CPU_SESSIONS = LAT_SESSIONS) is not run again:
#                it is the latency runs above.
#   features     (FEATURES=1 or only) a fresh ws-gateway per configuration in FEAT_CONFIGS, the same latency run
#                (FEAT_LAT_SECONDS) and handshake run (FEAT_HS_SECONDS), FEAT_RUNS rounds interleaved:
#                  baseline   as in the comparison above
#                  redis      --redis-url to a private redis-server on a free port (revocations through Redis)
#                  limits     redis + per-subject rate and session limits, message rate and handshake budget, all
#                             set far above what the load reaches (every run must end with 0 errors and 0 lost)
#                  upstreams  three `ws-loadgen echo` upstreams as a comma list in --upstream-ws-url
#                  all        redis + limits + upstreams
#                The MQTT CONNECT rewrite and topic rules are measured by scripts/mqtt_bench.sh.
#
# Results go to $CARGO_TARGET_DIR/bench/ (default target/bench/): results.jsonl (one RESULT per run, tagged),
# meta.json (date, machine, commit, knobs), results.md, chart.svg, rss_curve.svg, cpu_curve.svg, features.md, and
# logs/ + conf/; the binaries come from $CARGO_TARGET_DIR/release/ too. Exits non-zero when any run did not produce
# its RESULT line, or a feature run had errors or lost messages. Loopback only; every process started is killed on
# exit.
# Knobs (env): BENCH_PORT_BASE (18400), GW_LOG (RUST_LOG for ws-gateway, default info as shipped), HS_CONCURRENCY,
# HS_SECONDS, LAT_SESSIONS, LAT_RATE, LAT_SECONDS, LAT_RUNS, LAT_NICE (0; e.g. -10 runs the latency client at a
# higher priority), BULK_BYTES, BULK_RUNS, IDLE_CURVE ("1000 3000 5000 7000 9000"; IDLE_GW and IDLE_OTHERS, when
# set, replace it for ws-gateway and for HAProxy + nginx), IDLE_SETTLE, IDLE_HOLD, CPU_RATES
# ("1000 5000 10000 20000 40000"; empty: no CPU curve), CPU_SESSIONS (1000), CPU_SECONDS (8), CPU_WARMUP (2),
# FEATURES (0), FEAT_CONFIGS ("baseline redis limits upstreams all"), FEAT_RUNS (3), FEAT_LAT_SECONDS (10),
# FEAT_HS_SECONDS (10), SKIP_BUILD (0).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=$TARGET_DIR/bench
CONF=$OUT/conf
LOGS=$OUT/logs
QUICK=${QUICK:-0}
SAVE=${SAVE:-0}
SKIP_BUILD=${SKIP_BUILD:-0}
FEATURES=${FEATURES:-0}
BASE=${BENCH_PORT_BASE:-18400}
ECHO_ADDR=127.0.0.1:$((BASE + 1))
JWKS_PORT=$((BASE + 2))
# Two more echo upstreams for the feature run with three upstream endpoints.
ECHO2_ADDR=127.0.0.1:$((BASE + 3))
ECHO3_ADDR=127.0.0.1:$((BASE + 4))
GW_PORT=$((BASE + 43))
GW_ADMIN=127.0.0.1:$((BASE + 90))
HAP_PORT=$((BASE + 44))
NGX_PORT=$((BASE + 45))

if [[ $QUICK == 1 ]]; then
  HS_CONCURRENCY=${HS_CONCURRENCY:-4}; HS_SECONDS=${HS_SECONDS:-2}
  LAT_SESSIONS=${LAT_SESSIONS:-20}; LAT_RATE=${LAT_RATE:-500}; LAT_SECONDS=${LAT_SECONDS:-2}; LAT_WARMUP=0.5; LAT_RUNS=${LAT_RUNS:-1}
  BULK_BYTES=${BULK_BYTES:-$((64 << 20))}; BULK_RUNS=${BULK_RUNS:-1}
  IDLE_CURVE=${IDLE_CURVE:-"50 100"}; IDLE_SETTLE=${IDLE_SETTLE:-1}; IDLE_HOLD=${IDLE_HOLD:-1}
  # 500 is LAT_RATE: that point comes from the latency run, 2000 is measured.
  CPU_RATES=${CPU_RATES-"500 2000"}; CPU_SESSIONS=${CPU_SESSIONS:-20}; CPU_SECONDS=${CPU_SECONDS:-2}; CPU_WARMUP=${CPU_WARMUP:-0.5}
  FEAT_RUNS=${FEAT_RUNS:-1}; FEAT_LAT_SECONDS=${FEAT_LAT_SECONDS:-2}; FEAT_HS_SECONDS=${FEAT_HS_SECONDS:-2}
else
  HS_CONCURRENCY=${HS_CONCURRENCY:-32}; HS_SECONDS=${HS_SECONDS:-15}
  LAT_SESSIONS=${LAT_SESSIONS:-1000}; LAT_RATE=${LAT_RATE:-10000}; LAT_SECONDS=${LAT_SECONDS:-15}; LAT_WARMUP=2; LAT_RUNS=${LAT_RUNS:-3}
  BULK_BYTES=${BULK_BYTES:-$((1 << 30))}; BULK_RUNS=${BULK_RUNS:-3}
  IDLE_CURVE=${IDLE_CURVE:-"1000 3000 5000 7000 9000"}; IDLE_SETTLE=${IDLE_SETTLE:-5}; IDLE_HOLD=${IDLE_HOLD:-8}
  CPU_RATES=${CPU_RATES-"1000 5000 10000 20000 40000"}; CPU_SESSIONS=${CPU_SESSIONS:-1000}; CPU_SECONDS=${CPU_SECONDS:-8}; CPU_WARMUP=${CPU_WARMUP:-2}
  FEAT_RUNS=${FEAT_RUNS:-3}; FEAT_LAT_SECONDS=${FEAT_LAT_SECONDS:-10}; FEAT_HS_SECONDS=${FEAT_HS_SECONDS:-10}
fi
IDLE_GW=${IDLE_GW:-$IDLE_CURVE}
IDLE_OTHERS=${IDLE_OTHERS:-$IDLE_CURVE}
FEAT_CONFIGS=${FEAT_CONFIGS:-"baseline redis limits upstreams all"}
GW_LOG=${GW_LOG:-info}
LAT_NICE=${LAT_NICE:-0}
case $FEATURES in 0 | 1 | only) ;; *) echo "FEATURES must be 0, 1 or only" >&2; exit 2 ;; esac
MAIN=1
[[ $FEATURES == only ]] && MAIN=0

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
if [[ $MAIN == 1 ]]; then
  command -v haproxy >/dev/null || [[ -x /usr/sbin/haproxy ]] || need+=(haproxy)
  command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || need+=(nginx)
fi
# Installing the package may start the system service on 6379: the feature runs start their own on a free port.
[[ $FEATURES == 0 ]] || command -v redis-server >/dev/null || need+=(redis-server)
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
HAP_VERSION=""
NGX_VERSION=""
if [[ $MAIN == 1 ]]; then
  # No `grep -q` or `head` in these pipes: a reader that exits early makes the writer die of SIGPIPE, and with
  # pipefail the check fails (or set -e ends the script) at random.
  haproxy -vv 2>/dev/null | grep OPENSSL >/dev/null || die "haproxy was built without OpenSSL (jwt_verify needs it)"
  HAP_VERSION=$(haproxy -v | awk 'NR == 1 {print $3}')
  log "HAProxy $HAP_VERSION; $(nginx -v 2>&1)"
  NGX_VERSION=$(nginx -v 2>&1 | sed 's/.*nginx\///')
fi
for n in $IDLE_GW $IDLE_OTHERS; do
  ((n <= 9000)) || log "WARNING: IDLE_CURVE point $n: a proxy holds 2 sockets per session and a process may open 20,000 files here"
done

GW=$TARGET_DIR/release/ws-gateway
LG=$TARGET_DIR/release/ws-loadgen
if [[ $SKIP_BUILD == 1 ]]; then
  # Binaries built elsewhere (or copied aside, so a build in progress in target/ does not swap them mid-run).
  [[ -x $GW && -x $LG ]] || die "SKIP_BUILD=1 but $GW or $LG is missing"
  log "SKIP_BUILD=1: using $GW and $LG as they are"
else
  log "building ws-gateway and ws-loadgen (release)"
  (cd "$ROOT" && cargo build --release --quiet -p ws-gateway -p ws-loadgen --bin ws-gateway --bin ws-loadgen) || die "cargo build failed"
fi

rm -rf "$CONF" "$LOGS"
mkdir -p "$CONF/jwks" "$LOGS" "$CONF/nginx-temp"
: >"$OUT/results.jsonl"
: >"$OUT/failures.txt"
rm -f "$OUT"/results.md "$OUT"/features.md "$OUT"/*.svg

# When, where and what: the top of results.md and features.md. The commit is the work tree's; with SKIP_BUILD=1 the
# binaries may be older, so their modification time is recorded too.
python3 - "$OUT/meta.json" "$ROOT" "$GW" "$LG" <<EOF || die "writing meta.json failed"
import datetime, json, os, platform, subprocess, sys
out, root, gw, lg = sys.argv[1:5]
def git(*a):
    try:
        return subprocess.run(["git", "-C", root, *a], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
cpu = ""
with open("/proc/cpuinfo") as f:
    for line in f:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
mem = 0
with open("/proc/meminfo") as f:
    for line in f:
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1])
def mtime(p):
    return datetime.datetime.fromtimestamp(os.path.getmtime(p), datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
words = lambda s: [int(x) for x in s.split()]
json.dump({
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    "nproc": len(os.sched_getaffinity(0)),
    "cpu_model": cpu,
    "mem_gib": round(mem / 1048576, 1),
    "kernel": platform.release(),
    "commit": git("rev-parse", "--short=12", "HEAD"),
    "commit_subject": git("log", "-1", "--format=%s"),
    "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    "skip_build": "$SKIP_BUILD" == "1",
    "gateway_built": mtime(gw),
    "loadgen_built": mtime(lg),
    "quick": "$QUICK" == "1",
    "main": "$MAIN" == "1",
    "haproxy_version": "$HAP_VERSION",
    "nginx_version": "$NGX_VERSION",
    "idle_gw": words("$IDLE_GW"),
    "idle_others": words("$IDLE_OTHERS"),
    "lat_sessions": $LAT_SESSIONS,
    "lat_rate": $LAT_RATE,
    "cpu_rates": words("$CPU_RATES"),
    "cpu_sessions": $CPU_SESSIONS,
    "cpu_seconds": $CPU_SECONDS,
    "cpu_reuse_rate": $LAT_RATE if $CPU_SESSIONS == $LAT_SESSIONS and $LAT_RATE in words("$CPU_RATES") else None,
    "features": "$FEATURES",
    "feat_configs": "$FEAT_CONFIGS".split(),
    "feat_runs": $FEAT_RUNS,
    "feat_lat_seconds": $FEAT_LAT_SECONDS,
    "feat_hs_seconds": $FEAT_HS_SECONDS,
    "hs_concurrency": $HS_CONCURRENCY,
}, open(out, "w"), indent=1)
EOF

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
    maxconn 9500
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
# Two sockets per session, and one worker may end up with most of them: 9,000 sessions need 18,000.
events { worker_connections 19500; }
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
if [[ $MAIN == 1 ]]; then
  haproxy -c -q -f "$CONF/haproxy.cfg" || die "haproxy rejects $CONF/haproxy.cfg"
  nginx -t -q -c "$CONF/nginx.conf" || die "nginx rejects $CONF/nginx.conf"
fi

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

# The feature runs change these three: extra flags, the upstream list and the log file.
GW_EXTRA=()
GW_UPSTREAM="ws://$ECHO_ADDR/"
GW_LOGFILE=$LOGS/ws-gateway.log
GW_NEEDS_STORE=0

start_ws_gateway() {
  RUST_LOG=$GW_LOG "$GW" --listen "127.0.0.1:$GW_PORT" --admin-listen "$GW_ADMIN" \
    --tls-cert "$CONF/server.pem" --tls-key "$CONF/server.key" \
    --jwks-url "http://127.0.0.1:$JWKS_PORT/jwks.json" --upstream-ws-url "$GW_UPSTREAM" \
    --ws-idle-timeout-seconds 600 --max-connections 20000 ${GW_EXTRA[@]+"${GW_EXTRA[@]}"} >>"$GW_LOGFILE" 2>&1 &
  MAIN_PID=$!
  PIDS+=("$MAIN_PID")
  local code=""
  for _ in $(seq 100); do
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://$GW_ADMIN/readyz" || true)
    [[ $code == 200 ]] && break
    kill -0 "$MAIN_PID" 2>/dev/null || break
    sleep 0.1
  done
  [[ $code == 200 ]] || { log "ws-gateway not ready (readyz $code); see $GW_LOGFILE"; return 1; }
  if [[ $GW_NEEDS_STORE == 1 ]]; then
    # Ready does not wait for the store (it fails open): measure only once the store is in use.
    local up=0
    for _ in $(seq 100); do
      curl -s "http://$GW_ADMIN/metrics" | grep -E '^ws_state_store_up(\{[^}]*\})? 1' >/dev/null && { up=1; break; }
      sleep 0.1
    done
    ((up)) || { log "ws-gateway did not reach Redis (ws_state_store_up); see $GW_LOGFILE"; return 1; }
  fi
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
mode_cpu() {
  run "$1" "cpu$CPU_RATE" latency --sessions "$CPU_SESSIONS" --rate "$CPU_RATE" --duration "$CPU_SECONDS" --warmup "$CPU_WARMUP"
}
# Idle memory: a fresh process per run, so allocator pools left by earlier runs do not hide the cost.
idle_run() {
  local t=$1 n=$2
  if ! "start_$t"; then echo "$t start" >>"$OUT/failures.txt"; stop_target; return 0; fi
  run "$t" "idle$n" idle --sessions "$n" --settle "$IDLE_SETTLE" --hold "$IDLE_HOLD"
  stop_target
}
in_list() { # in_list WORD LIST...
  local w=$1 x
  shift
  for x in "$@"; do [[ $x == "$w" ]] && return 0; done
  return 1
}

if [[ $MAIN == 1 ]]; then
  # Tail latency on 2 shared cores is noisy from run to run: repeat, interleaved, and report the median.
  for LAT_RUN in $(seq "$LAT_RUNS"); do with_each_target mode_latency; done
  # CPU per echoed message against the message rate: one run per point, the three proxies interleaved; the point at
  # LAT_RATE is the latency runs just done. Before the handshake runs, for the same reason as the latency runs.
  TARGETS=(ws_gateway haproxy nginx)
  for CPU_RATE in $CPU_RATES; do
    if [[ $CPU_SESSIONS == "$LAT_SESSIONS" && $CPU_RATE == "$LAT_RATE" ]]; then
      log "CPU curve: the $CPU_RATE msg/s point is the latency runs"
      continue
    fi
    with_each_target mode_cpu
  done
  TARGETS=(direct ws_gateway haproxy nginx)
  with_each_target mode_bulk
  # direct last: at ~15,000 connections/s it leaves the most TIME_WAIT sockets behind.
  TARGETS=(ws_gateway haproxy nginx direct)
  with_each_target mode_handshakes
  # The idle curve, smallest first, the proxies interleaved at each size.
  # shellcheck disable=SC2086 # the lists are words
  for n in $(printf '%s\n' $IDLE_GW $IDLE_OTHERS | sort -nu); do
    if in_list "$n" $IDLE_GW; then idle_run ws_gateway "$n"; fi
    if in_list "$n" $IDLE_OTHERS; then idle_run haproxy "$n"; idle_run nginx "$n"; fi
  done
fi

# ---------------------------------------------------------------------------------------------------------------
# Feature costs: ws-gateway alone, one feature turned on at a time against a baseline, in the same run.
LIMIT_FLAGS=(--rate-limit-per-second 1000000 --rate-limit-burst 1000000 --max-sessions-per-subject 100000
  --ws-message-rate-per-second 1000000 --handshake-rate-per-ip 1000000)
REDIS_PID=""
REDIS_URL_FEAT=""
# feature_config NAME: the flags of one configuration (GW_EXTRA, GW_UPSTREAM, GW_NEEDS_STORE).
feature_config() {
  GW_EXTRA=()
  GW_UPSTREAM="ws://$ECHO_ADDR/"
  GW_NEEDS_STORE=0
  case $1 in
    baseline) ;;
    redis) GW_EXTRA=(--redis-url "$REDIS_URL_FEAT"); GW_NEEDS_STORE=1 ;;
    limits) GW_EXTRA=(--redis-url "$REDIS_URL_FEAT" "${LIMIT_FLAGS[@]}"); GW_NEEDS_STORE=1 ;;
    upstreams) GW_UPSTREAM="ws://$ECHO_ADDR/,ws://$ECHO2_ADDR/,ws://$ECHO3_ADDR/" ;;
    all)
      GW_EXTRA=(--redis-url "$REDIS_URL_FEAT" "${LIMIT_FLAGS[@]}"); GW_NEEDS_STORE=1
      GW_UPSTREAM="ws://$ECHO_ADDR/,ws://$ECHO2_ADDR/,ws://$ECHO3_ADDR/" ;;
    *) die "FEAT_CONFIGS: unknown configuration '$1' (baseline redis limits upstreams all)" ;;
  esac
}
# CPU seconds (user + system) of one process so far, from /proc/PID/stat.
cpu_seconds() {
  local stat
  stat=$(<"/proc/$1/stat")
  stat=${stat##*) }
  local -a f
  read -r -a f <<<"$stat"
  python3 -c 'import sys; print((int(sys.argv[1]) + int(sys.argv[2])) / int(sys.argv[3]))' "${f[11]}" "${f[12]}" "$(getconf CLK_TCK)"
}
# feature_run NAME MODE: a fresh gateway with configuration NAME, one latency or handshake run, then its row gets
# the flags, Redis's CPU over the run and ws_limit_fallbacks_total; a run with errors or lost messages fails.
feature_run() {
  local c=$1 mode=$2 t=gw_$1 label store0="" store1="" fallbacks
  feature_config "$c"
  GW_LOGFILE=$LOGS/ws-gateway-$c.log
  if ! start_ws_gateway; then echo "$t start" >>"$OUT/failures.txt"; stop_target; return 0; fi
  [[ $GW_NEEDS_STORE == 1 ]] && store0=$(cpu_seconds "$REDIS_PID")
  case $mode in
    latency)
      label=latency$FEAT_RUN
      run "$t" "$label" latency --sessions "$LAT_SESSIONS" --rate "$LAT_RATE" --duration "$FEAT_LAT_SECONDS" --warmup "$LAT_WARMUP" ;;
    handshakes)
      label=handshakes$FEAT_RUN
      run "$t" "$label" handshakes --concurrency "$HS_CONCURRENCY" --duration "$FEAT_HS_SECONDS" ;;
  esac
  [[ $GW_NEEDS_STORE == 1 ]] && store1=$(cpu_seconds "$REDIS_PID")
  fallbacks=$(curl -s "http://$GW_ADMIN/metrics" | awk '/^ws_limit_fallbacks_total/ {s += $NF} END {print s + 0}')
  stop_target
  ((fallbacks == 0)) || log "WARNING: $t $label: $fallbacks limit decisions fell back to the local copy (store slow or down)"
  local flags="--upstream-ws-url $GW_UPSTREAM${GW_EXTRA[*]+ ${GW_EXTRA[*]}}"
  python3 - "$OUT/results.jsonl" "$t" "$label" "$store0" "$store1" "$fallbacks" "$flags" <<'EOF' ||
import json, sys
path, target, label, s0, s1, fallbacks, flags = sys.argv[1:8]
with open(path) as f:
    lines = f.read().splitlines()
row = json.loads(lines[-1]) if lines else {}
if row.get("target") != target or row.get("label") != label:
    sys.exit(0)  # no RESULT: run() has counted the failure
row.update(feature=target[3:], flags=flags, limit_fallbacks=int(fallbacks),
           store_cpu_s=round(float(s1) - float(s0), 3) if s0 and s1 else None)
lines[-1] = json.dumps(row)
with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
bad = {k: row[k] for k in ("errors", "lost", "broken_sessions") if row.get(k)}
if bad:
    print(f"{target} {label}: {bad}", file=sys.stderr)
    sys.exit(3)
EOF
    echo "$t $label: errors or lost messages (a limit refused?)" >>"$OUT/failures.txt"
}

if [[ $FEATURES != 0 ]]; then
  free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
  REDIS_PORT=$(free_port)
  mkdir -p "$OUT/redis"
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$OUT/redis" \
    >"$LOGS/redis.log" 2>&1 &
  REDIS_PID=$!
  PIDS+=("$REDIS_PID")
  REDIS_URL_FEAT=redis://127.0.0.1:$REDIS_PORT/0
  for a in "$ECHO2_ADDR" "$ECHO3_ADDR"; do
    "$LG" echo --listen "$a" --exit-after 3600 >>"$LOGS/echo-more.log" 2>&1 &
    PIDS+=($!)
  done
  wait_tcp 127.0.0.1 "$REDIS_PORT" || die "redis-server did not start; see $LOGS/redis.log"
  for a in "$ECHO2_ADDR" "$ECHO3_ADDR"; do wait_tcp 127.0.0.1 "${a##*:}" || die "the echo upstream on $a did not start"; done
  for c in $FEAT_CONFIGS; do feature_config "$c"; done # unknown names fail before any run
  log "feature runs: $FEAT_CONFIGS; $FEAT_RUNS round(s); Redis on port $REDIS_PORT"
  # Latency rounds first, then handshake rounds (TIME_WAIT, as above); the configurations interleaved in each.
  for FEAT_RUN in $(seq "$FEAT_RUNS"); do
    for c in $FEAT_CONFIGS; do feature_run "$c" latency; done
  done
  for FEAT_RUN in $(seq "$FEAT_RUNS"); do
    for c in $FEAT_CONFIGS; do feature_run "$c" handshakes; done
  done
fi

# ---------------------------------------------------------------------------------------------------------------
# Tables and charts
python3 "$ROOT/scripts/bench_report.py" "$OUT" || die "report failed"
saved=()
for f in results.md features.md; do
  [[ -f $OUT/$f ]] || continue
  cat "$OUT/$f"
  echo
done
if [[ $SAVE == 1 ]]; then
  mkdir -p "$ROOT/bench"
  for f in results.md chart.svg rss_curve.svg cpu_curve.svg features.md; do
    [[ -f $OUT/$f ]] || continue
    cp "$OUT/$f" "$ROOT/bench/$f"
    saved+=("bench/$f")
  done
  log "saved ${saved[*]}"
fi
if [[ -s $OUT/failures.txt ]]; then
  log "runs without a RESULT or not clean: $(paste -sd';' "$OUT/failures.txt")"
  exit 1
fi
log "all runs produced a RESULT; raw lines in $OUT/raw-results.txt"
