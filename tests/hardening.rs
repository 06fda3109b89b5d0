//! Regression tests for the hardening review: closes that arrive while the client keeps sending, an admin port
//! that idle sockets cannot starve, forged forwarding and identity headers, ambiguous paths, a key rotation that
//! reuses a `kid`, separate handshake and session budgets, and `--reuse-port` hand-over.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use ws_gateway::frame::{close_frame, decode, encode, OP_BINARY, OP_CLOSE};

/// Upgrades over TLS with `token`, then sends a masked frame every 100 ms (and keeps sending for a second after
/// the gateway's Close) before answering with its own Close. Returns the gateway's close code, and whether the
/// connection then ended with a clean EOF (TLS close_notify + FIN) rather than a reset.
async fn keep_sending_client(
    env: &Env,
    gw: &Gateway,
    token: &str,
    trigger: impl FnOnce(),
) -> (u16, bool) {
    let mut s = tls(&env.pki, gw.addr).await;
    let req = upgrade("/", &format!("Authorization: Bearer {token}\r\n"));
    within(s.write_all(req.as_bytes())).await.expect("write");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(within(s.read(&mut b)).await.expect("read"), 1, "head");
        head.push(b[0]);
    }
    assert_eq!(status_of(&String::from_utf8_lossy(&head)), 101);
    let (mut rd, mut wr) = tokio::io::split(s);
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let writer = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = &mut stop_rx => break,
                () = tokio::time::sleep(Duration::from_millis(100)) => {
                    let f = encode(OP_BINARY, b"tick", Some([9, 8, 7, 6]));
                    if wr.write_all(&f).await.is_err() { return false; }
                }
            }
        }
        wr.write_all(&close_frame(1000, "", Some([1, 2, 3, 4])))
            .await
            .is_ok()
    });
    trigger();
    let mut buf = Vec::new();
    let code = loop {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(20), rd.read(&mut chunk))
            .await
            .expect("a Close in time")
            .expect("read the Close frame, not a reset");
        assert!(n > 0, "EOF before any Close frame");
        buf.extend_from_slice(&chunk[..n]);
        let mut at = 0;
        let mut found = None;
        while let Some((f, used)) = decode(&buf[at..], 1 << 20).expect("valid frames") {
            at += used;
            if f.opcode == OP_CLOSE {
                found = Some(u16::from_be_bytes([f.payload[0], f.payload[1]]));
                break;
            }
        }
        if let Some(code) = found {
            break code;
        }
    };
    // Keep sending for a second after the Close, as a busy client does, then answer it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _ = stop_tx.send(());
    let sent_close = within(writer).await.expect("writer");
    let mut rest = Vec::new();
    let clean = within(rd.read_to_end(&mut rest)).await.is_ok();
    (code, sent_close && clean)
}

#[tokio::test]
async fn a_client_that_keeps_sending_reads_1008_at_expiry_and_a_clean_end() {
    let env = Env::new().await;
    let gw = env.gateway(&["--jwt-leeway-seconds", "0"]).await;
    let token = env.signer.valid("alice", 2);
    let (code, clean) = keep_sending_client(&env, &gw, &token, || {}).await;
    assert_eq!(code, 1008);
    assert!(clean, "the connection was reset instead of closed");
}

#[tokio::test]
async fn a_client_that_keeps_sending_reads_1001_at_drain() {
    let env = Env::new().await;
    let gw = env
        .gateway(&[
            "--graceful-drain-timeout-seconds",
            "1",
            "--drain-spread-seconds",
            "1",
        ])
        .await;
    let token = env.token();
    let (code, clean) = keep_sending_client(&env, &gw, &token, || gw.signal("TERM")).await;
    assert_eq!(code, 1001);
    assert!(clean, "the connection was reset instead of closed");
}

#[tokio::test]
async fn idle_sockets_cannot_starve_the_admin_port() {
    let env = Env::new().await;
    let gw = env.gateway(&[]).await;
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(within(TcpStream::connect(gw.admin)).await.expect("connect"));
    }
    // The shipped liveness probe gives up after 2 s.
    for _ in 0..3 {
        let started = Instant::now();
        assert_eq!(gw.admin_get("/healthz").await.0, 200);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
    let (_, metrics) = gw.admin_get("/metrics").await;
    assert!(
        metrics.contains("ws_pending_evictions_total{listener=\"admin\"}"),
        "{metrics}"
    );
    drop(idle);
}

