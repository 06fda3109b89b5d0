//! The per-address handshake budget and the per-session message rate, over real sockets: PROXY v2 addresses, X-Forwarded-For from trusted and untrusted peers, no TLS for a throttled address, and Close 1008 for a flood of frames.
//! through one trusted balancer, `X-Forwarded-For` from a trusted proxy and from an untrusted peer, no TLS work for
//! a connection over budget) and the message rate of a session (Close 1008 "rate limit exceeded").
//!
//! Rates are chosen so wall-clock time cannot flake: the handshake budget refills once every 1,000 s, and the
//! message-rate clients send either far over their rate (100 frames in one write against a burst of 5) or at a
//! quarter of it.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use ws_gateway::frame::{close_frame, decode, encode, Frame, OP_BINARY, OP_CLOSE, OP_PING};

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A PROXY v2 header (PROXY command, TCP over IPv4) naming `src` as the client.
fn proxy_v2(src: Ipv4Addr) -> Vec<u8> {
    let mut h = vec![
        0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x21, 0x11, 0x00,
        12,
    ];
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&[198, 51, 100, 1]);
    h.extend_from_slice(&[0x9c, 0x40, 0x01, 0xbb]);
    h
}

/// Through the balancer: the PROXY header, TLS, an authenticated upgrade; the status of the answer.
async fn upgrade_through_proxy(env: &Env, gw: &Gateway, src: Ipv4Addr) -> u16 {
    let mut tcp = within(TcpStream::connect(gw.addr)).await.expect("connect");
    within(tcp.write_all(&proxy_v2(src))).await.expect("header");
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(&env.pki.client));
    let mut s = within(connector.connect(ServerName::try_from("localhost").expect("n"), tcp))
        .await
        .expect("TLS handshake within the budget");
    let req = upgrade("/", &format!("Authorization: Bearer {}\r\n", env.token()));
    within(s.write_all(req.as_bytes())).await.expect("write");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        if within(s.read(&mut b)).await.unwrap_or(0) == 0 {
            break;
        }
        head.push(b[0]);
    }
    status_of(&String::from_utf8_lossy(&head))
}

/// Through the balancer: the PROXY header and a TLS ClientHello; every byte the gateway answers before it closes.
async fn client_hello_through_proxy(gw: &Gateway, src: Ipv4Addr, pki: &Pki) -> Vec<u8> {
    let mut hello = Vec::new();
    let mut conn = rustls::ClientConnection::new(
        Arc::clone(&pki.client),
        ServerName::try_from("localhost").expect("n"),
    )
    .expect("client");
    conn.write_tls(&mut hello).expect("ClientHello");
    let mut tcp = within(TcpStream::connect(gw.addr)).await.expect("connect");
    let mut wire = proxy_v2(src);
    wire.extend_from_slice(&hello);
    // The gateway may close before the ClientHello is written: a failed write is an answer too.
    let _ = within(tcp.write_all(&wire)).await;
    let mut answer = Vec::new();
    let _ = within(tcp.read_to_end(&mut answer)).await;
    answer
}

#[tokio::test]
async fn the_handshake_budget_counts_proxy_v2_addresses_and_closes_before_tls() {
    let env = Env::new().await;
    let gw = env
        .gateway(&[
            "--proxy-protocol",
            "--proxy-protocol-trusted-cidrs",
            "127.0.0.0/8",
            "--handshake-rate-per-ip",
            "0.001",
            "--handshake-burst-per-ip",
            "2",
        ])
        .await;
    let flooder = Ipv4Addr::new(203, 0, 113, 7);
    let other = Ipv4Addr::new(198, 51, 100, 9);
    // One balancer address carries both clients: only the one over its budget is held back.
    for _ in 0..2 {
        assert_eq!(upgrade_through_proxy(&env, &gw, flooder).await, 101);
    }
    let answer = client_hello_through_proxy(&gw, flooder, &env.pki).await;
    assert!(
        answer.is_empty(),
        "no ServerHello for a client over budget, got {} bytes",
        answer.len()
    );
    assert_eq!(upgrade_through_proxy(&env, &gw, other).await, 101);
    assert_eq!(upgrade_through_proxy(&env, &gw, other).await, 101);

    let line = gw
        .wait_log(&["\"event\":\"handshake_throttled\"", "203.0.113.7"])
        .await;
    assert!(line.contains("\"suppressed\":0"), "{line}");
    let (_, metrics) = gw.admin_get("/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "ws_rate_limit_violations_total{kind=\"handshake_ip\"}"
        ),
        1.0,
        "{metrics}"
    );
    // The gateway never started a TLS handshake for it.
    assert_eq!(
        metric(&metrics, "ws_tls_handshake_failures_total"),
        0.0,
        "{metrics}"
    );
    assert_eq!(env.upstream.count(), 4);
}

