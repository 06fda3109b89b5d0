//! The listener: the state every connection shares ([`Gateway`]), the accept loop, and one task per connection
//! that runs [`crate::admission`] and then [`crate::session`]. Refusals are answered in [`crate::refusal`].
//!
//! See `src/LIFECYCLE.md` for the states and which timer guards each.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::tls_stream::TlsAcceptor;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::admin::SeenLogoutTokens;
use crate::auth::jwt::Verifier;
use crate::auth::{AuthError, Identity};
use crate::budget::HandshakeBudget;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::pending::{Pending, Ticket};
use crate::registry::Registry;
use crate::revocation::{close_matching, Revocation, Revocations};
use crate::shutdown::{ConnectionGuard, Guards, Phase, Signal};
use crate::store::Store;
use crate::upstream::Pool;

/// Everything a connection needs, shared by all of them.
pub(crate) struct Gateway {
    /// The validated configuration.
    pub config: Config,
    /// TLS for the listener, or `None` for plain HTTP.
    pub tls: Option<TlsAcceptor>,
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
    /// The local copy of the active revocations, consulted at admission.
    pub revocations: Arc<Revocations>,
    /// Per-subject rate and session cap.
    pub limits: Arc<crate::limits::SubjectLimits>,
    /// The shared state store revocations are published to.
    pub store: Arc<Store>,
    /// Back-channel logout token ids already used.
    pub logout_jtis: SeenLogoutTokens,
    /// One endpoint pool per route, in the order of `config.routes`.
    pub pools: Vec<Arc<Pool>>,
    /// Handshakes per client address (`HANDSHAKE_RATE_PER_IP`), `None` when off.
    pub handshake_budget: Option<HandshakeBudget>,
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
    /// Applies a revocation here: into the local copy, and Close 1008 "token revoked" to every matching live
    /// session. A revocation heard back from the store that changes nothing is not counted again. Returns how many
    /// sessions were closed.
    pub(crate) fn apply_revocation(&self, rev: &Revocation, origin: &'static str) -> usize {
        let now = crate::auth::jwt::unix_now();
        let changed = self.revocations.insert(rev.clone(), now);
        if !changed && origin == "peer" {
            return 0;
        }
        self.metrics
            .revocations
            .get_or_create(&[("kind", rev.target.kind()), ("origin", origin)])
            .inc();
        close_matching(&self.registry, rev)
    }

    /// Refuses a verified identity that a revocation matches, or any while the store is down in fail-closed mode.
    ///
    /// # Errors
    /// [`AuthError::Revoked`] or [`AuthError::StoreDown`].
    pub(crate) fn check_revocation(&self, identity: &Identity) -> Result<(), AuthError> {
        if self
            .revocations
            .is_revoked(identity, crate::auth::jwt::unix_now())
        {
            return Err(AuthError::Revoked);
        }
        if self.config.fail_closed && !self.store.is_up() {
            return Err(AuthError::StoreDown);
        }
        Ok(())
    }

    /// Readiness: keys loaded, not draining, and (with `READINESS_REQUIRES_UPSTREAM`) a healthy endpoint for every
    /// route.
    #[must_use]
    pub(crate) fn is_ready(&self) -> bool {
        self.signal.phase() == Phase::Running
            && self.verifier.keys().is_ready()
            && self.unhealthy_route().is_none()
    }

    /// With `READINESS_REQUIRES_UPSTREAM`, the first route with no healthy endpoint.
    #[must_use]
    pub(crate) fn unhealthy_route(&self) -> Option<&str> {
        if !self.config.upstream.readiness_requires_upstream {
            return None;
        }
        let now = Instant::now();
        self.pools
            .iter()
            .find(|p| !p.has_healthy(now))
            .map(|p| p.route().prefix.as_str())
    }
}

/// A pending handshake younger than this is never evicted: a legitimate client completes its TLS handshake and
/// request head within milliseconds, so in a reconnect storm on a loaded core the newcomers wait in the backlog
/// rather than kill handshakes that are about to complete. Idle sockets older than this make room at once.
const EVICTABLE_AGE: Duration = Duration::from_millis(500);

/// Accepts connections until the drain starts; accept errors back off, and each connection runs in its own task.
///
/// Handshakes and sessions have separate budgets. A connection is registered in [`Gateway::pending`] at once, and
/// when `MAX_PENDING_HANDSHAKES` are pending the oldest is closed: idle unauthenticated sockets evict each other,
/// not the client that just connected. Sessions take a slot of `MAX_CONNECTIONS` once authenticated (503 when
/// none is left), so neither budget can starve the other.
pub(crate) async fn serve(listener: TcpListener, gw: Arc<Gateway>, guards: Guards) {
    let mut signal = gw.signal.clone();
    let mut backoff = Duration::from_millis(5);
    'accept: loop {
        // Full of handshakes younger than EVICTABLE_AGE: let the kernel's backlog hold the next client a moment.
        while let Some(at) = gw.pending.room_at(EVICTABLE_AGE) {
            if at <= Instant::now() {
                break;
            }
            tokio::select! {
                () = tokio::time::sleep_until(at) => {}
                () = signal.reached(Phase::Draining) => break 'accept,
            }
        }
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
        // The task is `handle`'s own future: an `async move` block around it would hold the arguments twice.
        tokio::spawn(handle(Arc::clone(&gw), tcp, peer, guard, ticket));
    }
    tracing::info!(
        event = "listener_closed",
        "listener closed; no new connections"
    );
}

/// One connection from accept to the start of its relay (a task of its own); the handshake permit is given back when
/// the handshake phase ends.
///
/// The handshake phase runs in its own boxed future, freed before the relay starts: a long-lived idle session then
/// holds only what relaying needs, not the (much larger) state of TLS, token and upstream handshakes.
pub(crate) async fn handle(
    gw_owned: Arc<Gateway>,
    tcp: TcpStream,
    peer: SocketAddr,
    guard: ConnectionGuard,
    ticket: Ticket,
) {
    let gw = &*gw_owned;
    gw.metrics.connections.inc();
    // A separate statement: a temporary in an `if let` scrutinee keeps its storage for the whole block, and the
    // handshake future would then be reserved in every idle session's task.
    let established = tokio::select! {
        e = Box::pin(crate::admission::establish(gw, tcp, peer)) => e,
        () = ticket.evicted() => {
            tracing::debug!(event = "handshake_evicted", peer = %peer, "oldest pending handshake closed to make room");
            None
        }
    };
    drop(ticket);
    // The relay runs as a task of its own, and this one ends: an idle session then holds the relay's state only,
    // not also the handshake task's arguments and select state (about 650 bytes a session).
    if let Some(session) = established {
        tokio::spawn(crate::session::relay(Arc::clone(&gw_owned), session, guard));
    }
}
