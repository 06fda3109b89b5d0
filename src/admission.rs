//! Admission: everything between accept and the relay. PROXY header, the handshake budget of the client's address,
//! TLS and the request head under one deadline; then route, upgrade checks, Origin and token; then a session slot,
//! the upstream dial and the 101.
//! The result is an [`Established`] connection or a [`Refusal`] answered by [`refuse`].

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use crate::auth::source::{find_token, Source};
use crate::auth::{AuthError, Identity};
use crate::metrics::protocol_label;
use crate::net::Io;
use crate::refusal::{Channel, Refusal, Refuser, Response};
use crate::route::Route;
use crate::server::Gateway;
use crate::upgrade::{check_upgrade, read_head, ReadHead, RequestHead, UpgradeError};
use crate::upstream::{self, Forwarding, Lease, Pool};

/// A connection that passed every check and has an upstream: what the relay needs, and nothing else.
pub(crate) struct Established<'a> {
    pub(crate) client: Io,
    pub(crate) upstream: Io,
    pub(crate) client_rest: Vec<u8>,
    pub(crate) upstream_rest: Vec<u8>,
    pub(crate) peer: SocketAddr,
    /// The real client: `peer`, or the address a trusted proxy's `X-Forwarded-For` names.
    pub(crate) client_ip: IpAddr,
    pub(crate) route: &'a Route,
    pub(crate) identity: Identity,
    pub(crate) source: Source,
    pub(crate) slot: OwnedSemaphorePermit,
    /// The session's hold on its endpoint (least-connections counts it).
    pub(crate) lease: Lease,
    /// The subject's place under MAX_SESSIONS_PER_SUBJECT, when that limit is on.
    pub(crate) subject_lease: Option<crate::limits::Lease>,
    /// MQTT sessions whose packets are read (topic rules, re-authentication): what their relay needs.
    pub(crate) inspect: Option<Box<crate::mqtt_relay::Inspect>>,
}

/// Everything before the relay; `None` when the connection was refused or went away (already answered and logged).
pub(crate) async fn establish(
    gw: &Gateway,
    mut tcp: TcpStream,
    mut peer: SocketAddr,
) -> Option<Established<'_>> {
    let _ = tcp.set_nodelay(true);
    let deadline = Instant::now() + gw.config.timeouts.handshake;
    // A PROXY header without an address (LOCAL: the balancer's own health check) is not charged to any budget.
    let mut local = false;

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
            Ok(Ok(None)) => local = true,
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

    // The handshake budget, before any TLS work. A peer in TRUSTED_PROXIES speaks for many clients, named by its
    // X-Forwarded-For: their budgets are checked once the head is read.
    let forwarder = gw
        .config
        .forwarded_trusted
        .iter()
        .any(|c| c.contains(peer.ip()));
    if !local && !forwarder && !within_budget(gw, peer) {
        return None;
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

    let mut at = Refuser {
        gw,
        peer,
        head: None,
        route: None,
        channel: Channel::Http,
    };
    let (head, rest) = match tokio::time::timeout_at(
        deadline,
        read_head(&mut io, gw.config.max_request_head_bytes),
    )
    .await
    {
        Ok(Ok(Ok(ReadHead::Complete(head, rest)))) => (head, rest),
        Ok(Ok(Ok(ReadHead::Closed))) | Ok(Err(_)) => return None,
        Ok(Ok(Err(e))) => return at.refuse(&mut io, Refusal::Upgrade(e)).await,
        Err(_) => return at.refuse(&mut io, Refusal::HandshakeTimeout).await,
    };
    at.head = Some(&head);
    let started = Instant::now();

    if head.path() == "/healthz" {
        let resp = if head.method == "GET" {
            Response::new(200, "ok")
        } else {
            Refusal::Upgrade(UpgradeError::Method).http()
        };
        let _ = resp.send(&mut io).await;
        return None;
    }
    let client_ip = crate::upstream::real_client_ip(&head, peer.ip(), &gw.config.forwarded_trusted);
    if let (Some(budget), true, false) = (&gw.handshake_budget, forwarder, local) {
        if let Err(wait) = budget.check(client_ip) {
            let retry_after = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
            return at
                .refuse(&mut io, Refusal::HandshakeBudget { retry_after })
                .await;
        }
    }
    let Some(pool) = gw
        .config
        .routes
        .position(head.path())
        .and_then(|i| gw.pools.get(i))
    else {
        return at.refuse(&mut io, UpgradeError::NoRoute.into()).await;
    };
    let route = pool.route();
    at.route = Some(route);
    let (identity, source) = match admit(gw, &head, route).await {
        Ok(ok) => ok,
        Err(Refusal::Auth(AuthError::Missing)) if mqtt_password_applies(gw, &head, route) => {
            return Box::pin(crate::mqtt::session(
                gw, io, &head, rest, peer, pool, deadline,
            ))
            .await;
        }
        Err(e) => return at.refuse(&mut io, e).await,
    };
    let (slot, connected, lease, subject_lease) =
        match connect_upstream(gw, &io, peer, &head, pool, &identity, false, deadline).await {
            Ok(c) => c,
            Err(e) => return at.refuse(&mut io, e).await,
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
    // An MQTT route with a CONNECT rewrite, topic rules or re-authentication: the first packet is read (and
    // rewritten) before anything is forwarded.
    use crate::mqtt::ConnectRead;
    let mut up = up;
    let mut up_rest = up_rest;
    let read = if crate::mqtt::carries_mqtt(&head, protocol.as_deref(), route) {
        crate::mqtt::reads_connect(gw, route)
    } else {
        ConnectRead::No
    };
    let (rest, inspect) = match read {
        ConnectRead::No => (rest, None),
        ConnectRead::Required => {
            crate::mqtt::after_upgrade(&mut at, &mut io, rest, &identity, route, deadline).await?
        }
        ConnectRead::Sniff => {
            match crate::mqtt::sniff_first_packet(&mut io, &mut up, rest, &mut up_rest, deadline)
                .await
            {
                Err(raw) => (raw, None),
                Ok(first) => {
                    at.channel = Channel::Mqtt(Some(first.connect.level));
                    match crate::mqtt::forward_first(gw, route, &identity, first) {
                        Ok(f) => f,
                        Err(e) => return at.refuse(&mut io, e).await,
                    }
                }
            }
        }
    };
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
        client_ip,
        route,
        identity,
        source,
        slot,
        lease,
        subject_lease,
        inspect,
    })
}

