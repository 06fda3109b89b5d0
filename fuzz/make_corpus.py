#!/usr/bin/env python3
"""Writes the seed corpora under fuzz/corpus/<target>/ from the unit-test vectors of the matching src/ modules.

The seeds are committed; run this again only to change them (the JWKS seeds with real signatures need the
`cryptography` package and get fresh keys each time). libFuzzer grows its working corpus elsewhere
(fuzz/target/corpus, see scripts/fuzz.sh), so these directories stay small.
"""
import base64
import json
import os
import struct
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def write(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# request_head: src/upgrade.rs tests
GOOD = (
    "GET /ws?x=1 HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n"
    "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\nEXTRA"
)
write("request_head", "good", GOOD)
write("request_head", "good_origin_protocols", GOOD.replace(
    "Host: gw\r\n",
    "Host: gw\r\nOrigin: https://app.example\r\nSec-WebSocket-Protocol: mqtt, mqttv3.1\r\n"
    "Sec-WebSocket-Protocol: x\r\n"))
write("request_head", "post", GOOD.replace("GET", "POST"))
write("request_head", "version_8", GOOD.replace("Version: 13", "Version: 8"))
write("request_head", "short_key", GOOD.replace("dGhlIHNhbXBsZSBub25jZQ==", "short"))
write("request_head", "content_length", GOOD.replace("Host: gw\r\n", "Host: gw\r\nContent-Length: 5\r\n"))
write("request_head", "chunked", GOOD.replace("Host: gw\r\n", "Host: gw\r\nTransfer-Encoding: chunked\r\n"))
write("request_head", "dot_segments", "GET /a/%2E%2e/b HTTP/1.1\r\n\r\n")
write("request_head", "matrix_dot", "GET /a/..;/b?x=1 HTTP/1.1\r\nHost: gw\r\n\r\n")
write("request_head", "absolute_form", "GET http://x/ HTTP/1.1\r\n\r\n")
write("request_head", "tls", b"\x16\x03\x01garbage\r\n\r\n")


# frame_tracker: src/frame.rs tests. Layout: n, n chunk sizes, stream.
def frame(opcode, payload, mask=None, fin=True, ext=None):
    out = bytearray([(0x80 if fin else 0) | (opcode & 0x0F)])
    bit = 0x80 if mask else 0
    n = len(payload)
    if ext == 127 or n > 0xFFFF:
        out += bytes([bit | 127]) + struct.pack(">Q", n)
    elif ext == 126 or n >= 126:
        out += bytes([bit | 126]) + struct.pack(">H", n)
    else:
        out.append(bit | n)
    if mask:
        out += bytes(mask)
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes(out) + bytes(payload)


stream = (
    frame(0x2, b"hello")
    + frame(0x2, bytes([7]) * 300, mask=[1, 2, 3, 4])
    + frame(0x9, b"")
    + frame(0x2, bytes([9]) * 20, ext=127)
    + frame(0x8, struct.pack(">H", 1000) + b"bye")
)
write("frame_tracker", "one_chunk", bytes([0]) + stream)
write("frame_tracker", "bytewise", bytes([1, 1]) + stream)
write("frame_tracker", "chunks_2_3_7_13", bytes([4, 2, 3, 7, 13]) + stream)
write("frame_tracker", "empty_chunks", bytes([3, 0, 100, 0]) + stream)
# RSV1 (permessage-deflate), a fragmented message, and a truncated last frame.
rsv = bytearray(frame(0x1, b"compressed", mask=[9, 8, 7, 6]))
rsv[0] |= 0x40
tail = frame(0x2, b"part", fin=False) + frame(0x0, b"end") + frame(0x2, bytes(40))[:10]
write("frame_tracker", "rsv_fragments_truncated", bytes([2, 5, 9]) + bytes(rsv) + tail)


# mqtt_connect: src/mqtt.rs tests (same builder)
def connect(level, user, password, will):
    name = b"MQIsdp" if level == 3 else b"MQTT"
    body = bytearray(struct.pack(">H", len(name)) + name + bytes([level]))
    flags = 0x02
    if will:
        flags |= 0x04 | 0x08
    if user is not None:
        flags |= 0x80
    if password is not None:
        flags |= 0x40
    body.append(flags)
    body += struct.pack(">H", 60)
    if level == 5:
        body += bytes([0x05, 0x11, 0, 0, 0, 10])

    def field(v):
        body.extend(struct.pack(">H", len(v)) + v)

    field(b"client-1")
    if will:
        if level == 5:
            body.append(0)
        field(b"will/topic")
        field(b"gone")
    if user is not None:
        field(user)
    if password is not None:
        field(password)
    out = bytearray([0x10])
    n = len(body)
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            break
    return bytes(out + body)


write("mqtt_connect", "v3_will", connect(3, b"any", b"a.b.c", True))
write("mqtt_connect", "v4_user_password", connect(4, b"any", b"a.b.c", False))
write("mqtt_connect", "v4_no_password", connect(4, None, None, False))
write("mqtt_connect", "v5_will", connect(5, b"any", b"a.b.c", True))
write("mqtt_connect", "v5_password_only", connect(5, None, b"tok", False))
write("mqtt_connect", "v4_long_password", connect(4, b"u", b"x" * 300, True) + bytes([0xC0, 0x00]))
write("mqtt_connect", "remaining_length_5_bytes", bytes([0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]))

# mqtt_stream: src/mqtt_filter.rs tests. Layout: one flags byte (bit 0: MQTT 5; the rest: the split step), then the
# client's MQTT byte stream.
def mqtt_packet(first, body):
    out = bytes([first])
    n = len(body)
    while True:
        b = n % 128
        n //= 128
        out += bytes([b | 0x80 if n else b])
        if not n:
            break
    return out + body


def mqtt_str(s):
    s = s.encode() if isinstance(s, str) else s
    return struct.pack(">H", len(s)) + s


def mqtt_publish(level, qos, topic, pid, props=b""):
    body = mqtt_str(topic) + (struct.pack(">H", pid) if qos else b"")
    if level == 5:
        body += bytes([len(props)]) + props
    return mqtt_packet(0x30 | (qos << 1), body + b"payload")


def mqtt_subscribe(level, pid, filters):
    body = struct.pack(">H", pid) + (b"\x00" if level == 5 else b"")
    for f in filters:
        body += mqtt_str(f) + b"\x01"
    return mqtt_packet(0x82, body)


for level in (4, 5):
    stream = (mqtt_publish(level, 1, "devices/alice/t", 7) + mqtt_publish(level, 2, "devices/bob/t", 9)
              + b"\x62\x02\x00\x09" + mqtt_subscribe(level, 3, ["devices/bob/t", "devices/alice/+", "#"])
              + mqtt_subscribe(level, 4, ["#"]) + b"\xc0\x00")
    suback = mqtt_packet(0x90, b"\x00\x03" + (b"\x00" if level == 5 else b"") + b"\x01")
    for step in (0, 1, 6):
        write("mqtt_stream", f"v{level}-step{step}", bytes([(step << 1) | (level == 5)]) + stream + suback)
alias = mqtt_publish(5, 0, "devices/alice/t", 0, b"\x23\x00\x01") + mqtt_publish(5, 0, "", 0, b"\x23\x00\x01")
write("mqtt_stream", "v5-alias", b"\x01" + alias)
auth_props = b"\x15" + mqtt_str("jwt") + b"\x16" + mqtt_str("new.token.here")
write("mqtt_stream", "v5-auth", b"\x03" + mqtt_packet(0xf0, bytes([0x19, len(auth_props)]) + auth_props))
write("mqtt_stream", "too-big", b"\x00\x30\xff\xff\x7f")
write("mqtt_stream", "frames", b"\x04" + frame(0x2, b"\x30\x05\x00\x01ax", mask=b"\x01\x02\x03\x04")
      + frame(0x9, b"p", mask=b"\x05\x06\x07\x08"))

# proxy_protocol: src/proxy_protocol.rs tests
SIG = bytes([0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A])
write("proxy_protocol", "v1_tcp4", "PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\r\nrest")
write("proxy_protocol", "v1_tcp6", "PROXY TCP6 2001:db8::1 2001:db8::2 56324 443\r\n\x16\x03\x01")
write("proxy_protocol", "v1_unknown", "PROXY UNKNOWN\r\n")
write("proxy_protocol", "v1_partial", "PROXY TCP4 192.0.2.1")
write("proxy_protocol", "v2_tcp4", SIG + bytes([0x21, 0x11, 0, 12, 10, 1, 2, 3, 10, 0, 0, 1, 0x1F, 0x90, 0x01, 0xBB]) + b"\x16\x03")
write("proxy_protocol", "v2_local", SIG + bytes([0x20, 0x00, 0, 0]))
write("proxy_protocol", "v2_tcp6_tlv", SIG + bytes([0x21, 0x21, 0, 39]) + bytes(range(16)) + bytes(range(16, 32))
      + bytes([0x1F, 0x90, 0x01, 0xBB]) + bytes([0x04, 0, 0]))
write("proxy_protocol", "v2_short", SIG + bytes([0x21, 0x11, 0, 4, 1, 2, 3, 4]))


# jwt: src/auth/jwt.rs tests
def b64(v):
    if isinstance(v, str):
        v = v.encode()
    return base64.urlsafe_b64encode(v).rstrip(b"=").decode()


sig = b64("sig")
base = '"iss":"https://idp/realms/r","aud":["x","gw"],"sub":"alice"'
claims = "{" + base + ',"exp":1000100,"email":"a@x","roles":["r1","r2"]}'
write("jwt", "valid_structure", f'{b64(json.dumps({"alg": "RS256", "kid": "k1"}))}.{b64(claims)}.{sig}')
write("jwt", "typ_at_jwt", f'{b64(json.dumps({"alg": "RS256", "typ": "at+jwt", "kid": "k1"}))}.{b64(claims)}.{sig}')
write("jwt", "es256_no_kid", f'{b64(json.dumps({"alg": "ES256"}))}.{b64(claims)}.{sig}')
write("jwt", "alg_none", f'{b64(json.dumps({"alg": "none"}))}.{b64("{}")}.{sig}')
write("jwt", "jku", f'{b64(json.dumps({"alg": "RS256", "jku": "https://evil"}))}.{b64("{}")}.{sig}')
write("jwt", "four_segments", f'{b64("{}")}.{b64("{}")}.{sig}.x')
write("jwt", "claims", claims)
write("jwt", "claims_nbf_iat", "{" + base + ',"exp":1000100,"nbf":1000030,"iat":999000,"jti":"t1"}')
write("jwt", "claims_fraction", '{"iss":"https://idp/realms/r","aud":"other","exp":1000100.5}')

# jwks: src/auth/jwks.rs tests, plus real keys with real signatures (layout: JSON NUL message NUL signature)
KEYCLOAK = """{"keys":[
  {"kid":"enc1","kty":"RSA","alg":"RSA-OAEP","use":"enc","n":"AQAB","e":"AQAB"},
  {"kid":"ec1","kty":"EC","alg":"ES256","use":"sig","crv":"P-256",
   "x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
  {"kid":"rs1","kty":"RSA","alg":"RS256","use":"sig","n":"AKx2","e":"AQAB"},
  {"kid":"hs","kty":"oct","k":"c2VjcmV0"}
]}"""
write("jwks", "keycloak", KEYCLOAK)
write("jwks", "empty_keys", '{"keys":[]}')
try:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
except ImportError:
    print("cryptography not installed: JWKS seeds with signatures skipped", file=sys.stderr)
else:
    msg = f'{b64(json.dumps({"alg": "X"}))}.{b64(claims)}'.encode()

    def uint(n, size=None):
        size = size or (n.bit_length() + 7) // 8
        return b64(n.to_bytes(size, "big"))

    def ec_seed(name, curve, size, alg, h):
        key = ec.generate_private_key(curve)
        pub = key.public_key().public_numbers()
        r, s = utils.decode_dss_signature(key.sign(msg, ec.ECDSA(h)))
        crv = {"secp256r1": "P-256", "secp384r1": "P-384"}[curve.name]
        jwk = {"kty": "EC", "kid": name, "alg": alg, "crv": crv, "x": uint(pub.x, size), "y": uint(pub.y, size)}
        write("jwks", name, json.dumps({"keys": [jwk]}).encode() + b"\0" + msg + b"\0"
              + r.to_bytes(size, "big") + s.to_bytes(size, "big"))

    ec_seed("es256", ec.SECP256R1(), 32, "ES256", hashes.SHA256())
    ec_seed("es384", ec.SECP384R1(), 48, "ES384", hashes.SHA384())
    ed = ed25519.Ed25519PrivateKey.generate()
    x = ed.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    write("jwks", "eddsa", json.dumps({"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": b64(x)}]}).encode()
          + b"\0" + msg + b"\0" + ed.sign(msg))
    rk = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    nums = rk.public_key().public_numbers()
    rjwk = {"kty": "RSA", "kid": "rs", "use": "sig", "key_ops": ["verify"], "n": uint(nums.n), "e": uint(nums.e)}
    write("jwks", "rs256", json.dumps({"keys": [rjwk]}).encode() + b"\0" + msg + b"\0"
          + rk.sign(msg, padding.PKCS1v15(), hashes.SHA256()))
    write("jwks", "ps256", json.dumps({"keys": [dict(rjwk, alg="PS256")]}).encode() + b"\0" + msg + b"\0"
          + rk.sign(msg, padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256()))

