#!/usr/bin/env python3
"""Offline checks on rendered ws-gateway manifests, called by check-manifests.sh.

Each subcommand checks one thing, prints what it found, and exits 1 on a
problem:

  crds FILE...               Traefik (traefik.io/v1alpha1), cert-manager and
                             ServiceMonitor objects: required fields, and that
                             what they reference exists in the same render.
  policy FILE...             Deployment rules the schemas cannot express:
                             restricted PSS, probes on the metrics port, drain
                             timing, Prometheus annotations, no $(VAR) left;
                             the admin port only on ClusterIP Services (one
                             <name>-admin Service) and never routed by an
                             Ingress/IngressRoute; files from Secret volumes
                             readable by the gateway and no one else.
  env-keys FILE...           Every env key set by ConfigMaps, Secrets and
                             Deployment env is one the binary knows.
  compare HELM KUSTOMIZE     The two renders hold the same objects (helm-only
                             labels, checksum annotations and Kustomize's
                             generator hashes aside).
  layout [--namespace] FILE...
                             Renders applied as they are: no Secret, the
                             ConfigMap from a generator; with --namespace one
                             restricted-PSS Namespace holding every object.
  network SECRET [--require=FILE,...] FILE...
                             NetworkPolicies: 8080/9090 only from named peers,
                             egress admitting DNS and the ports of the IdP,
                             broker and store (example SECRET for external
                             Secrets); --require: those renders must have one.
  adapter VALUES FILE...     HPA Pods metrics are published by the
                             prometheus-adapter rules in VALUES.
  examples TOML ROUTES SCHEMA  config.example.toml names every setting in
                             snake_case, routes.example.yaml has the documented
                             shape, values.schema.json only allows known keys.
  check-config BIN CERT KEY ROUTES SECRET FILE...
                             Runs `BIN --check-config` under `env -i` with
                             exactly the env each render sets; file paths that
                             only exist in a pod are swapped for local files
                             (ADMIN_TOKEN_FILE for a throwaway token), and a
                             Secret made outside Git for the example SECRET.

Stdlib plus PyYAML.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from typing import Any, Iterable

import yaml

# The binary's settings (its env names). Keep in step with src/config.rs.
KNOWN_ENV = frozenset(
    """
    WS_GATEWAY_CONFIG LISTEN_ADDR ADMIN_LISTEN_ADDR TLS_CERT_FILE TLS_KEY_FILE
    UPSTREAM_WS_URL ROUTE_FILE UPSTREAM_CA_FILE UPSTREAM_DIAL_TIMEOUT_SECONDS
    WS_IDLE_TIMEOUT_SECONDS WS_WRITE_TIMEOUT_SECONDS HANDSHAKE_TIMEOUT_SECONDS
    MAX_CONNECTIONS GRACEFUL_DRAIN_TIMEOUT_SECONDS JWKS_URL JWKS_TTL_MINUTES
    JWKS_REFETCH_INTERVAL_SECONDS JWT_EXPECTED_ISSUER JWT_EXPECTED_AUDIENCE
    JWT_VALID_ALGORITHMS JWT_LEEWAY_SECONDS JWT_COOKIE_NAME JWT_QUERY_PARAM
    WS_ALLOWED_ORIGINS WS_REQUIRE_ORIGIN PROXY_PROTOCOL PROXY_PROTOCOL_TRUSTED_CIDRS
    REDIS_URL POSTGRES_DSN LOG_FORMAT RUST_LOG
    TRUSTED_PROXIES MAX_PENDING_HANDSHAKES DRAIN_SPREAD_SECONDS JWT_REQUIRED_TYP
    OIDC_ISSUER_URL REUSE_PORT STATE_STORE REVOCATION_MAX_TTL_SECONDS
    REVOCATION_FAIL_MODE ADMIN_TOKEN_FILE ADMIN_REQUIRED_ROLE OIDC_CLIENT_ID
    """.split()
)
# Settings scripts/config.example.toml does not show yet (that file is not the
# deployment files' to change): `examples` names them in a note instead of
# failing. Empty this once the example shows them.
TOML_PENDING: frozenset = frozenset()
# Bare-metal only (SO_REUSEPORT hand-over between two processes): never in a pod.
NOT_IN_PODS = frozenset({"REUSE_PORT"})
# Read from the environment only (tracing's filter), not a TOML key.
ENV_ONLY = frozenset({"WS_GATEWAY_CONFIG", "RUST_LOG"})
CONFIG_RS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src", "config.rs")


def binary_env_names() -> frozenset[str]:
    """Env names the source declares (`env = "NAME"` in src/config.rs), empty without the source.

    The binary may know more settings than the deployment contract; those are
    allowed too, so the check catches typos without lagging behind the code.
    """
    try:
        with open(CONFIG_RS, encoding="utf-8") as f:
            return frozenset(re.findall(r'\benv\s*=\s*"([A-Z][A-Z0-9_]*)"', f.read()))
    except OSError:
        return frozenset()


ALLOWED_ENV = KNOWN_ENV | binary_env_names()
# Settings that name a file on the pod's filesystem.
FILE_ENV = ("TLS_CERT_FILE", "TLS_KEY_FILE", "ROUTE_FILE", "UPSTREAM_CA_FILE", "JWKS_CA_FILE", "WS_GATEWAY_CONFIG",
            "ADMIN_TOKEN_FILE")
# Files read from Secret volumes: they must be under a mount.
MOUNTED_FILE_ENV = ("TLS_CERT_FILE", "TLS_KEY_FILE", "ADMIN_TOKEN_FILE")
ADMIN_PORT = 9090
DEFAULT_DRAIN_SECONDS = 30

TRAEFIK_API = "traefik.io/v1alpha1"
TRAEFIK_KINDS = {"IngressRoute", "IngressRouteTCP", "Middleware", "ServersTransportTCP", "TLSOption"}
MIDDLEWARE_TYPES = {
    "addPrefix", "basicAuth", "buffering", "chain", "circuitBreaker", "compress", "contentType",
    "digestAuth", "errors", "forwardAuth", "grpcWeb", "headers", "ipAllowList", "inFlightReq",
    "passTLSClientCert", "plugin", "rateLimit", "redirectRegex", "redirectScheme", "replacePath",
    "replacePathRegex", "retry", "stripPrefix", "stripPrefixRegex",
}
HELM_ONLY_LABELS = {"helm.sh/chart", "app.kubernetes.io/managed-by"}


class Problems:
    """Collects problems so one run reports all of them."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, msg: str) -> None:
        self.items.append(f"{where}: {msg}")

    def finish(self, ok_msg: str) -> int:
        for item in self.items:
            print(f"  FAIL {item}")
        if self.items:
            return 1
        print(f"  ok: {ok_msg}")
        return 0


