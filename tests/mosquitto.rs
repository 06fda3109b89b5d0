//! The verified identity in the CONNECT against a real Mosquitto (issue 16, rule 1): with the ACL
//! `pattern readwrite devices/%u/#` and `--mqtt-username-claim sub`, a client holding alice's token that sends
//! `username=bob` publishes only where alice may, in the header-token and CONNECT-password modes. Without the
//! setting, the same client reaches bob's topics: that control shows the test can fail.
//!
//! Mosquitto (Debian `mosquitto`, `/usr/sbin/mosquitto`) is started per test on loopback ports; a watcher
//! subscribes to `devices/#` on its plain MQTT listener.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const MOSQUITTO: &str = "/usr/sbin/mosquitto";

struct Mosquitto {
    child: Child,
    mqtt: u16,
    ws: u16,
    _dir: TempDir,
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

async fn mosquitto() -> Mosquitto {
    assert!(
        std::path::Path::new(MOSQUITTO).exists(),
        "{MOSQUITTO} is missing: apt-get install mosquitto"
    );
    let dir = TempDir::new("mosquitto");
    let (mqtt, ws) = (free_port(), free_port());
    let acl = dir.path("acl");
    std::fs::write(
        &acl,
        "user watcher\ntopic read devices/#\n\npattern readwrite devices/%u/#\n",
    )
    .expect("acl");
    let conf = dir.path("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "per_listener_settings false\nallow_anonymous true\nacl_file {}\npersistence false\n\
             listener {mqtt} 127.0.0.1\nprotocol mqtt\n\
             listener {ws} 127.0.0.1\nprotocol websockets\nsocket_domain ipv4\n",
            acl.display()
        ),
    )
    .expect("conf");
    // Mosquitto drops root to the `mosquitto` user, which must read its files.
    use std::os::unix::fs::PermissionsExt;
    for p in [&dir.0, &acl, &conf] {
        let mode = if p.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
    let child = Command::new(MOSQUITTO)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start mosquitto");
    let m = Mosquitto {
        child,
        mqtt,
        ws,
        _dir: dir,
    };
    for _ in 0..100 {
        if TcpStream::connect(("127.0.0.1", m.ws)).await.is_ok()
            && TcpStream::connect(("127.0.0.1", m.mqtt)).await.is_ok()
        {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("mosquitto did not start");
}

fn packet(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![kind];
    let mut len = body.len();
    loop {
        let b = (len % 128) as u8;
        len /= 128;
        out.push(if len > 0 { b | 0x80 } else { b });
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

fn field(b: &mut Vec<u8>, v: &[u8]) {
    b.extend_from_slice(&(v.len() as u16).to_be_bytes());
    b.extend_from_slice(v);
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
    let mut s = within(TcpStream::connect(("127.0.0.1", broker.mqtt)))
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
    let url = format!("ws://127.0.0.1:{}/mqtt", broker.ws);
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
