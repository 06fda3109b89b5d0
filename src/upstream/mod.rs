//! Dialing the upstream and forwarding the handshake: the client's upgrade request is rewritten for the upstream
//! (Host, hop-by-hop headers, X-Forwarded-*, identity headers, token carriers removed), and the upstream's answer
//! must be a valid 101 for the same key before anything is relayed.
//!
//! A route's upstream is a pool of endpoints (`pool`): every address its URLs resolve to (`resolve`), one picked
//! per session (`balance`), each behind its own circuit breaker (`breaker`), with retries on another endpoint
//! before the client is answered.

mod balance;
mod breaker;
mod pool;
mod resolve;

pub(crate) use pool::{Lease, Pool};

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::auth::source::{is_bearer, strip_cookie, strip_query, strip_subprotocols};
use crate::auth::Identity;
use crate::net::{dial, DialError, Io, WsUrl};
use crate::proxy_protocol::Cidr;
use crate::route::Route;
use crate::upgrade::{accept_key, RequestHead};

/// Largest 101 head accepted from an upstream.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// Headers never forwarded as received: hop-by-hop ones, those the gateway sets itself, and identity headers a
/// client could otherwise forge. Names are compared after [`header_key`], so `X_Auth_Subject` (which CGI-style
/// backends read as `X-Auth-Subject`) goes too.
const DROPPED: &[&str] = &[
    "host",
    "connection",
    "upgrade",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "proxy-authorization",
    "content-length",
    "sec-websocket-protocol",
    "cookie",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-real-ip",
    "x-auth-subject",
    "forwarded",
];

/// What the gateway knows about the client that the upstream should hear.
#[derive(Debug, Clone, Copy)]
pub struct Forwarding<'a> {
    /// The client's address (after PROXY protocol, when trusted).
    pub client_ip: IpAddr,
    /// Whether the client reached the gateway over TLS.
    pub tls: bool,
    /// Peers whose X-Forwarded-For and X-Forwarded-Proto are believed (`TRUSTED_PROXIES`).
    pub trusted_proxies: &'a [Cidr],
    /// The verified identity.
    pub identity: &'a Identity,
    /// Cookie carrying the token, stripped.
    pub cookie_name: &'a str,
    /// Query parameter carrying the token, stripped.
    pub query_param: &'a str,
    /// Header names of forwarded claims, stripped from the client's request.
    pub claim_headers: &'a [(String, String)],
    /// Offer no extensions upstream (the gateway answered the client's handshake itself, without any).
    pub no_extensions: bool,
}

/// The request to send upstream, and what checking its answer needs.
#[derive(Debug, Clone)]
pub struct UpstreamRequest {
    /// The bytes of the request head.
    pub bytes: Vec<u8>,
    /// The client's `Sec-WebSocket-Key`, reused so the client's own accept check holds.
    pub key: String,
    /// Subprotocols offered upstream; the upstream may select only one of these.
    pub offered: Vec<String>,
}