def load(paths: Iterable[str]) -> list[dict[str, Any]]:
    docs = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for doc in yaml.safe_load_all(f):
                if doc:
                    doc["__file"] = path
                    docs.append(doc)
    return docs


def ident(obj: dict[str, Any]) -> str:
    return f"{obj.get('__file', '?')}: {obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def dig(obj: Any, *path: Any) -> Any:
    for key in path:
        if isinstance(obj, dict):
            obj = obj.get(key)
        elif isinstance(obj, list) and isinstance(key, int) and key < len(obj):
            obj = obj[key]
        else:
            return None
    return obj


def by_file(docs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        out.setdefault(d["__file"], []).append(d)
    return out


def services_ports(docs: list[dict[str, Any]]) -> dict[str, set[Any]]:
    """Service name -> the port names and numbers it exposes."""
    out: dict[str, set[Any]] = {}
    for d in docs:
        if d.get("kind") == "Service":
            ports = out.setdefault(d["metadata"]["name"], set())
            for p in dig(d, "spec", "ports") or []:
                ports.add(p.get("port"))
                if p.get("name"):
                    ports.add(p["name"])
    return out


# --- crds -------------------------------------------------------------------

def check_route_services(probs: Problems, where: str, services: Any, svc_ports: dict[str, set[Any]]) -> None:
    if not isinstance(services, list) or not services:
        probs.add(where, "services must be a non-empty list")
        return
    for j, svc in enumerate(services):
        w = f"{where}.services[{j}]"
        name, port = dig(svc, "name"), dig(svc, "port")
        if not isinstance(name, str) or not name:
            probs.add(w, "name is required")
        if port is None or not isinstance(port, (int, str)) or port == "":
            probs.add(w, "port is required (number or name)")
        if isinstance(name, str) and name in svc_ports and port not in svc_ports[name]:
            probs.add(w, f"Service {name} has no port {port!r} (has {sorted(map(str, svc_ports[name]))})")
        elif isinstance(name, str) and name not in svc_ports and not dig(svc, "namespace"):
            probs.add(w, f"no Service {name} in this render")


def check_traefik(probs: Problems, obj: dict[str, Any], group: list[dict[str, Any]]) -> None:
    where = ident(obj)
    kind, spec = obj.get("kind"), obj.get("spec")
    if kind not in TRAEFIK_KINDS:
        probs.add(where, f"unknown Traefik kind {kind}")
        return
    if not isinstance(spec, dict):
        probs.add(where, "spec is required")
        return
    svc_ports = services_ports(group)
    middlewares = {d["metadata"]["name"] for d in group if d.get("kind") == "Middleware"}

    if kind == "Middleware":
        types = set(spec) & MIDDLEWARE_TYPES
        if len(spec) != 1 or len(types) != 1:
            probs.add(where, f"spec must hold exactly one middleware type, found {sorted(spec)}")
        rl = spec.get("rateLimit")
        if isinstance(rl, dict):
            for k in ("average", "burst"):
                if k in rl and (not isinstance(rl[k], int) or rl[k] < 0):
                    probs.add(where, f"rateLimit.{k} must be a non-negative integer")
            # Without a sourceCriterion Traefik keys on the connecting address: behind an SNAT
            # load balancer every client shares one bucket. The choice must be written down.
            sc = rl.get("sourceCriterion")
            if not isinstance(sc, dict) or len(sc) != 1 or not set(sc) <= {"ipStrategy", "requestHeaderName", "requestHost"}:
                probs.add(where, "rateLimit.sourceCriterion must name exactly one of ipStrategy, requestHeaderName, "
                                 "requestHost (k8s/README.md, \"Rate limit and the client address\")")
            elif "ipStrategy" in sc:
                ips = sc["ipStrategy"] or {}
                if not isinstance(ips, dict) or not set(ips) <= {"depth", "excludedIPs", "ipv6Subnet"}:
                    probs.add(where, f"rateLimit.sourceCriterion.ipStrategy has unknown fields {ips}")
                elif "depth" in ips and (not isinstance(ips["depth"], int) or ips["depth"] < 0):
                    probs.add(where, "ipStrategy.depth must be a non-negative integer")
        return
    if kind == "ServersTransportTCP":
        if set(spec) - {"dialTimeout", "dialKeepAlive", "terminationDelay", "proxyProtocol", "tls"}:
            probs.add(where, f"unknown ServersTransportTCP fields {sorted(set(spec))}")
        pp = spec.get("proxyProtocol")
        if pp is not None and dig(pp, "version") not in (1, 2):
            probs.add(where, "proxyProtocol.version must be 1 or 2")
        return
    if kind not in ("IngressRoute", "IngressRouteTCP"):
        return

    eps = spec.get("entryPoints")
    if not isinstance(eps, list) or not eps or not all(isinstance(e, str) and e for e in eps):
        probs.add(where, "entryPoints must be a non-empty list of names")
    routes = spec.get("routes")
    if not isinstance(routes, list) or not routes:
        probs.add(where, "routes must be a non-empty list")
        routes = []
    for i, route in enumerate(routes):
        w = f"{where} routes[{i}]"
        match = dig(route, "match")
        if not isinstance(match, str) or not match.strip():
            probs.add(w, "match is required")
            match = ""
        if match.count("`") % 2:
            probs.add(w, f"unbalanced backquotes in match {match!r}")
        if kind == "IngressRoute":
            if route.get("kind", "Rule") != "Rule":
                probs.add(w, "kind must be Rule")
            if not re.search(r"\b(Host|HostRegexp|PathPrefix|Path)\(`[^`]+`\)", match):
                probs.add(w, f"match {match!r} names no Host/Path rule")
            if "HostSNI" in match:
                probs.add(w, "HostSNI belongs in an IngressRouteTCP")
        else:
            if not re.fullmatch(r"HostSNI\(`[^`]+`\)(\s*\|\|\s*HostSNI\(`[^`]+`\))*", match.strip()):
                probs.add(w, f"match {match!r} must be HostSNI(`host`) rule(s)")
            if "HostSNI(`*`)" in match and dig(spec, "tls", "passthrough"):
                probs.add(w, "HostSNI(`*`) with passthrough sends every TLS host here")
        for m in route.get("middlewares") or []:
            if not dig(m, "name"):
                probs.add(w, "middleware reference without name")
            elif m["name"] not in middlewares and not dig(m, "namespace"):
                probs.add(w, f"no Middleware {m['name']} in this render")
        check_route_services(probs, w, route.get("services"), svc_ports)
        if kind == "IngressRouteTCP":
            for j, svc in enumerate(route.get("services") or []):
                if dig(svc, "proxyProtocol") is not None:
                    probs.add(f"{w}.services[{j}]", "per-service proxyProtocol is deprecated in Traefik 3.7's CRD: "
                                                    "reference a ServersTransportTCP (serversTransport) instead")

    tls = spec.get("tls")
    if kind == "IngressRouteTCP":
        if not isinstance(tls, dict) or tls.get("passthrough") is not True:
            probs.add(where, "tls.passthrough must be true (the gateway terminates TLS)")
        elif tls.get("secretName") or tls.get("certResolver"):
            probs.add(where, "tls.passthrough with secretName/certResolver: Traefik would not use them")
        transports = {d["metadata"]["name"]: d for d in group if d.get("kind") == "ServersTransportTCP"}
        pp_versions = set()
        for r in routes:
            for svc in r.get("services") or []:
                st = svc.get("serversTransport")
                if st not in transports:
                    probs.add(where, f"service {svc.get('name')}: serversTransport {st!r} is no ServersTransportTCP "
                                     "in this render (PROXY v2 comes from one)")
                pp_versions.add(dig(transports.get(st), "spec", "proxyProtocol", "version"))
        if pp_versions != {2}:
            probs.add(where, f"every service needs a ServersTransportTCP with proxyProtocol.version 2, found {pp_versions}")
    elif kind == "IngressRoute":
        if "websecure" in (eps or []) and not (isinstance(tls, dict) and (tls.get("secretName") or tls.get("certResolver"))):
            probs.add(where, "websecure route without tls.secretName or tls.certResolver")


def check_certificate(probs: Problems, obj: dict[str, Any], group: list[dict[str, Any]]) -> None:
    where = ident(obj)
    spec = obj.get("spec") or {}
    if obj.get("apiVersion") != "cert-manager.io/v1":
        probs.add(where, f"apiVersion {obj.get('apiVersion')} (want cert-manager.io/v1)")
    secret = spec.get("secretName")
    if not isinstance(secret, str) or not secret:
        probs.add(where, "secretName is required")
    names = spec.get("dnsNames")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        probs.add(where, "dnsNames must be a non-empty list")
        names = []
    issuer = spec.get("issuerRef") or {}
    if not issuer.get("name"):
        probs.add(where, "issuerRef.name is required")
    if issuer.get("kind", "Issuer") not in ("Issuer", "ClusterIssuer"):
        probs.add(where, f"issuerRef.kind {issuer.get('kind')} (want Issuer or ClusterIssuer)")
    if issuer.get("group", "cert-manager.io") != "cert-manager.io":
        probs.add(where, "issuerRef.group should be cert-manager.io")
    dur = re.compile(r"^(\d+(\.\d+)?(h|m|s|ms))+$")
    for k in ("duration", "renewBefore"):
        if k in spec and not dur.match(str(spec[k])):
            probs.add(where, f"{k} {spec[k]!r} is not a Go duration")
    pk = spec.get("privateKey") or {}
    if pk.get("algorithm", "RSA") not in ("RSA", "ECDSA", "Ed25519"):
        probs.add(where, f"privateKey.algorithm {pk.get('algorithm')}")
    if pk.get("algorithm") == "ECDSA" and pk.get("size", 256) not in (256, 384, 521):
        probs.add(where, f"ECDSA size {pk.get('size')}")
    # Something must use the Secret, and hosts must agree with the SNI routes.
    users = set()
    for d in group:
        if d.get("kind") == "Deployment":
            for v in dig(d, "spec", "template", "spec", "volumes") or []:
                if dig(v, "secret", "secretName"):
                    users.add(v["secret"]["secretName"])
        if d.get("kind") in ("IngressRoute",) and dig(d, "spec", "tls", "secretName"):
            users.add(d["spec"]["tls"]["secretName"])
        if d.get("kind") == "Ingress":
            for t in dig(d, "spec", "tls") or []:
                users.add(t.get("secretName"))
    if secret and secret not in users:
        probs.add(where, f"no Deployment volume, IngressRoute or Ingress uses Secret {secret}")
    for d in group:
        if d.get("kind") == "IngressRouteTCP":
            for r in dig(d, "spec", "routes") or []:
                for host in re.findall(r"HostSNI\(`([^`]+)`\)", r.get("match", "")):
                    if host not in names:
                        probs.add(where, f"HostSNI {host} is not among dnsNames {names}")


def check_servicemonitor(probs: Problems, obj: dict[str, Any], group: list[dict[str, Any]]) -> None:
    where = ident(obj)
    spec = obj.get("spec") or {}
    if not dig(spec, "selector", "matchLabels"):
        probs.add(where, "selector.matchLabels is required")
    eps = spec.get("endpoints") or []
    if not eps:
        probs.add(where, "endpoints must be non-empty")
    for ep in eps:
        if ep.get("port") != "metrics" or ep.get("path", "/metrics") != "/metrics":
            probs.add(where, "endpoint must scrape port metrics at /metrics")
    sel = dig(spec, "selector", "matchLabels") or {}
    if not any(d.get("kind") == "Service" and sel.items() <= (dig(d, "metadata", "labels") or {}).items() for d in group):
        probs.add(where, "selector matches no Service in this render")


def cmd_crds(paths: list[str]) -> int:
    probs = Problems()
    counted: dict[str, int] = {}
    for _path, group in by_file(load(paths)).items():
        for obj in group:
            api, kind = obj.get("apiVersion", ""), obj.get("kind")
            if api.startswith("traefik.containo.us/"):
                probs.add(ident(obj), "traefik.containo.us is gone in Traefik v3: use traefik.io/v1alpha1")
            elif api.startswith("traefik.io/"):
                if api != TRAEFIK_API:
                    probs.add(ident(obj), f"apiVersion {api} (want {TRAEFIK_API})")
                check_traefik(probs, obj, group)
            elif kind == "Certificate":
                check_certificate(probs, obj, group)
            elif kind == "ServiceMonitor":
                check_servicemonitor(probs, obj, group)
            else:
                continue
            counted[kind] = counted.get(kind, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counted.items())) or "no custom resources"
    return probs.finish(f"{summary} in {len(paths)} render(s)")


