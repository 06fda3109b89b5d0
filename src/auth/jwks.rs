//! The JWKS cache: fetched at start, refreshed every TTL, refetched (at most once per interval, one fetch shared by
//! every waiting request) when a token names an unknown `kid`. A failed refresh keeps the last good keys.
//!
//! Keys come from `JWKS_URL`, or from the `jwks_uri` that OpenID Connect discovery finds under `OIDC_ISSUER_URL`;
//! the fetches go through [`super::idp::IdpClient`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde_json::Value;
use tokio::time::Instant;

use super::idp::IdpClient;
use super::Algorithm;
use crate::metrics::Metrics;
use crate::net::Url;

/// Where the keys are published.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// `JWKS_URL`.
    Jwks(Url),
    /// `OIDC_ISSUER_URL`: the `jwks_uri` of its discovery document.
    Issuer(Url),
}

/// Largest JWKS document accepted.
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// Public key material of one JWK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyMaterial {
    /// RSA modulus and exponent, big-endian without leading zeros.
    Rsa {
        /// Modulus.
        n: Vec<u8>,
        /// Exponent.
        e: Vec<u8>,
    },
    /// An uncompressed EC point on P-256 (`p384 == false`) or P-384.
    Ec {
        /// Curve P-384 rather than P-256.
        p384: bool,
        /// `0x04 || x || y`.
        point: Vec<u8>,
    },
    /// An Ed25519 public key.
    Ed25519(Vec<u8>),
}

/// One usable signing key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jwk {
    /// `kid`.
    pub kid: Option<String>,
    /// `alg`, when the JWK pins one.
    pub alg: Option<Algorithm>,
    /// The key.
    pub material: KeyMaterial,
}

impl Jwk {
    /// Parses one JWK; `Ok(None)` for keys that are not for signature verification (`use: enc`, other `kty`).
    ///
    /// # Errors
    /// A signing key whose parameters are malformed.
    pub fn from_json(v: &Value) -> Result<Option<Jwk>, String> {
        let s = |k: &str| v.get(k).and_then(Value::as_str);
        if s("use").is_some_and(|u| u != "sig") {
            return Ok(None);
        }
        if let Some(ops) = v.get("key_ops").and_then(Value::as_array) {
            if !ops.iter().any(|o| o.as_str() == Some("verify")) {
                return Ok(None);
            }
        }
        let alg = match s("alg") {
            None => None,
            Some(a) => match a.parse::<Algorithm>() {
                Ok(a) => Some(a),
                // An encryption or symmetric algorithm: not a key the gateway verifies with.
                Err(_) => return Ok(None),
            },
        };
        let b = |k: &str| -> Result<Vec<u8>, String> {
            let raw = s(k).ok_or_else(|| format!("missing `{k}`"))?;
            URL_SAFE_NO_PAD
                .decode(raw.trim_end_matches('='))
                .map_err(|_| format!("`{k}` is not base64url"))
        };
        let material = match s("kty") {
            Some("RSA") => {
                let strip = |mut v: Vec<u8>| {
                    let zeros = v.iter().take_while(|b| **b == 0).count();
                    v.drain(..zeros);
                    v
                };
                KeyMaterial::Rsa {
                    n: strip(b("n")?),
                    e: strip(b("e")?),
                }
            }
            Some("EC") => {
                let (p384, size) = match s("crv") {
                    Some("P-256") => (false, 32),
                    Some("P-384") => (true, 48),
                    _ => return Ok(None),
                };
                let (x, y) = (b("x")?, b("y")?);
                if x.len() != size || y.len() != size {
                    return Err("EC coordinates have the wrong length".into());
                }
                let mut point = vec![4u8];
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                KeyMaterial::Ec { p384, point }
            }
            Some("OKP") if s("crv") == Some("Ed25519") => {
                let x = b("x")?;
                if x.len() != 32 {
                    return Err("Ed25519 key has the wrong length".into());
                }
                KeyMaterial::Ed25519(x)
            }
            _ => return Ok(None),
        };
        Ok(Some(Jwk {
            kid: s("kid").map(str::to_owned),
            alg,
            material,
        }))
    }