/// Builds the request for `upstream` (one of `route`'s URLs) from the client's head.
#[must_use]
pub fn build_request(
    head: &RequestHead,
    route: &Route,
    upstream: &WsUrl,
    fwd: &Forwarding<'_>,
) -> UpstreamRequest {
    let query = head.query().and_then(|q| strip_query(q, fwd.query_param));
    let target = route.upstream_target(upstream, head.path(), query.as_deref());
    let mut out = format!(
        "GET {target} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",
        upstream.authority
    );

    let listed_in_connection: Vec<String> = head
        .values("Connection")
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty() && t != "upgrade")
        .collect();
    let mut key = String::new();
    for h in &head.headers {
        let lower = header_key(&h.name);
        if DROPPED.contains(&lower.as_str())
            || (fwd.no_extensions && lower == "sec-websocket-extensions")
            || listed_in_connection.contains(&lower)
            || fwd
                .claim_headers
                .iter()
                .any(|(_, name)| header_key(name) == lower)
        {
            continue;
        }
        let Ok(value) = std::str::from_utf8(&h.value) else {
            continue;
        };
        if lower == "authorization" && is_bearer(value) {
            continue;
        }
        if lower == "sec-websocket-key" {
            key = value.trim().to_owned();
        }
        out.push_str(&format!("{}: {}\r\n", h.name, value));
    }

    let offered: Vec<String> = if route.copy_subprotocol {
        strip_subprotocols(head.values("Sec-WebSocket-Protocol"))
            .map(|s| s.split(',').map(|p| p.trim().to_owned()).collect())
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    if !offered.is_empty() {
        out.push_str(&format!(
            "Sec-WebSocket-Protocol: {}\r\n",
            offered.join(", ")
        ));
    }
    let cookies: Vec<String> = head
        .values("Cookie")
        .filter_map(|c| strip_cookie(c, fwd.cookie_name))
        .collect();
    if !cookies.is_empty() {
        out.push_str(&format!("Cookie: {}\r\n", cookies.join("; ")));
    }

    // A client's X-Forwarded-* are believed only from TRUSTED_PROXIES; from anyone else they are replaced.
    let peer = fwd.client_ip;
    let trusted = fwd.trusted_proxies.iter().any(|c| c.contains(peer));
    let prior: Vec<&str> = if trusted {
        head.values("X-Forwarded-For")
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .collect()
    } else {
        Vec::new()
    };
    let real_ip = real_client_ip(head, peer, fwd.trusted_proxies);
    let xff = prior
        .iter()
        .copied()
        .map(str::to_owned)
        .chain(std::iter::once(peer.to_string()))
        .collect::<Vec<_>>()
        .join(", ");
    let proto = match head.values("X-Forwarded-Proto").next() {
        _ if fwd.tls => "https",
        // Traefik writes `wss` (not `https`) on WebSocket upgrades it received over TLS.
        Some(p)
            if trusted
                && ["https", "wss"]
                    .iter()
                    .any(|s| p.trim().eq_ignore_ascii_case(s)) =>
        {
            "https"
        }
        _ => "http",
    };
    out.push_str(&format!(
        "X-Forwarded-For: {xff}\r\nX-Forwarded-Proto: {proto}\r\nX-Real-IP: {real_ip}\r\n"
    ));
    if let Some(host) = head.values("Host").next() {
        out.push_str(&format!("X-Forwarded-Host: {}\r\n", host.trim()));
    }
    if let Some(sub) = &fwd.identity.subject {
        out.push_str(&format!("X-Auth-Subject: {sub}\r\n"));
    }
    for (name, value) in &fwd.identity.forwarded {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    UpstreamRequest {
        bytes: out.into_bytes(),
        key,
        offered,
    }
}

/// The real client's address: `peer` itself, unless `peer` is one of the `trusted` proxies (`TRUSTED_PROXIES`);
/// then the rightmost `X-Forwarded-For` address that no trusted proxy vouches for (entries left of it could be
/// forged), or `peer` when there is none. What goes upstream as `X-Real-IP`, what the logs name as `client_ip`, and
/// what the handshake budget counts behind a proxy.
#[must_use]
pub fn real_client_ip(head: &RequestHead, peer: IpAddr, trusted: &[Cidr]) -> IpAddr {
    if !trusted.iter().any(|c| c.contains(peer)) {
        return peer;
    }
    head.values("X-Forwarded-For")
        .flat_map(|v| v.split(','))
        .filter_map(|a| a.trim().parse::<IpAddr>().ok())
        .filter(|a| !trusted.iter().any(|c| c.contains(*a)))
        .last()
        .unwrap_or(peer)
}

/// A header name as the upstream may read it: lower case, `_` as `-`.
fn header_key(name: &str) -> String {
    name.to_ascii_lowercase().replace('_', "-")
}

/// Why the upstream could not be used: 503 when every breaker of the route is open, 502 otherwise.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The route's host names resolve to no address.
    #[error("no endpoint: the upstream names resolve to nothing")]
    NoEndpoints,
    /// Every endpoint's circuit breaker is open: nothing was dialed.
    #[error("every endpoint's circuit breaker is open")]
    CircuitOpen {
        /// When the first breaker lets a dial through again.
        retry_after: Duration,
    },
    /// Connect or TLS failed.
    #[error("dial: {0}")]
    Dial(#[from] DialError),
    /// The connection failed during the handshake.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The upstream answered something other than 101.
    #[error("upstream answered {0}")]
    Status(u16),
    /// A 101 that does not complete this handshake.
    #[error("invalid handshake: {0}")]
    Handshake(&'static str),
    /// The dial deadline passed.
    #[error("timed out")]
    Timeout,
}

impl UpstreamError {
    /// Bounded label for logs and metrics.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::NoEndpoints => "resolve",
            UpstreamError::CircuitOpen { .. } => "circuit_open",
            UpstreamError::Dial(d) => d.kind(),
            UpstreamError::Io(_) => "io",
            UpstreamError::Status(_) => "status",
            UpstreamError::Handshake(_) => "handshake",
            UpstreamError::Timeout => "timeout",
        }
    }
}

