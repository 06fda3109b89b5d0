//! A route's upstream as a pool of endpoints: every address its URLs resolve to, re-resolved every
//! `UPSTREAM_DNS_REFRESH_SECONDS`; each behind its own circuit breaker; optionally checked actively; and the dial
//! of a new session, with its retries.
//!
//! The dial ([`Pool::connect`]) takes endpoints in balancing order, skipping those whose breaker is open. A failed
//! attempt (refused, reset, timed out, TLS, a 5xx, a bad 101) is counted by that endpoint's breaker and retried,
//! up to `WS_DIAL_RETRY_MAX` times, on an endpoint not yet tried when there is one (at once), else on the best
//! again after a jittered back-off. Everything happens before the client is answered and ends by the client's
//! handshake deadline. With every breaker open, nothing is dialed: the caller answers 503 at once.
//!
//! State is shared without holding a lock across an await: the endpoint list is an `ArcSwap` snapshot, a
//! breaker a short `std` mutex, the connection count an atomic.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::io::AsyncWriteExt;
use tokio::time::{Instant, MissedTickBehavior};

use super::balance::{self, Candidate};
use super::breaker::{self, Admit, Breaker, Change};
use super::resolve::{self, Resolved, MAX_ENDPOINTS};
use super::{connect, Connected, UpstreamError, UpstreamRequest};
use crate::config::UpstreamSettings;
use crate::metrics::{DialFailureLabels, EndpointLabels, Metrics, RouteLabels};
use crate::net::WsUrl;
use crate::route::Route;

/// Time allowed for one resolution of a name.
const RESOLVE_LIMIT: Duration = Duration::from_secs(5);
/// While a route has no endpoint, dials ask for a resolution at most this often, whatever their number: a name
/// that resolves to nothing must not turn every client into a DNS query.
const RESOLVE_ON_DEMAND_EVERY: Duration = Duration::from_secs(1);
/// Longest back-off before a retry, whatever `WS_DIAL_RETRY_INTERVAL_SECONDS` and the retry number.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Time allowed to send the Close that ends a health check.
const CHECK_CLOSE_LIMIT: Duration = Duration::from_secs(1);

/// One address of one of the route's URLs.
#[derive(Debug)]
pub(crate) struct Endpoint {
    /// Position of its URL in the route's list.
    url: usize,
    addr: SocketAddr,
    /// Its place in the metrics (`endpoint` label), kept while it stays in the set.
    position: usize,
    /// Identity for `hash-subject`.
    key: u64,
    labels: EndpointLabels,
    /// Sessions and dials it holds now.
    active: AtomicUsize,
    breaker: Mutex<Breaker>,
}

impl Endpoint {
    fn breaker(&self) -> MutexGuard<'_, Breaker> {
        // A panic while holding it cannot leave a half-written state: every change is one assignment.
        self.breaker.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A session's (or a dial's) hold on an endpoint, for `least-connections`; given back when dropped.
#[derive(Debug)]
pub(crate) struct Lease(Arc<Endpoint>);

impl Lease {
    fn new(endpoint: &Arc<Endpoint>) -> Lease {
        endpoint.active.fetch_add(1, Ordering::Relaxed);
        Lease(Arc::clone(endpoint))
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A dial the breaker let through. A half-open trial dropped without an outcome (the client went away, or its
/// deadline cut the dial short) is given back, so the next dial can be the trial.
struct Permit<'a> {
    endpoint: &'a Endpoint,
    trial: bool,
    settled: bool,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.trial && !self.settled {
            self.endpoint.breaker().abandon_trial();
        }
    }
}

/// One route's endpoints and what the gateway knows of them.
pub(crate) struct Pool {
    route: Route,
    route_label: RouteLabels,
    settings: UpstreamSettings,
    policy: breaker::Policy,
    dial_timeout: Duration,
    tls: Arc<rustls::ClientConfig>,
    metrics: Arc<Metrics>,
    endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
    /// Held while resolving (one resolution at a time); when the last one finished.
    resolving: tokio::sync::Mutex<Option<Instant>>,
    /// Moves on with every dial: `least-connections` ties take turns.
    rotation: AtomicUsize,
    /// What the health check requests of each URL: the URL's own path, or the route's prefix when it has none.
    check_urls: Vec<WsUrl>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("route", &self.route.prefix)
            .field("endpoints", &self.endpoints.load().len())
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// A pool for `route`, with no endpoint until [`Pool::run`] (or a dial) resolves its names.
    pub(crate) fn new(
        route: &Route,
        settings: UpstreamSettings,
        dial_timeout: Duration,
        tls: Arc<rustls::ClientConfig>,
        metrics: Arc<Metrics>,
    ) -> Pool {
        let check_urls = route
            .upstreams
            .iter()
            .map(|u| {
                let mut u = u.clone();
                if !u.has_path {
                    u.path_and_query = route.prefix.clone();
                    u.has_path = true;
                }
                u
            })
            .collect();
        Pool {
            route_label: RouteLabels {
                route: route.prefix.clone(),
            },
            route: route.clone(),
            policy: breaker::Policy {
                threshold: settings.failure_threshold,
                open_for: settings.open_timeout,
            },
            settings,
            dial_timeout,
            tls,
            metrics,
            endpoints: ArcSwap::from_pointee(Vec::new()),
            resolving: tokio::sync::Mutex::new(None),
            rotation: AtomicUsize::new(0),
            check_urls,
        }
    }

