//! Typed, validated configuration: flags > environment > TOML file > defaults.
//!
//! One struct, [`Settings`], is both the clap parser (flags and environment) and the serde shape of the file, so a
//! setting cannot exist in one place and be missing from the other. Every field is an `Option`; [`Settings::merge`]
//! layers flags and environment over the file, and [`Settings::resolve`] applies defaults and validates everything
//! into a [`Config`]. Errors name the setting by its environment name and its flag.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Parser};
use serde::Deserialize;

use crate::auth::origin::OriginPolicy;
use crate::auth::Algorithm;
use crate::mqtt_acl::{AclSettings, Template};
use crate::mqtt_identity::MqttSettings;
use crate::net::WsUrl;
use crate::proxy_protocol::Cidr;
use crate::route::RouteTable;
use crate::store::StoreConfig;

/// A configuration problem, naming the setting it is about.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {message}")]
pub struct ConfigError {
    /// The setting, as `ENV_NAME (--flag)`, or the config file.
    pub setting: String,
    /// What is wrong, never including a secret value.
    pub message: String,
}

impl ConfigError {
    /// Every message passes through [`redact`]: a value echoed by a parser (a DSN, a URL) loses its secrets.
    fn new(setting: &str, message: impl Into<String>) -> Self {
        ConfigError {
            setting: setting.to_owned(),
            message: redact(&message.into()),
        }
    }
}

/// Hides credentials in text that may quote a setting's value: the password of a URL's userinfo
/// (`scheme://user:***@host`), a URL's query (`?***`), and `password=` pairs of key/value DSNs.
#[must_use]
pub fn redact(text: &str) -> String {
    let stop = |c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '`' | ',' | ')' | ']');
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        out.push_str(&rest[..at + 3]);
        rest = &rest[at + 3..];
        let end = rest.find(stop).unwrap_or(rest.len());
        let (url, tail) = rest.split_at(end);
        let (authority, path) = url.split_at(url.find(['/', '?', '#']).unwrap_or(url.len()));
        match authority.rsplit_once('@') {
            Some((userinfo, host)) => {
                let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
                out.push_str(&format!("{user}:***@{host}"));
            }
            None => out.push_str(authority),
        }
        match path.split_once('?') {
            Some((p, _)) => out.push_str(&format!("{p}?***")),
            None => out.push_str(path),
        }
        rest = tail;
    }
    out.push_str(rest);
    // key=value DSNs: `password=secret` or `password='secret'`.
    let lower = out.to_ascii_lowercase();
    let mut result = String::with_capacity(out.len());
    let mut i = 0;
    while let Some(found) = lower[i..].find("password=") {
        let start = i + found + "password=".len();
        result.push_str(&out[i..start]);
        result.push_str("***");
        let value = &out[start..];
        let len = if let Some(quoted) = value.strip_prefix('\'') {
            quoted.find('\'').map_or(value.len(), |e| e + 2)
        } else {
            value.find(stop).unwrap_or(value.len())
        };
        i = start + len;
    }
    result.push_str(&out[i..]);
    result
}

/// A comma-separated list, given as one string (flags, environment) or as a TOML array.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommaList(pub Vec<String>);

impl FromStr for CommaList {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(CommaList(
            s.split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(str::to_owned)
                .collect(),
        ))
    }
}

impl<'de> Deserialize<'de> for CommaList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            One(String),
            Many(Vec<String>),
        }
        Ok(match Either::deserialize(d)? {
            Either::One(s) => s.parse().unwrap_or_default(),
            Either::Many(v) => CommaList(
                v.into_iter()
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .collect(),
            ),
        })
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line, for EFK stacks.
    #[default]
    Json,
    /// Human-readable lines for a terminal.
    Text,
}

/// How a new session picks among a route's endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    /// The endpoint holding the fewest sessions and dials; ties take turns.
    #[default]
    LeastConnections,
    /// Rendezvous hashing on the verified `sub`: a subject keeps its endpoint while the set is unchanged.
    HashSubject,
}

