//! Per-subject limits: how fast one subject may open sessions (`RATE_LIMIT_PER_SECOND`, `RATE_LIMIT_BURST`) and
//! how many it may hold at once (`MAX_SESSIONS_PER_SUBJECT`), keyed by `sub` or by the claim named in
//! `LIMIT_KEY_CLAIM`.
//!
//! With Redis or PostgreSQL as the state store both are shared by the replicas: the rate is one token bucket per
//! key, taken in one atomic round trip (a Lua script; a PL/pgSQL function); each live session holds a lease that
//! its replica renews every third of `SESSION_LEASE_SECONDS`, so the leases of a replica that died without
//! cleaning up expire on their own. With `SESSION_LIMIT_POLICY=evict-oldest` the store names the subject's oldest
//! lease, and the replica that holds it hears so on the store's channel and closes it with 1008 "session limit".
//!
//! Without a shared store, and while it is unreachable, the same limits hold per process (fail open: an outage
//! never refuses a legitimate client; `ws_limit_fallbacks_total` counts each decision taken locally).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;

use crate::auth::Identity;
use crate::config::LimitSettings;
use crate::frame;
use crate::metrics::Metrics;
use crate::registry::{CloseRequest, SessionControl};
use crate::store::{Eviction, Store};

/// Most keys with a local token bucket; past it, full buckets are forgotten first, then all.
const MAX_LOCAL_BUCKETS: usize = 65_536;

/// Longest a limit's round trip to the store may take before the decision is taken locally.
const STORE_DEADLINE: Duration = Duration::from_millis(500);

/// Longest key kept verbatim; a longer claim value is keyed by its SHA-256.
const MAX_KEY_BYTES: usize = 200;

/// The Close a session evicted by a newer one of the same subject receives.
pub(crate) const SESSION_LIMIT_CLOSE: CloseRequest = CloseRequest {
    code: frame::CLOSE_POLICY,
    reason: "session limit",
};

/// Why a subject may not open one more session now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum LimitError {
    /// `RATE_LIMIT_PER_SECOND`: try again in this many whole seconds.
    #[error("subject rate limit exceeded")]
    Rate { retry_after: u64 },
    /// `MAX_SESSIONS_PER_SUBJECT` with the `reject` policy.
    #[error("subject session limit reached")]
    Sessions,
}

impl LimitError {
    /// Bounded label, also the `kind` of `ws_rate_limit_violations_total`.
    #[must_use]
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            LimitError::Rate { .. } => "subject_rate",
            LimitError::Sessions => "subject_sessions",
        }
    }
}

/// The per-subject limits of one process, and its share of the leases.
pub(crate) struct SubjectLimits {
    settings: LimitSettings,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    /// This process among the replicas: the first part of every lease it takes.
    replica: String,
    next: AtomicU64,
    buckets: Mutex<HashMap<String, Bucket>>,
    /// This process's leases, by key.
    held: Mutex<HashMap<String, Vec<Held>>>,
    last_fallback_log: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for SubjectLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubjectLimits")
            .field("settings", &self.settings)
            .field("replica", &self.replica)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

#[derive(Debug)]
struct Held {
    /// `<replica>/<n>`, and `/<start in ms>` when the store granted it.
    member: String,
    /// Whether the store holds this lease (else it was granted locally, during an outage or without a store).
    shared: bool,
    started: Instant,
    control: Option<Weak<SessionControl>>,
    evicted: bool,
}

/// A session's place under `MAX_SESSIONS_PER_SUBJECT`; released when dropped.
#[derive(Debug)]
pub(crate) struct Lease {
    limits: Arc<SubjectLimits>,
    key: String,
    member: String,
}

impl Lease {
    /// Ties the lease to its session, so an eviction can close it; a session evicted before it was registered
    /// is closed at once.
    pub(crate) fn attach(&self, control: &Arc<SessionControl>) {
        let mut evicted = false;
        if let Ok(mut held) = self.limits.held.lock() {
            if let Some(h) = held
                .get_mut(&self.key)
                .and_then(|v| v.iter_mut().find(|h| h.member == self.member))
            {
                h.control = Some(Arc::downgrade(control));
                evicted = h.evicted;
            }
        }
        if evicted {
            control.close(SESSION_LIMIT_CLOSE);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut shared = false;
        if let Ok(mut held) = self.limits.held.lock() {
            if let Some(v) = held.get_mut(&self.key) {
                if let Some(i) = v.iter().position(|h| h.member == self.member) {
                    shared = v.swap_remove(i).shared;
                }
                if v.is_empty() {
                    held.remove(&self.key);
                }
            }
        }
        self.limits.metrics.session_leases.dec();
        if shared {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let store = Arc::clone(&self.limits.store);
                let key = std::mem::take(&mut self.key);
                let member = std::mem::take(&mut self.member);
                rt.spawn(async move {
                    let _ = tokio::time::timeout(
                        STORE_DEADLINE * 4,
                        store.lease_release(&key, &member),
                    )
                    .await;
                });
            }
        }
    }
}

impl SubjectLimits {
    /// The limits of `settings`, shared through `store` when it is Redis or PostgreSQL.
    pub(crate) fn new(
        settings: LimitSettings,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
    ) -> SubjectLimits {
        let mut id = [0u8; 8];
        // A random replica id; a failure of the system RNG leaves zeros and the process id, still distinct.
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id);
        let replica = format!("{:016x}{:x}", u64::from_be_bytes(id), std::process::id());
        SubjectLimits {
            settings,
            store,
            metrics,
            replica,
            next: AtomicU64::new(1),
            buckets: Mutex::new(HashMap::new()),
            held: Mutex::new(HashMap::new()),
            last_fallback_log: Mutex::new(None),
        }
    }