#[tokio::test]
async fn idle_handshakes_evict_each_other_not_a_valid_client() {
    let env = Env::new().await;
    let gw = env
        .gateway(&["--max-pending-handshakes", "10", "--max-connections", "20"])
        .await;
    let mut idle = Vec::new();
    for _ in 0..15 {
        idle.push(within(TcpStream::connect(gw.addr)).await.expect("connect"));
    }
    // Idle sockets fill the handshake budget of ten; the valid client is served once the oldest have idled for
    // half a second and are evicted, not after the 10 s handshake timeout.
    let started = Instant::now();
    let mut ws = ws_ok(&env, &gw, "/").await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let (_, metrics) = gw.admin_get("/metrics").await;
    assert!(
        metrics.contains("ws_pending_evictions_total{listener=\"handshake\"}"),
        "{metrics}"
    );
    ws.close(None).await.ok();
    drop(idle);
}

#[tokio::test]
async fn sessions_beyond_max_connections_get_503() {
    let env = Env::new().await;
    let gw = env.gateway(&["--max-connections", "1"]).await;
    let _first = ws_ok(&env, &gw, "/").await;
    let req = upgrade("/", &format!("Authorization: Bearer {}\r\n", env.token()));
    let resp = raw(&env.pki, gw.addr, req.as_bytes()).await;
    assert_eq!(status_of(&resp), 503, "{resp}");
    assert!(resp.contains("Retry-After: 1\r\n"), "{resp}");
}

