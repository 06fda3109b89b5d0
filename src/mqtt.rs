//! The token in the MQTT CONNECT password: for clients (IoT, mobile, MQTT.js) that cannot put a token on the
//! upgrade. The gateway completes the WebSocket handshake itself, reads the first frames (bounded in size and time),
//! parses the MQTT 3.1, 3.1.1 or 5 CONNECT, and verifies its password as a JWT before anything reaches the upstream.
//! The raw frames read are then forwarded unchanged, so the broker sees exactly what the client sent, unless a
//! CONNECT rewrite is on ([`crate::mqtt_identity`]): then, in every token mode, the CONNECT is read after the 101,
//! rewritten from the verified token and sent as one masked frame, and the bytes after it stay raw. With topic rules
//! or MQTT 5 re-authentication the CONNECT is read too, and the session's packets go through
//! [`crate::mqtt_filter`] (the relay of `mqtt_relay`) instead of the raw relay.

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

use crate::admission::{connect_upstream, Established};
use crate::auth::source::Source;
use crate::auth::{AuthError, Identity};
use crate::mqtt_acl::AclSettings;
use crate::mqtt_identity::MqttSettings;
use crate::mqtt_relay::Inspect;
use crate::net::Io;
use crate::refusal::{Channel, Refusal, Refuser};
use crate::route::Route;
use crate::server::Gateway;
use crate::upgrade::RequestHead;
use crate::upstream::Pool;

use crate::frame::{self, OP_BINARY, OP_CONTINUATION};

/// Largest CONNECT (and first frames) accepted.
pub const MAX_CONNECT_BYTES: usize = 64 * 1024;

/// The parts of a CONNECT the gateway uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// Protocol level: 3 (3.1), 4 (3.1.1) or 5.
    pub level: u8,
    /// The password field, if the password flag is set.
    pub password: Option<Vec<u8>>,
}

