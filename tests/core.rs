//! The core edge over real sockets: TLS client → gateway binary → real WebSocket upstream.

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn messages_intact_both_ways() {
    let env = Env::new().await;
    let gw = env.gateway(&[]).await;
    let mut ws = ws_ok(&env, &gw, "/").await;

    let big: Vec<u8> = (0..(1 << 20)).map(|i| (i % 251) as u8).collect();
    within(ws.send(Message::binary(big.clone())))
        .await
        .expect("send 1 MiB");
    match within(ws.next()).await.expect("open").expect("msg") {
        Message::Binary(b) => assert!(b[..] == big[..], "1 MiB message altered"),
        other => panic!("unexpected {other:?}"),
    }
    for i in 0..1000 {
        within(ws.feed(Message::text(format!("msg-{i}"))))
            .await
            .expect("feed");
    }
    within(ws.flush()).await.expect("flush");
    for i in 0..1000 {
        assert_eq!(next_text(&mut ws).await, format!("msg-{i}"));
    }
    within(ws.close(None)).await.expect("close");
}

#[tokio::test]
async fn bytes_pipelined_after_the_head_reach_the_upstream() {
    let env = Env::new().await;
    let gw = env.gateway(&[]).await;
    let token = env.token();
    // The head and a masked text frame "ping-early" in one write.
    let mut bytes = upgrade("/", &format!("Authorization: Bearer {token}\r\n")).into_bytes();
    bytes.extend_from_slice(&ws_gateway::frame::encode(
        0x1,
        b"ping-early",
        Some([1, 2, 3, 4]),
    ));
    let mut s = tls(&env.pki, gw.addr).await;
    within(s.write_all(&bytes)).await.expect("write");
    let got = within(async {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains("ping-early") {
            let n = s.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&got).into_owned()
    })
    .await;
    assert!(got.starts_with("HTTP/1.1 101 "), "{got}");
    assert!(
        got.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "accept key of the client's key: {got}"
    );
}

#[tokio::test]
async fn each_bad_input_gets_its_status_and_others_keep_working() {
    let env = Env::new().await;
    let gw = env.gateway(&["--max-request-head-bytes", "4096"]).await;
    let token = env.token();
    let auth = format!("Authorization: Bearer {token}\r\n");
    let good = upgrade("/", &auth);
    let cases: Vec<(String, u16, &str)> = vec![
        ("NOT HTTP AT ALL\r\n\r\n".into(), 400, "bad request"),
        (good.replacen("GET", "POST", 1), 405, "Allow: GET"),
        (
            good.replace("Upgrade: websocket\r\n", ""),
            426,
            "Sec-WebSocket-Version: 13",
        ),
        (
            good.replace("Version: 13", "Version: 8"),
            400,
            "Sec-WebSocket-Version: 13",
        ),
        (
            good.replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""),
            400,
            "Sec-WebSocket-Key",
        ),
        (
            good.replace("dGhlIHNhbXBsZSBub25jZQ==", "bm90LTE2LWJ5dGVz"),
            400,
            "Sec-WebSocket-Key",
        ),
        (
            upgrade("/", &format!("{auth}X-Big: {}\r\n", "a".repeat(5000))),
            431,
            "too large",
        ),
        (upgrade("/a/../b", &auth), 400, "dot segments"),
        (
            "GET / HTTP/1.1\r\nHost: x\r\n\r\n".into(),
            426,
            "Upgrade: websocket",
        ),
    ];
    for (req, status, needle) in cases {
        let resp = raw(&env.pki, gw.addr, req.as_bytes()).await;
        assert_eq!(status_of(&resp), status, "request {req:?} got {resp}");
        assert!(resp.contains(needle), "{resp}");
        let connection: Vec<&str> = resp
            .lines()
            .filter(|l| l.to_ascii_lowercase().starts_with("connection:"))
            .collect();
        assert_eq!(connection.len(), 1, "{resp}");
        assert!(connection[0].ends_with("close"), "{resp}");
    }
    // Many headers.
    let many: String = (0..100).map(|i| format!("X-H{i}: v\r\n")).collect();
    assert_eq!(
        status_of(&raw(&env.pki, gw.addr, upgrade("/", &many).as_bytes()).await),
        431
    );
    // Still serving.
    let mut ws = ws_ok(&env, &gw, "/").await;
    within(ws.send(Message::text("still here")))
        .await
        .expect("send");
    assert_eq!(next_text(&mut ws).await, "still here");
    // Every refusal logged once with its status, no token.
    let logs = gw.logs();
    assert!(
        logs.iter().any(|l| l.contains("\"status\":431")),
        "{logs:?}"
    );
    assert!(!logs.iter().any(|l| l.contains(&token)));
}

