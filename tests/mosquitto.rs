//! The verified identity in the CONNECT against a real Mosquitto (issue 16, rule 1): with the ACL
//! `pattern readwrite devices/%u/#` and `--mqtt-username-claim sub`, a client holding alice's token that sends
//! `username=bob` publishes only where alice may, in the header-token and CONNECT-password modes. Without the
//! setting, the same client reaches bob's topics: that control shows the test can fail.
//!
//! Topic rules at the edge and MQTT 5 re-authentication (issue 16, rules 2 and 3) against a Mosquitto without any
//! ACL of its own: what the gateway drops never reaches a watcher, what it allows does, and the session stays up.
//!
//! Mosquitto (Debian `mosquitto`, `/usr/sbin/mosquitto`) is started per test on loopback ports; a watcher
//! subscribes to `devices/#` on its plain MQTT listener.

mod common;

use std::time::Duration;

use common::mosquitto::Mosquitto;
use common::mqtt::{field, packet, varint};
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::Message;
use ws_gateway::frame::{self, OP_BINARY, OP_CLOSE, OP_CONTINUATION};

async fn mosquitto() -> Mosquitto {
    Mosquitto::with_acl(Some(
        "user watcher\ntopic read devices/#\n\npattern readwrite devices/%u/#\n",
    ))
    .await
}

/// A 3.1.1 CONNECT with a username and, when given, a password.
fn connect(client: &str, user: &str, password: Option<&str>) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4];
    body.push(if password.is_some() { 0xc2 } else { 0x82 });
    body.extend_from_slice(&[0, 30]);
    field(&mut body, client.as_bytes());
    field(&mut body, user.as_bytes());
    if let Some(p) = password {
        field(&mut body, p.as_bytes());
    }
    packet(0x10, &body)
}

/// A QoS 0 PUBLISH.
fn publish(topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    field(&mut body, topic.as_bytes());
    body.extend_from_slice(payload);
    packet(0x30, &body)
}

/// Reads one MQTT packet from a TCP stream: `(first byte, body)`.
async fn read_packet(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let kind = s.read_u8().await.expect("packet");
    let mut len = 0usize;
    for i in 0..4 {
        let b = s.read_u8().await.expect("length");
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0; len];
    s.read_exact(&mut body).await.expect("body");
    (kind, body)
}

/// A client of the broker's plain listener, subscribed to `devices/#`.
async fn watcher(broker: &Mosquitto) -> TcpStream {
    let mut s = within(TcpStream::connect(broker.mqtt))
        .await
        .expect("connect");
    within(s.write_all(&connect("watcher", "watcher", None)))
        .await
        .expect("send");
    assert_eq!(within(read_packet(&mut s)).await, (0x20, vec![0, 0]));
    let mut body = vec![0, 1];
    field(&mut body, b"devices/#");
    body.push(0);
    within(s.write_all(&packet(0x82, &body)))
        .await
        .expect("subscribe");
    assert_eq!(within(read_packet(&mut s)).await, (0x90, vec![0, 1, 0]));
    s
}

/// The topics the watcher receives until `last` arrives.
async fn topics_until(s: &mut TcpStream, last: &str) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let (kind, body) = within(read_packet(s)).await;
        if kind & 0xf0 != 0x30 {
            continue;
        }
        let n = usize::from(u16::from_be_bytes([body[0], body[1]]));
        let topic = String::from_utf8_lossy(&body[2..2 + n]).into_owned();
        let done = topic == last;
        seen.push(topic);
        if done {
            return seen;
        }
    }
}

