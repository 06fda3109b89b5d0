//! PEM loading, the server and client TLS configurations, and certificate reload.
//!
//! rustls runs on the ring provider only. The server's certificate sits behind an [`ArcSwap`] in
//! [`ReloadableCert`], so a reload (file change or SIGHUP) affects new handshakes while open sessions keep theirs; a
//! broken new file leaves the old certificate in place.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A certificate or key that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file is unreadable, not PEM, or holds no certificate.
    #[error("certificate {path}: {message}")]
    Cert {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The key file is unreadable, not PEM, or holds no supported key.
    #[error("private key {path}: {message}")]
    Key {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The key does not belong to the certificate, or rustls refused the pair.
    #[error("certificate and key: {0}")]
    Pair(String),
}

impl TlsError {
    /// The setting the error is about, for configuration messages.
    #[must_use]
    pub fn setting(&self) -> &'static str {
        match self {
            TlsError::Cert { .. } => "TLS_CERT_FILE (--tls-cert)",
            TlsError::Key { .. } | TlsError::Pair(_) => "TLS_KEY_FILE (--tls-key)",
        }
    }
}

/// The process-wide crypto provider: ring.
#[must_use]
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads a PEM chain and key (PKCS#8, PKCS#1 or SEC1) and checks that they belong together.
///
/// # Errors
/// See [`TlsError`].
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let cert_err = |message: String| TlsError::Cert {
        path: cert.to_owned(),
        message,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| cert_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    if chain.is_empty() {
        return Err(cert_err("no CERTIFICATE block found".into()));
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.to_owned(),
        message: e.to_string(),
    })?;
    certified_key(chain, der)
}

/// Builds a [`CertifiedKey`] from DER parts, checking that the key matches the leaf.
///
/// # Errors
/// An unsupported key, or a key that does not match the certificate.
pub fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<CertifiedKey, TlsError> {
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::Pair(e.to_string()))?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match().map_err(|e| match e {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
            TlsError::Pair("the private key does not match the certificate".into())
        }
        other => TlsError::Pair(other.to_string()),
    })?;
    Ok(ck)
}

/// The validity period of a DER certificate, as `(notBefore, notAfter)` in seconds since the epoch; `None` when
/// the DER is not a certificate this reader understands. Used to warn about a reloaded certificate that is
/// expired or not yet valid; the bytes come from a file, so every length is checked.
#[must_use]
pub fn validity(der: &[u8]) -> Option<(i64, i64)> {
    let (_, validity) = tbs_after_issuer(der)?;
    let (0x30, validity, _) = tlv(validity)? else {
        return None;
    };
    let (t1, before, rest) = tlv(validity)?;
    let (t2, after, _) = tlv(rest)?;
    Some((asn1_time(t1, before)?, asn1_time(t2, after)?))
}

/// Most names read from one certificate's subjectAltName.
const MAX_SAN_NAMES: usize = 1_000;