# --- policy -----------------------------------------------------------------

def env_sources(group: list[dict[str, Any]]) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, str]]]:
    cms = {d["metadata"]["name"]: {k: str(v) for k, v in (d.get("data") or {}).items()}
           for d in group if d.get("kind") == "ConfigMap"}
    secrets = {}
    for d in group:
        if d.get("kind") == "Secret":
            vals = {k: str(v) for k, v in (d.get("stringData") or {}).items()}
            for k, v in (d.get("data") or {}).items():
                vals[k] = base64.b64decode(v).decode()
            secrets[d["metadata"]["name"]] = vals
    return cms, secrets


def container_env(dep: dict[str, Any], container: dict[str, Any], group: list[dict[str, Any]],
                  probs: Problems | None = None, stand_in: dict[str, str] | None = None) -> dict[str, str]:
    """The env the container starts with: envFrom in order, then env.

    A Secret loaded with envFrom but not in the render (the real one is made outside Git) is stood in for
    by `stand_in` when given: the example values fill the keys nothing else sets, so the rest of the
    configuration can still be checked.
    """
    cms, secrets = env_sources(group)
    env: dict[str, str] = {}
    for src in container.get("envFrom") or []:
        if "configMapRef" in src:
            name, table = src["configMapRef"]["name"], cms
        else:
            name, table = src["secretRef"]["name"], secrets
        if name in table:
            env.update(table[name])
        elif "secretRef" in src and stand_in is not None:
            # Keys the render sets elsewhere are the deployment's own: the example fills only the gaps.
            env.update({k: v for k, v in stand_in.items() if k not in env})
            if probs is not None:
                print(f"  note: {ident(dep)} envFrom Secret {name} is external: checked with the example values")
        elif probs is not None and not src.get("configMapRef", src.get("secretRef", {})).get("optional"):
            print(f"  note: {ident(dep)} envFrom {name} is not in this render (external)")
    for e in container.get("env") or []:
        if "value" in e:
            env[e["name"]] = str(e["value"])
        elif probs is not None:
            probs.add(ident(dep), f"env {e['name']} uses valueFrom; check-config cannot see it")
    return env


