#!/usr/bin/env bash
# Revocation fan-out: two ws-gateway replicas (release) share Redis or PostgreSQL; N sessions are spread over both;
# their subject is revoked through replica A's admin API; examples/revocation_fanout.rs measures, per session, the
# time from the API call to its Close 1008.
#
#   scripts/fanout.sh                 Redis, 1,000 sessions
#   STORE=postgres scripts/fanout.sh  PostgreSQL (run as root: the cluster runs as the postgres OS user)
#   SESSIONS=200 scripts/fanout.sh
#
# Loopback only; every process started is stopped on exit. Prints the example's lines and its RESULT. The binaries
# are built into $CARGO_TARGET_DIR (default target/).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
STORE=${STORE:-redis}
SESSIONS=${SESSIONS:-1000}
WORK=$(mktemp -d)
chmod 755 "$WORK"
PIDS=()
PG_DATA=
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  if [[ -n $PG_DATA ]]; then su postgres -s /bin/sh -c "$PG_BIN/pg_ctl -D $PG_DATA -m immediate stop" >/dev/null 2>&1 || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT
log() { printf '[fanout %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
wait_tcp() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; return 1; }

log "building (release)"
(cd "$ROOT" && cargo build --release --quiet -p ws-gateway -p ws-loadgen --bin ws-gateway --bin ws-loadgen --example revocation_fanout)
GW=$TARGET_DIR/release/ws-gateway
LG=$TARGET_DIR/release/ws-loadgen
FAN=$TARGET_DIR/release/examples/revocation_fanout

cd "$WORK"
# A CA and a server certificate for localhost and 127.0.0.1, the RSA-2048 test signing key with its JWKS
# (jwks/jwks.json), an RS256 token for fanout-user and the admin secret.
"$LG" pki --out "$WORK" --jwt rs256 --kid fanout --token-sub fanout-user --token-ttl 3600 >/dev/null
TOKEN=$(cat token)

JWKS_PORT=$(free_port); ECHO_PORT=$(free_port)
python3 -m http.server "$JWKS_PORT" --bind 127.0.0.1 --directory jwks >/dev/null 2>&1 & PIDS+=($!)
"$LG" echo --listen "127.0.0.1:$ECHO_PORT" --exit-after 600 >/dev/null 2>&1 & PIDS+=($!)
wait_tcp "$JWKS_PORT"; wait_tcp "$ECHO_PORT"

case $STORE in
  redis)
    RP=$(free_port)
    redis-server --port "$RP" --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK" >/dev/null & PIDS+=($!)
    wait_tcp "$RP"
    STORE_ARGS=(--redis-url "redis://127.0.0.1:$RP/0") ;;
  postgres)
    PG_BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
    PP=$(free_port); PG_DATA=$WORK/pg
    echo fanout-password >pw; chown -R postgres "$WORK"
    su postgres -s /bin/sh -c "$PG_BIN/initdb -D $PG_DATA -A md5 --username=postgres --pwfile=$WORK/pw" >/dev/null
    su postgres -s /bin/sh -c "$PG_BIN/pg_ctl -D $PG_DATA -l $PG_DATA/log -w start -o '-p $PP -k $PG_DATA -c listen_addresses=127.0.0.1'" >/dev/null
    STORE_ARGS=(--postgres-dsn "postgres://postgres:fanout-password@127.0.0.1:$PP/postgres?sslmode=disable") ;;
  *) echo "STORE must be redis or postgres" >&2; exit 2 ;;
esac

urls=(); admin=
for r in a b; do
  P=$(free_port); A=$(free_port)
  ulimit -n 20000 2>/dev/null || true
  "$GW" --listen "127.0.0.1:$P" --admin-listen "127.0.0.1:$A" --tls-cert server.pem --tls-key server.key \
    --jwks-url "http://127.0.0.1:$JWKS_PORT/jwks.json" --upstream-ws-url "ws://127.0.0.1:$ECHO_PORT/" \
    --admin-token-file admin-token --max-connections 20000 --ws-idle-timeout-seconds 600 "${STORE_ARGS[@]}" \
    >"gw-$r.log" 2>&1 & PIDS+=($!)
  for _ in $(seq 200); do grep -q '"event":"store_up"' "gw-$r.log" 2>/dev/null && break; sleep 0.05; done
  grep -q '"event":"store_up"' "gw-$r.log" || { echo "replica $r did not reach the store" >&2; tail "gw-$r.log" >&2; exit 1; }
  urls+=("wss://localhost:$P/")
  [[ -n $admin ]] || admin="http://127.0.0.1:$A"
done
log "store=$STORE, $SESSIONS sessions over 2 replicas; revoking through replica a"
"$FAN" --ca ca.pem --token "$TOKEN" --sub fanout-user --admin "$admin" --admin-token "$(cat admin-token)" \
  --sessions "$SESSIONS" "${urls[@]}"