#[tokio::test]
async fn no_route_is_404_and_healthz_answers_on_the_main_listener() {
    let env = Env::new().await;
    let dir = TempDir::new("routes");
    let routes = dir.path("routes.yaml");
    std::fs::write(
        &routes,
        format!("- prefix: /only\n  upstream: {}\n", env.upstream.url),
    )
    .expect("write");
    let mut args: Vec<String> = env.args();
    // No fallback: drop --upstream-ws-url.
    let i = args
        .iter()
        .position(|a| a == "--upstream-ws-url")
        .expect("flag");
    args.drain(i..i + 2);
    args.extend([
        "--route-file".to_owned(),
        routes.to_str().expect("p").to_owned(),
    ]);
    let gw = Gateway::spawn(&args, &[]);
    gw.wait_ready().await;
    let token = env.token();
    let resp = raw(
        &env.pki,
        gw.addr,
        upgrade("/elsewhere", &format!("Authorization: Bearer {token}\r\n")).as_bytes(),
    )
    .await;
    assert_eq!(status_of(&resp), 404, "{resp}");
    let resp = raw(
        &env.pki,
        gw.addr,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&resp), 200, "{resp}");
    ws_ok(&env, &gw, "/only/x").await;
}

#[tokio::test]
async fn routes_pick_the_first_matching_prefix_and_apply_their_options() {
    let env = Env::new().await;
    let a = Upstream::start("a", None).await;
    let b = Upstream::start("b", None).await;
    let dir = TempDir::new("routes");
    let routes = dir.path("routes.yaml");
    std::fs::write(
        &routes,
        format!(
            "- prefix: /mqtt\n  upstream: {}/ws\n  copySubProtocol: false\n  preserveQuery: false\n\
- prefix: /m\n  upstream: {}\n  copySubProtocol: true\n  preserveQuery: true\n",
            a.url, b.url
        ),
    )
    .expect("write");
    let gw = env
        .gateway(&["--route-file", routes.to_str().expect("p")])
        .await;
    let token = env.token();
    let auth = format!("Bearer {token}");

    let head = raw_head(
        &env.pki,
        gw.addr,
        &upgrade(
            "/mqtt/x?room=1&access_token=zzz",
            &format!("Authorization: {auth}\r\nSec-WebSocket-Protocol: mqtt\r\n"),
        ),
    )
    .await;
    assert!(
        head.starts_with("HTTP/1.1 101")
            && !head.to_ascii_lowercase().contains("sec-websocket-protocol"),
        "{head}"
    );
    let seen = a.last();
    assert_eq!(
        seen.target,
        "/ws",
        "fixed upstream path, query dropped: {}",
        seen.raw()
    );
    assert!(
        seen.header("sec-websocket-protocol").is_none(),
        "{}",
        seen.raw()
    );

    let mut ws2 = connect_ws(
        &env.pki,
        &gw,
        "/m/feed?room=1&access_token=zzz",
        &[("Authorization", &auth), ("Sec-WebSocket-Protocol", "mqtt")],
    )
    .await
    .expect("second route");
    assert_eq!(next_text(&mut ws2).await, "hello from b");
    let seen = b.last();
    assert_eq!(
        seen.target,
        "/m/feed?room=1",
        "client path kept, token param removed: {}",
        seen.raw()
    );
    assert_eq!(seen.header("sec-websocket-protocol"), Some("mqtt"));

    let mut ws3 = ws_ok(&env, &gw, "/other").await;
    within(ws3.send(Message::text("fallback")))
        .await
        .expect("send");
    assert_eq!(next_text(&mut ws3).await, "fallback");
    assert_eq!(env.upstream.last().target, "/other");
}

