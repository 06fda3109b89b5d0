//! JWT verification: strict bounds and header policy first, then the ring signature check with the key chosen by
//! `kid`, and only then the claims.
//!
//! Nothing from the payload is read before the signature holds. `jku`, `x5u`, `jwk` and `x5c` are refused, never
//! followed; any `crit` is refused, since the gateway understands no extension.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::Deserialize;
use serde_json::Value;

use super::jwks::{Jwk, JwksCache};
use super::{Algorithm, AuthError, Identity};
use crate::config::AuthSettings;

/// What a token must satisfy besides its signature.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Required `iss`.
    pub issuer: Option<String>,
    /// Accepted `aud` values (any one); empty means `aud` is not checked.
    pub audiences: Vec<String>,
    /// Accepted algorithms.
    pub algorithms: Vec<Algorithm>,
    /// Clock-skew allowance, seconds.
    pub leeway: i64,
    /// Largest token accepted.
    pub max_bytes: usize,
    /// `(claim, header)` pairs to forward.
    pub forward_claims: Vec<(String, String)>,
    /// Required JOSE `typ` (`JWT_REQUIRED_TYP`), e.g. `at+jwt`.
    pub required_typ: Option<String>,
    /// Claim that keys the per-subject limits (`LIMIT_KEY_CLAIM`).
    pub limit_claim: Option<String>,
    /// Claims whose values the MQTT CONNECT rewrite uses (`MQTT_USERNAME_CLAIM`, global and per route).
    pub identity_claims: Vec<String>,
    /// Collect the Keycloak roles (`MQTT_USERNAME_FORMAT=go`).
    pub collect_roles: bool,
}

impl Policy {
    /// The policy described by the settings.
    #[must_use]
    pub fn from_settings(s: &AuthSettings) -> Policy {
        Policy {
            issuer: s.issuer.clone(),
            audiences: s.audiences.clone(),
            algorithms: s.algorithms.clone(),
            leeway: i64::try_from(s.leeway.as_secs()).unwrap_or(i64::MAX),
            max_bytes: s.max_token_bytes,
            forward_claims: s.forward_claims.clone(),
            required_typ: s.required_typ.clone(),
            limit_claim: None,
            identity_claims: Vec::new(),
            collect_roles: false,
        }
    }
}

/// The JOSE header fields the gateway looks at.
#[derive(Deserialize)]
struct JoseHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    typ: Option<Value>,
    #[serde(default)]
    jku: Option<Value>,
    #[serde(default)]
    x5u: Option<Value>,
    #[serde(default)]
    jwk: Option<Value>,
    #[serde(default)]
    x5c: Option<Value>,
    #[serde(default)]
    crit: Option<Value>,
}

/// A token that passed the structural checks, before any cryptography.
#[derive(Debug)]
pub struct Parsed<'a> {
    /// Algorithm from the header, already allowed by the policy.
    pub alg: Algorithm,
    /// Key id from the header.
    pub kid: Option<String>,
    /// `header.payload`, the signed bytes.
    pub signing_input: &'a str,
    /// Decoded payload (not yet parsed: untrusted until the signature holds).
    pub payload: Vec<u8>,
    /// Decoded signature.
    pub signature: Vec<u8>,
}

