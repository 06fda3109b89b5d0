//! The echo upstream of `churn`: the echo of `ws_gateway::dev::echo_server`, plus one command that makes it reset
//! its side abruptly (SO_LINGER 0, then close: the gateway reads ECONNRESET), and counters of its live connections,
//! so a run can check that the gateway let go of every upstream socket too.
//!
//! Kept out of the library on purpose: resetting on request is a test hook, not something the dev echo should do.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use ws_gateway::frame::{self, OP_CLOSE, OP_PING, OP_PONG};
use ws_gateway::upgrade::accept_key;

/// A data frame with exactly this payload makes the upstream reset the connection instead of echoing.
pub(crate) const RESET_COMMAND: &[u8] = b"churn:reset-upstream";
/// Largest request head accepted.
const MAX_HEAD: usize = 16 * 1024;
/// Largest frame accepted (the churn client sends a few bytes).
const MAX_FRAME: usize = 1 << 20;
/// Time allowed for the gateway's upgrade request to arrive.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// What the upstream saw.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    /// Connections accepted.
    pub(crate) accepted: AtomicU64,
    /// Connections ended (by any path).
    pub(crate) ended: AtomicU64,
    /// Connections reset on [`RESET_COMMAND`].
    pub(crate) resets: AtomicU64,
    /// Accept errors (the listener backs off 50 ms after each).
    pub(crate) accept_errors: AtomicU64,
}

impl Stats {
    /// Connections open now.
    pub(crate) fn live(&self) -> u64 {
        let accepted = self.accepted.load(Ordering::Relaxed);
        accepted.saturating_sub(self.ended.load(Ordering::Relaxed))
    }
}

/// Counts its connection out when dropped, whatever path ended it.
struct Live(Arc<Stats>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.ended.fetch_add(1, Ordering::Relaxed);
    }
}

/// Binds the upstream on a loopback address.
pub(crate) async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    if !addr.ip().is_loopback() {
        return Err(format!("--upstream-listen {addr}: loopback addresses only"));
    }
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("binding the upstream on {addr}: {e}"))
}

/// Serves until the task is aborted (the caller owns its lifetime).
pub(crate) async fn serve(listener: TcpListener, stats: Arc<Stats>) {
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => {
                stats.accepted.fetch_add(1, Ordering::Relaxed);
                let live = Live(Arc::clone(&stats));
                tokio::spawn(async move {
                    let _ = connection(tcp, &live.0).await;
                    drop(live);
                });
            }
            Err(_) => {
                // EMFILE and friends: back off instead of spinning.
                stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn connection(mut tcp: TcpStream, stats: &Stats) -> std::io::Result<()> {
    let _ = tcp.set_nodelay(true);
    let Ok(head) = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut tcp)).await else {
        return Ok(());
    };
    let Some((key, mut buf)) = head? else {
        tcp.write_all(
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await?;
        return Ok(());
    };
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        accept_key(&key)
    );
    tcp.write_all(resp.as_bytes()).await?;
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        while let Some((f, used)) = frame::decode(&buf, MAX_FRAME)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?
        {
            buf.drain(..used);
            let reply = match f.opcode {
                OP_PING => frame::encode(OP_PONG, &f.payload, None),
                OP_PONG => continue,
                OP_CLOSE => {
                    // Answer the Close and close first, so TIME_WAIT lands on this side (the listening port)
                    // rather than on one of the gateway's ephemeral ports.
                    tcp.write_all(&frame::encode(OP_CLOSE, &f.payload, None))
                        .await?;
                    return Ok(());
                }
                _ if f.payload == RESET_COMMAND => {
                    tcp.set_zero_linger()?;
                    stats.resets.fetch_add(1, Ordering::Relaxed);
                    // Dropping the socket with SO_LINGER 0 sends RST and discards anything unsent.
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

/// Reads the upgrade request: `Some((Sec-WebSocket-Key, bytes after the head))`, or `None` for anything that is
/// not a WebSocket upgrade.
async fn read_head(tcp: &mut TcpStream) -> std::io::Result<Option<(String, Vec<u8>)>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = tcp.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(used)) => {
                let key = req
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("Sec-WebSocket-Key"))
                    .and_then(|h| std::str::from_utf8(h.value).ok())
                    .map(|k| k.trim().to_owned());
                return Ok(key.map(|k| (k, buf.split_off(used))));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            _ => return Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn upgraded(addr: SocketAddr) -> TcpStream {
        let mut c = TcpStream::connect(addr).await.expect("connect");
        c.write_all(
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .expect("request");
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            c.read_exact(&mut b).await.expect("head");
            head.push(b[0]);
        }
        assert!(head.starts_with(b"HTTP/1.1 101"));
        c
    }

    #[tokio::test]
    async fn echoes_then_resets_on_command() {
        let listener = bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stats = Arc::new(Stats::default());
        let server = tokio::spawn(serve(listener, Arc::clone(&stats)));
        let step = Duration::from_secs(5);

        let mut c = upgraded(addr).await;
        c.write_all(&frame::encode(frame::OP_BINARY, b"hi", Some([1, 2, 3, 4])))
            .await
            .expect("send");
        let mut echo = [0u8; 4];
        tokio::time::timeout(step, c.read_exact(&mut echo))
            .await
            .expect("in time")
            .expect("echo");
        assert_eq!(&echo, b"\x82\x02hi");

        c.write_all(&frame::encode(
            frame::OP_BINARY,
            RESET_COMMAND,
            Some([5, 6, 7, 8]),
        ))
        .await
        .expect("send");
        let mut rest = Vec::new();
        let got = tokio::time::timeout(step, c.read_to_end(&mut rest))
            .await
            .expect("in time");
        assert_eq!(
            got.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::ConnectionReset)
        );
        let waited = tokio::time::timeout(step, async {
            while stats.live() != 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(waited.is_ok(), "the connection is counted out");
        assert_eq!(stats.resets.load(Ordering::Relaxed), 1);
        server.abort();
    }
}
