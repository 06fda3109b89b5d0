//! The bounded HTTP/1.1 request-head reader and the WebSocket upgrade checks. How a failed check is answered is
//! decided in `refusal`.
//!
//! The reader stops at the end of the head: bytes the client pipelined after it are returned as `rest` and belong
//! to the session.

use std::io;

use base64::Engine;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Most headers a request may carry.
pub const MAX_HEADERS: usize = 64;

/// One header as received: name as sent, value as bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Name, as the client spelled it.
    pub name: String,
    /// Raw value.
    pub value: Vec<u8>,
}

/// A parsed request head.
#[derive(Debug, Clone)]
pub struct RequestHead {
    /// Method.
    pub method: String,
    /// Request target as sent (origin-form).
    pub target: String,
    /// HTTP minor version (1 for HTTP/1.1).
    pub minor_version: u8,
    /// Headers in order.
    pub headers: Vec<Header>,
}

impl RequestHead {
    /// The path part of the target.
    #[must_use]
    pub fn path(&self) -> &str {
        self.target.split_once('?').map_or(&self.target, |(p, _)| p)
    }

    /// The query part of the target, without `?`.
    #[must_use]
    pub fn query(&self) -> Option<&str> {
        self.target.split_once('?').map(|(_, q)| q)
    }

    /// Every value of header `name` (case-insensitive), as text; values that are not UTF-8 are skipped.
    pub fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .filter_map(|h| std::str::from_utf8(&h.value).ok())
    }

    /// The single value of header `name`; `Err` when it appears more than once.
    ///
    /// # Errors
    /// The header is repeated.
    pub fn single<'a>(&'a self, name: &'a str) -> Result<Option<&'a str>, UpgradeError> {
        let mut it = self.values(name);
        let first = it.next();
        if it.next().is_some() {
            return Err(UpgradeError::Malformed("repeated header"));
        }
        Ok(first)
    }

    /// Whether a comma-separated header contains `token` (case-insensitive).
    #[must_use]
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.values(name)
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }
}

/// Why a request was refused before authentication.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UpgradeError {
    /// Not valid HTTP/1.1.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// Head larger than the limit, or too many headers.
    #[error("request head too large")]
    TooLarge,
    /// No route for the path.
    #[error("no route for path")]
    NoRoute,
    /// Method other than GET.
    #[error("method not allowed")]
    Method,
    /// GET without `Upgrade: websocket`.
    #[error("upgrade required")]
    UpgradeRequired,
    /// `Sec-WebSocket-Version` other than 13.
    #[error("unsupported Sec-WebSocket-Version")]
    Version,
    /// Missing or invalid `Sec-WebSocket-Key`.
    #[error("missing or invalid Sec-WebSocket-Key")]
    Key,
}

impl UpgradeError {
    /// Bounded label for logs and metrics.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            UpgradeError::Malformed(_) => "malformed",
            UpgradeError::TooLarge => "too_large",
            UpgradeError::NoRoute => "no_route",
            UpgradeError::Method => "method",
            UpgradeError::UpgradeRequired => "upgrade_required",
            UpgradeError::Version => "bad_version",
            UpgradeError::Key => "bad_key",
        }
    }
}

/// What reading a head produced.
#[derive(Debug)]
pub enum ReadHead {
    /// A complete head, and the bytes that followed it.
    Complete(RequestHead, Vec<u8>),
    /// The peer closed before sending a complete head (a state, not an error).
    Closed,
}

/// Reads one request head of at most `max` bytes; what follows it is returned untouched.
///
/// # Errors
/// [`UpgradeError::TooLarge`] or [`UpgradeError::Malformed`] wrapped in `Ok(Err(..))`; I/O errors as `Err`.
pub async fn read_head<R: AsyncRead + Unpin>(
    io: &mut R,
    max: usize,
) -> io::Result<Result<ReadHead, UpgradeError>> {
    let mut buf = Vec::with_capacity(1024.min(max));
    loop {
        if buf.len() >= max {
            return Ok(Err(UpgradeError::TooLarge));
        }
        if buf.capacity() == buf.len() {
            buf.reserve((buf.len()).min(max - buf.len()).max(512));
        }
        let want = (max - buf.len()).min(buf.capacity() - buf.len());
        let start = buf.len();
        buf.resize(start + want, 0);
        let n = io.read(&mut buf[start..]).await?;
        buf.truncate(start + n);
        if n == 0 {
            return Ok(Ok(ReadHead::Closed));
        }
        match parse_head(&buf) {
            Ok(Some((head, used))) => return Ok(Ok(ReadHead::Complete(head, buf.split_off(used)))),
            Ok(None) => {}
            Err(e) => return Ok(Err(e)),
        }
    }
}

