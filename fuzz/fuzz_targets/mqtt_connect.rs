//! The MQTT CONNECT the gateway reads from WebSocket frames to find the token in its password.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ws_gateway::mqtt::{parse_connect, MAX_CONNECT_BYTES};

mod common;

/// Length of the whole packet (fixed header included) when `buf` starts with a complete remaining length.
fn packet_len(buf: &[u8]) -> Option<usize> {
    let mut value = 0usize;
    for (i, b) in buf.iter().skip(1).take(4).enumerate() {
        value |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some(1 + i + 1 + value);
        }
    }
    None
}

fuzz_target!(|data: &[u8]| {
    let full = parse_connect(data);
    if let Ok(Some(c)) = &full {
        assert!(matches!(c.level, 3..=5), "level {}", c.level);
        let len = packet_len(data).expect("a parsed CONNECT has a remaining length");
        assert!(
            len <= data.len() && len <= 5 + MAX_CONNECT_BYTES,
            "packet of {len} bytes"
        );
        if let Some(p) = &c.password {
            assert!(p.len() < len);
        }
        // The packet alone gives the same CONNECT: bytes after it (the next packets) play no part.
        assert_eq!(parse_connect(&data[..len]), full);
    }
    // The CONNECT is parsed again as each frame arrives: an answer on fewer bytes is the answer on all of them.
    for cut in common::cuts(data.len()) {
        let part = parse_connect(&data[..cut]);
        assert!(
            part == Ok(None) || part == full,
            "prefix of {cut} bytes gives {part:?}, all {} bytes give {full:?}",
            data.len()
        );
    }
});
