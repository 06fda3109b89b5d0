//! Configuration through the real binary: `--check-config`, precedence flags > env > file > defaults, and errors
//! that name the setting.

mod common;

use std::process::Command;

use common::*;

fn check(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = Command::new(Gateway::bin());
    cmd.arg("--check-config").args(args).env_clear();
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

const BASE: &[(&str, &str)] = &[
    ("JWKS_URL", "https://idp.example/certs"),
    ("UPSTREAM_WS_URL", "ws://broker:9001/ws"),
];

#[test]
fn a_valid_configuration_passes() {
    let pki = Pki::new();
    let (code, out) = check(
        &[
            "--tls-cert",
            pki.gw_cert.to_str().expect("p"),
            "--tls-key",
            pki.gw_key.to_str().expect("p"),
        ],
        BASE,
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("configuration OK") && out.contains("tls=true"),
        "{out}"
    );
}

#[test]
fn each_bad_setting_is_named() {
    let pki = Pki::new();
    let dir = TempDir::new("cfg");
    let bad_routes = dir.path("routes.yaml");
    std::fs::write(&bad_routes, "- prefix: /a\n  upstream: http://not-ws/\n").expect("write");
    let bad_acl_routes = dir.path("acl-routes.yaml");
    std::fs::write(
        &bad_acl_routes,
        "- prefix: /a\n  upstream: ws://a:1/\n  mqttSubscribeAcl: ['devices/{claim:}/#']\n",
    )
    .expect("write");
    let garbage = dir.path("garbage.pem");
    std::fs::write(&garbage, "not pem").expect("write");
    let cert = pki.gw_cert.to_str().expect("p");
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (vec!["--tls-cert", cert], vec![], "TLS_KEY_FILE"),
        (
            vec![
                "--tls-cert",
                "/nonexistent.pem",
                "--tls-key",
                "/nonexistent.key",
            ],
            vec![],
            "TLS_CERT_FILE",
        ),
        (
            vec![
                "--tls-cert",
                cert,
                "--tls-key",
                garbage.to_str().expect("p"),
            ],
            vec![],
            "TLS_KEY_FILE",
        ),
        (
            vec![],
            vec![("UPSTREAM_WS_URL", "http://broker/")],
            "UPSTREAM_WS_URL",
        ),
        (
            vec!["--route-file", bad_routes.to_str().expect("p")],
            vec![],
            "ROUTE_FILE",
        ),
        (
            vec![],
            vec![("WS_IDLE_TIMEOUT_SECONDS", "soon")],
            "--ws-idle-timeout-seconds",
        ),
        (
            vec![],
            vec![("JWT_VALID_ALGORITHMS", "HS256")],
            "JWT_VALID_ALGORITHMS",
        ),
        (
            vec![],
            vec![("WS_ALLOWED_ORIGINS", "example.com")],
            "WS_ALLOWED_ORIGINS",
        ),
        (vec![], vec![("JWKS_URL", "ftp://idp/")], "JWKS_URL"),
        (
            vec![],
            vec![("PROXY_PROTOCOL", "true")],
            "PROXY_PROTOCOL_TRUSTED_CIDRS",
        ),
        (
            vec![],
            vec![("REDIS_URL", "http://redis:6379")],
            "REDIS_URL",
        ),
        (vec![], vec![("LOG_FORMAT", "yaml")], "--log-format"),
        (
            vec![],
            vec![("UPSTREAM_WS_URL", "ws://a/,ftp://b/")],
            "UPSTREAM_WS_URL",
        ),
        (
            vec![],
            vec![("UPSTREAM_BALANCE", "round-robin")],
            "UPSTREAM_BALANCE (--upstream-balance)",
        ),
        (
            vec![],
            vec![("UPSTREAM_DNS_REFRESH_SECONDS", "0")],
            "UPSTREAM_DNS_REFRESH_SECONDS (--upstream-dns-refresh-seconds)",
        ),
        (
            vec![],
            vec![("CB_FAILURE_THRESHOLD", "0")],
            "CB_FAILURE_THRESHOLD (--cb-failure-threshold)",
        ),
        (
            vec![],
            vec![("CB_OPEN_TIMEOUT_SECONDS", "86400")],
            "CB_OPEN_TIMEOUT_SECONDS (--cb-open-timeout-seconds)",
        ),
        (
            vec![],
            vec![("CB_HEALTHCHECK_INTERVAL_SECONDS", "-1")],
            "CB_HEALTHCHECK_INTERVAL_SECONDS (--cb-healthcheck-interval-seconds)",
        ),
        (
            vec![],
            vec![("WS_DIAL_RETRY_MAX", "11")],
            "WS_DIAL_RETRY_MAX (--ws-dial-retry-max)",
        ),
        (
            vec![],
            vec![("WS_DIAL_RETRY_INTERVAL_SECONDS", "nan")],
            "WS_DIAL_RETRY_INTERVAL_SECONDS (--ws-dial-retry-interval-seconds)",
        ),
        (
            vec![],
            vec![("READINESS_REQUIRES_UPSTREAM", "maybe")],
            "READINESS_REQUIRES_UPSTREAM (--readiness-requires-upstream)",
        ),
        (
            vec!["--mqtt-publish-acl", "devices/{sub}/#,a/#/b"],
            vec![],
            "MQTT_PUBLISH_ACL (--mqtt-publish-acl)",
        ),
        (
            vec![],
            vec![("MQTT_SUBSCRIBE_ACL", "devices/{user}/#")],
            "MQTT_SUBSCRIBE_ACL (--mqtt-subscribe-acl)",
        ),
        (
            vec!["--mqtt-acl-deny-action", "kick"],
            vec![],
            "MQTT_ACL_DENY_ACTION (--mqtt-acl-deny-action)",
        ),
        (
            vec![],
            vec![("MQTT_REAUTH_METHOD", "jwt\u{7}")],
            "MQTT_REAUTH_METHOD (--mqtt-reauth-method)",
        ),
        (
            vec!["--route-file", bad_acl_routes.to_str().expect("p")],
            vec![],
            "mqttSubscribeAcl",
        ),
    ];
    for (args, extra, needle) in cases {
        let mut env: Vec<(&str, &str)> = BASE.to_vec();
        for (k, v) in &extra {
            env.retain(|(n, _)| n != k);
            env.push((k, v));
        }
        let (code, out) = check(&args, &env);
        assert_eq!(code, 1, "{args:?} {extra:?}: {out}");
        assert!(
            out.contains(needle),
            "{args:?} {extra:?} should name {needle}: {out}"
        );
    }
    let (code, out) = check(&[], &[("UPSTREAM_WS_URL", "ws://b/")]);
    assert_eq!(code, 1);
    assert!(out.contains("JWKS_URL"), "{out}");
}

