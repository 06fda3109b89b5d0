//! Test harness: certificates made at test time, a real JWKS HTTP server, real WebSocket upstreams (tungstenite,
//! an implementation independent of the gateway's), and the real `ws-gateway` binary as a child process.
//! Every await is bounded by [`T`].

#![allow(dead_code)]

pub mod mosquitto;
pub mod mqtt;
pub mod stores;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// The bound on every await in the tests.
pub const T: Duration = Duration::from_secs(10);

pub const ISSUER: &str = "https://idp.test/realms/demo";
pub const AUDIENCE: &str = "ws-gateway";
pub const JWKS_PATH: &str = "/realms/demo/protocol/openid-connect/certs";

/// Awaits `f` for at most [`T`].
pub async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(T, f).await.expect("timed out")
}

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "wsgw-{tag}-{}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .expect("clock")
                .subsec_nanos()
        ));
        std::fs::create_dir_all(&p).expect("mkdir");
        TempDir(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A test CA with leaf certificates for the gateway and a wss upstream.
pub struct Pki {
    pub dir: TempDir,
    ca_key: rcgen::KeyPair,
    ca_params: rcgen::CertificateParams,
    pub ca_pem: PathBuf,
    pub gw_cert: PathBuf,
    pub gw_key: PathBuf,
    pub up_cert: PathBuf,
    pub up_key: PathBuf,
    pub client: Arc<rustls::ClientConfig>,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = TempDir::new("pki");
        let ca_key = rcgen::KeyPair::generate().expect("ca key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "ws-gateway test CA");
        let ca = ca_params.self_signed(&ca_key).expect("ca");
        let ca_pem = dir.path("ca.pem");
        std::fs::write(&ca_pem, ca.pem()).expect("write ca");
        let mut pki = Pki {
            gw_cert: dir.path("gw.pem"),
            gw_key: dir.path("gw-key.pem"),
            up_cert: dir.path("up.pem"),
            up_key: dir.path("up-key.pem"),
            dir,
            ca_key,
            ca_params,
            ca_pem,
            client: Arc::new(
                rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
            ),
        };
        let (gc, gk) = (pki.gw_cert.clone(), pki.gw_key.clone());
        pki.issue(&gc, &gk, 1);
        let (uc, uk) = (pki.up_cert.clone(), pki.up_key.clone());
        pki.issue(&uc, &uk, 2);
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&pki.ca_pem).expect("ca") {
            roots.add(c.expect("cert")).expect("add");
        }
        pki.client = Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
        );
        pki
    }

    /// Writes a leaf for localhost/127.0.0.1 with `serial`, signed by the CA.
    pub fn issue(&self, cert: &Path, key: &Path, serial: u64) {
        self.issue_for(cert, key, serial, &["localhost", "127.0.0.1"]);
    }

    /// Writes a leaf for `names` with `serial`, signed by the CA.
    pub fn issue_for(&self, cert: &Path, key: &Path, serial: u64, names: &[&str]) {
        let leaf_key = rcgen::KeyPair::generate().expect("leaf key");
        let mut params = rcgen::CertificateParams::new(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        )
        .expect("params");
        params.serial_number = Some(rcgen::SerialNumber::from(serial));
        let issuer = rcgen::Issuer::from_params(&self.ca_params, &self.ca_key);
        let leaf = params.signed_by(&leaf_key, &issuer).expect("sign");
        std::fs::write(cert, leaf.pem()).expect("write cert");
        std::fs::write(key, leaf_key.serialize_pem()).expect("write key");
    }
}

