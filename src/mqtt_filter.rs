//! The MQTT packet streams of an inspected session (topic rules, re-authentication): a WebSocket frame reader that
//! works on any split of the bytes, the client's packets checked one by one ([`Inspector::client_next`]), and the
//! broker's stream passed through with the SUBACKs of filtered SUBSCRIBEs rewritten ([`Inspector::broker_feed`]).
//!
//! Bounds: a client packet is at most [`MAX_PACKET`] bytes (a larger one ends the session with Close 1009), so the
//! client buffer never holds more than one packet and one read; the broker's stream is never buffered except for a
//! SUBACK being rewritten (at most [`MAX_PACKET`] too); the gateway's own answers wait in a queue the relay bounds.
//! Everything here is synchronous and fuzzed (`fuzz/fuzz_targets/mqtt_stream.rs`).

use std::collections::HashMap;

use crate::mqtt::{put_varint, Malformed, Reader};
use crate::mqtt_acl::SessionRules;

/// Largest client packet an inspected session accepts (fixed header included): 256 KiB.
pub const MAX_PACKET: usize = 256 * 1024;
/// SUBSCRIBEs whose SUBACK is still to be rewritten, at most; past it a partly denied SUBSCRIBE is denied whole.
pub const MAX_PENDING_SUBACKS: usize = 64;
/// Bytes of topic names remembered for MQTT 5 topic aliases, at most; past it a new alias is denied.
pub const MAX_ALIAS_BYTES: usize = 64 * 1024;

/// Why the client's stream cannot go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    /// A packet over [`MAX_PACKET`]: Close 1009.
    #[error("MQTT packet too large")]
    TooBig,
    /// A packet (or frame) that breaks the protocol: Close 1002.
    #[error("malformed MQTT packet: {0}")]
    Malformed(&'static str),
}

impl From<Malformed> for FilterError {
    fn from(e: Malformed) -> Self {
        FilterError::Malformed(e.0)
    }
}

/// What one WebSocket frame reader saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsEvent {
    /// A frame began, with this opcode (the message rate charges it).
    Start(u8),
    /// Payload bytes of binary (or continuation) frames, unmasked.
    Data(Vec<u8>),
    /// A complete control frame: opcode and payload, unmasked.
    Control(u8, Vec<u8>),
}

/// Reads WebSocket frames from any split of the stream, payloads streamed (never a whole data frame buffered).
#[derive(Debug, Clone)]
pub struct FrameReader {
    /// Client frames must be masked, server frames must not.
    masked: bool,
    head: [u8; 14],
    have: usize,
    in_payload: bool,
    remaining: u64,
    key: [u8; 4],
    pos: usize,
    opcode: u8,
    control: Vec<u8>,
}

fn header_len(prefix: &[u8]) -> usize {
    if prefix.len() < 2 {
        return 2;
    }
    let ext = match prefix[1] & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    2 + ext + if prefix[1] & 0x80 != 0 { 4 } else { 0 }
}

impl FrameReader {
    /// A reader at a frame boundary; `masked` for the client's side.
    #[must_use]
    pub fn new(masked: bool) -> FrameReader {
        FrameReader {
            masked,
            head: [0; 14],
            have: 0,
            in_payload: false,
            remaining: 0,
            key: [0; 4],
            pos: 0,
            opcode: 0,
            control: Vec::new(),
        }
    }

    /// Whether the bytes fed so far end at a frame boundary.
    #[must_use]
    pub fn at_boundary(&self) -> bool {
        !self.in_payload && self.have == 0
    }