    /// Whether this key may verify a token signed with `alg` (type, curve and pinned `alg` agree).
    #[must_use]
    pub fn fits(&self, alg: Algorithm) -> bool {
        if self.alg.is_some_and(|a| a != alg) {
            return false;
        }
        use Algorithm::*;
        matches!(
            (&self.material, alg),
            (
                KeyMaterial::Rsa { .. },
                RS256 | RS384 | RS512 | PS256 | PS384 | PS512
            ) | (KeyMaterial::Ec { p384: false, .. }, ES256)
                | (KeyMaterial::Ec { p384: true, .. }, ES384)
                | (KeyMaterial::Ed25519(_), EdDSA)
        )
    }

    /// Verifies `sig` over `msg` with ring. The caller has checked [`Jwk::fits`].
    #[must_use]
    pub fn verify(&self, alg: Algorithm, msg: &[u8], sig: &[u8]) -> bool {
        use Algorithm::*;
        match &self.material {
            KeyMaterial::Rsa { n, e } => {
                let params: &signature::RsaParameters = match alg {
                    RS256 => &signature::RSA_PKCS1_2048_8192_SHA256,
                    RS384 => &signature::RSA_PKCS1_2048_8192_SHA384,
                    RS512 => &signature::RSA_PKCS1_2048_8192_SHA512,
                    PS256 => &signature::RSA_PSS_2048_8192_SHA256,
                    PS384 => &signature::RSA_PSS_2048_8192_SHA384,
                    PS512 => &signature::RSA_PSS_2048_8192_SHA512,
                    _ => return false,
                };
                RsaPublicKeyComponents { n, e }
                    .verify(params, msg, sig)
                    .is_ok()
            }
            KeyMaterial::Ec { point, .. } => {
                let params: &'static dyn signature::VerificationAlgorithm = match alg {
                    ES256 => &signature::ECDSA_P256_SHA256_FIXED,
                    ES384 => &signature::ECDSA_P384_SHA384_FIXED,
                    _ => return false,
                };
                UnparsedPublicKey::new(params, point)
                    .verify(msg, sig)
                    .is_ok()
            }
            KeyMaterial::Ed25519(x) => {
                alg == EdDSA
                    && UnparsedPublicKey::new(&signature::ED25519, x)
                        .verify(msg, sig)
                        .is_ok()
            }
        }
    }
}

/// The keys of one successful fetch.
#[derive(Debug, Clone)]
pub struct KeySet {
    keys: Vec<Arc<Jwk>>,
    /// When the set was fetched.
    pub fetched_at: Instant,
}

impl KeySet {
    /// Parses a JWKS document, keeping the signing keys and skipping the rest.
    ///
    /// # Errors
    /// Not JSON, no `keys` array, or no usable signing key at all.
    pub fn from_json(body: &[u8]) -> Result<KeySet, String> {
        let doc: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
        let list = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or("no `keys` array")?;
        let mut keys = Vec::new();
        for (i, k) in list.iter().enumerate() {
            match Jwk::from_json(k) {
                Ok(Some(jwk)) => keys.push(Arc::new(jwk)),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(event = "jwks_key_skipped", index = i, error = %e, "skipping malformed JWK")
                }
            }
        }
        if keys.is_empty() {
            return Err("no usable signing key".into());
        }
        Ok(KeySet {
            keys,
            fetched_at: Instant::now(),
        })
    }

    /// The key for a token: by `kid`, or the only key fitting `alg` when the token names none.
    #[must_use]
    pub fn find(&self, kid: Option<&str>, alg: Algorithm) -> Option<Arc<Jwk>> {
        match kid {
            Some(kid) => self
                .keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid))
                .cloned(),
            None => {
                let mut fitting = self.keys.iter().filter(|k| k.fits(alg));
                match (fitting.next(), fitting.next()) {
                    (Some(k), None) => Some(Arc::clone(k)),
                    _ => None,
                }
            }
        }
    }

    /// Number of usable keys.
    #[must_use]
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the set is empty (never, for a set built by [`KeySet::from_json`]).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Where keys come from and how often.
#[derive(Debug)]
pub struct JwksCache {
    source: KeySource,
    /// The JWKS URL: `JWKS_URL`, or what discovery found (kept once found).
    url: Mutex<Option<Url>>,
    client: IdpClient,
    ttl: Duration,
    refetch_interval: Duration,
    current: ArcSwapOption<KeySet>,
    fetch_lock: tokio::sync::Mutex<()>,
    attempts: AtomicU64,
    last_attempt: Mutex<Option<Instant>>,
    metrics: Arc<Metrics>,
}

