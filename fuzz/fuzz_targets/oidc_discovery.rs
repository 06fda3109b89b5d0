//! The OpenID Connect discovery document from the identity provider (`jwks_uri`), checked against the configured
//! issuer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ws_gateway::auth::idp::jwks_uri;

/// The issuers of the unit tests, with and without TLS.
const ISSUERS: [&str; 2] = ["https://idp/realms/r", "http://idp/realms/r"];

fuzz_target!(|data: &[u8]| {
    for issuer in ISSUERS {
        let Ok(url) = jwks_uri(data, issuer) else {
            continue;
        };
        // Keys for an https issuer never come over plain http.
        if issuer.starts_with("https://") {
            assert!(url.secure, "https issuer {issuer}, keys from {url}");
        }
        assert!(matches!(url.scheme.as_str(), "http" | "https"), "{url:?}");
        // The document named the configured issuer.
        let doc: serde_json::Value = serde_json::from_slice(data).expect("accepted, so JSON");
        let said = doc["issuer"].as_str().expect("accepted, so an issuer");
        assert_eq!(said.trim_end_matches('/'), issuer.trim_end_matches('/'));
    }
});