/// Every setting, as flags and environment variables (clap) and as TOML keys (serde).
///
/// Flag names are the kebab-case of the environment names and file keys their snake_case; the few historical
/// short forms (`--listen`, `--tls-cert`) are the primary flags, with the long forms as aliases.
#[derive(Debug, Default, Clone, Parser, Deserialize)]
#[command(
    name = "ws-gateway",
    version,
    about = "A TLS edge for WebSocket traffic: JWT at the upgrade, Origin policy, raw relay.",
    long_about = None,
    after_help = "Required: JWKS_URL (--jwks-url), and UPSTREAM_WS_URL (--upstream-ws-url) or ROUTE_FILE \
(--route-file); or --dev for a local demo. Every flag can also be set by the environment variable shown, or by a \
snake_case key in the --config TOML file (flags > environment > file > defaults). Log verbosity: RUST_LOG \
(e.g. RUST_LOG=debug). Defaults not shown are documented in the README's configuration table."
)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// TOML configuration file.
    #[arg(long = "config", env = "WS_GATEWAY_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Validate every setting (files, certificates, URLs, routes) and exit 0, or 1 naming the bad setting.
    #[arg(long = "check-config", action = ArgAction::SetTrue)]
    #[serde(skip)]
    pub check_config: bool,

    /// Insecure one-command demo: in-memory certificate, dev signing key and token, echo upstream, loopback only.
    #[arg(long = "dev", action = ArgAction::SetTrue)]
    #[serde(skip)]
    pub dev: bool,

    /// Address of the WebSocket listener.
    #[arg(
        long = "listen",
        visible_alias = "listen-addr",
        env = "LISTEN_ADDR",
        value_name = "ADDR"
    )]
    #[serde(alias = "listen")]
    pub listen_addr: Option<SocketAddr>,

    /// Address of the admin listener (/healthz, /readyz, /metrics).
    #[arg(
        long = "admin-listen",
        visible_alias = "admin-listen-addr",
        env = "ADMIN_LISTEN_ADDR",
        value_name = "ADDR"
    )]
    #[serde(alias = "admin_listen")]
    pub admin_listen_addr: Option<SocketAddr>,

    /// PEM certificate chain; with --tls-key the gateway terminates TLS, without both it serves plain HTTP.
    #[arg(
        long = "tls-cert",
        visible_alias = "tls-cert-file",
        env = "TLS_CERT_FILE",
        value_name = "FILE"
    )]
    #[serde(alias = "tls_cert")]
    pub tls_cert_file: Option<PathBuf>,

    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    #[arg(
        long = "tls-key",
        visible_alias = "tls-key-file",
        env = "TLS_KEY_FILE",
        value_name = "FILE"
    )]
    #[serde(alias = "tls_key")]
    pub tls_key_file: Option<PathBuf>,

    /// Fallback upstream for paths no route matches: ws:// or wss:// URLs (comma list), each address of each name
    /// an endpoint.
    #[arg(long, env = "UPSTREAM_WS_URL", value_name = "URL,...")]
    pub upstream_ws_url: Option<CommaList>,

    /// routes.yaml in the Go gateway's format: a list of {prefix, upstream, copySubProtocol, preserveQuery}.
    #[arg(long, env = "ROUTE_FILE", value_name = "FILE")]
    pub route_file: Option<PathBuf>,

    /// Extra PEM CA certificates trusted for wss:// upstreams, besides the webpki roots.
    #[arg(long, env = "UPSTREAM_CA_FILE", value_name = "FILE")]
    pub upstream_ca_file: Option<PathBuf>,

    /// Time allowed to connect to the upstream and receive its 101.
    #[arg(long, env = "UPSTREAM_DIAL_TIMEOUT_SECONDS", value_name = "SECONDS")]
    pub upstream_dial_timeout_seconds: Option<u64>,

    /// A session with no bytes moving either way for this long is closed.
    #[arg(long, env = "WS_IDLE_TIMEOUT_SECONDS", value_name = "SECONDS")]
    pub ws_idle_timeout_seconds: Option<u64>,

    /// A peer that accepts no bytes for this long while the gateway writes to it is cut off.
    #[arg(long, env = "WS_WRITE_TIMEOUT_SECONDS", value_name = "SECONDS")]
    pub ws_write_timeout_seconds: Option<u64>,

    /// Time allowed for the TLS handshake plus the request head.
    #[arg(long, env = "HANDSHAKE_TIMEOUT_SECONDS", value_name = "SECONDS")]
    pub handshake_timeout_seconds: Option<u64>,

    /// Connections held at once; further clients wait in the listen backlog.
    #[arg(long, env = "MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,

    /// Largest request head accepted (431 beyond).
    #[arg(long, env = "MAX_REQUEST_HEAD_BYTES", value_name = "BYTES")]
    pub max_request_head_bytes: Option<usize>,

    /// On SIGTERM, how long open sessions may carry on before they receive Close 1001.
    #[arg(long, env = "GRACEFUL_DRAIN_TIMEOUT_SECONDS", value_name = "SECONDS")]
    pub graceful_drain_timeout_seconds: Option<u64>,

    /// Where the identity provider publishes its signing keys (http:// or https://).
    #[arg(long, env = "JWKS_URL", value_name = "URL")]
    pub jwks_url: Option<String>,

    /// OpenID Connect issuer: when JWKS_URL is not set, the JWKS URL is the `jwks_uri` of
    /// `{issuer}/.well-known/openid-configuration`, and JWT_EXPECTED_ISSUER defaults to it.
    #[arg(long, env = "OIDC_ISSUER_URL", value_name = "URL")]
    pub oidc_issuer_url: Option<String>,

    /// How often the JWKS is refreshed in the background.
    #[arg(long, env = "JWKS_TTL_MINUTES", value_name = "MINUTES")]
    pub jwks_ttl_minutes: Option<u64>,

    /// Least time between two fetches caused by tokens with an unknown `kid`.
    #[arg(long, env = "JWKS_REFETCH_INTERVAL_SECONDS", value_name = "SECONDS")]
    pub jwks_refetch_interval_seconds: Option<u64>,

    /// Time allowed for one JWKS fetch.
    #[arg(long, env = "JWKS_FETCH_TIMEOUT_SECONDS", value_name = "SECONDS")]
    pub jwks_fetch_timeout_seconds: Option<u64>,

    /// Extra PEM CA certificates trusted for an https:// JWKS_URL.
    #[arg(long, env = "JWKS_CA_FILE", value_name = "FILE")]
    pub jwks_ca_file: Option<PathBuf>,

    /// Required `iss` claim.
    #[arg(long, env = "JWT_EXPECTED_ISSUER", value_name = "ISS")]
    pub jwt_expected_issuer: Option<String>,

    /// Accepted audiences (comma list); the token's `aud` must contain one of them.
    #[arg(long, env = "JWT_EXPECTED_AUDIENCE", value_name = "AUD,...")]
    pub jwt_expected_audience: Option<CommaList>,

    /// Accepted signature algorithms (comma list of RS256/384/512, PS256/384/512, ES256/384, EdDSA).
    #[arg(long, env = "JWT_VALID_ALGORITHMS", value_name = "ALG,...")]
    pub jwt_valid_algorithms: Option<CommaList>,

    /// Clock-skew allowance for exp, nbf and iat.
    #[arg(long, env = "JWT_LEEWAY_SECONDS", value_name = "SECONDS")]
    pub jwt_leeway_seconds: Option<u64>,

    /// Largest token accepted, in bytes.
    #[arg(long, env = "JWT_MAX_TOKEN_BYTES", value_name = "BYTES")]
    pub jwt_max_token_bytes: Option<usize>,

    /// Cookie that carries the token.
    #[arg(long, env = "JWT_COOKIE_NAME", value_name = "NAME")]
    pub jwt_cookie_name: Option<String>,

    /// Query parameter that carries the token.
    #[arg(long, env = "JWT_QUERY_PARAM", value_name = "NAME")]
    pub jwt_query_param: Option<String>,

    /// Claims forwarded upstream as headers, as `claim=Header-Name` pairs (comma list).
    #[arg(long, env = "JWT_FORWARD_CLAIMS", value_name = "CLAIM=HEADER,...")]
    pub jwt_forward_claims: Option<CommaList>,

    /// Allowed browser Origins (comma list): exact origins, `https://*.example.com`, or `*` for any.
    #[arg(long, env = "WS_ALLOWED_ORIGINS", value_name = "ORIGIN,...")]
    pub ws_allowed_origins: Option<CommaList>,

    /// Refuse upgrades that carry no Origin header.
    #[arg(long, env = "WS_REQUIRE_ORIGIN", value_name = "BOOL", action = ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub ws_require_origin: Option<bool>,

    /// Accept the JWT as the MQTT CONNECT password when the upgrade carries none and offers `mqtt`.
    #[arg(long, env = "MQTT_CONNECT_AUTH", value_name = "BOOL", action = ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub mqtt_connect_auth: Option<bool>,

    /// On MQTT routes, the CONNECT username becomes this claim's value from the verified token (per route:
    /// `mqttUsernameClaim`) [default: the client's username].
    #[arg(long, env = "MQTT_USERNAME_CLAIM", value_name = "CLAIM")]
    pub mqtt_username_claim: Option<String>,

    /// `plain` writes the username as it is; `go` writes the Go gateway's `<user>|<role1,role2>` [default: plain].
    #[arg(long, env = "MQTT_USERNAME_FORMAT", value_name = "FORMAT")]
    pub mqtt_username_format: Option<String>,

    /// `keep` forwards the CONNECT password; `drop` removes it (and its flag) [default: keep].
    #[arg(long, env = "MQTT_PASSWORD_FORWARD", value_name = "keep|drop")]
    pub mqtt_password_forward: Option<String>,

    /// `any`, `prefix-subject` (`sub`, or `sub` then `-`, `_`, `:` or `.`) or `equal-subject`: which client ids
    /// a token may use [default: any].
    #[arg(long, env = "MQTT_CLIENT_ID_POLICY", value_name = "POLICY")]
    pub mqtt_client_id_policy: Option<String>,

    /// MQTT routes: topic-filter templates a PUBLISH topic must match (comma list; `{sub}`, `{claim:NAME}`), e.g.
    /// `devices/{sub}/#` (per route: `mqttPublishAcl`) [default: unchecked].
    #[arg(long, env = "MQTT_PUBLISH_ACL", value_name = "TEMPLATE,...")]
    pub mqtt_publish_acl: Option<CommaList>,

    /// MQTT routes: topic-filter templates a SUBSCRIBE filter must lie within (comma list, as for
    /// MQTT_PUBLISH_ACL; per route: `mqttSubscribeAcl`) [default: unchecked].
    #[arg(long, env = "MQTT_SUBSCRIBE_ACL", value_name = "TEMPLATE,...")]
    pub mqtt_subscribe_acl: Option<CommaList>,

    /// `ignore` drops a PUBLISH or fails a SUBSCRIBE entry outside the rules; `disconnect` ends the session
    /// (MQTT 5 DISCONNECT 0x87, Close 1008) [default: ignore].
    #[arg(long, env = "MQTT_ACL_DENY_ACTION", value_name = "ignore|disconnect")]
    pub mqtt_acl_deny_action: Option<String>,

    /// MQTT 5 Authentication Method whose AUTH (reason 0x19) refreshes the session's token; empty turns
    /// re-authentication off [default: jwt].
    #[arg(long, env = "MQTT_REAUTH_METHOD", value_name = "METHOD")]
    pub mqtt_reauth_method: Option<String>,

    /// Expect a PROXY protocol v1 or v2 header from trusted peers.
    #[arg(long, env = "PROXY_PROTOCOL", value_name = "BOOL", action = ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub proxy_protocol: Option<bool>,

    /// Peers (comma list of CIDRs) whose PROXY protocol header is believed.
    #[arg(long, env = "PROXY_PROTOCOL_TRUSTED_CIDRS", value_name = "CIDR,...")]
    pub proxy_protocol_trusted_cidrs: Option<CommaList>,

    /// Redis URL (`redis://` or `rediss://`): revocations and per-subject limits shared by the replicas.
    #[arg(long, env = "REDIS_URL", value_name = "URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    /// PostgreSQL DSN: revocations and per-subject limits shared by the replicas (when REDIS_URL is not set).
    #[arg(long, env = "POSTGRES_DSN", value_name = "DSN", hide_env_values = true)]
    pub postgres_dsn: Option<String>,

    /// Log output: json (one object per line) or text.
    #[arg(long, env = "LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// Required JOSE `typ` header (e.g. `at+jwt`), so ID tokens that carry the right audience are refused.
    #[arg(long, env = "JWT_REQUIRED_TYP", value_name = "TYP")]
    pub jwt_required_typ: Option<String>,

    /// Peers (comma list of CIDRs) whose X-Forwarded-For and X-Forwarded-Proto are believed; from any other peer
    /// they are replaced. Default: none.
    #[arg(long, env = "TRUSTED_PROXIES", value_name = "CIDR,...")]
    pub trusted_proxies: Option<CommaList>,

    /// Connections still before authentication (PROXY header, TLS, request head, token) held at once, a budget
    /// apart from MAX_CONNECTIONS so idle sockets cannot delay established sessions' peers [default: 1024].
    #[arg(long, env = "MAX_PENDING_HANDSHAKES", value_name = "N")]
    pub max_pending_handshakes: Option<usize>,

    /// On drain, sessions receive their Close 1001 at random moments within the last SECONDS of
    /// GRACEFUL_DRAIN_TIMEOUT_SECONDS instead of all at the deadline [default: the smaller of 5 and the drain].
    #[arg(long, env = "DRAIN_SPREAD_SECONDS", value_name = "SECONDS")]
    pub drain_spread_seconds: Option<u64>,

    /// Where revocations are shared: memory, redis or postgres [default: redis with REDIS_URL, else postgres with
    /// POSTGRES_DSN, else memory].
    #[arg(long, env = "STATE_STORE", value_name = "STORE")]
    pub state_store: Option<String>,

    /// The Go gateway's name for STATE_STORE (accepted, with a warning).
    #[arg(long, env = "JWT_CACHE_STORE", value_name = "STORE", hide = true)]
    pub jwt_cache_store: Option<String>,

    /// How long a revocation lasts when the revoked token's expiry is unknown (and every subject revocation)
    /// [default: 86400].
    #[arg(long, env = "REVOCATION_MAX_TTL_SECONDS", value_name = "SECONDS")]
    pub revocation_max_ttl_seconds: Option<u64>,

    /// While the state store is unreachable: `open` keeps authenticating against the local copy of the
    /// revocations, `closed` answers 503 [default: open].
    #[arg(long, env = "REVOCATION_FAIL_MODE", value_name = "MODE")]
    pub revocation_fail_mode: Option<String>,

    /// File holding the admin API's bearer secret (compared in constant time).
    #[arg(long, env = "ADMIN_TOKEN_FILE", value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// Role an admin JWT must carry (in scope, scp, roles, realm_access.roles or resource_access.*.roles)
    /// [default: ws-gateway-admin].
    #[arg(long, env = "ADMIN_REQUIRED_ROLE", value_name = "ROLE")]
    pub admin_required_role: Option<String>,

    /// Client id that back-channel logout tokens must name in `aud` [default: one of JWT_EXPECTED_AUDIENCE].
    #[arg(long, env = "OIDC_CLIENT_ID", value_name = "ID")]
    pub oidc_client_id: Option<String>,

    /// New sessions per second one subject (or LIMIT_KEY_CLAIM value) may open, shared by the replicas through the
    /// state store; a decimal, 0 = off [default: 0].
    #[arg(long, env = "RATE_LIMIT_PER_SECOND", value_name = "RATE")]
    pub rate_limit_per_second: Option<f64>,

    /// Sessions a subject may open at once before RATE_LIMIT_PER_SECOND paces it [default: the rate rounded up,
    /// at least 1].
    #[arg(long, env = "RATE_LIMIT_BURST", value_name = "N")]
    pub rate_limit_burst: Option<u32>,

    /// Claim whose value keys the per-subject limits instead of `sub` (for example a tenant claim).
    #[arg(long, env = "LIMIT_KEY_CLAIM", value_name = "CLAIM")]
    pub limit_key_claim: Option<String>,

    /// Sessions one subject may hold at once, across replicas; 0 = off [default: 0].
    #[arg(long, env = "MAX_SESSIONS_PER_SUBJECT", value_name = "N")]
    pub max_sessions_per_subject: Option<u32>,

    /// A session's lease in the state store: renewed by its replica, gone this long after the replica dies
    /// [default: 30].
    #[arg(long, env = "SESSION_LEASE_SECONDS", value_name = "SECONDS")]
    pub session_lease_seconds: Option<u64>,

    /// One session over MAX_SESSIONS_PER_SUBJECT: `reject` answers 429, `evict-oldest` closes the subject's
    /// oldest session (Close 1008 "session limit") on whichever replica holds it [default: reject].
    #[arg(long, env = "SESSION_LIMIT_POLICY", value_name = "POLICY")]
    pub session_limit_policy: Option<String>,

    /// Listen with SO_REUSEPORT, so a new process can bind the same port while the old one drains.
    #[arg(long, env = "REUSE_PORT", value_name = "BOOL", action = ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub reuse_port: Option<bool>,

    /// How often upstream host names are resolved again; every address is an endpoint [default: 10].
    #[arg(long, env = "UPSTREAM_DNS_REFRESH_SECONDS", value_name = "SECONDS")]
    pub upstream_dns_refresh_seconds: Option<u64>,

    /// How a new session picks an endpoint: least-connections, or hash-subject (a subject keeps its endpoint while
    /// the set of endpoints is unchanged) [default: least-connections].
    #[arg(long, env = "UPSTREAM_BALANCE", value_name = "POLICY")]
    pub upstream_balance: Option<Balance>,

    /// Consecutive dial or handshake failures that open an endpoint's circuit breaker [default: 5].
    #[arg(long, env = "CB_FAILURE_THRESHOLD", value_name = "N")]
    pub cb_failure_threshold: Option<u32>,

    /// How long an open breaker refuses dials before one trial decides [default: 10].
    #[arg(long, env = "CB_OPEN_TIMEOUT_SECONDS", value_name = "SECONDS")]
    pub cb_open_timeout_seconds: Option<u64>,

    /// Period of the active health check (connect plus WebSocket upgrade on the route's path), which closes a
    /// breaker early or opens it before clients find out; 0 = off [default: 0].
    #[arg(long, env = "CB_HEALTHCHECK_INTERVAL_SECONDS", value_name = "SECONDS")]
    pub cb_healthcheck_interval_seconds: Option<u64>,

    /// Dials retried after a failed one, each on another endpoint when there is one, all before the client is
    /// answered and within its handshake deadline [default: 2].
    #[arg(long, env = "WS_DIAL_RETRY_MAX", value_name = "N")]
    pub ws_dial_retry_max: Option<u32>,

    /// Base of the jittered, doubling back-off before a retry returns to an endpoint already tried (decimal)
    /// [default: 0.1].
    #[arg(long, env = "WS_DIAL_RETRY_INTERVAL_SECONDS", value_name = "SECONDS")]
    pub ws_dial_retry_interval_seconds: Option<f64>,

    /// /readyz answers 503 while any route has no healthy endpoint.
    #[arg(long, env = "READINESS_REQUIRES_UPSTREAM", value_name = "BOOL", action = ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub readiness_requires_upstream: Option<bool>,
    /// Handshakes each client address may start per second, before TLS (a decimal; 0 = off) [default: 0].
    #[arg(long, env = "HANDSHAKE_RATE_PER_IP", value_name = "PER_SECOND")]
    pub handshake_rate_per_ip: Option<f64>,

    /// Handshakes one client address may start at once before HANDSHAKE_RATE_PER_IP applies (0 = off)
    /// [default: HANDSHAKE_RATE_PER_IP rounded up, at least 1].
    #[arg(long, env = "HANDSHAKE_BURST_PER_IP", value_name = "N")]
    pub handshake_burst_per_ip: Option<u32>,

    /// Frames each session's client may send per second (a decimal; 0 = off); beyond it, Close 1008
    /// "rate limit exceeded" [default: 0].
    #[arg(long, env = "WS_MESSAGE_RATE_PER_SECOND", value_name = "PER_SECOND")]
    pub ws_message_rate_per_second: Option<f64>,

    /// Frames a session's client may send at once before WS_MESSAGE_RATE_PER_SECOND applies (0 = off)
    /// [default: WS_MESSAGE_RATE_PER_SECOND rounded up, at least 1].
    #[arg(long, env = "WS_MESSAGE_BURST", value_name = "N")]
    pub ws_message_burst: Option<u32>,
}

