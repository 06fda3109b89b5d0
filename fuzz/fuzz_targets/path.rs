//! `normalize_path`: the request path must mean the same thing to the gateway (which routes on it) and to any
//! upstream (which serves it), however many times either side percent-decodes it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ws_gateway::upgrade::normalize_path;

/// One round of percent-decoding; malformed escapes stay as they are.
fn decode(s: &[u8]) -> Vec<u8> {
    let hex = |b: u8| char::from(b).to_digit(16);
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match (
            s[i],
            s.get(i + 1).copied().and_then(hex),
            s.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                // Invariant: two hex digits fit in a byte.
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

/// Why `decoded` (the path after `round` decodings) means something other than `path`, if it does.
fn ambiguity(path: &str, decoded: &[u8]) -> Option<&'static str> {
    let adds = |byte: u8| {
        let count = |b: &[u8]| b.iter().filter(|c| **c == byte).count();
        count(decoded) > count(path.as_bytes())
    };
    if adds(b'/') {
        return Some("decoding adds a slash");
    }
    if adds(b'\\') {
        return Some("decoding adds a backslash");
    }
    if adds(0) {
        return Some("decoding adds a NUL");
    }
    for seg in decoded.split(|c| *c == b'/') {
        if seg == b"." || seg == b".." {
            return Some("decoding makes a dot segment");
        }
        // Servers that decode before they strip matrix parameters read `..;x` as `..`.
        let name = seg.split(|c| *c == b';').next().unwrap_or(seg);
        if name == b"." || name == b".." {
            return Some("decoding makes a dot segment with a matrix parameter");
        }
    }
    None
}

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    if normalize_path(path).is_err() {
        return;
    }
    // The meaning after one decoding (every server) and after two (double-decoding servers and proxies).
    let once = decode(path.as_bytes());
    if let Some(why) = ambiguity(path, &once) {
        panic!(
            "accepted {path:?}: {why} after one decoding: {:?}",
            String::from_utf8_lossy(&once)
        );
    }
    let twice = decode(&once);
    if let Some(why) = ambiguity(path, &twice) {
        panic!(
            "accepted {path:?}: {why} after two decodings: {:?}",
            String::from_utf8_lossy(&twice)
        );
    }
    // The rule as stated: no dot segment, no backslash, no encoded slash, backslash or dot.
    assert!(!path.contains("/../"), "accepted {path:?}: contains /../");
    assert!(
        !path.contains('\\'),
        "accepted {path:?}: contains a backslash"
    );
    let lower = path.to_ascii_lowercase();
    for enc in ["%2f", "%5c", "%2e"] {
        assert!(!lower.contains(enc), "accepted {path:?}: contains {enc}");
    }
});