/// Alice's token, username `bob`, through the gateway (header or password mode): publishes to bob's topic, then to
/// alice's, and returns what the watcher received up to `last`.
async fn alice_as_bob(
    env: &Env,
    gw: &Gateway,
    broker: &Mosquitto,
    header: bool,
    last: &str,
) -> Vec<String> {
    let mut watcher = watcher(broker).await;
    let token = env.signer.valid("alice", 300);
    let auth = format!("Bearer {token}");
    let mut headers = vec![("Sec-WebSocket-Protocol", "mqtt")];
    if header {
        headers.push(("Authorization", auth.as_str()));
    }
    let mut ws = connect_ws(&env.pki, gw, "/mqtt", &headers)
        .await
        .expect("101");
    let password = (!header).then_some(token.as_str());
    within(ws.send(Message::binary(connect("alice-1", "bob", password))))
        .await
        .expect("CONNECT");
    match within(ws.next()).await.expect("open").expect("message") {
        Message::Binary(b) => assert_eq!(b.to_vec(), vec![0x20, 0x02, 0x00, 0x00], "CONNACK"),
        other => panic!("unexpected {other:?}"),
    }
    // Mosquitto handles one client's packets in order: when alice's arrives, bob's would have come first.
    for topic in ["devices/bob/t", "devices/alice/t"] {
        within(ws.send(Message::binary(publish(topic, b"x"))))
            .await
            .expect("PUBLISH");
    }
    let seen = topics_until(&mut watcher, last).await;
    // The session stays up: a PINGREQ gets its PINGRESP.
    within(ws.send(Message::binary(vec![0xc0, 0x00])))
        .await
        .expect("PINGREQ");
    match within(ws.next()).await.expect("open").expect("message") {
        Message::Binary(b) => assert_eq!(b.to_vec(), vec![0xd0, 0x00], "PINGRESP"),
        other => panic!("unexpected {other:?}"),
    }
    seen
}

#[tokio::test]
async fn the_username_claim_confines_a_client_to_its_own_topics_in_mosquitto() {
    let broker = mosquitto().await;
    let env = Env::new().await;
    let url = format!("ws://{}/mqtt", broker.ws);
    let gw = env
        .gateway_upstream(&url, &["--mqtt-username-claim", "sub"])
        .await;
    for header in [true, false] {
        assert_eq!(
            alice_as_bob(&env, &gw, &broker, header, "devices/alice/t").await,
            vec!["devices/alice/t"],
            "header mode {header}: bob's topic must not be delivered"
        );
    }
    // The control: without the setting, the username the client sent is what Mosquitto authorizes, so alice's
    // token reaches bob's topic.
    let open = env.gateway_upstream(&url, &[]).await;
    assert_eq!(
        alice_as_bob(&env, &open, &broker, true, "devices/bob/t").await,
        vec!["devices/bob/t"]
    );
}

/// An MQTT client over a raw TLS WebSocket: frames written by hand (so a test can split them as it likes), MQTT
/// packets read across frames.
struct Client {
    s: TlsStream<TcpStream>,
    frames: Vec<u8>,
    mqtt: Vec<u8>,
}

/// What the gateway sent after the last packet read: a Close with its code.
#[derive(Debug, PartialEq, Eq)]
enum Read {
    Packet(u8, Vec<u8>),
    Close(u16),
}

impl Client {
    /// Upgrades `/mqtt` with the token in the Authorization header, offering `mqtt`.
    async fn open(env: &Env, gw: &Gateway, token: &str) -> Client {
        let (s, head, rest) = raw_upgrade(
            &env.pki,
            gw.addr,
            "/mqtt",
            &format!("Authorization: Bearer {token}\r\nSec-WebSocket-Protocol: mqtt\r\n"),
        )
        .await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        Client {
            s,
            frames: rest,
            mqtt: Vec::new(),
        }
    }

    /// Sends `bytes` as one masked binary frame.
    async fn send(&mut self, bytes: &[u8]) {
        let f = frame::encode(OP_BINARY, bytes, Some([7, 1, 9, 3]));
        within(self.s.write_all(&f)).await.expect("send");
    }

    /// Sends `bytes` one byte per frame: one fragmented message, a binary frame then continuations, each written
    /// on its own.
    async fn send_bytewise(&mut self, bytes: &[u8]) {
        for (i, b) in bytes.iter().enumerate() {
            let mut f = frame::encode(
                if i == 0 { OP_BINARY } else { OP_CONTINUATION },
                &[*b],
                Some([i as u8, 2, 3, 4]),
            );
            if i + 1 < bytes.len() {
                f[0] &= 0x7f;
            }
            within(self.s.write_all(&f)).await.expect("send");
            within(self.s.flush()).await.expect("flush");
        }
    }

    /// The next MQTT packet, or the Close that came instead.
    async fn read(&mut self) -> Read {
        within(async {
            loop {
                if let Some(p) = take_packet(&mut self.mqtt) {
                    return Read::Packet(p.0, p.1);
                }
                if let Some((f, used)) = frame::decode(&self.frames, 1 << 20).expect("frame") {
                    self.frames.drain(..used);
                    match f.opcode {
                        OP_CLOSE => {
                            return Read::Close(u16::from_be_bytes([f.payload[0], f.payload[1]]))
                        }
                        OP_BINARY | OP_CONTINUATION => self.mqtt.extend_from_slice(&f.payload),
                        _ => {}
                    }
                    continue;
                }
                let mut b = [0u8; 4096];
                let n = self.s.read(&mut b).await.expect("read");
                assert!(n > 0, "EOF before a packet or a Close");
                self.frames.extend_from_slice(&b[..n]);
            }
        })
        .await
    }