    /// The route this pool serves.
    pub(crate) fn route(&self) -> &Route {
        &self.route
    }

    /// Re-resolves the names every `UPSTREAM_DNS_REFRESH_SECONDS` (the first time at once) and, when
    /// `CB_HEALTHCHECK_INTERVAL_SECONDS` is set, checks every endpoint at that period. Runs until the process ends.
    pub(crate) async fn run(self: Arc<Self>) {
        let mut dns = tokio::time::interval(self.settings.dns_refresh);
        dns.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut health = self.settings.healthcheck.map(|period| {
            let mut i = tokio::time::interval(period);
            i.set_missed_tick_behavior(MissedTickBehavior::Delay);
            i
        });
        loop {
            tokio::select! {
                biased;
                _ = dns.tick() => self.refresh(None).await,
                () = async {
                    match health.as_mut() {
                        Some(h) => { h.tick().await; }
                        None => std::future::pending::<()>().await,
                    }
                } => self.check_all().await,
            }
        }
    }

    /// Dials an endpoint for a new session of `subject` and completes the upgrade with the request `request`
    /// builds for that endpoint's URL; the whole dial, retries included, ends by `deadline`.
    ///
    /// # Errors
    /// [`UpstreamError::CircuitOpen`] when every breaker is open (nothing dialed), [`UpstreamError::NoEndpoints`]
    /// when the names resolve to nothing, otherwise the last attempt's error.
    pub(crate) async fn connect(
        &self,
        request: &(dyn Fn(&WsUrl) -> UpstreamRequest + Sync),
        subject: Option<&str>,
        deadline: Instant,
    ) -> Result<(Connected, Lease), UpstreamError> {
        let endpoints = self.endpoints_now(deadline).await;
        if endpoints.is_empty() {
            self.count_failure(None, "resolve");
            return Err(UpstreamError::NoEndpoints);
        }
        let rotation = self.rotation.fetch_add(1, Ordering::Relaxed);
        let mut tried: Vec<usize> = Vec::new();
        let mut last: Option<UpstreamError> = None;
        let mut retries = 0u32;
        loop {
            let order = balance::order(
                &candidates(&endpoints),
                self.settings.balance,
                subject,
                rotation,
            );
            let now = Instant::now();
            let fresh = order
                .iter()
                .copied()
                .find(|i| !tried.contains(i) && endpoints[*i].breaker().admits(now));
            let i = match (fresh, last.take()) {
                (Some(i), previous) => {
                    last = previous;
                    i
                }
                (None, None) => {
                    return Err(UpstreamError::CircuitOpen {
                        retry_after: self.retry_after(&endpoints, now),
                    })
                }
                (None, Some(previous)) => {
                    // Every endpoint that takes dials was tried in this dial: back off, then return to the best.
                    let wait = backoff(self.settings.retry_interval, retries);
                    if Instant::now() + wait >= deadline {
                        return Err(previous);
                    }
                    tokio::time::sleep(wait).await;
                    let now = Instant::now();
                    match order
                        .iter()
                        .copied()
                        .find(|i| endpoints[*i].breaker().admits(now))
                    {
                        Some(i) => {
                            last = Some(previous);
                            i
                        }
                        None => return Err(previous),
                    }
                }
            };
            let endpoint = &endpoints[i];
            let admitted = endpoint.breaker().admit(Instant::now());
            let Some(admit) = admitted else {
                // Another dial took the half-open trial between the look and the claim: look again, elsewhere.
                if tried.contains(&i) {
                    return Err(last.unwrap_or(UpstreamError::CircuitOpen {
                        retry_after: self.retry_after(&endpoints, Instant::now()),
                    }));
                }
                tried.push(i);
                continue;
            };
            let mut permit = Permit {
                endpoint,
                trial: admit == Admit::Trial,
                settled: false,
            };
            if last.is_some() {
                retries += 1;
                self.metrics
                    .proxy_retries
                    .get_or_create(&self.route_label)
                    .inc();
            }
            if !tried.contains(&i) {
                tried.push(i);
            }
            let lease = Lease::new(endpoint);
            let started = Instant::now();
            let limit = self
                .dial_timeout
                .min(deadline.saturating_duration_since(started));
            let url = &self.route.upstreams[endpoint.url];
            let result = connect(url, endpoint.addr, &request(url), &self.tls, limit).await;
            let error = match result {
                Ok(connected) => {
                    self.metrics
                        .upstream_dial_duration
                        .observe(started.elapsed().as_secs_f64());
                    self.record(&mut permit, true);
                    return Ok((connected, lease));
                }
                Err(e) => e,
            };
            drop(lease);
            self.count_failure(Some(endpoint), error.kind());
            tracing::debug!(event = "upstream_dial_failed", route = %self.route.prefix, endpoint = endpoint.position,
                addr = %endpoint.addr, kind = error.kind(), trial = permit.trial, %error, "upstream dial failed");
            if !error.is_endpoint_failure() {
                // It answered (a 4xx): alive, and the request's own fault.
                self.record(&mut permit, true);
                return Err(error);
            }
            if limit < self.dial_timeout && error.kind() == "timeout" {
                // Cut short by the client's deadline, not the endpoint's: its breaker does not count it.
                return Err(error);
            }
            self.record(&mut permit, false);
            if retries >= self.settings.retry_max || Instant::now() >= deadline {
                return Err(error);
            }
            last = Some(error);
        }
    }