def check_file_mounts(probs: Problems, where: str, pod: dict[str, Any], c: dict[str, Any],
                      env: dict[str, str]) -> None:
    """Files named by env must be under a mount; Secret volumes readable by the gateway, by no one else."""
    volumes = {v.get("name"): v for v in pod.get("volumes") or []}
    mounts = {m["mountPath"].rstrip("/"): m for m in c.get("volumeMounts") or []}
    for k in MOUNTED_FILE_ENV:
        if k not in env:
            continue
        hit = [(p, m) for p, m in mounts.items() if env[k].startswith(p + "/")]
        if not hit:
            probs.add(where, f"{k}={env[k]} is not under a volume mount")
            continue
        mpath, mount = max(hit, key=lambda pm: len(pm[0]))
        sec = dig(volumes.get(mount.get("name")), "secret")
        if k == "ADMIN_TOKEN_FILE":
            if not isinstance(sec, dict):
                probs.add(where, f"{k} must come from a Secret volume")
                continue
            rel = env[k][len(mpath) + 1:]
            items = sec.get("items")
            if items is not None and rel not in [i.get("path") for i in items]:
                probs.add(where, f"{k}={env[k]}: Secret volume {mount.get('name')} has no item with path {rel}")
    psc = pod.get("securityContext") or {}
    for name, v in volumes.items():
        sec = v.get("secret")
        if not isinstance(sec, dict) or not any(m.get("name") == name for m in mounts.values()):
            continue
        modes = [sec.get("defaultMode", 0o644)] + [i["mode"] for i in sec.get("items") or [] if "mode" in i]
        for mode in modes:
            if mode & 0o007:
                probs.add(where, f"Secret volume {name}: mode {mode:#o} lets every user read it")
            # Files belong to root; the gateway (uid 65532) reads them through fsGroup.
            if not (mode & 0o040 and psc.get("fsGroup") is not None):
                probs.add(where, f"Secret volume {name}: mode {mode:#o} with fsGroup {psc.get('fsGroup')}: "
                                 f"the gateway (uid {psc.get('runAsUser')}) cannot read it")


def check_no_admin_route(probs: Problems, group: list[dict[str, Any]], admin_svcs: set[str]) -> None:
    """No Ingress, IngressRoute or IngressRouteTCP may reach the admin port."""
    def bad(name: Any, port: Any) -> bool:
        return name in admin_svcs or port in (ADMIN_PORT, str(ADMIN_PORT), "metrics", "admin")
    for d in group:
        kind = d.get("kind")
        targets: list[tuple[Any, Any]] = []
        if kind == "Ingress":
            backends = [dig(d, "spec", "defaultBackend")]
            for r in dig(d, "spec", "rules") or []:
                backends += [p.get("backend") for p in dig(r, "http", "paths") or []]
            for b in backends:
                if isinstance(b, dict) and "service" in b:
                    port = dig(b, "service", "port") or {}
                    targets.append((dig(b, "service", "name"), port.get("name", port.get("number"))))
        elif kind in ("IngressRoute", "IngressRouteTCP"):
            for r in dig(d, "spec", "routes") or []:
                targets += [(s.get("name"), s.get("port")) for s in r.get("services") or []]
        for name, port in targets:
            if bad(name, port):
                probs.add(ident(d), f"routes to {name}:{port}: the admin port must stay inside the cluster")