impl Settings {
    /// Reads the TOML file named by `--config` / `WS_GATEWAY_CONFIG`, if any, and layers flags and environment
    /// over it.
    ///
    /// # Errors
    /// The file cannot be read, is not TOML, has an unknown key or a value of the wrong type.
    pub fn with_file(self) -> Result<Settings, ConfigError> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let file = Settings::from_file(&path)?;
        Ok(self.merge(file))
    }

    /// Parses a TOML configuration file.
    ///
    /// # Errors
    /// As for [`Settings::with_file`].
    pub fn from_file(path: &Path) -> Result<Settings, ConfigError> {
        let setting = format!("config file {}", path.display());
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::new(&setting, e.to_string()))?;
        toml::from_str(&text)
            .map_err(|e| ConfigError::new(&setting, e.to_string().trim_end().to_owned()))
    }

    /// `self` (flags and environment) wins over `file` field by field.
    ///
    /// `file` is destructured without `..`: a setting added to [`Settings`] but not merged here does not compile.
    #[must_use]
    pub fn merge(self, file: Settings) -> Settings {
        let Settings {
            config: _,
            check_config: _,
            dev: _,
            listen_addr,
            admin_listen_addr,
            tls_cert_file,
            tls_key_file,
            upstream_ws_url,
            route_file,
            upstream_ca_file,
            upstream_dial_timeout_seconds,
            ws_idle_timeout_seconds,
            ws_write_timeout_seconds,
            handshake_timeout_seconds,
            max_connections,
            max_request_head_bytes,
            graceful_drain_timeout_seconds,
            jwks_url,
            oidc_issuer_url,
            jwks_ttl_minutes,
            jwks_refetch_interval_seconds,
            jwks_fetch_timeout_seconds,
            jwks_ca_file,
            jwt_expected_issuer,
            jwt_expected_audience,
            jwt_valid_algorithms,
            jwt_leeway_seconds,
            jwt_max_token_bytes,
            jwt_cookie_name,
            jwt_query_param,
            jwt_forward_claims,
            ws_allowed_origins,
            ws_require_origin,
            mqtt_connect_auth,
            mqtt_username_claim,
            mqtt_username_format,
            mqtt_password_forward,
            mqtt_client_id_policy,
            mqtt_publish_acl,
            mqtt_subscribe_acl,
            mqtt_acl_deny_action,
            mqtt_reauth_method,
            proxy_protocol,
            proxy_protocol_trusted_cidrs,
            redis_url,
            postgres_dsn,
            log_format,
            jwt_required_typ,
            trusted_proxies,
            max_pending_handshakes,
            drain_spread_seconds,
            reuse_port,
            state_store,
            jwt_cache_store,
            revocation_max_ttl_seconds,
            revocation_fail_mode,
            admin_token_file,
            admin_required_role,
            oidc_client_id,
            rate_limit_per_second,
            rate_limit_burst,
            limit_key_claim,
            max_sessions_per_subject,
            session_lease_seconds,
            session_limit_policy,
            upstream_dns_refresh_seconds,
            upstream_balance,
            cb_failure_threshold,
            cb_open_timeout_seconds,
            cb_healthcheck_interval_seconds,
            ws_dial_retry_max,
            ws_dial_retry_interval_seconds,
            readiness_requires_upstream,
            handshake_rate_per_ip,
            handshake_burst_per_ip,
            ws_message_rate_per_second,
            ws_message_burst,
        } = file;
        Settings {
            config: self.config,
            check_config: self.check_config,
            dev: self.dev,
            listen_addr: self.listen_addr.or(listen_addr),
            admin_listen_addr: self.admin_listen_addr.or(admin_listen_addr),
            tls_cert_file: self.tls_cert_file.or(tls_cert_file),
            tls_key_file: self.tls_key_file.or(tls_key_file),
            upstream_ws_url: self.upstream_ws_url.or(upstream_ws_url),
            route_file: self.route_file.or(route_file),
            upstream_ca_file: self.upstream_ca_file.or(upstream_ca_file),
            upstream_dial_timeout_seconds: self
                .upstream_dial_timeout_seconds
                .or(upstream_dial_timeout_seconds),
            ws_idle_timeout_seconds: self.ws_idle_timeout_seconds.or(ws_idle_timeout_seconds),
            ws_write_timeout_seconds: self.ws_write_timeout_seconds.or(ws_write_timeout_seconds),
            handshake_timeout_seconds: self.handshake_timeout_seconds.or(handshake_timeout_seconds),
            max_connections: self.max_connections.or(max_connections),
            max_request_head_bytes: self.max_request_head_bytes.or(max_request_head_bytes),
            graceful_drain_timeout_seconds: self
                .graceful_drain_timeout_seconds
                .or(graceful_drain_timeout_seconds),
            jwks_url: self.jwks_url.or(jwks_url),
            oidc_issuer_url: self.oidc_issuer_url.or(oidc_issuer_url),
            jwks_ttl_minutes: self.jwks_ttl_minutes.or(jwks_ttl_minutes),
            jwks_refetch_interval_seconds: self
                .jwks_refetch_interval_seconds
                .or(jwks_refetch_interval_seconds),
            jwks_fetch_timeout_seconds: self
                .jwks_fetch_timeout_seconds
                .or(jwks_fetch_timeout_seconds),
            jwks_ca_file: self.jwks_ca_file.or(jwks_ca_file),
            jwt_expected_issuer: self.jwt_expected_issuer.or(jwt_expected_issuer),
            jwt_expected_audience: self.jwt_expected_audience.or(jwt_expected_audience),
            jwt_valid_algorithms: self.jwt_valid_algorithms.or(jwt_valid_algorithms),
            jwt_leeway_seconds: self.jwt_leeway_seconds.or(jwt_leeway_seconds),
            jwt_max_token_bytes: self.jwt_max_token_bytes.or(jwt_max_token_bytes),
            jwt_cookie_name: self.jwt_cookie_name.or(jwt_cookie_name),
            jwt_query_param: self.jwt_query_param.or(jwt_query_param),
            jwt_forward_claims: self.jwt_forward_claims.or(jwt_forward_claims),
            ws_allowed_origins: self.ws_allowed_origins.or(ws_allowed_origins),
            ws_require_origin: self.ws_require_origin.or(ws_require_origin),
            mqtt_connect_auth: self.mqtt_connect_auth.or(mqtt_connect_auth),
            mqtt_username_claim: self.mqtt_username_claim.or(mqtt_username_claim),
            mqtt_username_format: self.mqtt_username_format.or(mqtt_username_format),
            mqtt_password_forward: self.mqtt_password_forward.or(mqtt_password_forward),
            mqtt_client_id_policy: self.mqtt_client_id_policy.or(mqtt_client_id_policy),
            mqtt_publish_acl: self.mqtt_publish_acl.or(mqtt_publish_acl),
            mqtt_subscribe_acl: self.mqtt_subscribe_acl.or(mqtt_subscribe_acl),
            mqtt_acl_deny_action: self.mqtt_acl_deny_action.or(mqtt_acl_deny_action),
            mqtt_reauth_method: self.mqtt_reauth_method.or(mqtt_reauth_method),
            proxy_protocol: self.proxy_protocol.or(proxy_protocol),
            proxy_protocol_trusted_cidrs: self
                .proxy_protocol_trusted_cidrs
                .or(proxy_protocol_trusted_cidrs),
            redis_url: self.redis_url.or(redis_url),
            postgres_dsn: self.postgres_dsn.or(postgres_dsn),
            log_format: self.log_format.or(log_format),
            jwt_required_typ: self.jwt_required_typ.or(jwt_required_typ),
            trusted_proxies: self.trusted_proxies.or(trusted_proxies),
            max_pending_handshakes: self.max_pending_handshakes.or(max_pending_handshakes),
            drain_spread_seconds: self.drain_spread_seconds.or(drain_spread_seconds),
            reuse_port: self.reuse_port.or(reuse_port),
            state_store: self.state_store.or(state_store),
            jwt_cache_store: self.jwt_cache_store.or(jwt_cache_store),
            revocation_max_ttl_seconds: self
                .revocation_max_ttl_seconds
                .or(revocation_max_ttl_seconds),
            revocation_fail_mode: self.revocation_fail_mode.or(revocation_fail_mode),
            admin_token_file: self.admin_token_file.or(admin_token_file),
            admin_required_role: self.admin_required_role.or(admin_required_role),
            oidc_client_id: self.oidc_client_id.or(oidc_client_id),
            rate_limit_per_second: self.rate_limit_per_second.or(rate_limit_per_second),
            rate_limit_burst: self.rate_limit_burst.or(rate_limit_burst),
            limit_key_claim: self.limit_key_claim.or(limit_key_claim),
            max_sessions_per_subject: self.max_sessions_per_subject.or(max_sessions_per_subject),
            session_lease_seconds: self.session_lease_seconds.or(session_lease_seconds),
            session_limit_policy: self.session_limit_policy.or(session_limit_policy),
            upstream_dns_refresh_seconds: self
                .upstream_dns_refresh_seconds
                .or(upstream_dns_refresh_seconds),
            upstream_balance: self.upstream_balance.or(upstream_balance),
            cb_failure_threshold: self.cb_failure_threshold.or(cb_failure_threshold),
            cb_open_timeout_seconds: self.cb_open_timeout_seconds.or(cb_open_timeout_seconds),
            cb_healthcheck_interval_seconds: self
                .cb_healthcheck_interval_seconds
                .or(cb_healthcheck_interval_seconds),
            ws_dial_retry_max: self.ws_dial_retry_max.or(ws_dial_retry_max),
            ws_dial_retry_interval_seconds: self
                .ws_dial_retry_interval_seconds
                .or(ws_dial_retry_interval_seconds),
            readiness_requires_upstream: self
                .readiness_requires_upstream
                .or(readiness_requires_upstream),
            handshake_rate_per_ip: self.handshake_rate_per_ip.or(handshake_rate_per_ip),
            handshake_burst_per_ip: self.handshake_burst_per_ip.or(handshake_burst_per_ip),
            ws_message_rate_per_second: self
                .ws_message_rate_per_second
                .or(ws_message_rate_per_second),
            ws_message_burst: self.ws_message_burst.or(ws_message_burst),
        }
    }

    /// Applies defaults and checks every setting, reading the files they name.
    ///
    /// # Errors
    /// The first invalid setting, by name.
    pub fn resolve(self) -> Result<Config, ConfigError> {
        let limits = self.limit_settings()?;
        let mqtt = self.mqtt_settings()?;
        let mqtt_acl = self.mqtt_acl()?;
        let mqtt_reauth_method = self.mqtt_reauth_method()?;
        let tls = match (self.tls_cert_file, self.tls_key_file) {
            (Some(cert), Some(key)) => {
                crate::tls::load_certified_key(&cert, &key).map_err(|e| ConfigError::new(e.setting(), e.to_string()))?;
                Some(TlsFiles { cert, key })
            }
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::new(
                    "TLS_KEY_FILE (--tls-key)",
                    "TLS_CERT_FILE is set but TLS_KEY_FILE is not; set both for TLS or neither for plain HTTP",
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    "TLS_CERT_FILE (--tls-cert)",
                    "TLS_KEY_FILE is set but TLS_CERT_FILE is not; set both for TLS or neither for plain HTTP",
                ))
            }
        };

        let fallback = self
            .upstream_ws_url
            .clone()
            .unwrap_or_default()
            .0
            .iter()
            .map(|u| {
                WsUrl::parse_ws(u)
                    .map_err(|e| ConfigError::new("UPSTREAM_WS_URL (--upstream-ws-url)", e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if fallback.len() > crate::route::MAX_UPSTREAM_URLS {
            return Err(ConfigError::new(
                "UPSTREAM_WS_URL (--upstream-ws-url)",
                format!(
                    "{} URLs; at most {} per route",
                    fallback.len(),
                    crate::route::MAX_UPSTREAM_URLS
                ),
            ));
        }
        let routes = match &self.route_file {
            Some(path) => RouteTable::from_file(path, fallback)
                .map_err(|e| ConfigError::new("ROUTE_FILE (--route-file)", e.to_string()))?,
            None => RouteTable::new(Vec::new(), fallback),
        };
        if routes.is_empty() && !self.dev {
            return Err(ConfigError::new(
                "UPSTREAM_WS_URL (--upstream-ws-url)",
                "no upstream: set UPSTREAM_WS_URL or ROUTE_FILE",
            ));
        }
        if let Some(ca) = &self.upstream_ca_file {
            crate::tls::load_ca_file(ca)
                .map_err(|e| ConfigError::new("UPSTREAM_CA_FILE (--upstream-ca-file)", e))?;
        }
        if let Some(ca) = &self.jwks_ca_file {
            crate::tls::load_ca_file(ca)
                .map_err(|e| ConfigError::new("JWKS_CA_FILE (--jwks-ca-file)", e))?;
        }

        let jwks_url =
            match self.jwks_url.as_deref().filter(|s| !s.is_empty()) {
                Some(u) => Some(
                    crate::net::Url::parse_http(u)
                        .map_err(|e| ConfigError::new("JWKS_URL (--jwks-url)", e))?,
                ),
                None if self.dev || self.oidc_issuer_url.as_deref().is_some_and(|s| !s.is_empty()) => None,
                None => return Err(ConfigError::new(
                    "JWKS_URL (--jwks-url)",
                    "required (or OIDC_ISSUER_URL): every upgrade is authenticated against the identity provider's JWKS",
                )),
            };
        let oidc_issuer = self
            .oidc_issuer_url
            .as_deref()
            .filter(|s| !s.is_empty())
            .map(|u| {
                crate::net::Url::parse_http(u)
                    .map_err(|e| ConfigError::new("OIDC_ISSUER_URL (--oidc-issuer-url)", e))
            })
            .transpose()?;

        let algorithms = match self.jwt_valid_algorithms {
            Some(list) if !list.0.is_empty() => list
                .0
                .iter()
                .map(|a| a.parse::<Algorithm>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    ConfigError::new("JWT_VALID_ALGORITHMS (--jwt-valid-algorithms)", e)
                })?,
            _ => vec![Algorithm::RS256],
        };

        let forward_claims = self
            .jwt_forward_claims
            .unwrap_or_default()
            .0
            .iter()
            .map(|pair| parse_claim_header(pair))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ConfigError::new("JWT_FORWARD_CLAIMS (--jwt-forward-claims)", e))?;

        let origins = OriginPolicy::parse(&self.ws_allowed_origins.unwrap_or_default().0)
            .map_err(|e| ConfigError::new("WS_ALLOWED_ORIGINS (--ws-allowed-origins)", e))?;

        let cookie_name = self.jwt_cookie_name.unwrap_or_else(|| "session".to_owned());
        if !is_token(&cookie_name) {
            return Err(ConfigError::new(
                "JWT_COOKIE_NAME (--jwt-cookie-name)",
                "not a valid cookie name",
            ));
        }
        let query_param = self
            .jwt_query_param
            .unwrap_or_else(|| "access_token".to_owned());
        if query_param.is_empty() || query_param.contains(['&', '=', '#', ' ']) {
            return Err(ConfigError::new(
                "JWT_QUERY_PARAM (--jwt-query-param)",
                "not a valid query parameter name",
            ));
        }

        let trusted_proxies = self
            .proxy_protocol_trusted_cidrs
            .unwrap_or_default()
            .0
            .iter()
            .map(|c| c.parse::<Cidr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                ConfigError::new(
                    "PROXY_PROTOCOL_TRUSTED_CIDRS (--proxy-protocol-trusted-cidrs)",
                    e,
                )
            })?;
        let proxy_protocol = self.proxy_protocol.unwrap_or(false);
        if proxy_protocol && trusted_proxies.is_empty() {
            return Err(ConfigError::new(
                "PROXY_PROTOCOL_TRUSTED_CIDRS (--proxy-protocol-trusted-cidrs)",
                "PROXY_PROTOCOL is on: list the proxies (CIDRs) whose headers are believed",
            ));
        }

        if let Some(url) = self.redis_url.as_deref().filter(|s| !s.is_empty()) {
            check_scheme(url, &["redis", "rediss"])
                .map_err(|e| ConfigError::new("REDIS_URL (--redis-url)", e))?;
        }
        if let Some(dsn) = self.postgres_dsn.as_deref().filter(|s| !s.is_empty()) {
            if !dsn.contains('=') {
                check_scheme(dsn, &["postgres", "postgresql"])
                    .map_err(|e| ConfigError::new("POSTGRES_DSN (--postgres-dsn)", e))?;
            }
        }

        let seconds =
            |v: Option<u64>, default: u64, setting: &str| -> Result<Duration, ConfigError> {
                bounded(v.unwrap_or(default), 1, MAX_SECONDS, setting).map(Duration::from_secs)
            };
        let max_connections = self.max_connections.unwrap_or(10_000);
        if max_connections == 0 {
            return Err(ConfigError::new(
                "MAX_CONNECTIONS (--max-connections)",
                "must be at least 1",
            ));
        }
        let max_head = self.max_request_head_bytes.unwrap_or(16 * 1024);
        if !(1024..=1024 * 1024).contains(&max_head) {
            return Err(ConfigError::new(
                "MAX_REQUEST_HEAD_BYTES (--max-request-head-bytes)",
                "must be between 1024 and 1048576",
            ));
        }
        let max_token = self.jwt_max_token_bytes.unwrap_or(8 * 1024);
        if !(256..=64 * 1024).contains(&max_token) {
            return Err(ConfigError::new(
                "JWT_MAX_TOKEN_BYTES (--jwt-max-token-bytes)",
                "must be between 256 and 65536",
            ));
        }

        let drain = bounded(
            self.graceful_drain_timeout_seconds.unwrap_or(30),
            0,
            MAX_SECONDS,
            "GRACEFUL_DRAIN_TIMEOUT_SECONDS (--graceful-drain-timeout-seconds)",
        )?;
        let drain_spread = self.drain_spread_seconds.unwrap_or(drain.min(5));
        if drain_spread > drain {
            return Err(ConfigError::new(
                "DRAIN_SPREAD_SECONDS (--drain-spread-seconds)",
                format!(
                    "{drain_spread} is longer than GRACEFUL_DRAIN_TIMEOUT_SECONDS ({drain}): the spread ends at the drain deadline"
                ),
            ));
        }
        let jwks_ttl_minutes = bounded(
            self.jwks_ttl_minutes.unwrap_or(10),
            1,
            MAX_SECONDS / 60,
            "JWKS_TTL_MINUTES (--jwks-ttl-minutes)",
        )?;
        let leeway = bounded(
            self.jwt_leeway_seconds.unwrap_or(30),
            0,
            86_400,
            "JWT_LEEWAY_SECONDS (--jwt-leeway-seconds)",
        )?;
        let required_typ = match self.jwt_required_typ.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(t) if t.chars().all(|c| c.is_ascii_graphic()) => Some(t.to_owned()),
            Some(_) => {
                return Err(ConfigError::new(
                    "JWT_REQUIRED_TYP (--jwt-required-typ)",
                    "not a media type such as at+jwt",
                ))
            }
        };
        let forwarded_trusted = self
            .trusted_proxies
            .unwrap_or_default()
            .0
            .iter()
            .map(|c| c.parse::<Cidr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ConfigError::new("TRUSTED_PROXIES (--trusted-proxies)", e))?;
        let max_pending_handshakes = bounded(
            self.max_pending_handshakes.unwrap_or(1024) as u64,
            1,
            1 << 20,
            "MAX_PENDING_HANDSHAKES (--max-pending-handshakes)",
        )? as usize;

        let redis_url = self.redis_url.clone().filter(|s| !s.is_empty());
        let postgres_dsn = self.postgres_dsn.clone().filter(|s| !s.is_empty());
        let store_alias = self.state_store.is_none() && self.jwt_cache_store.is_some();
        let (store_setting, store_name) = match (&self.state_store, &self.jwt_cache_store) {
            (Some(s), _) => (
                "STATE_STORE (--state-store)",
                Some(s.trim().to_ascii_lowercase()),
            ),
            (None, Some(s)) => ("JWT_CACHE_STORE", Some(s.trim().to_ascii_lowercase())),
            (None, None) => ("STATE_STORE (--state-store)", None),
        };
        let store = match store_name.as_deref().filter(|s| !s.is_empty()) {
            Some("memory") => StoreConfig::Memory,
            Some("redis") => StoreConfig::Redis(
                redis_url
                    .clone()
                    .ok_or_else(|| ConfigError::new(store_setting, "redis needs REDIS_URL"))?,
            ),
            Some("postgres") => {
                StoreConfig::Postgres(postgres_dsn.clone().ok_or_else(|| {
                    ConfigError::new(store_setting, "postgres needs POSTGRES_DSN")
                })?)
            }
            Some(other) => {
                return Err(ConfigError::new(
                    store_setting,
                    format!("`{other}` is not memory, redis or postgres"),
                ))
            }
            None => match (&redis_url, &postgres_dsn) {
                (Some(url), _) => StoreConfig::Redis(url.clone()),
                (None, Some(dsn)) => StoreConfig::Postgres(dsn.clone()),
                (None, None) => StoreConfig::Memory,
            },
        };
        if let StoreConfig::Postgres(dsn) = &store {
            dsn.parse::<tokio_postgres::Config>().map_err(|_| {
                ConfigError::new(
                    "POSTGRES_DSN (--postgres-dsn)",
                    "not a valid connection string",
                )
            })?;
        }
        let revocation_max_ttl = bounded(
            self.revocation_max_ttl_seconds.unwrap_or(86_400),
            1,
            MAX_SECONDS * 52,
            "REVOCATION_MAX_TTL_SECONDS (--revocation-max-ttl-seconds)",
        )?;
        let fail_closed = match self
            .revocation_fail_mode
            .as_deref()
            .map(|s| s.trim().to_ascii_lowercase())
            .as_deref()
        {
            None | Some("open") => false,
            Some("closed") => true,
            Some(_) => {
                return Err(ConfigError::new(
                    "REVOCATION_FAIL_MODE (--revocation-fail-mode)",
                    "must be open or closed",
                ))
            }
        };
        let admin_token = match &self.admin_token_file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError::new(
                        "ADMIN_TOKEN_FILE (--admin-token-file)",
                        format!("{}: {e}", path.display()),
                    )
                })?;
                let secret = text.trim().to_owned();
                if secret.len() < 16 {
                    return Err(ConfigError::new(
                        "ADMIN_TOKEN_FILE (--admin-token-file)",
                        "the secret must be at least 16 characters",
                    ));
                }
                Some(Secret(secret))
            }
            None => None,
        };
        // Admin JWTs are accepted once the admin API is turned on: by ADMIN_REQUIRED_ROLE, or by ADMIN_TOKEN_FILE
        // (then with the default role). With neither, the write endpoints stay off.
        let admin_role = match self
            .admin_required_role
            .clone()
            .map(|s| s.trim().to_owned())
        {
            Some(role) if !role.is_empty() => Some(role),
            _ if admin_token.is_some() => Some("ws-gateway-admin".to_owned()),
            _ => None,
        };

        let upstream = UpstreamSettings {
            dns_refresh: Duration::from_secs(bounded(
                self.upstream_dns_refresh_seconds.unwrap_or(10),
                1,
                3600,
                "UPSTREAM_DNS_REFRESH_SECONDS (--upstream-dns-refresh-seconds)",
            )?),
            balance: self.upstream_balance.unwrap_or_default(),
            failure_threshold: bounded(
                u64::from(self.cb_failure_threshold.unwrap_or(5)),
                1,
                100,
                "CB_FAILURE_THRESHOLD (--cb-failure-threshold)",
            )? as u32,
            open_timeout: Duration::from_secs(bounded(
                self.cb_open_timeout_seconds.unwrap_or(10),
                1,
                3600,
                "CB_OPEN_TIMEOUT_SECONDS (--cb-open-timeout-seconds)",
            )?),
            healthcheck: match bounded(
                self.cb_healthcheck_interval_seconds.unwrap_or(0),
                0,
                3600,
                "CB_HEALTHCHECK_INTERVAL_SECONDS (--cb-healthcheck-interval-seconds)",
            )? {
                0 => None,
                s => Some(Duration::from_secs(s)),
            },
            retry_max: bounded(
                u64::from(self.ws_dial_retry_max.unwrap_or(2)),
                0,
                10,
                "WS_DIAL_RETRY_MAX (--ws-dial-retry-max)",
            )? as u32,
            retry_interval: {
                let v = self.ws_dial_retry_interval_seconds.unwrap_or(0.1);
                if !(0.0..=10.0).contains(&v) {
                    return Err(ConfigError::new(
                        "WS_DIAL_RETRY_INTERVAL_SECONDS (--ws-dial-retry-interval-seconds)",
                        format!("must be between 0 and 10 (decimals allowed), got {v}"),
                    ));
                }
                Duration::from_secs_f64(v)
            },
            readiness_requires_upstream: self.readiness_requires_upstream.unwrap_or(false),
        };
        let handshake_budget = RateLimit::resolve(
            self.handshake_rate_per_ip,
            self.handshake_burst_per_ip,
            (
                "HANDSHAKE_RATE_PER_IP (--handshake-rate-per-ip)",
                "HANDSHAKE_BURST_PER_IP (--handshake-burst-per-ip)",
            ),
        )?;
        let message_rate = RateLimit::resolve(
            self.ws_message_rate_per_second,
            self.ws_message_burst,
            (
                "WS_MESSAGE_RATE_PER_SECOND (--ws-message-rate-per-second)",
                "WS_MESSAGE_BURST (--ws-message-burst)",
            ),
        )?;

        let default_listen = if self.dev {
            "127.0.0.1:8443"
        } else {
            "0.0.0.0:8080"
        };
        let default_admin = "127.0.0.1:9090";
        let listen = self
            .listen_addr
            .unwrap_or_else(|| parse_addr(default_listen));
        let admin_listen = self
            .admin_listen_addr
            .unwrap_or_else(|| parse_addr(default_admin));
        if self.dev && !(listen.ip().is_loopback() && admin_listen.ip().is_loopback()) {
            return Err(ConfigError::new(
                "LISTEN_ADDR (--listen)",
                "--dev listens on loopback addresses only",
            ));
        }

        Ok(Config {
            listen,
            admin_listen,
            tls,
            routes,
            upstream,
            upstream_ca_file: self.upstream_ca_file,
            timeouts: Timeouts {
                dial: seconds(
                    self.upstream_dial_timeout_seconds,
                    5,
                    "UPSTREAM_DIAL_TIMEOUT_SECONDS (--upstream-dial-timeout-seconds)",
                )?,
                idle: seconds(
                    self.ws_idle_timeout_seconds,
                    60,
                    "WS_IDLE_TIMEOUT_SECONDS (--ws-idle-timeout-seconds)",
                )?,
                write: seconds(
                    self.ws_write_timeout_seconds,
                    10,
                    "WS_WRITE_TIMEOUT_SECONDS (--ws-write-timeout-seconds)",
                )?,
                handshake: seconds(
                    self.handshake_timeout_seconds,
                    10,
                    "HANDSHAKE_TIMEOUT_SECONDS (--handshake-timeout-seconds)",
                )?,
                drain: Duration::from_secs(drain),
                drain_spread: Duration::from_secs(drain_spread),
            },
            max_connections,
            max_request_head_bytes: max_head,
            auth: AuthSettings {
                jwks_url,
                jwks_ttl: Duration::from_secs(60 * jwks_ttl_minutes),
                jwks_refetch_interval: seconds(
                    self.jwks_refetch_interval_seconds,
                    10,
                    "JWKS_REFETCH_INTERVAL_SECONDS (--jwks-refetch-interval-seconds)",
                )?,
                jwks_fetch_timeout: seconds(
                    self.jwks_fetch_timeout_seconds,
                    5,
                    "JWKS_FETCH_TIMEOUT_SECONDS (--jwks-fetch-timeout-seconds)",
                )?,
                jwks_ca_file: self.jwks_ca_file,
                issuer: self
                    .jwt_expected_issuer
                    .filter(|s| !s.is_empty())
                    .or_else(|| self.oidc_issuer_url.clone().filter(|s| !s.is_empty())),
                oidc_issuer,
                audiences: self.jwt_expected_audience.unwrap_or_default().0,
                algorithms,
                leeway: Duration::from_secs(leeway),
                required_typ,
                max_token_bytes: max_token,
                cookie_name,
                query_param,
                forward_claims,
                origins,
                require_origin: self.ws_require_origin.unwrap_or(false),
                mqtt_connect_auth: self.mqtt_connect_auth.unwrap_or(true),
            },
            proxy_protocol,
            trusted_proxies,
            forwarded_trusted,
            max_pending_handshakes,
            reuse_port: self.reuse_port.unwrap_or(false),
            handshake_budget,
            message_rate,
            store,
            store_alias,
            revocation_max_ttl: i64::try_from(revocation_max_ttl).unwrap_or(i64::MAX),
            fail_closed,
            admin_token,
            admin_role,
            oidc_client_id: self.oidc_client_id.filter(|s| !s.is_empty()),
            limits,
            mqtt,
            mqtt_acl,
            mqtt_reauth_method,
            redis_url: self.redis_url.filter(|s| !s.is_empty()),
            postgres_dsn: self.postgres_dsn.filter(|s| !s.is_empty()),
            log_format: self.log_format.unwrap_or_default(),
            dev: self.dev,
        })
    }
}

