//! Connections that have not yet earned their place: the main listener's handshakes (before authentication) and
//! the admin listener's requests (before their head is read).
//!
//! Both listeners accept at once and register the connection here. When the set is full, the oldest entry is
//! evicted, and when one peer holds more than its share, that peer's oldest entry goes. A legitimate client sends
//! its bytes within milliseconds of connecting, so a flood of idle sockets can only evict itself: a waiting
//! semaphore let 200 idle sockets make every `/healthz` time out, and 20 delay a valid client by seconds.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio::time::{Duration, Instant};

/// The set of pending connections, oldest first.
#[derive(Debug)]
pub(crate) struct Pending {
    cap: usize,
    per_peer: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    next: u64,
    entries: BTreeMap<u64, (IpAddr, Arc<Notify>, Instant)>,
    per_peer: HashMap<IpAddr, usize>,
}

impl Inner {
    fn remove(&mut self, id: u64) -> Option<Arc<Notify>> {
        let (ip, evict, _) = self.entries.remove(&id)?;
        if let Some(n) = self.per_peer.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.per_peer.remove(&ip);
            }
        }
        Some(evict)
    }
}

/// One pending connection's place; dropping it (the connection got through, or ended) frees the place.
#[derive(Debug)]
pub(crate) struct Ticket {
    set: Arc<Pending>,
    id: u64,
    evict: Arc<Notify>,
}

impl Ticket {
    /// Resolves when the connection has been evicted to make room for a newer one.
    pub(crate) async fn evicted(&self) {
        self.evict.notified().await;
    }

    /// The eviction signal, to wait on after the ticket itself has been handed elsewhere.
    #[must_use]
    pub(crate) fn eviction(&self) -> Arc<Notify> {
        Arc::clone(&self.evict)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Ok(mut inner) = self.set.inner.lock() {
            inner.remove(self.id);
        }
    }
}

impl Pending {
    /// A set of at most `cap` entries, at most `per_peer` from one address (`usize::MAX` for no per-peer limit).
    #[must_use]
    pub(crate) fn new(cap: usize, per_peer: usize) -> Arc<Pending> {
        Arc::new(Pending {
            cap: cap.max(1),
            per_peer: per_peer.max(1),
            inner: Mutex::new(Inner::default()),
        })
    }

    /// When a new connection may be admitted without evicting one younger than `min_age`: `None` when there is
    /// room now. A burst of legitimate clients (a reconnect storm) then waits in the listen backlog for a moment
    /// instead of evicting handshakes that are about to complete; idle sockets older than `min_age` still go.
    pub(crate) fn room_at(&self, min_age: Duration) -> Option<Instant> {
        let inner = self.inner.lock().ok()?;
        if inner.entries.len() < self.cap {
            return None;
        }
        inner
            .entries
            .values()
            .next()
            .map(|(_, _, started)| *started + min_age)
    }

    /// Registers a new connection from `ip`, evicting the oldest entries beyond the limits. Returns the ticket and
    /// how many entries were evicted.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> (Ticket, usize) {
        let evict = Arc::new(Notify::new());
        let mut evicted = Vec::new();
        let id = {
            // A poisoned lock only means another task panicked while holding it; the map is still consistent.
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            let id = inner.next;
            inner.next += 1;
            inner
                .entries
                .insert(id, (ip, Arc::clone(&evict), Instant::now()));
            let count = inner.per_peer.entry(ip).or_insert(0);
            *count += 1;
            if *count > self.per_peer {
                let oldest = inner
                    .entries
                    .iter()
                    .find(|(_, (a, _, _))| *a == ip)
                    .map(|(k, _)| *k);
                if let Some(n) = oldest.and_then(|k| inner.remove(k)) {
                    evicted.push(n);
                }
            }
            while inner.entries.len() > self.cap {
                let Some(oldest) = inner.entries.keys().next().copied() else {
                    break;
                };
                if let Some(n) = inner.remove(oldest) {
                    evicted.push(n);
                }
            }
            id
        };
        for n in &evicted {
            // `notify_one` stores the wake-up if the connection is not waiting yet.
            n.notify_one();
        }
        (
            Ticket {
                set: Arc::clone(self),
                id,
                evict,
            },
            evicted.len(),
        )
    }

    /// Entries held now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().map_or(0, |i| i.entries.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_set_makes_room_only_by_evicting_connections_older_than_the_minimum_age() {
        let set = Pending::new(2, usize::MAX);
        let (_a, _) = set.admit(ip(1));
        assert_eq!(
            set.room_at(Duration::from_secs(1)),
            None,
            "room for one more"
        );
        let (_b, _) = set.admit(ip(2));
        let at = set.room_at(Duration::from_secs(1)).expect("full");
        assert!(at > Instant::now());
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(set.room_at(Duration::from_secs(1)).expect("full") <= Instant::now());
    }

    #[tokio::test]
    async fn oldest_goes_first_and_a_peer_evicts_only_itself() {
        let set = Pending::new(3, 2);
        let (a, _) = set.admit(ip(1));
        let (b, _) = set.admit(ip(2));
        let (c, _) = set.admit(ip(2));
        // A third from 10.0.0.2 evicts that peer's oldest (b), not the globally oldest (a).
        let (d, n) = set.admit(ip(2));
        assert_eq!(n, 1);
        tokio::time::timeout(Duration::from_secs(1), b.evicted())
            .await
            .expect("b evicted");
        assert_eq!(set.len(), 3);
        // A newcomer from elsewhere evicts the globally oldest (a).
        let (_e, n) = set.admit(ip(3));
        assert_eq!(n, 1);
        tokio::time::timeout(Duration::from_secs(1), a.evicted())
            .await
            .expect("a evicted");
        assert!(
            tokio::time::timeout(Duration::from_millis(50), c.evicted())
                .await
                .is_err(),
            "c stays"
        );
        drop((c, d));
        assert_eq!(set.len(), 1);
        drop(b);
        drop(a);
        assert_eq!(set.len(), 1);
    }
}