impl UpstreamError {
    /// Whether this says the endpoint is down (counted by its breaker, retried elsewhere), rather than that it
    /// answered: a 4xx refusal of the upgrade (a wrong path, say) is the request's fault, and retrying it or
    /// opening breakers over it would let one bad request turn away everyone.
    #[must_use]
    pub fn is_endpoint_failure(&self) -> bool {
        match self {
            UpstreamError::Dial(_)
            | UpstreamError::Io(_)
            | UpstreamError::Handshake(_)
            | UpstreamError::Timeout => true,
            UpstreamError::Status(status) => *status >= 500,
            UpstreamError::NoEndpoints | UpstreamError::CircuitOpen { .. } => false,
        }
    }
}

/// The upstream's accepted handshake.
#[derive(Debug)]
pub struct Connected {
    /// The connection.
    pub io: Io,
    /// The 101 head, forwarded to the client as received.
    pub response: Vec<u8>,
    /// Bytes the upstream sent after its 101.
    pub rest: Vec<u8>,
    /// The subprotocol the upstream selected.
    pub protocol: Option<String>,
}

/// Dials `addr`, one of `url`'s endpoints, sends `req` and checks the 101, all within `limit`.
///
/// # Errors
/// See [`UpstreamError`].
pub async fn connect(
    url: &WsUrl,
    addr: SocketAddr,
    req: &UpstreamRequest,
    tls: &Arc<rustls::ClientConfig>,
    limit: Duration,
) -> Result<Connected, UpstreamError> {
    let attempt = async {
        let mut io = dial(url, addr, tls, limit).await?;
        let Handshake {
            response,
            rest,
            protocol,
        } = handshake(&mut io, req).await?;
        Ok(Connected {
            io,
            response,
            rest,
            protocol,
        })
    };
    tokio::time::timeout(limit, attempt)
        .await
        .map_err(|_| UpstreamError::Timeout)?
}

/// A completed client side of the opening handshake.
#[derive(Debug)]
pub struct Handshake {
    /// The 101 head as received.
    pub response: Vec<u8>,
    /// Bytes the server sent after its 101 (the first frames): they belong to the session.
    pub rest: Vec<u8>,
    /// The subprotocol the server selected.
    pub protocol: Option<String>,
}

/// The client side of the opening handshake, shared by the upstream dial, the example clients and the load
/// generator: sends `req`, reads the answer up to a bounded head, and checks it is a 101 for this key and one of
/// the offered subprotocols.
///
/// # Errors
/// I/O, a status other than 101, or a 101 that does not complete this handshake.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    req: &UpstreamRequest,
) -> Result<Handshake, UpstreamError> {
    io.write_all(&req.bytes).await?;
    io.flush().await?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Err(UpstreamError::Handshake("closed before answering"));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some((used, protocol)) = check_response(&buf, req)? {
            let rest = buf.split_off(used);
            return Ok(Handshake {
                response: buf,
                rest,
                protocol,
            });
        }
        if buf.len() > MAX_RESPONSE_HEAD {
            return Err(UpstreamError::Handshake("response head too large"));
        }
    }
}