    /// Consumes a chunk, appending what it held to `events`.
    ///
    /// # Errors
    /// A frame the MQTT path does not accept: reserved bits, an unknown opcode, a text frame from the client, a
    /// wrong mask bit, or a control frame fragmented or over 125 bytes.
    pub fn feed(&mut self, mut chunk: &[u8], events: &mut Vec<WsEvent>) -> Result<(), FilterError> {
        while !chunk.is_empty() {
            if !self.in_payload {
                let need = header_len(&self.head[..self.have]);
                let take = (need - self.have).min(chunk.len());
                self.head[self.have..self.have + take].copy_from_slice(&chunk[..take]);
                self.have += take;
                chunk = &chunk[take..];
                if self.have < header_len(&self.head[..self.have]) {
                    continue;
                }
                self.start_frame(events)?;
                continue;
            }
            let take = usize::try_from(self.remaining).map_or(chunk.len(), |r| r.min(chunk.len()));
            let mut data = chunk[..take].to_vec();
            if self.masked {
                for b in &mut data {
                    *b ^= self.key[self.pos % 4];
                    self.pos += 1;
                }
            }
            chunk = &chunk[take..];
            self.remaining -= take as u64;
            if self.opcode >= 0x8 {
                self.control.extend_from_slice(&data);
            } else if let Some(WsEvent::Data(last)) = events.last_mut() {
                last.extend_from_slice(&data);
            } else {
                events.push(WsEvent::Data(data));
            }
            if self.remaining == 0 {
                self.end_frame(events);
            }
        }
        Ok(())
    }

    fn start_frame(&mut self, events: &mut Vec<WsEvent>) -> Result<(), FilterError> {
        let h = &self.head[..self.have];
        let fin = h[0] & 0x80 != 0;
        let opcode = h[0] & 0x0f;
        if h[0] & 0x70 != 0 {
            return Err(FilterError::Malformed("reserved bits set"));
        }
        if (h[1] & 0x80 != 0) != self.masked {
            return Err(FilterError::Malformed("wrong mask bit"));
        }
        let len = match h[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([h[2], h[3]])),
            127 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&h[2..10]);
                u64::from_be_bytes(b)
            }
            n => u64::from(n),
        };
        match opcode {
            0x0 | 0x2 => {}
            0x1 if !self.masked => {}
            0x8..=0xa if fin && len <= 125 => {}
            0x1 => return Err(FilterError::Malformed("text frame")),
            0x8..=0xa => return Err(FilterError::Malformed("bad control frame")),
            _ => return Err(FilterError::Malformed("unknown opcode")),
        }
        if self.masked {
            let n = self.have;
            self.key.copy_from_slice(&self.head[n - 4..n]);
        }
        self.opcode = opcode;
        self.remaining = len;
        self.pos = 0;
        self.have = 0;
        self.in_payload = true;
        events.push(WsEvent::Start(opcode));
        if len == 0 {
            self.end_frame(events);
        }
        Ok(())
    }

    fn end_frame(&mut self, events: &mut Vec<WsEvent>) {
        self.in_payload = false;
        if self.opcode >= 0x8 {
            events.push(WsEvent::Control(
                self.opcode,
                std::mem::take(&mut self.control),
            ));
        }
    }
}

/// What to do with one client packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Send these bytes to the broker.
    Forward(Vec<u8>),
    /// Answer the client with this packet; nothing goes to the broker.
    Reply(Vec<u8>),
    /// Outside the rules (`kind`: `publish` or `subscribe`). With [`crate::mqtt_acl::DenyAction::Ignore`], `forward` (what is left
    /// of a SUBSCRIBE) goes to the broker and `reply` (PUBACK, PUBREC, SUBACK) to the client.
    Denied {
        /// `publish` or `subscribe`.
        kind: &'static str,
        /// Bytes for the broker.
        forward: Option<Vec<u8>>,
        /// A packet for the client.
        reply: Option<Vec<u8>>,
    },
    /// An MQTT 5 AUTH with reason 0x19 and the re-authentication method: the new token (Authentication Data).
    Reauth(Vec<u8>),
}

/// The state of one inspected session's two packet streams.
#[derive(Debug)]
pub struct Inspector {
    level: u8,
    rules: SessionRules,
    reauth_method: Option<String>,
    buf: Vec<u8>,
    at: usize,
    /// Packet id of a SUBSCRIBE sent on with some filters removed -> which of its filters were allowed.
    pending: HashMap<u16, Vec<bool>>,
    /// 3.1.1 QoS 2 packet ids dropped (acknowledged with PUBREC by the gateway): their PUBREL is answered here.
    dropped: Option<Box<[u64; 1024]>>,
    /// MQTT 5 topic aliases set by the client: the topic, or `None` when it was denied.
    aliases: HashMap<u16, Option<String>>,
    alias_bytes: usize,
    broker: Broker,
}