/// The gateway's flags without TLS: plain mode, as behind Traefik's websecure entry point.
fn plain_args(env: &Env, extra: &[&str]) -> Vec<String> {
    let mut args = Vec::new();
    let mut it = env.args().into_iter();
    while let Some(a) = it.next() {
        if a == "--tls-cert" || a == "--tls-key" {
            it.next();
            continue;
        }
        args.push(a);
    }
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

/// A plain HTTP upgrade without a token from `source`, with `X-Forwarded-For: xff` when given; the whole answer
/// (empty when the gateway closed without one).
async fn plain_request(gw: &Gateway, source: IpAddr, xff: Option<&str>) -> String {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(source, 0))
        .expect("bind source");
    let mut tcp = within(socket.connect(gw.addr)).await.expect("connect");
    let extra = xff.map_or(String::new(), |x| format!("X-Forwarded-For: {x}\r\n"));
    let _ = within(tcp.write_all(upgrade("/", &extra).as_bytes())).await;
    let mut out = Vec::new();
    let _ = within(tcp.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn x_forwarded_for_names_the_client_from_a_trusted_proxy_only() {
    let env = Env::new().await;
    let gw = Gateway::spawn(
        &plain_args(
            &env,
            &[
                "--trusted-proxies",
                "127.0.0.1/32",
                "--handshake-rate-per-ip",
                "0.001",
                "--handshake-burst-per-ip",
                "2",
            ],
        ),
        &[],
    );
    gw.wait_ready().await;
    let proxy: IpAddr = Ipv4Addr::LOCALHOST.into();
    // From the trusted proxy, each X-Forwarded-For client has its own budget: past it (401, no token), then 429.
    for _ in 0..2 {
        let resp = plain_request(&gw, proxy, Some("192.0.2.1")).await;
        assert_eq!(status_of(&resp), 401, "{resp}");
    }
    let resp = plain_request(&gw, proxy, Some("192.0.2.1")).await;
    assert_eq!(status_of(&resp), 429, "{resp}");
    let retry: u64 = resp
        .lines()
        .find_map(|l| l.strip_prefix("Retry-After: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("Retry-After in whole seconds");
    assert!((900..=1000).contains(&retry), "{resp}");
    // The rightmost address no trusted proxy vouches for is the client; a forged one to its left changes nothing.
    let resp = plain_request(&gw, proxy, Some("192.0.2.1, 192.0.2.2")).await;
    assert_eq!(status_of(&resp), 401, "{resp}");
    // The proxy's own requests (no X-Forwarded-For) are its own budget.
    let resp = plain_request(&gw, proxy, None).await;
    assert_eq!(status_of(&resp), 401, "{resp}");
    let line = gw
        .wait_log(&["\"event\":\"rejected\"", "\"status\":429"])
        .await;
    assert!(line.contains("\"client_ip\":\"192.0.2.1\""), "{line}");
    assert!(line.contains("\"reason\":\"handshake_budget\""), "{line}");

    // From an untrusted peer, X-Forwarded-For is ignored: a new forged address each time does not help, the
    // peer's own budget is spent and the third connection is closed without an answer.
    let untrusted: IpAddr = Ipv4Addr::new(127, 0, 3, 1).into();
    for forged in ["192.0.2.10", "192.0.2.11"] {
        let resp = plain_request(&gw, untrusted, Some(forged)).await;
        assert_eq!(status_of(&resp), 401, "{resp}");
    }
    let resp = plain_request(&gw, untrusted, Some("192.0.2.12")).await;
    assert!(resp.is_empty(), "closed without an answer, got {resp}");
    // One throttle line a second at most: that one was held back (the 429's line was written just before), and the
    // next one, a second later, says so.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let resp = plain_request(&gw, untrusted, None).await;
    assert!(resp.is_empty(), "closed without an answer, got {resp}");
    gw.wait_log(&[
        "\"event\":\"handshake_throttled\"",
        "127.0.3.1",
        "\"suppressed\":1",
    ])
    .await;
    let (_, metrics) = gw.admin_get("/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "ws_rate_limit_violations_total{kind=\"handshake_ip\"}"
        ),
        3.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "ws_rejections_total{status=\"429\"}"),
        1.0,
        "{metrics}"
    );
}

/// Reads frames until a Close; returns the frames before it and the Close.
async fn until_close(s: &mut (impl AsyncReadExt + Unpin), mut buf: Vec<u8>) -> (Vec<Frame>, Frame) {
    let mut frames = Vec::new();
    within(async {
        loop {
            while let Some((f, used)) = decode(&buf, 1 << 20).expect("valid frame") {
                buf.drain(..used);
                if f.opcode == OP_CLOSE {
                    return (std::mem::take(&mut frames), f);
                }
                frames.push(f);
            }
            let mut b = [0u8; 4096];
            let n = s.read(&mut b).await.expect("read the Close, not a reset");
            assert!(n > 0, "EOF before a Close frame");
            buf.extend_from_slice(&b[..n]);
        }
    })
    .await
}

#[tokio::test]
async fn a_client_over_its_message_rate_reads_close_1008_and_one_under_it_keeps_going() {
    let env = Env::new().await;
    let gw = env
        .gateway(&[
            "--ws-message-rate-per-second",
            "20",
            "--ws-message-burst",
            "5",
        ])
        .await;
    let auth = format!("Authorization: Bearer {}\r\n", env.token());
    // 100 frames in one write, data or pings: five fit the burst, the rest would need five seconds of refill.
    for op in [OP_BINARY, OP_PING] {
        let (mut s, head, rest) = raw_upgrade(&env.pki, gw.addr, "/", &auth).await;
        assert_eq!(status_of(&head), 101, "{head}");
        let mut flood = Vec::new();
        for i in 0..100u8 {
            flood.extend_from_slice(&encode(op, &[i; 4], Some([1, 2, 3, i])));
        }
        within(s.write_all(&flood)).await.expect("write");
        let (frames, close) = until_close(&mut s, rest).await;
        assert_eq!(close.payload[..2], 1008u16.to_be_bytes());
        assert_eq!(&close.payload[2..], b"rate limit exceeded");
        // The greeting, then at most the five frames (echoes or pongs) the burst let through.
        assert!(
            frames.len() <= 6,
            "{} frames before the Close",
            frames.len()
        );
        within(s.write_all(&close_frame(1008, "", Some([4, 4, 4, 4]))))
            .await
            .expect("answer");
        let mut tail = Vec::new();
        let _ = within(s.read_to_end(&mut tail)).await;
    }
    let line = gw
        .wait_log(&[
            "\"event\":\"session_end\"",
            "\"close_reason\":\"message_rate\"",
        ])
        .await;
    assert!(line.contains("\"close_code\":1008"), "{line}");

    // Five messages a second against twenty allowed: two seconds of them all come back.
    let mut ws = ws_ok(&env, &gw, "/").await;
    for i in 0..10 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        within(ws.send(Message::text(format!("m{i}"))))
            .await
            .expect("send");
        assert_eq!(next_text(&mut ws).await, format!("m{i}"));
    }
    ws.close(None).await.expect("close");

    let (_, metrics) = gw.admin_get("/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "ws_rate_limit_violations_total{kind=\"message_rate\"}"
        ),
        2.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "ws_session_closes_total{reason=\"message_rate\"}"),
        2.0,
        "{metrics}"
    );
}
