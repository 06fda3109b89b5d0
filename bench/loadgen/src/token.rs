//! Tokens minted by the load generator itself: `churn` gives every session its own identity and gives some sessions
//! a token that expires while they are open; `pki` ([`crate::pki`]) signs the one token of `scripts/bench.sh` and
//! `scripts/fanout.sh`.
//!
//! A signing key is a PKCS#8 key, PEM or DER: P-256 (ES256) or RSA (RS256). `pki --jwt es256` writes a fresh P-256
//! key and `pki --jwt rs256` the checked-in RSA test key, each with the JWKS that publishes it. `churn` uses ES256:
//! ring signs P-256 in tens of microseconds, RSA-2048 in about a millisecond, and `churn` signs one token per session.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::rsa::PublicKeyComponents;
use ring::signature::{
    EcdsaKeyPair, KeyPair, RsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING, RSA_PKCS1_SHA256,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivateKeyDer;
use serde_json::{json, Value};

/// A JWS signing key.
pub(crate) enum Key {
    /// P-256, ES256.
    Es256(EcdsaKeyPair),
    /// RSA, RS256 (PKCS#1 v1.5 with SHA-256).
    Rs256(RsaKeyPair),
}

impl Key {
    /// A PKCS#8 key: P-256 first, then RSA.
    pub(crate) fn from_pkcs8(der: &[u8]) -> Result<Key, String> {
        let rng = SystemRandom::new();
        if let Ok(pair) = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng) {
            return Ok(Key::Es256(pair));
        }
        RsaKeyPair::from_pkcs8(der)
            .map(Key::Rs256)
            .map_err(|e| format!("neither a P-256 nor an RSA PKCS#8 key: {e}"))
    }

    /// A PKCS#8 key from PEM (`-----BEGIN PRIVATE KEY-----`) or DER bytes.
    pub(crate) fn from_pkcs8_pem_or_der(bytes: &[u8]) -> Result<Key, String> {
        if !bytes.trim_ascii_start().starts_with(b"-----BEGIN") {
            return Key::from_pkcs8(bytes);
        }
        match PrivateKeyDer::from_pem_slice(bytes).map_err(|e| format!("PEM: {e}"))? {
            PrivateKeyDer::Pkcs8(der) => Key::from_pkcs8(der.secret_pkcs8_der()),
            _ => Err("not a PKCS#8 key (`BEGIN PRIVATE KEY`)".into()),
        }
    }

    /// The JOSE `alg`.
    pub(crate) fn alg(&self) -> &'static str {
        match self {
            Key::Es256(_) => "ES256",
            Key::Rs256(_) => "RS256",
        }
    }

    /// The public JWK, with `kid`.
    pub(crate) fn jwk(&self, kid: &str) -> Value {
        match self {
            Key::Es256(pair) => {
                // An uncompressed point: 0x04, then x and y of 32 bytes each.
                let point = pair.public_key().as_ref();
                json!({
                    "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
                    "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
                })
            }
            Key::Rs256(pair) => {
                let c: PublicKeyComponents<Vec<u8>> = pair.public_key().into();
                json!({
                    "kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid,
                    "n": URL_SAFE_NO_PAD.encode(unsigned(&c.n)), "e": URL_SAFE_NO_PAD.encode(unsigned(&c.e)),
                })
            }
        }
    }

    fn sign(&self, rng: &SystemRandom, msg: &[u8]) -> Result<Vec<u8>, ring::error::Unspecified> {
        match self {
            Key::Es256(pair) => pair.sign(rng, msg).map(|s| s.as_ref().to_vec()),
            Key::Rs256(pair) => {
                let mut sig = vec![0u8; pair.public().modulus_len()];
                pair.sign(&RSA_PKCS1_SHA256, rng, msg, &mut sig)?;
                Ok(sig)
            }
        }
    }
}