    /// Whether any endpoint is healthy (its breaker not open), for `READINESS_REQUIRES_UPSTREAM`.
    pub(crate) fn has_healthy(&self, now: Instant) -> bool {
        self.endpoints
            .load()
            .iter()
            .any(|e| e.breaker().healthy(now))
    }

    /// Sets `ws_upstream_health` from the breakers as of `now` (an open time that ran out counts as healthy), for a
    /// scrape.
    pub(crate) fn publish_health(&self, now: Instant) {
        for e in self.endpoints.load().iter() {
            let healthy = e.breaker().healthy(now);
            self.metrics
                .upstream_health
                .get_or_create(&e.labels)
                .set(i64::from(healthy));
        }
    }

    /// The endpoints, resolving them now when none is known (the first resolution is still running, or the names
    /// resolved to nothing), bounded by `deadline` and by [`RESOLVE_ON_DEMAND_EVERY`].
    async fn endpoints_now(&self, deadline: Instant) -> Arc<Vec<Arc<Endpoint>>> {
        let current = self.endpoints.load_full();
        if !current.is_empty() {
            return current;
        }
        let _ =
            tokio::time::timeout_at(deadline, self.refresh(Some(RESOLVE_ON_DEMAND_EVERY))).await;
        self.endpoints.load_full()
    }

    /// Resolves the route's names and applies the result. With `min_gap` (a dial asking), nothing happens when the
    /// endpoints appeared while waiting for the lock, or the last resolution is more recent than `min_gap`.
    async fn refresh(&self, min_gap: Option<Duration>) {
        let mut last = self.resolving.lock().await;
        if let Some(gap) = min_gap {
            if !self.endpoints.load().is_empty() || last.is_some_and(|at| at.elapsed() < gap) {
                return;
            }
        }
        let resolved = resolve::resolve(&self.route.upstreams, RESOLVE_LIMIT).await;
        *last = Some(Instant::now());
        self.apply(resolved);
    }