/// The longest any time setting may be: a week. Deadlines are `Instant`s, and a value near `u64::MAX` seconds made
/// the first connection panic on overflow after passing `--check-config`.
pub const MAX_SECONDS: u64 = 7 * 24 * 3600;

/// A list of topic-filter templates (`MQTT_PUBLISH_ACL`, `mqttPublishAcl`, ...), each valid; an empty list is
/// no rule (`None`), as an empty value is no setting elsewhere.
///
/// # Errors
/// The first invalid template, as a message.
pub fn templates(list: &[String]) -> Result<Option<Vec<Template>>, String> {
    if list.is_empty() {
        return Ok(None);
    }
    list.iter()
        .map(|t| Template::parse(t).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// A claim name given as a setting: at most 128 printable characters; empty means unset.
fn claim_name(v: Option<&str>, setting: &str) -> Result<Option<String>, ConfigError> {
    match v.map(str::trim) {
        None | Some("") => Ok(None),
        Some(c) if c.len() <= 128 && !c.chars().any(char::is_control) => Ok(Some(c.to_owned())),
        Some(_) => Err(ConfigError::new(
            setting,
            "must be a claim name of at most 128 printable characters",
        )),
    }
}

impl Settings {
    /// `MQTT_USERNAME_CLAIM`, `MQTT_USERNAME_FORMAT`, `MQTT_PASSWORD_FORWARD`, `MQTT_CLIENT_ID_POLICY`.
    fn mqtt_settings(&self) -> Result<MqttSettings, ConfigError> {
        use crate::mqtt_identity::{ClientIdPolicy, PasswordForward, UsernameFormat};
        let lower = |v: &Option<String>| v.as_deref().map(|s| s.trim().to_ascii_lowercase());
        let username_claim = claim_name(
            self.mqtt_username_claim.as_deref(),
            "MQTT_USERNAME_CLAIM (--mqtt-username-claim)",
        )?;
        let username_format = match lower(&self.mqtt_username_format).as_deref() {
            None | Some("plain") => UsernameFormat::Plain,
            Some("go") => UsernameFormat::Go,
            Some(_) => {
                return Err(ConfigError::new(
                    "MQTT_USERNAME_FORMAT (--mqtt-username-format)",
                    "must be plain or go",
                ))
            }
        };
        let password_forward = match lower(&self.mqtt_password_forward).as_deref() {
            None | Some("keep") => PasswordForward::Keep,
            Some("drop") => PasswordForward::Drop,
            Some(_) => {
                return Err(ConfigError::new(
                    "MQTT_PASSWORD_FORWARD (--mqtt-password-forward)",
                    "must be keep or drop",
                ))
            }
        };
        let client_id_policy = match lower(&self.mqtt_client_id_policy).as_deref() {
            None | Some("any") => ClientIdPolicy::Any,
            Some("prefix-subject") => ClientIdPolicy::PrefixSubject,
            Some("equal-subject") => ClientIdPolicy::EqualSubject,
            Some(_) => {
                return Err(ConfigError::new(
                    "MQTT_CLIENT_ID_POLICY (--mqtt-client-id-policy)",
                    "must be any, prefix-subject or equal-subject",
                ))
            }
        };
        Ok(MqttSettings {
            username_claim,
            username_format,
            password_forward,
            client_id_policy,
        })
    }

    /// `MQTT_PUBLISH_ACL`, `MQTT_SUBSCRIBE_ACL`, `MQTT_ACL_DENY_ACTION`.
    fn mqtt_acl(&self) -> Result<AclSettings, ConfigError> {
        use crate::mqtt_acl::DenyAction;
        let templates = |v: &Option<CommaList>, setting: &str| match v {
            None => Ok(None),
            Some(list) => templates(&list.0).map_err(|e| ConfigError::new(setting, e)),
        };
        let deny = match self
            .mqtt_acl_deny_action
            .as_deref()
            .map(|s| s.trim().to_ascii_lowercase())
            .as_deref()
        {
            None | Some("ignore") => DenyAction::Ignore,
            Some("disconnect") => DenyAction::Disconnect,
            Some(_) => {
                return Err(ConfigError::new(
                    "MQTT_ACL_DENY_ACTION (--mqtt-acl-deny-action)",
                    "must be ignore or disconnect",
                ))
            }
        };
        Ok(AclSettings {
            publish: templates(
                &self.mqtt_publish_acl,
                "MQTT_PUBLISH_ACL (--mqtt-publish-acl)",
            )?,
            subscribe: templates(
                &self.mqtt_subscribe_acl,
                "MQTT_SUBSCRIBE_ACL (--mqtt-subscribe-acl)",
            )?,
            deny,
        })
    }

    /// `MQTT_REAUTH_METHOD`: `jwt` unless set; empty turns it off.
    fn mqtt_reauth_method(&self) -> Result<Option<String>, ConfigError> {
        match self.mqtt_reauth_method.as_deref().map(str::trim) {
            None => Ok(Some("jwt".to_owned())),
            Some("") => Ok(None),
            Some(m) if m.len() <= 128 && !m.chars().any(char::is_control) => Ok(Some(m.to_owned())),
            Some(_) => Err(ConfigError::new(
                "MQTT_REAUTH_METHOD (--mqtt-reauth-method)",
                "must be a method name of at most 128 printable characters",
            )),
        }
    }

    /// `RATE_LIMIT_*`, `LIMIT_KEY_CLAIM`, `MAX_SESSIONS_PER_SUBJECT`, `SESSION_LEASE_SECONDS`,
    /// `SESSION_LIMIT_POLICY`.
    fn limit_settings(&self) -> Result<LimitSettings, ConfigError> {
        const RATE: &str = "RATE_LIMIT_PER_SECOND (--rate-limit-per-second)";
        let rate = self.rate_limit_per_second.unwrap_or(0.0);
        if !rate.is_finite() || !(0.0..=1_000_000.0).contains(&rate) {
            return Err(ConfigError::new(
                RATE,
                format!("must be a number between 0 and 1000000, got {rate}"),
            ));
        }
        // Invariant: rate is finite and at most 1e6, so the rounded value fits.
        let default_burst = (rate.ceil() as u64).max(1);
        let burst = bounded(
            self.rate_limit_burst.map_or(default_burst, u64::from),
            1,
            1_000_000,
            "RATE_LIMIT_BURST (--rate-limit-burst)",
        )?;
        let key_claim = match self.limit_key_claim.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(c) if c.len() <= 128 && !c.chars().any(char::is_control) => Some(c.to_owned()),
            Some(_) => {
                return Err(ConfigError::new(
                    "LIMIT_KEY_CLAIM (--limit-key-claim)",
                    "must be a claim name of at most 128 printable characters",
                ))
            }
        };
        let max_sessions = bounded(
            u64::from(self.max_sessions_per_subject.unwrap_or(0)),
            0,
            100_000,
            "MAX_SESSIONS_PER_SUBJECT (--max-sessions-per-subject)",
        )?;
        let lease = bounded(
            self.session_lease_seconds.unwrap_or(30),
            3,
            3_600,
            "SESSION_LEASE_SECONDS (--session-lease-seconds)",
        )?;
        let evict_oldest = match self
            .session_limit_policy
            .as_deref()
            .map(|s| s.trim().to_ascii_lowercase())
            .as_deref()
        {
            None | Some("reject") => false,
            Some("evict-oldest") => true,
            Some(_) => {
                return Err(ConfigError::new(
                    "SESSION_LIMIT_POLICY (--session-limit-policy)",
                    "must be reject or evict-oldest",
                ))
            }
        };
        Ok(LimitSettings {
            rate_per_second: rate,
            // Invariant: bounded above by 1e6.
            burst: burst as u32,
            key_claim,
            max_sessions: max_sessions as u32,
            lease: Duration::from_secs(lease),
            evict_oldest,
        })
    }
}

/// Per-subject limits (`RATE_LIMIT_PER_SECOND` and friends); all off by default.
#[derive(Debug, Clone, PartialEq)]
pub struct LimitSettings {
    /// New sessions per second per key; 0 is off.
    pub rate_per_second: f64,
    /// Bucket size.
    pub burst: u32,
    /// Claim that keys the limits instead of `sub`.
    pub key_claim: Option<String>,
    /// Sessions per key at once; 0 is off.
    pub max_sessions: u32,
    /// Lease lifetime in the store.
    pub lease: Duration,
    /// `SESSION_LIMIT_POLICY=evict-oldest`.
    pub evict_oldest: bool,
}

impl Default for LimitSettings {
    fn default() -> LimitSettings {
        LimitSettings {
            rate_per_second: 0.0,
            burst: 1,
            key_claim: None,
            max_sessions: 0,
            lease: Duration::from_secs(30),
            evict_oldest: false,
        }
    }
}

fn bounded(v: u64, min: u64, max: u64, setting: &str) -> Result<u64, ConfigError> {
    if (min..=max).contains(&v) {
        Ok(v)
    } else {
        Err(ConfigError::new(
            setting,
            format!("must be between {min} and {max}, got {v}"),
        ))
    }
}

/// The fastest rate either limit accepts, per second: above it a token bucket's interval (1 µs) stops meaning much.
pub const MAX_RATE: f64 = 1_000_000.0;
/// The slowest non-zero rate accepted, per second (one every 1,000 s).
pub const MIN_RATE: f64 = 0.001;
/// The largest burst accepted.
pub const MAX_BURST: u32 = 1_000_000;

/// A token bucket's settings: `per_second` tokens refill it, up to `burst`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Tokens added per second (from `MIN_RATE` to `MAX_RATE`).
    pub per_second: f64,
    /// The bucket's size, and what a quiet client may spend at once (1 to `MAX_BURST`).
    pub burst: u32,
}