#[derive(Debug)]
enum Broker {
    /// Reading a fixed header (bytes so far).
    Header(Vec<u8>),
    /// Passing this many more bytes of a packet.
    Pass(usize),
    /// Collecting a SUBACK to rewrite: the whole packet so far, and its full length.
    Suback(Vec<u8>, usize),
    /// The broker's stream did not parse: passed as it is from now on, no packet of the gateway's own is added.
    Lost,
}

/// The fixed header at the start of `buf`: `Ok(None)` while incomplete, else (remaining length, header length).
fn fixed_header(buf: &[u8]) -> Result<Option<(usize, usize)>, FilterError> {
    let mut value = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        value |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((value, 2 + i)));
        }
    }
    Err(FilterError::Malformed(
        "remaining length longer than 4 bytes",
    ))
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(first);
    put_varint(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

/// MQTT 5 DISCONNECT with reason 0x87 "not authorized".
#[must_use]
pub fn disconnect_not_authorized() -> Vec<u8> {
    vec![0xe0, 0x02, 0x87, 0x00]
}

/// MQTT 5 AUTH reason 0x00 (success) with the Authentication Method `method`.
#[must_use]
pub fn auth_success(method: &str) -> Vec<u8> {
    let m = method.as_bytes();
    let mut props = vec![0x15];
    // Invariant: the method is a configured string of at most 128 bytes.
    props.extend_from_slice(&u16::try_from(m.len()).unwrap_or(0).to_be_bytes());
    props.extend_from_slice(m);
    let mut body = vec![0x00];
    put_varint(&mut body, props.len());
    body.extend_from_slice(&props);
    packet(0xf0, &body)
}

/// Skips an MQTT 5 property list whose ids are those of `allowed` kinds; returns the Topic Alias if any.
fn publish_properties(props: &[u8]) -> Result<Option<u16>, FilterError> {
    let mut r = Reader { buf: props, pos: 0 };
    let mut alias = None;
    while !r.done() {
        match r.varint()? {
            0x01 => drop(r.take(1)?),
            0x02 => drop(r.take(4)?),
            0x23 => alias = Some(r.u16()?),
            0x08 | 0x03 => drop(r.string()?),
            0x09 => drop(r.binary()?),
            0x0b => drop(r.varint()?),
            0x26 => {
                r.string()?;
                r.string()?;
            }
            _ => return Err(FilterError::Malformed("unknown PUBLISH property")),
        }
    }
    Ok(alias)
}

impl Inspector {
    /// An inspector for a session at protocol `level` (3, 4 or 5), with `rules`; `reauth_method` when the CONNECT
    /// declared the re-authentication method (MQTT 5). `client` is the client's MQTT bytes already read after the
    /// CONNECT.
    #[must_use]
    pub fn new(
        level: u8,
        rules: SessionRules,
        reauth_method: Option<String>,
        client: Vec<u8>,
    ) -> Inspector {
        Inspector {
            level,
            rules,
            reauth_method,
            buf: client,
            at: 0,
            pending: HashMap::new(),
            dropped: None,
            aliases: HashMap::new(),
            alias_bytes: 0,
            broker: Broker::Header(Vec::with_capacity(5)),
        }
    }

    /// The MQTT protocol level.
    #[must_use]
    pub fn level(&self) -> u8 {
        self.level
    }

    /// Replaces the rules (after a re-authentication, the claims may have changed).
    pub fn set_rules(&mut self, rules: SessionRules) {
        self.rules = rules;
    }

    /// Bytes of client packets held (at most one incomplete packet after [`Inspector::client_next`] returned
    /// `None`).
    #[must_use]
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.at
    }

    /// Appends the client's MQTT bytes (payloads of its binary frames).
    pub fn client_feed(&mut self, bytes: &[u8]) {
        if self.at > 0 && self.at == self.buf.len() {
            self.buf.clear();
            self.at = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The verdict on the next complete client packet, `None` until one is complete.
    ///
    /// # Errors
    /// [`FilterError`]: the session ends.
    pub fn client_next(&mut self) -> Result<Option<Verdict>, FilterError> {
        let rest = &self.buf[self.at..];
        if rest.is_empty() {
            return Ok(None);
        }
        let Some((len, hlen)) = fixed_header(rest)? else {
            return Ok(None);
        };
        if len + hlen > MAX_PACKET {
            return Err(FilterError::TooBig);
        }
        if rest.len() < hlen + len {
            if self.at > 0 {
                // Keep only the incomplete packet, so the buffer stays within one packet and one read.
                self.buf.drain(..self.at);
                self.at = 0;
            }
            return Ok(None);
        }
        let whole = rest[..hlen + len].to_vec();
        self.at += hlen + len;
        if self.at == self.buf.len() {
            self.buf.clear();
            self.at = 0;
        }
        self.judge(whole, hlen).map(Some)
    }

    fn judge(&mut self, whole: Vec<u8>, hlen: usize) -> Result<Verdict, FilterError> {
        let first = whole[0];
        let body = &whole[hlen..];
        match first >> 4 {
            0 => Err(FilterError::Malformed("reserved packet type")),
            1 => Err(FilterError::Malformed("second CONNECT")),
            3 => self.publish(first, body, &whole),
            6 => {
                let mut r = Reader { buf: body, pos: 0 };
                let id = r.u16()?;
                if self.take_dropped(id) {
                    return Ok(Verdict::Reply(vec![0x70, 0x02, (id >> 8) as u8, id as u8]));
                }
                Ok(Verdict::Forward(whole))
            }
            8 if self.rules.subscribe.is_some() => {
                let body = body.to_vec();
                self.subscribe(first, &body, whole)
            }
            15 if self.reauth_method.is_some() => self.auth(body),
            _ => Ok(Verdict::Forward(whole)),
        }
    }

    fn publish(&mut self, first: u8, body: &[u8], whole: &[u8]) -> Result<Verdict, FilterError> {
        let qos = (first >> 1) & 0x03;
        if qos == 3 {
            return Err(FilterError::Malformed("PUBLISH QoS 3"));
        }
        if self.rules.publish.is_none() {
            return Ok(Verdict::Forward(whole.to_vec()));
        }
        let mut r = Reader { buf: body, pos: 0 };
        let topic = r.string()?;
        let id = if qos > 0 { Some(r.u16()?) } else { None };
        let alias = if self.level >= 5 {
            let n = r.varint()?;
            publish_properties(r.take(n)?)?
        } else {
            None
        };
        let allowed = match (alias, topic.is_empty()) {
            (Some(a), true) => self
                .aliases
                .get(&a)
                .and_then(Option::as_deref)
                .is_some_and(|t| self.rules.may_publish(t)),
            (Some(a), false) => {
                let ok = self.rules.may_publish(topic);
                let old = self
                    .aliases
                    .get(&a)
                    .map_or(0, |t| t.as_ref().map_or(0, String::len));
                if ok && self.alias_bytes - old + topic.len() <= MAX_ALIAS_BYTES {
                    self.alias_bytes = self.alias_bytes - old + topic.len();
                    self.aliases.insert(a, Some(topic.to_owned()));
                    true
                } else {
                    self.alias_bytes -= old;
                    self.aliases.insert(a, None);
                    false
                }
            }
            (None, _) => self.rules.may_publish(topic),
        };
        if allowed {
            if let (2, Some(id)) = (qos, id) {
                self.take_dropped(id);
            }
            return Ok(Verdict::Forward(whole.to_vec()));
        }
        let reply = id.map(|id| {
            let kind = if qos == 1 { 0x40 } else { 0x50 };
            let [hi, lo] = id.to_be_bytes();
            if self.level >= 5 {
                vec![kind, 0x03, hi, lo, 0x87]
            } else {
                vec![kind, 0x02, hi, lo]
            }
        });
        if let (2, Some(id), true) = (qos, id, self.level < 5) {
            // 3.1.1 has no negative PUBREC: the client goes on with PUBREL, answered here with PUBCOMP. (MQTT 5
            // ends the flow at a PUBREC with a failure reason.)
            let words = self.dropped.get_or_insert_with(|| Box::new([0u64; 1024]));
            words[usize::from(id / 64)] |= 1 << (id % 64);
        }
        Ok(Verdict::Denied {
            kind: "publish",
            forward: None,
            reply,
        })
    }

    fn take_dropped(&mut self, id: u16) -> bool {
        let Some(words) = self.dropped.as_mut() else {
            return false;
        };
        let (w, bit) = (usize::from(id / 64), 1u64 << (id % 64));
        let was = words[w] & bit != 0;
        words[w] &= !bit;
        was
    }

    fn subscribe(
        &mut self,
        first: u8,
        body: &[u8],
        whole: Vec<u8>,
    ) -> Result<Verdict, FilterError> {
        if first & 0x0f != 0x02 {
            return Err(FilterError::Malformed("SUBSCRIBE flags"));
        }
        let mut r = Reader { buf: body, pos: 0 };
        let id = r.u16()?;
        if self.level >= 5 {
            let n = r.varint()?;
            r.take(n)?;
        }
        let props_end = r.pos;
        let mut allowed = Vec::new();
        let mut kept = Vec::new();
        while !r.done() {
            let start = r.pos;
            let filter = r.string()?;
            r.u8()?;
            let ok = self.rules.may_subscribe(filter);
            if ok {
                kept.extend_from_slice(&body[start..r.pos]);
            }
            allowed.push(ok);
        }
        if allowed.is_empty() {
            return Err(FilterError::Malformed("SUBSCRIBE without a filter"));
        }
        if allowed.iter().all(|a| *a) {
            return Ok(Verdict::Forward(whole));
        }
        if kept.is_empty()
            || (self.pending.len() >= MAX_PENDING_SUBACKS && !self.pending.contains_key(&id))
        {
            let all_denied = vec![false; allowed.len()];
            return Ok(Verdict::Denied {
                kind: "subscribe",
                forward: None,
                reply: Some(self.suback(id, &[], &[], &all_denied)),
            });
        }
        let mut out = Vec::with_capacity(body.len());
        out.extend_from_slice(&body[..props_end]);
        out.extend_from_slice(&kept);
        self.pending.insert(id, allowed);
        Ok(Verdict::Denied {
            kind: "subscribe",
            forward: Some(packet(first, &out)),
            reply: None,
        })
    }

    /// A SUBACK for `id`: the broker's `codes` at the allowed positions, the failure code at the others.
    fn suback(&self, id: u16, props: &[u8], codes: &[u8], allowed: &[bool]) -> Vec<u8> {
        let fail = if self.level >= 5 { 0x87 } else { 0x80 };
        let mut body = id.to_be_bytes().to_vec();
        if self.level >= 5 {
            put_varint(&mut body, props.len());
            body.extend_from_slice(props);
        }
        let mut from_broker = codes.iter();
        for ok in allowed {
            body.push(if *ok {
                from_broker.next().copied().unwrap_or(fail)
            } else {
                fail
            });
        }
        packet(0x90, &body)
    }

    fn auth(&mut self, body: &[u8]) -> Result<Verdict, FilterError> {
        let mut r = Reader { buf: body, pos: 0 };
        let reason = if r.done() { 0 } else { r.u8()? };
        let mut method = None;
        let mut data = None;
        if !r.done() {
            let n = r.varint()?;
            let mut p = Reader {
                buf: r.take(n)?,
                pos: 0,
            };
            while !p.done() {
                match p.varint()? {
                    0x15 => method = Some(p.string()?),
                    0x16 => data = Some(p.binary()?),
                    0x1f => drop(p.string()?),
                    0x26 => {
                        p.string()?;
                        p.string()?;
                    }
                    _ => return Err(FilterError::Malformed("unknown AUTH property")),
                }
            }
        }
        if !r.done() {
            return Err(FilterError::Malformed("trailing bytes in AUTH"));
        }
        if method != self.reauth_method.as_deref() {
            return Err(FilterError::Malformed("AUTH with another method"));
        }
        match (reason, data) {
            (0x19, Some(token)) => Ok(Verdict::Reauth(token.to_vec())),
            _ => Err(FilterError::Malformed("AUTH is not a re-authentication")),
        }
    }

    /// Whether the broker's stream is between packets, where a packet of the gateway's own may go.
    #[must_use]
    pub fn broker_at_boundary(&self) -> bool {
        matches!(&self.broker, Broker::Header(h) if h.is_empty())
    }

    /// Passes the broker's MQTT bytes to `out`, rewriting the SUBACKs of filtered SUBSCRIBEs; stops after the first
    /// packet that ends, so the caller can add its own there. Returns how many bytes it used.
    pub fn broker_feed(&mut self, mut bytes: &[u8], out: &mut Vec<u8>) -> usize {
        let total = bytes.len();
        let consumed = |rest: &[u8]| total - rest.len();
        while !bytes.is_empty() {
            match &mut self.broker {
                Broker::Lost => {
                    out.extend_from_slice(bytes);
                    return total;
                }
                Broker::Pass(n) => {
                    let take = (*n).min(bytes.len());
                    out.extend_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    *n -= take;
                    if *n == 0 {
                        self.broker = Broker::Header(Vec::with_capacity(5));
                        return consumed(bytes);
                    }
                }
                Broker::Suback(buf, want) => {
                    let take = (*want - buf.len()).min(bytes.len());
                    buf.extend_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    if buf.len() == *want {
                        let whole = std::mem::take(buf);
                        self.broker = Broker::Header(Vec::with_capacity(5));
                        out.extend_from_slice(&self.rewrite_suback(whole));
                        return consumed(bytes);
                    }
                }
                Broker::Header(h) => {
                    h.push(bytes[0]);
                    bytes = &bytes[1..];
                    match fixed_header(h) {
                        Ok(None) => {}
                        Err(_) => {
                            out.extend_from_slice(h);
                            self.broker = Broker::Lost;
                        }
                        Ok(Some((len, hlen))) => {
                            let h = std::mem::take(h);
                            let wanted = h[0] == 0x90
                                && len >= 2
                                && hlen + len <= MAX_PACKET
                                && !self.pending.is_empty();
                            if wanted {
                                self.broker = Broker::Suback(h, hlen + len);
                            } else {
                                out.extend_from_slice(&h);
                                if len == 0 {
                                    self.broker = Broker::Header(Vec::with_capacity(5));
                                    return consumed(bytes);
                                }
                                self.broker = Broker::Pass(len);
                            }
                        }
                    }
                }
            }
        }
        total
    }

    fn rewrite_suback(&mut self, whole: Vec<u8>) -> Vec<u8> {
        let Ok(Some((_, hlen))) = fixed_header(&whole) else {
            return whole;
        };
        let body = &whole[hlen..];
        let id = u16::from_be_bytes([body[0], body[1]]);
        let Some(allowed) = self.pending.remove(&id) else {
            return whole;
        };
        let mut r = Reader { buf: body, pos: 2 };
        let props = if self.level >= 5 {
            match r.varint().and_then(|n| r.take(n)) {
                Ok(p) => p,
                Err(_) => return whole,
            }
        } else {
            &[]
        };
        let codes = &body[r.pos..];
        self.suback(id, props, codes, &allowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(publish: &[&str], subscribe: &[&str]) -> SessionRules {
        SessionRules {
            publish: Some(publish.iter().map(|s| (*s).to_owned()).collect()),
            subscribe: Some(subscribe.iter().map(|s| (*s).to_owned()).collect()),
        }
    }

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    fn publish(level: u8, qos: u8, topic: &str, id: u16, props: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        string(&mut body, topic);
        if qos > 0 {
            body.extend_from_slice(&id.to_be_bytes());
        }
        if level >= 5 {
            body.push(props.len() as u8);
            body.extend_from_slice(props);
        }
        body.extend_from_slice(b"payload");
        packet(0x30 | (qos << 1), &body)
    }

    fn subscribe(level: u8, id: u16, filters: &[&str]) -> Vec<u8> {
        let mut body = id.to_be_bytes().to_vec();
        if level >= 5 {
            body.push(0);
        }
        for f in filters {
            string(&mut body, f);
            body.push(1);
        }
        packet(0x82, &body)
    }

    fn all(i: &mut Inspector) -> Vec<Verdict> {
        let mut v = Vec::new();
        while let Some(x) = i.client_next().expect("valid") {
            v.push(x);
        }
        v
    }

    #[test]
    fn publishes_outside_the_rules_are_dropped_and_acknowledged() {
        for level in [4, 5] {
            let mut i = Inspector::new(level, rules(&["devices/alice/#"], &[]), None, Vec::new());
            let ok = publish(level, 1, "devices/alice/t", 7, &[]);
            i.client_feed(&ok);
            i.client_feed(&publish(level, 0, "devices/bob/t", 0, &[]));
            i.client_feed(&publish(level, 1, "devices/bob/t", 8, &[]));
            i.client_feed(&publish(level, 2, "devices/bob/t", 9, &[]));
            i.client_feed(&[0x62, 0x02, 0x00, 0x09]); // PUBREL 9
            i.client_feed(&[0xc0, 0x00]);
            let v = all(&mut i);
            assert_eq!(v[0], Verdict::Forward(ok));
            let (puback, pubrec) = if level == 5 {
                (vec![0x40, 3, 0, 8, 0x87], vec![0x50, 3, 0, 9, 0x87])
            } else {
                (vec![0x40, 2, 0, 8], vec![0x50, 2, 0, 9])
            };
            let denied = |reply| Verdict::Denied {
                kind: "publish",
                forward: None,
                reply,
            };
            assert_eq!(v[1], denied(None));
            assert_eq!(v[2], denied(Some(puback)));
            assert_eq!(v[3], denied(Some(pubrec)));
            if level == 5 {
                assert_eq!(v[4], Verdict::Forward(vec![0x62, 0x02, 0x00, 0x09]));
            } else {
                assert_eq!(v[4], Verdict::Reply(vec![0x70, 0x02, 0x00, 0x09]));
            }
            assert_eq!(v[5], Verdict::Forward(vec![0xc0, 0x00]));
        }
    }

    #[test]
    fn topic_aliases_cannot_smuggle_a_denied_topic() {
        let mut i = Inspector::new(5, rules(&["devices/alice/#"], &[]), None, Vec::new());
        let alias = |a: u8| [0x23, 0, a];
        i.client_feed(&publish(5, 0, "devices/alice/t", 0, &alias(1)));
        i.client_feed(&publish(5, 0, "", 0, &alias(1)));
        i.client_feed(&publish(5, 0, "devices/bob/t", 0, &alias(1)));
        i.client_feed(&publish(5, 0, "", 0, &alias(1)));
        i.client_feed(&publish(5, 0, "", 0, &alias(2)));
        let v = all(&mut i);
        assert!(matches!(v[0], Verdict::Forward(_)));
        assert!(matches!(v[1], Verdict::Forward(_)));
        for d in &v[2..] {
            assert!(matches!(d, Verdict::Denied { .. }), "{d:?}");
        }
    }

    #[test]
    fn a_partly_denied_subscribe_is_narrowed_and_its_suback_rewritten() {
        for level in [4, 5] {
            let fail = if level == 5 { 0x87 } else { 0x80 };
            let mut i = Inspector::new(level, rules(&[], &["devices/alice/#"]), None, Vec::new());
            i.client_feed(&subscribe(
                level,
                3,
                &["devices/bob/t", "devices/alice/+", "#"],
            ));
            i.client_feed(&subscribe(level, 4, &["#"]));
            i.client_feed(&subscribe(level, 5, &["devices/alice/x"]));
            let v = all(&mut i);
            assert_eq!(
                v[0],
                Verdict::Denied {
                    kind: "subscribe",
                    forward: Some(subscribe(level, 3, &["devices/alice/+"])),
                    reply: None
                }
            );
            let mut all_fail = vec![0x90, 3, 0, 4];
            if level == 5 {
                all_fail = vec![0x90, 4, 0, 4, 0];
            }
            all_fail.push(fail);
            assert_eq!(
                v[1],
                Verdict::Denied {
                    kind: "subscribe",
                    forward: None,
                    reply: Some(all_fail)
                }
            );
            assert_eq!(
                v[2],
                Verdict::Forward(subscribe(level, 5, &["devices/alice/x"]))
            );
            // The broker's SUBACK for 3 (one code), split byte by byte, then a PINGRESP; 5's passes unchanged.
            let props: &[u8] = if level == 5 { &[0] } else { &[] };
            let mut broker = packet(0x90, &[&[0, 3][..], props, &[1]].concat());
            broker.extend_from_slice(&[0xd0, 0x00]);
            let other = packet(0x90, &[&[0, 5][..], props, &[0]].concat());
            broker.extend_from_slice(&other);
            let mut out = Vec::new();
            for b in &broker {
                assert_eq!(i.broker_feed(std::slice::from_ref(b), &mut out), 1);
            }
            let mut want = packet(0x90, &[&[0, 3][..], props, &[fail, 1, fail]].concat());
            want.extend_from_slice(&[0xd0, 0x00]);
            want.extend_from_slice(&other);
            assert_eq!(out, want);
            assert!(i.broker_at_boundary());
        }
    }

    #[test]
    fn reauth_reads_the_token_and_other_auth_is_refused() {
        let mut props = vec![0x15];
        string(&mut props, "jwt");
        props.push(0x16);
        string(&mut props, "new.token.here");
        let mut body = vec![0x19, props.len() as u8];
        body.extend_from_slice(&props);
        let auth = packet(0xf0, &body);
        let mut i = Inspector::new(5, SessionRules::default(), Some("jwt".into()), Vec::new());
        i.client_feed(&auth);
        assert_eq!(all(&mut i), [Verdict::Reauth(b"new.token.here".to_vec())]);
        // Without re-authentication on, AUTH passes to the broker.
        let mut i = Inspector::new(5, SessionRules::default(), None, Vec::new());
        i.client_feed(&auth);
        assert_eq!(all(&mut i), [Verdict::Forward(auth.clone())]);
        let mut i = Inspector::new(5, SessionRules::default(), Some("other".into()), Vec::new());
        i.client_feed(&auth);
        assert!(i.client_next().is_err());
        assert_eq!(
            auth_success("jwt"),
            [0xf0, 0x08, 0x00, 0x06, 0x15, 0x00, 0x03, b'j', b'w', b't']
        );
    }

    #[test]
    fn bounds_and_malformed_packets() {
        let mut i = Inspector::new(4, rules(&["a"], &["a"]), None, Vec::new());
        i.client_feed(&[0x30, 0xff, 0xff, 0x7f]);
        assert_eq!(i.client_next(), Err(FilterError::TooBig));
        let mut i = Inspector::new(4, rules(&["a"], &["a"]), None, Vec::new());
        i.client_feed(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]);
        assert!(matches!(i.client_next(), Err(FilterError::Malformed(_))));
        let p = publish(4, 1, "a", 1, &[]);
        for cut in 1..p.len() {
            let mut i = Inspector::new(4, rules(&["a"], &["a"]), None, Vec::new());
            // Truncated: the remaining length claims the missing bytes, so the packet waits.
            i.client_feed(&p[..cut]);
            assert_eq!(i.client_next(), Ok(None), "cut {cut}");
            i.client_feed(&p[cut..]);
            assert_eq!(i.client_next(), Ok(Some(Verdict::Forward(p.clone()))));
        }
        // A remaining length too short for its fields.
        let mut short = p.clone();
        short[1] = 2;
        short.truncate(4);
        let mut i = Inspector::new(4, rules(&["a"], &["a"]), None, Vec::new());
        i.client_feed(&short);
        assert!(i.client_next().is_err());
        let mut i = Inspector::new(4, rules(&["a"], &["a"]), None, Vec::new());
        i.client_feed(&[0x10, 0x00]);
        assert!(i.client_next().is_err(), "second CONNECT");
    }

    #[test]
    fn frames_are_read_on_any_split() {
        let mut wire = crate::frame::encode(0x2, b"hello", Some([1, 2, 3, 4]));
        wire.extend_from_slice(&crate::frame::encode(0x9, b"p", Some([5, 6, 7, 8])));
        wire.extend_from_slice(&crate::frame::encode(0x0, &[7u8; 300], Some([9, 9, 9, 9])));
        let mut whole = Vec::new();
        FrameReader::new(true)
            .feed(&wire, &mut whole)
            .expect("valid");
        let mut data = Vec::new();
        for e in &whole {
            if let WsEvent::Data(d) = e {
                data.extend_from_slice(d);
            }
        }
        assert_eq!(&data[..5], b"hello");
        assert_eq!(data.len(), 305);
        assert!(whole.contains(&WsEvent::Control(0x9, b"p".to_vec())));
        let mut r = FrameReader::new(true);
        let mut bytes = Vec::new();
        let mut ev = Vec::new();
        for b in &wire {
            r.feed(std::slice::from_ref(b), &mut ev).expect("valid");
        }
        for e in &ev {
            if let WsEvent::Data(d) = e {
                bytes.extend_from_slice(d);
            }
        }
        assert_eq!(bytes, data);
        assert!(r.at_boundary());
        let mut ev = Vec::new();
        assert!(FrameReader::new(true)
            .feed(&crate::frame::encode(0x2, b"x", None), &mut ev)
            .is_err());
        assert!(FrameReader::new(true)
            .feed(&crate::frame::encode(0x1, b"x", Some([0; 4])), &mut ev)
            .is_err());
    }
}