    /// Installs a resolution: endpoints that stay keep their breaker, count and position; new ones start closed
    /// at the lowest free positions; a name that failed to resolve keeps its endpoints (a DNS blip does not empty
    /// the pool).
    fn apply(&self, resolved: Resolved) {
        let route = self.route.prefix.as_str();
        for (url, why) in &resolved.failed {
            tracing::warn!(event = "upstream_resolve_failed", route, url = %self.route.upstreams[*url],
                error = %why, "upstream name did not resolve; keeping its previous endpoints");
        }
        if resolved.dropped > 0 {
            tracing::warn!(
                event = "upstream_endpoints_capped",
                route,
                dropped = resolved.dropped,
                max = MAX_ENDPOINTS,
                "more upstream addresses than a route holds; the rest are ignored"
            );
        }
        let old = self.endpoints.load_full();
        let mut wanted = resolved.addrs;
        wanted.extend(
            old.iter()
                .filter(|e| resolved.failed.iter().any(|(u, _)| *u == e.url))
                .map(|e| (e.url, e.addr)),
        );
        wanted.sort();
        wanted.dedup();
        wanted.truncate(MAX_ENDPOINTS);
        let same = wanted.len() == old.len()
            && wanted
                .iter()
                .zip(old.iter())
                .all(|((u, a), e)| *u == e.url && *a == e.addr);
        if same {
            return;
        }
        let mut taken = [false; MAX_ENDPOINTS];
        let mut next: Vec<Arc<Endpoint>> = Vec::with_capacity(wanted.len());
        let mut added = Vec::new();
        for (url, addr) in wanted {
            match old.iter().find(|e| e.url == url && e.addr == addr) {
                Some(e) => {
                    taken[e.position] = true;
                    next.push(Arc::clone(e));
                }
                None => added.push((url, addr)),
            }
        }
        for e in old.iter() {
            if !taken[e.position] {
                self.metrics.upstream_health.remove(&e.labels);
            }
        }
        let mut free = (0..MAX_ENDPOINTS).filter(|p| !taken[*p]);
        for (url, addr) in added {
            // Invariant: at most MAX_ENDPOINTS endpoints, so a free position is always left.
            let Some(position) = free.next() else { break };
            let labels = EndpointLabels {
                route: self.route.prefix.clone(),
                endpoint: position.to_string(),
            };
            self.metrics.upstream_health.get_or_create(&labels).set(1);
            next.push(Arc::new(Endpoint {
                url,
                addr,
                position,
                key: balance::endpoint_key(&self.route.upstreams[url].to_string(), &addr),
                labels,
                active: AtomicUsize::new(0),
                breaker: Mutex::new(Breaker::default()),
            }));
        }
        next.sort_by_key(|e| (e.url, e.addr));
        let listed = next
            .iter()
            .map(|e| format!("{}={}", e.position, e.addr))
            .collect::<Vec<_>>()
            .join(" ");
        tracing::info!(event = "upstream_endpoints", route, count = next.len(), endpoints = %listed,
            "upstream endpoints changed");
        self.metrics
            .upstream_endpoints
            .get_or_create(&self.route_label)
            .set(next.len() as i64);
        self.endpoints.store(Arc::new(next));
    }

    /// One health check of every endpoint, at once.
    async fn check_all(&self) {
        let endpoints = self.endpoints.load_full();
        futures_util::future::join_all(endpoints.iter().map(|e| self.check(e))).await;
    }

    /// Connects and upgrades on the route's path (offering `mqtt`, which a generic WebSocket server ignores), then
    /// closes. A passing check closes the breaker, a failing one opens it at once; an answer other than 101 below
    /// 500 counts as alive, as for a client's dial.
    async fn check(&self, endpoint: &Endpoint) {
        let request = UpstreamRequest::client(&self.check_urls[endpoint.url], &[], &["mqtt"]);
        let url = &self.route.upstreams[endpoint.url];
        let result = connect(url, endpoint.addr, &request, &self.tls, self.dial_timeout).await;
        let change = match result {
            Ok(mut connected) => {
                let close = crate::frame::close_frame(
                    crate::frame::CLOSE_NORMAL,
                    "health check",
                    Some(crate::relay::mask_key()),
                );
                let _ = tokio::time::timeout(CHECK_CLOSE_LIMIT, async {
                    let _ = connected.io.write_all(&close).await;
                    let _ = connected.io.shutdown().await;
                })
                .await;
                endpoint.breaker().success()
            }
            Err(error) if !error.is_endpoint_failure() => endpoint.breaker().success(),
            Err(error) => {
                tracing::debug!(event = "upstream_check_failed", route = %self.route.prefix,
                    endpoint = endpoint.position, addr = %endpoint.addr, kind = error.kind(), %error,
                    "upstream health check failed");
                endpoint.breaker().trip(Instant::now(), self.policy)
            }
        };
        self.report(endpoint, change, "health_check");
    }