/// Structural checks: size, three base64url segments, a JSON header with an allowed `alg` and no forbidden
/// parameters.
///
/// # Errors
/// [`AuthError::Malformed`], [`AuthError::Algorithm`] or [`AuthError::ForbiddenHeader`].
pub fn parse<'a>(token: &'a str, policy: &Policy) -> Result<Parsed<'a>, AuthError> {
    if token.is_empty() || token.len() > policy.max_bytes {
        return Err(AuthError::Malformed);
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed);
    };
    if h.is_empty() || p.is_empty() || s.is_empty() {
        return Err(AuthError::Malformed);
    }
    let header_bytes = URL_SAFE_NO_PAD
        .decode(h)
        .map_err(|_| AuthError::Malformed)?;
    let payload = URL_SAFE_NO_PAD
        .decode(p)
        .map_err(|_| AuthError::Malformed)?;
    let signature = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| AuthError::Malformed)?;
    let header: JoseHeader =
        serde_json::from_slice(&header_bytes).map_err(|_| AuthError::Malformed)?;
    if header.jku.is_some()
        || header.x5u.is_some()
        || header.jwk.is_some()
        || header.x5c.is_some()
        || header.crit.is_some()
    {
        return Err(AuthError::ForbiddenHeader);
    }
    if let Some(want) = &policy.required_typ {
        let got = header.typ.as_ref().and_then(Value::as_str).unwrap_or("");
        if media_type(got) != media_type(want) {
            return Err(AuthError::Type);
        }
    }
    let alg: Algorithm = header.alg.parse().map_err(|_| AuthError::Algorithm)?;
    if !policy.algorithms.contains(&alg) {
        return Err(AuthError::Algorithm);
    }
    Ok(Parsed {
        alg,
        kid: header.kid,
        signing_input: &token[..h.len() + 1 + p.len()],
        payload,
        signature,
    })
}

/// A `typ` value compared as RFC 7515 section 4.1.9 says: case-insensitive, `application/` optional.
fn media_type(typ: &str) -> String {
    let lower = typ.trim().to_ascii_lowercase();
    lower
        .strip_prefix("application/")
        .map_or(lower.clone(), str::to_owned)
}

/// Checks the claims of a payload whose signature has been verified.
///
/// # Errors
/// The first claim that fails.
pub fn check_claims(payload: &[u8], policy: &Policy, now: i64) -> Result<Identity, AuthError> {
    let claims: serde_json::Map<String, Value> =
        serde_json::from_slice(payload).map_err(|_| AuthError::Malformed)?;
    let exp = numeric_date(claims.get("exp"))?.ok_or(AuthError::MissingExp)?;
    let iat = numeric_date(claims.get("iat"))?;
    if now - policy.leeway >= exp {
        return Err(AuthError::Expired);
    }
    if let Some(nbf) = numeric_date(claims.get("nbf"))? {
        if now + policy.leeway < nbf {
            return Err(AuthError::NotYetValid);
        }
    }
    if let Some(iat) = iat {
        if now + policy.leeway < iat {
            return Err(AuthError::IssuedInFuture);
        }
    }
    if let Some(want) = &policy.issuer {
        if claims.get("iss").and_then(Value::as_str) != Some(want.as_str()) {
            return Err(AuthError::Issuer);
        }
    }
    if !policy.audiences.is_empty() {
        let ok = match claims.get("aud") {
            Some(Value::String(a)) => policy.audiences.iter().any(|w| w == a),
            Some(Value::Array(list)) => list
                .iter()
                .filter_map(Value::as_str)
                .any(|a| policy.audiences.iter().any(|w| w == a)),
            _ => false,
        };
        if !ok {
            return Err(AuthError::Audience);
        }
    }
    let text = |v: &Value| -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            Value::Array(items) => {
                let parts: Vec<String> = items
                    .iter()
                    .filter_map(|i| i.as_str().map(str::to_owned))
                    .collect();
                Some(parts.join(","))
            }
            _ => None,
        }
    };
    let forwarded = policy
        .forward_claims
        .iter()
        .filter_map(|(claim, header)| {
            let value = claims.get(claim).and_then(text)?;
            // A claim value with control characters would split the header: drop it.
            (!value.chars().any(char::is_control)).then(|| (header.clone(), value))
        })
        .collect();
    let clean = |v: Option<&Value>| {
        v.and_then(Value::as_str)
            .filter(|s| !s.chars().any(char::is_control))
            .map(str::to_owned)
    };
    Ok(Identity {
        subject: clean(claims.get("sub")),
        token_id: clean(claims.get("jti")),
        session_id: clean(claims.get("sid")),
        issued_at: iat,
        expires_at: exp,
        forwarded,
        limit_claim: policy
            .limit_claim
            .as_ref()
            .and_then(|c| claims.get(c))
            .and_then(text)
            .filter(|v| !v.is_empty()),
        claims: policy
            .identity_claims
            .iter()
            .filter_map(|c| {
                let v = claims.get(c).and_then(text)?;
                (!v.chars().any(char::is_control)).then(|| (c.clone(), v))
            })
            .collect(),
        roles: if policy.collect_roles {
            roles(&claims)
        } else {
            Vec::new()
        },
    })
}

