#!/usr/bin/env python3
"""Helpers for scripts/traefik.sh: the real Traefik in front of the real gateway.

Subcommands (each exits 1 on a failed expectation and says why):

  ports N                    N free TCP ports on 127.0.0.1, one per line.
  pki DIR                    a CA, Traefik's certificate and the gateway's (both for ws.example.com,
                             different keys, so a client can tell who terminated TLS).
  jwt DIR ISSUER AUDIENCE    an RSA key, DIR/jwks/jwks.json, and an RS256 token in DIR/token (mode 0600).
  routing OUT ...            reads the IngressRoute/Middleware and IngressRouteTCP/ServersTransportTCP
                             rendered by Kustomize and Helm (and the base Ingress), checks they say the
                             same thing (entry point, rule, passthrough, PROXY version, middleware), and
                             writes Traefik file-provider configurations made from those objects.
  upstream ADDR LOG          a WebSocket echo server that appends each upgrade's request line and headers
                             to LOG as one JSON line.
  upgrade ...                a TLS client: TCP from a chosen source address, TLS with SNI (verified
                             against the CA), a WebSocket upgrade with the token, one echo, a clean close.
  wait-status ...            retries an HTTPS GET until it answers the wanted status (the file provider
                             loads asynchronously).
  headers LOG ID K=V...      the upgrade tagged X-Test-Id: ID reached the upstream with these headers
                             (K!=V: header absent or different; K=: header absent).
  ratelimit ...              requests from one trusted hop for two clients (X-Forwarded-For) until the
                             first client gets 429; the second must not.
  peer-cert ...              whether a TLS server presents a given certificate for an SNI (retried for
                             --seconds).
  direct ...                 a TCP connection straight to the gateway from an untrusted address must
                             be closed without a TLS handshake.

Tokens are read from a file and never printed. Stdlib plus PyYAML (for `routing`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import re
import socket
import ssl
import sys
import time
from typing import Any

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TIMEOUT = 5.0


# --- setup ------------------------------------------------------------------

def cmd_ports(n: int) -> int:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    for s in socks:
        print(s.getsockname()[1])
        s.close()
    return 0


# --- routing: the manifests decide what Traefik is told ------------------------

def load(path: str) -> list[dict[str, Any]]:
    import yaml  # only this subcommand needs it

    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def one(docs: list[dict[str, Any]], kind: str, path: str) -> dict[str, Any]:
    found = [d for d in docs if d.get("kind") == kind]
    if len(found) != 1:
        raise SystemExit(f"{path}: expected one {kind}, found {len(found)}")
    return found[0]


def http_view(path: str) -> dict[str, Any]:
    """What Traefik does with the IngressRoute of a render: entry points, rule, TLS, middleware specs."""
    docs = load(path)
    ir = one(docs, "IngressRoute", path)
    (route,) = ir["spec"]["routes"]
    mws = {d["metadata"]["name"]: d["spec"] for d in docs if d.get("kind") == "Middleware"}
    (svc,) = route["services"]
    return {
        "entryPoints": ir["spec"]["entryPoints"],
        "rule": route["match"],
        "tls": bool(ir["spec"].get("tls")),
        "middlewares": [{m["name"]: mws[m["name"]]} for m in route.get("middlewares") or []],
        "service port": svc["port"],
    }


def tcp_view(path: str) -> dict[str, Any]:
    """What Traefik does with the IngressRouteTCP of a render: entry points, rule, passthrough, transport."""
    docs = load(path)
    irt = one(docs, "IngressRouteTCP", path)
    (route,) = irt["spec"]["routes"]
    (svc,) = route["services"]
    transports = {d["metadata"]["name"]: d["spec"] for d in docs if d.get("kind") == "ServersTransportTCP"}
    name = svc.get("serversTransport")
    if name not in transports:
        raise SystemExit(f"{path}: service {svc.get('name')} names no ServersTransportTCP in the render ({name!r})")
    return {
        "entryPoints": irt["spec"]["entryPoints"],
        "rule": route["match"],
        "passthrough": (irt["spec"].get("tls") or {}).get("passthrough") is True,
        "serversTransport": transports[name],
        "service port": svc["port"],
    }


def ingress_rule(path: str) -> dict[str, Any]:
    """The networking.k8s.io Ingress of the base, as the Traefik rule it becomes."""
    docs = load(path)
    ing = one(docs, "Ingress", path)
    ann = ing["metadata"].get("annotations") or {}
    (rule,) = ing["spec"]["rules"]
    (p,) = rule["http"]["paths"]
    if p.get("pathType") != "Prefix":
        raise SystemExit(f"{path}: pathType {p.get('pathType')} (Traefik rule below assumes Prefix)")
    return {
        "entryPoints": [e.strip() for e in ann.get("traefik.ingress.kubernetes.io/router.entrypoints", "").split(",")],
        "rule": f"Host(`{rule['host']}`) && PathPrefix(`{p['path']}`)",
        "tls": ann.get("traefik.ingress.kubernetes.io/router.tls") == "true",
        "service port": p["backend"]["service"]["port"].get("name"),
    }


def same(label: str, views: dict[str, dict[str, Any]], keys: list[str]) -> bool:
    ok = True
    for k in keys:
        vals = {src: json.dumps(v[k], sort_keys=True) for src, v in views.items()}
        agree = len(set(vals.values())) == 1
        ok &= agree
        print(f"  {label} {k}: " + ("same in " + ", ".join(vals) + f": {next(iter(vals.values()))}" if agree
                                     else "DIFFERENT: " + "; ".join(f"{s}={v}" for s, v in vals.items())))
    return ok


def cmd_routing(a: argparse.Namespace) -> int:
    import yaml

    http = {"kustomize": http_view(a.kustomize_http), "helm": http_view(a.helm_http)}
    tcp = {"kustomize": tcp_view(a.kustomize_tcp), "helm": tcp_view(a.helm_tcp)}
    ok = same("IngressRoute", http, ["entryPoints", "rule", "tls", "middlewares", "service port"])
    ing = ingress_rule(a.ingress)
    ok &= same("Ingress vs IngressRoute", {"ingress": ing, "ingressroute": http["kustomize"]},
               ["entryPoints", "rule", "tls", "service port"])
    ok &= same("IngressRouteTCP", tcp, ["entryPoints", "rule", "passthrough", "serversTransport", "service port"])
    if not tcp["kustomize"]["passthrough"]:
        print("  IngressRouteTCP: tls.passthrough is not true")
        ok = False
    h, t = http["kustomize"], tcp["kustomize"]
    # The file provider gets exactly these values: one router per mode, named like the objects.
    terminate = {
        "http": {
            "routers": {"ws-gateway": {
                "entryPoints": h["entryPoints"], "rule": h["rule"], "service": "ws-gateway",
                "middlewares": [next(iter(m)) for m in h["middlewares"]], "tls": {}}},
            "middlewares": {name: spec for m in h["middlewares"] for name, spec in m.items()},
            "services": {"ws-gateway": {"loadBalancer": {"servers": [{"url": f"http://{a.plain_gateway}"}]}}},
        },
        "tls": {"certificates": [{"certFile": a.cert, "keyFile": a.key}]},
    }
    passthrough = {
        "tcp": {
            "routers": {"ws-gateway": {
                "entryPoints": t["entryPoints"], "rule": t["rule"], "service": "ws-gateway",
                "tls": {"passthrough": t["passthrough"]}}},
            "services": {"ws-gateway": {"loadBalancer": {
                "servers": [{"address": a.tls_gateway}], "serversTransport": "ws-gateway"}}},
            "serversTransports": {"ws-gateway": t["serversTransport"]},
        },
    }
    os.makedirs(a.out, exist_ok=True)
    for name, cfg in (("terminate", terminate), ("passthrough", passthrough)):
        with open(f"{a.out}/{name}.yaml", "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
    # What the script must give Traefik statically, from the same objects.
    with open(f"{a.out}/static.env", "w") as f:
        eps = set(h["entryPoints"]) | set(t["entryPoints"])
        if len(eps) != 1:
            print(f"  entry points differ between modes: {sorted(eps)}")
            ok = False
        f.write(f"ENTRYPOINT={sorted(eps)[0]}\n")
        host = re.search(r"Host\(`([^`]+)`\)", h["rule"])
        sni = re.search(r"HostSNI\(`([^`]+)`\)", t["rule"])
        path = re.search(r"PathPrefix\(`([^`]+)`\)", h["rule"])
        if not (host and sni and path):
            print("  rules lack Host/PathPrefix/HostSNI")
            return 1
        f.write(f"HOST={host.group(1)}\nSNI_HOST={sni.group(1)}\nPATH_PREFIX={path.group(1)}\n")
    print(f"  file-provider configurations: {a.out}/terminate.yaml, {a.out}/passthrough.yaml")
    return 0 if ok else 1


# --- upstream ---------------------------------------------------------------

async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(await reader.readexactly(2), "big")
    elif n == 127:
        n = int.from_bytes(await reader.readexactly(8), "big")
    mask = await reader.readexactly(4) if b1 & 0x80 else b""
    data = await reader.readexactly(n)
    if mask:
        data = bytes(c ^ mask[i % 4] for i, c in enumerate(data))
    return b0 & 0x0F, data


def frame(opcode: int, payload: bytes, mask: bool) -> bytes:
    head = bytes([0x80 | opcode])
    n = len(payload)
    m = 0x80 if mask else 0
    if n < 126:
        head += bytes([m | n])
    elif n < 65536:
        head += bytes([m | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([m | 127]) + n.to_bytes(8, "big")
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(c ^ key[i % 4] for i, c in enumerate(payload))


def cmd_upstream(addr: str, log: str) -> int:
    host, port = addr.rsplit(":", 1)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
            lines = head.decode("latin-1").split("\r\n")
            headers: dict[str, str] = {}
            for line in lines[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    headers[k.strip().lower()] = (headers[k.strip().lower()] + ", " if k.strip().lower() in headers
                                                  else "") + v.strip()
            with open(log, "a") as f:
                f.write(json.dumps({"request": lines[0], "headers": headers}) + "\n")
            accept = base64.b64encode(hashlib.sha1(headers.get("sec-websocket-key", "").encode() + WS_GUID).digest())
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
            await writer.drain()
            while True:
                op, data = await read_frame(reader)
                if op == 8:
                    writer.write(frame(8, data[:2], False))
                    await writer.drain()
                    break
                if op in (1, 2):
                    writer.write(frame(op, data, False))
                elif op == 9:
                    writer.write(frame(10, data, False))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, host, int(port))
        async with server:
            await server.serve_forever()

    asyncio.run(main())
    return 0


# --- clients ----------------------------------------------------------------

def insecure_context() -> ssl.SSLContext:
    """For looking at whichever certificate a server presents, not for trusting it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def tls_connect(connect: str, source: str | None, sni: str, ca: str | None) -> ssl.SSLSocket:
    host, port = connect.rsplit(":", 1)
    raw = socket.create_connection((host, int(port)), timeout=TIMEOUT,
                                   source_address=(source, 0) if source else None)
    ctx = ssl.create_default_context(cafile=ca) if ca else insecure_context()
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx.wrap_socket(raw, server_hostname=sni)