impl JwksCache {
    /// A cache for `url`, empty until the first fetch.
    #[must_use]
    pub fn new(
        source: KeySource,
        client: IdpClient,
        ttl: Duration,
        refetch_interval: Duration,
        metrics: Arc<Metrics>,
    ) -> JwksCache {
        let url = match &source {
            KeySource::Jwks(u) => Some(u.clone()),
            KeySource::Issuer(_) => None,
        };
        JwksCache {
            source,
            url: Mutex::new(url),
            client,
            ttl,
            refetch_interval,
            current: ArcSwapOption::empty(),
            fetch_lock: tokio::sync::Mutex::new(()),
            attempts: AtomicU64::new(0),
            last_attempt: Mutex::new(None),
            metrics,
        }
    }

    /// Installs keys without a fetch (benchmarks, embedding); the next refresh replaces them.
    pub fn preload(&self, set: KeySet) {
        self.current.store(Some(Arc::new(set)));
    }

    /// The keys in use, if any fetch has succeeded.
    #[must_use]
    pub fn current(&self) -> Option<Arc<KeySet>> {
        self.current.load_full()
    }

    /// Whether keys are loaded (readiness).
    #[must_use]
    pub fn is_ready(&self) -> bool {
        self.current.load().is_some()
    }

    /// Refetch for an unknown `kid`: at most once per interval, and concurrent callers share one fetch.
    pub async fn refetch(&self) -> Option<Arc<KeySet>> {
        let seen = self.attempts.load(Ordering::Acquire);
        let _guard = self.fetch_lock.lock().await;
        if self.attempts.load(Ordering::Acquire) != seen {
            // Another request fetched while this one waited.
            return self.current();
        }
        let recent = self
            .last_attempt
            .lock()
            .ok()
            .and_then(|g| *g)
            .is_some_and(|t| t.elapsed() < self.refetch_interval);
        if !recent {
            self.fetch_and_store("unknown_kid").await;
        }
        self.current()
    }

