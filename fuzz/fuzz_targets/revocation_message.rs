//! A revocation as another replica (or a store row) sends it: JSON, then `validate`, then matching.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ws_gateway::revocation::{Revocation, Revocations};

fuzz_target!(|data: &[u8]| {
    let Ok(rev) = serde_json::from_slice::<Revocation>(data) else {
        return;
    };
    if rev.validate().is_err() {
        return;
    }
    let set = Revocations::default();
    set.insert(rev.clone(), rev.at);
    let _ = rev.matches(Some(rev.target.value()), Some("t"), Some("s"), Some(rev.at));
    set.purge(rev.expires_at);
});
