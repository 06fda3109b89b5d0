//! The relay of an inspected MQTT session (topic rules, or MQTT 5 re-authentication declared in the CONNECT), used
//! instead of the raw relay only for those sessions.
//!
//! Both directions are read as WebSocket frames and written as frames of the gateway's own: the client's MQTT
//! packets are checked one by one ([`Inspector`]) and sent on as one masked binary frame per read; the broker's
//! bytes are passed through (SUBACKs of narrowed SUBSCRIBEs rewritten) as one binary frame per read, and the
//! gateway's own packets (PUBACK, PUBREC, PUBCOMP, SUBACK, AUTH) go between two broker packets. Ping, Pong and
//! Close pass as they are. Since every frame either side receives is one the gateway wrote whole, a Close always
//! falls on a frame boundary.
//!
//! What the raw relay guarantees holds here too: the idle timeout, the write timeout (every write has it), the token
//! expiry (Close 1008; a re-authentication moves it), drain (Close 1001), revocation and eviction through the
//! registry, the message rate per client frame, and the lingering read for the client's Close. Writes are awaited
//! in turn, so a peer that stops reading stalls the session until the write timeout ends it.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::auth::jwt::unix_now;
use crate::auth::{AuthError, Identity};
use crate::budget::MessageRate;
use crate::frame::{self, OP_BINARY, OP_CLOSE};
use crate::mqtt_acl::{AclSettings, DenyAction, SessionRules};
use crate::mqtt_filter::{self, FilterError, FrameReader, Inspector, Verdict, WsEvent};
use crate::registry::{Refreshed, SessionControl};
use crate::relay::{mask_key, EndReason, Limits, Outcome};
use crate::server::Gateway;
use crate::shutdown::Signal;

/// Size of one read from either side.
const READ_SIZE: usize = 16 * 1024;
/// Packets of the gateway's own waiting for a broker packet boundary, at most (bytes): past it the client is not
/// read until they are sent.
const MAX_QUEUED: usize = 64 * 1024;

/// What admission hands the relay of an inspected session.
#[derive(Debug)]
pub(crate) struct Inspect {
    /// The packet state, holding the client's MQTT bytes read after the CONNECT.
    pub(crate) inspector: Inspector,
    /// The client's raw bytes after the frames that carried the CONNECT (frames not yet read).
    pub(crate) client_raw: Vec<u8>,
    /// The route's topic rules (the templates, filled in again after a refresh).
    pub(crate) acl: AclSettings,
    /// The Authentication Method when the CONNECT declared `MQTT_REAUTH_METHOD`.
    pub(crate) reauth_method: Option<String>,
    /// `sub` of the token the session started with: a refresh must carry the same.
    pub(crate) subject: Option<String>,
}

impl Inspect {
    /// The inspection of a session at `level` for `identity`; `tail` is the MQTT bytes after the CONNECT.
    pub(crate) fn new(
        level: u8,
        acl: AclSettings,
        reauth_method: Option<String>,
        identity: &Identity,
        tail: Vec<u8>,
        client_raw: Vec<u8>,
    ) -> Inspect {
        Inspect {
            inspector: Inspector::new(
                level,
                SessionRules::new(&acl, identity),
                reauth_method.clone(),
                tail,
            ),
            client_raw,
            acl,
            reauth_method,
            subject: identity.subject.clone(),
        }
    }
}

/// An inspected session being relayed.
pub(crate) struct MqttSession<C, U> {
    client: C,
    upstream: U,
    /// Bytes for the upstream before anything else (the CONNECT, as one frame).
    first: Vec<u8>,
    upstream_rest: Vec<u8>,
    inspect: Box<Inspect>,
    limits: Limits,
    expires_at: Instant,
    active: Instant,
    rate: Option<MessageRate>,
    client_frames: FrameReader,
    upstream_frames: FrameReader,
    /// The gateway's own packets for the client, waiting for a broker packet boundary.
    queued: Vec<u8>,
    up_bytes: u64,
    down_bytes: u64,
    client_eof: bool,
    upstream_eof: bool,
    client_closing: bool,
    upstream_closed: bool,
}

