//! Streams and URLs shared by the listener, the upstream dialer and the JWKS fetcher.
//!
//! [`Io`] is one type for every socket the gateway holds (plain TCP, server-side TLS, client-side TLS), so the relay
//! is written once. [`Url`] is the small subset of URLs the gateway dials: scheme, host, port, path and query.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A socket the gateway reads and writes, with or without TLS.
#[derive(Debug)]
pub enum Io {
    /// Plain TCP.
    Plain(TcpStream),
    /// A client's TLS connection to the gateway.
    ServerTls(Box<crate::tls_stream::ServerTls>),
    /// The gateway's TLS connection to an upstream or the identity provider.
    ClientTls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Io {
    /// Whether the connection is TLS.
    #[must_use]
    pub fn is_tls(&self) -> bool {
        !matches!(self, Io::Plain(_))
    }
}

macro_rules! delegate {
    ($self:ident, $method:ident($($arg:expr),*)) => {
        match $self.get_mut() {
            Io::Plain(s) => Pin::new(s).$method($($arg),*),
            Io::ServerTls(s) => Pin::new(s.as_mut()).$method($($arg),*),
            Io::ClientTls(s) => Pin::new(s.as_mut()).$method($($arg),*),
        }
    };
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, poll_read(cx, buf))
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, poll_shutdown(cx))
    }
}

/// A `ws://`, `wss://`, `http://` or `https://` URL, split into what a dialer needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// The scheme, lower case.
    pub scheme: String,
    /// `wss` or `https`.
    pub secure: bool,
    /// Host name or IP literal, without brackets.
    pub host: String,
    /// Port, explicit or the scheme's default.
    pub port: u16,
    /// Path and query, at least `/`.
    pub path_and_query: String,
    /// Whether the URL named a path other than `/`.
    pub has_path: bool,
    /// Value for the `Host` header (`host` or `host:port` when the port is not the default).
    pub authority: String,
}

/// A WebSocket upstream URL.
pub type WsUrl = Url;
/// An identity-provider URL.
pub type HttpUrl = Url;

impl Url {
    /// Parses a `ws://` or `wss://` URL.
    ///
    /// # Errors
    /// Another scheme, user info, a fragment, a bad port or an empty host.
    pub fn parse_ws(s: &str) -> Result<Url, String> {
        Url::parse_with(s, "ws", "wss")
    }

    /// Parses an `http://` or `https://` URL.
    ///
    /// # Errors
    /// As for [`Url::parse_ws`].
    pub fn parse_http(s: &str) -> Result<Url, String> {
        Url::parse_with(s, "http", "https")
    }

    fn parse_with(s: &str, plain: &str, secure: &str) -> Result<Url, String> {
        let (scheme, rest) = s
            .split_once("://")
            .ok_or_else(|| format!("`{s}` is not a {plain}:// or {secure}:// URL"))?;
        let scheme = scheme.to_ascii_lowercase();
        let is_secure = if scheme == secure {
            true
        } else if scheme == plain {
            false
        } else {
            return Err(format!("scheme `{scheme}` is not {plain} or {secure}"));
        };
        if rest.contains('#') {
            return Err("a URL with a fragment cannot be dialed".into());
        }
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(split);
        if authority.contains('@') {
            return Err("user info in the URL is not supported".into());
        }
        let default_port = if is_secure { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or("unclosed `[` in host")?;
            match after.strip_prefix(':') {
                Some(p) => (h, p.parse::<u16>().map_err(|_| format!("bad port `{p}`"))?),
                None if after.is_empty() => (h, default_port),
                None => return Err(format!("bad authority `{authority}`")),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, p.parse::<u16>().map_err(|_| format!("bad port `{p}`"))?),
                None => (authority, default_port),
            }
        };
        if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c.is_control()) {
            return Err("empty or invalid host".into());
        }
        if port == 0 {
            return Err("port 0 cannot be dialed".into());
        }
        let path_and_query = match tail {
            "" => "/".to_owned(),
            t if t.starts_with('?') => format!("/{t}"),
            t => t.to_owned(),
        };
        if path_and_query.contains(|c: char| c.is_whitespace() || c.is_control()) {
            return Err("whitespace in path".into());
        }
        let has_path = !(tail.is_empty() || tail == "/");
        let bracketed = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        let authority = if port == default_port {
            bracketed
        } else {
            format!("{bracketed}:{port}")
        };
        Ok(Url {
            scheme,
            secure: is_secure,
            host: host.to_owned(),
            port,
            path_and_query,
            has_path,
            authority,
        })
    }

    /// The path without the query.
    #[must_use]
    pub fn path(&self) -> &str {
        self.path_and_query
            .split_once('?')
            .map_or(&self.path_and_query, |(p, _)| p)
    }

    /// The query without `?`, if any.
    #[must_use]
    pub fn query(&self) -> Option<&str> {
        self.path_and_query.split_once('?').map(|(_, q)| q)
    }
}