/// A JWS signing key of one algorithm.
pub enum Key {
    Rsa(
        Arc<RsaKeyPair>,
        &'static dyn signature::RsaEncoding,
        &'static str,
    ),
    Ec(EcdsaKeyPair, &'static str),
    Ed(Ed25519KeyPair),
}

/// The RSA test key, checked in (ring cannot generate RSA keys, and the suite needs no openssl binary). It signs
/// test tokens only.
fn rsa_key() -> Arc<RsaKeyPair> {
    static KEY: OnceLock<Arc<RsaKeyPair>> = OnceLock::new();
    Arc::clone(KEY.get_or_init(|| {
        let pem = include_bytes!("../keys/rsa-2048-test-only.pem");
        let der = PrivateKeyDer::from_pem_slice(pem).expect("PKCS#8 PEM");
        Arc::new(RsaKeyPair::from_pkcs8(der.secret_der()).expect("RSA key"))
    }))
}

pub struct Signer {
    pub kid: String,
    pub key: Key,
    rng: SystemRandom,
}

impl Signer {
    pub fn rs256(kid: &str) -> Signer {
        Signer {
            kid: kid.into(),
            key: Key::Rsa(rsa_key(), &signature::RSA_PKCS1_SHA256, "RS256"),
            rng: SystemRandom::new(),
        }
    }
    pub fn ps256(kid: &str) -> Signer {
        Signer {
            kid: kid.into(),
            key: Key::Rsa(rsa_key(), &signature::RSA_PSS_SHA256, "PS256"),
            rng: SystemRandom::new(),
        }
    }
    pub fn es256(kid: &str) -> Signer {
        let rng = SystemRandom::new();
        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pk = EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("gen");
        Signer {
            kid: kid.into(),
            key: Key::Ec(
                EcdsaKeyPair::from_pkcs8(alg, pk.as_ref(), &rng).expect("ec"),
                "ES256",
            ),
            rng,
        }
    }
    pub fn eddsa(kid: &str) -> Signer {
        let rng = SystemRandom::new();
        let pk = Ed25519KeyPair::generate_pkcs8(&rng).expect("gen");
        Signer {
            kid: kid.into(),
            key: Key::Ed(Ed25519KeyPair::from_pkcs8(pk.as_ref()).expect("ed")),
            rng,
        }
    }

    pub fn alg(&self) -> &'static str {
        match &self.key {
            Key::Rsa(_, _, a) | Key::Ec(_, a) => a,
            Key::Ed(_) => "EdDSA",
        }
    }

    /// The public JWK, with `alg` and `use: sig`.
    pub fn jwk(&self) -> Value {
        match &self.key {
            Key::Rsa(k, _, alg) => {
                let c = signature::RsaPublicKeyComponents::<Vec<u8>>::from(k.public());
                json!({"kty":"RSA","kid":self.kid,"use":"sig","alg":alg,"n":URL_SAFE_NO_PAD.encode(&c.n),"e":URL_SAFE_NO_PAD.encode(&c.e)})
            }
            Key::Ec(k, alg) => {
                let p = k.public_key().as_ref();
                json!({"kty":"EC","kid":self.kid,"use":"sig","alg":alg,"crv":"P-256",
                       "x":URL_SAFE_NO_PAD.encode(&p[1..33]),"y":URL_SAFE_NO_PAD.encode(&p[33..65])})
            }
            Key::Ed(k) => {
                json!({"kty":"OKP","kid":self.kid,"use":"sig","alg":"EdDSA","crv":"Ed25519",
                                 "x":URL_SAFE_NO_PAD.encode(k.public_key().as_ref())})
            }
        }
    }

    pub fn sign_raw(&self, input: &str) -> Vec<u8> {
        match &self.key {
            Key::Rsa(k, enc, _) => {
                let mut sig = vec![0u8; k.public().modulus_len()];
                k.sign(*enc, &self.rng, input.as_bytes(), &mut sig)
                    .expect("rsa sign");
                sig
            }
            Key::Ec(k, _) => k
                .sign(&self.rng, input.as_bytes())
                .expect("ec sign")
                .as_ref()
                .to_vec(),
            Key::Ed(k) => k.sign(input.as_bytes()).as_ref().to_vec(),
        }
    }

    /// Signs with an explicit header.
    pub fn sign(&self, header: &Value, claims: &Value) -> String {
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = self.sign_raw(&input);
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
    }

    /// A token with the standard header and `claims`.
    pub fn token(&self, claims: &Value) -> String {
        self.sign(
            &json!({"alg": self.alg(), "typ": "JWT", "kid": self.kid}),
            claims,
        )
    }

    /// A valid token for `sub`, expiring in `secs`.
    pub fn valid(&self, sub: &str, secs: i64) -> String {
        self.token(&claims(sub, secs))
    }
}

