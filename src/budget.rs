//! Budgets kept in this process: the handshake budget of each client address (`HANDSHAKE_RATE_PER_IP`,
//! `HANDSHAKE_BURST_PER_IP`), checked before TLS, and the message rate of one session (`WS_MESSAGE_RATE_PER_SECOND`,
//! `WS_MESSAGE_BURST`), charged as the relay's frame tracker sees client frames.
//!
//! # The handshake table is bounded
//! An attacker with many source addresses must not grow the bookkeeping, so there is no map keyed by address:
//! [`HandshakeBudget`] is a fixed table of [`SLOTS`] token buckets (8 bytes each, 256 KiB, allocated only when the
//! budget is on). An address is hashed with a key drawn at random per process (std's SipHash `RandomState`), so
//! nobody outside can aim at another address's buckets, and IPv6 addresses count per /64 (one host's share of
//! addresses), IPv4-mapped IPv6 as IPv4. Each address owns two buckets (two 15-bit slices of the hash), in the way
//! of a count-min sketch:
//! - a handshake is allowed while **either** bucket has a token, and then takes one from **both**;
//! - so an address alone in its buckets gets exactly its budget; one that shares a bucket with a flooder is held
//!   back only if its other bucket is shared with a flooder too (1,000 flooding addresses drain 2,000 buckets, and
//!   about one newcomer in 300 finds both of its own among them: (1 - e^(-2000/32768))^2), and a bucket drained by others never lets anyone exceed what its other
//!   bucket allows, up to twice the budget in the worst case of two buckets each emptied and refilled by others.
//!
//! Each bucket is one `AtomicU64`, a GCRA "theoretical arrival time" in nanoseconds since the table was made: no
//! lock on the accept path, and a bucket never older than `now - burst × interval` (a full bucket) nor later than
//! `now + burst × interval` (an empty one), so nothing accumulates.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::RateLimit;

/// Buckets in the handshake table (a power of two: an index is 15 bits of the hash).
pub(crate) const SLOTS: usize = 1 << 15;
const NANOS: f64 = 1e9;

/// The handshake budget of every client address, in a table of fixed size.
#[derive(Debug)]
pub(crate) struct HandshakeBudget {
    /// Nanoseconds between two tokens.
    interval: u64,
    /// `burst × interval`: how far ahead of now a bucket's arrival time may run.
    tolerance: u64,
    slots: Box<[AtomicU64]>,
    key: RandomState,
    origin: Instant,
    /// The log of throttled handshakes, at most one line a second.
    pub(crate) log: LogGate,
}

impl HandshakeBudget {
    /// An empty table (every address starts with a full bucket).
    #[must_use]
    pub(crate) fn new(limit: RateLimit) -> HandshakeBudget {
        // Invariant: config bounds the rate to 0.001..=1e6 and the burst to 1..=1e6, so the interval is 1e3..=1e12
        // ns and the tolerance at most 1e18, below u64::MAX.
        let interval = (NANOS / limit.per_second).round().max(1.0) as u64;
        HandshakeBudget {
            interval,
            tolerance: interval.saturating_mul(u64::from(limit.burst.max(1))),
            slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            key: RandomState::new(),
            origin: Instant::now(),
            log: LogGate::default(),
        }
    }

    /// Takes a token for `ip` now; `Err` with the time until one is available when over budget.
    ///
    /// # Errors
    /// The address has spent its budget.
    pub(crate) fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        self.check_at(ip, Instant::now())
    }

    fn check_at(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        // Start at `tolerance`, not 0: a zeroed bucket is then full from the first instant.
        let now = self.tolerance.saturating_add(
            u64::try_from(now.saturating_duration_since(self.origin).as_nanos())
                .unwrap_or(u64::MAX),
        );
        let hash = self.key.hash_one(address_key(ip));
        let first = (hash as usize) & (SLOTS - 1);
        let mut second = ((hash >> 32) as usize) & (SLOTS - 1);
        if second == first {
            // Two distinct buckets, or the one would be charged twice per handshake.
            second ^= 1;
        }
        let slots = [&self.slots[first], &self.slots[second]];
        // The arrival time each bucket would have after this handshake; allowed if either stays within tolerance.
        let next = |tat: u64| tat.max(now).saturating_add(self.interval);
        let wait = slots
            .iter()
            .map(|s| {
                next(s.load(Ordering::Relaxed)).saturating_sub(now.saturating_add(self.tolerance))
            })
            .min()
            .unwrap_or(0);
        if wait > 0 {
            return Err(Duration::from_nanos(wait));
        }
        for slot in slots {
            // Never further ahead than an empty bucket: a bucket others emptied recovers within one burst.
            let _ = slot.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |tat| {
                Some(next(tat).min(now.saturating_add(self.tolerance)))
            });
        }
        Ok(())
    }

    /// The number of buckets, fixed whatever the traffic.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.slots.len()
    }
}

/// What identifies a client for the budget: an IPv4 address, or an IPv6 /64 (the family keeps them apart).
fn address_key(ip: IpAddr) -> (u8, u64) {
    match ip {
        IpAddr::V4(v4) => (4, u64::from(u32::from(v4))),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => (4, u64::from(u32::from(v4))),
            // Invariant: the shift leaves 64 bits.
            None => (6, (u128::from(v6) >> 64) as u64),
        },
    }
}

/// At most one log line a second for an event that can come in floods; counts the lines it held back.
#[derive(Debug, Default)]
pub(crate) struct LogGate {
    /// Milliseconds (since the gate was first used) before which no line is written.
    next_ms: AtomicU64,
    suppressed: AtomicU64,
    origin: std::sync::OnceLock<Instant>,
}