# oidc_discovery: src/auth/idp.rs tests
for name, doc in [
    ("ok", '{"issuer":"https://idp/realms/r","jwks_uri":"https://idp/realms/r/certs"}'),
    ("ok_trailing_slash", '{"issuer":"https://idp/realms/r/","jwks_uri":"https://idp:8443/realms/r/certs?x=1",'
                          '"token_endpoint":"https://idp/t","id_token_signing_alg_values_supported":["RS256"]}'),
    ("other_issuer", '{"issuer":"https://evil","jwks_uri":"https://idp/certs"}'),
    ("plain_http", '{"issuer":"https://idp/realms/r","jwks_uri":"http://idp/certs"}'),
    ("ftp", '{"issuer":"https://idp/realms/r","jwks_uri":"ftp://idp/certs"}'),
    ("no_jwks_uri", '{"issuer":"https://idp/realms/r"}'),
    ("number", '{"issuer":"https://idp/realms/r","jwks_uri":7}'),
]:
    write("oidc_discovery", name, doc)

# url: src/net.rs tests
for i, u in enumerate([
    "wss://broker.example:8443/mqtt?x=1",
    "ws://[::1]:80",
    "https://idp/realms/x/protocol/openid-connect/certs",
    "http://idp:8080?realm=r",
    "ws://user:pw@a/",
    "ws://a:99999/",
    "ws:///x",
]):
    write("url", f"url{i}", u)

# path: src/upgrade.rs tests
for i, p in enumerate(["/", "/mqtt", "/a/b.c/..d/...", "/a%20b", "/a/%25", "/a/;b", "/a/..;/b", "/a/%2e%2E/b",
                       "/a%2Fb", "/a/%252e%252e/b", "/a\\b", "/a%00b", "/a%zz"]):
    write("path", f"path{i:02}", p)