impl RateLimit {
    /// A limit from its two settings: off when either is 0 or the rate is unset; the burst defaults to one second
    /// of the rate (rounded up). A burst without a rate is an error: it would never refill.
    fn resolve(
        rate: Option<f64>,
        burst: Option<u32>,
        (rate_setting, burst_setting): (&str, &str),
    ) -> Result<Option<RateLimit>, ConfigError> {
        if let Some(r) = rate {
            if !r.is_finite() || r < 0.0 || (r > 0.0 && r < MIN_RATE) || r > MAX_RATE {
                return Err(ConfigError::new(
                    rate_setting,
                    format!("must be 0 (off) or between {MIN_RATE} and {MAX_RATE}, got {r}"),
                ));
            }
        }
        if let Some(b) = burst {
            if b > MAX_BURST {
                return Err(ConfigError::new(
                    burst_setting,
                    format!("must be between 0 (off) and {MAX_BURST}, got {b}"),
                ));
            }
        }
        match (rate.unwrap_or(0.0), burst) {
            (_, Some(0)) => Ok(None),
            (0.0, Some(_)) => Err(ConfigError::new(
                burst_setting,
                format!("is set but {rate_setting} is not: a burst alone never refills (set both, or 0 for off)"),
            )),
            (0.0, _) => Ok(None),
            (r, b) => Ok(Some(RateLimit {
                per_second: r,
                // Invariant: r <= MAX_RATE, so its ceiling fits in u32.
                burst: b.unwrap_or_else(|| (r.ceil() as u32).max(1)),
            })),
        }
    }
}

