#!/usr/bin/env bash
# Whole box (issue 17): 50,000 idle authenticated TLS WebSocket sessions on this one 2-core machine, and what they
# cost while nothing is sent: the gateways' RSS (per process, in total, per session) and their CPU time and context
# switches over a hold in which no per-session timer should fire.
#
#   scripts/box.sh              50,000 sessions: 7 gateways, 4 echo upstreams, 7 idle clients
#   QUICK=1 scripts/box.sh      3,000 sessions: 3 gateways, 2 upstreams, 3 clients
#
# Why several processes of each kind: open files are capped at 20,000 per process here (`ulimit -Hn`, root cannot
# raise it), a gateway session holds two sockets (client + upstream), an echo upstream or an idle client one. So
# GATEWAYS ws-gateway processes share one listening port (`--reuse-port`; the kernel spreads connections over them
# by a hash of the 4-tuple), each with an admin port of its own; UPSTREAMS `ws-loadgen echo` processes on ports of
# their own are one comma-separated `--upstream-ws-url` (least-connections spreads each gateway's sessions over
# them); CLIENTS `ws-loadgen idle` processes (at most 9,000 sessions each) split SESSIONS. Ephemeral ports
# (32768-60999, ~28,000 per address): each client binds its sockets to a source address of its own,
# $SOURCE_NET.1..CLIENTS (127.0.4.x, used by no other script), and the gateways' upstream sockets (source
# 127.0.0.1) are spread over the UPSTREAMS destination ports.
#
# Sequence: JWKS server, upstreams, gateways (ready on /readyz); the gateways' RSS with zero sessions; the clients
# open their shares (each prints `idle: N of M sessions open` when done); SETTLE seconds; then a reading, IDLE_HOLD
# seconds of silence, a second reading. Readings come from /proc: VmRSS, utime+stime (/proc/PID/stat, every
# thread), voluntary and involuntary context switches summed over /proc/PID/task/*/status (a sleeping thread
# woken counts one voluntary switch: the wake-ups), and /proc/meminfo Slab and /proc/net/sockstat for the kernel.
# The established count is the sum of the gateways' `ws_active_sessions` at the end of the hold (and what the
# clients report); the run exits 1 when it is below 99.9% of SESSIONS, when a process died, or when the clients
# were still opening after OPEN_MAX seconds (the hold would not have been idle).
#
# Knobs (env): SESSIONS (50000; QUICK 3000), GATEWAYS (7; 3), UPSTREAMS (4; 2), CLIENTS (7; 3), IDLE_HOLD (30; 5),
# SETTLE (5; 2; seconds between the last session opened and the first reading), OPEN_MAX (900; 120; seconds allowed
# for opening), OPEN_CONCURRENCY (32 per client), STEP_TIMEOUT (10; the clients' per-step timeout),
# GW_MAX_CONNECTIONS (9000 per gateway), IDLE_TIMEOUT (3600: the gateways' --ws-idle-timeout-seconds),
# GW_LOG (RUST_LOG of the gateways, default info as shipped), BOX_PORT_BASE (18700: echo +1.., JWKS +30,
# gateways +43, admin ports +51..), SOURCE_NET (127.0.4),
# SKIP_BUILD=1 (use the binaries already in $CARGO_TARGET_DIR/release), CARGO_TARGET_DIR.
# Files go to $CARGO_TARGET_DIR/box/ (default target/box/): results.md, snapshots, conf/ and logs/.
# Loopback only; every process started here is stopped on exit (scripts/procs.sh).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=$TARGET_DIR/box
CONF=$OUT/conf
LOGS=$OUT/logs
QUICK=${QUICK:-0}
SKIP_BUILD=${SKIP_BUILD:-0}
BASE=${BOX_PORT_BASE:-18700}
JWKS_PORT=$((BASE + 30))
GW_PORT=$((BASE + 43))
ADMIN_BASE=$((BASE + 50))
SOURCE_NET=${SOURCE_NET:-127.0.4}

if [[ $QUICK == 1 ]]; then
  SESSIONS=${SESSIONS:-3000}; GATEWAYS=${GATEWAYS:-3}; UPSTREAMS=${UPSTREAMS:-2}; CLIENTS=${CLIENTS:-3}
  IDLE_HOLD=${IDLE_HOLD:-5}; SETTLE=${SETTLE:-2}; OPEN_MAX=${OPEN_MAX:-120}
