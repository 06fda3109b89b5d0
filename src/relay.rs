//! The byte relay: raw bytes both ways, no re-framing, half-close propagated, idle and write timeouts, and a Close
//! frame placed at a frame boundary when the session must end early (token expiry, drain deadline, revocation, an
//! upstream that fails or ends without a Close of its own).
//!
//! Memory: a direction holds a buffer only while it has bytes in flight. A read borrows a buffer from a per-thread
//! pool for the duration of one poll and gives it back when the socket has nothing, so an idle session holds no
//! relay buffer at all (rustls keeps its own, smaller, per-connection state).
//!
//! Timers: one `Sleep` per session serves the idle, write and expiry deadlines. It is re-armed only when a deadline
//! moves earlier; when it fires early (activity moved the idle deadline later), it is re-armed then.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::budget::MessageRate;
use crate::config::RateLimit;
use crate::frame::{self, FrameTracker};
use crate::pool::{self, BUF_SIZE};
use crate::registry::{CloseRequest, SessionControl};
use crate::shutdown::Signal;

/// Time limits of a session.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// No bytes either way for this long ends the session.
    pub idle: Duration,
    /// A peer that accepts no bytes for this long is cut off.
    pub write: Duration,
    /// Time allowed to deliver the Close frame when the session is ended by the gateway.
    pub close_grace: Duration,
    /// Client frames allowed per second (`WS_MESSAGE_RATE_PER_SECOND`, `WS_MESSAGE_BURST`).
    pub messages: Option<RateLimit>,
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EndReason {
    /// Both sides closed (the client first, or the upstream first, both end here).
    Closed,
    /// No bytes moved for the idle timeout.
    Idle,
    /// A peer stopped reading.
    WriteTimeout,
    /// The token expired.
    Expired,
    /// The drain deadline passed.
    Drain,
    /// Closed from outside: a revocation, or an eviction under MAX_SESSIONS_PER_SUBJECT ("session limit").
    Revoked(&'static str),
    /// The client sent frames faster than `WS_MESSAGE_RATE_PER_SECOND` allows.
    MessageRate,
    /// The client's socket failed.
    ClientError,
    /// The upstream's socket failed (a reset, say): the client gets Close 1014.
    UpstreamError,
    /// The upstream ended its stream without a WebSocket Close while the client was not closing: the client gets
    /// Close 1014 instead of a bare end of stream.
    UpstreamEof,
    /// An inspected MQTT session broke the rules with `MQTT_ACL_DENY_ACTION=disconnect`, or a token refresh was
    /// refused: MQTT 5 DISCONNECT 0x87, then Close 1008.
    NotAuthorized,
    /// An inspected MQTT session sent a malformed packet or frame: Close 1002.
    ProtocolError,
    /// An inspected MQTT session sent a packet over its bound: Close 1009.
    TooBig,
}

impl EndReason {
    /// Bounded label for logs and metrics.
    #[must_use]
    pub(crate) fn label(self) -> &'static str {
        match self {
            EndReason::Closed => "closed",
            EndReason::Idle => "idle_timeout",
            EndReason::WriteTimeout => "write_timeout",
            EndReason::Expired => "token_expired",
            EndReason::Drain => "drain",
            EndReason::Revoked("session limit") => "session_limit",
            EndReason::Revoked(_) => "revoked",
            EndReason::MessageRate => "message_rate",
            EndReason::ClientError => "client_error",
            EndReason::UpstreamError => "upstream_error",
            EndReason::UpstreamEof => "upstream_eof",
            EndReason::NotAuthorized => "not_authorized",
            EndReason::ProtocolError => "protocol_error",
            EndReason::TooBig => "message_too_big",
        }
    }

    /// The Close frame the gateway sends the client for this reason, if it sends one.
    #[must_use]
    pub(crate) fn close(self) -> Option<CloseRequest> {
        match self {
            EndReason::Idle => Some(CloseRequest {
                code: frame::CLOSE_GOING_AWAY,
                reason: "idle timeout",
            }),
            EndReason::Expired => Some(CloseRequest {
                code: frame::CLOSE_POLICY,
                reason: "token expired",
            }),
            EndReason::Drain => Some(CloseRequest {
                code: frame::CLOSE_GOING_AWAY,
                reason: "going away",
            }),
            EndReason::Revoked(reason) => Some(CloseRequest {
                code: frame::CLOSE_POLICY,
                reason,
            }),
            EndReason::MessageRate => Some(CloseRequest {
                code: frame::CLOSE_POLICY,
                reason: "rate limit exceeded",
            }),
            EndReason::UpstreamError | EndReason::UpstreamEof => Some(CloseRequest {
                code: frame::CLOSE_UNAVAILABLE,
                reason: "bad gateway",
            }),
            EndReason::NotAuthorized => Some(CloseRequest {
                code: frame::CLOSE_POLICY,
                reason: "not authorized",
            }),
            EndReason::ProtocolError => Some(CloseRequest {
                code: frame::CLOSE_PROTOCOL_ERROR,
                reason: "protocol error",
            }),
            EndReason::TooBig => Some(CloseRequest {
                code: frame::CLOSE_TOO_BIG,
                reason: "message too big",
            }),
            EndReason::Closed | EndReason::WriteTimeout | EndReason::ClientError => None,
        }
    }
}

