//! The shared state store: where revocations are kept and how they reach every replica.
//!
//! `STATE_STORE` picks one: `memory` (this process only), `redis` or `postgres`. Whatever the store, admission reads
//! only the local copy ([`crate::revocation::Revocations`]); the store is written when a revocation is made here and
//! read by one background task per process, which applies what the other replicas made.
//!
//! Outages: a revocation that cannot be stored is applied locally at once, kept in a bounded queue, and written
//! when the store is back, so nothing is lost. After every (re)connection the task reloads the active revocations,
//! which covers what was published while it was away.

mod postgres;
mod redis;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::metrics::Metrics;
use crate::revocation::Revocation;

/// Most revocations queued while the store is unreachable.
const MAX_QUEUED: usize = 100_000;

/// Which store, as configured. `Debug` hides credentials.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// Revocations stay in this process.
    Memory,
    /// Redis at this URL (`redis://` or `rediss://`).
    Redis(String),
    /// PostgreSQL with this DSN (URL or key=value form, `sslmode` honoured).
    Postgres(String),
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreConfig::Memory => f.write_str("Memory"),
            StoreConfig::Redis(u) => write!(f, "Redis({})", crate::config::redact(u)),
            StoreConfig::Postgres(d) => write!(f, "Postgres({})", crate::config::redact(d)),
        }
    }
}

impl StoreConfig {
    /// Bounded label for logs and metrics.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            StoreConfig::Memory => "memory",
            StoreConfig::Redis(_) => "redis",
            StoreConfig::Postgres(_) => "postgres",
        }
    }
}

/// A revocation a peer made, or a reload after reconnecting, handed to the gateway.
pub(crate) type Apply = Arc<dyn Fn(Revocation) + Send + Sync>;

/// An eviction heard on the store's channel, handed to the per-subject limits.
pub(crate) type OnEvict = Arc<dyn Fn(&Eviction) + Send + Sync>;

/// `SESSION_LIMIT_POLICY=evict-oldest`: the lease `member` of `key` lost its place to a newer session; the replica
/// holding it closes that session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Eviction {
    pub(crate) key: String,
    pub(crate) member: String,
}

/// Longest eviction message accepted from the store.
const MAX_EVICTION_BYTES: usize = 1_024;

/// A lease the store granted: its full member name, and the members it evicted to make room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LeaseGrant {
    pub(crate) member: String,
    pub(crate) evicted: Vec<String>,
}

impl LeaseGrant {
    /// Both stores answer `[member, evicted...]`, or nothing when the lease was refused.
    fn from_reply(mut reply: Vec<String>) -> Option<LeaseGrant> {
        if reply.is_empty() {
            return None;
        }
        let member = reply.remove(0);
        Some(LeaseGrant {
            member,
            evicted: reply,
        })
    }
}

enum Backend {
    Memory,
    Redis(redis::RedisStore),
    Postgres(postgres::PgStore),
}

/// The store handle shared by the admin API and the background task.
pub(crate) struct Store {
    backend: Backend,
    /// `REVOCATION_MAX_TTL_SECONDS`, for revocations whose token expiry is unknown (the Go channel).
    pub(crate) max_ttl: i64,
    up: AtomicBool,
    queued: Mutex<Vec<Revocation>>,
    metrics: Arc<Metrics>,
    on_evict: OnceLock<OnEvict>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("up", &self.is_up())
            .finish_non_exhaustive()
    }
}

