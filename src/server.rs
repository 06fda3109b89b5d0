//! The listener and the life of one connection: permit, PROXY header, TLS, request head, route, upgrade checks,
//! Origin, token, upstream, 101, relay. Each refusal is answered in one place ([`ConnError::response`]) and logged
//! once with its bounded `kind`.
//!
//! See `src/LIFECYCLE.md` for the states and which timer guards each.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::pending::{Pending, Ticket};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::auth::jwt::{unix_now, Verifier};
use crate::auth::source::{find_token, Source};
use crate::auth::{AuthError, Identity};
use crate::config::Config;
use crate::metrics::{protocol_label, Metrics};
use crate::net::Io;
use crate::registry::{Registry, SessionInfo};
use crate::relay::{Limits, Session};
use crate::route::Route;
use crate::shutdown::{ConnectionGuard, Guards, Phase, Signal};
use crate::upgrade::{check_upgrade, read_head, ReadHead, RequestHead, Response, UpgradeError};
use crate::upstream::{self, Forwarding, UpstreamError};

/// Everything a connection needs, shared by all of them.
pub struct Gateway {
    /// The validated configuration.
    pub config: Config,
    /// TLS for the listener, or `None` for plain HTTP.
    pub tls: Option<TlsAcceptor>,
    /// Client TLS for `wss://` upstreams.
    pub upstream_tls: Arc<rustls::ClientConfig>,
    /// Token verification.
    pub verifier: Arc<Verifier>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Live sessions.
    pub registry: Arc<Registry>,
    /// The drain phase.
    pub signal: Signal,
    /// Session slots (`MAX_CONNECTIONS`), taken once a connection is authenticated and held until it ends.
    pub sessions: Arc<Semaphore>,
    /// Connections still in their handshake (`MAX_PENDING_HANDSHAKES`); the oldest is evicted when full.
    pub pending: Arc<Pending>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("config", &self.config)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// Readiness: keys loaded and not draining.
    #[must_use]
    pub fn is_ready(&self) -> bool {
        self.signal.phase() == Phase::Running && self.verifier.keys().is_ready()
    }
}

/// A refused or failed connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The request is not an acceptable upgrade.
    #[error("{0}")]
    Upgrade(#[from] UpgradeError),
    /// Authentication failed.
    #[error("{0}")]
    Auth(#[from] AuthError),
    /// The Origin is not allowed (or missing when required).
    #[error("origin not allowed")]
    Origin,
    /// The upstream cannot be used.
    #[error("{0}")]
    Upstream(#[from] UpstreamError),
    /// The handshake deadline passed.
    #[error("handshake timed out")]
    HandshakeTimeout,
    /// Every session slot (`MAX_CONNECTIONS`) is taken.
    #[error("session limit reached")]
    Busy,
}

impl ConnError {
    /// Bounded label for logs and metrics.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            ConnError::Upgrade(e) => e.kind(),
            ConnError::Auth(e) => e.kind(),
            ConnError::Origin => "origin",
            ConnError::Upstream(e) => e.kind(),
            ConnError::HandshakeTimeout => "handshake_timeout",
            ConnError::Busy => "busy",
        }
    }

    /// The HTTP answer.
    #[must_use]
    pub fn response(&self) -> Response {
        match self {
            ConnError::Upgrade(e) => e.response(),
            ConnError::Auth(e) => e.response(),
            ConnError::Origin => Response::new(403, "origin not allowed"),
            ConnError::Upstream(_) => Response::new(502, "upstream unavailable"),
            ConnError::HandshakeTimeout => Response::new(408, "request head not received in time"),
            ConnError::Busy => {
                Response::new(503, "too many sessions; try again").header("Retry-After", "1")
            }
        }
    }
}

/// Accepts connections until the drain starts; accept errors back off, and each connection runs in its own task.
///
/// Handshakes and sessions have separate budgets. A connection is registered in [`Gateway::pending`] at once, and
/// when `MAX_PENDING_HANDSHAKES` are pending the oldest is closed: idle unauthenticated sockets evict each other,
/// not the client that just connected. Sessions take a slot of `MAX_CONNECTIONS` once authenticated (503 when
/// none is left), so neither budget can starve the other.
pub async fn serve(listener: TcpListener, gw: Arc<Gateway>, guards: Guards) {
    let mut signal = gw.signal.clone();
    let mut backoff = Duration::from_millis(5);
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => { backoff = Duration::from_millis(5); c }
                Err(error) => {
                    tracing::warn!(event = "accept_failed", %error, backoff_ms = backoff.as_millis() as u64, "accept failed; backing off");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
            () = signal.reached(Phase::Draining) => break,
        };
        let Some(guard) = guards.guard() else { break };
        let (ticket, evicted) = gw.pending.admit(peer.ip());
        if evicted > 0 {
            gw.metrics
                .evictions
                .get_or_create(&[("listener", "handshake")])
                .inc_by(evicted as u64);
        }
        let gw = Arc::clone(&gw);
        tokio::spawn(async move {
            handle(&gw, tcp, peer, guard, ticket).await;
        });
    }
    tracing::info!(
        event = "listener_closed",
        "listener closed; no new connections"
    );
}

