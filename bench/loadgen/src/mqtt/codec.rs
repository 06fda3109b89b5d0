//! The few MQTT 3.1.1 packets the `mqtt` load needs: CONNECT, SUBSCRIBE, PUBLISH (QoS 0), PINGREQ and DISCONNECT
//! encoded; CONNACK, SUBACK, PUBLISH and PINGRESP decoded (anything else is returned by its type, unparsed).
//!
//! The loadgen's own, not the gateway's parser (`ws_gateway::mqtt`): a benchmark client should not share the code it
//! measures. Bounded and panic-free on any input: the remaining length is at most four bytes (MQTT's limit), a
//! packet is refused above a caller's maximum before anything is copied, and every length inside a body is checked
//! against what is left.

/// Packet types (the high nibble of the first byte).
const CONNECT: u8 = 1;
const CONNACK: u8 = 2;
const PUBLISH: u8 = 3;
const SUBSCRIBE: u8 = 8;
const SUBACK: u8 = 9;
const PINGREQ: u8 = 12;
const PINGRESP: u8 = 13;
const DISCONNECT: u8 = 14;

/// The largest remaining length MQTT can express (four varint bytes).
pub(crate) const MAX_REMAINING: usize = 268_435_455;

/// Why bytes are not a packet, or a packet cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CodecError {
    /// A fifth remaining-length byte: not MQTT.
    BadLength,
    /// A packet above the caller's maximum.
    TooLarge(usize),
    /// A body that contradicts its packet type (lengths that overrun it, QoS 3, a wrong fixed size).
    Malformed(&'static str),
    /// A string longer than 65,535 bytes asked to be encoded.
    FieldTooLong,
}

impl std::fmt::Display for CodecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CodecError::BadLength => f.write_str("remaining length longer than four bytes"),
            CodecError::TooLarge(n) => write!(f, "packet of {n} bytes is above the limit"),
            CodecError::Malformed(what) => write!(f, "malformed packet: {what}"),
            CodecError::FieldTooLong => f.write_str("string field longer than 65535 bytes"),
        }
    }
}

/// A decoded packet from the broker, borrowing the buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Packet<'a> {
    /// Session-present flag and return code (0 = accepted).
    ConnAck {
        session_present: bool,
        code: u8,
    },
    /// Packet id and the return code per topic filter (0x80 = refused).
    SubAck {
        packet_id: u16,
        codes: &'a [u8],
    },
    /// An application message; `packet_id` only for QoS 1 and 2.
    Publish {
        topic: &'a [u8],
        qos: u8,
        packet_id: Option<u16>,
        payload: &'a [u8],
    },
    PingResp,
    /// Any other packet type, by its type nibble.
    Other(u8),
}

// ---------------------------------------------------------------------------------------------------------------
// Encoding

/// Appends `len` as MQTT's remaining-length varint.
fn put_remaining(out: &mut Vec<u8>, mut len: usize) {
    loop {
        // Invariant: `len % 128` fits in 7 bits.
        let byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            out.push(byte | 0x80);
        } else {
            out.push(byte);
            return;
        }
    }
}

/// A packet from its first byte and body.
fn packet(first: u8, body: &[u8]) -> Result<Vec<u8>, CodecError> {
    if body.len() > MAX_REMAINING {
        return Err(CodecError::TooLarge(body.len()));
    }
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(first);
    put_remaining(&mut out, body.len());
    out.extend_from_slice(body);
    Ok(out)
}

/// Appends a two-byte length and the bytes.
fn put_str(out: &mut Vec<u8>, s: &[u8]) -> Result<(), CodecError> {
    let len = u16::try_from(s.len()).map_err(|_| CodecError::FieldTooLong)?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(s);
    Ok(())
}

/// A 3.1.1 CONNECT with a clean session, a client id, a username and no password or will.
pub(crate) fn connect(
    client_id: &str,
    username: &str,
    keep_alive: u16,
) -> Result<Vec<u8>, CodecError> {
    let mut body = Vec::with_capacity(16 + client_id.len() + username.len());
    put_str(&mut body, b"MQTT")?;
    body.push(4); // protocol level 4 = 3.1.1
    body.push(0x80 | 0x02); // username, clean session
    body.extend_from_slice(&keep_alive.to_be_bytes());
    put_str(&mut body, client_id.as_bytes())?;
    put_str(&mut body, username.as_bytes())?;
    packet(CONNECT << 4, &body)
}

