"""Topic rules at the edge with Eclipse Paho (paho-mqtt 2.x, websockets transport), MQTT 3.1.1 and 5.

Run by scripts/e2e.sh (in a venv with paho-mqtt) after the Node tests:
    python tests/e2e/paho_edge.py GATEWAY_BIN LOADGEN_BIN

A private Mosquitto without ACLs, a gateway in front of it with
--mqtt-publish-acl/--mqtt-subscribe-acl 'devices/{sub}/#', and a watcher on Mosquitto's plain MQTT listener
subscribed to devices/# (what really reached the broker). Certificates, the signing key, its JWKS and the tokens
come from `ws-loadgen pki` (the checked-in RS256 test key, so tokens from two runs verify against one JWKS).
Ends with "paho: N passed, N failed".
"""

import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import paho.mqtt.client as mqtt

ISS = "https://issuer.paho.test/"
AUD = "ws-gateway-paho"
PASSED = 0
FAILED = 0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def check(name, fn):
    global PASSED, FAILED
    try:
        fn()
        PASSED += 1
        print(f"ok - {name}", flush=True)
    except Exception as e:  # noqa: BLE001 - every failure is reported and counted
        FAILED += 1
        print(f"not ok - {name}: {e!r}", flush=True)


def token(loadgen, work, sub):
    out = os.path.join(work, f"pki-{uuid.uuid4().hex[:8]}")
    subprocess.run(
        [loadgen, "pki", "--out", out, "--token-sub", sub, "--token-iss", ISS, "--token-aud", AUD],
        check=True, stdout=subprocess.DEVNULL,
    )
    with open(os.path.join(out, "token")) as f:
        return f.read().strip()


class Recorder:
    """A paho client with its callbacks recorded."""

    def __init__(self, client_id, protocol, transport="tcp"):
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol, transport=transport
        )
        self.connected = None
        self.messages = []
        self.subacks = {}
        self.pubacks = {}
        self.c.on_connect = lambda c, u, flags, rc, props: setattr(self, "connected", rc)
        self.c.on_message = lambda c, u, m: self.messages.append(m.topic)
        self.c.on_subscribe = lambda c, u, mid, rcs, props: self.subacks.__setitem__(mid, [r.value for r in rcs])
        self.c.on_publish = lambda c, u, mid, rc, props: self.pubacks.__setitem__(mid, rc.value)

    def connect(self, host, port):
        self.c.connect(host, port, keepalive=30)
        self.c.loop_start()
        wait_for("CONNACK", lambda: self.connected is not None)
        assert not self.connected.is_failure, f"CONNACK {self.connected}"

    def publish(self, topic, qos):
        info = self.c.publish(topic, b"paho", qos=qos)
        wait_for(f"the ack of {topic}", lambda: info.mid in self.pubacks)
        return self.pubacks[info.mid]

    def subscribe(self, filters):
        _, mid = self.c.subscribe(filters)
        wait_for("SUBACK", lambda: mid in self.subacks)
        return self.subacks[mid]

    def stop(self):
        self.c.disconnect()
        self.c.loop_stop()


