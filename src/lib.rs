//! ws-gateway: a TLS edge for WebSocket traffic. It authenticates every upgrade with a JWT verified against the
//! identity provider's JWKS, enforces allowed Origins, and relays raw bytes to an MQTT-over-WebSocket broker or any
//! WebSocket backend.
//!
//! # Layout
//! In the order a connection meets it:
//! - [`config`]: typed, validated configuration (flags > env > file > defaults);
//! - `server`: the shared state and the accept loop, one task per connection;
//! - `admission`: PROXY header, handshake budget, TLS, head, route, upgrade checks, Origin, token, session slot,
//!   upstream, 101;
//! - `budget`: the handshake budget per client address (a fixed table) and the message rate per session;
//! - `refusal`: every way admission fails, answered, logged and counted in one place;
//! - [`proxy_protocol`]: PROXY v1/v2 from trusted load balancers;
//! - [`tls`]: PEM loading, server and client TLS, certificate reload; [`tls_stream`]: the client's TLS connection
//!   through rustls' unbuffered API (no buffer held while idle); `pool`: the per-thread I/O buffers;
//! - [`upgrade`]: the bounded request-head reader, upgrade checks, path normalisation;
//! - [`route`]: path prefix to upstream (`routes.yaml`);
//! - [`auth`]: token sources, JWT verification, JWKS cache, the IdP client, Origin policy;
//! - [`upstream`]: the rewritten upgrade request, the dial, the 101 check; each route's pool of endpoints (DNS
//!   re-resolution, balancing, a circuit breaker per endpoint, health checks, retries);
//! - `relay`: the byte relay with timeouts and Close frames at frame boundaries ([`frame`] finds them);
//! - [`mqtt`]: the token in the MQTT CONNECT password (the CONNECT parser and the flow), for clients that cannot
//!   set headers, and reading the first CONNECT in every token mode when a rewrite is on;
//! - [`mqtt_identity`]: the verified identity in the CONNECT (username from a claim, password drop, user
//!   properties, client id policy): split, rewrite, re-encode;
//! - [`mqtt_acl`]: topic rules from claims (templates, wildcard matching, filter containment);
//! - [`mqtt_filter`]: the packet streams of an inspected MQTT session (frames on any split, client packets checked,
//!   SUBACKs rewritten); `mqtt_relay`: the relay used instead of `relay` for those sessions (topic rules, MQTT 5
//!   re-authentication);
//! - `limits`: per-subject connection rate and session cap, shared through the store;
//! - `session`: session accounting, what is counted and logged when a relayed session ends;
//! - `registry`: live sessions by subject and token id, closable from outside;
//! - [`revocation`]: revocations and their local copy; `store`: Redis and PostgreSQL, shared by the replicas;
//! - `admin`: `/healthz`, `/readyz`, `/metrics`, the admin API, back-channel logout; [`metrics`]: the handles;
//! - `memory`: giving a burst's memory back (idle cached tokens, tables, the allocator's free pages);
//! - `shutdown`: the drain phases and connection guards; `pending`: connections before they earn their place;
//! - [`net`]: the stream type and URLs; [`logging`]: JSON or text logs; [`dev`]: `--dev` mode and the echo server.
//!
//! Modules outside callers use (the binary, tests, examples, the load generator, the fuzz targets) are public;
//! the rest is private to the crate, and `unreachable_pub` keeps it so.

#![deny(unsafe_code)]
#![warn(unreachable_pub)]

mod admin;
mod admission;
pub mod auth;
mod budget;
pub mod config;
pub mod dev;
pub mod frame;
mod limits;
pub mod logging;
mod memory;
pub mod metrics;
pub mod mqtt;
pub mod mqtt_acl;
pub mod mqtt_filter;
pub mod mqtt_identity;
mod mqtt_relay;
pub mod net;
mod pending;
mod pool;
pub mod proxy_protocol;
mod refusal;
mod registry;
mod relay;
pub mod revocation;
pub mod route;
mod server;
mod session;
mod shutdown;
mod store;
pub mod tls;
pub mod tls_stream;
pub mod upgrade;
pub mod upstream;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;

