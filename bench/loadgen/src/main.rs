//! `ws-loadgen`: the load generator behind `scripts/bench.sh`, so ws-gateway, HAProxy and nginx are measured by the
//! same client in front of the same upstream.
//!
//! Subcommands:
//! - `echo`: a WebSocket echo upstream ([`ws_gateway::dev::echo_server`]);
//! - `handshakes`: closed loops (or paced ones, `--interval-ms`) of full TLS + authenticated upgrade + one echo + close;
//! - `latency`: N sessions fed at a fixed aggregate rate on an open-loop schedule (latency is measured from the
//!   scheduled send time, so a stalled proxy cannot hide its stall by slowing the client down);
//! - `bulk`: one session pushing N bytes in 64 KiB frames while reading the echo;
//! - `idle`: N authenticated sessions held open while the proxy's RSS is read from `/proc/PID/status`;
//! - `churn` ([`churn`]): the soak test behind `scripts/churn.sh`: `--total` sessions opened and ended, `--held` at a
//!   time, ending in a mix of clean closes, client and upstream resets, token expiries, admin revocations and idle
//!   timeouts; the gateway's open file count and RSS before and after. It runs its own echo upstream
//!   ([`upstream`]), one that resets a connection on request, and reads the gateway through [`probe`];
//! - `mqtt` ([`mqtt`]): MQTT 3.1.1 through the gateway to a broker (`scripts/mqtt_bench.sh`): each session
//!   CONNECTs, SUBSCRIBEs to its own topic and PUBLISHes to it at a fixed aggregate rate; round-trip latency, loss,
//!   and the gateway's CPU per message;
//! - `pki` ([`pki`]): a CA, a server certificate, a JWT signing key with its public key and JWKS, a token and an
//!   admin secret, written into one directory for the scripts (no `openssl` binary); `churn` mints its tokens
//!   ([`token`]) with the ES256 key it writes.
//!
//! Every subcommand ends with one line `RESULT {json}` on stdout; diagnostics go to stderr. A run that could not
//! measure what it was asked exits non-zero without a `RESULT` line; a `churn` run that measured but missed its
//! target prints its `RESULT` with `"pass": false` and exits 1.
//!
//! Limits: open files are capped at 20,000 per process on the benchmark machines, and a proxied session costs the
//! proxy two sockets, so session counts above [`MAX_SESSIONS`] are refused. Client sockets are bound in turn to
//! 127.0.1.1..127.0.1.K so a large run does not exhaust the ephemeral ports of one source address (or all to the one
//! `--source`, to be one client address as a per-address budget sees it). Every wait has a timeout and every loop
//! ends by itself.

#![forbid(unsafe_code)]
// The `churn` RESULT is one `json!` object with about 50 fields, past the default macro recursion limit of 128.
#![recursion_limit = "256"]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use rustls_pki_types::ServerName;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};
use ws_gateway::frame::{self, OP_BINARY, OP_CLOSE};
use ws_gateway::net::{Io, Url};
use ws_gateway::upstream::{handshake, Handshake, UpstreamError, UpstreamRequest};

mod churn;
mod mqtt;
mod pki;
mod probe;
mod token;
mod upstream;

/// Most sessions (or concurrent handshake loops) one run may open: the proxy holds two sockets per session under a
/// 20,000 open-file cap.
const MAX_SESSIONS: usize = 9_000;
/// Largest echoed frame accepted.
const MAX_FRAME: usize = 1 << 20;
/// Clock ticks per second in `/proc/PID/stat` (USER_HZ, 100 on every Linux ABI this runs on).
const CLK_TCK: f64 = 100.0;

#[derive(Parser, Debug)]
#[command(
    name = "ws-loadgen",
    about = "Load generator for ws-gateway benchmarks (loopback only)"
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// A WebSocket echo upstream.
    Echo {
        /// Address to listen on (loopback).
        #[arg(long)]
        listen: SocketAddr,
        /// Exit after this many seconds, so a forgotten echo server ends by itself.
        #[arg(long, default_value_t = 3600)]
        exit_after: u64,
    },
    /// Closed loops of connect + TLS + upgrade + one echo + close.
    Handshakes {
        #[command(flatten)]
        target: Target,
        /// Loops running at once.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Seconds to run.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Least time between the starts of two cycles of one loop, in milliseconds (0: back to back): a paced,
        /// well-behaved client rather than a closed loop.
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
    },
    /// Small frames at a fixed aggregate rate over N sessions; latency from scheduled send to echo receipt.
    Latency {
        #[command(flatten)]
        target: Target,
        /// Sessions to open.
        #[arg(long, default_value_t = 1000)]
        sessions: usize,
        /// Aggregate messages per second, spread round-robin over the sessions.
        #[arg(long, default_value_t = 10_000.0)]
        rate: f64,
        /// Seconds measured (after the warm-up).
        #[arg(long, default_value_t = 20.0)]
        duration: f64,
        /// Seconds sent at the same rate before measuring.
        #[arg(long, default_value_t = 2.0)]
        warmup: f64,
        /// Payload bytes per frame (at least 16).
        #[arg(long, default_value_t = 32)]
        payload: usize,
    },
    /// One session sending N bytes in frames of `--frame` bytes while reading the echo.
    Bulk {
        #[command(flatten)]
        target: Target,
        /// Payload bytes to send.
        #[arg(long, default_value_t = 1 << 30)]
        bytes: u64,
        /// Payload bytes per frame.
        #[arg(long, default_value_t = 64 * 1024)]
        frame: usize,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 120.0)]
        timeout: f64,
    },
    /// N authenticated sessions held idle; the proxy's RSS (sum over `--pid`) before and after.
    Idle {
        #[command(flatten)]
        target: Target,
        /// Sessions to open.
        #[arg(long, default_value_t = 1000)]
        sessions: usize,
        /// Seconds to hold the sessions after they are all open (the RSS is read after `--settle`).
        #[arg(long, default_value_t = 10.0)]
        hold: f64,
        /// Seconds to wait after the last session opened before reading the RSS.
        #[arg(long, default_value_t = 3.0)]
        settle: f64,
        /// Sessions being opened at once.
        #[arg(long, default_value_t = 64)]
        open_concurrency: usize,
    },
    /// Sessions opened and ended in churn, some held at a time; the gateway's open files and RSS before and after.
    Churn(Box<churn::ChurnArgs>),
    /// Writes a CA, a server certificate, a JWT signing key with its JWKS, a token and an admin secret into a
    /// directory: what the benchmark scripts need, without `openssl`.
    Pki(pki::PkiArgs),
    /// MQTT 3.1.1 sessions through the gateway to a broker: CONNECT, SUBSCRIBE to an own topic, then QoS 0 PUBLISHes
    /// at a fixed aggregate rate that come back from the broker; round-trip latency, loss and CPU per message.
    Mqtt(Box<mqtt::MqttArgs>),
}