    /// Records a dial's outcome with its endpoint's breaker.
    fn record(&self, permit: &mut Permit<'_>, ok: bool) {
        permit.settled = true;
        let change = {
            let mut b = permit.endpoint.breaker();
            if ok {
                b.success()
            } else {
                b.failure(Instant::now(), self.policy)
            }
        };
        self.report(permit.endpoint, change, "dial");
    }

    /// Counts and logs a breaker's change.
    fn report(&self, endpoint: &Endpoint, change: Change, by: &'static str) {
        match change {
            Change::None => {}
            Change::Opened => {
                self.metrics
                    .circuit_opens
                    .get_or_create(&endpoint.labels)
                    .inc();
                self.metrics
                    .upstream_health
                    .get_or_create(&endpoint.labels)
                    .set(0);
                tracing::warn!(event = "circuit_opened", route = %self.route.prefix, endpoint = endpoint.position,
                    addr = %endpoint.addr, by, open_seconds = self.policy.open_for.as_secs(),
                    "upstream endpoint's circuit breaker opened");
            }
            Change::Closed => {
                self.metrics
                    .upstream_health
                    .get_or_create(&endpoint.labels)
                    .set(1);
                tracing::info!(event = "circuit_closed", route = %self.route.prefix, endpoint = endpoint.position,
                    addr = %endpoint.addr, by, "upstream endpoint's circuit breaker closed");
            }
        }
    }

    fn count_failure(&self, endpoint: Option<&Endpoint>, kind: &'static str) {
        self.metrics
            .upstream_failures
            .get_or_create(&DialFailureLabels {
                route: self.route.prefix.clone(),
                endpoint: endpoint.map_or_else(|| "none".to_owned(), |e| e.labels.endpoint.clone()),
                kind,
            })
            .inc();
    }

