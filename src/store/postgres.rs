//! PostgreSQL: one table, created at start if missing (an idempotent migration inside the binary), indexed on
//! expiry and purged of expired rows every minute; fan-out through `LISTEN`/`NOTIFY` on `ws_gateway_revocations`;
//! a replica that starts (or reconnects) later loads the active rows.

use std::sync::Arc;
use std::time::Duration;

use super::{parse_peer, Apply, LeaseGrant, Store};
use crate::auth::jwt::unix_now;
use crate::revocation::Revocation;

const CHANNEL: &str = "ws_gateway_revocations";

/// The channel evictions (`SESSION_LIMIT_POLICY=evict-oldest`) travel on.
const EVICT_CHANNEL: &str = "ws_gateway_evictions";

/// Idempotent, and serialised by an advisory lock so replicas starting together do not race on the catalog.
const MIGRATION: &str = "
BEGIN;
SELECT pg_advisory_xact_lock(7262006);
CREATE TABLE IF NOT EXISTS ws_gateway_revocations (
    kind text NOT NULL,
    value text NOT NULL,
    at bigint NOT NULL,
    expires_at bigint NOT NULL,
    PRIMARY KEY (kind, value)
);
CREATE INDEX IF NOT EXISTS ws_gateway_revocations_expires_at ON ws_gateway_revocations (expires_at);
CREATE TABLE IF NOT EXISTS ws_gateway_buckets (
    key text PRIMARY KEY,
    tokens double precision NOT NULL,
    at bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS ws_gateway_leases (
    key text NOT NULL,
    member text NOT NULL,
    started bigint NOT NULL,
    expires_at bigint NOT NULL,
    PRIMARY KEY (key, member)
);
CREATE INDEX IF NOT EXISTS ws_gateway_leases_expires_at ON ws_gateway_leases (expires_at);
-- One token from a bucket on the server's clock: 0 when taken, else the milliseconds until one is available.
CREATE OR REPLACE FUNCTION ws_gateway_rate_take(k text, rate double precision, burst double precision)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    now_ms bigint := (extract(epoch FROM clock_timestamp()) * 1000)::bigint;
    t double precision;
    a bigint;
    wait bigint := 0;
BEGIN
    INSERT INTO ws_gateway_buckets (key, tokens, at) VALUES (k, burst, now_ms) ON CONFLICT (key) DO NOTHING;
    SELECT tokens, at INTO t, a FROM ws_gateway_buckets WHERE key = k FOR UPDATE;
    IF now_ms > a THEN
        t := LEAST(burst, t + (now_ms - a) * rate / 1000.0);
        a := now_ms;
    END IF;
    IF t >= 1 THEN
        t := t - 1;
    ELSE
        wait := ceil((1 - t) * 1000.0 / rate);
    END IF;
    UPDATE ws_gateway_buckets SET tokens = t, at = a WHERE key = k;
    RETURN wait;
END $$;
-- One more lease of k named prefix/<start ms>: NULL when max are held and evict is off, else the new member
-- followed by the members evicted (oldest first) to make room.
CREATE OR REPLACE FUNCTION ws_gateway_lease_acquire(k text, prefix text, lease_ms bigint, max_n bigint, evict boolean)
RETURNS text[] LANGUAGE plpgsql AS $$
DECLARE
    now_ms bigint := (extract(epoch FROM clock_timestamp()) * 1000)::bigint;
    n bigint;
    victims text[] := '{}';
    m text := prefix || '/' || now_ms;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('ws_gateway_lease:' || k, 0));
    DELETE FROM ws_gateway_leases WHERE key = k AND expires_at <= now_ms;
    SELECT count(*) INTO n FROM ws_gateway_leases WHERE key = k;
    IF n >= max_n THEN
        IF NOT evict THEN
            RETURN NULL;
        END IF;
        SELECT coalesce(array_agg(member ORDER BY started, member), '{}') INTO victims FROM (
            SELECT member, started FROM ws_gateway_leases WHERE key = k ORDER BY started, member LIMIT n - max_n + 1
        ) v;
        DELETE FROM ws_gateway_leases WHERE key = k AND member = ANY(victims);
    END IF;
    INSERT INTO ws_gateway_leases (key, member, started, expires_at) VALUES (k, m, now_ms, now_ms + lease_ms);
    RETURN array_prepend(m, victims);