impl Store {
    /// A store for `config`; nothing is connected until [`Store::run`].
    ///
    /// # Errors
    /// A URL or DSN that the client library refuses (the message names no secret).
    pub(crate) fn new(
        config: &StoreConfig,
        max_ttl: i64,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Store>, String> {
        let backend = match config {
            StoreConfig::Memory => Backend::Memory,
            StoreConfig::Redis(url) => Backend::Redis(redis::RedisStore::new(url)?),
            StoreConfig::Postgres(dsn) => Backend::Postgres(postgres::PgStore::new(dsn)?),
        };
        let memory = matches!(backend, Backend::Memory);
        let store = Arc::new(Store {
            backend,
            max_ttl,
            up: AtomicBool::new(memory),
            queued: Mutex::new(Vec::new()),
            metrics,
            on_evict: OnceLock::new(),
        });
        store.metrics.store_up.set(i64::from(memory));
        Ok(store)
    }

    /// Whether the store is reachable (always, for `memory`).
    #[must_use]
    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    fn set_up(&self, up: bool, kind: &'static str) {
        let was = self.up.swap(up, Ordering::AcqRel);
        self.metrics.store_up.set(i64::from(up));
        if was != up {
            if up {
                tracing::info!(event = "store_up", store = kind, "state store reachable");
            } else {
                self.metrics.store_reconnects.inc();
                tracing::warn!(event = "store_down", store = kind,
                    "state store unreachable; revocations apply locally and are queued until it is back");
            }
        }
    }

    /// Stores and publishes `rev` for the other replicas. `false` when the store is unreachable: the revocation is
    /// then queued and written when the store is back.
    pub(crate) async fn publish(&self, rev: &Revocation) -> bool {
        let stored = match &self.backend {
            Backend::Memory => Ok(()),
            Backend::Redis(r) => r.publish(rev).await,
            Backend::Postgres(p) => p.publish(rev).await,
        };
        match stored {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(event = "store_write_failed", %error, kind = rev.target.kind(),
                    "revocation not stored yet; queued");
                if let Ok(mut q) = self.queued.lock() {
                    if q.len() < MAX_QUEUED {
                        q.push(rev.clone());
                    }
                }
                self.set_up(false, self.kind());
                false
            }
        }
    }

    /// Publishes a `jti` revocation that names its subject on the Go gateway's channel too (Redis only), so Go
    /// replicas of a mixed fleet close their sessions.
    pub(crate) async fn publish_go(&self, sub: &str, jti: &str) {
        if let Backend::Redis(r) = &self.backend {
            if let Err(error) = r.publish_go(sub, jti).await {
                tracing::debug!(event = "store_write_failed", %error, "Go-format publish failed");
            }
        }
    }

    /// Whether the replicas share this store (Redis or PostgreSQL).
    #[must_use]
    pub(crate) fn is_shared(&self) -> bool {
        !matches!(self.backend, Backend::Memory)
    }

    /// Where evictions heard on the store's channel go; set once, at start.
    pub(crate) fn on_evict(&self, f: OnEvict) {
        let _ = self.on_evict.set(f);
    }

    /// An eviction message from the store: parsed, bounded, handed on.
    fn hear_eviction(&self, payload: &[u8]) {
        if payload.len() > MAX_EVICTION_BYTES {
            return;
        }
        match serde_json::from_slice::<Eviction>(payload) {
            Ok(e) => {
                if let Some(f) = self.on_evict.get() {
                    f(&e);
                }
            }
            Err(_) => tracing::debug!(
                event = "store_message_ignored",
                "malformed eviction from the store ignored"
            ),
        }
    }

    /// One token from `key`'s bucket (`rate` per second, `burst` at most): 0 when taken, else the milliseconds
    /// until one is available.
    pub(crate) async fn rate_take(&self, key: &str, rate: f64, burst: u32) -> Result<u64, String> {
        match &self.backend {
            Backend::Memory => Err("no shared store".into()),
            Backend::Redis(r) => r.rate_take(key, rate, burst).await,
            Backend::Postgres(p) => p.rate_take(key, rate, burst).await,
        }
    }