/// A SUBSCRIBE to one topic filter (the fixed header's flags are 0b0010, as the specification requires).
pub(crate) fn subscribe(packet_id: u16, filter: &str, qos: u8) -> Result<Vec<u8>, CodecError> {
    if qos > 2 {
        return Err(CodecError::Malformed("QoS above 2"));
    }
    let mut body = Vec::with_capacity(5 + filter.len());
    body.extend_from_slice(&packet_id.to_be_bytes());
    put_str(&mut body, filter.as_bytes())?;
    body.push(qos);
    packet((SUBSCRIBE << 4) | 0x02, &body)
}

/// A QoS 0 PUBLISH, and the offset of its payload in the returned bytes (so a caller can patch the payload in
/// place for every message instead of encoding again).
pub(crate) fn publish_qos0(topic: &str, payload: &[u8]) -> Result<(Vec<u8>, usize), CodecError> {
    let mut body = Vec::with_capacity(2 + topic.len() + payload.len());
    put_str(&mut body, topic.as_bytes())?;
    body.extend_from_slice(payload);
    let out = packet(PUBLISH << 4, &body)?;
    let offset = out.len() - payload.len();
    Ok((out, offset))
}

/// PINGREQ.
pub(crate) fn pingreq() -> [u8; 2] {
    [PINGREQ << 4, 0]
}

/// DISCONNECT.
pub(crate) fn disconnect() -> [u8; 2] {
    [DISCONNECT << 4, 0]
}

// ---------------------------------------------------------------------------------------------------------------
// Decoding

