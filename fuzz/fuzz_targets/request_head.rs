//! The HTTP/1.1 request head of an upgrade, as the client sends it (before any authentication).
#![no_main]

use libfuzzer_sys::fuzz_target;
use ws_gateway::upgrade::{accept_key, check_upgrade, normalize_path, parse_head, RequestHead};

mod common;

/// The fields of a head, for comparing two parses (`RequestHead` has no `PartialEq`).
fn key(head: &RequestHead) -> impl PartialEq + std::fmt::Debug + '_ {
    (
        head.method.as_str(),
        head.target.as_str(),
        head.minor_version,
        &head.headers,
    )
}

fuzz_target!(|data: &[u8]| {
    let full = parse_head(data);
    match &full {
        Ok(Some((head, used))) => {
            assert!(
                *used > 0 && *used <= data.len(),
                "used {used} of {}",
                data.len()
            );
            // The head alone parses to the same head: what follows it is not part of it.
            let (again, used_again) = parse_head(&data[..*used])
                .expect("the head alone parses")
                .expect("the head alone is complete");
            assert_eq!((key(&again), used_again), (key(head), *used));

            let path = head.path();
            assert!(path.starts_with('/'), "{path:?}");
            assert_eq!(
                normalize_path(path),
                Ok(()),
                "an accepted head has a clean path"
            );
            match head.query() {
                Some(q) => assert_eq!(head.target, format!("{path}?{q}")),
                None => assert_eq!(head.target, path),
            }
            let _ = head.values("Sec-WebSocket-Protocol").count();
            let _ = head.single("Origin");
            if check_upgrade(head).is_ok() {
                let k = head
                    .single("Sec-WebSocket-Key")
                    .expect("checked: one key")
                    .expect("checked: a key");
                assert_eq!(accept_key(k).len(), 28);
            }
        }
        Ok(None) => {}
        Err(e) => {
            let _ = e.kind();
        }
    }
    // The reader parses a growing buffer: an answer given on fewer bytes must be the answer on all of them, or a
    // request's fate would depend on how TCP split it.
    for cut in common::cuts(data.len()) {
        match (parse_head(&data[..cut]), &full) {
            (Ok(None), _) => {}
            (Err(a), Err(b)) => assert_eq!(&a, b, "prefix of {cut} bytes"),
            (Ok(Some((a, n))), Ok(Some((b, m)))) => {
                assert_eq!((key(&a), n), (key(b), *m), "prefix of {cut} bytes")
            }
            (a, _) => panic!(
                "prefix of {cut} bytes gives {:?}, all {} bytes give {:?}",
                a.map(|o| o.map(|(_, n)| n)),
                data.len(),
                full.as_ref().map(|o| o.as_ref().map(|(_, n)| *n))
            ),
        }
    }
});
