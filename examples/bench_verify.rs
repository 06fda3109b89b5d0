//! Token verifications per second on one core: RS256 and ES256, full verification and verified-token cache hits.
//!
//! `cargo run --release --example bench_verify` (needs `openssl` for the RSA key). Prints figures; asserts nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair};
use serde_json::json;
use ws_gateway::auth::jwks::{JwksCache, KeySet};
use ws_gateway::auth::jwt::{unix_now, Policy, Verifier};
use ws_gateway::auth::Algorithm;

fn b64(v: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(v)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let rng = SystemRandom::new();
    let der = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-outform",
            "DER",
        ])
        .output()?
        .stdout;
    let rsa = RsaKeyPair::from_der(&der).map_err(|e| anyhow::anyhow!("{e}"))?;
    let ec_alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
    let ec_pk = EcdsaKeyPair::generate_pkcs8(ec_alg, &rng).map_err(|e| anyhow::anyhow!("{e}"))?;
    let ec = EcdsaKeyPair::from_pkcs8(ec_alg, ec_pk.as_ref(), &rng)
        .map_err(|e| anyhow::anyhow!("{e}"))?;

    let c = signature::RsaPublicKeyComponents::<Vec<u8>>::from(rsa.public());
    let p = ec.public_key().as_ref();
    let jwks = json!({"keys": [
        {"kty": "RSA", "kid": "rs", "alg": "RS256", "n": b64(&c.n), "e": b64(&c.e)},
        {"kty": "EC", "kid": "ec", "alg": "ES256", "crv": "P-256", "x": b64(&p[1..33]), "y": b64(&p[33..65])},
    ]});
    let claims = json!({"iss": "https://idp/realms/r", "aud": "gw", "sub": "bench", "exp": unix_now() + 3600});
    let sign = |alg: &str, kid: &str| -> anyhow::Result<String> {
        let input = format!(
            "{}.{}",
            b64(json!({"alg": alg, "kid": kid}).to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let sig = if alg == "RS256" {
            let mut sig = vec![0u8; rsa.public().modulus_len()];
            rsa.sign(
                &signature::RSA_PKCS1_SHA256,
                &rng,
                input.as_bytes(),
                &mut sig,
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            sig
        } else {
            ec.sign(&rng, input.as_bytes())
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .as_ref()
                .to_vec()
        };
        Ok(format!("{input}.{}", b64(&sig)))
    };

    let metrics = Arc::new(ws_gateway::metrics::Metrics::new());
    let url = ws_gateway::net::Url::parse_http("http://127.0.0.1:1/unused")
        .map_err(anyhow::Error::msg)?;
    let tls = ws_gateway::tls::client_config(None).map_err(anyhow::Error::msg)?;
    let client = ws_gateway::auth::idp::IdpClient::new(&tls, Duration::from_secs(1))
        .map_err(anyhow::Error::msg)?;
    let cache = Arc::new(JwksCache::new(
        ws_gateway::auth::jwks::KeySource::Jwks(url),
        client,
        Duration::from_secs(600),
        Duration::from_secs(10),
        metrics,
    ));
    cache.preload(KeySet::from_json(jwks.to_string().as_bytes()).map_err(anyhow::Error::msg)?);
    let policy = Policy {
        issuer: Some("https://idp/realms/r".into()),
        audiences: vec!["gw".into()],
        algorithms: vec![Algorithm::RS256, Algorithm::ES256],
        leeway: 30,
        max_bytes: 8192,
        forward_claims: vec![],
        required_typ: None,
        limit_claim: None,
        identity_claims: Vec::new(),
        collect_roles: false,
    };
    let verifier = Verifier::new(policy, cache);

    println!("| token | path | verifications/s (one core) | µs each |");
    println!("|---|---|---|---|");
    for (alg, kid) in [("RS256", "rs"), ("ES256", "ec")] {
        let token = sign(alg, kid)?;
        for cached in [false, true] {
            if cached {
                verifier
                    .verify(&token)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            let n = if cached {
                200_000
            } else if alg == "RS256" {
                20_000
            } else {
                10_000
            };
            let start = Instant::now();
            for _ in 0..n {
                let r = if cached {
                    verifier.verify(&token).await
                } else {
                    verifier.verify_uncached(&token).await
                };
                r.map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            let secs = start.elapsed().as_secs_f64();
            let path = if cached {
                "cache hit"
            } else {
                "full verification"
            };
            println!(
                "| {alg} | {path} | {:.0} | {:.2} |",
                n as f64 / secs,
                secs * 1e6 / n as f64
            );
        }
    }
    Ok(())
}
