//! Which endpoint a new session tries first: `least-connections`, or `hash-subject` (rendezvous hashing on the
//! verified `sub`, so a device's reconnects land on the same broker while the set of endpoints is unchanged, and
//! only the sessions of an endpoint that goes or comes move when it changes).
//!
//! The hash is FNV-1a with a SplitMix64 finish, fixed here rather than std's `DefaultHasher` (whose algorithm may
//! change between Rust releases): every replica, of any build, sends a subject to the same endpoint.

use crate::config::Balance;

/// What balancing needs to know of one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Candidate {
    /// The endpoint's identity for hashing ([`endpoint_key`]).
    pub(crate) key: u64,
    /// Sessions and dials it holds now.
    pub(crate) active: usize,
}

/// Positions of `candidates`, best first.
///
/// `least-connections` orders by connections held, ties broken by a rotation that moves on with every dial, so
/// equal endpoints take turns. `hash-subject` orders by the subject's rendezvous score, so the first is the
/// subject's endpoint and the next ones are where it goes when that one is unavailable; without a subject it
/// falls back to least connections.
#[must_use]
pub(crate) fn order(
    candidates: &[Candidate],
    balance: Balance,
    subject: Option<&str>,
    rotation: usize,
) -> Vec<usize> {
    let n = candidates.len();
    let mut positions: Vec<usize> = (0..n).collect();
    match (balance, subject) {
        (Balance::HashSubject, Some(subject)) => {
            let base = fnv1a(FNV_OFFSET, subject.as_bytes());
            positions.sort_by_key(|&i| {
                std::cmp::Reverse((score(base, candidates[i].key), candidates[i].key))
            });
        }
        _ => {
            let start = if n == 0 { 0 } else { rotation % n };
            positions.sort_by_key(|&i| (candidates[i].active, (i + n - start) % n.max(1)));
        }
    }
    positions
}

/// An endpoint's identity for hashing: its URL (scheme, authority, path; never the query) and its address.
#[must_use]
pub(crate) fn endpoint_key(url: &str, addr: &std::net::SocketAddr) -> u64 {
    let h = fnv1a(FNV_OFFSET, url.as_bytes());
    let h = fnv1a(h, b"|");
    finish(fnv1a(h, addr.to_string().as_bytes()))
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0100_0000_01b3;

fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// SplitMix64's finaliser: spreads FNV's weak low bits over the whole word.
fn finish(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn score(subject: u64, endpoint: u64) -> u64 {
    finish(subject ^ endpoint.rotate_left(17))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidates(n: usize) -> Vec<Candidate> {
        (0..n)
            .map(|i| Candidate {
                key: endpoint_key(
                    "ws://broker/mqtt",
                    &std::net::SocketAddr::from(([10, 0, 0, i as u8], 1883)),
                ),
                active: 0,
            })
            .collect()
    }

    #[test]
    fn least_connections_prefers_the_emptiest_and_rotates_ties() {
        let mut c = candidates(3);
        c[0].active = 5;
        c[1].active = 1;
        c[2].active = 1;
        assert_eq!(order(&c, Balance::LeastConnections, None, 0), vec![1, 2, 0]);
        assert_eq!(order(&c, Balance::LeastConnections, None, 2), vec![2, 1, 0]);
        let even = candidates(3);
        let firsts: Vec<usize> = (0..3)
            .map(|r| order(&even, Balance::LeastConnections, None, r)[0])
            .collect();
        assert_eq!(firsts, vec![0, 1, 2], "equal endpoints take turns");
        assert!(order(&[], Balance::LeastConnections, None, 7).is_empty());
    }

    #[test]
    fn hash_subject_is_stable_and_moves_few_subjects_when_an_endpoint_goes() {
        let c = candidates(4);
        let pick = |c: &[Candidate], s: &str| c[order(c, Balance::HashSubject, Some(s), 0)[0]].key;
        // Stable: the same subject, whatever the load and the rotation.
        let mut loaded = c.clone();
        loaded[0].active = 100;
        for s in ["alice", "bob", "device-17"] {
            let first = pick(&c, s);
            assert_eq!(pick(&loaded, s), first);
            assert_eq!(c[order(&c, Balance::HashSubject, Some(s), 9)[0]].key, first);
        }
        // Spread: 1,000 subjects over 4 endpoints, each gets a fair share.
        let mut counts = [0usize; 4];
        for i in 0..1000 {
            let first = order(&c, Balance::HashSubject, Some(&format!("dev-{i}")), 0)[0];
            counts[first] += 1;
        }
        assert!(counts.iter().all(|&n| n > 150), "{counts:?}");
        // One endpoint goes: only its subjects move, and each to its own second choice.
        let without: Vec<Candidate> = c[1..].to_vec();
        let mut moved = 0;
        for i in 0..1000 {
            let s = format!("dev-{i}");
            let ranked = order(&c, Balance::HashSubject, Some(&s), 0);
            let before = c[ranked[0]].key;
            let after = pick(&without, &s);
            if before != after {
                moved += 1;
                assert_eq!(before, c[0].key, "{s} moved though its endpoint stayed");
                assert_eq!(after, c[ranked[1]].key, "{s} went to its second choice");
            }
        }
        assert_eq!(moved, counts[0]);
        // No subject: least connections.
        let mut c = candidates(2);
        c[0].active = 3;
        assert_eq!(order(&c, Balance::HashSubject, None, 0), vec![1, 0]);
    }

    #[test]
    fn the_hash_is_fixed_across_builds() {
        // Pinned: a change here sends every device to another broker after an upgrade.
        let key = endpoint_key(
            "ws://broker/mqtt",
            &std::net::SocketAddr::from(([10, 0, 0, 1], 1883)),
        );
        assert_eq!(
            key,
            endpoint_key("ws://broker/mqtt", &"10.0.0.1:1883".parse().expect("addr"))
        );
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(key, 14_778_838_953_166_203_654);
    }
}