#[tokio::test]
async fn forwarding_and_identity_headers_from_a_client_are_replaced() {
    let env = Env::new().await;
    let gw = env.gateway(&[]).await;
    let extra = format!(
        "Authorization: Bearer {}\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: gopher\r\nX_Auth_Subject: root\r\n\
X-Real-IP: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\nAuthorization: Bearer\tSTOLEN\r\n\
Sec-WebSocket-Protocol: chat, Bearer.STOLEN\r\nCookie: SESSION=STOLEN; theme=dark\r\n",
        env.token()
    );
    let head = raw_head(
        &env.pki,
        gw.addr,
        &upgrade("/?access%5Ftoken=STOLEN&x=1", &extra),
    )
    .await;
    assert_eq!(status_of(&head), 101, "{head}");
    let seen = within(async {
        loop {
            if env.upstream.count() > 0 {
                return env.upstream.last();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let raw = seen.raw();
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"), "{raw}");
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"), "{raw}");
    assert_eq!(seen.header("x-real-ip"), Some("127.0.0.1"), "{raw}");
    assert_eq!(seen.header("x-auth-subject"), Some("alice"), "{raw}");
    assert!(!raw.contains("6.6.6.6") && !raw.contains("root"), "{raw}");
    assert!(!raw.contains("STOLEN"), "{raw}");
    assert!(
        raw.to_ascii_lowercase().contains("cookie: theme=dark"),
        "{raw}"
    );
}

#[tokio::test]
async fn ambiguous_paths_and_prefix_look_alikes_are_refused() {
    let env = Env::new().await;
    let dir = TempDir::new("routes");
    let routes = dir.path("routes.yaml");
    std::fs::write(
        &routes,
        format!("- prefix: /feed\n  upstream: {}\n", env.upstream.url),
    )
    .expect("write");
    let mut args = env.args();
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
    let auth = format!("Authorization: Bearer {}\r\n", env.token());
    for (path, status) in [
        ("/feedback-admin", 404),
        ("/feed%2f..%2fadmin", 400),
        ("/feed/..;/admin", 400),
        ("/feed/%252e%252e/admin", 400),
        ("/feed\\..\\admin", 400),
    ] {
        let resp = raw(&env.pki, gw.addr, upgrade(path, &auth).as_bytes()).await;
        assert_eq!(status_of(&resp), status, "{path}: {resp}");
    }
    let head = raw_head(&env.pki, gw.addr, &upgrade("/feed/x", &auth)).await;
    assert_eq!(status_of(&head), 101, "{head}");
}

#[tokio::test]
async fn an_origin_that_is_not_text_is_refused() {
    let env = Env::new().await;
    let gw = env
        .gateway(&["--ws-allowed-origins", "https://app.example"])
        .await;
    let mut req = upgrade("/", &format!("Authorization: Bearer {}\r\n", env.token())).into_bytes();
    let end = req.len() - 2;
    req.splice(
        end..end,
        b"Origin: https://app.example\xff\r\n".iter().copied(),
    );
    let resp = raw(&env.pki, gw.addr, &req).await;
    assert_eq!(status_of(&resp), 403, "{resp}");
}

#[tokio::test]
async fn a_cached_token_does_not_outlive_a_rotation_that_reuses_its_kid() {
    let env = Env::new().await;
    // EC keys: each signer has a key of its own (the RSA test key is shared).
    let original = Signer::es256("ec-1");
    env.idp.set_keys(vec![original.jwk()]);
    let gw = env
        .gateway(&[
            "--jwks-refetch-interval-seconds",
            "1",
            "--jwt-valid-algorithms",
            "ES256",
        ])
        .await;
    let token = original.valid("alice", 300);
    let ws = connect_bearer(&env.pki, &gw, "/", &token)
        .await
        .expect("101");
    drop(ws);
    // Now cached: the IdP replaces the key but keeps its kid.
    let rotated = Signer::es256("ec-1");
    env.idp.set_keys(vec![rotated.jwk()]);
    // A token with an unknown kid makes the gateway refetch (once the refetch interval has passed).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let unknown = Signer::es256("ec-2").valid("bob", 300);
    assert_eq!(
        connect_bearer(&env.pki, &gw, "/", &unknown).await.err(),
        Some(401)
    );
    assert_eq!(
        connect_bearer(&env.pki, &gw, "/", &token).await.err(),
        Some(401)
    );
    let fresh = rotated.valid("alice", 300);
    assert!(connect_bearer(&env.pki, &gw, "/", &fresh).await.is_ok());
}

#[tokio::test]
async fn id_tokens_are_refused_when_a_typ_is_required() {
    let env = Env::new().await;
    let gw = env.gateway(&["--jwt-required-typ", "at+jwt"]).await;
    let claims = claims("alice", 300);
    let id_token = env.signer.sign(
        &json!({"alg": "RS256", "kid": "rsa-1", "typ": "JWT"}),
        &claims,
    );
    assert_eq!(
        connect_bearer(&env.pki, &gw, "/", &id_token).await.err(),
        Some(401)
    );
    let access = env.signer.sign(
        &json!({"alg": "RS256", "kid": "rsa-1", "typ": "at+jwt"}),
        &claims,
    );
    assert!(connect_bearer(&env.pki, &gw, "/", &access).await.is_ok());
}

#[tokio::test]
async fn reuse_port_lets_a_second_process_take_over_while_the_first_drains() {
    let env = Env::new().await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let listen = format!("127.0.0.1:{port}");
    let with = |extra: &[&str]| {
        let mut args = env.args();
        args.extend(["--listen", &listen].iter().map(|s| (*s).to_owned()));
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args
    };
    let mut first = Gateway::spawn(&with(&["--reuse-port"]), &[]);
    first.wait_ready().await;
    // Without SO_REUSEPORT on both sides, the port is taken.
    let mut blocked = std::process::Command::new(Gateway::bin())
        .args(with(&[]))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let status = within(async {
        loop {
            if let Some(s) = blocked.try_wait().expect("wait") {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(status.code(), Some(1));
    let second = Gateway::spawn(&with(&["--reuse-port"]), &[]);
    second.wait_ready().await;
    assert_eq!(second.addr, first.addr);
    first.signal("TERM");
    assert!(first.wait_exit(T).success());
    // Every new connection now lands on the second process.
    for _ in 0..5 {
        let mut ws = ws_ok(&env, &second, "/").await;
        ws.close(None).await.ok();
    }
}
