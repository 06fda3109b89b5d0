//! PROXY protocol v1 and v2 (HAProxy's spec), read before TLS from trusted peers only, so client addresses survive
//! a TLS-passthrough load balancer. A header from an untrusted peer, or a malformed one, ends the connection.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

const V2_SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];
/// Longest v1 header, CRLF included.
const V1_MAX: usize = 107;
/// Largest v2 address block accepted (TLVs included).
const V2_MAX: usize = 1024;

/// An IPv4 or IPv6 network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, p) = s.trim().split_once('/').unwrap_or((s.trim(), ""));
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("`{s}` is not an IP network"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if p.is_empty() {
            max
        } else {
            p.parse::<u8>()
                .map_err(|_| format!("`{s}`: bad prefix length"))?
        };
        if prefix > max {
            return Err(format!("`{s}`: prefix longer than {max}"));
        }
        Ok(Cidr { addr, prefix })
    }
}

impl Cidr {
    /// Whether `ip` is inside this network (IPv4-mapped IPv6 addresses count as IPv4).
    #[must_use]
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// A PROXY header that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyError {
    /// Not a PROXY header at all.
    #[error("missing PROXY protocol header")]
    Missing,
    /// A header that breaks the spec.
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(&'static str),
}

/// Parses a header at the start of `buf`: `Ok(None)` when more bytes are needed; else the source address (`None`
/// for `UNKNOWN`/`LOCAL`, meaning "use the peer address") and the header length.
///
/// # Errors
/// See [`ProxyError`].
pub fn parse(buf: &[u8]) -> Result<Option<(Option<SocketAddr>, usize)>, ProxyError> {
    if buf.starts_with(b"PROXY ") {
        return parse_v1(buf);
    }
    if buf.len() >= 12 && buf[..12] == V2_SIGNATURE {
        return parse_v2(buf);
    }
    if b"PROXY ".starts_with(&buf[..buf.len().min(6)])
        || V2_SIGNATURE.starts_with(&buf[..buf.len().min(12)])
    {
        return Ok(None);
    }
    Err(ProxyError::Missing)
}

fn parse_v1(buf: &[u8]) -> Result<Option<(Option<SocketAddr>, usize)>, ProxyError> {
    let Some(end) = buf.windows(2).take(V1_MAX - 1).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Err(ProxyError::Malformed("v1 line too long"))
        } else {
            Ok(None)
        };
    };
    let line =
        std::str::from_utf8(&buf[..end]).map_err(|_| ProxyError::Malformed("v1 not ASCII"))?;
    let parts: Vec<&str> = line.split(' ').collect();
    let addr = match parts.as_slice() {
        ["PROXY", "UNKNOWN", ..] => None,
        ["PROXY", fam @ ("TCP4" | "TCP6"), src, _dst, sport, _dport] => {
            let ip: IpAddr = src
                .parse()
                .map_err(|_| ProxyError::Malformed("v1 source address"))?;
            if (*fam == "TCP4") != ip.is_ipv4() {
                return Err(ProxyError::Malformed("v1 family does not match address"));
            }
            let port: u16 = sport
                .parse()
                .map_err(|_| ProxyError::Malformed("v1 source port"))?;
            Some(SocketAddr::new(ip, port))
        }
        _ => return Err(ProxyError::Malformed("v1 fields")),
    };
    Ok(Some((addr, end + 2)))
}

fn parse_v2(buf: &[u8]) -> Result<Option<(Option<SocketAddr>, usize)>, ProxyError> {
    if buf.len() < 16 {
        return Ok(None);
    }
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::Malformed("v2 version"));
    }
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if len > V2_MAX {
        return Err(ProxyError::Malformed("v2 block too large"));
    }
    if buf.len() < 16 + len {
        return Ok(None);
    }
    let body = &buf[16..16 + len];
    let addr = match (ver_cmd & 0x0f, buf[13]) {
        (0x0, _) => None, // LOCAL: health check from the proxy itself.
        (0x1, 0x11) if body.len() >= 12 => {
            let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            Some(SocketAddr::new(
                IpAddr::V4(ip),
                u16::from_be_bytes([body[8], body[9]]),
            ))
        }
        (0x1, 0x21) if body.len() >= 36 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&body[..16]);
            Some(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(octets)),
                u16::from_be_bytes([body[32], body[33]]),
            ))
        }
        (0x1, 0x00) => None,
        (0x1, 0x11 | 0x21) => return Err(ProxyError::Malformed("v2 address block too short")),
        (0x1, _) => None, // UNIX sockets and others: keep the peer address.
        _ => return Err(ProxyError::Malformed("v2 command")),
    };
    Ok(Some((addr, 16 + len)))
}