/// The DNS names (lowercased) and IP addresses of a DER certificate's subjectAltName extension; `None` when the
/// DER is not a certificate this reader understands, an empty list when it has no such extension. Used to warn
/// about a reloaded certificate that no longer covers a name served before.
#[must_use]
pub fn subject_alt_names(der: &[u8]) -> Option<Vec<String>> {
    let (_, rest) = tbs_after_issuer(der)?;
    let rest = tlv(rest)?.2; // validity
    let rest = tlv(rest)?.2; // subject
    let mut rest = tlv(rest)?.2; // subjectPublicKeyInfo
    let mut names = Vec::new();
    while !rest.is_empty() {
        let (tag, body, next) = tlv(rest)?;
        rest = next;
        if tag != 0xa3 {
            continue; // issuerUniqueID, subjectUniqueID
        }
        let (0x30, mut exts, _) = tlv(body)? else {
            return None;
        };
        while !exts.is_empty() {
            let (0x30, ext, next) = tlv(exts)? else {
                return None;
            };
            exts = next;
            let (0x06, oid, mut ext) = tlv(ext)? else {
                return None;
            };
            if oid != [0x55, 0x1d, 0x11] {
                continue;
            }
            if let (0x01, _, after) = tlv(ext)? {
                ext = after; // critical
            }
            let (0x04, value, _) = tlv(ext)? else {
                return None;
            };
            let (0x30, mut general, _) = tlv(value)? else {
                return None;
            };
            while !general.is_empty() && names.len() < MAX_SAN_NAMES {
                let (tag, name, next) = tlv(general)?;
                general = next;
                match (tag, name.len()) {
                    (0x82, _) => names.push(String::from_utf8_lossy(name).to_ascii_lowercase()),
                    (0x87, 4) => names.push(
                        std::net::Ipv4Addr::from(<[u8; 4]>::try_from(name).ok()?).to_string(),
                    ),
                    (0x87, 16) => names.push(
                        std::net::Ipv6Addr::from(<[u8; 16]>::try_from(name).ok()?).to_string(),
                    ),
                    _ => {}
                }
            }
        }
    }
    Some(names)
}

/// Whether a certificate for `names` is valid for `name`: the same name, or a wildcard `*.domain` for a name
/// exactly one label below `domain` (or the same wildcard).
#[must_use]
pub fn covers(names: &[String], name: &str) -> bool {
    names.iter().any(|n| {
        n == name
            || n.strip_prefix("*.").is_some_and(|domain| {
                name.split_once('.').is_some_and(|(label, rest)| {
                    !label.is_empty() && label != "*" && rest == domain
                })
            })
    })
}

/// One DER element: (tag, contents, rest). Every length is checked: the bytes come from a file.
fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, b) = b.split_first()?;
    let (&first, mut b) = b.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || b.len() < n {
            return None;
        }
        let len = b[..n]
            .iter()
            .fold(0usize, |acc, x| (acc << 8) | usize::from(*x));
        b = &b[n..];
        len
    };
    (b.len() >= len).then(|| (tag, &b[..len], &b[len..]))
}

/// The TBSCertificate's fields from `validity` on: (the TBSCertificate, what follows the issuer).
fn tbs_after_issuer(der: &[u8]) -> Option<(&[u8], &[u8])> {
    let (0x30, cert, _) = tlv(der)? else {
        return None;
    };
    let (0x30, tbs, _) = tlv(cert)? else {
        return None;
    };
    let (tag, _, mut rest) = tlv(tbs)?;
    if tag == 0xa0 {
        rest = tlv(rest)?.2; // the serial number follows an explicit version
    }
    let rest = tlv(rest)?.2; // signature algorithm
    let rest = tlv(rest)?.2; // issuer
    Some((tbs, rest))
}

/// The subjectAltName entries of a certified key's leaf (none when unreadable).
fn leaf_names(ck: &CertifiedKey) -> Vec<String> {
    ck.cert
        .first()
        .and_then(|c| subject_alt_names(c.as_ref()))
        .unwrap_or_default()
}

/// UTCTime (`YYMMDDHHMMSSZ`, tag 0x17) or GeneralizedTime (`YYYYMMDDHHMMSSZ`, tag 0x18) as Unix seconds.
fn asn1_time(tag: u8, text: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(text).ok()?.strip_suffix('Z')?;
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let num = |r: std::ops::Range<usize>| text.get(r)?.parse::<i64>().ok();
    let (year, at) = match (tag, text.len()) {
        (0x17, 12) => {
            let yy = num(0..2)?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, 2)
        }
        (0x18, 14) => (num(0..4)?, 4),
        _ => return None,
    };
    let (month, day) = (num(at..at + 2)?, num(at + 2..at + 4)?);
    let (h, m, s) = (
        num(at + 4..at + 6)?,
        num(at + 6..at + 8)?,
        num(at + 8..at + 10)?,
    );
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || h > 23 || m > 59 || s > 60 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + m * 60 + s)
}

