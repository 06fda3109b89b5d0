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
    ck.keys_match().map_err(|e| TlsError::Pair(e.to_string()))?;
    Ok(ck)
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
}

impl ReloadableCert {
    /// A fixed certificate (tests, `--dev`).
    #[must_use]
    pub fn fixed(ck: CertifiedKey) -> Arc<ReloadableCert> {
        Arc::new(ReloadableCert {
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
            current: ArcSwap::from_pointee(ck),
            files: Some((cert.into(), key.into())),
        }))
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