/// A connection that passed every check and has an upstream: what the relay needs, and nothing else.
pub struct Established<'a> {
    client: Io,
    upstream: Io,
    client_rest: Vec<u8>,
    upstream_rest: Vec<u8>,
    peer: SocketAddr,
    route: &'a Route,
    identity: Identity,
    source: Source,
    slot: OwnedSemaphorePermit,
}

/// One connection from accept to close; the handshake permit is given back when the handshake phase ends.
///
/// The handshake phase runs in its own boxed future, freed before the relay starts: a long-lived idle session then
/// holds only what relaying needs, not the (much larger) state of TLS, token and upstream handshakes.
pub async fn handle(
    gw: &Gateway,
    tcp: TcpStream,
    peer: SocketAddr,
    guard: ConnectionGuard,
    ticket: Ticket,
) {
    gw.metrics.connections.inc();
    // A separate statement: a temporary in an `if let` scrutinee keeps its storage for the whole block, and the
    // handshake future would then be reserved in every idle session's task.
    let established = tokio::select! {
        e = Box::pin(establish(gw, tcp, peer)) => e,
        () = ticket.evicted() => {
            tracing::debug!(event = "handshake_evicted", peer = %peer, "oldest pending handshake closed to make room");
            None
        }
    };
    drop(ticket);
    if let Some(session) = established {
        relay(gw, session, guard).await;
    }
}

/// Everything before the relay; `None` when the connection was refused or went away (already answered and logged).
async fn establish(
    gw: &Gateway,
    mut tcp: TcpStream,
    mut peer: SocketAddr,
) -> Option<Established<'_>> {
    let _ = tcp.set_nodelay(true);
    let deadline = Instant::now() + gw.config.timeouts.handshake;

    if gw.config.proxy_protocol {
        if !gw
            .config
            .trusted_proxies
            .iter()
            .any(|c| c.contains(peer.ip()))
        {
            tracing::warn!(event = "proxy_untrusted", peer = %peer, "PROXY protocol expected but peer is not trusted; closing");
            gw.metrics
                .proxy_errors
                .get_or_create(&[("kind", "proxy_untrusted")])
                .inc();
            return None;
        }
        match tokio::time::timeout_at(deadline, crate::proxy_protocol::read_header(&mut tcp)).await
        {
            Ok(Ok(Some(addr))) => peer = addr,
            Ok(Ok(None)) => {}
            Ok(Err(error)) => {
                tracing::warn!(event = "proxy_header_invalid", peer = %peer, %error, "bad PROXY protocol header; closing");
                gw.metrics
                    .proxy_errors
                    .get_or_create(&[("kind", "proxy_header")])
                    .inc();
                return None;
            }
            Err(_) => return None,
        }
    }

    let mut io = match &gw.tls {
        Some(acceptor) => match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
            Ok(Ok(s)) => Io::ServerTls(Box::new(s)),
            Ok(Err(error)) => {
                gw.metrics.tls_handshake_failures.inc();
                tracing::debug!(event = "tls_handshake_failed", peer = %peer, %error, "TLS handshake failed");
                return None;
            }
            Err(_) => {
                gw.metrics.tls_handshake_failures.inc();
                tracing::debug!(event = "tls_handshake_timeout", peer = %peer, "TLS handshake timed out");
                return None;
            }
        },
        None => Io::Plain(tcp),
    };

    let (head, rest) = match tokio::time::timeout_at(
        deadline,
        read_head(&mut io, gw.config.max_request_head_bytes),
    )
    .await
    {
        Ok(Ok(Ok(ReadHead::Complete(head, rest)))) => (head, rest),
        Ok(Ok(Ok(ReadHead::Closed))) | Ok(Err(_)) => return None,
        Ok(Ok(Err(e))) => {
            return refuse(gw, &mut io, peer, None, None, ConnError::Upgrade(e)).await
        }
        Err(_) => return refuse(gw, &mut io, peer, None, None, ConnError::HandshakeTimeout).await,
    };
    let started = Instant::now();

    if head.path() == "/healthz" {
        let resp = if head.method == "GET" {
            Response::new(200, "ok")
        } else {
            UpgradeError::Method.response()
        };
        let _ = resp.send(&mut io).await;
        return None;
    }
    let Some(route) = gw.config.routes.find(head.path()) else {
        return refuse(
            gw,
            &mut io,
            peer,
            Some(&head),
            None,
            ConnError::Upgrade(UpgradeError::NoRoute),
        )
        .await;
    };
    let (identity, source) = match admit(gw, &head, route).await {
        Ok(ok) => ok,
        Err(ConnError::Auth(AuthError::Missing)) if mqtt_password_applies(gw, &head, route) => {
            return Box::pin(mqtt_session(gw, io, &head, rest, peer, route, deadline)).await;
        }
        Err(e) => return refuse(gw, &mut io, peer, Some(&head), Some(route), e).await,
    };
    gw.metrics.auth_success.inc();
    let Ok(slot) = Arc::clone(&gw.sessions).try_acquire_owned() else {
        return refuse(gw, &mut io, peer, Some(&head), Some(route), ConnError::Busy).await;
    };

    let request =
        upstream::build_request(&head, route, &forwarding(gw, &io, peer, &identity, false));
    let connected = match dial(gw, route, &request).await {
        Ok(c) => c,
        Err(e) => {
            let err = ConnError::Upstream(e);
            return refuse(gw, &mut io, peer, Some(&head), Some(route), err).await;
        }
    };
    let upstream::Connected {
        io: up,
        response,
        rest: up_rest,
        protocol,
    } = connected;

    use tokio::io::AsyncWriteExt;
    if io.write_all(&response).await.is_err() || io.flush().await.is_err() {
        return None;
    }
    gw.metrics
        .handshake_duration
        .observe(started.elapsed().as_secs_f64());
    gw.metrics
        .protocol_connections
        .get_or_create(&[("protocol", protocol_label(protocol.as_deref()))])
        .inc();
    Some(Established {
        client: io,
        upstream: up,
        client_rest: rest,
        upstream_rest: up_rest,
        peer,
        route,
        identity,
        source,
        slot,
    })
}