impl LogGate {
    /// `Some(lines held back since the last one)` when a line may be written now, else `None` (and it is counted).
    pub(crate) fn allow(&self) -> Option<u64> {
        let origin = *self.origin.get_or_init(Instant::now);
        let now_ms = u64::try_from(origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        let next = self.next_ms.load(Ordering::Relaxed);
        if now_ms >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now_ms.saturating_add(1000),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// One session's message budget: a token bucket refilled once per chunk read, charged once per client frame.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MessageRate {
    tokens: f64,
    per_second: f64,
    burst: f64,
    last: Instant,
}

impl MessageRate {
    /// A full bucket.
    #[must_use]
    pub(crate) fn new(limit: RateLimit) -> MessageRate {
        MessageRate {
            tokens: f64::from(limit.burst),
            per_second: limit.per_second,
            burst: f64::from(limit.burst),
            last: Instant::now(),
        }
    }

    /// Adds what the time since the last refill earned.
    pub(crate) fn refill(&mut self, now: Instant) {
        let earned = now.saturating_duration_since(self.last).as_secs_f64() * self.per_second;
        self.tokens = (self.tokens + earned).min(self.burst);
        self.last = now;
    }

    /// Takes one token; `false` when there is none.
    pub(crate) fn take(&mut self) -> bool {
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn budget(per_second: f64, burst: u32) -> HandshakeBudget {
        HandshakeBudget::new(RateLimit { per_second, burst })
    }

    #[test]
    fn a_burst_then_the_rate() {
        let b = budget(2.0, 3);
        let ip: IpAddr = Ipv4Addr::new(192, 0, 2, 1).into();
        let t0 = b.origin;
        for _ in 0..3 {
            assert_eq!(b.check_at(ip, t0), Ok(()));
        }
        let wait = b.check_at(ip, t0).expect_err("over budget");
        assert_eq!(wait, Duration::from_millis(500));
        // Half a second later one token is back, and only one.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(b.check_at(ip, t1), Ok(()));
        assert!(b.check_at(ip, t1).is_err());
        // After a long pause the bucket is full again, not fuller.
        let t2 = t1 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert_eq!(b.check_at(ip, t2), Ok(()));
        }
        assert!(b.check_at(ip, t2).is_err());
        // Another address is untouched.
        assert_eq!(b.check_at(Ipv4Addr::new(192, 0, 2, 2).into(), t2), Ok(()));
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let b = budget(0.001, 2);
        let t = b.origin;
        let a: Ipv6Addr = "2001:db8:1:2::1".parse().expect("v6");
        let same_64: Ipv6Addr = "2001:db8:1:2:ffff::9".parse().expect("v6");
        let other_64: Ipv6Addr = "2001:db8:1:3::1".parse().expect("v6");
        assert_eq!(b.check_at(a.into(), t), Ok(()));
        assert_eq!(b.check_at(same_64.into(), t), Ok(()));
        assert!(
            b.check_at(a.into(), t).is_err(),
            "the /64 shares one budget"
        );
        assert_eq!(b.check_at(other_64.into(), t), Ok(()));
        let v4 = Ipv4Addr::new(198, 51, 100, 7);
        assert_eq!(b.check_at(v4.into(), t), Ok(()));
        assert_eq!(b.check_at(v4.to_ipv6_mapped().into(), t), Ok(()));
        assert!(b.check_at(v4.into(), t).is_err());
    }

    #[test]
    fn many_addresses_do_not_grow_the_table_or_lock_out_a_newcomer() {
        let b = budget(0.001, 1);
        let t = b.origin;
        // 200,000 distinct addresses each spend their one handshake (and some try again).
        for i in 0..200_000u32 {
            let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
            let _ = b.check_at(ip, t);
            let _ = b.check_at(ip, t);
        }
        assert_eq!(b.len(), SLOTS);
        assert_eq!(std::mem::size_of_val(&*b.slots), SLOTS * 8);
        // With 1,000 flooders, a newcomer finds both its buckets drained with probability 0.35%.
        let small = budget(0.001, 1);
        for i in 0..1_000u32 {
            let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
            let _ = small.check_at(ip, small.origin);
        }
        let served = (0..1_000u32)
            .filter(|i| {
                small
                    .check_at(IpAddr::V4(Ipv4Addr::from(0xc000_0200 + i)), small.origin)
                    .is_ok()
            })
            .count();
        assert!(served >= 980, "only {served} of 1,000 newcomers served");
    }

    #[test]
    fn the_log_gate_lets_one_line_a_second_through_and_counts_the_rest() {
        let g = LogGate::default();
        assert_eq!(g.allow(), Some(0));
        assert_eq!(g.allow(), None);
        assert_eq!(g.allow(), None);
        g.next_ms.store(0, Ordering::Relaxed);
        assert_eq!(g.allow(), Some(2));
    }

    #[tokio::test(start_paused = true)]
    async fn the_message_bucket_refills_up_to_its_burst() {
        let mut m = MessageRate::new(RateLimit {
            per_second: 10.0,
            burst: 3,
        });
        assert!(m.take() && m.take() && m.take());
        assert!(!m.take());
        tokio::time::advance(Duration::from_millis(250)).await;
        m.refill(Instant::now());
        assert!(m.take() && m.take());
        assert!(!m.take());
        tokio::time::advance(Duration::from_secs(60)).await;
        m.refill(Instant::now());
        assert!(m.take() && m.take() && m.take());
        assert!(!m.take());
    }
}
