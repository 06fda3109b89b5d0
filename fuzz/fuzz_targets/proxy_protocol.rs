//! The PROXY protocol v1/v2 header a trusted load balancer puts before the TLS ClientHello.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ws_gateway::proxy_protocol::parse;

mod common;

fuzz_target!(|data: &[u8]| {
    let full = parse(data);
    if let Ok(Some((_, used))) = &full {
        assert!(
            *used >= 15 && *used <= data.len(),
            "used {used} of {}",
            data.len()
        );
        // The header alone gives the same answer: the ClientHello after it plays no part.
        assert_eq!(parse(&data[..*used]), full);
    }
    // `read_header` consumes an incomplete header as it arrives and parses again: an answer on fewer bytes must be
    // the answer on all of them.
    for cut in common::cuts(data.len()) {
        let part = parse(&data[..cut]);
        assert!(
            part == Ok(None) || part == full,
            "prefix of {cut} bytes gives {part:?}, all {} bytes give {full:?}",
            data.len()
        );
    }
});