    /// The next packet, which must be one.
    async fn packet(&mut self) -> (u8, Vec<u8>) {
        match self.read().await {
            Read::Packet(k, b) => (k, b),
            Read::Close(c) => panic!("Close {c} instead of a packet"),
        }
    }

    /// CONNECT (level 4, or 5 with the re-authentication method), then the broker's CONNACK must accept.
    async fn mqtt_connect(&mut self, level: u8, id: &str) {
        self.send(&connect_level(level, id, level == 5)).await;
        let (kind, body) = self.packet().await;
        assert_eq!(kind, 0x20, "CONNACK");
        assert_eq!(body[1], 0, "accepted: {body:?}");
    }

    /// PINGREQ answered by PINGRESP: the session is up.
    async fn ping(&mut self) {
        self.send(&[0xc0, 0x00]).await;
        assert_eq!(self.packet().await, (0xd0, vec![]));
    }
}

/// One whole MQTT packet from the front of `buf`.
fn take_packet(buf: &mut Vec<u8>) -> Option<(u8, Vec<u8>)> {
    let mut len = 0usize;
    for i in 0..4 {
        let b = *buf.get(1 + i)?;
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            let start = 2 + i;
            if buf.len() < start + len {
                return None;
            }
            let body = buf[start..start + len].to_vec();
            let kind = buf[0];
            buf.drain(..start + len);
            return Some((kind, body));
        }
    }
    panic!("bad remaining length");
}

/// A CONNECT for level 4 or 5; with `reauth`, MQTT 5 declares the Authentication Method `jwt`.
fn connect_level(level: u8, id: &str, reauth: bool) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', level, 0x02, 0, 30];
    if level == 5 {
        let mut props = Vec::new();
        if reauth {
            props.push(0x15);
            field(&mut props, b"jwt");
        }
        body.push(props.len() as u8);
        body.extend_from_slice(&props);
    }
    field(&mut body, id.as_bytes());
    packet(0x10, &body)
}

/// A PUBLISH at `qos` with packet id `id` (ignored for QoS 0), for `level`.
fn publish_qos(level: u8, qos: u8, topic: &str, id: u16) -> Vec<u8> {
    let mut body = Vec::new();
    field(&mut body, topic.as_bytes());
    if qos > 0 {
        body.extend_from_slice(&id.to_be_bytes());
    }
    if level == 5 {
        body.push(0);
    }
    body.extend_from_slice(b"x");
    packet(0x30 | (qos << 1), &body)
}

/// A SUBSCRIBE (QoS 0 each) for `level`.
fn subscribe(level: u8, id: u16, filters: &[&str]) -> Vec<u8> {
    let mut body = id.to_be_bytes().to_vec();
    if level == 5 {
        body.push(0);
    }
    for f in filters {
        field(&mut body, f.as_bytes());
        body.push(0);
    }
    packet(0x82, &body)
}

/// The reason codes of a SUBACK body (after the MQTT 5 properties).
fn suback_codes(level: u8, body: &[u8]) -> (u16, Vec<u8>) {
    let id = u16::from_be_bytes([body[0], body[1]]);
    let mut at = 2;
    if level == 5 {
        at += 1 + usize::from(body[2]);
    }
    (id, body[at..].to_vec())
}

const PUBLISH_ACL: [&str; 4] = [
    "--mqtt-publish-acl",
    "devices/{sub}/#",
    "--jwt-leeway-seconds",
    "0",
];

