//! Giving memory back after a burst.
//!
//! A burst of sessions grows the heap to its peak, and the allocator keeps what was freed for the next burst: glibc
//! returns only the top of each arena by itself, so a gateway that held 5,000 sessions an hour ago would still hold
//! their memory. Every [`TICK`], [`give_back`] forgets idle verified tokens, shrinks the tables a burst grew (the
//! token cache, the session registry; the revocation map shrinks when it is purged), and, once sessions are at most
//! half their peak and they or the cached tokens fell by half, asks the allocator to return its free pages to the
//! kernel (`malloc_trim` on glibc; elsewhere the allocator's own policy applies).
//!
//! The trim runs on a blocking thread, never on a worker, and only after a drop, so a steady load never pays for it.
//! It takes a few milliseconds (7-32 ms after 5,000 sessions), during which allocations wait for the arena locks.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth::jwt::unix_now;
use crate::server::Gateway;

/// How often the tables are swept.
pub(crate) const TICK: Duration = Duration::from_secs(10);

/// The smallest drop in sessions, or in cached tokens, worth a trim.
const MIN_DROP: usize = 64;

/// Sweeps, shrinks and trims every [`TICK`] for as long as the gateway runs.
pub(crate) async fn give_back(gw: Arc<Gateway>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // High-water marks since the last trim.
    let mut sessions_peak = 0;
    let mut tokens_peak = 0;
    loop {
        tick.tick().await;
        sessions_peak = sessions_peak.max(gw.registry.take_high_water());
        tokens_peak = tokens_peak.max(gw.verifier.cached_tokens());
        gw.verifier.sweep_cache(unix_now());
        gw.registry.shrink();
        let sessions = gw.registry.len();
        let tokens = gw.verifier.cached_tokens();
        // Under a steady load the token cache turns over by itself; only a quieter gateway pays for a trim.
        let quieter = sessions <= sessions_peak / 2;
        if !(quieter && (fell(sessions_peak, sessions) || fell(tokens_peak, tokens))) {
            continue;
        }
        let started = Instant::now();
        let trimmed = tokio::task::spawn_blocking(release_free_pages)
            .await
            .unwrap_or(false);
        tracing::debug!(
            event = "memory_released",
            sessions_peak,
            sessions,
            tokens_peak,
            tokens,
            trimmed,
            took_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            "tables shrunk after a drop; free pages returned to the kernel"
        );
        sessions_peak = sessions;
        tokens_peak = tokens;
    }
}

/// Whether a count fell from `peak` to `now` by at least half and by at least [`MIN_DROP`].
fn fell(peak: usize, now: usize) -> bool {
    peak >= now + MIN_DROP && now <= peak / 2
}

/// Shrinks a map whose table is at least four times what it holds, keeping room to double: a burst's table is
/// given back once the burst is over, without reallocating on every small swing.
pub(crate) fn shrink_sparse<K: Hash + Eq, V>(map: &mut HashMap<K, V>) {
    if map.capacity() > 64 && map.capacity() / 4 > map.len() {
        map.shrink_to(map.len() * 2);
    }
}

/// Asks glibc to return every free page of every arena to the kernel; whether it returned any.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn release_free_pages() -> bool {
    // SAFETY: malloc_trim has no preconditions: it takes each arena's lock itself and only releases memory that is
    // free (whole pages inside free chunks, and the top of each heap).
    unsafe { libc::malloc_trim(0) != 0 }
}

/// Other allocators return memory by their own policy.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_pages() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trim_needs_a_drop_of_half_and_of_at_least_min_drop() {
        assert!(fell(5_000, 0));
        assert!(fell(5_000, 2_500));
        assert!(!fell(5_000, 2_501), "less than half gone");
        assert!(!fell(100, 40), "half gone, but only 60");
        assert!(fell(128, 64));
        assert!(!fell(0, 0));
        assert!(!fell(10, 20), "a rise");
    }

    #[test]
    fn a_sparse_table_shrinks_and_a_busy_one_keeps_its_room() {
        let mut map: HashMap<u32, u32> = (0..10_000).map(|i| (i, i)).collect();
        map.retain(|k, _| *k < 5_000);
        shrink_sparse(&mut map);
        // (capacity() counts deleted slots out, so it is not exactly what it was.)
        assert!(
            map.capacity() > 10_000,
            "half full is not sparse: {}",
            map.capacity()
        );
        map.retain(|k, _| *k < 100);
        shrink_sparse(&mut map);
        assert!(
            map.capacity() < 1_000,
            "capacity {} after emptying",
            map.capacity()
        );
        assert!(map.capacity() >= 200, "room to double is kept");
        assert_eq!(map.len(), 100);
    }
}