fn parse_addr(s: &str) -> SocketAddr {
    // Invariant: only called with the literal defaults above, which are valid socket addresses.
    s.parse()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
}

fn check_scheme(url: &str, schemes: &[&str]) -> Result<(), String> {
    let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    match scheme {
        Some(s) if schemes.contains(&s.as_str()) => Ok(()),
        _ => Err(format!(
            "expected a URL starting with {}://",
            schemes.join(":// or ")
        )),
    }
}

/// RFC 9110 token characters, used for cookie and header names.
pub(crate) fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn parse_claim_header(pair: &str) -> Result<(String, String), String> {
    let (claim, header) = pair
        .split_once('=')
        .ok_or_else(|| format!("`{pair}` is not claim=Header-Name"))?;
    let (claim, header) = (claim.trim(), header.trim());
    if claim.is_empty() || !is_token(header) {
        return Err(format!("`{pair}` is not claim=Header-Name"));
    }
    Ok((claim.to_owned(), header.to_owned()))
}

/// A secret read from a file: its `Debug` never shows it.
#[derive(Clone)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The certificate and key files of the TLS listener.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// Every time limit the gateway enforces.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TCP connect, TLS and the upstream's 101.
    pub dial: Duration,
    /// No bytes either way.
    pub idle: Duration,
    /// A peer that stops reading.
    pub write: Duration,
    /// TLS handshake plus request head.
    pub handshake: Duration,
    /// Graceful drain on SIGTERM.
    pub drain: Duration,
    /// The last part of the drain over which sessions' Close frames are spread.
    pub drain_spread: Duration,
}

/// How a route's endpoints are found, chosen, guarded and retried.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamSettings {
    /// How often host names are resolved again.
    pub dns_refresh: Duration,
    /// How a new session picks an endpoint.
    pub balance: Balance,
    /// Consecutive dial failures that open an endpoint's breaker.
    pub failure_threshold: u32,
    /// How long an open breaker refuses dials.
    pub open_timeout: Duration,
    /// Active health check period; `None` = off.
    pub healthcheck: Option<Duration>,
    /// Dials retried after a failed one.
    pub retry_max: u32,
    /// Base of the back-off before a retry returns to an endpoint already tried.
    pub retry_interval: Duration,
    /// `/readyz` 503 while a route has no healthy endpoint.
    pub readiness_requires_upstream: bool,
}

