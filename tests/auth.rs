//! Authentication at the edge, against a real JWKS server: attacks, token sources, algorithms, rotation, IdP
//! failures, refetch storms, expiry, Origin, and secrets kept out of logs and away from the upstream.

mod common;

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::*;
use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

fn b64(v: &serde_json::Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

/// HMAC-SHA256 over `input` keyed with `key` (the classic RS256 → HS256 confusion attack).
fn hs256(key: &[u8], input: &str) -> String {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    URL_SAFE_NO_PAD.encode(ring::hmac::sign(&k, input.as_bytes()).as_ref())
}

async fn expect_401(env: &Env, gw: &Gateway, token: &str, what: &str) {
    let before = env.upstream.count();
    let resp = raw(
        &env.pki,
        gw.addr,
        upgrade("/", &format!("Authorization: Bearer {token}\r\n")).as_bytes(),
    )
    .await;
    assert_eq!(status_of(&resp), 401, "{what}: {resp}");
    assert!(
        resp.contains("WWW-Authenticate: Bearer error=\"invalid_token\""),
        "{what}: {resp}"
    );
    if !token.is_empty() {
        assert!(!resp.contains(token), "{what}: the answer echoes the token");
    }
    assert_eq!(
        env.upstream.count(),
        before,
        "{what}: nothing may reach the upstream"
    );
}

#[tokio::test]
async fn attacks_are_refused_before_the_upstream() {
    let env = Env::new().await;
    let gw = env.gateway(&[]).await;
    let s = &env.signer;
    let good = claims("mallory", 300);
    let header = json!({"alg": "RS256", "typ": "JWT", "kid": s.kid});
    let valid = s.token(&good);
    let (h, rest) = valid.split_once('.').expect("dots");
    let (p, sig) = rest.split_once('.').expect("dots");

    let mut cases: Vec<(String, &str)> = Vec::new();
    cases.push((
        format!(
            "{}.{}.",
            b64(&json!({"alg": "none", "typ": "JWT"})),
            b64(&good)
        ),
        "alg none, empty signature",
    ));
    cases.push((
        format!("{}.{}.{}", b64(&json!({"alg": "none"})), b64(&good), sig),
        "alg none with a signature",
    ));
    // HS256 keyed with the RSA public key as published (its JWK JSON and its modulus).
    let hs_header = b64(&json!({"alg": "HS256", "typ": "JWT", "kid": s.kid}));
    let input = format!("{hs_header}.{}", b64(&good));
    let n = s.jwk()["n"].as_str().expect("n").to_owned();
    cases.push((
        format!("{input}.{}", hs256(s.jwk().to_string().as_bytes(), &input)),
        "HS256 with the JWK as key",
    ));
    cases.push((
        format!("{input}.{}", hs256(n.as_bytes(), &input)),
        "HS256 with the modulus as key",
    ));
    // ES256 signature presented under the RSA key's kid.
    let ec = Signer::es256("ec-attacker");
    cases.push((
        ec.sign(&json!({"alg": "ES256", "kid": s.kid}), &good),
        "alg/kty mismatch",
    ));
    // Tampering.
    let evil_payload =
        b64(&json!({"iss": ISSUER, "aud": AUDIENCE, "sub": "admin", "exp": now() + 300}));
    cases.push((format!("{h}.{evil_payload}.{sig}"), "tampered payload"));
    let mut bad_sig = URL_SAFE_NO_PAD.decode(sig).expect("sig");
    bad_sig[10] ^= 1;
    cases.push((
        format!("{h}.{p}.{}", URL_SAFE_NO_PAD.encode(bad_sig)),
        "tampered signature",
    ));
    // Claims.
    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut c = claims("mallory", 300);
        f(&mut c);
        s.token(&c)
    };
    cases.push((with(&|c| c["exp"] = json!(now() - 120)), "expired"));
    cases.push((
        with(&|c| c["nbf"] = json!(now() + 600)),
        "nbf in the future",
    ));
    cases.push((
        with(&|c| c["iss"] = json!("https://evil.example")),
        "wrong iss",
    ));
    cases.push((with(&|c| c["aud"] = json!(["someone-else"])), "wrong aud"));
    cases.push((
        with(&|c| {
            c.as_object_mut().expect("obj").remove("exp");
        }),
        "missing exp",
    ));
    cases.push((
        with(&|c| {
            c.as_object_mut().expect("obj").remove("aud");
        }),
        "missing aud",
    ));
    cases.push((
        with(&|c| c["exp"] = json!((now() + 300).to_string())),
        "exp as a string",
    ));
    // Headers.
    cases.push((
        s.sign(&json!({"alg": "RS256", "kid": "no-such-kid"}), &good),
        "unknown kid",
    ));
    cases.push((
        s.sign(
            &json!({"alg": "RS256", "kid": s.kid, "jku": "https://evil.example/jwks"}),
            &good,
        ),
        "jku",
    ));
    cases.push((
        s.sign(
            &json!({"alg": "RS256", "kid": s.kid, "x5u": "https://evil.example/cert"}),
            &good,
        ),
        "x5u",
    ));
    cases.push((
        s.sign(
            &json!({"alg": "RS256", "kid": s.kid, "jwk": s.jwk()}),
            &good,
        ),
        "embedded jwk",
    ));
    cases.push((
        s.sign(
            &json!({"alg": "RS256", "kid": s.kid, "crit": ["exp"]}),
            &good,
        ),
        "crit",
    ));
    cases.push((
        s.sign(&json!({"alg": "PS256", "kid": s.kid}), &good),
        "alg not configured",
    ));
    // Size and garbage.
    let mut big = claims("mallory", 300);
    big["pad"] = json!("x".repeat(9000));
    cases.push((s.sign(&header, &big), "oversize"));
    cases.push(("garbage".into(), "garbage"));
    cases.push(("a.b.c".into(), "not base64 JSON"));
    cases.push((format!("{h}.{p}"), "two segments"));

    for (token, what) in &cases {
        expect_401(&env, &gw, token, what).await;
    }
    expect_401(&env, &gw, "", "empty bearer").await;
    let resp = raw(&env.pki, gw.addr, upgrade("/", "").as_bytes()).await;
    assert_eq!(status_of(&resp), 401, "no token: {resp}");

    // The real token still works, and no token ever reached a log line.
    let mut ws = ws_ok(&env, &gw, "/").await;
    within(ws.send(Message::text("ok"))).await.expect("send");
    assert_eq!(next_text(&mut ws).await, "ok");
    let logs = gw.logs().join("\n");
    for (token, _) in &cases {
        for part in token.split('.').filter(|p| p.len() > 16) {
            assert!(!logs.contains(part), "a token fragment reached the logs");
        }
    }
    assert!(
        logs.contains("\"reason\":\"expired\"") && logs.contains("\"reason\":\"forbidden_header\""),
        "{logs}"
    );
}