/// Why the first frames are not an acceptable CONNECT.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MqttError {
    /// Not a CONNECT, or a CONNECT that breaks the spec.
    #[error("malformed CONNECT: {0}")]
    Malformed(&'static str),
    /// Larger than [`MAX_CONNECT_BYTES`].
    #[error("CONNECT too large")]
    TooLarge,
    /// A WebSocket frame the MQTT path does not accept before CONNECT.
    #[error("unexpected WebSocket frame before CONNECT: {0}")]
    Frame(&'static str),
    /// The client went away.
    #[error("client closed before CONNECT")]
    Closed,
}

/// Appends `n` as an MQTT variable byte integer (the caller keeps `n` under 268,435,456).
pub(crate) fn put_varint(out: &mut Vec<u8>, mut n: usize) {
    loop {
        // Invariant: `n % 128` fits a byte.
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

/// Bytes that end too early or break an MQTT rule, as the packet readers report them: every caller's error type
/// takes it as its own "malformed" case.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Malformed(pub(crate) &'static str);

impl From<Malformed> for MqttError {
    fn from(e: Malformed) -> Self {
        MqttError::Malformed(e.0)
    }
}

/// A cursor over one MQTT packet (or a part of it): every read is bounds-checked, none panics.
pub(crate) struct Reader<'a> {
    pub(crate) buf: &'a [u8],
    pub(crate) pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or(Malformed("truncated"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, Malformed> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, Malformed> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    /// Two-byte length, then that many bytes.
    pub(crate) fn binary(&mut self) -> Result<&'a [u8], Malformed> {
        let n = usize::from(self.u16()?);
        self.take(n)
    }
    /// A length-prefixed UTF-8 string.
    pub(crate) fn string(&mut self) -> Result<&'a str, Malformed> {
        std::str::from_utf8(self.binary()?).map_err(|_| Malformed("string not UTF-8"))
    }
    /// A variable byte integer (at most four bytes).
    pub(crate) fn varint(&mut self) -> Result<usize, Malformed> {
        let mut value = 0usize;
        for i in 0..4 {
            let b = self.u8()?;
            value |= usize::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(Malformed("variable byte integer longer than 4 bytes"))
    }
    /// Whether every byte has been read.
    pub(crate) fn done(&self) -> bool {
        self.pos == self.buf.len()
    }
}

/// Reads a variable byte integer at the start of `buf`: `Ok(None)` when more bytes are needed.
fn remaining_length(buf: &[u8]) -> Result<Option<(usize, usize)>, MqttError> {
    let mut value = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        value |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    Err(MqttError::Malformed("remaining length longer than 4 bytes"))
}

/// Parses a CONNECT at the start of the MQTT byte stream `buf`: `Ok(None)` while incomplete.
///
/// # Errors
/// Anything but a well-formed CONNECT.
pub fn parse_connect(buf: &[u8]) -> Result<Option<Connect>, MqttError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    if first != 0x10 {
        return Err(MqttError::Malformed("first packet is not CONNECT"));
    }
    let Some((len, len_bytes)) = remaining_length(&buf[1..])? else {
        return Ok(None);
    };
    if len > MAX_CONNECT_BYTES {
        return Err(MqttError::TooLarge);
    }
    let start = 1 + len_bytes;
    if buf.len() < start + len {
        return Ok(None);
    }
    let mut r = Reader {
        buf: &buf[start..start + len],
        pos: 0,
    };
    let name = r.binary()?;
    let level = r.u8()?;
    match (name, level) {
        (b"MQTT", 4 | 5) | (b"MQIsdp", 3) => {}
        _ => return Err(MqttError::Malformed("unknown protocol name or level")),
    }
    let flags = r.u8()?;
    if flags & 0x01 != 0 {
        return Err(MqttError::Malformed("reserved flag set"));
    }
    let will = flags & 0x04 != 0;
    if !will && flags & 0x38 != 0 {
        return Err(MqttError::Malformed("will QoS/retain without will"));
    }
    if (flags >> 3) & 0x03 == 3 {
        return Err(MqttError::Malformed("will QoS 3"));
    }
    let has_user = flags & 0x80 != 0;
    let has_password = flags & 0x40 != 0;
    if level < 5 && has_password && !has_user {
        return Err(MqttError::Malformed("password without username"));
    }
    let _keep_alive = r.u16()?;
    if level == 5 {
        let n = r.varint()?;
        r.take(n)?;
    }
    let _client_id = r.binary()?;
    if will {
        if level == 5 {
            let n = r.varint()?;
            r.take(n)?;
        }
        let _topic = r.binary()?;
        let _payload = r.binary()?;
    }
    if has_user {
        let _user = r.binary()?;
    }
    let password = if has_password {
        Some(r.binary()?.to_vec())
    } else {
        None
    };
    if r.pos != len {
        return Err(MqttError::Malformed("trailing bytes in CONNECT"));
    }
    Ok(Some(Connect { level, password }))
}

/// CONNACK "not authorized": 3.1/3.1.1 return code 5, MQTT 5 reason code 0x87.
#[must_use]
pub fn connack_not_authorized(level: u8) -> Vec<u8> {
    if level >= 5 {
        vec![0x20, 0x03, 0x00, 0x87, 0x00]
    } else {
        vec![0x20, 0x02, 0x00, 0x05]
    }
}

/// CONNACK "client identifier not valid": 3.1/3.1.1 return code 2 ("identifier rejected"), MQTT 5 reason 0x85.
#[must_use]
pub fn connack_client_id_not_valid(level: u8) -> Vec<u8> {
    if level >= 5 {
        vec![0x20, 0x03, 0x00, 0x85, 0x00]
    } else {
        vec![0x20, 0x02, 0x00, 0x02]
    }
}

/// CONNACK "server unavailable": return code 3, MQTT 5 reason code 0x88.
#[must_use]
pub fn connack_unavailable(level: u8) -> Vec<u8> {
    if level >= 5 {
        vec![0x20, 0x03, 0x00, 0x88, 0x00]
    } else {
        vec![0x20, 0x02, 0x00, 0x03]
    }
}

/// CONNACK "quota exceeded": MQTT 5 reason code 0x97; 3.1/3.1.1 have none, so return code 3 (server unavailable).
#[must_use]
pub fn connack_quota_exceeded(level: u8) -> Vec<u8> {
    if level >= 5 {
        vec![0x20, 0x03, 0x00, 0x97, 0x00]
    } else {
        vec![0x20, 0x02, 0x00, 0x03]
    }
}

/// The client's first frames, read up to a complete CONNECT.
#[derive(Debug)]
pub struct FirstPacket {
    /// The CONNECT's fields the gateway checks.
    pub connect: Connect,
    /// Every raw byte read (masked frames, as sent): forwarded unchanged when nothing is rewritten.
    pub raw: Vec<u8>,
    /// Length of the complete frames in `raw` that carried the CONNECT.
    pub consumed: usize,
    /// Their payload, unmasked: the CONNECT, then any MQTT bytes that followed it in the same frames.
    pub payload: Vec<u8>,
    /// Length of the CONNECT at the start of `payload`.
    pub packet_len: usize,
    /// The FIN bit of the last of those frames (a message may go on in continuation frames).
    pub fin: bool,
}

impl FirstPacket {
    /// The bytes to send upstream with the CONNECT replaced by `packet`: one masked binary frame (FIN as the
    /// client's last frame had it, so the client's continuation frames still follow), then the raw rest.
    #[must_use]
    pub fn with_connect(&self, packet: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let tail = self.payload.get(self.packet_len..).unwrap_or_default();
        let mut payload = Vec::with_capacity(packet.len() + tail.len());
        payload.extend_from_slice(packet);
        payload.extend_from_slice(tail);
        let mut out = frame::encode(OP_BINARY, &payload, Some(mask));
        if !self.fin {
            out[0] &= 0x7f;
        }
        out.extend_from_slice(self.raw.get(self.consumed..).unwrap_or_default());
        out
    }

    /// The CONNECT packet itself.
    #[must_use]
    pub fn packet(&self) -> &[u8] {
        self.payload.get(..self.packet_len).unwrap_or_default()
    }
}

/// Reads WebSocket frames from the client until a complete CONNECT: returns it and every raw byte read (masked
/// frames, as sent), which the caller forwards unchanged.
///
/// # Errors
/// See [`MqttError`]; I/O errors count as [`MqttError::Closed`].
pub async fn read_connect<R: AsyncRead + Unpin>(
    io: &mut R,
    raw: Vec<u8>,
) -> Result<(Connect, Vec<u8>), MqttError> {
    read_first_packet(io, raw).await.map(|f| (f.connect, f.raw))
}

/// The client's first frames, read incrementally (each frame is decoded once, however the bytes are split).
struct FirstReader {
    raw: Vec<u8>,
    parsed: usize,
    payload: Vec<u8>,
}

impl FirstReader {
    /// The CONNECT once the bytes read so far hold it whole, `None` until then.
    fn step(&mut self) -> Result<Option<FirstPacket>, MqttError> {
        while let Some((f, used)) = frame::decode(&self.raw[self.parsed..], MAX_CONNECT_BYTES)
            .map_err(|_| MqttError::TooLarge)?
        {
            self.parsed += used;
            match f.opcode {
                OP_BINARY | OP_CONTINUATION => self.payload.extend_from_slice(&f.payload),
                frame::OP_CLOSE => return Err(MqttError::Closed),
                _ => return Err(MqttError::Frame("only binary frames carry MQTT")),
            }
            if self.payload.len() > MAX_CONNECT_BYTES {
                return Err(MqttError::TooLarge);
            }
            if let Some(connect) = parse_connect(&self.payload)? {
                // Invariant: parse_connect found a complete packet, so its remaining length parses.
                let packet_len = match remaining_length(self.payload.get(1..).unwrap_or_default())?
                {
                    Some((len, n)) => 1 + n + len,
                    None => return Err(MqttError::Malformed("truncated")),
                };
                return Ok(Some(FirstPacket {
                    connect,
                    raw: std::mem::take(&mut self.raw),
                    consumed: self.parsed,
                    payload: std::mem::take(&mut self.payload),
                    packet_len,
                    fin: f.fin,
                }));
            }
        }
        if self.raw.len() > MAX_CONNECT_BYTES + 14 {
            return Err(MqttError::TooLarge);
        }
        Ok(None)
    }
}

/// Reads WebSocket frames from the client until a complete CONNECT, keeping what a rewrite needs.
///
/// # Errors
/// See [`MqttError`]; I/O errors count as [`MqttError::Closed`].
pub async fn read_first_packet<R: AsyncRead + Unpin>(
    io: &mut R,
    raw: Vec<u8>,
) -> Result<FirstPacket, MqttError> {
    let mut r = FirstReader {
        raw,
        parsed: 0,
        payload: Vec::new(),
    };
    let mut chunk = vec![0u8; 4096];
    loop {
        if let Some(f) = r.step()? {
            return Ok(f);
        }
        let n = io.read(&mut chunk).await.map_err(|_| MqttError::Closed)?;
        if n == 0 {
            return Err(MqttError::Closed);
        }
        r.raw.extend_from_slice(&chunk[..n]);
    }
}

/// Looks for a CONNECT in the client's first frames without insisting on one (re-authentication alone, which only
/// a CONNECT declaring the method turns on): `Err` with every client byte read, to forward unchanged, as soon as
/// the bytes are not a CONNECT, the client is gone, the upstream speaks first (its bytes are appended to
/// `upstream_rest`: not MQTT, whose server waits for the CONNECT), or `deadline` passes.
pub(crate) async fn sniff_first_packet(
    client: &mut Io,
    upstream: &mut Io,
    raw: Vec<u8>,
    upstream_rest: &mut Vec<u8>,
    deadline: Instant,
) -> Result<FirstPacket, Vec<u8>> {
    let mut r = FirstReader {
        raw,
        parsed: 0,
        payload: Vec::new(),
    };
    if !upstream_rest.is_empty() {
        return Err(r.raw);
    }
    let mut chunk = vec![0u8; 4096];
    let mut up = vec![0u8; 4096];
    loop {
        match r.step() {
            Ok(Some(f)) => return Ok(f),
            Ok(None) => {}
            Err(_) => return Err(r.raw),
        }
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => return Err(r.raw),
            n = client.read(&mut chunk) => match n {
                Ok(n) if n > 0 => r.raw.extend_from_slice(&chunk[..n]),
                _ => return Err(r.raw),
            },
            n = upstream.read(&mut up) => {
                if let Ok(n) = n {
                    upstream_rest.extend_from_slice(&up[..n]);
                }
                return Err(r.raw);
            }
        }
    }
}

/// The CONNECT rewrite that applies on `route`: the global settings, with the route's username claim.
pub(crate) fn settings_for(gw: &Gateway, route: &Route) -> MqttSettings {
    let mut s = gw.config.mqtt.clone();
    if let Some(claim) = &route.mqtt_username_claim {
        s.username_claim = Some(claim.clone());
    }
    s
}

/// The topic rules that apply on `route`: the global settings, with the route's templates.
pub(crate) fn acl_for(gw: &Gateway, route: &Route) -> AclSettings {
    let mut a = gw.config.mqtt_acl.clone();
    if let Some(t) = &route.mqtt_publish_acl {
        a.publish = Some(t.clone());
    }
    if let Some(t) = &route.mqtt_subscribe_acl {
        a.subscribe = Some(t.clone());
    }
    a
}

/// How an MQTT session on `route` treats its CONNECT after the 101.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnectRead {
    /// Not read: raw bytes from the start.
    No,
    /// Looked for (re-authentication alone): anything else than a CONNECT leaves the session raw.
    Sniff,
    /// Required (a CONNECT rewrite or topic rules): anything else is refused.
    Required,
}