impl UpstreamRequest {
    /// A client's upgrade request for `url` with a fresh random key and `headers` (name, value) added, offering
    /// `protocols`.
    #[must_use]
    pub fn client(
        url: &crate::net::Url,
        headers: &[(&str, &str)],
        protocols: &[&str],
    ) -> UpstreamRequest {
        use base64::Engine;
        use ring::rand::SecureRandom;
        let mut raw = [0u8; 16];
        // Without randomness the key is all zeros: still a valid handshake, only predictable.
        let _ = ring::rand::SystemRandom::new().fill(&mut raw);
        let key = base64::engine::general_purpose::STANDARD.encode(raw);
        let mut out = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n",
            url.path_and_query, url.authority
        );
        for (name, value) in headers {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        if !protocols.is_empty() {
            out.push_str(&format!(
                "Sec-WebSocket-Protocol: {}\r\n",
                protocols.join(", ")
            ));
        }
        out.push_str("\r\n");
        UpstreamRequest {
            bytes: out.into_bytes(),
            key,
            offered: protocols.iter().map(|p| (*p).to_owned()).collect(),
        }
    }
}

/// Checks a complete 101; `Ok(None)` while incomplete.
fn check_response(
    buf: &[u8],
    req: &UpstreamRequest,
) -> Result<Option<(usize, Option<String>)>, UpstreamError> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let used = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(UpstreamError::Handshake("malformed response")),
    };
    let status = resp.code.unwrap_or(0);
    if status != 101 {
        return Err(UpstreamError::Status(status));
    }
    let values = |name: &str| -> Vec<String> {
        resp.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .filter_map(|h| std::str::from_utf8(h.value).ok())
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().to_owned())
            .collect()
    };
    if !values("Upgrade")
        .iter()
        .any(|v| v.eq_ignore_ascii_case("websocket"))
    {
        return Err(UpstreamError::Handshake("no Upgrade: websocket"));
    }
    if !values("Connection")
        .iter()
        .any(|v| v.eq_ignore_ascii_case("upgrade"))
    {
        return Err(UpstreamError::Handshake("no Connection: upgrade"));
    }
    let accept = values("Sec-WebSocket-Accept");
    if accept.len() != 1 || accept[0] != accept_key(&req.key) {
        return Err(UpstreamError::Handshake("wrong Sec-WebSocket-Accept"));
    }
    let protocol = values("Sec-WebSocket-Protocol");
    let protocol = match protocol.as_slice() {
        [] => None,
        [p] if req.offered.iter().any(|o| o == p) => Some(p.clone()),
        _ => return Err(UpstreamError::Handshake("subprotocol not offered")),
    };
    Ok(Some((used, protocol)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::Url;
    use crate::upgrade::parse_head;

    #[test]
    fn request_is_rewritten_and_carries_no_token() {
        let raw = "GET /mqtt?access_token=SECRET&room=1 HTTP/1.1\r\nHost: gw.example\r\nUpgrade: websocket\r\n\
Connection: Upgrade, X-Hop\r\nX-Hop: 1\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Authorization: Bearer SECRET\r\nSec-WebSocket-Protocol: mqtt, bearer.SECRET, Bearer.SECRET\r\n\
Cookie: session=SECRET; theme=dark; Session=SECRET\r\nAuthorization: Bearer\tSECRET\r\nAuthorization: BEARER\r\n\
X-Auth-Subject: mallory\r\nX_Auth_Subject: mallory\r\nx_auth_email: mallory@x\r\nX-Forwarded-For: 10.0.0.1\r\n\
X-Forwarded-Proto: https\r\nUser-Agent: t\r\n\r\n";
        let head = parse_head(raw.as_bytes()).expect("ok").expect("complete").0;
        let upstream = Url::parse_ws("ws://broker:9001").expect("url");
        let route = Route {
            prefix: "/mqtt".into(),
            upstreams: vec![upstream.clone()],
            copy_subprotocol: true,
            preserve_query: true,
            mqtt_connect_auth: None,
            mqtt_username_claim: None,
            mqtt_publish_acl: None,
            mqtt_subscribe_acl: None,
        };
        let identity = Identity {
            subject: Some("alice".into()),
            token_id: None,
            session_id: None,
            issued_at: None,
            expires_at: 0,
            limit_claim: None,
            claims: Vec::new(),
            roles: Vec::new(),
            forwarded: vec![],
        };
        let fwd = Forwarding {
            client_ip: "192.0.2.7".parse().expect("ip"),
            tls: true,
            identity: &identity,
            cookie_name: "session",
            query_param: "access_token",
            claim_headers: &[("email".into(), "X-Auth-Email".into())],
            no_extensions: false,
            trusted_proxies: &[],
        };
        let req = build_request(&head, &route, &upstream, &fwd);
        let text = String::from_utf8(req.bytes).expect("utf8");
        assert!(!text.contains("SECRET"), "{text}");
        assert!(
            text.starts_with("GET /mqtt?room=1 HTTP/1.1\r\nHost: broker:9001\r\n"),
            "{text}"
        );
        assert!(
            !text.contains("X-Hop") && !text.contains("BEARER"),
            "{text}"
        );
        assert!(
            text.contains("X-Auth-Subject: alice\r\n") && !text.contains("mallory"),
            "{text}"
        );
        assert!(!text.to_ascii_lowercase().contains("x_auth"), "{text}");
        assert!(text.contains("Sec-WebSocket-Protocol: mqtt\r\n"), "{text}");
        assert!(text.contains("Cookie: theme=dark\r\n"), "{text}");
        // The client is not a trusted proxy: its X-Forwarded-For is replaced, not extended.
        assert!(
            text.contains("X-Forwarded-For: 192.0.2.7\r\n") && !text.contains("10.0.0.1"),
            "{text}"
        );
        assert!(
            text.contains("X-Forwarded-Proto: https\r\nX-Real-IP: 192.0.2.7\r\n"),
            "{text}"
        );
        assert_eq!(req.key, "dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(req.offered, vec!["mqtt".to_owned()]);

        // In plain mode an untrusted client's X-Forwarded-Proto is not believed either.
        let plain = Forwarding { tls: false, ..fwd };
        let text =
            String::from_utf8(build_request(&head, &route, &upstream, &plain).bytes).expect("utf8");
        assert!(text.contains("X-Forwarded-Proto: http\r\n"), "{text}");

        // From a trusted proxy both are believed, and X-Real-IP is the rightmost untrusted address.
        let proxies = [
            "192.0.2.0/24".parse().expect("cidr"),
            "10.9.0.0/16".parse().expect("cidr"),
        ];
        let raw = raw.replace(
            "X-Forwarded-For: 10.0.0.1\r\n",
            "X-Forwarded-For: 1.2.3.4, 10.0.0.1, 10.9.0.5\r\n",
        );
        let head = parse_head(raw.as_bytes()).expect("ok").expect("complete").0;
        let behind = Forwarding {
            tls: false,
            trusted_proxies: &proxies,
            ..fwd
        };
        let text = String::from_utf8(build_request(&head, &route, &upstream, &behind).bytes)
            .expect("utf8");
        assert!(
            text.contains("X-Forwarded-For: 1.2.3.4, 10.0.0.1, 10.9.0.5, 192.0.2.7\r\n"),
            "{text}"
        );
        assert!(
            text.contains("X-Forwarded-Proto: https\r\nX-Real-IP: 10.0.0.1\r\n"),
            "{text}"
        );

        // Traefik sends `X-Forwarded-Proto: wss` for an upgrade it took over TLS: that is https too.
        let raw = raw.replace("X-Forwarded-Proto: https\r\n", "X-Forwarded-Proto: wss\r\n");
        let head = parse_head(raw.as_bytes()).expect("ok").expect("complete").0;
        let text = String::from_utf8(build_request(&head, &route, &upstream, &behind).bytes)
            .expect("utf8");
        assert!(text.contains("X-Forwarded-Proto: https\r\n"), "{text}");
    }

    #[test]
    fn response_checks() {
        let req = UpstreamRequest {
            bytes: vec![],
            key: "dGhlIHNhbXBsZSBub25jZQ==".into(),
            offered: vec!["mqtt".into()],
        };
        let ok =
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: mqtt\r\n\r\nDATA";
        let (used, proto) = check_response(ok.as_bytes(), &req)
            .expect("ok")
            .expect("complete");
        assert_eq!((&ok[used..], proto.as_deref()), ("DATA", Some("mqtt")));
        assert!(check_response(ok.replace("s3pP", "xxxx").as_bytes(), &req).is_err());
        assert!(check_response(ok.replace("mqtt", "bearer.x").as_bytes(), &req).is_err());
        assert!(matches!(
            check_response(b"HTTP/1.1 403 Forbidden\r\n\r\n", &req),
            Err(UpstreamError::Status(403))
        ));
        assert!(check_response(&ok.as_bytes()[..30], &req)
            .expect("partial")
            .is_none());
    }
}
