//! Upstream resilience with real faults on real sockets, against the gateway run in-process: endpoints killed,
//! restarted on the same port, refusing, accepting and never answering, answering slowly or with a wrong
//! `Sec-WebSocket-Accept`, closing before answering, resetting or ending live connections; balancing, breakers,
//! retries, the 502/503 answers, readiness, the MQTT CONNECT path with every endpoint down; and two real Mosquitto
//! brokers behind one route with `hash-subject` stickiness.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::mosquitto::Mosquitto;
use common::mqtt::packet;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;
use ws_gateway::frame::{close_frame, decode, encode, Frame, OP_BINARY, OP_CLOSE};

/// How a [`Broker`] answers an upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A WebSocket echo server that greets with `hello from TAG`.
    Echo,
    /// Accepts the connection and never answers.
    Hang,
    /// Answers correctly after this long.
    Slow(Duration),
    /// Answers 101 with a wrong `Sec-WebSocket-Accept`.
    WrongAccept,
    /// Reads the request and closes without answering.
    CloseAtOnce,
    /// Answers 404: alive, refusing this request.
    NotFound,
}

/// A WebSocket endpoint on a fixed port, written by hand so a test can break it in every way: `kill` stops the listener (the port refuses) and resets every live connection, `restart` listens on
/// the same port again. A data frame `die-eof` makes it drop that connection without a Close; `die-close` makes
/// it send Close 4000 "broker says bye" first.
struct Broker {
    addr: SocketAddr,
    tag: &'static str,
    mode: Mode,
    reset: broadcast::Sender<()>,
    accept: Option<JoinHandle<()>>,
    upgrades: Arc<AtomicUsize>,
}

impl Broker {
    async fn start(tag: &'static str, mode: Mode) -> Broker {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (reset, _) = broadcast::channel(4);
        let mut b = Broker {
            addr,
            tag,
            mode,
            reset,
            accept: None,
            upgrades: Arc::new(AtomicUsize::new(0)),
        };
        b.serve(listener);
        b
    }

    fn url(&self) -> String {
        format!("ws://{}/", self.addr)
    }

    /// Stops listening (connects are refused) and resets every live connection.
    fn kill(&mut self) {
        if let Some(a) = self.accept.take() {
            a.abort();
        }
        self.reset_all();
    }

    /// Resets every live connection (SO_LINGER 0, then close: the gateway reads ECONNRESET).
    fn reset_all(&self) {
        let _ = self.reset.send(());
    }

    /// Listens on the same port again.
    async fn restart(&mut self) {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_reuseaddr(true).expect("reuseaddr");
        socket.bind(self.addr).expect("bind the same port");
        self.serve(socket.listen(128).expect("listen"));
    }

