//! The edge decides once: every way admission can fail is one [`Refusal`], and [`refuse`] answers it (an HTTP
//! status, or CONNACK plus Close once the gateway has completed an MQTT client's handshake itself), logs one line
//! and counts it. The table of statuses and close codes lives here, and only here; the modules that find the
//! problems (`upgrade`, `auth`, `upstream`, `mqtt`) know nothing of HTTP answers. The README's "Answers and
//! statuses" table is this file in prose.

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::auth::AuthError;
use crate::frame;
use crate::limits::LimitError;
use crate::mqtt::MqttError;
use crate::mqtt_identity::IdentityError;
use crate::net::Io;
use crate::route::Route;
use crate::server::Gateway;
use crate::upgrade::{RequestHead, UpgradeError};
use crate::upstream::UpstreamError;

/// Why a connection was refused before it became a session.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refusal {
    /// The request is not an acceptable upgrade.
    #[error("{0}")]
    Upgrade(#[from] UpgradeError),
    /// Authentication failed.
    #[error("{0}")]
    Auth(#[from] AuthError),
    /// The Origin is not allowed, missing when required, or not text.
    #[error("origin not allowed")]
    Origin,
    /// The upstream cannot be used.
    #[error("{0}")]
    Upstream(#[from] UpstreamError),
    /// The handshake deadline passed (request head, or the MQTT CONNECT).
    #[error("handshake timed out")]
    HandshakeTimeout,
    /// Every session slot (`MAX_CONNECTIONS`) is taken.
    #[error("session limit reached")]
    Busy,
    /// The first MQTT packet is not a valid CONNECT.
    #[error("{0}")]
    Mqtt(#[from] MqttError),
    /// The verified identity may not use this CONNECT (client id outside `MQTT_CLIENT_ID_POLICY`, or no username
    /// claim).
    #[error("{0}")]
    MqttIdentity(#[from] IdentityError),
    /// The subject is over `RATE_LIMIT_PER_SECOND` or `MAX_SESSIONS_PER_SUBJECT`.
    #[error("{0}")]
    Limit(#[from] LimitError),
    /// The client's address (from `X-Forwarded-For` of a trusted proxy) spent its handshake budget
    /// (`HANDSHAKE_RATE_PER_IP`); `retry_after` in whole seconds.
    #[error("handshake budget of this address spent")]
    HandshakeBudget {
        /// Seconds until the address may try again.
        retry_after: u64,
    },
}

/// Where the answer goes: an HTTP response, or frames after the gateway's own 101 to an MQTT client (with the
/// protocol level once the CONNECT has been read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Channel {
    /// Before any 101: an HTTP response.
    Http,
    /// After the gateway's 101 on the CONNECT-password path.
    Mqtt(Option<u8>),
}

impl Refusal {
    /// Bounded label for logs and metrics.
    #[must_use]
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Refusal::Upgrade(e) => e.kind(),
            Refusal::Auth(e) => e.kind(),
            Refusal::Origin => "origin",
            Refusal::Upstream(e) => e.kind(),
            Refusal::HandshakeTimeout => "handshake_timeout",
            Refusal::Busy => "busy",
            Refusal::Mqtt(_) => "mqtt_malformed",
            Refusal::MqttIdentity(e) => e.kind(),
            Refusal::Limit(e) => e.kind(),
            Refusal::HandshakeBudget { .. } => "handshake_budget",
        }
    }

    /// The HTTP answer.
    #[must_use]
    pub(crate) fn http(&self) -> Response {
        match self {
            Refusal::Upgrade(e) => match e {
                UpgradeError::Malformed(why) => Response::new(400, format!("bad request: {why}")),
                UpgradeError::TooLarge => Response::new(431, "request header fields too large"),
                UpgradeError::NoRoute => Response::new(404, "no route for this path"),
                UpgradeError::Method => {
                    Response::new(405, "only GET upgrades are served").header("Allow", "GET")
                }
                UpgradeError::UpgradeRequired => {
                    Response::new(426, "this endpoint serves WebSocket upgrades only")
                        .header("Upgrade", "websocket")
                        .header("Connection", "Upgrade")
                        .header("Sec-WebSocket-Version", "13")
                }
                UpgradeError::Version => Response::new(400, "unsupported Sec-WebSocket-Version")
                    .header("Sec-WebSocket-Version", "13"),
                UpgradeError::Key => Response::new(400, "missing or invalid Sec-WebSocket-Key"),
            },
            Refusal::Auth(AuthError::StoreDown) => Response::new(
                503,
                "authentication unavailable: the revocation store is unreachable",
            )
            .header("Retry-After", "5"),
            Refusal::Auth(AuthError::NoKeys) => Response::new(
                503,
                "authentication unavailable: signing keys not loaded yet",
            )
            .header("Retry-After", "5"),
            Refusal::Auth(other) => Response::new(401, format!("unauthorized: {other}")).header(
                "WWW-Authenticate",
                format!("Bearer error=\"invalid_token\", error_description=\"{other}\""),
            ),
            Refusal::Origin => Response::new(403, "origin not allowed"),
            Refusal::Upstream(UpstreamError::CircuitOpen { retry_after }) => Response::new(
                503,
                "upstream unavailable: every endpoint's circuit breaker is open",
            )
            .header("Retry-After", retry_after.as_secs().max(1).to_string()),
            Refusal::Upstream(_) => Response::new(502, "upstream unavailable"),
            Refusal::HandshakeTimeout => Response::new(408, "request head not received in time"),
            Refusal::Busy => {
                Response::new(503, "too many sessions; try again").header("Retry-After", "1")
            }
            Refusal::Mqtt(_) => Response::new(400, "bad request: expected MQTT CONNECT"),
            // Only ever answered on the MQTT channel (the CONNECT is read after a 101); total for completeness.
            Refusal::MqttIdentity(_) => {
                Response::new(403, "MQTT CONNECT not allowed for this token")
            }
            Refusal::Limit(LimitError::Rate { retry_after }) => Response::new(
                429,
                "too many new sessions for this subject; try again later",
            )
            .header("Retry-After", retry_after.to_string()),
            Refusal::Limit(LimitError::Sessions) => {
                Response::new(429, "too many sessions for this subject")
            }
            Refusal::HandshakeBudget { retry_after } => Response::new(
                429,
                "too many handshakes from this address; try again later",
            )
            .header("Retry-After", retry_after.to_string()),
        }
    }

    /// The MQTT answer for a client at protocol `level` (unknown before its CONNECT was read): an optional
    /// CONNACK, then the Close code and reason.
    #[must_use]
    pub(crate) fn mqtt(&self, level: Option<u8>) -> (Option<Vec<u8>>, u16, &'static str) {
        let not_authorized = level.map(crate::mqtt::connack_not_authorized);
        let unavailable = level.map(crate::mqtt::connack_unavailable);
        match self {
            Refusal::Mqtt(_) => (None, frame::CLOSE_PROTOCOL_ERROR, "expected MQTT CONNECT"),
            Refusal::HandshakeTimeout => (None, frame::CLOSE_POLICY, "no CONNECT in time"),
            Refusal::MqttIdentity(IdentityError::ClientId) => (
                level.map(crate::mqtt::connack_client_id_not_valid),
                frame::CLOSE_POLICY,
                "client identifier not valid",
            ),
            Refusal::MqttIdentity(IdentityError::Username) => {
                (not_authorized, frame::CLOSE_POLICY, "not authorized")
            }
            Refusal::Auth(_) | Refusal::Origin | Refusal::Upgrade(_) => {
                (not_authorized, frame::CLOSE_POLICY, "not authorized")
            }
            Refusal::Busy
            | Refusal::HandshakeBudget { .. }
            | Refusal::Upstream(UpstreamError::CircuitOpen { .. }) => {
                (unavailable, frame::CLOSE_TRY_AGAIN, "try again later")
            }
            Refusal::Upstream(_) => (
                unavailable,
                frame::CLOSE_UNAVAILABLE,
                "upstream unavailable",
            ),
            Refusal::Limit(e) => (
                level.map(crate::mqtt::connack_quota_exceeded),
                frame::CLOSE_POLICY,
                match e {
                    LimitError::Rate { .. } => "rate limit exceeded",
                    LimitError::Sessions => "session limit",
                },
            ),
        }
    }
}

/// Where a connection is when it is refused: what the log line names, and how the answer is sent.
#[derive(Clone, Copy)]
pub(crate) struct Refuser<'a> {
    pub(crate) gw: &'a Gateway,
    pub(crate) peer: SocketAddr,
    pub(crate) head: Option<&'a RequestHead>,
    pub(crate) route: Option<&'a Route>,
    pub(crate) channel: Channel,
}

impl Refuser<'_> {
    /// [`refuse`] from here.
    pub(crate) async fn refuse<T>(&self, io: &mut Io, refusal: Refusal) -> Option<T> {
        refuse(
            self.gw,
            io,
            self.peer,
            self.head,
            self.route,
            self.channel,
            refusal,
        )
        .await
    }
}