/// What a session did.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Outcome {
    /// Why it ended.
    pub reason: EndReason,
    /// Bytes client → upstream.
    pub client_to_upstream: u64,
    /// Bytes upstream → client.
    pub upstream_to_client: u64,
    /// Whether a Close frame was delivered to the client.
    pub close_sent: bool,
}

/// One direction of the relay.
#[derive(Debug, Default)]
struct Pump {
    buf: Option<Vec<u8>>,
    start: usize,
    end: usize,
    /// Offset in `buf` of the last frame boundary among the buffered bytes.
    boundary: Option<usize>,
    frames: FrameTracker,
    needs_flush: bool,
    write_blocked: bool,
    eof: bool,
    done: bool,
    bytes: u64,
    /// Set when a frame was refused by the message rate: the buffered bytes end just before it, and this tracker
    /// follows the source's stream from there, for the lingering read after the Close.
    cut: Option<Box<FrameTracker>>,
}

impl Pump {
    fn with_initial(bytes: Vec<u8>, rate: Option<&mut MessageRate>) -> Pump {
        let mut p = Pump::default();
        if !bytes.is_empty() {
            p.end = p.note_read(&bytes, rate);
            p.buf = Some(bytes);
        }
        p
    }

    /// Follows the frames of a chunk just read and charges them to `rate`; returns how many of its bytes are
    /// relayed: all, or those before the first frame over the rate.
    ///
    /// Every frame the client starts costs a token except Close: data, continuation, ping and pong alike, so a
    /// flood of pings or of tiny fragments is held like a flood of messages (a client that sends each message as
    /// one frame, as browsers and MQTT clients do, is charged one token per message). The bucket is refilled once
    /// per read, not per frame.
    fn note_read(&mut self, chunk: &[u8], rate: Option<&mut MessageRate>) -> usize {
        let was_at = self.frames.at_boundary();
        let (last, refused) = match rate {
            None => (self.frames.feed(chunk), None),
            Some(rate) => {
                rate.refill(Instant::now());
                self.frames
                    .feed_admitting(chunk, |op| op == frame::OP_CLOSE || rate.take())
            }
        };
        self.boundary = last.or(was_at.then_some(0));
        let kept = refused.unwrap_or(chunk.len());
        if refused.is_some() {
            // The refused frame starts a frame, so a fresh tracker follows the rest of the source's stream.
            let mut rest = FrameTracker::new();
            rest.feed(&chunk[kept..]);
            self.cut = Some(Box::new(rest));
        }
        self.bytes += kept as u64;
        kept
    }

