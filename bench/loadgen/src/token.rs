//! ES256 tokens minted by the load generator itself, so `churn` can give every session its own identity and give
//! some sessions a token that expires while they are open.
//!
//! `jwt-key` writes a fresh P-256 key (PKCS#8 DER) and the JWKS that publishes it; `churn --signing-key` loads the
//! key. ES256 rather than the RS256 of `scripts/bench.sh`: ring signs P-256 in tens of microseconds, RSA-2048 in about
//! a millisecond, and `churn` signs one token per session.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::{json, Value};

/// Signs the tokens of one run.
pub(crate) struct Signer {
    pair: EcdsaKeyPair,
    rng: SystemRandom,
    /// The encoded JOSE header, the same for every token.
    header: String,
    issuer: Option<String>,
    audience: Option<String>,
}

impl Signer {
    /// Loads a P-256 key from a PKCS#8 DER file (as written by `jwt-key`).
    pub(crate) fn load(
        path: &Path,
        kid: &str,
        issuer: Option<String>,
        audience: Option<String>,
    ) -> Result<Signer, String> {
        let der = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        let rng = SystemRandom::new();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der, &rng)
            .map_err(|e| format!("{}: not a P-256 PKCS#8 key: {e}", path.display()))?;
        let header = json!({"alg": "ES256", "typ": "JWT", "kid": kid}).to_string();
        Ok(Signer {
            pair,
            rng,
            header: URL_SAFE_NO_PAD.encode(header),
            issuer,
            audience,
        })
    }

    /// A token for `sub` with id `jti`, valid until `exp` (seconds since the epoch).
    pub(crate) fn token(&self, sub: &str, jti: &str, exp: i64) -> Result<String, String> {
        let mut claims = json!({"sub": sub, "jti": jti, "iat": unix_now(), "exp": exp});
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
            .pair
            .sign(&self.rng, input.as_bytes())
            .map_err(|e| format!("signing a token: {e}"))?;
        Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref())))
    }
}

/// Seconds since the epoch.
pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// `jwt-key`: writes a fresh P-256 key to `pkcs8_out` (mode 0600) and its JWKS to `jwks_out`.
pub(crate) fn write_key(kid: &str, pkcs8_out: &Path, jwks_out: &Path) -> Result<Value, String> {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
        .map_err(|e| format!("generating a key: {e}"))?;
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
        .map_err(|e| format!("loading the generated key: {e}"))?;
    // An uncompressed point: 0x04, then x and y of 32 bytes each.
    let point = pair.public_key().as_ref();
    if point.len() != 65 {
        return Err(format!("unexpected public key length {}", point.len()));
    }
    let jwks = json!({"keys": [{
        "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
    }]});
    write_private(pkcs8_out, pkcs8.as_ref())?;
    std::fs::write(jwks_out, jwks.to_string())
        .map_err(|e| format!("writing {}: {e}", jwks_out.display()))?;
    Ok(json!({
        "mode": "jwt-key",
        "kid": kid,
        "pkcs8": pkcs8_out.display().to_string(),
        "jwks": jwks_out.display().to_string(),
    }))
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("creating {}: {e}", path.display()))?;
    f.write_all(bytes)
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_verify_against_the_written_jwks() {
        let dir = std::env::temp_dir().join(format!("ws-loadgen-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let (key, jwks) = (dir.join("k.p8"), dir.join("jwks.json"));
        write_key("t", &key, &jwks).expect("write");
        let signer = Signer::load(&key, "t", Some("iss".into()), Some("aud".into())).expect("load");
        let token = signer.token("u1", "j1", unix_now() + 60).expect("sign");
        let doc: Value =
            serde_json::from_slice(&std::fs::read(&jwks).expect("jwks")).expect("json");
        let k = &doc["keys"][0];
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
        assert_eq!(claims["iss"], "iss");
        assert_eq!(claims["aud"], "aud");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