/// Where to connect and how.
#[derive(Args, Debug, Clone)]
struct Target {
    /// `ws://` or `wss://` URL (a proxy, or the echo upstream itself for a direct baseline).
    #[arg(long)]
    url: String,
    /// PEM file with the CA that signed the server certificate (wss only).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Token sent as `Authorization: Bearer TOKEN` on every upgrade.
    #[arg(long)]
    token: Option<String>,
    /// Allow TLS session resumption (off: every connection is a full handshake).
    #[arg(long)]
    resume: bool,
    /// Bind client sockets to 127.0.1.1..=127.0.1.K in turn; 0 lets the kernel choose.
    #[arg(long, default_value_t = 8)]
    sources: u8,
    /// Bind every client socket to this one loopback address instead (`--sources` is then ignored): the client is
    /// one address, as a gateway's per-address budget sees it (`scripts/flood.sh`).
    #[arg(long)]
    source: Option<Ipv4Addr>,
    /// Proxy process ids (comma-separated) whose CPU time is reported (and whose RSS `idle` reads).
    #[arg(long, value_delimiter = ',')]
    pid: Vec<u32>,
    /// Timeout of each step (connect, TLS, upgrade, echo, close), seconds.
    #[arg(long, default_value_t = 5.0)]
    step_timeout: f64,
}

fn main() {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => fail(&format!("starting the tokio runtime: {e}")),
    };
    let outcome = runtime.block_on(async move {
        match cli.mode {
            Mode::Echo { listen, exit_after } => echo(listen, exit_after).await,
            Mode::Handshakes {
                target,
                concurrency,
                duration,
                interval_ms,
            } => handshakes(target, concurrency, duration, interval_ms).await,
            Mode::Latency {
                target,
                sessions,
                rate,
                duration,
                warmup,
                payload,
            } => latency(target, sessions, rate, duration, warmup, payload).await,
            Mode::Bulk {
                target,
                bytes,
                frame,
                timeout,
            } => bulk(target, bytes, frame, timeout).await,
            Mode::Idle {
                target,
                sessions,
                hold,
                settle,
                open_concurrency,
            } => idle(target, sessions, hold, settle, open_concurrency).await,
            Mode::Churn(args) => churn::churn(*args).await,
            Mode::Pki(args) => pki::pki(&args).map(Some),
            Mode::Mqtt(args) => mqtt::mqtt(*args).await,
        }
    });
    match outcome {
        // A measured run that missed its target (`churn`) still prints its figures, then exits 1.
        Ok(Some(result)) if result.get("pass") == Some(&Value::Bool(false)) => {
            println!("RESULT {result}");
            runtime.shutdown_timeout(Duration::from_secs(1));
            fail("the run did not pass (see \"pass\" in the RESULT)");
        }
        Ok(Some(result)) => println!("RESULT {result}"),
        Ok(None) => {}
        Err(e) => fail(&e),
    }
    // Sessions still held by detached tasks must not delay the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
}

fn fail(msg: &str) -> ! {
    eprintln!("ws-loadgen: {msg}");
    std::process::exit(1);
}

// ---------------------------------------------------------------------------------------------------------------
// echo

async fn echo(listen: SocketAddr, exit_after: u64) -> Result<Option<Value>, String> {
    if !listen.ip().is_loopback() {
        return Err(format!("--listen {listen}: loopback addresses only"));
    }
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("binding {listen}: {e}"))?;
    eprintln!("ws-loadgen: echo upstream on ws://{listen}/ (exits after {exit_after} s)");
    let _ = tokio::time::timeout(
        Duration::from_secs(exit_after),
        ws_gateway::dev::echo_server(listener),
    )
    .await;
    Ok(None)
}

// ---------------------------------------------------------------------------------------------------------------
// Dialing, the upgrade, frames

