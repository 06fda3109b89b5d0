//! Authentication at the edge: where the token is, whether its signature holds against the JWKS, what its claims
//! allow, and whether the browser's Origin may connect.
//!
//! - [`source`]: the token sources in their order, and stripping them from what goes upstream;
//! - [`jwt`]: bounds, header policy, ring signature check, then claims;
//! - [`jwks`]: the key cache, its refresh and the rate-limited refetch on an unknown `kid`;
//! - [`origin`]: the Origin policy.

pub mod idp;
pub mod jwks;
pub mod jwt;
pub mod origin;
pub mod source;

use std::fmt;
use std::str::FromStr;

/// A JWS algorithm the gateway verifies. HS* and `none` do not exist here, by construction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(clippy::upper_case_acronyms)]
pub enum Algorithm {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    RS256,
    /// RSASSA-PKCS1-v1_5 with SHA-384.
    RS384,
    /// RSASSA-PKCS1-v1_5 with SHA-512.
    RS512,
    /// RSASSA-PSS with SHA-256.
    PS256,
    /// RSASSA-PSS with SHA-384.
    PS384,
    /// RSASSA-PSS with SHA-512.
    PS512,
    /// ECDSA P-256 with SHA-256.
    ES256,
    /// ECDSA P-384 with SHA-384.
    ES384,
    /// Ed25519.
    EdDSA,
}

impl Algorithm {
    /// The JOSE name.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::RS256 => "RS256",
            Algorithm::RS384 => "RS384",
            Algorithm::RS512 => "RS512",
            Algorithm::PS256 => "PS256",
            Algorithm::PS384 => "PS384",
            Algorithm::PS512 => "PS512",
            Algorithm::ES256 => "ES256",
            Algorithm::ES384 => "ES384",
            Algorithm::EdDSA => "EdDSA",
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Algorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.trim() {
            "RS256" => Algorithm::RS256,
            "RS384" => Algorithm::RS384,
            "RS512" => Algorithm::RS512,
            "PS256" => Algorithm::PS256,
            "PS384" => Algorithm::PS384,
            "PS512" => Algorithm::PS512,
            "ES256" => Algorithm::ES256,
            "ES384" => Algorithm::ES384,
            "EdDSA" => Algorithm::EdDSA,
            other if other.starts_with("HS") || other.eq_ignore_ascii_case("none") => {
                return Err(format!(
                    "`{other}` is never accepted (symmetric or unsigned tokens)"
                ))
            }
            other => return Err(format!("unsupported algorithm `{other}`")),
        })
    }
}

/// Why a request failed authentication. `Display` never contains the token or a claim value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token in any source.
    #[error("no token")]
    Missing,
    /// Too large, not three base64url segments, or not JSON.
    #[error("malformed token")]
    Malformed,
    /// `alg` not allowed (HS*, none, or not configured).
    #[error("algorithm not allowed")]
    Algorithm,
    /// A header the gateway refuses: jku, x5u, jwk, x5c, or crit.
    #[error("forbidden header parameter")]
    ForbiddenHeader,
    /// No key with this `kid`, even after a refetch.
    #[error("unknown signing key")]
    UnknownKey,
    /// The key's type, curve, alg or use does not fit the token's alg.
    #[error("key does not fit algorithm")]
    KeyMismatch,
    /// The signature does not verify.
    #[error("bad signature")]
    Signature,
    /// `exp` missing.
    #[error("missing exp")]
    MissingExp,
    /// `exp` passed.
    #[error("token expired")]
    Expired,
    /// `nbf` in the future.
    #[error("token not yet valid")]
    NotYetValid,
    /// `iat` in the future.
    #[error("token issued in the future")]
    IssuedInFuture,
    /// `iss` missing or different.
    #[error("wrong issuer")]
    Issuer,
    /// `aud` missing or without an accepted value.
    #[error("wrong audience")]
    Audience,
    /// No keys loaded yet (IdP not reached since start).
    #[error("signing keys not loaded yet")]
    NoKeys,
    /// The token matches a revocation (by `sub`, `jti` or `sid`).
    #[error("token revoked")]
    Revoked,
    /// `REVOCATION_FAIL_MODE=closed` and the shared store is unreachable.
    #[error("revocation store unavailable")]
    StoreDown,
    /// The JOSE `typ` is not `JWT_REQUIRED_TYP` (an ID token where an access token is expected).
    #[error("wrong token type")]
    Type,
}

impl AuthError {
    /// Bounded label for logs and `ws_auth_failures_total{reason}`.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing_token",
            AuthError::Malformed => "malformed",
            AuthError::Algorithm => "algorithm",
            AuthError::ForbiddenHeader => "forbidden_header",
            AuthError::UnknownKey => "unknown_kid",
            AuthError::KeyMismatch => "key_mismatch",
            AuthError::Signature => "bad_signature",
            AuthError::MissingExp => "missing_exp",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::IssuedInFuture => "issued_in_future",
            AuthError::Issuer => "issuer",
            AuthError::Audience => "audience",
            AuthError::NoKeys => "no_keys",
            AuthError::Type => "typ",
            AuthError::Revoked => "revoked",
            AuthError::StoreDown => "store_down",
        }
    }
}

/// The claims of a verified token that the gateway uses.
#[derive(Debug, Clone)]
pub struct Identity {
    /// `sub`, if present.
    pub subject: Option<String>,
    /// `jti`, if present.
    pub token_id: Option<String>,
    /// `sid` (the IdP's login session), if present: what back-channel logout names.
    pub session_id: Option<String>,
    /// `iat`, if present: a subject revocation refuses tokens issued at or before it.
    pub issued_at: Option<i64>,
    /// `exp`, seconds since the epoch.
    pub expires_at: i64,
    /// Values of the configured forwarded claims, as `(header, value)`.
    pub forwarded: Vec<(String, String)>,
    /// The value of `LIMIT_KEY_CLAIM`, when it is configured and the token carries it.
    pub limit_claim: Option<String>,
    /// Values of the claims the MQTT settings name (`MQTT_USERNAME_CLAIM`, global and per route), as
    /// `(claim, value)`; empty when none is configured.
    pub claims: Vec<(String, String)>,
    /// Roles of `realm_access.roles`, then of each `resource_access.*.roles`, without repeats; filled only for
    /// `MQTT_USERNAME_FORMAT=go`.
    pub roles: Vec<String>,
}
