//! A minimal WebSocket client for trying the gateway: `cargo run --example client -- [--ca FILE] URL TOKEN [MSG...]`.
//!
//! It upgrades with `Authorization: Bearer TOKEN`, sends each MSG as a text frame, prints what comes back, and
//! closes. `--dev` prints this command, with its certificate as `--ca`, ready to paste.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use ws_gateway::frame::{self, decode, encode, OP_CLOSE};
use ws_gateway::net::Url;
use ws_gateway::upstream::{handshake, Handshake, UpstreamRequest};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let ca = match args.iter().position(|a| a == "--ca") {
        Some(i) => {
            let path = args.get(i + 1).cloned().context("--ca needs a file")?;
            args.drain(i..i + 2);
            Some(path)
        }
        None => None,
    };
    if args.len() < 2 {
        bail!("usage: client [--ca FILE] URL TOKEN [MESSAGE...]");
    }
    let url = Url::parse_ws(&args[0]).map_err(anyhow::Error::msg)?;
    let token = args[1].clone();
    let messages: Vec<String> = if args.len() > 2 {
        args[2..].to_vec()
    } else {
        vec!["hello".into()]
    };

    let tcp = TcpStream::connect((url.host.as_str(), url.port))
        .await
        .context("connecting")?;
    if url.secure {
        let tls = ws_gateway::tls::client_config(ca.as_deref().map(std::path::Path::new))
            .map_err(anyhow::Error::msg)?;
        let name = ServerName::try_from(url.host.clone()).context("server name")?;
        let stream = tokio_rustls::TlsConnector::from(Arc::clone(&tls))
            .connect(name, tcp)
            .await
            .context("TLS handshake")?;
        session(stream, &url, &token, &messages).await
    } else {
        session(tcp, &url, &token, &messages).await
    }
}

async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    url: &Url,
    token: &str,
    messages: &[String],
) -> anyhow::Result<()> {
    let req = UpstreamRequest::client(url, &[("Authorization", &format!("Bearer {token}"))], &[]);
    let answer = tokio::time::timeout(Duration::from_secs(10), handshake(&mut s, &req))
        .await
        .context("no answer")?;
    let Handshake { response, rest, .. } = match answer {
        Ok(h) => h,
        Err(e) => bail!("upgrade refused: {e}"),
    };
    let head = String::from_utf8_lossy(&response).into_owned();
    println!("connected: {}", head.lines().next().unwrap_or_default());
    let mut buf = rest;
    let mut chunk = [0u8; 8192];
    for m in messages {
        s.write_all(&encode(0x1, m.as_bytes(), Some(rand_mask())))
            .await?;
    }
    s.write_all(&frame::close_frame(1000, "bye", Some(rand_mask())))
        .await?;
    loop {
        while let Some((f, used)) = decode(&buf, 16 << 20).map_err(anyhow::Error::msg)? {
            buf.drain(..used);
            if f.opcode == OP_CLOSE {
                let code = f
                    .payload
                    .get(..2)
                    .map_or(1005, |c| u16::from_be_bytes([c[0], c[1]]));
                println!(
                    "closed: {code} {}",
                    String::from_utf8_lossy(f.payload.get(2..).unwrap_or_default())
                );
                return Ok(());
            }
            println!("received: {}", String::from_utf8_lossy(&f.payload));
        }
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .context("no echo")??;
        if n == 0 {
            println!("connection closed");
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn rand_mask() -> [u8; 4] {
    let mut b = [0u8; 4];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).unwrap_or_default();
    b
}
