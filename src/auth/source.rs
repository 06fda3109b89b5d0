//! Where the token is, in this order: `Authorization: Bearer`, a `Sec-WebSocket-Protocol` entry `bearer.<jwt>`, the
//! cookie, the query parameter. The first source present is the one used; every carrier is stripped from what goes
//! upstream whichever was used.

use crate::upgrade::RequestHead;

/// Prefix of a token carried as a WebSocket subprotocol (browsers cannot set headers).
pub const SUBPROTOCOL_PREFIX: &str = "bearer.";

/// Which source carried the token; the bounded log and metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `Authorization: Bearer`.
    Header,
    /// `Sec-WebSocket-Protocol: bearer.<jwt>`.
    Subprotocol,
    /// The cookie named by `JWT_COOKIE_NAME`.
    Cookie,
    /// The query parameter.
    Query,
    /// The MQTT CONNECT password.
    MqttPassword,
}

impl Source {
    /// Bounded label.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Source::Header => "header",
            Source::Subprotocol => "subprotocol",
            Source::Cookie => "cookie",
            Source::Query => "query",
            Source::MqttPassword => "mqtt_password",
        }
    }
}

/// Finds the token in the first source that carries one.
#[must_use]
pub fn find_token(
    head: &RequestHead,
    cookie_name: &str,
    query_param: &str,
) -> Option<(Source, String)> {
    for v in head.values("Authorization") {
        if let Some(token) = bearer(v) {
            return Some((Source::Header, token.to_owned()));
        }
    }
    for entry in head
        .values("Sec-WebSocket-Protocol")
        .flat_map(|v| v.split(','))
    {
        if let Some(t) = subprotocol_token(entry.trim()) {
            return Some((Source::Subprotocol, t.to_owned()));
        }
    }
    for header in head.values("Cookie") {
        for pair in header.split(';') {
            if let Some((name, value)) = pair.trim().split_once('=') {
                if name.trim() == cookie_name {
                    return Some((Source::Cookie, value.trim().trim_matches('"').to_owned()));
                }
            }
        }
    }
    if let Some(q) = head.query() {
        for pair in q.split('&') {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            if percent_decode(name) == query_param {
                return Some((Source::Query, percent_decode(value)));
            }
        }
    }
    None
}

/// The token of an `Authorization` value whose scheme is `Bearer` (any case), separated by any whitespace (a tab
/// too); `None` for other schemes.
#[must_use]
pub fn bearer(value: &str) -> Option<&str> {
    let value = value.trim();
    let split = value.find(|c: char| c.is_ascii_whitespace())?;
    let (scheme, rest) = value.split_at(split);
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

/// Whether an `Authorization` value carries a bearer token in any spelling, so it never reaches the upstream.
#[must_use]
pub fn is_bearer(value: &str) -> bool {
    let value = value.trim_start();
    value
        .get(..6)
        .is_some_and(|s| s.eq_ignore_ascii_case("bearer"))
}

/// The token of a `bearer.<jwt>` subprotocol entry, the prefix in any case.
fn subprotocol_token(entry: &str) -> Option<&str> {
    entry
        .get(..SUBPROTOCOL_PREFIX.len())
        .filter(|p| p.eq_ignore_ascii_case(SUBPROTOCOL_PREFIX))
        .map(|_| &entry[SUBPROTOCOL_PREFIX.len()..])
}

/// The subprotocol offer without token entries; `None` when nothing is left.
#[must_use]
pub fn strip_subprotocols<'a>(values: impl Iterator<Item = &'a str>) -> Option<String> {
    let kept: Vec<&str> = values
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty() && subprotocol_token(p).is_none())
        .collect();
    (!kept.is_empty()).then(|| kept.join(", "))
}

/// A `Cookie` header without the token cookie; `None` when nothing is left.
#[must_use]
pub fn strip_cookie(value: &str, cookie_name: &str) -> Option<String> {
    let kept: Vec<&str> = value
        .split(';')
        .map(str::trim)
        .filter(|p| {
            let name = p.split_once('=').map_or(p.trim(), |(n, _)| n.trim());
            // Any casing of the token cookie is a carrier too, used or not.
            !p.is_empty() && !name.eq_ignore_ascii_case(cookie_name)
        })
        .collect();
    (!kept.is_empty()).then(|| kept.join("; "))
}