/// A failed step, with a bounded kind for the error table and a detail for the first one printed.
#[derive(Debug)]
struct Failure {
    kind: String,
    detail: String,
}

fn failure(kind: impl Into<String>, detail: impl std::fmt::Display) -> Failure {
    Failure {
        kind: kind.into(),
        detail: detail.to_string(),
    }
}

/// Everything needed to open sessions to one target.
struct Dialer {
    url: Url,
    addr: SocketAddr,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    token: Option<String>,
    sources: u8,
    source: Option<Ipv4Addr>,
    next: AtomicUsize,
    step: Duration,
}

impl Dialer {
    fn new(t: &Target) -> Result<Dialer, String> {
        let url = Url::parse_ws(&t.url)?;
        let ip: IpAddr = url
            .host
            .parse()
            .map_err(|_| format!("--url host `{}` must be an IP literal", url.host))?;
        if !ip.is_loopback() {
            return Err(format!("--url {ip}: loopback targets only"));
        }
        let tls = if url.secure {
            let ca = t.ca.as_deref().ok_or("--ca is required for wss:// URLs")?;
            let roots = ws_gateway::tls::load_ca_file(ca)?;
            let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
            if !t.resume {
                config.resumption = rustls::client::Resumption::disabled();
            }
            let name = ServerName::IpAddress(ip.into());
            Some((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
        } else {
            None
        };
        if let Some(src) = t.source.filter(|s| !s.is_loopback()) {
            return Err(format!("--source {src}: loopback addresses only"));
        }
        if !(0.1..=120.0).contains(&t.step_timeout) {
            return Err("--step-timeout must be between 0.1 and 120 seconds".into());
        }
        Ok(Dialer {
            addr: SocketAddr::new(ip, url.port),
            url,
            tls,
            token: t.token.clone(),
            sources: t.sources,
            source: t.source,
            next: AtomicUsize::new(0),
            step: Duration::from_secs_f64(t.step_timeout),
        })
    }

    /// TCP (from the next source address) and TLS.
    async fn connect(&self) -> Result<Io, Failure> {
        let socket = TcpSocket::new_v4().map_err(|e| failure("socket", e))?;
        if let Some(src) = self.source {
            socket
                .bind(SocketAddr::new(src.into(), 0))
                .map_err(|e| failure("bind", format!("{src}: {e}")))?;
        } else if self.sources > 0 {
            let i = self.next.fetch_add(1, Ordering::Relaxed) % usize::from(self.sources);
            // Invariant: i < sources <= 255, so i + 1 fits in u8.
            let src = Ipv4Addr::new(127, 0, 1, (i + 1) as u8);
            socket
                .bind(SocketAddr::new(src.into(), 0))
                .map_err(|e| failure("bind", format!("{src}: {e}")))?;
        }
        let tcp = tokio::time::timeout(self.step, socket.connect(self.addr))
            .await
            .map_err(|_| failure("connect_timeout", "TCP connect timed out"))?
            .map_err(|e| failure("connect", e))?;
        let _ = tcp.set_nodelay(true);
        let Some((connector, name)) = &self.tls else {
            return Ok(Io::Plain(tcp));
        };
        let tls = tokio::time::timeout(self.step, connector.connect(name.clone(), tcp))
            .await
            .map_err(|_| failure("tls_timeout", "TLS handshake timed out"))?
            .map_err(|e| failure("tls", e))?;
        Ok(Io::ClientTls(Box::new(tls)))
    }

    /// Connect, TLS and the upgrade up to the verified 101, with the `--token` of the target.
    async fn open(&self) -> Result<Session, Failure> {
        self.open_with(self.token.as_deref()).await
    }

    /// Connect, TLS and the upgrade up to the verified 101, with `token` as the bearer: the library's client
    /// handshake, the one the gateway uses to dial its upstreams.
    async fn open_with(&self, token: Option<&str>) -> Result<Session, Failure> {
        self.open_offering(token, &[]).await
    }

    /// As [`Dialer::open_with`], offering `protocols` in `Sec-WebSocket-Protocol` (the server must select one).
    async fn open_offering(
        &self,
        token: Option<&str>,
        protocols: &[&str],
    ) -> Result<Session, Failure> {
        let mut io = self.connect().await?;
        let bearer = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = bearer
            .iter()
            .map(|b| ("Authorization", b.as_str()))
            .collect();
        let req = UpstreamRequest::client(&self.url, &headers, protocols);
        let step = self.step;
        let Handshake { rest, .. } = tokio::time::timeout(step, handshake(&mut io, &req))
            .await
            .map_err(|_| failure("upgrade_timeout", "no 101 in time"))?
            .map_err(upgrade_failure)?;
        Ok(Session {
            io,
            buf: rest,
            step,
            sent: 0,
        })
    }
}

/// The kind a failed upgrade is counted under in a RESULT's `error_kinds`. Two kinds are told apart by the library's
/// message; `upgrade_failures_keep_their_kinds` fails if those messages change.
fn upgrade_failure(e: UpstreamError) -> Failure {
    match e {
        UpstreamError::Status(code) => failure(
            format!("status_{code}"),
            format!("HTTP {code} instead of 101"),
        ),
        UpstreamError::Io(e) => failure("io", e),
        UpstreamError::Handshake("closed before answering") => {
            failure("closed_before_101", "connection closed before the response")
        }
        UpstreamError::Handshake("wrong Sec-WebSocket-Accept") => {
            failure("bad_accept", "wrong Sec-WebSocket-Accept")
        }
        other => failure("bad_response", other),
    }
}

/// What an open-loop schedule wrote: messages in the warm-up and after it, the measured lags (ns behind schedule),
/// the writers back, and which of them broke.
struct Sent<W> {
    warm: u64,
    measured: u64,
    lags: Vec<u64>,
    writers: Vec<W>,
    broken: Vec<bool>,
}

/// Writes one message every `1/rate` s from `epoch` for `total`, round robin over `writers`, on the calling std
/// thread (std sleeps are precise to tens of microseconds, tokio's timer to 1 ms). `message(i, k, sched)` builds the
/// frame for session `i`, write number `k`, scheduled `sched` ns after `epoch`. A write that does not complete within
/// `step` marks its session broken, and it is skipped from then on.
#[allow(clippy::too_many_arguments)]
fn open_loop<W: tokio::io::AsyncWrite + Unpin>(
    handle: &tokio::runtime::Handle,
    mut writers: Vec<W>,
    epoch: Instant,
    total: Duration,
    warm: Duration,
    rate: f64,
    step: Duration,
    mut message: impl FnMut(usize, u64, u64) -> Vec<u8>,
) -> Sent<W> {
    let total_ns = total.as_nanos() as u64;
    let warm_ns = warm.as_nanos() as u64;
    let interval = 1e9 / rate;
    let mut sent = Sent {
        warm: 0,
        measured: 0,
        lags: Vec::new(),
        broken: vec![false; writers.len()],
        writers: Vec::new(),
    };
    let mut k = 0u64;
    while !writers.is_empty() {
        let sched = (k as f64 * interval) as u64;
        if sched >= total_ns {
            break;
        }
        k += 1;
        let at = epoch + Duration::from_nanos(sched);
        let now = Instant::now();
        if at > now {
            std::thread::sleep(at - now);
        }
        let i = ((k - 1) % writers.len() as u64) as usize;
        if sent.broken[i] {
            continue;
        }
        let lag = (epoch.elapsed().as_nanos() as u64).saturating_sub(sched);
        let bytes = message(i, k, sched);
        let wr = &mut writers[i];
        let wrote = handle.block_on(async {
            tokio::time::timeout(step, async {
                wr.write_all(&bytes).await?;
                wr.flush().await
            })
            .await
        });
        if !matches!(wrote, Ok(Ok(()))) {
            sent.broken[i] = true;
            continue;
        }
        if sched >= warm_ns {
            sent.measured += 1;
            sent.lags.push(lag);
        } else {
            sent.warm += 1;
        }
    }
    sent.writers = writers;
    sent
}

/// A per-frame masking key (clients must mask; the value does not matter to a benchmark).
fn mask_key(n: u64) -> [u8; 4] {
    // Invariant: the truncation keeps the low 32 bits, which is all a masking key needs.
    ((n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as u32).to_be_bytes()
}

/// An open WebSocket session on the client side.
struct Session {
    io: Io,
    /// Bytes read but not yet decoded.
    buf: Vec<u8>,
    step: Duration,
    sent: u64,
}

impl Session {
    async fn send_binary(&mut self, payload: &[u8]) -> Result<(), Failure> {
        self.sent += 1;
        let bytes = frame::encode(OP_BINARY, payload, Some(mask_key(self.sent)));
        tokio::time::timeout(self.step, async {
            self.io.write_all(&bytes).await?;
            self.io.flush().await
        })
        .await
        .map_err(|_| failure("write_timeout", "write timed out"))?
        .map_err(|e| failure("io", e))
    }

    async fn read_frame(&mut self) -> Result<frame::Frame, Failure> {
        let step = self.step;
        tokio::time::timeout(step, read_frame(&mut self.io, &mut self.buf))
            .await
            .map_err(|_| failure("echo_timeout", "no echo in time"))?
    }

    /// Sends Close, then waits (bounded) for the server to close first, so TIME_WAIT stays on the server side and
    /// the client's ephemeral ports are not used up. Returns whether the server closed in time.
    async fn close(mut self) -> bool {
        let close = frame::close_frame(frame::CLOSE_NORMAL, "", Some(mask_key(u64::MAX)));
        let step = self.step;
        tokio::time::timeout(step, async {
            if self.io.write_all(&close).await.is_err() || self.io.flush().await.is_err() {
                return false;
            }
            let mut chunk = [0u8; 1024];
            loop {
                match self.io.read(&mut chunk).await {
                    Ok(0) => return true,
                    Ok(_) => {}
                    // A reset after the Close exchange still means the server is gone.
                    Err(_) => return true,
                }
            }
        })
        .await
        .unwrap_or(false)
    }
}

async fn read_frame<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut Vec<u8>,
) -> Result<frame::Frame, Failure> {
    let mut chunk = [0u8; 4096];
    loop {
        match frame::decode(buf, MAX_FRAME) {
            Ok(Some((f, used))) => {
                buf.drain(..used);
                if f.opcode == OP_CLOSE {
                    return Err(failure("closed_by_server", "Close frame received"));
                }
                return Ok(f);
            }
            Ok(None) => {}
            Err(e) => return Err(failure("bad_frame", e)),
        }
        let n = io.read(&mut chunk).await.map_err(|e| failure("io", e))?;
        if n == 0 {
            return Err(failure("eof", "connection closed"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Measurements shared by the modes

fn check_sessions(n: usize, what: &str) -> Result<(), String> {
    if n == 0 {
        return Err(format!("{what} must be at least 1"));
    }
    if n > MAX_SESSIONS {
        return Err(format!(
            "{what} = {n} is above {MAX_SESSIONS}: open files are capped at 20,000 per process here and a proxied \
             session costs the proxy two sockets (client + upstream); measure at most {MAX_SESSIONS}"
        ));
    }
    if let Some(limit) = open_files_limit() {
        if n + 64 > limit {
            return Err(format!(
                "{what} = {n} needs about {} open files but this process may open {limit} (ulimit -n)",
                n + 64
            ));
        }
    }
    Ok(())
}

/// The soft `Max open files` of this process.
fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start at field 3 (state): utime is 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / CLK_TCK)
}

/// CPU seconds of the watched proxy processes and of this client.
struct CpuMeter {
    pids: Vec<u32>,
    proxy: Option<f64>,
    client: Option<f64>,
}

impl CpuMeter {
    fn start(pids: &[u32]) -> CpuMeter {
        CpuMeter {
            pids: pids.to_vec(),
            proxy: proxy_cpu(pids),
            client: cpu_seconds("self"),
        }
    }

    /// `(proxy_cpu_s, client_cpu_s)` since start.
    fn stop(&self) -> (Option<f64>, Option<f64>) {
        let proxy = match (self.proxy, proxy_cpu(&self.pids)) {
            (Some(a), Some(b)) => Some(round3(b - a)),
            _ => None,
        };
        let client = match (self.client, cpu_seconds("self")) {
            (Some(a), Some(b)) => Some(round3(b - a)),
            _ => None,
        };
        (proxy, client)
    }
}

fn proxy_cpu(pids: &[u32]) -> Option<f64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|p| cpu_seconds(&p.to_string())).sum()
}

/// VmRSS of a process, in KiB.
fn rss_kib(pid: u32) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("reading /proc/{pid}/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("/proc/{pid}/status has no VmRSS"))
}

fn total_rss_kib(pids: &[u32]) -> Result<u64, String> {
    pids.iter().map(|p| rss_kib(*p)).sum()
}

/// The `p`-quantile (0..=1) of sorted values.
fn quantile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    // Invariant: the product is in 0..=len, and the index is clamped to the last element.
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.saturating_sub(1).min(sorted.len() - 1)]
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn ns_to_us(ns: u64) -> f64 {
    round3(ns as f64 / 1000.0)
}

fn ns_to_ms(ns: u64) -> f64 {
    round3(ns as f64 / 1e6)
}

/// Counts failures by kind and keeps the first detail to print.
#[derive(Default)]
struct Errors {
    kinds: BTreeMap<String, u64>,
    first: Option<String>,
}

impl Errors {
    fn add(&mut self, f: Failure) {
        *self.kinds.entry(f.kind.clone()).or_default() += 1;
        if self.first.is_none() {
            self.first = Some(format!("{}: {}", f.kind, f.detail));
        }
    }

    fn merge(&mut self, other: Errors) {
        for (k, v) in other.kinds {
            *self.kinds.entry(k).or_default() += v;
        }
        if self.first.is_none() {
            self.first = other.first;
        }
    }

    fn total(&self) -> u64 {
        self.kinds.values().sum()
    }

    fn report(&self) {
        if let Some(first) = &self.first {
            eprintln!(
                "ws-loadgen: {} errors {:?}; first: {first}",
                self.total(),
                self.kinds
            );
        }
    }
}

fn secs(s: f64, what: &str) -> Result<Duration, String> {
    if !(0.0..=3600.0).contains(&s) {
        return Err(format!("{what} must be between 0 and 3600 seconds"));
    }
    Ok(Duration::from_secs_f64(s))
}

/// Opens `n` sessions, `parallel` at a time, each confirmed end to end by one echo.
async fn open_sessions(dialer: &Arc<Dialer>, n: usize, parallel: usize) -> (Vec<Session>, Errors) {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..parallel.clamp(1, n) {
        let dialer = Arc::clone(dialer);
        let next = Arc::clone(&next);
        tasks.push(tokio::spawn(async move {
            let mut opened = Vec::new();
            let mut errors = Errors::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let attempt = async {
                    let mut s = dialer.open().await?;
                    s.send_binary(b"hello").await?;
                    s.read_frame().await?;
                    Ok::<_, Failure>(s)
                };
                match attempt.await {
                    Ok(s) => opened.push(s),
                    Err(f) => errors.add(f),
                }
            }
            (opened, errors)
        }));
    }
    let mut sessions = Vec::with_capacity(n);
    let mut errors = Errors::default();
    for t in tasks {
        match t.await {
            Ok((s, e)) => {
                sessions.extend(s);
                errors.merge(e);
            }
            Err(e) => errors.add(failure("task", e)),
        }
    }
    (sessions, errors)
}

// ---------------------------------------------------------------------------------------------------------------
// handshakes

async fn handshakes(
    target: Target,
    concurrency: usize,
    duration: f64,
    interval_ms: u64,
) -> Result<Option<Value>, String> {
    check_sessions(concurrency, "--concurrency")?;
    let run_for = secs(duration, "--duration")?;
    if interval_ms > 60_000 {
        return Err("--interval-ms must be at most 60000".into());
    }
    let interval = Duration::from_millis(interval_ms);
    let dialer = Arc::new(Dialer::new(&target)?);
    let cpu = CpuMeter::start(&target.pid);
    let start = Instant::now();
    let deadline = start + run_for;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let dialer = Arc::clone(&dialer);
        tasks.push(tokio::spawn(async move {
            let mut hs = Vec::new();
            let mut cycles = Vec::new();
            let mut errors = Errors::default();
            let mut close_timeouts = 0u64;
            while Instant::now() < deadline {
                let t0 = Instant::now();
                let next = tokio::time::Instant::from_std(t0 + interval);
                let attempt = async {
                    let mut s = dialer.open().await?;
                    let t_hs = t0.elapsed();
                    s.send_binary(&[0x5a; 32]).await?;
                    let f = s.read_frame().await?;
                    if f.payload.len() != 32 {
                        return Err(failure("bad_echo", "echo differs from the frame sent"));
                    }
                    let closed = s.close().await;
                    Ok::<_, Failure>((t_hs, closed))
                };
                match attempt.await {
                    Ok((t_hs, closed)) => {
                        hs.push(t_hs.as_nanos() as u64);
                        cycles.push(t0.elapsed().as_nanos() as u64);
                        close_timeouts += u64::from(!closed);
                    }
                    Err(f) => {
                        errors.add(f);
                        // Do not spin on a refused or broken target.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                tokio::time::sleep_until(next).await;
            }
            (hs, cycles, errors, close_timeouts)
        }));
    }
    let mut hs = Vec::new();
    let mut cycles = Vec::new();
    let mut errors = Errors::default();
    let mut close_timeouts = 0;
    for t in tasks {
        match t.await {
            Ok((h, c, e, ct)) => {
                hs.extend(h);
                cycles.extend(c);
                errors.merge(e);
                close_timeouts += ct;
            }
            Err(e) => errors.add(failure("task", e)),
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (proxy_cpu, client_cpu) = cpu.stop();
    errors.report();
    if hs.is_empty() {
        return Err("handshakes: no handshake completed".into());
    }
    hs.sort_unstable();
    cycles.sort_unstable();
    let rate = hs.len() as f64 / elapsed;
    Ok(Some(json!({
        "mode": "handshakes",
        "url": dialer.url.to_string(),
        "concurrency": concurrency,
        "interval_ms": interval_ms,
        "source": target.source.map(|s| s.to_string()),
        "resume": target.resume,
        "elapsed_s": round3(elapsed),
        "ok": hs.len(),
        "errors": errors.total(),
        "error_kinds": errors.kinds,
        "close_timeouts": close_timeouts,
        "rate": round3(rate),
        "hs_p50_ms": ns_to_ms(quantile(&hs, 0.5)),
        "hs_p99_ms": ns_to_ms(quantile(&hs, 0.99)),
        "cycle_p50_ms": ns_to_ms(quantile(&cycles, 0.5)),
        "cycle_p99_ms": ns_to_ms(quantile(&cycles, 0.99)),
        "proxy_cpu_s": proxy_cpu,
        "client_cpu_s": client_cpu,
        "per_proxy_cpu_s": proxy_cpu.filter(|c| *c > 0.0).map(|c| round3(hs.len() as f64 / c)),
    })))
}

// ---------------------------------------------------------------------------------------------------------------
// latency

async fn latency(
    target: Target,
    sessions: usize,
    rate: f64,
    duration: f64,
    warmup: f64,
    payload: usize,
) -> Result<Option<Value>, String> {
    check_sessions(sessions, "--sessions")?;
    if !(1.0..=1_000_000.0).contains(&rate) {
        return Err("--rate must be between 1 and 1,000,000 messages per second".into());
    }
    if !(16..=65_535).contains(&payload) {
        return Err("--payload must be between 16 and 65535 bytes".into());
    }
    let measure = secs(duration, "--duration")?;
    let warm = secs(warmup, "--warmup")?;
    let dialer = Arc::new(Dialer::new(&target)?);
    let (opened, errors) = open_sessions(&dialer, sessions, 64).await;
    errors.report();
    if opened.len() < sessions {
        return Err(format!(
            "latency: opened {} of {sessions} sessions",
            opened.len()
        ));
    }

    let total = warm + measure;
    let warm_ns = warm.as_nanos() as u64;
    let step = dialer.step;
    let epoch = Instant::now() + Duration::from_millis(200);
    // The drain: echoes scheduled before the end have this long to arrive.
    let stop = epoch + total + step;
    let mut writers = Vec::with_capacity(sessions);
    let mut readers = Vec::with_capacity(sessions);
    for s in opened {
        let Session { io, buf, .. } = s;
        let (mut rd, wr) = tokio::io::split(io);
        writers.push(wr);
        readers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut received = 0u64;
            let mut buf = buf;
            loop {
                let got = tokio::time::timeout_at(stop.into(), read_frame(&mut rd, &mut buf)).await;
                let Ok(Ok(f)) = got else { break };
                let now = epoch.elapsed().as_nanos() as u64;
                if f.payload.len() < 8 {
                    continue;
                }
                let mut b = [0u8; 8];
                b.copy_from_slice(&f.payload[..8]);
                let sched = u64::from_le_bytes(b);
                received += 1;
                if sched >= warm_ns {
                    lat.push(now.saturating_sub(sched));
                }
            }
            (lat, received)
        }));
    }

    // The schedule runs on its own thread and writes itself: std sleeps are precise to tens of microseconds (tokio's
    // timer to 1 ms), and writing here avoids waking a parked worker for every message. A write to a socket with
    // room in its buffer completes at once; a blocked one waits under the step timeout and counts as late.
    let handle = tokio::runtime::Handle::current();
    let schedule = std::thread::spawn(move || {
        let mut body = vec![0u8; payload];
        let mut sent = open_loop(
            &handle,
            writers,
            epoch,
            total,
            warm,
            rate,
            step,
            |_, k, sched| {
                body[..8].copy_from_slice(&sched.to_le_bytes());
                frame::encode(OP_BINARY, &body, Some(mask_key(k)))
            },
        );
        let close = frame::close_frame(frame::CLOSE_NORMAL, "", Some(mask_key(0)));
        for (wr, broken) in sent.writers.iter_mut().zip(&sent.broken) {
            if !broken {
                let _ = handle
                    .block_on(async { tokio::time::timeout(step, wr.write_all(&close)).await });
            }
        }
        let broken = sent.broken.iter().filter(|b| **b).count() as u64;
        (sent.warm, sent.measured, sent.lags, broken)
    });

    let cpu_started = tokio::time::sleep_until((epoch + warm).into());
    cpu_started.await;
    let cpu = CpuMeter::start(&target.pid);
    let (sent_warm, sent, mut lags, broken) = tokio::task::spawn_blocking(move || schedule.join())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|_| "the schedule thread panicked".to_string())?;
    let (proxy_cpu, client_cpu) = cpu.stop();
    let mut lat = Vec::new();
    let mut received = 0u64;
    for r in readers {
        if let Ok((l, n)) = r.await {
            lat.extend(l);
            received += n;
        }
    }
    let lost = (sent_warm + sent).saturating_sub(received);
    if lat.is_empty() {
        return Err("latency: no echo received".into());
    }
    lat.sort_unstable();
    lags.sort_unstable();
    Ok(Some(json!({
        "mode": "latency",
        "url": dialer.url.to_string(),
        "sessions": sessions,
        "rate": rate,
        "payload": payload,
        "duration_s": duration,
        "warmup_s": warmup,
        "sent": sent,
        "measured": lat.len(),
        "lost": lost,
        "broken_sessions": broken,
        "p50_us": ns_to_us(quantile(&lat, 0.5)),
        "p99_us": ns_to_us(quantile(&lat, 0.99)),
        "p999_us": ns_to_us(quantile(&lat, 0.999)),
        "max_us": ns_to_us(quantile(&lat, 1.0)),
        "send_lag_p50_us": ns_to_us(quantile(&lags, 0.5)),
        "send_lag_p99_us": ns_to_us(quantile(&lags, 0.99)),
        "proxy_cpu_s": proxy_cpu,
        "client_cpu_s": client_cpu,
    })))
}

