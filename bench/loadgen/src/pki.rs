//! `pki`: the keys, certificates and secrets of a benchmark or soak run, written into one directory, so the scripts
//! need no `openssl` binary.
//!
//! | file | what |
//! |---|---|
//! | `ca.pem`, `ca.key` | a P-256 CA (not with `--self-signed`) |
//! | `server.pem`, `server.key` | a P-256 server certificate for `--san`, signed by the CA (or by itself) |
//! | `jwt.key` | the JWT signing key, PKCS#8 PEM: RS256 is the checked-in test key `tests/keys/rsa-2048-test-only.pem` (ring cannot generate RSA keys), ES256 a fresh P-256 key |
//! | `jwt.pub.pem` | its public key as a SubjectPublicKeyInfo PEM (HAProxy's `jwt_verify` reads it) |
//! | `jwks/jwks.json` | the JWKS that publishes it, alone in its directory so the directory can be served as it is |
//! | `token` | with `--token-sub`: a token signed with `jwt.key` (`sub`, `iat`, `exp`, and `iss`, `aud` when given) |
//! | `admin-token` | 24 random bytes in hex, for `--admin-token-file` |
//!
//! Private files (`*.key`, `token`, `admin-token`) are mode 0600. Files already there are overwritten.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use clap::{Args, ValueEnum};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::{json, Value};

use crate::token::{unix_now, Key, Signer};

/// The RSA-2048 test key of the integration tests: RS256 tokens of test runs only.
const RSA_TEST_KEY: &[u8] = include_bytes!("../../../tests/keys/rsa-2048-test-only.pem");

/// `AlgorithmIdentifier` of rsaEncryption (1.2.840.113549.1.1.1) with NULL parameters.
const RSA_ENCRYPTION: &[u8] = &[
    0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
];

/// `ws-loadgen pki`.
#[derive(Args, Debug)]
pub(crate) struct PkiArgs {
    /// Directory to write into (created when missing).
    #[arg(long)]
    out: PathBuf,
    /// Names of the server certificate: DNS names or IP addresses, comma-separated; the first is also its CN.
    #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1")]
    san: Vec<String>,
    /// A self-signed server certificate (its own trust anchor), and no CA.
    #[arg(long)]
    self_signed: bool,
    /// Server certificates to write, as NAME.pem and NAME.key, each with its own key and the same names.
    #[arg(long, value_delimiter = ',', default_value = "server")]
    leaves: Vec<String>,
    /// Days the certificates are valid (from an hour ago).
    #[arg(long, default_value_t = 2)]
    days: u32,
    /// The JWT signing key: rs256 (the checked-in RSA-2048 test key), es256 (a fresh P-256 key) or none.
    #[arg(long, value_enum, default_value_t = JwtAlg::Rs256)]
    jwt: JwtAlg,
    /// `kid` of the signing key, in the JWKS and in the token's header.
    #[arg(long, default_value = "pki")]
    kid: String,
    /// Also write `token`, a token for this subject.
    #[arg(long)]
    token_sub: Option<String>,
    /// `iss` of the token.
    #[arg(long, requires = "token_sub")]
    token_iss: Option<String>,
    /// `aud` of the token.
    #[arg(long, requires = "token_sub")]
    token_aud: Option<String>,
    /// Seconds the token is valid.
    #[arg(long, default_value_t = 3600, requires = "token_sub")]
    token_ttl: i64,
}

/// Algorithm of the JWT signing key.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JwtAlg {
    Rs256,
    Es256,
    None,
}