def read_head(sock: ssl.SSLSocket) -> tuple[str, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            break
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head.decode("latin-1"), rest


def cmd_upgrade(a: argparse.Namespace) -> int:
    with open(a.token_file) as f:
        token = f.read().strip()
    sock = tls_connect(a.connect, a.source, a.sni, a.ca)
    cert = hashlib.sha256(sock.getpeercert(binary_form=True)).hexdigest()
    if a.expect_cert:
        want = cert_fingerprint(a.expect_cert)
        if cert != want:
            print(f"  TLS ended at a certificate {cert[:16]}..., not {a.expect_cert} ({want[:16]}...)")
            return 1
        print(f"  TLS ended at {os.path.basename(a.expect_cert)} (sha256 {cert[:16]}...)")
    key = base64.b64encode(os.urandom(16)).decode()
    extra = "".join(f"{h}\r\n" for h in a.header)
    req = (f"GET {a.path} HTTP/1.1\r\nHost: {a.host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n"
           f"X-Test-Id: {a.id}\r\n{extra}\r\n")
    sock.sendall(req.encode())
    head, rest = read_head(sock)
    status = head.split("\r\n", 1)[0]
    print(f"  {a.source} -> {a.connect} (SNI {a.sni}) {a.path}: {status}")
    if " 101 " not in status + " ":
        return 1
    want_accept = base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()
    if f"sec-websocket-accept: {want_accept}".lower() not in head.lower():
        print("  101 without the right Sec-WebSocket-Accept")
        return 1
    msg = f"hello through traefik {a.id}".encode()
    sock.sendall(frame(1, msg, True))

    buf = bytearray(rest)  # bytes after the 101 head belong to the first frame

    def need(n: int) -> bytes:
        while len(buf) < n:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed before the echo")
            buf.extend(chunk)
        out = bytes(buf[:n])
        del buf[:n]
        return out

    b0, b1 = need(2)
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(need(2), "big")
    op, data = b0 & 0x0F, need(n)
    if (op, data) != (1, msg):
        print(f"  echo: got opcode {op} {data[:60]!r}")
        return 1
    print(f"  echo through both hops: {len(data)} bytes")
    sock.sendall(frame(8, (1000).to_bytes(2, "big"), True))
    try:
        sock.settimeout(TIMEOUT)
        while sock.recv(4096):
            pass
    except (OSError, ssl.SSLError):
        pass
    sock.close()
    return 0


def https_get(connect: str, source: str | None, sni: str, ca: str | None, host: str, path: str,
              headers: list[str]) -> tuple[int, str]:
    sock = tls_connect(connect, source, sni, ca)
    extra = "".join(f"{h}\r\n" for h in headers)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{extra}\r\n".encode())
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (OSError, ssl.SSLError):
        pass
    sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, body.decode("latin-1", "replace")


def cmd_wait_status(a: argparse.Namespace) -> int:
    deadline = time.monotonic() + a.seconds
    last = "nothing"
    while time.monotonic() < deadline:
        try:
            status, body = https_get(a.connect, a.source, a.sni, a.ca, a.host, a.path, [])
            last = f"{status} {body.strip()[:60]!r}"
            if status == a.status and (not a.body or a.body in body):
                print(f"  GET {a.path} (Host {a.host}): {last}")
                return 0
        except (OSError, ssl.SSLError) as e:
            last = repr(e)
        time.sleep(0.1)
    print(f"  GET {a.path} (Host {a.host}): wanted {a.status}{' ' + repr(a.body) if a.body else ''}, last {last}")
    return 1


def cmd_headers(log: str, test_id: str, expects: list[str]) -> int:
    entries = []
    with open(log) as f:
        for line in f:
            e = json.loads(line)
            if e["headers"].get("x-test-id") == test_id:
                entries.append(e)
    if len(entries) != 1:
        print(f"  {len(entries)} upgrades tagged {test_id} reached the upstream (want 1)")
        return 1
    e = entries[0]
    h = e["headers"]
    ok = True
    print(f"  upstream got: {e['request']}")
    for x in expects:
        neg = "!=" in x
        k, v = x.split("!=" if neg else "=", 1)
        got = h.get(k.lower())
        good = (got != v) if neg else (got == v if v else got is None)
        ok &= good
        print(f"  {'ok  ' if good else 'FAIL'} {k}: {got!r} ({'must not be' if neg else 'want'} {v or 'absent'!r})")
    return 0 if ok else 1


def cmd_ratelimit(a: argparse.Namespace) -> int:
    """The Middleware's sourceCriterion, for real: two clients behind one trusted hop get their own buckets.

    Requests for the first client go out from a pool of connections at once (one at a time would stay under
    the refill rate) until Traefik answers 429; then a burst for the second client must pass whole.
    """
    from concurrent.futures import ThreadPoolExecutor

    path = f"{a.path}/ratelimit"

    def get(client: str) -> int:
        try:
            return https_get(a.connect, a.source, a.sni, a.ca, a.host, path, [f"X-Forwarded-For: {client}"])[0]
        except (OSError, ssl.SSLError):
            return 0

    with ThreadPoolExecutor(max_workers=16) as pool:
        statuses = list(pool.map(get, [a.client] * a.max))
    counts = {s: statuses.count(s) for s in sorted(set(statuses))}
    print(f"  {a.max} concurrent requests for client {a.client} behind {a.source}: statuses {counts}")
    if 429 not in counts:
        print("  no 429: the middleware did not limit this client")
        return 1
    if 0 in counts:
        print("  some requests got no HTTP answer")
        return 1
    # A burst for the second client at once: its own bucket (burst 50) admits all of them, while a bucket
    # shared with the first client holds only what refilled meanwhile (20/s), so most would get 429.
    with ThreadPoolExecutor(max_workers=16) as pool:
        statuses = list(pool.map(get, [a.other] * 20))
    counts = {s: statuses.count(s) for s in sorted(set(statuses))}
    print(f"  20 concurrent requests for client {a.other} behind the same hop, right after: statuses {counts}")
    if 429 in counts:
        print("  the second client shares the first one's bucket: the ipStrategy keys on the hop, not the client")
        return 1
    return 0


def cert_fingerprint(pem_path: str) -> str:
    with open(pem_path) as f:
        der = ssl.PEM_cert_to_DER_cert(f.read())
    return hashlib.sha256(der).hexdigest()


def cmd_peer_cert(a: argparse.Namespace) -> int:
    """Whether the server answering this SNI presents CERT (--expect same) or anything else (different)."""
    deadline = time.monotonic() + a.seconds
    mine = cert_fingerprint(a.cert)
    while True:
        try:
            sock = tls_connect(a.connect, a.source, a.sni, None)
            got = hashlib.sha256(sock.getpeercert(binary_form=True)).hexdigest()
            sock.close()
        except (OSError, ssl.SSLError) as e:
            got = f"no handshake ({e.__class__.__name__})"
        if (got == mine) == (a.expect == "same") or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    print(f"  SNI {a.sni}: {got[:16]}...; {os.path.basename(a.cert)} is {mine[:16]}... (want {a.expect})")
    return 0 if (got == mine) == (a.expect == "same") else 1


def cmd_direct(a: argparse.Namespace) -> int:
    host, port = a.connect.rsplit(":", 1)
    raw = socket.create_connection((host, int(port)), timeout=TIMEOUT, source_address=(a.source, 0))
    ctx = insecure_context()
    try:
        sock = ctx.wrap_socket(raw, server_hostname=a.sni)
        sock.close()
        print(f"  a TLS handshake from {a.source} succeeded: the gateway took a connection that is not Traefik's")
        return 1
    except (OSError, ssl.SSLError) as e:
        print(f"  {a.source} -> {a.connect} without a PROXY header from a trusted peer: closed ({e.__class__.__name__})")
        return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("ports").add_argument("n", type=int)
    r = sub.add_parser("routing")
    for k in ("out", "kustomize_http", "helm_http", "kustomize_tcp", "helm_tcp", "ingress", "plain_gateway",
              "tls_gateway", "cert", "key"):
        r.add_argument(k)
    u = sub.add_parser("upstream")
    u.add_argument("addr")
    u.add_argument("log")

    def client(name: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name)
        c.add_argument("--connect", required=True)
        c.add_argument("--source")
        c.add_argument("--sni", required=True)
        c.add_argument("--ca")
        c.add_argument("--host")
        c.add_argument("--path", default="/")
        return c

    g = client("upgrade")
    g.add_argument("--token-file", required=True)
    g.add_argument("--id", required=True)
    g.add_argument("--header", action="append", default=[])
    g.add_argument("--expect-cert")
    w = client("wait-status")
    w.add_argument("--status", type=int, required=True)
    w.add_argument("--body")
    w.add_argument("--seconds", type=float, default=15)
    h = sub.add_parser("headers")
    h.add_argument("log")
    h.add_argument("id")
    h.add_argument("expect", nargs="*")
    rl = client("ratelimit")
    rl.add_argument("--client", required=True)
    rl.add_argument("--other", required=True)
    rl.add_argument("--max", type=int, default=150)
    pc = client("peer-cert")
    pc.add_argument("--cert", required=True)
    pc.add_argument("--expect", choices=["same", "different"], required=True)
    pc.add_argument("--seconds", type=float, default=0)
    client("direct")
    a = p.parse_args()
    if a.cmd == "ports":
        return cmd_ports(a.n)
    if a.cmd == "routing":
        return cmd_routing(a)
    if a.cmd == "upstream":
        return cmd_upstream(a.addr, a.log)
    if a.cmd == "headers":
        return cmd_headers(a.log, a.id, a.expect)
    return {"upgrade": cmd_upgrade, "wait-status": cmd_wait_status, "ratelimit": cmd_ratelimit,
            "peer-cert": cmd_peer_cert, "direct": cmd_direct}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
