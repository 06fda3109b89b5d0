//! The admin listener: `/healthz` (liveness), `/readyz` (readiness: keys loaded and not draining) and `/metrics`
//! (OpenMetrics text). In `--dev` it also serves the dev JWKS. Off the data path; one request per connection.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

use crate::server::Gateway;
use crate::upgrade::{read_head, ReadHead, Response};

/// Largest admin request head.
const MAX_HEAD: usize = 8 * 1024;
/// Admin connections served at once; more wait in the backlog, so a flood of scrapes cannot exhaust descriptors.
const MAX_CONNECTIONS: usize = 64;

/// Extra documents served by the admin listener (the dev JWKS).
#[derive(Debug, Clone, Default)]
pub struct Extras {
    /// `(path, JSON body)` pairs.
    pub json: Vec<(String, String)>,
}

/// Serves the admin endpoints until the process exits (it stays up while draining, so probes see 503).
pub async fn serve(listener: TcpListener, gw: Arc<Gateway>, extras: Arc<Extras>) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            return;
        };
        let (mut tcp, _) = match listener.accept().await {
            Ok(c) => c,
            Err(error) => {
                tracing::warn!(event = "admin_accept_failed", %error, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let gw = Arc::clone(&gw);
        let extras = Arc::clone(&extras);
        tokio::spawn(async move {
            let head =
                match tokio::time::timeout(Duration::from_secs(5), read_head(&mut tcp, MAX_HEAD))
                    .await
                {
                    Ok(Ok(Ok(ReadHead::Complete(head, _)))) => head,
                    Ok(Ok(Err(e))) => {
                        let _ = e.response().send(&mut tcp).await;
                        return;
                    }
                    _ => return,
                };
            let (status, content_type, body) = answer(&gw, &extras, &head.method, head.path());
            let resp = Response::new(status, body);
            let _ = tcp.write_all(&resp.to_bytes(content_type)).await;
            let _ = tcp.shutdown().await;
            drop(permit);
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
