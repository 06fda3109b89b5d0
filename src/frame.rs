//! WebSocket frame headers: finding frame boundaries in a byte stream without copying or unmasking payloads, and
//! encoding the few frames the gateway writes itself (Close, and the echo and MQTT paths).
//!
//! [`FrameTracker`] looks only at headers: per chunk it costs one step per frame, not per byte. The relay uses it to
//! put a Close frame between two frames, never inside one.

/// Opcode of a Close frame.
pub const OP_CLOSE: u8 = 0x8;
/// Opcode of a Ping frame.
pub const OP_PING: u8 = 0x9;
/// Opcode of a Pong frame.
pub const OP_PONG: u8 = 0xA;
/// Opcode of a binary frame.
pub const OP_BINARY: u8 = 0x2;
/// Opcode of a continuation frame.
pub const OP_CONTINUATION: u8 = 0x0;

/// Close code: normal closure.
pub const CLOSE_NORMAL: u16 = 1000;
/// Close code: going away (drain, idle).
pub const CLOSE_GOING_AWAY: u16 = 1001;
/// Close code: protocol error (the first MQTT packet is not a CONNECT).
pub const CLOSE_PROTOCOL_ERROR: u16 = 1002;
/// Close code: policy violation (token expired, revoked, not authorized).
pub const CLOSE_POLICY: u16 = 1008;
/// Close code: message too big (an MQTT packet over the inspected session's bound).
pub const CLOSE_TOO_BIG: u16 = 1009;
/// Close code: try again later (session limit).
pub const CLOSE_TRY_AGAIN: u16 = 1013;
/// Close code: bad gateway (the upstream is unavailable).
pub const CLOSE_UNAVAILABLE: u16 = 1014;

/// Tracks where frames begin in one direction of a WebSocket stream.
#[derive(Debug, Clone, Default)]
pub struct FrameTracker {
    /// Header bytes collected so far (0 = at a boundary).
    have: u8,
    header: [u8; 14],
    /// Payload bytes left in the current frame.
    remaining: u64,
    /// A Close frame's header has been seen.
    saw_close: bool,
}

impl FrameTracker {
    /// A tracker positioned at the start of a frame.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether all bytes fed so far end exactly at a frame boundary.
    #[must_use]
    pub fn at_boundary(&self) -> bool {
        self.have == 0 && self.remaining == 0
    }

    /// Whether a Close frame has begun among the bytes fed so far (it is complete once [`Self::at_boundary`]).
    #[must_use]
    pub fn saw_close(&self) -> bool {
        self.saw_close
    }

    /// Consumes a chunk; returns the offset just after the last frame that ended inside it, if any.
    pub fn feed(&mut self, chunk: &[u8]) -> Option<usize> {
        self.feed_admitting(chunk, |_| true).0
    }

    /// As [`Self::feed`], but asks `admit` with the opcode of each frame as its first byte arrives; at the first
    /// frame refused the tracker stops, positioned at that frame's start, and the second value is its offset (the
    /// first value is then that same offset: a boundary). The bytes from there on are not consumed.
    pub fn feed_admitting(
        &mut self,
        mut chunk: &[u8],
        mut admit: impl FnMut(u8) -> bool,
    ) -> (Option<usize>, Option<usize>) {
        let total = chunk.len();
        let mut last = None;
        while !chunk.is_empty() {
            if self.at_boundary() && !admit(chunk[0] & 0x0f) {
                let at = total - chunk.len();
                return (Some(at), Some(at));
            }
            if self.remaining > 0 {
                let take =
                    usize::try_from(self.remaining).map_or(chunk.len(), |r| r.min(chunk.len()));
                self.remaining -= take as u64;
                chunk = &chunk[take..];
                if self.remaining == 0 {
                    last = Some(total - chunk.len());
                }
                continue;
            }
            let need = header_len(&self.header[..usize::from(self.have)]);
            let have = usize::from(self.have);
            let take = (need - have).min(chunk.len());
            self.header[have..have + take].copy_from_slice(&chunk[..take]);
            // Invariant: take <= 14, so the sum fits in u8.
            self.have += take as u8;
            chunk = &chunk[take..];
            if usize::from(self.have) == header_len(&self.header[..usize::from(self.have)]) {
                self.remaining = payload_len(&self.header[..usize::from(self.have)]);
                self.saw_close |= self.header[0] & 0x0f == OP_CLOSE;
                self.have = 0;
                if self.remaining == 0 {
                    last = Some(total - chunk.len());
                }
            }
        }
        (last, None)
    }