/// Parses a complete head from `buf`: `Ok(None)` when incomplete.
///
/// # Errors
/// Malformed syntax, too many headers, a target that is not origin-form or has dot segments.
pub fn parse_head(buf: &[u8]) -> Result<Option<(RequestHead, usize)>, UpgradeError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let used = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(UpgradeError::TooLarge),
        Err(_) => return Err(UpgradeError::Malformed("not an HTTP/1.1 request")),
    };
    let method = req.method.unwrap_or_default().to_owned();
    let target = req.path.unwrap_or_default().to_owned();
    if !target.starts_with('/') {
        return Err(UpgradeError::Malformed("request target must be a path"));
    }
    let path = target.split_once('?').map_or(target.as_str(), |(p, _)| p);
    normalize_path(path)?;
    let headers = req
        .headers
        .iter()
        .map(|h| Header {
            name: h.name.to_owned(),
            value: h.value.to_vec(),
        })
        .collect();
    Ok(Some((
        RequestHead {
            method,
            target,
            minor_version: req.version.unwrap_or(0),
            headers,
        },
        used,
    )))
}

/// Refuses a path whose meaning depends on who decodes it, so the route the gateway picks is the path the upstream
/// serves: dot segments (also as `..;`, `%2e`), backslashes, encoded slashes or backslashes, double encoding, NUL,
/// and malformed escapes. The path is forwarded unchanged when it passes.
///
/// # Errors
/// [`UpgradeError::Malformed`] naming the first problem found.
pub fn normalize_path(path: &str) -> Result<(), UpgradeError> {
    let bytes = path.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => return Err(UpgradeError::Malformed("backslash in path")),
            b'%' => {
                let hex = |b: Option<&u8>| b.and_then(|b| char::from(*b).to_digit(16));
                let (Some(h), Some(l)) = (hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) else {
                    return Err(UpgradeError::Malformed(
                        "malformed percent-encoding in path",
                    ));
                };
                match h * 16 + l {
                    0x2f | 0x5c => return Err(UpgradeError::Malformed("encoded slash in path")),
                    0x00 => return Err(UpgradeError::Malformed("encoded NUL in path")),
                    // An encoded dot only ever serves to hide a dot segment from one decoder.
                    0x2e => return Err(UpgradeError::Malformed("encoded dot in path")),
                    // An encoded `%` starts a second round of decoding (`%252e`, `%25%32%65`): double encoding.
                    0x25 => return Err(UpgradeError::Malformed("double percent-encoding in path")),
                    _ => {}
                }
                i += 3;
            }
            _ => i += 1,
        }
    }
    let dot_segment = path.split('/').any(|seg| {
        // A matrix parameter (`..;x`) does not stop Tomcat-style servers from reading `..`, nor does an encoded one
        // (`..%3bx`) for a server that decodes before it strips parameters.
        let lower = seg.to_ascii_lowercase();
        let end = [lower.find(';'), lower.find("%3b")]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(lower.len());
        let decoded = lower[..end].replace("%2e", ".");
        decoded == "." || decoded == ".."
    });
    if dot_segment {
        return Err(UpgradeError::Malformed("dot segments in path"));
    }
    Ok(())
}

/// The checks RFC 6455 puts on a client's opening handshake, after routing.
///
/// # Errors
/// The first failed check, in the order: method, HTTP version, Host, Upgrade/Connection, version, key.
pub fn check_upgrade(head: &RequestHead) -> Result<(), UpgradeError> {
    if head.method != "GET" {
        return Err(UpgradeError::Method);
    }
    if head.minor_version < 1 {
        return Err(UpgradeError::Malformed("WebSocket needs HTTP/1.1"));
    }
    match head.single("Host")? {
        Some(h) if !h.trim().is_empty() => {}
        _ => return Err(UpgradeError::Malformed("missing Host")),
    }
    if !head.has_token("Upgrade", "websocket") || !head.has_token("Connection", "upgrade") {
        return Err(UpgradeError::UpgradeRequired);
    }
    // An upgrade carries no body; one that claims to would leave bytes whose meaning depends on who parses them.
    let has_body = head.values("Content-Length").any(|v| v.trim() != "0")
        || head.values("Transfer-Encoding").next().is_some();
    if has_body {
        return Err(UpgradeError::Malformed("upgrade request with a body"));
    }
    match head
        .single("Sec-WebSocket-Version")
        .map_err(|_| UpgradeError::Version)?
    {
        Some(v) if v.trim() == "13" => {}
        _ => return Err(UpgradeError::Version),
    }
    let key = head
        .single("Sec-WebSocket-Key")
        .map_err(|_| UpgradeError::Key)?
        .ok_or(UpgradeError::Key)?;
    match base64::engine::general_purpose::STANDARD.decode(key.trim()) {
        Ok(raw) if raw.len() == 16 => Ok(()),
        _ => Err(UpgradeError::Key),
    }
}