def cmd_policy(paths: list[str]) -> int:
    probs = Problems()
    n = 0
    for path, group in by_file(load(paths)).items():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for m in re.finditer(r"\$\([A-Z_][A-Z0-9_]*\)", text):
            probs.add(path, f"{m.group(0)} left in the output: Kustomize does not substitute it")
        for dep in (d for d in group if d.get("kind") == "Deployment"):
            n += 1
            where = ident(dep)
            pod = dig(dep, "spec", "template", "spec") or {}
            psc = pod.get("securityContext") or {}
            want_pod = {"runAsNonRoot": True, "runAsUser": 65532}
            for k, v in want_pod.items():
                if psc.get(k) != v:
                    probs.add(where, f"pod securityContext.{k} must be {v}")
            if dig(psc, "seccompProfile", "type") != "RuntimeDefault":
                probs.add(where, "pod seccompProfile must be RuntimeDefault")
            if not pod.get("topologySpreadConstraints"):
                probs.add(where, "topologySpreadConstraints missing")
            tmpl_labels = dig(dep, "spec", "template", "metadata", "labels") or {}
            for k in ("app", "app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                      "app.kubernetes.io/component", "app.kubernetes.io/part-of"):
                if k not in tmpl_labels:
                    probs.add(where, f"pod label {k} missing")
            # The Prometheus job keeps on `app`: ws-gateway, or the chart's nameOverride
            # (go-ws-gateway-proxy keeps the Go gateway's job working).
            if tmpl_labels.get("app") != tmpl_labels.get("app.kubernetes.io/name") or not tmpl_labels.get("app"):
                probs.add(where, f"pod label app {tmpl_labels.get('app')!r} must equal app.kubernetes.io/name "
                                 f"{tmpl_labels.get('app.kubernetes.io/name')!r} (the Prometheus job keeps on it)")
            containers = pod.get("containers") or []
            if len(containers) != 1:
                probs.add(where, "expected one container")
                continue
            c = containers[0]
            csc = c.get("securityContext") or {}
            for k, v in {"runAsNonRoot": True, "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False}.items():
                if csc.get(k) != v:
                    probs.add(where, f"container securityContext.{k} must be {v}")
            if dig(csc, "capabilities", "drop") != ["ALL"] or dig(csc, "capabilities", "add"):
                probs.add(where, "container must drop ALL capabilities and add none")
            if "/" not in c.get("image", "") and ":" not in c.get("image", ""):
                probs.add(where, f"image {c.get('image')!r}: the images transformer did not apply")
            res = c.get("resources") or {}
            if not dig(res, "requests", "cpu") or not dig(res, "requests", "memory") or not dig(res, "limits", "memory"):
                probs.add(where, "resources need requests.cpu, requests.memory and limits.memory")
            ports = {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}
            if not isinstance(ports.get("ws"), int) or not isinstance(ports.get("metrics"), int):
                probs.add(where, f"container ports ws and metrics are required, got {ports}")
            for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
                get = dig(c, probe, "httpGet") or {}
                if get.get("path") != path or get.get("port") != "metrics":
                    probs.add(where, f"{probe} must GET {path} on port metrics")
            ann = dig(dep, "spec", "template", "metadata", "annotations") or {}
            if ann.get("prometheus.io/scrape") != "true" or ann.get("prometheus.io/path") != "/metrics" \
                    or ann.get("prometheus.io/port") != str(ports.get("metrics")):
                probs.add(where, "prometheus.io/scrape|port|path annotations must point at the metrics port")
            env = container_env(dep, c, group)
            # The listeners must be the container's ports, on an address the kubelet, Prometheus and
            # Services reach (the binary's admin default is loopback).
            admin = env.get("ADMIN_LISTEN_ADDR", "127.0.0.1:9090")
            if not admin.startswith(("0.0.0.0:", "[::]:")) or admin.rsplit(":", 1)[-1] != str(ports.get("metrics")):
                probs.add(where, f"ADMIN_LISTEN_ADDR {admin}: probes and Prometheus need 0.0.0.0:<containerPort "
                                 f"metrics ({ports.get('metrics')})>")
            listen = env.get("LISTEN_ADDR", "0.0.0.0:8080")
            if listen.rsplit(":", 1)[-1] != str(ports.get("ws")) or listen.startswith(("127.", "localhost:", "[::1]:")):
                probs.add(where, f"LISTEN_ADDR {listen} does not match containerPort ws ({ports.get('ws')}) "
                                 "on a non-loopback address")
            for k in ("PROXY_PROTOCOL_TRUSTED_CIDRS", "TRUSTED_PROXIES"):
                everyone = [c_ for c_ in re.split(r"\s*,\s*", env.get(k, "")) if c_ in ("0.0.0.0/0", "::/0")]
                if everyone:
                    probs.add(where, f"{k} trusts {everyone[0]}: anyone could forge client addresses")
            if ("TLS_CERT_FILE" in env) != ("TLS_KEY_FILE" in env):
                probs.add(where, "TLS_CERT_FILE and TLS_KEY_FILE go together")
            if env.get("PROXY_PROTOCOL") == "true" and not env.get("PROXY_PROTOCOL_TRUSTED_CIDRS"):
                probs.add(where, "PROXY_PROTOCOL without PROXY_PROTOCOL_TRUSTED_CIDRS")
            drain = int(env.get("GRACEFUL_DRAIN_TIMEOUT_SECONDS", DEFAULT_DRAIN_SECONDS))
            pre = dig(c, "lifecycle", "preStop") or {}
            if "sleep" in pre:
                pre_s = int(pre["sleep"]["seconds"])
            elif "exec" in pre:
                cmd = pre["exec"].get("command") or []
                if len(cmd) != 2 or not cmd[0].endswith("/sleep") or cmd[0].startswith(("/bin/sh", "sh")):
                    probs.add(where, f"preStop exec {cmd}: expected [/usr/local/bin/sleep, N] (no shell in the image)")
                    pre_s = 0
                else:
                    pre_s = int(cmd[1])
            else:
                probs.add(where, "preStop delay missing: SIGTERM would race the endpoint removal")
                pre_s = 0
            grace = int(pod.get("terminationGracePeriodSeconds", 30))
            if grace <= pre_s + drain:
                probs.add(where, f"terminationGracePeriodSeconds {grace} <= preStop {pre_s} + drain {drain}")
            for k in sorted(NOT_IN_PODS & env.keys()):
                probs.add(where, f"{k} is for bare metal only, not for pods")
            if env.get("PROXY_PROTOCOL") == "true" and env.get("TRUSTED_PROXIES"):
                probs.add(where, "TRUSTED_PROXIES with PROXY_PROTOCOL: the client address comes from the PROXY "
                                 "header, no X-Forwarded-For is to be believed")
            check_file_mounts(probs, where, pod, c, env)
        for hpa in (d for d in group if d.get("kind") == "HorizontalPodAutoscaler"):
            target = dig(hpa, "spec", "scaleTargetRef", "name")
            deps = [d for d in group if d.get("kind") == "Deployment" and d["metadata"]["name"] == target]
            if not deps:
                probs.add(ident(hpa), f"scales Deployment {target}, which is not in this render")
            elif "replicas" in deps[0].get("spec", {}):
                probs.add(ident(deps[0]), "spec.replicas set although an HPA scales it: each apply would reset it")
        for pdb in (d for d in group if d.get("kind") == "PodDisruptionBudget"):
            deps = [d for d in group if d.get("kind") == "Deployment"]
            sel = dig(pdb, "spec", "selector", "matchLabels") or {}
            if not any(sel.items() <= (dig(d, "spec", "template", "metadata", "labels") or {}).items() for d in deps):
                probs.add(ident(pdb), "selector matches no Deployment pods")
        admin_svcs = set()
        for svc in (d for d in group if d.get("kind") == "Service"):
            ports = {p.get("name"): p.get("port") for p in dig(svc, "spec", "ports") or []}
            if svc["metadata"]["name"].endswith("-admin"):
                admin_svcs.add(svc["metadata"]["name"])
                want = [{"name": "admin", "port": ADMIN_PORT, "targetPort": "metrics", "protocol": "TCP"}]
                if dig(svc, "spec", "type") != "ClusterIP" or dig(svc, "spec", "ports") != want:
                    probs.add(ident(svc), f"admin Service must be ClusterIP with only admin:{ADMIN_PORT} -> metrics, "
                                          f"got {dig(svc, 'spec', 'type')} {ports}")
            elif dig(svc, "spec", "type") != "ClusterIP" or ports.get("ws") != 8080 or ports.get("metrics") != 9090:
                probs.add(ident(svc), f"must be ClusterIP with ws:8080 and metrics:9090, got {ports}")
        if any(d.get("kind") == "Deployment" for d in group) and not admin_svcs:
            probs.add(path, "no ClusterIP Service <name>-admin: back-channel logout has no in-cluster address")
        check_no_admin_route(probs, group, admin_svcs)
    return probs.finish(f"{n} Deployment(s) in {len(paths)} render(s) follow the rules")


# --- env-keys ---------------------------------------------------------------

def cmd_env_keys(paths: list[str]) -> int:
    probs = Problems()
    seen: set[str] = set()
    for _path, group in by_file(load(paths)).items():
        env_from = set()
        for dep in (d for d in group if d.get("kind") == "Deployment"):
            for c in dig(dep, "spec", "template", "spec", "containers") or []:
                for src in c.get("envFrom") or []:
                    for kind, ref in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                        if ref in src:
                            env_from.add((kind, src[ref].get("name")))
        for obj in group:
            kind = obj.get("kind")
            keys: list[str] = []
            if kind == "ConfigMap":
                keys = list((obj.get("data") or {}))
            elif kind == "Secret" and obj.get("type", "Opaque") == "Opaque":
                keys = list(obj.get("stringData") or {}) + list(obj.get("data") or {})
            if (kind, obj.get("metadata", {}).get("name")) not in env_from:
                # Not loaded with envFrom (e.g. the admin token, mounted as a file): only keys
                # spelt like env names are taken as settings, so a detached typo still shows.
                keys = [k for k in keys if re.fullmatch(r"[A-Z][A-Z0-9_]*", k)]
            elif kind == "Deployment":
                for c in dig(obj, "spec", "template", "spec", "containers") or []:
                    keys += [e["name"] for e in c.get("env") or []]
            for k in keys:
                seen.add(k)
                if k not in ALLOWED_ENV:
                    close = [c for c in ALLOWED_ENV if _close(k, c)]
                    hint = f" (did you mean {close[0]}?)" if close else ""
                    probs.add(ident(obj), f"unknown env key {k}{hint}")
    src = binary_env_names()
    if src:
        for k in sorted(KNOWN_ENV - src - ENV_ONLY):
            probs.add(CONFIG_RS, f"deployment contract setting {k} is not declared by the binary")
        basis = f"contract + {len(src)} names in src/config.rs"
    else:
        basis = "contract list; src/config.rs not found"
    return probs.finish(f"{len(seen)} distinct env keys, all known ({basis})")


def _close(a: str, b: str) -> bool:
    """True when a and b differ by one edit: enough to point at a typo."""
    if abs(len(a) - len(b)) > 1 or a == b:
        return False
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    return a[i + 1:] == b[i + 1:] or a[i:] == b[i + 1:] or a[i + 1:] == b[i:]


# --- compare ----------------------------------------------------------------

def normalize(obj: dict[str, Any]) -> dict[str, Any]:
    obj = json.loads(json.dumps({k: v for k, v in obj.items() if k != "__file"}))
    for meta in (obj.get("metadata"), dig(obj, "spec", "template", "metadata")):
        if not isinstance(meta, dict):
            continue
        for k in HELM_ONLY_LABELS:
            (meta.get("labels") or {}).pop(k, None)
        ann = meta.get("annotations") or {}
        for k in [k for k in ann if k.startswith("checksum/")]:
            ann.pop(k)
        if "annotations" in meta and not meta["annotations"]:
            meta.pop("annotations")
    if obj.get("kind") == "Secret" and "data" in obj:
        sd = obj.setdefault("stringData", {})
        sd.update({k: base64.b64decode(v).decode() for k, v in obj.pop("data").items()})
    return obj


def diff(a: Any, b: Any, path: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a:
                out.append(f"{path}.{k}: only in kustomize: {json.dumps(b[k])[:120]}")
            elif k not in b:
                out.append(f"{path}.{k}: only in helm: {json.dumps(a[k])[:120]}")
            else:
                diff(a[k], b[k], f"{path}.{k}", out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            diff(x, y, f"{path}[{i}]", out)
    elif a != b:
        out.append(f"{path}: helm {json.dumps(a)[:120]} != kustomize {json.dumps(b)[:120]}")


GENERATED_NAME = re.compile(r"^(.+)-[a-z0-9]{10}$")


def unhash(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Kustomize generators append a content hash to ConfigMap/Secret names (and to every reference):
    drop it, so a generated ConfigMap compares with the chart's (which rolls pods by a checksum annotation)."""
    names = {}
    for d in docs:
        m = GENERATED_NAME.match(d.get("metadata", {}).get("name", ""))
        if d.get("kind") in ("ConfigMap", "Secret") and m:
            names[d["metadata"]["name"]] = m.group(1)
    text = json.dumps(docs)
    for hashed, plain in names.items():
        text = text.replace(json.dumps(hashed), json.dumps(plain))
    return json.loads(text)


def cmd_compare(helm_path: str, kust_path: str) -> int:
    probs = Problems()
    index = lambda docs: {(d["kind"], d["metadata"]["name"]): normalize(d) for d in docs}
    helm, kust = index(load([helm_path])), index(unhash(load([kust_path])))
    for key in sorted(set(helm) ^ set(kust)):
        probs.add("/".join(key), "only in " + ("helm" if key in helm else "kustomize"))
    for key in sorted(set(helm) & set(kust)):
        out: list[str] = []
        diff(helm[key], kust[key], "", out)
        for line in out:
            probs.add("/".join(key), line)
    return probs.finish(f"{len(helm)} objects identical ({helm_path} vs {kust_path})")


# --- layout -----------------------------------------------------------------

CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PriorityClass",
                  "StorageClass", "ClusterIssuer", "IngressClass"}
PSS_LABELS = {"pod-security.kubernetes.io/enforce": "restricted"}


def cmd_layout(args: list[str]) -> int:
    """Renders meant to be applied as they are: no Secret (it would overwrite the real one), the ConfigMap
    from a generator (its hashed name rolls the pods), and with --namespace: one Namespace, labelled for
    restricted Pod Security, holding every namespaced object."""
    want_ns = "--namespace" in args
    paths = [a for a in args if a != "--namespace"]
    probs = Problems()
    for path, group in by_file(load(paths)).items():
        for d in group:
            if d.get("kind") == "Secret":
                probs.add(ident(d), "a Secret in a render applied as is overwrites the real one (use "
                                    "components/example-secret only on throwaway clusters)")
        for dep in (d for d in group if d.get("kind") == "Deployment"):
            for c in dig(dep, "spec", "template", "spec", "containers") or []:
                for src in c.get("envFrom") or []:
                    name = dig(src, "configMapRef", "name")
                    if name and not GENERATED_NAME.match(name):
                        probs.add(ident(dep), f"envFrom ConfigMap {name} is not generated (no content hash): "
                                              "changing a setting would not roll the pods")
        if not want_ns:
            continue
        spaces = [d for d in group if d.get("kind") == "Namespace"]
        if len(spaces) != 1:
            probs.add(path, f"expected one Namespace (created by the overlay), found {len(spaces)}")
            continue
        ns = spaces[0]
        labels = dig(ns, "metadata", "labels") or {}
        for k, v in PSS_LABELS.items():
            if labels.get(k) != v:
                probs.add(ident(ns), f"label {k}={v} missing (restricted Pod Security)")
        for d in group:
            if d.get("kind") not in CLUSTER_SCOPED and dig(d, "metadata", "namespace") != ns["metadata"]["name"]:
                probs.add(ident(d), f"namespace {dig(d, 'metadata', 'namespace')!r}, not the overlay's "
                                    f"{ns['metadata']['name']!r}")
    return probs.finish(f"{len(paths)} render(s): no Secret, generated ConfigMap"
                        + (", their own restricted Namespace" if want_ns else ""))


# --- network ----------------------------------------------------------------

DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443, "redis": 6379, "rediss": 6379,
                 "postgres": 5432, "postgresql": 5432}


def url_port(url: str) -> int | None:
    m = re.match(r"^([a-z]+)://(?:[^@/]*@)?(\[[^]]+\]|[^:/?]+)(?::(\d+))?", url)
    if not m:
        return None
    return int(m.group(3)) if m.group(3) else DEFAULT_PORTS.get(m.group(1))


def selects(np_: dict[str, Any], dep: dict[str, Any]) -> bool:
    sel = dig(np_, "spec", "podSelector", "matchLabels") or {}
    return sel.items() <= (dig(dep, "spec", "template", "metadata", "labels") or {}).items()


def cmd_network(args: list[str]) -> int:
    """NetworkPolicies: 8080 and 9090 never open to all, egress admitting DNS and the ports of the IdP,
    the broker and the store in use. --require=FILE,...: those renders must have one (Ingress + Egress)."""
    required = {p for a in args if a.startswith("--require=") for p in a.split("=", 1)[1].split(",") if p}
    paths = [a for a in args if not a.startswith("--")]
    secret = paths.pop(0)
    stand_in = stand_in_secret(secret)
    probs = Problems()
    seen = 0
    for path, group in by_file(load(paths)).items():
        for dep in (d for d in group if d.get("kind") == "Deployment"):
            pols = [d for d in group if d.get("kind") == "NetworkPolicy" and selects(d, dep)]
            if path in required or os.path.basename(path) in required:
                types = {t for p_ in pols for t in dig(p_, "spec", "policyTypes") or []}
                if not {"Ingress", "Egress"} <= types:
                    probs.add(ident(dep), f"needs a NetworkPolicy for Ingress and Egress, found {sorted(types) or 'none'}")
            if not pols:
                continue
            seen += len(pols)
            c = (dig(dep, "spec", "template", "spec", "containers") or [{}])[0]
            ports = {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}
            for np_ in pols:
                where = ident(np_)
                rules = dig(np_, "spec", "ingress") or []
                for name in ("ws", "metrics"):
                    for r in rules:
                        rports = [p.get("port") for p in r.get("ports") or []]
                        if rports and name not in rports and ports.get(name) not in rports:
                            continue
                        if not r.get("from"):
                            probs.add(where, f"an ingress rule opens port {name} ({ports.get(name)}) to every "
                                             "source: name the peers")
                if "Egress" not in (dig(np_, "spec", "policyTypes") or []):
                    continue
                env = container_env(dep, c, group, None, stand_in)
                store = env.get("STATE_STORE") or ("redis" if env.get("REDIS_URL") else
                                                   "postgres" if env.get("POSTGRES_DSN") else "memory")
                need = {"DNS": (53, "UDP")}
                for k in ("JWKS_URL", "OIDC_ISSUER_URL", "UPSTREAM_WS_URL"):
                    if env.get(k):
                        need[k] = (url_port(env[k]), "TCP")
                if store == "redis":
                    need["REDIS_URL"] = (url_port(env.get("REDIS_URL", "")), "TCP")
                elif store == "postgres":
                    dsn = env.get("POSTGRES_DSN", "")
                    m = re.search(r"\bport=(\d+)", dsn)
                    need["POSTGRES_DSN"] = (url_port(dsn) if "://" in dsn else int(m.group(1)) if m else 5432, "TCP")
                egress = dig(np_, "spec", "egress") or []
                for what, (port, proto) in need.items():
                    ok = any(not r.get("ports") or any(
                        p.get("protocol", "TCP") == proto and (
                            p.get("port") == port or (isinstance(p.get("port"), int) and p.get("endPort")
                                                      and p["port"] <= (port or 0) <= p["endPort"]))
                        for p in r["ports"]) for r in egress)
                    if not ok:
                        probs.add(where, f"egress does not admit {what} (port {port}/{proto})")
    if required and not seen:
        probs.add(",".join(sorted(required)), "no NetworkPolicy found")
    return probs.finish(f"{seen} NetworkPolicy(ies) in {len(paths)} render(s): ports 8080/9090 limited to named "
                        "peers, egress admits DNS, IdP, broker and store")


def cmd_adapter(values_path: str, paths: list[str]) -> int:
    """Every HPA Pods metric is one the prometheus-adapter rules publish."""
    probs = Problems()
    with open(values_path, encoding="utf-8") as f:
        rules = dig(yaml.safe_load(f), "rules", "custom") or []
    published = {dig(r, "name", "as") for r in rules}
    n = 0
    for d in load(paths):
        if d.get("kind") != "HorizontalPodAutoscaler":
            continue
        for m in dig(d, "spec", "metrics") or []:
            if m.get("type") == "Pods":
                n += 1
                name = dig(m, "pods", "metric", "name")
                if name not in published:
                    probs.add(ident(d), f"Pods metric {name} is not published by {values_path} ({published})")
                if dig(m, "pods", "target", "type") != "AverageValue":
                    probs.add(ident(d), "a Pods metric target must be AverageValue")
    if n == 0:
        probs.add(",".join(paths), "no HPA with a Pods metric")
    return probs.finish(f"{n} Pods metric(s) published by the prometheus-adapter rules")


# --- examples ---------------------------------------------------------------

def cmd_examples(toml_path: str, routes_path: str, schema_path: str) -> int:
    probs = Problems()
    with open(toml_path, "rb") as f:
        active = tomllib.load(f)
    with open(toml_path, encoding="utf-8") as f:
        text = f.read()
    commented = set(re.findall(r"^#\s*([a-z][a-z0-9_]*)\s*=", text, re.M))
    keys = set(active) | commented
    want = {k.lower() for k in KNOWN_ENV - ENV_ONLY - TOML_PENDING}
    allowed = {k.lower() for k in ALLOWED_ENV - ENV_ONLY}
    for k in sorted(want - keys):
        probs.add(toml_path, f"setting {k} is not shown")
    pending = sorted({k.lower() for k in TOML_PENDING} - keys)
    if pending:
        print(f"  note: {toml_path} does not show {', '.join(pending)} yet (TOML_PENDING)")
    for k in sorted(keys - allowed):
        probs.add(toml_path, f"key {k} is not a setting of the binary's config file")
    for k in ("jwks_url",):
        if k not in active:
            probs.add(toml_path, f"required key {k} must be set, not commented")

    with open(routes_path, encoding="utf-8") as f:
        routes = yaml.safe_load(f)
    if not isinstance(routes, list) or not routes:
        probs.add(routes_path, "must be a non-empty YAML list")
        routes = []
    for i, r in enumerate(routes):
        w = f"{routes_path}[{i}]"
        if not isinstance(r, dict) or set(r) != {"prefix", "upstream", "copySubProtocol", "preserveQuery"}:
            probs.add(w, f"keys must be prefix, upstream, copySubProtocol, preserveQuery; got {sorted(r) if isinstance(r, dict) else r}")
            continue
        if not str(r["prefix"]).startswith("/"):
            probs.add(w, "prefix must start with /")
        if not re.match(r"^wss?://[^/\s]+", str(r["upstream"])):
            probs.add(w, "upstream must be a ws:// or wss:// URL")
        for k in ("copySubProtocol", "preserveQuery"):
            if not isinstance(r[k], bool):
                probs.add(w, f"{k} must be a boolean")

    with open(schema_path, encoding="utf-8") as f:
        schema = json.load(f)
    for part in (("config",), ("secret", "values"), ("extraEnv", "items", "properties", "name")):
        node = schema["properties"]
        for p in part:
            node = node[p] if p in node else node["properties"][p]
        allowed = set(dig(node, "propertyNames", "enum") or node.get("enum") or [])
        if not allowed:
            probs.add(schema_path, f"{'.'.join(part)} does not restrict key names")
        for k in sorted(allowed - ALLOWED_ENV):
            probs.add(schema_path, f"{'.'.join(part)} allows unknown env key {k}")
    return probs.finish(f"{len(keys)} TOML keys, {len(routes)} routes, schema key lists all known")


# --- check-config -----------------------------------------------------------

def stand_in_secret(path: str) -> dict[str, str]:
    """The string data of the one Secret in `path` (components/example-secret/secret.yaml)."""
    docs = [d for d in load([path]) if d.get("kind") == "Secret"]
    if len(docs) != 1:
        raise SystemExit(f"{path}: expected one Secret, found {len(docs)}")
    return env_sources(docs)[1][docs[0]["metadata"]["name"]]


def cmd_check_config(binary: str, cert: str, key: str, routes: str, secret: str, paths: list[str]) -> int:
    # A stand-in admin token (the binary refuses fewer than 16 characters), removed at exit.
    fd, token = tempfile.mkstemp(prefix="check-manifests-admin-token.")
    os.write(fd, os.urandom(16).hex().encode() + b"\n")
    os.close(fd)
    try:
        return _check_config(binary, paths, {"TLS_CERT_FILE": cert, "TLS_KEY_FILE": key, "ROUTE_FILE": routes,
                                             "UPSTREAM_CA_FILE": cert, "JWKS_CA_FILE": cert,
                                             "ADMIN_TOKEN_FILE": token}, stand_in_secret(secret))
    finally:
        os.unlink(token)


def _check_config(binary: str, paths: list[str], local_files: dict[str, str], stand_in: dict[str, str]) -> int:
    probs = Problems()
    runs = 0
    for path, group in by_file(load(paths)).items():
        for dep in (d for d in group if d.get("kind") == "Deployment"):
            for c in dig(dep, "spec", "template", "spec", "containers") or []:
                env = container_env(dep, c, group, probs, stand_in)
                if "WS_GATEWAY_CONFIG" in env:
                    probs.add(ident(dep), "WS_GATEWAY_CONFIG points into the pod; not checked offline")
                    continue
                swapped = []
                for k in FILE_ENV:
                    if k in env and k in local_files:
                        env[k] = local_files[k]
                        swapped.append(k)
                argv = ["env", "-i", "PATH=/usr/local/bin:/usr/bin:/bin"]
                argv += [f"{k}={v}" for k, v in sorted(env.items())]
                argv += [binary, "--check-config"]
                runs += 1
                try:
                    r = subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
                except subprocess.TimeoutExpired:
                    probs.add(ident(dep), "--check-config did not exit within 30 s")
                    continue
                note = f" (local files for {', '.join(swapped)})" if swapped else ""
                if r.returncode != 0:
                    out = (r.stdout + r.stderr).strip().replace("\n", "\n       ")
                    probs.add(ident(dep), f"--check-config exit {r.returncode} with {len(env)} env keys{note}:\n       {out}")
                else:
                    print(f"  {ident(dep)}: --check-config ok with {len(env)} env keys{note}")
    if runs == 0:
        probs.add("check-config", "no Deployment found")
    return probs.finish(f"{runs} configuration(s) accepted by {binary}")


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    cmd, args = argv[1], argv[2:]
    if cmd == "crds":
        return cmd_crds(args)
    if cmd == "policy":
        return cmd_policy(args)
    if cmd == "env-keys":
        return cmd_env_keys(args)
    if cmd == "layout":
        return cmd_layout(args)
    if cmd == "network" and args:
        return cmd_network(args)
    if cmd == "adapter" and len(args) >= 2:
        return cmd_adapter(args[0], args[1:])
    if cmd == "compare" and len(args) == 2:
        return cmd_compare(*args)
    if cmd == "examples" and len(args) == 3:
        return cmd_examples(*args)
    if cmd == "check-config" and len(args) >= 6:
        return cmd_check_config(args[0], args[1], args[2], args[3], args[4], args[5:])
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