#[test]
fn file_keys_are_checked_and_named() {
    let dir = TempDir::new("cfg");
    let file = dir.path("gw.toml");
    std::fs::write(&file, "jwks_url = \"https://idp/certs\"\nupstream_ws_url = \"ws://b/\"\nws_idle_timout_seconds = 5\n").expect("w");
    let (code, out) = check(&["--config", file.to_str().expect("p")], &[]);
    assert_eq!(code, 1);
    assert!(out.contains("ws_idle_timout_seconds"), "{out}");
    std::fs::write(&file, "jwks_url = \"https://idp/certs\"\nupstream_ws_url = \"ws://b/\"\nmax_connections = \"many\"\n").expect("w");
    let (code, out) = check(&[], &[("WS_GATEWAY_CONFIG", file.to_str().expect("p"))]);
    assert_eq!(code, 1);
    assert!(out.contains("max_connections"), "{out}");
}

#[tokio::test]
async fn flags_beat_env_beat_file_beat_defaults() {
    let env = Env::new().await;
    let dir = TempDir::new("cfg");
    let file = dir.path("gw.toml");
    // The file sets a wrong issuer (overridden by env) and a short idle timeout (kept); env sets a cookie name
    // that the flag overrides.
    std::fs::write(
        &file,
        format!(
            "jwks_url = \"{}\"\njwt_expected_issuer = \"https://wrong\"\njwt_expected_audience = \"{AUDIENCE}\"\n\
upstream_ws_url = \"{}\"\nws_idle_timeout_seconds = 1\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
            env.idp.url,
            env.upstream.url,
            env.pki.gw_cert.display(),
            env.pki.gw_key.display()
        ),
    )
    .expect("write");
    let gw = Gateway::spawn(
        &[
            "--config".into(),
            file.to_str().expect("p").into(),
            "--jwt-cookie-name".into(),
            "flagcookie".into(),
        ],
        &[
            ("JWT_EXPECTED_ISSUER", ISSUER.to_owned()),
            ("JWT_COOKIE_NAME", "envcookie".to_owned()),
        ],
    );
    gw.wait_ready().await;
    let token = env.token();
    // Env issuer won over the file's; the flag's cookie name won over env's.
    let mut ws = connect_ws(
        &env.pki,
        &gw,
        "/",
        &[("Cookie", &format!("flagcookie={token}"))],
    )
    .await
    .expect("flag cookie");
    assert_eq!(next_text(&mut ws).await, "hello from echo");
    assert_eq!(
        connect_ws(
            &env.pki,
            &gw,
            "/",
            &[("Cookie", &format!("envcookie={token}"))]
        )
        .await
        .err(),
        Some(401)
    );
    // The file's idle timeout applies (default would be 60 s).
    let (code, _) = next_close(&mut ws).await;
    assert_eq!(code, 1001);
}