#[tokio::test]
async fn the_publish_rules_drop_other_topics_and_the_session_stays_up() {
    let broker = Mosquitto::start().await;
    let env = Env::new().await;
    let url = format!("ws://{}/mqtt", broker.ws);
    let gw = env.gateway_upstream(&url, &PUBLISH_ACL).await;
    for level in [4u8, 5] {
        let mut watcher = watcher(&broker).await;
        let mut c = Client::open(&env, &gw, &env.signer.valid("alice", 300)).await;
        c.mqtt_connect(level, "alice-1").await;
        c.send(&publish_qos(level, 0, "devices/bob/t", 0)).await;
        c.send(&publish_qos(level, 0, "devices/alice/t", 0)).await;
        assert_eq!(
            topics_until(&mut watcher, "devices/alice/t").await,
            ["devices/alice/t"],
            "level {level}: bob's topic must not be delivered"
        );
        // QoS 1: the gateway acknowledges the dropped PUBLISH itself (0x87 in MQTT 5); an allowed one gets the
        // broker's PUBACK.
        c.send(&publish_qos(level, 1, "devices/bob/q", 5)).await;
        let want = if level == 5 {
            vec![0, 5, 0x87]
        } else {
            vec![0, 5]
        };
        assert_eq!(c.packet().await, (0x40, want), "level {level}");
        c.send(&publish_qos(level, 1, "devices/alice/q", 6)).await;
        let (kind, body) = c.packet().await;
        assert_eq!((kind, &body[..2]), (0x40, &[0u8, 6][..]));
        // QoS 2: PUBREC from the gateway; in 3.1.1 the client goes on with PUBREL, answered with PUBCOMP.
        c.send(&publish_qos(level, 2, "devices/bob/q2", 7)).await;
        if level == 5 {
            assert_eq!(c.packet().await, (0x50, vec![0, 7, 0x87]));
        } else {
            assert_eq!(c.packet().await, (0x50, vec![0, 7]));
            c.send(&[0x62, 0x02, 0x00, 0x07]).await;
            assert_eq!(c.packet().await, (0x70, vec![0, 7]));
        }
        c.ping().await;
        c.send(&publish_qos(level, 0, "devices/alice/end", 0)).await;
        let seen = topics_until(&mut watcher, "devices/alice/end").await;
        assert!(
            seen.iter().all(|t| t.starts_with("devices/alice/")),
            "level {level}: {seen:?}"
        );
    }
    let (_, metrics) = gw.admin_get("/metrics").await;
    assert!(
        metrics.contains("ws_mqtt_acl_denied_total{kind=\"publish\"} 6"),
        "{metrics}"
    );
    // The control: without the rules, this broker delivers bob's topic to alice's token.
    let open = env.gateway_upstream(&url, &[]).await;
    let mut watcher = watcher(&broker).await;
    let mut c = Client::open(&env, &open, &env.signer.valid("alice", 300)).await;
    c.mqtt_connect(4, "alice-2").await;
    c.send(&publish_qos(4, 0, "devices/bob/t", 0)).await;
    assert_eq!(
        topics_until(&mut watcher, "devices/bob/t").await,
        ["devices/bob/t"]
    );
}

#[tokio::test]
async fn the_subscribe_rules_fail_the_denied_entries_and_keep_the_allowed_ones() {
    let broker = Mosquitto::start().await;
    let env = Env::new().await;
    let url = format!("ws://{}/mqtt", broker.ws);
    let gw = env
        .gateway_upstream(&url, &["--mqtt-subscribe-acl", "devices/{sub}/#"])
        .await;
    for level in [4u8, 5] {
        let fail = if level == 5 { 0x87 } else { 0x80 };
        let mut c = Client::open(&env, &gw, &env.signer.valid("alice", 300)).await;
        c.mqtt_connect(level, "alice-s").await;
        c.send(&subscribe(level, 3, &["devices/alice/#", "devices/#"]))
            .await;
        let (kind, body) = c.packet().await;
        assert_eq!(kind, 0x90);
        assert_eq!(
            suback_codes(level, &body),
            (3, vec![0, fail]),
            "level {level}"
        );
        // Every filter denied: the gateway answers alone.
        c.send(&subscribe(level, 4, &["#", "devices/+/t"])).await;
        let (kind, body) = c.packet().await;
        assert_eq!(kind, 0x90);
        assert_eq!(suback_codes(level, &body), (4, vec![fail, fail]));
        // Messages on the allowed filter arrive; bob's, published first, do not.
        let mut other = watcher(&broker).await;
        for topic in ["devices/bob/x", "devices/alice/x"] {
            within(other.write_all(&publish(topic, b"m")))
                .await
                .expect("publish");
        }
        let (kind, body) = c.packet().await;
        assert_eq!(kind & 0xf0, 0x30);
        assert_eq!(&body[2..2 + 15], b"devices/alice/x", "level {level}");
    }
}