impl Url {
    /// The whole URL, query included, for making the request (never for a log line: see `Display`).
    #[must_use]
    pub fn request_url(&self) -> String {
        format!(
            "{}://{}{}",
            self.scheme, self.authority, self.path_and_query
        )
    }
}

impl std::fmt::Display for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The query may carry credentials; never print it.
        write!(f, "{}://{}{}", self.scheme, self.authority, self.path())
    }
}

/// Binds a listening socket; with `reuse_port`, `SO_REUSEPORT` lets several processes share the port (a new one
/// starts while the old one drains). Must run inside the runtime.
///
/// # Errors
/// The address cannot be bound (in use without `reuse_port` on both sides, or not local).
pub fn bind_listener(addr: SocketAddr, reuse_port: bool) -> io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    if reuse_port {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Connects TCP to `addr`, one of `url`'s endpoints (and TLS for a secure URL, verified against the URL's host
/// name), under one deadline.
///
/// # Errors
/// Connect or TLS failures, or the deadline.
pub async fn dial(
    url: &Url,
    addr: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
    limit: Duration,
) -> Result<Io, DialError> {
    let attempt = async {
        let tcp = TcpStream::connect(addr).await.map_err(DialError::Connect)?;
        let _ = tcp.set_nodelay(true);
        if !url.secure {
            return Ok(Io::Plain(tcp));
        }
        let name = ServerName::try_from(url.host.clone()).map_err(|_| DialError::BadName)?;
        let connector = tokio_rustls::TlsConnector::from(Arc::clone(tls));
        let stream = connector.connect(name, tcp).await.map_err(DialError::Tls)?;
        Ok(Io::ClientTls(Box::new(stream)))
    };
    tokio::time::timeout(limit, attempt)
        .await
        .map_err(|_| DialError::Timeout)?
}

/// Why a dial failed; [`DialError::kind`] is the bounded metric label.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// TCP connect.
    #[error("connect: {0}")]
    Connect(io::Error),
    /// The host is not a valid TLS server name.
    #[error("host is not a valid TLS server name")]
    BadName,
    /// TLS handshake, including certificate verification.
    #[error("tls: {0}")]
    Tls(io::Error),
    /// The deadline passed.
    #[error("timed out")]
    Timeout,
}

impl DialError {
    /// Bounded label for logs and metrics.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            DialError::Connect(_) => "connect",
            DialError::BadName => "bad_name",
            DialError::Tls(_) => "tls",
            DialError::Timeout => "timeout",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let u = Url::parse_ws("wss://broker.example:8443/mqtt?x=1").expect("url");
        assert!(u.secure);
        assert_eq!((u.host.as_str(), u.port), ("broker.example", 8443));
        assert_eq!(u.path_and_query, "/mqtt?x=1");
        assert_eq!(u.authority, "broker.example:8443");
        assert!(u.has_path);
        let u = Url::parse_ws("ws://[::1]:80").expect("v6");
        assert_eq!(
            (u.host.as_str(), u.port, u.authority.as_str()),
            ("::1", 80, "[::1]")
        );
        assert!(!u.has_path);
        assert_eq!(u.path_and_query, "/");
        assert!(Url::parse_ws("http://a/").is_err());
        assert!(Url::parse_ws("ws://user:pw@a/").is_err());
        assert!(Url::parse_ws("ws://a:99999/").is_err());
        assert!(Url::parse_ws("ws:///x").is_err());
        assert!(
            Url::parse_http("https://idp/realms/x/protocol/openid-connect/certs")
                .expect("http")
                .secure
        );
    }
}
