//! The token in the MQTT CONNECT password, through the gateway binary to a real WebSocket upstream. (The real
//! brokers, Mosquitto and RabbitMQ, are exercised by tests/e2e.)

mod common;

use common::mqtt::packet;
use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

/// An MQTT CONNECT with `password` (and a username), for protocol level 4 or 5.
fn connect(level: u8, password: Option<&str>) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', level];
    body.push(if password.is_some() { 0xc2 } else { 0x02 });
    body.extend_from_slice(&[0, 30]);
    if level == 5 {
        body.push(0);
    }
    for f in [Some("client-7"), password.map(|_| "anyone"), password]
        .into_iter()
        .flatten()
    {
        body.extend_from_slice(&(f.len() as u16).to_be_bytes());
        body.extend_from_slice(f.as_bytes());
    }
    packet(0x10, &body)
}

async fn next_binary(ws: &mut Ws) -> Vec<u8> {
    loop {
        match within(ws.next()).await.expect("open").expect("message") {
            Message::Binary(b) => return b.to_vec(),
            Message::Text(t) if t.starts_with("hello from") => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_valid_password_token_opens_the_session_and_the_connect_is_forwarded_unchanged() {
    let env = Env::new().await;
    let gw = env.gateway(&[]).await;
    for level in [4, 5] {
        let token = env.signer.valid("iot-device", 300);
        let mut ws = connect_ws(
            &env.pki,
            &gw,
            "/mqtt",
            &[("Sec-WebSocket-Protocol", "mqtt")],
        )
        .await
        .expect("101 from the gateway");
        let packet = connect(level, Some(&token));
        within(ws.send(Message::binary(packet.clone())))
            .await
            .expect("send CONNECT");
        // The echo upstream returns the CONNECT it received: byte for byte what the client sent.
        assert_eq!(next_binary(&mut ws).await, packet);
        let seen = env.upstream.last();
        assert_eq!(
            seen.header("x-auth-subject"),
            Some("iot-device"),
            "{}",
            seen.raw()
        );
        assert_eq!(seen.header("sec-websocket-protocol"), Some("mqtt"));
        within(ws.send(Message::binary(vec![0xc0, 0x00])))
            .await
            .expect("PINGREQ");
        assert_eq!(next_binary(&mut ws).await, vec![0xc0, 0x00]);
        assert!(!gw.logs().join("\n").contains(&token));
    }
}

#[tokio::test]
async fn a_bad_or_missing_password_gets_connack_not_authorized_and_1008() {
    let env = Env::new().await;
    let gw = env.gateway(&[]).await;
    let expired = env.signer.valid("iot-device", -600);
    for (level, password, connack) in [
        (4, None, vec![0x20, 0x02, 0x00, 0x05]),
        (4, Some("garbage"), vec![0x20, 0x02, 0x00, 0x05]),
        (
            5,
            Some(expired.as_str()),
            vec![0x20, 0x03, 0x00, 0x87, 0x00],
        ),
    ] {
        let mut ws = connect_ws(
            &env.pki,
            &gw,
            "/mqtt",
            &[("Sec-WebSocket-Protocol", "mqtt")],
        )
        .await
        .expect("101");
        within(ws.send(Message::binary(connect(level, password))))
            .await
            .expect("send");
        assert_eq!(next_binary(&mut ws).await, connack, "level {level}");
        let (code, reason) = next_close(&mut ws).await;
        assert_eq!((code, reason.as_str()), (1008, "not authorized"));
    }
    assert_eq!(env.upstream.count(), 0, "nothing reached the upstream");
}

#[tokio::test]
async fn the_password_path_can_be_turned_off() {
    let env = Env::new().await;
    let gw = env.gateway(&["--mqtt-connect-auth", "false"]).await;
    assert_eq!(
        connect_ws(
            &env.pki,
            &gw,
            "/mqtt",
            &[("Sec-WebSocket-Protocol", "mqtt")]
        )
        .await
        .err(),
        Some(401)
    );
    // Without the mqtt subprotocol, a missing token is a plain 401 as well.
    let gw = env.gateway(&[]).await;
    assert_eq!(connect_ws(&env.pki, &gw, "/", &[]).await.err(), Some(401));
}

#[tokio::test]
async fn a_subject_over_its_rate_gets_connack_quota_exceeded_and_1008() {
    let env = Env::new().await;
    let gw = env
        .gateway(&["--rate-limit-per-second", "0.01", "--rate-limit-burst", "1"])
        .await;
    let token = env.signer.valid("iot-device", 300);
    // The first session takes the subject's only token.
    let mut first = connect_ws(
        &env.pki,
        &gw,
        "/mqtt",
        &[("Sec-WebSocket-Protocol", "mqtt")],
    )
    .await
    .expect("101");
    within(first.send(Message::binary(connect(5, Some(&token)))))
        .await
        .expect("send");
    assert_eq!(next_binary(&mut first).await, connect(5, Some(&token)));
    for (level, connack) in [
        (5, vec![0x20, 0x03, 0x00, 0x97, 0x00]),
        (4, vec![0x20, 0x02, 0x00, 0x03]),
    ] {
        let mut ws = connect_ws(
            &env.pki,
            &gw,
            "/mqtt",
            &[("Sec-WebSocket-Protocol", "mqtt")],
        )
        .await
        .expect("101");
        within(ws.send(Message::binary(connect(level, Some(&token)))))
            .await
            .expect("send");
        assert_eq!(next_binary(&mut ws).await, connack, "level {level}");
        let (code, reason) = next_close(&mut ws).await;
        assert_eq!((code, reason.as_str()), (1008, "rate limit exceeded"));
    }
    gw.wait_log(&["\"rejected\"", "subject_rate"]).await;
    assert_eq!(
        env.upstream.count(),
        1,
        "only the first session reached the upstream"
    );
}

/// A CONNECT with `client` id and `username` / `password` fields, for protocol level 4 or 5.
fn connect_as(level: u8, client: &str, username: Option<&str>, password: Option<&str>) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', level];
    body.push(
        0x02 | if username.is_some() { 0x80 } else { 0 }
            | if password.is_some() { 0x40 } else { 0 },
    );
    body.extend_from_slice(&[0, 30]);
    if level == 5 {
        body.push(0);
    }
    for f in [Some(client), username, password].into_iter().flatten() {
        body.extend_from_slice(&(f.len() as u16).to_be_bytes());
        body.extend_from_slice(f.as_bytes());
    }
    packet(0x10, &body)
}

#[tokio::test]
async fn the_username_claim_rewrites_the_connect_in_the_header_and_password_modes() {
    let env = Env::new().await;
    let gw = env
        .gateway(&[
            "--mqtt-username-claim",
            "sub",
            "--mqtt-password-forward",
            "drop",
        ])
        .await;
    let token = env.signer.valid("alice", 300);
    for level in [4, 5] {
        // Header mode: the token on the upgrade, the client claims to be bob.
        let auth = format!("Bearer {token}");
        let mut ws = connect_ws(
            &env.pki,
            &gw,
            "/mqtt",
            &[("Sec-WebSocket-Protocol", "mqtt"), ("Authorization", &auth)],
        )
        .await
        .expect("101");
        // The CONNECT and a PINGREQ in one frame: the PINGREQ follows the rewritten CONNECT unchanged.
        let mut frame = connect_as(level, "alice-1", Some("bob"), Some("secret"));
        frame.extend_from_slice(&[0xc0, 0x00]);
        within(ws.send(Message::binary(frame))).await.expect("send");
        let mut want = connect_as(level, "alice-1", Some("alice"), None);
        want.extend_from_slice(&[0xc0, 0x00]);
        assert_eq!(
            next_binary(&mut ws).await,
            want,
            "header mode, level {level}"
        );
        within(ws.send(Message::binary(vec![0xc0, 0x00])))
            .await
            .expect("PINGREQ");
        assert_eq!(
            next_binary(&mut ws).await,
            vec![0xc0, 0x00],
            "raw after the CONNECT"
        );

        // CONNECT-password mode: the token is the password, and is dropped.
        let mut ws = connect_ws(
            &env.pki,
            &gw,
            "/mqtt",
            &[("Sec-WebSocket-Protocol", "mqtt")],
        )
        .await
        .expect("101");
        within(ws.send(Message::binary(connect_as(
            level,
            "c",
            Some("bob"),
            Some(&token),
        ))))
        .await
        .expect("send");
        assert_eq!(
            next_binary(&mut ws).await,
            connect_as(level, "c", Some("alice"), None),
            "password mode, level {level}"
        );
    }
    assert!(!gw.logs().join("\n").contains(&token));
}

#[tokio::test]
async fn a_client_id_outside_the_policy_gets_connack_2_or_0x85_and_1008() {
    let env = Env::new().await;
    let gw = env
        .gateway(&["--mqtt-client-id-policy", "prefix-subject"])
        .await;
    let token = env.signer.valid("alice", 300);
    let auth = format!("Bearer {token}");
    for (level, connack, header) in [
        (4, vec![0x20, 0x02, 0x00, 0x02], true),
        (5, vec![0x20, 0x03, 0x00, 0x85, 0x00], true),
        (4, vec![0x20, 0x02, 0x00, 0x02], false),
        (5, vec![0x20, 0x03, 0x00, 0x85, 0x00], false),
    ] {
        let mut headers = vec![("Sec-WebSocket-Protocol", "mqtt")];
        let password = if header {
            headers.push(("Authorization", auth.as_str()));
            None
        } else {
            Some(token.as_str())
        };
        let mut ws = connect_ws(&env.pki, &gw, "/mqtt", &headers)
            .await
            .expect("101");
        within(ws.send(Message::binary(connect_as(
            level,
            "victim-device",
            Some("u"),
            password,
        ))))
        .await
        .expect("send");
        assert_eq!(
            next_binary(&mut ws).await,
            connack,
            "level {level} header {header}"
        );
        let (code, reason) = next_close(&mut ws).await;
        assert_eq!(
            (code, reason.as_str()),
            (1008, "client identifier not valid")
        );
    }
    gw.wait_log(&["\"rejected\"", "mqtt_client_id"]).await;
    // In the password mode nothing was dialed; in the header mode the upstream answered the upgrade, but no MQTT
    // byte reached it (the echo would have returned the CONNECT). A client id inside the policy passes.
    let mut ws = connect_ws(
        &env.pki,
        &gw,
        "/mqtt",
        &[("Sec-WebSocket-Protocol", "mqtt"), ("Authorization", &auth)],
    )
    .await
    .expect("101");
    let ok = connect_as(4, "alice-phone", None, None);
    within(ws.send(Message::binary(ok.clone())))
        .await
        .expect("send");
    assert_eq!(
        next_binary(&mut ws).await,
        ok,
        "nothing to rewrite: forwarded as sent"
    );
}

#[tokio::test]
async fn the_handshake_deadline_covers_the_connect_in_the_header_mode() {
    let env = Env::new().await;
    let gw = env
        .gateway(&[
            "--mqtt-username-claim",
            "sub",
            "--handshake-timeout-seconds",
            "1",
        ])
        .await;
    let auth = format!("Bearer {}", env.signer.valid("alice", 300));
    let mut ws = connect_ws(
        &env.pki,
        &gw,
        "/mqtt",
        &[("Sec-WebSocket-Protocol", "mqtt"), ("Authorization", &auth)],
    )
    .await
    .expect("101");
    let started = std::time::Instant::now();
    let (code, reason) = next_close(&mut ws).await;
    assert_eq!((code, reason.as_str()), (1008, "no CONNECT in time"));
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
    // Without the mqtt subprotocol nothing is read: the echo's greeting arrives and the session stays.
    let mut plain = connect_ws(&env.pki, &gw, "/", &[("Authorization", &auth)])
        .await
        .expect("101");
    within(plain.send(Message::binary(vec![1, 2, 3])))
        .await
        .expect("send");
    assert_eq!(next_binary(&mut plain).await, vec![1, 2, 3]);
}

#[tokio::test]
async fn a_route_with_its_own_username_claim_rewrites_even_without_the_mqtt_subprotocol() {
    let env = Env::new().await;
    let dir = TempDir::new("routes");
    let routes = dir.path("routes.yaml");
    std::fs::write(
        &routes,
        format!(
            "- prefix: /devices\n  upstream: {}\n  mqttUsernameClaim: sub\n- prefix: /raw\n  upstream: {}\n",
            env.upstream.url, env.upstream.url
        ),
    )
    .expect("write");
    let gw = env
        .gateway(&["--route-file", routes.to_str().expect("p")])
        .await;
    let auth = format!("Bearer {}", env.signer.valid("alice", 300));
    // No subprotocol offered: a broker that speaks MQTT without it must still see alice.
    let mut ws = connect_ws(&env.pki, &gw, "/devices", &[("Authorization", &auth)])
        .await
        .expect("101");
    within(ws.send(Message::binary(connect_as(4, "c", Some("bob"), None))))
        .await
        .expect("send");
    assert_eq!(
        next_binary(&mut ws).await,
        connect_as(4, "c", Some("alice"), None)
    );
    // Other routes are untouched.
    let mut ws = connect_ws(&env.pki, &gw, "/raw", &[("Authorization", &auth)])
        .await
        .expect("101");
    let bob = connect_as(4, "c", Some("bob"), None);
    within(ws.send(Message::binary(bob.clone())))
        .await
        .expect("send");
    assert_eq!(next_binary(&mut ws).await, bob);
}
