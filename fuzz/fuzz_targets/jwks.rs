//! The JWKS document from the identity provider, and signature verification with every key it yields.
//!
//! Input layout: the JSON document, then optionally NUL, the message, NUL, the signature (JSON text never contains
//! a raw NUL, so the split is unambiguous).
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use ws_gateway::auth::jwks::{Jwk, KeySet};
use ws_gateway::auth::Algorithm;

const ALGORITHMS: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |b| *b == 0);
    let json = parts.next().unwrap_or_default();
    let msg = parts.next().unwrap_or_default();
    let sig = parts.next().unwrap_or_default();

    let set = KeySet::from_json(json);
    // KeySet keeps its keys private: walk the same `keys` array with the same per-key parser to reach each one.
    let keys: Vec<Jwk> = serde_json::from_slice::<Value>(json)
        .ok()
        .and_then(|doc| doc.get("keys").and_then(Value::as_array).cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|k| Jwk::from_json(k).ok().flatten())
        .collect();
    match &set {
        Ok(set) => assert_eq!(
            set.len(),
            keys.len(),
            "KeySet kept a different number of keys"
        ),
        Err(_) => assert!(
            keys.is_empty(),
            "KeySet refused a document with {} usable keys",
            keys.len()
        ),
    }
    for key in &keys {
        for alg in ALGORITHMS {
            // `verify` leaves the type and pinned-`alg` check to its caller (`fits`): both run on every pair.
            let _ = key.fits(alg);
            let _ = key.verify(alg, msg, sig);
        }
        if let (Ok(set), Some(kid)) = (&set, key.kid.as_deref()) {
            let found = set
                .find(Some(kid), Algorithm::RS256)
                .expect("a key is found by its kid");
            assert_eq!(found.kid.as_deref(), Some(kid));
        }
    }
    if let Ok(set) = &set {
        for alg in ALGORITHMS {
            if let Some(found) = set.find(None, alg) {
                assert!(
                    found.fits(alg),
                    "find(None, {alg}) returned a key that does not fit"
                );
            }
        }
    }
});