/// Keycloak's roles: `realm_access.roles`, then each `resource_access.<client>.roles`, without repeats; at most
/// 256 (a token is bounded by `JWT_MAX_TOKEN_BYTES` anyway).
fn roles(claims: &serde_json::Map<String, Value>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let lists = std::iter::once(claims.get("realm_access")).chain(
        claims
            .get("resource_access")
            .and_then(Value::as_object)
            .into_iter()
            .flat_map(|m| m.values().map(Some)),
    );
    for access in lists.flatten() {
        let Some(list) = access.get("roles").and_then(Value::as_array) else {
            continue;
        };
        for role in list.iter().filter_map(Value::as_str) {
            if out.len() < 256
                && !role.chars().any(char::is_control)
                && !out.iter().any(|r| r == role)
            {
                out.push(role.to_owned());
            }
        }
    }
    out
}

/// A NumericDate: a JSON number (fractions allowed, truncated); any other type is malformed.
fn numeric_date(v: Option<&Value>) -> Result<Option<i64>, AuthError> {
    match v {
        None => Ok(None),
        Some(Value::Number(n)) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Ok(Some(i)),
            // Invariant: the float is finite (JSON has no NaN/inf); `as` saturates out-of-range values.
            (None, Some(f)) => Ok(Some(f as i64)),
            _ => Err(AuthError::Malformed),
        },
        Some(_) => Err(AuthError::Malformed),
    }
}

/// Seconds since the epoch, now.
#[must_use]
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Verifies tokens against the JWKS cache.
#[derive(Debug)]
pub struct Verifier {
    policy: Policy,
    keys: Arc<JwksCache>,
    cache: TokenCache,
}

/// Most tokens remembered by the verified-token cache.
pub const TOKEN_CACHE_CAPACITY: usize = 16_384;

/// Seconds a cached token stays without being presented again. A hit saves one signature check (tens of
/// microseconds); an entry nobody presents is memory held for nothing.
pub const TOKEN_CACHE_IDLE_SECONDS: i64 = 60;

/// Tokens that passed full verification, keyed by the SHA-256 of the whole token, so a reconnect storm does not
/// pay for the signature again. An entry lives until the token's `exp` (plus leeway), at most
/// [`TOKEN_CACHE_IDLE_SECONDS`] after it was last presented, and only while the exact key that signed it is still
/// in the JWKS: the same `kid` (or a kid-less key) with other key material is a rotation, and the token is
/// verified again against the new key.
#[derive(Debug, Default)]
struct TokenCache {
    entries: std::sync::Mutex<std::collections::HashMap<[u8; 32], Slot>>,
}

/// One table slot: a pointer and a time, so the table's spare capacity costs little.
#[derive(Debug)]
struct Slot {
    entry: Arc<Cached>,
    used: i64,
}

#[derive(Debug)]
struct Cached {
    identity: Identity,
    kid: Option<String>,
    alg: Algorithm,
    key: Arc<Jwk>,
}

