//! The MQTT CONNECT the gateway reads from WebSocket frames to find the token in its password, and its rewrite
//! from the verified identity (`mqtt_identity`): split, rewrite, re-encode.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ws_gateway::auth::Identity;
use ws_gateway::mqtt::{parse_connect, MAX_CONNECT_BYTES};
use ws_gateway::mqtt_identity::{
    rewrite_connect, split_connect, ClientIdPolicy, MqttSettings, PasswordForward, UsernameFormat,
};

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
        // The field-keeping split agrees, and re-encoding gives back the same bytes.
        let split = split_connect(&data[..len]).expect("a parsed CONNECT splits");
        assert_eq!(split.encode().expect("encodes"), &data[..len]);
        // Every rewrite either refuses or gives a CONNECT that parses, with the identity's username.
        let identity = Identity {
            subject: Some("alice".into()),
            token_id: None,
            session_id: None,
            issued_at: None,
            expires_at: 0,
            forwarded: vec![("X-Tenant".into(), "t+/#".into())],
            limit_claim: None,
            claims: vec![("sub".into(), "alice".into())],
            roles: vec!["r".into()],
        };
        let format = if data.len() % 2 == 0 { UsernameFormat::Plain } else { UsernameFormat::Go };
        let settings = MqttSettings {
            username_claim: Some("sub".into()),
            username_format: format,
            password_forward: PasswordForward::Drop,
            client_id_policy: ClientIdPolicy::PrefixSubject,
        };
        if let Ok(out) = rewrite_connect(&settings, &identity, &data[..len]) {
            let again = split_connect(&out).expect("the rewrite parses");
            assert!(parse_connect(&out).expect("valid").is_some());
            assert!(again.username.as_deref().is_some_and(|u| u.starts_with(b"alice")));
            assert_eq!(again.password, None);
        }
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
