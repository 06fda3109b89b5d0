//! Redis: each revocation is a key with a TTL (`ws-gateway:revocation:<kind>:<value>`, the JSON of the
//! revocation), published on `ws-gateway:revocations`. One subscription per process. The Go gateway's channel
//! `ws:revocations:<sub>:<jti>` (payload `1`) is published whenever both are known and honoured when another
//! publisher uses it, so a mixed Go/Rust fleet kicks sessions both ways during a migration.

use futures_util::StreamExt;
use redis::AsyncCommands;

use super::{parse_peer, Apply, LeaseGrant, Store};
use crate::auth::jwt::unix_now;
use crate::revocation::{Revocation, Target};

/// The channel this gateway publishes every revocation on.
pub(crate) const CHANNEL: &str = "ws-gateway:revocations";
/// The Go gateway's channel prefix: `ws:revocations:<sub>:<jti>`.
pub(crate) const GO_PREFIX: &str = "ws:revocations:";
const KEY_PREFIX: &str = "ws-gateway:revocation:";
/// The channel evictions (`SESSION_LIMIT_POLICY=evict-oldest`) travel on.
pub(crate) const EVICT_CHANNEL: &str = "ws-gateway:evictions";
const BUCKET_PREFIX: &str = "ws-gateway:rate:";
const LEASE_PREFIX: &str = "ws-gateway:leases:";

/// One token from a bucket, on the server's clock. KEYS[1] the bucket (a hash: tokens, at); ARGV rate per second,
/// burst. Returns 0 when a token was taken, else the milliseconds until one is available.
const RATE_TAKE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(b[1])
local at = tonumber(b[2])
if tokens == nil or at == nil then
  tokens = burst
  at = now
end
if now > at then
  tokens = math.min(burst, tokens + (now - at) * rate / 1000)
  at = now
end
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = math.ceil((1 - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', at)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return wait
";

/// One more lease, on the server's clock. KEYS[1] the key's leases (a sorted set: member -> expiry in ms); ARGV
/// the member's prefix, the lease in ms, the most leases, evict (1) or not (0). Members are
/// `<replica>/<n>/<start ms>`. Returns {} when full and not evicting, else {member, evicted...}.
const LEASE_ACQUIRE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
local max = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local n = redis.call('ZCARD', KEYS[1])
local out = {ARGV[1] .. '/' .. now}
if n >= max then
  if ARGV[4] ~= '1' then
    return {}
  end
  local members = redis.call('ZRANGE', KEYS[1], 0, -1)
  local function started(m)
    return tonumber(string.match(m, '/(%d+)$')) or 0
  end
  table.sort(members, function(a, b) return started(a) < started(b) end)
  for i = 1, n - max + 1 do
    redis.call('ZREM', KEYS[1], members[i])
    out[#out + 1] = members[i]
  end
end
redis.call('ZADD', KEYS[1], now + lease, out[1])
redis.call('PEXPIRE', KEYS[1], lease * 2)
return out
";

/// Extends leases that still exist. KEYS the lease sets; ARGV[1] the lease in ms, then one member per key.
const LEASE_RENEW: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
for i, k in ipairs(KEYS) do
  redis.call('ZADD', k, 'XX', now + lease, ARGV[i + 1])
  redis.call('PEXPIRE', k, lease * 2)
end
return 0
";

/// Deadline of one limits command.
const LIMIT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(1);

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

    /// Runs one command under [`LIMIT_DEADLINE`]; a failure drops the connection so the next call reconnects.
    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, String> {
        let mut conn = self.connection().await?;
        match tokio::time::timeout(LIMIT_DEADLINE, cmd.query_async::<T>(&mut conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                *self.conn.lock().await = None;
                Err(e.to_string())
            }
            Err(_) => {
                *self.conn.lock().await = None;
                Err("command timed out".into())
            }
        }
    }

    pub(crate) async fn rate_take(&self, key: &str, rate: f64, burst: u32) -> Result<u64, String> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(RATE_TAKE)
            .arg(1)
            .arg(format!("{BUCKET_PREFIX}{key}"))
            .arg(rate.to_string())
            .arg(burst);
        let wait: i64 = self.query(&cmd).await?;
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
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(LEASE_ACQUIRE)
            .arg(1)
            .arg(format!("{LEASE_PREFIX}{key}"))
            .arg(prefix)
            .arg(lease_ms)
            .arg(max)
            .arg(if evict { "1" } else { "0" });
        let out: Vec<String> = self.query(&cmd).await?;
        Ok(LeaseGrant::from_reply(out))
    }

    pub(crate) async fn lease_renew(
        &self,
        leases: &[(String, String)],
        lease_ms: i64,
    ) -> Result<(), String> {
        if leases.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(LEASE_RENEW).arg(leases.len());
        for (key, _) in leases {
            cmd.arg(format!("{LEASE_PREFIX}{key}"));
        }
        cmd.arg(lease_ms);
        for (_, member) in leases {
            cmd.arg(member);
        }
        self.query::<i64>(&cmd).await.map(|_| ())
    }

    pub(crate) async fn lease_release(&self, key: &str, member: &str) -> Result<(), String> {
        let mut cmd = redis::cmd("ZREM");
        cmd.arg(format!("{LEASE_PREFIX}{key}")).arg(member);
        self.query::<i64>(&cmd).await.map(|_| ())
    }

    pub(crate) async fn publish_eviction(&self, json: &str) -> Result<(), String> {
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(EVICT_CHANNEL).arg(json);
        self.query::<i64>(&cmd).await.map(|_| ())
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
            || pubsub.subscribe(EVICT_CHANNEL).await.is_err()
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
                    } else if channel == EVICT_CHANNEL {
                        store.hear_eviction(payload);
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
