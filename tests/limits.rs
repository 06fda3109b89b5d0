//! Per-subject limits across replicas, against real Redis and PostgreSQL servers: one subject's rate shared by two
//! replicas (429 with Retry-After), the session cap shared by two replicas with the leases of a SIGKILLed replica
//! expiring, `evict-oldest` across replicas, and a store killed in the middle (limits fall back per process).

mod common;

use std::time::{Duration, Instant};

use common::stores::{Postgres, Redis};
use common::*;

/// A complete bearer upgrade for `sub`'s token; the response head.
async fn attempt(env: &Env, gw: &Gateway, token: &str) -> String {
    raw_head(
        &env.pki,
        gw.addr,
        &upgrade("/ws", &format!("Authorization: Bearer {token}\r\n")),
    )
    .await
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

async fn metric(gw: &Gateway, name: &str) -> f64 {
    let (_, body) = gw.admin_get("/metrics").await;
    body.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until the gateway has connected to its store (readiness does not wait for it: until then, and whenever
/// the store is unreachable, limits hold per process).
async fn store_up(gw: &Gateway) {
    within(async {
        while metric(gw, "ws_state_store_up").await != 1.0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

async fn replicas(env: &Env, flags: &[&str]) -> (Gateway, Gateway) {
    let a = env.gateway(flags).await;
    let b = env.gateway(flags).await;
    store_up(&a).await;
    store_up(&b).await;
    (a, b)
}

async fn rate_is_shared(store: &[&str]) {
    let env = Env::new().await;
    let mut flags = vec!["--rate-limit-per-second", "0.2", "--rate-limit-burst", "2"];
    flags.extend_from_slice(store);
    let (a, b) = replicas(&env, &flags).await;
    let alice = env.signer.valid("alice", 300);
    let _one = connect_bearer(&env.pki, &a, "/ws", &alice)
        .await
        .expect("first session, replica A");
    let _two = connect_bearer(&env.pki, &b, "/ws", &alice)
        .await
        .expect("second session, replica B");
    for gw in [&a, &b] {
        let head = attempt(&env, gw, &alice).await;
        assert_eq!(
            status_of(&head),
            429,
            "the third within a second, on either replica: {head}"
        );
        let retry: u64 = header(&head, "Retry-After")
            .and_then(|v| v.parse().ok())
            .expect("Retry-After in whole seconds");
        assert!((1..=5).contains(&retry), "Retry-After {retry}");
    }
    let bob = env.signer.valid("bob", 300);
    connect_bearer(&env.pki, &a, "/ws", &bob)
        .await
        .expect("another subject is unaffected");
    assert!(metric(&a, "ws_rate_limit_violations_total{kind=\"subject_rate\"}").await >= 1.0);
    assert_eq!(
        metric(&a, "ws_limit_fallbacks_total").await,
        0.0,
        "the store answered"
    );
}

#[tokio::test]
async fn two_replicas_share_one_subjects_rate_through_redis() {
    let redis = Redis::start().await;
    rate_is_shared(&["--redis-url", &redis.url]).await;
}

#[tokio::test]
async fn two_replicas_share_one_subjects_rate_through_postgres() {
    let pg = Postgres::start().await;
    rate_is_shared(&["--postgres-dsn", &pg.dsn]).await;
}

async fn cap_is_shared_and_dead_leases_expire(store: &[&str]) {
    let env = Env::new().await;
    let mut flags = vec![
        "--max-sessions-per-subject",
        "1",
        "--session-lease-seconds",
        "3",
    ];
    flags.extend_from_slice(store);
    let (a, b) = replicas(&env, &flags).await;
    let alice = env.signer.valid("alice", 300);
    let _held = connect_bearer(&env.pki, &a, "/ws", &alice)
        .await
        .expect("alice on replica A");
    let head = attempt(&env, &b, &alice).await;
    assert_eq!(
        status_of(&head),
        429,
        "a second session on replica B: {head}"
    );
    connect_bearer(&env.pki, &b, "/ws", &env.signer.valid("bob", 300))
        .await
        .expect("bob has his own cap");
    // Replica A dies without releasing its lease (SIGKILL).
    drop(a);
    let killed = Instant::now();
    let deadline = killed + Duration::from_secs(3) + Duration::from_secs(3);
    loop {
        match connect_bearer(&env.pki, &b, "/ws", &alice).await {
            Ok(_) => break,
            Err(status) => {
                assert_eq!(status, 429);
                assert!(
                    Instant::now() < deadline,
                    "alice still refused {:?} after the kill",
                    killed.elapsed()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let waited = killed.elapsed();
    assert!(
        waited <= Duration::from_secs(5),
        "the lease outlived SESSION_LEASE_SECONDS by {waited:?}"
    );
}

#[tokio::test]
async fn two_replicas_share_the_session_cap_through_redis_and_a_killed_replicas_lease_expires() {
    let redis = Redis::start().await;
    cap_is_shared_and_dead_leases_expire(&["--redis-url", &redis.url]).await;
}

#[tokio::test]
async fn two_replicas_share_the_session_cap_through_postgres_and_a_killed_replicas_lease_expires() {
    let pg = Postgres::start().await;
    cap_is_shared_and_dead_leases_expire(&["--postgres-dsn", &pg.dsn]).await;
}

async fn evicts_oldest_across_replicas(store: &[&str]) {
    let env = Env::new().await;
    let mut flags = vec![
        "--max-sessions-per-subject",
        "1",
        "--session-limit-policy",
        "evict-oldest",
    ];
    flags.extend_from_slice(store);
    let (a, b) = replicas(&env, &flags).await;
    let alice = env.signer.valid("alice", 300);
    let mut old = connect_bearer(&env.pki, &a, "/ws", &alice)
        .await
        .expect("alice on replica A");
    let _ = next_text(&mut old).await;
    let mut new = connect_bearer(&env.pki, &b, "/ws", &alice)
        .await
        .expect("the newer session is admitted on replica B");
    let (code, reason) = next_close(&mut old).await;
    assert_eq!((code, reason.as_str()), (1008, "session limit"));
    a.wait_log(&["session_end", "session_limit"]).await;
    assert!(
        next_text(&mut new).await.starts_with("hello from"),
        "the new session works"
    );
}

#[tokio::test]
async fn evict_oldest_closes_the_session_on_the_other_replica_through_redis() {
    let redis = Redis::start().await;
    evicts_oldest_across_replicas(&["--redis-url", &redis.url]).await;
}

#[tokio::test]
async fn evict_oldest_closes_the_session_on_the_other_replica_through_postgres() {
    let pg = Postgres::start().await;
    evicts_oldest_across_replicas(&["--postgres-dsn", &pg.dsn]).await;
}

#[tokio::test]
async fn with_redis_killed_the_limits_hold_per_process_and_nobody_legitimate_is_refused() {
    let mut redis = Redis::start().await;
    let env = Env::new().await;
    let gw = env
        .gateway(&[
            "--redis-url",
            &redis.url,
            "--rate-limit-per-second",
            "0.2",
            "--rate-limit-burst",
            "2",
            "--max-sessions-per-subject",
            "5",
        ])
        .await;
    let alice = env.signer.valid("alice", 300);
    let _first = connect_bearer(&env.pki, &gw, "/ws", &alice)
        .await
        .expect("through Redis");
    redis.stop();
    // Fresh subjects pass while the store is down: a local bucket each.
    for n in 0..3 {
        let sub = format!("device-{n}");
        connect_bearer(&env.pki, &gw, "/ws", &env.signer.valid(&sub, 300))
            .await
            .unwrap_or_else(|s| panic!("{sub} refused with {s} during the outage"));
    }
    assert!(metric(&gw, "ws_limit_fallbacks_total").await >= 3.0);
    gw.wait_log(&["limit_fallback", "per process"]).await;
    // The limits still hold, per process.
    let carol = env.signer.valid("carol", 300);
    let _c1 = connect_bearer(&env.pki, &gw, "/ws", &carol)
        .await
        .expect("carol 1");
    let _c2 = connect_bearer(&env.pki, &gw, "/ws", &carol)
        .await
        .expect("carol 2");
    assert_eq!(
        status_of(&attempt(&env, &gw, &carol).await),
        429,
        "the local bucket paces carol"
    );
    // Back: shared again.
    redis.restart().await;
    store_up(&gw).await;
    let before = metric(&gw, "ws_limit_fallbacks_total").await;
    connect_bearer(&env.pki, &gw, "/ws", &env.signer.valid("dave", 300))
        .await
        .expect("dave through Redis again");
    assert_eq!(
        metric(&gw, "ws_limit_fallbacks_total").await,
        before,
        "decided by the store again"
    );
}
