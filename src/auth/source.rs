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
        let v = v.trim();
        if let Some((scheme, rest)) = v.split_once(' ') {
            if scheme.eq_ignore_ascii_case("bearer") {
                return Some((Source::Header, rest.trim().to_owned()));
            }
        }
    }
    for entry in head
        .values("Sec-WebSocket-Protocol")
        .flat_map(|v| v.split(','))
    {
        if let Some(t) = entry.trim().strip_prefix(SUBPROTOCOL_PREFIX) {
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
            if name == query_param {
                return Some((Source::Query, percent_decode(value)));
            }
        }
    }
    None
}

/// The subprotocol offer without token entries; `None` when nothing is left.
#[must_use]
pub fn strip_subprotocols<'a>(values: impl Iterator<Item = &'a str>) -> Option<String> {
    let kept: Vec<&str> = values
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty() && !p.starts_with(SUBPROTOCOL_PREFIX))
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
            !p.is_empty() && p.split_once('=').map_or(p.trim(), |(n, _)| n.trim()) != cookie_name
        })
        .collect();
    (!kept.is_empty()).then(|| kept.join("; "))
}

/// A query string without the token parameter; `None` when nothing is left.
#[must_use]
pub fn strip_query(query: &str, param: &str) -> Option<String> {
    let kept: Vec<&str> = query
        .split('&')
        .filter(|p| !p.is_empty() && p.split_once('=').map_or(*p, |(n, _)| n) != param)
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

fn percent_decode(s: &str) -> String {
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
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("a%zz"), "a%zz");
    }
}