/// Authentication and Origin settings.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// The JWKS endpoint; `None` only in `--dev`, where the gateway serves its own.
    pub jwks_url: Option<crate::net::HttpUrl>,
    /// OIDC issuer whose discovery document names the JWKS, when `jwks_url` is not set.
    pub oidc_issuer: Option<crate::net::HttpUrl>,
    /// Background refresh period.
    pub jwks_ttl: Duration,
    /// Least time between unknown-`kid` refetches.
    pub jwks_refetch_interval: Duration,
    /// Time allowed for one fetch.
    pub jwks_fetch_timeout: Duration,
    /// Extra CA for an https JWKS.
    pub jwks_ca_file: Option<PathBuf>,
    /// Required `iss`.
    pub issuer: Option<String>,
    /// Accepted `aud` values; empty means any.
    pub audiences: Vec<String>,
    /// Accepted algorithms.
    pub algorithms: Vec<Algorithm>,
    /// Clock-skew allowance.
    pub leeway: Duration,
    /// Required JOSE `typ`, compared without `application/` and case.
    pub required_typ: Option<String>,
    /// Largest token accepted.
    pub max_token_bytes: usize,
    /// Cookie carrying the token.
    pub cookie_name: String,
    /// Query parameter carrying the token.
    pub query_param: String,
    /// `(claim, header)` pairs forwarded upstream.
    pub forward_claims: Vec<(String, String)>,
    /// Allowed Origins.
    pub origins: OriginPolicy,
    /// Refuse upgrades without Origin.
    pub require_origin: bool,
    /// Token in the MQTT CONNECT password.
    pub mqtt_connect_auth: bool,
}

/// The validated configuration the gateway runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// WebSocket listener.
    pub listen: SocketAddr,
    /// Admin listener.
    pub admin_listen: SocketAddr,
    /// TLS files, or `None` for plain HTTP.
    pub tls: Option<TlsFiles>,
    /// Path prefix to upstream.
    pub routes: RouteTable,
    /// Endpoints, balancing, breakers and retries.
    pub upstream: UpstreamSettings,
    /// Extra CA for wss upstreams.
    pub upstream_ca_file: Option<PathBuf>,
    /// Time limits.
    pub timeouts: Timeouts,
    /// Connection limit.
    pub max_connections: usize,
    /// Request head size limit.
    pub max_request_head_bytes: usize,
    /// Authentication.
    pub auth: AuthSettings,
    /// Expect PROXY protocol headers.
    pub proxy_protocol: bool,
    /// Peers whose PROXY headers are believed.
    pub trusted_proxies: Vec<Cidr>,
    /// Peers whose X-Forwarded-For and X-Forwarded-Proto are believed.
    pub forwarded_trusted: Vec<Cidr>,
    /// Connections before authentication held at once.
    pub max_pending_handshakes: usize,
    /// Listen with SO_REUSEPORT.
    pub reuse_port: bool,
    /// Handshakes per client address, checked before TLS; `None` when off.
    pub handshake_budget: Option<RateLimit>,
    /// Client frames per session; `None` when off.
    pub message_rate: Option<RateLimit>,
    /// Where revocations are shared.
    pub store: StoreConfig,
    /// The store was chosen with the Go name `JWT_CACHE_STORE`.
    pub store_alias: bool,
    /// Seconds a revocation lasts when the token's expiry is unknown.
    pub revocation_max_ttl: i64,
    /// Answer 503 while the store is unreachable.
    pub fail_closed: bool,
    /// The admin API's bearer secret.
    pub admin_token: Option<Secret>,
    /// Role an admin JWT must carry; `None` (with no admin token either) keeps the admin API off.
    pub admin_role: Option<String>,
    /// `aud` a back-channel logout token must contain.
    pub oidc_client_id: Option<String>,
    /// Per-subject limits.
    pub limits: LimitSettings,
    /// The MQTT CONNECT rewrite (global; routes may override the username claim).
    pub mqtt: MqttSettings,
    /// Topic rules (global; routes may override the publish and subscribe templates).
    pub mqtt_acl: AclSettings,
    /// `MQTT_REAUTH_METHOD`; `None` when re-authentication is off.
    pub mqtt_reauth_method: Option<String>,
    /// Redis URL, as given.
    pub redis_url: Option<String>,
    /// PostgreSQL DSN, as given.
    pub postgres_dsn: Option<String>,
    /// Log output format.
    pub log_format: LogFormat,
    /// Insecure demo mode.
    pub dev: bool,
}

impl fmt::Display for Config {
    /// A one-line summary for the startup log; names no secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "listen={} admin={} tls={} routes={} max_connections={}",
            self.listen,
            self.admin_listen,
            self.tls.is_some(),
            self.routes.len(),
            self.max_connections
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Settings {
        let mut full = vec!["ws-gateway"];
        full.extend_from_slice(args);
        Settings::try_parse_from(full).expect("flags parse")
    }

    #[test]
    fn flags_win_over_file_and_file_over_defaults() {
        let flags = parse(&[
            "--ws-idle-timeout-seconds",
            "7",
            "--jwks-url",
            "http://127.0.0.1:1/jwks",
        ]);
        let file: Settings = toml::from_str(
            "ws_idle_timeout_seconds = 99\nws_write_timeout_seconds = 3\nupstream_ws_url = \"ws://127.0.0.1:9/\"",
        )
        .expect("toml");
        let config = flags.merge(file).resolve().expect("valid");
        assert_eq!(config.timeouts.idle, Duration::from_secs(7));
        assert_eq!(config.timeouts.write, Duration::from_secs(3));
        assert_eq!(config.timeouts.handshake, Duration::from_secs(10));
        assert_eq!(config.auth.cookie_name, "session");
        assert_eq!(config.auth.algorithms, vec![Algorithm::RS256]);
    }

    #[test]
    fn unknown_file_key_is_named() {
        let err = toml::from_str::<Settings>("ws_idle_timeout = 5").expect_err("unknown key");
        assert!(err.to_string().contains("ws_idle_timeout"), "{err}");
    }

    #[test]
    fn bad_file_value_is_named() {
        let err =
            toml::from_str::<Settings>("ws_idle_timeout_seconds = \"soon\"").expect_err("bad type");
        assert!(err.to_string().contains("ws_idle_timeout_seconds"), "{err}");
    }

    #[test]
    fn only_one_tls_file_is_an_error() {
        let err = parse(&[
            "--tls-cert",
            "/x.pem",
            "--upstream-ws-url",
            "ws://a/",
            "--jwks-url",
            "http://a/",
        ])
        .resolve()
        .expect_err("one file");
        assert!(err.setting.contains("TLS_KEY_FILE"), "{err}");
    }

    #[test]
    fn durations_are_bounded_and_zero_refetch_is_refused() {
        let base = [
            "--upstream-ws-url",
            "ws://a/",
            "--jwks-url",
            "http://idp/jwks",
        ];
        for (flag, value, setting) in [
            (
                "--ws-idle-timeout-seconds",
                "18446744073709551615",
                "WS_IDLE_TIMEOUT_SECONDS",
            ),
            (
                "--handshake-timeout-seconds",
                "604801",
                "HANDSHAKE_TIMEOUT_SECONDS",
            ),
            (
                "--graceful-drain-timeout-seconds",
                "99999999999",
                "GRACEFUL_DRAIN_TIMEOUT_SECONDS",
            ),
            (
                "--jwks-refetch-interval-seconds",
                "0",
                "JWKS_REFETCH_INTERVAL_SECONDS",
            ),
            ("--jwks-ttl-minutes", "0", "JWKS_TTL_MINUTES"),
            ("--jwt-leeway-seconds", "86401", "JWT_LEEWAY_SECONDS"),
            ("--drain-spread-seconds", "31", "DRAIN_SPREAD_SECONDS"),
        ] {
            let mut args = base.to_vec();
            args.extend([flag, value]);
            let err = parse(&args).resolve().expect_err(flag);
            assert!(err.setting.contains(setting), "{flag}: {err}");
            assert!(err.setting.contains(flag), "{flag}: {err}");
        }
        let ok = parse(&base).resolve().expect("defaults");
        assert_eq!(ok.timeouts.drain_spread, Duration::from_secs(5));
        assert_eq!(ok.auth.jwks_refetch_interval, Duration::from_secs(10));
    }