    /// Whether any limit is on.
    #[must_use]
    pub(crate) fn enabled(&self) -> bool {
        self.settings.rate_per_second > 0.0 || self.settings.max_sessions > 0
    }

    /// The key `identity` is limited by: `<claim>:<value>` for `LIMIT_KEY_CLAIM`, else `sub:<subject>`; `None`
    /// when the token names neither (nothing to count it against).
    #[must_use]
    pub(crate) fn key(&self, identity: &Identity) -> Option<String> {
        let (label, value) = match (&self.settings.key_claim, &identity.limit_claim) {
            (Some(claim), Some(v)) => (claim.as_str(), v.as_str()),
            _ => ("sub", identity.subject.as_deref()?),
        };
        let plain = value.len() <= MAX_KEY_BYTES
            && label.len() <= MAX_KEY_BYTES
            && !value.chars().chain(label.chars()).any(char::is_control);
        Some(if plain {
            format!("{label}:{value}")
        } else {
            let d = ring::digest::digest(&ring::digest::SHA256, value.as_bytes());
            let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
            format!(
                "{}:sha256:{hex}",
                label.chars().take(64).collect::<String>()
            )
        })
    }

    /// Both limits for one new, authenticated session: the rate first, then the session cap. The lease, when
    /// the cap is on, lives as long as the session.
    ///
    /// # Errors
    /// [`LimitError`] when the subject is over a limit (already counted in `ws_rate_limit_violations_total`).
    pub(crate) async fn admit(
        self: &Arc<Self>,
        identity: &Identity,
    ) -> Result<Option<Lease>, LimitError> {
        if !self.enabled() {
            return Ok(None);
        }
        let Some(key) = self.key(identity) else {
            return Ok(None);
        };
        let verdict = async {
            if self.settings.rate_per_second > 0.0 {
                self.take(&key).await?;
            }
            if self.settings.max_sessions > 0 {
                return self.lease(key).await.map(Some);
            }
            Ok(None)
        }
        .await;
        if let Err(e) = &verdict {
            self.metrics
                .rate_limit_violations
                .get_or_create(&[("kind", e.kind())])
                .inc();
        }
        verdict
    }

    /// One token from the key's bucket.
    async fn take(&self, key: &str) -> Result<(), LimitError> {
        let rate = self.settings.rate_per_second;
        let burst = self.settings.burst;
        if self.store.is_shared() && self.store.is_up() {
            let answer =
                tokio::time::timeout(STORE_DEADLINE, self.store.rate_take(key, rate, burst)).await;
            match answer {
                Ok(Ok(0)) => return Ok(()),
                Ok(Ok(wait_ms)) => {
                    return Err(LimitError::Rate {
                        retry_after: wait_ms.div_ceil(1000).max(1),
                    })
                }
                Ok(Err(error)) => self.fell_back("rate", &error),
                Err(_) => self.fell_back("rate", "timed out"),
            }
        } else if self.store.is_shared() {
            self.fell_back("rate", "store unreachable");
        }
        self.take_local(key, Instant::now())
    }