else
  SESSIONS=${SESSIONS:-50000}; GATEWAYS=${GATEWAYS:-7}; UPSTREAMS=${UPSTREAMS:-4}; CLIENTS=${CLIENTS:-7}
  IDLE_HOLD=${IDLE_HOLD:-30}; SETTLE=${SETTLE:-5}; OPEN_MAX=${OPEN_MAX:-900}
fi
OPEN_CONCURRENCY=${OPEN_CONCURRENCY:-32}
STEP_TIMEOUT=${STEP_TIMEOUT:-10}
GW_MAX_CONNECTIONS=${GW_MAX_CONNECTIONS:-9000}
GW_LOG=${GW_LOG:-info}
IDLE_TIMEOUT=${IDLE_TIMEOUT:-3600}

log() { printf '[box %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }
T0=$(date +%s.%N)

# Every process started is recorded in PIDS and stopped on exit.
# shellcheck source=scripts/procs.sh
source "$ROOT/scripts/procs.sh"
trap kill_all EXIT
trap 'exit 130' INT TERM

for tool in python3 curl ss; do command -v "$tool" >/dev/null || die "$tool is needed"; done

# ---------------------------------------------------------------------------------------------------------------
# The shares, checked against the limits before anything starts.
ulimit -n 20000 2>/dev/null || true
FD=$(ulimit -n)
per_client=$(((SESSIONS + CLIENTS - 1) / CLIENTS))
per_upstream=$(((SESSIONS + UPSTREAMS - 1) / UPSTREAMS))
per_gateway=$(((SESSIONS + GATEWAYS - 1) / GATEWAYS))
((GATEWAYS >= 1 && GATEWAYS <= 40 && UPSTREAMS >= 1 && UPSTREAMS <= 20 && CLIENTS >= 1 && CLIENTS <= 250)) ||
  die "GATEWAYS 1-40, UPSTREAMS 1-20, CLIENTS 1-250"
((per_client <= 9000)) || die "$per_client sessions per client: ws-loadgen idle opens at most 9,000; raise CLIENTS"
((per_client + 100 <= FD)) || die "$per_client sessions per client need more than ulimit -n $FD open files"
# Each upstream holds one socket per session, and every gateway-to-upstream socket of one destination port comes
# from the ~28,000 ephemeral ports of 127.0.0.1.
((per_upstream + 100 <= FD && per_upstream <= 25000)) ||
  die "$per_upstream sessions per upstream: over the open-file cap ($FD) or the ephemeral ports; raise UPSTREAMS"
((2 * GW_MAX_CONNECTIONS + 200 <= FD)) || die "GW_MAX_CONNECTIONS $GW_MAX_CONNECTIONS needs 2 open files a session, ulimit -n is $FD"
# The kernel's reuse-port hash is not an exact split: leave 10% over the mean share.
((per_gateway * 11 / 10 <= GW_MAX_CONNECTIONS)) ||
  die "$per_gateway sessions per gateway on average (+10% for the uneven reuse-port split) is over GW_MAX_CONNECTIONS $GW_MAX_CONNECTIONS; raise GATEWAYS"
if ss -Htln "sport = :$GW_PORT" | grep -q .; then
  # With --reuse-port a leftover listener would silently take a share of the sessions.
  die "port $GW_PORT already has a listener (a leftover run?): $(ss -Htlnp "sport = :$GW_PORT" | head -1)"
fi

if [[ $SKIP_BUILD != 1 ]]; then
  log "building ws-gateway and ws-loadgen (release) into $TARGET_DIR"
  (cd "$ROOT" && cargo build --release --quiet -p ws-gateway -p ws-loadgen --bin ws-gateway --bin ws-loadgen) || die "cargo build failed"
fi
GW=$TARGET_DIR/release/ws-gateway
LG=$TARGET_DIR/release/ws-loadgen
[[ -x $GW && -x $LG ]] || die "no release binaries in $TARGET_DIR/release (run without SKIP_BUILD=1)"

rm -rf "$OUT"
mkdir -p "$CONF" "$LOGS"
# What was measured: the commit, and whether the gateway's sources differ from it (others may be editing them).
BUILT="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
DIRTY=$(git -C "$ROOT" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null | awk '{ print $NF }' | paste -sd, -)
[[ -z $DIRTY ]] || BUILT+=" + uncommitted $DIRTY"
# With SKIP_BUILD=1 the binaries may be older than the tree: say so rather than name a state they may not have.
[[ $SKIP_BUILD != 1 ]] || BUILT="binaries built $(date -r "$GW" '+%F %T') (SKIP_BUILD=1; the tree is now $BUILT)"
RUN_T0=$(date +%s.%N)

# ---------------------------------------------------------------------------------------------------------------
# Certificates, the token (valid well past the run) and the JWKS, served as bench.sh serves it.
TOKEN_TTL=$((OPEN_MAX + SETTLE + IDLE_HOLD + 3600))
"$LG" pki --out "$CONF" --san 127.0.0.1,localhost --jwt rs256 --kid box --token-sub box-user --token-ttl "$TOKEN_TTL" \
  >/dev/null || die "ws-loadgen pki failed"
TOKEN=$(cat "$CONF/token")
python3 -m http.server "$JWKS_PORT" --bind 127.0.0.1 --directory "$CONF/jwks" >"$LOGS/jwks.log" 2>&1 &
PIDS+=($!)
wait_tcp 127.0.0.1 "$JWKS_PORT" || die "the JWKS server did not start"
curl -fsS "http://127.0.0.1:$JWKS_PORT/jwks.json" >/dev/null || die "the JWKS is not served"

# ROLES: "role index pid" of every process measured.
ROLES=()
EXIT_AFTER=$((TOKEN_TTL + 600))
UPSTREAM_URLS=()
for i in $(seq "$UPSTREAMS"); do
  port=$((BASE + i))
  "$LG" echo --listen "127.0.0.1:$port" --exit-after "$EXIT_AFTER" >"$LOGS/echo-$i.log" 2>&1 &
  PIDS+=($!)
  ROLES+=("echo $i $!")
  UPSTREAM_URLS+=("ws://127.0.0.1:$port/")
done
for i in $(seq "$UPSTREAMS"); do wait_tcp 127.0.0.1 $((BASE + i)) || die "echo upstream $i did not start"; done
UPSTREAM=$(IFS=,; echo "${UPSTREAM_URLS[*]}")

GW_PIDS=()
for i in $(seq "$GATEWAYS"); do
  RUST_LOG=$GW_LOG "$GW" --listen "127.0.0.1:$GW_PORT" --admin-listen "127.0.0.1:$((ADMIN_BASE + i))" --reuse-port \
    --tls-cert "$CONF/server.pem" --tls-key "$CONF/server.key" \
    --jwks-url "http://127.0.0.1:$JWKS_PORT/jwks.json" --upstream-ws-url "$UPSTREAM" \
    --ws-idle-timeout-seconds "$IDLE_TIMEOUT" --max-connections "$GW_MAX_CONNECTIONS" >"$LOGS/gateway-$i.log" 2>&1 &
  PIDS+=($!)
  GW_PIDS+=($!)
  ROLES+=("gateway $i $!")
done
for i in $(seq "$GATEWAYS"); do
  pid=${GW_PIDS[i - 1]} code=""
  for _ in $(seq 100); do
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$((ADMIN_BASE + i))/readyz" || true)
    [[ $code == 200 ]] && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  [[ $code == 200 ]] || die "gateway $i not ready (readyz $code); see $LOGS/gateway-$i.log"
  # A 200 from another process on the same admin port would hide a gateway that failed to bind.
  kill -0 "$pid" 2>/dev/null || die "gateway $i exited (another process on its ports?); see $LOGS/gateway-$i.log"
done
GW_PID_LIST=$(IFS=,; echo "${GW_PIDS[*]}")
log "$GATEWAYS gateways on 127.0.0.1:$GW_PORT (--reuse-port; admin $((ADMIN_BASE + 1))-$((ADMIN_BASE + GATEWAYS)), pids $GW_PID_LIST), $UPSTREAMS echo upstreams, $(nproc) cores"

# ---------------------------------------------------------------------------------------------------------------
# Readings
# active_sessions I: the gateway I's ws_active_sessions ("" when its admin port does not answer).
active_sessions() {
  { curl -s --max-time 5 "http://127.0.0.1:$((ADMIN_BASE + $1))/metrics" || true; } |
    awk '$1 == "ws_active_sessions" { print $2 }'
}
# snap NAME: one line per process measured, "role index pid rss_kib cpu_ticks voluntary involuntary threads
# sessions" (sessions: the gateway's gauge, - otherwise), then "box" lines: time, Slab, TCP sockets and pages.
snap() {
  local f=$OUT/snap-$1.txt role idx pid rss ticks cs threads sessions
  : >"$f"
  for entry in "${ROLES[@]}"; do
    read -r role idx pid <<<"$entry"
    [[ -r /proc/$pid/status ]] || { echo "$role $idx $pid dead" >>"$f"; continue; }
    rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status")
    # Fields after "pid (comm) " start at field 3 (state): utime is field 14, stime 15.
    ticks=$(sed 's/^.*) //' "/proc/$pid/stat" | awk '{ print $12 + $13 }')
    cs=$(cat "/proc/$pid"/task/*/status 2>/dev/null |
      awk '/^voluntary_ctxt_switches/ { v += $2 } /^nonvoluntary_ctxt_switches/ { n += $2 } END { print v + 0, n + 0 }')
    threads=$(find "/proc/$pid/task" -mindepth 1 -maxdepth 1 | wc -l)
    sessions=-
    [[ $role == gateway ]] && sessions=$(active_sessions "$idx")
    echo "$role $idx $pid $rss $ticks $cs $threads ${sessions:-?}" >>"$f"
  done
  {
    echo "box time $(date +%s.%N)"
    echo "box slab_kib $(awk '/^Slab:/ { print $2 }' /proc/meminfo)"
    echo "box mem_available_kib $(awk '/^MemAvailable:/ { print $2 }' /proc/meminfo)"
    awk '$1 == "TCP:" { print "box tcp_inuse", $3; print "box tcp_mem_pages", $NF }' /proc/net/sockstat
  } >>"$f"
}

# The gateways with zero sessions: the base the per-session RSS is measured from.
sleep 1
snap base

# ---------------------------------------------------------------------------------------------------------------
# The clients: CLIENTS idle loadgens, one source address each, holding until they are stopped.
OPEN_T0=$(date +%s.%N)
CLIENT_N=()
for i in $(seq "$CLIENTS"); do
  n=$((SESSIONS / CLIENTS + (i <= SESSIONS % CLIENTS ? 1 : 0)))
  CLIENT_N+=("$n")
  "$LG" idle --url "wss://127.0.0.1:$GW_PORT/" --ca "$CONF/ca.pem" --token "$TOKEN" --source "$SOURCE_NET.$i" \
    --pid "$GW_PID_LIST" --sessions "$n" --open-concurrency "$OPEN_CONCURRENCY" --step-timeout "$STEP_TIMEOUT" \
    --settle 0 --hold 3600 >"$LOGS/client-$i.out" 2>"$LOGS/client-$i.log" &
  PIDS+=($!)
  ROLES+=("client $i $!")
done
log "$CLIENTS clients opening $SESSIONS sessions ($(IFS=/; echo "${CLIENT_N[*]}")) from $SOURCE_NET.1-$CLIENTS, $OPEN_CONCURRENCY at a time each"

# client_line I: the client's "idle: N of M sessions open, E errors" line, once it has printed it.
client_line() { grep -m1 '^ws-loadgen: idle: ' "$LOGS/client-$1.log" 2>/dev/null || true; }
deadline=$(($(date +%s) + OPEN_MAX))
last_report=0
OPEN_DONE=1
while :; do
  done_n=0
  for i in $(seq "$CLIENTS"); do
    pid=$(awk -v i="$i" '$1 == "client" && $2 == i { print $3 }' <<<"$(printf '%s\n' "${ROLES[@]}")")
    if [[ -n $(client_line "$i") ]] || ! kill -0 "$pid" 2>/dev/null; then done_n=$((done_n + 1)); fi
  done
  ((done_n == CLIENTS)) && break
  if (($(date +%s) >= deadline)); then
    # Measured anyway, for the figures, but the hold was not idle: the run fails.
    log "OPEN_MAX ($OPEN_MAX s) reached with $done_n of $CLIENTS clients done"
    OPEN_DONE=0
    break
  fi
  if (($(date +%s) - last_report >= 10)); then
    total=0
    for i in $(seq "$GATEWAYS"); do n=$(active_sessions "$i"); total=$((total + ${n:-0})); done
    log "opening: $total sessions active in the gateways, $done_n of $CLIENTS clients done"
    last_report=$(date +%s)
  fi
  sleep 1
done
OPEN_S=$(python3 -c "import sys,time; print(round(time.time() - float(sys.argv[1]), 1))" "$OPEN_T0")
for i in $(seq "$CLIENTS"); do
  line=$(client_line "$i")
  log "client $i: ${line:-no report; see $LOGS/client-$i.log}"
done

# ---------------------------------------------------------------------------------------------------------------
# The idle hold
log "opened in $OPEN_S s; settling $SETTLE s, then holding $IDLE_HOLD s idle"
sleep "$SETTLE"
snap hold-start
sleep "$IDLE_HOLD"
snap hold-end
for i in $(seq "$CLIENTS"); do client_line "$i"; done | sed 's/^ws-loadgen: idle: //' >"$OUT/clients.txt"
for i in $(seq "$CLIENTS"); do grep -h '^ws-loadgen: [0-9]* errors' "$LOGS/client-$i.log" || true; done >"$OUT/client-errors.txt"

# ---------------------------------------------------------------------------------------------------------------
# Summary
rc=0
python3 - "$OUT" "$SESSIONS" "$IDLE_HOLD" "$OPEN_S" "$T0" "$QUICK" "$RUN_T0" "$BUILT" "$OPEN_DONE" <<'EOF' || rc=$?
import re, sys, time

out, sessions, hold, open_s, t0, quick, run_t0, built = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), sys.argv[6], float(sys.argv[7]), sys.argv[8]
open_done = sys.argv[9] == "1"
HZ = 100  # USER_HZ: /proc/PID/stat ticks

def read(name):
    procs, box = {}, {}
    for line in open(f"{out}/snap-{name}.txt"):
        f = line.split()
        if f[0] == "box":
            box[f[1]] = float(f[2])
        elif f[3] == "dead":
            procs[(f[0], int(f[1]))] = None
        else:
            procs[(f[0], int(f[1]))] = dict(pid=int(f[2]), rss=int(f[3]), ticks=int(f[4]), vcs=int(f[5]), ncs=int(f[6]),
                                            threads=int(f[7]), sessions=None if f[8] in "-?" else int(f[8]))
    return procs, box

base, bbox = read("base")
start, sbox = read("hold-start")
end, ebox = read("hold-end")
span = ebox["time"] - sbox["time"]
dead = [k for k, v in end.items() if v is None]

opened = errors = 0
for line in open(f"{out}/clients.txt"):
    m = re.match(r"(\d+) of (\d+) sessions open, (\d+) errors", line)
    if m:
        opened += int(m.group(1)); errors += int(m.group(3))
reported = sum(1 for _ in open(f"{out}/clients.txt"))
kinds = {}
for line in open(f"{out}/client-errors.txt"):
    m = re.search(r"errors \{(.*)\}", line)
    for k, v in re.findall(r'"([^"]+)": (\d+)', m.group(1) if m else ""):
        kinds[k] = kinds.get(k, 0) + int(v)

gws = sorted(k for k in end if k[0] == "gateway")
def alive(d, k): return d.get(k) is not None
active = sum((end[k]["sessions"] or 0) for k in gws if alive(end, k))
established = min(active, opened)
rss_base = sum(base[k]["rss"] for k in gws if alive(base, k))
rss_end = sum(end[k]["rss"] for k in gws if alive(end, k))
def delta(k, field): return end[k][field] - start[k][field] if alive(end, k) and alive(start, k) else 0
gw_cpu_ms = sum(delta(k, "ticks") for k in gws) * 1000 / HZ
gw_vcs = sum(delta(k, "vcs") for k in gws)
gw_ncs = sum(delta(k, "ncs") for k in gws)
def role_sum(role, field, snap=end):
    return sum(v[field] for k, v in snap.items() if k[0] == role and v is not None)
def role_delta(role, field):
    return sum(delta(k, field) for k in end if k[0] == role)
per_session = (rss_end - rss_base) / established if established else float("nan")
ok = not dead and open_done and established * 1000 >= sessions * 999
wall = time.time() - t0
run_wall = time.time() - run_t0

def f0(x): return f"{x:,.0f}"
def f1(x): return f"{x:,.1f}"
def f2(x): return f"{x:,.2f}"

rows = [
    ("sessions asked / established (gateways' ws_active_sessions at the end of the hold) / opened (clients)",
     f"{sessions:,} / {active:,} / {opened:,}"),
    ("errors (clients)", f"{errors:,}" + (f" {kinds}" if kinds else "") + ("" if reported == len([k for k in end if k[0] == 'client']) else " (a client did not report)")),
    ("processes: gateways / echo upstreams / clients", f"{len(gws)} / {len([k for k in end if k[0] == 'echo'])} / {len([k for k in end if k[0] == 'client'])}"),
    ("time to open all sessions", f"{open_s:.1f} s"),
    ("gateway RSS, total: zero sessions / held", f"{f0(rss_base)} KiB / {f0(rss_end)} KiB ({rss_end / 1024:,.1f} MiB)"),
    ("gateway RSS per session", f"{per_session:.2f} KiB"),
    (f"gateway CPU during the {span:.1f} s hold (sum of {len(gws)} processes)", f"{f0(gw_cpu_ms)} ms ({f1(gw_cpu_ms / span)} ms/s)"),
    ("gateway context switches during the hold: voluntary (wake-ups) / involuntary", f"{f0(gw_vcs)} / {f0(gw_ncs)} ({f1(gw_vcs / span)} / {f1(gw_ncs / span)} per s)"),
    ("gateway threads (sum)", f0(role_sum("gateway", "threads"))),
    ("echo upstreams: RSS / CPU during the hold", f"{f0(role_sum('echo', 'rss'))} KiB / {f0(role_delta('echo', 'ticks') * 1000 / HZ)} ms"),
    ("idle clients: RSS / CPU during the hold", f"{f0(role_sum('client', 'rss'))} KiB / {f0(role_delta('client', 'ticks') * 1000 / HZ)} ms"),
    ("kernel Slab: zero sessions / held (whole box)", f"{f0(bbox['slab_kib'])} / {f0(ebox['slab_kib'])} KiB (+{f0(ebox['slab_kib'] - bbox['slab_kib'])}; {(ebox['slab_kib'] - bbox['slab_kib']) / max(established, 1):.2f} KiB/session)"),
    ("TCP sockets in use / TCP buffer memory (whole box, /proc/net/sockstat)", f"{f0(ebox['tcp_inuse'])} / {f0(ebox['tcp_mem_pages'] * 4)} KiB"),
    ("MemAvailable drop since zero sessions (whole box, every process)", f"{f0(bbox['mem_available_kib'] - ebox['mem_available_kib'])} KiB"),
]

per_gw = ["| gateway | pid | sessions | RSS zero KiB | RSS held KiB | KiB/session | CPU ms (hold) | voluntary cs (hold) | threads |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
for k in gws:
    if not alive(end, k):
        per_gw.append(f"| {k[1]} | – | dead | | | | | | |"); continue
    e, b = end[k], base[k]
    n = e["sessions"] or 0
    per_gw.append(f"| {k[1]} | {e['pid']} | {n:,} | {b['rss']:,} | {e['rss']:,} | "
                  f"{(e['rss'] - b['rss']) / n if n else float('nan'):.2f} | {delta(k, 'ticks') * 1000 / HZ:,.0f} | {delta(k, 'vcs'):,} | {e['threads']} |")

verdict = "PASS" if ok else "FAIL"
why = f"{established:,} of {sessions:,} established ({100 * established / sessions:.2f}%, need 99.9%)"
if dead: why += f"; died: {dead}"
if not open_done: why += "; the clients were still opening when the hold began (OPEN_MAX): not an idle hold"
md = [f"# Whole box: {sessions:,} idle authenticated TLS WebSocket sessions" + (" (QUICK)" if quick == "1" else ""), "",
      "| figure | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows] + \
     ["", *per_gw, "", f"{verdict}: {why}. Wall time {wall:.0f} s ({run_wall:.0f} s after the build). Built from {built}."]
open(f"{out}/results.md", "w").write("\n".join(md) + "\n")

print("=" * 100)
print(f"box: {sessions:,} idle authenticated TLS WebSocket sessions, {len(gws)} gateway processes, hold {span:.1f} s")
for a, b in rows:
    print(f"  {a:<92} {b}")
print()
print("\n".join(per_gw))
print()
print(f"box: {verdict}: {why}; wall time {wall:.0f} s ({run_wall:.0f} s after the build); built from {built}")
print(f"box: table in {out}/results.md")
print("=" * 100)
sys.exit(0 if ok else 1)
EOF
exit "$rc"