// ---------------------------------------------------------------------------------------------------------------
// bulk

/// Length of an unmasked frame carrying `payload` bytes.
fn unmasked_len(payload: usize) -> u64 {
    let header = match payload {
        n if n < 126 => 2,
        n if n <= usize::from(u16::MAX) => 4,
        _ => 10,
    };
    (header + payload) as u64
}

async fn bulk(
    target: Target,
    bytes: u64,
    frame_size: usize,
    timeout: f64,
) -> Result<Option<Value>, String> {
    if !(1..=MAX_FRAME).contains(&frame_size) {
        return Err(format!("--frame must be between 1 and {MAX_FRAME}"));
    }
    if bytes == 0 {
        return Err("--bytes must be at least 1".into());
    }
    let limit = secs(timeout, "--timeout")?;
    let dialer = Arc::new(Dialer::new(&target)?);
    let mut s = dialer.open().await.map_err(|f| f.detail)?;
    s.send_binary(b"warm").await.map_err(|f| f.detail)?;
    s.read_frame().await.map_err(|f| f.detail)?;
    let Session { io, buf, .. } = s;
    let (mut rd, mut wr) = tokio::io::split(io);

    let fs = frame_size as u64;
    let full = bytes / fs;
    let tail = (bytes % fs) as usize;
    let expected = full * unmasked_len(frame_size) + if tail > 0 { unmasked_len(tail) } else { 0 };
    let payload: Vec<u8> = (0..frame_size).map(|i| (i % 251) as u8).collect();
    let frame_bytes = frame::encode(OP_BINARY, &payload, Some([1, 2, 3, 4]));
    let tail_bytes = frame::encode(OP_BINARY, &payload[..tail], Some([1, 2, 3, 4]));

    let cpu = CpuMeter::start(&target.pid);
    let start = Instant::now();
    let deadline = tokio::time::Instant::from(start + limit);
    let writer = tokio::spawn(async move {
        let send = async {
            for _ in 0..full {
                wr.write_all(&frame_bytes).await?;
            }
            if tail > 0 {
                wr.write_all(&tail_bytes).await?;
            }
            wr.flush().await?;
            Ok::<_, std::io::Error>(wr)
        };
        tokio::time::timeout_at(deadline, send).await
    });
    let got = tokio::time::timeout_at(deadline, async {
        let mut seen = buf.len() as u64;
        let mut chunk = vec![0u8; 256 * 1024];
        while seen < expected {
            let n = rd.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "closed",
                ));
            }
            seen += n as u64;
        }
        Ok(seen)
    })
    .await;
    let elapsed = start.elapsed().as_secs_f64();
    let (proxy_cpu, client_cpu) = cpu.stop();
    match got {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(format!("bulk: reading the echo: {e}")),
        Err(_) => {
            return Err(format!(
                "bulk: the echo did not complete within {timeout} s"
            ))
        }
    }
    if let Ok(Ok(Ok(mut wr))) = writer.await {
        let close = frame::close_frame(frame::CLOSE_NORMAL, "", Some(mask_key(7)));
        let _ = tokio::time::timeout(dialer.step, wr.write_all(&close)).await;
    }
    let mbps = bytes as f64 / elapsed / 1e6;
    Ok(Some(json!({
        "mode": "bulk",
        "url": dialer.url.to_string(),
        "bytes": bytes,
        "frame": frame_size,
        "elapsed_s": round3(elapsed),
        "mb_per_s": round3(mbps),
        "proxy_cpu_s": proxy_cpu,
        "client_cpu_s": client_cpu,
    })))
}

