//! The admin listener: `/healthz` (liveness), `/readyz` (readiness: keys loaded and not draining) and `/metrics`
//! (OpenMetrics text), open to anyone who reaches the port; the authenticated admin API and OIDC back-channel
//! logout ([`api`]). Served by hyper. In `--dev` it also serves the dev JWKS. Off the data path; one request per
//! connection.
//!
//! Connections are accepted at once and registered in a [`Pending`] set until their request head arrives: beyond
//! [`MAX_PENDING`] waiting connections, or [`MAX_PENDING_PER_PEER`] from one address, the oldest waiting one is
//! closed. A flood of idle sockets then evicts itself instead of starving the kubelet's probes (a waiting
//! semaphore let 200 idle sockets make every `/healthz` time out).

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

mod api;

pub(crate) use api::SeenLogoutTokens;

use crate::pending::Pending;
use crate::server::Gateway;

/// Admin connections waiting for their request head at once; beyond it the oldest is closed.
const MAX_PENDING: usize = 64;
/// Of those, the most from one address: a flooding peer evicts its own sockets, not the kubelet's.
const MAX_PENDING_PER_PEER: usize = 8;
/// Time allowed for the request head.
const HEAD_DEADLINE: Duration = Duration::from_secs(3);
/// Time allowed for a whole connection, answer included (a scraper that stops reading is cut off).
const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);

const TEXT: &str = "text/plain; charset=utf-8";

/// Extra documents served by the admin listener (the dev JWKS).
#[derive(Debug, Clone, Default)]
pub(crate) struct Extras {
    /// `(path, JSON body)` pairs.
    pub json: Vec<(String, String)>,
}

/// Serves the admin endpoints until the process exits (it stays up while draining, so probes see 503).
pub(crate) async fn serve(listener: TcpListener, gw: Arc<Gateway>, extras: Arc<Extras>) {
    let pending = Pending::new(MAX_PENDING, MAX_PENDING_PER_PEER);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(error) => {
                tracing::warn!(event = "admin_accept_failed", %error, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (ticket, evicted) = pending.admit(peer.ip());
        if evicted > 0 {
            gw.metrics
                .evictions
                .get_or_create(&[("listener", "admin")])
                .inc_by(evicted as u64);
        }
        let eviction = ticket.eviction();
        // Dropped when the request head has arrived: the connection has earned its place.
        let ticket = Arc::new(Mutex::new(Some(ticket)));
        let gw = Arc::clone(&gw);
        let extras = Arc::clone(&extras);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                if let Ok(mut t) = ticket.lock() {
                    t.take();
                }
                let gw = Arc::clone(&gw);
                let extras = Arc::clone(&extras);
                async move {
                    let resp = if api::handles(req.uri().path()) {
                        api::serve(gw, req).await
                    } else {
                        answer(&gw, &extras, req.method(), req.uri().path())
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_DEADLINE)
                .keep_alive(false)
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(tcp), service);
            tokio::select! {
                _ = tokio::time::timeout(CONNECTION_DEADLINE, conn) => {}
                () = eviction.notified() => {}
            }
        });
    }
}

fn response(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn answer(gw: &Gateway, extras: &Extras, method: &Method, path: &str) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        let mut resp = response(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "method not allowed\n".into(),
        );
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    match path {
        "/healthz" => response(StatusCode::OK, TEXT, "ok\n".into()),
        "/readyz" => {
            if gw.is_ready() {
                response(StatusCode::OK, TEXT, "ready\n".into())
            } else if !gw.verifier.keys().is_ready() {
                response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT,
                    "not ready: signing keys not loaded\n".into(),
                )
            } else if let Some(route) = gw.unhealthy_route() {
                response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT,
                    format!("not ready: no healthy upstream endpoint for route {route}\n"),
                )
            } else {
                response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT,
                    "not ready: draining\n".into(),
                )
            }
        }
        "/metrics" => {
            if let Some(age) = gw.verifier.keys().age_seconds() {
                gw.metrics.jwks_key_age.set(age);
            }
            let now = tokio::time::Instant::now();
            for pool in &gw.pools {
                pool.publish_health(now);
            }
            response(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                gw.metrics.encode(),
            )
        }
        other => match extras.json.iter().find(|(p, _)| p == other) {
            Some((_, body)) => response(StatusCode::OK, "application/json", body.clone()),
            None => response(StatusCode::NOT_FOUND, TEXT, "not found\n".into()),
        },
    }
}