pub fn claims(sub: &str, secs: i64) -> Value {
    let n = now();
    json!({"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "iat": n, "exp": n + secs, "jti": format!("{sub}-{n}-{secs}")})
}

/// How the fake identity provider answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdpMode {
    Ok,
    /// Accepts and closes at once.
    Down,
    /// Answers after a delay.
    Slow(Duration),
    /// 200 with a body that is not JSON.
    Garbage,
    /// These exact bytes, then close (hostile responses).
    Raw(&'static [u8]),
}

struct IdpState {
    keys: Vec<Value>,
    mode: IdpMode,
    hits: usize,
}

/// A JWKS HTTP server (real sockets, HTTP/1.1, chunked responses like Keycloak behind some proxies).
pub struct Idp {
    pub addr: SocketAddr,
    pub url: String,
    state: Arc<Mutex<IdpState>>,
}

impl Idp {
    pub async fn start(keys: Vec<Value>) -> Idp {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind idp");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(IdpState {
            keys,
            mode: IdpMode::Ok,
            hits: 0,
        }));
        let st = Arc::clone(&state);
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let st = Arc::clone(&st);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tcp.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    let (mode, body) = {
                        let mut s = st.lock().expect("lock");
                        s.hits += 1;
                        (s.mode, json!({"keys": s.keys}).to_string())
                    };
                    let head = String::from_utf8_lossy(&got).into_owned();
                    let path = head.split(' ').nth(1).unwrap_or("").to_owned();
                    if path.ends_with("/.well-known/openid-configuration") {
                        let base = format!("http://{addr}/realms/demo");
                        let doc = json!({"issuer": base, "jwks_uri": format!("http://{addr}{JWKS_PATH}")})
                            .to_string();
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{doc}",
                            doc.len()
                        );
                        let _ = tcp.write_all(resp.as_bytes()).await;
                        return;
                    }
                    if path == "/redirect" {
                        let resp = format!(
                            "HTTP/1.1 302 Found\r\nLocation: {JWKS_PATH}\r\nContent-Length: 0\r\n\r\n"
                        );
                        let _ = tcp.write_all(resp.as_bytes()).await;
                        return;
                    }
                    match mode {
                        IdpMode::Raw(bytes) => {
                            let _ = tcp.write_all(bytes).await;
                            return;
                        }
                        IdpMode::Down => return,
                        IdpMode::Slow(d) => tokio::time::sleep(d).await,
                        IdpMode::Garbage => {
                            let _ = tcp
                                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n<garbage>")
                                .await;
                            return;
                        }
                        IdpMode::Ok => {}
                    }
                    let half = body.len() / 2;
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{}\r\n{:x}\r\n{}\r\n0\r\n\r\n",
                        half, &body[..half], body.len() - half, &body[half..]
                    );
                    let _ = tcp.write_all(resp.as_bytes()).await;
                });
            }
        });
        Idp {
            addr,
            url: format!("http://{addr}{JWKS_PATH}"),
            state,
        }
    }
    pub fn set_keys(&self, keys: Vec<Value>) {
        self.state.lock().expect("lock").keys = keys;
    }
    pub fn set_mode(&self, mode: IdpMode) {
        self.state.lock().expect("lock").mode = mode;
    }
    pub fn hits(&self) -> usize {
        self.state.lock().expect("lock").hits
    }
}

/// What an upstream saw of one upgrade request.
#[derive(Clone, Debug)]
pub struct Seen {
    pub target: String,
    pub headers: Vec<(String, String)>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn raw(&self) -> String {
        let mut s = self.target.clone();
        for (n, v) in &self.headers {
            s.push_str(&format!("\n{n}: {v}"));
        }
        s
    }
}

/// A WebSocket echo upstream (tungstenite), plain or TLS, recording each request; `tag` is prefixed to text
/// replies' origin so route tests can tell upstreams apart (sent once as the first message).
pub struct Upstream {
    pub addr: SocketAddr,
    pub url: String,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl Upstream {
    pub async fn start(tag: &'static str, tls: Option<&Pki>) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let acceptor = tls.map(|pki| {
            let chain: Vec<_> = CertificateDer::pem_file_iter(&pki.up_cert)
                .expect("cert")
                .map(|c| c.expect("c"))
                .collect();
            let key = PrivateKeyDer::from_pem_file(&pki.up_key).expect("key");
            let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server config");
            tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
        });
        let s = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let s = Arc::clone(&s);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    match acceptor {
                        Some(a) => {
                            if let Ok(tls) = a.accept(tcp).await {
                                echo(tls, s, tag).await;
                            }
                        }
                        None => echo(tcp, s, tag).await,
                    }
                });
            }
        });
        let scheme = if tls.is_some() { "wss" } else { "ws" };
        Upstream {
            addr,
            url: format!("{scheme}://localhost:{}", addr.port()),
            seen,
        }
    }

    pub fn last(&self) -> Seen {
        self.seen
            .lock()
            .expect("lock")
            .last()
            .cloned()
            .expect("a request reached the upstream")
    }
    pub fn count(&self) -> usize {
        self.seen.lock().expect("lock").len()
    }
}

