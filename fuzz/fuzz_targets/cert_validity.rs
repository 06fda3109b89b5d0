//! The DER readers that warn about a reloaded certificate (validity period, subjectAltName): bytes from a file on
//! disk.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((not_before, not_after)) = ws_gateway::tls::validity(data) {
        // Times come from at most 14 digits: far from overflowing an i64 of seconds.
        assert!(not_before.unsigned_abs() < 1 << 40 && not_after.unsigned_abs() < 1 << 40);
    }
    if let Some(names) = ws_gateway::tls::subject_alt_names(data) {
        assert!(names.len() <= 1_000, "{} names", names.len());
        for n in &names {
            let _ = ws_gateway::tls::covers(&names, n);
        }
    }
});