    fn serve(&mut self, listener: TcpListener) {
        let (mode, reset, tag, upgrades) = (
            self.mode,
            self.reset.clone(),
            self.tag,
            Arc::clone(&self.upgrades),
        );
        self.accept = Some(tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let mut reset = reset.subscribe();
                let upgrades = Arc::clone(&upgrades);
                // A second descriptor of the socket, to set SO_LINGER 0 on while the first one is being served.
                let Ok(std) = tcp.into_std() else { continue };
                let Ok(twin) = std.try_clone() else { continue };
                let (Ok(tcp), Ok(twin)) = (TcpStream::from_std(std), TcpStream::from_std(twin))
                else {
                    continue;
                };
                let mut serving = tokio::spawn(async move {
                    let mut tcp = tcp;
                    serve_one(&mut tcp, mode, tag, &upgrades).await;
                });
                tokio::spawn(async move {
                    tokio::select! {
                        _ = reset.recv() => {
                            let _ = twin.set_zero_linger();
                            serving.abort();
                        }
                        _ = &mut serving => {}
                    }
                });
            }
        }));
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn serve_one(s: &mut TcpStream, mode: Mode, tag: &str, upgrades: &AtomicUsize) {
    let mut head = Vec::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut b = [0u8; 4096];
        match s.read(&mut b).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&b[..n]),
        }
        if head.len() > 16 * 1024 {
            return;
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let header = |name: &str| {
        text.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    };
    let key = header("Sec-WebSocket-Key").unwrap_or_default();
    let protocol = header("Sec-WebSocket-Protocol")
        .and_then(|p| p.split(',').next().map(|p| p.trim().to_owned()));
    let accept = match mode {
        Mode::Hang => {
            std::future::pending::<()>().await;
            return;
        }
        Mode::CloseAtOnce => return,
        Mode::NotFound => {
            let _ = s
                .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                .await;
            return;
        }
        Mode::WrongAccept => "AAAAAAAAAAAAAAAAAAAAAAAAAAA=".to_owned(),
        Mode::Slow(d) => {
            tokio::time::sleep(d).await;
            ws_gateway::upgrade::accept_key(&key)
        }
        Mode::Echo => ws_gateway::upgrade::accept_key(&key),
    };
    let mut resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n"
    );
    if let Some(p) = protocol {
        resp.push_str(&format!("Sec-WebSocket-Protocol: {p}\r\n"));
    }
    resp.push_str("\r\n");
    if s.write_all(resp.as_bytes()).await.is_err() {
        return;
    }
    if mode == Mode::WrongAccept {
        std::future::pending::<()>().await;
    }
    upgrades.fetch_add(1, Ordering::Relaxed);
    let hello = encode(0x1, format!("hello from {tag}").as_bytes(), None);
    if s.write_all(&hello).await.is_err() {
        return;
    }
    let mut buf = Vec::new();
    loop {
        while let Ok(Some((f, used))) = decode(&buf, 1 << 20) {
            buf.drain(..used);
            match (f.opcode, f.payload.as_slice()) {
                (OP_CLOSE, _) => {
                    let _ = s.write_all(&close_frame(1000, "", None)).await;
                    let _ = s.shutdown().await;
                    return;
                }
                (_, b"die-eof") => {
                    let _ = s.shutdown().await;
                    let mut rest = Vec::new();
                    let _ = s.read_to_end(&mut rest).await;
                    return;
                }
                (_, b"die-close") => {
                    let _ = s
                        .write_all(&close_frame(4000, "broker says bye", None))
                        .await;
                    let _ = s.shutdown().await;
                    let mut rest = Vec::new();
                    let _ = s.read_to_end(&mut rest).await;
                    return;
                }
                (op, payload) => {
                    if s.write_all(&encode(op, payload, None)).await.is_err() {
                        return;
                    }
                }
            }
        }
        let mut b = [0u8; 4096];
        match s.read(&mut b).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&b[..n]),
        }
    }
}

/// A port that refuses connections (bound, then released).
fn refusing_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    format!("ws://{}/", l.local_addr().expect("addr"))
}

/// The usual flags with `urls` as the fallback upstream, plus `extra`.
fn args(env: &Env, urls: &[String], extra: &[&str]) -> Vec<String> {
    let mut a = env.args();
    let i = a
        .iter()
        .position(|x| x == "--upstream-ws-url")
        .expect("flag");
    a[i + 1] = urls.join(",");
    a.extend(extra.iter().map(|s| (*s).to_owned()));
    a
}

/// What one upgrade attempt got.
struct Attempt {
    status: u16,
    head: String,
    stream: TlsStream<TcpStream>,
    rest: Vec<u8>,
    took: Duration,
}

impl Attempt {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }

    /// The next frame from the gateway.
    async fn frame(&mut self) -> Frame {
        within(async {
            loop {
                if let Some((f, used)) = decode(&self.rest, 1 << 20).expect("valid frame") {
                    self.rest.drain(..used);
                    return f;
                }
                let mut b = [0u8; 4096];
                let n = self.stream.read(&mut b).await.expect("read");
                assert!(n > 0, "EOF before a whole frame");
                self.rest.extend_from_slice(&b[..n]);
            }
        })
        .await
    }

    /// Which broker answered: its greeting's tag.
    async fn tag(&mut self) -> String {
        let f = self.frame().await;
        let text = String::from_utf8_lossy(&f.payload).into_owned();
        text.strip_prefix("hello from ")
            .unwrap_or_else(|| panic!("expected a greeting, got {text:?}"))
            .to_owned()
    }

    async fn send(&mut self, payload: &[u8]) {
        within(
            self.stream
                .write_all(&encode(OP_BINARY, payload, Some([7, 7, 7, 7]))),
        )
        .await
        .expect("send");
    }

    /// Reads until the gateway's Close; returns its code and reason.
    async fn close(&mut self) -> (u16, String) {
        loop {
            let f = self.frame().await;
            if f.opcode == OP_CLOSE {
                return (
                    u16::from_be_bytes([f.payload[0], f.payload[1]]),
                    String::from_utf8_lossy(&f.payload[2..]).into_owned(),
                );
            }
        }
    }

    /// Answers a Close and reads until the gateway's clean end.
    async fn finish(mut self) {
        within(
            self.stream
                .write_all(&close_frame(1000, "", Some([1, 2, 3, 4]))),
        )
        .await
        .expect("answer");
        let mut tail = Vec::new();
        let _ = within(self.stream.read_to_end(&mut tail)).await;
    }
}