def main():
    gateway_bin, loadgen = sys.argv[1], sys.argv[2]
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    work = tempfile.mkdtemp(prefix="paho-edge-")
    procs = []
    try:
        pki = os.path.join(work, "pki")
        subprocess.run(
            [loadgen, "pki", "--out", pki, "--token-sub", "unused", "--token-iss", ISS, "--token-aud", AUD],
            check=True, stdout=subprocess.DEVNULL,
        )
        with open(os.path.join(pki, "jwks", "jwks.json"), "rb") as f:
            jwks = f.read()

        class Jwks(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.end_headers()
                self.wfile.write(jwks)

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Jwks)
        threading.Thread(target=server.serve_forever, daemon=True).start()

        mqtt_port, ws_port, gw_port, admin_port = free_port(), free_port(), free_port(), free_port()
        conf = os.path.join(work, "mosquitto.conf")
        with open(conf, "w") as f:
            f.write(
                "user root\npersistence false\nper_listener_settings false\nallow_anonymous true\n"
                f"listener {mqtt_port} 127.0.0.1\nprotocol mqtt\n"
                f"listener {ws_port} 127.0.0.1\nprotocol websockets\nsocket_domain ipv4\n"
            )
        procs.append(subprocess.Popen([mosquitto, "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        gw_log = open(os.path.join(work, "gateway.log"), "w")
        procs.append(subprocess.Popen(
            [
                gateway_bin,
                "--listen", f"127.0.0.1:{gw_port}", "--admin-listen", f"127.0.0.1:{admin_port}",
                "--tls-cert", os.path.join(pki, "server.pem"), "--tls-key", os.path.join(pki, "server.key"),
                "--jwks-url", f"http://127.0.0.1:{server.server_address[1]}/jwks.json",
                "--jwt-expected-issuer", ISS, "--jwt-expected-audience", AUD,
                "--upstream-ws-url", f"ws://127.0.0.1:{ws_port}/mqtt",
                "--mqtt-publish-acl", "devices/{sub}/#", "--mqtt-subscribe-acl", "devices/{sub}/#",
                # Paho sends an Origin (its scheme and the host it dialled) with every upgrade.
                "--ws-allowed-origins", "https://localhost:*,http://localhost:*",
            ],
            stdout=gw_log, stderr=subprocess.STDOUT, env={k: v for k, v in os.environ.items() if k != "UPSTREAM_WS_URL"},
        ))

        def ready():
            try:
                with socket.create_connection(("127.0.0.1", admin_port), timeout=1) as s:
                    s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    return s.recv(64).startswith(b"HTTP/1.1 200")
            except OSError:
                return False

        wait_for("the gateway's /readyz", ready, 20)
        wait_for("mosquitto", lambda: socket.socket().connect_ex(("127.0.0.1", mqtt_port)) == 0)

        watcher = Recorder(f"watcher-{uuid.uuid4().hex[:6]}", mqtt.MQTTv311)
        watcher.connect("127.0.0.1", mqtt_port)
        assert watcher.subscribe([("devices/#", 1)]) == [1]

        ca = os.path.join(pki, "ca.pem")
        for protocol, label, refused in [(mqtt.MQTTv311, "3.1.1", 0x80), (mqtt.MQTTv5, "5", 0x87)]:
            alice = f"alice-{uuid.uuid4().hex[:6]}"
            client = Recorder(f"{alice}-paho", protocol, transport="websockets")
            client.c.tls_set(ca_certs=ca)
            client.c.ws_set_options(path="/mqtt", headers={"Authorization": f"Bearer {token(loadgen, work, alice)}"})
            client.connect("localhost", gw_port)
            try:
                def publish_rules():
                    bobs, hers = f"devices/bob/{uuid.uuid4().hex[:6]}", f"devices/{alice}/t"
                    rc = client.publish(bobs, 1)
                    # 3.1.1 has no negative ack: a plain PUBACK; MQTT 5: reason 0x87 not authorized.
                    assert rc == (0 if protocol == mqtt.MQTTv311 else 0x87), f"PUBACK reason {rc:#x}"
                    assert client.publish(hers, 1) == 0
                    wait_for(f"the watcher to see {hers}", lambda: hers in watcher.messages)
                    assert bobs not in watcher.messages, f"the broker got {bobs}"
                    assert client.c.is_connected(), "the session ended after a dropped publish"

                def subscribe_rules():
                    codes = client.subscribe([(f"devices/{alice}/#", 1), ("devices/+/secret", 1)])
                    assert codes == [1, refused], f"SUBACK {codes}"
                    watcher.c.publish(f"devices/{alice}/in", b"x", qos=1)
                    wait_for("the allowed subscription's message", lambda: f"devices/{alice}/in" in client.messages)

                check(f"paho MQTT {label}: a publish to bob's topic is dropped, hers arrives, the session stays up", publish_rules)
                check(f"paho MQTT {label}: SUBSCRIBE [allowed, denied] gets [granted, {refused:#x}]", subscribe_rules)
            finally:
                client.stop()
        watcher.stop()
    except Exception as e:  # noqa: BLE001 - a setup failure is one failed check
        global FAILED
        FAILED += 1
        print(f"not ok - setup: {e!r}", flush=True)
        log = os.path.join(work, "gateway.log")
        if os.path.exists(log):
            print(open(log).read()[-3000:])
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)
    print(f"paho: {PASSED} passed, {FAILED} failed")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