    /// A lease for one more session of `key`, named `prefix/<start>`; `None` when `max` are held and `evict` is
    /// off. With `evict`, the oldest leases make room and are named in the grant.
    pub(crate) async fn lease_acquire(
        &self,
        key: &str,
        prefix: &str,
        lease: Duration,
        max: u32,
        evict: bool,
    ) -> Result<Option<LeaseGrant>, String> {
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        match &self.backend {
            Backend::Memory => Err("no shared store".into()),
            Backend::Redis(r) => r.lease_acquire(key, prefix, lease_ms, max, evict).await,
            Backend::Postgres(p) => p.lease_acquire(key, prefix, lease_ms, max, evict).await,
        }
    }

    /// Extends `leases` (key, member) by `lease` from now; a lease the store no longer holds stays gone.
    pub(crate) async fn lease_renew(
        &self,
        leases: &[(String, String)],
        lease: Duration,
    ) -> Result<(), String> {
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        match &self.backend {
            Backend::Memory => Ok(()),
            Backend::Redis(r) => r.lease_renew(leases, lease_ms).await,
            Backend::Postgres(p) => p.lease_renew(leases, lease_ms).await,
        }
    }

    /// Gives a lease back.
    pub(crate) async fn lease_release(&self, key: &str, member: &str) -> Result<(), String> {
        match &self.backend {
            Backend::Memory => Ok(()),
            Backend::Redis(r) => r.lease_release(key, member).await,
            Backend::Postgres(p) => p.lease_release(key, member).await,
        }
    }

    /// Tells the replica holding `eviction.member` to close that session.
    pub(crate) async fn publish_eviction(&self, eviction: &Eviction) -> Result<(), String> {
        let json = serde_json::to_string(eviction).map_err(|e| e.to_string())?;
        match &self.backend {
            Backend::Memory => Ok(()),
            Backend::Redis(r) => r.publish_eviction(&json).await,
            Backend::Postgres(p) => p.publish_eviction(&json).await,
        }
    }

    fn kind(&self) -> &'static str {
        match &self.backend {
            Backend::Memory => "memory",
            Backend::Redis(_) => "redis",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// Writes what was queued during an outage; stops at the first failure.
    async fn flush(&self) {
        let queued = self
            .queued
            .lock()
            .map(|mut q| std::mem::take(&mut *q))
            .unwrap_or_default();
        let mut rest = queued.into_iter();
        while let Some(rev) = rest.next() {
            let ok = match &self.backend {
                Backend::Memory => true,
                Backend::Redis(r) => r.publish(&rev).await.is_ok(),
                Backend::Postgres(p) => p.publish(&rev).await.is_ok(),
            };
            if !ok {
                if let Ok(mut q) = self.queued.lock() {
                    q.push(rev);
                    q.extend(rest);
                }
                return;
            }
        }
    }

    /// The background task: keeps one subscription (Redis) or `LISTEN` (PostgreSQL) open, reconnecting with
    /// back-off; after each connection reloads the active revocations and writes the queued ones; hands every
    /// revocation it hears to `apply`.
    pub(crate) async fn run(self: Arc<Self>, apply: Apply) {
        let mut backoff = Duration::from_millis(200);
        loop {
            let connected = match &self.backend {
                Backend::Memory => return,
                Backend::Redis(r) => r.listen(&self, &apply).await,
                Backend::Postgres(p) => p.listen(&self, &apply).await,
            };
            if connected {
                backoff = Duration::from_millis(200);
            }
            self.set_up(false, self.kind());
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Called by a backend once it is connected and has reloaded: marks the store up and writes the queue.
    async fn connected(&self) {
        self.set_up(true, self.kind());
        self.flush().await;
    }
}

/// Parses a revocation published by a peer; `None` (and a debug line) for anything malformed.
fn parse_peer(payload: &[u8]) -> Option<Revocation> {
    match serde_json::from_slice::<Revocation>(payload) {
        Ok(rev) if rev.validate().is_ok() => Some(rev),
        _ => {
            tracing::debug!(
                event = "store_message_ignored",
                "malformed revocation from the store ignored"
            );
            None
        }
    }
}
