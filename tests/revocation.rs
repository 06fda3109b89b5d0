//! Revocation across replicas, against real Redis and PostgreSQL servers: the authenticated admin API, the live
//! session on another replica closing with 1008, refusal at reconnect, an outage that loses nothing, the Go
//! gateway's Redis channel, and OIDC back-channel logout with each invalid variant.

mod common;

use std::time::{Duration, Instant};

use common::stores::{Postgres, Redis};
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ADMIN_SECRET: &str = "an-admin-secret-for-tests";

struct Fleet {
    _dir: TempDir,
    token_file: String,
}

impl Fleet {
    fn new() -> Fleet {
        let dir = TempDir::new("admin");
        let file = dir.path("admin-token");
        std::fs::write(&file, format!("{ADMIN_SECRET}\n")).expect("write");
        Fleet {
            token_file: file.to_str().expect("path").to_owned(),
            _dir: dir,
        }
    }

    async fn gateway(&self, env: &Env, extra: &[&str]) -> Gateway {
        let mut args = vec!["--admin-token-file", self.token_file.as_str()];
        args.extend_from_slice(extra);
        env.gateway(&args).await
    }
}

/// An HTTP request to the admin listener: (status, body).
async fn admin(
    gw: &Gateway,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: &str,
    ctype: &str,
) -> (u16, String) {
    within(async {
        let mut tcp = TcpStream::connect(gw.admin).await.expect("connect");
        let auth = auth.map(|a| format!("Authorization: Bearer {a}\r\n")).unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: a\r\n{auth}Content-Type: {ctype}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        tcp.write_all(req.as_bytes()).await.expect("write");
        let mut out = Vec::new();
        tcp.read_to_end(&mut out).await.expect("read");
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        (status, body)
    })
    .await
}