// ---------------------------------------------------------------------------------------------------------------
// idle

async fn idle(
    target: Target,
    sessions: usize,
    hold: f64,
    settle: f64,
    parallel: usize,
) -> Result<Option<Value>, String> {
    check_sessions(sessions, "--sessions")?;
    if target.pid.is_empty() {
        return Err("idle: --pid is required (the proxy's process ids)".into());
    }
    let hold = secs(hold, "--hold")?;
    let settle = secs(settle, "--settle")?;
    let dialer = Arc::new(Dialer::new(&target)?);
    let before = total_rss_kib(&target.pid)?;
    let started = Instant::now();
    let (opened, errors) = open_sessions(&dialer, sessions, parallel).await;
    let open_s = started.elapsed().as_secs_f64();
    errors.report();
    // Said as soon as the opening ends, not only in the RESULT after the hold: a script running several clients
    // (`scripts/box.sh`) waits for this line from each, then measures while they hold.
    eprintln!(
        "ws-loadgen: idle: {} of {sessions} sessions open, {} errors, in {open_s:.1} s",
        opened.len(),
        errors.total()
    );
    if opened.is_empty() {
        return Err("idle: no session opened".into());
    }
    let all_open = Instant::now();
    tokio::time::sleep(settle).await;
    let after = total_rss_kib(&target.pid)?;
    let rest = (all_open + hold.max(settle)).saturating_duration_since(Instant::now());
    tokio::time::sleep(rest).await;
    let end = total_rss_kib(&target.pid)?;
    let n = opened.len();
    // Close in the background of the exit: dropping the sockets is enough for an idle session.
    drop(opened);
    let per = (after as f64 - before as f64) / n as f64;
    let per_end = (end as f64 - before as f64) / n as f64;
    Ok(Some(json!({
        "mode": "idle",
        "url": dialer.url.to_string(),
        "sessions": sessions,
        "opened": n,
        "errors": errors.total(),
        "error_kinds": errors.kinds,
        "open_s": round3(open_s),
        "rss_before_kib": before,
        "rss_after_kib": after,
        "rss_end_kib": end,
        "kib_per_session": round3(per),
        "kib_per_session_end": round3(per_end),
        "settle_s": settle.as_secs_f64(),
        "hold_s": hold.as_secs_f64(),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_pick_the_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(quantile(&v, 0.5), 50);
        assert_eq!(quantile(&v, 0.99), 99);
        assert_eq!(quantile(&v, 1.0), 100);
        assert_eq!(quantile(&[], 0.5), 0);
    }

    #[test]
    fn unmasked_len_matches_encode() {
        for n in [0, 1, 125, 126, 65_535, 65_536, 70_000] {
            assert_eq!(
                unmasked_len(n),
                frame::encode(OP_BINARY, &vec![0; n], None).len() as u64
            );
        }
    }

    #[test]
    fn too_many_sessions_refused() {
        assert!(check_sessions(MAX_SESSIONS + 1, "--sessions").is_err());
        assert!(check_sessions(0, "--sessions").is_err());
    }

    /// The kind a failed upgrade is counted under, when the server reads the request, sends `answer` and closes.
    async fn upgrade_kind(answer: &'static [u8]) -> String {
        let url = Url::parse_ws("ws://127.0.0.1:1/").expect("url");
        let req = UpstreamRequest::client(&url, &[("Authorization", "Bearer t")], &[]);
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let serve = tokio::spawn(async move {
            let mut head = vec![0u8; 4096];
            let _ = server.read(&mut head).await;
            let _ = server.write_all(answer).await;
        });
        let got = tokio::time::timeout(Duration::from_secs(5), handshake(&mut client, &req))
            .await
            .expect("in time");
        serve.abort();
        upgrade_failure(got.expect_err("the upgrade fails")).kind
    }

    #[tokio::test]
    async fn upgrade_failures_keep_their_kinds() {
        assert_eq!(upgrade_kind(b"").await, "closed_before_101");
        assert_eq!(
            upgrade_kind(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n").await,
            "status_401"
        );
        assert_eq!(
            upgrade_kind(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Accept: c29tZXRoaW5nIGVsc2U=\r\n\r\n"
            )
            .await,
            "bad_accept"
        );
        assert_eq!(
            upgrade_kind(b"HTTP/1.1 101 \0\r\n\r\n").await,
            "bad_response"
        );
    }
}