#[tokio::test]
async fn every_token_source_works_and_none_reaches_the_upstream() {
    let env = Env::new().await;
    let gw = env
        .gateway(&[
            "--jwt-forward-claims",
            "email=X-Auth-Email",
            "--jwt-cookie-name",
            "sid",
        ])
        .await;
    let mut c = claims("alice", 300);
    c["email"] = json!("alice@example.com");
    let token = env.signer.token(&c);

    let header = format!("Bearer {token}");
    // Not `mqtt`: with JWT_FORWARD_CLAIMS set, an MQTT session's CONNECT is read first, and this upstream speaks first.
    let sub = format!("chat, bearer.{token}");
    let cookie = format!("theme=dark; sid={token}");
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, String);
    let sources: Vec<Case> = vec![
        (
            "header",
            vec![("Authorization", header.as_str())],
            "/".into(),
        ),
        (
            "subprotocol",
            vec![("Sec-WebSocket-Protocol", sub.as_str())],
            "/".into(),
        ),
        ("cookie", vec![("Cookie", cookie.as_str())], "/".into()),
        ("query", vec![], format!("/feed?x=1&access_token={token}")),
    ];
    for (name, headers, path) in sources {
        let mut ws = connect_ws(&env.pki, &gw, &path, &headers)
            .await
            .unwrap_or_else(|s| panic!("{name}: refused with {s}"));
        assert_eq!(next_text(&mut ws).await, "hello from echo", "{name}");
        let seen = env.upstream.last();
        assert!(
            !seen.raw().contains(&token),
            "{name}: the token reached the upstream: {}",
            seen.raw()
        );
        assert_eq!(seen.header("x-auth-subject"), Some("alice"), "{name}");
        assert_eq!(
            seen.header("x-auth-email"),
            Some("alice@example.com"),
            "{name}"
        );
        match name {
            "subprotocol" => assert_eq!(seen.header("sec-websocket-protocol"), Some("chat")),
            "cookie" => assert_eq!(seen.header("cookie"), Some("theme=dark")),
            "query" => assert_eq!(seen.target, "/feed?x=1"),
            _ => assert!(seen.header("authorization").is_none()),
        }
    }
    // The first source present wins: a bad header is not rescued by a good cookie.
    let resp = raw(
        &env.pki,
        gw.addr,
        upgrade(
            "/",
            &format!("Authorization: Bearer nope\r\nCookie: sid={token}\r\n"),
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(status_of(&resp), 401, "{resp}");
    // A client cannot forge identity headers.
    let spoof = format!(
        "Authorization: Bearer {token}\r\nX-Auth-Subject: root\r\nX-Auth-Email: root@evil\r\n"
    );
    let head = raw_head(&env.pki, gw.addr, &upgrade("/", &spoof)).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let seen = env.upstream.last();
    assert_eq!(
        seen.header("x-auth-subject"),
        Some("alice"),
        "{}",
        seen.raw()
    );
    assert!(!seen.raw().contains("root"), "{}", seen.raw());
    assert!(!gw.logs().join("\n").contains(&token));
}

#[tokio::test]
async fn es256_ps256_and_eddsa_when_configured() {
    let pki = Pki::new();
    let signers = [
        Signer::es256("ec-1"),
        Signer::ps256("ps-1"),
        Signer::eddsa("ed-1"),
        Signer::rs256("rs-1"),
    ];
    let idp = Idp::start(signers.iter().map(Signer::jwk).collect()).await;
    let upstream = Upstream::start("echo", None).await;
    let env = Env {
        pki,
        signer: Signer::rs256("rs-1"),
        idp,
        upstream,
    };
    let gw = env
        .gateway(&["--jwt-valid-algorithms", "ES256,PS256,EdDSA"])
        .await;
    for s in &signers[..3] {
        let t = s.valid("bob", 300);
        let mut ws = connect_bearer(&env.pki, &gw, "/", &t)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", s.alg()));
        assert_eq!(next_text(&mut ws).await, "hello from echo");
    }
    // RS256 is not in the configured list.
    expect_401(
        &env,
        &gw,
        &signers[3].valid("bob", 300),
        "RS256 not allowed",
    )
    .await;
}

#[tokio::test]
async fn key_rotation_is_picked_up_on_an_unknown_kid() {
    let env = Env::new().await;
    let gw = env.gateway(&["--jwks-refetch-interval-seconds", "1"]).await;
    ws_ok(&env, &gw, "/").await;
    let next = Signer::es256("rotated-2");
    env.idp.set_keys(vec![env.signer.jwk(), next.jwk()]);
    let gw2 = env
        .gateway(&[
            "--jwks-refetch-interval-seconds",
            "1",
            "--jwt-valid-algorithms",
            "RS256,ES256",
        ])
        .await;
    drop(gw);
    let t = next.valid("carol", 300);
    let mut ws = connect_bearer(&env.pki, &gw2, "/", &t)
        .await
        .expect("rotated key accepted");
    assert_eq!(next_text(&mut ws).await, "hello from echo");
    // A key added after start: the gateway refetches on the unknown kid.
    let third = Signer::es256("rotated-3");
    env.idp
        .set_keys(vec![env.signer.jwk(), next.jwk(), third.jwk()]);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let t = third.valid("carol", 300);
    let mut ws = connect_bearer(&env.pki, &gw2, "/", &t)
        .await
        .expect("new kid after refetch");
    assert_eq!(next_text(&mut ws).await, "hello from echo");
    gw2.wait_log(&["jwks_refreshed", "unknown_kid"]).await;
}

#[tokio::test]
async fn cached_keys_survive_an_idp_that_is_down_slow_or_broken() {
    let env = Env::new().await;
    let gw = env
        .gateway(&[
            "--jwks-refetch-interval-seconds",
            "1",
            "--jwks-fetch-timeout-seconds",
            "1",
        ])
        .await;
    for mode in [
        IdpMode::Down,
        IdpMode::Slow(Duration::from_secs(3)),
        IdpMode::Garbage,
    ] {
        env.idp.set_mode(mode);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        // An unknown kid forces a fetch against the broken IdP ...
        let stranger = Signer::rs256("stranger").valid("x", 300);
        let resp = raw(
            &env.pki,
            gw.addr,
            upgrade("/", &format!("Authorization: Bearer {stranger}\r\n")).as_bytes(),
        )
        .await;
        assert_eq!(status_of(&resp), 401, "{mode:?}: {resp}");
        // ... and the cached key keeps working.
        ws_ok(&env, &gw, "/").await;
        assert_eq!(
            gw.admin_get("/readyz").await.0,
            200,
            "{mode:?}: still ready on cached keys"
        );
    }
    gw.wait_log(&["jwks_refresh_failed", "keeping the last good keys"])
        .await;
    let (_, metrics) = gw.admin_get("/metrics").await;
    assert!(
        metrics.contains("ws_jwks_refreshes_total{result=\"error\",trigger=\"unknown_kid\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn no_keys_yet_means_503_then_recovery() {
    let env = Env::new().await;
    env.idp.set_mode(IdpMode::Down);
    let gw = Gateway::spawn(&env.args(), &[]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(gw.admin_get("/readyz").await.0, 503);
    let resp = raw(
        &env.pki,
        gw.addr,
        upgrade("/", &format!("Authorization: Bearer {}\r\n", env.token())).as_bytes(),
    )
    .await;
    assert_eq!(status_of(&resp), 503, "{resp}");
    assert_eq!(env.upstream.count(), 0);
    env.idp.set_mode(IdpMode::Ok);
    gw.wait_ready().await;
    ws_ok(&env, &gw, "/").await;
}

#[tokio::test]
async fn a_storm_of_unknown_kids_does_not_hammer_the_idp() {
    let env = Env::new().await;
    let gw = env
        .gateway(&["--jwt-valid-algorithms", "RS256,ES256"])
        .await;
    let before = env.idp.hits();
    let mut tasks = Vec::new();
    for i in 0..60 {
        let t = Signer::es256(&format!("random-{i}")).valid("storm", 300);
        let pki_client = env.pki.client.clone();
        let addr = gw.addr;
        tasks.push(tokio::spawn(async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let c = tokio_rustls::TlsConnector::from(pki_client);
            let mut s = c
                .connect(
                    rustls_pki_types::ServerName::try_from("localhost").expect("n"),
                    tcp,
                )
                .await
                .expect("tls");
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            s.write_all(upgrade("/", &format!("Authorization: Bearer {t}\r\n")).as_bytes())
                .await
                .expect("w");
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out).await;
            status_of(&String::from_utf8_lossy(&out))
        }));
    }
    for t in tasks {
        assert_eq!(within(t).await.expect("join"), 401);
    }
    let fetches = env.idp.hits() - before;
    assert!(fetches <= 2, "{fetches} JWKS fetches for 60 unknown kids");
}

#[tokio::test]
async fn a_session_ends_with_1008_when_its_token_expires() {
    let env = Env::new().await;
    let gw = env.gateway(&["--jwt-leeway-seconds", "0"]).await;
    let t = env.signer.valid("dave", 2);
    let mut ws = connect_bearer(&env.pki, &gw, "/", &t)
        .await
        .expect("upgrade");
    assert_eq!(next_text(&mut ws).await, "hello from echo");
    within(ws.send(Message::text("before expiry")))
        .await
        .expect("send");
    assert_eq!(next_text(&mut ws).await, "before expiry");
    let (code, reason) = next_close(&mut ws).await;
    assert_eq!((code, reason.as_str()), (1008, "token expired"));
    let line = gw.wait_log(&["session_end", "token_expired"]).await;
    assert!(
        line.contains("\"close_code\":1008") && line.contains("\"subject\":\"dave\""),
        "{line}"
    );
}

#[tokio::test]
async fn origin_policy() {
    let env = Env::new().await;
    let token = env.token();
    let auth = format!("Authorization: Bearer {token}\r\n");
    let gw = env
        .gateway(&[
            "--ws-allowed-origins",
            "https://app.example.com, https://*.example.org",
        ])
        .await;
    for (origin, status) in [
        ("https://app.example.com", 101),
        ("https://chat.example.org", 101),
        ("https://example.org", 403),
        ("https://evil.example", 403),
        ("http://app.example.com", 403),
        ("null", 403),
    ] {
        let head = raw_head(
            &env.pki,
            gw.addr,
            &upgrade("/", &format!("{auth}Origin: {origin}\r\n")),
        )
        .await;
        assert_eq!(status_of(&head), status, "{origin}: {head}");
    }
    assert_eq!(
        status_of(&raw_head(&env.pki, gw.addr, &upgrade("/", &auth)).await),
        101,
        "no Origin: non-browser client"
    );
    // Required Origin.
    let gw = env
        .gateway(&[
            "--ws-allowed-origins",
            "https://app.example.com",
            "--ws-require-origin",
        ])
        .await;
    assert_eq!(
        status_of(&raw_head(&env.pki, gw.addr, &upgrade("/", &auth)).await),
        403
    );
    // Unset: no browser Origin at all.
    let gw = env.gateway(&[]).await;
    let head = raw_head(
        &env.pki,
        gw.addr,
        &upgrade("/", &format!("{auth}Origin: https://app.example.com\r\n")),
    )
    .await;
    assert_eq!(status_of(&head), 403);
    // Explicit `*`.
    let gw = env.gateway(&["--ws-allowed-origins", "*"]).await;
    let head = raw_head(
        &env.pki,
        gw.addr,
        &upgrade("/", &format!("{auth}Origin: https://anything.example\r\n")),
    )
    .await;
    assert_eq!(status_of(&head), 101);
}

#[tokio::test]
async fn verified_tokens_are_cached_until_their_key_is_withdrawn() {
    let env = Env::new().await;
    let gw = env.gateway(&["--jwks-refetch-interval-seconds", "1"]).await;
    let token = env.token();
    for _ in 0..3 {
        let mut ws = connect_bearer(&env.pki, &gw, "/", &token)
            .await
            .expect("ok");
        assert_eq!(next_text(&mut ws).await, "hello from echo");
    }
    let (_, text) = gw.admin_get("/metrics").await;
    assert!(
        text.contains("ws_token_cache_total{result=\"miss\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("ws_token_cache_total{result=\"hit\"} 2\n"),
        "{text}"
    );
    // The IdP withdraws the key; once the gateway has refetched, the cached token no longer opens a session.
    let other = Signer::es256("replacement");
    env.idp.set_keys(vec![other.jwk()]);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let unknown = Signer::rs256("unknown-kid").valid("x", 300);
    let resp = raw(
        &env.pki,
        gw.addr,
        upgrade("/", &format!("Authorization: Bearer {unknown}\r\n")).as_bytes(),
    )
    .await;
    assert_eq!(status_of(&resp), 401);
    gw.wait_log(&["jwks_refreshed", "unknown_kid"]).await;
    let resp = raw(
        &env.pki,
        gw.addr,
        upgrade("/", &format!("Authorization: Bearer {token}\r\n")).as_bytes(),
    )
    .await;
    assert_eq!(status_of(&resp), 401, "{resp}");
}
