#!/usr/bin/env bash
# What the MQTT-aware edge costs (issue 16, rule 4): the gateway's CPU per MQTT message with and without the CONNECT
# rewrite and topic ACLs, in front of a real Mosquitto.
#
#   scripts/mqtt_bench.sh            RUNS (3) rounds of 200 sessions x 2,000 msg/s x 10 s per configuration (~3 min
#                                    after the release build)
#   QUICK=1 scripts/mqtt_bench.sh    one round of 20 sessions x 200 msg/s x 2 s (~20 s), the smoke run
#
# A private Mosquitto (a plain MQTT listener, which it needs to start, and a websockets listener on free loopback
# ports) is the upstream, with the ACL `pattern readwrite devices/%u/#`: a session reaches its topic only when the
# CONNECT's username is `bench-user`. `ws-loadgen pki` makes the CA, certificate, RS256 key, JWKS and a token for
# `bench-user`. For each configuration a release ws-gateway (TLS, the token in `Authorization: Bearer`) starts in
# front of Mosquitto, and `ws-loadgen mqtt` opens the sessions (subprotocol `mqtt`, client ids `bench-user-<i>`,
# sources 127.0.1.1-8), each subscribed to `devices/bench-user/<i>` and publishing QoS 0 messages there at the
# aggregate rate; the broker sends each one back. Configurations:
#   direct    the load generator straight to Mosquitto's websockets listener (plain ws, no gateway): the floor;
#   raw       no MQTT setting: the gateway relays bytes (with the token in the header it never parses the CONNECT);
#   identity  --mqtt-username-claim sub: the CONNECT is parsed and rewritten once per session (rule 1). The client
#             sends username `someone-else` here (and in acl), so only the gateway's rewrite to the token's `sub`
#             lets the broker's ACL pass: a run where the rewrite did not happen loses every message and fails;
#   acl       identity plus --mqtt-publish-acl/--mqtt-subscribe-acl 'devices/{sub}/#': every client packet parsed
#             (rule 2). Skipped with "acl: not available in this build" when the binary refuses those flags.
#
# "Gateway CPU µs/message" is the gateway's CPU time (utime + stime from /proc/PID/stat) over the measured window
# divided by the messages published in it; each published message crosses the gateway twice (the client's PUBLISH
# in, the broker's PUBLISH back out), so a crossing costs half of it. Mosquitto's CPU per message is shown too.
# Each figure is the median over the rounds; lost is the sum. A run fails when it errors, or loses more than
# max(2, 0.1%) of its messages, or sees a message on a foreign topic. Ends with `mqtt_bench: N passed, N failed`
# (the whole benchmark is one check) and exits 1 on failure.
#
# Results go to $CARGO_TARGET_DIR/mqtt_bench/ (default target/mqtt_bench/): results.jsonl (one RESULT per run,
# tagged), results.md and the logs. Every process started is stopped on exit. Knobs (env): RUNS, SESSIONS, RATE,
# SECONDS_PER_RUN, WARMUP, PAYLOAD (32), GW_LOG (RUST_LOG of the gateway, default info as shipped), GW_BIN (another
# ws-gateway binary to measure, e.g. a build that has the topic ACL flags; default the one built here).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=$TARGET_DIR/mqtt_bench
CONF=$OUT/conf
LOGS=$OUT/logs
QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
  RUNS=${RUNS:-1}; SESSIONS=${SESSIONS:-20}; RATE=${RATE:-200}; SECONDS_PER_RUN=${SECONDS_PER_RUN:-2}; WARMUP=${WARMUP:-0.5}
else
  RUNS=${RUNS:-3}; SESSIONS=${SESSIONS:-200}; RATE=${RATE:-2000}; SECONDS_PER_RUN=${SECONDS_PER_RUN:-10}; WARMUP=${WARMUP:-1}
fi
PAYLOAD=${PAYLOAD:-32}
GW_LOG=${GW_LOG:-info}
SUB=bench-user