/// Answers `refusal` on `channel`, counts it and logs one line; the path is logged without its query (which may
/// carry a token). Always `None`: the connection ends here.
pub(crate) async fn refuse<T>(
    gw: &Gateway,
    io: &mut Io,
    peer: SocketAddr,
    head: Option<&RequestHead>,
    route: Option<&Route>,
    channel: Channel,
    refusal: Refusal,
) -> Option<T> {
    // A flood's refusals are logged at most once a second, with the number of lines held back.
    let mut suppressed = None;
    match &refusal {
        Refusal::Auth(a) => gw.metrics.auth_failure(a.kind()),
        Refusal::HandshakeBudget { .. } => {
            gw.metrics
                .rate_limit_violations
                .get_or_create(&[("kind", "handshake_ip")])
                .inc();
            suppressed = gw.handshake_budget.as_ref().map(|b| b.log.allow());
        }
        _ => {}
    }
    let log = suppressed.is_none_or(|s| s.is_some());
    let suppressed = suppressed.flatten();
    // The real client: the same address X-Real-IP names upstream.
    let client_ip = head.map_or(peer.ip(), |h| {
        crate::upstream::real_client_ip(h, peer.ip(), &gw.config.forwarded_trusted)
    });
    let path = head.map_or("", |h| h.path());
    let route = route.map_or("", |r| r.prefix.as_str());
    match channel {
        Channel::Http => {
            let resp = refusal.http();
            gw.metrics.reject(resp.status);
            if log {
                tracing::info!(event = "rejected", peer = %peer, client_ip = %client_ip, status = resp.status,
                    reason = refusal.kind(), path, route, detail = %refusal, suppressed, "request refused");
            }
            let _ = resp.send(io).await;
        }
        Channel::Mqtt(level) => {
            let (connack, code, reason) = refusal.mqtt(level);
            gw.metrics
                .rejections
                .get_or_create(&[("status", "mqtt_connack")])
                .inc();
            if log {
                tracing::info!(event = "rejected", peer = %peer, client_ip = %client_ip, status = 101,
                    reason = refusal.kind(), path, route, close_code = code, detail = %refusal, suppressed,
                    "MQTT CONNECT refused");
            }
            let mut out = connack
                .map(|c| frame::encode(frame::OP_BINARY, &c, None))
                .unwrap_or_default();
            out.extend_from_slice(&frame::close_frame(code, reason, None));
            let _ = io.write_all(&out).await;
            let _ = io.flush().await;
            let _ = io.shutdown().await;
        }
    }
    None
}