fn forwarding<'a>(
    gw: &'a Gateway,
    io: &Io,
    peer: SocketAddr,
    identity: &'a Identity,
    no_extensions: bool,
) -> Forwarding<'a> {
    Forwarding {
        client_ip: peer.ip(),
        tls: io.is_tls(),
        trusted_proxies: &gw.config.forwarded_trusted,
        identity,
        cookie_name: &gw.config.auth.cookie_name,
        query_param: &gw.config.auth.query_param,
        claim_headers: &gw.config.auth.forward_claims,
        no_extensions,
    }
}

/// The CONNECT-password path applies when the upgrade carries no token, the client offers `mqtt`, and the
/// setting (per route, else global) allows it.
fn mqtt_password_applies(gw: &Gateway, head: &RequestHead, route: &Route) -> bool {
    route
        .mqtt_connect_auth
        .unwrap_or(gw.config.auth.mqtt_connect_auth)
        && head
            .values("Sec-WebSocket-Protocol")
            .flat_map(|v| v.split(','))
            .any(|p| p.trim().eq_ignore_ascii_case("mqtt"))
}

/// Completes the client's handshake, reads and verifies the CONNECT password, then dials the upstream and relays
/// the CONNECT and everything after it unchanged. Refusals are CONNACK "not authorized" then Close 1008. The
/// CONNECT must arrive before the connection's one handshake `deadline`, not a fresh one.
async fn mqtt_session<'a>(
    gw: &'a Gateway,
    mut io: Io,
    head: &RequestHead,
    rest: Vec<u8>,
    peer: SocketAddr,
    route: &'a Route,
    deadline: Instant,
) -> Option<Established<'a>> {
    use tokio::io::AsyncWriteExt;
    let started = Instant::now();
    let key = head
        .single("Sec-WebSocket-Key")
        .ok()
        .flatten()
        .unwrap_or_default();
    let accept = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n",
        crate::upgrade::accept_key(key)
    );
    if io.write_all(accept.as_bytes()).await.is_err() || io.flush().await.is_err() {
        return None;
    }
    // Logs and counts a refusal; returns the frames that tell the client (CONNACK, then Close).
    let refusal = |connack: Option<Vec<u8>>,
                   code: u16,
                   reason: &'static str,
                   kind: &'static str,
                   detail: String| {
        gw.metrics
            .rejections
            .get_or_create(&[("status", "mqtt_connack")])
            .inc();
        tracing::info!(event = "rejected", peer = %peer, status = 101, reason = kind, path = head.path(), route = %route.prefix,
            close_code = code, detail = %detail, "MQTT CONNECT refused");
        let mut out = connack
            .map(|c| crate::frame::encode(crate::frame::OP_BINARY, &c, None))
            .unwrap_or_default();
        out.extend_from_slice(&crate::frame::close_frame(code, reason, None));
        out
    };
    let (connect, raw) =
        match tokio::time::timeout_at(deadline, crate::mqtt::read_connect(&mut io, rest)).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                return send_and_close(
                    &mut io,
                    refusal(
                        None,
                        1002,
                        "expected MQTT CONNECT",
                        "mqtt_malformed",
                        e.to_string(),
                    ),
                )
                .await
            }
            Err(_) => {
                return send_and_close(
                    &mut io,
                    refusal(
                        None,
                        1008,
                        "no CONNECT in time",
                        "handshake_timeout",
                        "timeout".into(),
                    ),
                )
                .await
            }
        };
    let token = connect
        .password
        .as_deref()
        .and_then(|p| std::str::from_utf8(p).ok())
        .filter(|t| !t.is_empty());
    let verified = match token {
        Some(t) => gw.verifier.verify(t).await,
        None => Err(AuthError::Missing),
    };
    let identity = match verified {
        Ok(i) => i,
        Err(e) => {
            gw.metrics.auth_failure(e.kind());
            let connack = crate::mqtt::connack_not_authorized(connect.level);
            return send_and_close(
                &mut io,
                refusal(
                    Some(connack),
                    1008,
                    "not authorized",
                    e.kind(),
                    e.to_string(),
                ),
            )
            .await;
        }
    };
    gw.metrics.auth_success.inc();
    let Ok(slot) = Arc::clone(&gw.sessions).try_acquire_owned() else {
        let connack = crate::mqtt::connack_unavailable(connect.level);
        let frames = refusal(
            Some(connack),
            1013,
            "try again later",
            "busy",
            "session limit".into(),
        );
        return send_and_close(&mut io, frames).await;
    };
    let request = upstream::build_request(head, route, &forwarding(gw, &io, peer, &identity, true));
    let connected = match dial(gw, route, &request).await {
        Ok(c) => c,
        Err(e) => {
            let connack = crate::mqtt::connack_unavailable(connect.level);
            return send_and_close(
                &mut io,
                refusal(
                    Some(connack),
                    1014,
                    "upstream unavailable",
                    e.kind(),
                    e.to_string(),
                ),
            )
            .await;
        }
    };
    gw.metrics
        .handshake_duration
        .observe(started.elapsed().as_secs_f64());
    gw.metrics
        .protocol_connections
        .get_or_create(&[("protocol", "mqtt")])
        .inc();
    Some(Established {
        client: io,
        upstream: connected.io,
        client_rest: raw,
        upstream_rest: connected.rest,
        peer,
        route,
        identity,
        source: Source::MqttPassword,
        slot,
    })
}