log() { printf '[mqtt_bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
  log "FATAL: $*"
  echo "mqtt_bench: 0 passed, 1 failed"
  exit 1
}

# ---------------------------------------------------------------------------------------------------------------
# Processes: every one started is recorded here and stopped on exit.
# shellcheck source=scripts/procs.sh
source "$ROOT/scripts/procs.sh"
MOSQ_DIR=""
cleanup() {
  kill_all
  [[ -n $MOSQ_DIR ]] && rm -rf "$MOSQ_DIR"
  return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------------------------------
# Tools
need=()
[[ -x /usr/sbin/mosquitto ]] || need+=(mosquitto)
command -v python3 >/dev/null || need+=(python3)
command -v curl >/dev/null || need+=(curl)
if ((${#need[@]})); then
  log "installing ${need[*]}"
  apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >&2
fi

log "building ws-gateway and ws-loadgen (release)"
(cd "$ROOT" && cargo build --release --quiet -p ws-gateway -p ws-loadgen --bin ws-gateway --bin ws-loadgen) ||
  die "cargo build failed"
GW=${GW_BIN:-$TARGET_DIR/release/ws-gateway}
[[ -x $GW ]] || die "no gateway binary at $GW"
LG=$TARGET_DIR/release/ws-loadgen

rm -rf "$CONF" "$LOGS"
mkdir -p "$CONF" "$LOGS"
: >"$OUT/results.jsonl"

# Free loopback ports, all held at once while chosen so they differ.
read -r MQTT_PORT WS_PORT JWKS_PORT GW_PORT GW_ADMIN_PORT < <(python3 - <<'PY'
import socket
socks = [socket.socket() for _ in range(5)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
PY
)

# ---------------------------------------------------------------------------------------------------------------
# Keys, certificate, token, JWKS
log "making a CA, a server certificate, an RS256 key, a token for $SUB and its JWKS (ws-loadgen pki)"
"$LG" pki --out "$CONF" --san 127.0.0.1,localhost --jwt rs256 --kid bench --token-sub "$SUB" --token-ttl 86400 \
  >/dev/null || die "ws-loadgen pki failed"
TOKEN=$(cat "$CONF/token")
python3 -m http.server "$JWKS_PORT" --bind 127.0.0.1 --directory "$CONF/jwks" >"$LOGS/jwks.log" 2>&1 &
PIDS+=($!)
wait_tcp 127.0.0.1 "$JWKS_PORT" || die "the JWKS server did not start"

# ---------------------------------------------------------------------------------------------------------------
# Mosquitto: it drops root to the `mosquitto` user, so its directory and files are world-readable. Its log goes to
# stderr, which this script opened.
MOSQ_DIR=$(mktemp -d /tmp/mqtt-bench.XXXXXX)
cat >"$MOSQ_DIR/mosquitto.conf" <<EOF
per_listener_settings false
allow_anonymous true
acl_file $MOSQ_DIR/acl
persistence false
log_dest stderr
log_type error
log_type warning
listener $MQTT_PORT 127.0.0.1
protocol mqtt
listener $WS_PORT 127.0.0.1
protocol websockets
socket_domain ipv4
EOF
printf 'pattern readwrite devices/%%u/#\n' >"$MOSQ_DIR/acl"
chmod 755 "$MOSQ_DIR"
chmod 644 "$MOSQ_DIR/mosquitto.conf" "$MOSQ_DIR/acl"
/usr/sbin/mosquitto -c "$MOSQ_DIR/mosquitto.conf" >"$LOGS/mosquitto.log" 2>&1 &
MOSQ_PID=$!
PIDS+=("$MOSQ_PID")
wait_tcp 127.0.0.1 "$WS_PORT" && wait_tcp 127.0.0.1 "$MQTT_PORT" ||
  die "mosquitto did not start: $(tail -3 "$LOGS/mosquitto.log")"
log "$(/usr/sbin/mosquitto -h 2>/dev/null | head -1 | cut -c1-40) on mqtt :$MQTT_PORT, websockets :$WS_PORT"

# ---------------------------------------------------------------------------------------------------------------
# The configurations
GW_BASE=(--listen "127.0.0.1:$GW_PORT" --admin-listen "127.0.0.1:$GW_ADMIN_PORT"
  --tls-cert "$CONF/server.pem" --tls-key "$CONF/server.key"
  --jwks-url "http://127.0.0.1:$JWKS_PORT/jwks.json" --upstream-ws-url "ws://127.0.0.1:$WS_PORT/")
declare -A GW_FLAGS=(
  [raw]=""
  [identity]="--mqtt-username-claim sub"
  [acl]="--mqtt-username-claim sub --mqtt-publish-acl devices/{sub}/# --mqtt-subscribe-acl devices/{sub}/#"
)
CONFIGS=(direct raw identity acl)

# available NAME: whether this gateway binary accepts the configuration's flags (clap exits 2 on an unknown flag).
declare -A SKIP=()
for name in raw identity acl; do
  read -ra extra <<<"${GW_FLAGS[$name]}"
  rc=0
  "$GW" --check-config "${GW_BASE[@]}" "${extra[@]}" >"$LOGS/check-$name.log" 2>&1 || rc=$?
  if ((rc != 0)); then
    if [[ $name == acl ]]; then
      echo "acl: not available in this build"
      log "acl: --check-config exited $rc: $(head -c 200 "$LOGS/check-$name.log" | tr '\n' ' ')"
      SKIP[$name]=1
    else
      die "$name: --check-config exited $rc: $(cat "$LOGS/check-$name.log")"
    fi
  fi
done

ERRORS=0
GW_PID=""

# start_gateway NAME: a release gateway with the configuration's flags; returns 1 if it does not become ready.
start_gateway() {
  local name=$1 extra
  read -ra extra <<<"${GW_FLAGS[$name]}"
  RUST_LOG=$GW_LOG "$GW" "${GW_BASE[@]}" "${extra[@]}" >>"$LOGS/gateway-$name.log" 2>&1 &
  GW_PID=$!
  PIDS+=("$GW_PID")
  for _ in $(seq 100); do
    [[ $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$GW_ADMIN_PORT/readyz" || true) == 200 ]] && return 0
    kill -0 "$GW_PID" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

# run NAME ROUND: one measured run; its RESULT is appended to results.jsonl tagged with the configuration.
run() {
  local name=$1 round=$2 target out rc=0 user=$SUB
  # Where the gateway sets the username from the token, the client's own is a wrong one.
  [[ $name == identity || $name == acl ]] && user=someone-else
  if [[ $name == direct ]]; then
    target=(--url "ws://127.0.0.1:$WS_PORT/")
  else
    if ! start_gateway "$name"; then
      stop "$GW_PID"
      if [[ $name == acl ]]; then
        echo "acl: not available in this build"
        log "acl: the gateway did not start: $(tail -3 "$LOGS/gateway-$name.log" | tr '\n' ' ')"
        SKIP[acl]=1
        return 0
      fi
      log "$name: the gateway did not start: $(tail -3 "$LOGS/gateway-$name.log")"
      ERRORS=$((ERRORS + 1))
      return 0
    fi
    target=(--url "wss://127.0.0.1:$GW_PORT/" --ca "$CONF/ca.pem" --token "$TOKEN" --pid "$GW_PID")
  fi
  log "$name (round $round): $SESSIONS sessions x $RATE msg/s x $SECONDS_PER_RUN s"
  out=$("$LG" mqtt "${target[@]}" --sub "$SUB" --username "$user" --broker-pid "$MOSQ_PID" --sessions "$SESSIONS" --rate "$RATE" \
    --duration "$SECONDS_PER_RUN" --warmup "$WARMUP" --payload "$PAYLOAD" 2>>"$LOGS/loadgen-$name.log") || rc=$?
  [[ -n $GW_PID && $name != direct ]] && stop "$GW_PID"
  GW_PID=""
  local line
  line=$(grep '^RESULT ' <<<"$out" | tail -1 || true)
  if ((rc != 0)) || [[ -z $line ]]; then
    log "$name: ws-loadgen failed (exit $rc): $(tail -3 "$LOGS/loadgen-$name.log" | tr '\n' ' ')"
    ERRORS=$((ERRORS + 1))
    return 0
  fi
  python3 -c 'import json,sys; r=json.loads(sys.argv[1]); r["config"]=sys.argv[2]; r["round"]=int(sys.argv[3]); print(json.dumps(r))' \
    "${line#RESULT }" "$name" "$round" >>"$OUT/results.jsonl"
}

for round in $(seq "$RUNS"); do
  for name in "${CONFIGS[@]}"; do
    [[ -n ${SKIP[$name]:-} ]] && continue
    run "$name" "$round"
  done
done

# ---------------------------------------------------------------------------------------------------------------
# The table
status=0
python3 - "$OUT/results.jsonl" "$OUT/results.md" "$ERRORS" "$RUNS" "${SKIP[acl]:-0}" <<'PY' || status=$?
import json, statistics, sys
path, md, errors, runs, acl_skipped = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
rows = [json.loads(l) for l in open(path) if l.strip()]
order = ["direct", "raw", "identity", "acl"]
labels = {
    "direct": "direct (no gateway, plain ws)",
    "raw": "raw (bytes relayed)",
    "identity": "identity (`--mqtt-username-claim sub`)",
    "acl": "acl (identity + publish/subscribe ACLs)",
}
def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None
def fmt(v, digits=1):
    return "–" if v is None else f"{v:,.{digits}f}"
failed = errors > 0
out = []
first = rows[0] if rows else {}
out.append(f"{first.get('sessions', '?')} sessions × {first.get('rate', 0):,.0f} msg/s (QoS 0, {first.get('payload', '?')}-byte "
           f"payload) × {first.get('duration_s', '?')} s measured, median of {runs} round(s)")
out.append("")
out.append("| configuration | sessions | msg/s | gateway CPU µs/message | vs raw | Mosquitto CPU µs/message | p50 µs | p99 µs | lost / sent |")
out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
raw_cpu = med([r.get("proxy_cpu_us_per_msg") for r in rows if r["config"] == "raw"])
for name in order:
    rs = [r for r in rows if r["config"] == name]
    if not rs:
        if name == "acl" and acl_skipped:
            out.append(f"| {labels[name]} | – | – | not available in this build | – | – | – | – | – |")
        continue
    cpu = med([r.get("proxy_cpu_us_per_msg") for r in rs])
    delta = "–" if cpu is None or raw_cpu is None or name == "raw" else f"{cpu - raw_cpu:+,.1f}"
    broker = med([r.get("broker_cpu_us_per_msg") for r in rs])
    lost = sum(r["lost"] for r in rs)
    sent = sum(r["sent_total"] for r in rs)
    for r in rs:
        if r["lost"] > max(2, r["sent_total"] // 1000) or r.get("foreign", 0) > 0 or r.get("errors", 0) > 0:
            failed = True
    out.append(f"| {labels[name]} | {rs[0]['sessions']} | {rs[0]['rate']:,.0f} | {fmt(cpu)} | {delta} | {fmt(broker)} | "
               f"{fmt(med([r['p50_us'] for r in rs]), 0)} | {fmt(med([r['p99_us'] for r in rs]), 0)} | {lost:,} / {sent:,} |")
if not any(r["config"] == "raw" for r in rows):
    failed = True
out.append("")
out.append("Gateway CPU µs/message: the gateway's CPU time over the measured window / messages published in it; each "
           "message crosses the gateway twice (PUBLISH in, PUBLISH back out).")
text = "\n".join(out)
print("\n" + text + "\n")
open(md, "w").write(text + "\n")
print(f"mqtt_bench: {0 if failed else 1} passed, {1 if failed else 0} failed")
sys.exit(1 if failed else 0)
PY
exit "$status"