    #[test]
    fn errors_never_echo_secrets() {
        assert_eq!(
            redact("postgres_dns = \"postgres://gw:hunter2@db:5432/gw?sslmode=require\""),
            "postgres_dns = \"postgres://gw:***@db:5432/gw?***\""
        );
        assert_eq!(
            redact("bad url https://idp/jwks?client_secret=s3cr3t here"),
            "bad url https://idp/jwks?*** here"
        );
        assert_eq!(
            redact("host=db user=gw password='a b' dbname=gw"),
            "host=db user=gw password=*** dbname=gw"
        );
        assert_eq!(
            redact("redis://:pw@cache:6379/0"),
            "redis://:***@cache:6379/0"
        );
        // A mistyped key in the file: the parser's message quotes the line, which must not carry the password.
        let dir = std::env::temp_dir().join(format!("wsgw-redact-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("c.toml");
        std::fs::write(&file, "postgres_dns = \"postgres://gw:hunter2@db/gw\"\n").expect("write");
        let err = Settings::from_file(&file).expect_err("unknown key");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(!err.to_string().contains("hunter2"), "{err}");
        let err = parse(&[
            "--upstream-ws-url",
            "ws://a/",
            "--jwks-url",
            "ftp://u:hunter2@idp/x?k=v",
        ])
        .resolve()
        .expect_err("scheme");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn missing_jwks_url_is_an_error() {
        let err = parse(&["--upstream-ws-url", "ws://a/"])
            .resolve()
            .expect_err("no jwks");
        assert!(err.setting.contains("JWKS_URL"), "{err}");
    }

    #[test]
    fn comma_lists_from_string_or_array() {
        let s: Settings = toml::from_str(
            "ws_allowed_origins = [\"https://a.example\", \" https://b.example \"]\n",
        )
        .expect("array");
        assert_eq!(
            s.ws_allowed_origins.expect("set").0,
            vec!["https://a.example", "https://b.example"]
        );
        let s: Settings = toml::from_str("jwt_expected_audience = \"a, b,,c\"\n").expect("string");
        assert_eq!(s.jwt_expected_audience.expect("set").0, vec!["a", "b", "c"]);
    }

    #[test]
    fn hs256_is_refused_as_a_setting() {
        let err = parse(&[
            "--upstream-ws-url",
            "ws://a/",
            "--jwks-url",
            "http://a/",
            "--jwt-valid-algorithms",
            "HS256",
        ])
        .resolve()
        .expect_err("hs256");
        assert!(err.setting.contains("JWT_VALID_ALGORITHMS"), "{err}");
    }

    #[test]
    fn upstream_settings_have_defaults_bounds_and_lists() {
        let base = ["--jwks-url", "http://idp/jwks"];
        let mut args = base.to_vec();
        args.extend(["--upstream-ws-url", "ws://a:1/mqtt, wss://b/ ,ws://[::1]:9"]);
        let ok = parse(&args).resolve().expect("defaults");
        let urls = &ok.routes.routes()[0].upstreams;
        assert_eq!(
            urls.iter().map(|u| u.host.as_str()).collect::<Vec<_>>(),
            ["a", "b", "::1"]
        );
        let u = ok.upstream;
        assert_eq!(u.dns_refresh, Duration::from_secs(10));
        assert_eq!(u.balance, Balance::LeastConnections);
        assert_eq!(
            (u.failure_threshold, u.open_timeout),
            (5, Duration::from_secs(10))
        );
        assert_eq!(u.healthcheck, None);
        assert_eq!(
            (u.retry_max, u.retry_interval),
            (2, Duration::from_millis(100))
        );
        assert!(!u.readiness_requires_upstream);

        let mut args = base.to_vec();
        args.extend([
            "--upstream-ws-url",
            "ws://a/",
            "--upstream-balance",
            "hash-subject",
            "--ws-dial-retry-interval-seconds",
            "0.25",
            "--cb-healthcheck-interval-seconds",
            "3",
            "--readiness-requires-upstream",
        ]);
        let set = parse(&args).resolve().expect("valid").upstream;
        assert_eq!(set.balance, Balance::HashSubject);
        assert_eq!(set.retry_interval, Duration::from_millis(250));
        assert_eq!(set.healthcheck, Some(Duration::from_secs(3)));
        assert!(set.readiness_requires_upstream);
        // The file takes the same keys, the balance in kebab-case and the interval as an integer or a decimal.
        let file: Settings = toml::from_str(
            "upstream_ws_url = [\"ws://a/\", \"ws://b/\"]\nupstream_balance = \"hash-subject\"\n\
ws_dial_retry_interval_seconds = 1\njwks_url = \"http://idp/jwks\"\n",
        )
        .expect("toml");
        let c = Settings::default().merge(file).resolve().expect("valid");
        assert_eq!(c.routes.routes()[0].upstreams.len(), 2);
        assert_eq!(c.upstream.balance, Balance::HashSubject);
        assert_eq!(c.upstream.retry_interval, Duration::from_secs(1));

        for (flag, value, setting) in [
            (
                "--upstream-dns-refresh-seconds",
                "0",
                "UPSTREAM_DNS_REFRESH_SECONDS",
            ),
            ("--cb-failure-threshold", "0", "CB_FAILURE_THRESHOLD"),
            ("--cb-failure-threshold", "101", "CB_FAILURE_THRESHOLD"),
            ("--cb-open-timeout-seconds", "0", "CB_OPEN_TIMEOUT_SECONDS"),
            (
                "--cb-healthcheck-interval-seconds",
                "3601",
                "CB_HEALTHCHECK_INTERVAL_SECONDS",
            ),
            ("--ws-dial-retry-max", "11", "WS_DIAL_RETRY_MAX"),
            (
                "--ws-dial-retry-interval-seconds",
                "10.5",
                "WS_DIAL_RETRY_INTERVAL_SECONDS",
            ),
            (
                "--ws-dial-retry-interval-seconds",
                "NaN",
                "WS_DIAL_RETRY_INTERVAL_SECONDS",
            ),
            (
                "--ws-dial-retry-interval-seconds",
                "inf",
                "WS_DIAL_RETRY_INTERVAL_SECONDS",
            ),
            ("--upstream-ws-url", "ws://a/,http://b/", "UPSTREAM_WS_URL"),
        ] {
            let mut args = vec!["--jwks-url", "http://idp/jwks"];
            if flag != "--upstream-ws-url" {
                args.extend(["--upstream-ws-url", "ws://a/"]);
            }
            args.extend([flag, value]);
            let err = parse(&args).resolve().expect_err(value);
            assert!(err.setting.contains(setting), "{flag} {value}: {err}");
            assert!(err.setting.contains(flag), "{flag} {value}: {err}");
        }
        let many = vec!["ws://a/"; crate::route::MAX_UPSTREAM_URLS + 1].join(",");
        let err = parse(&["--upstream-ws-url", &many, "--jwks-url", "http://idp/jwks"])
            .resolve()
            .expect_err("too many");
        assert!(err.setting.contains("UPSTREAM_WS_URL"), "{err}");
        assert!(
            Settings::try_parse_from(["ws-gateway", "--upstream-balance", "random"]).is_err(),
            "an unknown policy is refused by the parser"
        );
    }

    #[test]
    fn rate_limits_are_off_by_default_and_bounded() {
        let base = [
            "--upstream-ws-url",
            "ws://a/",
            "--jwks-url",
            "http://idp/jwks",
        ];
        let off = parse(&base).resolve().expect("defaults");
        assert_eq!((off.handshake_budget, off.message_rate), (None, None));
        let with = |extra: &[&str]| {
            let mut args = base.to_vec();
            args.extend_from_slice(extra);
            parse(&args).resolve()
        };
        let on = with(&[
            "--handshake-rate-per-ip",
            "2.5",
            "--ws-message-rate-per-second",
            "100",
            "--ws-message-burst",
            "400",
        ])
        .expect("valid");
        // The burst defaults to one second of the rate, rounded up.
        assert_eq!(
            on.handshake_budget,
            Some(RateLimit {
                per_second: 2.5,
                burst: 3
            })
        );
        assert_eq!(
            on.message_rate,
            Some(RateLimit {
                per_second: 100.0,
                burst: 400
            })
        );
        // A burst of 0 turns either off.
        let off = with(&[
            "--handshake-rate-per-ip",
            "5",
            "--handshake-burst-per-ip",
            "0",
        ])
        .expect("valid");
        assert_eq!(off.handshake_budget, None);
        for (extra, setting) in [
            (
                &["--handshake-rate-per-ip", "NaN"][..],
                "HANDSHAKE_RATE_PER_IP (--handshake-rate-per-ip)",
            ),
            (
                &["--handshake-rate-per-ip", "inf"][..],
                "HANDSHAKE_RATE_PER_IP (--handshake-rate-per-ip)",
            ),
            (
                &["--handshake-rate-per-ip", "0.0001"][..],
                "HANDSHAKE_RATE_PER_IP (--handshake-rate-per-ip)",
            ),
            (
                &["--handshake-rate-per-ip=-1"][..],
                "HANDSHAKE_RATE_PER_IP (--handshake-rate-per-ip)",
            ),
            (
                &[
                    "--handshake-rate-per-ip",
                    "1",
                    "--handshake-burst-per-ip",
                    "1000001",
                ][..],
                "HANDSHAKE_BURST_PER_IP (--handshake-burst-per-ip)",
            ),
            (
                &["--handshake-burst-per-ip", "10"][..],
                "HANDSHAKE_BURST_PER_IP (--handshake-burst-per-ip)",
            ),
            (
                &["--ws-message-rate-per-second", "1000001"][..],
                "WS_MESSAGE_RATE_PER_SECOND (--ws-message-rate-per-second)",
            ),
            (
                &["--ws-message-burst", "3"][..],
                "WS_MESSAGE_BURST (--ws-message-burst)",
            ),
        ] {
            let err = with(extra).expect_err(extra[0]);
            assert_eq!(err.setting, setting, "{extra:?}: {err}");
        }
    }

    #[test]
    fn rate_limits_from_the_file() {
        let file: Settings = toml::from_str(
            "handshake_rate_per_ip = 10\nhandshake_burst_per_ip = 20\nws_message_rate_per_second = 0.5\n",
        )
        .expect("toml");
        let config = parse(&[
            "--upstream-ws-url",
            "ws://a/",
            "--jwks-url",
            "http://idp/jwks",
        ])
        .merge(file)
        .resolve()
        .expect("valid");
        assert_eq!(
            config.handshake_budget,
            Some(RateLimit {
                per_second: 10.0,
                burst: 20
            })
        );
        assert_eq!(
            config.message_rate,
            Some(RateLimit {
                per_second: 0.5,
                burst: 1
            })
        );
    }

    #[test]
    fn mqtt_settings_default_off_and_are_checked() {
        use crate::mqtt_identity::{ClientIdPolicy, PasswordForward, UsernameFormat};
        assert_eq!(
            parse(&[]).mqtt_settings().expect("defaults"),
            MqttSettings::default()
        );
        let s = parse(&[
            "--mqtt-username-claim",
            " preferred_username ",
            "--mqtt-username-format",
            "GO",
            "--mqtt-password-forward",
            "drop",
            "--mqtt-client-id-policy",
            "prefix-subject",
        ])
        .mqtt_settings()
        .expect("valid");
        assert_eq!(
            s,
            MqttSettings {
                username_claim: Some("preferred_username".into()),
                username_format: UsernameFormat::Go,
                password_forward: PasswordForward::Drop,
                client_id_policy: ClientIdPolicy::PrefixSubject,
            }
        );
        let long = "c".repeat(129);
        for (flag, value, setting) in [
            (
                "--mqtt-username-claim",
                long.as_str(),
                "MQTT_USERNAME_CLAIM (--mqtt-username-claim)",
            ),
            (
                "--mqtt-username-format",
                "json",
                "MQTT_USERNAME_FORMAT (--mqtt-username-format)",
            ),
            (
                "--mqtt-password-forward",
                "hash",
                "MQTT_PASSWORD_FORWARD (--mqtt-password-forward)",
            ),
            (
                "--mqtt-client-id-policy",
                "prefix",
                "MQTT_CLIENT_ID_POLICY (--mqtt-client-id-policy)",
            ),
        ] {
            let e = parse(&[flag, value]).mqtt_settings().expect_err(flag);
            assert!(e.to_string().contains(setting), "{e}");
        }
    }

    #[test]
    fn topic_rules_and_the_reauth_method_default_off_and_on_and_are_checked() {
        use crate::mqtt_acl::DenyAction;
        let none = parse(&[]);
        assert_eq!(none.mqtt_acl().expect("defaults"), AclSettings::default());
        assert_eq!(
            none.mqtt_reauth_method().expect("default"),
            Some("jwt".into())
        );
        let s = parse(&[
            "--mqtt-publish-acl",
            "devices/{sub}/#, tenants/{claim:tenant}/#",
            "--mqtt-subscribe-acl",
            "",
            "--mqtt-acl-deny-action",
            " Disconnect ",
            "--mqtt-reauth-method",
            "",
        ]);
        let acl = s.mqtt_acl().expect("valid");
        assert_eq!(acl.publish.as_ref().map(Vec::len), Some(2));
        assert_eq!(acl.subscribe, None, "an empty list is no rule");
        assert_eq!(acl.deny, DenyAction::Disconnect);
        assert_eq!(acl.claims().collect::<Vec<_>>(), ["tenant"]);
        assert_eq!(s.mqtt_reauth_method().expect("off"), None);
        for (flag, value) in [
            ("--mqtt-publish-acl", "a/{sub"),
            ("--mqtt-subscribe-acl", "a/#/b"),
            ("--mqtt-acl-deny-action", "drop"),
        ] {
            let e = parse(&[flag, value]).mqtt_acl().expect_err(flag);
            assert!(
                e.to_string()
                    .contains(&flag[2..].to_ascii_uppercase().replace('-', "_")),
                "{e}"
            );
        }
        let long = "m".repeat(129);
        assert!(parse(&["--mqtt-reauth-method", &long])
            .mqtt_reauth_method()
            .is_err());
    }

    #[test]
    fn boolish_flags() {
        assert_eq!(
            parse(&["--ws-require-origin"]).ws_require_origin,
            Some(true)
        );
        assert_eq!(
            parse(&["--ws-require-origin", "false"]).ws_require_origin,
            Some(false)
        );
    }
}