/// A query string without the token parameter; `None` when nothing is left.
#[must_use]
pub fn strip_query(query: &str, param: &str) -> Option<String> {
    let kept: Vec<&str> = query
        .split('&')
        .filter(|p| {
            let name = percent_decode(p.split_once('=').map_or(*p, |(n, _)| n));
            // `access%5Ftoken` is the same parameter to any server that decodes names.
            !p.is_empty() && !name.eq_ignore_ascii_case(param)
        })
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

/// Percent-decodes a query or form component (`+` is a space); invalid escapes stay as they are.
pub(crate) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                // Invariant: two hex digits make at most 255.
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upgrade::parse_head;

    fn head(target: &str, headers: &str) -> RequestHead {
        let raw = format!("GET {target} HTTP/1.1\r\nHost: x\r\n{headers}\r\n");
        parse_head(raw.as_bytes()).expect("ok").expect("complete").0
    }

    #[test]
    fn sources_in_order() {
        let all = "Authorization: Bearer H\r\nSec-WebSocket-Protocol: mqtt, bearer.P\r\nCookie: a=1; session=C\r\n";
        let find = |h: &RequestHead| find_token(h, "session", "access_token");
        assert_eq!(
            find(&head("/?access_token=Q", all)),
            Some((Source::Header, "H".into()))
        );
        let no_auth = all.replace("Authorization: Bearer H\r\n", "");
        assert_eq!(
            find(&head("/?access_token=Q", &no_auth)),
            Some((Source::Subprotocol, "P".into()))
        );
        let cookie_only = "Cookie: a=1; session=C\r\n";
        assert_eq!(
            find(&head("/?access_token=Q", cookie_only)),
            Some((Source::Cookie, "C".into()))
        );
        assert_eq!(
            find(&head("/?x=1&access_token=Q%2e", "")),
            Some((Source::Query, "Q.".into()))
        );
        assert_eq!(find(&head("/", "Authorization: Basic abc\r\n")), None);
        assert_eq!(
            find(&head("/", "Authorization: Bearer\tT\r\n")),
            Some((Source::Header, "T".into()))
        );
        assert_eq!(
            find(&head("/", "Sec-WebSocket-Protocol: Bearer.S\r\n")),
            Some((Source::Subprotocol, "S".into()))
        );
        assert_eq!(
            find(&head("/?access%5Ftoken=Q", "")),
            Some((Source::Query, "Q".into()))
        );
    }

    #[test]
    fn stripping() {
        assert_eq!(
            strip_subprotocols(["mqtt, bearer.xyz", "v2"].into_iter()).as_deref(),
            Some("mqtt, v2")
        );
        assert_eq!(strip_subprotocols(["bearer.xyz"].into_iter()), None);
        assert_eq!(
            strip_cookie("a=1; session=T; b=2", "session").as_deref(),
            Some("a=1; b=2")
        );
        assert_eq!(strip_cookie("session=T", "session"), None);
        assert_eq!(
            strip_query("a=1&access_token=T&b", "access_token").as_deref(),
            Some("a=1&b")
        );
        assert_eq!(strip_query("access_token=T", "access_token"), None);
        // Every carrier variant goes, used or not.
        assert_eq!(
            strip_subprotocols(["mqtt, Bearer.xyz, BEARER.abc"].into_iter()).as_deref(),
            Some("mqtt")
        );
        assert_eq!(
            strip_cookie("a=1; SESSION=T; Session=U", "session").as_deref(),
            Some("a=1")
        );
        assert_eq!(
            strip_query(
                "a=1&access%5Ftoken=T&Access_Token=U&access%5ftoken",
                "access_token"
            )
            .as_deref(),
            Some("a=1")
        );
        assert!(is_bearer("Bearer\tabc") && is_bearer(" bearer abc") && is_bearer("BEARER"));
        assert!(!is_bearer("Basic abc"));
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("a%zz"), "a%zz");
    }
}