async fn revoke(gw: &Gateway, body: Value) -> (u16, Value) {
    let (status, text) = admin(
        gw,
        "POST",
        "/admin/revoke",
        Some(ADMIN_SECRET),
        &body.to_string(),
        "application/json",
    )
    .await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn token_with(env: &Env, sub: &str, extra: Value) -> (String, String) {
    let mut c = claims(sub, 300);
    let jti = format!("{sub}-{}", rand_suffix());
    c["jti"] = json!(jti);
    if let (Some(obj), Some(more)) = (c.as_object_mut(), extra.as_object()) {
        for (k, v) in more {
            obj.insert(k.clone(), v.clone());
        }
    }
    (env.signer.token(&c), jti)
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    now() as u64 * 1000 + N.fetch_add(1, Ordering::Relaxed)
}

/// Waits (at most `limit`) for the session's Close; returns its code and reason and how long it took.
async fn closed_within(ws: &mut Ws, limit: Duration) -> (u16, String, Duration) {
    let started = Instant::now();
    let (code, reason) = tokio::time::timeout(limit, next_close(ws))
        .await
        .expect("the session closed in time");
    (code, reason, started.elapsed())
}

#[tokio::test]
async fn the_api_is_authenticated_and_revokes_by_subject_on_this_replica() {
    let env = Env::new().await;
    let fleet = Fleet::new();
    let gw = fleet.gateway(&env, &[]).await;
    // Credentials.
    let body = json!({"sub": "alice"}).to_string();
    assert_eq!(
        admin(
            &gw,
            "POST",
            "/admin/revoke",
            None,
            &body,
            "application/json"
        )
        .await
        .0,
        401
    );
    assert_eq!(
        admin(
            &gw,
            "POST",
            "/admin/revoke",
            Some("wrong-secret-wrong-secret"),
            &body,
            "application/json"
        )
        .await
        .0,
        403
    );
    let plain = env.token();
    assert_eq!(
        admin(
            &gw,
            "POST",
            "/admin/revoke",
            Some(&plain),
            &body,
            "application/json"
        )
        .await
        .0,
        403,
        "a JWT without the role"
    );
    let (admin_jwt, _) = token_with(
        &env,
        "ops",
        json!({"realm_access": {"roles": ["ws-gateway-admin"]}}),
    );
    assert_eq!(
        admin(
            &gw,
            "GET",
            "/admin/sessions?sub=nobody",
            Some(&admin_jwt),
            "",
            "text/plain"
        )
        .await
        .0,
        200
    );
    assert_eq!(
        admin(
            &gw,
            "POST",
            "/admin/revoke",
            Some(ADMIN_SECRET),
            "{",
            "application/json"
        )
        .await
        .0,
        400
    );
    assert_eq!(
        admin(
            &gw,
            "POST",
            "/admin/revoke",
            Some(ADMIN_SECRET),
            "{}",
            "application/json"
        )
        .await
        .0,
        400
    );
    // Probes stay open.
    assert_eq!(gw.admin_get("/healthz").await.0, 200);

    let (token, jti) = token_with(&env, "alice", json!({"sid": "idp-session-1"}));
    let mut ws = connect_bearer(&env.pki, &gw, "/", &token)
        .await
        .expect("101");
    let (status, listed) = admin(
        &gw,
        "GET",
        "/admin/sessions?sub=alice",
        Some(ADMIN_SECRET),
        "",
        "text/plain",
    )
    .await;
    assert_eq!(status, 200);
    let listed: Value = serde_json::from_str(&listed).expect("json");
    assert_eq!(listed["sessions"][0]["jti"], json!(jti));
    assert_eq!(listed["sessions"][0]["sid"], json!("idp-session-1"));
    assert_eq!(listed["sessions"][0]["route"], json!("/"));

    let (status, answer) = revoke(&gw, json!({"sub": "alice", "reason": "account disabled"})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["sessions_closed"], json!(1));
    let (code, reason, _) = closed_within(&mut ws, Duration::from_secs(1)).await;
    assert_eq!((code, reason.as_str()), (1008, "token revoked"));
    // The same token (even from the verified-token cache) is refused; a token issued later (a fresh login) works.
    let refused = raw(
        &env.pki,
        gw.addr,
        upgrade("/", &format!("Authorization: Bearer {token}\r\n")).as_bytes(),
    )
    .await;
    assert_eq!(status_of(&refused), 401, "{refused}");
    assert!(refused.contains("token revoked"), "{refused}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (fresh, _) = token_with(&env, "alice", json!({"iat": now() + 1}));
    assert!(connect_bearer(&env.pki, &gw, "/", &fresh).await.is_ok());
    let line = gw
        .wait_log(&["\"event\":\"revoked\"", "\"kinds\":\"sub\""])
        .await;
    assert!(
        !line.contains(&token) && !line.contains(ADMIN_SECRET),
        "{line}"
    );
}

#[tokio::test]
async fn without_admin_settings_the_write_endpoints_say_how_to_turn_them_on() {
    let env = Env::new().await;
    let gw = env.gateway(&[]).await;
    let (status, body) = admin(
        &gw,
        "POST",
        "/admin/revoke",
        Some("anything-at-all-here"),
        "{\"sub\":\"a\"}",
        "application/json",
    )
    .await;
    assert_eq!(status, 403);
    assert!(body.contains("ADMIN_TOKEN_FILE"), "{body}");
}

async fn fan_out(env: &Env, a: &Gateway, b: &Gateway) {
    let (token, jti) = token_with(env, "bob", json!({}));
    let mut on_b = connect_bearer(&env.pki, b, "/", &token)
        .await
        .expect("101 on B");
    let (status, answer) = revoke(a, json!({"sub": "bob", "jti": jti})).await;
    assert_eq!(status, 200, "{answer}");
    let (code, reason, took) = closed_within(&mut on_b, Duration::from_secs(1)).await;
    assert_eq!((code, reason.as_str()), (1008, "token revoked"));
    eprintln!("fan-out to the other replica: {took:?}");
    for gw in [a, b] {
        assert_eq!(
            connect_bearer(&env.pki, gw, "/", &token).await.err(),
            Some(401)
        );
    }
}

#[tokio::test]
async fn redis_revocation_on_one_replica_closes_the_session_on_the_other() {
    let env = Env::new().await;
    let redis = Redis::start().await;
    let fleet = Fleet::new();
    let a = fleet.gateway(&env, &["--redis-url", &redis.url]).await;
    let b = fleet.gateway(&env, &["--redis-url", &redis.url]).await;
    b.wait_log(&["store_up"]).await;
    fan_out(&env, &a, &b).await;
    // A replica started later loads the active revocations.
    let (token, jti) = token_with(&env, "carol", json!({}));
    assert_eq!(revoke(&a, json!({"jti": jti})).await.0, 200);
    let c = fleet.gateway(&env, &["--redis-url", &redis.url]).await;
    c.wait_log(&["store_up"]).await;
    assert_eq!(
        connect_bearer(&env.pki, &c, "/", &token).await.err(),
        Some(401)
    );
}

#[tokio::test]
async fn a_revocation_made_while_redis_is_down_is_not_lost() {
    let env = Env::new().await;
    let mut redis = Redis::start().await;
    let fleet = Fleet::new();
    let a = fleet.gateway(&env, &["--redis-url", &redis.url]).await;
    let b = fleet.gateway(&env, &["--redis-url", &redis.url]).await;
    b.wait_log(&["store_up"]).await;
    let (token, jti) = token_with(&env, "dave", json!({}));
    let mut on_a = connect_bearer(&env.pki, &a, "/", &token)
        .await
        .expect("101 on A");
    let mut on_b = connect_bearer(&env.pki, &b, "/", &token)
        .await
        .expect("101 on B");
    redis.stop();
    a.wait_log(&["store_down"]).await;
    let (status, answer) = revoke(&a, json!({"jti": jti})).await;
    assert_eq!(status, 202, "{answer}");
    // Applied locally at once.
    let (code, _, _) = closed_within(&mut on_a, Duration::from_secs(1)).await;
    assert_eq!(code, 1008);
    // B has not heard yet; once Redis is back, A writes the queued revocation and B applies it.
    redis.restart().await;
    let closed = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match on_b.next().await {
                Some(Ok(tokio_tungstenite::tungstenite::Message::Close(Some(f)))) => {
                    return (u16::from(f.code), f.reason.to_string())
                }
                Some(Ok(_)) => {}
                other => panic!("expected a Close, got {other:?}"),
            }
        }
    })
    .await;
    let store_lines = |gw: &Gateway| {
        gw.logs()
            .into_iter()
            .filter(|l| l.contains("store_"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let Ok((code, reason)) = closed else {
        panic!(
            "B did not close: A:\n{}\nB:\n{}",
            store_lines(&a),
            store_lines(&b)
        );
    };
    assert_eq!((code, reason.as_str()), (1008, "token revoked"));
    let (_, metrics) = a.admin_get("/metrics").await;
    assert!(metrics.contains("ws_state_store_up 1"), "{metrics}");
}

#[tokio::test]
async fn the_go_gateway_channel_is_honoured_both_ways() {
    let env = Env::new().await;
    let redis = Redis::start().await;
    let fleet = Fleet::new();
    let gw = fleet.gateway(&env, &["--redis-url", &redis.url]).await;
    gw.wait_log(&["store_up"]).await;
    let (token, jti) = token_with(&env, "erin", json!({}));
    let mut ws = connect_bearer(&env.pki, &gw, "/", &token)
        .await
        .expect("101");
    // A Go replica publishes.
    let receivers = redis.cli(&["PUBLISH", &format!("ws:revocations:erin:{jti}"), "1"]);
    assert_eq!(receivers.trim(), "1");
    let (code, _, _) = closed_within(&mut ws, Duration::from_secs(1)).await;
    assert_eq!(code, 1008);
    // This gateway publishes in the Go format when both sub and jti are known.
    let mut sub = std::process::Command::new("redis-cli")
        .args([
            "-p",
            &redis.port.to_string(),
            "PSUBSCRIBE",
            "ws:revocations:*",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("redis-cli");
    let out = sub.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        revoke(&gw, json!({"sub": "frank", "jti": "frank-1"}))
            .await
            .0,
        200
    );
    let deadline = Instant::now() + T;
    let mut seen = false;
    while !seen && Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            seen = line.contains("ws:revocations:frank:frank-1");
        }
    }
    let _ = sub.kill();
    let _ = sub.wait();
    assert!(seen, "the Go-format publish was not seen");
}

#[tokio::test]
async fn postgres_revocation_reaches_the_other_replica_and_later_ones() {
    let env = Env::new().await;
    let pg = Postgres::start().await;
    let fleet = Fleet::new();
    let a = fleet.gateway(&env, &["--postgres-dsn", &pg.dsn]).await;
    let b = fleet.gateway(&env, &["--postgres-dsn", &pg.dsn]).await;
    a.wait_log(&["store_up"]).await;
    b.wait_log(&["store_up"]).await;
    fan_out(&env, &a, &b).await;
    let (token, jti) = token_with(&env, "grace", json!({}));
    assert_eq!(revoke(&a, json!({"jti": jti})).await.0, 200);
    let c = fleet.gateway(&env, &["--postgres-dsn", &pg.dsn]).await;
    c.wait_log(&["store_up"]).await;
    assert_eq!(
        connect_bearer(&env.pki, &c, "/", &token).await.err(),
        Some(401)
    );
}

fn logout_token(env: &Env, claims: Value) -> String {
    env.signer.sign(
        &json!({"alg": "RS256", "kid": "rsa-1", "typ": "logout+jwt"}),
        &claims,
    )
}

fn logout_claims(sid: &str) -> Value {
    json!({
        "iss": ISSUER, "aud": AUDIENCE, "iat": now(), "exp": now() + 120, "jti": format!("lo-{}", rand_suffix()),
        "sid": sid, "events": {"http://schemas.openid.net/event/backchannel-logout": {}}
    })
}

async fn post_logout(gw: &Gateway, token: &str) -> (u16, String) {
    admin(
        gw,
        "POST",
        "/oidc/backchannel-logout",
        None,
        &format!("logout_token={token}"),
        "application/x-www-form-urlencoded",
    )
    .await
}

#[tokio::test]
async fn backchannel_logout_closes_the_idp_session_and_refuses_bad_tokens() {
    let env = Env::new().await;
    let gw = env.gateway(&[]).await;
    let (token, _) = token_with(&env, "heidi", json!({"sid": "kc-session-7"}));
    let mut ws = connect_bearer(&env.pki, &gw, "/", &token)
        .await
        .expect("101");
    let (other, _) = token_with(&env, "heidi", json!({"sid": "kc-session-8"}));
    let mut other_ws = connect_bearer(&env.pki, &gw, "/", &other)
        .await
        .expect("101");
    assert!(next_text(&mut other_ws).await.starts_with("hello from"));

    let mut invalid = Vec::new();
    let mut c = logout_claims("kc-session-7");
    c.as_object_mut().expect("obj").remove("events");
    invalid.push(("no events", logout_token(&env, c)));
    let mut c = logout_claims("kc-session-7");
    c["nonce"] = json!("n");
    invalid.push(("nonce", logout_token(&env, c)));
    let mut c = logout_claims("kc-session-7");
    c["aud"] = json!("someone-else");
    invalid.push(("audience", logout_token(&env, c)));
    let mut c = logout_claims("kc-session-7");
    c["iss"] = json!("https://evil");
    invalid.push(("issuer", logout_token(&env, c)));
    let mut c = logout_claims("kc-session-7");
    c.as_object_mut().expect("obj").remove("jti");
    invalid.push(("jti", logout_token(&env, c)));
    let mut c = logout_claims("kc-session-7");
    c.as_object_mut().expect("obj").remove("sid");
    c.as_object_mut().expect("obj").remove("sub");
    invalid.push(("neither sub nor sid", logout_token(&env, c)));
    let good = logout_token(&env, logout_claims("kc-session-7"));
    let mut tampered = good.clone();
    tampered.pop();
    tampered.push(if good.ends_with('A') { 'B' } else { 'A' });
    invalid.push(("signature", tampered));
    invalid.push(("not a JWT", "garbage".to_owned()));
    for (what, t) in &invalid {
        let (status, body) = post_logout(&gw, t).await;
        assert_eq!(status, 400, "{what}: {body}");
        assert!(body.contains("\"error\""), "{what}: {body}");
    }

    let (status, _) = post_logout(&gw, &good).await;
    assert_eq!(status, 200);
    let (code, reason, _) = closed_within(&mut ws, Duration::from_secs(1)).await;
    assert_eq!((code, reason.as_str()), (1008, "token revoked"));
    // Replay of the same logout token.
    assert_eq!(post_logout(&gw, &good).await.0, 400);
    // The other IdP session of the same user is untouched.
    other_ws
        .send(tokio_tungstenite::tungstenite::Message::text("still here"))
        .await
        .expect("send");
    assert_eq!(next_text(&mut other_ws).await, "still here");
}