pub use config::{Config, Settings};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// TLS material or configuration.
    #[error("tls: {0}")]
    Tls(String),
    /// `--dev` setup.
    #[error("dev mode: {0}")]
    Dev(String),
    /// The shared state store's URL or DSN.
    #[error("state store: {0}")]
    Store(String),
    /// The listeners' addresses could not be read.
    #[error("listener: {0}")]
    Listener(#[from] std::io::Error),
}

/// What the owner of a running gateway asks of it. `main.rs` sends these for SIGTERM/SIGINT and SIGHUP; a test or
/// an embedding program sends them directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// Start the drain; a second one during the drain exits at once.
    Shutdown,
    /// Reload the certificate and key files.
    Reload,
}

/// How the process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Every session finished or was closed within the drain.
    Drained,
    /// Some sessions were still open when the close grace ran out.
    DeadlinePassed,
    /// A second signal cut the drain short.
    Forced,
}

/// Runs the gateway on bound listeners until `triggers` asks for a shutdown (or its sender is dropped), then
/// drains. The gateway owns no signal handler: whoever calls this decides what stops it, so tests run it in-process.
///
/// # Errors
/// TLS material that does not load, `--dev` setup, or listeners whose address cannot be read.
pub async fn run(
    mut config: Config,
    listener: TcpListener,
    admin: TcpListener,
    mut triggers: mpsc::Receiver<Trigger>,
) -> Result<Exit, StartError> {
    let metrics = Arc::new(metrics::Metrics::new());
    let drain = shutdown::Drain::new();
    let admin_addr = admin.local_addr()?;
    config.listen = listener.local_addr()?;
    config.admin_listen = admin_addr;

    let mut dev_setup = None;
    if config.dev {
        dev_setup = Some(
            dev::prepare(&mut config, admin_addr)
                .await
                .map_err(StartError::Dev)?,
        );
    }
    let cert = match (&config.tls, config.dev) {
        (Some(files), _) => Some(
            tls::ReloadableCert::from_files(&files.cert, &files.key)
                .map_err(|e| StartError::Tls(e.to_string()))?,
        ),
        (None, true) => {
            let (ck, pem) =
                tls::self_signed(&["localhost", "127.0.0.1"]).map_err(StartError::Dev)?;
            let file = dev::CaFile::create(&pem).map_err(StartError::Dev)?;
            if let Some(s) = dev_setup.as_mut() {
                s.ca_file = Some(file);
            }
            Some(tls::ReloadableCert::fixed(ck))
        }
        (None, false) => None,
    };
    let acceptor = match &cert {
        Some(c) => Some(tls_stream::TlsAcceptor::from(
            tls::server_config(Arc::clone(c)).map_err(StartError::Tls)?,
        )),
        None => None,
    };
    let upstream_tls =
        tls::client_config(config.upstream_ca_file.as_deref()).map_err(StartError::Tls)?;
    let jwks_tls =
        tls::client_config(config.auth.jwks_ca_file.as_deref()).map_err(StartError::Tls)?;
    let source = match (&config.auth.jwks_url, &config.auth.oidc_issuer) {
        (Some(url), _) => auth::jwks::KeySource::Jwks(url.clone()),
        (None, Some(issuer)) => auth::jwks::KeySource::Issuer(issuer.clone()),
        (None, None) => return Err(StartError::Dev("no JWKS_URL or OIDC_ISSUER_URL".into())),
    };
    let client = auth::idp::IdpClient::new(&jwks_tls, config.auth.jwks_fetch_timeout)
        .map_err(StartError::Tls)?;
    let cache = Arc::new(auth::jwks::JwksCache::new(
        source,
        client,
        config.auth.jwks_ttl,
        config.auth.jwks_refetch_interval,
        Arc::clone(&metrics),
    ));
    let mut policy = auth::jwt::Policy::from_settings(&config.auth);
    policy.limit_claim = config.limits.key_claim.clone();
    // The claims the MQTT CONNECT rewrite and the topic rules may need, on any route.
    let routes = config.routes.routes();
    let acl_claims = config
        .mqtt_acl
        .claims()
        .chain(routes.iter().flat_map(|r| {
            r.mqtt_publish_acl
                .iter()
                .chain(r.mqtt_subscribe_acl.iter())
                .flatten()
                .flat_map(mqtt_acl::Template::claims)
        }))
        .map(str::to_owned);
    let claims: Vec<String> = std::iter::once(&config.mqtt.username_claim)
        .chain(routes.iter().map(|r| &r.mqtt_username_claim))
        .flatten()
        .cloned()
        .chain(acl_claims)
        .collect();
    for claim in claims {
        if !policy.identity_claims.contains(&claim) {
            policy.identity_claims.push(claim);
        }
    }
    policy.collect_roles = config.mqtt.username_format == mqtt_identity::UsernameFormat::Go;
    let verifier = Arc::new(auth::jwt::Verifier::new(policy, Arc::clone(&cache)));

    if config.auth.origins.is_empty() {
        tracing::warn!(event = "origins_unset", "WS_ALLOWED_ORIGINS is not set: every request that carries an Origin (all browsers) is refused");
    }
    if config.store_alias {
        tracing::warn!(
            event = "deprecated_setting",
            setting = "JWT_CACHE_STORE",
            "JWT_CACHE_STORE is the Go gateway's name; use STATE_STORE"
        );
    }
    let store = store::Store::new(
        &config.store,
        config.revocation_max_ttl,
        Arc::clone(&metrics),
    )
    .map_err(StartError::Store)?;

    let pools: Vec<Arc<upstream::Pool>> = config
        .routes
        .routes()
        .iter()
        .map(|route| {
            Arc::new(upstream::Pool::new(
                route,
                config.upstream,
                config.timeouts.dial,
                Arc::clone(&upstream_tls),
                Arc::clone(&metrics),
            ))
        })
        .collect();
    for pool in &pools {
        tokio::spawn(Arc::clone(pool).run());
    }
    let gw = Arc::new(server::Gateway {
        config: config.clone(),
        tls: acceptor,
        verifier,
        metrics: Arc::clone(&metrics),
        registry: Arc::new(registry::Registry::default()),
        signal: drain.signal(),
        sessions: Arc::new(tokio::sync::Semaphore::new(config.max_connections)),
        pending: pending::Pending::new(config.max_pending_handshakes, usize::MAX),
        revocations: Arc::new(revocation::Revocations::default()),
        store: Arc::clone(&store),
        logout_jtis: admin::SeenLogoutTokens::default(),
        limits: Arc::new(limits::SubjectLimits::new(
            config.limits.clone(),
            Arc::clone(&store),
            Arc::clone(&metrics),
        )),
        pools,
        handshake_budget: config.handshake_budget.map(budget::HandshakeBudget::new),
    });
    {
        let limits = Arc::clone(&gw.limits);
        store.on_evict(Arc::new(move |e| {
            limits.on_eviction(e);
        }));
        tokio::spawn(Arc::clone(&gw.limits).renew());
    }
    {
        let gw = Arc::clone(&gw);
        let apply: store::Apply = Arc::new(move |rev| {
            gw.apply_revocation(&rev, "peer");
        });
        tokio::spawn(Arc::clone(&store).run(apply));
    }
    {
        // Expired revocations are forgotten once a minute.
        let revocations = Arc::clone(&gw.revocations);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                revocations.purge(auth::jwt::unix_now());
            }
        });
    }
    let extras = Arc::new(admin::Extras {
        json: dev_setup
            .as_ref()
            .and_then(|d| d.jwks.clone())
            .into_iter()
            .collect(),
    });
    tokio::spawn(memory::give_back(Arc::clone(&gw)));
    tokio::spawn(admin::serve(admin, Arc::clone(&gw), extras));
    tokio::spawn(Arc::clone(&cache).run());
    if let Some(cert) = &cert {
        let m = Arc::clone(&metrics);
        let c = Arc::clone(cert);
        tokio::spawn(Arc::clone(cert).watch(Duration::from_secs(2), move |r| {
            report_reload(&m, &c, r, "file_change")
        }));
    }
    tokio::spawn(server::serve(listener, Arc::clone(&gw), drain.guards()));

    tracing::info!(event = "started", listen = %config.listen, admin = %config.admin_listen, tls = cert.is_some(),
        routes = config.routes.len(), max_connections = config.max_connections, state_store = config.store.kind(),
        version = env!("CARGO_PKG_VERSION"), "ws-gateway started");
    if let Some(setup) = &dev_setup {
        eprintln!("{}", dev::banner(&config, setup));
    }

    while let Some(Trigger::Reload) = triggers.recv().await {
        if let Some(cert) = &cert {
            report_reload(&metrics, cert, cert.reload(), "sighup");
        }
    }
    metrics.draining.set(1);
    tracing::info!(
        event = "drain_started",
        grace_seconds = config.timeouts.drain.as_secs(),
        sessions = gw.registry.len(),
        "signal received: readiness is 503, listener closing, sessions draining"
    );
    let close_grace = config.timeouts.write.min(Duration::from_secs(5)) + Duration::from_secs(1);
    let second_shutdown = async {
        loop {
            match triggers.recv().await {
                Some(Trigger::Shutdown) => return,
                Some(Trigger::Reload) => {}
                // Nobody can ask any more: let the drain finish.
                None => std::future::pending::<()>().await,
            }
        }
    };
    let exit = tokio::select! {
        done = drain.run(config.timeouts.drain, config.timeouts.drain_spread, close_grace) => if done { Exit::Drained } else { Exit::DeadlinePassed },
        () = second_shutdown => Exit::Forced,
    };
    tracing::info!(event = "stopped", outcome = ?exit, sessions = gw.registry.len(), "ws-gateway stopped");
    Ok(exit)
}