#[tokio::test]
async fn the_disconnect_action_ends_the_session_with_0x87_and_1008() {
    let broker = Mosquitto::start().await;
    let env = Env::new().await;
    let url = format!("ws://{}/mqtt", broker.ws);
    let mut args = PUBLISH_ACL.to_vec();
    args.extend(["--mqtt-acl-deny-action", "disconnect"]);
    let gw = env.gateway_upstream(&url, &args).await;
    for level in [4u8, 5] {
        let mut c = Client::open(&env, &gw, &env.signer.valid("alice", 300)).await;
        c.mqtt_connect(level, "alice-d").await;
        c.send(&publish_qos(level, 0, "devices/alice/t", 0)).await;
        c.ping().await;
        c.send(&publish_qos(level, 1, "devices/bob/t", 1)).await;
        if level == 5 {
            assert_eq!(c.read().await, Read::Packet(0xe0, vec![0x87, 0]));
        }
        assert_eq!(c.read().await, Read::Close(1008), "level {level}");
    }
}

#[tokio::test]
async fn hostile_packets_and_claims_do_not_get_past_the_rules() {
    let broker = Mosquitto::start().await;
    let env = Env::new().await;
    let url = format!("ws://{}/mqtt", broker.ws);
    let gw = env
        .gateway_upstream(&url, &["--mqtt-publish-acl", "devices/{claim:tenant}/#"])
        .await;
    let token = |tenant: &str| {
        let mut c = claims("alice", 300);
        c["tenant"] = json!(tenant);
        env.signer.token(&c)
    };
    // A claim holding a wildcard or a separator matches nothing, and cannot widen the filter.
    let mut watcher = watcher(&broker).await;
    for tenant in ["+", "#", "acme/x", ""] {
        let mut c = Client::open(&env, &gw, &token(tenant)).await;
        c.mqtt_connect(4, "t").await;
        for topic in ["devices/x/t", "devices/acme/x/t", "devices/+/t"] {
            c.send(&publish_qos(4, 0, topic, 0)).await;
        }
        c.ping().await;
    }
    // Split one byte per frame, a denied and an allowed PUBLISH: only the allowed one arrives.
    let mut c = Client::open(&env, &gw, &token("acme")).await;
    c.mqtt_connect(4, "acme-1").await;
    let mut both = publish_qos(4, 0, "devices/bob/t", 0);
    both.extend_from_slice(&publish_qos(4, 0, "devices/acme/t", 0));
    c.send_bytewise(&both).await;
    assert_eq!(
        topics_until(&mut watcher, "devices/acme/t").await,
        ["devices/acme/t"]
    );
    c.ping().await;
    // Oversized: a PUBLISH announcing 300 KiB gets Close 1009 before its body arrives.
    let mut big = vec![0x30];
    varint(&mut big, 300 * 1024);
    big.extend_from_slice(&[0, 1, b'a']);
    c.send(&big).await;
    assert_eq!(c.read().await, Read::Close(1009));
    // Malformed: QoS 3, and a topic length running past the packet: Close 1002.
    for bad in [vec![0x36, 0x03, 0, 1, b'a'], vec![0x30, 0x03, 0, 9, b'a']] {
        let mut c = Client::open(&env, &gw, &token("acme")).await;
        c.mqtt_connect(4, "acme-2").await;
        c.send(&bad).await;
        assert_eq!(c.read().await, Read::Close(1002), "{bad:?}");
    }
}

/// An MQTT 5 AUTH, reason 0x19, method `jwt`, with `token` as Authentication Data.
fn reauth(token: &str) -> Vec<u8> {
    let mut props = vec![0x15];
    field(&mut props, b"jwt");
    props.push(0x16);
    field(&mut props, token.as_bytes());
    let mut body = vec![0x19];
    varint(&mut body, props.len());
    body.extend_from_slice(&props);
    packet(0xf0, &body)
}