#[tokio::test]
async fn wss_upstream_with_a_private_ca() {
    let env = Env::new().await;
    let secure = Upstream::start("secure", Some(&env.pki)).await;
    let ca = env.pki.ca_pem.to_str().expect("p");
    let gw = env
        .gateway_upstream(&secure.url, &["--upstream-ca-file", ca])
        .await;
    let mut conn = connect_bearer(&env.pki, &gw, "/", &env.token())
        .await
        .expect("upgrade");
    assert_eq!(next_text(&mut conn).await, "hello from secure");
    within(conn.send(Message::text("over wss")))
        .await
        .expect("send");
    assert_eq!(next_text(&mut conn).await, "over wss");

    // Without the CA the upstream's certificate is not trusted: 502.
    let gw = env.gateway_upstream(&secure.url, &[]).await;
    assert_eq!(
        connect_bearer(&env.pki, &gw, "/", &env.token()).await.err(),
        Some(502)
    );
}

#[tokio::test]
async fn upstream_that_refuses_or_is_down_gives_502() {
    let env = Env::new().await;
    // A port with nothing listening.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    // An HTTP server that is not a WebSocket server.
    let http = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let http_port = http.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = http.accept().await {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await;
        }
    });
    for url in [
        format!("ws://127.0.0.1:{port}/"),
        format!("ws://127.0.0.1:{http_port}/"),
    ] {
        let gw = env.gateway_upstream(&url, &[]).await;
        assert_eq!(
            connect_bearer(&env.pki, &gw, "/", &env.token()).await.err(),
            Some(502)
        );
    }
}

#[tokio::test]
async fn slow_head_is_cut_at_the_handshake_timeout() {
    let env = Env::new().await;
    let gw = env.gateway(&["--handshake-timeout-seconds", "1"]).await;
    let mut s = tls(&env.pki, gw.addr).await;
    within(s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n"))
        .await
        .expect("partial head");
    let started = std::time::Instant::now();
    let mut out = Vec::new();
    let _ = within(s.read_to_end(&mut out)).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    assert_eq!(status_of(&String::from_utf8_lossy(&out)), 408);
    // A silent TCP client (no TLS hello) is cut too.
    let mut tcp = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    let mut buf = [0u8; 16];
    let n = within(tcp.read(&mut buf)).await.unwrap_or(0);
    assert_eq!(n, 0);
}

#[tokio::test]
async fn idle_sessions_are_closed_with_1001() {
    let env = Env::new().await;
    let gw = env.gateway(&["--ws-idle-timeout-seconds", "1"]).await;
    let mut ws = ws_ok(&env, &gw, "/").await;
    let started = std::time::Instant::now();
    let (code, reason) = next_close(&mut ws).await;
    assert_eq!((code, reason.as_str()), (1001, "idle timeout"));
    assert!(started.elapsed() < Duration::from_secs(4));
    // Activity keeps a session open past the idle timeout.
    let mut ws = ws_ok(&env, &gw, "/").await;
    for i in 0..6 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        within(ws.send(Message::text(format!("tick {i}"))))
            .await
            .expect("send");
        assert_eq!(next_text(&mut ws).await, format!("tick {i}"));
    }
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_at_the_write_timeout() {
    let env = Env::new().await;
    // An upstream that floods the client.
    let flood = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = flood.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((s, _)) = flood.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
                    return;
                };
                let chunk = vec![7u8; 64 * 1024];
                while ws.send(Message::binary(chunk.clone())).await.is_ok() {}
            });
        }
    });
    let gw = env
        .gateway_upstream(
            &format!("ws://127.0.0.1:{port}/"),
            &["--ws-write-timeout-seconds", "1"],
        )
        .await;
    let _ws = connect_bearer(&env.pki, &gw, "/", &env.token())
        .await
        .expect("upgrade");
    // The client never reads; the gateway must give up on it.
    let line = gw
        .wait_log(&["\"event\":\"session_end\"", "write_timeout"])
        .await;
    assert!(line.contains("\"bytes_upstream_to_client\""), "{line}");
}