    fn take_local(&self, key: &str, now: Instant) -> Result<(), LimitError> {
        let rate = self.settings.rate_per_second;
        let burst = f64::from(self.settings.burst);
        let Ok(mut buckets) = self.buckets.lock() else {
            return Ok(());
        };
        if buckets.len() >= MAX_LOCAL_BUCKETS && !buckets.contains_key(key) {
            // A full bucket is what a forgotten one would be.
            buckets.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
            if buckets.len() >= MAX_LOCAL_BUCKETS {
                buckets.clear();
            }
        }
        let b = buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - b.tokens) / rate;
            // Invariant: rate > 0 and the deficit is below 1, so wait is finite and small enough.
            Err(LimitError::Rate {
                retry_after: (wait.ceil() as u64).max(1),
            })
        }
    }

    /// A lease under `MAX_SESSIONS_PER_SUBJECT`.
    async fn lease(self: &Arc<Self>, key: String) -> Result<Lease, LimitError> {
        let prefix = format!(
            "{}/{}",
            self.replica,
            self.next.fetch_add(1, Ordering::Relaxed)
        );
        let max = self.settings.max_sessions;
        let evict = self.settings.evict_oldest;
        if self.store.is_shared() && self.store.is_up() {
            let answer = tokio::time::timeout(
                STORE_DEADLINE,
                self.store
                    .lease_acquire(&key, &prefix, self.settings.lease, max, evict),
            )
            .await;
            match answer {
                Ok(Ok(Some(grant))) => {
                    for victim in &grant.evicted {
                        self.evict(&key, victim).await;
                    }
                    return Ok(self.hold(key, grant.member, true));
                }
                Ok(Ok(None)) => return Err(LimitError::Sessions),
                Ok(Err(error)) => self.fell_back("sessions", &error),
                Err(_) => self.fell_back("sessions", "timed out"),
            }
        } else if self.store.is_shared() {
            self.fell_back("sessions", "store unreachable");
        }
        // Per process: this replica's own leases of the key.
        let victims = {
            let Ok(mut held) = self.held.lock() else {
                return Ok(self.hold(key, prefix, false));
            };
            let list = held.entry(key.clone()).or_default();
            let live = list.iter().filter(|h| !h.evicted).count();
            if live < max as usize {
                Vec::new()
            } else if !evict {
                return Err(LimitError::Sessions);
            } else {
                let mut order: Vec<usize> = (0..list.len()).filter(|&i| !list[i].evicted).collect();
                order.sort_by_key(|&i| list[i].started);
                order
                    .into_iter()
                    .take(live + 1 - max as usize)
                    .map(|i| {
                        list[i].evicted = true;
                        list[i].control.clone()
                    })
                    .collect()
            }
        };
        for control in victims.into_iter().flatten() {
            if let Some(c) = control.upgrade() {
                c.close(SESSION_LIMIT_CLOSE);
            }
        }
        Ok(self.hold(key, prefix, false))
    }

    fn hold(self: &Arc<Self>, key: String, member: String, shared: bool) -> Lease {
        if let Ok(mut held) = self.held.lock() {
            held.entry(key.clone()).or_default().push(Held {
                member: member.clone(),
                shared,
                started: Instant::now(),
                control: None,
                evicted: false,
            });
        }
        self.metrics.session_leases.inc();
        Lease {
            limits: Arc::clone(self),
            key,
            member,
        }
    }

    /// Closes `member`'s session: here if this replica holds it, else through the store's channel.
    async fn evict(&self, key: &str, member: &str) {
        let eviction = Eviction {
            key: key.to_owned(),
            member: member.to_owned(),
        };
        if !self.on_eviction(&eviction) {
            if let Err(error) = self.store.publish_eviction(&eviction).await {
                tracing::warn!(event = "eviction_not_sent", %error,
                    "the store did not take an eviction for another replica; that session stays open");
            }
        }
    }

    /// An eviction heard on the store's channel (or made here): closes the session when this replica holds it.
    /// Whether it did.
    pub(crate) fn on_eviction(&self, eviction: &Eviction) -> bool {
        if !eviction
            .member
            .strip_prefix(self.replica.as_str())
            .is_some_and(|rest| rest.starts_with('/'))
        {
            return false;
        }
        let control = {
            let Ok(mut held) = self.held.lock() else {
                return false;
            };
            let Some(h) = held
                .get_mut(&eviction.key)
                .and_then(|v| v.iter_mut().find(|h| h.member == eviction.member))
            else {
                return true;
            };
            h.evicted = true;
            h.control.clone()
        };
        if let Some(c) = control.and_then(|w| w.upgrade()) {
            c.close(SESSION_LIMIT_CLOSE);
        }
        true
    }

    /// Renews this replica's shared leases every third of `SESSION_LEASE_SECONDS`, for as long as it runs.
    pub(crate) async fn renew(self: Arc<Self>) {
        if self.settings.max_sessions == 0 || !self.store.is_shared() {
            return;
        }
        let mut tick = tokio::time::interval(self.settings.lease / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let leases: Vec<(String, String)> = self.held.lock().map_or_else(
                |_| Vec::new(),
                |held| {
                    held.iter()
                        .flat_map(|(k, v)| {
                            v.iter()
                                .filter(|h| h.shared && !h.evicted)
                                .map(move |h| (k.clone(), h.member.clone()))
                        })
                        .collect()
                },
            );
            for chunk in leases.chunks(1_000) {
                if let Err(error) = self.store.lease_renew(chunk, self.settings.lease).await {
                    tracing::debug!(event = "lease_renew_failed", %error, "leases not renewed this time");
                    break;
                }
            }
        }
    }

    /// Counts a decision taken locally because the store could not take it, and says so at most every 10 s.
    fn fell_back(&self, limit: &'static str, error: &str) {
        self.metrics
            .limit_fallbacks
            .get_or_create(&[("limit", limit)])
            .inc();
        let now = Instant::now();
        if let Ok(mut last) = self.last_fallback_log.lock() {
            if last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10)) {
                *last = Some(now);
                tracing::warn!(event = "limit_fallback", limit, %error,
                    "state store unavailable: per-subject limits are held per process for now");
            }
        }
    }

    /// This process's leases.
    #[cfg(test)]
    fn held_count(&self) -> usize {
        self.held
            .lock()
            .map_or(0, |h| h.values().map(Vec::len).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreConfig;

    fn limits(settings: LimitSettings) -> Arc<SubjectLimits> {
        let metrics = Arc::new(Metrics::new());
        let store = Store::new(&StoreConfig::Memory, 60, Arc::clone(&metrics)).expect("store");
        Arc::new(SubjectLimits::new(settings, store, metrics))
    }

    fn identity(sub: &str, tenant: Option<&str>) -> Identity {
        Identity {
            subject: Some(sub.into()),
            token_id: None,
            session_id: None,
            issued_at: None,
            expires_at: 0,
            forwarded: Vec::new(),
            limit_claim: tenant.map(str::to_owned),
            claims: Vec::new(),
            roles: Vec::new(),
        }
    }

    #[test]
    fn keys_name_their_claim_and_hash_what_is_long_or_unprintable() {
        let by_sub = limits(LimitSettings::default());
        assert_eq!(
            by_sub.key(&identity("alice", Some("acme"))).as_deref(),
            Some("sub:alice")
        );
        let by_tenant = limits(LimitSettings {
            key_claim: Some("tenant".into()),
            ..LimitSettings::default()
        });
        assert_eq!(
            by_tenant.key(&identity("alice", Some("acme"))).as_deref(),
            Some("tenant:acme")
        );
        assert_eq!(
            by_tenant.key(&identity("alice", None)).as_deref(),
            Some("sub:alice"),
            "a token without the claim is limited by its subject"
        );
        let long = by_sub.key(&identity(&"x".repeat(500), None)).expect("key");
        assert!(
            long.starts_with("sub:sha256:") && long.len() == 11 + 64,
            "{long}"
        );
        let ctl = by_sub.key(&identity("a\nb", None)).expect("key");
        assert!(ctl.starts_with("sub:sha256:"), "{ctl}");
        let mut nobody = identity("x", None);
        nobody.subject = None;
        assert_eq!(by_sub.key(&nobody), None);
    }

    #[test]
    fn the_local_bucket_allows_the_burst_then_paces_with_retry_after() {
        let l = limits(LimitSettings {
            rate_per_second: 0.2,
            burst: 2,
            ..LimitSettings::default()
        });
        let t0 = Instant::now();
        assert_eq!(l.take_local("sub:a", t0), Ok(()));
        assert_eq!(l.take_local("sub:a", t0), Ok(()));
        assert_eq!(
            l.take_local("sub:a", t0),
            Err(LimitError::Rate { retry_after: 5 })
        );
        assert_eq!(
            l.take_local("sub:b", t0),
            Ok(()),
            "other subjects are unaffected"
        );
        assert_eq!(
            l.take_local("sub:a", t0 + Duration::from_secs(3)),
            Err(LimitError::Rate { retry_after: 2 })
        );
        assert_eq!(l.take_local("sub:a", t0 + Duration::from_secs(5)), Ok(()));
    }

    #[test]
    fn local_buckets_stay_bounded_under_many_keys() {
        let l = limits(LimitSettings {
            rate_per_second: 0.001,
            burst: 1,
            ..LimitSettings::default()
        });
        let t0 = Instant::now();
        for i in 0..(MAX_LOCAL_BUCKETS + 1_000) {
            let _ = l.take_local(&format!("sub:{i}"), t0);
        }
        let n = l.buckets.lock().expect("lock").len();
        assert!(n <= MAX_LOCAL_BUCKETS, "{n} buckets");
    }

    #[tokio::test]
    async fn reject_refuses_one_more_and_a_released_lease_makes_room() {
        let l = limits(LimitSettings {
            max_sessions: 2,
            ..LimitSettings::default()
        });
        let alice = identity("alice", None);
        let a = l.admit(&alice).await.expect("first").expect("lease");
        let _b = l.admit(&alice).await.expect("second").expect("lease");
        assert_eq!(l.admit(&alice).await.err(), Some(LimitError::Sessions));
        assert!(
            l.admit(&identity("bob", None)).await.is_ok(),
            "bob has his own cap"
        );
        drop(a);
        assert!(
            l.admit(&alice).await.is_ok(),
            "room again after a session ended"
        );
    }

    #[tokio::test]
    async fn evict_oldest_closes_the_oldest_session_and_admits_the_new_one() {
        let l = limits(LimitSettings {
            max_sessions: 1,
            evict_oldest: true,
            ..LimitSettings::default()
        });
        let alice = identity("alice", None);
        let info = |n: u16| crate::registry::SessionInfo {
            subject: Some("alice".into()),
            token_id: None,
            session_id: None,
            issued_at: None,
            expires_at: 0,
            route: "/".into(),
            peer: std::net::SocketAddr::from(([127, 0, 0, 1], n)),
            started: std::time::SystemTime::now(),
        };
        let old = l.admit(&alice).await.expect("first").expect("lease");
        let old_control = Arc::new(SessionControl::new(info(1)));
        old.attach(&old_control);
        let new = l
            .admit(&alice)
            .await
            .expect("second admitted")
            .expect("lease");
        let new_control = Arc::new(SessionControl::new(info(2)));
        new.attach(&new_control);
        let closed = tokio::time::timeout(Duration::from_secs(1), old_control.requested())
            .await
            .expect("the oldest session is asked to close");
        assert_eq!(closed, SESSION_LIMIT_CLOSE);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), new_control.requested())
                .await
                .is_err(),
            "the new session stays"
        );
        drop(old);
        drop(new);
        assert_eq!(l.held_count(), 0);
    }

    #[tokio::test]
    async fn an_eviction_for_another_replica_is_not_ours() {
        let l = limits(LimitSettings {
            max_sessions: 1,
            ..LimitSettings::default()
        });
        let foreign = Eviction {
            key: "sub:alice".into(),
            member: "someoneelse/1/5".into(),
        };
        assert!(!l.on_eviction(&foreign));
        let prefix_only = Eviction {
            key: "sub:alice".into(),
            member: format!("{}x/1/5", l.replica),
        };
        assert!(
            !l.on_eviction(&prefix_only),
            "a longer replica id is another replica"
        );
    }
}