#[tokio::test]
async fn mqtt5_reauthentication_extends_the_session_and_a_bad_refresh_ends_it() {
    let broker = Mosquitto::start().await;
    let env = Env::new().await;
    let url = format!("ws://{}/mqtt", broker.ws);
    let gw = env
        .gateway_upstream(&url, &["--jwt-leeway-seconds", "0"])
        .await;
    let started = std::time::Instant::now();
    // A: the first token expires in 3 s; a refresh carries the session past that.
    let mut a = Client::open(&env, &gw, &env.signer.valid("alice", 3)).await;
    a.mqtt_connect(5, "alice-a").await;
    // B: refreshed with another subject's token: DISCONNECT 0x87, Close 1008.
    let mut b = Client::open(&env, &gw, &env.signer.valid("alice", 300)).await;
    b.mqtt_connect(5, "alice-b").await;
    // C: never refreshed: Close 1008 at the first token's expiry.
    let mut c = Client::open(&env, &gw, &env.signer.valid("alice", 3)).await;
    c.mqtt_connect(5, "alice-c").await;

    a.send(&reauth(&env.signer.valid("alice", 300))).await;
    let mut ok = vec![0x00, 0x06, 0x15];
    field(&mut ok, b"jwt");
    assert_eq!(a.packet().await, (0xf0, ok));
    b.send(&reauth(&env.signer.valid("bob", 300))).await;
    assert_eq!(b.read().await, Read::Packet(0xe0, vec![0x87, 0]));
    assert_eq!(b.read().await, Read::Close(1008));

    assert_eq!(
        c.read().await,
        Read::Close(1008),
        "no refresh: token expired"
    );
    tokio::time::sleep(Duration::from_millis(4500).saturating_sub(started.elapsed())).await;
    assert!(started.elapsed() > Duration::from_secs(4));
    a.ping().await;
    a.send(&publish_qos(5, 1, "devices/alice/t", 9)).await;
    let (kind, body) = a.packet().await;
    assert_eq!((kind, &body[..2]), (0x40, &[0u8, 9][..]));
    let line = gw.wait_log(&["token_refreshed", "alice"]).await;
    assert!(!line.contains("eyJ"), "no token in the log: {line}");
    gw.wait_log(&["token_refresh_refused"]).await;
    let (_, metrics) = gw.admin_get("/metrics").await;
    for want in [
        "ws_mqtt_reauth_total{result=\"ok\"} 1",
        "ws_mqtt_reauth_total{result=\"refused\"} 1",
    ] {
        assert!(metrics.contains(want), "{want}: {metrics}");
    }
}

/// `POST /admin/revoke` with `body`, authenticated with `secret`: the response body.
async fn admin_revoke(gw: &Gateway, secret: &str, body: &str) -> String {
    within(async {
        let mut tcp = TcpStream::connect(gw.admin).await.expect("connect");
        let req = format!(
            "POST /admin/revoke HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {secret}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        tcp.write_all(req.as_bytes()).await.expect("write");
        let mut out = Vec::new();
        tcp.read_to_end(&mut out).await.expect("read");
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
}

#[tokio::test]
async fn an_inspected_session_is_revoked_by_its_refreshed_token_and_drained() {
    let broker = Mosquitto::start().await;
    let env = Env::new().await;
    let dir = TempDir::new("admin");
    let secret_file = dir.path("admin-token");
    std::fs::write(&secret_file, "an-admin-secret-for-tests\n").expect("write");
    let url = format!("ws://{}/mqtt", broker.ws);
    let gw = env
        .gateway_upstream(
            &url,
            &[
                "--admin-token-file",
                secret_file.to_str().expect("path"),
                "--mqtt-publish-acl",
                "devices/{sub}/#",
                "--graceful-drain-timeout-seconds",
                "2",
                "--drain-spread-seconds",
                "1",
            ],
        )
        .await;
    let token = |jti: &str| {
        let mut c = claims("alice", 300);
        c["jti"] = json!(jti);
        env.signer.token(&c)
    };
    let mut a = Client::open(&env, &gw, &token("a-old")).await;
    a.mqtt_connect(5, "alice-a").await;
    a.send(&reauth(&token("a-new"))).await;
    assert_eq!(a.packet().await.0, 0xf0);
    // The registry follows the refresh: the old token id no longer names the session, the new one does.
    let out = admin_revoke(&gw, "an-admin-secret-for-tests", r#"{"jti":"a-old"}"#).await;
    assert!(out.contains("\"sessions_closed\":0"), "{out}");
    a.ping().await;
    let out = admin_revoke(&gw, "an-admin-secret-for-tests", r#"{"jti":"a-new"}"#).await;
    assert!(out.contains("\"sessions_closed\":1"), "{out}");
    assert_eq!(a.read().await, Read::Close(1008));
    // Drain reaches inspected sessions too: Close 1001.
    let mut b = Client::open(&env, &gw, &token("b")).await;
    b.mqtt_connect(4, "alice-b").await;
    b.ping().await;
    gw.signal("TERM");
    assert_eq!(b.read().await, Read::Close(1001));
}