#[tokio::test]
async fn plain_mode_serves_behind_an_ingress() {
    let env = Env::new().await;
    let args: Vec<String> = [
        "--jwks-url",
        &env.idp.url,
        "--jwt-expected-issuer",
        ISSUER,
        "--jwt-expected-audience",
        AUDIENCE,
        "--upstream-ws-url",
        &env.upstream.url,
        "--trusted-proxies",
        "127.0.0.0/8",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let gw = Gateway::spawn(&args, &[]);
    gw.wait_ready().await;
    let url = format!("ws://127.0.0.1:{}/", gw.addr.port());
    let mut req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
            .expect("req");
    req.headers_mut().insert(
        "Authorization",
        format!("Bearer {}", env.token()).parse().expect("hv"),
    );
    req.headers_mut()
        .insert("X-Forwarded-Proto", "https".parse().expect("hv"));
    let (mut ws, _) = within(tokio_tungstenite::connect_async(req))
        .await
        .expect("plain upgrade");
    within(ws.send(Message::text("plain"))).await.expect("send");
    loop {
        if let Message::Text(t) = within(ws.next()).await.expect("open").expect("msg") {
            if t.as_str() == "plain" {
                break;
            }
        }
    }
    let seen = env.upstream.last();
    assert_eq!(
        seen.header("x-forwarded-proto"),
        Some("https"),
        "{}",
        seen.raw()
    );
    assert_eq!(seen.header("x-real-ip"), Some("127.0.0.1"));
}

#[tokio::test]
async fn an_upstream_half_close_without_a_close_frame_reaches_the_client_as_close_1014() {
    let env = Env::new().await;
    // An upstream that answers the handshake, sends one frame, then closes its write side without a Close frame:
    // the client reads the frame, then Close 1014 "bad gateway" (not a bare end of stream), answers it, and the
    // gateway ends the connection cleanly.
    let up = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = up.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = up.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let n = s.read(&mut buf).await.expect("read");
                let head = String::from_utf8_lossy(&buf[..n]).into_owned();
                let key = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
                    .expect("key")
                    .trim()
                    .to_owned();
                let accept = ws_gateway::upgrade::accept_key(&key);
                let resp = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n");
                s.write_all(resp.as_bytes()).await.expect("101");
                s.write_all(&ws_gateway::frame::encode(0x1, b"bye", None))
                    .await
                    .expect("frame");
                s.shutdown().await.expect("half-close");
                // Keep reading what the client sends after the upstream's half-close.
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest).await;
            });
        }
    });
    let gw = env
        .gateway_upstream(&format!("ws://127.0.0.1:{port}/"), &[])
        .await;
    let token = env.token();
    let mut s = tls(&env.pki, gw.addr).await;
    within(s.write_all(upgrade("/", &format!("Authorization: Bearer {token}\r\n")).as_bytes()))
        .await
        .expect("write");
    let mut got = Vec::new();
    let end = within(async {
        loop {
            let mut b = [0u8; 1024];
            let n = s.read(&mut b).await.expect("read");
            assert!(n > 0, "closed before the response head");
            got.extend_from_slice(&b[..n]);
            if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                return i + 4;
            }
        }
    })
    .await;
    assert!(got.starts_with(b"HTTP/1.1 101"));
    let rest = got.split_off(end);
    let (frames, code) = frames_until_close(&mut s, rest).await;
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].payload, b"bye");
    assert_eq!(code, 1014);
    within(s.write_all(&ws_gateway::frame::close_frame(
        1014,
        "",
        Some([1, 2, 3, 4]),
    )))
    .await
    .expect("answer");
    let mut tail = Vec::new();
    within(s.read_to_end(&mut tail))
        .await
        .expect("a clean end after the Close");
    assert!(tail.is_empty());
}

#[tokio::test]
async fn tls_prefers_aes128_sha256_and_resumes_sessions() {
    let env = Env::new().await;
    let gw = env.gateway(&[]).await;
    let first = tls(&env.pki, gw.addr).await;
    let conn = first.get_ref().1;
    assert_eq!(
        conn.negotiated_cipher_suite().map(|s| s.suite()),
        Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
    );
    assert_eq!(conn.alpn_protocol(), None, "no ALPN offered by this client");
    // Read the ticket the server sends after the handshake, then reconnect with the same client config.
    let mut first = first;
    let _ = tokio::time::timeout(
        std::time::Duration::from_millis(200),
        first.read(&mut [0u8; 1]),
    )
    .await;
    let second = tls(&env.pki, gw.addr).await;
    assert_eq!(
        second.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed)
    );
}