/// Reads and consumes a PROXY header from `tcp`, leaving the bytes after it (the TLS ClientHello) unread.
///
/// # Errors
/// I/O errors; `InvalidData` wrapping [`ProxyError`] for a missing or malformed header.
pub async fn read_header(tcp: &mut TcpStream) -> io::Result<Option<SocketAddr>> {
    const MAX: usize = 16 + V2_MAX;
    // Bytes of an incomplete header are consumed as they arrive, so the next `peek` waits for new bytes instead of
    // returning the same ones again: peeking without consuming kept a core at 100% on `PROXY TCP4 ` then silence.
    // Every byte of an incomplete header belongs to the header, so consuming them never eats the ClientHello.
    let mut head: Vec<u8> = Vec::new();
    let mut peek = vec![0u8; MAX];
    loop {
        let room = MAX - head.len();
        if room == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                ProxyError::Malformed("too long"),
            ));
        }
        let n = tcp.peek(&mut peek[..room]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let mut seen = head.clone();
        seen.extend_from_slice(&peek[..n]);
        match parse(&seen) {
            Ok(Some((addr, used))) => {
                let mut sink = vec![0u8; used.saturating_sub(head.len())];
                tcp.read_exact(&mut sink).await?;
                return Ok(addr);
            }
            Ok(None) => {
                let mut part = vec![0u8; n];
                tcp.read_exact(&mut part).await?;
                head.extend_from_slice(&part);
            }
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1() {
        let h = b"PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\r\nrest";
        assert_eq!(
            parse(h),
            Ok(Some((
                Some("192.0.2.1:56324".parse().expect("addr")),
                h.len() - 4
            )))
        );
        assert_eq!(parse(b"PROXY UNKNOWN\r\n"), Ok(Some((None, 15))));
        assert_eq!(parse(b"PROXY TCP4 192.0.2.1"), Ok(None));
        assert!(parse(b"PROXY TCP4 ::1 ::1 1 2\r\n").is_err());
        assert!(parse(b"PROXY TCP4 192.0.2.1 198.51.100.1 99999 443\r\n").is_err());
        assert!(parse(&[b'P'; 200]).is_err());
        assert_eq!(parse(b"\x16\x03\x01\x02\x00"), Err(ProxyError::Missing));
    }

    #[test]
    fn v2() {
        let mut h = V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[
            0x21, 0x11, 0, 12, 10, 1, 2, 3, 10, 0, 0, 1, 0x1f, 0x90, 0x01, 0xbb,
        ]);
        assert_eq!(
            parse(&h),
            Ok(Some((Some("10.1.2.3:8080".parse().expect("addr")), 28)))
        );
        assert_eq!(parse(&h[..20]), Ok(None));
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(parse(&local), Ok(Some((None, 16))));
        let mut bad = h.clone();
        bad[12] = 0x11;
        assert!(parse(&bad).is_err());
        let mut short = V2_SIGNATURE.to_vec();
        short.extend_from_slice(&[0x21, 0x11, 0, 4, 1, 2, 3, 4]);
        assert!(parse(&short).is_err());
    }

    /// CPU time this thread has used, from `/proc/thread-self/stat` (utime + stime, in clock ticks of 10 ms).
    fn thread_cpu_ticks() -> u64 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").expect("stat");
        let after_comm = &stat[stat.rfind(')').expect("comm") + 2..];
        let fields: Vec<&str> = after_comm.split_whitespace().collect();
        // Fields 14 and 15 of the file are the 12th and 13th after the command name.
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
    }

    #[tokio::test(flavor = "current_thread")]
    async fn partial_header_waits_without_spinning_and_keeps_the_rest() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let mut client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (mut server, _) = listener.accept().await.expect("accept");
        client.write_all(b"PROXY TCP4 ").await.expect("write");
        let before = thread_cpu_ticks();
        let reader = tokio::spawn(async move {
            let addr = read_header(&mut server).await;
            (addr, server)
        });
        tokio::time::sleep(std::time::Duration::from_millis(600)).await;
        let used = thread_cpu_ticks() - before;
        assert!(
            !reader.is_finished(),
            "an incomplete header is still pending"
        );
        // Spinning burns the whole 600 ms (60 ticks); waiting burns next to nothing.
        assert!(
            used < 20,
            "read_header used {used} ticks of CPU while waiting"
        );
        // The rest of the header arrives later, with the first bytes of TLS right behind it.
        client
            .write_all(b"192.0.2.1 198.51.100.1 56324 443\r\n\x16\x03")
            .await
            .expect("write");
        let (addr, mut server) = tokio::time::timeout(std::time::Duration::from_secs(5), reader)
            .await
            .expect("in time")
            .expect("join");
        assert_eq!(
            addr.expect("header"),
            Some("192.0.2.1:56324".parse().expect("addr"))
        );
        let mut next = [0u8; 2];
        server.read_exact(&mut next).await.expect("rest");
        assert_eq!(&next, b"\x16\x03");
    }

    #[test]
    fn cidrs() {
        let c: Cidr = "10.0.0.0/8".parse().expect("cidr");
        assert!(c.contains("10.9.8.7".parse().expect("ip")));
        assert!(c.contains("::ffff:10.1.1.1".parse().expect("ip")));
        assert!(!c.contains("11.0.0.1".parse().expect("ip")));
        let all: Cidr = "0.0.0.0/0".parse().expect("cidr");
        assert!(all.contains("1.2.3.4".parse().expect("ip")));
        assert!("fd00::/8"
            .parse::<Cidr>()
            .expect("v6")
            .contains("fd12::1".parse().expect("ip")));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("x/8".parse::<Cidr>().is_err());
    }
}