    /// When the first breaker lets a dial through again: whole seconds, at least 1, at most the open time.
    fn retry_after(&self, endpoints: &[Arc<Endpoint>], now: Instant) -> Duration {
        let soonest = endpoints
            .iter()
            .map(|e| e.breaker().wait(now))
            .min()
            .unwrap_or(self.policy.open_for);
        let secs = soonest.as_secs() + u64::from(soonest.subsec_nanos() > 0);
        Duration::from_secs(secs.clamp(1, self.policy.open_for.as_secs().max(1)))
    }
}

fn candidates(endpoints: &[Arc<Endpoint>]) -> Vec<Candidate> {
    endpoints
        .iter()
        .map(|e| Candidate {
            key: e.key,
            active: e.active.load(Ordering::Relaxed),
        })
        .collect()
}

/// The wait before retry number `done + 1` returns to an endpoint already tried: `base` doubled per retry done,
/// times a random factor in [0.5, 1.5), at most [`MAX_BACKOFF`].
fn backoff(base: Duration, done: u32) -> Duration {
    use ring::rand::SecureRandom;
    let mut raw = [0u8; 2];
    // Without randomness the factor is 0.5: still a back-off, only not spread.
    let _ = ring::rand::SystemRandom::new().fill(&mut raw);
    let factor = 0.5 + f64::from(u16::from_le_bytes(raw)) / 65536.0;
    base.saturating_mul(1 << done.min(10))
        .mul_f64(factor)
        .min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Balance;

    fn pool(urls: &[&str]) -> Pool {
        let route = Route {
            prefix: "/mqtt".into(),
            upstreams: urls
                .iter()
                .map(|u| WsUrl::parse_ws(u).expect("url"))
                .collect(),
            copy_subprotocol: true,
            preserve_query: true,
            mqtt_connect_auth: None,
            mqtt_username_claim: None,
            mqtt_publish_acl: None,
            mqtt_subscribe_acl: None,
        };
        let settings = UpstreamSettings {
            dns_refresh: Duration::from_secs(10),
            balance: Balance::LeastConnections,
            failure_threshold: 2,
            open_timeout: Duration::from_secs(30),
            healthcheck: None,
            retry_max: 2,
            retry_interval: Duration::from_millis(100),
            readiness_requires_upstream: true,
        };
        let tls = crate::tls::client_config(None).expect("tls");
        Pool::new(
            &route,
            settings,
            Duration::from_secs(1),
            tls,
            Arc::new(Metrics::new()),
        )
    }

    fn addr(last: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, last], 1883))
    }

    fn found(addrs: &[(usize, SocketAddr)]) -> Resolved {
        Resolved {
            addrs: addrs.to_vec(),
            ..Resolved::default()
        }
    }

    fn positions(p: &Pool) -> Vec<(SocketAddr, usize)> {
        p.endpoints
            .load()
            .iter()
            .map(|e| (e.addr, e.position))
            .collect()
    }

    #[tokio::test]
    async fn a_new_resolution_keeps_what_stays_and_a_failed_name_keeps_its_endpoints() {
        let p = pool(&["ws://brokers.headless:1883/mqtt", "ws://other:1883"]);
        let now = Instant::now();
        assert!(!p.has_healthy(now), "no endpoint yet: not healthy");
        p.apply(found(&[(0, addr(1)), (0, addr(2))]));
        assert_eq!(positions(&p), [(addr(1), 0), (addr(2), 1)]);
        assert!(p.has_healthy(now));
        // Endpoint 2's breaker opens; then DNS drops 1 and adds 3.
        let two = Arc::clone(&p.endpoints.load()[1]);
        assert_eq!(two.breaker().trip(now, p.policy), Change::Opened);
        p.apply(found(&[(0, addr(2)), (0, addr(3))]));
        assert_eq!(
            positions(&p),
            [(addr(2), 1), (addr(3), 0)],
            "3 takes the freed position"
        );
        assert!(
            Arc::ptr_eq(&p.endpoints.load()[0], &two),
            "2 keeps its breaker"
        );
        assert!(!p.endpoints.load()[0].breaker().admits(now));
        // The second name resolves; then the first fails to: its endpoints stay.
        p.apply(found(&[(0, addr(2)), (0, addr(3)), (1, addr(9))]));
        p.apply(Resolved {
            addrs: vec![(1, addr(9))],
            failed: vec![(0, "brokers.headless: lookup timed out".into())],
            dropped: 0,
        });
        assert_eq!(
            positions(&p),
            [(addr(2), 1), (addr(3), 0), (addr(9), 2)],
            "a DNS blip does not empty the pool"
        );
        // Only endpoint 2 is open: the route is still healthy; with all three open it is not.
        assert!(p.has_healthy(now));
        for e in p.endpoints.load().iter() {
            e.breaker().trip(now, p.policy);
        }
        assert!(!p.has_healthy(now));
        assert!(p.has_healthy(now + Duration::from_secs(30)), "due a trial");
    }

    #[tokio::test]
    async fn a_flood_of_addresses_is_capped() {
        let p = pool(&["ws://many:1883"]);
        let mut r = Resolved::default();
        for i in 0..200u16 {
            r.addrs.push((
                0,
                SocketAddr::from(([10, 1, (i / 250) as u8, (i % 250) as u8], 1883)),
            ));
        }
        resolve::settle_for_tests(&mut r);
        p.apply(r);
        let ps: Vec<usize> = positions(&p).into_iter().map(|(_, p)| p).collect();
        assert_eq!(ps.len(), MAX_ENDPOINTS);
        let mut sorted = ps.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..MAX_ENDPOINTS).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn every_breaker_open_means_no_dial_and_a_retry_after() {
        let p = pool(&["ws://127.0.0.1:9/"]);
        p.apply(found(&[(0, addr(1)), (0, addr(2))]));
        let now = Instant::now();
        for e in p.endpoints.load().iter() {
            e.breaker().trip(now, p.policy);
        }
        let request = |url: &WsUrl| UpstreamRequest::client(url, &[], &[]);
        let started = Instant::now();
        let err = p
            .connect(&request, Some("alice"), started + Duration::from_secs(5))
            .await
            .expect_err("all open");
        match err {
            UpstreamError::CircuitOpen { retry_after } => {
                assert!(
                    retry_after <= Duration::from_secs(30)
                        && retry_after >= Duration::from_secs(29)
                );
            }
            other => panic!("expected CircuitOpen, got {other}"),
        }
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "nothing dialed"
        );
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let base = Duration::from_millis(100);
        for _ in 0..50 {
            let first = backoff(base, 0);
            assert!(first >= Duration::from_millis(50) && first < Duration::from_millis(150));
            let third = backoff(base, 2);
            assert!(third >= Duration::from_millis(200) && third < Duration::from_millis(600));
            assert!(backoff(Duration::from_secs(10), 30) <= MAX_BACKOFF);
        }
        assert_eq!(backoff(Duration::ZERO, 3), Duration::ZERO);
    }
}
