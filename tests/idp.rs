//! The identity provider as the gateway reaches it: OpenID Connect discovery, a forward proxy from the
//! environment, redirects, and hostile responses that must neither crash the process nor load keys.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Args for a gateway whose key source is given by `key_flags` instead of `--jwks-url`.
fn args_without_jwks(env: &Env, key_flags: &[&str]) -> Vec<String> {
    let mut args = env.args();
    let i = args.iter().position(|a| a == "--jwks-url").expect("flag");
    args.drain(i..i + 2);
    args.extend(key_flags.iter().map(|s| (*s).to_owned()));
    args
}

#[tokio::test]
async fn discovery_finds_the_jwks_from_the_issuer() {
    let env = Env::new().await;
    let issuer = format!("http://{}/realms/demo", env.idp.addr);
    let gw = Gateway::spawn(
        &args_without_jwks(&env, &["--oidc-issuer-url", &issuer]),
        &[],
    );
    gw.wait_ready().await;
    let mut ws = ws_ok(&env, &gw, "/").await;
    ws.close(None).await.ok();
    gw.wait_log(&[
        "oidc_discovered",
        "/realms/demo/protocol/openid-connect/certs",
    ])
    .await;
}

#[tokio::test]
async fn an_issuer_alone_is_enough_configuration() {
    let env = Env::new().await;
    let out = std::process::Command::new(Gateway::bin())
        .args([
            "--check-config",
            "--oidc-issuer-url",
            "https://idp.example/realms/r",
        ])
        .args(["--upstream-ws-url", "ws://127.0.0.1:9/"])
        .env_clear()
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(env);
}

/// A forward proxy that records each request line and passes the exchange on to `to`.
async fn proxy(to: std::net::SocketAddr) -> (std::net::SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if client.read(&mut b).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let text = String::from_utf8_lossy(&head).into_owned();
                log.lock()
                    .expect("lock")
                    .push(text.lines().next().unwrap_or("").to_owned());
                let Ok(mut up) = TcpStream::connect(to).await else {
                    return;
                };
                let _ = up.write_all(&head).await;
                let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn http_proxy_from_the_environment_is_used() {
    let env = Env::new().await;
    let (proxy_addr, seen) = proxy(env.idp.addr).await;
    let gw = Gateway::spawn(
        &env.args(),
        &[
            ("HTTP_PROXY", format!("http://{proxy_addr}")),
            ("NO_PROXY", String::new()),
        ],
    );
    gw.wait_ready().await;
    let lines = seen.lock().expect("lock").clone();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("GET {}", env.idp.url))),
        "the JWKS fetch went through the proxy: {lines:?}"
    );
    // NO_PROXY takes the IdP out of the proxy's path.
    let (proxy_addr, seen) = proxy(env.idp.addr).await;
    let gw = Gateway::spawn(
        &env.args(),
        &[
            ("HTTP_PROXY", format!("http://{proxy_addr}")),
            ("NO_PROXY", "127.0.0.1".into()),
        ],
    );
    gw.wait_ready().await;
    assert!(seen.lock().expect("lock").is_empty());
}

#[tokio::test]
async fn a_redirect_is_followed() {
    let env = Env::new().await;
    let url = format!("http://{}/redirect", env.idp.addr);
    let gw = Gateway::spawn(&args_without_jwks(&env, &["--jwks-url", &url]), &[]);
    gw.wait_ready().await;
    let mut ws = ws_ok(&env, &gw, "/").await;
    ws.close(None).await.ok();
}

#[tokio::test]
async fn hostile_jwks_responses_neither_crash_nor_load_keys() {
    let env = Env::new().await;
    let hostile: [&'static [u8]; 4] = [
        // The chunk size that once wrapped `size + 2` and aborted the process.
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nab\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffe\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n{",
        b"HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551615\r\n\r\n",
    ];
    for bytes in hostile {
        env.idp.set_mode(IdpMode::Raw(bytes));
        let mut gw = Gateway::spawn(&env.args(), &[]);
        gw.wait_log(&["jwks_refresh_failed"]).await;
        assert_eq!(gw.admin_get("/readyz").await.0, 503);
        assert!(
            gw.child.try_wait().expect("wait").is_none(),
            "the gateway died"
        );
        // Recovery once the IdP behaves.
        env.idp.set_mode(IdpMode::Ok);
        gw.wait_ready().await;
        let _ = &mut gw;
    }
}

#[tokio::test]
async fn an_oversized_jwks_is_refused() {
    let env = Env::new().await;
    static BIG: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let big = BIG.get_or_init(|| {
        let body = format!(
            "{{\"keys\":[],\"pad\":\"{}\"}}",
            "x".repeat(2 * 1024 * 1024)
        );
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    });
    env.idp.set_mode(IdpMode::Raw(big));
    let gw = Gateway::spawn(&env.args(), &[]);
    let line = gw.wait_log(&["jwks_refresh_failed"]).await;
    assert!(line.contains("larger than"), "{line}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}