#[allow(clippy::result_large_err)] // tungstenite's callback signature.
async fn echo<S>(stream: S, seen: Arc<Mutex<Vec<Seen>>>, tag: &'static str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let cb = |req: &Request, mut resp: Response| {
        let headers = req
            .headers()
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let offered = req
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        seen.lock().expect("lock").push(Seen {
            target: req.uri().to_string(),
            headers,
        });
        if let Some(first) = offered.as_deref().and_then(|o| o.split(',').next()) {
            resp.headers_mut().insert(
                "sec-websocket-protocol",
                HeaderValue::from_str(first.trim()).expect("hv"),
            );
        }
        Ok(resp)
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, cb).await else {
        return;
    };
    let _ = ws.send(Message::text(format!("hello from {tag}"))).await;
    while let Some(Ok(msg)) = ws.next().await {
        if msg.is_close() {
            return;
        }
        if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
            return;
        }
    }
}

/// The gateway binary as a child process, its JSON log lines collected.
pub struct Gateway {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub logs: Arc<Mutex<Vec<String>>>,
    pub stderr: Arc<Mutex<String>>,
}

impl Gateway {
    pub fn bin() -> &'static str {
        env!("CARGO_BIN_EXE_ws-gateway")
    }

    /// Starts the binary with `args` and `env` (the parent's environment is cleared but for PATH).
    pub fn spawn(args: &[String], env: &[(&str, String)]) -> Gateway {
        let mut cmd = Command::new(Self::bin());
        for flag in ["--listen", "--admin-listen"] {
            if !args.iter().any(|a| a == flag) {
                cmd.args([flag, "127.0.0.1:0"]);
            }
        }
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn ws-gateway");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        let l = Arc::clone(&logs);
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if line.contains("\"event\":\"started\"") {
                    let _ = tx.send(line.clone());
                }
                l.lock().expect("lock").push(line);
            }
        });
        let err = child.stderr.take().expect("stderr");
        let e = Arc::clone(&stderr);
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut s = e.lock().expect("lock");
                s.push_str(&line);
                s.push('\n');
            }
        });
        let Ok(started) = rx.recv_timeout(T) else {
            let _ = child.kill();
            std::thread::sleep(Duration::from_millis(100));
            panic!("gateway did not start: {}", stderr.lock().expect("lock"));
        };
        let v: Value = serde_json::from_str(&started).expect("started line is JSON");
        let addr = v["listen"].as_str().expect("listen").parse().expect("addr");
        let admin = v["admin"].as_str().expect("admin").parse().expect("addr");
        Gateway {
            child,
            addr,
            admin,
            logs,
            stderr,
        }
    }

    /// GET on the admin listener: (status, body).
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        let resp = within(async {
            let mut tcp = TcpStream::connect(self.admin).await.expect("admin connect");
            tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
                .await
                .expect("write");
            let mut out = Vec::new();
            tcp.read_to_end(&mut out).await.expect("read");
            String::from_utf8_lossy(&out).into_owned()
        })
        .await;
        let status = resp
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    pub async fn wait_ready(&self) {
        within(async {
            while self.admin_get("/readyz").await.0 != 200 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().expect("lock").clone()
    }

    /// Waits until a log line contains all of `needles`.
    pub async fn wait_log(&self, needles: &[&str]) -> String {
        within(async {
            loop {
                if let Some(l) = self
                    .logs()
                    .into_iter()
                    .find(|l| needles.iter().all(|n| l.contains(n)))
                {
                    return l;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
    }

    /// Sends `TERM`, `INT` or `HUP` to the gateway process (no `kill` binary needed).
    pub fn signal(&self, sig: &str) {
        let number = match sig {
            "TERM" => libc::SIGTERM,
            "INT" => libc::SIGINT,
            "HUP" => libc::SIGHUP,
            other => panic!("unsupported signal {other}"),
        };
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid");
        // Safety: kill(2) takes plain integers and touches no memory of ours; the pid is our own child's.
        let rc = unsafe { libc::kill(pid, number) };
        assert_eq!(rc, 0, "kill({pid}, {sig})");
    }

    /// Waits for the process to exit, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let start = std::time::Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s;
            }
            assert!(
                start.elapsed() < limit,
                "gateway did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("wss://localhost:{}{path}", self.addr.port())
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The usual setup: PKI, an RS256 signer published by a JWKS server, one echo upstream, and flags for them.
pub struct Env {
    pub pki: Pki,
    pub signer: Signer,
    pub idp: Idp,
    pub upstream: Upstream,
}

impl Env {
    pub async fn new() -> Env {
        let pki = Pki::new();
        let signer = Signer::rs256("rsa-1");
        let idp = Idp::start(vec![signer.jwk()]).await;
        let upstream = Upstream::start("echo", None).await;
        Env {
            pki,
            signer,
            idp,
            upstream,
        }
    }

    /// Flags for TLS, the JWKS, issuer, audience and the fallback upstream.
    pub fn args(&self) -> Vec<String> {
        [
            "--tls-cert",
            self.pki.gw_cert.to_str().expect("p"),
            "--tls-key",
            self.pki.gw_key.to_str().expect("p"),
            "--jwks-url",
            &self.idp.url,
            "--jwt-expected-issuer",
            ISSUER,
            "--jwt-expected-audience",
            AUDIENCE,
            "--upstream-ws-url",
            &self.upstream.url,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    }

    /// Starts a gateway with the usual flags, another fallback upstream and `extra`, and waits for readiness.
    pub async fn gateway_upstream(&self, url: &str, extra: &[&str]) -> Gateway {
        let mut args = self.args();
        let i = args
            .iter()
            .position(|a| a == "--upstream-ws-url")
            .expect("flag");
        args[i + 1] = url.to_owned();
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let gw = Gateway::spawn(&args, &[]);
        gw.wait_ready().await;
        gw
    }

    /// Starts a gateway with the usual flags plus `extra`, and waits for readiness.
    pub async fn gateway(&self, extra: &[&str]) -> Gateway {
        let mut args = self.args();
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let gw = Gateway::spawn(&args, &[]);
        gw.wait_ready().await;
        gw
    }

    pub fn token(&self) -> String {
        self.signer.valid("alice", 300)
    }
}

/// A TLS connection to the gateway, trusting the test CA.
pub async fn tls(pki: &Pki, addr: SocketAddr) -> TlsStream<TcpStream> {
    within(async {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.set_nodelay(true).expect("nodelay");
        let connector = tokio_rustls::TlsConnector::from(Arc::clone(&pki.client));
        connector
            .connect(ServerName::try_from("localhost").expect("name"), tcp)
            .await
            .expect("tls handshake")
    })
    .await
}

/// Sends raw bytes over TLS and reads the whole answer (the gateway closes after a refusal).
pub async fn raw(pki: &Pki, addr: SocketAddr, request: &[u8]) -> String {
    let mut s = tls(pki, addr).await;
    within(async {
        s.write_all(request).await.expect("write");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
}

/// Sends a request over TLS and returns the response head only (the connection stays open until dropped).
pub async fn raw_head(pki: &Pki, addr: SocketAddr, request: &str) -> String {
    let mut s = tls(pki, addr).await;
    within(async {
        s.write_all(request.as_bytes()).await.expect("write");
        let mut out = Vec::new();
        let mut b = [0u8; 1];
        while !out.ends_with(b"\r\n\r\n") {
            if s.read(&mut b).await.expect("read") == 0 {
                break;
            }
            out.push(b[0]);
        }
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
}

/// A complete upgrade request for `path` with `extra` header lines (each ending in CRLF).
pub fn upgrade(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    )
}

pub fn status_of(resp: &str) -> u16 {
    resp.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

pub type Ws = WebSocketStream<TlsStream<TcpStream>>;

/// A WebSocket client (tungstenite) through the gateway with extra headers; `Err(status)` when refused.
pub async fn connect_ws(
    pki: &Pki,
    gw: &Gateway,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Ws, u16> {
    let stream = tls(pki, gw.addr).await;
    let mut req = gw.url(path).into_client_request().expect("request");
    for (n, v) in headers {
        req.headers_mut().insert(
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(n.as_bytes())
                .expect("name"),
            HeaderValue::from_str(v).expect("value"),
        );
    }
    match within(tokio_tungstenite::client_async(req, stream)).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("websocket handshake failed: {e}"),
    }
}

/// A client with `Authorization: Bearer <token>`; `Err(status)` when refused.
pub async fn connect_bearer(pki: &Pki, gw: &Gateway, path: &str, token: &str) -> Result<Ws, u16> {
    connect_ws(
        pki,
        gw,
        path,
        &[("Authorization", &format!("Bearer {token}"))],
    )
    .await
}

/// A bearer-authenticated client; reads the upstream's greeting.
pub async fn ws_ok(env: &Env, gw: &Gateway, path: &str) -> Ws {
    let token = env.token();
    let mut ws = connect_bearer(&env.pki, gw, path, &token)
        .await
        .expect("upgrade accepted");
    let hello = next_text(&mut ws).await;
    assert!(hello.starts_with("hello from"), "{hello}");
    ws
}

pub async fn next_text(ws: &mut Ws) -> String {
    loop {
        match within(ws.next())
            .await
            .expect("stream open")
            .expect("message")
        {
            Message::Text(t) => return t.to_string(),
            Message::Binary(b) => return String::from_utf8_lossy(&b).into_owned(),
            _ => {}
        }
    }
}

/// The next message, which must be a Close; returns its code and reason.
pub async fn next_close(ws: &mut Ws) -> (u16, String) {
    loop {
        match within(ws.next()).await {
            Some(Ok(Message::Close(Some(f)))) => return (u16::from(f.code), f.reason.to_string()),
            Some(Ok(Message::Close(None))) => return (1005, String::new()),
            Some(Ok(_)) => {}
            other => panic!("expected a Close frame, got {other:?}"),
        }
    }
}

/// A gateway running in this process (`ws_gateway::run`), stopped through its trigger channel.
pub struct InProcess {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub triggers: tokio::sync::mpsc::Sender<ws_gateway::Trigger>,
    pub task: tokio::task::JoinHandle<Result<ws_gateway::Exit, ws_gateway::StartError>>,
}

impl InProcess {
    /// Starts the gateway with `args` (flags, as on the command line) on 127.0.0.1 port 0 and waits for readiness.
    pub async fn start(args: &[String]) -> InProcess {
        use clap::Parser;
        let mut full = vec!["ws-gateway".to_owned()];
        full.extend(args.iter().cloned());
        let config = ws_gateway::Settings::try_parse_from(full)
            .expect("flags")
            .resolve()
            .expect("valid configuration");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let admin_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let admin = admin_listener.local_addr().expect("addr");
        let (triggers, rx) = tokio::sync::mpsc::channel(4);
        let task = tokio::spawn(ws_gateway::run(config, listener, admin_listener, rx));
        let gw = InProcess {
            addr,
            admin,
            triggers,
            task,
        };
        within(async {
            loop {
                if let Ok(mut tcp) = TcpStream::connect(gw.admin).await {
                    let _ = tcp
                        .write_all(b"GET /readyz HTTP/1.1\r\nHost: a\r\n\r\n")
                        .await;
                    let mut out = Vec::new();
                    let _ = tcp.read_to_end(&mut out).await;
                    if out.starts_with(b"HTTP/1.1 200") {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        gw
    }
}

/// A raw TLS upgrade with `extra` header lines; returns the stream after a 101 and any bytes read past the head.
pub async fn raw_upgrade(
    pki: &Pki,
    addr: SocketAddr,
    path: &str,
    extra: &str,
) -> (TlsStream<TcpStream>, String, Vec<u8>) {
    let mut s = tls(pki, addr).await;
    within(s.write_all(upgrade(path, extra).as_bytes()))
        .await
        .expect("write");
    let mut got = Vec::new();
    let end = within(async {
        loop {
            let mut b = [0u8; 1024];
            let n = s.read(&mut b).await.expect("read");
            assert!(n > 0, "closed before the response head");
            got.extend_from_slice(&b[..n]);
            if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                return i + 4;
            }
        }
    })
    .await;
    let rest = got.split_off(end);
    (s, String::from_utf8_lossy(&got).into_owned(), rest)
}

/// Reads frames until a Close; returns the frames before it and the Close's code.
pub async fn frames_until_close(
    s: &mut TlsStream<TcpStream>,
    mut buf: Vec<u8>,
) -> (Vec<ws_gateway::frame::Frame>, u16) {
    let mut frames = Vec::new();
    within(async {
        loop {
            while let Some((f, used)) =
                ws_gateway::frame::decode(&buf, 1 << 20).expect("valid frame")
            {
                buf.drain(..used);
                if f.opcode == ws_gateway::frame::OP_CLOSE {
                    let code = u16::from_be_bytes([f.payload[0], f.payload[1]]);
                    return (std::mem::take(&mut frames), code);
                }
                frames.push(f);
            }
            let mut b = [0u8; 4096];
            let n = s.read(&mut b).await.expect("read");
            assert!(n > 0, "EOF before a Close frame");
            buf.extend_from_slice(&b[..n]);
        }
    })
    .await
}