/// `Sec-WebSocket-Accept` for a key (RFC 6455 section 4.2.2).
#[must_use]
pub fn accept_key(key: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key.trim().as_bytes());
    ctx.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(ctx.finish().as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::refusal::Refusal;

    const GOOD: &[u8] = b"GET /ws?x=1 HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\nEXTRA";

    fn head(raw: &[u8]) -> RequestHead {
        parse_head(raw).expect("parses").expect("complete").0
    }

    #[test]
    fn parses_and_keeps_what_follows() {
        let (h, used) = parse_head(GOOD).expect("ok").expect("complete");
        assert_eq!(&GOOD[used..], b"EXTRA");
        assert_eq!((h.path(), h.query()), ("/ws", Some("x=1")));
        assert_eq!(check_upgrade(&h), Ok(()));
        assert!(matches!(parse_head(&GOOD[..20]), Ok(None)));
    }

    #[test]
    fn rfc6455_accept_example() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn each_check_has_its_answer() {
        let s = String::from_utf8_lossy(GOOD).into_owned();
        let cases = [
            (s.replace("GET", "POST"), 405),
            (s.replace("Upgrade: websocket\r\n", ""), 426),
            (s.replace("Version: 13", "Version: 8"), 400),
            (s.replace("dGhlIHNhbXBsZSBub25jZQ==", "short"), 400),
            (s.replace("Host: gw\r\n", ""), 400),
            (
                s.replace("Host: gw\r\n", "Host: gw\r\nContent-Length: 5\r\n"),
                400,
            ),
            (
                s.replace("Host: gw\r\n", "Host: gw\r\nTransfer-Encoding: chunked\r\n"),
                400,
            ),
        ];
        for (raw, status) in cases {
            let err = check_upgrade(&head(raw.as_bytes())).expect_err(&raw);
            assert_eq!(Refusal::Upgrade(err).http().status, status, "{raw}");
        }
        assert!(matches!(
            parse_head(b"GET /a/../b HTTP/1.1\r\n\r\n"),
            Err(UpgradeError::Malformed(_))
        ));
        assert!(matches!(
            parse_head(b"GET /a/%2E%2e/b HTTP/1.1\r\n\r\n"),
            Err(UpgradeError::Malformed(_))
        ));
        assert!(matches!(
            parse_head(b"GET http://x/ HTTP/1.1\r\n\r\n"),
            Err(UpgradeError::Malformed(_))
        ));
        assert!(matches!(
            parse_head(b"\x16\x03\x01garbage\r\n\r\n"),
            Err(UpgradeError::Malformed(_))
        ));
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        for bad in [
            "/a/../b",
            "/a/..;/b",
            "/a/.;x/b",
            "/a/%2e%2E/b",
            "/a/.%2e",
            "/a%2fb",
            "/a%2Fb",
            "/a%5cb",
            "/a\\b",
            "/a/%252e%252e/b",
            "/a/%252Fb",
            "/a%00b",
            "/a%zz",
            "/a%2",
        ] {
            assert!(
                matches!(normalize_path(bad), Err(UpgradeError::Malformed(_))),
                "{bad}"
            );
            let raw = format!("GET {bad}?x=1 HTTP/1.1\r\nHost: gw\r\n\r\n");
            let err = parse_head(raw.as_bytes()).expect_err(bad);
            assert_eq!(Refusal::Upgrade(err).http().status, 400, "{bad}");
        }
        for bad in [
            "/a%2eb",
            "/%25%32%65%25%32%65/x",
            "/%252%65%252%65/x",
            "/%25%32%66",
            "/%25%35%63",
            "/%25%30%30",
            "/a/%25",
            // Found by the path fuzz target: `..;bb` once the `%3b` is decoded.
            "/..%3bbb",
            "/a/..%3B/b",
        ] {
            assert!(normalize_path(bad).is_err(), "{bad}");
        }
        for good in ["/", "/mqtt", "/a/b.c/..d/...", "/a%20b", "/a/;b", "/a/%3b"] {
            assert_eq!(normalize_path(good), Ok(()), "{good}");
        }
    }

    #[test]
    fn bad_version_answer_names_13() {
        let bytes = String::from_utf8(
            Refusal::Upgrade(UpgradeError::Version)
                .http()
                .to_bytes("text/plain"),
        )
        .expect("utf8");
        assert!(bytes.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        assert!(bytes.contains("Sec-WebSocket-Version: 13\r\n"));
    }

    #[test]
    fn upgrade_required_has_one_connection_header() {
        let bytes = String::from_utf8(
            Refusal::Upgrade(UpgradeError::UpgradeRequired)
                .http()
                .to_bytes("text/plain"),
        )
        .expect("utf8");
        assert_eq!(bytes.matches("Connection:").count(), 1, "{bytes}");
        assert!(bytes.contains("Connection: Upgrade, close\r\n"), "{bytes}");
        assert!(bytes.contains("Upgrade: websocket\r\n"), "{bytes}");
    }
}