END $$;
COMMIT;
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

    /// Runs one limits statement under a deadline.
    async fn limit_query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, String> {
        let client = self.client.lock().await.clone().ok_or("not connected")?;
        match tokio::time::timeout(Duration::from_secs(1), client.query(sql, params)).await {
            Ok(Ok(rows)) => Ok(rows),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("statement timed out".into()),
        }
    }

    pub(crate) async fn rate_take(&self, key: &str, rate: f64, burst: u32) -> Result<u64, String> {
        let rows = self
            .limit_query(
                "SELECT ws_gateway_rate_take($1, $2, $3)",
                &[&key, &rate, &f64::from(burst)],
            )
            .await?;
        let wait = rows
            .first()
            .and_then(|r| r.try_get::<_, i64>(0).ok())
            .ok_or("no answer")?;
        Ok(u64::try_from(wait).unwrap_or(0))
    }

    pub(crate) async fn lease_acquire(
        &self,
        key: &str,
        prefix: &str,
        lease_ms: i64,
        max: u32,
        evict: bool,
    ) -> Result<Option<LeaseGrant>, String> {
        let rows = self
            .limit_query(
                "SELECT ws_gateway_lease_acquire($1, $2, $3, $4, $5)",
                &[&key, &prefix, &lease_ms, &i64::from(max), &evict],
            )
            .await?;
        let row = rows.first().ok_or("no answer")?;
        let out: Option<Vec<String>> = row.try_get(0).map_err(|e| e.to_string())?;
        Ok(out.and_then(LeaseGrant::from_reply))
    }

    pub(crate) async fn lease_renew(
        &self,
        leases: &[(String, String)],
        lease_ms: i64,
    ) -> Result<(), String> {
        let keys: Vec<&str> = leases.iter().map(|(k, _)| k.as_str()).collect();
        let members: Vec<&str> = leases.iter().map(|(_, m)| m.as_str()).collect();
        self.limit_query(
            "UPDATE ws_gateway_leases l SET expires_at = (extract(epoch FROM clock_timestamp()) * 1000)::bigint + $3 \
             FROM unnest($1::text[], $2::text[]) AS r(key, member) WHERE l.key = r.key AND l.member = r.member",
            &[&keys, &members, &lease_ms],
        )
        .await
        .map(|_| ())
    }

    pub(crate) async fn lease_release(&self, key: &str, member: &str) -> Result<(), String> {
        self.limit_query(
            "DELETE FROM ws_gateway_leases WHERE key = $1 AND member = $2",
            &[&key, &member],
        )
        .await
        .map(|_| ())
    }

    pub(crate) async fn publish_eviction(&self, json: &str) -> Result<(), String> {
        self.limit_query("SELECT pg_notify($1, $2)", &[&EVICT_CHANNEL, &json])
            .await
            .map(|_| ())
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
                        let evict = n.channel() == EVICT_CHANNEL;
                        if tx.send((evict, n.payload().to_owned())).is_err() {
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
            client
                .batch_execute(&format!("LISTEN {CHANNEL}; LISTEN {EVICT_CHANNEL}"))
                .await?;
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
                    Some((true, p)) => store.hear_eviction(p.as_bytes()),
                    Some((false, p)) => {
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
                    // Leases of replicas that died, and buckets untouched for an hour (full again by then for
                    // any rate above 1/3600 per second).
                    let _ = client
                        .batch_execute(
                            "DELETE FROM ws_gateway_leases WHERE expires_at < (extract(epoch FROM clock_timestamp()) * 1000)::bigint; \
                             DELETE FROM ws_gateway_buckets WHERE at < (extract(epoch FROM clock_timestamp()) * 1000)::bigint - 3600000",
                        )
                        .await;
                }
            }
        }
        *self.client.lock().await = None;
        driver.abort();
        true
    }
}
