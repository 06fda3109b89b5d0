//! How fast a revocation reaches every replica: opens N sessions spread over several gateways, revokes their
//! subject through one gateway's admin API, and measures, per session, the time from the API call until its
//! Close 1008 arrives. Driven by `scripts/fanout.sh`, which starts Redis or PostgreSQL, two gateways and an echo
//! upstream on loopback.
//!
//! `revocation_fanout --ca FILE --token JWT --sub SUB --admin http://HOST:PORT --admin-token SECRET
//!  --sessions N wss://HOST:PORT/ [wss://HOST:PORT/ ...]`
//!
//! Prints one line per gateway and `RESULT {json}`; exits non-zero when a session did not get its Close in 10 s.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use ws_gateway::frame::{decode, OP_CLOSE};
use ws_gateway::net::Url;
use ws_gateway::upstream::{handshake, UpstreamRequest};

struct Args {
    ca: String,
    token: String,
    sub: String,
    admin: String,
    admin_token: String,
    sessions: usize,
    gateways: Vec<Url>,
}

fn args() -> anyhow::Result<Args> {
    let mut it = std::env::args().skip(1);
    let (mut ca, mut token, mut sub, mut admin, mut admin_token) = (None, None, None, None, None);
    let mut sessions = 1000;
    let mut gateways = Vec::new();
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--ca" => ca = Some(value()?),
            "--token" => token = Some(value()?),
            "--sub" => sub = Some(value()?),
            "--admin" => admin = Some(value()?),
            "--admin-token" => admin_token = Some(value()?),
            "--sessions" => sessions = value()?.parse().context("--sessions")?,
            url => gateways.push(Url::parse_ws(url).map_err(anyhow::Error::msg)?),
        }
    }
    if gateways.is_empty() || !(1..=9000).contains(&sessions) {
        bail!("usage: see the file's header (1 to 9,000 sessions, at least one gateway)");
    }
    Ok(Args {
        ca: ca.context("--ca")?,
        token: token.context("--token")?,
        sub: sub.context("--sub")?,
        admin: admin.context("--admin")?,
        admin_token: admin_token.context("--admin-token")?,
        sessions,
        gateways,
    })
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// A TLS WebSocket session through `url`, after its 101 (and any greeting the upstream sends).
async fn open(url: &Url, tls: &Arc<rustls::ClientConfig>, token: &str) -> anyhow::Result<Tls> {
    let tcp = TcpStream::connect((url.host.as_str(), url.port)).await?;
    let name = ServerName::try_from(url.host.clone())?;
    let mut s = tokio_rustls::TlsConnector::from(Arc::clone(tls))
        .connect(name, tcp)
        .await?;
    let req = UpstreamRequest::client(url, &[("Authorization", &format!("Bearer {token}"))], &[]);
    handshake(&mut s, &req)
        .await
        .map_err(|e| anyhow::anyhow!("upgrade refused: {e}"))?;
    Ok(s)
}

/// Reads until a Close frame; its code.
async fn close_code(s: &mut Tls) -> anyhow::Result<u16> {
    let mut buf = Vec::new();
    loop {
        while let Some((f, used)) = decode(&buf, 1 << 20).map_err(anyhow::Error::msg)? {
            buf.drain(..used);
            if f.opcode == OP_CLOSE {
                return Ok(u16::from_be_bytes([f.payload[0], f.payload[1]]));
            }
        }
        let mut b = [0u8; 4096];
        let n = s.read(&mut b).await?;
        if n == 0 {
            bail!("EOF before a Close");
        }
        buf.extend_from_slice(&b[..n]);
    }
}

/// `POST /admin/revoke {"sub": …}` over plain HTTP/1.1; the status.
async fn revoke(admin: &str, secret: &str, sub: &str) -> anyhow::Result<u16> {
    let url = Url::parse_http(admin).map_err(anyhow::Error::msg)?;
    let mut tcp = TcpStream::connect((url.host.as_str(), url.port)).await?;
    let body = serde_json::json!({ "sub": sub, "reason": "fan-out benchmark" }).to_string();
    let req = format!(
        "POST /admin/revoke HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {secret}\r\nContent-Type: application/json\r\n\
Content-Length: {}\r\n\r\n{body}",
        url.authority,
        body.len()
    );
    tcp.write_all(req.as_bytes()).await?;
    let mut out = Vec::new();
    tcp.read_to_end(&mut out).await?;
    let text = String::from_utf8_lossy(&out);
    Ok(text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    let tls = ws_gateway::tls::client_config(Some(std::path::Path::new(&a.ca)))
        .map_err(anyhow::Error::msg)?;
    // Open the sessions, 50 at a time, round-robin over the gateways.
    let permits = Arc::new(tokio::sync::Semaphore::new(50));
    let mut opening = Vec::new();
    for i in 0..a.sessions {
        let url = a.gateways[i % a.gateways.len()].clone();
        let (tls, token, permits) = (Arc::clone(&tls), a.token.clone(), Arc::clone(&permits));
        opening.push(tokio::spawn(async move {
            let _p = permits.acquire().await;
            tokio::time::timeout(Duration::from_secs(10), open(&url, &tls, &token)).await
        }));
    }
    let mut sessions = Vec::new();
    for (i, h) in opening.into_iter().enumerate() {
        let s = h.await?.context("open timed out")??;
        sessions.push((i % a.gateways.len(), s));
    }
    eprintln!(
        "{} sessions open; revoking sub={} through {}",
        sessions.len(),
        a.sub,
        a.admin
    );
    let start = Instant::now();
    let waits: Vec<_> = sessions
        .into_iter()
        .map(|(g, mut s)| {
            tokio::spawn(async move {
                let code = tokio::time::timeout(Duration::from_secs(10), close_code(&mut s)).await;
                (g, code, start.elapsed())
            })
        })
        .collect();
    let status = revoke(&a.admin, &a.admin_token, &a.sub).await?;
    let api_ms = start.elapsed().as_secs_f64() * 1000.0;
    let mut per: Vec<Vec<f64>> = vec![Vec::new(); a.gateways.len()];
    let mut failures = 0;
    for w in waits {
        let (g, code, took) = w.await?;
        match code {
            Ok(Ok(1008)) => per[g].push(took.as_secs_f64() * 1000.0),
            _ => failures += 1,
        }
    }
    let mut all: Vec<f64> = per.iter().flatten().copied().collect();
    all.sort_by(f64::total_cmp);
    for (g, v) in per.iter_mut().enumerate() {
        v.sort_by(f64::total_cmp);
        println!(
            "gateway {} ({}): {} closed with 1008; ms after the API call: p50 {:.1}, p99 {:.1}, max {:.1}",
            g,
            a.gateways[g].authority,
            v.len(),
            percentile(v, 0.5),
            percentile(v, 0.99),
            v.last().copied().unwrap_or(f64::NAN)
        );
    }
    println!(
        "RESULT {}",
        serde_json::json!({
            "sessions": a.sessions, "gateways": a.gateways.len(), "api_status": status,
            "api_ms": api_ms, "closed": all.len(), "failures": failures,
            "p50_ms": percentile(&all, 0.5), "p99_ms": percentile(&all, 0.99),
            "max_ms": all.last().copied().unwrap_or(f64::NAN),
            "per_gateway_max_ms": per.iter().map(|v| v.last().copied().unwrap_or(f64::NAN)).collect::<Vec<_>>(),
        })
    );
    if failures > 0 || status != 200 {
        bail!("{failures} sessions did not get Close 1008 in time (API status {status})");
    }
    Ok(())
}