/// An upgrade with a token for `subject`.
async fn attempt(env: &Env, gw: &InProcess, subject: &str, extra: &str) -> Attempt {
    let token = env.signer.valid(subject, 300);
    let started = Instant::now();
    let (stream, head, rest) = raw_upgrade(
        &env.pki,
        gw.addr,
        "/mqtt",
        &format!("Authorization: Bearer {token}\r\n{extra}"),
    )
    .await;
    Attempt {
        status: status_of(&head),
        head,
        stream,
        rest,
        took: started.elapsed(),
    }
}

/// GET on the in-process gateway's admin listener: (status, body).
async fn admin_get(gw: &InProcess, path: &str) -> (u16, String) {
    let resp = within(async {
        let mut tcp = TcpStream::connect(gw.admin).await.expect("admin");
        tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
            .await
            .expect("write");
        let mut out = Vec::new();
        let _ = tcp.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    })
    .await;
    let body = resp
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status_of(&resp), body)
}

/// The value of the sample whose line starts with `series` (name and labels), 0 when absent.
async fn metric(gw: &InProcess, series: &str) -> f64 {
    let (_, text) = admin_get(gw, "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// Every failed dial so far, all endpoints and kinds.
async fn total_failures(gw: &InProcess) -> f64 {
    let (_, text) = admin_get(gw, "/metrics").await;
    text.lines()
        .filter(|l| l.starts_with("ws_upstream_failures_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until `ws_active_sessions` is `n` (sessions that ended gave back their endpoint lease).
async fn active_sessions(gw: &InProcess, n: f64) {
    within(async {
        while metric(gw, "ws_active_sessions ").await != n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

async fn stop(gw: InProcess) {
    let _ = gw.triggers.send(ws_gateway::Trigger::Shutdown).await;
    let _ = gw.triggers.send(ws_gateway::Trigger::Shutdown).await;
    let _ = within(gw.task).await;
}

#[tokio::test]
async fn two_endpoints_one_killed_every_new_session_succeeds_and_live_ones_read_1014() {
    let env = Env::new().await;
    let mut a = Broker::start("a", Mode::Echo).await;
    let b = Broker::start("b", Mode::Echo).await;
    let gw = InProcess::start(&args(
        &env,
        &[a.url(), b.url()],
        &[
            "--cb-failure-threshold",
            "3",
            "--cb-open-timeout-seconds",
            "60",
            "--ws-dial-retry-max",
            "1",
        ],
    ))
    .await;
    // Least connections: six held sessions, three on each.
    let mut held = Vec::new();
    for i in 0..6 {
        let mut s = attempt(&env, &gw, &format!("user-{i}"), "").await;
        assert_eq!(s.status, 101, "{}", s.head);
        let tag = s.tag().await;
        held.push((tag, s));
    }
    let on_a = held.iter().filter(|(t, _)| t == "a").count();
    assert_eq!(on_a, 3, "least connections spreads evenly");

    // Kill a: its live connections are reset, and their clients read Close 1014 at a frame boundary.
    a.kill();
    let mut survivors = Vec::new();
    for (tag, mut s) in held {
        if tag == "a" {
            assert_eq!(s.close().await, (1014, "bad gateway".to_owned()));
            s.finish().await;
        } else {
            survivors.push(s);
        }
    }
    active_sessions(&gw, 3.0).await;
    assert_eq!(
        metric(&gw, "ws_session_closes_total{reason=\"upstream_error\"}").await,
        3.0
    );

    // Every new session succeeds: a, now the least loaded, is tried first and fails at once until its breaker
    // opens (three failures), and each failure is retried on b.
    for i in 0..20 {
        let mut s = attempt(&env, &gw, &format!("new-{i}"), "").await;
        assert_eq!(s.status, 101, "session {i}: {}", s.head);
        assert_eq!(s.tag().await, "b");
        survivors.push(s);
    }
    assert_eq!(
        metric(&gw, "ws_circuit_open_total{route=\"/\",endpoint=\"0\"}").await,
        1.0
    );
    assert_eq!(
        metric(&gw, "ws_proxy_retries_total{route=\"/\"}").await,
        3.0
    );
    assert_eq!(
        metric(
            &gw,
            "ws_upstream_failures_total{route=\"/\",endpoint=\"0\",kind=\"connect\"}"
        )
        .await,
        3.0
    );
    assert_eq!(
        metric(&gw, "ws_upstream_health{route=\"/\",endpoint=\"0\"}").await,
        0.0
    );
    assert_eq!(
        metric(&gw, "ws_upstream_health{route=\"/\",endpoint=\"1\"}").await,
        1.0
    );
    drop(survivors);
    stop(gw).await;
}

#[tokio::test]
async fn both_down_every_attempt_fails_fast_then_one_back_recovers_within_the_open_time() {
    let env = Env::new().await;
    let mut a = Broker::start("a", Mode::Echo).await;
    let mut b = Broker::start("b", Mode::Echo).await;
    let gw = InProcess::start(&args(
        &env,
        &[a.url(), b.url()],
        &[
            "--cb-failure-threshold",
            "2",
            "--cb-open-timeout-seconds",
            "2",
            "--cb-healthcheck-interval-seconds",
            "1",
            "--ws-dial-retry-max",
            "2",
            "--ws-dial-retry-interval-seconds",
            "0.05",
            "--readiness-requires-upstream",
        ],
    ))
    .await;
    let mut s = attempt(&env, &gw, "alice", "").await;
    assert_eq!(s.status, 101);
    s.tag().await;
    s.finish().await;

    a.kill();
    b.kill();
    let mut statuses = Vec::new();
    let mut slowest = Duration::ZERO;
    for i in 0..10 {
        let s = attempt(&env, &gw, &format!("dev-{i}"), "").await;
        assert!(
            s.status == 502 || s.status == 503,
            "attempt {i}: {}",
            s.head
        );
        assert!(
            s.took < Duration::from_millis(1500),
            "attempt {i} took {:?}",
            s.took
        );
        if s.status == 503 {
            let after: u64 = s
                .header("Retry-After")
                .expect("Retry-After")
                .parse()
                .expect("seconds");
            assert!((1..=2).contains(&after), "Retry-After {after}");
        }
        slowest = slowest.max(s.took);
        statuses.push(s.status);
    }
    eprintln!("both down: statuses {statuses:?}, slowest answer {slowest:?}");
    assert_eq!(*statuses.last().expect("some"), 503, "{statuses:?}");
    // A 503 dials nothing.
    let before = total_failures(&gw).await;
    let s = attempt(&env, &gw, "dev-x", "").await;
    assert_eq!(s.status, 503, "{}", s.head);
    assert!(s.took < Duration::from_millis(500), "{:?}", s.took);
    assert_eq!(total_failures(&gw).await, before, "a 503 dials nothing");
    let (status, body) = admin_get(&gw, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("no healthy upstream endpoint for route /"),
        "{body}"
    );

    // One back on the same port: sessions succeed again within CB_OPEN_TIMEOUT_SECONDS + the check interval.
    a.restart().await;
    let back = Instant::now();
    let recovered = within(async {
        loop {
            let mut s = attempt(&env, &gw, "bob", "").await;
            if s.status == 101 {
                assert_eq!(s.tag().await, "a");
                s.finish().await;
                return back.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    eprintln!("one back: first session after {recovered:?}");
    assert!(
        recovered < Duration::from_secs(3) + Duration::from_millis(500),
        "{recovered:?}"
    );
    within(async {
        while admin_get(&gw, "/readyz").await.0 != 200 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    stop(gw).await;
}

#[tokio::test]
async fn hanging_slow_wrong_accept_and_silent_endpoints_are_absorbed_by_retries() {
    let env = Env::new().await;
    let hang = Broker::start("hang", Mode::Hang).await;
    let slow = Broker::start("slow", Mode::Slow(Duration::from_secs(3))).await;
    let wrong = Broker::start("wrong", Mode::WrongAccept).await;
    let silent = Broker::start("silent", Mode::CloseAtOnce).await;
    let good = Broker::start("good", Mode::Echo).await;
    let gw = InProcess::start(&args(
        &env,
        &[
            hang.url(),
            slow.url(),
            wrong.url(),
            silent.url(),
            good.url(),
        ],
        &[
            "--upstream-dial-timeout-seconds",
            "1",
            "--ws-dial-retry-max",
            "4",
            "--cb-failure-threshold",
            "1",
            "--cb-open-timeout-seconds",
            "60",
        ],
    ))
    .await;
    let mut took = Vec::new();
    for i in 0..6 {
        let mut s = attempt(&env, &gw, &format!("dev-{i}"), "").await;
        assert_eq!(s.status, 101, "session {i}: {}", s.head);
        assert_eq!(s.tag().await, "good");
        took.push(s.took);
        s.finish().await;
    }
    eprintln!("upgrade times: {took:?}");
    // Each bad endpoint failed once and its breaker opened: the last sessions go straight to the good one.
    assert!(took[5] < Duration::from_millis(500), "{took:?}");
    for (endpoint, kind) in [
        ("0", "timeout"),
        ("1", "timeout"),
        ("2", "handshake"),
        ("3", "handshake"),
    ] {
        let series = format!(
            "ws_upstream_failures_total{{route=\"/\",endpoint=\"{endpoint}\",kind=\"{kind}\"}}"
        );
        assert_eq!(metric(&gw, &series).await, 1.0, "{series}");
        assert_eq!(
            metric(
                &gw,
                &format!("ws_circuit_open_total{{route=\"/\",endpoint=\"{endpoint}\"}}")
            )
            .await,
            1.0
        );
    }
    assert_eq!(good.upgrades.load(Ordering::Relaxed), 6);
    stop(gw).await;
}

#[tokio::test]
async fn without_health_checks_a_trial_after_the_open_time_closes_the_breaker() {
    let env = Env::new().await;
    let mut a = Broker::start("a", Mode::Echo).await;
    let gw = InProcess::start(&args(
        &env,
        &[a.url()],
        &[
            "--cb-failure-threshold",
            "1",
            "--cb-open-timeout-seconds",
            "1",
        ],
    ))
    .await;
    a.kill();
    assert_eq!(attempt(&env, &gw, "alice", "").await.status, 502);
    let s = attempt(&env, &gw, "alice", "").await;
    assert_eq!(s.status, 503, "{}", s.head);
    assert_eq!(s.header("Retry-After").as_deref(), Some("1"));
    a.restart().await;
    let back = Instant::now();
    let recovered = within(async {
        loop {
            let mut s = attempt(&env, &gw, "alice", "").await;
            if s.status == 101 {
                assert_eq!(s.tag().await, "a");
                s.finish().await;
                return back.elapsed();
            }
            assert_eq!(s.status, 503, "no dial while open: {}", s.head);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    eprintln!("recovered through a trial after {recovered:?}");
    assert!(recovered < Duration::from_secs(2), "{recovered:?}");
    assert_eq!(
        metric(&gw, "ws_circuit_open_total{route=\"/\",endpoint=\"0\"}").await,
        1.0
    );
    stop(gw).await;
}

#[tokio::test]
async fn a_4xx_answer_is_the_requests_fault_not_retried_and_opens_no_breaker() {
    let env = Env::new().await;
    let refusing = Broker::start("404", Mode::NotFound).await;
    let gw = InProcess::start(&args(
        &env,
        &[refusing.url()],
        &["--cb-failure-threshold", "1"],
    ))
    .await;
    for _ in 0..4 {
        let s = attempt(&env, &gw, "alice", "").await;
        assert_eq!(s.status, 502, "{}", s.head);
    }
    assert_eq!(
        metric(&gw, "ws_circuit_open_total{route=\"/\",endpoint=\"0\"}").await,
        0.0
    );
    assert_eq!(
        metric(&gw, "ws_proxy_retries_total{route=\"/\"}").await,
        0.0
    );
    assert_eq!(
        metric(
            &gw,
            "ws_upstream_failures_total{route=\"/\",endpoint=\"0\",kind=\"status\"}"
        )
        .await,
        4.0
    );
    stop(gw).await;
}

#[tokio::test]
async fn the_whole_dial_stays_inside_the_handshake_deadline() {
    let env = Env::new().await;
    let hang = Broker::start("hang", Mode::Hang).await;
    let also = Broker::start("also", Mode::Hang).await;
    let gw = InProcess::start(&args(
        &env,
        &[hang.url(), also.url()],
        &[
            "--handshake-timeout-seconds",
            "2",
            "--upstream-dial-timeout-seconds",
            "5",
            "--ws-dial-retry-max",
            "3",
            "--cb-failure-threshold",
            "1",
        ],
    ))
    .await;
    let s = attempt(&env, &gw, "alice", "").await;
    assert_eq!(s.status, 502, "{}", s.head);
    eprintln!("502 after {:?}", s.took);
    assert!(
        s.took >= Duration::from_millis(1500) && s.took < Duration::from_millis(2800),
        "{:?}",
        s.took
    );
    // The client's deadline cut the dial short: not the endpoints' fault, so no breaker opened.
    assert_eq!(
        metric(&gw, "ws_circuit_open_total{route=\"/\",endpoint=\"0\"}").await,
        0.0
    );
    assert_eq!(
        metric(&gw, "ws_circuit_open_total{route=\"/\",endpoint=\"1\"}").await,
        0.0
    );
    stop(gw).await;
}

#[tokio::test]
async fn an_upstream_that_ends_without_a_close_gives_1014_and_its_own_close_passes_unchanged() {
    let env = Env::new().await;
    let broker = Broker::start("a", Mode::Echo).await;
    let gw = InProcess::start(&args(&env, &[broker.url()], &[])).await;

    let mut s = attempt(&env, &gw, "alice", "").await;
    assert_eq!(s.tag().await, "a");
    s.send(b"ping").await;
    assert_eq!(s.frame().await.payload, b"ping");
    s.send(b"die-eof").await;
    assert_eq!(s.close().await, (1014, "bad gateway".to_owned()));
    s.finish().await;

    let mut s = attempt(&env, &gw, "bob", "").await;
    assert_eq!(s.tag().await, "a");
    s.send(b"die-close").await;
    assert_eq!(s.close().await, (4000, "broker says bye".to_owned()));
    s.finish().await;

    active_sessions(&gw, 0.0).await;
    assert_eq!(
        metric(&gw, "ws_session_closes_total{reason=\"upstream_eof\"}").await,
        1.0
    );
    assert_eq!(
        metric(&gw, "ws_session_closes_total{reason=\"closed\"}").await,
        1.0
    );
    stop(gw).await;
}

#[tokio::test]
async fn hash_subject_keeps_each_subject_on_its_endpoint_and_moves_only_the_dead_ones() {
    let env = Env::new().await;
    let mut brokers = [
        Broker::start("a", Mode::Echo).await,
        Broker::start("b", Mode::Echo).await,
        Broker::start("c", Mode::Echo).await,
    ];
    let urls: Vec<String> = brokers.iter().map(Broker::url).collect();
    let gw = InProcess::start(&args(
        &env,
        &urls,
        &[
            "--upstream-balance",
            "hash-subject",
            "--cb-healthcheck-interval-seconds",
            "1",
            "--cb-open-timeout-seconds",
            "60",
        ],
    ))
    .await;
    let subjects: Vec<String> = (0..12).map(|i| format!("device-{i}")).collect();
    let mut home = std::collections::HashMap::new();
    for sub in &subjects {
        for round in 0..3 {
            let mut s = attempt(&env, &gw, sub, "").await;
            let tag = s.tag().await;
            s.finish().await;
            let first = home.entry(sub.clone()).or_insert_with(|| tag.clone());
            assert_eq!(*first, tag, "{sub} moved in round {round}");
        }
    }
    let used: std::collections::HashSet<&String> = home.values().collect();
    assert!(used.len() >= 2, "12 subjects on one endpoint: {home:?}");

    // Kill one endpoint: its subjects move (and stay together where they went), the others do not move.
    let victim = home.values().next().expect("one").clone();
    let i = brokers
        .iter()
        .position(|b| b.tag == victim)
        .expect("broker");
    brokers[i].kill();
    let mut moved_to = std::collections::HashMap::new();
    for sub in &subjects {
        for _ in 0..2 {
            let mut s = attempt(&env, &gw, sub, "").await;
            assert_eq!(s.status, 101, "{sub}: {}", s.head);
            let tag = s.tag().await;
            s.finish().await;
            if home[sub] == victim {
                assert_ne!(tag, victim);
                let first = moved_to.entry(sub.clone()).or_insert_with(|| tag.clone());
                assert_eq!(*first, tag, "{sub} keeps its second choice");
            } else {
                assert_eq!(tag, home[sub], "{sub} moved though its endpoint is up");
            }
        }
    }
    // Back on the same port: the health check closes its breaker, and its subjects come home.
    brokers[i].restart().await;
    let sub = home
        .iter()
        .find(|(_, t)| **t == victim)
        .map(|(s, _)| s.clone())
        .expect("a subject of the victim");
    within(async {
        loop {
            let mut s = attempt(&env, &gw, &sub, "").await;
            let tag = s.tag().await;
            s.finish().await;
            if tag == victim {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    stop(gw).await;
}

/// An MQTT CONNECT (client id `id`, clean session off) as a masked binary frame, with the token as password when
/// given.
fn connect_frame(level: u8, id: &str, password: Option<&str>) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', level];
    body.push(if password.is_some() { 0xc0 } else { 0x00 });
    body.extend_from_slice(&[0, 60]);
    if level == 5 {
        // Session Expiry Interval: one hour, so an MQTT 5 session outlives the connection.
        body.extend_from_slice(&[5, 0x11, 0, 0, 0x0e, 0x10]);
    }
    for f in [Some(id), password.map(|_| "user"), password]
        .into_iter()
        .flatten()
    {
        body.extend_from_slice(&(f.len() as u16).to_be_bytes());
        body.extend_from_slice(f.as_bytes());
    }
    packet(0x10, &body)
}

fn ws(payload: &[u8]) -> Vec<u8> {
    encode(OP_BINARY, payload, Some([3, 1, 4, 1]))
}

#[tokio::test]
async fn the_mqtt_connect_path_with_every_endpoint_down_gets_connack_unavailable() {
    let env = Env::new().await;
    let gw = InProcess::start(&args(
        &env,
        &[refusing_url(), refusing_url()],
        &[
            "--cb-failure-threshold",
            "1",
            "--cb-open-timeout-seconds",
            "60",
        ],
    ))
    .await;
    // First the dials fail (both endpoints, one retry): CONNACK 3 and Close 1014. Then every breaker is open:
    // CONNACK 3 (3.1.1) or 0x88 (5) and Close 1013 at once.
    for (level, connack, code) in [
        (4u8, vec![0x20, 0x02, 0x00, 0x03], 1014u16),
        (4, vec![0x20, 0x02, 0x00, 0x03], 1013),
        (5, vec![0x20, 0x03, 0x00, 0x88, 0x00], 1013),
    ] {
        let (mut s, head, rest) = raw_upgrade(
            &env.pki,
            gw.addr,
            "/mqtt",
            "Sec-WebSocket-Protocol: mqtt\r\n",
        )
        .await;
        assert_eq!(status_of(&head), 101, "{head}");
        let token = env.token();
        within(s.write_all(&ws(&connect_frame(level, "dev-1", Some(&token)))))
            .await
            .expect("write");
        let (frames, close) = frames_until_close(&mut s, rest).await;
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].payload, connack, "level {level}");
        assert_eq!(close, code, "level {level}");
    }
    stop(gw).await;
}

/// Reads MQTT packets from WebSocket frames until one of type `kind` (high nibble); returns its bytes.
async fn mqtt_read(s: &mut TlsStream<TcpStream>, buf: &mut Vec<u8>, kind: u8) -> Vec<u8> {
    let mut payload = Vec::new();
    within(async {
        loop {
            while let Some((f, used)) = decode(buf, 1 << 20).expect("valid frame") {
                buf.drain(..used);
                assert_ne!(f.opcode, OP_CLOSE, "closed: {:?}", f.payload);
                payload.extend_from_slice(&f.payload);
            }
            while payload.len() >= 2 {
                let len = usize::from(payload[1]);
                assert!(len < 128, "short packets only");
                if payload.len() < 2 + len {
                    break;
                }
                let packet: Vec<u8> = payload.drain(..2 + len).collect();
                if packet[0] >> 4 == kind {
                    return packet;
                }
            }
            let mut b = [0u8; 4096];
            let n = s.read(&mut b).await.expect("read");
            assert!(n > 0, "EOF");
            buf.extend_from_slice(&b[..n]);
        }
    })
    .await
}

/// Through the gateway as `subject`: CONNECT with clean session off; returns the CONNACK's session-present flag.
/// With `subscribe`, subscribes at QoS 1 first. Always disconnects cleanly.
async fn mqtt_session(env: &Env, gw: &InProcess, subject: &str, subscribe: bool) -> bool {
    let token = env.signer.valid(subject, 300);
    let (mut s, head, mut buf) = raw_upgrade(
        &env.pki,
        gw.addr,
        "/mqtt",
        &format!("Authorization: Bearer {token}\r\nSec-WebSocket-Protocol: mqtt\r\n"),
    )
    .await;
    assert_eq!(status_of(&head), 101, "{head}");
    within(s.write_all(&ws(&connect_frame(4, subject, None))))
        .await
        .expect("connect");
    let connack = mqtt_read(&mut s, &mut buf, 2).await;
    assert_eq!(connack[3], 0, "accepted: {connack:?}");
    let present = connack[2] & 1 == 1;
    if subscribe {
        let topic = format!("t/{subject}");
        let mut body = vec![0, 1];
        body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        body.extend_from_slice(topic.as_bytes());
        body.push(1);
        within(s.write_all(&ws(&packet(0x82, &body))))
            .await
            .expect("subscribe");
        let suback = mqtt_read(&mut s, &mut buf, 9).await;
        assert_eq!(suback.last(), Some(&1), "granted QoS 1: {suback:?}");
    }
    within(s.write_all(&ws(&[0xe0, 0x00])))
        .await
        .expect("disconnect");
    within(s.write_all(&close_frame(1000, "", Some([1, 2, 3, 4]))))
        .await
        .expect("close");
    let mut tail = Vec::new();
    let _ = within(s.read_to_end(&mut tail)).await;
    present
}

/// Straight to a broker's plain MQTT port: whether it holds a persistent session for `client_id`.
async fn holds_session(broker: SocketAddr, client_id: &str) -> bool {
    within(async {
        let mut tcp = TcpStream::connect(broker).await.expect("connect");
        tcp.write_all(&connect_frame(4, client_id, None))
            .await
            .expect("write");
        let mut connack = [0u8; 4];
        tcp.read_exact(&mut connack).await.expect("connack");
        assert_eq!(connack[..2], [0x20, 0x02]);
        let _ = tcp.write_all(&[0xe0, 0x00]).await;
        connack[2] & 1 == 1
    })
    .await
}

#[tokio::test]
async fn two_mosquitto_brokers_behind_one_route_keep_each_devices_persistent_session_with_hash_subject(
) {
    let env = Env::new().await;
    let one = Mosquitto::start().await;
    let two = Mosquitto::start().await;
    let urls = [
        format!("ws://{}/mqtt", one.ws),
        format!("ws://{}/mqtt", two.ws),
    ];
    let gw = InProcess::start(&args(&env, &urls, &["--upstream-balance", "hash-subject"])).await;
    let devices: Vec<String> = (0..8).map(|i| format!("device-{i}")).collect();
    for d in &devices {
        assert!(
            !mqtt_session(&env, &gw, d, true).await,
            "{d}: a new session"
        );
        // Every reconnect lands on the broker that holds the device's session.
        for round in 0..3 {
            assert!(
                mqtt_session(&env, &gw, d, false).await,
                "{d} lost its session in round {round}: it reached the other broker"
            );
        }
    }
    // Each device's session is on exactly one broker, and the devices use both.
    let mut on_one = 0;
    for d in &devices {
        let (a, b) = (
            holds_session(one.mqtt, d).await,
            holds_session(two.mqtt, d).await,
        );
        assert!(a != b, "{d}: on one broker: {a} {b}");
        on_one += usize::from(a);
    }
    assert!(
        on_one > 0 && on_one < devices.len(),
        "{on_one} of {} on one broker",
        devices.len()
    );
    stop(gw).await;
}