/// Dials the route's upstream and checks its 101, recording the dial latency or the failure.
async fn dial(
    gw: &Gateway,
    route: &Route,
    request: &upstream::UpstreamRequest,
) -> Result<upstream::Connected, UpstreamError> {
    let started = Instant::now();
    let result = upstream::connect(route, request, &gw.upstream_tls, gw.config.timeouts.dial).await;
    match &result {
        Ok(_) => gw
            .metrics
            .upstream_dial_duration
            .observe(started.elapsed().as_secs_f64()),
        Err(e) => {
            gw.metrics
                .upstream_failures
                .get_or_create(&[("kind", e.kind())])
                .inc();
            gw.metrics
                .proxy_errors
                .get_or_create(&[("kind", "upstream")])
                .inc();
        }
    }
    result
}

async fn send_and_close<T>(io: &mut Io, bytes: Vec<u8>) -> Option<T> {
    use tokio::io::AsyncWriteExt;
    let _ = io.write_all(&bytes).await;
    let _ = io.flush().await;
    let _ = io.shutdown().await;
    None
}

/// Route-level checks, Origin, then the token.
async fn admit(
    gw: &Gateway,
    head: &RequestHead,
    _route: &Route,
) -> Result<(Identity, Source), ConnError> {
    check_upgrade(head)?;
    let auth = &gw.config.auth;
    // An Origin that is not text is refused, not taken for a missing one (fail closed).
    if head
        .headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case("Origin") && std::str::from_utf8(&h.value).is_err())
    {
        return Err(ConnError::Origin);
    }
    match head.single("Origin").map_err(ConnError::Upgrade)? {
        Some(origin) if !auth.origins.allows(origin) => return Err(ConnError::Origin),
        None if auth.require_origin => return Err(ConnError::Origin),
        _ => {}
    }
    let (source, token) =
        find_token(head, &auth.cookie_name, &auth.query_param).ok_or(AuthError::Missing)?;
    let (result, cached) = gw.verifier.verify_traced(&token).await;
    gw.metrics
        .token_cache
        .get_or_create(&[("result", if cached { "hit" } else { "miss" })])
        .inc();
    Ok((result?, source))
}