/// Writes what [`PkiArgs`] asks for and returns the `RESULT`.
pub(crate) fn pki(a: &PkiArgs) -> Result<Value, String> {
    if a.san.is_empty() || a.san.iter().any(String::is_empty) {
        return Err("--san: at least one name, none empty".into());
    }
    if a.leaves.is_empty()
        || a.leaves.iter().any(|l| {
            l.is_empty()
                || l.len() > 64
                || !l
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
    {
        return Err("--leaves: names of letters, digits, '-' and '_'".into());
    }
    if !(1..=3650).contains(&a.days) {
        return Err("--days must be between 1 and 3650".into());
    }
    if a.token_sub.is_some() && a.jwt == JwtAlg::None {
        return Err("--token-sub needs a signing key (--jwt rs256 or es256)".into());
    }
    if !(1..=10 * 365 * 86_400).contains(&a.token_ttl) {
        return Err("--token-ttl must be between 1 second and 10 years".into());
    }
    std::fs::create_dir_all(&a.out).map_err(|e| format!("creating {}: {e}", a.out.display()))?;
    let mut files = Vec::new();
    let mut put = |name: &str, bytes: &[u8], private: bool| -> Result<(), String> {
        let path = a.out.join(name);
        write_file(&path, bytes, private)?;
        files.push(path.display().to_string());
        Ok(())
    };

    // Certificates.
    let not_before = SystemTime::now() - Duration::from_secs(3600);
    let not_after = SystemTime::now() + Duration::from_secs(u64::from(a.days) * 86_400);
    let mut server = CertificateParams::new(a.san.clone()).map_err(|e| format!("--san: {e}"))?;
    server.distinguished_name = rcgen::DistinguishedName::new();
    server
        .distinguished_name
        .push(DnType::CommonName, a.san[0].as_str());
    server.is_ca = IsCa::ExplicitNoCa;
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.not_before = not_before.into();
    server.not_after = not_after.into();
    let issuer = if a.self_signed {
        None
    } else {
        let mut ca = CertificateParams::default();
        ca.distinguished_name = rcgen::DistinguishedName::new();
        ca.distinguished_name
            .push(DnType::CommonName, "ws-loadgen test CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca.not_before = not_before.into();
        ca.not_after = not_after.into();
        let ca_key = KeyPair::generate().map_err(|e| format!("generating a key: {e}"))?;
        let ca_cert = ca
            .self_signed(&ca_key)
            .map_err(|e| format!("the CA: {e}"))?;
        put("ca.pem", ca_cert.pem().as_bytes(), false)?;
        put("ca.key", ca_key.serialize_pem().as_bytes(), true)?;
        server.use_authority_key_identifier_extension = true;
        Some(Issuer::new(ca, ca_key))
    };
    for leaf in &a.leaves {
        let server_key = KeyPair::generate().map_err(|e| format!("generating a key: {e}"))?;
        let server_cert = match &issuer {
            None => server.self_signed(&server_key),
            Some(issuer) => server.signed_by(&server_key, issuer),
        }
        .map_err(|e| format!("the server certificate: {e}"))?;
        put(&format!("{leaf}.pem"), server_cert.pem().as_bytes(), false)?;
        put(
            &format!("{leaf}.key"),
            server_key.serialize_pem().as_bytes(),
            true,
        )?;
    }

    // The JWT signing key, its public key, its JWKS and the token.
    let pkcs8_pem = match a.jwt {
        JwtAlg::Rs256 => Some(RSA_TEST_KEY.to_vec()),
        JwtAlg::Es256 => {
            let der = EcdsaKeyPair::generate_pkcs8(
                &ECDSA_P256_SHA256_FIXED_SIGNING,
                &SystemRandom::new(),
            )
            .map_err(|e| format!("generating a key: {e}"))?;
            Some(pem("PRIVATE KEY", der.as_ref()).into_bytes())
        }
        JwtAlg::None => None,
    };
    if let Some(pkcs8_pem) = pkcs8_pem {
        let key = Key::from_pkcs8_pem_or_der(&pkcs8_pem)?;
        let jwks = json!({"keys": [key.jwk(&a.kid)]}).to_string();
        let public = pem("PUBLIC KEY", &spki(&key));
        put("jwt.key", &pkcs8_pem, true)?;
        put("jwt.pub.pem", public.as_bytes(), false)?;
        std::fs::create_dir_all(a.out.join("jwks"))
            .map_err(|e| format!("creating {}: {e}", a.out.join("jwks").display()))?;
        put("jwks/jwks.json", jwks.as_bytes(), false)?;
        if let Some(sub) = &a.token_sub {
            let signer = Signer::new(key, &a.kid, a.token_iss.clone(), a.token_aud.clone());
            let now = unix_now();
            let token = signer.sign(json!({"sub": sub, "iat": now, "exp": now + a.token_ttl}))?;
            put("token", format!("{token}\n").as_bytes(), true)?;
        }
    }

    // The admin secret.
    let mut secret = [0u8; 24];
    SystemRandom::new()
        .fill(&mut secret)
        .map_err(|_| "no randomness for the admin token".to_owned())?;
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    put("admin-token", format!("{hex}\n").as_bytes(), true)?;

    Ok(json!({
        "mode": "pki",
        "dir": a.out.display().to_string(),
        "san": a.san,
        "self_signed": a.self_signed,
        "jwt": a.jwt.to_possible_value().map(|v| v.get_name().to_owned()),
        "kid": a.kid,
        "files": files,
    }))
}

/// The key's public half as a DER SubjectPublicKeyInfo. ring gives an RSA key's public half as a PKCS#1
/// `RSAPublicKey`, which is wrapped here: `SEQUENCE { rsaEncryption, BIT STRING { RSAPublicKey } }`.
fn spki(key: &Key) -> Vec<u8> {
    match key {
        Key::Es256(pair) => {
            // `SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING { point } }`, the point 65 bytes.
            let mut der = vec![
                0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06,
                0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
            ];
            der.extend_from_slice(pair.public_key().as_ref());
            der
        }
        Key::Rs256(pair) => {
            let rsa = pair.public_key().as_ref();
            let mut bits = vec![0u8];
            bits.extend_from_slice(rsa);
            let mut body = RSA_ENCRYPTION.to_vec();
            body.extend(tlv(0x03, &bits));
            tlv(0x30, &body)
        }
    }
}

/// One DER tag-length-value.
fn tlv(tag: u8, value: &[u8]) -> Vec<u8> {
    let len = value.len();
    let mut out = vec![tag];
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(value);
    out
}

/// PEM with 64-character lines.
fn pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Writes `bytes` to `path`; a private file is mode 0600, also when it was there before.
fn write_file(path: &Path, bytes: &[u8], private: bool) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mode = if private { 0o600 } else { 0o644 };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(|e| format!("creating {}: {e}", path.display()))?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("chmod {}: {e}", path.display()))?;
    f.write_all(bytes)
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use clap::Parser;
    use rustls::client::danger::ServerCertVerifier;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
    use ws_gateway::auth::jwks::KeySet;
    use ws_gateway::auth::jwt::{check_claims, parse, Policy};
    use ws_gateway::auth::Algorithm;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        pki: PkiArgs,
    }

    /// Runs `pki` with `args` into a fresh directory.
    fn run(tag: &str, args: &[&str]) -> (PathBuf, Value) {
        let dir = std::env::temp_dir().join(format!("ws-loadgen-pki-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let out = dir.display().to_string();
        let mut argv = vec!["pki", "--out", out.as_str()];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).expect("arguments");
        let result = pki(&cli.pki).expect("pki");
        (dir, result)
    }

    /// Whether `cert` verifies for `name` against the roots in `ca` (rustls's webpki verifier).
    fn verifies(ca: &Path, cert: &Path, name: &str) -> Result<(), rustls::Error> {
        let roots = ws_gateway::tls::load_ca_file(ca).expect("roots");
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .expect("verifier");
        let leaf = CertificateDer::from_pem_file(cert).expect("leaf");
        let name = ServerName::try_from(name.to_owned()).expect("name");
        verifier
            .verify_server_cert(&leaf, &[], &name, &[], UnixTime::now())
            .map(|_| ())
    }

    /// Verifies `token` as the gateway does (structure, signature against the JWKS, claims) and returns its `sub`.
    fn gateway_verifies(
        dir: &Path,
        token: &str,
        alg: Algorithm,
        iss: Option<&str>,
        aud: &[&str],
    ) -> Option<String> {
        let policy = Policy {
            issuer: iss.map(str::to_owned),
            audiences: aud.iter().map(|s| (*s).to_owned()).collect(),
            algorithms: vec![alg],
            leeway: 0,
            max_bytes: 8192,
            forward_claims: Vec::new(),
            required_typ: None,
            limit_claim: None,
            identity_claims: Vec::new(),
            collect_roles: false,
        };
        let jwks = std::fs::read(dir.join("jwks/jwks.json")).expect("jwks");
        let keys = KeySet::from_json(&jwks).expect("a usable JWKS");
        let parsed = parse(token, &policy).expect("token structure");
        let key = keys
            .find(parsed.kid.as_deref(), parsed.alg)
            .expect("the kid is in the JWKS");
        assert!(
            key.verify(
                parsed.alg,
                parsed.signing_input.as_bytes(),
                &parsed.signature
            ),
            "the signature verifies against the JWKS"
        );
        check_claims(&parsed.payload, &policy, unix_now())
            .expect("claims")
            .subject
    }

    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777
    }

    #[test]
    fn rs256_defaults_for_the_benchmark() {
        let (dir, result) = run(
            "rs",
            &[
                "--kid",
                "bench",
                "--token-sub",
                "bench-user",
                "--token-ttl",
                "86400",
            ],
        );
        assert_eq!(result["jwt"], "rs256");
        // The server certificate verifies against the CA for its names and no other.
        for name in ["localhost", "127.0.0.1"] {
            verifies(&dir.join("ca.pem"), &dir.join("server.pem"), name).expect(name);
        }
        assert!(verifies(&dir.join("ca.pem"), &dir.join("server.pem"), "example.com").is_err());
        // ... and not against itself: it is not self-signed.
        assert!(verifies(
            &dir.join("server.pem"),
            &dir.join("server.pem"),
            "localhost"
        )
        .is_err());
        // The gateway loads the pair (the key matches the certificate).
        ws_gateway::tls::load_certified_key(&dir.join("server.pem"), &dir.join("server.key"))
            .expect("pair");
        // The token verifies against the JWKS as the gateway verifies it.
        let token = std::fs::read_to_string(dir.join("token")).expect("token");
        assert_eq!(
            gateway_verifies(&dir, token.trim(), Algorithm::RS256, None, &[]).as_deref(),
            Some("bench-user")
        );
        // The JWKS publishes the checked-in key with e = 65537.
        let jwks: Value =
            serde_json::from_slice(&std::fs::read(dir.join("jwks/jwks.json")).expect("jwks"))
                .expect("json");
        assert_eq!(jwks["keys"][0]["e"], "AQAB");
        assert_eq!(jwks["keys"][0]["kid"], "bench");
        assert_eq!(
            std::fs::read(dir.join("jwt.key")).expect("key"),
            RSA_TEST_KEY
        );
        // The public PEM is the SubjectPublicKeyInfo of every RSA-2048 key with e = 65537: the fixed header, then
        // ring's RSAPublicKey.
        let public = std::fs::read_to_string(dir.join("jwt.pub.pem")).expect("public");
        let body: String = public.lines().filter(|l| !l.starts_with("-----")).collect();
        assert!(
            public.starts_with("-----BEGIN PUBLIC KEY-----\n")
                && public.ends_with("-----END PUBLIC KEY-----\n")
        );
        assert!(public.lines().all(|l| l.len() <= 64));
        let der = STANDARD.decode(body).expect("base64");
        let Key::Rs256(pair) = Key::from_pkcs8_pem_or_der(RSA_TEST_KEY).expect("key") else {
            panic!("an RSA key")
        };
        let header: &[u8] = &[
            0x30, 0x82, 0x01, 0x22, 0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d,
            0x01, 0x01, 0x01, 0x05, 0x00, 0x03, 0x82, 0x01, 0x0f, 0x00,
        ];
        assert_eq!(&der[..header.len()], header);
        assert_eq!(&der[header.len()..], pair.public_key().as_ref());
        // Private files are 0600; the admin secret is 48 hex digits.
        for f in ["ca.key", "server.key", "jwt.key", "token", "admin-token"] {
            assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
        }
        let secret = std::fs::read_to_string(dir.join("admin-token")).expect("admin token");
        assert_eq!(secret.trim().len(), 48);
        assert!(secret.trim().bytes().all(|b| b.is_ascii_hexdigit()));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn es256_self_signed_with_names_and_claims() {
        let (dir, _) = run(
            "es",
            &[
                "--jwt",
                "es256",
                "--kid",
                "churn",
                "--self-signed",
                "--san",
                "gw.test,10.0.0.1",
                "--token-sub",
                "u1",
                "--token-iss",
                "iss",
                "--token-aud",
                "aud",
            ],
        );
        assert!(!dir.join("ca.pem").exists() && !dir.join("ca.key").exists());
        // A self-signed certificate is its own trust anchor.
        verifies(&dir.join("server.pem"), &dir.join("server.pem"), "gw.test").expect("gw.test");
        verifies(&dir.join("server.pem"), &dir.join("server.pem"), "10.0.0.1").expect("10.0.0.1");
        assert!(verifies(
            &dir.join("server.pem"),
            &dir.join("server.pem"),
            "localhost"
        )
        .is_err());
        ws_gateway::tls::load_certified_key(&dir.join("server.pem"), &dir.join("server.key"))
            .expect("pair");
        let token = std::fs::read_to_string(dir.join("token")).expect("token");
        assert_eq!(
            gateway_verifies(&dir, token.trim(), Algorithm::ES256, Some("iss"), &["aud"])
                .as_deref(),
            Some("u1")
        );
        // `churn --signing-key` loads the key and mints tokens the JWKS verifies.
        let signer = Signer::load(&dir.join("jwt.key"), "churn", None, None).expect("load");
        let minted = signer.token("u2", "j2", unix_now() + 60).expect("sign");
        assert_eq!(
            gateway_verifies(&dir, &minted, Algorithm::ES256, None, &[]).as_deref(),
            Some("u2")
        );
        // The public key PEM holds the JWK's point.
        let public = std::fs::read_to_string(dir.join("jwt.pub.pem")).expect("public");
        let body: String = public.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = STANDARD.decode(body).expect("base64");
        assert_eq!(der.len(), 91);
        let jwks: Value =
            serde_json::from_slice(&std::fs::read(dir.join("jwks/jwks.json")).expect("jwks"))
                .expect("json");
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(jwks["keys"][0]["x"].as_str().expect("x"))
            .expect("x");
        assert_eq!(&der[27..59], &x[..]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn no_jwt_key_writes_the_tls_pair_and_the_admin_token_only() {
        let (dir, result) = run("none", &["--jwt", "none", "--self-signed"]);
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["admin-token", "server.key", "server.pem"]);
        assert_eq!(result["files"].as_array().map(Vec::len), Some(3));
        let _ = std::fs::remove_dir_all(&dir);
        // A token needs a key; a token option needs --token-sub.
        assert!(Cli::try_parse_from(["pki", "--out", "x", "--token-iss", "i"]).is_err());
        let cli = Cli::try_parse_from(["pki", "--out", "x", "--jwt", "none", "--token-sub", "s"])
            .expect("args");
        assert!(pki(&cli.pki).is_err());
    }

    #[test]
    fn long_der_lengths() {
        assert_eq!(tlv(0x04, &[0; 3]), [0x04, 3, 0, 0, 0]);
        assert_eq!(&tlv(0x04, &[0; 200])[..3], [0x04, 0x81, 200]);
        assert_eq!(&tlv(0x04, &[0; 300])[..4], [0x04, 0x82, 0x01, 0x2c]);
    }
}
