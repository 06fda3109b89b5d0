//! Upstream (`ws://`, `wss://`) and identity-provider (`http://`, `https://`) URLs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ws_gateway::net::Url;

fn check(u: &Url, parse: fn(&str) -> Result<Url, String>) {
    assert!(!u.host.is_empty() && u.port != 0, "{u:?}");
    assert!(u.path_and_query.starts_with('/'), "{u:?}");
    // These go into the request line and the Host header: nothing that could split or end them.
    let bad = |c: char| c.is_whitespace() || c.is_control();
    assert!(
        !u.authority.contains(bad) && !u.path_and_query.contains(bad),
        "{u:?}"
    );
    assert_eq!(u.secure, matches!(u.scheme.as_str(), "wss" | "https"));
    // Display is used in logs and never prints the query, which may carry credentials.
    let shown = u.to_string();
    assert!(!shown.contains('?'), "{shown}");
    assert_eq!(
        u.path(),
        u.path_and_query.split('?').next().unwrap_or_default()
    );
    let _ = u.query();
    // What the dialer uses reads back as the same URL. Hosts with brackets inside (`[[x]`) are left out: they
    // cannot round-trip and no resolver accepts them.
    if !u.host.contains(['[', ']']) {
        let again = format!("{}://{}{}", u.scheme, u.authority, u.path_and_query);
        assert_eq!(parse(&again).as_ref(), Ok(u), "{again}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(u) = Url::parse_ws(s) {
        check(&u, Url::parse_ws);
    }
    if let Ok(u) = Url::parse_http(s) {
        check(&u, Url::parse_http);
    }
});