    /// The most bytes that can be read without passing the next frame boundary (at least 1, at most `cap`).
    #[must_use]
    pub fn until_boundary(&self, cap: usize) -> usize {
        let n = if self.remaining > 0 {
            usize::try_from(self.remaining).unwrap_or(usize::MAX)
        } else {
            let have = usize::from(self.have);
            header_len(&self.header[..have]) - have
        };
        n.clamp(1, cap.max(1))
    }
}

/// Length of the header given its first bytes: 2 until the second byte is known, then the full size.
fn header_len(prefix: &[u8]) -> usize {
    if prefix.len() < 2 {
        return 2;
    }
    let masked = prefix[1] & 0x80 != 0;
    let ext = match prefix[1] & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    2 + ext + if masked { 4 } else { 0 }
}

fn payload_len(header: &[u8]) -> u64 {
    match header[1] & 0x7f {
        126 => u64::from(u16::from_be_bytes([header[2], header[3]])),
        127 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&header[2..10]);
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    }
}

/// Encodes one frame with FIN set; `mask` is applied when given (client-to-server frames must be masked).
#[must_use]
pub fn encode(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(0x80 | (opcode & 0x0f));
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        // Invariant: each arm's range makes the casts lossless.
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(key) => {
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// A Close frame with `code` and a reason cut to the 123 bytes a control frame allows.
#[must_use]
pub fn close_frame(code: u16, reason: &str, mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    encode(OP_CLOSE, &payload, mask)
}

/// One complete frame, unmasked, as read by [`decode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// FIN bit.
    pub fin: bool,
    /// Opcode.
    pub opcode: u8,
    /// Payload, unmasked.
    pub payload: Vec<u8>,
}

/// Decodes one frame from the start of `buf`: `Ok(None)` when more bytes are needed, else the frame and its length.
///
/// # Errors
/// A payload larger than `max_payload`, or reserved bits set (no extension is negotiated where this is used).
pub fn decode(buf: &[u8], max_payload: usize) -> Result<Option<(Frame, usize)>, &'static str> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let hlen = header_len(&buf[..2]);
    if buf.len() < hlen {
        return Ok(None);
    }
    if buf[0] & 0x70 != 0 {
        return Err("reserved bits set");
    }
    let len = payload_len(&buf[..hlen]);
    let len = usize::try_from(len)
        .ok()
        .filter(|l| *l <= max_payload)
        .ok_or("frame too large")?;
    if buf.len() < hlen + len {
        return Ok(None);
    }
    let mut payload = buf[hlen..hlen + len].to_vec();
    if buf[1] & 0x80 != 0 {
        let key = [buf[hlen - 4], buf[hlen - 3], buf[hlen - 2], buf[hlen - 1]];
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= key[i % 4];
        }
    }
    Ok(Some((
        Frame {
            fin: buf[0] & 0x80 != 0,
            opcode: buf[0] & 0x0f,
            payload,
        },
        hlen + len,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream() -> (Vec<u8>, Vec<usize>) {
        let frames = [
            encode(OP_BINARY, b"hello", None),
            encode(OP_BINARY, &[7u8; 300], Some([1, 2, 3, 4])),
            encode(OP_PING, b"", None),
            encode(OP_BINARY, &vec![9u8; 70_000], None),
            close_frame(1000, "bye", None),
        ];
        let mut bytes = Vec::new();
        let mut ends = Vec::new();
        for f in frames {
            bytes.extend_from_slice(&f);
            ends.push(bytes.len());
        }
        (bytes, ends)
    }

    #[test]
    fn boundaries_found_whatever_the_chunking() {
        let (bytes, ends) = stream();
        for chunk in [1usize, 2, 3, 7, 13, 100, 4096, bytes.len()] {
            let mut t = FrameTracker::new();
            let mut found = Vec::new();
            let mut offset = 0;
            for c in bytes.chunks(chunk) {
                if let Some(end) = t.feed(c) {
                    found.push(offset + end);
                }
                offset += c.len();
            }
            assert!(t.at_boundary(), "chunk {chunk}");
            assert_eq!(found.last(), ends.last(), "chunk {chunk}");
            for f in &found {
                assert!(ends.contains(f), "chunk {chunk}: {f} is not a frame end");
            }
        }
    }

    #[test]
    fn admitting_asks_once_per_frame_and_stops_at_the_refused_frame_start() {
        let (bytes, ends) = stream();
        for chunk in [1usize, 2, 3, 7, 13, 100, 4096, bytes.len()] {
            // Admit three frames, then refuse: the stop is the start of the fourth, whatever the chunking.
            let mut t = FrameTracker::new();
            let mut asked = Vec::new();
            let mut stop = None;
            let mut offset = 0;
            for c in bytes.chunks(chunk) {
                let (last, refused) = t.feed_admitting(c, |op| {
                    asked.push(op);
                    asked.len() <= 3
                });
                if let Some(at) = refused {
                    assert_eq!(last, Some(at));
                    stop = Some(offset + at);
                    break;
                }
                offset += c.len();
            }
            assert_eq!(stop, Some(ends[2]), "chunk {chunk}");
            assert_eq!(
                asked,
                vec![OP_BINARY, OP_BINARY, OP_PING, OP_BINARY],
                "chunk {chunk}"
            );
            assert!(t.at_boundary(), "chunk {chunk}");
        }
        // A continuation frame is asked about like any other, with its own opcode.
        let mut t = FrameTracker::new();
        let mut first = encode(OP_BINARY, b"ab", None);
        first[0] &= 0x7f;
        first.extend_from_slice(&encode(OP_CONTINUATION, b"cd", None));
        let mut asked = Vec::new();
        assert_eq!(
            t.feed_admitting(&first, |op| {
                asked.push(op);
                true
            }),
            (Some(first.len()), None)
        );
        assert_eq!(asked, vec![OP_BINARY, OP_CONTINUATION]);
    }

    #[test]
    fn until_boundary_never_overshoots() {
        let (bytes, ends) = stream();
        let mut t = FrameTracker::new();
        let mut pos = 0;
        while pos < bytes.len() {
            let n = t.until_boundary(4096).min(bytes.len() - pos);
            let before = pos;
            t.feed(&bytes[pos..pos + n]);
            pos += n;
            // No frame end lies strictly inside a step.
            assert!(
                !ends.iter().any(|e| *e > before && *e < pos),
                "{before}..{pos}"
            );
        }
        assert!(t.at_boundary());
    }

    #[test]
    fn decode_round_trips_and_rejects_oversize() {
        let f = encode(OP_BINARY, b"abc", Some([9, 8, 7, 6]));
        let (frame, used) = decode(&f, 10).expect("ok").expect("complete");
        assert_eq!((frame.payload.as_slice(), used), (&b"abc"[..], f.len()));
        assert_eq!(decode(&f[..3], 10), Ok(None));
        assert!(decode(&encode(OP_BINARY, &[0; 20], None), 10).is_err());
        let c = close_frame(1008, &"é".repeat(100), None);
        assert!(c.len() <= 127 && std::str::from_utf8(&c[4..]).is_ok());
    }
}