    /// Writes and flushes what is buffered; returns the buffer to the pool when done.
    fn poll_drain<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut W,
    ) -> Poll<io::Result<()>> {
        self.write_blocked = false;
        while self.start < self.end {
            let Some(buf) = self.buf.as_ref() else { break };
            match Pin::new(&mut *dst).poll_write(cx, &buf[self.start..self.end]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    self.start += n;
                    self.needs_flush = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    self.write_blocked = true;
                    return Poll::Pending;
                }
            }
        }
        if self.needs_flush {
            match Pin::new(&mut *dst).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.needs_flush = false,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    self.write_blocked = true;
                    return Poll::Pending;
                }
            }
        }
        if let Some(buf) = self.buf.take() {
            pool::give(buf);
        }
        self.start = 0;
        self.end = 0;
        Poll::Ready(Ok(()))
    }

    /// Reads at most `limit` bytes into a pooled buffer; `Ready(Ok(0))` is end of stream.
    fn poll_fill<R: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut R,
        limit: usize,
        rate: Option<&mut MessageRate>,
    ) -> Poll<io::Result<usize>> {
        let mut buf = pool::take();
        let mut rb = ReadBuf::new(&mut buf[..limit.min(BUF_SIZE)]);
        match Pin::new(src).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                if n == 0 {
                    pool::give(buf);
                    return Poll::Ready(Ok(0));
                }
                let kept = self.note_read(&buf[..n], rate);
                self.start = 0;
                self.end = kept;
                self.buf = Some(buf);
                Poll::Ready(Ok(n))
            }
            // A TLS peer that closes without close_notify: an end of stream like any other.
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                pool::give(buf);
                Poll::Ready(Ok(0))
            }
            Poll::Ready(Err(e)) => {
                pool::give(buf);
                Poll::Ready(Err(e))
            }
            Poll::Pending => {
                pool::give(buf);
                Poll::Pending
            }
        }
    }

    /// Copies until end of stream, then shuts the destination's write side (half-close). With `close_first`, an end
    /// of stream that no Close frame preceded is [`Side::Ended`] instead: the session ends, and the gateway sends
    /// the Close the source did not. With `rate`, stops at
    /// the first frame over it ([`Side::Limited`]), before relaying that frame.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut R,
        dst: &mut W,
        active: &mut Instant,
        close_first: bool,
        mut rate: Option<&mut MessageRate>,
    ) -> Poll<Result<(), Side>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if self.cut.is_some() {
                // What was read before the refused frame is relayed by the close, followed by the Close frame.
                return Poll::Ready(Err(Side::Limited));
            }
            match self.poll_drain(cx, dst) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => return Poll::Ready(Err(Side::Destination)),
                Poll::Pending => return Poll::Pending,
            }
            if self.eof {
                return match Pin::new(&mut *dst).poll_shutdown(cx) {
                    Poll::Ready(_) => {
                        self.done = true;
                        Poll::Ready(Ok(()))
                    }
                    Poll::Pending => Poll::Pending,
                };
            }
            match self.poll_fill(cx, src, BUF_SIZE, rate.as_deref_mut()) {
                Poll::Ready(Ok(0)) if close_first && !self.frames.saw_close() => {
                    return Poll::Ready(Err(Side::Ended))
                }
                Poll::Ready(Ok(0)) => self.eof = true,
                Poll::Ready(Ok(_)) => *active = Instant::now(),
                Poll::Ready(Err(_)) => return Poll::Ready(Err(Side::Source)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Finishes the frame in flight, writes `close`, flushes, and shuts the destination down when `shutdown` holds
    /// (the client's side is shut only after the lingering read). `Ok(false)` when the source ended mid-frame, so
    /// no valid Close frame could follow.
    fn poll_close<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut R,
        dst: &mut W,
        close: &[u8],
        sent: &mut bool,
        shutdown: bool,
    ) -> Poll<io::Result<bool>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(*sent));
            }
            if self.start < self.end && !self.frames.at_boundary() {
                if let Some(b) = self.boundary.filter(|b| *b >= self.start) {
                    // Drop the partial frame after the last boundary: the session ends here.
                    self.end = b;
                    self.frames = FrameTracker::new();
                }
            }
            match self.poll_drain(cx, dst) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
            if *sent || self.eof {
                if shutdown && Pin::new(&mut *dst).poll_shutdown(cx).is_pending() {
                    return Poll::Pending;
                }
                self.done = true;
                continue;
            }
            if self.frames.at_boundary() {
                let mut buf = pool::take();
                buf[..close.len()].copy_from_slice(close);
                self.buf = Some(buf);
                self.start = 0;
                self.end = close.len();
                *sent = true;
                continue;
            }
            // Up to the boundary only: no new frame starts here, so none is charged to the message rate.
            let limit = self.frames.until_boundary(BUF_SIZE);
            match self.poll_fill(cx, src, limit, None) {
                Poll::Ready(Ok(0)) => self.eof = true,
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Reads and discards what `src` sends until `done` says to stop, EOF, or an error: the lingering half of a close.
/// A socket closed with unread bytes in it answers them with a reset, and a client that was still sending would
/// then read the reset instead of the Close frame.
fn poll_discard<R: AsyncRead + Unpin>(
    cx: &mut Context<'_>,
    src: &mut R,
    tracker: &mut FrameTracker,
    done: impl Fn(&FrameTracker) -> bool,
) -> Poll<()> {
    loop {
        if done(tracker) {
            return Poll::Ready(());
        }
        let mut buf = pool::take();
        let mut rb = ReadBuf::new(&mut buf[..]);
        let polled = Pin::new(&mut *src).poll_read(cx, &mut rb);
        let n = rb.filled().len();
        if n > 0 {
            tracker.feed(&buf[..n]);
        }
        pool::give(buf);
        match polled {
            Poll::Ready(Ok(())) if n > 0 => {}
            Poll::Ready(_) => return Poll::Ready(()),
            Poll::Pending => return Poll::Pending,
        }
    }
}

/// A fresh masking key for a frame the gateway sends upstream as a client (RFC 6455 section 5.3).
pub(crate) fn mask_key() -> [u8; 4] {
    use ring::rand::SecureRandom;
    let mut key = [0u8; 4];
    // A failed read of the system RNG leaves a zero key: still a valid frame, only predictable.
    let _ = ring::rand::SystemRandom::new().fill(&mut key);
    key
}

#[derive(Debug, Clone, Copy)]
enum Side {
    /// Reading failed.
    Source,
    /// The source ended without a Close frame (only when the copy was asked to notice).
    Ended,
    /// Writing failed.
    Destination,
    /// The source sent frames faster than its message rate.
    Limited,
}

/// A session being relayed.
pub(crate) struct Session<C, U> {
    client: C,
    upstream: U,
    up: Pump,
    down: Pump,
    limits: Limits,
    expires_at: Option<Instant>,
    active: Instant,
    write_blocked_since: Option<Instant>,
    timer: Pin<Box<Sleep>>,
    /// The client's message budget (`WS_MESSAGE_RATE_PER_SECOND`), charged by the client-to-upstream pump.
    rate: Option<MessageRate>,
}

impl<C, U> Session<C, U>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    /// A session over two connected streams; `client_rest` and `upstream_rest` are bytes already read past each
    /// handshake, delivered first.
    pub(crate) fn new(
        client: C,
        upstream: U,
        client_rest: Vec<u8>,
        upstream_rest: Vec<u8>,
        limits: Limits,
        expires_at: Option<Instant>,
    ) -> Self {
        let now = Instant::now();
        let mut rate = limits.messages.map(MessageRate::new);
        Session {
            client,
            upstream,
            up: Pump::with_initial(client_rest, rate.as_mut()),
            down: Pump::with_initial(upstream_rest, None),
            limits,
            expires_at,
            active: now,
            write_blocked_since: None,
            timer: Box::pin(tokio::time::sleep_until(now + limits.idle)),
            rate,
        }
    }

    /// Relays until both sides close, a timer ends the session, the drain deadline passes or `control` asks.
    ///
    /// It borrows the session rather than consuming it, so the caller's future holds the session once: an idle
    /// session's memory is mostly this struct and the two sockets.
    pub(crate) async fn run(&mut self, mut drain: Signal, control: &SessionControl) -> Outcome {
        let reason = tokio::select! {
            reason = poll_fn(|cx| self.poll_transfer(cx)) => reason,
            () = drain.go_away() => EndReason::Drain,
            req = control.requested() => EndReason::Revoked(req.reason),
        };
        let mut close_sent = false;
        // Never a second Close: one the upstream sent has already reached the client.
        if let Some(req) = reason.close().filter(|_| !self.down.frames.saw_close()) {
            let _ = tokio::time::timeout(self.limits.close_grace, self.close(req, &mut close_sent))
                .await;
        }
        Outcome {
            reason,
            client_to_upstream: self.up.bytes,
            upstream_to_client: self.down.bytes,
            close_sent,
        }
    }

    /// Ends the session from the gateway's side, under the caller's deadline:
    /// 1. both directions finish the frame in flight; the client gets `req` as a Close frame, the upstream the same
    ///    code as a masked Close, then the upstream's write side is shut;
    /// 2. the client's bytes are read and discarded until its own Close frame (or EOF);
    /// 3. only then the client's side is shut (TLS close_notify, FIN), and what it still sends is discarded until
    ///    EOF, so the socket is never closed with unread bytes in it.
    async fn close(&mut self, req: CloseRequest, close_sent: &mut bool) {
        let to_client = frame::close_frame(req.code, req.reason, None);
        let to_upstream = frame::close_frame(req.code, req.reason, Some(mask_key()));
        let Session {
            client,
            upstream,
            up,
            down,
            ..
        } = self;
        let (mut down_done, mut up_done, mut upstream_sent) = (false, false, false);
        poll_fn(|cx| {
            if !down_done {
                let r = down.poll_close(
                    cx,
                    &mut *upstream,
                    &mut *client,
                    &to_client,
                    close_sent,
                    false,
                );
                down_done = r.is_ready();
            }
            if !up_done {
                let r = up.poll_close(
                    cx,
                    &mut *client,
                    &mut *upstream,
                    &to_upstream,
                    &mut upstream_sent,
                    true,
                );
                up_done = r.is_ready();
            }
            if down_done && up_done {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
        if !*close_sent {
            return;
        }
        if !up.eof && up.frames.at_boundary() {
            // After a frame refused by the message rate, the tracker that followed the client past it.
            let mut tracker = up.cut.take().map_or_else(FrameTracker::new, |t| *t);
            poll_fn(|cx| {
                poll_discard(cx, &mut *client, &mut tracker, |t| {
                    t.saw_close() && t.at_boundary()
                })
            })
            .await;
        }
        let _ = poll_fn(|cx| Pin::new(&mut *client).poll_shutdown(cx)).await;
        let mut rest = FrameTracker::new();
        poll_fn(|cx| poll_discard(cx, &mut *client, &mut rest, |_| false)).await;
    }

    fn poll_transfer(&mut self, cx: &mut Context<'_>) -> Poll<EndReason> {
        let Session {
            client,
            upstream,
            up,
            down,
            active,
            rate,
            ..
        } = self;
        match up.poll_copy(cx, client, upstream, active, false, rate.as_mut()) {
            Poll::Ready(Err(Side::Source | Side::Ended)) => {
                return Poll::Ready(EndReason::ClientError)
            }
            Poll::Ready(Err(Side::Destination)) => return Poll::Ready(EndReason::UpstreamError),
            Poll::Ready(Err(Side::Limited)) => return Poll::Ready(EndReason::MessageRate),
            _ => {}
        }
        // An upstream that ends without a Close while the client is not closing (no Close, no end of stream from
        // it) has died: the client must hear so in a Close frame, not read a bare end of stream.
        let client_closing = up.eof || up.frames.saw_close();
        match down.poll_copy(cx, upstream, client, active, !client_closing, None) {
            Poll::Ready(Err(Side::Source)) => return Poll::Ready(EndReason::UpstreamError),
            Poll::Ready(Err(Side::Ended)) => return Poll::Ready(EndReason::UpstreamEof),
            Poll::Ready(Err(Side::Destination)) => return Poll::Ready(EndReason::ClientError),
            _ => {}
        }
        if self.up.done && self.down.done {
            return Poll::Ready(EndReason::Closed);
        }
        self.poll_timers(cx)
    }

    fn poll_timers(&mut self, cx: &mut Context<'_>) -> Poll<EndReason> {
        loop {
            let now = Instant::now();
            if self.up.write_blocked || self.down.write_blocked {
                self.write_blocked_since.get_or_insert(now);
            } else {
                self.write_blocked_since = None;
            }
            let idle_at = self.active + self.limits.idle;
            let write_at = self.write_blocked_since.map(|t| t + self.limits.write);
            if self.expires_at.is_some_and(|t| now >= t) {
                return Poll::Ready(EndReason::Expired);
            }
            if write_at.is_some_and(|t| now >= t) {
                return Poll::Ready(EndReason::WriteTimeout);
            }
            if now >= idle_at {
                return Poll::Ready(EndReason::Idle);
            }
            let next = [Some(idle_at), write_at, self.expires_at]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(idle_at);
            if next < self.timer.deadline() || self.timer.is_elapsed() {
                self.timer.as_mut().reset(next);
            }
            match self.timer.as_mut().poll(cx) {
                // Fired before the real deadline (the idle deadline moved): re-evaluate and re-arm.
                Poll::Ready(()) => {
                    self.timer.as_mut().reset(next);
                    continue;
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{decode, encode, OP_BINARY};
    use crate::registry::SessionControl;
    use crate::shutdown::Drain;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

    fn control() -> SessionControl {
        SessionControl::new(crate::registry::SessionInfo {
            subject: None,
            token_id: None,
            session_id: None,
            issued_at: None,
            expires_at: 0,
            route: "/".into(),
            peer: std::net::SocketAddr::from(([127, 0, 0, 1], 1)),
            started: std::time::SystemTime::now(),
        })
    }

    fn limits() -> Limits {
        Limits {
            idle: Duration::from_secs(60),
            write: Duration::from_secs(10),
            close_grace: Duration::from_secs(2),
            messages: None,
        }
    }

    #[tokio::test]
    async fn relays_both_ways_with_leftovers_and_half_close() {
        let (mut client, mut gw_client) = duplex(64);
        let (mut gw_up, mut upstream) = duplex(64);
        let drain = Drain::new();
        let control = control();
        let task = tokio::spawn(async move {
            let mut s = Session::new(
                &mut gw_client,
                &mut gw_up,
                b"early".to_vec(),
                b"hello".to_vec(),
                limits(),
                None,
            );
            s.run(drain.signal(), &control).await
        });
        let mut got = [0u8; 5];
        upstream.read_exact(&mut got).await.expect("early bytes");
        assert_eq!(&got, b"early");
        client
            .read_exact(&mut got)
            .await
            .expect("upstream leftovers");
        assert_eq!(&got, b"hello");
        let big = vec![42u8; 100_000];
        let writer = {
            let big = big.clone();
            tokio::spawn(async move {
                client.write_all(&big).await.expect("write");
                client.shutdown().await.expect("half-close");
                client
            })
        };
        let mut echoed = Vec::new();
        upstream
            .read_to_end(&mut echoed)
            .await
            .expect("read to end");
        assert_eq!(echoed, big);
        let mut client = writer.await.expect("writer");
        upstream.write_all(b"late").await.expect("after half-close");
        drop(upstream);
        let mut tail = Vec::new();
        client.read_to_end(&mut tail).await.expect("tail");
        assert_eq!(tail, b"late");
        let out = task.await.expect("join");
        assert_eq!(out.reason, EndReason::Closed);
        assert_eq!(
            (out.client_to_upstream, out.upstream_to_client),
            (100_005, 9)
        );
    }

    fn limited(per_second: f64, burst: u32) -> Limits {
        Limits {
            messages: Some(RateLimit { per_second, burst }),
            ..limits()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn frames_over_the_message_rate_are_not_relayed_and_both_sides_get_close_1008() {
        let (mut client, mut gw_client) = duplex(1 << 16);
        let (mut gw_up, mut upstream) = duplex(1 << 16);
        // Ten frames in one write, pings among them: three fit the burst, the fourth (a ping) is refused.
        let mut burst = Vec::new();
        for i in 0..10u8 {
            let op = if i % 2 == 1 {
                frame::OP_PING
            } else {
                OP_BINARY
            };
            burst.extend_from_slice(&encode(op, &[i; 5], Some([1, 2, 3, i])));
        }
        client.write_all(&burst).await.expect("write");
        let task = tokio::spawn(async move {
            let control = control();
            let drain = Drain::new();
            Session::new(
                &mut gw_client,
                &mut gw_up,
                Vec::new(),
                Vec::new(),
                limited(0.001, 3),
                None,
            )
            .run(drain.signal(), &control)
            .await
        });
        let mut buf = [0u8; 256];
        let n = client.read(&mut buf).await.expect("close");
        let (f, _) = decode(&buf[..n], 125).expect("valid").expect("frame");
        assert_eq!(f.opcode, frame::OP_CLOSE);
        assert_eq!(f.payload[..2], 1008u16.to_be_bytes());
        assert_eq!(&f.payload[2..], b"rate limit exceeded");
        client
            .write_all(&frame::close_frame(1008, "", Some([1, 2, 3, 4])))
            .await
            .expect("answer");
        let out = task.await.expect("join");
        assert_eq!(out.reason, EndReason::MessageRate);
        assert!(out.close_sent);
        let mut up = Vec::new();
        upstream.read_to_end(&mut up).await.expect("upstream");
        let mut frames = Vec::new();
        let mut at = 0;
        while at < up.len() {
            let (f, used) = decode(&up[at..], 4096).expect("valid").expect("whole");
            at += used;
            frames.push(f);
        }
        let ops: Vec<u8> = frames.iter().map(|f| f.opcode).collect();
        assert_eq!(
            ops,
            vec![OP_BINARY, frame::OP_PING, OP_BINARY, frame::OP_CLOSE]
        );
        assert_eq!(frames[3].payload[..2], 1008u16.to_be_bytes());
        assert_eq!(out.client_to_upstream, 3 * 11);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_under_the_message_rate_keeps_going() {
        let (mut client, mut gw_client) = duplex(1 << 16);
        let (mut gw_up, mut upstream) = duplex(1 << 16);
        let task = tokio::spawn(async move {
            let control = control();
            let drain = Drain::new();
            Session::new(
                &mut gw_client,
                &mut gw_up,
                Vec::new(),
                Vec::new(),
                limited(10.0, 3),
                None,
            )
            .run(drain.signal(), &control)
            .await
        });
        // Five frames a second against ten allowed, for four seconds; the Close at the end costs nothing.
        for i in 0..20u8 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            client
                .write_all(&encode(OP_BINARY, &[i; 8], Some([4, 3, 2, 1])))
                .await
                .expect("write");
        }
        client
            .write_all(&frame::close_frame(1000, "", Some([1, 2, 3, 4])))
            .await
            .expect("close");
        client.shutdown().await.expect("half-close");
        let mut up = Vec::new();
        upstream.read_to_end(&mut up).await.expect("upstream");
        drop(upstream);
        let out = task.await.expect("join");
        assert_eq!(out.reason, EndReason::Closed);
        assert_eq!(out.client_to_upstream, up.len() as u64);
        assert_eq!(up.len(), 20 * 14 + 8);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_sends_going_away() {
        let (mut client, mut gw_client) = duplex(1024);
        let (mut gw_up, _upstream) = duplex(1024);
        let task = tokio::spawn(async move {
            let control = control();
            let drain = Drain::new();
            Session::new(
                &mut gw_client,
                &mut gw_up,
                Vec::new(),
                Vec::new(),
                limits(),
                None,
            )
            .run(drain.signal(), &control)
            .await
        });
        let mut buf = [0u8; 64];
        let n = client.read(&mut buf).await.expect("close");
        let (f, _) = decode(&buf[..n], 125).expect("valid").expect("frame");
        assert_eq!(f.opcode, frame::OP_CLOSE);
        assert_eq!(f.payload[..2], 1001u16.to_be_bytes());
        // The client answers; only then does the gateway end its side.
        client
            .write_all(&frame::close_frame(1001, "", Some([1, 2, 3, 4])))
            .await
            .expect("answer");
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.expect("EOF");
        assert!(rest.is_empty());
        let out = task.await.expect("join");
        assert_eq!(out.reason, EndReason::Idle);
    }

    #[tokio::test(start_paused = true)]
    async fn expiry_close_waits_for_the_frame_in_flight() {
        let (mut client, mut gw_client) = duplex(1 << 20);
        let (mut gw_up, mut upstream) = duplex(1 << 20);
        let whole = encode(OP_BINARY, &[5u8; 1000], None);
        let task = tokio::spawn(async move {
            let control = control();
            let drain = Drain::new();
            let expires = Instant::now() + Duration::from_secs(5);
            Session::new(
                &mut gw_client,
                &mut gw_up,
                Vec::new(),
                Vec::new(),
                limits(),
                Some(expires),
            )
            .run(drain.signal(), &control)
            .await
        });
        // Half a frame before expiry, the rest after: the client must get the whole frame, then the Close.
        upstream.write_all(&whole[..400]).await.expect("first half");
        tokio::time::sleep(Duration::from_secs(6)).await;
        upstream
            .write_all(&whole[400..])
            .await
            .expect("second half");
        upstream
            .write_all(&encode(OP_BINARY, b"after", None))
            .await
            .expect("next frame");
        let out = task.await.expect("join");
        assert_eq!(out.reason, EndReason::Expired);
        assert!(out.close_sent);
        let mut buf = Vec::new();
        client.read_to_end(&mut buf).await.expect("read");
        let (first, used) = decode(&buf, 4096).expect("ok").expect("frame");
        assert_eq!(first.payload.len(), 1000);
        let (close, _) = decode(&buf[used..], 125).expect("ok").expect("close");
        assert_eq!(close.opcode, frame::OP_CLOSE);
        assert_eq!(close.payload[..2], 1008u16.to_be_bytes());
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_keeps_sending_reads_the_close_and_the_upstream_gets_one() {
        let (client, mut gw_client) = duplex(256);
        let (mut gw_up, mut upstream) = duplex(1 << 20);
        let task = tokio::spawn(async move {
            let control = control();
            let drain = Drain::new();
            let expires = Instant::now() + Duration::from_secs(3);
            Session::new(
                &mut gw_client,
                &mut gw_up,
                Vec::new(),
                Vec::new(),
                limits(),
                Some(expires),
            )
            .run(drain.signal(), &control)
            .await
        });
        let (mut rd, mut wr) = tokio::io::split(client);
        // The client sends a frame every 100 ms, before, during and after the close, until told to stop.
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let sender = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut stop_rx => break,
                    () = tokio::time::sleep(Duration::from_millis(100)) => {
                        let f = encode(OP_BINARY, &[7u8; 40], Some([1, 2, 3, 4]));
                        if wr.write_all(&f).await.is_err() { return wr; }
                    }
                }
            }
            let close = frame::close_frame(1008, "", Some([1, 2, 3, 4]));
            let _ = wr.write_all(&close).await;
            wr
        });
        let mut seen = Vec::new();
        let close = loop {
            let mut buf = [0u8; 256];
            let n = rd.read(&mut buf).await.expect("read");
            assert!(n > 0, "EOF before the Close frame");
            seen.extend_from_slice(&buf[..n]);
            if let Some((f, _)) = decode(&seen, 125).expect("valid") {
                break f;
            }
        };
        assert_eq!(close.opcode, frame::OP_CLOSE);
        assert_eq!(close.payload[..2], 1008u16.to_be_bytes());
        // The gateway keeps reading while the client keeps sending: two more seconds of frames go through.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(
            !task.is_finished(),
            "still lingering for the client's Close"
        );
        stop_tx.send(()).expect("stop");
        let _wr = sender.await.expect("sender");
        let mut tail = Vec::new();
        rd.read_to_end(&mut tail)
            .await
            .expect("EOF after the client's Close");
        assert!(tail.is_empty());
        let out = task.await.expect("join");
        assert_eq!(out.reason, EndReason::Expired);
        assert!(out.close_sent);
        // The upstream got whole client frames, then a masked Close 1008, then EOF.
        let mut up = Vec::new();
        upstream.read_to_end(&mut up).await.expect("upstream");
        let mut at = 0;
        let last = loop {
            let (f, used) = decode(&up[at..], 4096)
                .expect("valid")
                .expect("whole frames");
            at += used;
            if at == up.len() {
                break f;
            }
            assert_eq!(f.opcode, OP_BINARY);
        };
        assert_eq!(last.opcode, frame::OP_CLOSE);
        assert_eq!(last.payload[..2], 1008u16.to_be_bytes());
        assert_eq!(up[at - last.payload.len() - 6] & 0x0f, frame::OP_CLOSE);
        assert!(up[at - last.payload.len() - 5] & 0x80 != 0, "masked");
    }

    #[tokio::test(start_paused = true)]
    async fn a_partial_frame_buffered_at_close_is_dropped_and_the_close_follows_the_last_whole_frame(
    ) {
        // The client reads nothing at first, so what the upstream sent stays buffered in the gateway.
        let (mut client, mut gw_client) = duplex(64);
        let (mut gw_up, mut upstream) = duplex(1 << 20);
        let whole = encode(OP_BINARY, &[1u8; 100], None);
        let next = encode(OP_BINARY, &[2u8; 100], None);
        let mut sent = whole.clone();
        sent.extend_from_slice(&next[..50]);
        upstream.write_all(&sent).await.expect("write");
        let task = tokio::spawn(async move {
            let control = control();
            let drain = Drain::new();
            let expires = Instant::now() + Duration::from_secs(1);
            Session::new(
                &mut gw_client,
                &mut gw_up,
                Vec::new(),
                Vec::new(),
                limits(),
                Some(expires),
            )
            .run(drain.signal(), &control)
            .await
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut got = Vec::new();
        let close = loop {
            let mut b = [0u8; 64];
            let n = client.read(&mut b).await.expect("read");
            assert!(n > 0, "EOF before the Close");
            got.extend_from_slice(&b[..n]);
            if got.len() > whole.len() {
                if let Some((f, _)) = decode(&got[whole.len()..], 125).expect("valid") {
                    break f;
                }
            }
        };
        assert_eq!(&got[..whole.len()], &whole[..], "the whole frame first");
        assert_eq!(
            close.opcode,
            frame::OP_CLOSE,
            "then the Close, no byte of the partial frame"
        );
        assert_eq!(close.payload[..2], 1008u16.to_be_bytes());
        client
            .write_all(&frame::close_frame(1008, "", Some([1, 2, 3, 4])))
            .await
            .expect("answer");
        let out = task.await.expect("join");
        assert!(out.close_sent);
    }

    /// An upstream whose stream ends in a reset: bytes from the other end of a duplex, then `ConnectionReset`
    /// where the duplex would report its end.
    struct ResetAtEnd(tokio::io::DuplexStream);

    impl AsyncRead for ResetAtEnd {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let before = buf.filled().len();
            match Pin::new(&mut self.0).poll_read(cx, buf) {
                Poll::Ready(Ok(())) if buf.filled().len() == before => {
                    Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
                }
                other => other,
            }
        }
    }

    impl AsyncWrite for ResetAtEnd {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.0).poll_write(cx, buf)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    /// Reads what the client receives until EOF and splits it into frames (a trailing partial frame is returned
    /// as bytes).
    async fn client_frames(client: &mut tokio::io::DuplexStream) -> (Vec<frame::Frame>, Vec<u8>) {
        let mut buf = Vec::new();
        client.read_to_end(&mut buf).await.expect("read");
        let mut frames = Vec::new();
        let mut at = 0;
        while let Some((f, used)) = decode(&buf[at..], 1 << 20).expect("valid frames") {
            at += used;
            frames.push(f);
        }
        (frames, buf[at..].to_vec())
    }

    #[tokio::test(start_paused = true)]
    async fn an_upstream_that_ends_without_a_close_gets_the_client_a_1014_after_the_last_whole_frame(
    ) {
        let (mut client, mut gw_client) = duplex(1 << 16);
        let (mut gw_up, mut upstream) = duplex(1 << 16);
        let task = tokio::spawn(async move {
            let control = control();
            let drain = Drain::new();
            Session::new(
                &mut gw_client,
                &mut gw_up,
                Vec::new(),
                Vec::new(),
                limits(),
                None,
            )
            .run(drain.signal(), &control)
            .await
        });
        upstream
            .write_all(&encode(OP_BINARY, b"last words", None))
            .await
            .expect("frame");
        drop(upstream);
        // The client answers the gateway's Close, as a WebSocket client does.
        let mut head = [0u8; 12];
        client.read_exact(&mut head).await.expect("the frame");
        client
            .write_all(&frame::close_frame(1014, "", Some([1, 2, 3, 4])))
            .await
            .expect("answer");
        let (frames, rest) = client_frames(&mut client).await;
        assert!(rest.is_empty());
        assert_eq!(frames.len(), 1, "{frames:?}");
        assert_eq!(frames[0].opcode, frame::OP_CLOSE);
        assert_eq!(frames[0].payload[..2], 1014u16.to_be_bytes());
        assert_eq!(&frames[0].payload[2..], b"bad gateway");
        let out = task.await.expect("join");
        assert_eq!(out.reason, EndReason::UpstreamEof);
        assert_eq!(out.reason.label(), "upstream_eof");
        assert!(out.close_sent);
    }

    #[tokio::test(start_paused = true)]
    async fn an_upstream_reset_gets_the_client_a_1014() {
        let (mut client, mut gw_client) = duplex(1 << 16);
        let (gw_up, mut upstream) = duplex(1 << 16);
        let mut gw_up = ResetAtEnd(gw_up);
        let task = tokio::spawn(async move {
            let control = control();
            let drain = Drain::new();
            Session::new(
                &mut gw_client,
                &mut gw_up,
                Vec::new(),
                Vec::new(),
                limits(),
                None,
            )
            .run(drain.signal(), &control)
            .await
        });
        upstream
            .write_all(&encode(OP_BINARY, b"x", None))
            .await
            .expect("frame");
        drop(upstream);
        let (frames, _) = client_frames(&mut client).await;
        assert_eq!(frames.len(), 2, "{frames:?}");
        assert_eq!(frames[0].payload, b"x");
        assert_eq!(frames[1].opcode, frame::OP_CLOSE);
        assert_eq!(frames[1].payload[..2], 1014u16.to_be_bytes());
        let out = task.await.expect("join");
        assert_eq!(out.reason, EndReason::UpstreamError);
        assert!(out.close_sent);
    }

    #[tokio::test(start_paused = true)]
    async fn a_close_from_the_upstream_passes_through_unchanged_and_is_not_doubled() {
        let (mut client, mut gw_client) = duplex(1 << 16);
        let (gw_up, mut upstream) = duplex(1 << 16);
        // Even when the upstream resets right after its Close: the client has its Close, no second one follows.
        let mut gw_up = ResetAtEnd(gw_up);
        let task = tokio::spawn(async move {
            let control = control();
            let drain = Drain::new();
            Session::new(
                &mut gw_client,
                &mut gw_up,
                Vec::new(),
                Vec::new(),
                limits(),
                None,
            )
            .run(drain.signal(), &control)
            .await
        });
        let close = frame::close_frame(4000, "broker says bye", None);
        upstream.write_all(&close).await.expect("close");
        drop(upstream);
        let mut got = vec![0u8; close.len()];
        client.read_exact(&mut got).await.expect("the Close");
        assert_eq!(got, close, "byte for byte");
        let out = task.await.expect("join");
        assert_eq!(out.reason, EndReason::UpstreamError);
        assert!(!out.close_sent, "no Close of the gateway's own");
        let (frames, rest) = client_frames(&mut client).await;
        assert!(frames.is_empty() && rest.is_empty(), "{frames:?} {rest:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_upstream_that_ends_mid_frame_leaves_no_room_for_a_close() {
        let (mut client, mut gw_client) = duplex(1 << 16);
        let (mut gw_up, mut upstream) = duplex(1 << 16);
        let task = tokio::spawn(async move {
            let control = control();
            let drain = Drain::new();
            Session::new(
                &mut gw_client,
                &mut gw_up,
                Vec::new(),
                Vec::new(),
                limits(),
                None,
            )
            .run(drain.signal(), &control)
            .await
        });
        let whole = encode(OP_BINARY, &[3u8; 100], None);
        upstream.write_all(&whole[..40]).await.expect("half");
        drop(upstream);
        let (frames, rest) = client_frames(&mut client).await;
        assert!(frames.is_empty());
        assert_eq!(rest, whole[..40], "the partial frame, and nothing after it");
        let out = task.await.expect("join");
        assert_eq!(out.reason, EndReason::UpstreamEof);
        assert!(!out.close_sent);
    }
}
