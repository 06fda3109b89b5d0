//! Upstream URLs to endpoint addresses: every address a host name resolves to is an endpoint, so a Kubernetes
//! headless Service in front of a broker cluster spreads sessions over its pods. IP literals need no lookup; names
//! go through the system resolver (`tokio::net::lookup_host`, getaddrinfo on a blocking thread) under a deadline,
//! since a resolver that hangs would otherwise hold the refresh for its own timeouts.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::net::WsUrl;

/// Most endpoints one route holds, whatever DNS answers: a name that resolves to thousands of addresses must not
/// make the gateway hold thousands of breakers, or dial them in turn.
pub(crate) const MAX_ENDPOINTS: usize = 64;

/// What one resolution found.
#[derive(Debug, Default)]
pub(crate) struct Resolved {
    /// `(URL position, address)`, sorted and without duplicates, at most [`MAX_ENDPOINTS`].
    pub(crate) addrs: Vec<(usize, SocketAddr)>,
    /// URL positions whose name did not resolve, with why (never a secret: the host name only).
    pub(crate) failed: Vec<(usize, String)>,
    /// Addresses left out beyond [`MAX_ENDPOINTS`].
    pub(crate) dropped: usize,
}

/// Resolves every URL, each lookup within `limit`.
pub(crate) async fn resolve(urls: &[WsUrl], limit: Duration) -> Resolved {
    let mut out = Resolved::default();
    for (i, url) in urls.iter().enumerate() {
        if let Ok(ip) = url.host.parse::<IpAddr>() {
            out.addrs.push((i, SocketAddr::new(ip, url.port)));
            continue;
        }
        match tokio::time::timeout(
            limit,
            tokio::net::lookup_host((url.host.as_str(), url.port)),
        )
        .await
        {
            Ok(Ok(found)) => {
                let before = out.addrs.len();
                // Bounded even if the resolver answers with a flood: at most MAX_ENDPOINTS + 1 per name are kept.
                out.addrs
                    .extend(found.take(MAX_ENDPOINTS + 1).map(|a| (i, a)));
                if out.addrs.len() == before {
                    out.failed.push((i, format!("{}: no addresses", url.host)));
                }
            }
            Ok(Err(e)) => out.failed.push((i, format!("{}: {e}", url.host))),
            Err(_) => out
                .failed
                .push((i, format!("{}: lookup timed out", url.host))),
        }
    }
    settle(&mut out);
    out
}

/// [`settle`], for the pool's tests.
#[cfg(test)]
pub(crate) fn settle_for_tests(out: &mut Resolved) {
    settle(out);
}

/// Sorts, removes duplicates and applies the cap.
fn settle(out: &mut Resolved) {
    out.addrs.sort();
    out.addrs.dedup();
    if out.addrs.len() > MAX_ENDPOINTS {
        out.dropped = out.addrs.len() - MAX_ENDPOINTS;
        out.addrs.truncate(MAX_ENDPOINTS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn literals_need_no_lookup_and_names_resolve() {
        let urls = [
            WsUrl::parse_ws("ws://127.0.0.2:9001/mqtt").expect("url"),
            WsUrl::parse_ws("wss://[::1]:8443").expect("url"),
            WsUrl::parse_ws("ws://localhost:9002").expect("url"),
            WsUrl::parse_ws("ws://127.0.0.2:9001/other").expect("url"),
        ];
        let r = resolve(&urls, Duration::from_secs(5)).await;
        assert!(r.failed.is_empty(), "{:?}", r.failed);
        assert!(r.addrs.contains(&(0, "127.0.0.2:9001".parse().expect("a"))));
        assert!(r.addrs.contains(&(1, "[::1]:8443".parse().expect("a"))));
        assert!(r.addrs.iter().any(|(u, a)| *u == 2 && a.port() == 9002));
        // The same address under two URLs is two endpoints (their paths differ).
        assert!(r.addrs.contains(&(3, "127.0.0.2:9001".parse().expect("a"))));
    }

    #[test]
    fn duplicates_go_and_the_cap_holds() {
        let mut r = Resolved::default();
        for i in 0..200u16 {
            r.addrs
                .push((0, SocketAddr::from(([10, 0, (i % 100) as u8, 1], 80))));
        }
        settle(&mut r);
        assert_eq!(r.addrs.len(), MAX_ENDPOINTS);
        assert_eq!(r.dropped, 100 - MAX_ENDPOINTS);
        assert!(r.addrs.windows(2).all(|w| w[0] < w[1]), "sorted, unique");
    }
}