/// The handshake budget of a client's address, checked before TLS: `false` when the connection is to be closed
/// without an answer, which is counted and logged (at most one line a second, with the number held back).
fn within_budget(gw: &Gateway, peer: SocketAddr) -> bool {
    let Some(budget) = &gw.handshake_budget else {
        return true;
    };
    let Err(wait) = budget.check(peer.ip()) else {
        return true;
    };
    gw.metrics
        .rate_limit_violations
        .get_or_create(&[("kind", "handshake_ip")])
        .inc();
    if let Some(suppressed) = budget.log.allow() {
        tracing::info!(event = "handshake_throttled", peer = %peer, client_ip = %peer.ip(),
            retry_after_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX), suppressed,
            "handshake budget of this address spent; closed before TLS");
    }
    false
}

/// What admission holds once the upstream answered: the session slot, the upstream, its endpoint lease, and the
/// subject's lease.
pub(crate) type Admitted = (
    OwnedSemaphorePermit,
    upstream::Connected,
    Lease,
    Option<crate::limits::Lease>,
);

/// After authentication, on both paths: the subject's limits (rate, then a lease), a session slot
/// (`MAX_CONNECTIONS`), then the upstream dial (an endpoint of `pool`, with its retries) and its 101, all by the
/// connection's handshake `deadline`.
#[allow(clippy::too_many_arguments)] // Each is a different piece of the one connection; a struct would only rename them.
pub(crate) async fn connect_upstream(
    gw: &Gateway,
    io: &Io,
    peer: SocketAddr,
    head: &RequestHead,
    pool: &Pool,
    identity: &Identity,
    mqtt: bool,
    deadline: Instant,
) -> Result<Admitted, Refusal> {
    gw.metrics.auth_success.inc();
    let subject_lease = gw.limits.admit(identity).await?;
    let slot = Arc::clone(&gw.sessions)
        .try_acquire_owned()
        .map_err(|_| Refusal::Busy)?;
    // The MQTT path answered the client's handshake itself, without extensions: offer none upstream either.
    let fwd = forwarding(gw, io, peer, identity, mqtt);
    let route = pool.route();
    let request = |url: &crate::net::WsUrl| upstream::build_request(head, route, url, &fwd);
    match pool
        .connect(&request, identity.subject.as_deref(), deadline)
        .await
    {
        Ok((connected, lease)) => Ok((slot, connected, lease, subject_lease)),
        Err(e) => {
            gw.metrics
                .proxy_errors
                .get_or_create(&[("kind", "upstream")])
                .inc();
            Err(e.into())
        }
    }
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

/// Route-level checks, Origin, then the token.
async fn admit(
    gw: &Gateway,
    head: &RequestHead,
    _route: &Route,
) -> Result<(Identity, Source), Refusal> {
    check_upgrade(head)?;
    let auth = &gw.config.auth;
    // An Origin that is not text is refused, not taken for a missing one (fail closed).
    if head
        .headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case("Origin") && std::str::from_utf8(&h.value).is_err())
    {
        return Err(Refusal::Origin);
    }
    match head.single("Origin").map_err(Refusal::Upgrade)? {
        Some(origin) if !auth.origins.allows(origin) => return Err(Refusal::Origin),
        None if auth.require_origin => return Err(Refusal::Origin),
        _ => {}
    }
    let (source, token) =
        find_token(head, &auth.cookie_name, &auth.query_param).ok_or(AuthError::Missing)?;
    let (result, cached) = gw.verifier.verify_traced(&token).await;
    gw.metrics
        .token_cache
        .get_or_create(&[("result", if cached { "hit" } else { "miss" })])
        .inc();
    // After the cache: a cached token is still checked against the revocations.
    let identity = result?;
    gw.check_revocation(&identity)?;
    Ok((identity, source))
}