/// Reads extra trust anchors from a PEM file.
///
/// # Errors
/// Unreadable file, no certificate, or a certificate rustls cannot use as an anchor.
pub fn load_ca_file(path: &Path) -> Result<rustls::RootCertStore, String> {
    let mut store = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no CERTIFICATE block found", path.display()));
    }
    for c in certs {
        store
            .add(c)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(store)
}

/// A client configuration trusting the webpki roots plus an optional extra CA file.
///
/// # Errors
/// The CA file cannot be loaded.
pub fn client_config(extra_ca: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = extra_ca {
        roots.roots.extend(load_ca_file(path)?.roots);
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Modification time, size and resolved path of one file.
pub type FileStamp = (Option<SystemTime>, u64, Option<PathBuf>);

/// The server certificate in use, swappable while handshakes run.
#[derive(Debug)]
pub struct ReloadableCert {
    current: ArcSwap<CertifiedKey>,
    files: Option<(PathBuf, PathBuf)>,
    /// The names of the certificate loaded at start: a reload that drops one is warned about.
    names: Vec<String>,
}

impl ReloadableCert {
    /// A fixed certificate (tests, `--dev`).
    #[must_use]
    pub fn fixed(ck: CertifiedKey) -> Arc<ReloadableCert> {
        Arc::new(ReloadableCert {
            names: leaf_names(&ck),
            current: ArcSwap::from_pointee(ck),
            files: None,
        })
    }

    /// Loads the files now and remembers them for [`ReloadableCert::reload`].
    ///
    /// # Errors
    /// As for [`load_certified_key`].
    pub fn from_files(cert: &Path, key: &Path) -> Result<Arc<ReloadableCert>, TlsError> {
        let ck = load_certified_key(cert, key)?;
        Ok(Arc::new(ReloadableCert {
            names: leaf_names(&ck),
            current: ArcSwap::from_pointee(ck),
            files: Some((cert.into(), key.into())),
        }))
    }

    /// The validity period of the leaf being served (see [`validity`]).
    #[must_use]
    pub fn leaf_validity(&self) -> Option<(i64, i64)> {
        let ck = self.current.load();
        validity(ck.cert.first()?.as_ref())
    }

    /// The names the certificate served at start covered and the one served now does not.
    #[must_use]
    pub fn uncovered_names(&self) -> Vec<String> {
        let now = leaf_names(&self.current.load());
        self.names
            .iter()
            .filter(|n| !covers(&now, n))
            .cloned()
            .collect()
    }

    /// Reads the files again; on error the current certificate stays.
    ///
    /// # Errors
    /// As for [`load_certified_key`]; nothing changes then.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let Some((cert, key)) = &self.files else {
            return Ok(false);
        };
        let ck = load_certified_key(cert, key)?;
        self.current.store(Arc::new(ck));
        Ok(true)
    }

    /// A fingerprint of the files (modification time, size, resolved path) to notice symlink swaps.
    #[must_use]
    pub fn stamp(&self) -> Option<Vec<FileStamp>> {
        let (cert, key) = self.files.as_ref()?;
        Some(
            [cert, key]
                .iter()
                .map(|p| {
                    let meta = std::fs::metadata(p).ok();
                    (
                        meta.as_ref().and_then(|m| m.modified().ok()),
                        meta.map_or(0, |m| m.len()),
                        std::fs::canonicalize(p).ok(),
                    )
                })
                .collect(),
        )
    }

    /// Polls the files every `period` and reloads when they change (cert-manager and kubelet swap a symlink).
    pub async fn watch(
        self: Arc<Self>,
        period: Duration,
        on_result: impl Fn(Result<bool, TlsError>) + Send + 'static,
    ) {
        let mut last = self.stamp();
        if last.is_none() {
            return;
        }
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = self.stamp();
            if now != last {
                last = now;
                on_result(self.reload());
            }
        }
    }
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The listener's TLS configuration: TLS 1.2 and 1.3, ALPN `http/1.1`, certificate from `cert`.
///
/// # Errors
/// rustls refuses the protocol versions (cannot happen with ring).
pub fn server_config(cert: Arc<ReloadableCert>) -> Result<Arc<rustls::ServerConfig>, String> {
    // AES-128-GCM with SHA-256 first: the TLS 1.3 key schedule then runs on SHA-256, which has hardware support
    // (SHA-NI) where SHA-384 has none, and AES-128 encrypts faster. The server's order decides.
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.sort_by_key(|s| {
        let name = format!("{:?}", s.suite());
        (!name.contains("AES_128_GCM"), !name.contains("SHA256"))
    });
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.ignore_client_order = true;
    // Stateless resumption tickets: reconnect storms resume instead of paying a full handshake, without a
    // server-side cache. One ticket per handshake is enough for a WebSocket client that reconnects one at a time.
    config.ticketer = rustls::crypto::ring::Ticketer::new().map_err(|e| e.to_string())?;
    config.send_tls13_tickets = 1;
    Ok(Arc::new(config))
}