fn token_hash(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl TokenCache {
    fn get(&self, hash: &[u8; 32], now: i64, leeway: i64) -> Option<Arc<Cached>> {
        let mut map = self.entries.lock().ok()?;
        match map.get_mut(hash) {
            Some(s) if now - leeway < s.entry.identity.expires_at => {
                s.used = now;
                Some(Arc::clone(&s.entry))
            }
            Some(_) => {
                map.remove(hash);
                None
            }
            None => None,
        }
    }

    fn put(&self, hash: [u8; 32], entry: Arc<Cached>, now: i64, leeway: i64) {
        let Ok(mut map) = self.entries.lock() else {
            return;
        };
        if map.len() >= TOKEN_CACHE_CAPACITY {
            map.retain(|_, s| s.live(now, leeway));
            if map.len() >= TOKEN_CACHE_CAPACITY {
                // Still full of live tokens: start over rather than track recency on the hot path.
                map.clear();
            }
        }
        map.insert(hash, Slot { entry, used: now });
    }

    /// Forgets expired and idle entries, and gives back the table's spare room once it is mostly empty.
    fn sweep(&self, now: i64, leeway: i64) {
        if let Ok(mut map) = self.entries.lock() {
            map.retain(|_, s| s.live(now, leeway));
            crate::memory::shrink_sparse(&mut map);
        }
    }

    fn len(&self) -> usize {
        self.entries.lock().map_or(0, |m| m.len())
    }
}

impl Slot {
    fn live(&self, now: i64, leeway: i64) -> bool {
        now - leeway < self.entry.identity.expires_at
            && now.saturating_sub(self.used) < TOKEN_CACHE_IDLE_SECONDS
    }
}

impl Verifier {
    /// A verifier for `policy` using `keys`.
    #[must_use]
    pub fn new(policy: Policy, keys: Arc<JwksCache>) -> Verifier {
        Verifier {
            policy,
            keys,
            cache: TokenCache::default(),
        }
    }

    /// The policy.
    #[must_use]
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The key cache.
    #[must_use]
    pub fn keys(&self) -> &Arc<JwksCache> {
        &self.keys
    }

    /// Full verification of one token.
    ///
    /// # Errors
    /// Any [`AuthError`]; [`AuthError::NoKeys`] when the JWKS has never been fetched.
    pub async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let (result, _) = self.verify_traced(token).await;
        result
    }

    /// [`Verifier::verify`], also saying whether the verified-token cache answered.
    pub async fn verify_traced(&self, token: &str) -> (Result<Identity, AuthError>, bool) {
        let now = unix_now();
        let hash = token_hash(token);
        if let Some(hit) = self.cache.get(&hash, now, self.policy.leeway) {
            // The signing key must still be published: removing a key from the JWKS revokes its tokens.
            let still_published = self.keys.current().is_some_and(|set| {
                set.find(hit.kid.as_deref(), hit.alg)
                    .is_some_and(|k| k.material == hit.key.material)
            });
            if still_published {
                return (Ok(hit.identity.clone()), true);
            }
        }
        match self.verify_full(token).await {
            Ok(entry) => {
                let identity = entry.identity.clone();
                self.cache
                    .put(hash, Arc::new(entry), now, self.policy.leeway);
                (Ok(identity), false)
            }
            Err(e) => (Err(e), false),
        }
    }

    /// Forgets expired and idle verified tokens and shrinks the cache's table after a burst.
    pub fn sweep_cache(&self, now: i64) {
        self.cache.sweep(now, self.policy.leeway);
    }

    /// Tokens held by the verified-token cache.
    #[must_use]
    pub fn cached_tokens(&self) -> usize {
        self.cache.len()
    }

    /// The signature check alone (bounds, header policy, key, signature), returning the claims for a caller that
    /// checks them by its own rules: back-channel logout tokens and admin tokens. Nothing is cached.
    ///
    /// # Errors
    /// Any [`AuthError`] of the structural and signature steps; `Malformed` when the payload is not a JSON object.
    pub async fn verify_signature(
        &self,
        token: &str,
    ) -> Result<serde_json::Map<String, Value>, AuthError> {
        let (parsed, _) = self.signed(token).await?;
        serde_json::from_slice(&parsed.payload).map_err(|_| AuthError::Malformed)
    }

    /// Bounds, header policy, the key by `kid`, and the signature: the token and the key that signed it.
    async fn signed<'t>(&self, token: &'t str) -> Result<(Parsed<'t>, Arc<Jwk>), AuthError> {
        let parsed = parse(token, &self.policy)?;
        let key = self.find_key(&parsed).await?;
        if !key.fits(parsed.alg) {
            return Err(AuthError::KeyMismatch);
        }
        if !key.verify(
            parsed.alg,
            parsed.signing_input.as_bytes(),
            &parsed.signature,
        ) {
            return Err(AuthError::Signature);
        }
        Ok((parsed, key))
    }

    /// Full verification, bypassing the cache.
    ///
    /// # Errors
    /// Any [`AuthError`].
    pub async fn verify_uncached(&self, token: &str) -> Result<Identity, AuthError> {
        self.verify_full(token).await.map(|c| c.identity)
    }

    async fn verify_full(&self, token: &str) -> Result<Cached, AuthError> {
        let (parsed, key) = self.signed(token).await?;
        let identity = check_claims(&parsed.payload, &self.policy, unix_now())?;
        Ok(Cached {
            identity,
            kid: parsed.kid,
            alg: parsed.alg,
            key,
        })
    }

    async fn find_key(&self, parsed: &Parsed<'_>) -> Result<Arc<Jwk>, AuthError> {
        let lookup = |set: &super::jwks::KeySet| set.find(parsed.kid.as_deref(), parsed.alg);
        if let Some(set) = self.keys.current() {
            if let Some(k) = lookup(&set) {
                return Ok(k);
            }
        }
        // Unknown kid (rotation) or no keys yet: one shared, rate-limited refetch.
        match self.keys.refetch().await {
            Some(set) => lookup(&set).ok_or(AuthError::UnknownKey),
            None => Err(AuthError::NoKeys),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            limit_claim: None,
            identity_claims: vec!["tenant".into(), "absent".into()],
            collect_roles: true,
        }
    }

    #[test]
    fn mqtt_claims_and_roles_are_kept_after_verification() {
        let now = 1_700_000_000;
        let payload = serde_json::json!({
            "exp": now + 60, "iss": "https://idp/realms/r", "aud": "gw", "sub": "alice", "tenant": "t/1",
            "realm_access": {"roles": ["admin", "reader"]},
            "resource_access": {"app": {"roles": ["reader", "writer"]}, "bad": {"roles": "x"}},
        });
        let id = check_claims(payload.to_string().as_bytes(), &policy(), now).expect("valid");
        assert_eq!(id.claims, vec![("tenant".to_owned(), "t/1".to_owned())]);
        assert_eq!(id.roles, vec!["admin", "reader", "writer"]);
        let mut p = policy();
        p.collect_roles = false;
        let id = check_claims(payload.to_string().as_bytes(), &p, now).expect("valid");
        assert!(id.roles.is_empty());
    }

    fn b64(v: &str) -> String {
        URL_SAFE_NO_PAD.encode(v)
    }

    #[test]
    fn structure_is_checked_before_crypto() {
        let p = policy();
        let sig = b64("sig");
        let cases = [
            ("".to_owned(), AuthError::Malformed),
            ("a.b".to_owned(), AuthError::Malformed),
            (
                format!("{}.{}.{}.x", b64("{}"), b64("{}"), sig),
                AuthError::Malformed,
            ),
            (
                format!("{}.{}.{}", b64(r#"{"alg":"none"}"#), b64("{}"), sig),
                AuthError::Algorithm,
            ),
            (
                format!("{}.{}.{}", b64(r#"{"alg":"HS256"}"#), b64("{}"), sig),
                AuthError::Algorithm,
            ),
            (
                format!("{}.{}.{}", b64(r#"{"alg":"RS512"}"#), b64("{}"), sig),
                AuthError::Algorithm,
            ),
            (
                format!(
                    "{}.{}.{}",
                    b64(r#"{"alg":"RS256","jku":"https://evil"}"#),
                    b64("{}"),
                    sig
                ),
                AuthError::ForbiddenHeader,
            ),
            (
                format!(
                    "{}.{}.{}",
                    b64(r#"{"alg":"RS256","crit":["exp"]}"#),
                    b64("{}"),
                    sig
                ),
                AuthError::ForbiddenHeader,
            ),
            (
                format!("{}.{}.{}", b64("not json"), b64("{}"), sig),
                AuthError::Malformed,
            ),
            (
                format!("{}=.{}.{}", b64(r#"{"alg":"RS256"}"#), b64("{}"), sig),
                AuthError::Malformed,
            ),
            ("x".repeat(9000), AuthError::Malformed),
        ];
        for (token, want) in cases {
            assert_eq!(
                parse(&token, &p).map(|_| ()).expect_err(&token),
                want,
                "{token}"
            );
        }
    }

    #[test]
    fn required_typ_refuses_other_token_types() {
        let mut p = policy();
        p.required_typ = Some("at+jwt".into());
        let token = |header: &str| format!("{}.{}.{}", b64(header), b64("{}"), b64("sig"));
        for ok in [
            r#"{"alg":"RS256","typ":"at+jwt"}"#,
            r#"{"alg":"RS256","typ":"application/AT+JWT"}"#,
        ] {
            assert!(parse(&token(ok), &p).is_ok(), "{ok}");
        }
        for bad in [
            r#"{"alg":"RS256","typ":"JWT"}"#,
            r#"{"alg":"RS256"}"#,
            r#"{"alg":"RS256","typ":7}"#,
        ] {
            assert_eq!(
                parse(&token(bad), &p).map(|_| ()),
                Err(AuthError::Type),
                "{bad}"
            );
        }
        p.required_typ = None;
        assert!(parse(&token(r#"{"alg":"RS256","typ":"JWT"}"#), &p).is_ok());
    }

    #[test]
    fn claims() {
        let p = policy();
        let now = 1_000_000;
        let ok = |c: &str| check_claims(c.as_bytes(), &p, now);
        let base = r#""iss":"https://idp/realms/r","aud":["x","gw"],"sub":"alice""#;
        let id = ok(&format!(
            r#"{{{base},"exp":1000100,"email":"a@x","roles":["r1","r2"]}}"#
        ))
        .expect("valid");
        assert_eq!(id.subject.as_deref(), Some("alice"));
        assert_eq!(
            id.forwarded,
            vec![
                ("X-Auth-Email".into(), "a@x".into()),
                ("X-Auth-Roles".into(), "r1,r2".into())
            ]
        );
        assert_eq!(
            ok(&format!(r#"{{{base}}}"#)).map(|_| ()),
            Err(AuthError::MissingExp)
        );
        assert_eq!(
            ok(&format!(r#"{{{base},"exp":"1000100"}}"#)).map(|_| ()),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            ok(&format!(r#"{{{base},"exp":999970}}"#)).map(|_| ()),
            Err(AuthError::Expired)
        );
        assert!(
            ok(&format!(r#"{{{base},"exp":999971}}"#)).is_ok(),
            "leeway applies to exp"
        );
        assert_eq!(
            ok(&format!(r#"{{{base},"exp":1000100,"nbf":1000031}}"#)).map(|_| ()),
            Err(AuthError::NotYetValid)
        );
        assert!(ok(&format!(r#"{{{base},"exp":1000100,"nbf":1000030}}"#)).is_ok());
        assert_eq!(
            ok(&format!(r#"{{{base},"exp":1000100,"iat":1000100}}"#)).map(|_| ()),
            Err(AuthError::IssuedInFuture)
        );
        let no_aud = r#"{"iss":"https://idp/realms/r","exp":1000100}"#;
        assert_eq!(ok(no_aud).map(|_| ()), Err(AuthError::Audience));
        let wrong_iss = r#"{"iss":"https://evil","aud":"gw","exp":1000100}"#;
        assert_eq!(ok(wrong_iss).map(|_| ()), Err(AuthError::Issuer));
        assert!(ok(r#"{"iss":"https://idp/realms/r","aud":"other","exp":1000100.5}"#).is_ok());
    }
}