/// How an MQTT session on `route` reads its CONNECT.
pub(crate) fn reads_connect(gw: &Gateway, route: &Route) -> ConnectRead {
    if settings_for(gw, route).active(!gw.config.auth.forward_claims.is_empty())
        || acl_for(gw, route).active()
    {
        ConnectRead::Required
    } else if gw.config.mqtt_reauth_method.is_some() {
        ConnectRead::Sniff
    } else {
        ConnectRead::No
    }
}

/// Whether the request carries MQTT: the client offers the `mqtt` subprotocol, the upstream selected it, or the
/// route names an MQTT setting of its own (fail closed: a broker that speaks MQTT without the subprotocol must not
/// let a client skip the rewrite or the topic rules by offering none).
pub(crate) fn carries_mqtt(head: &RequestHead, selected: Option<&str>, route: &Route) -> bool {
    route.has_mqtt_settings()
        || selected.is_some_and(|p| p.trim().eq_ignore_ascii_case("mqtt"))
        || head
            .values("Sec-WebSocket-Protocol")
            .flat_map(|v| v.split(','))
            .any(|p| p.trim().eq_ignore_ascii_case("mqtt"))
}

/// What goes upstream first, and the inspection the session needs (`None`: the raw relay).
pub(crate) type Forward = (Vec<u8>, Option<Box<Inspect>>);