    /// Background refresh: first fetch with back-off until it succeeds, then every TTL.
    pub async fn run(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(500);
        loop {
            let ok = {
                let _guard = self.fetch_lock.lock().await;
                self.fetch_and_store(if self.is_ready() { "ttl" } else { "start" })
                    .await
            };
            let wait = if ok {
                backoff = Duration::from_millis(500);
                self.ttl
            } else {
                backoff = (backoff * 2).min(Duration::from_secs(30));
                if self.is_ready() {
                    backoff.max(Duration::from_secs(5)).min(self.ttl)
                } else {
                    backoff
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// One fetch; on success the new set replaces the old, on failure the old stays. Callers hold `fetch_lock`.
    async fn fetch_and_store(&self, trigger: &'static str) -> bool {
        if let Ok(mut g) = self.last_attempt.lock() {
            *g = Some(Instant::now());
        }
        let (url, result) = match self.jwks_url().await {
            Ok(url) => {
                let result = match self.client.get(&url, MAX_JWKS_BYTES).await {
                    Ok(body) => KeySet::from_json(&body),
                    Err(e) => Err(e),
                };
                (url.to_string(), result)
            }
            Err(e) => (self.source_label(), Err(e)),
        };
        let ok = match result {
            Ok(set) => {
                tracing::info!(event = "jwks_refreshed", trigger, keys = set.len(), url = %url, "JWKS loaded");
                self.metrics.jwks_refresh(true, trigger);
                self.current.store(Some(Arc::new(set)));
                true
            }
            Err(error) => {
                let have = self.current.load().as_ref().map_or(0, |s| s.len());
                let message = if have == 0 {
                    "JWKS fetch failed; no keys yet, so upgrades get 503 until a fetch succeeds"
                } else {
                    "JWKS fetch failed; keeping the last good keys"
                };
                tracing::warn!(event = "jwks_refresh_failed", trigger, url = %url, %error, keys_in_use = have,
                    "{message}");
                self.metrics.jwks_refresh(false, trigger);
                false
            }
        };
        self.attempts.fetch_add(1, Ordering::AcqRel);
        ok
    }

    /// The JWKS URL, discovering it first when only the issuer is known.
    async fn jwks_url(&self) -> Result<Url, String> {
        if let Some(url) = self.url.lock().ok().and_then(|g| g.clone()) {
            return Ok(url);
        }
        let KeySource::Issuer(issuer) = &self.source else {
            return Err("no JWKS URL".into());
        };
        let url = self.client.discover(issuer).await?;
        tracing::info!(event = "oidc_discovered", issuer = %issuer, jwks_uri = %url, "JWKS URL discovered");
        if let Ok(mut g) = self.url.lock() {
            *g = Some(url.clone());
        }
        Ok(url)
    }

    fn source_label(&self) -> String {
        match &self.source {
            KeySource::Jwks(u) => u.to_string(),
            KeySource::Issuer(i) => format!("{i} (discovery)"),
        }
    }

    /// Seconds since the keys in use were fetched.
    #[must_use]
    pub fn age_seconds(&self) -> Option<f64> {
        self.current
            .load()
            .as_ref()
            .map(|s| s.fetched_at.elapsed().as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEYCLOAK: &str = r#"{"keys":[
      {"kid":"enc1","kty":"RSA","alg":"RSA-OAEP","use":"enc","n":"AQAB","e":"AQAB"},
      {"kid":"ec1","kty":"EC","alg":"ES256","use":"sig","crv":"P-256",
       "x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
      {"kid":"rs1","kty":"RSA","alg":"RS256","use":"sig","n":"AKx2","e":"AQAB"},
      {"kid":"hs","kty":"oct","k":"c2VjcmV0"}
    ]}"#;

    #[test]
    fn keycloak_shape_keeps_signing_keys_only() {
        let set = KeySet::from_json(KEYCLOAK.as_bytes()).expect("parses");
        assert_eq!(set.len(), 2);
        assert!(set.find(Some("enc1"), Algorithm::RS256).is_none());
        assert!(set.find(Some("hs"), Algorithm::RS256).is_none());
        let ec = set.find(Some("ec1"), Algorithm::ES256).expect("ec");
        assert!(
            ec.fits(Algorithm::ES256) && !ec.fits(Algorithm::RS256) && !ec.fits(Algorithm::ES384)
        );
        let rs = set.find(Some("rs1"), Algorithm::RS256).expect("rsa");
        assert_eq!(
            rs.material,
            KeyMaterial::Rsa {
                n: vec![0xac, 0x76],
                e: vec![1, 0, 1]
            }
        );
        assert!(
            rs.fits(Algorithm::RS256) && !rs.fits(Algorithm::PS256),
            "alg pinned by the JWK"
        );
        assert!(KeySet::from_json(br#"{"keys":[]}"#).is_err());
        assert!(KeySet::from_json(b"<html>").is_err());
    }
}
