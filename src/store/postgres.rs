//! PostgreSQL: one table, created at start if missing (an idempotent migration inside the binary), indexed on
//! expiry and purged of expired rows every minute; fan-out through `LISTEN`/`NOTIFY` on `ws_gateway_revocations`;
//! a replica that starts (or reconnects) later loads the active rows.

use std::sync::Arc;
use std::time::Duration;

use super::{parse_peer, Apply, Store};
use crate::auth::jwt::unix_now;
use crate::revocation::Revocation;

const CHANNEL: &str = "ws_gateway_revocations";

const MIGRATION: &str = "
CREATE TABLE IF NOT EXISTS ws_gateway_revocations (
    kind text NOT NULL,
    value text NOT NULL,
    at bigint NOT NULL,
    expires_at bigint NOT NULL,
    PRIMARY KEY (kind, value)
);
CREATE INDEX IF NOT EXISTS ws_gateway_revocations_expires_at ON ws_gateway_revocations (expires_at);
";

const UPSERT: &str = "
INSERT INTO ws_gateway_revocations (kind, value, at, expires_at) VALUES ($1, $2, $3, $4)
ON CONFLICT (kind, value) DO UPDATE
SET at = GREATEST(ws_gateway_revocations.at, EXCLUDED.at),
    expires_at = GREATEST(ws_gateway_revocations.expires_at, EXCLUDED.expires_at)";

pub(crate) struct PgStore {
    config: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    client: tokio::sync::Mutex<Option<Arc<tokio_postgres::Client>>>,
}

impl PgStore {
    pub(crate) fn new(dsn: &str) -> Result<PgStore, String> {
        let config: tokio_postgres::Config = dsn
            .parse()
            .map_err(|_| "POSTGRES_DSN: not a valid connection string".to_owned())?;
        let tls = crate::tls::client_config(None)?;
        Ok(PgStore {
            config,
            tls: tokio_postgres_rustls::MakeRustlsConnect::new((*tls).clone()),
            client: tokio::sync::Mutex::new(None),
        })
    }

    pub(crate) async fn publish(&self, rev: &Revocation) -> Result<(), String> {
        let client = self.client.lock().await.clone().ok_or("not connected")?;
        let json = serde_json::to_string(rev).map_err(|e| e.to_string())?;
        let write = async {
            client
                .execute(
                    UPSERT,
                    &[
                        &rev.target.kind(),
                        &rev.target.value(),
                        &rev.at,
                        &rev.expires_at,
                    ],
                )
                .await?;
            client
                .execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &json])
                .await
        };
        match tokio::time::timeout(Duration::from_secs(2), write).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("write timed out".into()),
        }
    }

    /// One connection with `LISTEN` until it breaks; `true` if it was established.
    pub(crate) async fn listen(&self, store: &Store, apply: &Apply) -> bool {
        let connect = tokio::time::timeout(
            Duration::from_secs(5),
            self.config.connect(self.tls.clone()),
        );
        let (client, mut connection) = match connect.await {
            Ok(Ok(c)) => c,
            Ok(Err(error)) => {
                tracing::debug!(event = "store_connect_failed", store = "postgres", %error);
                return false;
            }
            Err(_) => return false,
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let driver = tokio::spawn(async move {
            loop {
                let msg = std::future::poll_fn(|cx| connection.poll_message(cx)).await;
                match msg {
                    Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                        if tx.send(n.payload().to_owned()).is_err() {
                            return;
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return,
                }
            }
        });
        let client = Arc::new(client);
        let ready = async {
            client.batch_execute(MIGRATION).await?;
            client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
            let rows = client
                .query(
                    "SELECT kind, value, at, expires_at FROM ws_gateway_revocations WHERE expires_at > $1",
                    &[&unix_now()],
                )
                .await?;
            Ok::<_, tokio_postgres::Error>(rows)
        };
        match ready.await {
            Ok(rows) => {
                for row in rows {
                    // try_get: a table of the same name with other column types must not panic the process.
                    let (Ok(kind), Ok(value), Ok(at), Ok(expires_at)) = (
                        row.try_get::<_, String>(0),
                        row.try_get::<_, String>(1),
                        row.try_get::<_, i64>(2),
                        row.try_get::<_, i64>(3),
                    ) else {
                        continue;
                    };
                    let json = serde_json::json!({"kind": kind, "value": value, "at": at, "expires_at": expires_at});
                    if let Some(rev) = parse_peer(json.to_string().as_bytes()) {
                        apply(rev);
                    }
                }
            }
            Err(error) => {
                tracing::warn!(event = "store_reload_failed", store = "postgres", %error);
                driver.abort();
                return true;
            }
        }
        *self.client.lock().await = Some(Arc::clone(&client));
        store.connected().await;
        let mut purge = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                payload = rx.recv() => match payload {
                    Some(p) => {
                        if let Some(rev) = parse_peer(p.as_bytes()) {
                            apply(rev);
                        }
                    }
                    None => break,
                },
                _ = purge.tick() => {
                    let _ = client
                        .execute("DELETE FROM ws_gateway_revocations WHERE expires_at < $1", &[&unix_now()])
                        .await;
                }
            }
        }
        *self.client.lock().await = None;
        driver.abort();
        true
    }
}
