//! JWT structure checks (`parse`) on any UTF-8 string, and the claims checks (`check_claims`) on any bytes, with
//! the policy the unit tests in src/auth/jwt.rs use (`parse` also with `required_typ` set).
#![no_main]

use libfuzzer_sys::fuzz_target;
use ws_gateway::auth::jwt::{check_claims, parse, Policy};
use ws_gateway::auth::{Algorithm, Identity};

/// The clock of the unit tests: fixed, so every crash reproduces.
const NOW: i64 = 1_000_000;

fn policy() -> Policy {
    Policy {
        issuer: Some("https://idp/realms/r".into()),
        audiences: vec!["gw".into(), "other".into()],
        algorithms: vec![Algorithm::RS256, Algorithm::ES256],
        leeway: 30,
        max_bytes: 8192,
        forward_claims: vec![
            ("email".into(), "X-Auth-Email".into()),
            ("roles".into(), "X-Auth-Roles".into()),
        ],
        required_typ: None,
        limit_claim: Some("tenant".into()),
        identity_claims: vec!["preferred_username".into()],
        collect_roles: true,
    }
}

/// What an accepted payload promises: not expired, and nothing that could split a forwarded header or a log line.
fn check_identity(id: &Identity, policy: &Policy) {
    assert!(
        NOW - policy.leeway < id.expires_at,
        "expired token accepted: exp {}",
        id.expires_at
    );
    for (header, value) in &id.forwarded {
        assert!(
            policy.forward_claims.iter().any(|(_, h)| h == header),
            "forwarded header {header:?} not configured"
        );
        assert!(
            !value.chars().any(char::is_control),
            "control character in {header}: {value:?}"
        );
    }
    for v in [&id.subject, &id.token_id].into_iter().flatten() {
        assert!(
            !v.chars().any(char::is_control),
            "control character in {v:?}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let plain = policy();
    if let Ok(token) = std::str::from_utf8(data) {
        let typed = Policy {
            required_typ: Some("at+jwt".into()),
            ..policy()
        };
        for policy in [&plain, &typed] {
            let Ok(parsed) = parse(token, policy) else {
                continue;
            };
            assert!(
                policy.algorithms.contains(&parsed.alg),
                "{:?} not allowed",
                parsed.alg
            );
            assert!(token.len() <= policy.max_bytes);
            // The signed bytes are `header.payload`, the token up to its last dot.
            let (input, sig) = token.rsplit_once('.').expect("three segments");
            assert_eq!(parsed.signing_input, input);
            assert!(!sig.is_empty() && parsed.signing_input.matches('.').count() == 1);
            if let Ok(id) = check_claims(&parsed.payload, policy, NOW) {
                check_identity(&id, policy);
            }
        }
    }
    if let Ok(id) = check_claims(data, &plain, NOW) {
        check_identity(&id, &plain);
    }
});