/// A complete HTTP response the gateway writes itself: status, a few headers, a short text body.
#[derive(Debug, Clone)]
pub(crate) struct Response {
    /// Status code.
    pub status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
}

impl Response {
    /// A response with a plain-text body (a newline is added).
    #[must_use]
    pub(crate) fn new(status: u16, body: impl Into<String>) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// Adds a header.
    #[must_use]
    pub(crate) fn header(mut self, name: &'static str, value: impl Into<String>) -> Response {
        self.headers.push((name, value.into()));
        self
    }

    /// The bytes on the wire; every response closes the connection.
    #[must_use]
    pub(crate) fn to_bytes(&self, content_type: &str) -> Vec<u8> {
        let body = if self.body.is_empty() || self.body.ends_with('\n') {
            self.body.clone()
        } else {
            format!("{}\n", self.body)
        };
        let mut out = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        // One Connection header: a response that names its own (426's `Upgrade`) gets `close` added to it.
        let mut connection = "close".to_owned();
        for (n, v) in &self.headers {
            if n.eq_ignore_ascii_case("Connection") {
                connection = format!("{v}, close");
            } else {
                out.push_str(&format!("{n}: {v}\r\n"));
            }
        }
        out.push_str(&format!(
            "Content-Type: {content_type}\r\nContent-Length: {}\r\nConnection: {connection}\r\nCache-Control: no-store\r\n\r\n{body}",
            body.len()
        ));
        out.into_bytes()
    }

    /// Writes the response and shuts the write side down.
    ///
    /// # Errors
    /// The peer is gone.
    pub(crate) async fn send<W: AsyncWrite + Unpin>(&self, io: &mut W) -> io::Result<()> {
        io.write_all(&self.to_bytes("text/plain; charset=utf-8"))
            .await?;
        io.flush().await?;
        io.shutdown().await
    }
}

/// Reason phrase for the statuses the gateway sends.
#[must_use]
pub(crate) fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "",
    }
}
