//! The admin listener: `/healthz` (liveness), `/readyz` (readiness: keys loaded and not draining) and `/metrics`
//! (OpenMetrics text). In `--dev` it also serves the dev JWKS. Off the data path; one request per connection.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

use crate::pending::Pending;
use crate::server::Gateway;
use crate::upgrade::{read_head, ReadHead, Response};

/// Largest admin request head.
const MAX_HEAD: usize = 8 * 1024;
/// Admin connections waiting for their request head at once; beyond it the oldest is closed, so a flood of idle
/// sockets cannot starve the probes (200 idle sockets used to make every `/healthz` time out).
const MAX_PENDING: usize = 64;
/// Of those, the most from one address: a flooding peer evicts its own sockets, not the kubelet's.
const MAX_PENDING_PER_PEER: usize = 8;
/// Time allowed for the request head, and for writing the answer.
const DEADLINE: Duration = Duration::from_secs(3);

/// Extra documents served by the admin listener (the dev JWKS).
#[derive(Debug, Clone, Default)]
pub struct Extras {
    /// `(path, JSON body)` pairs.
    pub json: Vec<(String, String)>,
}

/// Serves the admin endpoints until the process exits (it stays up while draining, so probes see 503).
pub async fn serve(listener: TcpListener, gw: Arc<Gateway>, extras: Arc<Extras>) {
    let pending = Pending::new(MAX_PENDING, MAX_PENDING_PER_PEER);
    loop {
        let (mut tcp, peer) = match listener.accept().await {
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
        let gw = Arc::clone(&gw);
        let extras = Arc::clone(&extras);
        tokio::spawn(async move {
            let read = tokio::time::timeout(DEADLINE, read_head(&mut tcp, MAX_HEAD));
            let head = tokio::select! {
                r = read => r,
                () = ticket.evicted() => return,
            };
            drop(ticket);
            let head = match head {
                Ok(Ok(Ok(ReadHead::Complete(head, _)))) => head,
                Ok(Ok(Err(e))) => {
                    let _ = tokio::time::timeout(DEADLINE, e.response().send(&mut tcp)).await;
                    return;
                }
                _ => return,
            };
            let (status, content_type, body) = answer(&gw, &extras, &head.method, head.path());
            let bytes = Response::new(status, body).to_bytes(content_type);
            let _ = tokio::time::timeout(DEADLINE, async {
                tcp.write_all(&bytes).await?;
                tcp.shutdown().await
            })
            .await;
        });
    }
}

fn answer(gw: &Gateway, extras: &Extras, method: &str, path: &str) -> (u16, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    if method != "GET" && method != "HEAD" {
        return (405, TEXT, "method not allowed".into());
    }
    match path {
        "/healthz" => (200, TEXT, "ok".into()),
        "/readyz" => {
            if gw.is_ready() {
                (200, TEXT, "ready".into())
            } else if !gw.verifier.keys().is_ready() {
                (503, TEXT, "not ready: signing keys not loaded".into())
            } else {
                (503, TEXT, "not ready: draining".into())
            }
        }
        "/metrics" => {
            if let Some(age) = gw.verifier.keys().age_seconds() {
                gw.metrics.jwks_key_age.set(age);
            }
            (
                200,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                gw.metrics.encode(),
            )
        }
        other => match extras.json.iter().find(|(p, _)| p == other) {
            Some((_, body)) => (200, "application/json", body.clone()),
            None => (404, TEXT, "not found".into()),
        },
    }
}