/// Reads the remaining length after the first byte: `Ok(None)` when more bytes are needed, else the length and the
/// size of the fixed header.
fn remaining(buf: &[u8]) -> Result<Option<(usize, usize)>, CodecError> {
    let mut len = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((len, 2 + i)));
        }
    }
    Err(CodecError::BadLength)
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Decodes one packet from the start of `buf`: `Ok(None)` when more bytes are needed, else the packet and the
/// bytes it used. A packet whose total size is above `max` is an error as soon as its length is known.
pub(crate) fn decode(buf: &[u8], max: usize) -> Result<Option<(Packet<'_>, usize)>, CodecError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let Some((len, header)) = remaining(buf)? else {
        return Ok(None);
    };
    let total = header + len;
    if total > max {
        return Err(CodecError::TooLarge(total));
    }
    let Some(body) = buf.get(header..total) else {
        return Ok(None);
    };
    let packet = match first >> 4 {
        CONNACK => {
            if body.len() != 2 {
                return Err(CodecError::Malformed("CONNACK is not 2 bytes"));
            }
            Packet::ConnAck {
                session_present: body[0] & 1 == 1,
                code: body[1],
            }
        }
        SUBACK => {
            let packet_id = u16_at(body, 0).ok_or(CodecError::Malformed("SUBACK too short"))?;
            let codes = &body[2..];
            if codes.is_empty() {
                return Err(CodecError::Malformed("SUBACK without a return code"));
            }
            Packet::SubAck { packet_id, codes }
        }
        PUBLISH => {
            let qos = (first >> 1) & 0x03;
            if qos == 3 {
                return Err(CodecError::Malformed("PUBLISH with QoS 3"));
            }
            let topic_len = usize::from(
                u16_at(body, 0).ok_or(CodecError::Malformed("PUBLISH without a topic"))?,
            );
            let topic = body
                .get(2..2 + topic_len)
                .ok_or(CodecError::Malformed("PUBLISH topic overruns the packet"))?;
            let mut at = 2 + topic_len;
            let packet_id = if qos > 0 {
                let id = u16_at(body, at)
                    .ok_or(CodecError::Malformed("PUBLISH without its packet id"))?;
                at += 2;
                Some(id)
            } else {
                None
            };
            Packet::Publish {
                topic,
                qos,
                packet_id,
                // Invariant: `at` <= body.len(), checked by the two `get`s above.
                payload: &body[at..],
            }
        }
        PINGRESP => {
            if !body.is_empty() {
                return Err(CodecError::Malformed("PINGRESP with a body"));
            }
            Packet::PingResp
        }
        other => Packet::Other(other),
    };
    Ok(Some((packet, total)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remaining_length_boundaries_round_trip() {
        for len in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            2_097_151,
            2_097_152,
            MAX_REMAINING,
        ] {
            let mut out = vec![0x30];
            put_remaining(&mut out, len);
            let expected = match len {
                0..=127 => 1,
                128..=16_383 => 2,
                16_384..=2_097_151 => 3,
                _ => 4,
            };
            assert_eq!(out.len() - 1, expected, "{len}");
            assert_eq!(remaining(&out), Ok(Some((len, 1 + expected))), "{len}");
        }
        assert_eq!(
            remaining(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]),
            Err(CodecError::BadLength)
        );
        assert_eq!(remaining(&[0x30, 0x80]), Ok(None));
    }

    #[test]
    fn connect_bytes_are_exact() {
        let c = connect("a-1", "u", 60).expect("connect");
        assert_eq!(
            c,
            [
                0x10, 18, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x82, 0, 60, 0, 3, b'a', b'-', b'1', 0,
                1, b'u'
            ]
        );
    }

    #[test]
    fn subscribe_bytes_are_exact() {
        let s = subscribe(1, "d/x", 0).expect("subscribe");
        assert_eq!(s, [0x82, 8, 0, 1, 0, 3, b'd', b'/', b'x', 0]);
        assert!(subscribe(1, "d", 3).is_err());
        assert_eq!(pingreq(), [0xc0, 0]);
        assert_eq!(disconnect(), [0xe0, 0]);
    }

    #[test]
    fn publish_round_trips_with_its_payload_offset() {
        let payload: Vec<u8> = (0..200u8).collect();
        let (bytes, offset) = publish_qos0("devices/alice/7", &payload).expect("publish");
        assert_eq!(&bytes[offset..], &payload[..]);
        let (p, used) = decode(&bytes, 1 << 16).expect("valid").expect("complete");
        assert_eq!(used, bytes.len());
        assert_eq!(
            p,
            Packet::Publish {
                topic: b"devices/alice/7",
                qos: 0,
                packet_id: None,
                payload: &payload
            }
        );
        // Every strict prefix needs more bytes.
        for cut in 0..bytes.len() {
            assert_eq!(decode(&bytes[..cut], 1 << 16), Ok(None), "{cut}");
        }
        assert!(publish_qos0(&"x".repeat(70_000), b"").is_err());
    }

    #[test]
    fn broker_packets_decode() {
        assert_eq!(
            decode(&[0x20, 2, 1, 0], 64),
            Ok(Some((
                Packet::ConnAck {
                    session_present: true,
                    code: 0
                },
                4
            )))
        );
        assert_eq!(
            decode(&[0x90, 3, 0, 1, 0x80, 0xd0], 64),
            Ok(Some((
                Packet::SubAck {
                    packet_id: 1,
                    codes: &[0x80]
                },
                5
            )))
        );
        assert_eq!(
            decode(&[0xd0, 0, 0xd0], 64),
            Ok(Some((Packet::PingResp, 2)))
        );
        assert_eq!(
            decode(&[0xb0, 2, 0, 1], 64),
            Ok(Some((Packet::Other(11), 4)))
        );
        // QoS 1 PUBLISH: the packet id is not payload.
        assert_eq!(
            decode(&[0x32, 6, 0, 1, b't', 0, 9, b'p'], 64),
            Ok(Some((
                Packet::Publish {
                    topic: b"t",
                    qos: 1,
                    packet_id: Some(9),
                    payload: b"p"
                },
                8
            )))
        );
    }

    #[test]
    fn malformed_packets_are_errors() {
        assert!(decode(&[0x20, 3, 0, 0, 0], 64).is_err());
        assert!(decode(&[0x90, 2, 0, 1], 64).is_err());
        assert!(decode(&[0x30, 2, 0, 5], 64).is_err());
        assert!(decode(&[0x36, 3, 0, 0, 0], 64).is_err());
        assert!(decode(&[0x32, 3, 0, 1, b't'], 64).is_err());
        assert!(decode(&[0xd0, 1, 0], 64).is_err());
        // Refused above the limit before the body arrived.
        assert_eq!(
            decode(&[0x30, 0xff, 0x7f], 1024),
            Err(CodecError::TooLarge(16_386))
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A fixed xorshift stream: the same inputs on every run.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut buf = Vec::new();
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 24) as usize;
            buf.clear();
            for i in 0..len {
                buf.push((x >> (i % 8 * 8)) as u8 ^ i as u8);
            }
            if let Ok(Some((_, used))) = decode(&buf, 4096) {
                assert!(used <= buf.len());
            }
        }
    }
}
