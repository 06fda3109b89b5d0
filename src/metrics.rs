//! Metric handles, created once and shared. Names follow the Go gateway where they mean the same, so dashboards
//! carry over. Every label value is a `&'static str` from a fixed set: the label space is bounded by construction.
//!
//! The relay never touches these per chunk: a session counts its bytes locally and publishes them in batches.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels1 = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];

/// A route, by its configured prefix: bounded by the configuration.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// The route's prefix.
    pub route: String,
}

/// One endpoint of a route, by its position (at most 64 per route), never by its address: addresses come from DNS
/// and change, positions are bounded. The `upstream_endpoints` log line maps positions to addresses.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    /// The route's prefix.
    pub route: String,
    /// The endpoint's position, `0` to `63` (`none` when the names resolved to nothing).
    pub endpoint: String,
}

/// A failed upstream dial, by endpoint and kind.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DialFailureLabels {
    /// The route's prefix.
    pub route: String,
    /// The endpoint's position (`none` when the names resolved to nothing).
    pub endpoint: String,
    /// `connect`, `tls`, `timeout`, `status`, `handshake`, `io`, `bad_name` or `resolve`.
    pub kind: &'static str,
}

/// Every metric the gateway exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Connections accepted.
    pub connections: Counter,
    /// Authentication failures by reason.
    pub auth_failures: Family<Labels1, Counter>,
    /// Authentication successes (no per-user label).
    pub auth_success: Counter,
    /// Sessions relaying now.
    pub active_sessions: Gauge,
    /// Session length.
    pub session_duration: Histogram,
    /// Sessions by negotiated subprotocol (known names, else `other`).
    pub protocol_connections: Family<Labels1, Counter>,
    /// Proxy errors by kind.
    pub proxy_errors: Family<Labels1, Counter>,
    /// Request head to 101.
    pub handshake_duration: Histogram,
    /// Bytes relayed by direction.
    pub relay_bytes: Family<Labels1, Counter>,
    /// Upstream connect to 101.
    pub upstream_dial_duration: Histogram,
    /// Failed upstream dials (each attempt, retries included) by route, endpoint and kind.
    pub upstream_failures: Family<DialFailureLabels, Counter>,
    /// Dials retried on another (or the same) endpoint, by route.
    pub proxy_retries: Family<RouteLabels, Counter>,
    /// Times an endpoint's circuit breaker opened.
    pub circuit_opens: Family<EndpointLabels, Counter>,
    /// 1 while an endpoint is healthy (its breaker not open), 0 while open.
    pub upstream_health: Family<EndpointLabels, Gauge>,
    /// Endpoints a route's names resolve to now.
    pub upstream_endpoints: Family<RouteLabels, Gauge>,
    /// JWKS refreshes by result and trigger.
    pub jwks_refreshes: Family<Labels2, Counter>,
    /// Age of the keys in use.
    pub jwks_key_age: Gauge<f64, AtomicU64>,
    /// Failed TLS handshakes.
    pub tls_handshake_failures: Counter,
    /// Rejected requests by status.
    pub rejections: Family<Labels1, Counter>,
    /// 1 while draining.
    pub draining: Gauge,
    /// Certificate reloads by result.
    pub cert_reloads: Family<Labels1, Counter>,
    /// Session ends by reason.
    pub session_closes: Family<Labels1, Counter>,
    /// Verified-token cache lookups by result.
    pub token_cache: Family<Labels1, Counter>,
    /// Pending connections evicted to make room, by listener (`handshake`, `admin`).
    pub evictions: Family<Labels1, Counter>,
    /// Reloaded certificates that clients will refuse, by kind (`expired`, `not_yet_valid`).
    pub cert_warnings: Family<Labels1, Counter>,
    /// Revocations applied, by kind (`sub`, `jti`, `sid`) and origin (`api`, `backchannel`, `peer`).
    pub revocations: Family<Labels2, Counter>,
    /// 1 while the shared state store is reachable.
    pub store_up: Gauge,
    /// Times the shared state store was lost.
    pub store_reconnects: Counter,
    /// Sessions refused or closed by a limit, by kind (`subject_rate`, `subject_sessions`, `handshake_ip`, `message_rate`): the Go name.
    pub rate_limit_violations: Family<Labels1, Counter>,
    /// Session leases this replica holds under MAX_SESSIONS_PER_SUBJECT.
    pub session_leases: Gauge,
    /// Per-subject limit decisions taken per process because the store could not answer, by limit.
    pub limit_fallbacks: Family<Labels1, Counter>,
    /// MQTT 5 token refreshes (AUTH 0x19), by result (`ok`, `refused`).
    pub mqtt_reauth: Family<Labels1, Counter>,
    /// Client packets outside the topic rules, by kind (`publish`, `subscribe`).
    pub mqtt_acl_denied: Family<Labels1, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    #[must_use]
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let m = Metrics {
            connections: Counter::default(),
            auth_failures: Family::default(),
            auth_success: Counter::default(),
            active_sessions: Gauge::default(),
            session_duration: Histogram::new(exponential_buckets(0.1, 4.0, 10)),
            protocol_connections: Family::default(),
            proxy_errors: Family::default(),
            handshake_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            relay_bytes: Family::default(),
            upstream_dial_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            upstream_failures: Family::default(),
            proxy_retries: Family::default(),
            circuit_opens: Family::default(),
            upstream_health: Family::default(),
            upstream_endpoints: Family::default(),
            jwks_refreshes: Family::default(),
            jwks_key_age: Gauge::default(),
            tls_handshake_failures: Counter::default(),
            rejections: Family::default(),
            draining: Gauge::default(),
            cert_reloads: Family::default(),
            session_closes: Family::default(),
            token_cache: Family::default(),
            evictions: Family::default(),
            cert_warnings: Family::default(),
            revocations: Family::default(),
            store_up: Gauge::default(),
            store_reconnects: Counter::default(),
            rate_limit_violations: Family::default(),
            session_leases: Gauge::default(),
            limit_fallbacks: Family::default(),
            mqtt_reauth: Family::default(),
            mqtt_acl_denied: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "ws_connections",
            "Connections accepted",
            m.connections.clone(),
        );
        registry.register(
            "ws_auth_failures",
            "Authentication failures by reason",
            m.auth_failures.clone(),
        );
        registry.register(
            "ws_auth_success",
            "Successful authentications",
            m.auth_success.clone(),
        );
        registry.register(
            "ws_active_sessions",
            "Sessions relaying now",
            m.active_sessions.clone(),
        );
        registry.register(
            "ws_connection_duration_seconds",
            "Session duration",
            m.session_duration.clone(),
        );
        registry.register(
            "ws_protocol_connections",
            "Sessions by subprotocol",
            m.protocol_connections.clone(),
        );
        registry.register(
            "ws_proxy_errors",
            "Proxy errors by kind",
            m.proxy_errors.clone(),
        );
        registry.register(
            "ws_handshake_duration_seconds",
            "Request head to 101",
            m.handshake_duration.clone(),
        );
        registry.register(
            "ws_relay_bytes",
            "Bytes relayed by direction",
            m.relay_bytes.clone(),
        );
        registry.register(
            "ws_upstream_dial_duration_seconds",
            "Upstream dial to 101",
            m.upstream_dial_duration.clone(),
        );
        registry.register(
            "ws_upstream_failures",
            "Failed upstream dials (every attempt) by route, endpoint and kind",
            m.upstream_failures.clone(),
        );
        registry.register(
            "ws_proxy_retries",
            "Upstream dials retried, by route",
            m.proxy_retries.clone(),
        );
        registry.register(
            "ws_circuit_open",
            "Times an endpoint's circuit breaker opened",
            m.circuit_opens.clone(),
        );
        registry.register(
            "ws_upstream_health",
            "1 while an endpoint's circuit breaker is not open",
            m.upstream_health.clone(),
        );
        registry.register(
            "ws_upstream_endpoints",
            "Endpoints a route's upstream names resolve to",
            m.upstream_endpoints.clone(),
        );
        registry.register(
            "ws_jwks_refreshes",
            "JWKS fetches by result and trigger",
            m.jwks_refreshes.clone(),
        );
        registry.register(
            "ws_jwks_key_age_seconds",
            "Age of the signing keys in use",
            m.jwks_key_age.clone(),
        );
        registry.register(
            "ws_tls_handshake_failures",
            "Failed TLS handshakes",
            m.tls_handshake_failures.clone(),
        );
        registry.register(
            "ws_rejections",
            "Requests refused, by HTTP status",
            m.rejections.clone(),
        );
        registry.register("ws_draining", "1 while draining", m.draining.clone());
        registry.register(
            "ws_cert_reloads",
            "Certificate reloads by result",
            m.cert_reloads.clone(),
        );
        registry.register(
            "ws_session_closes",
            "Session ends by reason",
            m.session_closes.clone(),
        );
        registry.register(
            "ws_token_cache",
            "Verified-token cache lookups",
            m.token_cache.clone(),
        );
        registry.register(
            "ws_pending_evictions",
            "Connections closed before authentication (or, on the admin port, before their request) to make room",
            m.evictions.clone(),
        );
        registry.register(
            "ws_cert_reload_warnings",
            "Reloaded certificates that are expired or not yet valid",
            m.cert_warnings.clone(),
        );
        registry.register(
            "ws_revocations",
            "Revocations applied, by kind and origin",
            m.revocations.clone(),
        );
        registry.register(
            "ws_state_store_up",
            "1 while the shared state store is reachable",
            m.store_up.clone(),
        );
        registry.register(
            "ws_state_store_reconnects",
            "Times the shared state store was lost",
            m.store_reconnects.clone(),
        );
        registry.register(
            "ws_rate_limit_violations",
            "Connections, handshakes or sessions stopped by a rate or session limit, by kind",
            m.rate_limit_violations.clone(),
        );
        registry.register(
            "ws_session_leases",
            "Session leases this replica holds under MAX_SESSIONS_PER_SUBJECT",
            m.session_leases.clone(),
        );
        registry.register(
            "ws_limit_fallbacks",
            "Per-subject limit decisions taken per process because the state store could not answer",
            m.limit_fallbacks.clone(),
        );
        registry.register(
            "ws_mqtt_reauth",
            "MQTT 5 token refreshes (AUTH 0x19) by result: ok or refused",
            m.mqtt_reauth.clone(),
        );
        registry.register(
            "ws_mqtt_acl_denied",
            "Client MQTT packets outside the topic rules, by kind: publish or subscribe",
            m.mqtt_acl_denied.clone(),
        );
        Metrics { registry, ..m }
    }

    /// OpenMetrics text of every metric.
    #[must_use]
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Records a JWKS fetch.
    pub fn jwks_refresh(&self, ok: bool, trigger: &'static str) {
        self.jwks_refreshes
            .get_or_create(&[
                ("result", if ok { "ok" } else { "error" }),
                ("trigger", trigger),
            ])
            .inc();
    }

    /// Records a failed authentication by its bounded reason.
    pub fn auth_failure(&self, reason: &'static str) {
        self.auth_failures
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    /// Records a refused request.
    pub fn reject(&self, status: u16) {
        self.rejections
            .get_or_create(&[("status", status_label(status))])
            .inc();
    }
}

fn status_label(status: u16) -> &'static str {
    match status {
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        408 => "408",
        426 => "426",
        429 => "429",
        431 => "431",
        502 => "502",
        503 => "503",
        _ => "other",
    }
}

/// A bounded label for a negotiated subprotocol.
#[must_use]
pub fn protocol_label(p: Option<&str>) -> &'static str {
    match p.map(str::to_ascii_lowercase).as_deref() {
        None => "none",
        Some("mqtt") => "mqtt",
        Some("mqttv3.1") => "mqttv3.1",
        Some("wamp") | Some("wamp.2.json") => "wamp",
        Some("graphql-ws") | Some("graphql-transport-ws") => "graphql",
        Some("stomp") | Some("v12.stomp") | Some("v11.stomp") | Some("v10.stomp") => "stomp",
        Some(_) => "other",
    }
}
