//! The JWKS fetch's HTTP/1.1 response reader: status line, headers, Content-Length, chunked or close-delimited
//! bodies (`complete_body`, which runs on every read of the response).
//!
//! Input layout: byte 0 bit 0 = whether the server has closed (eof), then the bytes received.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ws_gateway::auth::jwks::complete_body;

mod common;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, buf)) = data.split_first() else {
        return;
    };
    if let Ok(Some(body)) = complete_body(buf, flags & 1 == 1) {
        assert!(body.len() <= buf.len());
    }
    // `http_get` calls `complete_body(buf, false)` after each read until it answers: an answer on fewer bytes must
    // be the answer on all of them, or the result would depend on how the response was split into reads.
    let full = complete_body(buf, false);
    for cut in common::cuts(buf.len()) {
        match (complete_body(&buf[..cut], false), &full) {
            (Ok(None), _) | (Err(_), Err(_)) => {}
            (Ok(Some(a)), Ok(Some(b))) if a == *b => {}
            (part, _) => panic!(
                "prefix of {cut} bytes gives {part:?}, all {} bytes give {full:?}",
                buf.len()
            ),
        }
    }
});