/// Every key of `scripts/config.example.toml`, commented out or not, is a real setting that survives the merge of
/// file under flags: a key the merge forgot would leave the merged settings equal to the defaults.
#[test]
fn every_key_of_the_example_file_reaches_the_settings() {
    let text = include_str!("../scripts/config.example.toml");
    let mut keys = 0;
    for line in text.lines() {
        let line = line.trim_start_matches("# ");
        let Some((key, value)) = line.split_once(" = ") else {
            continue;
        };
        if !key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
            continue;
        }
        keys += 1;
        let file: ws_gateway::Settings =
            toml::from_str(&format!("{key} = {value}")).unwrap_or_else(|e| panic!("{key}: {e}"));
        let merged = ws_gateway::Settings::default().merge(file);
        assert_ne!(
            format!("{merged:?}"),
            format!("{:?}", ws_gateway::Settings::default()),
            "{key} was dropped by the merge"
        );
    }
    assert!(keys >= 40, "only {keys} keys found");
}

#[test]
fn the_topic_rules_and_reauthentication_are_set_by_flag_env_and_file() {
    let dir = TempDir::new("cfg");
    let routes = dir.path("routes.yaml");
    std::fs::write(
        &routes,
        "- prefix: /a\n  upstream: ws://a:1/\n  mqttPublishAcl: devices/{sub}/#, t/{claim:tenant}/#\n\
- prefix: /b\n  upstream: ws://b:1/\n  mqtt_subscribe_acl: ['devices/{sub}/#']\n",
    )
    .expect("write");
    let file = dir.path("gw.toml");
    std::fs::write(
        &file,
        "mqtt_publish_acl = [\"devices/{sub}/#\"]\nmqtt_acl_deny_action = \"disconnect\"\nmqtt_reauth_method = \"\"\n",
    )
    .expect("write");
    let (code, out) = check(
        &[
            "--config",
            file.to_str().expect("p"),
            "--route-file",
            routes.to_str().expect("p"),
            "--mqtt-subscribe-acl",
            "devices/{sub}/+/t,$share/g/x",
        ],
        &[BASE, &[("MQTT_REAUTH_METHOD", "token")]].concat(),
    );
    assert_eq!(code, 0, "{out}");
}
