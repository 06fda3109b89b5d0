//! Operating the gateway: metrics after real traffic, JSON logs without secrets, drain on SIGTERM with Close 1001,
//! certificate reload (symlink swap and SIGHUP) with open sessions untouched, PROXY protocol.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures_util::SinkExt;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

#[tokio::test]
async fn metrics_count_real_traffic() {
    let env = Env::new().await;
    let gw = env
        .gateway(&["--ws-allowed-origins", "https://app.example.com"])
        .await;
    let mut ws = ws_ok(&env, &gw, "/").await;
    within(ws.send(Message::text("12345"))).await.expect("send");
    assert_eq!(next_text(&mut ws).await, "12345");
    within(ws.close(None)).await.expect("close");
    drop(ws);
    assert_eq!(
        status_of(&raw(&env.pki, gw.addr, upgrade("/", "").as_bytes()).await),
        401
    );
    let auth = format!("Authorization: Bearer {}\r\n", env.token());
    let forbidden = upgrade("/", &format!("{auth}Origin: https://evil.example\r\n"));
    assert_eq!(
        status_of(&raw(&env.pki, gw.addr, forbidden.as_bytes()).await),
        403
    );
    assert_eq!(
        status_of(&raw(&env.pki, gw.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await),
        426
    );
    gw.wait_log(&["session_end"]).await;

    let (status, text) = gw.admin_get("/metrics").await;
    assert_eq!(status, 200);
    assert!(text.trim_end().ends_with("# EOF"), "OpenMetrics text");
    assert_eq!(metric(&text, "ws_connections_total"), 4.0);
    assert_eq!(metric(&text, "ws_auth_success_total"), 1.0);
    assert_eq!(
        metric(&text, "ws_auth_failures_total{reason=\"missing_token\"}"),
        1.0
    );
    assert_eq!(metric(&text, "ws_rejections_total{status=\"401\"}"), 1.0);
    assert_eq!(metric(&text, "ws_rejections_total{status=\"403\"}"), 1.0);
    assert_eq!(metric(&text, "ws_rejections_total{status=\"426\"}"), 1.0);
    assert_eq!(metric(&text, "ws_active_sessions"), 0.0);
    assert_eq!(metric(&text, "ws_connection_duration_seconds_count"), 1.0);
    assert_eq!(metric(&text, "ws_handshake_duration_seconds_count"), 1.0);
    assert_eq!(
        metric(&text, "ws_protocol_connections_total{protocol=\"none\"}"),
        1.0
    );
    assert_eq!(
        metric(&text, "ws_session_closes_total{reason=\"closed\"}"),
        1.0
    );
    // "12345" masked from the client (11 bytes) and a Close frame; greeting + echo + Close back.
    assert!(
        metric(
            &text,
            "ws_relay_bytes_total{direction=\"client_to_upstream\"}"
        ) >= 11.0
    );
    assert!(
        metric(
            &text,
            "ws_relay_bytes_total{direction=\"upstream_to_client\"}"
        ) >= 24.0
    );
    assert_eq!(
        metric(
            &text,
            "ws_jwks_refreshes_total{result=\"ok\",trigger=\"start\"}"
        ),
        1.0
    );
    assert!(metric(&text, "ws_jwks_key_age_seconds") >= 0.0);
    assert_eq!(metric(&text, "ws_draining"), 0.0);
    assert!(!text.contains("alice"), "no per-user labels");
}

#[tokio::test]
async fn every_log_line_is_json_with_the_fields_and_no_secret() {
    let env = Env::new().await;
    let gw = env.gateway(&[]).await;
    let token = env.token();
    let cookie_token = env.signer.valid("bob", 300);
    let query_token = env.signer.valid("carol", 300);
    let mut ws = connect_ws(
        &env.pki,
        &gw,
        "/",
        &[("Cookie", &format!("session={cookie_token}"))],
    )
    .await
    .expect("cookie");
    assert_eq!(next_text(&mut ws).await, "hello from echo");
    within(ws.close(None)).await.expect("close");
    drop(ws);
    let mut ws = connect_ws(
        &env.pki,
        &gw,
        &format!("/q?access_token={query_token}"),
        &[],
    )
    .await
    .expect("query");
    assert_eq!(next_text(&mut ws).await, "hello from echo");
    drop(ws);
    let bad = format!("{}x", token);
    assert_eq!(
        status_of(
            &raw(
                &env.pki,
                gw.addr,
                upgrade(&format!("/?access_token={bad}"), "").as_bytes()
            )
            .await
        ),
        401
    );
    let line = gw.wait_log(&["session_end", "\"subject\":\"bob\""]).await;
    gw.wait_log(&["session_end", "\"subject\":\"carol\""]).await;

    let v: serde_json::Value = serde_json::from_str(&line).expect("json");
    for field in [
        "timestamp",
        "level",
        "message",
        "event",
        "peer",
        "route",
        "subject",
        "duration_ms",
        "bytes_client_to_upstream",
        "bytes_upstream_to_client",
        "close_reason",
    ] {
        assert!(v.get(field).is_some(), "session_end lacks {field}: {line}");
    }
    for l in gw.logs() {
        let v: serde_json::Value =
            serde_json::from_str(&l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(
            v["timestamp"].is_string() && v["level"].is_string() && v["message"].is_string(),
            "{l}"
        );
        for secret in [&token, &cookie_token, &query_token, &bad] {
            let sig = secret.rsplit('.').next().expect("sig");
            assert!(!l.contains(sig), "a token reached the logs: {l}");
        }
        assert!(
            !l.contains("access_token"),
            "a token-bearing query reached the logs: {l}"
        );
    }
    let rejected = gw
        .wait_log(&["\"event\":\"rejected\"", "\"status\":401"])
        .await;
    assert!(rejected.contains("\"path\":\"/\""), "{rejected}");
}

#[tokio::test]
async fn sigterm_drains_then_sends_1001_and_exits_0() {
    let env = Env::new().await;
    let mut gw = env
        .gateway(&[
            "--graceful-drain-timeout-seconds",
            "2",
            "--drain-spread-seconds",
            "0",
        ])
        .await;
    let mut ws = ws_ok(&env, &gw, "/").await;
    let signalled = Instant::now();
    gw.signal("TERM");
    within(async {
        while gw.admin_get("/readyz").await.0 != 503 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    // New connections are refused.
    within(async {
        while TcpStream::connect(gw.addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    // The open session keeps working during the drain.
    within(ws.send(Message::text("during drain")))
        .await
        .expect("send");
    assert_eq!(next_text(&mut ws).await, "during drain");
    let (code, reason) = next_close(&mut ws).await;
    assert_eq!((code, reason.as_str()), (1001, "going away"));
    let waited = signalled.elapsed();
    assert!(
        waited >= Duration::from_millis(1800),
        "closed before the drain deadline: {waited:?}"
    );
    let status = gw.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    let logs = gw.logs().join("\n");
    assert!(
        logs.contains("drain_started") && logs.contains("\"close_reason\":\"drain\""),
        "{logs}"
    );
}

#[tokio::test]
async fn sigterm_with_no_sessions_exits_at_once_and_a_second_signal_forces() {
    let env = Env::new().await;
    let mut gw = env.gateway(&[]).await;
    let started = Instant::now();
    gw.signal("TERM");
    assert!(gw.wait_exit(Duration::from_secs(5)).success());
    assert!(started.elapsed() < Duration::from_secs(3));

    let mut gw = env
        .gateway(&["--graceful-drain-timeout-seconds", "30"])
        .await;
    let _ws = ws_ok(&env, &gw, "/").await;
    gw.signal("TERM");
    gw.wait_log(&["drain_started"]).await;
    gw.signal("INT");
    let status = gw.wait_exit(Duration::from_secs(5));
    assert!(status.success());
    assert!(gw.logs().join("\n").contains("Forced"));
}

/// The certificate a fresh (never resumed) TLS handshake sees.
async fn peer_cert(pki: &Pki, addr: std::net::SocketAddr) -> Vec<u8> {
    let mut config = (*pki.client).clone();
    config.resumption = rustls::client::Resumption::disabled();
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tls = within(connector.connect(ServerName::try_from("localhost").expect("n"), tcp))
        .await
        .expect("tls");
    tls.get_ref().1.peer_certificates().expect("certs")[0]
        .as_ref()
        .to_vec()
}

fn der(path: &std::path::Path) -> Vec<u8> {
    CertificateDer::pem_file_iter(path)
        .expect("pem")
        .next()
        .expect("one")
        .expect("cert")
        .as_ref()
        .to_vec()
}

#[tokio::test]
async fn certificate_reload_on_symlink_swap_and_sighup() {
    let env = Env::new().await;
    // A kubelet-style secret volume: files behind a `..data` symlink that is swapped atomically.
    let vol = TempDir::new("secret");
    let gen = |n: u64| {
        let d = vol.path(&format!("..{n}"));
        std::fs::create_dir_all(&d).expect("mkdir");
        env.pki.issue(&d.join("tls.crt"), &d.join("tls.key"), n);
        d
    };
    let swap = |target: &std::path::Path| {
        let tmp = vol.path("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(target, &tmp).expect("symlink");
        std::fs::rename(&tmp, vol.path("..data")).expect("rename");
    };
    let first = gen(10);
    swap(&first);
    for f in ["tls.crt", "tls.key"] {
        std::os::unix::fs::symlink(format!("..data/{f}"), vol.path(f)).expect("link");
    }
    let mut args = env.args();
    let i = args.iter().position(|a| a == "--tls-cert").expect("flag");
    args[i + 1] = vol.path("tls.crt").to_str().expect("p").to_owned();
    args[i + 3] = vol.path("tls.key").to_str().expect("p").to_owned();
    let gw = Gateway::spawn(&args, &[]);
    gw.wait_ready().await;
    assert_eq!(
        peer_cert(&env.pki, gw.addr).await,
        der(&first.join("tls.crt"))
    );
    let mut open = ws_ok(&env, &gw, "/").await;

    // Swap in serial 11: noticed by the file watcher.
    let second = gen(11);
    swap(&second);
    gw.wait_log(&["cert_reloaded", "file_change"]).await;
    assert_eq!(
        peer_cert(&env.pki, gw.addr).await,
        der(&second.join("tls.crt")),
        "new handshakes use serial 11"
    );
    within(open.send(Message::text("still open")))
        .await
        .expect("send");
    assert_eq!(
        next_text(&mut open).await,
        "still open",
        "the open session survives the reload"
    );

    // A broken new file: the old certificate stays, with an error log and a metric.
    let broken = vol.path("..broken");
    std::fs::create_dir_all(&broken).expect("mkdir");
    std::fs::write(broken.join("tls.crt"), "not a certificate").expect("write");
    std::fs::copy(second.join("tls.key"), broken.join("tls.key")).expect("copy");
    swap(&broken);
    gw.wait_log(&["cert_reload_failed"]).await;
    assert_eq!(
        peer_cert(&env.pki, gw.addr).await,
        der(&second.join("tls.crt"))
    );
    let (_, metrics) = gw.admin_get("/metrics").await;
    assert_eq!(
        metric(&metrics, "ws_cert_reloads_total{result=\"error\"}"),
        1.0
    );

    // SIGHUP reloads on demand.
    let third = gen(12);
    swap(&third);
    gw.signal("HUP");
    gw.wait_log(&["cert_reloaded", "sighup"]).await;
    assert_eq!(
        peer_cert(&env.pki, gw.addr).await,
        der(&third.join("tls.crt"))
    );
    assert!(
        !gw.logs().iter().any(|l| l.contains("names_not_covered")),
        "the same names: no warning"
    );

    // A certificate that no longer covers `localhost`: served (the operator asked for it), but warned about.
    let fourth = vol.path("..13");
    std::fs::create_dir_all(&fourth).expect("mkdir");
    env.pki.issue_for(
        &fourth.join("tls.crt"),
        &fourth.join("tls.key"),
        13,
        &["127.0.0.1", "gw.example"],
    );
    swap(&fourth);
    gw.signal("HUP");
    let line = gw
        .wait_log(&["cert_reload_warning", "names_not_covered"])
        .await;
    assert!(line.contains("\"names\":\"localhost\""), "{line}");
    let (_, metrics) = gw.admin_get("/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "ws_cert_reload_warnings_total{kind=\"names_not_covered\"}"
        ),
        1.0
    );
}

/// Connects over TCP, sends `header` first, then TLS and an upgrade; returns the response head.
async fn through_proxy(env: &Env, addr: std::net::SocketAddr, header: &[u8]) -> Option<String> {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(header).await.expect("header");
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(&env.pki.client));
    let Ok(Ok(mut s)) = tokio::time::timeout(
        T,
        connector.connect(ServerName::try_from("localhost").expect("n"), tcp),
    )
    .await
    else {
        return None;
    };
    let req = upgrade("/", &format!("Authorization: Bearer {}\r\n", env.token()));
    s.write_all(req.as_bytes()).await.ok()?;
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while !out.ends_with(b"\r\n\r\n") {
        match within(s.read(&mut b)).await {
            Ok(1) => out.push(b[0]),
            _ => break,
        }
    }
    (!out.is_empty()).then(|| String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test]
async fn proxy_protocol_v1_and_v2_from_trusted_peers_only() {
    let env = Env::new().await;
    let gw = env
        .gateway(&[
            "--proxy-protocol",
            "--proxy-protocol-trusted-cidrs",
            "127.0.0.0/8,::1/128",
        ])
        .await;
    let v1 = b"PROXY TCP4 203.0.113.9 198.51.100.1 40000 443\r\n".to_vec();
    let head = through_proxy(&env, gw.addr, &v1).await.expect("answer");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(env.upstream.last().header("x-real-ip"), Some("203.0.113.9"));

    let mut v2 = vec![
        0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x21, 0x21, 0x00,
        36,
    ];
    v2.extend_from_slice(
        &"2001:db8::7"
            .parse::<std::net::Ipv6Addr>()
            .expect("v6")
            .octets(),
    );
    v2.extend_from_slice(&[0u8; 16]);
    v2.extend_from_slice(&[0x9c, 0x40, 0x01, 0xbb]);
    let head = through_proxy(&env, gw.addr, &v2).await.expect("answer");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(env.upstream.last().header("x-real-ip"), Some("2001:db8::7"));
    assert_eq!(
        env.upstream.last().header("x-forwarded-for"),
        Some("2001:db8::7")
    );

    // Malformed or missing headers end the connection before TLS.
    for bad in [
        &b"PROXY TCP4 nonsense\r\n"[..],
        b"PROXY TCP9 1.2.3.4 5.6.7.8 1 2\r\n",
        b"",
    ] {
        assert!(
            through_proxy(&env, gw.addr, bad).await.is_none(),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    gw.wait_log(&["proxy_header_invalid"]).await;

    // A peer outside the trusted CIDRs is refused, header or not.
    let gw = env
        .gateway(&[
            "--proxy-protocol",
            "--proxy-protocol-trusted-cidrs",
            "10.0.0.0/8",
        ])
        .await;
    assert!(through_proxy(&env, gw.addr, &v1).await.is_none());
    gw.wait_log(&["proxy_untrusted"]).await;
}

#[tokio::test]
async fn dev_writes_its_ca_file_privately_and_removes_it_at_exit() {
    use std::os::unix::fs::PermissionsExt;
    let mut gw = Gateway::spawn(&["--dev".to_owned()], &[]);
    gw.wait_ready().await;
    let path = within(async {
        loop {
            let err = gw.stderr.lock().expect("lock").clone();
            if let Some(p) = err
                .split_whitespace()
                .skip_while(|w| *w != "--ca")
                .nth(1)
                .map(str::to_owned)
            {
                return p;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let name = std::path::Path::new(&path)
        .file_name()
        .and_then(|n| n.to_str())
        .expect("name")
        .to_owned();
    assert!(
        name.starts_with("ws-gateway-dev-") && name.len() > 30,
        "a random name: {name}"
    );
    assert!(
        !name.contains(&gw.child.id().to_string()),
        "not the pid: {name}"
    );
    let mode = std::fs::metadata(&path)
        .expect("exists")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "{path}");
    gw.signal("TERM");
    assert!(gw.wait_exit(Duration::from_secs(10)).success());
    assert!(!std::path::Path::new(&path).exists(), "{path} left behind");
}