/// A self-signed certificate for `names`, made in memory (`--dev` and tests).
///
/// # Errors
/// rcgen fails to generate the key or certificate.
pub fn self_signed(names: &[&str]) -> Result<(CertifiedKey, String), String> {
    let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(names).map_err(|e| e.to_string())?;
    let pem = cert.pem();
    let key = PrivateKeyDer::try_from(signing_key.serialize_der()).map_err(|e| e.to_string())?;
    let ck = certified_key(vec![cert.der().clone()], key).map_err(|e| e.to_string())?;
    Ok((ck, pem))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validity_of_utc_and_generalized_times() {
        let mut params = rcgen::CertificateParams::new(vec!["gw.example".into()]).expect("params");
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        // 2050 and later are GeneralizedTime.
        params.not_after = rcgen::date_time_ymd(2055, 6, 30);
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("cert");
        assert_eq!(validity(cert.der()), Some((1_577_836_800, 2_697_926_400)));
        assert_eq!(validity(b""), None);
        assert_eq!(validity(&cert.der()[..40]), None);
        assert_eq!(validity(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
    }

    #[test]
    fn subject_alt_names_and_what_covers_them() {
        let mut params = rcgen::CertificateParams::new(vec![
            "GW.example".into(),
            "*.ws.example".into(),
            "127.0.0.1".into(),
            "::1".into(),
        ])
        .expect("params");
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("cert");
        let names = subject_alt_names(cert.der()).expect("readable");
        assert_eq!(names, ["gw.example", "*.ws.example", "127.0.0.1", "::1"]);
        assert!(covers(&names, "gw.example"));
        assert!(covers(&names, "a.ws.example"));
        assert!(covers(&names, "*.ws.example"));
        assert!(
            !covers(&names, "a.b.ws.example"),
            "a wildcard covers one label"
        );
        assert!(!covers(&names, "ws.example"));
        assert!(!covers(&names, "other.example"));
        assert_eq!(subject_alt_names(b""), None);
        assert_eq!(subject_alt_names(&cert.der()[..60]), None);
        let bare = rcgen::CertificateParams::default()
            .self_signed(&key)
            .expect("no SAN");
        assert_eq!(subject_alt_names(bare.der()), Some(Vec::new()));
    }

    #[test]
    fn a_mismatched_key_is_named_plainly() {
        let a = rcgen::generate_simple_self_signed(vec!["a".into()]).expect("a");
        let b = rcgen::KeyPair::generate().expect("b");
        let key = PrivateKeyDer::try_from(b.serialize_der()).expect("der");
        let err = certified_key(vec![a.cert.der().clone()], key).expect_err("mismatch");
        assert!(
            err.to_string()
                .contains("the private key does not match the certificate"),
            "{err}"
        );
    }
}
