//! Redis: each revocation is a key with a TTL (`ws-gateway:revocation:<kind>:<value>`, the JSON of the
//! revocation), published on `ws-gateway:revocations`. One subscription per process. The Go gateway's channel
//! `ws:revocations:<sub>:<jti>` (payload `1`) is published whenever both are known and honoured when another
//! publisher uses it, so a mixed Go/Rust fleet kicks sessions both ways during a migration.

use futures_util::StreamExt;
use redis::AsyncCommands;

use super::{parse_peer, Apply, Store};
use crate::auth::jwt::unix_now;
use crate::revocation::{Revocation, Target};

/// The channel this gateway publishes every revocation on.
pub(crate) const CHANNEL: &str = "ws-gateway:revocations";
/// The Go gateway's channel prefix: `ws:revocations:<sub>:<jti>`.
pub(crate) const GO_PREFIX: &str = "ws:revocations:";
const KEY_PREFIX: &str = "ws-gateway:revocation:";

pub(crate) struct RedisStore {
    client: redis::Client,
    conn: tokio::sync::Mutex<Option<redis::aio::MultiplexedConnection>>,
}

impl RedisStore {
    pub(crate) fn new(url: &str) -> Result<RedisStore, String> {
        let client = redis::Client::open(url).map_err(|e| format!("REDIS_URL: {:?}", e.kind()))?;
        Ok(RedisStore {
            client,
            conn: tokio::sync::Mutex::new(None),
        })
    }

    async fn connection(&self) -> Result<redis::aio::MultiplexedConnection, String> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            self.client.get_multiplexed_async_connection(),
        )
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| e.to_string())?;
        *slot = Some(c.clone());
        Ok(c)
    }

    pub(crate) async fn publish(&self, rev: &Revocation) -> Result<(), String> {
        let mut conn = self.connection().await?;
        let json = serde_json::to_string(rev).map_err(|e| e.to_string())?;
        let ttl = u64::try_from(rev.expires_at - unix_now())
            .unwrap_or(0)
            .max(1);
        let key = format!("{KEY_PREFIX}{}:{}", rev.target.kind(), rev.target.value());
        let mut pipe = redis::pipe();
        pipe.set_ex(&key, &json, ttl)
            .ignore()
            .publish(CHANNEL, &json)
            .ignore();
        let result = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            pipe.query_async::<()>(&mut conn),
        )
        .await;
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                *self.conn.lock().await = None;
                Err(e.to_string())
            }
            Err(_) => {
                *self.conn.lock().await = None;
                Err("write timed out".into())
            }
        }
    }

    /// Publishes on the Go gateway's channel too (a `jti` revocation that also names its subject).
    pub(crate) async fn publish_go(&self, sub: &str, jti: &str) -> Result<(), String> {
        let mut conn = self.connection().await?;
        let sent = conn
            .publish::<_, _, ()>(format!("{GO_PREFIX}{sub}:{jti}"), "1")
            .await;
        if sent.is_err() {
            *self.conn.lock().await = None;
        }
        sent.map_err(|e| e.to_string())
    }

    /// One subscription until it breaks; `true` if it was established.
    pub(crate) async fn listen(&self, store: &Store, apply: &Apply) -> bool {
        let mut pubsub = match self.client.get_async_pubsub().await {
            Ok(p) => p,
            Err(error) => {
                tracing::debug!(event = "store_connect_failed", store = "redis", %error);
                return false;
            }
        };
        if pubsub.subscribe(CHANNEL).await.is_err()
            || pubsub.psubscribe(format!("{GO_PREFIX}*")).await.is_err()
        {
            return false;
        }
        // Subscribed first, then reloaded: nothing published in between is missed.
        if let Err(error) = self.reload(apply).await {
            // The command connection may be the one that broke: the next attempt opens a new one.
            *self.conn.lock().await = None;
            tracing::warn!(event = "store_reload_failed", store = "redis", %error);
            return false;
        }
        store.connected().await;
        let mut messages = pubsub.on_message();
        // A dead server does not always end the message stream: a ping every second notices it.
        let mut health = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tokio::select! {
                msg = messages.next() => {
                    let Some(msg) = msg else { return true };
                    let channel = msg.get_channel_name().to_owned();
                    let payload = msg.get_payload_bytes();
                    if channel == CHANNEL {
                        if let Some(rev) = parse_peer(payload) {
                            apply(rev);
                        }
                    } else if let Some(rev) = go_revocation(&channel, store) {
                        apply(rev);
                    }
                }
                _ = health.tick() => {
                    if self.ping().await.is_err() {
                        return true;
                    }
                }
            }
        }
    }

    async fn ping(&self) -> Result<(), String> {
        let mut conn = self.connection().await?;
        let pong = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            redis::cmd("PING").query_async::<String>(&mut conn),
        )
        .await;
        match pong {
            Ok(Ok(_)) => Ok(()),
            _ => {
                *self.conn.lock().await = None;
                Err("ping failed".into())
            }
        }
    }

    async fn reload(&self, apply: &Apply) -> Result<(), String> {
        let mut conn = self.connection().await?;
        let mut keys: Vec<String> = Vec::new();
        {
            let mut iter = conn
                .scan_match::<_, String>(format!("{KEY_PREFIX}*"))
                .await
                .map_err(|e| e.to_string())?;
            while let Some(k) = iter.next_item().await {
                keys.push(k.map_err(|e| e.to_string())?);
                if keys.len() > crate::revocation::MAX_REVOCATIONS {
                    break;
                }
            }
        }
        for chunk in keys.chunks(500) {
            let values: Vec<Option<Vec<u8>>> = conn.mget(chunk).await.map_err(|e| e.to_string())?;
            for v in values.into_iter().flatten() {
                if let Some(rev) = parse_peer(&v) {
                    apply(rev);
                }
            }
        }
        Ok(())
    }
}

/// A revocation from the Go gateway's channel `ws:revocations:<sub>:<jti>`: the `jti` is revoked for the longest
/// time a revocation lasts (the Go format carries no expiry).
fn go_revocation(channel: &str, store: &Store) -> Option<Revocation> {
    let rest = channel.strip_prefix(GO_PREFIX)?;
    // The subject may contain ':'; the jti is after the last one.
    let (_sub, jti) = rest.rsplit_once(':')?;
    let now = unix_now();
    let rev = Revocation {
        target: Target::Jti(jti.to_owned()),
        at: now,
        expires_at: now.saturating_add(store.max_ttl),
    };
    rev.validate().ok().map(|()| rev)
}
