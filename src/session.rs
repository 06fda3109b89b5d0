//! Session accounting: registering a relayed session, its expiry deadline, and what is counted and logged when
//! it ends.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::admission::Established;
use crate::auth::jwt::unix_now;
use crate::mqtt_relay::MqttSession;
use crate::net::Io;
use crate::registry::SessionInfo;
use crate::relay::{EndReason, Limits, Session};
use crate::server::Gateway;
use crate::shutdown::ConnectionGuard;

/// The relay of one session: raw bytes, or MQTT packets read (boxed: the raw session's future stays its size).
// The raw session, the common case, stays inline (boxing it would cost an allocation per session); the rarer
// inspected one is boxed.
#[allow(clippy::large_enum_variant)]
enum Relay {
    Raw(Session<Io, Io>),
    Mqtt(Box<MqttSession<Io, Io>>),
}

/// Sets a session up synchronously and returns the future that relays it.
///
/// Written as a plain function returning an `async move` block, not as an `async fn`, so the task stores each
/// piece of state once: an `async fn` keeps its arguments and the locals moved out of them side by side, which
/// doubled an idle session's task (2,504 bytes for this future before, measured with `size_of_val`).
pub(crate) fn relay(
    gw_owned: Arc<Gateway>,
    est: Established<'_>,
    guard: ConnectionGuard,
) -> impl Future<Output = ()> + Send + 'static {
    let gw = &*gw_owned;
    let Established {
        client,
        upstream,
        client_rest,
        upstream_rest,
        peer,
        client_ip,
        route,
        identity,
        source,
        slot,
        lease,
        subject_lease,
        inspect,
    } = est;
    let leeway = i64::try_from(gw.config.auth.leeway.as_secs()).unwrap_or(0);
    let remaining = (identity.expires_at + leeway - unix_now()).max(0);
    // The registry keeps who and where; the session's future keeps nothing else of the identity.
    let registration = gw.registry.register(SessionInfo {
        subject: identity.subject,
        token_id: identity.token_id,
        session_id: identity.session_id,
        issued_at: identity.issued_at,
        expires_at: identity.expires_at,
        route: route.prefix.clone(),
        peer,
        started: SystemTime::now(),
    });
    if let Some(subject_lease) = &subject_lease {
        subject_lease.attach(&registration.control);
    }
    let expires_at = Instant::now() + Duration::from_secs(u64::try_from(remaining).unwrap_or(0));
    let limits = Limits {
        idle: gw.config.timeouts.idle,
        write: gw.config.timeouts.write,
        close_grace: gw.config.timeouts.write.min(Duration::from_secs(5)),
        messages: gw.config.message_rate,
    };
    // Only inspected MQTT sessions (topic rules, re-authentication) pay for reading packets.
    let mut relay = match inspect {
        None => Relay::Raw(Session::new(
            client,
            upstream,
            client_rest,
            upstream_rest,
            limits,
            Some(expires_at),
        )),
        Some(inspect) => Relay::Mqtt(Box::new(MqttSession::new(
            client,
            upstream,
            client_rest,
            upstream_rest,
            inspect,
            limits,
            expires_at,
        ))),
    };
    gw.metrics.active_sessions.inc();
    let info = &registration.control.info;
    tracing::debug!(event = "session_start", peer = %info.peer, route = %info.route,
        subject = info.subject.as_deref().unwrap_or(""), token_source = source.name(), "session started");
    let started = Instant::now();
    async move {
        let gw = &*gw_owned;
        let outcome = match &mut relay {
            Relay::Raw(session) => session.run(gw.signal.clone(), &registration.control).await,
            Relay::Mqtt(session) => {
                Box::pin(session.run(gw, gw.signal.clone(), &registration.control)).await
            }
        };
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
        if outcome.reason == EndReason::MessageRate {
            gw.metrics
                .rate_limit_violations
                .get_or_create(&[("kind", "message_rate")])
                .inc();
        }
        let info = &registration.control.info;
        tracing::info!(
            event = "session_end",
            peer = %info.peer,
            client_ip = %client_ip,
            route = %info.route,
            subject = info.subject.as_deref().unwrap_or(""),
            token_source = source.name(),
            duration_ms = duration.as_millis() as u64,
            bytes_client_to_upstream = outcome.client_to_upstream,
            bytes_upstream_to_client = outcome.upstream_to_client,
            close_reason = outcome.reason.label(),
            close_code = outcome.reason.close().map_or(0, |c| c.code),
            close_delivered = outcome.close_sent,
            "session ended"
        );
        drop(relay);
        drop(registration);
        drop(subject_lease);
        drop(slot);
        drop(lease);
        drop(guard);
    }
}