/// The bytes to forward upstream for `first` on `route`: unchanged when nothing applies; the rewritten CONNECT and
/// the raw rest for a rewrite alone; the CONNECT alone (without the re-authentication method) and an
/// [`Inspect`] when the session's packets are to be read.
///
/// # Errors
/// The refusal to answer on the MQTT channel: a malformed CONNECT, or an identity that may not use it.
pub(crate) fn forward_first(
    gw: &Gateway,
    route: &Route,
    identity: &Identity,
    first: FirstPacket,
) -> Result<Forward, Refusal> {
    let settings = settings_for(gw, route);
    let acl = acl_for(gw, route);
    let rewrite = settings.active(!gw.config.auth.forward_claims.is_empty());
    let mut packet = first.packet().to_vec();
    let mut reauth = None;
    if let (5, Some(method)) = (first.connect.level, &gw.config.mqtt_reauth_method) {
        let mut split = crate::mqtt_identity::split_connect(&packet)?;
        let (declared, props) = crate::mqtt_identity::take_auth(&split.properties)?;
        if declared.as_deref() == Some(method.as_bytes()) {
            split.properties = props;
            packet = split.encode()?;
            reauth = Some(method.clone());
        }
    }
    if !rewrite && !acl.active() && reauth.is_none() {
        return Ok((first.raw, None));
    }
    if rewrite {
        packet = match crate::mqtt_identity::rewrite_connect(&settings, identity, &packet) {
            Ok(p) => p,
            Err(Ok(e)) => return Err(Refusal::Mqtt(e)),
            Err(Err(e)) => return Err(Refusal::MqttIdentity(e)),
        };
    }
    if !acl.active() && reauth.is_none() {
        return Ok((first.with_connect(&packet, crate::relay::mask_key()), None));
    }
    let level = first.connect.level;
    let FirstPacket {
        raw,
        consumed,
        mut payload,
        packet_len,
        ..
    } = first;
    let tail = payload.split_off(packet_len.min(payload.len()));
    let client_raw = raw.get(consumed..).unwrap_or_default().to_vec();
    let inspect = Inspect::new(level, acl, reauth, identity, tail, client_raw);
    let connect = frame::encode(OP_BINARY, &packet, Some(crate::relay::mask_key()));
    Ok((connect, Some(Box::new(inspect))))
}

