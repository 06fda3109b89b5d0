//! The packet streams of an inspected MQTT session (topic rules, re-authentication): the WebSocket frame reader and
//! the client packet filter on outside bytes, and the broker stream with SUBACK rewriting. Checked: no panic, the
//! buffer stays within one packet and one read, every packet sent on is whole and within the bound, and the answers
//! do not depend on how the bytes were split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ws_gateway::mqtt_acl::SessionRules;
use ws_gateway::mqtt_filter::{FrameReader, Inspector, Verdict, WsEvent, MAX_PACKET};

mod common;

fn rules() -> SessionRules {
    SessionRules {
        publish: Some(vec!["devices/alice/#".into(), "t/+/x".into()]),
        subscribe: Some(vec!["devices/alice/#".into()]),
    }
}

/// Length of the packet at the start of `p`, from its remaining length.
fn whole_len(p: &[u8]) -> Option<usize> {
    let mut value = 0usize;
    for i in 0..4 {
        let b = *p.get(1 + i)?;
        value |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some(2 + i + value);
        }
    }
    None
}

/// Feeds `stream` in pieces of `step` bytes; returns the verdicts, whether it ended in an error, and what the
/// broker side produced for the same bytes.
fn run(level: u8, stream: &[u8], step: usize) -> (Vec<Verdict>, bool, Vec<u8>) {
    let reauth = (level == 5).then(|| "jwt".to_owned());
    let mut i = Inspector::new(level, rules(), reauth, Vec::new());
    let mut verdicts = Vec::new();
    let mut failed = false;
    'feed: for chunk in stream.chunks(step.max(1)) {
        i.client_feed(chunk);
        loop {
            match i.client_next() {
                Ok(Some(v)) => {
                    if let Verdict::Forward(p) = &v {
                        assert_eq!(whole_len(p), Some(p.len()), "a forwarded packet is whole");
                        assert!(p.len() <= MAX_PACKET);
                    }
                    verdicts.push(v);
                }
                Ok(None) => break,
                Err(_) => {
                    failed = true;
                    break 'feed;
                }
            }
        }
        assert!(i.buffered() <= MAX_PACKET + chunk.len(), "buffer {}", i.buffered());
    }
    // The same bytes as the broker's stream: SUBACKs of the filtered SUBSCRIBEs above may be rewritten.
    let mut out = Vec::new();
    for chunk in stream.chunks(step.max(1)) {
        let mut rest = chunk;
        while !rest.is_empty() {
            let used = i.broker_feed(rest, &mut out);
            assert!(used > 0 && used <= rest.len());
            rest = &rest[used..];
        }
    }
    (verdicts, failed, out)
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, stream)) = data.split_first() else {
        return;
    };
    let level = if flags & 1 == 0 { 4 } else { 5 };
    let whole = run(level, stream, stream.len());
    let step = usize::from(flags >> 1) + 1;
    let split = run(level, stream, step);
    assert_eq!(whole.0, split.0, "verdicts depend on the split ({step})");
    assert_eq!(whole.1, split.1);
    assert_eq!(whole.2, split.2, "broker output depends on the split ({step})");

    // Frames: the payload bytes read are the same however the stream is cut.
    let payload = |cut: usize| {
        let mut r = FrameReader::new(flags & 2 == 0);
        let mut events = Vec::new();
        let ok = r.feed(&stream[..cut], &mut events).is_ok()
            && r.feed(&stream[cut..], &mut events).is_ok();
        let mut data = Vec::new();
        for e in events {
            if let WsEvent::Data(d) = e {
                data.extend_from_slice(&d);
            }
        }
        ok.then_some(data)
    };
    let all = payload(stream.len());
    for cut in common::cuts(stream.len()) {
        if let (Some(a), Some(b)) = (&all, payload(cut)) {
            assert_eq!(a, &b, "frame payload depends on a cut at {cut}");
        }
    }
});