/// Sets a session up synchronously and returns the future that relays it.
///
/// Written as a plain function returning an `async move` block, not as an `async fn`, so the task stores each
/// piece of state once: an `async fn` keeps its arguments and the locals moved out of them side by side, which
/// doubled an idle session's task (2,504 bytes for this future before, measured with `size_of_val`).
fn relay<'a>(
    gw: &'a Gateway,
    est: Established<'a>,
    guard: ConnectionGuard,
) -> impl Future<Output = ()> + 'a {
    let Established {
        client,
        upstream,
        client_rest,
        upstream_rest,
        peer,
        route,
        identity,
        source,
        slot,
    } = est;
    let leeway = i64::try_from(gw.config.auth.leeway.as_secs()).unwrap_or(0);
    let remaining = (identity.expires_at + leeway - unix_now()).max(0);
    // The registry keeps who and where; the session's future keeps nothing else of the identity.
    let registration = gw.registry.register(SessionInfo {
        subject: identity.subject,
        token_id: identity.token_id,
        peer,
        started: SystemTime::now(),
    });
    let expires_at = Instant::now() + Duration::from_secs(u64::try_from(remaining).unwrap_or(0));
    let limits = Limits {
        idle: gw.config.timeouts.idle,
        write: gw.config.timeouts.write,
        close_grace: gw.config.timeouts.write.min(Duration::from_secs(5)),
    };
    let mut session = Session::new(
        client,
        upstream,
        client_rest,
        upstream_rest,
        limits,
        Some(expires_at),
    );
    gw.metrics.active_sessions.inc();
    let info = &registration.control.info;
    tracing::debug!(event = "session_start", peer = %info.peer, route = %route.prefix,
        subject = info.subject.as_deref().unwrap_or(""), token_source = source.name(), "session started");
    let started = Instant::now();
    async move {
        let outcome = session.run(gw.signal.clone(), &registration.control).await;
        let duration = started.elapsed();
        gw.metrics.active_sessions.dec();
        gw.metrics.session_duration.observe(duration.as_secs_f64());
        gw.metrics
            .relay_bytes
            .get_or_create(&[("direction", "client_to_upstream")])
            .inc_by(outcome.client_to_upstream);
        gw.metrics
            .relay_bytes
            .get_or_create(&[("direction", "upstream_to_client")])
            .inc_by(outcome.upstream_to_client);
        gw.metrics
            .session_closes
            .get_or_create(&[("reason", outcome.reason.label())])
            .inc();
        let info = &registration.control.info;
        tracing::info!(
            event = "session_end",
            peer = %info.peer,
            route = %route.prefix,
            subject = info.subject.as_deref().unwrap_or(""),
            token_source = source.name(),
            duration_ms = duration.as_millis() as u64,
            bytes_client_to_upstream = outcome.client_to_upstream,
            bytes_upstream_to_client = outcome.upstream_to_client,
            close_reason = outcome.reason.label(),
            close_code = outcome.reason.close().map_or(0, |c| c.code),
            "session ended"
        );
        drop(session);
        drop(registration);
        drop(slot);
        drop(guard);
    }
}

/// Answers a refused request, counts it and logs one line; the path is logged without its query (which may carry
/// a token).
async fn refuse<T>(
    gw: &Gateway,
    io: &mut Io,
    peer: SocketAddr,
    head: Option<&RequestHead>,
    route: Option<&Route>,
    err: ConnError,
) -> Option<T> {
    let resp = err.response();
    gw.metrics.reject(resp.status);
    if let ConnError::Auth(a) = &err {
        gw.metrics.auth_failure(a.kind());
    }
    tracing::info!(
        event = "rejected",
        peer = %peer,
        status = resp.status,
        reason = err.kind(),
        path = head.map_or("", |h| h.path()),
        route = route.map_or("", |r| r.prefix.as_str()),
        detail = %err,
        "request refused"
    );
    let _ = resp.send(io).await;
    None
}