/// Header, cookie and query token modes on an MQTT route with a rewrite on: after the upstream's 101 went to the
/// client, reads the CONNECT by the same handshake `deadline` and returns what to forward instead of `rest`.
/// `None` when refused (answered with CONNACK and Close; the upstream is dropped before any byte reached it).
pub(crate) async fn after_upgrade(
    at: &mut Refuser<'_>,
    io: &mut Io,
    rest: Vec<u8>,
    identity: &Identity,
    route: &Route,
    deadline: Instant,
) -> Option<Forward> {
    at.channel = Channel::Mqtt(None);
    let first = match tokio::time::timeout_at(deadline, read_first_packet(io, rest)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return at.refuse(io, e.into()).await,
        Err(_) => return at.refuse(io, Refusal::HandshakeTimeout).await,
    };
    at.channel = Channel::Mqtt(Some(first.connect.level));
    match forward_first(at.gw, route, identity, first) {
        Ok(f) => Some(f),
        Err(e) => at.refuse(io, e).await,
    }
}

/// The CONNECT-password path, for clients that cannot set headers: the gateway completes the client's WebSocket
/// handshake itself, reads the CONNECT before the connection's one handshake `deadline` (not a fresh one),
/// verifies its password as the token, then dials the upstream and relays the CONNECT and everything after it
/// unchanged. Refusals are a CONNACK and a Close ([`Refusal::mqtt`]).
pub(crate) async fn session<'a>(
    gw: &'a Gateway,
    mut io: Io,
    head: &RequestHead,
    rest: Vec<u8>,
    peer: SocketAddr,
    pool: &'a Pool,
    deadline: Instant,
) -> Option<Established<'a>> {
    let route = pool.route();
    use tokio::io::AsyncWriteExt;
    let started = Instant::now();
    let key = head
        .single("Sec-WebSocket-Key")
        .ok()
        .flatten()
        .unwrap_or_default();
    let accept = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n",
        crate::upgrade::accept_key(key)
    );
    if io.write_all(accept.as_bytes()).await.is_err() || io.flush().await.is_err() {
        return None;
    }
    let mut at = Refuser {
        gw,
        peer,
        head: Some(head),
        route: Some(route),
        channel: Channel::Mqtt(None),
    };
    let first = match tokio::time::timeout_at(deadline, read_first_packet(&mut io, rest)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return at.refuse(&mut io, e.into()).await,
        Err(_) => return at.refuse(&mut io, Refusal::HandshakeTimeout).await,
    };
    at.channel = Channel::Mqtt(Some(first.connect.level));
    let token = first
        .connect
        .password
        .as_deref()
        .and_then(|p| std::str::from_utf8(p).ok())
        .filter(|t| !t.is_empty());
    let verified = match token {
        Some(t) => gw
            .verifier
            .verify(t)
            .await
            .and_then(|i| gw.check_revocation(&i).map(|()| i)),
        None => Err(AuthError::Missing),
    };
    let identity = match verified {
        Ok(i) => i,
        Err(e) => return at.refuse(&mut io, e.into()).await,
    };
    // The rewrite (and the client id check) before the dial: a refused CONNECT never reaches the broker.
    let (raw, inspect) = match forward_first(gw, route, &identity, first) {
        Ok(f) => f,
        Err(e) => return at.refuse(&mut io, e).await,
    };
    let (slot, connected, lease, subject_lease) =
        match connect_upstream(gw, &io, peer, head, pool, &identity, true, deadline).await {
            Ok(c) => c,
            Err(e) => return at.refuse(&mut io, e).await,
        };
    gw.metrics
        .handshake_duration
        .observe(started.elapsed().as_secs_f64());
    gw.metrics
        .protocol_connections
        .get_or_create(&[("protocol", "mqtt")])
        .inc();
    Some(Established {
        client: io,
        upstream: connected.io,
        client_rest: raw,
        upstream_rest: connected.rest,
        peer,
        client_ip: crate::upstream::real_client_ip(head, peer.ip(), &gw.config.forwarded_trusted),
        route,
        identity,
        source: Source::MqttPassword,
        slot,
        lease,
        subject_lease,
        inspect,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(level: u8, user: Option<&[u8]>, password: Option<&[u8]>, will: bool) -> Vec<u8> {
        let mut body = Vec::new();
        let name: &[u8] = if level == 3 { b"MQIsdp" } else { b"MQTT" };
        body.extend_from_slice(&(name.len() as u16).to_be_bytes());
        body.extend_from_slice(name);
        body.push(level);
        let mut flags = 0x02;
        if will {
            flags |= 0x04 | 0x08;
        }
        if user.is_some() {
            flags |= 0x80;
        }
        if password.is_some() {
            flags |= 0x40;
        }
        body.push(flags);
        body.extend_from_slice(&60u16.to_be_bytes());
        if level == 5 {
            body.extend_from_slice(&[0x05, 0x11, 0, 0, 0, 10]); // session expiry interval property
        }
        let field = |b: &mut Vec<u8>, v: &[u8]| {
            b.extend_from_slice(&(v.len() as u16).to_be_bytes());
            b.extend_from_slice(v);
        };
        field(&mut body, b"client-1");
        if will {
            if level == 5 {
                body.push(0);
            }
            field(&mut body, b"will/topic");
            field(&mut body, b"gone");
        }
        if let Some(u) = user {
            field(&mut body, u);
        }
        if let Some(p) = password {
            field(&mut body, p);
        }
        let mut out = vec![0x10];
        let mut len = body.len();
        loop {
            let mut b = (len % 128) as u8;
            len /= 128;
            if len > 0 {
                b |= 0x80;
            }
            out.push(b);
            if len == 0 {
                break;
            }
        }
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn parses_each_version_with_a_password() {
        for level in [3, 4, 5] {
            for will in [false, true] {
                let bytes = connect(level, Some(b"any"), Some(b"a.b.c"), will);
                let c = parse_connect(&bytes).expect("valid").expect("complete");
                assert_eq!(
                    (c.level, c.password.as_deref()),
                    (level, Some(&b"a.b.c"[..]))
                );
            }
        }
        let c = parse_connect(&connect(4, None, None, false))
            .expect("valid")
            .expect("complete");
        assert_eq!(c.password, None);
        let c = parse_connect(&connect(5, None, Some(b"tok"), false))
            .expect("v5 password without user")
            .expect("complete");
        assert_eq!(c.password.as_deref(), Some(&b"tok"[..]));
    }

    #[test]
    fn truncated_packets_ask_for_more_and_malformed_ones_fail() {
        let bytes = connect(4, Some(b"u"), Some(&[b'x'; 300]), true);
        for cut in 0..bytes.len() {
            assert_eq!(parse_connect(&bytes[..cut]), Ok(None), "cut at {cut}");
        }
        let mut wrong_type = bytes.clone();
        wrong_type[0] = 0x30;
        assert!(parse_connect(&wrong_type).is_err());
        let mut reserved = connect(4, None, None, false);
        reserved[9] |= 0x01;
        assert!(parse_connect(&reserved).is_err());
        let mut level = connect(4, None, None, false);
        level[8] = 9;
        assert!(parse_connect(&level).is_err());
        assert!(
            parse_connect(&[0x10, 0xff, 0xff, 0xff, 0xff, 0x01]).is_err(),
            "5-byte remaining length"
        );
        assert!(
            parse_connect(&connect(4, None, Some(b"p"), false)).is_err(),
            "3.1.1 password without username"
        );
        // The remaining length claims less than the fields need.
        let mut short = connect(4, Some(b"u"), Some(b"p"), false);
        short[1] -= 3;
        assert!(parse_connect(&short).is_err());
        // Field lengths running past the packet.
        let mut overrun = connect(4, Some(b"u"), Some(b"p"), false);
        let n = overrun.len();
        overrun[n - 3] = 0xff;
        assert!(parse_connect(&overrun).is_err());
    }

    #[tokio::test]
    async fn reads_connect_split_over_frames_and_keeps_the_raw_bytes() {
        let packet = connect(4, Some(b"u"), Some(b"tok.en.x"), false);
        let (a, b) = packet.split_at(10);
        let mut wire = frame::encode(OP_BINARY, a, Some([1, 2, 3, 4]));
        wire[0] &= 0x7f; // not FIN
        wire.extend_from_slice(&frame::encode(OP_CONTINUATION, b, Some([5, 6, 7, 8])));
        wire.extend_from_slice(&frame::encode(OP_BINARY, &[0xc0, 0x00], Some([9, 9, 9, 9]))); // PINGREQ after
        let (first, rest) = wire.split_at(7);
        let mut reader = rest;
        let (c, raw) = read_connect(&mut reader, first.to_vec())
            .await
            .expect("connect");
        assert_eq!(c.password.as_deref(), Some(&b"tok.en.x"[..]));
        assert!(wire.starts_with(&raw), "raw bytes are forwarded unchanged");
        let mut text = &frame::encode(0x1, b"x", Some([0; 4]))[..];
        assert!(read_connect(&mut text, Vec::new()).await.is_err());
    }
}