type Step = Result<(), EndReason>;

async fn send<W: AsyncWrite + Unpin>(
    w: &mut W,
    bytes: &[u8],
    limit: Duration,
    fails: EndReason,
) -> Step {
    if bytes.is_empty() {
        return Ok(());
    }
    match tokio::time::timeout(limit, async {
        w.write_all(bytes).await?;
        w.flush().await
    })
    .await
    {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(fails),
        Err(_) => Err(EndReason::WriteTimeout),
    }
}

fn filter_end(e: FilterError) -> EndReason {
    match e {
        FilterError::TooBig => EndReason::TooBig,
        FilterError::Malformed(_) => EndReason::ProtocolError,
    }
}

impl<C, U> MqttSession<C, U>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    /// A session over two connected streams: `first` goes upstream first, `upstream_rest` to the client.
    pub(crate) fn new(
        client: C,
        upstream: U,
        first: Vec<u8>,
        upstream_rest: Vec<u8>,
        inspect: Box<Inspect>,
        limits: Limits,
        expires_at: Instant,
    ) -> Self {
        MqttSession {
            client,
            upstream,
            first,
            upstream_rest,
            inspect,
            limits,
            expires_at,
            active: Instant::now(),
            rate: limits.messages.map(MessageRate::new),
            client_frames: FrameReader::new(true),
            upstream_frames: FrameReader::new(false),
            queued: Vec::new(),
            up_bytes: 0,
            down_bytes: 0,
            client_eof: false,
            upstream_eof: false,
            client_closing: false,
            upstream_closed: false,
        }
    }

    /// Relays until both sides close, a timer ends the session, the drain deadline passes or `control` asks.
    pub(crate) async fn run(
        &mut self,
        gw: &Gateway,
        mut signal: Signal,
        control: &SessionControl,
    ) -> Outcome {
        let reason = match self.start(gw, control).await {
            Ok(()) => self.relay(gw, &mut signal, control).await,
            Err(reason) => reason,
        };
        let mut close_sent = false;
        if let Some(req) = reason.close().filter(|_| !self.upstream_closed) {
            let _ = tokio::time::timeout(
                self.limits.close_grace,
                self.close(reason, req, &mut close_sent),
            )
            .await;
        }
        Outcome {
            reason,
            client_to_upstream: self.up_bytes,
            upstream_to_client: self.down_bytes,
            close_sent,
        }
    }

    /// The CONNECT, then what was read past the handshakes.
    async fn start(&mut self, gw: &Gateway, control: &SessionControl) -> Step {
        let first = std::mem::take(&mut self.first);
        self.up_bytes += first.len() as u64;
        send(
            &mut self.upstream,
            &first,
            self.limits.write,
            EndReason::UpstreamError,
        )
        .await?;
        let rest = std::mem::take(&mut self.upstream_rest);
        self.on_upstream(&rest).await?;
        self.client_packets(gw, control, Vec::new()).await?;
        let raw = std::mem::take(&mut self.inspect.client_raw);
        self.on_client(gw, control, &raw).await
    }

    async fn relay(
        &mut self,
        gw: &Gateway,
        signal: &mut Signal,
        control: &SessionControl,
    ) -> EndReason {
        let drain = signal.go_away();
        tokio::pin!(drain);
        let revoked = control.requested();
        tokio::pin!(revoked);
        let mut cbuf = vec![0u8; READ_SIZE];
        let mut ubuf = vec![0u8; READ_SIZE];
        loop {
            let idle_at = self.active + self.limits.idle;
            let wake = idle_at.min(self.expires_at);
            let read_client = !self.client_eof && self.queued.len() < MAX_QUEUED;
            let step = tokio::select! {
                () = &mut drain => Err(EndReason::Drain),
                req = &mut revoked => Err(EndReason::Revoked(req.reason)),
                () = tokio::time::sleep_until(wake) => self.on_timer(),
                r = self.client.read(&mut cbuf), if read_client => match r {
                    Ok(0) => self.on_client_eof().await,
                    Ok(n) => self.on_client(gw, control, &cbuf[..n]).await,
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => self.on_client_eof().await,
                    Err(_) => Err(EndReason::ClientError),
                },
                r = self.upstream.read(&mut ubuf), if !self.upstream_eof => match r {
                    Ok(0) => self.on_upstream_eof().await,
                    Ok(n) => self.on_upstream(&ubuf[..n]).await,
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => self.on_upstream_eof().await,
                    Err(_) => Err(EndReason::UpstreamError),
                },
            };
            if let Err(reason) = step {
                return reason;
            }
            if self.client_eof && self.upstream_eof {
                return EndReason::Closed;
            }
        }
    }

    fn on_timer(&mut self) -> Step {
        let now = Instant::now();
        if now >= self.expires_at {
            return Err(EndReason::Expired);
        }
        if now >= self.active + self.limits.idle {
            return Err(EndReason::Idle);
        }
        Ok(())
    }

    async fn on_client_eof(&mut self) -> Step {
        self.client_eof = true;
        if !self.upstream_eof {
            let _ = self.upstream.shutdown().await;
        }
        Ok(())
    }

    async fn on_upstream_eof(&mut self) -> Step {
        if !self.upstream_closed && !self.client_closing && !self.client_eof {
            return Err(EndReason::UpstreamEof);
        }
        self.upstream_eof = true;
        let _ = self.client.shutdown().await;
        Ok(())
    }

    /// Client bytes: frames read, packets checked, what passes sent on as one masked frame.
    async fn on_client(&mut self, gw: &Gateway, control: &SessionControl, chunk: &[u8]) -> Step {
        let now = Instant::now();
        self.active = now;
        if let Some(rate) = &mut self.rate {
            rate.refill(now);
        }
        let mut events = Vec::new();
        let read = self.client_frames.feed(chunk, &mut events);
        let mut out = Vec::new();
        for event in events {
            match event {
                WsEvent::Start(op) => {
                    if op != OP_CLOSE && self.rate.as_mut().is_some_and(|r| !r.take()) {
                        self.forward(&mut out).await?;
                        return Err(EndReason::MessageRate);
                    }
                }
                WsEvent::Data(bytes) => {
                    self.inspect.inspector.client_feed(&bytes);
                    out = self.client_packets(gw, control, out).await?;
                }
                WsEvent::Control(op, payload) => {
                    self.forward(&mut out).await?;
                    let f = frame::encode(op, &payload, Some(mask_key()));
                    self.up_bytes += f.len() as u64;
                    send(
                        &mut self.upstream,
                        &f,
                        self.limits.write,
                        EndReason::UpstreamError,
                    )
                    .await?;
                    self.client_closing |= op == OP_CLOSE;
                }
            }
        }
        self.forward(&mut out).await?;
        read.map_err(filter_end)?;
        self.flush_queued().await
    }

    /// Sends `out` (MQTT bytes) upstream as one masked binary frame.
    async fn forward(&mut self, out: &mut Vec<u8>) -> Step {
        if out.is_empty() {
            return Ok(());
        }
        let f = frame::encode(OP_BINARY, out, Some(mask_key()));
        out.clear();
        self.up_bytes += f.len() as u64;
        send(
            &mut self.upstream,
            &f,
            self.limits.write,
            EndReason::UpstreamError,
        )
        .await
    }

    /// Judges every complete client packet, appending what passes to `out`.
    async fn client_packets(
        &mut self,
        gw: &Gateway,
        control: &SessionControl,
        mut out: Vec<u8>,
    ) -> Result<Vec<u8>, EndReason> {
        while let Some(verdict) = self.inspect.inspector.client_next().map_err(filter_end)? {
            match verdict {
                Verdict::Forward(p) => out.extend_from_slice(&p),
                Verdict::Reply(p) => self.queued.extend_from_slice(&p),
                Verdict::Denied {
                    kind,
                    forward,
                    reply,
                } => {
                    gw.metrics
                        .mqtt_acl_denied
                        .get_or_create(&[("kind", kind)])
                        .inc();
                    tracing::debug!(
                        event = "mqtt_acl_denied",
                        kind,
                        subject = self.inspect.subject.as_deref().unwrap_or(""),
                        "MQTT packet outside the topic rules"
                    );
                    if self.inspect.acl.deny == DenyAction::Disconnect {
                        self.forward(&mut out).await?;
                        return Err(EndReason::NotAuthorized);
                    }
                    out.extend_from_slice(forward.as_deref().unwrap_or_default());
                    self.queued
                        .extend_from_slice(reply.as_deref().unwrap_or_default());
                }
                Verdict::Reauth(token) => {
                    self.forward(&mut out).await?;
                    self.reauth(gw, control, &token).await?;
                }
            }
        }
        Ok(out)
    }

    /// MQTT 5 re-authentication: the new token verified as at the upgrade (revocations included), for the same
    /// subject; the expiry moves to its `exp` and the gateway answers AUTH success itself.
    async fn reauth(&mut self, gw: &Gateway, control: &SessionControl, token: &[u8]) -> Step {
        let verified = match std::str::from_utf8(token).ok().filter(|t| !t.is_empty()) {
            Some(t) => gw
                .verifier
                .verify(t)
                .await
                .and_then(|i| gw.check_revocation(&i).map(|()| i))
                .map_err(|e| e.kind()),
            None => Err(AuthError::Missing.kind()),
        };
        let subject = self.inspect.subject.as_deref().unwrap_or("");
        let identity = match verified {
            Ok(i) if i.subject.is_some() && i.subject == self.inspect.subject => i,
            other => {
                let reason = other.err().unwrap_or("other_subject");
                gw.metrics
                    .mqtt_reauth
                    .get_or_create(&[("result", "refused")])
                    .inc();
                tracing::warn!(
                    event = "token_refresh_refused",
                    subject,
                    reason,
                    "MQTT re-authentication refused; closing"
                );
                return Err(EndReason::NotAuthorized);
            }
        };
        let leeway = i64::try_from(gw.config.auth.leeway.as_secs()).unwrap_or(0);
        let remaining = (identity.expires_at + leeway - unix_now()).max(0);
        self.expires_at =
            Instant::now() + Duration::from_secs(u64::try_from(remaining).unwrap_or(0));
        control.refresh(Refreshed {
            token_id: identity.token_id.clone(),
            session_id: identity.session_id.clone(),
            issued_at: identity.issued_at,
            expires_at: identity.expires_at,
        });
        self.inspect
            .inspector
            .set_rules(SessionRules::new(&self.inspect.acl, &identity));
        let method = self.inspect.reauth_method.as_deref().unwrap_or("jwt");
        self.queued
            .extend_from_slice(&mqtt_filter::auth_success(method));
        gw.metrics
            .mqtt_reauth
            .get_or_create(&[("result", "ok")])
            .inc();
        tracing::info!(
            event = "token_refreshed",
            subject,
            exp = identity.expires_at,
            "MQTT re-authentication: session extended"
        );
        Ok(())
    }

    /// Upstream bytes: frames read, the MQTT stream passed on (SUBACKs rewritten, the gateway's packets added at
    /// packet boundaries) as one binary frame.
    async fn on_upstream(&mut self, chunk: &[u8]) -> Step {
        if chunk.is_empty() {
            return Ok(());
        }
        self.active = Instant::now();
        let mut events = Vec::new();
        let read = self.upstream_frames.feed(chunk, &mut events);
        let mut out = Vec::new();
        for event in events {
            match event {
                WsEvent::Start(_) => {}
                WsEvent::Data(bytes) => {
                    let mut rest = &bytes[..];
                    while !rest.is_empty() {
                        let used = self.inspect.inspector.broker_feed(rest, &mut out);
                        rest = &rest[used..];
                        if self.inspect.inspector.broker_at_boundary() {
                            out.append(&mut self.queued);
                        }
                    }
                }
                WsEvent::Control(op, payload) => {
                    self.send_client(&mut out).await?;
                    let f = frame::encode(op, &payload, None);
                    self.down_bytes += f.len() as u64;
                    send(
                        &mut self.client,
                        &f,
                        self.limits.write,
                        EndReason::ClientError,
                    )
                    .await?;
                    self.upstream_closed |= op == OP_CLOSE;
                }
            }
        }
        self.send_client(&mut out).await?;
        read.map_err(|_| EndReason::UpstreamError)?;
        self.flush_queued().await
    }

    /// Sends `out` (MQTT bytes) to the client as one binary frame.
    async fn send_client(&mut self, out: &mut Vec<u8>) -> Step {
        if out.is_empty() {
            return Ok(());
        }
        let f = frame::encode(OP_BINARY, out, None);
        out.clear();
        self.down_bytes += f.len() as u64;
        send(
            &mut self.client,
            &f,
            self.limits.write,
            EndReason::ClientError,
        )
        .await
    }

    /// The gateway's own packets, when the broker's stream is between packets.
    async fn flush_queued(&mut self) -> Step {
        if self.queued.is_empty() || !self.inspect.inspector.broker_at_boundary() {
            return Ok(());
        }
        let mut q = std::mem::take(&mut self.queued);
        self.send_client(&mut q).await
    }

    /// Ends the session from the gateway's side (the caller bounds it by the close grace): MQTT 5 DISCONNECT 0x87
    /// first when not authorized, the Close to both sides, then the client's bytes read until its Close.
    async fn close(
        &mut self,
        reason: EndReason,
        req: crate::registry::CloseRequest,
        close_sent: &mut bool,
    ) {
        let mut to_client = Vec::new();
        if reason == EndReason::NotAuthorized
            && self.inspect.inspector.level() >= 5
            && self.inspect.inspector.broker_at_boundary()
        {
            to_client = frame::encode(OP_BINARY, &mqtt_filter::disconnect_not_authorized(), None);
        }
        to_client.extend_from_slice(&frame::close_frame(req.code, req.reason, None));
        if send(
            &mut self.client,
            &to_client,
            self.limits.write,
            EndReason::ClientError,
        )
        .await
        .is_ok()
        {
            *close_sent = true;
            self.down_bytes += to_client.len() as u64;
        }
        if !self.upstream_eof {
            let f = frame::close_frame(req.code, req.reason, Some(mask_key()));
            let _ = send(
                &mut self.upstream,
                &f,
                self.limits.write,
                EndReason::UpstreamError,
            )
            .await;
            let _ = self.upstream.shutdown().await;
        }
        if !*close_sent {
            return;
        }
        // The lingering read: a socket closed with unread bytes answers them with a reset, which the client
        // would read instead of the Close.
        let mut buf = vec![0u8; READ_SIZE];
        let mut events = Vec::new();
        while !self.client_eof && !self.client_closing {
            match self.client.read(&mut buf).await {
                Ok(n) if n > 0 => {
                    events.clear();
                    if self.client_frames.feed(&buf[..n], &mut events).is_err() {
                        break;
                    }
                    self.client_closing = events
                        .iter()
                        .any(|e| matches!(e, WsEvent::Control(OP_CLOSE, _)));
                }
                _ => break,
            }
        }
        let _ = self.client.shutdown().await;
    }
}