/// A big-endian unsigned integer without leading zero bytes, as JWK `n` and `e` are written (RFC 7518 6.3.1).
fn unsigned(be: &[u8]) -> &[u8] {
    let zeros = be.iter().take_while(|b| **b == 0).count();
    &be[zeros.min(be.len().saturating_sub(1))..]
}

/// Signs the tokens of one run.
pub(crate) struct Signer {
    key: Key,
    rng: SystemRandom,
    /// The encoded JOSE header, the same for every token.
    header: String,
    issuer: Option<String>,
    audience: Option<String>,
}

impl Signer {
    /// A signer with `key`, naming `kid` in every header and adding `iss` and `aud` when given.
    pub(crate) fn new(
        key: Key,
        kid: &str,
        issuer: Option<String>,
        audience: Option<String>,
    ) -> Signer {
        let header = json!({"alg": key.alg(), "typ": "JWT", "kid": kid}).to_string();
        Signer {
            key,
            rng: SystemRandom::new(),
            header: URL_SAFE_NO_PAD.encode(header),
            issuer,
            audience,
        }
    }

    /// Loads a PKCS#8 key (PEM or DER; P-256 or RSA) from a file, as written by `pki`.
    pub(crate) fn load(
        path: &Path,
        kid: &str,
        issuer: Option<String>,
        audience: Option<String>,
    ) -> Result<Signer, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        let key =
            Key::from_pkcs8_pem_or_der(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Signer::new(key, kid, issuer, audience))
    }

    /// A token for `sub` with id `jti`, valid until `exp` (seconds since the epoch).
    pub(crate) fn token(&self, sub: &str, jti: &str, exp: i64) -> Result<String, String> {
        self.sign(json!({"sub": sub, "jti": jti, "iat": unix_now(), "exp": exp}))
    }

    /// Signs `claims`, adding the signer's `iss` and `aud`.
    pub(crate) fn sign(&self, mut claims: Value) -> Result<String, String> {
        if let Some(iss) = &self.issuer {
            claims["iss"] = Value::from(iss.as_str());
        }
        if let Some(aud) = &self.audience {
            claims["aud"] = Value::from(aud.as_str());
        }
        let input = format!(
            "{}.{}",
            self.header,
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = self
            .key
            .sign(&self.rng, input.as_bytes())
            .map_err(|e| format!("signing a token: {e}"))?;
        Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig)))
    }
}

/// Seconds since the epoch.
pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_verify_against_the_jwk() {
        let rng = SystemRandom::new();
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("key");
        let key = Key::from_pkcs8(pkcs8.as_ref()).expect("load");
        let k = key.jwk("t");
        let signer = Signer::new(key, "t", Some("iss".into()), Some("aud".into()));
        let token = signer.token("u1", "j1", unix_now() + 60).expect("sign");
        let coord = |c: &str| URL_SAFE_NO_PAD.decode(k[c].as_str().expect(c)).expect(c);
        let mut point = vec![4u8];
        point.extend(coord("x"));
        point.extend(coord("y"));
        let (input, sig) = token.rsplit_once('.').expect("three parts");
        let sig = URL_SAFE_NO_PAD.decode(sig).expect("sig");
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, point)
            .verify(input.as_bytes(), &sig)
            .expect("signature verifies");
        let claims: Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(input.split('.').nth(1).expect("payload"))
                .expect("b64"),
        )
        .expect("claims");
        assert_eq!(claims["sub"], "u1");
        assert_eq!(claims["jti"], "j1");
        assert_eq!(claims["iss"], "iss");
        assert_eq!(claims["aud"], "aud");
    }

    #[test]
    fn unsigned_integers_lose_leading_zeros_only() {
        assert_eq!(unsigned(&[0, 0, 1, 0, 1]), &[1, 0, 1]);
        assert_eq!(unsigned(&[0x80, 0]), &[0x80, 0]);
        assert_eq!(unsigned(&[0]), &[0]);
    }
}
