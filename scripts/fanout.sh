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
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout key.pem -out cert.pem -days 1 \
  -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -addext basicConstraints=critical,CA:FALSE \
  -addext keyUsage=critical,digitalSignature -addext extendedKeyUsage=serverAuth 2>/dev/null
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out jwt.key 2>/dev/null
openssl rsa -in jwt.key -noout -modulus | sed 's/^Modulus=//' >jwt.modulus
b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }
now=$(date +%s)
header=$(printf '{"alg":"RS256","typ":"JWT","kid":"fanout"}' | b64url)
claims=$(printf '{"sub":"fanout-user","iat":%d,"exp":%d}' $((now - 5)) $((now + 3600)) | b64url)
TOKEN="$header.$claims.$(printf '%s.%s' "$header" "$claims" | openssl dgst -sha256 -sign jwt.key | b64url)"
mkdir -p jwks
python3 - jwt.modulus jwks/jwks.json <<'PY'
import base64, json, sys
n = bytes.fromhex(open(sys.argv[1]).read().strip())
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
json.dump({"keys": [{"kty": "RSA", "use": "sig", "alg": "RS256", "kid": "fanout", "n": b64(n), "e": b64((65537).to_bytes(3, "big"))}]}, open(sys.argv[2], "w"))
PY
openssl rand -hex 24 >admin-token

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
  "$GW" --listen "127.0.0.1:$P" --admin-listen "127.0.0.1:$A" --tls-cert cert.pem --tls-key key.pem \
    --jwks-url "http://127.0.0.1:$JWKS_PORT/jwks.json" --upstream-ws-url "ws://127.0.0.1:$ECHO_PORT/" \
    --admin-token-file admin-token --max-connections 20000 --ws-idle-timeout-seconds 600 "${STORE_ARGS[@]}" \
    >"gw-$r.log" 2>&1 & PIDS+=($!)
  for _ in $(seq 200); do grep -q '"event":"store_up"' "gw-$r.log" 2>/dev/null && break; sleep 0.05; done
  grep -q '"event":"store_up"' "gw-$r.log" || { echo "replica $r did not reach the store" >&2; tail "gw-$r.log" >&2; exit 1; }
  urls+=("wss://localhost:$P/")
  [[ -n $admin ]] || admin="http://127.0.0.1:$A"
done
log "store=$STORE, $SESSIONS sessions over 2 replicas; revoking through replica a"
"$FAN" --ca cert.pem --token "$TOKEN" --sub fanout-user --admin "$admin" --admin-token "$(cat admin-token)" \
  --sessions "$SESSIONS" "${urls[@]}"