fn report_reload(
    metrics: &metrics::Metrics,
    cert: &tls::ReloadableCert,
    result: Result<bool, tls::TlsError>,
    trigger: &'static str,
) {
    match result {
        Ok(true) => {
            let now = auth::jwt::unix_now();
            let problem = match cert.leaf_validity() {
                Some((not_before, _)) if now < not_before => Some("not_yet_valid"),
                Some((_, not_after)) if now > not_after => Some("expired"),
                Some(_) => None,
                None => Some("unreadable_validity"),
            };
            if let Some(problem) = problem {
                metrics
                    .cert_warnings
                    .get_or_create(&[("kind", problem)])
                    .inc();
                tracing::warn!(event = "cert_reload_warning", trigger, problem,
                    "the reloaded certificate is served, but clients will refuse it: check its validity period");
            }
            let uncovered = cert.uncovered_names();
            if !uncovered.is_empty() {
                metrics
                    .cert_warnings
                    .get_or_create(&[("kind", "names_not_covered")])
                    .inc();
                let names: Vec<&str> = uncovered.iter().take(10).map(String::as_str).collect();
                tracing::warn!(event = "cert_reload_warning", trigger, problem = "names_not_covered",
                    names = %names.join(","), missing = uncovered.len(),
                    "the reloaded certificate does not cover names the gateway served at start: clients using them will refuse it");
            }
            metrics
                .cert_reloads
                .get_or_create(&[("result", "ok")])
                .inc();
            tracing::info!(
                event = "cert_reloaded",
                trigger,
                "certificate reloaded; new handshakes use it"
            );
        }
        Ok(false) => {}
        Err(error) => {
            metrics
                .cert_reloads
                .get_or_create(&[("result", "error")])
                .inc();
            tracing::error!(event = "cert_reload_failed", trigger, %error, "certificate reload failed; keeping the current certificate");
        }
    }
}
